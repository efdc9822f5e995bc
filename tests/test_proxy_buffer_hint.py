"""The per-stream ``?proxy_buffer=`` hint: aligned shaping of one stream, the job untouched."""

from __future__ import annotations

import pytest

from tests.support.jobs import (
    FAST_JOB,
    Client,
    create_job,
    expect_json_error,
    get_job,
    raw_lines,
    stream_job,
    wait_finished,
)


@pytest.mark.parametrize("strategy", ["none", "aligned", "padding"])
@pytest.mark.parametrize("block", [1024, 8192, 12288])
async def test_stream_ends_on_the_hinted_block(client: Client, strategy: str, block: int) -> None:
    """Whatever the strategy, a hinted stream ends on a block multiple, padded by comments."""
    job = await create_job(client, {**FAST_JOB, "steps": 2}, strategy=strategy)
    await wait_finished(client, job["id"])
    plain = await stream_job(client, job["id"])
    hinted = await stream_job(client, job["id"], query=f"?proxy_buffer={block}")
    assert hinted.status == 200
    assert len(hinted.raw) % block == 0
    assert hinted.payloads() == plain.payloads()

    def data_lines(raw: bytes) -> list[bytes]:
        return [line.text for line in raw_lines(raw) if line.text.startswith(b"data:")]

    assert data_lines(hinted.raw) == data_lines(plain.raw)
    padding = [line for line in raw_lines(hinted.raw) if line.text.startswith(b":")]
    assert padding, "a hinted stream through a buffering path must carry padding"


async def test_zero_means_no_padding(client: Client) -> None:
    """?proxy_buffer=0 (the path does not buffer) sends no padding at all."""
    job = await create_job(client, FAST_JOB, strategy="padding")
    await wait_finished(client, job["id"])
    record = await stream_job(client, job["id"], query="?proxy_buffer=0")
    assert record.status == 200
    assert not [line for line in raw_lines(record.raw) if line.text.startswith(b":")]


async def test_hint_does_not_change_the_job(client: Client) -> None:
    """Two streams of one job, hinted and not, carry the same events; the strategy is unchanged."""
    job = await create_job(client, {**FAST_JOB, "steps": 2}, strategy="none")
    hinted = await stream_job(client, job["id"], query="?proxy_buffer=4096")
    plain = await stream_job(client, job["id"])
    assert hinted.payloads() == plain.payloads()
    assert (await get_job(client, job["id"]))["strategy"] == "none"


@pytest.mark.parametrize("value", ["-1", "x", "1048577", "1.5", ""])
async def test_bad_hint_is_400_naming_it(client: Client, value: str) -> None:
    """A hint outside 0..1048576 is a 400 naming proxy_buffer."""
    job = await create_job(client, FAST_JOB)
    response = await client.get(f"/api/jobs/{job['id']}/stream?proxy_buffer={value}")
    await expect_json_error(response, 400, "proxy_buffer")
