"""Prometheus metrics: ``GET /metrics`` in the Prometheus text format.

Each app has its own :class:`~prometheus_client.CollectorRegistry` (tests build many apps
in one process). Figures the service already holds are read at scrape time: jobs by status
from the counts the job store keeps as jobs change status (no snapshot is read), running
jobs from the manager, retained bytes when the manager counts them, open connections and
refusals from the server's connection tracker (under ``flushline serve``). Figures only
the code knows as it runs are bumped through :class:`Metrics`'s methods, which the
stream calls once per write: plain integer additions on the event loop's thread (no lock,
no label lookup), turned into metric families at scrape time. A stream serving thousands
of subscribers pays one method call per write, plus one histogram slot increment per
event delivered.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

import attrs
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector

from app.core.errors import backend_outage
from app.core.events import EncodedEvent
from app.jobs.store import JobStatus
from app.web.keys import MANAGER
from app.web.server.limits import CONNECTIONS

__all__ = [
    "DROP_REASONS",
    "LAG_BUCKETS_S",
    "METRICS",
    "METRICS_CONTENT_TYPE",
    "REFUSAL_REASONS",
    "Metrics",
    "install_metrics",
]

log = structlog.get_logger(__name__)

#: Upper bounds of the delivery lag histogram's buckets (the README's target is 100 ms).
LAG_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Why a stream dropped its subscriber (the stream log line's ``outcome``): it fell more
#: than ``FLUSHLINE_SUBSCRIBER_QUEUE`` events behind, its writes stalled past
#: ``FLUSHLINE_SEND_TIMEOUT``, or the bus lost Redis. Listed so they show as 0 from the start.
DROP_REASONS = ("cut_off", "send_timeout", "backend_lost")
#: Why a connection or stream was refused: a stream or long-poll past
#: ``FLUSHLINE_MAX_CONNECTIONS`` (503), a head not sent within ``FLUSHLINE_HEADER_TIMEOUT_S``,
#: an idle connection closed to make room past the limit, or ``accept()`` failed (out of
#: descriptors). The server's connection tracker counts them all.
REFUSAL_REASONS = ("max_connections", "header_timeout", "idle_shed", "accept_error")
#: The text format every Prometheus server reads.
METRICS_CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
#: How long a scrape waits for the job store (Redis) before leaving ``flushline_jobs`` out.
STORE_SCRAPE_TIMEOUT_S = 2.0


@runtime_checkable
class _CountsRetainedBytes(Protocol):
    """A job manager that counts the bytes of its kept jobs (``FLUSHLINE_MAX_RETAINED_BYTES``)."""

    @property
    def retained_bytes(self) -> int:
        """Bytes of every kept job (history, input, result) together."""
        ...


@attrs.define(eq=False)
class Metrics:
    """The app's Prometheus registry and the figures the service bumps as it runs.

    Every bumping method runs on the event loop's thread only (handlers, job tasks), so
    plain integer additions need no lock.
    """

    registry: CollectorRegistry = attrs.field(factory=lambda: CollectorRegistry(auto_describe=True))
    streams_open: int = 0
    streams_opened: int = 0
    events_published: int = 0
    payload_bytes: int = 0
    padding_bytes: int = 0
    drops: dict[str, int] = attrs.field(factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    refusals: dict[str, int] = attrs.field(factory=lambda: dict.fromkeys(REFUSAL_REASONS, 0))
    #: Events per lag bucket (not cumulative); the last slot is ``+Inf``.
    lag_counts: list[int] = attrs.field(factory=lambda: [0] * (len(LAG_BUCKETS_S) + 1))
    lag_sum_s: float = 0.0
    #: Filled by the scrape from the job store just before the registry is collected.
    jobs_by_status: dict[str, int] | None = None
    running_jobs: int = 0
    retained_bytes: int | None = None
    #: The server's open connections and their limit (``None``: not under ``flushline serve``).
    connections: tuple[int, int] | None = None
    #: Refusals the server's connection tracker counted, by reason.
    tracked_refusals: dict[str, int] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        self.registry.register(_Collector(self))
        ProcessCollector(registry=self.registry)

    def stream_opened(self) -> None:
        """A stream response started (its headers are going out)."""
        self.streams_open += 1
        self.streams_opened += 1

    def stream_closed(self) -> None:
        """A stream that :meth:`stream_opened` counted has ended, however it ended."""
        self.streams_open -= 1

    def event_published(self, count: int = 1) -> None:
        """``count`` events were published (once per event, not per subscriber)."""
        self.events_published += count

    def bytes_written(self, payload: int, padding: int) -> None:
        """One stream write went out: ``payload`` bytes of frames (events, heartbeats,
        ``retry:`` lines), ``padding`` bytes the strategy added (comment lines)."""
        self.payload_bytes += payload
        self.padding_bytes += padding

    def delivered(self, events: Sequence[EncodedEvent], written_at: float | None = None) -> None:
        """``events`` were written to one subscriber at ``written_at`` (``time.time()``,
        now if omitted): each one's lag is that minus its ``ts``."""
        now = time.time() if written_at is None else written_at
        counts = self.lag_counts
        total = 0.0
        for event in events:
            lag_s = now - event.ts
            if lag_s < 0.0:
                lag_s = 0.0  # another instance's clock (Redis bus) may run ahead
            counts[bisect.bisect_left(LAG_BUCKETS_S, lag_s)] += 1
            total += lag_s
        self.lag_sum_s += total

    def subscriber_dropped(self, reason: str) -> None:
        """The server disconnected a subscriber (one of :data:`DROP_REASONS`)."""
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def connection_refused(self, reason: str) -> None:
        """A connection or stream was refused (one of :data:`REFUSAL_REASONS`)."""
        self.refusals[reason] = self.refusals.get(reason, 0) + 1

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)


#: The Prometheus registry and metrics.
METRICS = web.AppKey("metrics", Metrics)


@attrs.define(eq=False)
class _Collector:
    """Turns :class:`Metrics`'s figures into metric families at scrape time."""

    metrics: Metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        if m.jobs_by_status is not None:
            jobs = GaugeMetricFamily(
                "flushline_jobs", "Jobs kept in the job store, by status.", labels=["status"]
            )
            for status, count in m.jobs_by_status.items():
                jobs.add_metric([status], count)
            yield jobs
        yield GaugeMetricFamily(
            "flushline_running_jobs",
            "Jobs this instance runs that have not ended (queued, running, being cancelled).",
            value=m.running_jobs,
        )
        if m.retained_bytes is not None:
            yield GaugeMetricFamily(
                "flushline_retained_bytes",
                "Bytes of every kept job (history, input, result) together.",
                value=m.retained_bytes,
            )
        yield GaugeMetricFamily(
            "flushline_open_streams", "SSE streams open right now.", value=m.streams_open
        )
        yield CounterMetricFamily(
            "flushline_streams", "SSE streams opened.", value=m.streams_opened
        )
        yield CounterMetricFamily(
            "flushline_events_published",
            "Events published by jobs this instance runs.",
            value=m.events_published,
        )
        written = CounterMetricFamily(
            "flushline_stream_written_bytes",
            "Bytes written to SSE streams: payload (frames) or padding (the strategy's).",
            labels=["kind"],
        )
        written.add_metric(["payload"], m.payload_bytes)
        written.add_metric(["padding"], m.padding_bytes)
        yield written
        drops = CounterMetricFamily(
            "flushline_subscriber_drops",
            "Subscribers the server disconnected, by reason.",
            labels=["reason"],
        )
        for reason, count in m.drops.items():
            drops.add_metric([reason], count)
        yield drops
        refusals = CounterMetricFamily(
            "flushline_connections_refused",
            "Connections or streams refused, by reason.",
            labels=["reason"],
        )
        for reason, count in m.refusals.items():
            refusals.add_metric([reason], count + m.tracked_refusals.get(reason, 0))
        yield refusals
        if m.connections is not None:
            yield GaugeMetricFamily(
                "flushline_open_connections", "Open client connections.", value=m.connections[0]
            )
            yield GaugeMetricFamily(
                "flushline_max_connections",
                "Connections past which streams are refused (FLUSHLINE_MAX_CONNECTIONS).",
                value=m.connections[1],
            )
        buckets: list[tuple[str, float]] = []
        cumulative = 0
        for bound, count in zip((*LAG_BUCKETS_S, float("inf")), m.lag_counts, strict=True):
            cumulative += count
            buckets.append((_bound_label(bound), cumulative))
        yield HistogramMetricFamily(
            "flushline_event_delivery_lag_seconds",
            "Live events written to a subscriber: write completion minus the event's ts.",
            buckets=buckets,
            sum_value=m.lag_sum_s,
        )


def _bound_label(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


async def metrics_endpoint(request: web.Request) -> web.Response:
    """``GET /metrics``: the instance's metrics in the Prometheus text format."""
    metrics = request.app[METRICS]
    manager = request.app[MANAGER]
    metrics.running_jobs = manager.active_jobs
    if isinstance(manager, _CountsRetainedBytes):
        metrics.retained_bytes = manager.retained_bytes
    tracker = request.app.get(CONNECTIONS)
    if tracker is not None:
        metrics.connections = (tracker.open, tracker.limit)
        metrics.tracked_refusals = {
            "max_connections": tracker.refused,
            "header_timeout": tracker.header_timeouts,
            "idle_shed": tracker.shed,
            "accept_error": tracker.accept_errors,
        }
    metrics.jobs_by_status = await _jobs_by_status(request.app)
    return web.Response(body=metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})


async def _jobs_by_status(app: web.Application) -> dict[str, int] | None:
    """Kept jobs by status, every status listed; None when the store cannot be read now.

    The store keeps the counts as jobs change status: no snapshot is read.
    """
    try:
        async with asyncio.timeout(STORE_SCRAPE_TIMEOUT_S):
            counts = await app[MANAGER].store.count_by_status()
    except TimeoutError:
        log.warning("metrics: the job store did not answer", timeout_s=STORE_SCRAPE_TIMEOUT_S)
        return None
    except Exception as exc:
        outage = backend_outage(exc)
        if outage is None:
            raise
        log.warning("metrics: the job store is unreachable", error=outage.message)
        return None
    return {status.value: counts.get(status, 0) for status in JobStatus}


def install_metrics(app: web.Application) -> None:
    """Give ``app`` its metrics registry and the ``/metrics`` route."""
    metrics = app[METRICS] = Metrics()
    app[MANAGER].on_publish = metrics.event_published
    app.router.add_get("/metrics", metrics_endpoint, allow_head=False)
