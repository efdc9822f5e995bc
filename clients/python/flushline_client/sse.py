"""An incremental ``text/event-stream`` parser (the WHATWG grammar), fed bytes as they come.

The one parser of the project: the client's ``watch_job`` reads streams with it, and the
service (``app.core.sse`` re-exports it) uses it in ``flushline watch``, ``flushline
probe``, its LLM source and the tests. It depends on nothing but the standard library.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator

__all__ = ["MAX_LINE_BYTES", "SSELineTooLong", "SSEMessage", "SSEParser"]

_BYTE_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


@dataclasses.dataclass(frozen=True, slots=True)
class SSEMessage:
    """One dispatched SSE message (or a ``retry:``/comment-only block when ``data`` is None)."""

    event: str = "message"
    data: str | None = None
    id: str | None = None  # the id line of this block only; the parser keeps last_event_id
    retry_ms: int | None = None
    comments: tuple[str, ...] = ()


#: The longest line :class:`SSEParser` holds by default (64 MiB): a stream is framed in
#: lines, so a peer that never ends one would otherwise grow the buffer without end. It is
#: far above any event Flushline sends (one chunk event gathers what its step produced
#: within the chunk interval, megabytes for a fast source), so no real watcher meets it.
MAX_LINE_BYTES = 64 << 20


class SSELineTooLong(ValueError):
    """A line grew past the parser's ``max_line_bytes`` without ending."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"an SSE line is longer than {limit} bytes without ending")
        self.limit = limit


@dataclasses.dataclass(slots=True)
class SSEParser:
    """Incremental ``text/event-stream`` parser: feed bytes, get complete messages.

    Unlike a browser, it also reports blocks that carry only ``retry:`` or comments, so
    tools can see padding and the retry hint. ``data`` is None for those blocks.

    Each byte fed is scanned once: an unfinished line's pieces are kept as they came and
    joined when its end arrives, so a long line sent in small reads costs linear time.
    A line longer than ``max_line_bytes`` raises :class:`SSELineTooLong`.
    """

    last_event_id: str = ""
    max_line_bytes: int = MAX_LINE_BYTES
    #: The unfinished line's pieces, and their total size.
    _partial: list[bytes] = dataclasses.field(default_factory=list, init=False, repr=False)
    _partial_bytes: int = dataclasses.field(default=0, init=False, repr=False)
    _event: str = dataclasses.field(default="", init=False, repr=False)
    _data: list[str] = dataclasses.field(default_factory=list, init=False, repr=False)
    _id: str | None = dataclasses.field(default=None, init=False, repr=False)
    _retry_ms: int | None = dataclasses.field(default=None, init=False, repr=False)
    _comments: list[str] = dataclasses.field(default_factory=list, init=False, repr=False)
    _seen_field: bool = dataclasses.field(default=False, init=False, repr=False)
    _first: bool = dataclasses.field(default=True, init=False, repr=False)
    # The last line ended in a lone '\r': skip a '\n' that follows.
    _after_cr: bool = dataclasses.field(default=False, init=False, repr=False)

    def feed(self, chunk: bytes) -> list[SSEMessage]:
        """Add bytes from the stream; return the messages completed by them."""
        messages: list[SSEMessage] = []
        for line in self._lines(chunk):
            message = self._line(line)
            if message is not None:
                messages.append(message)
        return messages

    def _lines(self, chunk: bytes) -> Iterator[str]:
        start = 0
        if self._after_cr and chunk:
            # The '\r' ending the previous line may be the first half of a '\r\n'.
            self._after_cr = False
            if chunk.startswith(b"\n"):
                start = 1
        while True:
            match = _BYTE_LINE_BREAK.search(chunk, start)
            if match is None:
                break
            # A lone '\r' at the end ends the line now (a CR-only stream must not wait
            # for the next byte); a '\n' arriving next is then the rest of a '\r\n'.
            if match.group() == b"\r" and match.end() == len(chunk):
                self._after_cr = True
            raw = chunk[start : match.start()]
            if self._partial:
                raw = b"".join((*self._partial, raw))
                self._partial, self._partial_bytes = [], 0
            self._check_length(len(raw))
            line = raw.decode("utf-8", "replace")
            start = match.end()
            if self._first:
                self._first = False
                line = line.removeprefix("\ufeff")
            yield line
        if start < len(chunk):
            rest = chunk[start:]
            self._check_length(self._partial_bytes + len(rest))
            self._partial.append(rest)
            self._partial_bytes += len(rest)

    def _check_length(self, size: int) -> None:
        if size > self.max_line_bytes:
            self._partial, self._partial_bytes = [], 0
            raise SSELineTooLong(self.max_line_bytes)

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
