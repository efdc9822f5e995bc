"""The OpenAI-compatible token source against a fake provider on a real socket.

Jobs run through the real API (``init_app`` with the ``chat`` pipeline bound to the fake
provider); each provider behaviour ends with the right events and job status within its
timeout, and the API key never shows in an event, a snapshot or a log line.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
import pytest
import structlog
from aiohttp import web

from app.core.settings import Settings
from app.jobs.llm import MAX_LINE_BYTES, ChatPipeline, LLMConfig, OpenAIChatSource, ProviderError
from app.jobs.tokens import TokenCount, TokenRequest
from app.web.factory import init_app
from tests.conftest import MakeClient
from tests.support.fake_llm import FakeLLM, Reply, fake_llm
from tests.support.jobs import Client, create_job, get_job, stream_job, wait_until
from tests.support.process import free_port

API_KEY = "sk-test-SECRET-0123456789abcdef"


def config(fake: FakeLLM, **overrides: Any) -> LLMConfig:
    """A config for ``fake`` with short timeouts and backoff."""
    values: dict[str, Any] = {
        "base_url": fake.base_url,
        "model": "fake-model",
        "api_key": API_KEY,
        "connect_timeout_s": 2.0,
        "first_token_timeout_s": 2.0,
        "idle_timeout_s": 2.0,
        "max_retries": 2,
        "backoff_s": 0.05,
    }
    values.update(overrides)
    return LLMConfig(**values)


async def chat_client(
    make_client: MakeClient, llm: LLMConfig, env: dict[str, str] | None = None
) -> Client:
    """The real app with ``chat`` bound to ``llm`` (frequency cadence: frequent events)."""
    pipeline = ChatPipeline(OpenAIChatSource(llm))
    return await make_client(
        {"FLUSHLINE_STRATEGY": "frequency", **(env or {})}, pipelines=(pipeline,)
    )


async def run_chat(
    client: Client, prompt: str = "Say hello", timeout_s: float = 20.0, **options: Any
) -> tuple[list[dict[str, Any]], dict[str, Any], float]:
    """Start a chat job, read its whole stream; return payloads, final snapshot, seconds."""
    started = time.monotonic()
    job = await create_job(client, options or None, pipeline="chat", input={"prompt": prompt})
    record = await stream_job(client, job["id"], timeout_s=timeout_s)
    elapsed = time.monotonic() - started
    return record.payloads(), await get_job(client, job["id"]), elapsed


def assert_failed(payloads: list[dict[str, Any]], snapshot: dict[str, Any], text: str) -> str:
    """The stream ends with ``error`` then ``done`` failed, naming ``text``; the job failed."""
    assert [p["type"] for p in payloads[-2:]] == ["error", "done"], payloads[-3:]
    error, done = payloads[-2], payloads[-1]
    assert text in error["message"], error
    assert error["step"] == "reply"
    assert done["status"] == "failed"
    assert done["error"] == error["message"]
    assert snapshot["status"] == "failed"
    assert snapshot["error"] == error["message"]
    return str(error["message"])


class TestConfig:
    def test_validates_its_fields(self) -> None:
        """A bad URL, an empty model or a bad retry count is refused naming the field."""
        with pytest.raises(ValueError, match="base_url"):
            LLMConfig(base_url="api.openai.com/v1", model="m")
        with pytest.raises(ValueError, match="base_url"):
            LLMConfig(base_url="ftp://example.com", model="m")
        with pytest.raises(ValueError, match="model"):
            LLMConfig(base_url="https://api.openai.com/v1", model=" ")
        with pytest.raises(ValueError, match="max_retries"):
            LLMConfig(base_url="https://api.openai.com/v1", model="m", max_retries=-1)
        with pytest.raises(ValueError, match="first_token_timeout_s"):
            LLMConfig(base_url="https://api.openai.com/v1", model="m", first_token_timeout_s=0)

    def test_repr_hides_the_key_and_url_is_normalised(self) -> None:
        """The key is not in repr; a trailing slash is dropped before /chat/completions."""
        llm = LLMConfig(base_url="https://api.groq.com/openai/v1/", model="m", api_key=API_KEY)
        assert API_KEY not in repr(llm)
        assert llm.chat_url == "https://api.groq.com/openai/v1/chat/completions"


class TestSourceDirectly:
    async def test_request_asks_for_usage_and_streams_deltas(self) -> None:
        """The body streams with include_usage, sends the key as a bearer; deltas then usage."""
        async with fake_llm(Reply(tokens=("Hi", " there"), usage="final")) as fake:
            source = OpenAIChatSource(config(fake))
            request = TokenRequest("hello", 50, "s", system="be brief", temperature=0.2)
            pieces = [piece async for piece in source.stream(request)]
        assert pieces == ["Hi", " there", TokenCount(2)]
        (seen,) = fake.requests
        assert seen.body["stream"] is True
        assert seen.body["stream_options"] == {"include_usage": True}
        assert seen.body["model"] == "fake-model"
        assert seen.body["max_tokens"] == 50
        assert seen.body["temperature"] == 0.2
        assert seen.body["messages"] == [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello"},
        ]
        assert seen.headers["Authorization"] == f"Bearer {API_KEY}"

    async def test_no_key_sends_no_authorization(self) -> None:
        """A local server without a key: no Authorization header, no max_tokens when 0."""
        async with fake_llm() as fake:
            source = OpenAIChatSource(config(fake, api_key=""))
            text = [p async for p in source.stream(TokenRequest("x", 0))]
        assert "".join(str(p) for p in text) == "reply 1 to 1 chars"
        assert "Authorization" not in fake.requests[0].headers
        assert "max_tokens" not in fake.requests[0].body

    async def test_unreachable_provider_fails_after_its_retries(self) -> None:
        """Nobody listening: retried max_retries times, then a ProviderError naming the URL."""
        port = free_port()
        llm = LLMConfig(
            base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=1, backoff_s=0.05
        )
        started = time.monotonic()
        with pytest.raises(ProviderError, match=rf"could not reach .*127\.0\.0\.1:{port}"):
            _ = [p async for p in OpenAIChatSource(llm).stream(TokenRequest("x", 0))]
        assert time.monotonic() - started < 5.0


class TestThroughTheApi:
    async def test_usage_counts_replace_counted_deltas(self, make_client: MakeClient) -> None:
        """With a final usage of 3 tokens per delta, step_completed and the snapshot say 15."""
        async with fake_llm(Reply(usage="final", usage_per_delta=3)) as fake:
            client = await chat_client(make_client, config(fake))
            payloads, snapshot, _ = await run_chat(client, "Say hello")
        done = payloads[-1]
        assert done["status"] == "succeeded"
        assert done["result"] == {"text": "reply 1 to 9 chars"}
        (completed,) = [p for p in payloads if p["type"] == "step_completed"]
        assert completed["tokens"] == 15
        assert snapshot["steps"][0]["tokens"] == 15
        assert snapshot["status"] == "succeeded"

    async def test_progress_follows_the_providers_running_usage(
        self, make_client: MakeClient
    ) -> None:
        """Usage in every chunk (4 per delta): step_progress counts multiples of 4, pct by them."""
        reply = Reply(
            tokens=tuple(f"w{i} " for i in range(12)), delay_s=0.05, usage="each", usage_per_delta=4
        )
        env = {"FLUSHLINE_PROGRESS_INTERVAL": "0.1", "FLUSHLINE_CHUNK_INTERVAL": "0.1"}
        async with fake_llm(reply) as fake:
            client = await chat_client(make_client, config(fake), env)
            payloads, snapshot, _ = await run_chat(client, max_tokens=100)
        progress = [p for p in payloads if p["type"] == "step_progress"]
        assert len(progress) >= 3, payloads
        for event in progress:
            assert event["tokens"] % 4 == 0, event
            assert event["tokens"] > 0
            assert event["pct"] == pytest.approx(event["tokens"], abs=0.05)  # of 100 expected
        assert [e["tokens"] for e in progress] == sorted(e["tokens"] for e in progress)
        assert snapshot["steps"][0]["tokens"] == 48
        chunks = [p for p in payloads if p["type"] == "chunk"]
        assert sum(c["tokens"] for c in chunks) == 48

    async def test_without_usage_deltas_are_counted(self, make_client: MakeClient) -> None:
        """No usage from the provider: each delta counts as one token."""
        async with fake_llm(Reply(tokens=("a", "b", "c", "d"))) as fake:
            client = await chat_client(make_client, config(fake))
            payloads, snapshot, _ = await run_chat(client)
        assert payloads[-1]["result"] == {"text": "abcd"}
        assert snapshot["steps"][0]["tokens"] == 4

    @pytest.mark.parametrize(
        ("status", "message", "hint"),
        [
            (401, "Incorrect API key provided", "FLUSHLINE_LLM_API_KEY"),
            (404, "The model `fake-model` does not exist", "FLUSHLINE_LLM_MODEL"),
        ],
    )
    async def test_client_errors_fail_at_once(
        self, make_client: MakeClient, status: int, message: str, hint: str
    ) -> None:
        """401 and 404 fail the job at once (no retry) with the provider's message and a hint."""
        async with fake_llm(Reply(status=status, message=message)) as fake:
            client = await chat_client(make_client, config(fake))
            payloads, snapshot, elapsed = await run_chat(client)
            assert len(fake.requests) == 1
        text = assert_failed(payloads, snapshot, message)
        assert f"HTTP {status}" in text
        assert hint in text
        assert elapsed < 5.0

    async def test_429_waits_for_retry_after_then_succeeds(self, make_client: MakeClient) -> None:
        """A 429 with Retry-After: 1 is retried about 1 s later (not at the 50 ms backoff)."""
        async with fake_llm(Reply(status=429, retry_after="1"), Reply()) as fake:
            client = await chat_client(make_client, config(fake))
            payloads, snapshot, _ = await run_chat(client)
            first, second = fake.requests
        assert payloads[-1]["status"] == "succeeded"
        assert snapshot["status"] == "succeeded"
        assert 0.9 <= second.at - first.at < 3.0

    async def test_429_for_good_fails_after_the_retries(self, make_client: MakeClient) -> None:
        """Always 429: 1 + max_retries requests, then a failed job with the provider's message."""
        reply = Reply(status=429, retry_after="0.1", message="Rate limit reached for fake-model")
        async with fake_llm(reply) as fake:
            client = await chat_client(make_client, config(fake, max_retries=2))
            payloads, snapshot, elapsed = await run_chat(client)
            assert len(fake.requests) == 3
        text = assert_failed(payloads, snapshot, "Rate limit reached for fake-model")
        assert "after 3 attempts" in text
        assert elapsed < 5.0

    async def test_retry_after_beyond_the_cap_fails_at_once(self, make_client: MakeClient) -> None:
        """A 429 asking for 120 s when the cap is 30 s fails now, saying so."""
        async with fake_llm(Reply(status=429, retry_after="120")) as fake:
            client = await chat_client(make_client, config(fake))
            payloads, snapshot, elapsed = await run_chat(client)
            assert len(fake.requests) == 1
        assert_failed(payloads, snapshot, "retry in 120 s")
        assert elapsed < 5.0

    async def test_5xx_is_retried(self, make_client: MakeClient) -> None:
        """A 500 then a good answer: the job succeeds on the second request."""
        async with fake_llm(Reply(status=500), Reply()) as fake:
            client = await chat_client(make_client, config(fake))
            payloads, _, _ = await run_chat(client)
            assert len(fake.requests) == 2
        assert payloads[-1]["status"] == "succeeded"
        assert payloads[-1]["result"] == {"text": "reply 2 to 9 chars"}

    async def test_5xx_for_good_fails(self, make_client: MakeClient) -> None:
        """Always 503: the job fails with the provider's message after its retries."""
        async with fake_llm(Reply(status=503, message="The server is overloaded")) as fake:
            client = await chat_client(make_client, config(fake, max_retries=1))
            payloads, snapshot, _ = await run_chat(client)
            assert len(fake.requests) == 2
        assert_failed(payloads, snapshot, "HTTP 503: The server is overloaded")

    async def test_stall_before_the_first_token_times_out(self, make_client: MakeClient) -> None:
        """A provider silent after its headers: first-token timeout, one retry, a failed job."""
        async with fake_llm(Reply(stall_s=30)) as fake:
            llm = config(fake, first_token_timeout_s=0.5, max_retries=1)
            client = await chat_client(make_client, llm)
            payloads, snapshot, elapsed = await run_chat(client)
            assert len(fake.requests) == 2
            await wait_until(lambda: len(fake.disconnects) == 2, 2.0, "both requests closed")
        assert_failed(payloads, snapshot, "no token from the provider within 0.5 s")
        assert 1.0 <= elapsed < 5.0

    async def test_cut_mid_way_fails_without_retry(self, make_client: MakeClient) -> None:
        """The connection drops after 3 deltas: the text so far went out, then error and failed."""
        reply = Reply(tokens=("one ", "two ", "three ", "four ", "five "), cut_after=3)
        async with fake_llm(reply) as fake:
            client = await chat_client(make_client, config(fake))
            payloads, snapshot, elapsed = await run_chat(client)
            assert len(fake.requests) == 1
        assert_failed(payloads, snapshot, "cut mid-way")
        text = "".join(p["text"] for p in payloads if p["type"] == "chunk")
        assert text == "one two three "
        assert elapsed < 5.0

    async def test_malformed_chunk_fails(self, make_client: MakeClient) -> None:
        """A chunk that is not JSON fails the job naming it."""
        async with fake_llm(Reply(malformed_after=2)) as fake:
            client = await chat_client(make_client, config(fake))
            payloads, snapshot, _ = await run_chat(client)
            assert len(fake.requests) == 1
        assert_failed(payloads, snapshot, "malformed chunk (not JSON)")

    async def test_error_object_mid_stream_fails(self, make_client: MakeClient) -> None:
        """An ``error`` object in the stream fails the job with its message."""
        async with fake_llm(Reply(error_after=2, message="model overloaded, try later")) as fake:
            client = await chat_client(make_client, config(fake))
            payloads, snapshot, _ = await run_chat(client)
        assert_failed(payloads, snapshot, "model overloaded, try later")

    async def test_cancel_closes_the_upstream_request(self, make_client: MakeClient) -> None:
        """Cancelling a chat job mid-stream: the fake provider sees the disconnect within 1 s."""
        reply = Reply(tokens=tuple(f"t{i} " for i in range(1000)), delay_s=0.05)
        async with fake_llm(reply) as fake:
            client = await chat_client(make_client, config(fake))
            job = await create_job(client, pipeline="chat", input={"prompt": "go on"})

            async def streaming() -> bool:
                return bool((await get_job(client, job["id"]))["steps"][0]["tokens"] > 0)

            await wait_until(streaming, 10.0, "the first tokens")
            assert not fake.disconnects
            cancelled_at = time.monotonic()
            response = await client.post(f"/api/jobs/{job['id']}/cancel")
            assert response.status == 202
            await wait_until(lambda: bool(fake.disconnects), 1.0, "the provider to see it")
            assert fake.disconnects[0] - cancelled_at < 1.0
            assert fake.completed == 0
        record = await stream_job(client, job["id"])
        assert record.payloads()[-1]["status"] == "cancelled"

    async def test_unknown_pipeline_lists_chat_and_demo(self, make_client: MakeClient) -> None:
        """An unknown pipeline name is a 400 listing the known ones, chat included."""
        async with fake_llm() as fake:
            client = await chat_client(make_client, config(fake))
            response = await client.post("/api/jobs", json={"pipeline": "chatt"})
        body = await response.json()
        assert response.status == 400
        assert body["error"]["field"] == "pipeline"
        assert "demo" in body["error"]["message"]
        assert "chat" in body["error"]["message"]

    async def test_chat_validates_its_input(self, make_client: MakeClient) -> None:
        """No prompt, an unknown input or a bad option: 400 naming the field."""
        async with fake_llm() as fake:
            client = await chat_client(make_client, config(fake))
            cases = [
                ({"pipeline": "chat"}, "input.prompt"),
                ({"pipeline": "chat", "input": {"prompt": "x", "tone": "y"}}, "input.tone"),
                (
                    {"pipeline": "chat", "input": {"prompt": "x"}, "options": {"max_tokens": 0.5}},
                    "options.max_tokens",
                ),
            ]
            for body, field in cases:
                response = await client.post("/api/jobs", json=body)
                assert response.status == 400, body
                assert (await response.json())["error"]["field"] == field
            assert not fake.requests

    async def test_chat_without_a_provider_is_a_400(self, make_client: MakeClient) -> None:
        """The chat pipeline with no provider configured refuses the job, saying what to set."""
        client = await make_client(pipelines=(ChatPipeline(None),))
        response = await client.post(
            "/api/jobs", json={"pipeline": "chat", "input": {"prompt": "x"}}
        )
        body = await response.json()
        assert response.status == 400
        assert body["error"]["field"] == "pipeline"
        assert "FLUSHLINE_LLM_BASE_URL" in body["error"]["message"]


async def test_api_key_never_in_logs_or_events(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A provider echoing the key in 429s and a 401: no log line, event or snapshot has it."""
    echo = f"Incorrect API key provided: {API_KEY}"
    script = (Reply(status=429, retry_after="0.05", message=echo), Reply(status=401, message=echo))
    caplog.set_level(logging.DEBUG)
    async with fake_llm(*script) as fake:
        client = await chat_client(make_client, config(fake))
        with structlog.testing.capture_logs() as logs:
            job = await create_job(client, pipeline="chat", input={"prompt": "hi"})
            record = await stream_job(client, job["id"])
            snapshot = await client.get(f"/api/jobs/{job['id']}")
            listing = await client.get("/api/jobs")
            raw_snapshot, raw_listing = await snapshot.text(), await listing.text()
        assert len(fake.requests) == 2
        assert fake.requests[0].headers["Authorization"] == f"Bearer {API_KEY}"
    assert record.payloads()[-1]["status"] == "failed"
    assert "[redacted]" in record.payloads()[-2]["message"]
    assert any(entry["event"] == "llm request failed; retrying" for entry in logs), logs
    assert any(entry["event"] == "job finished" for entry in logs), logs
    for entry in logs:
        assert API_KEY not in repr(entry)
    for line in caplog.messages:
        assert API_KEY not in line
    assert API_KEY not in record.raw.decode()
    assert API_KEY not in raw_snapshot
    assert API_KEY not in raw_listing


async def test_chat_job_settings_built_app(aiohttp_client: Any) -> None:
    """init_app(Settings(...), pipelines=[chat]) runs a chat job end to end."""
    async with fake_llm(Reply(tokens=("ok",))) as fake:
        app = init_app(Settings(), pipelines=[ChatPipeline(OpenAIChatSource(config(fake)))])
        client = await aiohttp_client(app)
        payloads, _, _ = await run_chat(client)
    assert payloads[-1]["result"] == {"text": "ok"}
    await asyncio.sleep(0)


def _long_line_app(line: bytes, piece_bytes: int, pause_s: float) -> web.Application:
    """A provider whose reply is one ``data:`` line of ``line``, sent ``piece_bytes`` at a time."""

    async def reply(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for start in range(0, len(line), piece_bytes):
            await response.write(line[start : start + piece_bytes])
            await asyncio.sleep(pause_s)
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", reply)
    return app


def _delta_line(content: str) -> bytes:
    return b"data: " + orjson.dumps({"choices": [{"delta": {"content": content}}]}) + b"\n\n"


class TestProviderStreamBounds:
    async def test_a_long_line_in_small_reads_parses_in_linear_time(
        self, aiohttp_server: Any
    ) -> None:
        """A 1 MB line in 1 KB reads: parsed in under 6 s (rescanning it took 16 s)."""
        content = "y" * 1_000_000
        server = await aiohttp_server(_long_line_app(_delta_line(content), 1024, 0.001))
        llm = LLMConfig(base_url=str(server.make_url("/v1")), model="m", idle_timeout_s=30.0)
        started = time.monotonic()
        pieces = [p async for p in OpenAIChatSource(llm).stream(TokenRequest("x", 0))]
        assert time.monotonic() - started < 6.0
        assert pieces == [content]

    async def test_a_line_over_the_cap_fails_the_step(self, aiohttp_server: Any) -> None:
        """A line longer than MAX_LINE_BYTES is refused with a ProviderError saying so."""
        line = _delta_line("z" * (MAX_LINE_BYTES + 1000))
        server = await aiohttp_server(_long_line_app(line, 64 * 1024, 0.0))
        llm = LLMConfig(base_url=str(server.make_url("/v1")), model="m", max_retries=0)
        with pytest.raises(ProviderError, match=f"longer than {MAX_LINE_BYTES} bytes"):
            _ = [p async for p in OpenAIChatSource(llm).stream(TokenRequest("x", 0))]


class TestRedactionBeforeTheCut:
    @pytest.mark.parametrize("status", [401, 500])
    async def test_a_key_across_the_500_char_cut_leaks_no_part(self, status: int) -> None:
        """The key straddling character 500 of the provider's message: no 6 chars of it show."""
        message = "m" * 490 + API_KEY + " and more"
        async with fake_llm(Reply(status=status, message=message)) as fake:
            source = OpenAIChatSource(config(fake, max_retries=0))
            with pytest.raises(ProviderError) as raised:
                _ = [p async for p in source.stream(TokenRequest("x", 0))]
        text = str(raised.value)
        assert "[redacted]" in text
        parts = {API_KEY[i : i + 6] for i in range(len(API_KEY) - 5)}
        assert not [part for part in parts if part in text], text
