"""Each flush strategy's wire output, checked on the raw bytes received from the real server."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import attrs
import pytest

from tests.conftest import QUICK_JOB, MakeClient
from tests.support.jobs import Client, ScriptedPipeline, create_job, raw_lines, stream_job
from tests.support.sse_client import StreamRecord

STRATEGY_NAMES = ["none", "padding", "frequency", "combined", "aligned"]
PADDED = {"padding", "combined"}
UNPADDED = {"none", "frequency"}
#: The contract's (chunk_chars, chunk_interval_s) of each classic strategy when the
#: variables are not set. (``aligned`` picks its own cadence; it is not in the contract.)
CHUNK_CADENCE = {
    "none": (500, 1.2),
    "padding": (500, 1.2),
    "frequency": (100, 0.3),
    "combined": (100, 0.3),
}


@attrs.frozen
class Segment:
    """A run of raw stream bytes: the retry block, one event frame, or a run of comment lines."""

    kind: str  # "retry", "frame", "comments", "blank"
    start: int
    end: int
    fields: tuple[tuple[bytes, bytes], ...] = ()


def segments(raw: bytes) -> list[Segment]:
    """Split a stream into segments; assert every line is a field, comment, retry or blank."""
    lines = raw_lines(raw)
    out: list[Segment] = []
    i = 0
    while i < len(lines):
        start = lines[i].end - len(lines[i].text)
        if lines[i].is_comment:
            while i < len(lines) and lines[i].is_comment:
                i += 1
            out.append(Segment("comments", start, lines[i - 1].end))
            continue
        if lines[i].is_blank:
            out.append(Segment("blank", start, lines[i].end))
            i += 1
            continue
        fields: list[tuple[bytes, bytes]] = []
        while i < len(lines) and not lines[i].is_blank:
            line = lines[i]
            assert not line.is_comment, f"comment inside a frame at byte {start}: {line!r}"
            name, sep, value = line.content.partition(b":")
            assert sep, f"not a field line: {line!r}"
            assert name in (b"retry", b"id", b"event", b"data"), f"unexpected field: {line!r}"
            fields.append((name, value.removeprefix(b" ")))
            i += 1
        assert i < len(lines), "the last block is not ended by a blank line"
        i += 1  # the blank line ending the block
        kind = "retry" if [n for n, _ in fields] == [b"retry"] else "frame"
        out.append(Segment(kind, start, lines[i - 1].end, tuple(fields)))
    return out


def check_wire(record: StreamRecord) -> list[Segment]:
    """The raw stream is retry first, then frames (id, event, data) and comment lines only."""
    segs = segments(record.raw)
    assert segs[0].kind == "retry", segs[:2]
    assert segs[0].start == 0
    frames = [s for s in segs if s.kind == "frame"]
    assert len(frames) == len(record.events)
    for frame, arrival in zip(frames, record.events, strict=True):
        names = [name for name, _ in frame.fields]
        assert names == [b"id", b"event", b"data"], frame
        assert frame.fields[0][1].decode() == str(arrival.data["seq"])
        assert frame.fields[1][1].decode() == arrival.data["type"]
    assert all(s.kind != "retry" for s in segs[1:])
    return segs


def comment_runs(segs: list[Segment]) -> list[Segment]:
    return [s for s in segs if s.kind == "comments"]


#: Half a second: two steps of 20 tokens, each a pause between its start and its chunk.
SHORT_JOB = {"steps": 2, "tokens_per_step": 20, "tokens_per_second": 80}
#: A tenth of a second, for checks that need no pauses.
BRIEF_JOB = {"steps": 2, "tokens_per_step": 20, "tokens_per_second": 400}


async def record_for(
    make_client: MakeClient,
    strategy: str,
    mode: str,
    env: dict[str, str] | None = None,
    options: dict[str, Any] | None = None,
) -> StreamRecord:
    """A job's stream with ``strategy`` picked by FLUSHLINE_STRATEGY (``mode`` "env") or by
    the job's "strategy" field over a different FLUSHLINE_STRATEGY (``mode`` "body")."""
    fields: dict[str, str] = {}
    if mode == "env":
        client = await make_client({**(env or {}), "FLUSHLINE_STRATEGY": strategy})
    else:
        other = "none" if strategy != "none" else "padding"
        client = await make_client({**(env or {}), "FLUSHLINE_STRATEGY": other})
        fields["strategy"] = strategy
    job = await create_job(client, options or QUICK_JOB, **fields)
    assert job["strategy"] == strategy
    record = await stream_job(client, job["id"])
    assert record.status == 200
    payloads = record.payloads()
    assert payloads[0]["strategy"] == strategy
    assert payloads[-1]["status"] == "succeeded"
    return record


MODES = ["env", "body"]
#: Tokens 0.5 s apart, each a visible 25% step: a flush, then a pause.
PAUSED_JOB = {"steps": 2, "tokens_per_step": 4, "tokens_per_second": 2}


class TestUnpadded:
    """``none`` and ``frequency`` add nothing to the frames."""

    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("strategy", sorted(UNPADDED))
    async def test_no_comment_lines(
        self, make_client: MakeClient, strategy: str, mode: str
    ) -> None:
        """The stream is the retry block then the event frames, with no comment byte at all."""
        record = await record_for(make_client, strategy, mode, options=BRIEF_JOB)
        segs = check_wire(record)
        assert [s.kind for s in segs] == ["retry"] + ["frame"] * len(record.events)
        assert b"\n:" not in record.raw
        assert segs[-1].end == len(record.raw)


class TestPadded:
    """``padding`` and ``combined`` follow the stream start and every write with padding."""

    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("strategy", sorted(PADDED))
    async def test_default_padding(self, make_client: MakeClient, strategy: str, mode: str) -> None:
        """2048 comment bytes after the retry line and after every write of frames."""
        record = await record_for(make_client, strategy, mode, options=SHORT_JOB)
        self._check_padding(record, 2048)

    @pytest.mark.parametrize("strategy", sorted(PADDED))
    async def test_custom_padding(self, make_client: MakeClient, strategy: str) -> None:
        """FLUSHLINE_PADDING_BYTES sets the size of every padding block."""
        record = await record_for(
            make_client, strategy, "env", {"FLUSHLINE_PADDING_BYTES": "5000"}, SHORT_JOB
        )
        self._check_padding(record, 5000)

    def _check_padding(self, record: StreamRecord, size: int) -> None:
        segs = check_wire(record)
        kinds = [s.kind for s in segs]
        assert "blank" not in kinds
        # Padding right after the retry block, and the stream ends with padding.
        assert kinds[:2] == ["retry", "comments"], kinds[:4]
        assert kinds[-1] == "comments"
        runs = comment_runs(segs)
        for run in runs:
            assert run.end - run.start == size, (run, size)
            assert b"data:" not in record.raw[run.start : run.end]
        # Padding only ever follows the retry block or a frame (never two blocks in a row).
        for before, after in itertools.pairwise(segs):
            if after.kind == "comments":
                assert before.kind in ("retry", "frame"), (before, after)
        # Every event followed by a pause was followed by padding at once, so a buffering
        # proxy is pushed after it rather than holding it until the next event.
        frames = [i for i, s in enumerate(segs) if s.kind == "frame"]
        pauses = 0
        for n, index in enumerate(frames[:-1]):
            gap = record.events[n + 1].data["ts"] - record.events[n].data["ts"]
            if gap > 0.05:
                pauses += 1
                assert segs[index + 1].kind == "comments", (n, record.events[n].data["type"])
        assert pauses >= 2
        assert len(runs) >= pauses + 2


class TestAligned:
    """``aligned`` pads every flush to a multiple of FLUSHLINE_PROXY_BUFFER_BYTES."""

    @pytest.mark.parametrize(
        ("mode", "env", "block"),
        [
            ("env", {}, 4096),
            ("body", {}, 4096),
            ("env", {"FLUSHLINE_PROXY_BUFFER_BYTES": "1000"}, 1000),
            ("env", {"FLUSHLINE_PROXY_BUFFER_BYTES": "8192"}, 8192),
        ],
    )
    async def test_flushes_end_on_block_boundaries(
        self, make_client: MakeClient, mode: str, env: dict[str, str], block: int
    ) -> None:
        """Each padding run ends at a multiple of the block size, and so does every pause."""
        record = await record_for(make_client, "aligned", mode, env, PAUSED_JOB)
        segs = check_wire(record)
        runs = comment_runs(segs)
        assert len(runs) >= 3
        for run in runs:
            assert run.end % block == 0, (run, block)
            assert b"data:" not in record.raw[run.start : run.end]
        # Whenever the stream goes quiet (well past the 100 ms latency budget), the bytes
        # received so far end on a block boundary: no event waits in a proxy's buffer.
        received = 0
        quiet_points = 0
        for (at, size), (next_at, _) in zip(record.reads, record.reads[1:], strict=False):
            received += size
            if next_at - at > 0.3:
                quiet_points += 1
                assert received % block == 0, (received, block)
        assert quiet_points >= 2

    async def test_deferred_flush_pads_before_a_pause(self, make_client: MakeClient) -> None:
        """An event written inside the latency budget is padded by a later flush, not left
        waiting for the next event."""
        # Tokens at 0.6 s and 0.63 s (each its own chunk), then 0.9 s of silence: both
        # quiet stretches well past the 0.3 s that counts as a pause, even on a busy machine.
        script = ((0.6, "one "), (0.03, "two "), (0.9, "three "))
        client = await make_client(
            {"FLUSHLINE_STRATEGY": "aligned", "FLUSHLINE_CHUNK_CHARS": "1"},
            pipelines=(ScriptedPipeline(script),),
        )
        job = await create_job(client, pipeline="scripted")
        record = await stream_job(client, job["id"])
        payloads = record.payloads()
        assert payloads[-1]["result"] == {"text": "one two three "}
        chunks = [p for p in payloads if p["type"] == "chunk"]
        assert [c["text"] for c in chunks] == ["one ", "two ", "three "]
        assert chunks[1]["ts"] - chunks[0]["ts"] < 0.09  # inside the 100 ms budget
        check_wire(record)
        received = 0
        quiet_points = 0
        for (at, size), (next_at, _) in itertools.pairwise(record.reads):
            received += size
            if next_at - at > 0.3:
                quiet_points += 1
                assert received % 4096 == 0, (received, at - record.requested_at)
        assert quiet_points >= 2


def _strip_tokens(text: str, count: int) -> str:
    """``text`` without its last ``count`` tokens (tokens are words followed by a space)."""
    for _ in range(count):
        text = text[: text.rstrip().rfind(" ") + 1]
    return text


def check_chunk_cadence(
    payloads: list[dict[str, Any]], chars: int, interval: float, *, slow: bool
) -> int:
    """Chunks go out at ``chars`` characters or ``interval`` seconds, whichever comes first.

    Returns how many chunks were checked against the rule (the last of each step is cut
    short by the step's end and only bounded).
    """
    checked = 0
    last_at = 0.0
    chunks: list[dict[str, Any]] = []

    def check_step() -> None:
        nonlocal checked
        at = last_at
        for n, chunk in enumerate(chunks):
            gap = chunk["ts"] - at
            text = chunk["text"]
            # Sent as soon as it reached the size: without its last token (two, for a
            # token drained together with it) it is below the size.
            assert len(_strip_tokens(text, 2)) < chars, (len(text), text)
            if slow:
                assert gap <= interval + 0.3, (gap, interval)
            if n < len(chunks) - 1:
                checked += 1
                if len(text) < chars:
                    assert gap >= interval - 0.05, (gap, interval, len(text))
            at = chunk["ts"]

    for p in payloads:
        if p["type"] == "step_started":
            last_at, chunks = p["ts"], []
        elif p["type"] == "chunk":
            chunks.append(p)
        elif p["type"] == "step_completed":
            check_step()
    return checked


class TestCadence:
    """The producer's cadence: chunk size/interval and progress interval."""

    async def test_chunk_cadence_of_every_strategy(self, client: Client) -> None:
        """Slow and fast jobs: chunks follow each classic strategy's size and interval limits."""
        slow = {"steps": 1, "tokens_per_step": 50, "tokens_per_second": 20}  # 2.5 s
        fast = {"steps": 1, "tokens_per_step": 300, "tokens_per_second": 240}  # 1.25 s
        runs = [(s, speed, opts) for s in CHUNK_CADENCE for speed, opts in (("slow", slow),
                ("fast", fast))]  # fmt: skip
        jobs = [await create_job(client, opts, strategy=s) for s, _, opts in runs]
        records = await asyncio.gather(*(stream_job(client, job["id"]) for job in jobs))
        for (strategy, speed, _), record in zip(runs, records, strict=True):
            payloads = record.payloads()
            assert payloads[-1]["status"] == "succeeded"
            chars, interval = CHUNK_CADENCE[strategy]
            checked = check_chunk_cadence(payloads, chars, interval, slow=speed == "slow")
            texts = [p["text"] for p in payloads if p["type"] == "chunk"]
            gaps = _chunk_gaps(payloads)
            if speed == "slow":
                # 20 tokens/s is ~150 chars/s: chunks are cut by time, not size.
                assert checked >= 1, (strategy, texts)
                assert all(len(t) < chars for t in texts[:-1]), (strategy, texts)
                assert min(gaps[:-1]) >= interval - 0.05, (strategy, gaps)
                # Each token moves the bar 2 points: progress follows it (merged within
                # 90 ms windows), not the 5 s keep-alive (FLUSHLINE_PROGRESS_INTERVAL).
                progress = [p for p in payloads if p["type"] == "step_progress"]
                assert len(progress) >= 10, (strategy, [p["type"] for p in payloads])
            else:
                # 240 tokens/s is ~1700 chars/s: chunks are cut by size, well before time.
                assert checked >= 2, (strategy, texts)
                assert all(len(t) >= chars for t in texts[:-1]), (strategy, [len(t) for t in texts])
                assert max(gaps[:-1]) < interval, (strategy, gaps)


def _chunk_gaps(payloads: list[dict[str, Any]]) -> list[float]:
    """Seconds from the step start (or the previous chunk) to each chunk."""
    gaps: list[float] = []
    at = 0.0
    for p in payloads:
        if p["type"] == "step_started":
            at = p["ts"]
        elif p["type"] == "chunk":
            gaps.append(p["ts"] - at)
            at = p["ts"]
    return gaps


_VOLATILE = {"ts", "job_id", "duration_s", "eta_s", "job_eta_s"}


def _stable(payload: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in payload.items() if k not in _VOLATILE}
    if out["type"] == "job_started":
        out.pop("strategy")
    return out


class TestSameEvents:
    """Strategies shape the wire and the cadence, never the events' content."""

    async def test_identical_events_with_equal_cadence(self, make_client: MakeClient) -> None:
        """With one cadence forced for all, every strategy delivers the very same events."""
        client = await make_client(
            {
                "FLUSHLINE_CHUNK_CHARS": "100000",
                "FLUSHLINE_CHUNK_INTERVAL": "60",
                "FLUSHLINE_PROGRESS_INTERVAL": "60",
            }
        )
        jobs = [await create_job(client, QUICK_JOB, strategy=s) for s in STRATEGY_NAMES]
        records = await asyncio.gather(*(stream_job(client, job["id"]) for job in jobs))

        # step_progress follows the bar in windows of time, so its count and values
        # depend on timing; every other event is the same.
        def others(payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
            kept = [_stable(p) for p in payloads if p["type"] != "step_progress"]
            return [{k: v for k, v in p.items() if k != "seq"} for p in kept]

        reference = others(records[0].payloads())
        assert reference[-1]["status"] == "succeeded"
        for strategy, record in zip(STRATEGY_NAMES, records, strict=True):
            check_wire(record)
            payloads = record.payloads()
            assert others(payloads) == reference, strategy
            pcts = [(p["step"], p["pct"]) for p in payloads if p["type"] == "step_progress"]
            assert pcts, strategy
            assert all(a[1] <= b[1] for a, b in itertools.pairwise(pcts) if a[0] == b[0]), pcts
            assert [a.message.event for a in record.arrivals if a.message.data is not None] == [
                p["type"] for p in payloads
            ]

    async def test_same_text_and_result_with_default_cadence(self, client: Client) -> None:
        """With each strategy's own cadence, the seeded text, result and step events match."""
        options = {**QUICK_JOB, "seed": 42}
        jobs = [await create_job(client, options, strategy=s) for s in STRATEGY_NAMES]
        records = await asyncio.gather(*(stream_job(client, job["id"]) for job in jobs))

        def summary(record: StreamRecord) -> tuple[Any, ...]:
            payloads = record.payloads()
            skeleton = [
                {k: v for k, v in _stable(p).items() if k != "seq"}
                for p in payloads
                if p["type"] in ("job_started", "step_started", "step_completed", "done")
            ]
            text: dict[str, str] = {}
            for p in payloads:
                if p["type"] == "chunk":
                    text[p["step"]] = text.get(p["step"], "") + p["text"]
            # Each step's own status line comes right after its step_started.
            first_insights = [
                payloads[i + 1]["text"]
                for i, p in enumerate(payloads)
                if p["type"] == "step_started"
            ]
            types = {p["type"] for p in payloads}
            return skeleton, text, first_insights, types

        reference = summary(records[0])
        assert reference[1]["analyze"]
        for strategy, record in zip(STRATEGY_NAMES, records, strict=True):
            assert summary(record) == reference, strategy
