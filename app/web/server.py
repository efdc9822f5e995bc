"""The HTTP server around the app (issue 8, being built): connection limits, JSON parser errors."""

from __future__ import annotations

import attrs

__all__ = ["ConnectionTracker"]


@attrs.define
class ConnectionTracker:
    """Counts the server's open connections against ``FLUSHLINE_MAX_CONNECTIONS``."""
