"""An OpenAI-compatible streaming chat-completions token source, and the ``chat`` pipeline.

Any provider that speaks ``POST {base_url}/chat/completions`` with ``"stream": true``
works (OpenAI, Cerebras, Groq, vLLM, Ollama, llama.cpp server). The provider's SSE is
parsed with the project's own :class:`~app.core.sse.SSEParser`.

Behaviour, in order of a request's life:

- connect within ``connect_timeout_s``, and get the first text token within
  ``first_token_timeout_s`` of sending the request (headers, role-only chunks and
  keep-alive comments do not count);
- before the first token, a failure that may pass (connection refused or reset, a
  timeout, 408, 429, 5xx, a stream ending early) is retried up to ``max_retries``
  times, waiting ``backoff_s`` then doubling, or the ``Retry-After`` a 429 or 503 asks
  for (a wait longer than ``max_retry_wait_s`` fails at once); anything else (401, 404,
  a malformed chunk) fails at once;
- after the first token nothing is retried (the tokens are already out): a stream cut
  mid-way, silent for ``idle_timeout_s``, or carrying a malformed chunk or an ``error``
  object fails the step with :class:`ProviderError`;
- token counts: ``stream_options.include_usage`` asks for ``usage``; each
  ``completion_tokens`` seen is yielded as a :class:`~app.jobs.tokens.TokenCount`,
  which the runner uses instead of counting text pieces;
- cancelling the consumer closes the upstream connection at once.

The provider's SSE is split into lines here before the parser sees it: each chunk is
scanned once (a provider sending one long line in many small reads costs linear time,
not quadratic), and a line longer than :data:`MAX_LINE_BYTES` fails the step.

Every message that leaves this module has the API key replaced by ``[redacted]`` (before
it is cut to length, so a key straddling the cut leaks no part of itself), and the key
is never logged or shown in a ``repr``.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, ClassVar
from urllib.parse import urlsplit

import aiohttp
import attrs
import orjson
import structlog

from app.core.errors import InvalidField
from app.core.sse import SSEParser
from app.jobs.pipelines import JobPlan, StepFailed, StepPlan
from app.jobs.tokens import Piece, TokenCount, TokenRequest, TokenSource

__all__ = [
    "ChatPipeline",
    "LLMConfig",
    "OpenAIChatSource",
    "ProviderError",
]

log = structlog.get_logger(__name__)

#: Statuses worth another attempt before the first token.
_RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529})
#: How much of an error body is read and shown.
_ERROR_BODY_BYTES = 8192
_ERROR_MESSAGE_CHARS = 500
_REDACTED = "[redacted]"
#: The longest line of the provider's stream accepted (a chunk is a few hundred bytes).
MAX_LINE_BYTES = 1024 * 1024


def _strip_url(value: str) -> str:
    return value.strip().rstrip("/")


def _check_url(_instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    url = urlsplit(value)
    if (
        url.scheme not in ("http", "https")
        or not url.hostname
        or url.query
        or url.fragment
        or any(c.isspace() for c in value)
    ):
        raise ValueError(
            f"{attribute.name}: {value!r} is not an http:// or https:// URL without query "
            "(e.g. https://api.openai.com/v1)"
        )


def _check_positive(_instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not 0 < value <= 86_400:
        raise ValueError(f"{attribute.name}: must be greater than 0 and at most 86400, got {value}")


def _check_model(_instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not value.strip():
        raise ValueError(f"{attribute.name}: must not be empty")


def _check_retries(_instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not 0 <= value <= 10:
        raise ValueError(f"{attribute.name}: must be an integer from 0 to 10, got {value!r}")


@attrs.frozen(kw_only=True)
class LLMConfig:
    """Where and how to reach an OpenAI-compatible provider. Validated on construction.

    ``base_url`` is the API root that ``/chat/completions`` is appended to (a trailing
    ``/`` is dropped). ``api_key`` may be empty (local servers need none); it never
    appears in ``repr``.
    """

    base_url: str = attrs.field(converter=_strip_url, validator=_check_url)
    model: str = attrs.field(validator=_check_model)
    api_key: str = attrs.field(default="", repr=False)
    connect_timeout_s: float = attrs.field(default=10.0, validator=_check_positive)
    first_token_timeout_s: float = attrs.field(default=60.0, validator=_check_positive)
    idle_timeout_s: float = attrs.field(default=60.0, validator=_check_positive)
    max_retries: int = attrs.field(default=2, validator=_check_retries)
    backoff_s: float = attrs.field(default=0.5, validator=_check_positive)
    max_retry_wait_s: float = attrs.field(default=30.0, validator=_check_positive)

    @property
    def chat_url(self) -> str:
        """The chat-completions endpoint."""
        return f"{self.base_url}/chat/completions"

    def redact(self, text: str) -> str:
        """``text`` with the API key replaced (for anything shown or logged)."""
        return text.replace(self.api_key, _REDACTED) if self.api_key else text


class ProviderError(StepFailed):
    """The provider refused, failed or broke a request. The message is safe to show."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _Retry(Exception):
    """A failure before the first token that another attempt may not meet."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


def _retry_after_s(value: str | None) -> float | None:
    """``Retry-After`` as seconds from now (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _error_message(body: bytes, redact: Callable[[str], str]) -> str:
    """The provider's own message from an error body (OpenAI's shape, and common others),
    passed through ``redact`` and then cut to :data:`_ERROR_MESSAGE_CHARS`."""
    text = body.decode("utf-8", "replace").strip()
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return redact(text)[:_ERROR_MESSAGE_CHARS] or "no message"
    message: Any = parsed
    if isinstance(parsed, dict):
        error = parsed.get("error", parsed)
        if isinstance(error, dict):
            message = error.get("message") or error.get("detail") or error
        elif isinstance(error, str):
            message = error
        elif "message" in parsed:
            message = parsed["message"]
        elif "detail" in parsed:
            message = parsed["detail"]
    if not isinstance(message, str):
        message = orjson.dumps(message).decode()
    return redact(message)[:_ERROR_MESSAGE_CHARS] or "no message"


_HINTS = {
    401: " (check FLUSHLINE_LLM_API_KEY)",
    403: " (check FLUSHLINE_LLM_API_KEY)",
    404: " (check FLUSHLINE_LLM_MODEL and FLUSHLINE_LLM_BASE_URL)",
}


@attrs.define
class _Lines:
    """Splits the stream into whole lines for the parser, scanning each byte once.

    The parser is only ever given bytes up to a line break, so it never rescans a long
    partial line; the partial line waits here, in pieces, up to :data:`MAX_LINE_BYTES`.
    """

    max_line_bytes: int = MAX_LINE_BYTES
    _partial: list[bytes] = attrs.Factory(list)
    _partial_bytes: int = 0

    def feed(self, data: bytes) -> bytes:
        """The bytes of ``data`` (and before) up to its last line break; b"" if none."""
        cut = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1
        if not cut:
            self._partial.append(data)
            self._partial_bytes += len(data)
            self._check(self._partial_bytes)
            return b""
        breaks = [i for i in (data.find(b"\n"), data.find(b"\r")) if i >= 0]
        self._check(self._partial_bytes + min(breaks))
        whole = b"".join([*self._partial, data[:cut]])
        rest = data[cut:]
        self._partial, self._partial_bytes = ([rest], len(rest)) if rest else ([], 0)
        return whole

    def _check(self, line_bytes: int) -> None:
        if line_bytes > self.max_line_bytes:
            raise ProviderError(f"the provider sent a line longer than {self.max_line_bytes} bytes")


@attrs.define
class _Decoder:
    """Turns the provider's SSE bytes into pieces; tracks how the stream has ended."""

    config: LLMConfig
    parser: SSEParser = attrs.Factory(SSEParser)
    lines: _Lines = attrs.Factory(_Lines)
    #: ``data: [DONE]`` arrived: nothing more will.
    done: bool = False
    #: A choice carried a ``finish_reason``: the reply is complete.
    finished: bool = False

    def feed(self, data: bytes) -> list[Piece]:
        pieces: list[Piece] = []
        whole = self.lines.feed(data)
        if not whole:
            return pieces
        for message in self.parser.feed(whole):
            if self.done or message.data is None:
                continue
            if message.data.strip() == "[DONE]":
                self.done = True
                continue
            pieces.extend(self._chunk(message.data))
        return pieces

    def _malformed(self, data: str, why: str) -> ProviderError:
        excerpt = self.config.redact(data[:120])
        return ProviderError(f"the provider sent a malformed chunk ({why}): {excerpt!r}")

    def _chunk(self, data: str) -> list[Piece]:
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise self._malformed(data, "not JSON") from None
        if not isinstance(chunk, dict):
            raise self._malformed(data, "not a JSON object")
        if "error" in chunk:
            message = _error_message(orjson.dumps(chunk), self.config.redact)
            raise ProviderError(f"the provider reported an error mid-stream: {message}")
        choices = chunk.get("choices") or []
        if not isinstance(choices, list):
            raise self._malformed(data, "choices is not a list")
        pieces: list[Piece] = []
        for choice in choices:
            if not isinstance(choice, dict):
                raise self._malformed(data, "a choice is not an object")
            delta = choice.get("delta") or {}
            if not isinstance(delta, dict):
                raise self._malformed(data, "delta is not an object")
            content = delta.get("content")
            if content is not None and not isinstance(content, str):
                raise self._malformed(data, "delta.content is not a string")
            if content:
                pieces.append(content)
            if choice.get("finish_reason"):
                self.finished = True
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            tokens = usage.get("completion_tokens")
            if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0:
                pieces.append(TokenCount(tokens))
        return pieces


@attrs.frozen
class OpenAIChatSource:
    """Streams a chat completion from an OpenAI-compatible provider (see the module doc).

    ``request.prompt`` is the user message, ``request.system`` the system message (when
    not empty); ``request.max_tokens`` is sent when above 0.
    """

    config: LLMConfig

    def body(self, request: TokenRequest) -> dict[str, Any]:
        """The JSON body of the chat-completions request for ``request``."""
        messages = []
        if request.system:
            messages.append({"role": "system", "content": request.system})
        messages.append({"role": "user", "content": request.prompt})
        body: dict[str, Any] = {
            "model": self.config.model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.max_tokens > 0:
            body["max_tokens"] = request.max_tokens
        if request.temperature is not None:
            body["temperature"] = request.temperature
        return body

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream", "Content-Type": "application/json"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        return headers

    async def stream(self, request: TokenRequest) -> AsyncIterator[Piece]:
        config = self.config
        payload = orjson.dumps(self.body(request))
        loop = asyncio.get_running_loop()
        # The first-token deadline covers the connection too; connecting has its own bound.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=config.connect_timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            attempt = 0
            while True:
                attempt += 1
                deadline = loop.time() + config.first_token_timeout_s
                try:
                    response, decoder, first = await self._open(session, payload, deadline)
                    break
                except _Retry as exc:
                    message = config.redact(exc.message)
                    if attempt > config.max_retries:
                        suffix = f" (after {attempt} attempts)" if attempt > 1 else ""
                        raise ProviderError(message + suffix) from None
                    wait_s = exc.retry_after_s
                    if wait_s is None:
                        wait_s = config.backoff_s * 2 ** (attempt - 1)
                    if wait_s > config.max_retry_wait_s:
                        raise ProviderError(
                            f"{message} (the provider asks to retry in {wait_s:g} s, "
                            f"longer than {config.max_retry_wait_s:g} s)"
                        ) from None
                    log.warning(
                        "llm request failed; retrying",
                        model=config.model,
                        step=request.step,
                        attempt=attempt,
                        wait_s=round(wait_s, 3),
                        reason=message,
                    )
                    await asyncio.sleep(wait_s)
            try:
                for piece in first:
                    yield piece
                while not decoder.done:
                    async with asyncio.timeout(config.idle_timeout_s):
                        data = await self._read(response)
                    if not data:
                        if decoder.finished:
                            return  # complete without [DONE]: some servers end like this
                        raise ProviderError(
                            "the provider's stream was cut mid-way (it ended before the reply did)"
                        )
                    for piece in decoder.feed(data):
                        yield piece
            except TimeoutError:
                raise ProviderError(
                    f"the provider sent nothing for {config.idle_timeout_s:g} s mid-stream"
                ) from None
            finally:
                # Closes the connection (not back to a pool): on cancel, the provider
                # sees the disconnect now and stops generating.
                response.close()

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        try:
            return await response.content.readany()
        except aiohttp.ClientPayloadError:
            return b""  # a broken chunked body: the stream was cut
        except aiohttp.ClientConnectionError:
            return b""

    async def _open(
        self, session: aiohttp.ClientSession, payload: bytes, deadline: float
    ) -> tuple[aiohttp.ClientResponse, _Decoder, list[Piece]]:
        """Send the request and read up to its first text token (or its end)."""
        config = self.config
        try:
            async with asyncio.timeout_at(deadline):
                response = await session.post(
                    config.chat_url, data=payload, headers=self._headers()
                )
        except TimeoutError:
            raise _Retry(
                f"no answer from the provider within {config.first_token_timeout_s:g} s"
            ) from None
        except aiohttp.ClientConnectionError as exc:
            raise _Retry(
                f"could not reach the provider at {config.base_url}: {type(exc).__name__}: {exc}"
            ) from None
        try:
            return response, *(await self._first(response, deadline))
        except BaseException:
            response.close()
            raise

    async def _first(
        self, response: aiohttp.ClientResponse, deadline: float
    ) -> tuple[_Decoder, list[Piece]]:
        config = self.config
        if response.status != 200:
            try:
                async with asyncio.timeout_at(deadline):
                    body = await response.content.read(_ERROR_BODY_BYTES)
            except (TimeoutError, aiohttp.ClientError):
                body = b""
            message = (
                _error_message(body, config.redact)
                if body
                else config.redact(response.reason or "")
            )
            text = f"the provider answered HTTP {response.status}: {message}"
            if response.status in _RETRY_STATUSES:
                raise _Retry(text, _retry_after_s(response.headers.get("Retry-After")))
            raise ProviderError(text + _HINTS.get(response.status, ""), status=response.status)
        if response.content_type != "text/event-stream":
            body = await response.content.read(_ERROR_BODY_BYTES)
            message = _error_message(body, config.redact)
            raise ProviderError(
                f"the provider answered {response.content_type!r}, not a stream: {message}"
            )
        decoder = _Decoder(config)
        pieces: list[Piece] = []
        try:
            async with asyncio.timeout_at(deadline):
                while not decoder.done:
                    data = await self._read(response)
                    if not data:
                        if decoder.finished:
                            break
                        raise _Retry("the provider's stream ended before the first token")
                    pieces.extend(decoder.feed(data))
                    if any(isinstance(piece, str) for piece in pieces):
                        break
        except TimeoutError:
            raise _Retry(
                f"no token from the provider within {config.first_token_timeout_s:g} s"
            ) from None
        return decoder, pieces


_CHAT_INPUTS = ("prompt", "system")
_CHAT_OPTIONS = ("max_tokens", "temperature")
MAX_PROMPT_CHARS = 200_000


@attrs.frozen
class ChatPipeline:
    """The built-in ``chat`` pipeline: one step answering ``input.prompt`` from the provider.

    ``input``: ``prompt`` (required), ``system`` (optional). ``options``: ``max_tokens``
    (1-131072; also the progress estimate, else ``expected_tokens``) and ``temperature``
    (0-2). With no provider configured (``source`` None) a job is refused with a 400.
    """

    name: ClassVar[str] = "chat"
    source: TokenSource | None
    expected_tokens: int = 256

    def plan(self, input: Mapping[str, Any], options: Mapping[str, Any]) -> JobPlan:
        if self.source is None:
            raise InvalidField(
                "pipeline",
                "the chat pipeline needs a model provider: set FLUSHLINE_LLM_BASE_URL and "
                "FLUSHLINE_LLM_MODEL (and FLUSHLINE_LLM_API_KEY if it asks for one)",
            )
        for key in sorted(set(input) - set(_CHAT_INPUTS)):
            raise InvalidField(f"input.{key}", f"unknown input; allowed: {', '.join(_CHAT_INPUTS)}")
        for key in sorted(set(options) - set(_CHAT_OPTIONS)):
            raise InvalidField(
                f"options.{key}", f"unknown option; allowed: {', '.join(_CHAT_OPTIONS)}"
            )
        prompt = input.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidField("input.prompt", "required: a non-empty string")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InvalidField("input.prompt", f"at most {MAX_PROMPT_CHARS} characters")
        system = input.get("system", "")
        if not isinstance(system, str) or len(system) > MAX_PROMPT_CHARS:
            raise InvalidField("input.system", f"a string of at most {MAX_PROMPT_CHARS} characters")
        max_tokens = options.get("max_tokens", 0)
        if max_tokens != 0 and (
            isinstance(max_tokens, bool)
            or not isinstance(max_tokens, int)
            or not 1 <= max_tokens <= 131_072
        ):
            raise InvalidField("options.max_tokens", "must be an integer from 1 to 131072")
        temperature = options.get("temperature")
        if temperature is not None and (
            isinstance(temperature, bool)
            or not isinstance(temperature, int | float)
            or not 0 <= temperature <= 2
        ):
            raise InvalidField("options.temperature", "must be a number from 0 to 2")
        request = TokenRequest(
            prompt=prompt,
            max_tokens=max_tokens,
            step="reply",
            system=system,
            temperature=None if temperature is None else float(temperature),
        )
        step = StepPlan(
            "reply", max_tokens or self.expected_tokens, self.source, request, ("Thinking...",)
        )
        return JobPlan((step,))

    def result(self, plan: JobPlan, outputs: Sequence[str]) -> Any:
        return {"text": outputs[0]}
