"""Run a real nginx in front of a test upstream, in several proxy modes.

Used by the behaviour tests (``tests/test_nginx_behaviour.py``) and by benches
that need to see what a buffering reverse proxy does to a Server-Sent Events
stream.  The modes reproduce the deployments we care about:

* ``HTTP10`` -- nginx's defaults: ``proxy_http_version 1.0`` with
  ``proxy_buffering on``.  ``X-Accel-Buffering`` is ignored so that the
  upstream's ``X-Accel-Buffering: no`` cannot rescue the stream, i.e. this is
  what a misconfigured deployment does.
* ``GZIP`` -- ``proxy_http_version 1.1`` but ``gzip`` covers
  ``text/event-stream`` (``X-Accel-Buffering`` ignored as well).
* ``HTTP11`` -- ``proxy_http_version 1.1`` with ``Connection ""``, buffering
  left at its default (on), ``X-Accel-Buffering`` honoured.
* ``RECOMMENDED`` -- the configuration we tell users to deploy, rendered from
  ``config/nginx/flushline.conf`` itself (only the ``listen`` and upstream
  ``server`` addresses are rewritten), so the test covers the very file users
  copy.

Usage::

    async with run_nginx(upstream_port, NginxMode.HTTP10, tmp_dir=tmp_path) as nginx:
        async with session.get(nginx.url + "/api/jobs/1/stream") as resp:
            ...
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import pathlib
import re
import shutil
import signal
import socket
import textwrap
import time
from collections.abc import AsyncIterator

import attrs
import pytest

__all__ = [
    "RECOMMENDED_CONF",
    "NginxInstance",
    "NginxMode",
    "NginxStartError",
    "find_nginx",
    "render_nginx_conf",
    "require_nginx",
    "run_nginx",
]

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
RECOMMENDED_CONF = REPO_ROOT / "config" / "nginx" / "flushline.conf"

SKIP_REASON = "nginx not installed: apt-get install nginx-light"
REQUIRE_ENV = "FLUSHLINE_REQUIRE_INTEGRATION"

_START_TIMEOUT = 15.0
_STOP_TIMEOUT = 5.0
_BIND_ATTEMPTS = 3


class NginxMode(enum.StrEnum):
    """Proxy set-ups to put in front of the upstream (a str: ``NginxMode("gzip")`` works)."""

    HTTP10 = "http10"
    GZIP = "gzip"
    HTTP11 = "http11"
    RECOMMENDED = "recommended"


@attrs.frozen
class NginxInstance:
    """A running nginx; ``url`` is ``http://127.0.0.1:<port>`` (no trailing slash)."""

    port: int
    url: str
    mode: NginxMode
    config_path: pathlib.Path
    error_log: pathlib.Path
    pid: int

    def read_error_log(self) -> str:
        return _read_text(self.error_log)


class NginxStartError(RuntimeError):
    """nginx did not come up; the message carries its error log."""


def find_nginx() -> str | None:
    """Path of the nginx binary: ``PATH`` first, then ``/usr/sbin/nginx``."""
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"):
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def require_nginx() -> str:
    """Return the nginx path, or skip the test (fail it if FLUSHLINE_REQUIRE_INTEGRATION=1)."""
    path = find_nginx()
    if path is None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{SKIP_REASON} (required because {REQUIRE_ENV}=1)")
        pytest.skip(SKIP_REASON)
    return path


# --------------------------------------------------------------------------- config rendering

# Directives of the synthetic modes, placed in ``location /``.  Everything not
# listed is nginx's compiled-in default (proxy_buffer_size 4k, proxy_buffers 8 4k
# on x86-64, i.e. one memory page each).
_MODE_LOCATION: dict[NginxMode, str] = {
    NginxMode.HTTP10: """
            proxy_http_version 1.0;
            proxy_buffering on;
            proxy_ignore_headers X-Accel-Buffering;
    """,
    NginxMode.GZIP: """
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ignore_headers X-Accel-Buffering;
            gzip on;
            gzip_types text/event-stream;
            gzip_min_length 0;
            gzip_proxied any;
            gzip_vary on;
    """,
    NginxMode.HTTP11: """
            proxy_http_version 1.1;
            proxy_set_header Connection "";
    """,
}

_LISTEN_RE = re.compile(r"^(?P<indent>[ \t]*)listen\s+[^;]*;", re.MULTILINE)
_UPSTREAM_RE = re.compile(
    r"(upstream\s+\w+\s*\{[^}]*?^[ \t]*server\s+)(\S+?)(\s*[;\s])", re.M | re.S
)


def _render_recommended(upstream_port: int, listen_port: int, source: pathlib.Path) -> str:
    text = source.read_text()
    listens = _LISTEN_RE.findall(text)
    if len(listens) != 1:
        raise ValueError(f"{source}: expected exactly one 'listen' directive, got {len(listens)}")
    text = _LISTEN_RE.sub(lambda m: f"{m['indent']}listen 127.0.0.1:{listen_port};", text)
    text, n = _UPSTREAM_RE.subn(lambda m: f"{m[1]}127.0.0.1:{upstream_port}{m[3]}", text)
    if n != 1:
        raise ValueError(f"{source}: expected exactly one 'upstream {{ server ...; }}', got {n}")
    return text


def render_nginx_conf(
    mode: NginxMode,
    *,
    upstream_port: int,
    listen_port: int,
    tmp_dir: pathlib.Path,
    extra_directives: str = "",
    error_log_level: str = "warn",
    recommended_conf: pathlib.Path = RECOMMENDED_CONF,
) -> str:
    """A complete nginx.conf whose every writable path lives in ``tmp_dir``.

    ``extra_directives`` go into ``location /`` for the synthetic modes (they must
    not repeat a directive the mode already sets) and into ``http {}`` for
    ``RECOMMENDED``; benches use it to try e.g. ``proxy_buffer_size 1k;``.
    """
    t = tmp_dir.resolve()
    # As root, workers would otherwise drop to "nobody", who cannot enter a 0700
    # pytest tmp dir to write proxy/client-body temp files.  As non-root nginx
    # ignores the directive with a warning, so only emit it when it matters.
    user = "user root;" if os.geteuid() == 0 else ""
    if mode is NginxMode.RECOMMENDED:
        server = _render_recommended(upstream_port, listen_port, recommended_conf)
        http_extra = extra_directives
    else:
        location = "\n".join(
            f"        {line.strip()}"
            for line in (_MODE_LOCATION[mode] + "\n" + extra_directives).splitlines()
            if line.strip()
        )
        server = (
            "server {\n"
            f"    listen 127.0.0.1:{listen_port};\n"
            "    server_name localhost;\n"
            "\n"
            "    location / {\n"
            f"        proxy_pass http://127.0.0.1:{upstream_port};\n"
            f"{location}\n"
            "    }\n"
            "}\n"
        )
        server = textwrap.indent(server, "    ")
        http_extra = ""
    return f"""# generated by tests/support/nginx.py (mode: {mode.value})
daemon off;
master_process on;
worker_processes 1;
{user}
pid {t}/nginx.pid;
error_log {t}/error.log {error_log_level};

events {{
    worker_connections 256;
}}

http {{
    default_type application/octet-stream;
    access_log {t}/access.log;
    client_body_temp_path {t}/client_body_temp;
    proxy_temp_path {t}/proxy_temp;
    fastcgi_temp_path {t}/fastcgi_temp;
    uwsgi_temp_path {t}/uwsgi_temp;
    scgi_temp_path {t}/scgi_temp;
{textwrap.indent(http_extra.strip(), "    ")}
{server}
}}
"""


# --------------------------------------------------------------------------- process control


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _prepare_dir(tmp_dir: pathlib.Path) -> pathlib.Path:
    tmp_dir = tmp_dir.resolve()
    tmp_dir.mkdir(parents=True, exist_ok=True)
    return tmp_dir


def _write_conf(conf_path: pathlib.Path, text: str) -> None:
    conf_path.write_text(text)
    # A stale log or pid file would confuse the start-up checks.
    (conf_path.parent / "error.log").unlink(missing_ok=True)
    (conf_path.parent / "nginx.pid").unlink(missing_ok=True)


def _read_text(path: pathlib.Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no error log written)"


def _pid_from_file(path: pathlib.Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


async def _port_accepts(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    # SIGTERM = fast shutdown.  SIGQUIT (graceful) would wait for in-flight SSE
    # streams to finish, which may be never.
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), _STOP_TIMEOUT)
    except TimeoutError:
        # nginx was started in its own session: kill master and workers alike.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


async def _start_once(
    nginx: str, conf_path: pathlib.Path, tmp_dir: pathlib.Path, listen_port: int
) -> asyncio.subprocess.Process:
    error_log = tmp_dir / "error.log"
    pid_file = tmp_dir / "nginx.pid"
    proc = await asyncio.create_subprocess_exec(
        nginx,
        "-p", f"{tmp_dir}/",
        "-c", str(conf_path),
        "-e", str(error_log),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + _START_TIMEOUT
    try:
        while True:
            if proc.returncode is not None:
                raise NginxStartError(
                    f"nginx exited with status {proc.returncode} during start-up; "
                    f"{error_log}:\n{_read_text(error_log)}"
                )
            # nginx writes its pid file only after it has bound its listening
            # sockets, so pid-file + accepting port means *our* nginx is serving
            # (and not some other process that grabbed the port).
            if _pid_from_file(pid_file) == proc.pid and await _port_accepts(listen_port):
                return proc
            if time.monotonic() > deadline:
                raise NginxStartError(
                    f"nginx did not accept connections on 127.0.0.1:{listen_port} within "
                    f"{_START_TIMEOUT:.0f}s; {error_log}:\n{_read_text(error_log)}"
                )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), 0.02)
    except BaseException:
        await _stop(proc)
        raise


@contextlib.asynccontextmanager
async def run_nginx(
    upstream_port: int,
    mode: NginxMode,
    *,
    tmp_dir: pathlib.Path,
    extra_directives: str = "",
    error_log_level: str = "warn",
    recommended_conf: pathlib.Path = RECOMMENDED_CONF,
    nginx_path: str | None = None,
) -> AsyncIterator[NginxInstance]:
    """Start nginx proxying to ``127.0.0.1:upstream_port`` in ``mode``; stop it on exit."""
    nginx = nginx_path or find_nginx()
    if nginx is None:
        raise FileNotFoundError(SKIP_REASON)
    tmp_dir = _prepare_dir(tmp_dir)
    conf_path = tmp_dir / "nginx.conf"
    error_log = tmp_dir / "error.log"

    proc: asyncio.subprocess.Process | None = None
    for attempt in range(_BIND_ATTEMPTS):
        listen_port = _free_port()
        _write_conf(
            conf_path,
            render_nginx_conf(
                mode,
                upstream_port=upstream_port,
                listen_port=listen_port,
                tmp_dir=tmp_dir,
                extra_directives=extra_directives,
                error_log_level=error_log_level,
                recommended_conf=recommended_conf,
            ),
        )
        try:
            proc = await _start_once(nginx, conf_path, tmp_dir, listen_port)
            break
        except NginxStartError as exc:
            # Someone took the port between our probe bind and nginx's bind: retry.
            if "Address already in use" not in str(exc) or attempt == _BIND_ATTEMPTS - 1:
                raise
    assert proc is not None
    try:
        yield NginxInstance(
            port=listen_port,
            url=f"http://127.0.0.1:{listen_port}",
            mode=mode,
            config_path=conf_path,
            error_log=error_log,
            pid=proc.pid,
        )
    finally:
        await _stop(proc)
