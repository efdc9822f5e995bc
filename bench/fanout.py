"""Fan-out at scale: thousands of SSE streams on 2 cores, Flushline against aiohttp-sse.

Run: ``python -m bench.fanout`` (about 5 minutes at full scale; ``--streams``,
``--jobs``, ``--idle-streams``, ``--only``, ``--duration`` scale it down). Three
scenarios, each against fresh server processes: ``flushline serve`` with the job
strategy ``none`` and with ``aligned``, the anchor (``bench/anchor.py``: aiohttp +
aiohttp-sse broadcasting the same demo job), and the floor (``bench/floor.py``: a bare
asyncio protocol writing the same frames to every stream, no framework, no guarantees:
what the machine and the load generator allow any server). The load generator
(``bench/loadgen.py``) is a separate process on the same machine; every stream is opened
at once, over loopback.

* broadcast: one demo job (2 steps at 80 tokens/s for ``--duration`` seconds, 20 by
  default; chunks every 100 characters or 0.3 s, about 6.5 events/s with ``none``, twice
  that with ``aligned``, whose progress rides with each chunk), 6,000 streams;
* many: 500 demo jobs at 40 tokens/s for ``--duration`` seconds, two streams each;
* idle: 10,000 streams of 100 quiet jobs (heartbeats only): the memory each stream adds
  above the idle process (jobs created, no stream);
* long-poll: ``--watchers`` (1,000) watchers of the broadcast job polling
  ``/api/jobs/{id}/events?after=<last>&wait_s=25`` (one keep-alive connection each, the
  next poll as soon as an answer is read), and beside it ``long-poll (stream)``: as many
  SSE streams of the same job, so the footer can state the server's CPU per delivered
  event of polling against streaming's, same server, same run (Flushline servers only:
  the anchor and the floor have no long-poll).

Columns: ideal events/s is what every stream would receive if each got every event of
the live window (events published after every stream had its headers) as it was
published; delivered is what arrived, over the window or until the last one arrived if
later. Lag is arrival minus the event's ``ts``, over the live window. Failed streams got
no 200 or ended early; gappy ones skipped a seq (or, on Flushline, did not start at
seq 1). Peak RSS is the server's ``VmHWM``; server CPU is its user + system time
(``/proc/<pid>/stat``) from before the first job to the end; CPU per delivered event
divides it by every event the streams received (history included); the load
generator's own CPU is the next column (it shares the 2 cores); requests counts every
request the watchers sent (one per stream; one per answer when long-polling). ``--variant
NAME=PATH`` adds Flushline servers run from another checkout (``PYTHONPATH=PATH``), in
the same run. ``--profile DIR`` records each Flushline broadcast and long-poll server with py-spy.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import pathlib
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import attrs
import orjson

from bench.common import print_table
from tests.support.process import ROOT, clean_env, free_port, wait_accepting

__all__ = ["Scenario", "ServerSpec", "run"]

CLK_TCK = os.sysconf("SC_CLK_TCK")
#: The environment of every server (the anchor reads the cadence tuning too).
SERVER_ENV = {
    # Per-request info lines would dominate a run of thousands of streams.
    "FLUSHLINE_LOG_LEVEL": "warning",
    # ``frequency``'s cadence for every strategy: about 6.5 events/s from the demo job.
    "FLUSHLINE_CHUNK_CHARS": "100",
    "FLUSHLINE_CHUNK_INTERVAL": "0.3",
    "FLUSHLINE_MAX_ACTIVE_JOBS": "100000",
    "FLUSHLINE_MAX_RETAINED_JOBS": "100000",
    # Each job reserves its whole history budget (4 MB): 500 jobs need more than 128 MB.
    "FLUSHLINE_MAX_RETAINED_BYTES": str(8 << 30),
}
#: The idle scenario's jobs publish nothing for the duration of the measure.
IDLE_ENV = {"FLUSHLINE_PROGRESS_INTERVAL": "86400"}
IDLE_JOB = {"steps": 1, "tokens_per_step": 1000, "tokens_per_second": 0.1, "seed": 3}
#: Idle streams per quiet job.
IDLE_STREAMS_PER_JOB = 100


@attrs.frozen
class ServerSpec:
    """One server of a run: Flushline (from a checkout) with a job strategy, the anchor
    (``bench.anchor``) or the floor (``bench.floor``)."""

    name: str
    strategy: str
    #: The bench module that serves (``bench.anchor``, ``bench.floor``); Flushline if None.
    module: str | None = None
    pythonpath: str | None = None


@attrs.frozen
class Scenario:
    """One scenario: how many jobs, with what options, and how many streams each."""

    name: str
    jobs: int
    streams_per_job: int
    options: dict[str, Any]
    limit_s: float
    hold_s: float | None = None  # idle: hold the streams open this long, then measure
    #: How each watcher reads: "stream" (SSE) or "poll" (long-poll ``/events``).
    transport: str = "stream"
    #: Whether the anchor and the floor run it too (they serve streams only).
    everyone: bool = True


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def memory_kb(pid: int, field: str) -> int:
    """``VmRSS`` or ``VmHWM`` of process ``pid``, in KB."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _raise_nofile() -> None:
    """Children inherit the limit: 10,000 streams need more descriptors than 1,024."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@contextlib.asynccontextmanager
async def start_server(
    spec: ServerSpec, extra_env: dict[str, str], log: pathlib.Path
) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    """A fresh server process on a free port; killed on the way out."""
    port = free_port()
    env = clean_env(**SERVER_ENV, **extra_env)
    if spec.module is not None:
        argv = [sys.executable, "-m", spec.module, "--port", str(port)]
        env["PYTHONPATH"] = spec.pythonpath or str(ROOT)
    else:
        argv = [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port)]
        env["PYTHONPATH"] = spec.pythonpath or str(ROOT)
        env["FLUSHLINE_STRATEGY"] = spec.strategy
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            *argv,
            cwd=spec.pythonpath or ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    try:
        await wait_accepting(process, port)
        yield process, port
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def create_jobs(port: int, scenario: Scenario, strategy: str) -> list[str]:
    """Create the scenario's jobs (50 requests at a time); their stream paths."""
    body = {"strategy": strategy, "options": scenario.options}
    connector = aiohttp.TCPConnector(limit=50)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> str:
            async with session.post(f"http://127.0.0.1:{port}/api/jobs", json=body) as response:
                job = await response.json()
                if response.status != 201:
                    raise RuntimeError(f"job not created: {job}")
                return str(job["links"]["stream"])

        return list(await asyncio.gather(*(one() for _ in range(scenario.jobs))))


async def run_loadgen(
    spec: dict[str, Any], workdir: pathlib.Path, on_open: Any = None
) -> dict[str, Any]:
    """Run ``bench.loadgen`` on ``spec``; ``on_open()`` is awaited once every stream is open."""
    path = workdir / "loadgen.json"
    path.write_bytes(orjson.dumps(spec))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.loadgen",
        str(path),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    result: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    try:
        async for line in process.stdout:
            record = orjson.loads(line)
            if record["event"] == "open" and on_open is not None:
                extra = await on_open()
            elif record["event"] == "result":
                result = record
        await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    if not result:
        raise RuntimeError(f"the load generator exited with {process.returncode}, no result")
    return {**result, **extra}


async def measure(
    scenario: Scenario,
    server: ServerSpec,
    workdir: pathlib.Path,
    profile_dir: pathlib.Path | None,
) -> dict[str, Any]:
    """One scenario against one fresh server process."""
    extra_env = IDLE_ENV if scenario.hold_s is not None else {}
    log = workdir / f"{scenario.name}-{server.name}.log".replace(" ", "_")
    async with start_server(server, extra_env, log) as (process, port):
        pid = process.pid
        await asyncio.sleep(0.5)
        cpu_before = cpu_s(pid)
        paths = await create_jobs(port, scenario, server.strategy)
        rss_idle_kb = memory_kb(pid, "VmRSS")
        streams = [p for p in paths for _ in range(scenario.streams_per_job)]
        groups = [g for g in range(len(paths)) for _ in range(scenario.streams_per_job)]
        spec = {
            "port": port,
            "paths": streams,
            "groups": groups,
            "limit_s": scenario.limit_s,
            "hold_s": scenario.hold_s,
            "from_seq_1": server.module is None,  # the others keep no history
            "transport": scenario.transport,
        }
        spy = None
        profiled = server.module is None and scenario.name in ("broadcast", "long-poll")
        if profile_dir is not None and profiled:
            out = profile_dir / f"{scenario.name}-{server.name}.txt".replace(" ", "_")
            argv = ["py-spy", "record", "--pid", str(pid), "--format", "raw", "-o", str(out)]
            spy = await asyncio.create_subprocess_exec(
                *argv,
                "--nonblocking",
                "--rate",
                "200",
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

        async def on_open() -> dict[str, Any]:
            if scenario.hold_s is None:
                return {}
            await asyncio.sleep(min(2.0, scenario.hold_s / 2))  # let the last writes settle
            return {"rss_streams_kb": memory_kb(pid, "VmRSS")}

        result = await run_loadgen(spec, workdir, on_open)
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file and exits
            await asyncio.wait_for(spy.wait(), 30)
        result["cpu_s"] = cpu_s(pid) - cpu_before
        result["peak_rss_kb"] = memory_kb(pid, "VmHWM")
        result["rss_idle_kb"] = rss_idle_kb
        result["log_bytes"] = log.stat().st_size
    return result


def row(scenario: Scenario, server: ServerSpec, r: dict[str, Any]) -> list[object]:
    """One table row."""
    p50, p99, worst = r["lag_ms"]
    ideal, delivered = r["ideal_per_s"], r["delivered_per_s"]
    share = f" ({delivered / ideal:.0%})" if ideal else ""
    per_event = f"{r['cpu_s'] / r['events'] * 1e6:.0f}" if r["events"] else "-"
    per_stream = "-"
    if "rss_streams_kb" in r:
        per_stream = f"{(r['rss_streams_kb'] - r['rss_idle_kb']) / r['streams']:.1f}"
    idle = scenario.hold_s is not None
    return [
        scenario.name,
        server.name,
        f"{r['opened']}/{r['streams']}",
        "-" if idle else f"{ideal:,.0f}",
        "-" if idle else f"{delivered:,.0f}{share}",
        "-" if idle else f"{p50:.0f} / {p99:.0f} / {worst:.0f}",
        f"{r['headers_p99_ms']:.0f}",
        f"{r['failed']} / {r['gappy']}",
        f"{r['peak_rss_kb'] / 1024:.0f}",
        per_stream,
        f"{r['cpu_s']:.1f}",
        "-" if idle else per_event,
        f"{r['loadgen_cpu_s']:.1f}",
        f"{r['requests']:,}",
    ]


HEADERS = [
    "scenario",
    "server",
    "streams open",
    "ideal ev/s",
    "delivered ev/s",
    "lag p50/p99/max ms",
    "headers p99 ms",
    "failed / gappy",
    "peak RSS MB",
    "KB / idle stream",
    "server CPU s",
    "CPU µs / event",
    "loadgen CPU s",
    "requests",
]


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    """The scenarios the flags ask for."""
    duration = args.duration
    broadcast = Scenario(
        "broadcast",
        jobs=1,
        streams_per_job=args.streams,
        options={
            "steps": 2,
            "tokens_per_step": round(80 * duration / 2),
            "tokens_per_second": 80,
            "seed": 7,
        },
        limit_s=duration + 60,
    )
    many = Scenario(
        "many",
        jobs=args.jobs,
        streams_per_job=2,
        options={
            "steps": 2,
            "tokens_per_step": round(40 * duration / 2),
            "tokens_per_second": 40,
            "seed": 7,
        },
        limit_s=duration + 60,
    )
    idle_streams = args.idle_streams
    idle = Scenario(
        "idle",
        jobs=max(1, idle_streams // IDLE_STREAMS_PER_JOB),
        streams_per_job=min(IDLE_STREAMS_PER_JOB, idle_streams),
        options=IDLE_JOB,
        limit_s=60,
        hold_s=4.0,
    )
    watchers = max(1, args.watchers)
    poll = attrs.evolve(
        broadcast, name="long-poll", streams_per_job=watchers, transport="poll", everyone=False
    )
    poll_stream = attrs.evolve(poll, name="long-poll (stream)", transport="stream")
    chosen = {s.name: [s] for s in (broadcast, many, idle)}
    chosen["long-poll"] = [poll_stream, poll]
    return [s for name in args.only for s in chosen[name]]


def servers(args: argparse.Namespace) -> list[ServerSpec]:
    """Flushline (``none``, ``aligned``), its variants, the anchor, then the floor."""
    specs = [ServerSpec(f"flushline {s}", s) for s in args.strategies]
    for variant in args.variant:
        name, _, path = variant.partition("=")
        specs += [ServerSpec(f"{name} {s}", s, pythonpath=path) for s in args.strategies]
    if not args.no_anchor:
        specs.append(ServerSpec("aiohttp-sse", "none", "bench.anchor", args.anchor_path))
    if not args.no_floor:
        specs.append(ServerSpec("floor", "none", "bench.floor"))
    return specs


_LINE_NUMBER = re.compile(r":\d+\)$")


def poll_against_stream(rows: Sequence[Sequence[object]]) -> list[str]:
    """Per server: long-poll's CPU per delivered event against the stream's, same run."""
    per_event: dict[tuple[str, str], float] = {}
    for r in rows:
        cell = str(r[HEADERS.index("CPU µs / event")])
        if r[0] in ("long-poll", "long-poll (stream)") and cell != "-":
            per_event[(str(r[0]), str(r[1]))] = float(cell)
    lines = []
    for (scenario, server), poll_us in per_event.items():
        stream_us = per_event.get(("long-poll (stream)", server))
        if scenario == "long-poll" and stream_us:
            lines.append(
                f"{server}: long-poll {poll_us:.0f} µs of server CPU per delivered event, "
                f"the stream {stream_us:.0f} µs: {poll_us / stream_us:.1f}x (target: at most 3x)"
            )
    return lines


def summarise_profile(path: pathlib.Path, top: int = 12) -> list[tuple[str, float, float]]:
    """py-spy's raw samples: the functions with the most self time, in % of the samples.

    Each is ``(function (file), self %, total %)``: total counts the samples where it is
    anywhere on the stack (once per sample), self those where it is at the top.
    """
    own: collections.Counter[str] = collections.Counter()
    anywhere: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_LINE_NUMBER.sub(")", frame) for frame in stack.split(";")]
        own[frames[-1]] += int(count)
        for frame in set(frames):
            anywhere[frame] += int(count)
        total += int(count)
    if not total:
        return []
    return [(f, 100 * n / total, 100 * anywhere[f] / total) for f, n in own.most_common(top)]


async def run(args: argparse.Namespace) -> list[list[object]]:
    """Every chosen scenario against every server, one fresh process each; the rows."""
    _raise_nofile()
    rows = []
    profile_dir = pathlib.Path(args.profile) if args.profile else None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = pathlib.Path(tmp)
        for scenario in scenarios(args):
            for server in servers(args):
                if not scenario.everyone and server.module is not None:
                    continue
                result = await measure(scenario, server, workdir, profile_dir)
                if args.raw:
                    print(orjson.dumps(result).decode(), file=sys.stderr)
                if result["errors"]:
                    print(f"# {scenario.name} {server.name}: {result['errors']}", file=sys.stderr)
                if result["log_bytes"]:
                    print(f"# {server.name} logged {result['log_bytes']} bytes", file=sys.stderr)
                rows.append(row(scenario, server, result))
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m bench.fanout``: run the scenarios, print the table and its footer."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=6000, help="broadcast streams")
    parser.add_argument("--jobs", type=int, default=500, help="jobs of the many scenario")
    parser.add_argument("--idle-streams", type=int, default=10_000)
    parser.add_argument("--watchers", type=int, default=1000, help="long-poll watchers")
    parser.add_argument(
        "--duration",
        type=float,
        default=20.0,
        help="job length, seconds (20: the live "
        "window stays long after 6,000 streams took seconds to open)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=["broadcast", "many", "idle", "long-poll"],
        choices=["broadcast", "many", "idle", "long-poll"],
    )
    parser.add_argument("--strategies", nargs="+", default=["none", "aligned"])
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--no-anchor", action="store_true")
    parser.add_argument("--no-floor", action="store_true", help="leave out bench.floor")
    parser.add_argument(
        "--anchor-path",
        metavar="PATH",
        help="run the anchor from this checkout (its runner and token source drive the job)",
    )
    parser.add_argument("--raw", action="store_true", help="each result's JSON on stderr")
    parser.add_argument("--profile", metavar="DIR", help="py-spy raw profiles here")
    args = parser.parse_args(argv)
    started = time.monotonic()
    load_before = os.getloadavg()
    rows = asyncio.run(run(args))
    print_table(HEADERS, rows)
    print()
    print(
        f"{os.cpu_count()} cores, Python {sys.version.split()[0]}, load average before "
        f"{load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}, "
        f"{time.monotonic() - started:.0f} s. "
        "Every server a fresh process, one event loop (asyncio), in-memory bus, "
        + ", ".join(f"{k}={v}" for k, v in SERVER_ENV.items())
        + "; streams without ?proxy_buffer (aligned pads each flush to 4 KB). "
        "The anchor sends the same events with no padding and no history, and listens "
        "with Flushline's backlog (1024); so does the floor, with no framework at all."
    )
    for line in poll_against_stream(rows):
        print(line)
    if args.profile:
        for path in sorted(pathlib.Path(args.profile).glob("*.txt")):
            print(f"\nprofile {path.stem} (% of samples: self, total):")
            for frame, own, anywhere in summarise_profile(path):
                print(f"  {own:5.1f}%  {anywhere:5.1f}%  {frame}")


if __name__ == "__main__":
    main()
