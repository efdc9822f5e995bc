"""GET /metrics: the Prometheus text format, read back by prometheus-client's own parser.

Each test runs the real app on a real port, drives jobs and streams over HTTP, then
scrapes ``/metrics`` and checks the figures against what the client itself saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import attrs
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis

from app.core.settings import Settings
from app.core.sse import retry_line
from app.jobs.redis_store import RedisJobStore
from app.jobs.store import JobSnapshot, JobStatus, MemoryJobStore, StepState
from app.web.keys import MANAGER
from tests.conftest import QUICK_JOB, MakeClient
from tests.support.jobs import (
    FAST_JOB,
    SLOW_JOB,
    Client,
    ScriptedPipeline,
    create_job,
    get_job,
    open_stalled_stream,
    raw_lines,
    stream_job,
    wait_finished,
    wait_until,
)
from tests.support.process import (
    clean_env,
    free_port,
    read_log,
    require_flushline_script,
    server_process,
    wait_accepting,
)
from tests.support.redis import RedisServer, require_redis_server, run_redis
from tests.support.server_load import require_prlimit

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

FAMILIES = {
    "flushline_jobs": "gauge",
    "flushline_running_jobs": "gauge",
    "flushline_open_streams": "gauge",
    "flushline_streams": "counter",
    "flushline_events_published": "counter",
    "flushline_stream_written_bytes": "counter",
    "flushline_subscriber_drops": "counter",
    "flushline_connections_refused": "counter",
    "flushline_retained_bytes": "gauge",
    "flushline_event_delivery_lag_seconds": "histogram",
}


def parse(text: str) -> tuple[dict[str, str], Samples]:
    """The families' types and every sample of a scrape."""
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return types, samples


async def scrape(client: Client) -> Samples:
    """GET /metrics; assert the text format; return its samples."""
    response = await client.get("/metrics")
    text = await response.text()
    assert response.status == 200, text
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4"), response
    return parse(text)[1]


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (fails naming it when it is not there)."""
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name}{labels} not scraped: {sorted(k[0] for k in samples)}"
    return samples[key]


class TestScrape:
    """The endpoint and the figures read at scrape time."""

    async def test_every_family_in_the_text_format(self, client: Client) -> None:
        """/metrics answers every metric of the README list with its type, parseable."""
        response = await client.get("/metrics")
        assert response.status == 200
        types, _ = parse(await response.text())
        missing = {name: kind for name, kind in FAMILIES.items() if types.get(name) != kind}
        assert not missing, f"missing or mistyped: {missing}; scraped {types}"

    async def test_jobs_by_status_and_running_jobs(self, client: Client) -> None:
        """Jobs are counted by status from the store; running jobs from the manager."""
        finished = await create_job(client, FAST_JOB)
        await wait_finished(client, finished["id"])
        slow = await create_job(client, SLOW_JOB)
        await wait_until(lambda: _status(client, slow["id"], "running"), 5, "the slow job to run")
        samples = await scrape(client)
        assert value(samples, "flushline_jobs", status="succeeded") == 1
        assert value(samples, "flushline_jobs", status="running") == 1
        assert value(samples, "flushline_jobs", status="cancelled") == 0
        assert value(samples, "flushline_running_jobs") == 1

        assert (await client.post(f"/api/jobs/{slow['id']}/cancel")).status == 202
        await wait_finished(client, slow["id"])
        samples = await scrape(client)
        assert value(samples, "flushline_jobs", status="cancelled") == 1
        assert value(samples, "flushline_jobs", status="running") == 0
        assert value(samples, "flushline_running_jobs") == 0

    async def test_each_app_has_its_own_registry(self, make_client: MakeClient) -> None:
        """Two apps in one process: one's jobs never show in the other's scrape."""
        first = await make_client()
        second = await make_client()
        job = await create_job(first, FAST_JOB)
        await wait_finished(first, job["id"])
        assert value(await scrape(first), "flushline_jobs", status="succeeded") == 1
        assert value(await scrape(second), "flushline_jobs", status="succeeded") == 0

    async def test_retained_bytes_grow_with_a_kept_job(self, client: Client) -> None:
        """flushline_retained_bytes counts a finished job's kept history."""
        job = await create_job(client, QUICK_JOB)
        await wait_finished(client, job["id"])
        record = await stream_job(client, job["id"], query="?proxy_buffer=0")
        frames = len(record.raw) - len(retry_line(Settings().retry_ms))
        assert frames > 0
        assert value(await scrape(client), "flushline_retained_bytes") >= frames


async def _status(client: Client, job_id: str, status: str) -> bool:
    return bool((await get_job(client, job_id))["status"] == status)


#: Kept jobs in the scrape tests, and how their statuses cycle.
KEPT_JOBS = 250
KEPT_STATUSES = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.QUEUED)
#: Redis commands that read a snapshot or a job's events.
SNAPSHOT_READS = ("get", "mget", "xrange", "xrevrange")


@pytest.fixture
def own_redis(tmp_path: pathlib.Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own: its counts are this test's jobs only."""
    with run_redis(tmp_path / "redis", binary=require_redis_server()) as server:
        yield server


def kept_job(n: int, status: JobStatus) -> JobSnapshot:
    """The n-th of the kept jobs (creation order is n's order), with ``status``."""
    return JobSnapshot(
        id=f"kept-{n}-{uuid.uuid4().hex}",
        pipeline="demo",
        strategy="none",
        steps=(StepState("only"),),
        created_at=time.time() + n / 1e6,
        status=status,
        result={"text": "x" * 200} if status is JobStatus.SUCCEEDED else None,
    )


async def keep_jobs(client: Client, count: int) -> dict[str, int]:
    """Add ``count`` jobs to the app's store, statuses cycling; the expected counts."""
    store = client.app[MANAGER].store
    expected = dict.fromkeys((status.value for status in JobStatus), 0)
    for n in range(count):
        status = KEPT_STATUSES[n % len(KEPT_STATUSES)]
        job = kept_job(n, JobStatus.QUEUED)
        await store.add(job)
        if status is not JobStatus.QUEUED:
            await store.put(attrs.evolve(job, status=status))
        expected[status.value] += 1
    return expected


def count_calls(
    monkeypatch: pytest.MonkeyPatch, cls: type[Any], names: tuple[str, ...]
) -> Callable[[], int]:
    """Count calls of ``cls``'s async methods ``names`` from now; the running total."""
    calls = 0

    def wrap(method: Any) -> Any:
        async def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            return await method(*args, **kwargs)

        return counted

    for name in names:
        monkeypatch.setattr(cls, name, wrap(getattr(cls, name)))
    return lambda: calls


def redis_reads(url: str) -> int:
    """Calls so far of the Redis commands that read snapshots or events."""
    with Redis.from_url(url) as admin:
        stats = admin.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in SNAPSHOT_READS)


class TestJobCounts:
    """flushline_jobs comes from counts kept as jobs change status, never from snapshots."""

    async def test_a_scrape_reads_no_snapshot_on_the_memory_store(
        self, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """250 kept jobs: the scrape counts each status right and calls no store read."""
        client = await make_client()
        expected = await keep_jobs(client, KEPT_JOBS)
        reads = count_calls(monkeypatch, MemoryJobStore, ("get", "newest"))
        samples = await scrape(client)
        assert reads() == 0
        for status, count in expected.items():
            assert value(samples, "flushline_jobs", status=status) == count

    async def test_a_scrape_reads_no_snapshot_on_redis(
        self, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch, own_redis: RedisServer
    ) -> None:
        """250 kept jobs in Redis: right counts, no store read, no GET/MGET/XRANGE sent."""
        client = await make_client({"FLUSHLINE_BUS": "redis", "FLUSHLINE_REDIS_URL": own_redis.url})
        expected = await keep_jobs(client, KEPT_JOBS)
        reads = count_calls(monkeypatch, RedisJobStore, ("get", "newest", "fold"))
        before = redis_reads(own_redis.url)
        samples = await scrape(client)
        assert reads() == 0
        assert redis_reads(own_redis.url) == before
        for status, count in expected.items():
            assert value(samples, "flushline_jobs", status=status) == count

    async def test_two_instances_on_redis_report_the_same(
        self, make_client: MakeClient, own_redis: RedisServer
    ) -> None:
        """A job run by one instance counts the same in the other's scrape, through its end."""
        env = {"FLUSHLINE_BUS": "redis", "FLUSHLINE_REDIS_URL": own_redis.url}
        runner, other = await make_client(env), await make_client(env)
        done = await create_job(runner, FAST_JOB)
        await wait_finished(runner, done["id"])
        slow = await create_job(runner, SLOW_JOB)
        await wait_until(lambda: _status(runner, slow["id"], "running"), 5, "the slow job to run")
        for client in (runner, other):
            samples = await scrape(client)
            assert value(samples, "flushline_jobs", status="succeeded") == 1
            assert value(samples, "flushline_jobs", status="running") == 1
            assert value(samples, "flushline_jobs", status="queued") == 0
        assert (await other.post(f"/api/jobs/{slow['id']}/cancel")).status == 202
        await wait_finished(other, slow["id"])
        for client in (runner, other):
            samples = await scrape(client)
            assert value(samples, "flushline_jobs", status="cancelled") == 1
            assert value(samples, "flushline_jobs", status="running") == 0


class TestStreamFigures:
    """Figures the stream and the jobs bump as they run."""

    async def test_open_streams_follow_a_live_stream(self, client: Client) -> None:
        """A stream open counts 1 in flushline_open_streams, 0 once it has ended."""
        job = await create_job(client, SLOW_JOB)
        reader = asyncio.create_task(stream_job(client, job["id"]))
        try:
            await wait_until(lambda: _gauge(client, "flushline_open_streams", 1), 5)
            samples = await scrape(client)
            assert value(samples, "flushline_streams_total") == 1
        finally:
            assert (await client.post(f"/api/jobs/{job['id']}/cancel")).status == 202
            await reader
        await wait_until(lambda: _gauge(client, "flushline_open_streams", 0), 5)

    async def test_events_published_match_the_jobs_events(self, client: Client) -> None:
        """flushline_events_published_total is the sum of the jobs' last seqs."""
        seqs = 0
        for _ in range(2):
            job = await create_job(client, FAST_JOB)
            seqs += (await wait_finished(client, job["id"]))["last_event_id"]
        assert value(await scrape(client), "flushline_events_published_total") == seqs

    async def test_written_bytes_split_payload_and_padding(self, make_client: MakeClient) -> None:
        """Payload is every byte but the comment lines; padding is exactly the comment lines."""
        client = await make_client({"FLUSHLINE_STRATEGY": "padding"})
        job = await create_job(client, QUICK_JOB)
        raw = await _raw_stream(client, job["id"])
        padding = sum(len(line.text) for line in raw_lines(raw) if line.is_comment)
        assert padding > 0  # the padding strategy did pad
        await wait_until(lambda: _gauge(client, "flushline_open_streams", 0), 5)
        samples = await scrape(client)
        assert value(samples, "flushline_stream_written_bytes_total", kind="padding") == padding
        assert (
            value(samples, "flushline_stream_written_bytes_total", kind="payload")
            == len(raw) - padding
        )

    async def test_unpadded_stream_writes_no_padding(self, client: Client) -> None:
        """?proxy_buffer=0: every byte written is payload."""
        job = await create_job(client, QUICK_JOB)
        raw = await _raw_stream(client, job["id"], "?proxy_buffer=0")
        await wait_until(lambda: _gauge(client, "flushline_open_streams", 0), 5)
        samples = await scrape(client)
        assert value(samples, "flushline_stream_written_bytes_total", kind="padding") == 0
        assert value(samples, "flushline_stream_written_bytes_total", kind="payload") == len(raw)

    async def test_delivery_lag_of_each_live_event(self, make_client: MakeClient) -> None:
        """Every live event delivered is one lag observation, each well under a second."""
        # The job's first events go out at once, then nothing for 1.5 s: the stream opens in
        # that gap, so what it gets later is exactly the live part.
        scripted = ScriptedPipeline(((1.5, "a "), (0.05, "b "), (0.05, "c")))
        client = await make_client({"FLUSHLINE_STRATEGY": "none"}, pipelines=(scripted,))
        job = await create_job(client, pipeline="scripted")
        await wait_until(lambda: _seq_at_least(client, job["id"], 1), 1, "the first events")
        history = (await get_job(client, job["id"]))["last_event_id"]
        record = await stream_job(client, job["id"], query="?proxy_buffer=0")
        live = len(record.events) - history
        assert live >= 2  # at least the chunk(s) and done came after the gap
        samples = await scrape(client)
        assert value(samples, "flushline_event_delivery_lag_seconds_count") == live
        assert value(samples, "flushline_event_delivery_lag_seconds_bucket", le="1.0") == live
        assert 0 <= value(samples, "flushline_event_delivery_lag_seconds_sum") < live * 1.0

    async def test_cut_off_subscriber_counted_as_a_drop(self, make_client: MakeClient) -> None:
        """A stalled reader cut off for lagging counts once in flushline_subscriber_drops_total."""
        client = await make_client(
            {
                "FLUSHLINE_STRATEGY": "padding",
                "FLUSHLINE_PADDING_BYTES": "262144",
                "FLUSHLINE_SUBSCRIBER_QUEUE": "20",
                "FLUSHLINE_CHUNK_INTERVAL": "0.05",
            }
        )
        job = await create_job(
            client, {"steps": 2, "tokens_per_step": 120, "tokens_per_second": 80}
        )
        with contextlib.closing(await open_stalled_stream(client, job["id"])):
            await wait_until(lambda: _drops(client, 1), 10, "the drop to be counted")
        samples = await scrape(client)
        assert value(samples, "flushline_subscriber_drops_total", reason="cut_off") == 1
        await wait_finished(client, job["id"])


async def _raw_stream(client: Client, job_id: str, query: str = "") -> bytes:
    async with client.get(f"/api/jobs/{job_id}/stream{query}") as response:
        assert response.status == 200
        return await response.read()


async def _gauge(client: Client, name: str, expected: float) -> bool:
    return value(await scrape(client), name) == expected


async def _seq_at_least(client: Client, job_id: str, seq: int) -> bool:
    return int((await get_job(client, job_id))["last_event_id"]) >= seq


async def _drops(client: Client, expected: int) -> bool:
    samples = await scrape(client)
    total = sum(v for (name, _), v in samples.items() if name == "flushline_subscriber_drops_total")
    return total == expected


class TestRefusals:
    """Connections refused past FLUSHLINE_MAX_CONNECTIONS, in a real `flushline serve`."""

    async def test_refused_streams_counted_by_reason(self, tmp_path: pathlib.Path) -> None:
        """Every stream answered 503 past the limit counts in connections_refused_total."""
        script = require_flushline_script()
        port = free_port()
        env = clean_env(FLUSHLINE_PORT=str(port), FLUSHLINE_MAX_CONNECTIONS="16")
        log = tmp_path / "serve.log"
        base = f"http://127.0.0.1:{port}"
        async with (
            server_process([script, "serve", "--host", "127.0.0.1"], env, log) as process,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
        ):
            await wait_accepting(process, port)
            async with session.post(f"{base}/api/jobs", json={"options": SLOW_JOB}) as created:
                assert created.status == 201, await created.text()
                job = await created.json()
            streams = []
            statuses = []
            try:
                for _ in range(24):
                    connector = aiohttp.TCPConnector(force_close=True)
                    own = aiohttp.ClientSession(connector=connector)
                    streams.append(own)
                    response = await own.get(f"{base}/api/jobs/{job['id']}/stream")
                    statuses.append(response.status)
                refused = statuses.count(503)
                assert refused > 0, (statuses, read_log(log)[-2000:])
                async with session.get(f"{base}/metrics") as scraped:
                    _, samples = parse(await scraped.text())
                assert (
                    value(samples, "flushline_connections_refused_total", reason="max_connections")
                    == refused
                )
            finally:
                for own in streams:
                    await own.close()

    async def test_failed_accepts_counted_as_accept_error(self, tmp_path: pathlib.Path) -> None:
        """With descriptors run out under a live server, accept() fails: each failure
        counts in connections_refused_total{reason="accept_error"}; none before."""
        prlimit = require_prlimit()
        log = tmp_path / "serve.log"
        refused = "flushline_connections_refused_total"
        async with (
            serve_metrics(log, prefix=[prlimit, "--nofile=256"]) as (process, port),
            aiohttp.ClientSession() as session,
        ):
            before = await scrape_url(session, port)
            assert value(before, refused, reason="accept_error") == 0
            # No descriptor left for a new connection: the next accept() fails.
            set_nofile(prlimit, process.pid, open_descriptors(process.pid))
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                await asyncio.sleep(0.3)  # the listener retries every 20 ms
            finally:
                set_nofile(prlimit, process.pid, 256)
            writer.close()
            after = await scrape_url(session, port)
        assert value(after, refused, reason="accept_error") >= 1, read_log(log)[-2000:]
        assert "cannot accept connections" in read_log(log)


def open_descriptors(pid: int) -> int:
    """How many descriptors process ``pid`` has open."""
    return len(list(pathlib.Path(f"/proc/{pid}/fd").iterdir()))


def set_nofile(prlimit: str, pid: int, soft: int) -> None:
    """Set the soft descriptor limit of the running process ``pid``."""
    subprocess.run([prlimit, f"--pid={pid}", f"--nofile={soft}:"], check=True)


@contextlib.asynccontextmanager
async def serve_metrics(
    log: pathlib.Path, *, prefix: list[str]
) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    """``flushline serve`` (under ``prefix``) on a free port: the process and the port."""
    script = require_flushline_script()
    port = free_port()
    argv = [*prefix, script, "serve", "--host", "127.0.0.1"]
    async with server_process(argv, clean_env(FLUSHLINE_PORT=str(port)), log) as process:
        await wait_accepting(process, port)
        yield process, port


async def scrape_url(session: aiohttp.ClientSession, port: int) -> Samples:
    """GET /metrics of the server on ``port`` over a real connection; its samples."""
    async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
        assert response.status == 200
        return parse(await response.text())[1]
