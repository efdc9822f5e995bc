"""The ``flushline`` command line as a user meets it, over real subprocesses.

``--version``, ``--help``, ``serve --host/--port`` against the environment, a port in
use, misspelt variables, the start-up line, URLs without a scheme for ``watch`` and
``probe``, and a client that leaves before the answer.
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import signal
import socket
import sys

import aiohttp
import orjson
import pytest

import app
from app.cli import build_parser, normalize_url
from strategies import Tuning, build_strategy
from tests.conftest import QUICK_JOB
from tests.support.paths import serve
from tests.support.process import (
    clean_env,
    free_port,
    json_lines,
    read_log,
    require_flushline_script,
    run_cli,
    server_process,
    wait_accepting,
)

EXIT_TIMEOUT_S = 10.0
SERVE = (sys.executable, "-m", "app", "serve")


async def stop(process: asyncio.subprocess.Process, log: pathlib.Path) -> list[dict[str, object]]:
    """SIGTERM the server, check it exits 0; every line it wrote, parsed as JSON."""
    process.send_signal(signal.SIGTERM)
    code = await asyncio.wait_for(process.wait(), EXIT_TIMEOUT_S)
    assert code == 0, read_log(log)[-2000:]
    return json_lines(read_log(log))


def refuses(host: str, port: int) -> bool:
    """Whether nothing accepts connections on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        return sock.connect_ex((host, port)) != 0


class TestVersionAndHelp:
    async def test_version_prints_the_package_version(self) -> None:
        """`python -m app --version` prints `flushline <app.__version__>` and exits 0."""
        code, out, err = await run_cli("--version", env=clean_env())
        assert (code, out, err) == (0, f"flushline {app.__version__}\n", "")

    async def test_console_script_prints_the_same_version(self) -> None:
        """The `flushline` console script is the same entry point: same version line."""
        script = require_flushline_script()
        code, out, err = await run_cli("--version", env=clean_env(), argv0=(script,))
        assert (code, out, err) == (0, f"flushline {app.__version__}\n", "")

    async def test_serve_help_says_flags_win_over_the_environment(self) -> None:
        """`serve --help` says --host/--port win and names the variables they beat."""
        code, out, err = await run_cli("serve", "--help", env=clean_env())
        assert code == 0, err
        text = " ".join(out.split())
        assert "--host and --port win over the environment" in text
        assert "wins over FLUSHLINE_HOST" in text
        assert "wins over PORT and FLUSHLINE_PORT" in text

    async def test_top_level_help_lists_commands_and_the_rule(self) -> None:
        """`flushline --help` lists every command and says --host/--port win."""
        code, out, err = await run_cli("--help", env=clean_env())
        assert code == 0, err
        for command in ("serve", "proxy", "probe", "watch", "--version"):
            assert command in out
        assert "--host/--port win" in out


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    """Each command's parser, as `flushline` builds them."""
    parser = build_parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(commands.choices)


@pytest.mark.parametrize(
    "command",
    [
        "serve",
        "proxy",
        "watch",
        "probe",
    ],
)
def test_every_option_has_help(command: str) -> None:
    """Every argument of every command has help text."""
    parser = command_parsers()[command]
    missing = [
        action.dest
        for action in parser._actions
        if not action.help or action.help == argparse.SUPPRESS
    ]
    assert missing == []


class TestServeFlags:
    async def test_host_and_port_flags_win_over_the_environment(
        self, tmp_path: pathlib.Path
    ) -> None:
        """--host/--port beat FLUSHLINE_HOST, PORT and FLUSHLINE_PORT: it listens there only."""
        port, decoy_port, decoy_flushline_port = free_port(), free_port(), free_port()
        env = clean_env(
            PORT=str(decoy_port),
            FLUSHLINE_PORT=str(decoy_flushline_port),
            FLUSHLINE_HOST="127.0.0.2",
            FLUSHLINE_LOG_FORMAT="json",
        )
        log = tmp_path / "server.log"
        argv = [*SERVE, "--host", "127.0.0.1", "--port", str(port)]
        async with server_process(argv, env, log) as process:
            await wait_accepting(process, port)
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{port}/healthz") as response,
            ):
                assert response.status == 200
            assert refuses("127.0.0.2", port)  # not the environment's host
            assert refuses("127.0.0.1", decoy_port)
            assert refuses("127.0.0.1", decoy_flushline_port)
            lines = await stop(process, log)
        [serving] = [line for line in lines if line["message"] == "serving"]
        assert (serving["host"], serving["port"]) == ("127.0.0.1", port)

    @pytest.mark.parametrize("bad", ["0", "65536", "http"])
    async def test_bad_port_flag_is_refused(self, bad: str) -> None:
        """--port outside 1-65535 is a usage error (exit 2) naming --port."""
        code, out, err = await run_cli("serve", "--port", bad, env=clean_env())
        assert code == 2
        assert out == ""
        assert "argument --port" in err
        assert "Traceback" not in err


class TestPortInUse:
    async def test_one_plain_line_and_exit_2(self) -> None:
        """A port already in use: one line naming host and port, exit 2, no traceback."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            port = holder.getsockname()[1]
            code, out, err = await run_cli(
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                env=clean_env(FLUSHLINE_LOG_FORMAT="console"),
                timeout_s=30,
            )
        assert code == 2
        assert err == f"flushline: cannot listen on 127.0.0.1:{port}: address already in use\n"
        assert out == ""

    async def test_one_json_line_in_json_mode(self) -> None:
        """In JSON mode the same failure is one JSON log line (severity ERROR), exit 2."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            port = holder.getsockname()[1]
            code, out, err = await run_cli(
                "--host",  # no command: serve is implied
                "127.0.0.1",
                env=clean_env(PORT=str(port), FLUSHLINE_LOG_FORMAT="json"),
                timeout_s=30,
            )
        assert code == 2
        assert out == ""
        [line] = json_lines(err)
        assert line["severity"] == "ERROR"
        assert line["message"] == f"cannot listen on 127.0.0.1:{port}: address already in use"
        assert (line["host"], line["port"]) == ("127.0.0.1", port)


class TestStartUp:
    async def test_unknown_variable_is_named_with_the_closest_known_one(
        self, tmp_path: pathlib.Path
    ) -> None:
        """FLUSHLINE_STARTEGY logs one warning suggesting FLUSHLINE_STRATEGY; serving goes on."""
        port = free_port()
        env = clean_env(
            PORT=str(port),
            FLUSHLINE_STARTEGY="none",
            FLUSHLINE_STRATEGY="padding",
            FLUSHLINE_LOG_FORMAT="json",
        )
        log = tmp_path / "server.log"
        async with server_process([*SERVE], env, log) as process:
            await wait_accepting(process, port)
            lines = await stop(process, log)
        warnings = [line for line in lines if line["severity"] == "WARNING"]
        assert len(warnings) == 1, lines
        assert warnings[0]["variable"] == "FLUSHLINE_STARTEGY"
        assert warnings[0]["hint"] == "did you mean FLUSHLINE_STRATEGY?"

    async def test_one_start_up_line_with_the_effective_settings(
        self, tmp_path: pathlib.Path
    ) -> None:
        """One `serving` line before any request: strategy, bus, pipelines, address, limits."""
        port = free_port()
        env = clean_env(
            PORT=str(port),
            FLUSHLINE_STRATEGY="padding",
            FLUSHLINE_PADDING_BYTES="1000",
            FLUSHLINE_MAX_ACTIVE_JOBS="7",
            FLUSHLINE_MAX_BODY_BYTES="2048",
            FLUSHLINE_CORS_ORIGINS="https://app.example",
            FLUSHLINE_LOG_FORMAT="json",
        )
        log = tmp_path / "server.log"
        async with server_process([*SERVE], env, log) as process:
            await wait_accepting(process, port)
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{port}/healthz") as response,
            ):
                assert response.status == 200
            lines = await stop(process, log)
        messages = [line["message"] for line in lines]
        assert messages.count("serving") == 1
        assert messages.index("serving") < messages.index("request")
        serving = lines[messages.index("serving")]
        assert serving["version"] == app.__version__
        assert (serving["host"], serving["port"]) == ("127.0.0.1", port)
        assert (serving["bus"], serving["pipeline"]) == ("memory", "demo")
        assert {"demo", "chat"} <= set(serving["pipelines"])  # type: ignore[arg-type]
        assert serving["auth"] == "off"
        assert serving["allowed_hosts"] == ["localhost", "127.0.0.1", "::1"]
        expected = build_strategy("padding", Tuning(padding_bytes=1000)).describe()
        assert serving["strategy"] == orjson.loads(orjson.dumps(expected))
        assert serving["strategy"]["padding_bytes"] == 1000  # type: ignore[index]
        limits = serving["limits"]
        assert isinstance(limits, dict)
        assert (limits["max_active_jobs"], limits["max_body_bytes"]) == (7, 2048)
        assert {"history_limit", "subscriber_queue", "send_timeout_s"} <= limits.keys()
        assert serving["cors_origins"] == ["https://app.example"]
        assert "Running on" not in read_log(log)


class TestUrls:
    @pytest.mark.parametrize(
        ("raw", "url"),
        [
            ("localhost:8080", "http://localhost:8080"),
            ("127.0.0.1:8080/api/jobs/abc/stream", "http://127.0.0.1:8080/api/jobs/abc/stream"),
            ("[::1]:8080", "http://[::1]:8080"),
            (" example.com ", "http://example.com"),
            ("https://example.com/base", "https://example.com/base"),
            ("HTTP://example.com", "HTTP://example.com"),
        ],
    )
    def test_normalize_url(self, raw: str, url: str) -> None:
        """A URL without a scheme gets http://; one with http(s):// is kept."""
        assert normalize_url(raw) == url

    async def test_watch_accepts_host_and_port(self) -> None:
        """`watch 127.0.0.1:PORT` starts a job on http://127.0.0.1:PORT and watches it to done."""
        async with serve() as service:
            bare = service.removeprefix("http://")
            code, out, err = await run_cli(
                "watch", bare, "--options", orjson.dumps(QUICK_JOB).decode(), timeout_s=30
            )
        assert code == 0, err
        assert out.startswith(f"started a job; watching {service}/api/jobs/"), out
        assert "status succeeded" in out

    async def test_probe_accepts_host_and_port(self) -> None:
        """`probe 127.0.0.1:PORT` reads the diagnostics stream of http://127.0.0.1:PORT."""
        async with serve() as service:
            bare = service.removeprefix("http://")
            code, out, err = await run_cli(
                "probe", bare, "--json", "--max-buffer", "4096", timeout_s=60
            )
        assert code == 0, err
        report = orjson.loads(out)
        assert report["url"] == service
        assert report["status"] == 200

    @pytest.mark.parametrize("command", ["watch", "probe"])
    @pytest.mark.parametrize(
        ("raw", "problem"),
        [
            ("ftp://localhost:8080", "'ftp://localhost:8080' has the scheme 'ftp'; use http://"),
            ("localhost:80a", "'localhost:80a' has an invalid port '80a' (1-65535)"),
            ("localhost:70000", "'localhost:70000' has an invalid port '70000' (1-65535)"),
            ("http://", "'http://' has no host (expected e.g. localhost:8080)"),
            ("localhost :8080", "'localhost :8080' contains whitespace"),
        ],
    )
    async def test_bad_url_is_one_line_saying_what_is_wrong(
        self, command: str, raw: str, problem: str
    ) -> None:
        """A URL that cannot work: exit 2, one stderr line naming the problem, no request."""
        code, out, err = await run_cli(command, raw, env=clean_env(), timeout_s=30)
        assert code == 2
        assert out == ""
        assert err.startswith(f"flushline {command}: invalid URL: {problem}"), err
        assert err.count("\n") == 1


#: 5 tokens at 0.1 tokens/s: the job emits its opening events, then nothing for 10 s.
QUIET_JOB = {"steps": 1, "tokens_per_step": 5, "tokens_per_second": 0.1}
PARTIAL_POST = (
    b"POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b'Content-Length: 100\r\n\r\n{"opt'
)


async def send_and_leave(port: int, data: bytes) -> None:
    """Send ``data`` on a fresh connection and close it before any answer comes."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    await asyncio.sleep(0.3)  # the handler is now waiting (for the body, or for events)
    writer.close()
    await writer.wait_closed()


async def test_client_gone_before_headers_is_an_info_line(tmp_path: pathlib.Path) -> None:
    """A slow POST and a long-poll left before headers: info lines `client_gone`, no ERROR/500."""
    port = free_port()
    log = tmp_path / "server.log"
    env = clean_env(PORT=str(port), FLUSHLINE_LOG_FORMAT="json")
    async with server_process([*SERVE], env, log) as process:
        await wait_accepting(process, port)
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{base}/api/jobs", json={"options": QUIET_JOB}) as response:
                assert response.status == 201
                job = await response.json()
            await asyncio.sleep(0.3)  # let the opening events out
            async with session.get(base + job["links"]["self"]) as response:
                after = (await response.json())["last_event_id"]
        await send_and_leave(port, PARTIAL_POST)
        poll = f"/api/jobs/{job['id']}/events?after={after}&wait_s=20"
        await send_and_leave(port, f"GET {poll} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        lines = await stop(process, log)
    assert [line for line in lines if line["severity"] not in ("INFO", "DEBUG")] == []
    requests = [line for line in lines if line["message"] == "request"]
    assert all(line["status"] != 500 for line in requests)
    gone = [(line["method"], line["path"]) for line in requests if line["outcome"] == "client_gone"]
    assert gone == [("POST", "/api/jobs"), ("GET", f"/api/jobs/{job['id']}/events")]
    assert all(line["status"] == 499 for line in requests if line["outcome"] == "client_gone")
