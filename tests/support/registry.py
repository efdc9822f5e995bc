"""Whether pip can reach its package index: tests that install from it skip without it."""

from __future__ import annotations

import os
import urllib.request

import pytest

__all__ = ["require_registry"]


def _registry_unreachable() -> str | None:
    """Why pip's package index cannot be reached, or None when it can."""
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple/").rstrip("/")
    try:
        with urllib.request.urlopen(f"{index}/pip/", timeout=15):
            return None
    except OSError as exc:
        return f"{index}: {exc}"


def require_registry(what: str) -> None:
    """Skip the test (fail it under FLUSHLINE_REQUIRE_INTEGRATION=1) when pip cannot reach
    its package index to fetch ``what``."""
    unreachable = _registry_unreachable()
    if unreachable is None:
        return
    reason = f"pip cannot reach the package index to fetch {what} ({unreachable})"
    if os.environ.get("FLUSHLINE_REQUIRE_INTEGRATION") == "1":
        pytest.fail(f"{reason} (FLUSHLINE_REQUIRE_INTEGRATION=1)")
    pytest.skip(reason)
