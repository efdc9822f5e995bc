"""Tests for settings (app/core/settings.py): defaults, every variable, and one-line errors.

``Settings.from_environ`` is always given an explicit mapping, so the test process's
own environment never leaks in; only the start-up test runs a real process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from app.core.settings import (
    Settings,
    SettingsError,
    UnknownVariable,
    known_variables,
    unknown_variables,
)
from app.web.factory import init_app
from strategies import STRATEGIES, Tuning
from tests.conftest import MakeClient
from tests.support.jobs import ScriptedPipeline, create_job
from tests.support.process import json_lines

MAIN = Path(__file__).resolve().parent.parent

# The contract lets the README recommend a default other than `combined`; the code
# currently defaults to `aligned`. Keep this in step with the README's recommendation.
DEFAULT_STRATEGY = "aligned"


def load(**env: str) -> Settings:
    return Settings.from_environ(env)


# --- defaults ----------------------------------------------------------------------


class TestDefaults:
    def test_empty_environment_gives_contract_defaults(self) -> None:
        """With no variables set: 127.0.0.1:8080, memory bus, demo pipeline, info logs."""
        s = load()
        assert (s.host, s.port, s.bus, s.pipeline) == ("127.0.0.1", 8080, "memory", "demo")
        assert s.strategy == DEFAULT_STRATEGY
        assert s.strategy in STRATEGIES
        assert (s.log_level, s.log_format) == ("info", "auto")

    def test_scale_out_defaults_are_the_contracts(self) -> None:
        """Lease 15 s, shutdown grace 8 s, Redis grace 8 s (under two thirds of the lease)."""
        s = load()
        assert (s.runner_lease_s, s.shutdown_grace_s, s.redis_grace_s) == (15.0, 8.0, 8.0)

    def test_unset_tuning_stays_none_so_strategies_pick_their_defaults(self) -> None:
        """No tuning variable set means an all-None Tuning (each strategy's own defaults)."""
        assert load().tuning() == Tuning()

    def test_blank_values_count_as_unset(self) -> None:
        """A variable set to whitespace only is treated as not set."""
        blank = load(
            FLUSHLINE_STRATEGY="  ",
            FLUSHLINE_PADDING_BYTES="",
            FLUSHLINE_CHUNK_INTERVAL=" ",
            FLUSHLINE_PORT="\t",
        )
        assert blank == load()

    def test_from_environ_reads_os_environ_by_default(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without a mapping, from_environ reads the process environment."""
        monkeypatch.setenv("FLUSHLINE_CHUNK_CHARS", "321")
        assert Settings.from_environ().chunk_chars == 321


class TestPort:
    def test_port_beats_flushline_port(self) -> None:
        """PORT (Cloud Run) wins over FLUSHLINE_PORT."""
        assert load(PORT="9001", FLUSHLINE_PORT="9002").port == 9001

    def test_flushline_port_used_without_port(self) -> None:
        """FLUSHLINE_PORT applies when PORT is not set."""
        assert load(FLUSHLINE_PORT="9002").port == 9002

    def test_blank_port_falls_back_to_flushline_port(self) -> None:
        """An empty PORT does not hide FLUSHLINE_PORT."""
        assert load(PORT=" ", FLUSHLINE_PORT="9002").port == 9002

    def test_neither_gives_8080(self) -> None:
        """Without PORT or FLUSHLINE_PORT the port is 8080."""
        assert load().port == 8080

    @pytest.mark.parametrize("value", ["1", "65535"])
    def test_port_range_bounds_are_accepted(self, value: str) -> None:
        """Ports 1 and 65535 are valid."""
        assert load(PORT=value).port == int(value)


# --- every variable ----------------------------------------------------------------

PARSED: list[tuple[str, str, str, Any]] = [
    ("FLUSHLINE_HOST", "0.0.0.0", "host", "0.0.0.0"),
    ("FLUSHLINE_STRATEGY", "padding", "strategy", "padding"),
    ("FLUSHLINE_STRATEGY", "Frequency", "strategy", "frequency"),
    ("FLUSHLINE_PIPELINE", "scripted", "pipeline", "scripted"),
    ("FLUSHLINE_PIPELINES", "a.b:c, d:e.f", "pipelines", ("a.b:c", "d:e.f")),
    ("FLUSHLINE_PADDING_BYTES", "4096", "padding_bytes", 4096),
    ("FLUSHLINE_PADDING_BYTES", "0", "padding_bytes", 0),
    ("FLUSHLINE_CHUNK_CHARS", "250", "chunk_chars", 250),
    ("FLUSHLINE_CHUNK_INTERVAL", "0.75", "chunk_interval_s", 0.75),
    ("FLUSHLINE_CHUNK_INTERVAL", "2s", "chunk_interval_s", 2.0),
    ("FLUSHLINE_PROGRESS_INTERVAL", "2.5", "progress_interval_s", 2.5),
    ("FLUSHLINE_HEARTBEAT_INTERVAL", "20", "heartbeat_interval_s", 20.0),
    ("FLUSHLINE_PROXY_BUFFER_BYTES", "8192", "proxy_buffer_bytes", 8192),
    ("FLUSHLINE_PROXY_BUFFER_BYTES", "0", "proxy_buffer_bytes", 0),
    ("FLUSHLINE_MAX_DELAY_MS", "250", "max_delay_ms", 250.0),
    ("FLUSHLINE_RETRY_MS", "1500", "retry_ms", 1500),
    ("FLUSHLINE_HISTORY_LIMIT", "500", "history_limit", 500),
    ("FLUSHLINE_SUBSCRIBER_QUEUE", "64", "subscriber_queue", 64),
    ("FLUSHLINE_MAX_ACTIVE_JOBS", "7", "max_active_jobs", 7),
    ("FLUSHLINE_MAX_BODY_BYTES", "2048", "max_body_bytes", 2048),
    ("FLUSHLINE_JOB_TTL", "60", "job_ttl_s", 60.0),
    ("FLUSHLINE_RUNNER_LEASE_S", "3", "runner_lease_s", 3.0),
    ("FLUSHLINE_SHUTDOWN_GRACE_S", "2.5s", "shutdown_grace_s", 2.5),
    ("FLUSHLINE_REDIS_GRACE_S", "4", "redis_grace_s", 4.0),
    ("FLUSHLINE_MAX_RETAINED_JOBS", "99", "max_retained_jobs", 99),
    ("FLUSHLINE_SEND_TIMEOUT", "4.5", "send_timeout_s", 4.5),
    ("FLUSHLINE_LOG_LEVEL", "DEBUG", "log_level", "debug"),
    ("FLUSHLINE_LOG_FORMAT", "json", "log_format", "json"),
    ("FLUSHLINE_STREAM_TOKEN_TTL_S", "600", "stream_token_ttl_s", 600.0),
    ("FLUSHLINE_MAX_HISTORY_BYTES", "65536", "max_history_bytes", 65536),
    ("FLUSHLINE_MAX_RETAINED_BYTES", "1073741824", "max_retained_bytes", 1 << 30),
    ("FLUSHLINE_MAX_CONNECTIONS", "900", "max_connections", 900),
    ("FLUSHLINE_HEADER_TIMEOUT_S", "2.5", "header_timeout_s", 2.5),
    ("FLUSHLINE_AUTH", "OFF", "auth", "off"),
    (
        "FLUSHLINE_ALLOWED_HOSTS",
        "App.example.com, [::2]",
        "allowed_hosts",
        ("app.example.com", "::2"),
    ),
    ("FLUSHLINE_ALLOWED_HOSTS", "*", "allowed_hosts", ("*",)),
    ("FLUSHLINE_PRODUCER_TIMEOUT_S", "5", "producer_timeout_s", 5.0),
    ("FLUSHLINE_PUBLISH_MAX_EVENTS", "50", "publish_max_events", 50),
    ("FLUSHLINE_PUBLISH_MAX_TEXT_BYTES", "1024", "publish_max_text_bytes", 1024),
    ("FLUSHLINE_PUBLISH_MAX_JOB_BYTES", "65536", "publish_max_job_bytes", 65536),
    ("FLUSHLINE_PUBLISH_RATE", "100", "publish_rate_per_s", 100.0),
]


class TestEveryVariable:
    @pytest.mark.parametrize(("variable", "raw", "field", "value"), PARSED)
    def test_variable_is_parsed(self, variable: str, raw: str, field: str, value: Any) -> None:
        """Each FLUSHLINE_* variable sets its field to a non-default, typed value."""
        parsed = getattr(load(**{variable: raw}), field)
        assert parsed == value
        assert type(parsed) is type(value)
        assert getattr(load(), field) != value  # else an ignored variable would pass

    def test_surrounding_whitespace_is_stripped(self) -> None:
        """Values are stripped before parsing."""
        s = load(FLUSHLINE_CHUNK_CHARS=" 42\n", FLUSHLINE_STRATEGY=" none ")
        assert (s.chunk_chars, s.strategy) == (42, "none")

    def test_tuning_carries_every_tuning_variable(self) -> None:
        """tuning() hands every tuning variable to the strategies."""
        s = load(
            FLUSHLINE_PADDING_BYTES="1000",
            FLUSHLINE_CHUNK_CHARS="50",
            FLUSHLINE_CHUNK_INTERVAL="0.5",
            FLUSHLINE_PROGRESS_INTERVAL="3",
            FLUSHLINE_HEARTBEAT_INTERVAL="10",
            FLUSHLINE_PROXY_BUFFER_BYTES="16384",
            FLUSHLINE_MAX_DELAY_MS="50",
        )
        assert s.tuning() == Tuning(
            padding_bytes=1000,
            chunk_chars=50,
            chunk_interval_s=0.5,
            progress_interval_s=3.0,
            heartbeat_interval_s=10.0,
            proxy_buffer_bytes=16384,
            max_delay_ms=50.0,
        )

    @pytest.mark.parametrize("name", sorted(STRATEGIES))
    def test_every_registered_strategy_is_accepted(self, name: str) -> None:
        """FLUSHLINE_STRATEGY accepts every name in the strategy registry."""
        assert load(FLUSHLINE_STRATEGY=name).strategy == name


class TestBusAndPipeline:
    """The bus and pipeline variables: read, and checked."""

    @pytest.mark.parametrize(("raw", "bus"), [(" MEMORY ", "memory"), ("Redis", "redis")])
    def test_bus_is_a_case_insensitive_choice(self, raw: str, bus: str) -> None:
        """FLUSHLINE_BUS picks memory or redis, whatever the case."""
        assert load(FLUSHLINE_BUS=raw).bus == bus

    def test_bus_is_read(self) -> None:
        """FLUSHLINE_BUS is not ignored: an unknown bus is refused naming the allowed ones."""
        with pytest.raises(SettingsError, match="FLUSHLINE_BUS='kafka': allowed: memory, redis"):
            load(FLUSHLINE_BUS="kafka")

    def test_redis_url_is_read(self) -> None:
        """FLUSHLINE_REDIS_URL is read whatever the bus, with its default otherwise."""
        assert load().redis_url == "redis://127.0.0.1:6379/0"
        assert load(FLUSHLINE_REDIS_URL="redis://cache:6380/2").redis_url == "redis://cache:6380/2"

    def test_unknown_pipeline_is_refused_by_the_factory(self) -> None:
        """A FLUSHLINE_PIPELINE naming no registered pipeline fails init_app in one line."""
        message = "invalid FLUSHLINE_PIPELINE='summarise': allowed: demo, chat"
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            init_app(load(FLUSHLINE_PIPELINE="summarise"))

    def test_registered_pipeline_is_accepted_by_the_factory(self) -> None:
        """FLUSHLINE_PIPELINE may name a user pipeline registered with init_app."""
        pipeline = ScriptedPipeline(((0.0, "a"),))
        init_app(load(FLUSHLINE_PIPELINE="scripted"), pipelines=(pipeline,))

    async def test_pipeline_is_the_default_of_jobs_naming_none(
        self, make_client: MakeClient
    ) -> None:
        """A job whose body names no pipeline runs FLUSHLINE_PIPELINE's (demo without it)."""
        pipeline = ScriptedPipeline(((0.0, "a"),))
        client = await make_client({"FLUSHLINE_PIPELINE": "scripted"}, pipelines=(pipeline,))
        assert (await create_job(client))["pipeline"] == "scripted"
        default = await make_client({}, pipelines=(pipeline,))
        assert (await create_job(default))["pipeline"] == "demo"


class TestProvider:
    """The three FLUSHLINE_LLM_* variables."""

    def test_provider_is_read_and_the_key_hidden(self) -> None:
        """URL (trailing slash dropped), model and key are read; the key is not in repr."""
        settings = Settings.from_environ(
            {
                "FLUSHLINE_LLM_BASE_URL": "https://api.groq.com/openai/v1/",
                "FLUSHLINE_LLM_MODEL": "llama-3.1-8b-instant",
                "FLUSHLINE_LLM_API_KEY": "gsk_secret",
            }
        )
        assert settings.llm_base_url == "https://api.groq.com/openai/v1"
        assert settings.llm_model == "llama-3.1-8b-instant"
        assert settings.llm_api_key == "gsk_secret"
        assert "gsk_secret" not in repr(settings)

    def test_one_without_the_other_is_refused(self) -> None:
        """A base URL without a model, or a model without a URL: one line naming the missing one."""
        with pytest.raises(SettingsError, match=r"FLUSHLINE_LLM_MODEL.*required"):
            Settings.from_environ({"FLUSHLINE_LLM_BASE_URL": "http://localhost:11434/v1"})
        with pytest.raises(SettingsError, match=r"FLUSHLINE_LLM_BASE_URL.*required"):
            Settings.from_environ({"FLUSHLINE_LLM_MODEL": "llama3.2"})


class TestUnknownVariables:
    """Misspelt FLUSHLINE_* variables are found against the loader's own names."""

    def test_known_variables_are_those_the_loader_reads(self) -> None:
        """Every variable exercised above is known, PORT included; nothing else is."""
        exercised = {row[0] for row in PARSED} | {row[0] for row in INVALID}
        exercised |= {"FLUSHLINE_BUS", "FLUSHLINE_CORS_ORIGINS", "FLUSHLINE_REDIS_URL"}
        exercised |= {"FLUSHLINE_LLM_MODEL", "FLUSHLINE_LLM_API_KEY"}
        exercised |= {"FLUSHLINE_API_TOKEN", "FLUSHLINE_SECRET_KEY"}
        assert exercised <= known_variables()
        assert known_variables() - exercised == set()

    @pytest.mark.parametrize(
        ("name", "suggestion"),
        [
            ("FLUSHLINE_STARTEGY", "FLUSHLINE_STRATEGY"),
            ("FLUSHLINE_LOGLEVEL", "FLUSHLINE_LOG_LEVEL"),
            ("FLUSHLINE_CORS_ORIGIN", "FLUSHLINE_CORS_ORIGINS"),
            ("FLUSHLINE_PROXY_BUFFER", "FLUSHLINE_PROXY_BUFFER_BYTES"),
            ("FLUSHLINE_ZZZ", None),
        ],
    )
    def test_unknown_variable_names_the_closest_known_one(
        self, name: str, suggestion: str | None
    ) -> None:
        """An unknown FLUSHLINE_ name comes with the closest known name, if any is close."""
        assert unknown_variables({name: "1"}) == [UnknownVariable(name, suggestion)]

    def test_known_and_foreign_variables_are_not_reported(self) -> None:
        """Known FLUSHLINE_ variables and other programs' variables are left alone."""
        env = {"FLUSHLINE_STRATEGY": "none", "PORT": "1", "HOME": "/", "FLUSHLINEX": "1"}
        assert unknown_variables(env) == []


# --- invalid values ----------------------------------------------------------------

INVALID: list[tuple[str, str, str]] = [
    # (variable, bad value, a word the "allowed" part must contain)
    ("FLUSHLINE_STRATEGY", "bogus", "combined"),
    ("FLUSHLINE_STRATEGY", "padding,frequency", "padding"),
    ("FLUSHLINE_BUS", "kafka", "memory"),
    ("FLUSHLINE_REDIS_URL", "http://cache:6379/0", "redis://"),
    ("FLUSHLINE_LLM_BASE_URL", "api.openai.com/v1", "https://"),
    ("FLUSHLINE_LLM_BASE_URL", "ftp://example.com/v1", "https://"),
    ("FLUSHLINE_PIPELINES", "examples.resume_tailoring", "package.module:attribute"),
    ("FLUSHLINE_BUS", "memory,redis", "memory"),
    ("FLUSHLINE_LOG_LEVEL", "verbose", "debug"),
    ("FLUSHLINE_LOG_FORMAT", "xml", "json"),
    ("PORT", "0", "65535"),
    ("PORT", "65536", "65535"),
    ("PORT", "-80", "65535"),
    ("PORT", "http", "integer"),
    ("FLUSHLINE_PORT", "99999", "65535"),
    ("FLUSHLINE_PORT", "80.5", "integer"),
    ("FLUSHLINE_PADDING_BYTES", "-1", "integer"),
    ("FLUSHLINE_PADDING_BYTES", "2kb", "integer"),
    ("FLUSHLINE_CHUNK_CHARS", "0", "integer"),
    ("FLUSHLINE_CHUNK_CHARS", "-10", "integer"),
    ("FLUSHLINE_CHUNK_CHARS", "many", "integer"),
    ("FLUSHLINE_CHUNK_INTERVAL", "-1", "seconds"),
    ("FLUSHLINE_CHUNK_INTERVAL", "0", "seconds"),
    ("FLUSHLINE_CHUNK_INTERVAL", "soon", "seconds"),
    ("FLUSHLINE_CHUNK_INTERVAL", "nan", "seconds"),
    ("FLUSHLINE_CHUNK_INTERVAL", "inf", "seconds"),
    ("FLUSHLINE_PROGRESS_INTERVAL", "-5", "seconds"),
    ("FLUSHLINE_HEARTBEAT_INTERVAL", "0", "seconds"),
    ("FLUSHLINE_HEARTBEAT_INTERVAL", "1e9", "seconds"),
    ("FLUSHLINE_PROXY_BUFFER_BYTES", "-4096", "integer"),
    ("FLUSHLINE_MAX_DELAY_MS", "0", "number"),
    ("FLUSHLINE_MAX_DELAY_MS", "-100", "number"),
    ("FLUSHLINE_MAX_DELAY_MS", "fast", "number"),
    ("FLUSHLINE_RETRY_MS", "-1", "integer"),
    ("FLUSHLINE_HISTORY_LIMIT", "0", "integer"),
    ("FLUSHLINE_SUBSCRIBER_QUEUE", "0", "integer"),
    ("FLUSHLINE_SUBSCRIBER_QUEUE", "-3", "integer"),
    ("FLUSHLINE_MAX_ACTIVE_JOBS", "0", "integer"),
    ("FLUSHLINE_MAX_ACTIVE_JOBS", "lots", "integer"),
    ("FLUSHLINE_MAX_BODY_BYTES", "1", "integer"),
    ("FLUSHLINE_JOB_TTL", "-60", "seconds"),
    ("FLUSHLINE_RUNNER_LEASE_S", "0", "seconds"),
    ("FLUSHLINE_SHUTDOWN_GRACE_S", "soon", "seconds"),
    ("FLUSHLINE_REDIS_GRACE_S", "0", "seconds"),
    ("FLUSHLINE_MAX_RETAINED_JOBS", "0", "integer"),
    ("FLUSHLINE_SEND_TIMEOUT", "0", "seconds"),
    ("FLUSHLINE_SEND_TIMEOUT", "never", "seconds"),
    ("FLUSHLINE_STREAM_TOKEN_TTL_S", "0", "seconds"),
    ("FLUSHLINE_MAX_HISTORY_BYTES", "100", "integer"),
    ("FLUSHLINE_MAX_HISTORY_BYTES", "200000000", "FLUSHLINE_MAX_RETAINED_BYTES"),
    ("FLUSHLINE_MAX_RETAINED_BYTES", "1kb", "integer"),
    ("FLUSHLINE_MAX_CONNECTIONS", "3", "integer"),
    ("FLUSHLINE_HEADER_TIMEOUT_S", "-1", "seconds"),
]


class TestInvalidValues:
    @pytest.mark.parametrize(("variable", "bad", "allowed_word"), INVALID)
    def test_invalid_value_raises_one_line_naming_variable_value_and_allowed(
        self, variable: str, bad: str, allowed_word: str
    ) -> None:
        """A bad value raises SettingsError: one line with the variable, value and rule."""
        with pytest.raises(SettingsError) as info:
            load(**{variable: bad})
        message = str(info.value)
        assert "\n" not in message
        assert "\r" not in message
        assert variable in message
        assert bad in message
        assert allowed_word in message
        assert (info.value.variable, info.value.value) == (variable, bad)
        assert info.value.allowed in message

    def test_unknown_strategy_lists_every_allowed_name(self) -> None:
        """The strategy error lists all registered strategy names."""
        with pytest.raises(SettingsError) as info:
            load(FLUSHLINE_STRATEGY="bogus")
        for name in STRATEGIES:
            assert name in str(info.value)

    def test_value_with_embedded_newline_still_gives_one_line(self) -> None:
        """A value containing a line break is quoted, so the message stays on one line."""
        with pytest.raises(SettingsError) as info:
            load(FLUSHLINE_CHUNK_CHARS="12\n34")
        assert "\n" not in str(info.value)
        assert "FLUSHLINE_CHUNK_CHARS" in str(info.value)

    def test_settings_error_is_a_value_error(self) -> None:
        """SettingsError subclasses ValueError so generic handlers still catch it."""
        with pytest.raises(ValueError, match="FLUSHLINE_BUS"):
            load(FLUSHLINE_BUS="nope")


# --- start-up ----------------------------------------------------------------------


def test_startup_with_invalid_strategy_exits_2_with_one_stderr_line() -> None:
    """`python -m app` with FLUSHLINE_STRATEGY=bogus exits 2 printing one clear line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUSHLINE_") and k != "PORT"}
    env["FLUSHLINE_STRATEGY"] = "bogus"
    env["FLUSHLINE_PORT"] = "1"  # never bound: start-up must stop before serving
    result = subprocess.run(
        [sys.executable, "-m", "app"],
        cwd=MAIN,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    [line] = lines
    assert "FLUSHLINE_STRATEGY" in line
    assert "bogus" in line
    for name in STRATEGIES:
        assert name in line
    assert result.stdout == ""


def run_app(**variables: str) -> subprocess.CompletedProcess[str]:
    """`python -m app` with only ``variables`` of the FLUSHLINE_ kind set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUSHLINE_") and k != "PORT"}
    env.update(variables)
    return subprocess.run(
        [sys.executable, "-m", "app"],
        cwd=MAIN,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_startup_with_unknown_pipeline_exits_2_with_one_line() -> None:
    """An unregistered FLUSHLINE_PIPELINE stops start-up: one line naming it, exit 2."""
    result = run_app(FLUSHLINE_PIPELINE="summarise", FLUSHLINE_LOG_FORMAT="console")
    assert result.returncode == 2, result.stderr
    assert (
        result.stderr == "flushline: invalid FLUSHLINE_PIPELINE='summarise': allowed: demo, chat\n"
    )
    assert result.stdout == ""


def test_startup_with_unknown_pipeline_in_json_mode_is_one_json_line() -> None:
    """In JSON mode the same refusal is one JSON log line (severity ERROR), exit 2."""
    result = run_app(FLUSHLINE_PIPELINE="summarise", FLUSHLINE_LOG_FORMAT="json")
    assert result.returncode == 2, result.stderr
    [line] = json_lines(result.stderr)
    assert line["severity"] == "ERROR"
    assert line["message"] == "invalid FLUSHLINE_PIPELINE='summarise': allowed: demo, chat"
    assert result.stdout == ""


class TestSecrets:
    """API tokens and the signing key: checked, never echoed, never in ``repr``."""

    def test_tokens_are_a_comma_list(self) -> None:
        """Several tokens (for rotation) are read in order; the key is kept as given."""
        settings = load(
            FLUSHLINE_API_TOKEN="a" * 16 + ", " + "b" * 20,
            FLUSHLINE_SECRET_KEY="k" * 32,
        )
        assert settings.api_tokens == ("a" * 16, "b" * 20)
        assert settings.secret_key == "k" * 32
        assert "aaaaaaaaaaaaaaaa" not in repr(settings)
        assert "kkkkkkkkkkkkkkkk" not in repr(settings)

    @pytest.mark.parametrize(
        ("variable", "bad"),
        [
            ("FLUSHLINE_API_TOKEN", "short-token"),
            ("FLUSHLINE_API_TOKEN", "a" * 16 + ",,"),
            ("FLUSHLINE_API_TOKEN", "has a space in it, really"),
            ("FLUSHLINE_SECRET_KEY", "too-short"),
        ],
    )
    def test_weak_secret_is_refused_without_echoing_it(self, variable: str, bad: str) -> None:
        """A short or malformed secret stops start-up, naming the variable but not the value."""
        with pytest.raises(SettingsError) as info:
            load(**{variable: bad})
        assert variable in str(info.value)
        assert bad not in str(info.value)

    def test_auth_on_redis_needs_a_shared_key(self) -> None:
        """With the Redis bus, auth needs FLUSHLINE_SECRET_KEY (every instance must agree)."""
        with pytest.raises(SettingsError, match="FLUSHLINE_SECRET_KEY"):
            load(FLUSHLINE_BUS="redis", FLUSHLINE_API_TOKEN="t" * 16)
        shared = load(
            FLUSHLINE_BUS="redis", FLUSHLINE_API_TOKEN="t" * 16, FLUSHLINE_SECRET_KEY="s" * 16
        )
        assert shared.secret_key == "s" * 16
