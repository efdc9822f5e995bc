"""GET /metrics: the Prometheus text format, read back by prometheus-client's own parser.

Each test runs the real app on a real port, drives jobs and streams over HTTP, then
scrapes ``/metrics`` and checks the figures against what the client itself saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from app.core.settings import Settings
from app.core.sse import retry_line
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
