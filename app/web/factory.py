"""The application factory: ``init_app(settings) -> web.Application``.

``flushline serve``, ``python -m app`` and the tests all build the app here. The bus and
the job store come from ``FLUSHLINE_BUS``: in this process (``memory``), or in Redis
(``redis``, at ``FLUSHLINE_REDIS_URL``), whose connection is checked at start-up
(:class:`StartupError` when it cannot be reached) and closed at shutdown.
"""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import structlog
from aiohttp import web

from app.bus import EventBus, MemoryEventBus
from app.core.settings import Settings
from app.core.tasks import cancel_and_wait
from app.jobs.control import JobControl
from app.jobs.external import EXTERNAL_PIPELINE
from app.jobs.external_jobs import ExternalLimits, Refresh
from app.jobs.limits import JsonLimits
from app.jobs.llm import ChatPipeline, LLMConfig, OpenAIChatSource
from app.jobs.loader import load_pipelines
from app.jobs.manager import JobManager
from app.jobs.pipelines import DemoPipeline, Pipeline
from app.jobs.producers import MemoryProducerStore, ProducerStore
from app.jobs.steps import bind_source
from app.jobs.store import JobStore, MemoryJobStore
from app.jobs.tokens import TokenSource
from app.web import api
from app.web.auth import install_auth
from app.web.cors import CorsPolicy
from app.web.diagnostics import diagnostics_stream
from app.web.hosts import HostAllowList
from app.web.keys import BUS, MANAGER, SETTINGS
from app.web.metrics import install_metrics
from app.web.middleware import middlewares, response_headers
from app.web.openapi import install_openapi
from app.web.poll import SHARED_READS, SharedReads, poll_events
from app.web.publish import publish_events
from app.web.stream import stream_job
from strategies import STRATEGIES, build_strategy

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["StartupError", "init_app"]

log = structlog.get_logger(__name__)

EXPIRY_INTERVAL_S = 60.0
#: How long start-up waits for Redis to answer before giving up.
REDIS_CONNECT_TIMEOUT_S = 5.0
#: The page and the browser client (``flushline.js``), served as they are: no build step.
STATIC_DIR = pathlib.Path(__file__).parent / "static"


def init_app(settings: Settings, *, pipelines: Iterable[Pipeline] = ()) -> web.Application:
    """Build the Flushline application.

    ``pipelines``, then those of ``FLUSHLINE_PIPELINES``, are registered beside the
    built-in ``demo`` and ``chat`` (a user pipeline with the same name replaces it). Their
    prompt steps use the configured provider, else the simulated source. A path that does
    not import raises ``PipelineLoadError`` (a ``ValueError``) naming it.
    """
    app = web.Application(middlewares=middlewares, client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    bus: EventBus
    store: JobStore
    control: JobControl | None = None
    producers: ProducerStore
    refresh: Refresh | None = None
    if settings.bus == "redis":
        # Imported here: a memory-bus service never loads the Redis client.
        from app.bus.redis import RedisEventBus
        from app.bus.redis_client import connect_redis
        from app.jobs.redis_control import RedisJobControl
        from app.jobs.redis_producers import RedisProducerStore
        from app.jobs.redis_store import RedisJobStore

        redis = connect_redis(settings.redis_url)
        bus = RedisEventBus(
            redis,
            history_limit=settings.history_limit,
            queue_limit=settings.subscriber_queue,
            history_bytes=settings.max_history_bytes,
            job_ttl_s=settings.job_ttl_s,
            grace_s=settings.redis_grace_s,
        )
        redis_store = RedisJobStore(redis, job_ttl_s=settings.job_ttl_s)
        store = redis_store
        refresh = redis_store.fold
        producers = RedisProducerStore(redis, job_ttl_s=settings.job_ttl_s)
        control = RedisJobControl(
            redis, bus, redis_store, lease_s=settings.runner_lease_s, job_ttl_s=settings.job_ttl_s
        )
        # First in cleanup_ctx, so the connection closes after everything that uses it.
        app.cleanup_ctx.append(_redis_connection(redis, settings.redis_url))
    else:
        bus = MemoryEventBus(
            history_limit=settings.history_limit,
            queue_limit=settings.subscriber_queue,
            history_bytes=settings.max_history_bytes,
        )
        store = MemoryJobStore()
        producers = MemoryProducerStore()
    app[BUS] = bus
    registry = _pipeline_registry(settings, pipelines)
    if settings.pipeline not in registry:
        raise ValueError(
            f"invalid FLUSHLINE_PIPELINE={settings.pipeline!r}: allowed: {', '.join(registry)}"
        )
    tuning = settings.tuning()
    app[MANAGER] = JobManager(
        bus=bus,
        store=store,
        pipelines=registry,
        strategies={name: build_strategy(name, tuning) for name in STRATEGIES},
        max_active_jobs=settings.max_active_jobs,
        job_ttl_s=settings.job_ttl_s,
        max_retained_jobs=settings.max_retained_jobs,
        control=control,
        backend_grace_s=settings.redis_grace_s,
        max_history_bytes=settings.max_history_bytes,
        max_retained_bytes=settings.max_retained_bytes,
        input_limits=JsonLimits(max_bytes=settings.max_body_bytes),
        producers=producers,
        refresh_snapshot=refresh,
        external_limits=ExternalLimits(
            producer_timeout_s=settings.producer_timeout_s,
            max_job_bytes=settings.publish_max_job_bytes,
            rate_per_s=settings.publish_rate_per_s,
            max_events=settings.publish_max_events,
        ),
    )
    app.add_routes(api.routes)
    app.router.add_get("/api/jobs/{job_id}/stream", stream_job, allow_head=False)
    app.router.add_get("/api/jobs/{job_id}/events", poll_events, allow_head=False)
    app[SHARED_READS] = SharedReads()
    app.router.add_post("/api/jobs/{job_id}/events", publish_events)
    app.router.add_get("/api/diagnostics/stream", diagnostics_stream, allow_head=False)
    app.router.add_get("/", index_page)
    app.router.add_get("/static/{filename}", static_file)
    app.cleanup_ctx.append(_expiry_task)
    app.on_shutdown.append(_stop_jobs)
    app.on_response_prepare.append(response_headers)
    hosts = HostAllowList.from_settings(settings)
    if hosts is not None:
        hosts.install(app)
    CorsPolicy(settings.cors_origins).install(app)
    install_auth(app)
    install_metrics(app)
    install_openapi(app)
    return app


def _pipeline_registry(settings: Settings, pipelines: Iterable[Pipeline]) -> dict[str, Pipeline]:
    """The built-in pipelines, then the given ones, then ``FLUSHLINE_PIPELINES``."""
    provider: TokenSource | None = None
    if settings.llm_base_url is not None and settings.llm_model is not None:
        provider = OpenAIChatSource(
            LLMConfig(
                base_url=settings.llm_base_url,
                model=settings.llm_model,
                api_key=settings.llm_api_key,
            )
        )
    registry: dict[str, Pipeline] = {
        DemoPipeline.name: DemoPipeline(),
        ChatPipeline.name: ChatPipeline(provider),
    }
    for pipeline in (*pipelines, *load_pipelines(settings.pipelines)):
        if pipeline.name == EXTERNAL_PIPELINE:
            raise ValueError(
                f"a pipeline may not be called {EXTERNAL_PIPELINE!r}: the name is the publish "
                "API's (jobs run elsewhere)"
            )
        registry[pipeline.name] = pipeline if provider is None else bind_source(pipeline, provider)
    return registry


class StartupError(RuntimeError):
    """Something the service needs cannot be reached at start-up; the message is one line.

    Raised out of ``web.run_app`` (from the app's start-up); ``flushline serve`` prints it
    and exits with status 2.
    """


def redact_url(url: str) -> str:
    """``url`` without its password (``redis://user:***@host``), for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[2]}"))


def _redis_connection(redis: Redis, url: str) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context: Redis must answer ``PING`` at start-up; closed at shutdown."""

    async def connection(app: web.Application) -> AsyncIterator[None]:
        from redis.exceptions import RedisError

        try:
            async with asyncio.timeout(REDIS_CONNECT_TIMEOUT_S):
                await redis.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            await redis.aclose()
            reason = " ".join(str(exc).split()) or f"no answer within {REDIS_CONNECT_TIMEOUT_S:g} s"
            raise StartupError(
                f"cannot reach Redis at {redact_url(url)} (FLUSHLINE_REDIS_URL): {reason}"
            ) from None
        yield
        await redis.aclose()

    return connection


#: The files under ``/static/``: any other name is our JSON 404 (aiohttp's static route
#: finds a missing file only while sending, and answers an empty 404).
STATIC_FILES = frozenset(path.name for path in STATIC_DIR.iterdir() if path.is_file())


async def static_file(request: web.Request) -> web.FileResponse:
    """``GET /static/{filename}``: the page's files and ``flushline.js``."""
    name = request.match_info["filename"]
    if name not in STATIC_FILES:
        raise web.HTTPNotFound()
    return web.FileResponse(STATIC_DIR / name)


async def index_page(request: web.Request) -> web.FileResponse:
    """``GET /``: the live progress page (``?job=ID`` opens an existing job)."""
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def _expiry_task(app: web.Application) -> AsyncIterator[None]:
    """Forget finished jobs after ``FLUSHLINE_JOB_TTL``, checking once a minute."""
    manager = app[MANAGER]

    async def expire_forever() -> None:
        while True:
            await asyncio.sleep(min(EXPIRY_INTERVAL_S, manager.job_ttl_s))
            expired = await manager.expire()
            if expired:
                log.info("jobs expired", count=expired)

    task = asyncio.create_task(expire_forever(), name="job-expiry")
    # With Redis: the cancel watcher, the lease renewer and the lost-runner sweeper.
    maintenance = asyncio.create_task(manager.maintain(), name="job-maintenance")
    # External jobs whose producer went silent end failed (on every instance).
    producers = asyncio.create_task(manager.watch_producers(), name="producer-sweep")
    yield
    await cancel_and_wait(producers)
    await cancel_and_wait(maintenance)
    await cancel_and_wait(task)
    await app[BUS].aclose()


async def _stop_jobs(app: web.Application) -> None:
    """On shutdown, cancel running jobs: each publishes ``done``, so every stream ends."""
    await app[MANAGER].shutdown()
