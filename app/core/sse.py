"""Server-Sent Events wire format: encode frames, comment lines and ``retry:``; parse a stream.

Encoding follows the WHATWG ``text/event-stream`` grammar: a frame is ``field: value``
lines ended by a blank line; a ``data`` value containing newlines becomes several
``data:`` lines; comment lines start with ``:`` and are ignored by ``EventSource``.
The parser is the inverse, used by the tests, ``flushline watch`` and ``flushline probe``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import attrs

from strategies.padding import padding_comment

__all__ = [
    "SSEMessage",
    "SSEParser",
    "comment",
    "encode_frame",
    "padding_comment",
    "retry_line",
]

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_BYTE_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


def encode_frame(
    data: str | bytes, *, event: str | None = None, id: str | int | None = None
) -> bytes:
    """Encode one SSE frame (``id:``, ``event:``, ``data:`` lines, then a blank line)."""
    parts: list[bytes] = []
    if id is not None:
        id_text = str(id)
        if "\n" in id_text or "\r" in id_text or "\0" in id_text:
            raise ValueError("an SSE id cannot contain a line break or NUL")
        parts.append(b"id: " + id_text.encode())
    if event is not None:
        if _LINE_BREAK.search(event):
            raise ValueError("an SSE event name cannot contain a line break")
        parts.append(b"event: " + event.encode())
    if isinstance(data, bytes) and b"\n" not in data and b"\r" not in data:
        parts.append(b"data: " + data)  # the common case: one line of compact JSON
        return b"\n".join(parts) + b"\n\n"
    text = data.decode() if isinstance(data, bytes) else data
    for line in _LINE_BREAK.split(text):
        parts.append(b"data: " + line.encode())
    return b"\n".join(parts) + b"\n\n"


def comment(text: str = "") -> bytes:
    """Encode comment lines (``: text``), one per line of ``text``."""
    return b"".join(
        b": " + line.encode() + b"\n" if line else b":\n" for line in _LINE_BREAK.split(text)
    )


def retry_line(retry_ms: int) -> bytes:
    """The ``retry:`` field telling EventSource how long to wait before reconnecting."""
    return b"retry: %d\n\n" % retry_ms


@attrs.frozen
class SSEMessage:
    """One dispatched SSE message (or a ``retry:``/comment-only block when ``data`` is None)."""

    event: str = "message"
    data: str | None = None
    id: str | None = None  # the id line of this block only; the parser keeps last_event_id
    retry_ms: int | None = None
    comments: tuple[str, ...] = ()


@attrs.define
class SSEParser:
    """Incremental ``text/event-stream`` parser: feed bytes, get complete messages.

    Unlike a browser, it also reports blocks that carry only ``retry:`` or comments, so
    tools can see padding and the retry hint. ``data`` is None for those blocks.
    """

    _buffer: bytes = b""
    _event: str = ""
    _data: list[str] = attrs.field(factory=list)
    _id: str | None = None
    _retry_ms: int | None = None
    _comments: list[str] = attrs.field(factory=list)
    _seen_field: bool = False
    _first: bool = True
    _after_cr: bool = False  # the last line ended in a lone '\r': skip a '\n' that follows
    last_event_id: str = ""

    def feed(self, chunk: bytes) -> list[SSEMessage]:
        """Add bytes from the stream; return the messages completed by them."""
        self._buffer += chunk
        messages: list[SSEMessage] = []
        for line in self._lines():
            message = self._line(line)
            if message is not None:
                messages.append(message)
        return messages

    def _lines(self) -> Iterator[str]:
        start = 0
        buffer = self._buffer
        if self._after_cr and buffer:
            # The '\r' ending the previous line may be the first half of a '\r\n'.
            self._after_cr = False
            if buffer.startswith(b"\n"):
                start = 1
        while True:
            match = _BYTE_LINE_BREAK.search(buffer, start)
            if match is None:
                break
            # A lone '\r' at the end ends the line now (a CR-only stream must not wait
            # for the next byte); a '\n' arriving next is then the rest of a '\r\n'.
            if match.group() == b"\r" and match.end() == len(buffer):
                self._after_cr = True
            line = buffer[start : match.start()].decode("utf-8", "replace")
            start = match.end()
            if self._first:
                self._first = False
                line = line.removeprefix("\ufeff")
            yield line
        self._buffer = buffer[start:]

    def _line(self, line: str) -> SSEMessage | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            self._comments.append(line[1:].removeprefix(" "))
            self._seen_field = True
            return None
        name, sep, value = line.partition(":")
        value = value.removeprefix(" ") if sep else ""
        self._seen_field = True
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._id = value
                self.last_event_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self._retry_ms = int(value)
        return None

    def _dispatch(self) -> SSEMessage | None:
        if not self._seen_field:
            return None
        message = SSEMessage(
            event=self._event or "message",
            data="\n".join(self._data) if self._data else None,
            id=self._id,
            retry_ms=self._retry_ms,
            comments=tuple(self._comments),
        )
        self._event, self._data, self._id, self._retry_ms = "", [], None, None
        self._comments = []
        self._seen_field = False
        return message
