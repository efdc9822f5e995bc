"""The delivery matrix: path x strategy -> lag, bursts, bytes.

Paths: a direct connection; the ``flushline proxy`` emulator at 4096 and 16384 bytes in
both release models, holding every write 200 ms (``--threshold 1000000 --max-hold-s
0.2``), holding the whole response (a threshold beyond it) and gzip-ing; a real nginx
speaking HTTP/1.0 to the upstream (buffering, the ``X-Accel-Buffering`` opt-out
ignored), with gzip on ``text/event-stream``, and with HTTP/1.1. Every strategy runs
the same demo job on every path.

Run: ``python -m bench.paths`` (about 2 minutes; needs nginx for the nginx rows,
``--skip-nginx`` leaves them out; ``--only gzip`` keeps the paths whose name contains
it). ``aligned`` is given the path's buffer size (``FLUSHLINE_PROXY_BUFFER_BYTES``) as
``flushline probe`` reports it (0 where it reports no block size); ``--block`` sets one
size for every path instead. ``--probe`` prints what ``flushline probe`` reports for
each path instead of running the jobs.
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

from app.pathtools.probe import ProbeReport, probe_pattern, run_probe
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
    upstream = "http://placeholder"
    out += [
        Path(
            "emulator hold 200 ms",
            0,
            proxy=ProxyConfig(upstream=upstream, threshold_bytes=1_000_000, max_hold_s=0.2),
        ),
        Path("emulator whole", 0, proxy=ProxyConfig(upstream=upstream, threshold_bytes=1 << 30)),
        Path("emulator gzip", 4096, proxy=ProxyConfig(upstream=upstream, gzip=True)),
    ]
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


async def probe(path: Path, tmp: pathlib.Path) -> ProbeReport:
    """What ``flushline probe`` (default pattern) reports through ``path``."""
    async with serve() as service, open_path(path, service, tmp) as front:
        return await run_probe(front, probe_pattern())


async def main_probe(selected: list[Path]) -> None:
    """Print the probe's findings per path as a Markdown table."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in selected:
            report = await probe(path, pathlib.Path(tmp))
            found = {
                "size_buffer": f"{report.buffer_bytes} '{report.release_model}'",
                "time_hold": f"hold {report.hold_ms:.0f} ms" if report.hold_ms else "",
                "whole_response": f"Content-Length {report.content_length}",
            }.get(str(report.kind), "")
            settings = report.settings().get("FLUSHLINE_PROXY_BUFFER_BYTES", "-")
            rows.append(
                (
                    path.name,
                    str(report.kind),
                    found,
                    f"{report.headers_after_ms:.0f}",
                    settings,
                    ", ".join(report.fixes) or "-",
                )
            )
    print(f"flushline probe, default pattern {probe_pattern().as_query()}\n")
    print_table(["path", "kind", "found", "headers ms", "block to use", "fix (best first)"], rows)


async def main(selected: list[Path], block: int | None) -> None:
    """Print the matrix as a Markdown table."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in selected:
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
    parser.add_argument("--only", help="only the paths whose name contains this")
    parser.add_argument("--probe", action="store_true", help="print the probe's findings instead")
    args = parser.parse_args()
    if not args.skip_nginx and find_nginx() is None:
        parser.error("nginx is not installed (apt-get install nginx-light), or pass --skip-nginx")
    chosen = [p for p in paths(not args.skip_nginx) if not args.only or args.only in p.name]
    asyncio.run(main_probe(chosen) if args.probe else main(chosen, args.block))
