"""Bad input the HTTP parser refuses, sent as raw bytes to a real ``flushline serve``.

Each answer must be the contract's JSON error with the right status, the server's own
headers, and a closed connection: never plain text, never a hang, never a 500.
"""

from __future__ import annotations

import gzip
import socket
import time
from collections.abc import Iterator

import pytest

from tests.support.jobs import Client, expect_json_error
from tests.support.server_load import RawAnswer, exchange, parse_answer, serve_blocking

BIG = b"a" * 9000


def _post(headers: bytes, body: bytes) -> bytes:
    return (
        b"POST /api/jobs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n%s\r\n%s"
        % (
            headers,
            body,
        )
    )


#: (name, raw request, status, error code)
BAD_INPUTS = [
    (
        "header_too_large",
        b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Big: " + BIG + b"\r\n\r\n",
        431,
        "header_too_large",
    ),
    (
        "too_many_headers",
        b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n"
        + b"".join(b"X-H%d: v\r\n" % i for i in range(300))
        + b"\r\n",
        431,
        "header_too_large",
    ),
    (
        "request_line_too_long",
        b"GET /healthz?" + BIG + b" HTTP/1.1\r\nHost: localhost\r\n\r\n",
        431,
        "header_too_large",
    ),
    (
        "bad_chunk_size",
        _post(b"Transfer-Encoding: chunked\r\n", b"zz\r\n{}\r\n0\r\n\r\n"),
        400,
        "bad_request",
    ),
    (
        "unknown_method",
        b"FROB /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n",
        501,
        "method_not_implemented",
    ),
    ("invalid_method", b"G@T /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n", 400, "bad_request"),
    ("malformed_request_line", b"GARBAGE\r\n\r\n", 400, "bad_request"),
    ("bad_http_version", b"GET /healthz HTTP/9.9\r\nHost: localhost\r\n\r\n", 400, "bad_request"),
    (
        "tls_on_http_port",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,
        400,
        "bad_request",
    ),
    ("bad_content_length", _post(b"Content-Length: abc\r\n", b"{}"), 400, "bad_request"),
    (
        "gzip_that_is_not",
        _post(b"Content-Encoding: gzip\r\nContent-Length: 2\r\n", b"{}"),
        400,
        "invalid_body",
    ),
    (
        "unknown_encoding",
        _post(b"Content-Encoding: frobnicate\r\nContent-Length: 2\r\n", b"{}"),
        415,
        "unsupported_encoding",
    ),
    (
        "brotli_without_library",
        _post(b"Content-Encoding: br\r\nContent-Length: 2\r\n", b"{}"),
        415,
        "unsupported_encoding",
    ),
]


@pytest.fixture(scope="module")
def port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """One server for the module: each case is one connection."""
    log = tmp_path_factory.mktemp("parser") / "server.log"
    with serve_blocking(log) as server_port:
        yield server_port


class TestParserErrorsAreJson:
    """Every input the parser refuses gets a JSON error, the right status, and a close."""

    @pytest.mark.parametrize(
        ("raw", "status", "code"),
        [pytest.param(raw, status, code, id=name) for name, raw, status, code in BAD_INPUTS],
    )
    def test_bad_input_answered_in_json(
        self, port: int, raw: bytes, status: int, code: str
    ) -> None:
        """The answer is the contract's JSON error with its status; the server closes."""
        answer, closed = exchange(port, raw)
        assert answer.status == status, answer
        assert answer.headers["content-type"].startswith("application/json"), answer
        error = answer.json()["error"]
        assert isinstance(error, dict)
        assert error["code"] == code
        assert isinstance(error["message"], str)
        assert error["message"]
        assert closed, "the connection stayed open after the error"

    @pytest.mark.parametrize(
        "raw", [pytest.param(raw, id=name) for name, raw, _, _ in BAD_INPUTS[:3]]
    )
    def test_error_answers_carry_server_headers(self, port: int, raw: bytes) -> None:
        """Parser errors carry nosniff and a Server header that names no version."""
        answer, _ = exchange(port, raw)
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["server"] == "flushline"

    def test_real_gzip_body_still_accepted(self, port: int) -> None:
        """A body that is gzip, labelled gzip, creates its job (the check refuses only lies)."""
        body = gzip.compress(b'{"options": {"steps": 1}}')
        raw = _post(
            b"Content-Encoding: gzip\r\nContent-Length: %d\r\nConnection: close\r\n" % len(body),
            body,
        )
        answer, _ = exchange(port, raw)
        assert answer.status == 201, answer
        assert answer.json()["status"] in ("queued", "running")

    def test_server_keeps_answering_after_bad_input(self, port: int) -> None:
        """After every bad input above, a plain request is answered normally."""
        for _, raw, _, _ in BAD_INPUTS:
            exchange(port, raw)
        answer, _ = exchange(
            port, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        assert answer.status == 200
        assert answer.json()["status"] == "ok"


#: A chunked POST's head and first chunk: a well-formed start the handler begins to read.
CHUNKED_START = _post(b"Transfer-Encoding: chunked\r\n", b'5\r\n{"opt\r\n')
#: How long after the first chunk the rest comes: the handler is reading the body by then.
SECOND_CHUNK_AFTER_S = 0.3
ANSWER_WITHIN_S = 1.0


def send_in_two(port: int, first: bytes, second: bytes) -> tuple[RawAnswer, float]:
    """Send ``first``, then ``second`` 0.3 s later; the answer and how long it took after."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(first)
        time.sleep(SECOND_CHUNK_AFTER_S)
        sent_at = time.monotonic()
        sock.sendall(second)
        received = b""
        while b"\r\n\r\n" not in received:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise AssertionError(f"no answer within 5 s: {received!r}") from None
            if not chunk:
                break
            received += chunk
        took_s = time.monotonic() - sent_at
        sock.settimeout(2)
        answer = parse_answer(received)
        length = int(answer.headers.get("content-length", "0"))
        while len(answer.body) < length:
            chunk = sock.recv(65536)
            assert chunk, "closed mid-body"
            answer = RawAnswer(answer.status, answer.headers, answer.body + chunk)
    return answer, took_s


class TestBodyErrorsWhileReading:
    """A body that turns bad after the handler began reading it is answered, not left hanging."""

    @pytest.mark.parametrize(
        "second",
        [
            pytest.param(b"zz\r\nions\r\n0\r\n\r\n", id="bad_chunk_size"),
            pytest.param(b"4\r\nionsXX\r\n0\r\n\r\n", id="chunk_longer_than_its_size"),
        ],
    )
    def test_malformed_second_chunk_is_a_json_400_within_1s(self, port: int, second: bytes) -> None:
        """The second chunk malformed, 0.3 s after the first: a JSON 400 within 1 s."""
        answer, took_s = send_in_two(port, CHUNKED_START, second)
        assert answer.status == 400, answer
        assert answer.headers["content-type"].startswith("application/json"), answer
        error = answer.json()["error"]
        assert isinstance(error, dict)
        assert error["code"] == "bad_request"
        assert "chunk" in str(error["message"]).lower(), error
        assert took_s < ANSWER_WITHIN_S, took_s

    def test_good_second_chunk_still_creates_the_job(self, port: int) -> None:
        """The same request with a well-formed rest: 201, so only the bad chunk is refused."""
        rest = b'14\r\nions": {"steps": 1}}\r\n0\r\n\r\n'
        answer, took_s = send_in_two(port, CHUNKED_START, rest)
        assert answer.status == 201, answer
        assert took_s < ANSWER_WITHIN_S, took_s


class TestUnderAnotherServer:
    """The app alone (a test client's server, an embedding app) refuses bad bodies the same way."""

    async def test_gzip_that_is_not_is_a_400_naming_the_body(self, client: Client) -> None:
        """A body labelled gzip that is not: 400, field body, never a 500."""
        response = await client.post(
            "/api/jobs", data=b"{not gzip at all}", headers={"Content-Encoding": "gzip"}
        )
        await expect_json_error(response, 400, field="body")

    async def test_unknown_encoding_is_a_415(self, client: Client) -> None:
        """A Content-Encoding the service does not decode: 415 unsupported_encoding."""
        response = await client.post(
            "/api/jobs", data=b"{}", headers={"Content-Encoding": "compress"}
        )
        body = await expect_json_error(response, 415)
        assert body["code"] == "unsupported_encoding"

    async def test_real_gzip_is_accepted(self, client: Client) -> None:
        """A gzip body that is one creates the job."""
        response = await client.post(
            "/api/jobs",
            data=gzip.compress(b'{"strategy": "none"}'),
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )
        assert response.status == 201, await response.text()
