"""The analysis: what kind of path (``PathKind``) the reads of one diagnostics stream show.

``analyse`` is a pure function of the reads (when, and how many bytes in total) and the
pattern the service sent (see ``pattern``); from *when* and *how many* bytes arrived it
works out:

* whether the path holds writes at all (pattern writes arrive late, in groups),
* a **size-based buffer**'s size and release model: every write ends at a multiple of
  ``write_bytes`` (a prime, 257), so a path that releases whole blocks of ``B`` bytes
  ("blocks") releases at offsets that are multiples of ``B`` and not of 257, while a
  path that releases everything once it holds ``B`` ("all") releases at write
  boundaries every ``ceil(B / 257)`` writes,
* a **time hold** (a proxy that holds what it has for a while, whatever its size): the
  pattern ends with writes four times larger; a size-based buffer then releases the
  same number of bytes as before, more often, while a time hold releases as often as
  before, four times the bytes each time,
* a path that holds the **whole response** and sends it with a ``Content-Length``,
* compression (``Content-Encoding``), how long the headers were held, and whether the
  path also flushes on a timer (bytes released during the final pause).
"""

from __future__ import annotations

import bisect
import itertools
import statistics
from collections import Counter
from collections.abc import Sequence

import attrs

from app.pathtools.probe.report import DEFAULT_LATENCY_BUDGET_MS, PathKind, ProbeReport
from app.web.diagnostics import DiagnosticsPattern

__all__ = ["Read", "analyse"]


@attrs.frozen
class Read:
    """One read from the socket: when (seconds after the request) and how many body bytes
    had arrived in total by then."""

    at_s: float
    total: int


def _power_of_two_in(low: int, high: int) -> int | None:
    value = 1
    while value <= high:
        if value >= low:
            return value
        value *= 2
    return None


def _release_points(reads: Sequence[Read], gap_s: float) -> list[Read]:
    """The last read of each burst (reads closer than ``gap_s`` form one burst)."""
    points: list[Read] = []
    for i, read in enumerate(reads):
        if i + 1 == len(reads) or reads[i + 1].at_s - read.at_s > gap_s:
            points.append(read)
    return points


def _size_buffer(
    deltas: Sequence[int], write_bytes: int, last_write_bytes: int
) -> tuple[str, int | None, tuple[int, int] | None]:
    """Release model, buffer size and (for 'all') its range from the release sizes.

    Every write ends at a multiple of ``write_bytes``, so a release that does not is a
    whole block. An 'all' buffer of ``B`` releases once a write brings it to ``B`` or
    more, so ``B`` is within one such write (``last_write_bytes``) below the release.
    """
    common = Counter(deltas).most_common(1)
    delta = common[0][0] if common else 0
    if delta and delta % write_bytes:
        return "blocks", delta, None
    if delta:
        low, high = delta - last_write_bytes + 1, delta
        return "all", _power_of_two_in(low, high) or high, (low, high)
    return "unknown", None, None


def analyse(
    reads: Sequence[Read],
    pattern: DiagnosticsPattern,
    *,
    headers_at_s: float,
    url: str = "",
    status: int = 200,
    content_encoding: str | None = None,
    content_length: int | None = None,
    latency_budget_ms: float = DEFAULT_LATENCY_BUDGET_MS,
) -> ProbeReport:
    """Infer the path's behaviour from the reads of one diagnostics stream.

    ``reads`` times are seconds after the request was sent; the pattern's writes were
    sent as ``pattern.schedule()`` says, relative to the first, and its ``probe_end``
    event ``pause_ms`` after the last.
    """
    size = pattern.write_bytes
    interval_s = pattern.interval_ms / 1000
    schedule = pattern.schedule()
    writes_end = schedule[-1].end
    total = reads[-1].total if reads else 0

    # When did each pattern write arrive, relative to when it was sent?
    arrivals: list[float] = []
    index = 0
    for write in schedule:
        while index < len(reads) and reads[index].total < write.end:
            index += 1
        if index == len(reads):
            break
        arrivals.append(reads[index].at_s)
    timeline = [(w.sent_s, at) for w, at in zip(schedule, arrivals, strict=False)]
    if total > writes_end:
        # probe_end arrived: with it, a path that held every write still shows when
        # the pattern started (probe_end itself is sent at the end and not held).
        timeline.append((schedule[-1].sent_s + pattern.pause_ms / 1000, reads[-1].at_s))
    origin = min((at - sent for sent, at in timeline), default=0.0)
    lags = [at - (origin + w.sent_s) for w, at in zip(schedule, arrivals, strict=False)]
    held_threshold_s = max(3 * interval_s, 0.05)
    held = [lag > held_threshold_s for lag in lags]
    held_share = sum(held) / len(held) if held else 0.0
    max_lag_ms = max(lags, default=0.0) * 1000

    first_release_s = reads[0].at_s if reads else headers_at_s
    # Held: the headers came with the first release, later than an unbuffered path would
    # have delivered the first write (``origin``).
    headers_held = (
        headers_at_s - origin > held_threshold_s and headers_at_s >= first_release_s - 0.05
    )

    points = _release_points(reads, gap_s=max(interval_s * 0.6, 0.004))
    last_write_s = origin + schedule[-1].sent_s
    # Releases driven by the writes: during them, not the end-of-stream flush.
    in_writes = [
        p for p in points if p.total < writes_end and p.at_s <= last_write_s + held_threshold_s
    ]
    ends = [w.end for w in schedule]

    def phase(point: Read) -> int:
        return schedule[max(bisect.bisect_right(ends, point.total) - 1, 0)].phase

    phase_deltas: dict[int, list[int]] = {1: [], 2: []}
    for before, point in itertools.pairwise(in_writes):
        phase_deltas[phase(point)].append(point.total - before.total)
    deltas = phase_deltas[1]
    sizes = tuple([in_writes[0].total, *deltas] if in_writes else ())

    # The hold of each release: how long its oldest write waited.
    release_totals = [p.total for p in in_writes]
    by_release: dict[int, float] = {}
    for write, lag in zip(schedule, lags, strict=False):
        at = bisect.bisect_left(release_totals, write.end)
        if at < len(in_writes):
            by_release[at] = max(by_release.get(at, 0.0), lag)
    release_holds = list(by_release.values())
    typical_hold_s = statistics.median(release_holds) if release_holds else 0.0
    buffered = held_share > 0.5 or typical_hold_s > held_threshold_s

    growth = None
    if phase_deltas[1] and phase_deltas[2]:
        growth = statistics.median(phase_deltas[2]) / statistics.median(phase_deltas[1])
    large = pattern.large_write_bytes
    factor = large / size if large else 0.0
    # Midway between a size buffer's growth (about 1) and a time hold's (``factor``).
    time_hold = growth is not None and growth >= (1 + factor) / 2

    model, buffer_bytes, buffer_range = "none", None, None
    if buffered:
        model = "unknown"
        # The small writes' releases say most; else the large ones'; else the first.
        if phase_deltas[1]:
            model, buffer_bytes, buffer_range = _size_buffer(phase_deltas[1], size, size)
        elif phase_deltas[2]:
            model, buffer_bytes, buffer_range = _size_buffer(phase_deltas[2], size, large)
        elif in_writes:
            ended_by = schedule[bisect.bisect_left(ends, in_writes[0].total)]
            write_size = large if ended_by.phase == 2 else size
            model, buffer_bytes, buffer_range = _size_buffer([in_writes[0].total], size, write_size)
    whole = (
        buffered
        and content_length is not None
        and first_release_s > last_write_s + held_threshold_s
    )
    hold_ms = None
    if not buffered:
        kind = PathKind.UNBUFFERED
    elif content_encoding not in (None, "", "identity"):
        kind = PathKind.COMPRESSED
    elif whole:
        kind, model, buffer_bytes, buffer_range = PathKind.WHOLE_RESPONSE, "end", None, None
    elif time_hold:
        kind, model, buffer_bytes, buffer_range = PathKind.TIME_HOLD, "time", None, None
        hold_ms = round(typical_hold_s * 1000, 1)
    elif buffer_bytes:
        kind = PathKind.SIZE_BUFFER
    else:
        kind = PathKind.LARGE_BUFFER

    # A release during the final pause, before the stream's end, means a timer flush,
    # unless it released a whole buffer: that is the size rule, late only because the
    # last writes were (a loaded machine delays them past their schedule).
    timer_flush_s = None
    end_s = reads[-1].at_s if reads else 0.0
    released_before = 0
    for point in points:
        released = point.total - released_before
        released_before = point.total
        if buffer_bytes and released >= buffer_bytes:
            continue
        if (
            last_write_s + held_threshold_s < point.at_s < end_s - 0.05
            and point.total <= writes_end
        ):
            timer_flush_s = round(point.at_s - last_write_s, 2)
            break

    return ProbeReport(
        url=url,
        status=status,
        content_encoding=content_encoding,
        headers_after_ms=round(headers_at_s * 1000, 1),
        headers_held=headers_held,
        buffered=buffered,
        release_model=model,
        buffer_bytes=buffer_bytes,
        buffer_range=buffer_range,
        timer_flush_s=timer_flush_s,
        release_sizes=sizes,
        held_share=round(held_share, 3),
        max_lag_ms=round(max_lag_ms, 1),
        total_bytes=total,
        kind=kind,
        hold_ms=hold_ms,
        release_growth=None if growth is None else round(growth, 2),
        content_length=content_length,
        first_write_bytes=pattern.first_bytes,
        latency_budget_ms=latency_budget_ms,
    )
