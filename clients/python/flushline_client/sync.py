"""Publish from blocking code: :class:`SyncPublisher`, callable from any thread.

::

    job = create_external_job_sync(base_url, ["research", "write"], token=api_token)
    with SyncPublisher(base_url, job.id, job.publish_token) as pub:
        for step in ("research", "write"):
            pub.step_started(step)
            for text in run_agent(step):
                if pub.cancelled:
                    break
                pub.tokens(step, 1, text)
            pub.step_completed(step)
        pub.succeeded({"answer": "..."})

It is the async :class:`~flushline_client.publisher.Publisher` running on an event loop of
its own in a private daemon thread: each call hands its event to that loop and returns once
it is queued, so the batching, retries, heartbeats and cancel are the async publisher's,
whichever thread calls. A worker thread, a thread pool, a Celery task or a plain script
can all share one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

from flushline_client.errors import PublisherClosed
from flushline_client.jobs import ExternalJob, StepSpec, create_external_job
from flushline_client.publisher import Publisher, PublisherStats

__all__ = ["SyncPublisher", "create_external_job_sync"]

T = TypeVar("T")


def create_external_job_sync(
    base_url: str,
    steps: Sequence[StepSpec],
    *,
    token: str | None = None,
    strategy: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> ExternalJob:
    """:func:`~flushline_client.jobs.create_external_job` for blocking code (not inside a
    running event loop)."""
    return asyncio.run(
        create_external_job(base_url, steps, token=token, strategy=strategy, headers=headers)
    )


class SyncPublisher:
    """The blocking, thread-safe face of :class:`~flushline_client.publisher.Publisher`.

    Takes the same arguments (but ``session``); ``on_cancel`` is called from the publisher's
    own thread the moment it hears of a cancel (to abort blocking work: close a socket, set
    an event), beside the :attr:`cancelled` flag. It starts at construction; :meth:`close`
    (or leaving its ``with`` block) delivers what is queued and stops its thread. Leaving the
    ``with`` block by an exception publishes ``failed`` with its text, as the async one does.
    """

    def __init__(
        self,
        base_url: str,
        job_id: str,
        publish_token: str,
        *,
        on_cancel: Callable[[], None] | None = None,
        **options: Any,
    ) -> None:
        self._cancel_seen = threading.Event()
        self._on_cancel = on_cancel
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"flushline-publisher-{job_id}", daemon=True
        )
        self._thread.start()
        self._closed = False
        self._closing = threading.Lock()

        async def start() -> Publisher:
            publisher = Publisher(
                base_url, job_id, publish_token, on_cancel=self._cancelled_now, **options
            )
            await publisher.start()
            return publisher

        try:
            self._publisher = self._run(start)
        except BaseException:
            self._stop_thread()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._close_once():
            return
        try:
            self._run(lambda: self._publisher.__aexit__(exc_type, exc, traceback))
        finally:
            self._stop_thread()

    # ---------------------------------------------------------------- state

    @property
    def job_id(self) -> str:
        """The job this publisher publishes to."""
        return self._publisher.job_id

    @property
    def cancelled(self) -> bool:
        """Whether the service has answered that the job was cancelled (poll it)."""
        return self._cancel_seen.is_set()

    def wait_cancelled(self, timeout_s: float | None = None) -> bool:
        """Block until the job is known to be cancelled (True) or ``timeout_s`` passes."""
        return self._cancel_seen.wait(timeout_s)

    @property
    def error(self) -> BaseException | None:
        """What stopped the publisher, if anything."""
        return self._publisher.error

    @property
    def stats(self) -> PublisherStats:
        """What the publisher has done so far."""
        return self._publisher.stats

    # ---------------------------------------------------------------- producer events

    def step_started(self, step: str) -> None:
        """The step ``step`` began."""
        self._run(lambda: self._publisher.step_started(step))

    def tokens(self, step: str, count: int, text: str | None = None) -> None:
        """``count`` more tokens of ``step``, with their text (optional)."""
        self._run(lambda: self._publisher.tokens(step, count, text))

    def progress(self, step: str, pct: float) -> None:
        """``step`` is ``pct`` percent done."""
        self._run(lambda: self._publisher.progress(step, pct))

    def insight(self, text: str) -> None:
        """A short human status line."""
        self._run(lambda: self._publisher.insight(text))

    def step_completed(self, step: str) -> None:
        """The step ``step`` ended."""
        self._run(lambda: self._publisher.step_completed(step))

    def heartbeat(self) -> None:
        """Tell the service the producer is alive."""
        self._run(self._publisher.heartbeat)

    def succeeded(self, result: Mapping[str, Any] | None = None) -> None:
        """End the job ``succeeded``; returns once the service has it."""
        self._run(lambda: self._publisher.succeeded(result))

    def failed(self, error: str | BaseException) -> None:
        """End the job ``failed``; returns once the service has it."""
        self._run(lambda: self._publisher.failed(error))

    def flush(self) -> None:
        """Return once everything queued so far is delivered."""
        self._run(self._publisher.flush)

    def close(self) -> None:
        """Deliver what is queued, then stop the publisher and its thread (idempotent)."""
        if self._close_once():
            return
        try:
            self._run(self._publisher.close)
        finally:
            self._stop_thread()

    # ---------------------------------------------------------------- internals

    def _run(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run the coroutine ``make()`` on the publisher's loop; block for its result."""
        if threading.get_ident() == self._thread.ident:
            raise RuntimeError("a SyncPublisher cannot be called from its own event loop")
        if not self._thread.is_alive():
            raise PublisherClosed(f"the publisher of job {self._publisher.job_id} is closed")

        async def call() -> T:
            return await make()

        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(call(), self._loop)
        return future.result()

    def _cancelled_now(self) -> None:
        """The publisher's thread heard of the cancel: raise the flag, tell the caller's hook."""
        self._cancel_seen.set()
        if self._on_cancel is not None:
            self._on_cancel()

    def _close_once(self) -> bool:
        """Whether the publisher was already closed (else mark it closed now)."""
        with self._closing:
            closed, self._closed = self._closed, True
            return closed

    def _stop_thread(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
