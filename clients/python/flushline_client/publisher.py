"""Publish the progress of a job that runs in your own process: the async :class:`Publisher`.

::

    job = await create_external_job(base_url, ["research", "write"], token=api_token)
    async with Publisher(base_url, job.id, job.publish_token) as pub:
        await pub.step_started("research")
        await pub.tokens("research", 120, "Found three sources...")
        await pub.step_completed("research")
        ...
        await pub.succeeded({"answer": "..."})

Each call queues one producer event and returns at once (it waits only when
``max_pending_events`` are already queued). A single sender task posts the queue in batches
to ``POST /api/jobs/{id}/events``: a batch gathers what arrives within ``batch_window_s`` of
its first event (or up to ``max_batch_events``), and carries ``producer_seq``, 1 for the
first batch and one more for each next one. A batch whose answer does not arrive (a
dropped connection, a timeout, a 5xx, a 429) is posted again with the same
``producer_seq`` and the same bytes, so the service publishes it once whatever happened to
the earlier answers; a ``"duplicate": true`` answer is a success.

When the job is cancelled (from the API or the page), the next publish is answered ``409
job_finished``: :attr:`Publisher.cancelled` turns true and the next call raises
:class:`JobCancelled`. While nothing is queued the sender posts a heartbeat every
``heartbeat_interval_s``, which keeps the job from ending ``producer_lost`` and notices a
cancel within that time even when the worker reports nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Self

import aiohttp

from flushline_client._http import error_from
from flushline_client.errors import (
    ClientError,
    JobCancelled,
    JobFinished,
    PublisherClosed,
    PublishFailed,
)

__all__ = ["PublishAck", "Publisher", "PublisherStats"]

log = logging.getLogger(__name__)

#: At most this much of an exception's text goes into the ``failed`` event.
MAX_ERROR_CHARS = 2000
#: Answers worth posting the same batch again for (beside a lost connection or a timeout).
_RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclasses.dataclass(frozen=True)
class PublishAck:
    """The service's answer to one batch."""

    accepted: int
    producer_seq: int
    duplicate: bool
    last_event_id: int


@dataclasses.dataclass
class PublisherStats:
    """What a publisher has done so far (for logs and tests)."""

    #: Batches the service acknowledged (each ``producer_seq`` once).
    batches: int = 0
    #: Events in them (heartbeats the publisher added while idle included).
    events: int = 0
    #: Posts made again after a lost answer, a timeout, a 5xx or a 429.
    retries: int = 0
    #: Acknowledgements that said ``"duplicate": true`` (an earlier post had landed).
    duplicates: int = 0
    #: Heartbeats the publisher sent on its own while idle.
    idle_heartbeats: int = 0


class Publisher:
    """Publishes one external job's producer events, in order, exactly once.

    ``base_url``: the Flushline service; ``job_id`` and ``publish_token``: from the
    ``201`` of the job's creation (:func:`create_external_job`). Use it as an ``async
    with`` block: leaving the block by an exception publishes ``failed`` with the error's
    text (unless the job had already ended); leaving it normally without
    :meth:`succeeded` or :meth:`failed` publishes ``failed`` too, saying so, rather than
    leaving the job's watchers waiting for the producer timeout.

    ``first_producer_seq``: where a producer that takes over from an earlier one starts
    (the number after the last batch the service acknowledged). Two publishers must never
    publish to one job at once: the service would take the second one's batches for
    retries of the first's.
    """

    def __init__(
        self,
        base_url: str,
        job_id: str,
        publish_token: str,
        *,
        session: aiohttp.ClientSession | None = None,
        batch_window_s: float = 0.05,
        max_batch_events: int = 500,
        max_batch_bytes: int = 512 * 1024,
        max_pending_events: int = 10_000,
        heartbeat_interval_s: float = 5.0,
        request_timeout_s: float = 10.0,
        first_backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
        give_up_after_s: float | None = 120.0,
        first_producer_seq: int = 1,
        on_cancel: Callable[[], None] | None = None,
    ) -> None:
        if batch_window_s < 0 or heartbeat_interval_s <= 0 or request_timeout_s <= 0:
            raise ValueError("batch_window_s >= 0, heartbeat_interval_s and request_timeout_s > 0")
        if max_batch_events < 1 or max_pending_events < max_batch_events:
            raise ValueError("1 <= max_batch_events <= max_pending_events")
        if first_producer_seq < 1:
            raise ValueError("first_producer_seq starts at 1")
        self.job_id = job_id
        self.url = f"{base_url.rstrip('/')}/api/jobs/{job_id}/events"
        self._headers = {
            "Authorization": f"Bearer {publish_token}",
            "Content-Type": "application/json",
        }
        self._session = session
        self._own_session: aiohttp.ClientSession | None = None
        self._batch_window_s = batch_window_s
        self._max_batch_events = max_batch_events
        self._max_batch_bytes = max_batch_bytes
        self._max_pending_events = max_pending_events
        self._heartbeat_interval_s = heartbeat_interval_s
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        self._first_backoff_s = first_backoff_s
        self._max_backoff_s = max_backoff_s
        self._give_up_after_s = give_up_after_s
        self._on_cancel = on_cancel
        #: The ``producer_seq`` of the next batch.
        self.next_producer_seq = first_producer_seq
        #: The service's ``last_event_id`` after the last acknowledged batch.
        self.last_event_id = 0
        self.stats = PublisherStats()
        # Queued events, each with its encoded size, and the counts that flush() waits on.
        self._pending: list[tuple[bytes, int, bool]] = []  # (JSON, its size, the caller's?)
        self._inflight_own = 0  # the caller's events in the batch being posted
        self._queued = 0
        self._delivered = 0
        self._urgent = False  # post what is queued without waiting for the window
        self._oldest_at = 0.0  # when the oldest queued event was queued (monotonic)
        self._wakeup = asyncio.Event()
        self._changed = asyncio.Condition()
        self._sender: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self._error_raised = False  # the caller has had the error from a call already
        self._lost = 0  # the caller's events that the error kept from being delivered
        self._ended = False  # succeeded() or failed() queued: nothing may follow
        self._closed = False
        self._cancelled = asyncio.Event()

    # ---------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is None:
            if not (self._ended or self._closed) and self._error is None:
                await self.failed("the producer left without succeeded() or failed()")
            await self.close()
            return
        if (
            not (self._ended or self._closed)
            and self._error is None
            and not isinstance(exc, JobFinished | PublisherClosed)
        ):
            with contextlib.suppress(ClientError, PublisherClosed, PublishFailed):
                await self.failed(exc)
        with contextlib.suppress(ClientError, PublisherClosed, PublishFailed):
            await self.close()

    async def start(self) -> None:
        """Start the sender (``async with`` does it)."""
        if self._sender is not None:
            return
        if self._session is None:
            self._own_session = aiohttp.ClientSession()
            self._session = self._own_session
        self._sender = asyncio.create_task(self._run(), name=f"flushline-publisher-{self.job_id}")

    async def close(self) -> None:
        """Deliver what is queued, stop the sender and close the publisher's own session.

        Raises the error that kept the caller's events from being delivered, unless a call
        has raised it already (the job's end stays in :attr:`error` and :attr:`cancelled`).
        """
        if self._closed:
            return
        self._closed = True
        self._urgent = True
        self._wakeup.set()
        try:
            if self._sender is not None:
                try:
                    await asyncio.shield(self._sender)
                except asyncio.CancelledError:
                    self._sender.cancel()
                    raise
        finally:
            if self._own_session is not None:
                await self._own_session.close()
        if self._error is not None and self._lost and not self._error_raised:
            self._raise_error()

    # ---------------------------------------------------------------- state

    @property
    def cancelled(self) -> bool:
        """Whether the service has answered that the job was cancelled."""
        return self._cancelled.is_set()

    async def wait_cancelled(self) -> None:
        """Return once the job is known to be cancelled."""
        await self._cancelled.wait()

    @property
    def error(self) -> BaseException | None:
        """What stopped the publisher (a :class:`JobCancelled`, a refused batch...), if anything."""
        return self._error

    # ---------------------------------------------------------------- producer events

    async def step_started(self, step: str) -> None:
        """The step ``step`` (a declared name) began."""
        await self._publish({"type": "step_started", "step": step})

    async def tokens(self, step: str, count: int, text: str | None = None) -> None:
        """``count`` more tokens of ``step``, with the text they make (optional)."""
        event: dict[str, Any] = {"type": "tokens", "step": step, "count": count}
        if text is not None:
            event["text"] = text
        await self._publish(event)

    async def progress(self, step: str, pct: float) -> None:
        """``step`` is ``pct`` percent done (0-100)."""
        await self._publish({"type": "progress", "step": step, "pct": pct})

    async def insight(self, text: str) -> None:
        """A short human status line ("Reading the sources...")."""
        await self._publish({"type": "insight", "text": text})

    async def step_completed(self, step: str) -> None:
        """The step ``step`` ended."""
        await self._publish({"type": "step_completed", "step": step})

    async def heartbeat(self) -> None:
        """Tell the service the producer is alive (the publisher also does it while idle)."""
        await self._publish({"type": "heartbeat"})

    async def succeeded(self, result: Mapping[str, Any] | None = None) -> None:
        """End the job ``succeeded`` with ``result``; returns once the service has it."""
        event: dict[str, Any] = {"type": "succeeded"}
        if result is not None:
            event["result"] = dict(result)
        await self._publish(event, final=True)
        await self.flush()

    async def failed(self, error: str | BaseException) -> None:
        """End the job ``failed`` with ``error`` (a text, or an exception: its type and text);
        returns once the service has it."""
        if isinstance(error, BaseException):
            text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        else:
            text = error
        await self._publish({"type": "failed", "error": text[:MAX_ERROR_CHARS]}, final=True)
        await self.flush()

    async def flush(self) -> None:
        """Return once every event queued so far is delivered (raise what stopped it)."""
        target = self._queued
        self._urgent = True
        self._wakeup.set()
        async with self._changed:
            await self._changed.wait_for(lambda: self._delivered >= target or self._stopped())
        if self._delivered < target:
            self._raise_stopped()

    # ---------------------------------------------------------------- internals

    def _stopped(self) -> bool:
        return self._error is not None or (self._sender is not None and self._sender.done())

    def _raise_error(self) -> None:
        assert self._error is not None
        self._error_raised = True
        raise self._error

    def _raise_stopped(self) -> None:
        if self._error is not None:
            self._raise_error()
        raise PublisherClosed(f"the publisher of job {self.job_id} has stopped")

    async def _publish(self, event: dict[str, Any], *, final: bool = False) -> None:
        if self._error is not None:
            self._raise_error()
        if self._ended:
            raise PublisherClosed(f"job {self.job_id} already has its succeeded() or failed()")
        if self._closed:
            raise PublisherClosed(f"the publisher of job {self.job_id} is closed")
        if self._sender is None:
            await self.start()
        if len(self._pending) >= self._max_pending_events:
            async with self._changed:
                await self._changed.wait_for(
                    lambda: len(self._pending) < self._max_pending_events or self._stopped()
                )
            if self._error is not None:
                self._raise_error()
        self._enqueue(event)
        if final:
            self._ended = True
            self._urgent = True
            self._wakeup.set()

    def _enqueue(self, event: Mapping[str, Any], *, own: bool = True) -> None:
        encoded = json.dumps(
            event, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode()
        if not self._pending:
            self._oldest_at = time.monotonic()
        self._pending.append((encoded, len(encoded), own))
        self._queued += 1
        if len(self._pending) == 1 or len(self._pending) >= self._max_batch_events:
            self._wakeup.set()

    async def _run(self) -> None:
        """The sender: batches, posts, retries, heartbeats, until closed or stopped."""
        try:
            while True:
                if not self._pending:
                    if self._closed:
                        return
                    self._wakeup.clear()
                    try:
                        async with asyncio.timeout(self._heartbeat_interval_s):
                            await self._wakeup.wait()
                    except TimeoutError:
                        self._enqueue({"type": "heartbeat"}, own=False)
                        self.stats.idle_heartbeats += 1
                    continue
                await self._gather()
                await self._post(*self._take())
                async with self._changed:
                    self._changed.notify_all()
        except asyncio.CancelledError:
            self._stop(PublisherClosed(f"the publisher of job {self.job_id} was cancelled"))
            raise
        except Exception as exc:  # a refusal, a batch given up on, or a bug: all end it
            self._stop(exc)
        finally:
            async with self._changed:
                self._changed.notify_all()

    async def _gather(self) -> None:
        """Wait for the rest of the batch: until the window since its oldest event has
        passed, or it is full."""
        deadline = self._oldest_at + self._batch_window_s
        while not self._urgent and len(self._pending) < self._max_batch_events:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()

    def _take(self) -> tuple[bytes, int]:
        """The next batch's events (as a JSON array) and their count, taken off the queue."""
        count, size = 0, 2
        for _, length, _ in self._pending:
            if count == self._max_batch_events or (count and size + length > self._max_batch_bytes):
                break
            count += 1
            size += length + 1
        taken, self._pending = self._pending[:count], self._pending[count:]
        self._inflight_own = sum(own for _, _, own in taken)
        if not self._pending:
            self._urgent = self._closed
        return b"[" + b",".join(encoded for encoded, _, _ in taken) + b"]", count

    async def _post(self, events: bytes, count: int) -> None:
        """Post one batch until the service acknowledges it; raise a refusal."""
        seq = self.next_producer_seq
        body = b'{"producer_seq":%d,"events":%s}' % (seq, events)
        assert self._session is not None
        started = time.monotonic()
        failures = 0
        while True:
            retry_after_s: float | None = None
            cause: BaseException
            try:
                async with self._session.post(
                    self.url, data=body, headers=self._headers, timeout=self._timeout
                ) as response:
                    answer = await response.read()
                    if response.status == 200:
                        self._acknowledged(json.loads(answer), count)
                        return
                    error = error_from(response.status, answer, response.reason)
                    if response.status not in _RETRY_STATUSES:
                        raise error
                    cause = error
                    retry_after_s = _retry_after_s(response.headers.get("Retry-After"))
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                if isinstance(exc, ClientError):
                    raise
                cause = exc  # no answer (or a mangled one): the batch may or may not have landed
            failures += 1
            self.stats.retries += 1
            backoff = min(self._max_backoff_s, self._first_backoff_s * 2 ** (failures - 1))
            delay = retry_after_s if retry_after_s is not None else backoff * random.uniform(0.5, 1)
            if (
                self._give_up_after_s is not None
                and time.monotonic() - started + delay > self._give_up_after_s
            ):
                raise PublishFailed(
                    f"job {self.job_id}: batch producer_seq {seq} undelivered after "
                    f"{failures} attempts in {time.monotonic() - started:.1f} s: {cause}"
                ) from cause
            await asyncio.sleep(delay)

    def _acknowledged(self, answer: Mapping[str, Any], count: int) -> None:
        ack = PublishAck(
            accepted=int(answer.get("accepted", count)),
            producer_seq=int(answer.get("producer_seq", self.next_producer_seq)),
            duplicate=bool(answer.get("duplicate", False)),
            last_event_id=int(answer.get("last_event_id", self.last_event_id)),
        )
        self.next_producer_seq += 1
        self.last_event_id = max(self.last_event_id, ack.last_event_id)
        self.stats.batches += 1
        self.stats.events += count
        self.stats.duplicates += ack.duplicate
        self._delivered += count
        self._inflight_own = 0

    def _stop(self, error: BaseException) -> None:
        self._error = error
        self._lost = self._inflight_own + sum(own for _, _, own in self._pending)
        self._pending.clear()
        if isinstance(error, JobCancelled):
            self._cancelled.set()
            if self._on_cancel is not None:
                try:
                    self._on_cancel()
                except Exception:  # the caller's hook: its failure must not stop the sender's
                    log.exception("on_cancel of the publisher of job %s failed", self.job_id)


def _retry_after_s(value: str | None) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), None when absent or bad."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
