"""Delivery statistics of a received stream: lag percentiles and bursts.

Shared by ``flushline watch``, the benchmarks and the tests, so all three judge
"arrived live" versus "arrived in a burst" the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

__all__ = ["DeliveryStats", "Received", "delivery_stats", "percentile"]

#: Events that arrive within this long of each other form one arrival group.
BURST_GAP_S = 0.01
#: A group is a burst when the events in it were emitted at least this far apart.
BURST_SPREAD_S = 0.05


@attrs.frozen
class Received:
    """One event: when the server emitted it (``ts``) and when it arrived (both epoch s)."""

    ts: float
    arrived: float

    @property
    def lag_s(self) -> float:
        """Arrival minus emission."""
        return self.arrived - self.ts


@attrs.frozen
class DeliveryStats:
    """Summary of one stream's delivery."""

    events: int
    lag_p50_ms: float
    lag_p99_ms: float
    lag_max_ms: float
    bursts: int
    burst_share: float  # share of events that arrived as part of a burst


def percentile(values: Sequence[float], pct: float) -> float:
    """The ``pct`` percentile (nearest rank) of ``values``; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(round(pct / 100 * len(ordered) + 0.5) - 1, 0)
    return ordered[min(rank, len(ordered) - 1)]


def delivery_stats(received: Sequence[Received]) -> DeliveryStats:
    """Lag percentiles and bursts: groups of events that arrived together although the
    server emitted them over a spread of time, i.e. were held back and released at once."""
    lags_ms = [max(r.lag_s, 0.0) * 1000 for r in received]
    groups: list[list[Received]] = []
    for item in sorted(received, key=lambda r: r.arrived):
        if groups and item.arrived - groups[-1][-1].arrived <= BURST_GAP_S:
            groups[-1].append(item)
        else:
            groups.append([item])
    bursts = [
        g
        for g in groups
        if len(g) > 1 and max(r.ts for r in g) - min(r.ts for r in g) >= BURST_SPREAD_S
    ]
    in_bursts = sum(len(g) for g in bursts)
    return DeliveryStats(
        events=len(received),
        lag_p50_ms=round(percentile(lags_ms, 50), 1),
        lag_p99_ms=round(percentile(lags_ms, 99), 1),
        lag_max_ms=round(max(lags_ms, default=0.0), 1),
        bursts=len(bursts),
        burst_share=round(in_bursts / len(received), 3) if received else 0.0,
    )
