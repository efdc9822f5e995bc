"""GET /openapi.json: the OpenAPI 3.1 description, kept true against the running server.

Every route of the app's router is described (so a new one cannot be left out), the
description is valid OpenAPI 3.1, real answers of a real server validate against it
(status documented, media type documented, body matching its schema, required headers
present), and schemathesis fuzzes a live ``flushline serve`` from its own
``/openapi.json``: zero 5xx, zero answers outside the description.
"""

from __future__ import annotations

import asyncio
import gzip
import pathlib
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import aiohttp
import jsonschema_rs
import orjson
import pytest
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import checks
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from schemathesis.generation import GenerationMode

from app.web.keys import MANAGER
from tests.conftest import QUICK_JOB, MakeClient
from tests.support.jobs import (
    FAST_JOB,
    SLOW_JOB,
    Client,
    create_job,
    wait_finished,
)
from tests.support.process import (
    clean_env,
    free_port,
    read_log,
    require_flushline_script,
    server_process,
    wait_accepting,
)

SPEC_URI = "urn:flushline:openapi"
#: The publish operation: it always asks for the job's publish token.
PUBLISH = ("post", "/api/jobs/{job_id}/events")
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


async def fetch_spec(client: Client) -> dict[str, Any]:
    """GET /openapi.json; assert it is JSON."""
    response = await client.get("/openapi.json")
    assert response.status == 200, await response.text()
    assert response.content_type == "application/json"
    spec = await response.json()
    assert isinstance(spec, dict)
    return spec


def router_operations(app: web.Application) -> set[tuple[str, str]]:
    """Every (method, path template) the app's router serves, as OpenAPI spells them."""
    served = set()
    for route in app.router.routes():
        resource = route.resource
        assert resource is not None
        served.add((route.method.lower(), resource.canonical))
    return served


def spec_operations(spec: Mapping[str, Any]) -> set[tuple[str, str]]:
    """Every (method, path template) the description lists."""
    return {
        (method, path)
        for path, item in spec["paths"].items()
        for method in item
        if method in METHODS
    }


class Described:
    """Checks real answers against the description."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.registry = jsonschema_rs.Registry([(SPEC_URI, spec)])

    def validate(self, instance: Any, pointer: str) -> None:
        """``instance`` must match the schema at ``pointer`` in the description."""
        schema = {"$ref": f"{SPEC_URI}#{quote(pointer, safe='/~')}"}
        validator = jsonschema_rs.Draft202012Validator(schema, registry=self.registry)
        errors = [str(error) for error in validator.iter_errors(instance)]
        assert not errors, f"{pointer}: {errors[0]}\n{instance!r}"[:3000]

    def response_pointer(self, method: str, path: str, status: int) -> str:
        """The JSON pointer of the documented response (``$ref`` followed)."""
        operation = self.spec["paths"][path][method.lower()]
        responses = operation["responses"]
        assert str(status) in responses, (
            f"{method} {path} answered {status}, not documented: {sorted(responses)}"
        )
        response = responses[str(status)]
        if "$ref" in response:
            return str(response["$ref"]).removeprefix("#")
        escaped = path.replace("~", "~0").replace("/", "~1")
        return f"/paths/{escaped}/{method.lower()}/responses/{status}"

    def check(self, method: str, path: str, response: aiohttp.ClientResponse, body: bytes) -> Any:
        """Assert ``response`` is one the description lists; return its decoded JSON, if any."""
        pointer = self.response_pointer(method, path, response.status)
        documented = self.resolve(pointer)
        for name, header in documented.get("headers", {}).items():
            if header.get("required"):
                assert name in response.headers, f"{method} {path} {response.status}: no {name}"
        content = documented.get("content")
        if not content:
            assert body == b"", f"{method} {path} {response.status}: undocumented body {body!r}"
            return None
        assert response.content_type in content, (
            f"{method} {path} {response.status}: {response.content_type} not in {sorted(content)}"
        )
        if response.content_type != "application/json":
            return None
        decoded = orjson.loads(body)
        media = response.content_type.replace("~", "~0").replace("/", "~1")
        self.validate(decoded, f"{pointer}/content/{media}/schema")
        return decoded

    def resolve(self, pointer: str) -> dict[str, Any]:
        node: Any = self.spec
        for part in pointer.strip("/").split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        assert isinstance(node, dict)
        return node


async def call(
    client: Client,
    described: Described,
    method: str,
    path: str,
    url: str | None = None,
    **kwargs: Any,
) -> tuple[int, Any]:
    """Send a request to ``url`` (default ``path``), check the answer against ``path``'s
    description; return its status and JSON body."""
    async with client.request(method, url or path, **kwargs) as response:
        body = await response.read()
        return response.status, described.check(method, path, response, body)


@pytest.fixture
async def described(client: Client) -> Described:
    """The description the default app serves."""
    return Described(await fetch_spec(client))


class TestDescription:
    """The document itself."""

    async def test_is_valid_openapi_31(self, client: Client) -> None:
        """The served document passes the OpenAPI 3.1 meta-schema."""
        spec = await fetch_spec(client)
        assert spec["openapi"].startswith("3.1.")
        schemathesis.openapi.from_dict(spec).validate()

    @pytest.mark.parametrize("auth", [False, True])
    async def test_every_route_is_described(self, make_client: MakeClient, auth: bool) -> None:
        """Each (method, path) of app.router is in the description, and nothing else is."""
        env = {"FLUSHLINE_API_TOKEN": "t" * 32} if auth else {}
        client = await make_client(env)
        spec = await fetch_spec(client)
        served = router_operations(client.app)
        listed = spec_operations(spec)
        assert served - listed == set(), "routes served but not described"
        assert listed - served == set(), "operations described but not served"

    async def test_auth_on_is_described(self, make_client: MakeClient) -> None:
        """With auth on, the job API and the probe's pattern ask for a bearer token, streams
        for a stream token."""
        client = await make_client({"FLUSHLINE_API_TOKEN": "t" * 32})
        spec = await fetch_spec(client)
        schemes = spec["components"]["securitySchemes"]
        assert schemes["bearerAuth"] == {
            **schemes["bearerAuth"],
            "type": "http",
            "scheme": "bearer",
        }
        assert (schemes["streamToken"]["in"], schemes["streamToken"]["name"]) == ("query", "token")
        for path, item in spec["paths"].items():
            for method, operation in item.items():
                if method not in ("get", "post"):
                    continue
                security = operation.get("security", [])
                if (method, path) == PUBLISH:
                    assert security == [{"publishToken": []}, {"bearerAuth": []}], path
                elif path in ("/api/jobs/{job_id}/stream", "/api/jobs/{job_id}/events"):
                    assert security == [{"streamToken": []}, {"bearerAuth": []}], path
                elif path.startswith(("/api/jobs", "/api/diagnostics")):
                    assert security == [{"bearerAuth": []}], (method, path)
                else:
                    assert security == [], (method, path)
                if path.startswith(("/api/jobs", "/api/diagnostics")):
                    assert {"401", "403"} <= set(operation["responses"]), (method, path)

    async def test_auth_off_asks_for_nothing(self, client: Client) -> None:
        """Auth off: no operation but publishing asks for a credential or lists 401."""
        spec = await fetch_spec(client)
        publish = spec["paths"]["/api/jobs/{job_id}/events"]["post"]
        assert publish["security"] == [{"publishToken": []}]
        assert {"401", "403"} <= set(publish["responses"])
        for path, item in spec["paths"].items():
            for method, operation in item.items():
                if method in METHODS and (method, path) != PUBLISH:
                    assert operation.get("security", []) == [], (method, path)
                    assert "401" not in operation["responses"], (method, path)

    async def test_pipelines_and_strategies_are_this_apps(self, client: Client) -> None:
        """The body's pipeline and strategy enums are what this app accepts."""
        spec = await fetch_spec(client)
        body = spec["components"]["schemas"]["JobRequest"]["properties"]
        manager = client.app[MANAGER]
        assert body["pipeline"]["enum"] == [*sorted(manager.pipelines), "external"]
        assert body["strategy"]["enum"] == sorted(manager.strategies)


class TestRealAnswers:
    """Real answers of a real server validate against the description."""

    async def test_job_lifecycle(self, client: Client, described: Described) -> None:
        """Create (201), get, list, long-poll, stream, 204 at the end, cancel 409."""
        status, job = await call(client, described, "POST", "/api/jobs", json={"options": FAST_JOB})
        assert status == 201
        job_id = job["id"]
        await wait_finished(client, job_id)
        status, _ = await call(
            client, described, "GET", "/api/jobs/{job_id}", f"/api/jobs/{job_id}"
        )
        assert status == 200
        for query in ("", "?limit=5", "?status=succeeded"):
            status, jobs = await call(client, described, "GET", "/api/jobs", f"/api/jobs{query}")
            assert status == 200
            assert jobs["jobs"], query
        events = f"/api/jobs/{job_id}/events?after=0&wait_s=0"
        status, page = await call(client, described, "GET", "/api/jobs/{job_id}/events", events)
        assert status == 200
        assert page["done"] is True
        assert {event["type"] for event in page["events"]} >= {"job_started", "chunk", "done"}

        stream = f"/api/jobs/{job_id}/stream?proxy_buffer=0"
        status, _ = await call(client, described, "GET", "/api/jobs/{job_id}/stream", stream)
        assert status == 200
        last = page["last_event_id"]
        status, _ = await call(
            client,
            described,
            "GET",
            "/api/jobs/{job_id}/stream",
            f"/api/jobs/{job_id}/stream",
            headers={"Last-Event-ID": str(last)},
        )
        assert status == 204
        cancel = f"/api/jobs/{job_id}/cancel"
        status, error = await call(client, described, "POST", "/api/jobs/{job_id}/cancel", cancel)
        assert status == 409
        assert error["error"]["code"] == "job_finished"

    async def test_publish_answers(self, make_client: MakeClient) -> None:
        """An external job's creation, publishes and each refusal of the publish route
        (400, 401, 403, 404, 409 gap and finished, 413, 429) match the description."""
        client = await make_client(
            {"FLUSHLINE_PUBLISH_RATE": "5", "FLUSHLINE_PUBLISH_MAX_EVENTS": "5"}
        )
        described = Described(await fetch_spec(client))
        body = {"pipeline": "external", "steps": [{"name": "a", "expected_tokens": 10}]}
        status, job = await call(client, described, "POST", "/api/jobs", json=body)
        assert status == 201
        assert job["publish_token"]
        path = "/api/jobs/{job_id}/events"
        url = f"/api/jobs/{job['id']}/events"
        auth = {"Authorization": f"Bearer {job['publish_token']}"}

        async def publish(seq: int, events: list[Any], headers: Any = auth) -> tuple[int, Any]:
            payload = {"producer_seq": seq, "events": events}
            return await call(client, described, "POST", path, url, json=payload, headers=headers)

        status, answer = await publish(1, [{"type": "step_started", "step": "a"}])
        assert (status, answer["duplicate"]) == (200, False)
        status, answer = await publish(1, [{"type": "step_started", "step": "a"}])
        assert (status, answer["duplicate"]) == (200, True)
        refusals: list[tuple[int, Any, int]] = [
            (2, [{"type": "tokens", "step": "b", "count": 1}], 400),
            (2, [{"type": "heartbeat"}] * 6, 413),
            (9, [{"type": "heartbeat"}], 409),
            (2, [{"type": "heartbeat"}] * 5, 429),
        ]
        for seq, events, expected in refusals:
            status, error = await publish(seq, events)
            assert status == expected, error
        status, _ = await publish(2, [{"type": "heartbeat"}], {})
        assert status == 401
        status, _ = await publish(2, [{"type": "heartbeat"}], {"Authorization": "Bearer nope"})
        assert status == 403
        status, _ = await call(
            client, described, "POST", path, "/api/jobs/nope/events", json={}, headers=auth
        )
        assert status == 404
        cancel = f"/api/jobs/{job['id']}/cancel"
        status, _ = await call(client, described, "POST", "/api/jobs/{job_id}/cancel", cancel)
        assert status == 202
        status, error = await publish(2, [{"type": "heartbeat"}])
        assert (status, error["error"]["status"]) == (409, "cancelled")

    async def test_every_stream_event_matches_the_event_schema(
        self, client: Client, described: Described
    ) -> None:
        """Each data line of a real stream validates as an Event, heartbeats aside."""
        job = await create_job(client, QUICK_JOB)
        async with client.get(f"/api/jobs/{job['id']}/stream?proxy_buffer=0") as response:
            raw = await response.read()
            described.check("GET", "/api/jobs/{job_id}/stream", response, raw)
        types = set()
        for line in raw.splitlines():
            if line.startswith(b"data: "):
                event = orjson.loads(line[len(b"data: ") :])
                described.validate(event, "/components/schemas/Event")
                types.add(event["type"])
        assert {"job_started", "step_started", "chunk", "step_completed", "done"} <= types

    async def test_cancel_of_a_running_job(self, client: Client, described: Described) -> None:
        """202 with the snapshot."""
        job = await create_job(client, SLOW_JOB)
        path = "/api/jobs/{job_id}/cancel"
        status, _ = await call(client, described, "POST", path, f"/api/jobs/{job['id']}/cancel")
        assert status == 202
        await wait_finished(client, job["id"])

    @pytest.mark.parametrize(
        ("method", "path", "url", "kwargs", "status"),
        [
            ("GET", "/api/jobs/{job_id}", "/api/jobs/nope", {}, 404),
            ("POST", "/api/jobs/{job_id}/cancel", "/api/jobs/nope/cancel", {}, 404),
            ("GET", "/api/jobs/{job_id}/stream", "/api/jobs/nope/stream", {}, 404),
            ("GET", "/api/jobs/{job_id}/events", "/api/jobs/nope/events", {}, 404),
            ("GET", "/api/jobs", "/api/jobs?limit=0", {}, 400),
            ("GET", "/api/jobs", "/api/jobs?status=lost", {}, 400),
            ("POST", "/api/jobs", None, {"data": b"{not json"}, 400),
            ("POST", "/api/jobs", None, {"json": {"colour": "red"}}, 400),
            ("POST", "/api/jobs", None, {"json": {"pipeline": "nope"}}, 400),
            ("POST", "/api/jobs", None, {"json": {"options": {"steps": "x"}}}, 400),
            ("POST", "/api/jobs", None, {"data": b"[" * 70_000}, 413),
            ("GET", "/api/diagnostics/stream", "/api/diagnostics/stream?write_bytes=1", {}, 400),
        ],
    )
    async def test_errors(
        self,
        client: Client,
        described: Described,
        method: str,
        path: str,
        url: str | None,
        kwargs: dict[str, Any],
        status: int,
    ) -> None:
        """Each refusal is a documented status with the Error object."""
        answered, error = await call(client, described, method, path, url, **kwargs)
        assert answered == status, error
        assert set(error) == {"error"}

    async def test_resume_errors(self, make_client: MakeClient) -> None:
        """400 past the newest event and 410 before the kept history, stream and long-poll."""
        client = await make_client({"FLUSHLINE_HISTORY_LIMIT": "10"})
        described = Described(await fetch_spec(client))
        job = await create_job(client, QUICK_JOB)
        done = await wait_finished(client, job["id"])
        base = f"/api/jobs/{job['id']}"
        beyond = done["last_event_id"] + 1
        for query, status in ((f"?last_event_id={beyond}", 400), ("?last_event_id=1", 410)):
            answered, _ = await call(
                client, described, "GET", "/api/jobs/{job_id}/stream", f"{base}/stream{query}"
            )
            assert answered == status, query
        for query, status in ((f"?after={beyond}", 400), ("?after=1", 410)):
            answered, _ = await call(
                client, described, "GET", "/api/jobs/{job_id}/events", f"{base}/events{query}"
            )
            assert answered == status, query

    async def test_capacity_and_draining_are_503_with_retry_after(
        self, make_client: MakeClient
    ) -> None:
        """At capacity a create is 503; draining, /readyz and create are 503 (Retry-After)."""
        client = await make_client({"FLUSHLINE_MAX_ACTIVE_JOBS": "1"})
        described = Described(await fetch_spec(client))
        await create_job(client, SLOW_JOB)
        status, error = await call(client, described, "POST", "/api/jobs", json={})
        assert (status, error["error"]["code"]) == (503, "at_capacity")
        status, _ = await call(client, described, "GET", "/readyz")
        assert status == 200
        await client.app[MANAGER].drain(0.1)
        status, error = await call(client, described, "GET", "/readyz")
        assert (status, error["error"]["code"]) == (503, "draining")

    async def test_operations_and_page(self, client: Client, described: Described) -> None:
        """healthz, readyz, metrics, openapi.json, the page and a static file (GET and HEAD)."""
        for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/"):
            status, _ = await call(client, described, "GET", path)
            assert status == 200, path
        for path in ("/healthz", "/readyz", "/", "/api/jobs"):
            status, _ = await call(client, described, "HEAD", path)
            assert status == 200, path
        for name in ("flushline.js", "page.css", "index.html"):
            static = "/static/{filename}"
            status, _ = await call(client, described, "GET", static, f"/static/{name}")
            assert status == 200, name

    async def test_missing_static_file_is_a_json_404(
        self, client: Client, described: Described
    ) -> None:
        """A static file that is not there is the Error object, like any other 404."""
        status, error = await call(
            client, described, "GET", "/static/{filename}", "/static/missing.js"
        )
        assert status == 404
        assert error["error"]["code"]

    async def test_wrong_method_and_unknown_route(
        self, client: Client, described: Described
    ) -> None:
        """405 with Allow and 404 carry the Error object the description defines."""
        async with client.delete("/api/jobs") as response:
            assert response.status == 405
            assert "Allow" in response.headers
            described.validate(orjson.loads(await response.read()), "/components/schemas/Error")
        async with client.get("/no/such/route") as response:
            assert response.status == 404
            described.validate(orjson.loads(await response.read()), "/components/schemas/Error")

    async def test_auth_answers(self, make_client: MakeClient) -> None:
        """With auth on: 401 without a credential, 403 with a wrong one, both as described."""
        client = await make_client({"FLUSHLINE_API_TOKEN": "t" * 32})
        described = Described(await fetch_spec(client))
        status, _ = await call(client, described, "GET", "/api/jobs")
        assert status == 401
        wrong = {"Authorization": "Bearer " + "w" * 32}
        status, _ = await call(client, described, "GET", "/api/jobs", headers=wrong)
        assert status == 403
        good = {"Authorization": "Bearer " + "t" * 32}
        status, job = await call(
            client, described, "POST", "/api/jobs", json={"options": FAST_JOB}, headers=good
        )
        assert status == 201
        path = "/api/jobs/{job_id}/events"
        status, _ = await call(client, described, "GET", path, f"/api/jobs/{job['id']}/events")
        assert status == 401
        status, page = await call(client, described, "GET", path, job["links"]["events"])
        assert status == 200, page
        bad = f"/api/jobs/{job['id']}/stream?token=forged"
        status, _ = await call(client, described, "GET", "/api/jobs/{job_id}/stream", bad)
        assert status == 403


class TestServerAnswers:
    """Answers of a real `flushline serve` (its own server in front of the app)."""

    async def test_undecodable_body_is_described(self, tmp_path: pathlib.Path) -> None:
        """A body labelled gzip that is not, and an unknown encoding: documented 4xx JSON."""
        async with _serve(tmp_path) as base, aiohttp.ClientSession() as session:
            async with session.get(f"{base}/openapi.json") as response:
                described = Described(await response.json())
            cases = [
                ({"Content-Encoding": "gzip"}, b"not gzip at all"),
                ({"Content-Encoding": "br-nope"}, b"{}"),
            ]
            for headers, body in cases:
                headers = {**headers, "Content-Type": "application/json"}
                async with session.post(f"{base}/api/jobs", data=body, headers=headers) as answer:
                    raw = await answer.read()
                    described.check("POST", "/api/jobs", answer, raw)
                    assert answer.status in (400, 415), raw
            gz = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
            body = gzip.compress(orjson.dumps({"options": FAST_JOB}))
            async with session.post(f"{base}/api/jobs", data=body, headers=gz) as answer:
                raw = await answer.read()
                described.check("POST", "/api/jobs", answer, raw)
                assert answer.status == 201, raw


class _serve:
    """``flushline serve`` on a free port; yields its base URL."""

    def __init__(self, tmp_path: pathlib.Path, **env: str) -> None:
        self.script = require_flushline_script()
        self.port = free_port()
        self.env = clean_env(FLUSHLINE_PORT=str(self.port), FLUSHLINE_LOG_LEVEL="warning", **env)
        self.log = tmp_path / "serve.log"

    async def __aenter__(self) -> str:
        self._cm = server_process([self.script, "serve", "--host", "127.0.0.1"], self.env, self.log)
        process = await self._cm.__aenter__()
        await wait_accepting(process, self.port)
        return f"http://127.0.0.1:{self.port}"

    async def __aexit__(self, *exc: object) -> None:
        await self._cm.__aexit__(None, None, None)


#: Operations the fuzzer leaves out: the diagnostics pattern runs up to a minute a call
#: (its parameters and errors are checked by hand above).
FUZZ_EXCLUDED = {("GET", "/api/diagnostics/stream")}
#: Examples per operation and generation mode: about 30 s for the whole run here.
FUZZ_EXAMPLES = 25


def _fuzz(base: str) -> tuple[list[str], int]:
    """Fuzz every operation of the live server (positive and negative data); the failures
    (operation, check, reproducer) and the number of calls made."""
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    failures: list[str] = []
    calls = 0
    for result in schema.get_all_operations():
        if not isinstance(result, Ok):
            failures.append(f"an operation the fuzzer cannot read: {result.err()}\n")
            continue
        operation = result.ok()
        if (operation.method.upper(), operation.path) in FUZZ_EXCLUDED:
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            found, made = _fuzz_operation(base, operation, mode)
            failures += found
            calls += made
    return failures, calls


def _fuzz_operation(
    base: str, operation: schemathesis.APIOperation[Any, Any, Any, Any], mode: GenerationMode
) -> tuple[list[str], int]:
    """Up to ``FUZZ_EXAMPLES`` generated requests to one operation; failures and calls."""
    selected = [
        checks.not_a_server_error,
        checks.status_code_conformance,
        checks.content_type_conformance,
        checks.response_schema_conformance,
    ]
    label = f"{operation.method.upper()} {operation.path} ({mode.value})"
    failures: list[str] = []
    calls = 0

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        nonlocal calls
        calls += 1
        try:
            case.call_and_validate(base_url=base, checks=selected, timeout=10)
        except FailureGroup as group:
            for failure in group.exceptions:
                failures.append(f"{label}: {failure.title}\n  {case.as_curl_command()}")
        except AssertionError as exc:
            failures.append(f"{label}: {exc}\n  {case.as_curl_command()}")

    try:
        run()
    except Unsatisfiable:
        # Nothing of the request can be made invalid (no parameter, no body).
        if mode is not GenerationMode.NEGATIVE:
            raise
    return failures, calls


class TestFuzz:
    """Schemathesis against a live `flushline serve`, from its own /openapi.json."""

    async def test_no_server_error_and_no_answer_outside_the_description(
        self, tmp_path: pathlib.Path
    ) -> None:
        """Every fuzzed request gets a documented status, media type and body; never a 5xx
        other than the documented 503s."""
        # Room for every job the fuzzer starts: a 503 at capacity would count as a 5xx.
        async with _serve(tmp_path, FLUSHLINE_MAX_ACTIVE_JOBS="1000") as base:
            failures, calls = await asyncio.to_thread(_fuzz, base)
            log = read_log(tmp_path / "serve.log")
        assert calls > 100
        # One reproducer per operation and kind of failure, with how often it was seen.
        kinds: dict[str, list[str]] = {}
        for failure in failures:
            kind, _, reproducer = failure.partition("\n")
            kinds.setdefault(kind, []).append(reproducer)
        report = [f"{kind} (x{len(seen)})\n{seen[0]}" for kind, seen in sorted(kinds.items())]
        assert not report, "\n".join(report) + "\nserver log:\n" + log[-3000:]
