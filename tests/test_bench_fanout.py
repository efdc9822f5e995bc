"""``python -m bench.fanout`` at a tiny scale: the command still runs and its table adds up."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

from tests.support.process import require_flushline_script, run_cli


def require_aiohttp_sse() -> None:
    """Skip without the anchor's library (the ``bench`` extra); fail if integration is required."""
    if importlib.util.find_spec("aiohttp_sse") is None:
        reason = "aiohttp-sse is not installed (pip install -e '.[test]')"
        if os.environ.get("FLUSHLINE_REQUIRE_INTEGRATION") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


class TestFanoutCommand:
    """The fan-out benchmark runs end to end against real processes."""

    async def test_tiny_run_prints_a_full_table(self) -> None:
        """Each scenario against its servers: all open, none failed; long-poll beside the stream."""
        require_flushline_script()
        require_aiohttp_sse()
        code, out, err = await run_cli(
            "--streams", "20", "--jobs", "4", "--idle-streams", "30", "--watchers", "10",
            "--duration", "2",
            timeout_s=180,
            argv0=(sys.executable, "-m", "bench.fanout"),
        )  # fmt: skip
        assert code == 0, err
        rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
        header, body = rows[0], rows[1:]
        assert "delivered ev/s" in header
        assert "CPU µs / event" in header
        cells = [[c.strip() for c in row.strip("|").split("|")] for row in body]
        servers = {"flushline none", "flushline aligned", "aiohttp-sse", "floor"}
        flushline = {"flushline none", "flushline aligned"}
        polls = ("long-poll (stream)", "long-poll")
        assert {(c[0], c[1]) for c in cells} == {
            (scenario, server) for scenario in ("broadcast", "many", "idle") for server in servers
        } | {(scenario, server) for scenario in polls for server in flushline}
        for c in cells:
            streams = {"broadcast": 20, "many": 8, "idle": 30}.get(c[0], 10)
            assert c[2] == f"{streams}/{streams}", c  # every stream opened
            assert c[7] == "0 / 0", c  # none failed, none skipped a seq
        requests = {c[1]: int(c[-1].replace(",", "")) for c in cells if c[0] == "long-poll"}
        assert all(n > 10 for n in requests.values()), requests  # each watcher polled again
        for server in flushline:
            assert any(
                line.startswith(f"{server}: long-poll ") and "per delivered event" in line
                for line in out.splitlines()
            ), out[-2000:]
        for c in cells:
            if c[0] != "idle":
                ideal, delivered = (float(v.split()[0].replace(",", "")) for v in c[3:5])
                assert ideal > 0, c
                assert delivered > 0, c
