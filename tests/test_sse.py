"""Tests for the SSE wire format (app/core/sse.py): encoding, comments, padding and the parser.

The parser is the inverse of the encoder, so most tests encode something, feed the bytes
to :class:`SSEParser` in various chunkings and compare with what went in.
"""

from __future__ import annotations

import itertools
import re
import time

import pytest
from flushline_client.sse import SSELineTooLong
from hypothesis import given, settings
from hypothesis import strategies as st

from app.core.sse import SSEMessage, SSEParser, comment, encode_frame, padding_comment, retry_line

# --- helpers -----------------------------------------------------------------------


def parse_all(chunks: list[bytes]) -> list[SSEMessage]:
    """Feed ``chunks`` in order to a fresh parser and return every message."""
    parser = SSEParser()
    messages: list[SSEMessage] = []
    for chunk in chunks:
        messages.extend(parser.feed(chunk))
    return messages


def one_byte_at_a_time(stream: bytes) -> list[bytes]:
    return [stream[i : i + 1] for i in range(len(stream))]


def split_at(stream: bytes, *cuts: int) -> list[bytes]:
    points = [0, *sorted(cuts), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(points)]


def normalise_newlines(text: str) -> str:
    """SSE cannot carry CR: every line break in data comes back as LF."""
    return re.sub(r"\r\n|\r|\n", "\n", text)


def expected(data: str, *, event: str | None = None, id: str | int | None = None) -> SSEMessage:
    return SSEMessage(
        event=event or "message",
        data=normalise_newlines(data),
        id=None if id is None else str(id),
    )


# --- encoding ----------------------------------------------------------------------


class TestEncodeFrame:
    def test_canonical_event_frame_matches_contract_layout(self) -> None:
        """A one-line JSON event is exactly 'id:', 'event:', 'data:' lines and a blank line."""
        frame = encode_frame(b'{"type":"chunk","seq":7}', event="chunk", id=7)
        assert frame == b'id: 7\nevent: chunk\ndata: {"type":"chunk","seq":7}\n\n'

    def test_str_and_bytes_data_encode_identically(self) -> None:
        """Data given as str or as UTF-8 bytes produces the same frame."""
        text = "héllo 🌍\nsecond line"
        assert encode_frame(text, event="x", id=1) == encode_frame(text.encode(), event="x", id=1)

    def test_multi_line_data_becomes_several_data_lines(self) -> None:
        """Each line of the data gets its own 'data:' line; none holds a raw line break."""
        frame = encode_frame("a\nb\r\nc\rd")
        lines = frame.split(b"\n")
        assert lines[:4] == [b"data: a", b"data: b", b"data: c", b"data: d"]
        assert frame.endswith(b"\n\n")
        assert b"\r" not in frame

    def test_frame_without_id_or_event_has_only_data(self) -> None:
        """Omitting id and event omits their lines."""
        assert encode_frame("x") == b"data: x\n\n"

    @pytest.mark.parametrize("bad_id", ["1\n2", "1\r2", "a\0b"])
    def test_id_with_line_break_or_nul_is_rejected(self, bad_id: str) -> None:
        """An id that would break the frame (or be ignored by clients) raises ValueError."""
        with pytest.raises(ValueError, match="id"):
            encode_frame("x", id=bad_id)

    @pytest.mark.parametrize("bad_event", ["a\nb", "a\rb", "a\r\nb"])
    def test_event_with_line_break_is_rejected(self, bad_event: str) -> None:
        """An event name with a line break raises ValueError instead of injecting a field."""
        with pytest.raises(ValueError, match="event"):
            encode_frame("x", event=bad_event)


class TestCommentAndRetry:
    def test_comment_round_trips_as_comment_lines(self) -> None:
        """comment() text comes back in SSEMessage.comments, one entry per line, no data."""
        stream = comment("hello\n world\n\nend") + b"\n"
        [message] = parse_all([stream])
        assert message.data is None
        assert message.comments == ("hello", " world", "", "end")

    def test_empty_comment_is_a_bare_colon_line(self) -> None:
        """comment('') is the shortest comment line ':' and parses as an empty comment."""
        assert comment() == b":\n"
        [message] = parse_all([comment() + b"\n"])
        assert message.comments == ("",)
        assert message.data is None

    def test_comments_before_a_frame_do_not_change_its_data(self) -> None:
        """Comment lines preceding a frame are reported with it and leave data intact."""
        stream = comment("ping") + encode_frame("payload", event="e", id=3)
        [message] = parse_all([stream])
        assert message.comments == ("ping",)
        assert (message.event, message.data, message.id) == ("e", "payload", "3")

    @pytest.mark.parametrize("retry_ms", [0, 1, 3000, 86_400_000])
    def test_retry_line_is_reported(self, retry_ms: int) -> None:
        """retry_line(ms) parses to a data-less block with retry_ms set."""
        raw = retry_line(retry_ms)
        assert raw.startswith(b"retry: ")
        [message] = parse_all([raw])
        assert message.retry_ms == retry_ms
        assert message.data is None

    @pytest.mark.parametrize("value", ["abc", "-5", "1.5", "²", "١٢", ""])
    def test_non_ascii_digit_retry_is_ignored(self, value: str) -> None:
        """A retry value that is not only ASCII digits is ignored, never an exception."""
        [message] = parse_all([f"retry: {value}\ndata: x\n\n".encode()])
        assert message.retry_ms is None
        assert message.data == "x"


class TestPaddingComment:
    def test_padding_comment_sizes_2_to_5000_are_exact_and_comment_only(self) -> None:
        """padding_comment(n) is n bytes of comment lines that never yield data."""
        parser = SSEParser()
        for size in range(2, 5001):
            padding = padding_comment(size)
            assert len(padding) == size
            assert padding.startswith(b":")
            assert padding.endswith(b"\n")
            messages = parser.feed(padding + b"\n")
            assert len(messages) == 1, size
            assert messages[0].data is None, size
            assert messages[0].comments, size

    def test_padding_between_frames_is_invisible_to_data(self) -> None:
        """Frames interleaved with padding of many sizes parse to exactly the frames' data."""
        sizes = [2, 3, 63, 64, 65, 66, 1000, 4095, 4096, 4097]
        stream = b"".join(
            padding_comment(size) + encode_frame(f"event {i}", id=i) for i, size in enumerate(sizes)
        )
        messages = parse_all([stream])
        assert [m.data for m in messages] == [f"event {i}" for i in range(len(sizes))]

    def test_padding_zero_is_empty(self) -> None:
        """padding_comment(0) adds nothing."""
        assert padding_comment(0) == b""

    @pytest.mark.parametrize("size", [1, -1])
    def test_padding_that_cannot_be_a_comment_line_raises(self, size: int) -> None:
        """A size of 1 (a comment line needs ':' and a newline) or below raises ValueError."""
        with pytest.raises(ValueError, match="2 bytes"):
            padding_comment(size)


# --- parsing -----------------------------------------------------------------------


UNICODE_SAMPLES = [
    "plain ascii",
    "emoji 🎉🚀👩‍👩‍👧‍👦 family",
    "CJK 简历优化中 日本語 한국어",
    "combining e\u0301 a\u0308 n\u0303 Z\u0336\u0337",
    "rtl עברית العربية",
    '{"json": "with \\"quotes\\""}',
]


class TestParserRoundTrip:
    @pytest.mark.parametrize("text", UNICODE_SAMPLES)
    def test_unicode_data_round_trips(self, text: str) -> None:
        """Data with emoji, CJK and combining characters comes back unchanged."""
        [message] = parse_all([encode_frame(text, event="chunk", id=1)])
        assert message == expected(text, event="chunk", id=1)

    @pytest.mark.parametrize("text", UNICODE_SAMPLES)
    def test_unicode_round_trips_one_byte_at_a_time(self, text: str) -> None:
        """Multi-byte characters split across feeds are decoded correctly."""
        stream = encode_frame(text + "\n" + text, event="ünïcödé", id="ид")
        messages = parse_all(one_byte_at_a_time(stream))
        assert messages == [expected(text + "\n" + text, event="ünïcödé", id="ид")]

    @pytest.mark.parametrize(
        "data",
        ["", "\n", "a\n", "\nb", "a\n\nb", "  two leading spaces", "trailing  ", "x:y: z"],
    )
    def test_edge_case_data_round_trips(self, data: str) -> None:
        """Empty data, blank lines, leading spaces and colons survive a round trip."""
        [message] = parse_all([encode_frame(data, event="e", id=0)])
        assert message == expected(data, event="e", id=0)

    def test_many_frames_split_at_every_position(self) -> None:
        """Splitting a multi-frame stream at any single byte position changes nothing."""
        frames = [(f"line one {i} 🎉\nline two 简历", f"type{i}", i) for i in range(1, 4)]
        stream = retry_line(1500) + b"".join(
            encode_frame(data, event=event, id=id) for data, event, id in frames
        )
        whole = parse_all([stream])
        assert whole[0].retry_ms == 1500
        assert whole[1:] == [expected(d, event=e, id=i) for d, e, i in frames]
        for cut in range(len(stream) + 1):
            assert parse_all(split_at(stream, cut)) == whole, cut

    def test_one_byte_at_a_time_matches_whole(self) -> None:
        """A stream fed one byte per call parses exactly as when fed at once."""
        stream = (
            retry_line(3000)
            + comment("hi")
            + encode_frame("a\nb", event="x", id=1)
            + padding_comment(100)
            + encode_frame("c", id=2)
        )
        assert parse_all(one_byte_at_a_time(stream)) == parse_all([stream])

    def test_last_event_id_persists_across_blocks(self) -> None:
        """The parser keeps the newest id even when a later frame has no id line."""
        parser = SSEParser()
        first = parser.feed(encode_frame("a", id=41))
        second = parser.feed(encode_frame("b"))
        assert first[0].id == "41"
        assert second[0].id is None
        assert parser.last_event_id == "41"

    def test_id_with_nul_is_ignored(self) -> None:
        """An id line containing NUL does not change the id (per the WHATWG algorithm)."""
        parser = SSEParser()
        parser.feed(b"id: 5\ndata: a\n\n")
        [message] = parser.feed(b"id: 6\0x\ndata: b\n\n")
        assert message.id is None
        assert parser.last_event_id == "5"


STREAM_LF = b"retry: 100\n: note\nid: 1\nevent: e\ndata: a\ndata: b\n\ndata: c\n\n"


class TestLineEndings:
    @pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
    def test_each_line_ending_parses_the_same(self, newline: bytes) -> None:
        """LF, CRLF and CR streams produce the same messages, fed whole."""
        stream = STREAM_LF.replace(b"\n", newline)
        assert parse_all([stream]) == parse_all([STREAM_LF])
        assert [m.data for m in parse_all([stream])] == ["a\nb", "c"]

    @pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
    def test_each_line_ending_split_anywhere(self, newline: bytes) -> None:
        """Every split point and byte-at-a-time feeding give the same result per ending."""
        stream = STREAM_LF.replace(b"\n", newline)
        want = parse_all([STREAM_LF])
        assert parse_all(one_byte_at_a_time(stream)) == want
        for cut in range(len(stream) + 1):
            assert parse_all(split_at(stream, cut)) == want, cut

    def test_crlf_split_between_cr_and_lf_is_one_line_break(self) -> None:
        """A CRLF whose halves arrive in separate feeds is not counted as two breaks."""
        parser = SSEParser()
        assert parser.feed(b"data: a\r") == []
        assert parser.feed(b"\ndata: b\r") == []
        [message] = parser.feed(b"\n\r\n")
        assert message.data == "a\nb"

    def test_cr_terminated_frame_is_dispatched_without_waiting(self) -> None:
        """A frame ending in CR CR is delivered at once, not held for the next byte."""
        parser = SSEParser()
        [message] = parser.feed(b"data: x\r\r")
        assert message.data == "x"
        [message] = parser.feed(b"\ndata: y\r\r")  # a stray LF after CR is part of CRLF
        assert message.data == "y"

    def test_mixed_line_endings(self) -> None:
        """One stream mixing CR, LF and CRLF parses each break once."""
        stream = b"data: 1\rdata: 2\ndata: 3\r\n\r\ndata: 4\n\r"
        assert [m.data for m in parse_all([stream])] == ["1\n2\n3", "4"]


class TestParserFields:
    def test_bom_at_stream_start_is_skipped(self) -> None:
        """A UTF-8 BOM before the first field is ignored, also when fed byte by byte."""
        stream = b"\xef\xbb\xbfdata: x\n\n"
        assert [m.data for m in parse_all([stream])] == ["x"]
        assert [m.data for m in parse_all(one_byte_at_a_time(stream))] == ["x"]

    def test_bom_later_in_stream_is_not_stripped(self) -> None:
        """Only the stream's first BOM is skipped; a later one makes an unknown field."""
        stream = b"\xef\xbb\xbfdata: x\n\n\xef\xbb\xbfdata: y\n\n"
        assert [m.data for m in parse_all([stream]) if m.data is not None] == ["x"]

    def test_field_without_colon_has_empty_value(self) -> None:
        """'data' alone is an empty data line; 'event' alone resets to 'message'."""
        [message] = parse_all([b"event\ndata\n\n"])
        assert message.data == ""
        assert message.event == "message"
        [message] = parse_all([b"data\ndata\n\n"])
        assert message.data == "\n"
        [message] = parse_all([b"id\ndata: x\n\n"])
        assert message.id == ""

    def test_value_loses_exactly_one_leading_space(self) -> None:
        """'data:x' and 'data: x' are the same; a second space is kept."""
        messages = parse_all([b"data:x\n\ndata: x\n\ndata:  x\n\n"])
        assert [m.data for m in messages] == ["x", "x", " x"]

    def test_unknown_fields_are_ignored(self) -> None:
        """Fields other than data/event/id/retry do not affect the message."""
        [message] = parse_all([b"foo: bar\ndata: x\nData: y\n\n"])
        assert message.data == "x"

    def test_blank_lines_alone_dispatch_nothing(self) -> None:
        """Empty blocks (repeated blank lines) produce no messages."""
        assert parse_all([b"\n\n\r\n\r\r\n"]) == []

    def test_incomplete_frame_is_not_dispatched(self) -> None:
        """A frame missing its terminating blank line is held back."""
        parser = SSEParser()
        assert parser.feed(b"data: x\n") == []
        assert [m.data for m in parser.feed(b"\n")] == ["x"]


# --- property ----------------------------------------------------------------------

# Text with line breaks, astral emoji, CJK and combining marks well represented.
DATA_TEXT = st.lists(
    st.one_of(
        st.characters(codec="utf-8"),
        st.sampled_from(["\n", "\r", "\r\n", " ", ":", "🎉", "简", "e\u0301", "\ufeff"]),
    ),
    max_size=60,
).map("".join)
EVENT_NAME = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\r\n"), min_size=1, max_size=20
)
EVENT_ID = st.one_of(
    st.none(),
    st.integers(min_value=0, max_value=2**63),
    st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r\n\0"), max_size=20),
)
FRAME = st.tuples(DATA_TEXT, st.one_of(st.none(), EVENT_NAME), EVENT_ID)


@settings(max_examples=300, deadline=None)
@given(frames=st.lists(FRAME, min_size=1, max_size=6), data=st.data())
def test_property_parse_of_encode_is_identity_whatever_the_chunking(
    frames: list[tuple[str, str | None, str | int | None]], data: st.DataObject
) -> None:
    """For random data, event names and ids, parse(encode(x)) == x for any chunking."""
    stream = b"".join(encode_frame(d, event=e, id=i) for d, e, i in frames)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12), label="cuts")
    messages = parse_all(split_at(stream, *cuts))
    assert messages == [expected(d, event=e, id=i) for d, e, i in frames]


class TestParserBounds:
    def test_a_long_line_in_small_reads_parses_in_linear_time(self) -> None:
        """A 4 MB data line fed 1 KB at a time parses in well under a second's work per MB
        (rescanning the partial line at each read took minutes)."""
        parser = SSEParser(max_line_bytes=8 << 20)
        payload = b"x" * (4 << 20)
        stream = b"data: " + payload + b"\n\n"
        started = time.perf_counter()
        messages = []
        for start in range(0, len(stream), 1024):
            messages += parser.feed(stream[start : start + 1024])
        elapsed_s = time.perf_counter() - started
        assert [len(m.data or "") for m in messages] == [len(payload)]
        assert elapsed_s < 5.0, f"{elapsed_s:.1f} s for 4 MB"

    def test_a_line_past_the_cap_raises_before_it_is_held(self) -> None:
        """A line longer than max_line_bytes raises SSELineTooLong; the parser held no more."""
        parser = SSEParser(max_line_bytes=10_000)
        parser.feed(b"data: " + b"y" * 9_000)
        with pytest.raises(SSELineTooLong):
            parser.feed(b"y" * 2_000)
        # A complete line over the cap, in one read, is refused too.
        with pytest.raises(SSELineTooLong):
            SSEParser(max_line_bytes=100).feed(b"data: " + b"z" * 200 + b"\n\n")

    @pytest.mark.parametrize("cut", [1, 2, 5, 7, 8, 9])
    def test_lines_split_anywhere_parse_the_same(self, cut: int) -> None:
        """Pieces of a stream cut at any byte give the same messages as the whole."""
        stream = b"id: 1\r\nevent: a\r\ndata: one\r\n\r\ndata: two\n\n:pad\rdata: 3\r\r"
        whole = SSEParser().feed(stream)
        parser = SSEParser()
        pieces = []
        for start in range(0, len(stream), cut):
            pieces += parser.feed(stream[start : start + cut])
        assert pieces == whole
        assert [m.data for m in whole] == ["one", "two", "3"]
