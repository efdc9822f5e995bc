"""The diagnostics pattern the probe asks the service for (``probe_pattern``).

Every write ends at a multiple of ``write_bytes`` (a prime, 257), so that a size-based
buffer's releases tell its size and release model; the first write is over 1 KB so that
compressors with a minimum length engage; the pattern ends with writes
``LARGE_WRITE_FACTOR`` times larger, which tell a size-based buffer from a time hold.
"""

from __future__ import annotations

import math

from app.web.diagnostics import DiagnosticsPattern

__all__ = ["LARGE_WRITE_FACTOR", "MIN_FIRST_WRITE_BYTES", "probe_pattern"]

#: The probe's first write is at least this long, so that compressors that skip short
#: responses (Traefik's ``minResponseBodyBytes`` 1024, Caddy's ``minimum_length`` 512,
#: nginx's ``gzip_min_length``) compress the stream as they would a real one.
MIN_FIRST_WRITE_BYTES = 1024
#: The large writes at the end of the pattern are this many times ``write_bytes``.
LARGE_WRITE_FACTOR = 4
LARGE_WRITES_MIN_S = 1


def probe_pattern(
    max_buffer_bytes: int = 16_384,
    *,
    write_bytes: int = 257,
    interval_ms: int = 25,
    pause_ms: int = 1_500,
) -> DiagnosticsPattern:
    """The pattern the probe sends to detect buffers up to ``max_buffer_bytes``.

    About 2.5 times that many bytes in ``write_bytes`` writes, then as many in writes
    ``LARGE_WRITE_FACTOR`` times larger (for a second at least); a first write of at
    least 1 KB.
    """
    large = LARGE_WRITE_FACTOR * write_bytes
    total = max(int(max_buffer_bytes * 2.5), 4096)
    return DiagnosticsPattern(
        write_bytes=write_bytes,
        interval_ms=interval_ms,
        total_bytes=total,
        pause_ms=pause_ms,
        first_writes=math.ceil(MIN_FIRST_WRITE_BYTES / write_bytes),
        large_write_bytes=large,
        # At least a second of large writes, so that a hold of a few hundred ms
        # releases several times during them.
        large_total_bytes=max(total, large * max(LARGE_WRITES_MIN_S * 1000 // interval_ms, 8)),
    )
