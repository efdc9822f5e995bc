"""Bytes on the wire per strategy, for one demo job on a direct connection.

Run: ``python -m bench.strategies`` (about 10 s: the five jobs run side by side).
"""

from __future__ import annotations

import asyncio

import aiohttp

from bench.common import BENCH_OPTIONS, print_table, run_job, serve
from strategies import STRATEGIES


async def main() -> None:
    """Run one demo job per strategy and print events, bytes and bytes per event."""
    async with serve() as url, aiohttp.ClientSession() as session:
        runs = await asyncio.gather(*(run_job(session, url, url, name) for name in STRATEGIES))
    print(f"demo job {BENCH_OPTIONS}, direct connection\n")
    print_table(
        ["strategy", "events", "wire bytes", "bytes/event", "padding bytes", "padding B/s"],
        [
            (
                r.strategy,
                r.events,
                r.wire_bytes,
                f"{r.bytes_per_event:.0f}",
                r.padding_bytes,
                f"{r.padding_per_s:.0f}",
            )
            for r in runs
        ],
    )


if __name__ == "__main__":
    asyncio.run(main())
