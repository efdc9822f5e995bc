"""Tests for the flush strategies (strategies/): registry, tuning and the frame shapers.

Shapers are pure functions of (bytes, time), so these tests drive them with explicit
times and check the bytes: what is added, that it is comment-only, and (for
``aligned``) where the byte count lands relative to the proxy's block size.
"""

from __future__ import annotations

import bisect
import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.core.sse import SSEMessage, SSEParser, encode_frame, retry_line
from strategies import STRATEGIES, Tuning, build_strategy
from strategies.aligned import DEADLINE_SHARE, AlignedShaper, AlignedStrategy
from strategies.builtin import PaddedShaper, PassThroughShaper

PREFIX = retry_line(3000)


def parse(stream: bytes) -> list[SSEMessage]:
    return SSEParser().feed(stream)


def data_of(stream: bytes) -> list[str]:
    """The data of every message carrying data (what EventSource would dispatch)."""
    return [m.data for m in parse(stream) if m.data is not None]


def frame(i: int, size: int = 0) -> bytes:
    """An event frame whose data is about ``size`` characters long."""
    return encode_frame(f'{{"seq":{i},"text":"{"x" * size}"}}', event="chunk", id=i)


# --- registry and tuning -----------------------------------------------------------


class TestRegistry:
    def test_registry_has_the_contract_strategies(self) -> None:
        """none, padding, frequency and combined (contract) plus aligned are registered."""
        assert {"none", "padding", "frequency", "combined", "aligned"} <= set(STRATEGIES)

    @pytest.mark.parametrize("name", sorted(STRATEGIES))
    def test_built_strategy_reports_its_registry_name(self, name: str) -> None:
        """build_strategy(name).name is name, and describe() names it too."""
        strategy = build_strategy(name)
        assert strategy.name == name
        assert strategy.describe()["name"] == name

    def test_unknown_strategy_raises_key_error(self) -> None:
        """build_strategy of an unregistered name raises KeyError."""
        with pytest.raises(KeyError):
            build_strategy("bogus")

    @pytest.mark.parametrize(
        ("name", "chars", "interval"),
        [
            ("none", 500, 1.2),
            ("padding", 500, 1.2),
            ("frequency", 100, 0.3),
            ("combined", 100, 0.3),
        ],
    )
    def test_default_chunk_cadence_per_contract(
        self, name: str, chars: int, interval: float
    ) -> None:
        """frequency/combined chunk at 100 chars / 0.3 s; none/padding at 500 / 1.2 s."""
        cadence = build_strategy(name).cadence
        assert cadence.chunk_chars == chars
        assert cadence.chunk_interval_s == pytest.approx(interval)
        assert cadence.progress_interval_s == pytest.approx(5.0)
        assert cadence.heartbeat_interval_s == pytest.approx(15.0)

    @pytest.mark.parametrize("name", sorted(STRATEGIES))
    def test_tuning_values_win_over_strategy_defaults(self, name: str) -> None:
        """Every strategy uses the operator's chunk/progress/heartbeat values when set."""
        tuning = Tuning(
            chunk_chars=77,
            chunk_interval_s=0.9,
            progress_interval_s=2.5,
            heartbeat_interval_s=7.0,
        )
        cadence = build_strategy(name, tuning).cadence
        assert cadence.chunk_chars == 77
        assert cadence.chunk_interval_s == pytest.approx(0.9)
        assert cadence.progress_interval_s == pytest.approx(2.5)
        assert cadence.heartbeat_interval_s == pytest.approx(7.0)

    @pytest.mark.parametrize("name", ["padding", "combined"])
    def test_padding_strategies_default_to_2048_bytes(self, name: str) -> None:
        """padding and combined add 2048 bytes by default (FLUSHLINE_PADDING_BYTES)."""
        shaper = build_strategy(name).shaper()
        assert len(shaper.write(b"", 0.0)) == 2048

    @pytest.mark.parametrize("name", ["padding", "combined"])
    def test_padding_bytes_tuning_applies(self, name: str) -> None:
        """padding_bytes from the tuning sets the padding size."""
        shaper = build_strategy(name, Tuning(padding_bytes=300)).shaper()
        assert len(shaper.write(b"", 0.0)) == 300

    def test_aligned_cadence_depends_on_whether_the_path_buffers(self) -> None:
        """aligned sends fuller chunks (1000 / 2.5 s) on a buffering path, 100 / 0.3 s if not."""
        buffering = build_strategy("aligned").cadence
        direct = build_strategy("aligned", Tuning(proxy_buffer_bytes=0)).cadence
        assert buffering.chunk_chars == 1000
        assert buffering.chunk_interval_s == pytest.approx(2.5)
        assert direct.chunk_chars == 100
        assert direct.chunk_interval_s == pytest.approx(0.3)
        assert buffering.progress_with_chunks
        assert direct.progress_with_chunks

    def test_aligned_tuning_sets_block_and_delay(self) -> None:
        """proxy_buffer_bytes and max_delay_ms configure the aligned strategy."""
        strategy = build_strategy("aligned", Tuning(proxy_buffer_bytes=8192, max_delay_ms=250))
        assert isinstance(strategy, AlignedStrategy)
        assert strategy.block_bytes == 8192
        assert strategy.max_delay_s == pytest.approx(0.25)

    @pytest.mark.parametrize("name", ["none", "frequency"])
    def test_unpadded_strategies_pass_bytes_through(self, name: str) -> None:
        """none and frequency write exactly the frames, with nothing due later."""
        shaper = build_strategy(name).shaper()
        assert shaper.start(PREFIX, 0.0) == PREFIX
        assert shaper.write(frame(1), 1.0) == frame(1)
        assert shaper.deadline() is None
        assert shaper.poll(99.0) == b""


# --- PaddedShaper ------------------------------------------------------------------


class TestPaddedShaper:
    @pytest.mark.parametrize("size", [2, 3, 100, 2048, 4096, 10_000])
    def test_start_and_every_write_get_exactly_padding_bytes(self, size: int) -> None:
        """Stream start and each write are followed by exactly padding_bytes of comment."""
        shaper = build_strategy("padding", Tuning(padding_bytes=size)).shaper()
        assert isinstance(shaper, PaddedShaper)
        started = shaper.start(PREFIX, 0.0)
        assert started.startswith(PREFIX)
        assert len(started) == len(PREFIX) + size
        stream = started
        for i in range(1, 4):
            frames = frame(i, 10 * i)
            out = shaper.write(frames, float(i))
            assert out.startswith(frames)
            assert len(out) == len(frames) + size
            stream += out
        assert shaper.deadline() is None
        assert shaper.poll(10.0) == b""
        assert data_of(stream) == [
            m.data for m in parse(frame(1, 10) + frame(2, 20) + frame(3, 30))
        ]

    def test_padding_is_comment_only(self) -> None:
        """The added padding parses as comment lines, never data."""
        shaper = build_strategy("combined").shaper()
        padding = shaper.write(b"", 0.0)
        [message] = parse(padding + b"\n")
        assert message.data is None
        assert message.comments

    def test_padding_of_1_is_raised_to_2(self) -> None:
        """padding_bytes=1 cannot be a comment line, so 2 bytes are used."""
        shaper = build_strategy("padding", Tuning(padding_bytes=1)).shaper()
        assert len(shaper.write(b"", 0.0)) == 2

    def test_padding_of_0_adds_nothing(self) -> None:
        """padding_bytes=0 turns padding into a pass-through."""
        shaper = build_strategy("padding", Tuning(padding_bytes=0)).shaper()
        assert isinstance(shaper, PassThroughShaper)
        assert shaper.start(PREFIX, 0.0) == PREFIX
        assert shaper.write(frame(1), 0.0) == frame(1)


# --- AlignedShaper -----------------------------------------------------------------


class TestAlignedShaper:
    def test_start_is_aligned_and_begins_with_prefix(self) -> None:
        """start() returns the prefix first, padded so the byte count is a block multiple."""
        shaper = AlignedShaper(block_bytes=4096, max_delay_s=0.1)
        out = shaper.start(PREFIX, 0.0)
        assert out.startswith(PREFIX)
        assert len(out) % 4096 == 0
        assert shaper.deadline() is None
        messages = parse(out + b"\n")  # retry block, then the padding (a comment block)
        assert [m.data for m in messages] == [None, None]
        assert messages[0].retry_ms == 3000
        assert messages[1].comments

    def test_write_after_the_budget_is_flushed_at_once(self) -> None:
        """A write a full budget after the last flush is padded to a boundary now."""
        shaper = AlignedShaper(block_bytes=1024, max_delay_s=0.1)
        total = len(shaper.start(PREFIX, 0.0))
        out = shaper.write(frame(1, 50), 0.5)
        total += len(out)
        assert out.startswith(frame(1, 50))
        assert total % 1024 == 0
        assert shaper.deadline() is None

    def test_write_within_budget_is_held_to_the_deadline(self) -> None:
        """A write soon after a flush is held; poll() at the deadline sends it, padded."""
        delay = 0.1
        shaper = AlignedShaper(block_bytes=1024, max_delay_s=delay)
        total = len(shaper.start(PREFIX, 10.0))
        first = shaper.write(frame(1, 30), 10.5)  # a budget later: flushed, last flush 10.5
        total += len(first)
        assert total % 1024 == 0

        assert shaper.write(frame(2, 30), 10.52) == b""  # held, not sent unpadded
        due = shaper.deadline()
        assert due is not None
        assert due == pytest.approx(10.5 + delay * DEADLINE_SHARE)
        assert 10.52 < due <= 10.5 + delay  # inside the latency budget
        assert shaper.write(frame(3, 30), 10.53) == b""  # still before the deadline
        assert shaper.deadline() == due  # the deadline does not move

        assert shaper.poll(due - 0.005) == b""  # too early
        out = shaper.poll(due)
        total += len(out)
        assert out.startswith(frame(2, 30) + frame(3, 30))  # both, in order, in one write
        assert total % 1024 == 0
        assert shaper.deadline() is None
        messages = parse(out + b"\n")
        assert [m.data is not None for m in messages] == [True, True, False]

    def test_write_after_the_deadline_goes_out_with_what_was_held(self) -> None:
        """A write arriving once the held flush is due goes out with it, in one padded write."""
        shaper = AlignedShaper(block_bytes=1024, max_delay_s=0.1)
        total = len(shaper.start(PREFIX, 0.0))
        assert shaper.write(frame(1, 30), 0.01) == b""
        out = shaper.write(frame(2, 30), 0.2)
        total += len(out)
        assert out.startswith(frame(1, 30) + frame(2, 30))
        assert total % 1024 == 0
        assert shaper.deadline() is None

    def test_poll_at_infinity_sends_everything_held(self) -> None:
        """poll(math.inf), before the response ends, sends what is held, whatever the time."""
        shaper = AlignedShaper(block_bytes=1024, max_delay_s=0.1)
        total = len(shaper.start(PREFIX, 0.0))
        assert shaper.write(frame(1, 30), 0.01) == b""
        out = shaper.poll(math.inf)
        total += len(out)
        assert out.startswith(frame(1, 30))
        assert total % 1024 == 0
        assert shaper.poll(math.inf) == b""  # nothing more

    def test_gap_of_one_byte_pads_to_the_next_boundary(self) -> None:
        """With 1 byte to the boundary (too small for a comment), padding reaches the next one."""
        block = 64
        shaper = AlignedShaper(block_bytes=block, max_delay_s=0.1, min_tail_bytes=2)
        out = shaper.start(b"r" * (block - 1), 0.0)
        assert len(out) == 2 * block
        assert out.endswith(b"\n")
        [message] = parse(b"retry: 1\n" + out[block - 1 :] + b"\n")
        assert message.data is None

    @pytest.mark.parametrize("gap", [2, 3, 63])
    def test_gaps_of_at_least_the_tail_pad_exactly_to_the_boundary(self, gap: int) -> None:
        """A gap of 2 bytes or more (the minimum tail here) is filled exactly."""
        shaper = AlignedShaper(block_bytes=64, max_delay_s=0.1, min_tail_bytes=2)
        assert len(shaper.start(b"r" * (64 - gap), 0.0)) == 64

    @pytest.mark.parametrize("gap", [1, 2, 100, 511, 512, 513, 4095])
    def test_every_flush_ends_with_at_least_the_minimum_tail(self, gap: int) -> None:
        """The default shaper pads at least min_tail_bytes, still landing on a boundary."""
        block = 4096
        shaper = AlignedShaper(block_bytes=block, max_delay_s=0.1)
        out = shaper.start(b"r" * (block - gap), 0.0)
        padding = len(out) - (block - gap)
        assert padding >= shaper.min_tail_bytes
        assert padding < shaper.min_tail_bytes + block
        assert len(out) % block == 0

    def test_block_zero_adds_nothing(self) -> None:
        """proxy_buffer_bytes=0 (the path does not buffer) makes aligned a pass-through."""
        shaper = build_strategy("aligned", Tuning(proxy_buffer_bytes=0)).shaper()
        assert shaper.start(PREFIX, 0.0) == PREFIX
        for i, t in enumerate([0.01, 0.02, 0.5, 0.51, 3.0], start=1):
            assert shaper.write(frame(i, i * 7), t) == frame(i, i * 7)
            assert shaper.deadline() is None
            assert shaper.poll(t + 1.0) == b""

    def test_padding_rate_is_bounded_by_about_a_block_per_budget(self) -> None:
        """Under a fast event stream: one padded flush per budget at most, each event within it."""
        block, delay = 4096, 0.1
        shaper = AlignedShaper(block_bytes=block, max_delay_s=delay)
        duration = 2.0
        out_bytes = len(shaper.start(PREFIX, 0.0))
        payload = len(PREFIX)
        flushes = [0.0]  # when a write went out (every write is padded; the start is)
        written_at: list[float] = []
        t, events = 0.0, 0
        while t < duration:
            t = round(t + 0.001, 6)
            events += 1
            deadline = shaper.deadline()
            if deadline is not None and deadline <= t:
                out_bytes += len(shaper.poll(deadline))
                flushes.append(deadline)
            frames = frame(events, 40)
            payload += len(frames)
            out = shaper.write(frames, t)
            written_at.append(t)
            if out:
                out_bytes += len(out)
                flushes.append(t)
        deadline = shaper.deadline()
        if deadline is not None:
            out_bytes += len(shaper.poll(deadline))
            flushes.append(deadline)
            duration = max(duration, deadline)
        padding = out_bytes - payload
        # At most one flush per DEADLINE_SHARE of the budget (plus the start), each padding
        # less than a block plus the minimum tail.
        per_flush = block + shaper.min_tail_bytes
        assert padding <= per_flush * (duration / (delay * DEADLINE_SHARE) + 1)
        # ...yet every write is flushed (padded out) within the budget,
        for at in written_at:
            index = bisect.bisect_left(flushes, at)
            assert index < len(flushes), f"the write at {at} s is never flushed"
            assert flushes[index] - at <= delay, (at, flushes[index])
        # ...because padded flushes are never closer together than that share of the
        # budget, whereas a write arrives every millisecond,
        gaps = [b - a for a, b in itertools.pairwise(flushes)]
        assert min(gaps) >= delay * DEADLINE_SHARE - 1e-9, min(gaps)
        # ...and far below padding every event (2000 events x ~4 KB).
        assert padding < events * block / 10


# --- aligned property --------------------------------------------------------------

STEP = st.tuples(
    st.integers(min_value=0, max_value=3000),  # data size of the next frame
    st.floats(min_value=0.0, max_value=0.3, allow_nan=False),  # time until it is written
)


@settings(max_examples=200, deadline=None)
@given(
    block=st.sampled_from([2, 3, 64, 100, 1000, 4096, 8192]),
    delay=st.sampled_from([0.01, 0.05, 0.1, 0.25]),
    tail=st.sampled_from([2, 3, 100, 512]),
    prefix_size=st.integers(min_value=0, max_value=5000),
    steps=st.lists(STEP, min_size=1, max_size=40),
)
def test_property_aligned_flushes_land_on_block_boundaries(
    block: int, delay: float, tail: int, prefix_size: int, steps: list[tuple[int, float]]
) -> None:
    """For random frame sizes and times: every flush ends on a block multiple, within budget."""
    shaper = AlignedShaper(block_bytes=block, max_delay_s=delay, min_tail_bytes=tail)
    prefix = b"retry: 1\n\n" + b": " + b"p" * prefix_size + b"\n"
    stream = shaper.start(prefix, 0.0)
    assert stream.startswith(prefix)
    assert len(stream) % block == 0
    pads = [len(stream) - len(prefix)]
    sent: list[bytes] = []
    now = 0.0
    for i, (size, dt) in enumerate(steps, start=1):
        now += dt
        deadline = shaper.deadline()
        if deadline is not None and deadline <= now:
            # The stream would have woken at the deadline, before this write.
            held = b"".join(shaper.held)
            out = shaper.poll(deadline)
            assert out.startswith(held)
            stream += out
            pads.append(len(out) - len(held))
            assert len(stream) % block == 0
            assert shaper.deadline() is None
        frames = frame(i, size)
        sent.append(frames)
        held_before = b"".join(shaper.held)
        out = shaper.write(frames, now)
        stream += out
        if out:  # the frames held, then these, then padding to a boundary
            assert out.startswith(held_before + frames)
            assert len(stream) % block == 0
            pads.append(len(out) - len(held_before) - len(frames))
        deadline = shaper.deadline()
        if deadline is None:
            assert len(stream) % block == 0  # nothing left unaligned
            assert not shaper.held
        else:
            assert now < deadline <= now + delay + 1e-9  # sent within the budget
    deadline = shaper.deadline()
    if deadline is not None:
        assert shaper.poll(deadline - delay / 20) == b""
        held = b"".join(shaper.held)
        out = shaper.poll(deadline)
        stream += out
        pads.append(len(out) - len(held))
        now = deadline
    assert len(stream) % block == 0
    # Padding is comment-only: the data seen by a client is exactly the frames sent.
    assert data_of(stream) == data_of(b"".join(sent))
    # Each flush pads at least the tail and less than a block more than that.
    assert all(tail <= pad < tail + block for pad in pads)
    # At most one flush per DEADLINE_SHARE of the budget, plus the one at start.
    assert len(pads) <= now / (delay * DEADLINE_SHARE) + 2
