/**
 * flushline.js: watch a Flushline job from a browser, through whatever sits in between.
 *
 * One ES module, no dependencies, no build step: copy it into any app.
 *
 *   import { watchJob } from "./flushline.js";
 *   const watcher = watchJob("api/jobs/ID/stream", { onEvent, onState });
 *   await watcher.done;             // the final state, once the job's `done` arrived
 *
 * The client reads the SSE stream with `fetch` and its own incremental parser, so it sees
 * the raw bytes (comment padding included), when each read arrived and how big it was,
 * and can send `Last-Event-ID` as a header. Where `fetch` streaming is missing it falls
 * back to `EventSource`. Every event is applied once, in seq order (deduplicated by seq),
 * across reconnects and transport switches; it stops on `done` and on a 204.
 *
 * SENSING: deciding from what arrives whether a proxy holds the stream. Rules and their
 * default thresholds (every one an option of watchJob; docs/client.md explains them):
 *
 *  R1 compressed   A `Content-Encoding` on the stream response (fetch decompresses
 *                  transparently, so the header is the evidence): a compressing proxy
 *                  holds its output whatever the padding -> long-poll.
 *  R2 no first byte  Nothing (no headers or no body byte) within firstByteTimeoutMs
 *                  (4000) of the request -> long-poll. The server's first write (retry
 *                  line + history, padded to a block) goes out at once, so a healthy
 *                  path shows a byte within a round trip.
 *  R3 held         Reads closer than coalesceMs (50) form one "release" (what the proxy
 *                  let go at once). The first release of a connection carries history
 *                  and is ignored, unless it took longer than firstByteSlowMs (1500):
 *                  then it was held too. The stream is held when a release's events' ts
 *                  spread over burstSpanMs (400) or more, or when minLagReleases (2)
 *                  releases each show an event with a relative lag over heldLagMs (500)
 *                  (one late release alone may be a pause of the browser's machine).
 *                  Relative lag = (arrival - ts) minus the smallest (arrival - ts) seen,
 *                  so clock skew between server and browser cancels out. A proxy holding
 *                  each write ~200 ms stays under both bounds: its lag is acceptable and
 *                  the stream is kept.
 *  R4 fit a block  Held -> resume the stream (Last-Event-ID) with ?proxy_buffer=B, the
 *                  smallest release rounded up to a multiple of blockUnit (1024). A
 *                  "blocks" proxy releases multiples of its block and an "all" proxy
 *                  with threshold T releases >= T, so B fits both; the round-up absorbs
 *                  nginx's first buffer, which also holds ~200 bytes of headers.
 *  R5 give up      Held again with the hint, and no larger block measured (or
 *                  maxHintAttempts (2) hints tried), or B > maxProxyBuffer (65536), or no
 *                  byte sizes to fit (EventSource) -> long-poll.
 *  R6 stalled      No byte for stallTimeoutMs (35000, the server's 15 s heartbeat twice
 *                  with margin) on a live stream -> long-poll.
 *
 * A dropped stream (network error, or the response ends without `done`) is resumed from
 * the last seq after the server's `retry:` delay (doubling per failure up to
 * maxRetryMs); a 5xx does the same; 400 and 404 are fatal, and so are 401 and 403 unless
 * a URL from getStreamUrl gets through (below); a 410 is a gap (below). Long-poll asks
 * `.../events?after=N&wait_s=S&limit=L` again as soon as each answer is applied.
 *
 * STAYING ALIVE while the job lives (docs/client.md, "A watcher that never dies"):
 *
 *  410 gap         The server no longer keeps the events after our resume point (we fell
 *                  behind a fast job). Fetch the job's snapshot (option getSnapshot, else
 *                  GET /api/jobs/{id} with options.headers), apply its progress, steps
 *                  and result, report a gap (state.gaps, option onGap) and resume from
 *                  the oldest kept event (the 410 names it; else the snapshot's
 *                  last_event_id). maxResyncs (5) gaps in a row without a new event are
 *                  fatal.
 *  token refresh   With auth on, the URL's `token` carries its expiry. Before a request
 *                  whose token expires within min(tokenRefreshMarginMs (30000), a
 *                  quarter of its lifetime), the option hook getStreamUrl (async, a fresh
 *                  stream URL) is called; a 401/403 answer calls it once more and retries
 *                  before giving up.
 *  empty polls     A long-poll answered empty in under half its wait_s (a draining
 *                  instance) waits pollBackoffMs (250) before the next, doubling up to
 *                  maxPollBackoffMs (10000), instead of asking again at once.
 *  not ours        A 200 stream answer that is not text/event-stream (or a poll answer
 *                  that is not JSON): a captive portal or a login page. It is retried
 *                  like a drop, and maxWrongAnswers (3) in a row are fatal with an error
 *                  that says so.
 *
 * Every decision is logged (log.info) and kept in state.decisions; state.transport,
 * state.measuredBlock, state.proxyBuffer and state.reason describe the current one.
 */

/** Default thresholds of the sensing rules (see above and docs/client.md). */
export const DEFAULTS = Object.freeze({
  sensing: true,
  firstByteTimeoutMs: 4000,
  firstByteSlowMs: 1500,
  heldLagMs: 500,
  minLagReleases: 2,
  burstSpanMs: 400,
  coalesceMs: 50,
  blockUnit: 1024,
  maxProxyBuffer: 65536,
  maxHintAttempts: 2,
  stallTimeoutMs: 35000,
  pollWaitS: 20,
  pollLimit: 1000,
  retryMs: 1000,
  maxRetryMs: 10000,
  maxResyncs: 5,
  tokenRefreshMarginMs: 30000,
  pollBackoffMs: 250,
  maxPollBackoffMs: 10000,
  maxWrongAnswers: 3,
  /** "auto" (fetch stream, else EventSource), or force "fetch-stream", "eventsource", "long-poll". */
  transport: "auto",
  /** Resume point to start from (0: the whole history). */
  lastEventId: 0,
  /** Arrival records kept per connection (state.arrivals: the first, then the newest). */
  maxArrivals: 500,
});

const FATAL_STATUSES = new Set([400, 401, 403, 404]);
const AUTH_STATUSES = new Set([401, 403]);
const EVENT_TYPES = [
  "job_started",
  "step_started",
  "chunk",
  "insight",
  "step_progress",
  "step_completed",
  "error",
  "done",
  "heartbeat",
];

// ------------------------------------------------------------------------ SSE parsing

/**
 * Incremental `text/event-stream` parser (WHATWG grammar): feed text as it arrives,
 * get the messages completed by it. Counts comment (padding) bytes too.
 */
export class SSEParser {
  constructor() {
    this._buffer = "";
    this._pendingCR = false;
    this._data = [];
    this._event = "";
    this._id = null;
    this.lastEventId = "";
    this.retryMs = null;
    this.commentChars = 0;
  }

  /** Feed a piece of text; returns [{event, data, id}] for every message it completed. */
  push(text) {
    if (this._pendingCR && text.startsWith("\n")) text = text.slice(1);
    this._pendingCR = false;
    this._buffer += text;
    const out = [];
    let start = 0;
    for (;;) {
      let i = start;
      const n = this._buffer.length;
      while (i < n) {
        const c = this._buffer.charCodeAt(i);
        if (c === 10 || c === 13) break;
        i++;
      }
      if (i >= n) break;
      const line = this._buffer.slice(start, i);
      if (this._buffer.charCodeAt(i) === 13) {
        if (i + 1 < n) {
          start = this._buffer.charCodeAt(i + 1) === 10 ? i + 2 : i + 1;
        } else {
          this._pendingCR = true;
          start = i + 1;
        }
      } else {
        start = i + 1;
      }
      const message = this._line(line);
      if (message) out.push(message);
    }
    this._buffer = this._buffer.slice(start);
    return out;
  }

  _line(line) {
    if (line === "") {
      if (this._id !== null) this.lastEventId = this._id;
      this._id = null;
      if (this._data.length === 0) {
        this._event = "";
        return null;
      }
      const message = {
        event: this._event || "message",
        data: this._data.join("\n"),
        id: this.lastEventId,
      };
      this._data = [];
      this._event = "";
      return message;
    }
    if (line.charCodeAt(0) === 58) {
      this.commentChars += line.length + 1;
      return null;
    }
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this._data.push(value);
    else if (field === "event") this._event = value;
    else if (field === "id") {
      if (!value.includes("\0")) this._id = value;
    } else if (field === "retry" && /^\d+$/.test(value)) this.retryMs = Number(value);
    return null;
  }
}

// ------------------------------------------------------------------------ job state

/** A fresh state object (every field of the documented API). */
export function initialState() {
  return {
    jobId: null,
    status: "queued",
    overallPct: 0,
    steps: [],
    currentStep: null,
    insight: "",
    etaS: null,
    lastEventId: 0,
    result: null,
    error: null,
    done: false,
    transport: null,
    measuredBlock: null,
    proxyBuffer: null,
    reason: "",
    decisions: [],
    connected: false,
    reconnecting: false,
    lastByteAt: null,
    events: 0,
    bytes: 0,
    arrivals: [],
    connectionStartedAt: null,
    /** Every gap: {afterSeq, resumeAfter, skipped, firstKept, snapshot, snapshotError, at}. */
    gaps: [],
    tokenRefreshes: 0,
  };
}

function stepFor(state, name, index) {
  let step = null;
  if (typeof index === "number" && state.steps[index]) step = state.steps[index];
  else if (name != null) step = state.steps.find((s) => s.name === name) || null;
  if (!step && (name != null || typeof index === "number")) {
    const at = typeof index === "number" ? index : state.steps.length;
    while (state.steps.length <= at) {
      const i = state.steps.length;
      state.steps.push({ name: null, index: i, status: "pending", pct: 0, tokens: 0, text: "" });
    }
    step = state.steps[at];
    if (step.name == null) step.name = name ?? `step ${at + 1}`;
  }
  return step;
}

function raisePct(state, value) {
  if (typeof value === "number" && value > state.overallPct) state.overallPct = value;
}

/**
 * Apply one event's data object to `state` (in place). Returns false when it was already
 * applied (its seq is not beyond state.lastEventId), true otherwise.
 */
export function applyEvent(state, data) {
  if (typeof data.seq === "number") {
    if (data.seq <= state.lastEventId) return false;
    state.lastEventId = data.seq;
  }
  if (data.job_id && !state.jobId) state.jobId = data.job_id;
  state.events += 1;
  switch (data.type) {
    case "job_started":
      state.status = "running";
      (data.steps || []).forEach((name, index) => stepFor(state, name, index));
      break;
    case "step_started": {
      state.status = "running";
      const step = stepFor(state, data.step, data.index);
      if (step.status === "pending") step.status = "running";
      if (step.status === "running") state.currentStep = step.index;
      break;
    }
    case "chunk": {
      const step = stepFor(state, data.step);
      step.text += data.text || "";
      step.tokens += data.tokens || 0;
      break;
    }
    case "insight":
      state.insight = data.text || "";
      break;
    case "step_progress": {
      const step = stepFor(state, data.step);
      if (typeof data.pct === "number" && data.pct > step.pct) step.pct = data.pct;
      if (typeof data.tokens === "number") step.tokens = data.tokens;
      raisePct(state, data.overall_pct);
      state.etaS = data.job_eta_s ?? data.eta_s ?? null;
      break;
    }
    case "step_completed": {
      const step = stepFor(state, data.step, data.index);
      step.status = "succeeded";
      step.pct = 100;
      if (typeof data.tokens === "number") step.tokens = data.tokens;
      raisePct(state, data.overall_pct);
      if (state.currentStep === step.index) state.currentStep = null;
      break;
    }
    case "error": {
      state.error = data.message ?? "failed";
      const step = data.step != null ? stepFor(state, data.step) : null;
      if (step) step.status = "failed";
      break;
    }
    case "done":
      state.status = data.status;
      raisePct(state, data.overall_pct);
      if (data.status === "succeeded") state.overallPct = 100;
      state.result = data.result ?? null;
      if (data.error != null) state.error = data.error;
      for (const step of state.steps) {
        if (step.status === "running") {
          step.status = data.status === "cancelled" ? "cancelled" : "failed";
        }
      }
      state.currentStep = null;
      state.etaS = null;
      state.done = true;
      break;
    default:
      break;
  }
  return true;
}

const STEP_RANK = { pending: 0, running: 1, succeeded: 2, failed: 2, cancelled: 2 };

/**
 * Apply a job snapshot (`GET /api/jobs/{id}`) to `state` after a gap: progress, steps
 * (status, pct, tokens only ever move forward) and the result or error so far. It never
 * ends the watch: `done` still comes as an event. Step texts stay what arrived (a
 * snapshot carries none); the events after the gap add theirs.
 */
export function applySnapshot(state, snapshot) {
  if (!snapshot || typeof snapshot !== "object") return;
  if (snapshot.id && !state.jobId) state.jobId = snapshot.id;
  if (state.status === "queued" && snapshot.status && snapshot.status !== "queued") state.status = "running";
  raisePct(state, snapshot.progress);
  const declared = Array.isArray(snapshot.steps) ? snapshot.steps : [];
  // The snapshot's order is the job's: steps first met by name (events after a gap) move
  // to their place, keeping their text.
  const byName = new Map(state.steps.map((step) => [step.name, step]));
  const ordered = declared.map((s) => {
    const step = byName.get(s.name) || { name: s.name, status: "pending", pct: 0, tokens: 0, text: "" };
    byName.delete(s.name);
    return step;
  });
  state.steps = [...ordered, ...byName.values()];
  state.steps.forEach((step, index) => {
    step.index = index;
  });
  declared.forEach((s, index) => {
    const step = state.steps[index];
    if (typeof s.pct === "number" && s.pct > step.pct) step.pct = s.pct;
    if (typeof s.tokens === "number" && s.tokens > step.tokens) step.tokens = s.tokens;
    if ((STEP_RANK[s.status] ?? -1) > (STEP_RANK[step.status] ?? 0)) step.status = s.status;
    if (s.status === "running") state.currentStep = index;
  });
  if (state.currentStep !== null && state.steps[state.currentStep]?.status !== "running") state.currentStep = null;
  if (snapshot.result != null) state.result = snapshot.result;
  if (snapshot.error != null) state.error = snapshot.error;
}

/**
 * The expiry (Unix ms) of the stream token in `url`'s `?token=`, or null: the token is
 * `<base64url(job_id NUL expiry_ms)>.<signature>` (app/web/auth.py).
 */
export function streamTokenExpiry(url, base = baseHref()) {
  let token;
  try {
    token = new URL(url, base).searchParams.get("token");
  } catch {
    return null;
  }
  if (!token || !token.includes(".")) return null;
  const payload = token.slice(0, token.indexOf("."));
  try {
    const text = atob(payload.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((payload.length + 3) % 4));
    const expires = Number(text.slice(text.lastIndexOf("\0") + 1));
    return Number.isFinite(expires) && expires > 0 ? expires : null;
  } catch {
    return null;
  }
}

// ------------------------------------------------------------------------ sensing (pure)

function percentileOf(values, pct) {
  if (!values.length) return null;
  const ordered = [...values].sort((a, b) => a - b);
  const rank = Math.max(Math.round((pct / 100) * ordered.length + 0.5) - 1, 0);
  return ordered[Math.min(rank, ordered.length - 1)];
}

function gcd(a, b) {
  while (b) [a, b] = [b, a % b];
  return a;
}

/**
 * Group reads into releases: reads less than `coalesceMs` apart arrived together (one
 * proxy release can take several reads). `arrivals`: [{at, bytes, offset, events:[{seq, ts}]}]
 * of one connection, in order. Returns [{at, bytes, offset, events, first}].
 */
export function groupReleases(arrivals, coalesceMs = DEFAULTS.coalesceMs) {
  const releases = [];
  for (const a of arrivals) {
    const last = releases[releases.length - 1];
    if (last && a.at - last.lastAt < coalesceMs) {
      last.bytes += a.bytes;
      last.offset = a.offset;
      last.lastAt = a.at;
      last.events.push(...a.events);
    } else {
      releases.push({
        at: a.at,
        lastAt: a.at,
        bytes: a.bytes,
        offset: a.offset,
        events: [...a.events],
        first: releases.length === 0,
      });
    }
  }
  return releases;
}

/**
 * Judge one connection's arrivals: are events being held?
 *
 * `options`: thresholds (DEFAULTS), `requestedAt` (ms, when the request was sent: gives
 * the time to first byte), `minLagMs` (the smallest arrival - ts*1000 seen on earlier
 * connections, so the skew estimate carries over). Returns
 * {held, reason, releases, heldReleases, evidence (the releases that count), maxRelLagMs,
 *  maxSpreadMs, ttfbMs, minLagMs}.
 */
export function judgeDelivery(arrivals, options = {}) {
  const o = { ...DEFAULTS, ...options };
  const releases = groupReleases(arrivals, o.coalesceMs);
  let minLag = typeof o.minLagMs === "number" ? o.minLagMs : Infinity;
  for (const r of releases) {
    for (const e of r.events) minLag = Math.min(minLag, r.lastAt - e.ts * 1000);
  }
  const ttfbMs =
    typeof o.requestedAt === "number" && releases.length ? releases[0].at - o.requestedAt : null;
  const firstHeld = ttfbMs !== null && ttfbMs > o.firstByteSlowMs;
  const held = [];
  const lagOnly = [];
  let maxRelLag = 0;
  let maxSpread = 0;
  const evidence = releases.filter((r) => !r.first || firstHeld);
  for (const r of evidence) {
    const tss = r.events.map((e) => e.ts * 1000);
    const spread = tss.length ? Math.max(...tss) - Math.min(...tss) : 0;
    const relLag = tss.length ? Math.max(...tss.map((ts) => r.lastAt - ts - minLag)) : 0;
    maxSpread = Math.max(maxSpread, spread);
    maxRelLag = Math.max(maxRelLag, relLag);
    if (spread >= o.burstSpanMs) held.push(r);
    else if (relLag > o.heldLagMs) lagOnly.push(r);
  }
  // A burst is proof; a late release alone may be a pause of this machine (a stalled tab,
  // a busy CPU), so lag alone counts once it happened minLagReleases times.
  if (lagOnly.length >= o.minLagReleases) held.push(...lagOnly);
  let reason;
  if (held.length) {
    reason =
      `held: ${held.length} of ${evidence.length} releases` +
      (maxSpread >= o.burstSpanMs ? `, events spread over ${Math.round(maxSpread)} ms in one release` : "") +
      (maxRelLag > o.heldLagMs ? `, relative lag up to ${Math.round(maxRelLag)} ms` : "") +
      (firstHeld ? `, first byte after ${Math.round(ttfbMs)} ms` : "");
  } else {
    reason = `live: ${evidence.length} releases, relative lag <= ${Math.round(maxRelLag)} ms`;
  }
  return {
    held: held.length > 0,
    reason,
    releases,
    heldReleases: held,
    evidence,
    maxRelLagMs: maxRelLag,
    maxSpreadMs: maxSpread,
    ttfbMs,
    minLagMs: Number.isFinite(minLag) ? minLag : null,
  };
}

/**
 * The `?proxy_buffer` that should flush the proxy that produced `releases` (the
 * `evidence` of judgeDelivery: live releases, plus the first one when it was held).
 * Returns {block, minRelease, gcd, reason}, or {block: null, reason} when nothing fits.
 *
 * B = the smallest release rounded up to a multiple of `blockUnit`: a "blocks" proxy
 * releases whole multiples of its block, an "all" proxy with threshold T releases at
 * least T bytes each time, so padding every flush to a multiple of B flushes both; the
 * round-up absorbs nginx's first buffer (its block minus ~200 bytes of headers).
 */
export function fitBlock(releases, options = {}) {
  const o = { ...DEFAULTS, ...options };
  const sizes = releases.map((r) => r.bytes).filter((b) => b > 0);
  if (!sizes.length) return { block: null, minRelease: null, gcd: null, reason: "no byte sizes to fit" };
  const minRelease = Math.min(...sizes);
  const block = Math.max(o.blockUnit, Math.ceil(minRelease / o.blockUnit) * o.blockUnit);
  const g = sizes.reduce((a, b) => gcd(a, b));
  const reason =
    `smallest release ${minRelease} B of ${sizes.length} (gcd ${g} B)` +
    ` -> proxy_buffer ${block} B (multiple of ${o.blockUnit} >= smallest release)`;
  return { block, minRelease, gcd: g, reason };
}

/**
 * What to do after a judgement: {action: "keep"|"hint"|"long-poll", proxyBuffer, reason}.
 * `context`: {proxyBuffer (in use or null), hintAttempts, hasBytes}.
 */
export function decide(verdict, context, options = {}) {
  const o = { ...DEFAULTS, ...options };
  if (!verdict.held) return { action: "keep", proxyBuffer: context.proxyBuffer ?? null, reason: verdict.reason };
  if (!context.hasBytes) {
    return { action: "long-poll", proxyBuffer: null, reason: `${verdict.reason}; no byte sizes to fit a block` };
  }
  const fit = fitBlock(verdict.evidence, o);
  if (fit.block === null) return { action: "long-poll", proxyBuffer: null, reason: `${verdict.reason}; ${fit.reason}` };
  if (fit.block > o.maxProxyBuffer) {
    return {
      action: "long-poll",
      proxyBuffer: null,
      measuredBlock: fit.block,
      reason: `${verdict.reason}; ${fit.reason} is over maxProxyBuffer ${o.maxProxyBuffer} B`,
    };
  }
  const current = context.proxyBuffer;
  if (current != null && (fit.block <= current || context.hintAttempts >= o.maxHintAttempts)) {
    return {
      action: "long-poll",
      proxyBuffer: null,
      measuredBlock: fit.block,
      reason: `${verdict.reason} with proxy_buffer ${current} B; ${fit.reason}: the hint does not deliver`,
    };
  }
  return { action: "hint", proxyBuffer: fit.block, measuredBlock: fit.block, reason: `${verdict.reason}; ${fit.reason}` };
}

// ------------------------------------------------------------------------ URLs

function baseHref() {
  return (globalThis.document && globalThis.document.baseURI) || globalThis.location?.href || "http://localhost/";
}

/** `url` with query parameter `name` set to `value` (removed when value is null). */
export function withParam(url, name, value, base = baseHref()) {
  const u = new URL(url, base);
  if (value == null) u.searchParams.delete(name);
  else u.searchParams.set(name, String(value));
  return u.href;
}

/** The long-poll URL of a stream URL: `/stream` becomes `/events`, its query kept. */
export function pollUrl(streamUrl, after, waitS, limit, base = baseHref()) {
  const u = new URL(streamUrl, base);
  u.pathname = u.pathname.replace(/\/stream\/?$/, "/events");
  for (const name of ["proxy_buffer", "last_event_id"]) u.searchParams.delete(name);
  u.searchParams.set("after", String(after));
  u.searchParams.set("wait_s", String(waitS));
  if (limit) u.searchParams.set("limit", String(limit));
  return u.href;
}

/** The job's snapshot URL of a stream URL: `/stream` dropped, and its query (a stream token does not open it). */
export function snapshotUrl(streamUrl, base = baseHref()) {
  const u = new URL(streamUrl, base);
  u.pathname = u.pathname.replace(/\/stream\/?$/, "");
  u.search = "";
  return u.href;
}

// ------------------------------------------------------------------------ the watcher

function fetchStreamingAvailable() {
  return (
    typeof fetch === "function" &&
    typeof ReadableStream === "function" &&
    typeof Response === "function" &&
    "body" in Response.prototype &&
    typeof AbortController === "function" &&
    typeof TextDecoder === "function"
  );
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

class FatalError extends Error {}

async function errorMessage(response) {
  return (await errorOf(response)).text;
}

/** An error answer: {status, code, message, text (one line for logs and errors)}. */
async function errorOf(response) {
  try {
    const body = await response.json();
    if (body && body.error) {
      const { code, message } = body.error;
      const firstSeq = Number.isInteger(body.error.first_seq) ? body.error.first_seq : null;
      return { status: response.status, code, message, firstSeq, text: `${response.status} ${code}: ${message}` };
    }
  } catch {
    // not JSON: fall through
  }
  return { status: response.status, code: null, message: "", firstSeq: null, text: `HTTP ${response.status}` };
}

function contentTypeOf(response) {
  return (response.headers.get("Content-Type") || "").split(";")[0].trim().toLowerCase();
}

class Watcher {
  constructor(streamUrl, options) {
    this.streamUrl = streamUrl;
    this.options = { ...DEFAULTS, ...options };
    this.log = this.options.log || console;
    this.state = initialState();
    this.state.lastEventId = Number(this.options.lastEventId) || 0;
    this._generation = 0;
    this._controller = null;
    this._timers = new Set();
    this._closed = false;
    this._failures = 0;
    this._retryMs = this.options.retryMs;
    this._hintAttempts = 0;
    this._minLagMs = Infinity;
    this._eventSource = null;
    this._urlSince = Date.now();
    this._resyncs = 0;
    this._authRetried = false;
    this._wrongAnswers = 0;
    this._emptyPolls = 0;
    this.done = new Promise((resolve, reject) => {
      this._resolve = resolve;
      this._reject = reject;
    });
    this.done.catch(() => {}); // a fatal error rejects; callers that do not await it are fine
  }

  // -- public

  /** Stop everything: abort requests, close the EventSource, cancel timers. */
  close() {
    this._closed = true;
    this._generation += 1;
    this._stopCurrent();
    this.state.connected = false;
    this.state.reconnecting = false;
  }

  // -- internals

  start() {
    let transport = this.options.transport;
    if (transport === "auto") transport = fetchStreamingAvailable() ? "fetch-stream" : "eventsource";
    const why = {
      "fetch-stream": "start: fetch streaming (sees bytes and arrival times)",
      eventsource: "start: EventSource (fetch streaming unavailable or asked for)",
      "long-poll": "start: long-polling (asked for)",
    }[transport];
    if (!why) throw new Error(`unknown transport ${transport}`);
    this._switch(transport, why, this.options.proxyBuffer ?? null);
  }

  _emit() {
    if (this.options.onState) {
      try {
        this.options.onState(this.state);
      } catch (error) {
        this.log.error?.("flushline: onState threw", error);
      }
    }
  }

  _decide(transport, reason, extra = {}) {
    const s = this.state;
    s.transport = transport;
    if ("measuredBlock" in extra) s.measuredBlock = extra.measuredBlock;
    if ("proxyBuffer" in extra) s.proxyBuffer = extra.proxyBuffer;
    s.reason = reason;
    const entry = { at: Date.now(), transport, measuredBlock: s.measuredBlock, proxyBuffer: s.proxyBuffer, reason };
    s.decisions.push(entry);
    (this.log.info || this.log.log).call(this.log, `flushline: ${transport}: ${reason}`, entry);
    this._emit();
  }

  _setTimer(fn, ms) {
    const id = setTimeout(() => {
      this._timers.delete(id);
      fn();
    }, ms);
    this._timers.add(id);
    return id;
  }

  _clearTimer(id) {
    if (id != null) {
      clearTimeout(id);
      this._timers.delete(id);
    }
  }

  _stopCurrent() {
    for (const id of this._timers) clearTimeout(id);
    this._timers.clear();
    if (this._controller) this._controller.abort();
    this._controller = null;
    if (this._eventSource) this._eventSource.close();
    this._eventSource = null;
  }

  /** Abandon the current transport and start `transport` from state.lastEventId. */
  _switch(transport, reason, proxyBuffer = null, measuredBlock = undefined) {
    if (this._closed || this.state.done) return;
    this._stopCurrent();
    const generation = ++this._generation;
    const extra = { proxyBuffer: transport === "long-poll" ? null : proxyBuffer };
    if (measuredBlock !== undefined) extra.measuredBlock = measuredBlock;
    this._decide(transport, reason, extra);
    const run = { "fetch-stream": this._runStream, eventsource: this._runEventSource, "long-poll": this._runPoll }[transport];
    run.call(this, generation).catch((error) => this._fail(error));
  }

  _live(generation) {
    return generation === this._generation && !this._closed && !this.state.done;
  }

  _fail(error) {
    if (this._closed || this.state.done) return;
    this.state.error = error.message || String(error);
    this.state.connected = false;
    this.state.reconnecting = false;
    (this.log.error || this.log.log).call(this.log, `flushline: stopped: ${this.state.error}`);
    this.close();
    this._emit();
    this._reject(error);
  }

  _finish(reason) {
    if (this.state.done && this._finished) return;
    this._finished = true;
    this.state.done = true;
    this.state.connected = false;
    this.state.reconnecting = false;
    (this.log.info || this.log.log).call(this.log, `flushline: finished: ${reason}`);
    this._generation += 1;
    this._stopCurrent();
    this._emit();
    this._resolve(this.state);
  }

  /** Apply events that arrived together; returns how many were new. */
  _deliver(events, arrivedAt, transport) {
    let fresh = 0;
    for (const data of events) {
      if (this.state.done) break;
      if (data.type === "heartbeat" || typeof data.seq !== "number") continue;
      if (data.seq > this.state.lastEventId + 1 && this.state.lastEventId > 0) {
        this.log.warn?.(`flushline: gap: seq ${data.seq} after ${this.state.lastEventId}`);
      }
      if (!applyEvent(this.state, data)) continue;
      fresh += 1;
      const lagMs = typeof data.ts === "number" ? arrivedAt - data.ts * 1000 : null;
      if (lagMs !== null) this._minLagMs = Math.min(this._minLagMs, lagMs);
      if (this.options.onEvent) {
        try {
          this.options.onEvent(data, { arrivedAt, lagMs, transport });
        } catch (error) {
          this.log.error?.("flushline: onEvent threw", error);
        }
      }
      this._emit();
      if (data.type === "done") this._finish(`done (${data.status})`);
    }
    if (fresh) {
      this._failures = 0;
      this._resyncs = 0;
    }
    return fresh;
  }

  _requestHeaders(extra) {
    return { ...(this.options.headers || {}), ...extra };
  }

  // -- staying alive: gaps, tokens, answers that are not ours

  /** Call getStreamUrl before a request whose token is about to expire (a failure only logs). */
  async _refreshIfExpiring() {
    if (typeof this.options.getStreamUrl !== "function") return;
    const expires = streamTokenExpiry(this.streamUrl);
    if (expires === null) return;
    const now = Date.now();
    const margin = Math.min(this.options.tokenRefreshMarginMs, Math.max(expires - this._urlSince, 0) / 4);
    if (expires - now > margin) return;
    try {
      await this._refreshUrl(`the stream token expires in ${Math.round(expires - now)} ms`);
    } catch (error) {
      this.log.warn?.(`flushline: getStreamUrl failed (${error.message || error}); keeping the old URL`);
    }
  }

  async _refreshUrl(why) {
    const url = await this.options.getStreamUrl();
    if (typeof url !== "string" || !url) throw new Error("getStreamUrl gave no URL");
    this.streamUrl = url;
    this._urlSince = Date.now();
    this.state.tokenRefreshes += 1;
    (this.log.info || this.log.log).call(this.log, `flushline: ${why}: stream URL refreshed`);
  }

  /**
   * A non-2xx answer of the stream or a poll: "again" (a gap resynced, or a refreshed
   * URL: ask at once), or why to back off and retry; throws FatalError when it is over.
   */
  async _refused(response, where, generation) {
    const error = await errorOf(response);
    if (response.status === 410) {
      await this._resync(generation, error, where);
      return "again";
    }
    if (AUTH_STATUSES.has(response.status) && typeof this.options.getStreamUrl === "function" && !this._authRetried) {
      this._authRetried = true;
      try {
        await this._refreshUrl(`${where} answered ${error.text}`);
      } catch (refreshError) {
        throw new FatalError(`${where}: ${error.text}; getStreamUrl failed (${refreshError.message || refreshError})`);
      }
      return "again";
    }
    if (FATAL_STATUSES.has(response.status)) throw new FatalError(`${where}: ${error.text}`);
    return `${where} answered ${error.text}`;
  }

  /** A 200 that is not Flushline's (wrong Content-Type): why to retry, or FatalError past the cap. */
  _notOurs(where, type, expected) {
    this._wrongAnswers += 1;
    const what = `${where} answered 200 with Content-Type ${type || "(none)"}, not ${expected}`;
    if (this._wrongAnswers >= this.options.maxWrongAnswers) {
      throw new FatalError(
        `${what} (${this._wrongAnswers} times in a row): something other than Flushline answers ` +
          "(a captive portal, a login page or a misrouted proxy?)",
      );
    }
    return what;
  }

  _answered() {
    this._wrongAnswers = 0;
    this._authRetried = false;
  }

  async _fetchSnapshot() {
    if (typeof this.options.getSnapshot === "function") return await this.options.getSnapshot();
    const response = await fetch(snapshotUrl(this.streamUrl), {
      headers: this._requestHeaders({ Accept: "application/json" }),
      cache: "no-store",
    });
    if (!response.ok) throw new Error(`snapshot: ${await errorMessage(response)}`);
    return await response.json();
  }

  /**
   * 410: the events after our resume point are gone. Apply the job's snapshot, report the
   * gap, and move the resume point to just before the oldest kept event.
   */
  async _resync(generation, error, where) {
    const o = this.options;
    const s = this.state;
    this._resyncs += 1;
    if (this._resyncs > o.maxResyncs) {
      throw new FatalError(`${where}: ${error.text} (${o.maxResyncs} gaps in a row without a new event)`);
    }
    // The oldest kept seq: a `first_seq` field if the server sends one, else its message
    // ("job J keeps events from seq N on; ...", app/core/errors.py HistoryTruncated).
    const kept = /from seq (\d+)/.exec(error.message || "");
    const firstKept = error.firstSeq ?? (kept ? Number(kept[1]) : null);
    let snapshot = null;
    let snapshotError = null;
    try {
      snapshot = await this._fetchSnapshot();
    } catch (failure) {
      snapshotError = failure.message || String(failure);
    }
    if (!this._live(generation)) return;
    let resumeAfter = firstKept !== null ? firstKept - 1 : null;
    if (resumeAfter === null && snapshot && typeof snapshot.last_event_id === "number") resumeAfter = snapshot.last_event_id;
    if (resumeAfter === null) {
      throw new FatalError(`${where}: ${error.text}; and no snapshot to resume from (${snapshotError})`);
    }
    const afterSeq = s.lastEventId;
    const gap = {
      afterSeq,
      resumeAfter: Math.max(resumeAfter, afterSeq),
      skipped: Math.max(resumeAfter - afterSeq, 0),
      firstKept,
      snapshot,
      snapshotError,
      at: Date.now(),
    };
    if (snapshot) applySnapshot(s, snapshot);
    s.lastEventId = gap.resumeAfter;
    s.gaps.push(gap);
    this.log.warn?.(
      `flushline: gap: ${gap.skipped} events after seq ${afterSeq} are no longer kept; ` +
        `${snapshot ? "applied the job's snapshot" : `no snapshot (${snapshotError})`}, resuming after seq ${gap.resumeAfter}`,
    );
    if (o.onGap) {
      try {
        o.onGap(gap, s);
      } catch (failure) {
        this.log.error?.("flushline: onGap threw", failure);
      }
    }
    this._emit();
  }

  async _backoff(generation, why) {
    this._failures += 1;
    const delay = Math.min(this._retryMs * 2 ** (this._failures - 1), this.options.maxRetryMs);
    this.state.connected = false;
    this.state.reconnecting = true;
    (this.log.info || this.log.log).call(this.log, `flushline: ${why}; resuming after seq ${this.state.lastEventId} in ${delay} ms`);
    this._emit();
    await sleep(delay);
    return this._live(generation);
  }

  // -- fetch stream

  async _runStream(generation) {
    while (this._live(generation)) {
      const outcome = await this._streamOnce(generation);
      if (outcome === "stop" || !this._live(generation)) return;
      if (outcome === "again") continue;
      if (!(await this._backoff(generation, outcome))) return;
    }
  }

  /** One stream request; returns "stop" or why it should be resumed. */
  async _streamOnce(generation) {
    const o = this.options;
    const s = this.state;
    await this._refreshIfExpiring();
    if (!this._live(generation)) return "stop";
    const controller = new AbortController();
    this._controller = controller;
    const url = withParam(this.streamUrl, "proxy_buffer", s.proxyBuffer);
    const headers = this._requestHeaders({ Accept: "text/event-stream" });
    if (s.lastEventId > 0) headers["Last-Event-ID"] = String(s.lastEventId);
    const conn = { requestedAt: Date.now(), arrivals: [], offset: 0, acted: false };
    s.connectionStartedAt = conn.requestedAt;
    s.arrivals = conn.arrivals;
    let firstByteTimer = null;
    if (o.sensing) {
      firstByteTimer = this._setTimer(() => {
        if (this._live(generation)) {
          this._switch("long-poll", `no first byte within ${o.firstByteTimeoutMs} ms: the path holds the stream`);
        }
      }, o.firstByteTimeoutMs);
    }
    let response;
    try {
      response = await fetch(url, { headers, signal: controller.signal, cache: "no-store" });
    } catch (error) {
      if (!this._live(generation)) return "stop";
      this._clearTimer(firstByteTimer);
      return `stream request failed (${error.message || error})`;
    }
    if (!this._live(generation)) return "stop";
    if (response.status === 204) {
      this._finish("204: the job ended and every event was seen");
      return "stop";
    }
    if (!response.ok) {
      this._clearTimer(firstByteTimer);
      return await this._refused(response, "stream", generation);
    }
    const type = contentTypeOf(response);
    if (type !== "text/event-stream") {
      this._clearTimer(firstByteTimer);
      controller.abort();
      return this._notOurs("stream", type, "text/event-stream");
    }
    this._answered();
    const encoding = (response.headers.get("Content-Encoding") || "").trim().toLowerCase();
    if (o.sensing && encoding && encoding !== "identity") {
      this._switch("long-poll", `the stream arrives compressed (Content-Encoding: ${encoding}): a compressing proxy holds it`);
      return "stop";
    }
    if (!response.body || typeof response.body.getReader !== "function") {
      this._clearTimer(firstByteTimer);
      this._switch("eventsource", "fetch gave no readable body: EventSource instead");
      return "stop";
    }
    s.connected = true;
    s.reconnecting = false;
    this._emit();
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    const parser = new SSEParser();
    let stallTimer = null;
    let judgeTimer = null;
    const armStall = () => {
      if (!o.sensing) return;
      this._clearTimer(stallTimer);
      stallTimer = this._setTimer(() => {
        if (this._live(generation)) this._switch("long-poll", `no byte for ${o.stallTimeoutMs} ms: the path holds the stream`);
      }, o.stallTimeoutMs);
    };
    try {
      for (;;) {
        let chunk;
        try {
          chunk = await reader.read();
        } catch (error) {
          if (!this._live(generation)) return "stop";
          return `stream dropped (${error.message || error})`;
        }
        if (!this._live(generation)) return "stop";
        if (chunk.done) break;
        const at = Date.now();
        const bytes = chunk.value.byteLength;
        this._clearTimer(firstByteTimer);
        armStall();
        conn.offset += bytes;
        s.bytes += bytes;
        s.lastByteAt = at;
        const events = [];
        for (const message of parser.push(decoder.decode(chunk.value, { stream: true }))) {
          if (message.event === "heartbeat") continue;
          try {
            events.push(JSON.parse(message.data));
          } catch {
            this.log.warn?.("flushline: data is not JSON", message.data);
          }
        }
        if (parser.retryMs !== null) this._retryMs = parser.retryMs;
        // A sliding window that keeps the first read (the rules treat it apart).
        if (conn.arrivals.length >= o.maxArrivals) conn.arrivals.splice(1, 1);
        const brief = events.filter((e) => typeof e.seq === "number").map((e) => ({ seq: e.seq, ts: e.ts }));
        conn.arrivals.push({ at, bytes, offset: conn.offset, events: brief });
        this._deliver(events, at, "fetch-stream");
        if (!this._live(generation)) return "stop";
        if (!events.length) this._emit(); // lastByteAt moved
        if (o.sensing && !conn.acted) {
          this._clearTimer(judgeTimer);
          judgeTimer = this._setTimer(() => this._judge(generation, conn), o.coalesceMs);
        }
      }
    } finally {
      this._clearTimer(stallTimer);
      this._clearTimer(judgeTimer);
      this._clearTimer(firstByteTimer);
      s.connected = false;
    }
    return "stream ended before done";
  }

  _judge(generation, conn) {
    if (!this._live(generation) || conn.acted) return;
    const o = this.options;
    const verdict = judgeDelivery(conn.arrivals, { ...o, requestedAt: conn.requestedAt, minLagMs: this._minLagMs });
    if (!verdict.held) return;
    const choice = decide(verdict, { proxyBuffer: this.state.proxyBuffer, hintAttempts: this._hintAttempts, hasBytes: true }, o);
    conn.acted = true;
    if (choice.action === "hint") {
      this._hintAttempts += 1;
      this._switch("fetch-stream", `${choice.reason}; resuming after seq ${this.state.lastEventId}`, choice.proxyBuffer, choice.measuredBlock);
    } else if (choice.action === "long-poll") {
      this._switch("long-poll", choice.reason, null, choice.measuredBlock ?? this.state.measuredBlock);
    }
  }

  // -- EventSource (no byte counts: a held stream goes to long-poll)

  async _runEventSource(generation) {
    const o = this.options;
    const s = this.state;
    const url = withParam(withParam(this.streamUrl, "proxy_buffer", s.proxyBuffer), "last_event_id", s.lastEventId || null);
    const es = new EventSource(url);
    this._eventSource = es;
    const conn = { requestedAt: Date.now(), arrivals: [], offset: 0, acted: false };
    s.connectionStartedAt = conn.requestedAt;
    s.arrivals = conn.arrivals;
    let opened = false;
    let judgeTimer = null;
    const firstByteTimer = o.sensing
      ? this._setTimer(() => {
          if (this._live(generation) && !opened) this._switch("long-poll", `EventSource: not open within ${o.firstByteTimeoutMs} ms: the path holds the stream`);
        }, o.firstByteTimeoutMs)
      : null;
    es.onopen = () => {
      opened = true;
      this._clearTimer(firstByteTimer);
      s.connected = true;
      s.reconnecting = false;
      this._emit();
    };
    const onMessage = (message) => {
      if (!this._live(generation)) return;
      const at = Date.now();
      s.lastByteAt = at;
      if (message.type === "heartbeat") return;
      let data;
      try {
        data = JSON.parse(message.data);
      } catch {
        return;
      }
      if (typeof data.seq === "number") {
        if (conn.arrivals.length >= o.maxArrivals) conn.arrivals.splice(1, 1);
        conn.arrivals.push({ at, bytes: 0, offset: 0, events: [{ seq: data.seq, ts: data.ts }] });
      }
      this._deliver([data], at, "eventsource");
      if (o.sensing && !conn.acted && this._live(generation)) {
        this._clearTimer(judgeTimer);
        judgeTimer = this._setTimer(() => {
          if (!this._live(generation) || conn.acted) return;
          const verdict = judgeDelivery(conn.arrivals, { ...o, minLagMs: this._minLagMs });
          if (!verdict.held) return;
          conn.acted = true;
          const choice = decide(verdict, { proxyBuffer: s.proxyBuffer, hintAttempts: this._hintAttempts, hasBytes: false }, o);
          this._switch("long-poll", `EventSource: ${choice.reason}`);
        }, o.coalesceMs);
      }
    };
    for (const type of EVENT_TYPES) es.addEventListener(type, onMessage);
    es.onmessage = onMessage;
    es.onerror = () => {
      if (!this._live(generation)) return;
      if (es.readyState === 2) {
        // Closed for good: a 204 (job over) or an error status. Long-poll tells which.
        this._switch("long-poll", "EventSource closed by the server (204 or an error): long-polling to find out");
      } else {
        s.connected = false;
        s.reconnecting = true;
        this._emit();
      }
    };
  }

  // -- long-poll

  async _runPoll(generation) {
    const o = this.options;
    const s = this.state;
    while (this._live(generation)) {
      await this._refreshIfExpiring();
      if (!this._live(generation)) return;
      const controller = new AbortController();
      this._controller = controller;
      const url = pollUrl(this.streamUrl, s.lastEventId, o.pollWaitS, o.pollLimit);
      const askedAt = Date.now();
      let body;
      try {
        const response = await fetch(url, {
          signal: controller.signal,
          cache: "no-store",
          headers: this._requestHeaders({ Accept: "application/json" }),
        });
        if (!response.ok) {
          const outcome = await this._refused(response, "long-poll", generation);
          if (!this._live(generation)) return;
          if (outcome !== "again" && !(await this._backoff(generation, outcome))) return;
          continue;
        }
        const type = contentTypeOf(response);
        const text = await response.text();
        try {
          body = type === "application/json" ? JSON.parse(text) : null;
        } catch {
          body = null;
        }
        if (!body || !Array.isArray(body.events)) {
          const why = this._notOurs("long-poll", type, "application/json with events");
          if (!this._live(generation) || !(await this._backoff(generation, why))) return;
          continue;
        }
        this._answered();
        s.bytes += text.length;
      } catch (error) {
        if (error instanceof FatalError) throw error;
        if (!this._live(generation)) return;
        if (!(await this._backoff(generation, `long-poll failed (${error.message || error})`))) return;
        continue;
      }
      if (!this._live(generation)) return;
      const at = Date.now();
      s.lastByteAt = at;
      if (!s.connected) {
        s.connected = true;
        s.reconnecting = false;
      }
      const fresh = this._deliver(body.events, at, "long-poll");
      if (!fresh) this._emit();
      if (this._live(generation) && body.done && !body.events.length) {
        this._finish("long-poll: the job is over and every event was seen");
      }
      // Empty at once (a draining instance, a proxy that answers for the server): wait
      // before asking again, instead of a tight loop for as long as it lasts.
      if (!body.events.length && !body.done && at - askedAt < (o.pollWaitS * 1000) / 2) {
        this._emptyPolls += 1;
        const delay = Math.min(o.pollBackoffMs * 2 ** (this._emptyPolls - 1), o.maxPollBackoffMs);
        (this.log.info || this.log.log).call(this.log, `flushline: long-poll answered empty after ${at - askedAt} ms; next in ${delay} ms`);
        await sleep(delay);
      } else {
        this._emptyPolls = 0;
      }
    }
  }
}

/**
 * Watch a job's stream (`streamUrl`, relative or absolute: `links.stream` of the job).
 * Returns {state, done, close()}; see the comment at the top of this file.
 */
export function watchJob(streamUrl, options = {}) {
  const watcher = new Watcher(streamUrl, options);
  watcher.start();
  return watcher;
}
