"""The browser client (``flushline.js``) in headless Chromium through every path of issue 6.

``python -m bench.client_paths`` (about 25 s; nginx needed, or ``--skip-nginx``) runs the
service with its default settings behind each path, watches the same demo job
(``CLIENT_JOB``: 5 steps x 6 tokens at 2 tokens/s, about 15 s) with the client's
sensing on, and prints what the client chose, the events' lag (arrival minus ``ts``, one
clock) once adapted and over the whole job, and the bytes it received per event.

``--record DIR`` also watches each path with sensing off (what the path does to the
default stream) and writes every connection's arrival records, as the client saw them,
to ``DIR/<path>.json``: the fixtures of ``tests/js/``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import tempfile
from typing import Any

from app.pathtools.delivery import percentile
from bench.common import print_table
from tests.support.browser import launch_browser
from tests.support.nginx import find_nginx
from tests.support.paths import CLIENT_JOB, CLIENT_PATHS, ClientRun, DeliveryPath, watch_through


def _row(run: ClientRun) -> list[object]:
    adapted = run.adapted_lags_ms
    lags = run.lags_ms
    return [
        run.path,
        run.choice(),
        len(run.decisions) - 1,
        f"{percentile(adapted, 50):.0f} / {percentile(adapted, 99):.0f}",
        f"{percentile(lags, 50):.0f} / {percentile(lags, 99):.0f}",
        len(run.progress_changes()),
        f"{run.bytes_per_event:.0f}",
    ]


def _fixture(run: ClientRun, path: DeliveryPath, sensing: bool) -> dict[str, Any]:
    return {
        "path": path.name,
        "sensing": sensing,
        "job": CLIENT_JOB,
        "choice": run.choice(),
        "connections": run.record["connections"],
        "decisions": [
            {k: d[k] for k in ("transport", "proxyBuffer", "measuredBlock", "reason")}
            for d in run.decisions
        ],
    }


def _write_fixtures(
    record_dir: pathlib.Path,
    paths: list[DeliveryPath],
    by_mode: dict[tuple[str, bool], ClientRun],
) -> None:
    record_dir.mkdir(parents=True, exist_ok=True)
    for p in paths:
        for sensing in (True, False):
            name = p.name if sensing else f"{p.name}-unsensed"
            text = json.dumps(_fixture(by_mode[p.name, sensing], p, sensing), indent=1)
            (record_dir / f"{name}.json").write_text(text + "\n")
    print(f"\nfixtures written to {record_dir}")


async def main(record_dir: pathlib.Path | None, skip_nginx: bool) -> None:
    paths = [p for p in CLIENT_PATHS if p.nginx is None or not skip_nginx]
    if any(p.nginx is not None for p in paths) and find_nginx() is None:
        raise SystemExit("nginx not installed: apt-get install nginx-light, or --skip-nginx")
    modes = (True, False) if record_dir else (True,)
    with tempfile.TemporaryDirectory() as tmp:
        async for browser in launch_browser():
            runs = await asyncio.gather(
                *(
                    watch_through(browser, p, pathlib.Path(tmp) / f"{p.name}-{s}", sensing=s)
                    for p in paths
                    for s in modes
                )
            )
    by_mode = {
        (p.name, s): r
        for (p, s), r in zip(((p, s) for p in paths for s in modes), runs, strict=True)
    }
    headers = [
        "path",
        "client chose",
        "switches",
        "lag p50 / p99 ms (adapted)",
        "lag p50 / p99 ms (all)",
        "progress values",
        "bytes/event",
    ]
    print_table(headers, [_row(by_mode[p.name, True]) for p in paths])
    if record_dir:
        print()
        print_table(headers, [_row(by_mode[p.name, False]) for p in paths])
        _write_fixtures(record_dir, paths, by_mode)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", type=pathlib.Path, default=None, metavar="DIR")
    parser.add_argument("--skip-nginx", action="store_true")
    args = parser.parse_args()
    asyncio.run(main(args.record, args.skip_nginx))
