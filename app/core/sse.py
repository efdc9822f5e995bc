"""Server-Sent Events wire format: encode frames, comment lines and ``retry:``; parse a stream.

Encoding follows the WHATWG ``text/event-stream`` grammar: a frame is ``field: value``
lines ended by a blank line; a ``data`` value containing newlines becomes several
``data:`` lines; comment lines start with ``:`` and are ignored by ``EventSource``.
The parser is the inverse, used by the tests, ``flushline watch`` and ``flushline probe``;
it lives in the Python client (:mod:`flushline_client.sse`, which must not import the
service) and is re-exported here, one parser for both.
"""

from __future__ import annotations

import re

from flushline_client.sse import SSEMessage, SSEParser

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
