"""Headers on every answer: nosniff, a Server without versions, no-store on job data, request ids.

The routes are enumerated from the app's router, so a route added later is checked
without being named here; errors, 204s, preflights, static files and streams are asked
for explicitly on top.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import MakeClient
from tests.support.jobs import FAST_JOB, SLOW_JOB, Client, create_job, wait_finished, wait_until

TOKEN = "header-test-token-0123456789"
AUTH_ENV = {"FLUSHLINE_API_TOKEN": TOKEN, "FLUSHLINE_SECRET_KEY": "header-secret-0123456789"}
BEARER = {"Authorization": f"Bearer {TOKEN}"}
ORIGIN = "https://app.example.com"
#: A product token with a version: ``aiohttp/3.14``, ``Python/3.11``.
VERSIONED = re.compile(r"\d|/")
STREAM_CACHE_CONTROL = "no-cache, no-transform"


def route_requests(app: web.Application, job_id: str) -> list[tuple[str, str]]:
    """A (method, path) for every route of the router, ``{job_id}`` filled in with ``job_id``."""
    requests = []
    for route in app.router.routes():
        resource = route.resource
        if resource is None:
            continue
        path = resource.canonical.replace("{job_id}", job_id)
        path = path.replace("{filename}", "flushline.js")  # a real static file
        path = re.sub(r"\{[^}]+\}", "x", path)
        requests.append((route.method, path))
    return requests


async def head_of(
    client: Client, method: str, path: str, headers: Mapping[str, str] | None = None, **kw: Any
) -> tuple[int, Mapping[str, str]]:
    """The status and headers of one answer; a stream's body is not waited for."""
    timeout = aiohttp.ClientTimeout(total=30)
    async with client.request(
        method, path, headers=dict(headers or {}), timeout=timeout, **kw
    ) as response:
        return response.status, response.headers


def assert_safe_headers(where: str, status: int, headers: Mapping[str, str]) -> None:
    """nosniff, and a Server header that names no version."""
    assert headers.get("X-Content-Type-Options") == "nosniff", (where, status, dict(headers))
    server = headers.get("Server", "")
    assert server == "flushline", (where, status, server)
    assert not VERSIONED.search(server), (where, server)


async def finished_job(client: Client, headers: Mapping[str, str] | None = None) -> str:
    """The id of a fast job that has ended."""
    response = await client.post("/api/jobs", json={"options": FAST_JOB}, headers=headers)
    assert response.status == 201, await response.text()
    job_id: str = (await response.json())["id"]

    async def ended() -> bool:
        got = await client.get(f"/api/jobs/{job_id}", headers=headers)
        return bool((await got.json())["status"] == "succeeded")

    await wait_until(ended, 15, what=f"job {job_id} to succeed")
    return job_id


class TestEveryRoute:
    """nosniff and a version-free Server on the answer of every route of the router."""

    async def test_every_route_auth_off(self, client: Client) -> None:
        """Auth off: every route's answer (streams, static, HEAD included) has both headers."""
        job_id = await finished_job(client)
        requests = route_requests(client.app, job_id)
        assert len(requests) >= 10
        for method, path in requests:
            status, headers = await head_of(client, method, path)
            assert_safe_headers(f"{method} {path}", status, headers)

    async def test_every_route_auth_on(self, make_client: MakeClient) -> None:
        """Auth on: with and without a credential (401s too), every answer has both headers."""
        client = await make_client(AUTH_ENV)
        job_id = await finished_job(client, BEARER)
        for method, path in route_requests(client.app, job_id):
            for headers in (BEARER, {}):
                status, answer = await head_of(client, method, path, headers)
                assert_safe_headers(f"{method} {path} {bool(headers)}", status, answer)

    async def test_errors_204s_preflights_and_static(self, make_client: MakeClient) -> None:
        """Errors of each kind, a stream's 204, a preflight and a missing static file too."""
        client = await make_client({"FLUSHLINE_CORS_ORIGINS": ORIGIN})
        job_id = await finished_job(client)
        last = (await (await client.get(f"/api/jobs/{job_id}")).json())["last_event_id"]
        cases: list[tuple[str, str, dict[str, str], int]] = [
            ("GET", "/no/such/route", {}, 404),
            ("DELETE", "/api/jobs", {}, 405),
            ("GET", "/api/jobs/unknown-job", {}, 404),
            ("GET", "/api/jobs?limit=0", {}, 400),
            ("GET", "/static/missing.js", {}, 404),
            ("GET", f"/api/jobs/{job_id}/stream?last_event_id={last}", {}, 204),
            ("GET", f"/api/jobs/{job_id}/stream?last_event_id=x", {}, 400),
            (
                "OPTIONS",
                "/api/jobs",
                {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"},
                204,
            ),
            (
                "POST",
                "/api/jobs",
                {"Origin": "https://evil.example.net", "Content-Type": "text/plain"},
                403,
            ),
        ]
        for method, path, headers, expected in cases:
            status, answer = await head_of(client, method, path, headers)
            assert status == expected, (method, path, status)
            assert_safe_headers(f"{method} {path}", status, answer)


class TestCacheControl:
    """Answers with job data (and their errors) are no-store; streams keep their own."""

    async def test_job_api_answers_are_no_store(self, client: Client) -> None:
        """Create, get, list, cancel (202 and 409), and their errors: Cache-Control: no-store."""
        slow = await create_job(client, SLOW_JOB)
        fast = await create_job(client, FAST_JOB)
        await wait_finished(client, fast["id"])
        cases: list[tuple[str, str, dict[str, Any], int]] = [
            ("POST", "/api/jobs", {"json": {"options": FAST_JOB}}, 201),
            ("POST", "/api/jobs", {"data": b"{not json"}, 400),
            ("GET", "/api/jobs", {}, 200),
            ("GET", "/api/jobs?status=nope", {}, 400),
            ("GET", f"/api/jobs/{fast['id']}", {}, 200),
            ("GET", "/api/jobs/unknown-job", {}, 404),
            ("POST", f"/api/jobs/{slow['id']}/cancel", {}, 202),
            ("POST", f"/api/jobs/{fast['id']}/cancel", {}, 409),
            ("GET", f"/api/jobs/{fast['id']}/events?wait_s=0", {}, 200),
        ]
        for method, path, kw, expected in cases:
            status, headers = await head_of(client, method, path, **kw)
            assert status == expected, (method, path, status)
            assert headers.get("Cache-Control") == "no-store", (method, path, dict(headers))

    async def test_auth_refusals_are_no_store(self, make_client: MakeClient) -> None:
        """401 and 403 of the job API are no-store too."""
        client = await make_client(AUTH_ENV)
        for headers, expected in (
            ({}, 401),
            ({"Authorization": "Bearer wrong-0123456789abc"}, 403),
        ):
            status, answer = await head_of(client, "GET", "/api/jobs", headers)
            assert status == expected
            assert answer.get("Cache-Control") == "no-store"

    async def test_streams_keep_their_cache_control(self, client: Client) -> None:
        """The job stream and the diagnostics stream keep no-cache, no-transform."""
        job = await create_job(client, FAST_JOB)
        for path in (job["links"]["stream"], "/api/diagnostics/stream"):
            status, headers = await head_of(client, "GET", path)
            assert status == 200, path
            assert headers["Cache-Control"] == STREAM_CACHE_CONTROL, path


class TestErrorRequestIds:
    """Every error body carries the request id its X-Request-ID header echoes."""

    @pytest.mark.parametrize(
        ("method", "path", "headers", "status"),
        [
            ("GET", "/no/such/route", {}, 404),
            ("PUT", "/api/jobs", {}, 405),
            ("GET", "/api/jobs/unknown-job", {}, 404),
            ("GET", "/api/jobs?limit=abc", {}, 400),
            ("POST", "/api/jobs", {"Origin": "https://evil.example.net"}, 403),
        ],
    )
    async def test_error_body_names_the_request_id(
        self, client: Client, method: str, path: str, headers: dict[str, str], status: int
    ) -> None:
        """A generated id and a client's own X-Request-ID both appear in the error body."""
        response = await client.request(method, path, headers=headers)
        assert response.status == status
        error = (await response.json())["error"]
        assert error["request_id"] == response.headers["X-Request-ID"]
        assert re.fullmatch(r"[0-9a-f]{16}", error["request_id"])
        given = await client.request(method, path, headers={**headers, "X-Request-ID": "req-42"})
        assert (await given.json())["error"]["request_id"] == "req-42"

    async def test_auth_errors_name_the_request_id(self, make_client: MakeClient) -> None:
        """401 and 403 bodies carry the request id too."""
        client = await make_client(AUTH_ENV)
        for headers in ({}, {"Authorization": "Bearer wrong-0123456789abc"}):
            response = await client.get("/api/jobs", headers={**headers, "X-Request-ID": "r-7"})
            assert response.status in (401, 403)
            assert (await response.json())["error"]["request_id"] == "r-7"
