"""Tests for token sources (app/jobs/tokens.py): the simulated source and the thread adapter."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncGenerator, Iterator

import attrs
import pytest

from app.jobs.progress import ProgressEstimator
from app.jobs.tokens import (
    MAX_DUE_TOKENS_IN_A_ROW,
    Piece,
    SimulatedTokenSource,
    ThreadedTokenSource,
    TokenCount,
    TokenRequest,
    threaded,
)

FAST = 20_000.0  # tokens per second: pacing negligible


async def collect(
    source: SimulatedTokenSource | ThreadedTokenSource, request: TokenRequest
) -> list[str]:
    return [token async for token in source.stream(request)]


def request(max_tokens: int = 40, step: str = "summary", prompt: str = "p") -> TokenRequest:
    return TokenRequest(prompt=prompt, max_tokens=max_tokens, step=step)


async def wait_for_thread_end(thread: threading.Thread, timeout_s: float) -> bool:
    """Join ``thread`` without blocking the loop; True if it ended within ``timeout_s``."""
    await asyncio.to_thread(thread.join, timeout_s)
    return not thread.is_alive()


# --- SimulatedTokenSource ----------------------------------------------------------


class TestSimulatedTokenSource:
    async def test_same_seed_gives_same_text(self) -> None:
        """Two sources with one seed stream identical tokens for the same request."""
        a = await collect(SimulatedTokenSource(seed=7, tokens_per_second=FAST), request())
        b = await collect(SimulatedTokenSource(seed=7, tokens_per_second=FAST), request())
        assert a == b

    async def test_different_seed_gives_different_text(self) -> None:
        """Another seed changes the generated text."""
        a = await collect(SimulatedTokenSource(seed=1, tokens_per_second=FAST), request())
        b = await collect(SimulatedTokenSource(seed=2, tokens_per_second=FAST), request())
        assert "".join(a) != "".join(b)

    async def test_stream_matches_tokens_and_stream_sync(self) -> None:
        """stream(), stream_sync() and tokens() produce the same text for a request."""
        source = SimulatedTokenSource(seed="abc", tokens_per_second=FAST)
        streamed = await collect(source, request(30))
        assert streamed == source.tokens(request(30))
        assert list(source.stream_sync(request(30))) == streamed

    @pytest.mark.parametrize("max_tokens", [0, 1, 17, 200])
    async def test_yields_exactly_max_tokens(self, max_tokens: int) -> None:
        """The source yields max_tokens non-empty text pieces."""
        source = SimulatedTokenSource(seed=3, tokens_per_second=FAST)
        tokens = await collect(source, request(max_tokens))
        assert len(tokens) == max_tokens
        assert all(isinstance(t, str) and t.strip() for t in tokens)

    async def test_paces_itself_to_tokens_per_second(self) -> None:
        """40 tokens at 200 tokens/s take about 0.2 s (generous bounds)."""
        source = SimulatedTokenSource(seed=0, tokens_per_second=200.0)
        started = time.monotonic()
        tokens = await collect(source, request(40))
        elapsed = time.monotonic() - started
        assert len(tokens) == 40
        assert 0.15 <= elapsed < 1.0

    def test_stream_sync_paces_itself(self) -> None:
        """The blocking variant is paced too: 30 tokens at 200 tokens/s take ~0.15 s."""
        source = SimulatedTokenSource(seed=0, tokens_per_second=200.0)
        started = time.monotonic()
        assert len(list(source.stream_sync(request(30)))) == 30
        assert 0.1 <= time.monotonic() - started < 1.0

    async def test_late_tokens_come_in_bursts_between_loop_turns(self) -> None:
        """Tokens already due skip the loop, but at most MAX_DUE_TOKENS_IN_A_ROW at a time."""
        turns = 0
        stop = asyncio.Event()

        async def count_turns() -> None:
            nonlocal turns
            while not stop.is_set():
                turns += 1
                await asyncio.sleep(0)

        source = SimulatedTokenSource(tokens_per_second=1e9)  # every token is due at once
        ticker = asyncio.create_task(count_turns())
        await asyncio.sleep(0)
        tokens = 10 * MAX_DUE_TOKENS_IN_A_ROW
        turns_before = turns
        got = 0
        async for _ in source.stream(request(tokens)):
            got += 1
        stop.set()
        await ticker
        assert got == tokens
        # One loop turn per burst: far fewer than one per token, yet never none.
        assert 5 <= turns - turns_before <= tokens // 10, turns - turns_before


# --- ThreadedTokenSource -----------------------------------------------------------


@attrs.define
class BlockingSource:
    """A blocking iterator that records the thread it ran in."""

    tokens: list[str]
    delay_s: float = 0.0
    fail_after: int | None = None
    forever: bool = False
    threads: list[threading.Thread] = attrs.Factory(list)
    finished: threading.Event = attrs.Factory(threading.Event)

    def stream_sync(self, request: TokenRequest) -> Iterator[str]:
        self.threads.append(threading.current_thread())
        try:
            i = 0
            while self.forever or i < len(self.tokens):
                if self.fail_after is not None and i == self.fail_after:
                    raise ValueError(f"sdk failed after {i} tokens")
                if self.delay_s:
                    time.sleep(self.delay_s)  # a blocking SDK call
                yield self.tokens[i % len(self.tokens)]
                i += 1
        finally:
            self.finished.set()


class TestThreadedTokenSource:
    async def test_blocking_iterator_runs_in_another_thread(self) -> None:
        """The blocking iterator runs in a worker thread, not the event loop's thread."""
        blocking = BlockingSource(["a", "b", "c"])
        tokens = await collect(threaded(blocking), request())
        assert tokens == ["a", "b", "c"]
        assert len(blocking.threads) == 1
        assert blocking.threads[0] is not threading.current_thread()
        assert blocking.threads[0].ident != threading.get_ident()

    async def test_loop_stays_responsive_while_iterator_blocks(self) -> None:
        """A slow blocking iterator does not stall other coroutines on the loop."""
        blocking = BlockingSource(["x"] * 10, delay_s=0.02)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        tick_task = asyncio.create_task(ticker())
        try:
            assert await collect(threaded(blocking), request()) == ["x"] * 10
        finally:
            tick_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await tick_task
        assert ticks >= 5  # ~0.2 s of blocking work; the loop ticked throughout

    async def test_tokens_arrive_in_order(self) -> None:
        """Thousands of tokens handed over from the thread keep their order."""
        expected = [f"t{i} " for i in range(3000)]
        assert await collect(threaded(BlockingSource(expected)), request()) == expected

    async def test_exception_in_blocking_iterator_propagates(self) -> None:
        """An exception raised by the blocking iterator reaches the consumer after the tokens."""
        blocking = BlockingSource(["a", "b", "c", "d"], fail_after=2)
        got: list[str] = []

        async def consume() -> None:
            async for token in threaded(blocking).stream(request()):
                got.append(token)

        with pytest.raises(ValueError, match="sdk failed after 2 tokens"):
            await consume()
        assert got == ["a", "b"]
        assert await wait_for_thread_end(blocking.threads[0], 1.0)

    async def test_consumer_stopping_early_stops_the_thread(self) -> None:
        """When the consumer closes the stream early, the worker thread ends promptly."""
        blocking = BlockingSource(["tok "], delay_s=0.005, forever=True)
        got: list[str] = []
        tokens = threaded(blocking).stream(request())
        assert isinstance(tokens, AsyncGenerator)  # so the consumer can aclose() it
        async with contextlib.aclosing(tokens) as stream:
            async for token in stream:
                got.append(token)
                if len(got) == 5:
                    break
        assert got == ["tok "] * 5
        assert await wait_for_thread_end(blocking.threads[0], 1.0)
        assert blocking.finished.is_set()  # the blocking iterator was closed too

    async def test_cancelled_consumer_stops_the_thread(self) -> None:
        """Cancelling the consuming task (job cancel) also ends the worker thread."""
        blocking = BlockingSource(["tok "], delay_s=0.005, forever=True)
        got: list[str] = []
        first = asyncio.Event()

        async def consume() -> None:
            async for token in threaded(blocking).stream(request()):
                got.append(token)
                first.set()

        task = asyncio.create_task(consume())
        async with asyncio.timeout(5):
            await first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await wait_for_thread_end(blocking.threads[0], 1.0)
        count = len(got)
        await asyncio.sleep(0.05)
        assert len(got) == count  # nothing delivered after cancellation

    async def test_threaded_wraps_a_simulated_source(self) -> None:
        """threaded() over the simulated source yields the simulated text."""
        source = SimulatedTokenSource(seed=5, tokens_per_second=FAST)
        assert await collect(threaded(source), request(25)) == source.tokens(request(25))


class TestTokenCount:
    async def test_threaded_source_passes_counts_through_in_order(self) -> None:
        """A blocking source's TokenCount items reach the consumer between its tokens."""

        @attrs.frozen
        class Counting:
            def stream_sync(self, request: TokenRequest) -> Iterator[Piece]:
                yield "a"
                yield TokenCount(3)
                yield "b"
                yield TokenCount(7)

        pieces = [piece async for piece in threaded(Counting()).stream(request())]
        assert pieces == ["a", TokenCount(3), "b", TokenCount(7)]

    def test_estimator_takes_the_sources_count_but_never_goes_back(self) -> None:
        """set_tokens replaces the count; a lower count lowers tokens, never the percentages."""
        estimator = ProgressEstimator([100])
        estimator.start_step(0, 0.0)
        estimator.add_tokens(10)
        estimator.set_tokens(40)
        assert estimator.tokens == 40
        assert estimator.estimate(1.0).pct == 40.0
        estimator.set_tokens(30)
        reading = estimator.estimate(2.0)
        assert reading.tokens == 30
        assert reading.pct == 40.0
        assert reading.overall_pct == 40.0
