"""Shared fixtures: the app built by the real factory, served on a real socket."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from app.core.settings import Settings
from app.jobs.pipelines import Pipeline
from app.web.factory import init_app
from tests.support.browser import launch_browser
from tests.support.redis import RedisServer, require_redis_server, run_redis

if TYPE_CHECKING:
    from playwright.async_api import Browser

MakeClient = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]

#: A demo job that finishes in about a second (2 steps x 40 tokens at 80 tokens/s).
QUICK_JOB = {"steps": 2, "tokens_per_step": 40, "tokens_per_second": 80}


def require_integration() -> bool:
    """Whether a missing integration binary must fail instead of skip."""
    return os.environ.get("FLUSHLINE_REQUIRE_INTEGRATION") == "1"


@pytest.fixture
def make_client(
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
) -> MakeClient:
    """Build the app from ``env`` (FLUSHLINE_* variables) and serve it on a free port."""

    async def make(
        env: Mapping[str, str] | None = None, *, pipelines: tuple[Pipeline, ...] = ()
    ) -> TestClient[web.Request, web.Application]:
        settings = Settings.from_environ(dict(env or {}))
        return await aiohttp_client(init_app(settings, pipelines=pipelines))

    return make


@pytest.fixture
async def client(make_client: MakeClient) -> TestClient[web.Request, web.Application]:
    """The app with default settings."""
    return await make_client()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """A headless system Chromium driven by Playwright (skips, or fails under CI, without it)."""
    async for launched in launch_browser():
        yield launched


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One throw-away redis-server on a free port for the session (skips without the binary).

    Tests sharing it keep apart by unique job ids or key prefixes; a test that stops or
    restarts Redis takes its own server from ``run_redis`` instead.
    """
    binary = require_redis_server()
    with run_redis(tmp_path_factory.mktemp("redis"), binary=binary) as server:
        yield server


@pytest.fixture(params=["memory", "redis"])
def bus_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """The settings of the parametrised bus (Redis: the session's throw-away server)."""
    if request.param == "memory":
        return {}
    server: RedisServer = request.getfixturevalue("redis_server")
    return {"FLUSHLINE_BUS": "redis", "FLUSHLINE_REDIS_URL": server.url}
