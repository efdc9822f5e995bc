"""What a running step reports through, and how a blocking step runs.

:class:`Reporter` is a :class:`~app.jobs.steps.FunctionStep`'s ``context.report``: text,
token counts, its own percentage and status lines, handed to the event loop through a
bounded :class:`~app.jobs.tokens.Handoff`. :func:`run_in_own_thread` runs a blocking step
in a thread of its own, so a step that ignores its cancel never holds one of the loop's
default-executor threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections.abc import Callable
from typing import TypeVar

import attrs

from app.jobs.tokens import Piece, ReportedInsight, ReportedProgress, TokenCount

__all__ = ["Reporter", "StepCancelled", "run_in_own_thread"]

T = TypeVar("T")
R = TypeVar("R")


class StepCancelled(Exception):
    """Raised by a :class:`Reporter` once its step is cancelled, to stop a blocking step."""


@attrs.define(eq=False)
class Reporter:
    """How a :class:`FunctionStep` streams its output and progress. Thread-safe.

    - ``write(text, tokens=0)`` adds text to the step's output; it counts tokens only
      when told how many (``tokens``);
    - ``advance(tokens)`` counts work done without text; with tokens, the step's
      percentage is the count against its ``expected_tokens``;
    - ``progress(pct)`` reports the step's percentage (0-100) itself: shown as it is,
      from then on, instead of the token estimate;
    - ``insight(text)`` sends a status line.

    Once the step is cancelled (the job was, or it failed) every call raises
    :class:`StepCancelled`, so a blocking step stops at its next report, even one
    waiting because it ran too far ahead of the stream. A step that never reports
    cannot be interrupted: Python cannot stop a thread from outside. It runs to its end
    in its own thread (never one of the event loop's default executor), its output
    dropped.
    """

    _send: Callable[[Piece], bool]
    _tokens: int = 0
    _lock: threading.Lock = attrs.Factory(threading.Lock)
    _cancelled: threading.Event = attrs.Factory(threading.Event)

    @property
    def tokens(self) -> int:
        """Tokens reported so far."""
        return self._tokens

    @property
    def cancelled(self) -> bool:
        """Whether the step has been cancelled (the job was, or it failed)."""
        return self._cancelled.is_set()

    def write(self, text: str, tokens: int = 0) -> None:
        """Append ``text`` to the step's output, counting ``tokens`` more tokens."""
        with self._lock:
            self._check()
            self._tokens += tokens
            if text:
                self._put(text)
            # Sent even for 0: a text piece alone would count as one token.
            self._put(TokenCount(self._tokens))

    def advance(self, tokens: int = 1) -> None:
        """Count ``tokens`` more tokens of work done (no text)."""
        with self._lock:
            self._check()
            self._tokens += tokens
            self._put(TokenCount(self._tokens))

    def progress(self, pct: float) -> None:
        """Report the step's percentage, from 0 to 100 (a lower one than before is ignored)."""
        if not 0 <= pct <= 100:
            raise ValueError(f"progress must be from 0 to 100, got {pct!r}")
        with self._lock:
            self._check()
            self._put(ReportedProgress(float(pct)))

    def insight(self, text: str) -> None:
        """Send a status line (an ``insight`` event of this step)."""
        with self._lock:
            self._check()
            self._put(ReportedInsight(str(text)))

    def _put(self, piece: Piece) -> None:
        if not self._send(piece):
            self._cancelled.set()
            self._check()

    def _check(self) -> None:
        if self._cancelled.is_set():
            raise StepCancelled("the step was cancelled")

    def cancel(self) -> None:
        """Make every later report raise :class:`StepCancelled`."""
        self._cancelled.set()


async def run_in_own_thread(func: Callable[[T], R], arg: T, name: str) -> R:
    """``func(arg)`` in a new daemon thread called ``name``, not the loop's default executor.

    A cancelled caller stops waiting at once; the thread stops at its step's next report
    (:class:`StepCancelled`) or runs to its end, without holding an executor thread
    that other work (DNS lookups, ``to_thread``) needs.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[R] = loop.create_future()

    def succeed(result: R) -> None:
        if not future.done():  # done: the caller was cancelled
            future.set_result(result)

    def fail(error: BaseException) -> None:
        if not future.done():
            future.set_exception(error)

    def work() -> None:
        # The loop may be closed by the end: nobody waits for this step any more.
        with contextlib.suppress(RuntimeError):
            try:
                result = func(arg)
            except BaseException as exc:
                loop.call_soon_threadsafe(fail, exc)
            else:
                loop.call_soon_threadsafe(succeed, result)

    run = contextvars.copy_context().run
    threading.Thread(target=run, args=(work,), name=name, daemon=True).start()
    return await future
