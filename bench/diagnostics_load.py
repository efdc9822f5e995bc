"""What never-reading diagnostics streams cost a real ``flushline serve``.

Run: ``python -m bench.diagnostics_load`` (about half a minute; needs the ``flushline``
script, ``pip install -e .``).

For 100 and 300 connections that each ask for the largest pattern the caps allow
(64 KiB writes, 512 KiB in all, 5 ms apart) and never read past the status line, it
prints the server's resident memory before and at its peak over the next 3 s, and the
slowest ``/healthz`` answered meanwhile (one request every 0.1 s, each on its own
connection). The issue's request (``first_writes=256&write_bytes=65536``, a 16 MiB
first write before the caps) is answered 400 now, which the last line shows.
"""

from __future__ import annotations

import asyncio
import pathlib
import tempfile
import time
from collections.abc import Sequence
from urllib.parse import urlencode

from app.web.diagnostics import MAX_PATTERN_BYTES, MAX_WRITE_BYTES, DiagnosticsPattern
from bench.common import print_table
from tests.support.server_load import RawAnswer, read_answer, serve
from tests.test_diagnostics_limits import never_reading, rss_bytes

#: Never-reading connections per row.
COUNTS = (100, 300)
WATCH_S = 3.0
LARGEST = DiagnosticsPattern(
    write_bytes=MAX_WRITE_BYTES, interval_ms=5, total_bytes=MAX_PATTERN_BYTES, pause_ms=0
)
PATH = "/api/diagnostics/stream?" + urlencode(LARGEST.as_query())
ISSUE_PATH = "/api/diagnostics/stream?first_writes=256&write_bytes=65536"


async def get(port: int, path: str) -> RawAnswer:
    """One GET on its own connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        return await read_answer(reader)
    finally:
        writer.close()


async def measure(count: int, log: pathlib.Path) -> list[object]:
    """One row: ``count`` never-reading streams against a fresh server."""
    env = {"FLUSHLINE_SEND_TIMEOUT": "20", "FLUSHLINE_LOG_LEVEL": "warning"}
    async with serve(log, **env) as (process, port):
        await get(port, "/healthz")
        await asyncio.sleep(0.5)
        idle = rss_bytes(process.pid)
        peak = idle
        slowest_s = 0.0
        with never_reading(port, count, PATH):
            deadline = time.monotonic() + WATCH_S
            while time.monotonic() < deadline:
                started = time.monotonic()
                assert (await get(port, "/healthz")).status == 200
                slowest_s = max(slowest_s, time.monotonic() - started)
                peak = max(peak, rss_bytes(process.pid))
                await asyncio.sleep(0.1)
        issue = await get(port, ISSUE_PATH)
    mib = 1024 * 1024
    return [
        count,
        f"{idle / mib:.1f}",
        f"{peak / mib:.1f}",
        f"{(peak - idle) / mib:.1f}",
        f"{slowest_s * 1000:.0f}",
        f"{issue.status}, field {issue.json()['error']['field']}",  # type: ignore[index]
    ]


async def main(argv: Sequence[str] | None = None) -> None:
    """Measure each row on its own server."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for count in COUNTS:
            rows.append(await measure(count, pathlib.Path(tmp) / f"serve-{count}.log"))
    print_table(
        [
            "never-reading streams",
            "idle RSS MiB",
            "peak RSS MiB",
            "growth MiB",
            "slowest /healthz ms",
            "the issue's request",
        ],
        rows,
    )


if __name__ == "__main__":
    asyncio.run(main())
