"""``flushline watch``: one line per event with its lag, and a delivery summary.

``watch()`` runs against the real service (app factory, real port), directly and
through the buffering emulator at 4096 bytes; the CLI runs as a subprocess against a
service served by the test's own event loop. Service and watcher share one clock, so
the lags it prints are real.
"""

from __future__ import annotations

import io
import re
from typing import Any

import aiohttp
import pytest

from app.jobs.steps import FunctionStep, Input, StepPipeline
from app.pathtools.delivery import DeliveryStats
from app.pathtools.proxy import BufferingProxy, ProxyConfig
from app.pathtools.watch import watch
from tests.conftest import QUICK_JOB
from tests.support.paths import SHORT_JOB, serve, start_job
from tests.support.process import run_cli
from tests.support.reporting import serve_pipelines

#: About 3 s; unshaped, it stays under 4096 bytes until its final instant.
JOB = SHORT_JOB
#: The 100 ms budget of ``aligned`` plus a generous margin.
LIVE_MS = 350.0

EVENT_LINE = re.compile(
    r"^(?P<clock>\d\d:\d\d:\d\d\.\d{3})  lag +(?P<lag>-?\d+\.\d) ms +(?P<seq>\d+|-)"
    r"  (?P<type>\w+) *(?P<summary>.*)$"
)
SUMMARY_LINE = re.compile(
    r"^(?P<events>\d+) events; lag p50 (?P<p50>\d+) ms, p99 (?P<p99>\d+) ms, "
    r"max (?P<max>\d+) ms; (?P<bursts>\d+) bursts holding (?P<share>\d+)% of the events$"
)


def event_lines(output: str) -> list[re.Match[str]]:
    """The per-event lines of watch's output."""
    return [m for line in output.splitlines() if (m := EVENT_LINE.match(line))]


def summary(output: str) -> re.Match[str]:
    """The summary line (asserting there is exactly one, and that it is the last)."""
    lines = [line for line in output.splitlines() if line.strip()]
    matches = [m for line in lines if (m := SUMMARY_LINE.match(line))]
    assert len(matches) == 1, output[-500:]
    assert SUMMARY_LINE.match(lines[-1]), lines[-1]
    return matches[0]


def assert_summary_matches(output: str, stats: DeliveryStats) -> None:
    """The printed summary states the returned statistics."""
    line = summary(output)
    assert int(line["events"]) == stats.events
    assert int(line["p50"]) == round(stats.lag_p50_ms)
    assert int(line["p99"]) == round(stats.lag_p99_ms)
    assert int(line["bursts"]) == stats.bursts
    assert int(line["share"]) == round(stats.burst_share * 100)


async def _jobs(session: aiohttp.ClientSession, service: str) -> list[dict[str, Any]]:
    async with session.get(f"{service}/api/jobs") as response:
        assert response.status == 200
        jobs: list[dict[str, Any]] = (await response.json())["jobs"]
    return jobs


class TestWatchDirect:
    """`watch()` against the service directly."""

    async def test_base_url_starts_a_job_and_prints_every_event(self) -> None:
        """A base URL: starts a job, prints a line per event with its lag, then p50/p99/bursts."""
        out = io.StringIO()
        job = {"strategy": "frequency", "options": QUICK_JOB}
        async with serve() as service, aiohttp.ClientSession() as session:
            stats = await watch(service, out=out, job=job, timeout_s=30)
            jobs = await _jobs(session, service)
        output = out.getvalue()
        assert len(jobs) == 1
        assert jobs[0]["strategy"] == "frequency"
        stream_url = f"{service}/api/jobs/{jobs[0]['id']}/stream"
        assert output.splitlines()[0] == f"started a job; watching {stream_url}"
        assert output.splitlines()[1] == "pipeline demo; registered: chat, demo, external"
        assert re.search(r"^headers after \d+ ms$", output, re.M), output[:300]
        lines = event_lines(output)
        # One line per event: every seq of the job once, in order, job_started to done.
        assert [int(m["seq"]) for m in lines] == list(range(1, jobs[0]["last_event_id"] + 1))
        assert lines[0]["type"] == "job_started"
        assert lines[-1]["type"] == "done"
        assert lines[-1]["summary"] == "status succeeded"
        assert {"chunk", "step_progress", "step_completed"} <= {m["type"] for m in lines}
        assert stats.events == len(lines)
        assert all(0 <= float(m["lag"]) < LIVE_MS for m in lines), output
        assert stats.bursts == 0
        assert stats.lag_max_ms < LIVE_MS
        assert_summary_matches(output, stats)

    async def test_stream_url_watches_without_starting_a_job(self) -> None:
        """Given a job's stream URL it watches that job and starts none."""
        out = io.StringIO()
        async with serve() as service, aiohttp.ClientSession() as session:
            job = await start_job(session, service, "none", QUICK_JOB)
            stats = await watch(service + job["links"]["stream"], out=out, timeout_s=30)
            assert len(await _jobs(session, service)) == 1
        output = out.getvalue()
        assert "started a job" not in output
        lines = event_lines(output)
        assert lines
        assert lines[0]["seq"] == "1"
        assert lines[-1]["type"] == "done"
        assert stats.events == len(lines)
        assert_summary_matches(output, stats)

    async def test_last_event_id_resumes_after_that_seq(self) -> None:
        """With last_event_id=3 it prints seq 4 to the last, each once."""
        out = io.StringIO()
        async with serve() as service, aiohttp.ClientSession() as session:
            job = await start_job(session, service, "none", QUICK_JOB)
            url = service + job["links"]["stream"]
            stats = await watch(url, out=out, last_event_id="3", timeout_s=30)
            (finished,) = await _jobs(session, service)
        lines = event_lines(out.getvalue())
        assert [int(m["seq"]) for m in lines] == list(range(4, finished["last_event_id"] + 1))
        assert stats.events == len(lines)


class TestWatchThroughABufferingPath:
    """Through the 4096-byte emulator, watch's statistics tell held from live."""

    @pytest.mark.parametrize("release", ["all", "blocks"])
    async def test_none_is_reported_as_bursts(self, release: str) -> None:
        """`none` through the 4096 emulator: bursts, most events in them, p99 far past budget.

        Events wait for the buffer to fill: with progress sent as it moves (about 3.6 KB/s
        for this job), up to about a second.
        """
        out = io.StringIO()
        job = {"strategy": "none", "options": JOB}
        async with serve({"FLUSHLINE_PROXY_BUFFER_BYTES": "4096"}) as service:
            config = ProxyConfig(upstream=service, threshold_bytes=4096, release=release)
            async with BufferingProxy(config) as proxy:
                stats = await watch(proxy.url, out=out, job=job, timeout_s=30)
        assert stats.bursts >= 1, stats
        assert stats.burst_share >= 0.8, stats
        assert stats.lag_p99_ms > 2 * LIVE_MS, stats
        assert_summary_matches(out.getvalue(), stats)

    @pytest.mark.parametrize("release", ["all", "blocks"])
    async def test_aligned_is_reported_live(self, release: str) -> None:
        """`aligned` (told 4096) through the 4096 emulator: no bursts, every lag within budget."""
        out = io.StringIO()
        job = {"strategy": "aligned", "options": JOB}
        async with serve({"FLUSHLINE_PROXY_BUFFER_BYTES": "4096"}) as service:
            config = ProxyConfig(upstream=service, threshold_bytes=4096, release=release)
            async with BufferingProxy(config) as proxy:
                stats = await watch(proxy.url, out=out, job=job, timeout_s=30)
        assert stats.events >= 8, stats
        assert stats.bursts == 0, stats
        assert stats.burst_share == 0.0, stats
        assert stats.lag_max_ms < LIVE_MS, stats
        assert_summary_matches(out.getvalue(), stats)


class TestWatchCli:
    """`python -m app watch URL ...` as a user runs it."""

    async def test_starts_a_job_with_strategy_and_options(self) -> None:
        """--strategy and --options shape the started job; exit 0 with lines and the summary."""
        options = '{"steps": 1, "tokens_per_step": 40, "tokens_per_second": 200}'
        async with serve() as service, aiohttp.ClientSession() as session:
            code, out, err = await run_cli(
                "watch", service, "--strategy", "none", "--options", options
            )
            jobs = await _jobs(session, service)
        assert code == 0, err
        assert len(jobs) == 1
        assert jobs[0]["strategy"] == "none"
        assert [s["tokens"] for s in jobs[0]["steps"]] == [40]
        assert out.startswith("started a job; watching ")
        lines = event_lines(out)
        assert [int(m["seq"]) for m in lines] == list(range(1, jobs[0]["last_event_id"] + 1))
        assert int(summary(out)["events"]) == len(lines)

    async def test_pipeline_and_input_start_any_registered_pipeline(self) -> None:
        """--pipeline and --input start a registered pipeline with its input; it is named."""
        step = FunctionStep("shout", lambda ctx: ctx.input["topic"].upper())
        pipeline = StepPipeline("shout", (step,), (Input("topic"),))
        async with serve_pipelines({}, (pipeline,)) as service, aiohttp.ClientSession() as session:
            code, out, err = await run_cli(
                "watch", service, "--pipeline", "shout", "--input", '{"topic": "hi there"}'
            )
            jobs = await _jobs(session, service)
        assert code == 0, err
        assert [job["pipeline"] for job in jobs] == ["shout"]
        assert out.splitlines()[1] == "pipeline shout; registered: chat, demo, shout, external"
        chunks = [m["summary"] for m in event_lines(out) if m["type"] == "chunk"]
        assert chunks == ["shout: 'HI THERE'"]

    async def test_an_unknown_pipeline_lists_the_registered_ones(self) -> None:
        """--pipeline that the service lacks: exit 1, the message lists the registered ones."""
        async with serve() as service:
            code, _out, err = await run_cli("watch", service, "--pipeline", "nope")
        assert code == 1
        assert "unknown pipeline 'nope'" in err, err
        assert "registered: chat, demo, external" in err, err

    @pytest.mark.parametrize("value", ["{not json", "[1, 2]"])
    async def test_input_must_be_a_json_object(self, value: str) -> None:
        """--input that is not a JSON object: exit 2 naming --input, no request made."""
        code, out, err = await run_cli("watch", "http://127.0.0.1:9", "--input", value)
        assert code == 2
        assert out == ""
        assert err.startswith("flushline watch: --input "), err

    async def test_invalid_options_json(self) -> None:
        """--options that is not JSON: exit 2 and a message naming --options, no request made."""
        code, out, err = await run_cli(
            "watch", "http://127.0.0.1:9", "--options", "{not json", timeout_s=30
        )
        assert code == 2
        assert out == ""
        assert err.startswith("flushline watch: --options is not valid JSON"), err

    async def test_unreachable_service_fails_cleanly(self) -> None:
        """A URL nobody listens on: exit 1 and one line on stderr, no traceback."""
        async with serve() as service:
            pass  # now closed: its port is free
        code, out, err = await run_cli("watch", service, timeout_s=30)
        assert code == 1
        assert out == ""
        assert err.startswith("flushline watch:"), err
        assert "Traceback" not in err
