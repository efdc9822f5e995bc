"""Bad input the HTTP parser refuses, sent as raw bytes to a real ``flushline serve``.

Each answer must be the contract's JSON error with the right status, the server's own
headers, and a closed connection: never plain text, never a hang, never a 500.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator

import pytest

from tests.support.jobs import Client, expect_json_error
from tests.support.server_load import exchange, serve_blocking

BIG = b"a" * 9000


def _post(headers: bytes, body: bytes) -> bytes:
    return b"POST /api/jobs HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n%s\r\n%s" % (
        headers,
        body,
    )


#: (name, raw request, status, error code)
BAD_INPUTS = [
    (
        "header_too_large",
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + BIG + b"\r\n\r\n",
        431,
        "header_too_large",
    ),
    (
        "too_many_headers",
        b"GET /healthz HTTP/1.1\r\nHost: t\r\n"
        + b"".join(b"X-H%d: v\r\n" % i for i in range(300))
        + b"\r\n",
        431,
        "header_too_large",
    ),
    (
        "request_line_too_long",
        b"GET /healthz?" + BIG + b" HTTP/1.1\r\nHost: t\r\n\r\n",
        431,
        "header_too_large",
    ),
    (
        "bad_chunk_size",
        _post(b"Transfer-Encoding: chunked\r\n", b"zz\r\n{}\r\n0\r\n\r\n"),
        400,
        "bad_request",
    ),
    ("unknown_method", b"FROB /healthz HTTP/1.1\r\nHost: t\r\n\r\n", 501, "method_not_implemented"),
    ("invalid_method", b"G@T /healthz HTTP/1.1\r\nHost: t\r\n\r\n", 400, "bad_request"),
    ("malformed_request_line", b"GARBAGE\r\n\r\n", 400, "bad_request"),
    ("bad_http_version", b"GET /healthz HTTP/9.9\r\nHost: t\r\n\r\n", 400, "bad_request"),
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
        answer, _ = exchange(port, b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert answer.status == 200
        assert answer.json()["status"] == "ok"


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
