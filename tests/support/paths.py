"""The real service behind each delivery path (direct, the buffering emulator, real nginx).

Shared by the delivery, probe and watch tests. The service is built by the real app
factory and served on a real port; in front of it sits nothing (``direct``), the
``flushline proxy`` emulator, or a real nginx (``tests/support/nginx.py``). Every
stream read here is timestamped with ``time.time()`` on the same machine as the
service, so an event's lag is simply its arrival minus its ``ts``.

Slow end-to-end measurements are run once per test module, all paths side by side, on
an event loop of their own in a worker thread (:func:`run_in_thread`); the tests then
only assert on the recorded results.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import pathlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

import aiohttp
import attrs
from aiohttp import web

from app.core.settings import Settings
from app.jobs.pipelines import Pipeline
from app.pathtools.delivery import DeliveryStats, Received, delivery_stats
from app.pathtools.proxy import BufferingProxy, ProxyConfig
from app.web.factory import init_app
from tests.support.nginx import NginxMode, run_nginx
from tests.support.sse_client import StreamRecord, read_stream

__all__ = [
    "ALL_PATHS",
    "CLIENT_JOB",
    "CLIENT_PATHS",
    "DIRECT",
    "EMULATOR_4096_ALL",
    "EMULATOR_8192_BLOCKS",
    "EMULATOR_HOLD_ALL",
    "EMULATOR_PATHS",
    "HOLD_ALL_BYTES",
    "NGINX_GZIP",
    "NGINX_HTTP10",
    "NGINX_HTTP10_8K",
    "NGINX_HTTP11",
    "SHORT_JOB",
    "ClientRun",
    "DeliveryPath",
    "JobDelivery",
    "comment_bytes",
    "deliver_job",
    "job_history",
    "open_path",
    "run_in_thread",
    "serve",
    "start_job",
    "watch_in_browser",
    "watch_page_in_browser",
    "watch_through",
]

T = TypeVar("T")

#: A demo job of about 3 s (2 steps x 2 tokens at 1.4 tokens/s, 18 events with ``none``:
#: each token moves its step's bar 50 points, and every visible move is a
#: ``step_progress``). Unshaped, its stream holds about 3.3 KB until its final instant
#: (last chunk, ``step_completed`` and ``done``, which carries the result): under the
#: first release of every buffering path here (nginx HTTP/1.0: 4096 minus its ~200-byte
#: response head), so through them ``none`` arrives all at the end. More tokens would
#: mean more progress events, past nginx's ~3.9 KB first release.
SHORT_JOB: dict[str, Any] = {"steps": 2, "tokens_per_step": 2, "tokens_per_second": 1.4}

_PLACEHOLDER = "http://placeholder.invalid"


@attrs.frozen
class DeliveryPath:
    """One way from the service to the client, and the buffer size a probe reports for it."""

    name: str
    buffer_bytes: int  # 0: the path does not buffer
    proxy: ProxyConfig | None = None
    nginx: NginxMode | None = None
    #: Extra directives for nginx's ``location /`` (e.g. bigger buffers).
    nginx_directives: str = ""

    @property
    def env(self) -> dict[str, str]:
        """The service settings for this path (``aligned`` told the path's buffer size)."""
        return {"FLUSHLINE_PROXY_BUFFER_BYTES": str(self.buffer_bytes)}

    def __str__(self) -> str:
        return self.name


def _emulator(size: int, release: str) -> DeliveryPath:
    config = ProxyConfig(upstream=_PLACEHOLDER, threshold_bytes=size, release=release)
    return DeliveryPath(f"emulator-{size}-{release}", size, proxy=config)


DIRECT = DeliveryPath("direct", 0)
EMULATOR_PATHS = tuple(
    _emulator(size, release) for size in (4096, 16384) for release in ("all", "blocks")
)
NGINX_HTTP10 = DeliveryPath("nginx-http10", 4096, nginx=NginxMode.HTTP10)
NGINX_GZIP = DeliveryPath("nginx-gzip", 4096, nginx=NginxMode.GZIP)
NGINX_HTTP11 = DeliveryPath("nginx-http11", 0, nginx=NginxMode.HTTP11)
ALL_PATHS = (DIRECT, *EMULATOR_PATHS, NGINX_HTTP10, NGINX_GZIP, NGINX_HTTP11)
#: Holds every write about 200 ms, whatever its size (``--threshold 1000000
#: --max-hold-s 0.2``): headers and every event arrive about 200 ms late.
EMULATOR_TIME_HOLD = DeliveryPath(
    "emulator-hold-200ms",
    0,
    proxy=ProxyConfig(upstream=_PLACEHOLDER, threshold_bytes=1_000_000, max_hold_s=0.2),
)
#: A threshold larger than any response here: the whole response arrives at its end,
#: with a ``Content-Length``.
EMULATOR_WHOLE_RESPONSE = DeliveryPath(
    "emulator-whole-response", 0, proxy=ProxyConfig(upstream=_PLACEHOLDER, threshold_bytes=1 << 30)
)
#: ``--gzip`` at 4096 (compressed) bytes, like nginx gzip-ing ``text/event-stream``.
EMULATOR_GZIP = DeliveryPath(
    "emulator-gzip", 4096, proxy=ProxyConfig(upstream=_PLACEHOLDER, threshold_bytes=4096, gzip=True)
)
#: Paths that no block size gets a stream through on time.
HOLDING_PATHS = (EMULATOR_TIME_HOLD, EMULATOR_WHOLE_RESPONSE, EMULATOR_GZIP)


@contextlib.asynccontextmanager
async def serve(
    env: Mapping[str, str] | None = None, pipelines: Iterable[Pipeline] = ()
) -> AsyncIterator[str]:
    """Run the app (real factory, ``FLUSHLINE_*`` from ``env``, ``pipelines`` registered)
    on a free port; yield its URL.

    Unlike ``bench.common.serve`` it leaves the global logging configuration alone, so
    other tests' ``structlog.testing.capture_logs`` keep working.
    """
    settings = Settings.from_environ({"FLUSHLINE_LOG_LEVEL": "warning", **(env or {})})
    app = init_app(settings, pipelines=pipelines)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def open_path(
    path: DeliveryPath, upstream: str, tmp_dir: pathlib.Path, **proxy_overrides: Any
) -> AsyncIterator[str]:
    """Put ``path`` in front of ``upstream``; yield the base URL a client should use.

    ``tmp_dir`` must be private to this call (nginx keeps its pid file and logs there).
    ``proxy_overrides`` change the emulator's config (e.g. ``max_hold_s``).
    """
    if path.proxy is not None:
        config = attrs.evolve(path.proxy, upstream=upstream, **proxy_overrides)
        async with BufferingProxy(config) as proxy:
            yield proxy.url
    elif path.nginx is not None:
        port = int(upstream.rsplit(":", 1)[1])
        async with run_nginx(
            port, path.nginx, tmp_dir=tmp_dir, extra_directives=path.nginx_directives
        ) as nginx:
            yield nginx.url
    else:
        yield upstream


def comment_bytes(raw: bytes) -> int:
    """Bytes of SSE comment lines (padding) in ``raw``, line breaks included."""
    return sum(len(line) + 1 for line in raw.split(b"\n") if line.startswith(b":"))


@attrs.frozen
class JobDelivery:
    """What one job's stream delivered through a path, and when."""

    strategy: str
    requested_at: float  # time.time() just before the stream request
    record: StreamRecord
    received: tuple[Received, ...]

    @property
    def stats(self) -> DeliveryStats:
        """Lag percentiles and bursts, as ``flushline watch`` and the benchmarks judge them."""
        return delivery_stats(self.received)

    @property
    def lags_s(self) -> list[float]:
        """Arrival minus ``ts`` of every event, in stream order."""
        return [r.lag_s for r in self.received]

    @property
    def headers_after_s(self) -> float:
        """How long after the request the response headers arrived."""
        return self.record.headers_at - self.requested_at

    @property
    def emitted_span_s(self) -> float:
        """Time between the first and the last event's ``ts``."""
        return self.received[-1].ts - self.received[0].ts

    @property
    def arrival_span_s(self) -> float:
        """Time between the first and the last event's arrival."""
        return self.received[-1].arrived - self.received[0].arrived

    @property
    def padding_bytes(self) -> int:
        """Comment (padding) bytes in the stream."""
        return comment_bytes(self.record.raw)

    @property
    def padding_per_s(self) -> float:
        """Comment bytes per second of job time (first to last event)."""
        return self.padding_bytes / self.emitted_span_s

    def describe(self) -> str:
        """One line for assertion messages."""
        s = self.stats
        return (
            f"{self.strategy}: {s.events} events, lag p50 {s.lag_p50_ms:.0f} ms "
            f"max {s.lag_max_ms:.0f} ms, {s.burst_share:.0%} in bursts, headers after "
            f"{self.headers_after_s * 1000:.0f} ms, arrivals over {self.arrival_span_s:.2f} s "
            f"of {self.emitted_span_s:.2f} s emitted"
        )


async def start_job(
    session: aiohttp.ClientSession, service: str, strategy: str, options: Mapping[str, Any]
) -> dict[str, Any]:
    """POST a demo job to ``service``; return its snapshot."""
    body = {"strategy": strategy, "options": dict(options)}
    async with session.post(f"{service}/api/jobs", json=body) as response:
        snapshot = await response.json()
        assert response.status == 201, snapshot
    assert isinstance(snapshot, dict)
    return snapshot


async def deliver_job(
    session: aiohttp.ClientSession,
    service: str,
    front: str,
    strategy: str,
    options: Mapping[str, Any],
    *,
    headers: dict[str, str] | None = None,
    timeout_s: float = 60.0,
) -> JobDelivery:
    """Start a job on ``service`` and record its stream read through ``front``."""
    job = await start_job(session, service, strategy, options)
    requested_at = time.time()
    record = await read_stream(
        session, front + job["links"]["stream"], headers=headers, timeout_s=timeout_s
    )
    assert record.status == 200, (record.status, record.raw[:200])
    payloads = record.payloads()
    assert payloads, f"{strategy}: no events arrived"
    assert payloads[-1]["type"] == "done", payloads[-1]
    received = tuple(
        Received(float(p["ts"]), a.at) for p, a in zip(payloads, record.events, strict=True)
    )
    return JobDelivery(strategy, requested_at, record, received)


def run_in_thread(main: Callable[[], Awaitable[T]]) -> T:
    """Run ``main()`` to completion on a fresh event loop in a worker thread.

    For module-scoped measurements: the test's own event loop is left untouched.
    """

    async def runner() -> T:
        return await main()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(runner())).result()


# --------------------------------------------------------------------------- the browser client

#: The job the browser client watches through each path (about 15 s): 5 steps x 6 tokens
#: at 2 tokens/s, about 60 events, each token a visible progress move (17 points of its
#: step). The event rate the client's sensing was built and measured against: the same
#: 15 s at 80 tokens/s (5 x 240) now sends every point of progress, about 200 events, and
#: with eight pages at once on 2 cores the client misjudges holds (issue 17).
CLIENT_JOB: dict[str, Any] = {
    "steps": 5,
    "tokens_per_step": 6,
    "tokens_per_second": 2,
    "seed": 7,
}
#: An emulator threshold no job here reaches: the proxy holds the whole response.
HOLD_ALL_BYTES = 64 * 1024 * 1024


def _client_emulator(
    name: str,
    threshold: int,
    release: str = "all",
    *,
    gzip: bool = False,
    max_hold_s: float | None = None,
) -> DeliveryPath:
    config = ProxyConfig(
        upstream=_PLACEHOLDER,
        threshold_bytes=threshold,
        release=release,
        gzip=gzip,
        max_hold_s=max_hold_s,
    )
    return DeliveryPath(name, threshold, proxy=config)


EMULATOR_4096_ALL = _client_emulator("emulator-4096-all", 4096)
EMULATOR_8192_BLOCKS = _client_emulator("emulator-8192-blocks", 8192, "blocks")
EMULATOR_HOLD_ALL = _client_emulator("emulator-hold-all", HOLD_ALL_BYTES)
#: nginx's defaults with HTTP/1.0 to the upstream, but 8 KB buffers (one 8k page each).
NGINX_HTTP10_8K = DeliveryPath(
    "nginx-http10-8k",
    8192,
    nginx=NginxMode.HTTP10,
    nginx_directives="proxy_buffer_size 8k;\nproxy_buffers 8 8k;",
)
#: The paths of issue 6 that the browser client must get through with default settings.
CLIENT_PATHS = (
    EMULATOR_4096_ALL,
    EMULATOR_8192_BLOCKS,
    _client_emulator("emulator-12000-all", 12000),
    _client_emulator("emulator-32768-blocks", 32768, "blocks"),
    _client_emulator("emulator-4096-gzip", 4096, gzip=True),
    EMULATOR_HOLD_ALL,
    _client_emulator("emulator-hold-200ms", HOLD_ALL_BYTES, max_hold_s=0.2),
    NGINX_HTTP10_8K,
)

#: Loads ``flushline.js`` over HTTP from the page's origin (the front of the path).
_IMPORT_JS = """
async () => {
  window.__flushline = await import(new URL("static/flushline.js", location.href).href);
}
"""
#: Watches one job with the imported ``flushline.js``, recording what the page would
#: show: a sample of ``overallPct`` and the step statuses every 50 ms, every event with
#: its arrival and lag, the log lines, and each stream connection's arrivals (the
#: client's own records).
_WATCH_JS = """
async ({ streamUrl, options }) => {
  const flushline = window.__flushline;
  const rec = { samples: [], events: [], log: [], connections: [], outcome: null };
  window.__flushlineRecord = rec;
  const note = (...args) =>
    rec.log.push(args.map((a) => (typeof a === "string" ? a : JSON.stringify(a))).join(" "));
  let arrivals = null;
  const watcher = flushline.watchJob(streamUrl, {
    ...options,
    log: { info: note, log: note, warn: note, error: note },
    onEvent(data, info) {
      rec.events.push({
        seq: data.seq, type: data.type, ts: data.ts, step: data.step ?? null,
        index: data.index ?? null, text: data.text ?? null, overall_pct: data.overall_pct ?? null,
        arrivedAt: info.arrivedAt, lagMs: info.lagMs, transport: info.transport,
      });
    },
    onState(state) {
      if (state.arrivals !== arrivals) {
        arrivals = state.arrivals;
        rec.connections.push({
          requestedAt: state.connectionStartedAt, proxyBuffer: state.proxyBuffer, arrivals,
        });
      }
    },
  });
  window.__flushlineWatcher = watcher;
  const sample = () => rec.samples.push(
    [Date.now(), watcher.state.overallPct, watcher.state.steps.map((s) => s.status)]);
  sample();
  const timer = setInterval(sample, 50);
  window.__flushlineFinished = watcher.done
    .then(() => "done", (error) => `failed: ${error.message}`)
    .then((outcome) => {
      sample();
      clearInterval(timer);
      const { arrivals: _, ...state } = watcher.state;
      rec.state = JSON.parse(JSON.stringify(state));
      rec.outcome = outcome;
      return rec;
    });
}
"""


@attrs.frozen
class ClientRun:
    """What the browser client did, and what a page built on it showed, for one job."""

    path: str
    job_id: str
    #: The job's newest event id as the service knows it once the job ended.
    last_seq: int
    #: The full text of each step, from the service's own history (long-poll, direct).
    step_texts: tuple[str, ...]
    record: dict[str, Any]
    #: The path's first measurement, when this run measured it again (its timing missed).
    earlier: ClientRun | None = None

    @property
    def attempts(self) -> tuple[ClientRun, ...]:
        """Every measurement of the path, the first one first."""
        return (self,) if self.earlier is None else (*self.earlier.attempts, self)

    @property
    def state(self) -> dict[str, Any]:
        """The client's final state."""
        state = self.record.get("state")
        assert isinstance(state, dict), self.record.get("outcome")
        return state

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every event handed to ``onEvent``, in order, with arrivedAt/lagMs/transport."""
        events: list[dict[str, Any]] = self.record["events"]
        return events

    @property
    def decisions(self) -> list[dict[str, Any]]:
        """The client's decisions (``state.decisions``)."""
        decisions: list[dict[str, Any]] = self.state["decisions"]
        return decisions

    @property
    def adapted_at_ms(self) -> float:
        """When the client made its last decision (epoch ms)."""
        return float(self.decisions[-1]["at"])

    @property
    def adapted_lags_ms(self) -> list[float]:
        """Lags of the events emitted after the last decision (once adapted)."""
        return [e["lagMs"] for e in self.events if e["ts"] * 1000 >= self.adapted_at_ms]

    @property
    def lags_ms(self) -> list[float]:
        """Lags of every event."""
        return [e["lagMs"] for e in self.events]

    @property
    def job_span_ms(self) -> float:
        """From the first to the last event's ``ts``."""
        return (float(self.events[-1]["ts"]) - float(self.events[0]["ts"])) * 1000

    @property
    def bytes_per_event(self) -> float:
        """Bytes the client received (all transports) per event."""
        return float(self.state["bytes"]) / max(len(self.events), 1)

    def progress_changes(self) -> list[tuple[float, float]]:
        """(time ms, value) of each distinct intermediate (0 < pct < 100) progress value
        the page showed, in the order it first showed them (sampled every 50 ms)."""
        seen: list[tuple[float, float]] = []
        for at, pct, _ in self.record["samples"]:
            if 0 < pct < 100 and all(pct != value for _, value in seen):
                seen.append((float(at), float(pct)))
        return seen

    def choice(self) -> str:
        """What the client ended up using, e.g. ``fetch-stream proxy_buffer=8192``."""
        last = self.decisions[-1]
        hint = f" proxy_buffer={last['proxyBuffer']}" if last.get("proxyBuffer") else ""
        return f"{last['transport']}{hint}"

    def describe(self) -> str:
        """One line for assertion messages."""
        lags = self.lags_ms
        line = (
            f"{self.path}: {self.record.get('outcome')}, {len(self.events)} events of "
            f"{self.last_seq}, chose {self.choice()}, decisions "
            f"{[d['reason'] for d in self.decisions]}, progress {self.progress_changes()}, "
            f"lag max {max(lags, default=0):.0f} ms"
        )
        if self.earlier is not None:
            line += f"; measured again after: {self.earlier.describe()}"
        return line


async def job_history(session: aiohttp.ClientSession, service: str, job_id: str) -> list[Any]:
    """Every event of a finished job, read directly from the service (long-poll)."""
    url = f"{service}/api/jobs/{job_id}/events"
    async with session.get(url, params={"after": "0", "wait_s": "0", "limit": "1000"}) as r:
        body = await r.json()
        assert r.status == 200, body
    events: list[Any] = body["events"]
    return events


async def _client_run(
    service: str, path_name: str, job_id: str, record: dict[str, Any]
) -> ClientRun:
    """The run's record beside what the service itself says the job was."""
    async with aiohttp.ClientSession() as session:
        history = await job_history(session, service, job_id)
    steps = next(e for e in history if e["type"] == "job_started")["steps"]
    texts = tuple(
        "".join(e["text"] for e in history if e["type"] == "chunk" and e["step"] == name)
        for name in steps
    )
    return ClientRun(path_name, job_id, history[-1]["seq"], texts, record)


async def watch_in_browser(
    browser: Any,
    service: str,
    front: str,
    create_job: Callable[[], Awaitable[Mapping[str, Any]]],
    *,
    path_name: str,
    sensing: bool = True,
    options: Mapping[str, Any] | None = None,
    during: Callable[[], Awaitable[None]] | None = None,
    ready: Callable[[], Awaitable[None]] | None = None,
    timeout_s: float = 60.0,
) -> ClientRun:
    """Watch a job with ``flushline.js`` in a new Chromium page whose origin is ``front``.

    ``browser`` is a Playwright ``Browser``. The page and the script both come through
    the path; once the script is loaded, ``create_job`` starts the job and the page
    watches it at once (as a page that starts a job does). ``ready`` is awaited once the
    page is loaded, before the job starts (to start several runs together); ``during``
    runs while the job is watched (e.g. to cut the connection).
    """
    context = await browser.new_context()
    try:
        page = await context.new_page()
        response = await page.goto(f"{front}/healthz", timeout=30_000)
        assert response is not None
        assert response.ok, response.status
        await page.evaluate(_IMPORT_JS)
        if ready is not None:
            await ready()
        job = await create_job()
        watch_options = {"sensing": sensing, **(options or {})}
        await page.evaluate(
            _WATCH_JS, {"streamUrl": job["links"]["stream"], "options": watch_options}
        )
        if during is not None:
            await during()
        # One evaluation that resolves when the watch ends: no polling load on the machine.
        record = await asyncio.wait_for(page.evaluate("window.__flushlineFinished"), timeout_s)
    finally:
        await context.close()
    return await _client_run(service, path_name, job["id"], record)


#: Samples what the real page (``/?job=ID``) shows every 50 ms: the progress bar's
#: ``aria-valuenow`` and each phase's ``data-status`` (its "done" read as "succeeded", the
#: client's word), with the client's connections; resolves with the record at the end.
_PAGE_JS = """
async () => {
  while (!window.flushlineWatcher) await new Promise((r) => setTimeout(r, 5));
  const watcher = window.flushlineWatcher;
  const rec = { samples: [], events: [], log: [], connections: [], outcome: null };
  const bar = document.querySelector('[role="progressbar"]');
  const phaseNames = { done: "succeeded" };
  let arrivals = null;
  const sample = () => {
    const phases = [...document.querySelectorAll(".phase")].map(
      (el) => phaseNames[el.dataset.status] ?? el.dataset.status);
    rec.samples.push([Date.now(), Number(bar.getAttribute("aria-valuenow")), phases]);
    if (watcher.state.arrivals !== arrivals) {
      arrivals = watcher.state.arrivals;
      rec.connections.push({ requestedAt: watcher.state.connectionStartedAt,
        proxyBuffer: watcher.state.proxyBuffer, arrivals });
    }
  };
  sample();
  const timer = setInterval(sample, 50);
  let outcome;
  try { await watcher.done; outcome = "done"; } catch (e) { outcome = `failed: ${e.message}`; }
  await new Promise((r) => requestAnimationFrame(() => r()));
  sample();
  clearInterval(timer);
  rec.events = window.flushlineEvents.map(({ data, info }) => ({
    seq: data.seq, type: data.type, ts: data.ts, step: data.step ?? null,
    index: data.index ?? null, text: data.text ?? null, overall_pct: data.overall_pct ?? null,
    arrivedAt: info.arrivedAt, lagMs: info.lagMs, transport: info.transport,
  }));
  const { arrivals: _, ...state } = watcher.state;
  rec.state = JSON.parse(JSON.stringify(state));
  rec.outcome = outcome;
  return JSON.parse(JSON.stringify(rec));
}
"""


async def watch_page_in_browser(
    browser: Any,
    service: str,
    front: str,
    create_job: Callable[[], Awaitable[Mapping[str, Any]]],
    *,
    path_name: str,
    sensing: bool = True,
    during: Callable[[], Awaitable[None]] | None = None,
    ready: Callable[[], Awaitable[None]] | None = None,
    timeout_s: float = 60.0,
    screenshot: pathlib.Path | None = None,
    finished: Callable[[], Awaitable[None]] | None = None,
) -> ClientRun:
    """Watch a job on the real page, opened as a user opens a job link: ``{front}/?job=ID``.

    The page (HTML, CSS, ``page.js``, ``flushline.js``) loads through the path; once it
    is idle (``ready`` awaited, to start several runs together) the job starts and the
    page opens it. The record holds what the page showed (its progress bar and phases,
    sampled every 50 ms), every event it received with its lag, and the client's
    console lines. ``screenshot`` saves the page at the end, once ``finished`` (awaited
    first) says no other run is still measuring: a screenshot costs the machine enough
    CPU to delay another page's events.
    """
    context = await browser.new_context(viewport={"width": 1100, "height": 900})
    console: list[str] = []
    try:
        page = await context.new_page()
        page.on("console", lambda message: console.append(message.text))
        response = await page.goto(f"{front}/", timeout=30_000)
        assert response is not None
        assert response.ok, response.status
        if ready is not None:
            await ready()
        job = await create_job()
        query = f"?job={job['id']}" + ("" if sensing else "&sense=0")
        await page.goto(f"{front}/{query}", timeout=30_000)
        watched = asyncio.ensure_future(page.evaluate(_PAGE_JS))
        if during is not None:
            await during()
        record = await asyncio.wait_for(watched, timeout_s)
        if finished is not None:
            await finished()
        if screenshot is not None:
            await page.screenshot(path=str(screenshot), full_page=True)
    finally:
        await context.close()
    record["log"] = console
    return await _client_run(service, path_name, job["id"], record)


async def watch_through(
    browser: Any,
    path: DeliveryPath,
    tmp_dir: pathlib.Path,
    *,
    strategy: str = "aligned",
    job_options: Mapping[str, Any] = CLIENT_JOB,
    sensing: bool = True,
    options: Mapping[str, Any] | None = None,
    name: str | None = None,
    ready: Callable[[], Awaitable[None]] | None = None,
    screenshot: pathlib.Path | None = None,
    finished: Callable[[], Awaitable[None]] | None = None,
) -> ClientRun:
    """The service with default settings behind ``path``; one job watched in Chromium.

    Without ``options``, on the real page (:func:`watch_page_in_browser`); with them
    (given to ``watchJob``, e.g. ``{"transport": "eventsource"}``), from a bare page
    (:func:`watch_in_browser`). ``name`` names the run (the path's name by default) and
    its nginx directory; ``ready`` as for those functions.
    """
    async with (
        serve() as service,
        open_path(path, service, tmp_dir / (name or path.name)) as front,
        aiohttp.ClientSession() as session,
    ):
        run = {"path_name": name or path.name, "sensing": sensing, "ready": ready}

        async def create_job() -> Mapping[str, Any]:
            return await start_job(session, service, strategy, job_options)

        if options is None:
            return await watch_page_in_browser(
                browser, service, front, create_job, screenshot=screenshot, finished=finished, **run
            )
        return await watch_in_browser(browser, service, front, create_job, options=options, **run)
