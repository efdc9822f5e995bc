"""A real headless Chromium (Debian's ``chromium``) driven by Playwright for Python.

Playwright's own browser download cannot run here, so the system browser is launched
through ``executable_path``. Tests that need it take the ``browser`` fixture (from
``tests/conftest.py``); without Chromium or Playwright they skip with the reason, and
under ``FLUSHLINE_REQUIRE_INTEGRATION=1`` they fail instead.
"""

from __future__ import annotations

import os
import pathlib
import shutil
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.async_api import Browser

__all__ = ["ARTIFACTS", "CHROMIUM_ARGS", "find_chromium", "launch_browser"]

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
#: Screenshots and other outputs of browser tests (not committed).
ARTIFACTS = REPO_ROOT / "artifacts"

#: As root with no network but the loopback: no sandbox, no background connections.
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)

_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    """The path of the system Chromium, or None."""
    explicit = os.environ.get("FLUSHLINE_CHROMIUM")
    if explicit:
        return explicit
    for name in _CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _missing(reason: str) -> None:
    if os.environ.get("FLUSHLINE_REQUIRE_INTEGRATION") == "1":
        pytest.fail(f"{reason} (FLUSHLINE_REQUIRE_INTEGRATION=1)")
    pytest.skip(reason)


async def launch_browser() -> AsyncIterator[Browser]:
    """Yield a Playwright ``Browser`` on the system Chromium; close it afterwards."""
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        _missing("playwright not installed: pip install playwright")
    executable = find_chromium()
    if executable is None:
        _missing("chromium not installed: apt-get install chromium")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=executable, headless=True, args=list(CHROMIUM_ARGS)
        )
        try:
            yield browser
        finally:
            await browser.close()
