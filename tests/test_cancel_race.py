"""Concurrent cancels of one running job: exactly one ``202``, every other one ``409``.

Over HTTP with the app factory, on both buses: in process the check and the claim
(``cancelling``) happen with no await between them; with Redis the claim is a ``SET NX``
shared by every instance, so the rule holds across instances too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from tests.conftest import MakeClient
from tests.support.jobs import SLOW_JOB, Client, create_job, expect_json_error, get_job
from tests.support.redis import RedisServer

CANCELS = 20


async def cancel_all(
    targets: list[Client], job_id: str, count: int
) -> list[tuple[int, Mapping[str, Any]]]:
    """``count`` cancels of the job sent at once, spread over ``targets``: (status, body)."""

    async def cancel(client: Client) -> tuple[int, Mapping[str, Any]]:
        response = await client.post(f"/api/jobs/{job_id}/cancel")
        if response.status == 409:
            return 409, await expect_json_error(response, 409)
        body = await response.json()
        assert isinstance(body, dict)
        return response.status, body

    return await asyncio.gather(*(cancel(targets[i % len(targets)]) for i in range(count)))


def check_one_accepted(answers: list[tuple[int, Mapping[str, Any]]], job_id: str) -> None:
    """One 202 showing the cancelled job, and only 409 ``job_finished`` besides."""
    statuses = sorted(status for status, _ in answers)
    assert statuses == [202] + [409] * (len(answers) - 1), statuses
    accepted = next(body for status, body in answers if status == 202)
    assert accepted["id"] == job_id
    assert accepted["status"] == "cancelled"
    codes = {body["code"] for status, body in answers if status == 409}
    assert codes == {"job_finished"}


class TestConcurrentCancels:
    async def test_twenty_cancels_give_one_202(
        self, make_client: MakeClient, bus_env: dict[str, str]
    ) -> None:
        """20 concurrent cancels of one running job: one 202, nineteen 409 job_finished."""
        client = await make_client(bus_env)
        job = await create_job(client, SLOW_JOB)
        answers = await cancel_all([client], job["id"], CANCELS)
        check_one_accepted(answers, job["id"])
        assert (await get_job(client, job["id"]))["status"] == "cancelled"

    async def test_cancels_of_a_queued_job_give_one_202(
        self, make_client: MakeClient, bus_env: dict[str, str]
    ) -> None:
        """Cancels sent before the job's task has even started: still exactly one 202."""
        client = await make_client(bus_env)
        response = await client.post("/api/jobs", json={"options": SLOW_JOB})
        assert response.status == 201
        job_id = (await response.json())["id"]
        # No await between the create's answer and the burst: the job may still be queued.
        answers = await cancel_all([client], job_id, CANCELS)
        check_one_accepted(answers, job_id)

    async def test_cancels_spread_over_two_instances_give_one_202(
        self, make_client: MakeClient, redis_server: RedisServer
    ) -> None:
        """With Redis, 20 cancels spread over two instances: one 202 in all."""
        env = {"FLUSHLINE_BUS": "redis", "FLUSHLINE_REDIS_URL": redis_server.url}
        first = await make_client(env)
        second = await make_client(env)
        job = await create_job(first, SLOW_JOB)
        answers = await cancel_all([first, second], job["id"], CANCELS)
        check_one_accepted(answers, job["id"])
