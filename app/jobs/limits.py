"""Bounds on what a client may put in a job: nesting depth and size of ``input``/``options``.

Checked before anything encodes, prints or stores them: a structure nested a thousand
levels deep makes ``str()`` raise ``RecursionError`` and ``orjson`` refuse it past 254
levels, both as a 500. The walk here is iterative, so it cannot itself overflow the
stack, and it also measures what the value will cost the retained-bytes budget.
"""

from __future__ import annotations

from typing import Any

import attrs
import orjson

from app.core.errors import InvalidField

__all__ = ["JSON_NODE_BYTES", "MAX_JSON_DEPTH", "JsonLimits", "measure_json"]

#: Most levels of nesting in a job's ``input`` or ``options`` (the object itself is 1).
MAX_JSON_DEPTH = 32
#: What each parsed JSON value costs in memory beyond its encoded bytes (a Python object
#: and the slot that holds it: an empty list is 56 bytes, a float 24, a pointer 8).
JSON_NODE_BYTES = 64


@attrs.frozen
class JsonLimits:
    """How deep and how large (encoded, in bytes) one request field may be."""

    max_depth: int = MAX_JSON_DEPTH
    max_bytes: int = 64 * 1024


def measure_json(field: str, value: Any, limits: JsonLimits) -> int:
    """Check ``value`` against ``limits``; the bytes it counts in the retained budget.

    Raises ``InvalidField`` naming ``field`` when it is nested deeper than ``max_depth``,
    encodes to more than ``max_bytes``, or holds something JSON cannot encode.
    """
    nodes = 1
    stack: list[tuple[Any, int]] = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        item, depth = stack.pop()
        if depth > limits.max_depth:
            raise InvalidField(field, f"is nested more than {limits.max_depth} levels deep")
        children = item.values() if isinstance(item, dict) else item
        nodes += len(children)
        # Only containers go on the stack: scalars are counted, nothing more.
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    try:
        size = len(orjson.dumps(value))
    except orjson.JSONEncodeError as exc:  # only a caller bypassing the JSON body gets here
        raise InvalidField(field, f"cannot be encoded as JSON ({exc})") from None
    if size > limits.max_bytes:
        raise InvalidField(field, f"is {size} bytes as JSON; at most {limits.max_bytes}")
    return size + nodes * JSON_NODE_BYTES
