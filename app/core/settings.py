"""Settings: every ``FLUSHLINE_*`` variable, read once at start-up into one frozen object.

``Settings.from_environ()`` is the only place that reads the environment. A bad value
raises :class:`SettingsError` whose message is one line naming the variable, the value
and what is allowed; ``flushline serve`` prints it and exits with status 2.

The loader is also the one list of known variables: :func:`known_variables` runs it on an
empty environment and records every name it reads, so :func:`unknown_variables` can flag a
misspelt ``FLUSHLINE_*`` variable (with the closest known name) without a second list.
:func:`variables` gives the same names with each one's default and allowed values, as the
loader applies them (``docs/configuration.md`` is generated from it).
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from typing import TypeVar
from urllib.parse import urlsplit

import attrs

from strategies import STRATEGIES, Tuning

__all__ = [
    "Settings",
    "SettingsError",
    "UnknownVariable",
    "Variable",
    "known_variables",
    "unknown_variables",
    "variables",
]

T = TypeVar("T")

_BUSES = ("memory", "redis")
_REDIS_SCHEMES = ("redis", "rediss", "unix")
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
_LOG_FORMATS = ("auto", "json", "console")
_LOG_LEVELS = ("debug", "info", "warning", "error")
_AUTH_MODES = ("on", "off")
_PREFIX = "FLUSHLINE_"
#: The shortest API token or secret key accepted.
MIN_SECRET_CHARS = 16
_SECONDS_ALLOWED = "a number of seconds greater than 0 and at most 86400 (e.g. 1.5)"
_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


class SettingsError(ValueError):
    """An environment variable holds a value Flushline cannot use."""

    def __init__(self, variable: str, value: str, allowed: str) -> None:
        self.variable = variable
        self.value = value
        self.allowed = allowed
        super().__init__(f"invalid {variable}={value!r}: {allowed}")


@attrs.frozen(kw_only=True)
class Settings:
    """The service's configuration. Durations are in seconds unless the name says ``_ms``.

    Tuning fields that are ``None`` were not set: the job's strategy picks its own default.
    """

    #: Loopback by default: any other address needs an API token or ``auth="off"``.
    host: str = "127.0.0.1"
    port: int = 8080
    strategy: str = "aligned"
    bus: str = "memory"
    #: Where the Redis bus and job store live (used when ``bus`` is ``redis``).
    redis_url: str = DEFAULT_REDIS_URL
    #: With ``redis``: how long a job outlives its runner's last lease renewal.
    runner_lease_s: float = 15.0
    #: On SIGTERM: how long running jobs may take to finish before they are ended.
    shutdown_grace_s: float = 8.0
    #: With ``redis``: how long a running job buffers its events while Redis is lost.
    redis_grace_s: float = 8.0
    pipeline: str = "demo"
    padding_bytes: int | None = None
    chunk_chars: int | None = None
    chunk_interval_s: float | None = None
    progress_interval_s: float | None = None
    heartbeat_interval_s: float | None = None
    proxy_buffer_bytes: int | None = None
    max_delay_ms: float | None = None
    retry_ms: int = 3000
    history_limit: int = 10_000
    subscriber_queue: int = 1_000
    max_active_jobs: int = 100
    max_body_bytes: int = 64 * 1024
    job_ttl_s: float = 3600.0
    max_retained_jobs: int = 10_000
    send_timeout_s: float = 30.0
    log_level: str = "info"
    log_format: str = "auto"
    #: Origins allowed to call the API from a browser; ``("*",)`` allows any, ``()`` none.
    cors_origins: tuple[str, ...] = ()
    #: The OpenAI-compatible provider (``None``: none; the ``chat`` pipeline refuses jobs).
    llm_base_url: str | None = None
    llm_model: str | None = None
    #: Never shown: not in ``repr``, logs or the start-up line.
    llm_api_key: str = attrs.field(default="", repr=False)
    #: ``package.module:attribute`` paths of user pipelines, registered at start-up.
    pipelines: tuple[str, ...] = ()
    #: Bearer tokens of the job API (auth is on when there is one); never shown.
    api_tokens: tuple[str, ...] = attrs.field(default=(), repr=False)
    #: Signs stream tokens; empty: a random key per process (one instance only). Never shown.
    secret_key: str = attrs.field(default="", repr=False)
    #: How long a signed stream token (in ``links.stream``) stays valid.
    stream_token_ttl_s: float = 3600.0
    #: Encoded bytes of one job's event history kept in memory, at most.
    max_history_bytes: int = 1024 * 1024
    #: Bytes of every kept job (history, input, result) together, at most.
    max_retained_bytes: int = 128 * 1024 * 1024
    #: Open connections at most; ``None``: derived from the file-descriptor limit.
    max_connections: int | None = None
    #: How long a client may take to send a request's headers.
    header_timeout_s: float = 10.0
    #: ``FLUSHLINE_AUTH``: ``None`` (unset: auth is on when there is an API token),
    #: ``"on"`` (an API token is required) or ``"off"`` (explicitly no auth, any address).
    auth: str | None = None
    #: With auth off: the ``Host`` names the service answers (DNS rebinding); ``("*",)`` any.
    allowed_hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
    #: An external job with no publish (a heartbeat counts) for this long ends failed.
    producer_timeout_s: float = 60.0
    #: Events in one publish batch, at most.
    publish_max_events: int = 1000
    #: Bytes of one published event's text (a chunk's, an insight's, an error's), at most.
    publish_max_text_bytes: int = 64 * 1024
    #: Bytes one external job's producer may publish in all, at most.
    publish_max_job_bytes: int = 16 * 1024 * 1024
    #: Producer events per second one job may publish (a burst of one second's worth).
    publish_rate_per_s: float = 20_000.0

    def tuning(self) -> Tuning:
        """The operator's strategy overrides (unset ones stay None)."""
        return Tuning(
            padding_bytes=self.padding_bytes,
            chunk_chars=self.chunk_chars,
            chunk_interval_s=self.chunk_interval_s,
            progress_interval_s=self.progress_interval_s,
            heartbeat_interval_s=self.heartbeat_interval_s,
            proxy_buffer_bytes=self.proxy_buffer_bytes,
            max_delay_ms=self.max_delay_ms,
        )

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``environ`` (default ``os.environ``); raise ``SettingsError``."""
        return cls._load(_Reader(os.environ if environ is None else environ))

    @classmethod
    def _load(cls, r: _Reader) -> Settings:
        # PORT (Cloud Run's) wins over FLUSHLINE_PORT, which is then not read.
        port = r.optional_integer("PORT", low=1, high=65535)
        if port is None:
            port = r.integer("FLUSHLINE_PORT", 8080, low=1, high=65535)
        llm_base_url, llm_model, llm_api_key = r.llm()
        return cls(
            host=r.text("FLUSHLINE_HOST", "127.0.0.1", allowed="an address or host name"),
            port=port,
            strategy=r.choice("FLUSHLINE_STRATEGY", "aligned", tuple(STRATEGIES)),
            bus=r.choice("FLUSHLINE_BUS", "memory", _BUSES),
            # Read (and checked) whatever the bus: known_variables() runs the loader.
            redis_url=r.redis_url("FLUSHLINE_REDIS_URL", DEFAULT_REDIS_URL),
            runner_lease_s=r.seconds("FLUSHLINE_RUNNER_LEASE_S", 15.0),
            shutdown_grace_s=r.seconds("FLUSHLINE_SHUTDOWN_GRACE_S", 8.0),
            redis_grace_s=r.seconds("FLUSHLINE_REDIS_GRACE_S", 8.0),
            pipeline=r.text("FLUSHLINE_PIPELINE", "demo", allowed="a registered pipeline"),
            padding_bytes=r.optional_integer("FLUSHLINE_PADDING_BYTES", low=0, high=1 << 20),
            chunk_chars=r.optional_integer("FLUSHLINE_CHUNK_CHARS", low=1, high=1 << 20),
            chunk_interval_s=r.optional_seconds("FLUSHLINE_CHUNK_INTERVAL"),
            progress_interval_s=r.optional_seconds("FLUSHLINE_PROGRESS_INTERVAL"),
            heartbeat_interval_s=r.optional_seconds("FLUSHLINE_HEARTBEAT_INTERVAL"),
            proxy_buffer_bytes=r.optional_integer(
                "FLUSHLINE_PROXY_BUFFER_BYTES", low=0, high=1 << 20
            ),
            max_delay_ms=r.optional_number("FLUSHLINE_MAX_DELAY_MS", low=1.0, high=60_000.0),
            retry_ms=r.integer("FLUSHLINE_RETRY_MS", 3000, low=0, high=3_600_000),
            history_limit=r.integer("FLUSHLINE_HISTORY_LIMIT", 10_000, low=1, high=10_000_000),
            subscriber_queue=r.integer("FLUSHLINE_SUBSCRIBER_QUEUE", 1_000, low=1, high=1 << 24),
            max_active_jobs=r.integer("FLUSHLINE_MAX_ACTIVE_JOBS", 100, low=1, high=1 << 20),
            max_body_bytes=r.integer("FLUSHLINE_MAX_BODY_BYTES", 64 * 1024, low=64, high=1 << 30),
            job_ttl_s=r.seconds("FLUSHLINE_JOB_TTL", 3600.0),
            max_retained_jobs=r.integer(
                "FLUSHLINE_MAX_RETAINED_JOBS", 10_000, low=1, high=10_000_000
            ),
            send_timeout_s=r.seconds("FLUSHLINE_SEND_TIMEOUT", 30.0),
            log_level=r.choice("FLUSHLINE_LOG_LEVEL", "info", _LOG_LEVELS),
            log_format=r.choice("FLUSHLINE_LOG_FORMAT", "auto", _LOG_FORMATS),
            cors_origins=r.origins("FLUSHLINE_CORS_ORIGINS"),
            llm_base_url=llm_base_url,
            llm_model=llm_model,
            llm_api_key=llm_api_key,
            pipelines=r.pipeline_paths("FLUSHLINE_PIPELINES"),
            api_tokens=r.tokens("FLUSHLINE_API_TOKEN"),
            secret_key=r.secret("FLUSHLINE_SECRET_KEY"),
            stream_token_ttl_s=r.seconds("FLUSHLINE_STREAM_TOKEN_TTL_S", 3600.0),
            max_history_bytes=r.integer(
                "FLUSHLINE_MAX_HISTORY_BYTES", 1024 * 1024, low=4096, high=1 << 34
            ),
            max_retained_bytes=r.integer(
                "FLUSHLINE_MAX_RETAINED_BYTES", 128 * 1024 * 1024, low=1 << 16, high=1 << 40
            ),
            max_connections=r.optional_integer("FLUSHLINE_MAX_CONNECTIONS", low=16, high=1 << 24),
            header_timeout_s=r.seconds("FLUSHLINE_HEADER_TIMEOUT_S", 10.0),
            auth=r.optional_choice("FLUSHLINE_AUTH", _AUTH_MODES),
            allowed_hosts=r.hosts("FLUSHLINE_ALLOWED_HOSTS", ("localhost", "127.0.0.1", "::1")),
            producer_timeout_s=r.seconds("FLUSHLINE_PRODUCER_TIMEOUT_S", 60.0),
            publish_max_events=r.integer(
                "FLUSHLINE_PUBLISH_MAX_EVENTS", 1000, low=1, high=1_000_000
            ),
            publish_max_text_bytes=r.integer(
                "FLUSHLINE_PUBLISH_MAX_TEXT_BYTES", 64 * 1024, low=64, high=1 << 30
            ),
            publish_max_job_bytes=r.integer(
                "FLUSHLINE_PUBLISH_MAX_JOB_BYTES", 16 * 1024 * 1024, low=4096, high=1 << 40
            ),
            publish_rate_per_s=r.number(
                "FLUSHLINE_PUBLISH_RATE", 20_000.0, low=1.0, high=10_000_000.0
            ),
        )._checked()

    def _checked(self) -> Settings:
        """Checks that involve several variables."""
        if self.max_history_bytes > self.max_retained_bytes:
            raise SettingsError(
                "FLUSHLINE_MAX_HISTORY_BYTES",
                str(self.max_history_bytes),
                f"at most FLUSHLINE_MAX_RETAINED_BYTES ({self.max_retained_bytes})",
            )
        if self.api_tokens and self.bus == "redis" and not self.secret_key:
            # Each instance would sign with its own random key: a stream token from one
            # instance would be refused by the others.
            raise SettingsError(
                "FLUSHLINE_SECRET_KEY",
                "",
                "required when FLUSHLINE_API_TOKEN is set with FLUSHLINE_BUS=redis "
                "(every instance must sign stream tokens with the same key)",
            )
        if self.auth == "on" and not self.api_tokens:
            raise SettingsError("FLUSHLINE_API_TOKEN", "", "required when FLUSHLINE_AUTH=on")
        if self.auth == "off" and self.api_tokens:
            raise SettingsError(
                "FLUSHLINE_AUTH", "off", "on or unset when FLUSHLINE_API_TOKEN is set"
            )
        return self

    @property
    def auth_enabled(self) -> bool:
        """Whether the job API asks for an API token."""
        return bool(self.api_tokens)

    def exposure_error(self) -> SettingsError | None:
        """Why this configuration must not start: auth off on a non-loopback address.

        Checked by ``flushline serve`` after its ``--host`` flag is applied (the flag wins
        over ``FLUSHLINE_HOST``), not by the loader, so the message names both.
        """
        if self.api_tokens or self.auth == "off" or is_loopback(self.host):
            return None
        return SettingsError(
            "FLUSHLINE_HOST",
            self.host,
            "a loopback address (127.0.0.1, ::1, localhost) unless FLUSHLINE_API_TOKEN is "
            "set or FLUSHLINE_AUTH=off says to serve every address without auth",
        )


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) only listens on this machine."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _env_text(value: object) -> str | None:
    """A default as it would be written in the environment (``None`` stays unset)."""
    if value is None:
        return None
    if isinstance(value, tuple):
        return ",".join(str(item) for item in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@attrs.frozen
class UnknownVariable:
    """A ``FLUSHLINE_*`` variable no setting reads, with the closest known name if any."""

    name: str
    suggestion: str | None


@attrs.frozen
class Variable:
    """One variable the loader reads, with its default and what it accepts.

    ``default`` is written as it would be in the environment (``"8080"``,
    ``"localhost,127.0.0.1,::1"``); ``None`` when unset means something no value spells
    (no provider, a per-process key, a limit derived from the descriptor limit).
    """

    name: str
    default: str | None
    allowed: str


def variables() -> tuple[Variable, ...]:
    """Every variable the loader reads, in the order it reads them (found by running it)."""
    reader = _Reader({})
    Settings._load(reader)
    return tuple(reader.described.values())


def known_variables() -> frozenset[str]:
    """Every variable the settings loader reads (found by running it, not by a list).

    The loader therefore asks for every variable whatever the others hold (a variable
    read only when another one is set would be missing here).
    """
    reader = _Reader({})
    Settings._load(reader)
    return frozenset(reader.seen)


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[UnknownVariable]:
    """The ``FLUSHLINE_*`` variables in ``environ`` (default ``os.environ``) nothing reads."""
    env = os.environ if environ is None else environ
    # Compared without the shared prefix, which would make every name look close.
    known = {name.removeprefix(_PREFIX) for name in known_variables() if name.startswith(_PREFIX)}
    unknown = []
    for name in sorted(env):
        suffix = name.removeprefix(_PREFIX)
        if name.startswith(_PREFIX) and suffix not in known:
            close = difflib.get_close_matches(suffix, sorted(known), n=1)
            unknown.append(UnknownVariable(name, _PREFIX + close[0] if close else None))
    return unknown


@attrs.define
class _Reader:
    """Parses one variable at a time, turning every failure into a ``SettingsError``.

    ``seen`` records every name asked for: the loader's own list of known variables;
    ``described`` each typed read's default and allowed values, for the reference page.
    """

    env: Mapping[str, str]
    seen: set[str] = attrs.field(factory=set)
    described: dict[str, Variable] = attrs.field(factory=dict)

    def _describe(self, name: str, default: object, allowed: str) -> None:
        self.described.setdefault(name, Variable(name, _env_text(default), allowed))

    def _raw(self, name: str) -> str | None:
        self.seen.add(name)
        value = self.env.get(name)
        if value is None or not value.strip():
            return None
        return value.strip()

    def _parse(self, name: str, parse: Callable[[str], T], allowed: str) -> T | None:
        raw = self._raw(name)
        if raw is None:
            return None
        try:
            return parse(raw)
        except ValueError:
            raise SettingsError(name, raw, allowed) from None

    def text(self, name: str, default: str, *, allowed: str) -> str:
        self._describe(name, default, allowed)
        return self._raw(name) or default

    def choice(self, name: str, default: str, allowed: tuple[str, ...]) -> str:
        self._describe(name, default, ", ".join(allowed))
        raw = self._raw(name)
        if raw is None:
            return default
        if raw.lower() not in allowed:
            raise SettingsError(name, raw, f"allowed: {', '.join(allowed)}")
        return raw.lower()

    def optional_choice(self, name: str, allowed: tuple[str, ...]) -> str | None:
        self._describe(name, None, ", ".join(allowed))
        raw = self._raw(name)
        if raw is None:
            return None
        return self.choice(name, raw, allowed)

    def hosts(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        """A comma list of host names or addresses (no port), or ``*`` for any."""
        self._describe(name, default, "'*' or a comma list of host names like app.example.com")
        raw = self._raw(name)
        if raw is None:
            return default
        items = tuple(item.strip().lower() for item in raw.split(",") if item.strip())
        if items == ("*",):
            return items
        for item in items:
            if not item or "/" in item or "@" in item or any(c.isspace() for c in item):
                raise SettingsError(
                    name, raw, "'*' or a comma list of host names like app.example.com"
                )
        return tuple(item.strip("[]") for item in items)

    def optional_integer(self, name: str, *, low: int, high: int) -> int | None:
        allowed = f"an integer from {low} to {high}"
        self._describe(name, None, allowed)

        def parse(raw: str) -> int:
            value = int(raw)
            if not low <= value <= high:
                raise ValueError(raw)
            return value

        return self._parse(name, parse, allowed)

    def integer(self, name: str, default: int, *, low: int, high: int) -> int:
        self._describe(name, default, f"an integer from {low} to {high}")
        value = self.optional_integer(name, low=low, high=high)
        return default if value is None else value

    def optional_number(self, name: str, *, low: float, high: float) -> float | None:
        allowed = f"a number from {low:g} to {high:g}"
        self._describe(name, None, allowed)

        def parse(raw: str) -> float:
            value = float(raw)
            if not low <= value <= high:  # also rejects nan
                raise ValueError(raw)
            return value

        return self._parse(name, parse, allowed)

    def number(self, name: str, default: float, *, low: float, high: float) -> float:
        self._describe(name, default, f"a number from {low:g} to {high:g}")
        value = self.optional_number(name, low=low, high=high)
        return default if value is None else value

    def optional_seconds(self, name: str) -> float | None:
        allowed = _SECONDS_ALLOWED
        self._describe(name, None, allowed)

        def parse(raw: str) -> float:
            value = float(raw.removesuffix("s"))
            if not 0 < value <= 86_400:
                raise ValueError(raw)
            return value

        return self._parse(name, parse, allowed)

    def origins(self, name: str) -> tuple[str, ...]:
        """A comma list of origins (``scheme://host[:port]``), or ``*`` for any."""
        allowed = "'*' or a comma list of origins like https://app.example.com"
        self._describe(name, None, allowed)
        raw = self._raw(name)
        if raw is None:
            return ()
        items = tuple(item.strip() for item in raw.split(",") if item.strip())
        if items == ("*",):
            return items
        for item in items:
            url = urlsplit(item)
            if (
                url.scheme not in ("http", "https")
                or not url.netloc
                or url.path
                or url.query
                or url.fragment
                or "@" in url.netloc
            ):
                raise SettingsError(name, raw, allowed)
        return tuple(item.lower() for item in items)

    def redis_url(self, name: str, default: str) -> str:
        """A Redis URL: ``redis://[user:password@]host[:port][/db]``, ``rediss://``, ``unix://``."""
        allowed = (
            "a Redis URL like redis://host:6379/0 (also rediss:// for TLS, "
            "unix:///path/to/redis.sock)"
        )
        self._describe(name, default, allowed)
        raw = self._raw(name)
        if raw is None:
            return default
        # The message must not echo a password: show the URL without its credentials.
        url = urlsplit(raw)
        shown = raw if url.password is None else raw.replace(url.password, "***", 1)
        if url.scheme.lower() not in _REDIS_SCHEMES or any(c.isspace() for c in raw):
            raise SettingsError(name, shown, allowed)
        try:
            url.port  # noqa: B018 (urlsplit checks the port only when it is read)
        except ValueError:
            raise SettingsError(name, shown, allowed) from None
        if url.scheme.lower() == "unix":
            valid = bool(url.path)
        else:
            db = url.path.removeprefix("/")
            valid = bool(url.hostname) and (db == "" or db.isdigit())
        if not valid:
            raise SettingsError(name, shown, allowed)
        return raw

    def url(self, name: str) -> str | None:
        """An ``http://`` or ``https://`` URL without query or fragment."""
        allowed = "an http:// or https:// URL such as https://api.openai.com/v1"
        self._describe(name, None, allowed)
        raw = self._raw(name)
        if raw is None:
            return None
        url = urlsplit(raw)
        if url.scheme not in ("http", "https") or not url.hostname or url.query or url.fragment:
            raise SettingsError(name, raw, allowed)
        return raw.rstrip("/")

    def llm(self) -> tuple[str | None, str | None, str]:
        """The provider's three variables, each read whatever the others hold."""
        base_url = self.url("FLUSHLINE_LLM_BASE_URL")
        self._describe("FLUSHLINE_LLM_MODEL", None, "a model name the provider knows")
        model = self._raw("FLUSHLINE_LLM_MODEL")
        self._describe("FLUSHLINE_LLM_API_KEY", "", "any text (empty for local servers)")
        api_key = self._raw("FLUSHLINE_LLM_API_KEY") or ""
        if base_url is not None and model is None:
            raise SettingsError(
                "FLUSHLINE_LLM_MODEL", "", "required when FLUSHLINE_LLM_BASE_URL is set"
            )
        if base_url is None and (model is not None or api_key):
            raise SettingsError(
                "FLUSHLINE_LLM_BASE_URL", "", "required when FLUSHLINE_LLM_MODEL or _API_KEY is set"
            )
        return base_url, model, api_key

    def pipeline_paths(self, name: str) -> tuple[str, ...]:
        """A comma list of ``package.module:attribute`` (imported by the app factory)."""
        allowed = "a comma list of package.module:attribute"
        self._describe(name, None, allowed)
        raw = self._raw(name)
        if raw is None:
            return ()
        paths = tuple(item.strip() for item in raw.split(",") if item.strip())
        if not all(_IMPORT_PATH.fullmatch(path) for path in paths):
            raise SettingsError(name, raw, allowed)
        return paths

    def tokens(self, name: str) -> tuple[str, ...]:
        """A comma list of secrets, each at least :data:`MIN_SECRET_CHARS` printable characters.

        The message never echoes the value.
        """
        allowed = (
            f"a comma list of tokens, each at least {MIN_SECRET_CHARS} characters without spaces"
        )
        self._describe(name, None, allowed)
        raw = self._raw(name)
        if raw is None:
            return ()
        items = tuple(item.strip() for item in raw.split(","))
        for item in items:
            if len(item) < MIN_SECRET_CHARS or not item.isprintable() or " " in item:
                raise SettingsError(name, "***", allowed)
        return items

    def secret(self, name: str) -> str:
        """One secret of at least :data:`MIN_SECRET_CHARS` characters; never echoed."""
        allowed = f"at least {MIN_SECRET_CHARS} characters"
        self._describe(name, None, allowed)
        raw = self._raw(name)
        if raw is None:
            return ""
        if len(raw) < MIN_SECRET_CHARS:
            raise SettingsError(name, "***", allowed)
        return raw

    def seconds(self, name: str, default: float) -> float:
        self._describe(name, default, _SECONDS_ALLOWED)
        value = self.optional_seconds(name)
        return default if value is None else value
