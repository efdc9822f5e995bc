"""Parsing request parameters (query strings, headers) into checked values."""

from __future__ import annotations

from app.core.errors import InvalidField

__all__ = ["MAX_SEQ", "parse_int", "parse_seq"]

#: The largest event seq a client may name (a resume point is at most the newest seq).
MAX_SEQ = 2**63 - 1


def parse_int(raw: str, field: str, low: int, high: int) -> int:
    """``raw`` as an integer from ``low`` to ``high``, else ``InvalidField`` naming ``field``.

    Only ASCII digits count (``str.isdigit`` also accepts "²"), and the length is checked
    before ``int()``, which refuses very long digit strings with its own error.
    """
    text = raw.strip()
    if (
        not text.isascii()
        or not text.isdigit()
        or len(text) > len(str(high))
        or not low <= int(text) <= high
    ):
        raise InvalidField(field, f"must be an integer from {low} to {high}, got {raw[:40]!r}")
    return int(text)


def parse_seq(raw: str, field: str) -> int:
    """An event seq named by a client (``Last-Event-ID``, ``after``): 0 or more."""
    return parse_int(raw, field, 0, MAX_SEQ)
