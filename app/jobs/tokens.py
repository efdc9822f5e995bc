"""Token sources: where a step's generated text comes from.

A :class:`TokenSource` yields text pieces asynchronously (an LLM streaming API). A
:class:`SyncTokenSource` yields them from a blocking iterator (a blocking SDK);
:func:`threaded` drives one in a worker thread and hands its tokens to the event loop
thread-safely and in order. :class:`SimulatedTokenSource` is the built-in source: its
text is deterministic per seed and it paces itself to ``tokens_per_second``.

A source yields text pieces, each counted as one token, and may also yield a
:class:`TokenCount`: the authoritative number of tokens generated so far in this step
(an LLM provider's ``usage``, or a step reporting its own progress). The runner then uses
that count instead of its own. A step that knows how far it is may yield
:class:`ReportedProgress` (its percentage) and :class:`ReportedInsight` (a status line).

Pieces cross from a worker thread to the event loop through a :class:`Handoff`, which
bounds how far the thread may run ahead of the loop (:data:`MAX_PENDING_PIECES`).
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Protocol

import attrs

__all__ = [
    "END_OF_PIECES",
    "MAX_PENDING_PIECES",
    "Handoff",
    "Piece",
    "ReportedInsight",
    "ReportedProgress",
    "SimulatedTokenSource",
    "SyncTokenSource",
    "ThreadedTokenSource",
    "TokenCount",
    "TokenRequest",
    "TokenSource",
    "threaded",
]


@attrs.frozen
class TokenRequest:
    """What a step asks its source for.

    ``system`` is the system message and ``temperature`` the sampling temperature, for
    sources that take them (an LLM); others ignore both.
    """

    prompt: str
    max_tokens: int
    step: str = ""
    system: str = ""
    temperature: float | None = None


@attrs.frozen
class TokenCount:
    """The number of tokens generated so far in this step, as the source counts them.

    It replaces the runner's own count (one per text piece) from then on, until the next
    ``TokenCount``; progress is estimated from it.
    """

    tokens: int


@attrs.frozen
class ReportedProgress:
    """The step's own percentage (0-100): shown as it is, instead of the token estimate."""

    pct: float


@attrs.frozen
class ReportedInsight:
    """A status line the step reports (an ``insight`` event)."""

    text: str


#: What a source yields: a text piece (one token), the step's authoritative count, its
#: own percentage or a status line.
Piece = str | TokenCount | ReportedProgress | ReportedInsight


class TokenSource(Protocol):
    """An async stream of text pieces ("tokens"), optionally with :class:`TokenCount` s."""

    def stream(self, request: TokenRequest) -> AsyncIterator[Piece]:
        """Yield the generated text piece by piece."""
        ...


class SyncTokenSource(Protocol):
    """A blocking stream of tokens, e.g. a synchronous SDK's streaming call."""

    def stream_sync(self, request: TokenRequest) -> Iterator[Piece]:
        """Yield the generated text piece by piece, blocking between pieces."""
        ...


#: Tokens already due that the simulated source yields before letting the loop run once.
MAX_DUE_TOKENS_IN_A_ROW = 256
_WORDS = [
    "the",
    "candidate",
    "brings",
    "seven",
    "years",
    "of",
    "experience",
    "building",
    "reliable",
    "distributed",
    "systems",
    "with",
    "a",
    "focus",
    "on",
    "streaming",
    "data",
    "pipelines",
    "observability",
    "and",
    "developer",
    "tooling",
    "they",
    "led",
    "a",
    "team",
    "that",
    "migrated",
    "critical",
    "services",
    "to",
    "a",
    "new",
    "platform",
    "cutting",
    "latency",
    "by",
    "forty",
    "percent",
    "while",
    "improving",
    "availability",
    "their",
    "work",
    "spans",
    "python",
    "go",
    "and",
    "typescript",
    "with",
    "deep",
    "knowledge",
    "of",
    "networking",
    "protocols",
    "caching",
    "and",
    "event",
    "driven",
    "design",
    "recent",
    "projects",
    "include",
    "a",
    "realtime",
    "analytics",
    "dashboard",
    "a",
    "job",
    "scheduler",
    "serving",
    "millions",
    "of",
    "tasks",
    "a",
    "day",
    "and",
    "an",
    "internal",
    "platform",
    "for",
    "safe",
    "progressive",
    "delivery",
]


@attrs.frozen
class SimulatedTokenSource:
    """Deterministic pseudo-text paced to ``tokens_per_second``; same seed, same text."""

    seed: str | int = 0
    tokens_per_second: float = 80.0

    def _rng(self, request: TokenRequest) -> random.Random:
        return random.Random(f"{self.seed}:{request.step}:{request.prompt}")

    def tokens(self, request: TokenRequest) -> list[str]:
        """The whole text this source yields for ``request``, without waiting."""
        rng = self._rng(request)
        out: list[str] = []
        for i in range(request.max_tokens):
            word = rng.choice(_WORDS)
            if i and rng.random() < 0.08:
                word = word.capitalize()
                out[-1] = out[-1].rstrip() + ". "
            out.append(word + " ")
        return out

    async def stream(self, request: TokenRequest) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        interval_s = 1.0 / self.tokens_per_second
        start = loop.time()
        due_in_a_row = 0
        for i, token in enumerate(self.tokens(request)):
            # Pace against an absolute schedule so sleep overshoot does not accumulate;
            # tokens already due go out together, without a trip through the loop each
            # (a busy loop would otherwise slow the simulated source to its own pace),
            # yet never so many that a fast job holds the loop from everything else.
            delay = start + (i + 1) * interval_s - loop.time()
            if delay > 0:
                due_in_a_row = 0
                await asyncio.sleep(delay)
            elif due_in_a_row >= MAX_DUE_TOKENS_IN_A_ROW:
                due_in_a_row = 0
                await asyncio.sleep(0)
            else:
                due_in_a_row += 1
            yield token

    def stream_sync(self, request: TokenRequest) -> Iterator[str]:
        """The same tokens from a blocking iterator (``time.sleep`` pacing)."""
        import time

        interval_s = 1.0 / self.tokens_per_second
        start = time.monotonic()
        for i, token in enumerate(self.tokens(request)):
            delay = start + (i + 1) * interval_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            yield token


#: Put on a hand-off after a producer's last piece.
END_OF_PIECES = object()
#: Pieces a worker thread may hand over before the loop has taken them; then it waits.
MAX_PENDING_PIECES = 256


@attrs.define(eq=False)
class Handoff:
    """Hands pieces from a producer to one consumer on the event loop, in order, bounded.

    A worker thread's :meth:`put` waits while ``max_pending`` of its pieces are not yet
    taken by the consumer (backpressure instead of an unbounded queue), and returns
    False at once after :meth:`close` (the consumer is gone: the producer should stop).
    A put from the loop's own thread never waits (the consumer runs on that thread, so
    it could not make room); such a producer, an ``async`` step, hands over only what it
    makes between two of its own awaits.
    """

    loop: asyncio.AbstractEventLoop
    max_pending: int = MAX_PENDING_PIECES
    _queue: asyncio.Queue[tuple[object, bool]] = attrs.Factory(asyncio.Queue)
    _slots: threading.Semaphore = attrs.field(init=False)
    _closed: threading.Event = attrs.Factory(threading.Event)
    _loop_thread: int = attrs.Factory(threading.get_ident)

    def __attrs_post_init__(self) -> None:
        self._slots = threading.Semaphore(self.max_pending)

    @property
    def closed(self) -> bool:
        """Whether the consumer has stopped taking pieces."""
        return self._closed.is_set()

    def put(self, item: object) -> bool:
        """Hand over a piece, :data:`END_OF_PIECES` or an exception; False once closed."""
        if self._closed.is_set():
            return False
        if threading.get_ident() == self._loop_thread:
            self._queue.put_nowait((item, False))
            return True
        self._slots.acquire()
        if self._closed.is_set():
            return False
        try:
            self.loop.call_soon_threadsafe(self._queue.put_nowait, (item, True))
        except RuntimeError:  # the loop is closed: nobody will take it
            return False
        return True

    async def get(self) -> Piece | None:
        """The next piece; None after :data:`END_OF_PIECES`; a handed exception is raised."""
        item, counted = await self._queue.get()
        if counted:
            self._slots.release()
        if item is END_OF_PIECES:
            return None
        if isinstance(item, BaseException):
            raise item
        assert isinstance(item, str | TokenCount | ReportedProgress | ReportedInsight)
        return item

    def close(self) -> None:
        """Take no more pieces; producers waiting in :meth:`put` return False now."""
        if not self._closed.is_set():
            self._closed.set()
            self._slots.release(self.max_pending)


@attrs.frozen
class ThreadedTokenSource:
    """Adapts a :class:`SyncTokenSource` to :class:`TokenSource` with a worker thread.

    The thread hands each token to the loop through a :class:`Handoff` (in order, and
    at most :data:`MAX_PENDING_PIECES` ahead of the consumer); when the consumer stops
    early (cancel, error), the thread is told to stop and ends after its current token.
    """

    source: SyncTokenSource

    async def stream(self, request: TokenRequest) -> AsyncIterator[Piece]:
        handoff = Handoff(asyncio.get_running_loop())

        def work() -> None:
            try:
                for token in self.source.stream_sync(request):
                    if not handoff.put(token):
                        return
                handoff.put(END_OF_PIECES)
            except BaseException as exc:  # handed to the loop, re-raised there
                handoff.put(exc)

        thread = threading.Thread(target=work, name=f"tokens-{request.step}", daemon=True)
        thread.start()
        try:
            while (item := await handoff.get()) is not None:
                yield item
        finally:
            handoff.close()


def threaded(source: SyncTokenSource) -> ThreadedTokenSource:
    """Drive a blocking token source in a worker thread."""
    return ThreadedTokenSource(source)
