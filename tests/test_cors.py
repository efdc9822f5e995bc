"""CORS: allowed origins read the API and streams, others get nothing and change nothing."""

from __future__ import annotations

import pathlib
import socket
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import MakeClient
from tests.support.jobs import FAST_JOB, Client, create_job, expect_json_error, wait_finished
from tests.support.nginx import NginxMode, require_nginx, run_nginx

if TYPE_CHECKING:
    from playwright.async_api import Browser

ALLOWED = "https://app.example.com"
OTHER = "https://evil.example.net"


@pytest.fixture
async def cors_client(make_client: MakeClient) -> Client:
    """The app allowing one explicit origin."""
    return await make_client({"FLUSHLINE_CORS_ORIGINS": f"{ALLOWED},http://localhost:3000"})


async def job_count(client: Client) -> int:
    """How many jobs the service knows."""
    response = await client.get("/api/jobs")
    return len((await response.json())["jobs"])


class TestHeaders:
    """CORS headers over HTTP."""

    async def test_preflight_from_allowed_origin(self, cors_client: Client) -> None:
        """A preflight from an allowed origin is a 204 naming the origin, methods and headers."""
        response = await cors_client.options(
            "/api/jobs",
            headers={
                "Origin": ALLOWED,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
        assert response.headers["Access-Control-Allow-Credentials"] == "true"
        assert "POST" in response.headers["Access-Control-Allow-Methods"]
        assert "Content-Type" in response.headers["Access-Control-Allow-Headers"]
        assert "Last-Event-ID" in response.headers["Access-Control-Allow-Headers"]

    async def test_preflight_from_other_origin_is_refused(self, cors_client: Client) -> None:
        """A preflight from an origin not listed is a JSON 403 with no CORS header."""
        response = await cors_client.options(
            "/api/jobs",
            headers={"Origin": OTHER, "Access-Control-Request-Method": "POST"},
        )
        await expect_json_error(response, 403, OTHER)
        assert not [h for h in response.headers if h.lower().startswith("access-control-")]

    async def test_allowed_origin_reads_jobs_and_streams(self, cors_client: Client) -> None:
        """POST, GET and the stream from an allowed origin carry its Allow-Origin header."""
        response = await cors_client.post(
            "/api/jobs", json={"options": FAST_JOB}, headers={"Origin": ALLOWED}
        )
        assert response.status == 201
        assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
        assert "Location" in response.headers["Access-Control-Expose-Headers"]
        job = await response.json()
        stream = await cors_client.get(job["links"]["stream"], headers={"Origin": ALLOWED})
        assert stream.status == 200
        assert stream.headers["Access-Control-Allow-Origin"] == ALLOWED
        assert b"event: done" in await stream.read()

    async def test_other_origin_gets_no_cors_headers(self, cors_client: Client) -> None:
        """A GET from an origin not listed is answered without any CORS header."""
        response = await cors_client.get("/api/jobs", headers={"Origin": OTHER})
        assert response.status == 200
        assert "Access-Control-Allow-Origin" not in response.headers
        assert "Origin" in response.headers["Vary"]

    @pytest.mark.parametrize("path", ["/api/jobs", "/api/jobs/x/cancel"])
    async def test_cross_site_text_plain_post_is_refused(
        self, cors_client: Client, path: str
    ) -> None:
        """A form-style text/plain POST from another origin is a 403 and changes nothing."""
        before = await job_count(cors_client)
        response = await cors_client.post(
            path,
            data='{"options": {"steps": 1}}',
            headers={"Origin": OTHER, "Content-Type": "text/plain"},
        )
        await expect_json_error(response, 403)
        assert await job_count(cors_client) == before

    async def test_cross_site_cancel_is_refused(self, cors_client: Client) -> None:
        """A cancel from another origin does not cancel the job."""
        job = await create_job(cors_client, {"steps": 1, "tokens_per_step": 400})
        response = await cors_client.post(
            f"/api/jobs/{job['id']}/cancel", headers={"Origin": OTHER}
        )
        await expect_json_error(response, 403)
        snapshot = await wait_finished(cors_client, job["id"], timeout_s=30)
        assert snapshot["status"] == "succeeded"

    async def test_same_origin_without_configuration(self, client: Client) -> None:
        """Unset, a page of the service itself (Origin = its host) may POST; others may not."""
        own = f"http://{client.host}:{client.port}"
        ok = await client.post("/api/jobs", json={"options": FAST_JOB}, headers={"Origin": own})
        assert ok.status == 201
        assert "Access-Control-Allow-Origin" not in ok.headers
        refused = await client.post("/api/jobs", json={}, headers={"Origin": OTHER})
        await expect_json_error(refused, 403)

    async def test_star_allows_any_origin_without_credentials(
        self, make_client: MakeClient
    ) -> None:
        """With *, any origin may POST and read; the answer is * without credentials."""
        client = await make_client({"FLUSHLINE_CORS_ORIGINS": "*"})
        response = await client.post(
            "/api/jobs", json={"options": FAST_JOB}, headers={"Origin": OTHER}
        )
        assert response.status == 201
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        assert "Access-Control-Allow-Credentials" not in response.headers


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
async def origin_site() -> AsyncIterator[str]:
    """A second web site (another port, so another origin) serving a blank page."""
    site_app = web.Application()

    async def blank(request: web.Request) -> web.Response:
        return web.Response(
            text="<!doctype html><title>other site</title>", content_type="text/html"
        )

    site_app.router.add_get("/", blank)
    runner = web.AppRunner(site_app)
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


_CROSS_ORIGIN_JOB = """async ([api, options]) => {
    const response = await fetch(api + "/api/jobs", {
        method: "POST",
        headers: {"Content-Type": "application/json"},
        body: JSON.stringify({options}),
    });
    const job = await response.json();
    const events = await new Promise((resolve, reject) => {
        const seen = [];
        const source = new EventSource(api + job.links.stream, {withCredentials: true});
        source.onmessage = () => {};
        for (const type of ["job_started", "step_started", "chunk", "done"]) {
            source.addEventListener(type, (e) => {
                seen.push(type);
                if (type === "done") { source.close(); resolve(seen); }
            });
        }
        source.onerror = () => { source.close(); reject(new Error("EventSource failed")); };
    });
    return {status: response.status, events};
}"""


async def test_browser_allowed_origin_streams(
    make_client: MakeClient, browser: Browser, origin_site: str
) -> None:
    """In Chromium, a page from an allowed origin creates a job and streams it with credentials."""
    client = await make_client({"FLUSHLINE_CORS_ORIGINS": origin_site})
    api = f"http://127.0.0.1:{client.port}"
    page = await browser.new_page()
    await page.goto(origin_site)
    result = await page.evaluate(_CROSS_ORIGIN_JOB, [api, FAST_JOB])
    assert result["status"] == 201
    assert result["events"][0] == "job_started"
    assert result["events"][-1] == "done"


async def test_browser_other_origin_is_refused(
    make_client: MakeClient, browser: Browser, origin_site: str
) -> None:
    """In Chromium, a page from another origin can neither read, stream nor create a job."""
    client = await make_client({"FLUSHLINE_CORS_ORIGINS": "https://app.example.com"})
    job = await create_job(client, FAST_JOB)
    api = f"http://127.0.0.1:{client.port}"
    page = await browser.new_page()
    await page.goto(origin_site)
    before = await job_count(client)
    outcome = await page.evaluate(
        """async ([api, stream]) => {
            const out = {};
            try { await fetch(api + "/api/jobs"); out.read = "read"; }
            catch (e) { out.read = "blocked"; }
            out.stream = await new Promise((resolve) => {
                const source = new EventSource(api + stream);
                source.addEventListener("done", () => { source.close(); resolve("read"); });
                source.onerror = () => { source.close(); resolve("blocked"); };
            });
            // A form-style POST needs no preflight: the server itself must refuse it.
            const sent = await fetch(api + "/api/jobs", {
                method: "POST", mode: "no-cors",
                headers: {"Content-Type": "text/plain"},
                body: JSON.stringify({options: {steps: 1}}),
            });
            out.post = sent.type;
            return out;
        }""",
        [api, job["links"]["stream"]],
    )
    assert outcome["read"] == "blocked"
    assert outcome["stream"] == "blocked"
    assert outcome["post"] == "opaque"
    assert await job_count(client) == before


class TestBehindAProxy:
    """The service's own page stays same-origin when a reverse proxy rewrites Host."""

    async def test_forwarded_host_is_the_page_origin(self, client: Client) -> None:
        """Origin equal to X-Forwarded-Host (the proxy's front) is the service's own page."""
        response = await client.post(
            "/api/jobs",
            json={"options": FAST_JOB},
            headers={
                "Origin": "https://flushline.example.com",
                "X-Forwarded-Host": "flushline.example.com",
            },
        )
        assert response.status == 201

    async def test_browser_same_origin_header(self, client: Client) -> None:
        """Sec-Fetch-Site: same-origin (set by browsers, not by pages) is the service's own page."""
        response = await client.post(
            "/api/jobs",
            json={"options": FAST_JOB},
            headers={"Origin": "https://flushline.example.com", "Sec-Fetch-Site": "same-origin"},
        )
        assert response.status == 201

    async def test_recommended_nginx_keeps_same_origin_posts(
        self, client: Client, tmp_path: pathlib.Path
    ) -> None:
        """Through config/nginx/flushline.conf on a non-standard port, a same-origin POST works."""
        require_nginx()
        async with (
            run_nginx(client.port, NginxMode.RECOMMENDED, tmp_dir=tmp_path) as nginx,
            aiohttp.ClientSession() as session,
        ):
            ok = await session.post(
                f"{nginx.url}/api/jobs",
                json={"options": FAST_JOB},
                headers={"Origin": nginx.url},
            )
            assert ok.status == 201, await ok.text()
            refused = await session.post(
                f"{nginx.url}/api/jobs", json={}, headers={"Origin": OTHER}
            )
            assert refused.status == 403
