"""SSE comment padding: the filler every padding strategy writes to reach a byte count.

It lives on the ground floor, with the strategies that use it; ``app.core.sse`` offers it
with the rest of the wire format.
"""

from __future__ import annotations

__all__ = ["padding_comment"]

_PAD_UNIT = b"." * 64


def padding_comment(size: int) -> bytes:
    """Return exactly ``size`` bytes of SSE comment lines (``size`` 0 gives ``b""``).

    Any size from 2 up is possible (``:\\n`` is the shortest comment line); 1 is not, so
    callers that must reach a byte boundary pad to the next one instead.
    """
    if size == 0:
        return b""
    if size < 2:
        raise ValueError("an SSE comment line needs at least 2 bytes")
    # One line: ':' + filler + '\n'. A long single line is fine for EventSource, and
    # proxies that care about line length see far longer data lines in practice.
    filler = size - 2
    reps, rest = divmod(filler, len(_PAD_UNIT))
    return b":" + _PAD_UNIT * reps + _PAD_UNIT[:rest] + b"\n"
