"""What actually arrives, per flush strategy, through each delivery path.

The real service (app factory, real port) runs behind nothing, the buffering emulator
(4096 and 16384 bytes, both release models; holding every write 200 ms; holding the
whole response; gzip) or a real nginx (HTTP/1.0 buffering, gzip, HTTP/1.1); a
recording client reads one short demo job per strategy through it. The
client and the service share one clock, so an event's lag is its arrival minus its
``ts``. ``aligned`` is told the path's buffer size (``FLUSHLINE_PROXY_BUFFER_BYTES``)
as ``flushline probe`` reports it: 4096/16384 for the buffering paths, 0 for direct,
nginx HTTP/1.1, the time hold and the whole-response path (where no block size helps),
and 4096 for the compressing paths (to show that even then nothing gets through).

All paths are measured once, side by side, by the module fixture ``deliveries`` (about
4 s); the tests below only judge the records. Timing bounds are generous: "live" is
within the 100 ms budget plus 250 ms, "held" is a median lag above 1 s on a 3 s job.
"""

from __future__ import annotations

import asyncio
import pathlib

import aiohttp
import attrs
import pytest

from app.pathtools.probe import ProbeReport, run_probe
from app.web.diagnostics import DiagnosticsPattern
from strategies import STRATEGIES
from strategies.aligned import DEADLINE_SHARE, DEFAULT_MIN_TAIL_BYTES
from tests.conftest import MakeClient
from tests.support.nginx import find_nginx, require_nginx
from tests.support.paths import (
    ALL_PATHS,
    DIRECT,
    EMULATOR_GZIP,
    EMULATOR_PATHS,
    EMULATOR_TIME_HOLD,
    EMULATOR_WHOLE_RESPONSE,
    HOLDING_PATHS,
    NGINX_GZIP,
    NGINX_HTTP10,
    NGINX_HTTP11,
    SHORT_JOB,
    DeliveryPath,
    JobDelivery,
    deliver_job,
    open_path,
    run_in_thread,
    serve,
)

#: About 3 s; see ``SHORT_JOB`` for why it fits under every path's first release.
JOB = SHORT_JOB
#: ``aligned``'s latency budget (FLUSHLINE_MAX_DELAY_MS default) plus a generous margin.
BUDGET_S = 0.100
LIVE_S = BUDGET_S + 0.250
#: Response headers count as "at once" below this.
HEADERS_AT_ONCE_S = 0.5
#: "Held": a median lag above this (the job lasts about 3 s).
HELD_S = 1.0
#: Events that arrive "at the end" arrive at most this long before the last was emitted.
END_SLACK_S = 0.25

STRATEGY_NAMES = tuple(STRATEGIES)
BUFFERING_PATHS = (*EMULATOR_PATHS, NGINX_HTTP10)
UNBUFFERED_PATHS = (DIRECT, NGINX_HTTP11)
GZIP_PROBE = DiagnosticsPattern(interval_ms=10, total_bytes=10_240, pause_ms=500)


@attrs.frozen
class PathRecord:
    """Every strategy's job read through one path (and the probe's report, for gzip)."""

    path: DeliveryPath
    jobs: dict[str, JobDelivery]
    probe: ProbeReport | None = None


async def _measure(path: DeliveryPath, tmp: pathlib.Path) -> PathRecord:
    async with (
        serve(path.env) as service,
        open_path(path, service, tmp / path.name) as front,
        aiohttp.ClientSession() as session,
    ):
        runs = [deliver_job(session, service, front, name, JOB) for name in STRATEGY_NAMES]
        jobs = await asyncio.gather(*runs)
        probe = await run_probe(front, GZIP_PROBE) if path is NGINX_GZIP else None
    return PathRecord(path, dict(zip(STRATEGY_NAMES, jobs, strict=True)), probe)


Deliveries = dict[str, PathRecord | BaseException]


@pytest.fixture(scope="module")
def deliveries(tmp_path_factory: pytest.TempPathFactory) -> Deliveries:
    """Every strategy through every path (nginx ones only if nginx is installed).

    A path whose measurement failed holds the exception, raised by its tests only.
    """
    every = (*ALL_PATHS, *HOLDING_PATHS)
    paths = [p for p in every if p.nginx is None or find_nginx() is not None]
    tmp = tmp_path_factory.mktemp("paths")

    async def measure_all() -> list[PathRecord | BaseException]:
        runs = (_measure(p, tmp) for p in paths)
        return list(await asyncio.gather(*runs, return_exceptions=True))

    return dict(zip((p.name for p in paths), run_in_thread(measure_all), strict=True))


def _record(deliveries: Deliveries, path: DeliveryPath) -> PathRecord:
    if path.nginx is not None:
        require_nginx()
    record = deliveries[path.name]
    if isinstance(record, BaseException):
        raise record
    return record


def _assert_held_to_the_end(run: JobDelivery) -> None:
    stats = run.stats
    assert stats.lag_p50_ms > HELD_S * 1000, run.describe()
    # Not one event got out before the job was (almost) over: one burst at the end.
    last_emitted = run.received[-1].ts
    assert run.received[0].arrived > last_emitted - END_SLACK_S, run.describe()
    assert run.arrival_span_s < END_SLACK_S < run.emitted_span_s, run.describe()


class TestBufferingPathsHoldAnUnshapedStream:
    """Without shaping, a buffering path delivers the whole job in one burst at the end."""

    @pytest.mark.parametrize("path", BUFFERING_PATHS, ids=str)
    def test_none_arrives_in_one_burst_at_the_end(
        self, deliveries: Deliveries, path: DeliveryPath
    ) -> None:
        """`none` through a buffering path: median lag > 1 s, all events in a moment at the end."""
        run = _record(deliveries, path).jobs["none"]
        _assert_held_to_the_end(run)
        # As `flushline watch` judges it: (almost) all in bursts. A 'blocks' path may send
        # its remainder at EOF a few ms after the last block, outside the 10 ms grouping.
        assert run.stats.burst_share >= 0.8, run.describe()

    @pytest.mark.parametrize("path", BUFFERING_PATHS, ids=str)
    def test_none_response_headers_are_held_too(
        self, deliveries: Deliveries, path: DeliveryPath
    ) -> None:
        """`none` through a buffering path: even the response headers wait for the release."""
        run = _record(deliveries, path).jobs["none"]
        assert run.headers_after_s > HELD_S, run.describe()


class TestAlignedGetsThroughBufferingPaths:
    """`aligned`, told the path's buffer size, beats every buffering path in both release models."""

    @pytest.mark.parametrize("path", BUFFERING_PATHS, ids=str)
    def test_every_event_arrives_within_the_budget(
        self, deliveries: Deliveries, path: DeliveryPath
    ) -> None:
        """Every `aligned` event arrives within FLUSHLINE_MAX_DELAY_MS (100 ms) + 250 ms."""
        run = _record(deliveries, path).jobs["aligned"]
        late = [
            (r.lag_s, p["seq"], p["type"])
            for r, p in zip(run.received, run.record.payloads(), strict=True)
            if r.lag_s > LIVE_S
        ]
        assert not late, f"late events (lag s, seq, type): {late}; {run.describe()}"
        assert run.stats.events >= 8, run.describe()

    @pytest.mark.parametrize("path", BUFFERING_PATHS, ids=str)
    def test_response_headers_arrive_at_once(
        self, deliveries: Deliveries, path: DeliveryPath
    ) -> None:
        """`aligned`'s first write fills the path's first block, so the headers are not held."""
        run = _record(deliveries, path).jobs["aligned"]
        assert run.headers_after_s < HEADERS_AT_ONCE_S, run.describe()


class TestUnbufferedPathsAreLive:
    """Direct and through nginx speaking HTTP/1.1, every strategy streams live."""

    @pytest.mark.parametrize("strategy", STRATEGY_NAMES)
    @pytest.mark.parametrize("path", UNBUFFERED_PATHS, ids=str)
    def test_every_event_arrives_at_once(
        self, deliveries: Deliveries, path: DeliveryPath, strategy: str
    ) -> None:
        """Every event of every strategy arrives within 350 ms, headers within 500 ms."""
        run = _record(deliveries, path).jobs[strategy]
        assert run.stats.lag_max_ms < LIVE_S * 1000, run.describe()
        assert run.stats.bursts == 0, run.describe()
        assert run.headers_after_s < HEADERS_AT_ONCE_S, run.describe()


class TestCompressingPathDefeatsPadding:
    """nginx gzip-ing text/event-stream holds everything: padding cannot help (README)."""

    def test_probe_reports_compression(self, deliveries: Deliveries) -> None:
        """`flushline probe` through nginx GZIP sees Content-Encoding gzip, recommends nothing."""
        report = _record(deliveries, NGINX_GZIP).probe
        assert report is not None
        assert report.compressed, report
        assert report.content_encoding == "gzip", report
        assert report.settings() == {}, report
        assert "compresses" in report.render()

    @pytest.mark.parametrize("strategy", STRATEGY_NAMES)
    def test_every_strategy_arrives_in_one_burst_at_the_end(
        self, deliveries: Deliveries, strategy: str
    ) -> None:
        """Through nginx GZIP even `aligned` (told 4096) and `combined` arrive only at the end."""
        run = _record(deliveries, NGINX_GZIP).jobs[strategy]
        assert run.record.headers.get("Content-Encoding") == "gzip", run.record.headers
        _assert_held_to_the_end(run)
        assert run.headers_after_s > HELD_S, run.describe()


#: The time-hold emulator's hold (``--max-hold-s``).
HOLD_S = 0.2


class TestTimeHoldDelaysEveryEventByTheHold:
    """A path holding each write 200 ms delays every strategy by about that, no more."""

    @pytest.mark.parametrize("strategy", STRATEGY_NAMES)
    def test_events_arrive_about_the_hold_late(self, deliveries: Deliveries, strategy: str) -> None:
        """Median lag 100-450 ms; live events no later than hold + 250 ms; headers within 1 s.

        Events emitted before the stream was requested (the job's first ones, replayed)
        also carry the time until the request: only the later ones measure the path.
        """
        assert EMULATOR_TIME_HOLD.proxy is not None
        assert EMULATOR_TIME_HOLD.proxy.max_hold_s == HOLD_S
        run = _record(deliveries, EMULATOR_TIME_HOLD).jobs[strategy]
        assert HOLD_S / 2 < run.stats.lag_p50_ms / 1000 < HOLD_S + 0.25, run.describe()
        live = [r.lag_s for r in run.received if r.ts > run.requested_at]
        assert len(live) >= len(run.received) // 2, run.describe()
        assert max(live) < HOLD_S + 0.25, run.describe()
        # Held like the events (not until the end of the 3 s job).
        assert HOLD_S / 2 < run.headers_after_s < 1.0, run.describe()


class TestWholeResponsePathHoldsEverything:
    """A path that holds the whole response delivers every strategy at the end, all at once."""

    @pytest.mark.parametrize("strategy", STRATEGY_NAMES)
    def test_every_strategy_arrives_at_the_end(self, deliveries: Deliveries, strategy: str) -> None:
        """Even `aligned`: one burst at the end, headers with it, with a Content-Length."""
        run = _record(deliveries, EMULATOR_WHOLE_RESPONSE).jobs[strategy]
        assert int(run.record.headers["Content-Length"]) == len(run.record.raw)
        _assert_held_to_the_end(run)
        assert run.headers_after_s > HELD_S, run.describe()


class TestCompressingEmulatorDefeatsPadding:
    """The emulator with --gzip, like nginx gzip: nothing gets through before the end."""

    @pytest.mark.parametrize("strategy", STRATEGY_NAMES)
    def test_every_strategy_arrives_at_the_end(self, deliveries: Deliveries, strategy: str) -> None:
        """Every strategy (aligned told 4096) compressed and held to the end."""
        run = _record(deliveries, EMULATOR_GZIP).jobs[strategy]
        assert run.record.headers.get("Content-Encoding") == "gzip", run.record.headers
        _assert_held_to_the_end(run)


class TestServiceNeverCompresses:
    """The service itself never compresses a stream, whatever the client accepts."""

    @pytest.mark.parametrize("strategy", STRATEGY_NAMES)
    async def test_job_stream_ignores_accept_encoding(
        self, make_client: MakeClient, strategy: str
    ) -> None:
        """A job stream asked for with Accept-Encoding: gzip is sent as is, marked no-transform."""
        client = await make_client()
        body = {"strategy": strategy, "options": {"steps": 1, "tokens_per_step": 5}}
        created = await client.post("/api/jobs", json=body)
        assert created.status == 201, await created.text()
        job = await created.json()
        headers = {"Accept-Encoding": "gzip, deflate, br", "Accept": "text/event-stream"}
        async with client.session.get(
            client.make_url(job["links"]["stream"]), headers=headers, auto_decompress=False
        ) as response:
            raw = await response.read()
        assert response.status == 200
        assert "Content-Encoding" not in response.headers, dict(response.headers)
        assert "no-transform" in response.headers["Cache-Control"], dict(response.headers)
        assert raw.startswith(b"retry:"), raw[:40]
        assert b"event: done" in raw

    async def test_diagnostics_stream_ignores_accept_encoding(
        self, make_client: MakeClient
    ) -> None:
        """The probe's diagnostics stream is never compressed either."""
        client = await make_client()
        query = {"total_bytes": "1024", "interval_ms": "5", "pause_ms": "0"}
        async with client.session.get(
            client.make_url("/api/diagnostics/stream"),
            params=query,
            headers={"Accept-Encoding": "gzip"},
            auto_decompress=False,
        ) as response:
            raw = await response.read()
        assert response.status == 200
        assert "Content-Encoding" not in response.headers, dict(response.headers)
        assert "no-transform" in response.headers["Cache-Control"], dict(response.headers)
        assert raw.startswith(b"retry:"), raw[:40]
        assert b"event: probe_end" in raw


class TestPaddingCost:
    """`aligned` buys its delivery with fewer padding bytes than fixed `padding`."""

    async def test_aligned_pads_within_a_block_per_flush_spacing(self) -> None:
        """Same job (80 tokens/s, seed 7), default settings: aligned pays at most one block
        (plus its tail) per 90 ms, its flush spacing, however often the bar moves."""
        # The default job shape at its default rate, cut from 4 x 400 tokens (20 s) to 2 x 400.
        job = {"steps": 2, "tokens_per_step": 400, "tokens_per_second": 80, "seed": 7}
        async with serve() as service, aiohttp.ClientSession() as session:
            aligned = await deliver_job(session, service, service, "aligned", job)
        bound_per_s = (4096 + DEFAULT_MIN_TAIL_BYTES) / (0.1 * DEADLINE_SHARE)
        assert aligned.padding_per_s > 0
        assert aligned.padding_per_s < bound_per_s, (
            f"aligned {aligned.padding_bytes} B over {aligned.emitted_span_s:.2f} s"
        )
