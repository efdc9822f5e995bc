"""The browser client's unit tests (``tests/js/``, Node's built-in test runner) as one test.

They check ``flushline.js``'s SSE parser, job state and delivery-sensing rules on
arrival patterns recorded in Chromium through each path (``tests/js/fixtures/``).
Without ``node`` the test skips, or fails under ``FLUSHLINE_REQUIRE_INTEGRATION=1``.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

from tests.conftest import require_integration

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
JS_TESTS = REPO_ROOT / "tests" / "js"
TIMEOUT_S = 120


def test_flushline_js_unit_tests_pass() -> None:
    """`node --test tests/js/` passes: parser, state and sensing rules on recorded patterns."""
    node = shutil.which("node")
    if node is None:
        reason = "node not installed: apt-get install nodejs"
        if require_integration():
            pytest.fail(f"{reason} (FLUSHLINE_REQUIRE_INTEGRATION=1)")
        pytest.skip(reason)
    files = sorted(JS_TESTS.glob("*.test.mjs"))
    assert files, f"no *.test.mjs in {JS_TESTS}"
    result = subprocess.run(
        [node, "--test", *map(str, files)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    assert "# fail 0" in result.stdout, result.stdout[-2000:]
