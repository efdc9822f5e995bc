"""``flushline probe``: the analysis of a diagnostics stream, end to end, and its CLI.

Unit tests feed :func:`app.pathtools.probe.analyse` synthetic read sequences: the pattern's writes
as a modelled path would release them (direct; a buffer releasing everything once it
holds ``B`` bytes; one releasing whole ``B``-byte blocks; nginx's first block shortened
by the upstream's response head; gzip; a timer flush during the final pause; a time
hold; the whole response held to the end).

End-to-end tests run the real probe against the real service behind a direct
connection, the buffering emulator (4096 / 16384 bytes, both release models, with a
hold timer, holding every write 200 ms, holding the whole response, gzip) and real
nginx (HTTP/1.0 buffering, gzip, HTTP/1.1), all side by side in the module fixture
``probes``. Patterns are the probe's own for a 4096 or 16384 byte buffer; the
4096-byte paths keep the default 25 ms interval, so their first release (12 writes
after the 1 KB first write) comes late enough to count as holding the headers.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from app.pathtools.probe import (
    Fix,
    PathKind,
    ProbeReport,
    Read,
    analyse,
    probe_pattern,
    run_probe,
)
from app.web.diagnostics import DiagnosticsPattern
from tests.conftest import MakeClient
from tests.support.nginx import find_nginx, require_nginx
from tests.support.paths import (
    DIRECT,
    EMULATOR_GZIP,
    EMULATOR_PATHS,
    EMULATOR_TIME_HOLD,
    EMULATOR_WHOLE_RESPONSE,
    NGINX_GZIP,
    NGINX_HTTP10,
    NGINX_HTTP10_8K,
    NGINX_HTTP11,
    DeliveryPath,
    open_path,
    run_in_thread,
    serve,
)
from tests.support.process import run_cli

DEFAULT = DiagnosticsPattern()
#: The pattern ``flushline probe`` sends by default (1 KB first write, large writes).
PROBE = probe_pattern()
WRITE = DEFAULT.write_bytes
#: About the size of the final ``probe_end`` event.
END_BYTES = 160
DIRECT_SETTINGS = {"FLUSHLINE_STRATEGY": "aligned", "FLUSHLINE_PROXY_BUFFER_BYTES": "0"}


def buffered_settings(size: int) -> dict[str, str]:
    """What the probe must recommend for a path buffering ``size`` bytes."""
    return {
        "FLUSHLINE_STRATEGY": "aligned",
        "FLUSHLINE_PROXY_BUFFER_BYTES": str(size),
        "FLUSHLINE_MAX_DELAY_MS": "100",
    }


# --------------------------------------------------------------------------- synthetic paths


@attrs.frozen
class Simulated:
    """The reads a client sees through a modelled path, and when the headers arrived."""

    reads: tuple[Read, ...]
    headers_at_s: float

    def analyse(self, pattern: DiagnosticsPattern, **kwargs: Any) -> ProbeReport:
        return analyse(self.reads, pattern, headers_at_s=self.headers_at_s, **kwargs)


def simulate(
    pattern: DiagnosticsPattern,
    *,
    buffer: int = 0,
    model: str = "all",
    head: int = 0,
    hold_s: float | None = None,
    latency_s: float = 0.002,
) -> Simulated:
    """Send ``pattern`` through a path model; return what the client reads.

    ``buffer`` 0 passes every write through. ``model`` "all" releases everything held
    once ``buffer`` bytes are held; "blocks" releases whole blocks, the first of them
    ``head`` bytes short (nginx's first buffer also holds the response head). With
    ``hold_s`` held bytes also go out once the oldest has waited that long. Everything
    left goes out at the end of the stream. Headers arrive with the first release.
    ``latency_s`` is the network delay of every release (and of a direct path's headers).
    """
    sends = [(w.sent_s, w.end) for w in pattern.schedule()]
    end_at = sends[-1][0] + pattern.pause_ms / 1000
    sends.append((end_at, sends[-1][1] + END_BYTES))
    reads: list[Read] = []
    released = 0
    oldest: float | None = None  # when the oldest held byte was sent
    sent = 0
    for at, total in sends:
        if hold_s is not None and oldest is not None and oldest + hold_s <= at:
            reads.append(Read(oldest + hold_s + latency_s, sent))
            released, oldest = sent, None
        sent = total
        if oldest is None:
            oldest = at
        if buffer == 0 or at == end_at:
            upto = total
        elif model == "all":
            upto = total if total - released >= buffer else released
        else:
            first = buffer - head
            upto = first + (total - first) // buffer * buffer if total >= first else 0
        if upto > released:
            reads.append(Read(at + latency_s, upto))
            released = upto
            oldest = None if upto == total else at
    headers_at = latency_s if buffer == 0 else reads[0].at_s
    return Simulated(tuple(reads), headers_at)


def _deltas(reads: Sequence[Read]) -> list[int]:
    return [b - a for a, b in itertools.pairwise([0, *(r.total for r in reads)])]


# --------------------------------------------------------------------------- analyse()


class TestAnalyseDirect:
    """A path that does not buffer: every write arrives as it is sent."""

    def test_direct_path_is_not_buffered(self) -> None:
        """Writes arriving on schedule: not buffered, headers not held, aligned with buffer 0."""
        sim = simulate(DEFAULT)
        report = sim.analyse(DEFAULT, url="http://svc")
        assert not report.buffered
        assert report.release_model == "none"
        assert report.buffer_bytes is None
        assert not report.headers_held
        assert not report.compressed
        assert report.timer_flush_s is None
        assert report.held_share == 0.0
        assert report.max_lag_ms < 3 * DEFAULT.interval_ms
        assert report.total_bytes == (DEFAULT.writes + 1) * WRITE + END_BYTES
        assert report.settings() == DIRECT_SETTINGS
        assert "does not buffer" in report.render()
        assert "FLUSHLINE_PROXY_BUFFER_BYTES=0" in report.render()

    def test_network_latency_is_not_buffering(self) -> None:
        """A slow but unbuffered path (300 ms to first byte, then on schedule) holds nothing.

        The headers come 300 ms after the request, together with the first write, but
        every write arrives on schedule after them: nothing was held back.
        """
        report = simulate(DEFAULT, latency_s=0.3).analyse(DEFAULT)
        assert not report.buffered
        assert not report.headers_held, report


class TestAnalyseBuffering:
    """Size-triggered buffers: size and release model from where the releases fall."""

    @pytest.mark.parametrize("size", [4096, 8192, 16384])
    def test_all_model(self, size: int) -> None:
        """Releases every ceil(B/257) writes: model 'all', the power of two in the range."""
        report = simulate(DEFAULT, buffer=size, model="all").analyse(DEFAULT)
        assert report.buffered
        assert report.release_model == "all"
        assert report.buffer_bytes == size
        assert report.buffer_range is not None
        low, high = report.buffer_range
        assert low <= size <= high
        assert set(report.release_sizes) == {math.ceil(size / WRITE) * WRITE}
        assert report.headers_held
        assert report.settings() == buffered_settings(size)
        assert f"FLUSHLINE_PROXY_BUFFER_BYTES={size}" in report.render()

    @pytest.mark.parametrize("size", [4096, 8192, 16384])
    def test_blocks_model(self, size: int) -> None:
        """Releases at multiples of B (not of 257): model 'blocks', B exactly."""
        report = simulate(DEFAULT, buffer=size, model="blocks").analyse(DEFAULT)
        assert report.buffered
        assert report.release_model == "blocks"
        assert report.buffer_bytes == size
        assert report.buffer_range is None
        assert set(report.release_sizes) == {size}
        assert report.headers_held
        assert report.settings() == buffered_settings(size)

    @pytest.mark.parametrize("head", [173, 250])
    def test_nginx_first_block_short_by_the_response_head(self, head: int) -> None:
        """nginx: first release 4096 minus the upstream's head, then 4096 blocks: blocks of 4096."""
        sim = simulate(DEFAULT, buffer=4096, model="blocks", head=head)
        assert _deltas(sim.reads)[:2] == [4096 - head, 4096]  # the model itself
        report = sim.analyse(DEFAULT)
        assert report.buffered
        assert report.release_model == "blocks"
        assert report.buffer_bytes == 4096
        assert report.release_sizes[0] == 4096 - head
        assert set(report.release_sizes[1:]) == {4096}
        assert report.headers_held
        assert report.settings() == buffered_settings(4096)

    def test_headers_held_by_a_short_first_fill(self) -> None:
        """With a fast pattern the first block fills in 150 ms; headers held that long count.

        nginx at 4096 bytes with 10 ms writes: the headers arrive with the first release,
        ~150 ms after the request, while unbuffered writes would have arrived at once.
        """
        fast = DiagnosticsPattern(interval_ms=10, total_bytes=10_240, pause_ms=500)
        sim = simulate(fast, buffer=4096, model="blocks", head=173)
        report = sim.analyse(fast)
        assert report.buffered
        assert report.buffer_bytes == 4096
        assert sim.headers_at_s > 0.1
        assert report.headers_held, report

    def test_everything_held_to_the_end(self) -> None:
        """A buffer larger than the pattern: buffered, but size and model unknown."""
        report = simulate(DEFAULT, buffer=10**9).analyse(DEFAULT)
        assert report.buffered
        assert report.release_model == "unknown"
        assert report.buffer_bytes is None
        assert report.release_sizes == ()
        assert report.headers_held
        assert report.held_share > 0.9
        assert "unknown size" in report.render()

    @hypothesis_settings(max_examples=40, deadline=None)
    @given(
        exponent=st.integers(min_value=12, max_value=14),
        model=st.sampled_from(["all", "blocks"]),
        head=st.integers(min_value=0, max_value=300),
    )
    def test_any_power_of_two_buffer_is_found(self, exponent: int, model: str, head: int) -> None:
        """For every power-of-two buffer of 4-16 KB, either model, any head offset: B is found."""
        size = 2**exponent
        sim = simulate(DEFAULT, buffer=size, model=model, head=head if model == "blocks" else 0)
        report = sim.analyse(DEFAULT)
        assert report.buffered
        assert report.release_model == model
        assert report.buffer_bytes == size


class TestAnalyseCompressionAndTimer:
    """Compression (Content-Encoding) and timer flushes during the pause."""

    def test_gzip_is_reported_and_no_strategy_recommended(self) -> None:
        """Content-Encoding gzip, all held to the end: compressed, no settings, advice instead."""
        sim = simulate(DEFAULT, buffer=10**9)
        report = sim.analyse(DEFAULT, content_encoding="gzip")
        assert report.compressed
        assert report.content_encoding == "gzip"
        assert report.settings() == {}
        text = report.render()
        assert "compression: gzip" in text
        assert "compresses" in text
        assert "FLUSHLINE_" not in text

    @pytest.mark.parametrize("encoding", [None, "", "identity"])
    def test_identity_is_not_compression(self, encoding: str | None) -> None:
        """No Content-Encoding, an empty one or 'identity' is not compression."""
        report = simulate(DEFAULT).analyse(DEFAULT, content_encoding=encoding)
        assert not report.compressed
        assert report.settings() == DIRECT_SETTINGS

    def test_timer_flush_during_the_pause(self) -> None:
        """Held bytes released during the final pause, before the end: a timer flush."""
        report = simulate(DEFAULT, buffer=4096, model="all", hold_s=0.5).analyse(DEFAULT)
        assert report.buffered
        assert report.buffer_bytes == 4096
        assert report.timer_flush_s is not None
        assert 0 < report.timer_flush_s <= 0.5
        assert "timer flush" in report.render()

    def test_no_timer_flush_without_a_release_in_the_pause(self) -> None:
        """The same buffer without a timer: the remainder waits for the end, no timer flush."""
        report = simulate(DEFAULT, buffer=4096, model="all").analyse(DEFAULT)
        assert report.timer_flush_s is None
        assert "timer flush" not in report.render()


class TestAnalyseWithTheProbePattern:
    """The probe's own pattern (1 KB first write, then large writes) keeps every finding."""

    def test_first_write_is_at_least_1_kb(self) -> None:
        """Compressors with a minimum length (1 KB at most) compress the very first write."""
        assert PROBE.first_bytes >= 1024
        assert PROBE.first_bytes % WRITE == 0  # still on the 257-byte grid
        assert probe_pattern(write_bytes=2000).first_bytes == 2000

    def test_direct(self) -> None:
        """Unbuffered: nothing held, and no fix needed."""
        report = simulate(PROBE).analyse(PROBE)
        assert report.kind is PathKind.UNBUFFERED
        assert not report.buffered
        assert report.fixes == ()
        assert report.first_write_bytes == PROBE.first_bytes
        assert report.settings() == DIRECT_SETTINGS

    @pytest.mark.parametrize("model", ["all", "blocks"])
    @pytest.mark.parametrize("size", [2048, 4096, 8192, 16384])
    def test_size_buffer(self, size: int, model: str) -> None:
        """A size buffer releases the same bytes with large writes: block size, found exactly."""
        report = simulate(PROBE, buffer=size, model=model).analyse(PROBE)
        assert report.kind is PathKind.SIZE_BUFFER, report
        assert report.release_model == model
        assert report.buffer_bytes == size
        assert report.release_growth is not None
        assert report.release_growth < 1.5, report
        assert report.hold_ms is None
        assert report.fixes == (Fix.BLOCK_SIZE, Fix.PROXY_SETTING)
        assert report.settings() == buffered_settings(size)
        text = report.render()
        assert f"?proxy_buffer={size}" in text
        assert "proxy_buffering off;" in text  # the proxy setting, as the other fix

    def test_nginx_first_block_short_by_the_response_head(self) -> None:
        """nginx's short first block with the 1 KB first write: still blocks of 4096."""
        report = simulate(PROBE, buffer=4096, model="blocks", head=200).analyse(PROBE)
        assert report.kind is PathKind.SIZE_BUFFER
        assert report.release_model == "blocks"
        assert report.buffer_bytes == 4096

    def test_a_buffer_larger_than_the_small_writes_is_found_from_the_large_ones(self) -> None:
        """One release during the small writes: the size comes from the large writes' releases."""
        pattern = probe_pattern(4096)  # about 10 KB of small writes
        report = simulate(pattern, buffer=8192, model="all").analyse(pattern)
        assert report.kind is PathKind.SIZE_BUFFER, report
        assert report.buffer_bytes == 8192


class TestAnalyseTimeHold:
    """A path that holds what it has for a while, whatever its size, is no size buffer."""

    def test_time_hold_is_not_a_size_buffer(self) -> None:
        """Small writes go out like a 2048 buffer's (2 KB per 200 ms); large ones tell them apart.

        The two paths look alike while the writes are small; with writes four times
        larger the buffer releases its 2 KB four times as often, the hold four times
        the bytes as often as before.
        """
        held = simulate(PROBE, buffer=10**9, hold_s=0.2).analyse(PROBE)
        sized = simulate(PROBE, buffer=2048, model="all").analyse(PROBE)
        assert sized.kind is PathKind.SIZE_BUFFER
        assert sized.buffer_bytes == 2048
        assert held.kind is PathKind.TIME_HOLD, held
        assert held.release_model == "time"
        assert held.buffer_bytes is None
        assert held.release_growth is not None
        assert held.release_growth > 3, held
        assert held.headers_held

    def test_hold_time_is_reported(self) -> None:
        """The hold is the wait of the oldest write of each release: 200 ms."""
        report = simulate(PROBE, buffer=10**9, hold_s=0.2).analyse(PROBE)
        assert report.hold_ms is not None
        assert 190 <= report.hold_ms <= 230, report

    @hypothesis_settings(max_examples=25, deadline=None)
    @given(hold_ms=st.integers(min_value=100, max_value=400))
    def test_any_hold_from_100_to_400_ms(self, hold_ms: int) -> None:
        """Every hold from 100 to 400 ms is a time hold, its length within one write interval."""
        report = simulate(PROBE, buffer=10**9, hold_s=hold_ms / 1000).analyse(PROBE)
        assert report.kind is PathKind.TIME_HOLD, report
        assert report.hold_ms is not None
        assert abs(report.hold_ms - hold_ms) <= PROBE.interval_ms + 5, report

    def test_within_the_budget_streams_unpadded(self) -> None:
        """200 ms within a 500 ms budget: no fix needed, pad nothing (padding cannot help)."""
        report = simulate(PROBE, buffer=10**9, hold_s=0.2).analyse(PROBE, latency_budget_ms=500)
        assert report.within_budget is True
        assert report.fixes == ()
        assert report.settings() == DIRECT_SETTINGS
        text = report.render()
        assert "padding cannot shorten a time hold" in text
        assert "within the 500 ms latency budget" in text
        assert "FLUSHLINE_PROXY_BUFFER_BYTES=0" in text

    def test_over_the_budget_long_polling_or_the_proxy_setting(self) -> None:
        """200 ms over a 100 ms budget: the fix is long-polling or the proxy setting."""
        report = simulate(PROBE, buffer=10**9, hold_s=0.2).analyse(PROBE, latency_budget_ms=100)
        assert report.within_budget is False
        assert report.fixes == (Fix.LONG_POLLING, Fix.PROXY_SETTING)
        text = report.render()
        assert "exceeds the 100 ms latency budget" in text
        assert "GET /api/jobs/{id}/events" in text
        assert "flush_interval -1" in text  # Caddy's line among the proxy settings

    def test_a_buffer_with_a_timer_is_still_a_size_buffer(self) -> None:
        """4096 that fills before its 1 s timer: a size buffer (and a timer flush), not a hold."""
        report = simulate(PROBE, buffer=4096, model="all", hold_s=1.0).analyse(PROBE)
        assert report.kind is PathKind.SIZE_BUFFER
        assert report.buffer_bytes == 4096
        assert report.timer_flush_s is not None


class TestAnalyseWholeResponse:
    """Everything at the end: the whole response (Content-Length), or an unknown size."""

    def test_whole_response_with_content_length(self) -> None:
        """All at the end with a Content-Length: whole response; long-polling or proxy setting."""
        sim = simulate(PROBE, buffer=10**9)
        total = sim.reads[-1].total
        report = sim.analyse(PROBE, content_length=total)
        assert report.kind is PathKind.WHOLE_RESPONSE, report
        assert report.release_model == "end"
        assert report.content_length == total
        assert report.held_share > 0.9
        assert report.headers_held
        assert report.fixes == (Fix.LONG_POLLING, Fix.PROXY_SETTING)
        assert report.settings() == {}
        text = report.render()
        assert "the whole response" in text
        assert "GET /api/jobs/{id}/events" in text
        assert "--max-buffer" not in text
        assert "FLUSHLINE_" not in text

    def test_without_content_length_the_size_is_unknown(self) -> None:
        """All at the end, chunked: a buffer larger than the pattern; probe again, bigger."""
        report = simulate(PROBE, buffer=10**9).analyse(PROBE)
        assert report.kind is PathKind.LARGE_BUFFER
        assert report.release_model == "unknown"
        assert "larger --max-buffer" in report.render()
        assert report.fixes == (Fix.LONG_POLLING, Fix.PROXY_SETTING)

    def test_compressed_whole_response_is_reported_as_compression(self) -> None:
        """gzip and a Content-Length: compression is what to fix first."""
        sim = simulate(PROBE, buffer=10**9)
        report = sim.analyse(PROBE, content_encoding="gzip", content_length=900)
        assert report.kind is PathKind.COMPRESSED
        assert report.fixes == (Fix.PROXY_SETTING, Fix.LONG_POLLING)
        text = report.render()
        assert "`gzip off;`" in text
        assert "excludedContentTypes" in text


# --------------------------------------------------------------------------- end to end

#: The probe's pattern for a 4096 buffer at the default 25 ms interval (about 2.4 s).
PATTERN_4K = probe_pattern(4096, pause_ms=500)
#: For 16384 at 10 ms (about 3 s): the first release still comes 600 ms in.
PATTERN_16K = probe_pattern(16384, interval_ms=10, pause_ms=500)
#: For the hold timer: a pause long enough for the 1 s timer to fire within it.
PATTERN_TIMER = probe_pattern(4096, pause_ms=1_500)
TIMER_S = 1.0
#: The time-hold emulator's hold, and the probe's default latency budget.
HOLD_MS = 200
BUDGET_MS = 500


@attrs.frozen
class ProbeCase:
    """One probe run: the path, emulator overrides and the pattern."""

    name: str
    path: DeliveryPath
    pattern: DiagnosticsPattern
    proxy_overrides: tuple[tuple[str, Any], ...] = ()


CASES = (
    ProbeCase("direct", DIRECT, PATTERN_4K),
    *(
        ProbeCase(p.name, p, PATTERN_4K if p.buffer_bytes == 4096 else PATTERN_16K)
        for p in EMULATOR_PATHS
    ),
    ProbeCase("emulator-timer", EMULATOR_PATHS[0], PATTERN_TIMER, (("max_hold_s", TIMER_S),)),
    ProbeCase("emulator-time-hold", EMULATOR_TIME_HOLD, PATTERN_4K),
    ProbeCase("emulator-whole-response", EMULATOR_WHOLE_RESPONSE, PATTERN_4K),
    ProbeCase("emulator-gzip", EMULATOR_GZIP, PATTERN_4K),
    ProbeCase("nginx-http10", NGINX_HTTP10, PATTERN_4K),
    ProbeCase("nginx-http10-8k", NGINX_HTTP10_8K, PATTERN_16K),
    ProbeCase("nginx-gzip", NGINX_GZIP, PATTERN_4K),
    ProbeCase("nginx-http11", NGINX_HTTP11, PATTERN_4K),
)


async def _probe(case: ProbeCase, tmp: pathlib.Path) -> ProbeReport:
    async with (
        serve() as service,
        open_path(case.path, service, tmp / case.name, **dict(case.proxy_overrides)) as front,
    ):
        return await run_probe(front, case.pattern, timeout_s=30)


Probes = dict[str, ProbeReport | BaseException]
#: Probes run at once (each starts a server, often a proxy too).
PROBES_AT_ONCE = 4


@pytest.fixture(scope="module")
def probes(tmp_path_factory: pytest.TempPathFactory) -> Probes:
    """Every probe case run once, a few side by side (nginx cases only if nginx is installed).

    A case whose probe failed holds the exception, raised by its test only. All 13 at
    once on 2 cores once stalled one server's headers for 200 ms, which the probe then
    read as a path that holds headers back.
    """
    cases = [c for c in CASES if c.path.nginx is None or find_nginx() is not None]
    tmp = tmp_path_factory.mktemp("probes")

    async def probe_all() -> list[ProbeReport | BaseException]:
        room = asyncio.Semaphore(PROBES_AT_ONCE)

        async def probe(case: ProbeCase) -> ProbeReport:
            async with room:
                return await _probe(case, tmp)

        runs = (probe(c) for c in cases)
        return list(await asyncio.gather(*runs, return_exceptions=True))

    return dict(zip((c.name for c in cases), run_in_thread(probe_all), strict=True))


def _report(probes: Probes, name: str) -> ProbeReport:
    if name.startswith("nginx"):
        require_nginx()
    report = probes[name]
    if isinstance(report, BaseException):
        raise report
    return report


class TestProbeEndToEnd:
    """`run_probe` through real paths finds what the path really does."""

    def test_direct(self, probes: Probes) -> None:
        """Directly to the service: not buffered, headers at once, aligned with buffer 0."""
        report = _report(probes, "direct")
        assert report.status == 200
        assert not report.buffered, report
        assert report.release_model == "none"
        assert not report.headers_held, report
        assert not report.compressed
        assert report.total_bytes > PATTERN_4K.schedule()[-1].end
        assert report.kind is PathKind.UNBUFFERED
        assert report.settings() == DIRECT_SETTINGS

    @pytest.mark.parametrize("path", EMULATOR_PATHS, ids=str)
    def test_emulator(self, probes: Probes, path: DeliveryPath) -> None:
        """The emulator at 4096/16384 in either release model: its exact size and model."""
        assert path.proxy is not None
        report = _report(probes, path.name)
        assert report.buffered, report
        assert report.buffer_bytes == path.proxy.threshold_bytes, report
        assert report.release_model == path.proxy.release.value, report
        assert report.headers_held, report
        assert report.timer_flush_s is None, report
        assert not report.compressed
        assert report.kind is PathKind.SIZE_BUFFER, report
        assert report.settings() == buffered_settings(path.proxy.threshold_bytes)

    def test_emulator_with_a_hold_timer(self, probes: Probes) -> None:
        """Emulator with --max-hold-s 1: the remainder leaves during the pause (timer flush)."""
        report = _report(probes, "emulator-timer")
        assert report.buffered, report
        assert report.buffer_bytes == 4096, report
        assert report.timer_flush_s is not None, report
        assert 0.1 < report.timer_flush_s <= TIMER_S + 0.1, report
        assert report.kind is PathKind.SIZE_BUFFER, report

    def test_emulator_holding_every_write(self, probes: Probes) -> None:
        """--max-hold-s 0.2 with a huge threshold: a 200 ms time hold, not a block size."""
        report = _report(probes, "emulator-time-hold")
        assert report.kind is PathKind.TIME_HOLD, report
        assert report.buffered
        assert report.buffer_bytes is None, report
        assert report.hold_ms is not None
        assert HOLD_MS - 20 <= report.hold_ms <= HOLD_MS + 150, report
        assert report.headers_held, report
        # Padding cannot help: pad nothing. 200 ms is within the default 500 ms budget.
        assert report.settings() == DIRECT_SETTINGS
        assert report.within_budget is True
        assert report.fixes == ()
        assert "padding cannot shorten a time hold" in report.render()
        tight = attrs.evolve(report, latency_budget_ms=100)
        assert tight.fixes == (Fix.LONG_POLLING, Fix.PROXY_SETTING)

    def test_emulator_holding_the_whole_response(self, probes: Probes) -> None:
        """A threshold beyond the pattern: the whole response, with a Content-Length."""
        report = _report(probes, "emulator-whole-response")
        assert report.kind is PathKind.WHOLE_RESPONSE, report
        assert report.content_length == report.total_bytes, report
        assert report.held_share > 0.9, report
        assert report.headers_held, report
        assert report.settings() == {}
        assert report.fixes == (Fix.LONG_POLLING, Fix.PROXY_SETTING)
        assert "--max-buffer" not in report.render()

    def test_emulator_gzip(self, probes: Probes) -> None:
        """The emulator gzip-ing the stream: compressed; turn compression off, or long-poll."""
        report = _report(probes, "emulator-gzip")
        assert report.kind is PathKind.COMPRESSED, report
        assert report.content_encoding == "gzip"
        assert report.headers_held, report
        assert report.settings() == {}
        assert report.fixes == (Fix.PROXY_SETTING, Fix.LONG_POLLING)

    def test_nginx_http10(self, probes: Probes) -> None:
        """nginx HTTP/1.0 buffering: blocks of 4096, the first short by the response head."""
        report = _report(probes, "nginx-http10")
        assert report.buffered, report
        assert report.release_model == "blocks", report
        assert report.buffer_bytes == 4096, report
        assert 4096 - 300 <= report.release_sizes[0] <= 4096 - 100, report
        assert report.headers_held, report
        assert report.kind is PathKind.SIZE_BUFFER, report
        assert report.settings() == buffered_settings(4096)

    def test_nginx_http10_with_8k_buffers(self, probes: Probes) -> None:
        """nginx HTTP/1.0 with 8k buffers: blocks of 8192, a size buffer (aligned at 8192)."""
        report = _report(probes, "nginx-http10-8k")
        assert report.kind is PathKind.SIZE_BUFFER, report
        assert report.release_model == "blocks", report
        assert report.buffer_bytes == 8192, report
        assert report.headers_held, report
        assert report.settings() == buffered_settings(8192)

    def test_nginx_gzip(self, probes: Probes) -> None:
        """nginx gzip-ing the stream: compressed, and no padding setting recommended."""
        report = _report(probes, "nginx-gzip")
        assert report.compressed, report
        assert report.kind is PathKind.COMPRESSED, report
        assert report.content_encoding == "gzip"
        assert report.headers_held, report
        assert report.settings() == {}
        assert report.fixes == (Fix.PROXY_SETTING, Fix.LONG_POLLING)
        # The probe counts the bytes as the server wrote them (decompressed).
        assert report.total_bytes > PATTERN_4K.schedule()[-1].end

    def test_nginx_http11(self, probes: Probes) -> None:
        """nginx speaking HTTP/1.1 passes each write through: not buffered."""
        report = _report(probes, "nginx-http11")
        assert not report.buffered, report
        assert not report.headers_held, report
        assert not report.compressed
        assert report.kind is PathKind.UNBUFFERED, report
        assert report.settings() == DIRECT_SETTINGS


# --------------------------------------------------------------------------- CLI and endpoint


class TestProbeCli:
    """`python -m app probe URL` against a running service."""

    async def test_json_report_with_settings(self, tmp_path: pathlib.Path) -> None:
        """Through the 4096 'blocks' emulator, --json prints the findings and the settings."""
        path = EMULATOR_PATHS[1]
        assert path.name == "emulator-4096-blocks"
        async with serve() as service, open_path(path, service, tmp_path) as front:
            code, out, err = await run_cli("probe", front, "--json", "--max-buffer", "4096")
        assert code == 0, err
        data = json.loads(out)
        assert data["url"] == front
        assert data["status"] == 200
        assert data["buffered"] is True
        assert data["release_model"] == "blocks"
        assert data["buffer_bytes"] == 4096
        assert data["kind"] == "size_buffer"
        assert data["fixes"] == ["block_size", "proxy_setting"]
        assert data["first_write_bytes"] >= 1024
        assert data["settings"] == buffered_settings(4096)

    async def test_time_hold_over_the_budget(self, tmp_path: pathlib.Path) -> None:
        """Through a 200 ms hold with --latency-budget-ms 100: long-polling or the proxy setting."""
        async with serve() as service, open_path(EMULATOR_TIME_HOLD, service, tmp_path) as front:
            code, out, err = await run_cli(
                "probe", front, "--max-buffer", "4096", "--latency-budget-ms", "100"
            )
        assert code == 0, err
        assert "buffering:   a time hold: each write held about" in out, out
        assert "exceeds the 100 ms latency budget" in out, out
        assert "GET /api/jobs/{id}/events" in out
        assert "proxy_buffering off;" in out

    async def test_human_report_of_a_direct_path(self) -> None:
        """Without --json it prints a readable report ending in the settings to use."""
        async with serve() as service:
            code, out, err = await run_cli(
                "probe", service, "--max-buffer", "4096", "--interval-ms", "10"
            )
        assert code == 0, err
        assert out.startswith(f"probe of {service}: HTTP 200")
        assert "buffering:   none seen" in out
        assert out.rstrip().endswith("FLUSHLINE_PROXY_BUFFER_BYTES=0")

    async def test_unreachable_service_fails_cleanly(self) -> None:
        """A URL nobody listens on: exit 1 and one line on stderr, no traceback."""
        async with serve() as service:
            pass  # now closed: its port is free
        code, out, err = await run_cli("probe", service, "--json", timeout_s=30)
        assert code == 1
        assert out == ""
        assert err.startswith("flushline probe:"), err
        assert "Traceback" not in err


class TestDiagnosticsParameters:
    """`/api/diagnostics/stream` rejects bad pattern parameters with a 400 naming them."""

    @pytest.mark.parametrize(
        ("query", "name"),
        [
            ("write_bytes=abc", "write_bytes"),
            ("write_bytes=127", "write_bytes"),
            ("write_bytes=65537", "write_bytes"),
            ("write_bytes=%C2%B2", "write_bytes"),  # '²': a Unicode digit int() refuses
            ("interval_ms=4", "interval_ms"),
            ("interval_ms=1.5", "interval_ms"),
            ("total_bytes=1023", "total_bytes"),
            ("total_bytes=", "total_bytes"),
            ("pause_ms=-1", "pause_ms"),
            ("pause_ms=10001", "pause_ms"),
            ("interval_ms=2000", "interval_ms"),  # valid alone, but would last > 60 s
            ("first_writes=0", "first_writes"),
            ("first_writes=257", "first_writes"),
            ("large_write_bytes=300", "large_write_bytes"),  # less than twice write_bytes
            ("large_write_bytes=65537", "large_write_bytes"),
            ("large_total_bytes=-5", "large_total_bytes"),
            ("large_write_bytes=1028&large_total_bytes=400000&interval_ms=200", "interval_ms"),
            # The caps on what one request may make the server hold (issue 16):
            ("first_writes=256&write_bytes=65536", "first_writes"),
            ("total_bytes=524289", "total_bytes"),
            ("large_total_bytes=524289", "large_total_bytes"),
            (
                "write_bytes=4096&total_bytes=400000&large_write_bytes=8192"
                "&large_total_bytes=300000&interval_ms=5",
                "total_bytes",
            ),
            (
                "write_bytes=4096&total_bytes=100000&large_write_bytes=65536"
                "&large_total_bytes=500000&interval_ms=5",
                "large_total_bytes",
            ),
        ],
    )
    async def test_bad_parameter_is_a_400_naming_it(
        self, make_client: MakeClient, query: str, name: str
    ) -> None:
        """Each bad value answers 400 with the JSON error shape and the parameter's name."""
        client = await make_client()
        response = await client.get(f"/api/diagnostics/stream?{query}")
        text = await response.text()
        assert response.status == 400, text
        assert response.content_type == "application/json", text
        body = await response.json()
        assert set(body) == {"error"}, body
        assert body["error"]["code"] == "invalid_field", body
        assert name in body["error"]["message"], body

    async def test_valid_parameters_give_the_pattern(self, make_client: MakeClient) -> None:
        """Valid parameters: writes of exactly write_bytes, then probe_end echoing the pattern."""
        client = await make_client()
        pattern = DiagnosticsPattern(write_bytes=300, interval_ms=5, total_bytes=3000, pause_ms=0)
        response = await client.get("/api/diagnostics/stream", params=pattern.as_query())
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        raw = await response.read()
        body, _, end = raw.rpartition(b"event: probe_end\n")
        assert len(body) == (pattern.writes + 1) * pattern.write_bytes
        data = json.loads(end.removeprefix(b"data: ").strip())
        assert data["writes"] == pattern.writes
        assert data["offset"] == len(body)
        assert {k: data[k] for k in pattern.as_query()} == pattern.as_query()

    async def test_probe_pattern_first_write_and_large_writes(
        self, make_client: MakeClient
    ) -> None:
        """The probe's pattern: a first write of >= 1 KB, small writes, then 4x larger ones."""
        client = await make_client()
        pattern = attrs.evolve(probe_pattern(1024, interval_ms=5, pause_ms=0), large_total_bytes=0)
        response = await client.get("/api/diagnostics/stream", params=pattern.as_query())
        assert response.status == 200
        raw = await response.read()
        body, _, end = raw.rpartition(b"event: probe_end\n")
        schedule = pattern.schedule()
        assert len(body) == schedule[-1].end
        # The first write is the padded retry line, up to the first probe event.
        assert body.index(b"id: 1\n") == pattern.first_bytes >= 1024
        # Each write ends where the schedule says: its event's offset.
        events = [line for line in body.split(b"\n") if line.startswith(b"data: ")]
        offsets = [json.loads(line.removeprefix(b"data: "))["offset"] for line in events]
        assert offsets == [w.end for w in schedule[1:]]
        sizes = {b - a for a, b in itertools.pairwise(w.end for w in schedule)}
        assert sizes == {pattern.write_bytes, pattern.large_write_bytes}
        assert pattern.large_writes == pattern.total_bytes // pattern.large_write_bytes
        data = json.loads(end.removeprefix(b"data: ").strip())
        assert data["large_writes"] == pattern.large_writes

    async def test_old_parameters_give_the_old_pattern(self, make_client: MakeClient) -> None:
        """Only the original four parameters: first write of write_bytes, no large writes."""
        client = await make_client()
        query = {"write_bytes": "300", "interval_ms": "5", "total_bytes": "3000", "pause_ms": "0"}
        response = await client.get("/api/diagnostics/stream", params=query)
        raw = await response.read()
        body, _, _ = raw.rpartition(b"event: probe_end\n")
        assert body.index(b"id: 1\n") == 300
        assert len(body) == 3000  # (3000 // 300 - 1) writes after the first, all of 300
