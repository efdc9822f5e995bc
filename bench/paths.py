"""The delivery matrix: path x strategy -> lag, bursts, bytes.

Paths: a direct connection; the ``flushline proxy`` emulator at 4096 and 16384 bytes in
both release models; a real nginx speaking HTTP/1.0 to the upstream (buffering, the
``X-Accel-Buffering`` opt-out ignored), with gzip on ``text/event-stream``, and with
HTTP/1.1. Every strategy runs the same demo job on every path.

Run: ``python -m bench.paths`` (about 2 minutes; needs nginx for the nginx rows,
``--skip-nginx`` leaves them out). ``aligned`` is given the path's buffer size
(``FLUSHLINE_PROXY_BUFFER_BYTES``) as ``flushline probe`` reports it; ``--block`` sets
one size for every path instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import pathlib
import tempfile
from collections.abc import AsyncIterator

import aiohttp
import attrs

from app.pathtools.proxy import BufferingProxy, ProxyConfig
from bench.common import BENCH_OPTIONS, JobRun, print_table, run_job, serve
from strategies import STRATEGIES
from tests.support.nginx import NginxMode, find_nginx, run_nginx


@attrs.frozen
class Path:
    """One way from the service to the client."""

    name: str
    buffer_bytes: int  # what the probe reports for it (0: does not buffer)
    proxy: ProxyConfig | None = None
    nginx: NginxMode | None = None


def paths(include_nginx: bool) -> list[Path]:
    """Every path of the matrix."""
    out = [Path("direct", 0)]
    for size in (4096, 16384):
        for release in ("all", "blocks"):
            config = ProxyConfig(
                upstream="http://placeholder", threshold_bytes=size, release=release
            )
            out.append(Path(f"emulator {size} {release}", size, proxy=config))
    if include_nginx:
        out += [
            Path("nginx HTTP/1.0", 4096, nginx=NginxMode.HTTP10),
            Path("nginx gzip", 4096, nginx=NginxMode.GZIP),
            Path("nginx HTTP/1.1", 0, nginx=NginxMode.HTTP11),
        ]
    return out


@contextlib.asynccontextmanager
async def open_path(path: Path, upstream: str, tmp: pathlib.Path) -> AsyncIterator[str]:
    """Start what sits on ``path`` in front of ``upstream``; yields the URL to read from."""
    if path.proxy is not None:
        async with BufferingProxy(attrs.evolve(path.proxy, upstream=upstream)) as proxy:
            yield proxy.url
    elif path.nginx is not None:
        port = int(upstream.rsplit(":", 1)[1])
        async with run_nginx(port, path.nginx, tmp_dir=tmp / path.nginx.value) as nginx:
            yield nginx.url
    else:
        yield upstream


async def measure(path: Path, block: int | None, tmp: pathlib.Path) -> list[JobRun]:
    """Run every strategy's job through ``path``, side by side."""
    size = path.buffer_bytes if block is None else block
    env = {"FLUSHLINE_PROXY_BUFFER_BYTES": str(size)}
    async with (
        serve(env) as service,
        open_path(path, service, tmp) as front,
        aiohttp.ClientSession() as session,
    ):
        jobs = (run_job(session, service, front, name) for name in STRATEGIES)
        return list(await asyncio.gather(*jobs))


async def main(include_nginx: bool, block: int | None) -> None:
    """Print the matrix as a Markdown table."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths(include_nginx):
            for run in await measure(path, block, pathlib.Path(tmp)):
                d = run.delivery
                rows.append(
                    (
                        path.name,
                        run.strategy,
                        run.events,
                        f"{d.lag_p50_ms:.0f}",
                        f"{d.lag_p99_ms:.0f}",
                        f"{d.lag_max_ms:.0f}",
                        f"{d.burst_share:.0%}",
                        f"{run.headers_after_ms:.0f}",
                        f"{run.bytes_per_event:.0f}",
                        f"{run.padding_per_s:.0f}",
                    )
                )
    print(f"demo job {BENCH_OPTIONS}; lag = arrival - ts, same clock\n")
    print_table(
        [
            "path",
            "strategy",
            "events",
            "lag p50 ms",
            "p99 ms",
            "max ms",
            "in bursts",
            "headers ms",
            "bytes/event",
            "padding B/s",
        ],
        rows,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-nginx", action="store_true", help="leave out the nginx paths")
    parser.add_argument("--block", type=int, help="FLUSHLINE_PROXY_BUFFER_BYTES for every path")
    args = parser.parse_args()
    if not args.skip_nginx and find_nginx() is None:
        parser.error("nginx is not installed (apt-get install nginx-light), or pass --skip-nginx")
    asyncio.run(main(not args.skip_nginx, args.block))
