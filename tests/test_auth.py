"""Auth: bearer API tokens on the job API, signed per-job stream tokens on its streams.

With ``FLUSHLINE_API_TOKEN`` unset everything is open, as before. Set, no route of the
job API answers a job's data without a credential for that job: the routes are found by
enumerating the router, so a route added later is checked without being named here.
"""

from __future__ import annotations

import asyncio
import pathlib
import secrets
import signal
import sys
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from app.client import ClientError, stream_url, watch_job
from app.client import cancel_job as client_cancel_job
from app.client import create_job as client_create_job
from app.client import get_job as client_get_job
from app.jobs.manager import JobManager
from app.jobs.store import JobSnapshot
from app.web.auth import STREAM_TOKEN_ROUTES, guarded
from tests.conftest import MakeClient
from tests.support.jobs import (
    FAST_JOB,
    SLOW_JOB,
    Client,
    expect_json_error,
    wait_until,
)
from tests.support.process import (
    clean_env,
    free_port,
    json_lines,
    read_log,
    server_process,
    wait_accepting,
)
from tests.support.redis import RedisServer
from tests.support.sse_client import read_stream

if TYPE_CHECKING:
    from playwright.async_api import Browser

TOKEN_A = "alpha-token-0123456789abcdef"
TOKEN_B = "bravo-token-0123456789abcdef"
SECRET = "secret-key-for-tests-0123456789"
AUTH_ENV = {"FLUSHLINE_API_TOKEN": f"{TOKEN_A},{TOKEN_B}", "FLUSHLINE_SECRET_KEY": SECRET}
#: Fields only a job snapshot (or a list of them) has: none may appear in a refusal.
JOB_FIELDS = ("steps", "pipeline", "progress", "jobs", "events", "last_event_id")


def bearer(token: str) -> dict[str, str]:
    """The ``Authorization`` header of an API token."""
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def auth_client(make_client: MakeClient) -> Client:
    """The app with two API tokens configured and a fixed secret key."""
    return await make_client(AUTH_ENV)


async def create(
    client: Client, token: str | None, options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Create a job with ``token`` (None: no credential); assert 201; the snapshot."""
    headers = bearer(token) if token is not None else {}
    response = await client.post(
        "/api/jobs", json={"options": options or FAST_JOB}, headers=headers
    )
    assert response.status == 201, await response.text()
    snapshot: dict[str, Any] = await response.json()
    return snapshot


async def wait_done(client: Client, job_id: str, token: str) -> dict[str, Any]:
    """Poll the job with ``token`` until it has ended; its snapshot."""
    seen: dict[str, Any] = {}

    async def ended() -> bool:
        response = await client.get(f"/api/jobs/{job_id}", headers=bearer(token))
        assert response.status == 200, await response.text()
        seen.update(await response.json())
        return seen["status"] in {"succeeded", "failed", "cancelled"}

    await wait_until(ended, 15, what=f"job {job_id} to end")
    return seen


def token_of(link: str) -> str:
    """The ``token`` query parameter of a ``links`` URL."""
    query = link.partition("?")[2]
    params = dict(part.split("=", 1) for part in query.split("&") if part)
    return params["token"]


def job_routes(app: web.Application) -> list[tuple[str, str]]:
    """Every (method, canonical path) of the router that carries job data."""
    routes = []
    for route in app.router.routes():
        resource = route.resource
        if resource is None or route.method in ("HEAD", "OPTIONS"):
            continue
        if guarded(resource.canonical):
            routes.append((route.method, resource.canonical))
    return routes


def flip(text: str, index: int) -> str:
    """``text`` with the character at ``index`` replaced by a different base64url one."""
    replacement = "A" if text[index] != "A" else "B"
    return text[:index] + replacement + text[index + 1 :]


def assert_no_job_data(body: bytes, job_id: str) -> None:
    """A refusal body: the contract's JSON error, naming no field of a job."""
    decoded = orjson.loads(body)
    assert set(decoded) == {"error"}, body
    for field in JOB_FIELDS:
        assert f'"{field}"' not in body.decode(), body


class TestAuthOff:
    """Without FLUSHLINE_API_TOKEN the API is open, as before issue 8."""

    async def test_everything_answers_without_a_credential(self, client: Client) -> None:
        """Create, get, list, stream and long-poll answer with no header; links carry no token."""
        job = await create(client, None)
        assert "token=" not in job["links"]["stream"]
        assert job["links"]["events"] == f"/api/jobs/{job['id']}/events"
        record = await read_stream(client.session, str(client.make_url(job["links"]["stream"])))
        assert record.status == 200
        assert record.payloads()[-1]["type"] == "done"
        poll = await client.get(job["links"]["events"] + "?after=0&wait_s=0")
        assert poll.status == 200
        assert (await poll.json())["done"] is True
        listing = await (await client.get("/api/jobs")).json()
        assert [j["id"] for j in listing["jobs"]] == [job["id"]]
        assert (await client.get(f"/api/jobs/{job['id']}")).status == 200


class TestBearer:
    """The job API needs Authorization: Bearer with a configured token."""

    async def test_missing_credential_is_401_with_challenge(self, auth_client: Client) -> None:
        """No Authorization header: a JSON 401 with WWW-Authenticate: Bearer."""
        response = await auth_client.post("/api/jobs", json={"options": FAST_JOB})
        error = await expect_json_error(response, 401, "Authorization")
        assert error["code"] == "unauthenticated"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await auth_client.get("/api/jobs")).status == 401

    async def test_wrong_token_is_403(self, auth_client: Client) -> None:
        """A token not configured, or another scheme, is a JSON 403 and creates nothing."""
        for header in ("Bearer not-a-configured-token-123", f"Basic {TOKEN_A}", "Bearer"):
            response = await auth_client.post(
                "/api/jobs", json={"options": FAST_JOB}, headers={"Authorization": header}
            )
            error = await expect_json_error(response, 403)
            assert error["code"] == "invalid_token", header
        listing = await (await auth_client.get("/api/jobs", headers=bearer(TOKEN_A))).json()
        assert listing["jobs"] == []

    async def test_both_configured_tokens_work(self, auth_client: Client) -> None:
        """Rotation: with two tokens configured, each creates, reads and cancels its jobs."""
        for token in (TOKEN_A, TOKEN_B):
            job = await create(auth_client, token, SLOW_JOB)
            got = await auth_client.get(f"/api/jobs/{job['id']}", headers=bearer(token))
            assert got.status == 200
            cancel = await auth_client.post(f"/api/jobs/{job['id']}/cancel", headers=bearer(token))
            assert cancel.status == 202, await cancel.text()

    async def test_list_shows_only_the_callers_jobs(self, auth_client: Client) -> None:
        """GET /api/jobs lists the jobs created with the caller's token, and only those."""
        mine = [(await create(auth_client, TOKEN_A))["id"] for _ in range(2)]
        theirs = (await create(auth_client, TOKEN_B))["id"]
        listed_a = await (await auth_client.get("/api/jobs", headers=bearer(TOKEN_A))).json()
        listed_b = await (await auth_client.get("/api/jobs", headers=bearer(TOKEN_B))).json()
        assert sorted(j["id"] for j in listed_a["jobs"]) == sorted(mine)
        assert [j["id"] for j in listed_b["jobs"]] == [theirs]
        for job_id in mine:
            await wait_done(auth_client, job_id, TOKEN_A)
        await wait_done(auth_client, theirs, TOKEN_B)
        filtered = await auth_client.get(
            "/api/jobs?status=succeeded&limit=10", headers=bearer(TOKEN_A)
        )
        assert sorted(j["id"] for j in (await filtered.json())["jobs"]) == sorted(mine)

    async def test_another_tokens_job_is_answered_as_unknown(self, auth_client: Client) -> None:
        """Get, cancel, stream and long-poll of another token's job: the 404 of a missing job."""
        job = await create(auth_client, TOKEN_A, SLOW_JOB)
        base = f"/api/jobs/{job['id']}"
        for method, path in (
            ("GET", base),
            ("POST", f"{base}/cancel"),
            ("GET", f"{base}/stream"),
            ("GET", f"{base}/events?wait_s=0"),
        ):
            response = await auth_client.request(method, path, headers=bearer(TOKEN_B))
            error = await expect_json_error(response, 404, job["id"])
            assert error["code"] == "job_not_found", path
        missing = await auth_client.get("/api/jobs/no-such-job-id", headers=bearer(TOKEN_B))
        assert (await expect_json_error(missing, 404))["code"] == "job_not_found"
        still = await auth_client.get(base, headers=bearer(TOKEN_A))
        assert (await still.json())["status"] in {"queued", "running"}  # B's cancel did nothing

    async def test_owner_bearer_opens_stream_and_poll(self, auth_client: Client) -> None:
        """The owner's bearer header alone opens the stream and the long-poll (no ?token=)."""
        job = await create(auth_client, TOKEN_A)
        base = f"/api/jobs/{job['id']}"
        record = await read_stream(
            auth_client.session,
            str(auth_client.make_url(f"{base}/stream")),
            headers=bearer(TOKEN_A),
        )
        assert record.status == 200
        assert record.payloads()[-1]["type"] == "done"
        poll = await auth_client.get(f"{base}/events?after=0&wait_s=0", headers=bearer(TOKEN_A))
        assert poll.status == 200

    async def test_a_job_route_reads_the_job_once(
        self, auth_client: Client, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With a bearer, GET job, stream and long-poll each read the job once, not twice."""
        job = await create(auth_client, TOKEN_A)
        await wait_done(auth_client, job["id"], TOKEN_A)
        reads: list[str] = []
        get = JobManager.get

        async def counted(self: JobManager, job_id: str) -> JobSnapshot:
            reads.append(job_id)
            return await get(self, job_id)

        monkeypatch.setattr(JobManager, "get", counted)
        base = f"/api/jobs/{job['id']}"
        for path in (base, f"{base}/stream", f"{base}/events?after=0&wait_s=0"):
            reads.clear()
            async with auth_client.get(path, headers=bearer(TOKEN_A)) as response:
                assert response.status == 200, path
                await response.read()
            assert reads == [job["id"]], path

    async def test_preflight_is_not_blocked(self, make_client: MakeClient) -> None:
        """A CORS preflight (which never carries credentials) is answered, not 401."""
        origin = "https://app.example.com"
        client = await make_client({**AUTH_ENV, "FLUSHLINE_CORS_ORIGINS": origin})
        response = await client.options(
            "/api/jobs",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert response.status == 204
        assert "Authorization" in response.headers["Access-Control-Allow-Headers"]


class TestEveryJobRoute:
    """Every route of the router that carries job data refuses without a valid credential."""

    async def test_router_enumeration_covers_the_job_api(self, auth_client: Client) -> None:
        """The enumeration finds the API's six job routes (so the tests below are not vacuous)."""
        found = set(job_routes(auth_client.app))
        assert {
            ("POST", "/api/jobs"),
            ("GET", "/api/jobs"),
            ("GET", "/api/jobs/{job_id}"),
            ("POST", "/api/jobs/{job_id}/cancel"),
            ("GET", "/api/jobs/{job_id}/stream"),
            ("GET", "/api/jobs/{job_id}/events"),
        } <= found

    async def test_no_route_answers_without_a_credential(self, auth_client: Client) -> None:
        """Without any credential every job route is a JSON 401 naming no job data."""
        job = await create(auth_client, TOKEN_A)
        for method, canonical in job_routes(auth_client.app):
            path = canonical.replace("{job_id}", job["id"])
            response = await auth_client.request(method, path)
            body = await response.read()
            assert response.status == 401, (method, path, body)
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert_no_job_data(body, job["id"])

    async def test_no_route_answers_a_wrong_token(self, auth_client: Client) -> None:
        """A wrong bearer token (and a wrong ?token= where one is taken) is a JSON 403 anywhere."""
        job = await create(auth_client, TOKEN_A)
        for method, canonical in job_routes(auth_client.app):
            path = canonical.replace("{job_id}", job["id"])
            response = await auth_client.request(
                method, path, headers=bearer("wrong-token-0123456789abcdef")
            )
            body = await response.read()
            assert response.status == 403, (method, path, body)
            assert_no_job_data(body, job["id"])
            if canonical in STREAM_TOKEN_ROUTES:
                response = await auth_client.request(method, f"{path}?token=forged.token")
                body = await response.read()
                assert response.status == 403, (method, path, body)
                assert_no_job_data(body, job["id"])

    async def test_no_job_route_opens_another_tokens_job(self, auth_client: Client) -> None:
        """Every route with a {job_id}, asked by another configured token, is the 404 of no job."""
        job = await create(auth_client, TOKEN_A)
        routes = [(m, c) for m, c in job_routes(auth_client.app) if "{job_id}" in c]
        assert routes
        for method, canonical in routes:
            path = canonical.replace("{job_id}", job["id"])
            response = await auth_client.request(method, path, headers=bearer(TOKEN_B))
            body = await response.read()
            assert response.status == 404, (method, path, body)
            assert_no_job_data(body, job["id"])


class TestStreamTokens:
    """links.stream and links.events carry a signed token that opens that one job's events."""

    async def test_every_snapshot_carries_stream_and_events_tokens(
        self, auth_client: Client
    ) -> None:
        """Create, get, list and cancel answers all carry ?token= in links.stream and events."""
        job = await create(auth_client, TOKEN_A, SLOW_JOB)
        base = f"/api/jobs/{job['id']}"
        got = await (await auth_client.get(base, headers=bearer(TOKEN_A))).json()
        listed = await (await auth_client.get("/api/jobs", headers=bearer(TOKEN_A))).json()
        cancelled = await (await auth_client.post(f"{base}/cancel", headers=bearer(TOKEN_A))).json()
        for snapshot in (job, got, listed["jobs"][0], cancelled):
            links = snapshot["links"]
            assert links["stream"].startswith(f"{base}/stream?token=")
            assert links["events"].startswith(f"{base}/events?token=")
            assert token_of(links["stream"])
            assert TOKEN_A not in orjson.dumps(snapshot).decode()
            assert "owner" not in snapshot

    async def test_stream_token_opens_stream_and_poll(self, auth_client: Client) -> None:
        """links.stream alone (no header) streams to done; links.events alone long-polls."""
        job = await create(auth_client, TOKEN_A)
        url = str(auth_client.make_url(job["links"]["stream"]))
        record = await read_stream(auth_client.session, url)
        assert record.status == 200
        assert record.payloads()[0]["type"] == "job_started"
        assert record.payloads()[-1]["type"] == "done"
        poll = await auth_client.get(job["links"]["events"] + "&after=0&wait_s=5")
        assert poll.status == 200
        body = await poll.json()
        assert body["events"][0]["seq"] == 1

    async def test_token_works_with_the_other_query_parameters(self, auth_client: Client) -> None:
        """?token= combines with last_event_id, proxy_buffer, after, wait_s and limit."""
        job = await create(auth_client, TOKEN_A)
        await wait_done(auth_client, job["id"], TOKEN_A)
        stream = job["links"]["stream"]
        url = str(auth_client.make_url(f"{stream}&last_event_id=2&proxy_buffer=2048"))
        record = await read_stream(auth_client.session, url)
        assert record.status == 200
        assert record.seqs()[0] == 3
        poll = await auth_client.get(job["links"]["events"] + "&after=2&wait_s=1&limit=1")
        assert poll.status == 200
        assert [e["seq"] for e in (await poll.json())["events"]] == [3]

    async def test_stream_without_credential_is_401(self, auth_client: Client) -> None:
        """Stream and long-poll without ?token= or a bearer header: JSON 401 naming ?token=."""
        job = await create(auth_client, TOKEN_A)
        for suffix in ("stream", "events"):
            response = await auth_client.get(f"/api/jobs/{job['id']}/{suffix}")
            error = await expect_json_error(response, 401, "?token=")
            assert error["code"] == "unauthenticated"

    async def test_token_of_job_a_never_opens_job_b(self, auth_client: Client) -> None:
        """A's stream token on B's stream or long-poll is a 403 naming the other job."""
        job_a = await create(auth_client, TOKEN_A)
        job_b = await create(auth_client, TOKEN_A)
        token_a = token_of(job_a["links"]["stream"])
        for suffix in ("stream", "events"):
            response = await auth_client.get(f"/api/jobs/{job_b['id']}/{suffix}?token={token_a}")
            error = await expect_json_error(response, 403, "another job")
            assert error["code"] == "stream_token_wrong_job"

    async def test_expired_token_is_403(self, make_client: MakeClient) -> None:
        """A token past FLUSHLINE_STREAM_TOKEN_TTL_S is a 403 naming the expiry."""
        client = await make_client({**AUTH_ENV, "FLUSHLINE_STREAM_TOKEN_TTL_S": "0.5"})
        job = await create(client, TOKEN_A)
        fresh = await client.get(job["links"]["events"] + "&wait_s=0")
        assert fresh.status == 200, await fresh.text()
        await asyncio.sleep(1.5)
        for link in (job["links"]["stream"], job["links"]["events"]):
            error = await expect_json_error(await client.get(link), 403, "expired")
            assert error["code"] == "stream_token_expired"

    async def test_expired_token_with_owner_bearer_still_opens(
        self, make_client: MakeClient
    ) -> None:
        """An expired ?token= next to the owner's bearer header is judged by the header."""
        client = await make_client({**AUTH_ENV, "FLUSHLINE_STREAM_TOKEN_TTL_S": "0.5"})
        job = await create(client, TOKEN_A)
        await asyncio.sleep(1.5)
        response = await client.get(job["links"]["events"] + "&wait_s=0", headers=bearer(TOKEN_A))
        assert response.status == 200
        other = await client.get(job["links"]["events"] + "&wait_s=0", headers=bearer(TOKEN_B))
        assert other.status == 404

    async def test_tampered_token_is_403(self, auth_client: Client) -> None:
        """Any character changed, in the signature or in the payload, is a 403 bad signature."""
        job = await create(auth_client, TOKEN_A)
        token = token_of(job["links"]["stream"])
        payload, _, signature = token.partition(".")
        tampered = [
            f"{payload}.{flip(signature, 0)}",
            f"{payload}.{flip(signature, len(signature) // 2)}",
            f"{payload}.{flip(signature, len(signature) - 1)}",  # only padding bits, decoded
            f"{flip(payload, 0)}.{signature}",
            f"{flip(payload, len(payload) - 1)}.{signature}",
            f"{payload}.{signature}x",
            f"{payload}{signature}",
            "",
        ]
        for bad in tampered:
            response = await auth_client.get(f"/api/jobs/{job['id']}/stream?token={bad}")
            error = await expect_json_error(response, 403)
            assert error["code"] == "invalid_stream_token", bad
        ok = await auth_client.get(job["links"]["events"] + "&wait_s=0")
        assert ok.status == 200

    async def test_token_signed_with_another_key_is_refused(self, make_client: MakeClient) -> None:
        """A token from a deployment with another secret key does not open this one's jobs."""
        ours = await make_client(AUTH_ENV)
        theirs = await make_client(
            {**AUTH_ENV, "FLUSHLINE_SECRET_KEY": "another-secret-0123456789"}
        )
        job = await create(ours, TOKEN_A)
        foreign = await create(theirs, TOKEN_A)
        forged = token_of(foreign["links"]["stream"])
        response = await ours.get(f"/api/jobs/{job['id']}/stream?token={forged}")
        assert (await expect_json_error(response, 403))["code"] == "invalid_stream_token"

    async def test_instances_sharing_the_key_accept_each_others_tokens(
        self, make_client: MakeClient
    ) -> None:
        """With one FLUSHLINE_SECRET_KEY, a token issued by one instance verifies on another."""
        first = await make_client(AUTH_ENV)
        second = await make_client(AUTH_ENV)
        job = await create(first, TOKEN_A)
        token = token_of(job["links"]["stream"])
        # The second instance has no such job (memory bus), so past auth it answers 404.
        response = await second.get(f"/api/jobs/{job['id']}/events?token={token}&wait_s=0")
        assert (await expect_json_error(response, 404))["code"] == "job_not_found"


class TestRedisBus:
    """With FLUSHLINE_BUS=redis, owners and stream tokens hold across instances."""

    async def test_two_instances_share_owners_and_stream_tokens(
        self, make_client: MakeClient, redis_server: RedisServer
    ) -> None:
        """A job made on one instance: its stream token and its owner's bearer open it on the
        other, another token gets 404 there, and each list shows only the caller's jobs."""
        # A key of this test alone: jobs of other tests in the shared Redis have other owners.
        env = {
            **AUTH_ENV,
            "FLUSHLINE_SECRET_KEY": secrets.token_urlsafe(24),
            "FLUSHLINE_BUS": "redis",
            "FLUSHLINE_REDIS_URL": redis_server.url,
        }
        first = await make_client(env)
        second = await make_client(env)
        job = await create(first, TOKEN_A)
        theirs = await create(second, TOKEN_B)
        record = await read_stream(second.session, str(second.make_url(job["links"]["stream"])))
        assert record.status == 200
        assert record.payloads()[-1]["type"] == "done"
        base = f"/api/jobs/{job['id']}"
        assert (await second.get(base, headers=bearer(TOKEN_A))).status == 200
        refused = await second.get(base, headers=bearer(TOKEN_B))
        assert (await expect_json_error(refused, 404))["code"] == "job_not_found"
        for client in (first, second):
            listed_a = await (await client.get("/api/jobs", headers=bearer(TOKEN_A))).json()
            listed_b = await (await client.get("/api/jobs", headers=bearer(TOKEN_B))).json()
            assert [j["id"] for j in listed_a["jobs"]] == [job["id"]]
            assert [j["id"] for j in listed_b["jobs"]] == [theirs["id"]]


class TestClient:
    """app.client's token= argument."""

    async def test_client_calls_with_token(self, auth_client: Client) -> None:
        """create/get/cancel/watch with token= work; without it a ClientError 401."""
        base = str(auth_client.make_url("/"))
        with pytest.raises(ClientError) as refused:
            await client_create_job(base, options=FAST_JOB)
        assert refused.value.status == 401
        job = await client_create_job(base, options=FAST_JOB, token=TOKEN_A)
        assert (await client_get_job(base, job["id"], token=TOKEN_A))["id"] == job["id"]
        events = [event async for event in watch_job(stream_url(base, job))]
        assert events[-1].type == "done"
        with pytest.raises(ClientError) as finished:
            await client_cancel_job(base, job["id"], token=TOKEN_A)
        assert finished.value.status == 409
        slow = await client_create_job(base, options=SLOW_JOB, token=TOKEN_A)
        cancelled = await client_cancel_job(base, slow["id"], token=TOKEN_A)
        assert cancelled["id"] == slow["id"]
        watched = [e async for e in watch_job(stream_url(base, slow), token=TOKEN_A)]
        assert watched[-1].data["status"] == "cancelled"
        with pytest.raises(ClientError) as other:
            await client_get_job(base, job["id"], token=TOKEN_B)
        assert other.value.status == 404


class TestBrowser:
    """In Chromium, EventSource and flushline.js follow links.stream with its token."""

    async def test_event_source_and_flushline_js_with_stream_token(
        self, auth_client: Client, browser: Browser
    ) -> None:
        """The page creates a job with its bearer; EventSource and every flushline.js transport
        stream it from links.stream alone, resuming with the token kept in the URL."""
        page = await browser.new_page()
        await page.goto(str(auth_client.make_url("/")))
        result = await page.evaluate(
            """async ([token, options]) => {
                const create = async () => {
                    const r = await fetch("/api/jobs", {
                        method: "POST",
                        headers: {"Content-Type": "application/json",
                                  "Authorization": "Bearer " + token},
                        body: JSON.stringify({options}),
                    });
                    return r.json();
                };
                const job = await create();
                const native = await new Promise((resolve, reject) => {
                    const seen = [];
                    const source = new EventSource(job.links.stream);
                    source.addEventListener("done", (e) => {
                        seen.push(JSON.parse(e.data).seq); source.close(); resolve(seen);
                    });
                    source.onerror = () => { source.close(); reject(new Error("failed")); };
                });
                const anonymous = await fetch(job.links.stream.split("?")[0]);
                const { watchJob } = await import("/static/flushline.js");
                const transports = {};
                for (const transport of ["fetch-stream", "eventsource", "long-poll"]) {
                    const watcher = watchJob(job.links.stream,
                        {transport, sensing: false, lastEventId: 2});
                    const final = await watcher.done;
                    transports[transport] = {
                        status: final.status ?? watcher.state.status,
                        events: watcher.state.events,
                    };
                    watcher.close();
                }
                return {native, anonymous: anonymous.status, transports};
            }""",
            [TOKEN_A, FAST_JOB],
        )
        assert result["native"], result
        assert result["anonymous"] == 401
        for transport, outcome in result["transports"].items():
            assert outcome["status"] == "succeeded", (transport, result)
            assert outcome["events"] > 0, (transport, result)


class TestLogs:
    """Neither API tokens nor stream tokens reach a log line."""

    async def test_no_token_in_any_log_line(self, tmp_path: pathlib.Path) -> None:
        """A JSON-logging server with auth on, driven through every job route and failure
        (wrong, expired, tampered tokens), logs neither a token nor a signature."""
        port = free_port()
        log = tmp_path / "server.log"
        env = clean_env(
            PORT=str(port),
            FLUSHLINE_LOG_FORMAT="json",
            FLUSHLINE_STREAM_TOKEN_TTL_S="1",
            **AUTH_ENV,
        )
        secrets_seen: set[str] = {TOKEN_A, TOKEN_B, SECRET}
        async with server_process([sys.executable, "-m", "app"], env, log) as process:
            await wait_accepting(process, port)
            base = f"http://127.0.0.1:{port}"
            async with aiohttp.ClientSession() as session:
                async with session.post(
                    f"{base}/api/jobs", json={"options": FAST_JOB}, headers=bearer(TOKEN_A)
                ) as response:
                    assert response.status == 201
                    job = await response.json()
                stream_token = token_of(job["links"]["stream"])
                secrets_seen |= {stream_token, *stream_token.split(".")}
                record = await read_stream(session, base + job["links"]["stream"])
                assert record.payloads()[-1]["type"] == "done"
                for path, headers in (
                    (job["links"]["events"] + "&after=0&wait_s=0", {}),
                    (job["links"]["stream"] + "&last_event_id=1", {}),
                    (f"/api/jobs/{job['id']}", bearer(TOKEN_A)),
                    ("/api/jobs", bearer(TOKEN_B)),
                    ("/api/jobs", bearer("wrong-token-0123456789abcdef")),
                    (f"/api/jobs/{job['id']}/stream?token={stream_token}x", {}),
                    (f"/api/jobs/{job['id']}", bearer(TOKEN_B)),
                ):
                    async with session.get(base + path, headers=headers) as response:
                        await response.read()
                        assert response.status < 500, path
                await asyncio.sleep(1.5)
                async with session.get(base + job["links"]["stream"]) as response:
                    assert response.status == 403
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), 10) == 0
        text = read_log(log)
        lines = json_lines(text)
        requests = [line for line in lines if line["message"] == "request"]
        assert len(requests) >= 10, text
        assert any(line["message"] == "stream closed" for line in lines)
        secrets_seen.add("wrong-token-0123456789abcdef")
        for secret in secrets_seen:
            assert secret not in text, f"{secret[:6]}... is in the log"
