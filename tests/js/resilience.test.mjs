// The watcher stays alive while its job lives (node --test): a 410 becomes a reported gap
// and a resume, an expiring stream token is refreshed through getStreamUrl, empty poll
// answers back off, and a 200 that is not Flushline's is a capped, named failure. The
// watcher runs against a fake `fetch` that answers each request from a script.
import assert from "node:assert/strict";
import { afterEach, describe, test } from "node:test";

import { applySnapshot, initialState, streamTokenExpiry, watchJob } from "../../app/web/static/flushline.js";

const STREAM = "http://localhost/api/jobs/J/stream";
const QUIET = { info() {}, warn() {}, error() {}, log() {} };
const realFetch = globalThis.fetch;

afterEach(() => {
  globalThis.fetch = realFetch;
});

function event(seq, type = "step_progress", extra = {}) {
  const base = { type, job_id: "J", seq, ts: Date.now() / 1000 };
  if (type === "step_progress") Object.assign(base, { step: "write", pct: seq, overall_pct: seq, tokens: seq });
  return { ...base, ...extra };
}

function done(seq, result = { ok: true }) {
  return event(seq, "done", { status: "succeeded", overall_pct: 100, result });
}

function sse(events, { contentType = "text/event-stream; charset=utf-8" } = {}) {
  const text = events.map((e) => `id: ${e.seq}\nevent: ${e.type}\ndata: ${JSON.stringify(e)}\n\n`).join("");
  return new Response(text, { status: 200, headers: { "Content-Type": contentType } });
}

function json(status, body) {
  return new Response(JSON.stringify(body), { status, headers: { "Content-Type": "application/json" } });
}

function truncated(firstSeq, after) {
  const message = firstSeq === null ? "gone" : `job J keeps events from seq ${firstSeq} on; cannot resume after ${after}`;
  return json(410, { error: { code: "history_truncated", message } });
}

const SNAPSHOT = {
  id: "J",
  status: "running",
  progress: 60,
  steps: [
    { name: "plan", status: "succeeded", pct: 100, tokens: 30 },
    { name: "write", status: "running", pct: 20, tokens: 5 },
  ],
  result: null,
  error: null,
  last_event_id: 9,
  links: { stream: "/api/jobs/J/stream" },
};

/** A fake fetch answering the nth request with script[n](url, init); records every request. */
function script(...answers) {
  const requests = [];
  globalThis.fetch = async (url, init = {}) => {
    const request = { url: String(url), headers: { ...(init.headers || {}) }, at: Date.now() };
    requests.push(request);
    const answer = answers[requests.length - 1];
    if (!answer) throw new TypeError(`unexpected request ${requests.length}: ${url}`);
    return answer(request);
  };
  return requests;
}

function token(expiresMs, job = "J") {
  const payload = Buffer.from(`${job}\0${Math.round(expiresMs)}`).toString("base64url");
  return `${payload}.c2lnbmF0dXJl`;
}

const watch = (url, options = {}) =>
  watchJob(url, { transport: "fetch-stream", sensing: false, retryMs: 5, log: QUIET, ...options });

describe("a 410 on resume is a gap, not the end", () => {
  test("snapshot applied, gap reported, resumed from the oldest kept event, done reached", async () => {
    const gaps = [];
    const requests = script(
      () => sse([event(1), event(2), event(3)]), // then the stream drops before done
      () => truncated(8, 3),
      () => json(200, SNAPSHOT),
      () => sse([event(8), event(9), event(10), done(11, { text: "final" })]),
    );
    const watcher = watch(STREAM, {
      onGap(gap, state) {
        gaps.push({ gap, pct: state.overallPct, steps: state.steps.map((s) => [s.name, s.status]) });
      },
    });
    const state = await watcher.done;
    assert.equal(state.status, "succeeded");
    assert.deepEqual(state.result, { text: "final" });
    assert.equal(state.overallPct, 100);
    assert.equal(gaps.length, 1);
    const { gap, pct, steps } = gaps[0];
    assert.equal(gap.afterSeq, 3);
    assert.equal(gap.firstKept, 8);
    assert.equal(gap.resumeAfter, 7);
    assert.equal(gap.skipped, 4);
    assert.equal(pct, 60, "the snapshot's progress was on screen at the gap");
    assert.deepEqual(steps, [["plan", "succeeded"], ["write", "running"]]);
    assert.deepEqual(state.gaps, [gap]);
    assert.equal(requests[1].headers["Last-Event-ID"], "3");
    assert.equal(requests[2].url, "http://localhost/api/jobs/J", "the snapshot, without the stream's query");
    assert.equal(requests[3].headers["Last-Event-ID"], "7", "resumed just before the oldest kept event");
  });

  test("a 410 that names no seq: resumed after the snapshot's last_event_id", async () => {
    const requests = script(
      () => sse([event(1)]),
      () => truncated(null),
      () => json(200, SNAPSHOT),
      () => sse([event(10), done(11)]),
    );
    const state = await watch(STREAM).done;
    assert.equal(state.done, true);
    assert.equal(state.gaps[0].resumeAfter, 9);
    assert.equal(state.gaps[0].skipped, 8);
    assert.equal(requests[3].headers["Last-Event-ID"], "9");
  });

  test("the snapshot comes through getSnapshot and the caller's headers go with every request", async () => {
    let asked = 0;
    const requests = script(
      () => sse([event(1)]),
      () => truncated(5, 1),
      () => sse([event(5), done(6)]),
    );
    const state = await watch(STREAM, {
      headers: { Authorization: "Bearer T" },
      async getSnapshot() {
        asked += 1;
        return SNAPSHOT;
      },
    }).done;
    assert.equal(asked, 1);
    assert.equal(state.done, true);
    assert.ok(requests.every((r) => r.headers.Authorization === "Bearer T"));
  });

  test("long-poll: a 410 is resynced the same way", async () => {
    const requests = script(
      () => truncated(4, 0),
      () => json(200, SNAPSHOT),
      () => json(200, { events: [event(4), done(5)], last_event_id: 5, done: true }),
    );
    const state = await watch(STREAM, { transport: "long-poll", lastEventId: 1 }).done;
    assert.equal(state.done, true);
    assert.equal(state.gaps.length, 1);
    assert.match(requests[2].url, /after=3&/);
  });

  test("a first_seq field in the 410 body wins over the message", async () => {
    const requests = script(
      () => sse([event(1)]),
      () => json(410, { error: { code: "history_truncated", message: "gone", first_seq: 6 } }),
      () => json(200, SNAPSHOT),
      () => sse([event(6), done(7)]),
    );
    const state = await watch(STREAM).done;
    assert.equal(state.gaps[0].firstKept, 6);
    assert.equal(requests[3].headers["Last-Event-ID"], "5");
  });

  test("gaps in a row without a new event are fatal after maxResyncs", async () => {
    const answers = [() => sse([event(1)])];
    for (let i = 0; i < 4; i++) answers.push(() => truncated(5 + i, 1), () => json(200, SNAPSHOT));
    const requests = script(...answers);
    const watcher = watch(STREAM, { maxResyncs: 2 });
    await assert.rejects(watcher.done, /410 history_truncated.*2 gaps in a row/);
    assert.equal(requests.length, 1 + 2 * 2 + 1, "two resyncs, then the third 410 ends it");
  });
});

describe("an expiring stream token is refreshed through getStreamUrl", () => {
  test("the token's expiry is read from the URL (auth.py's payload)", () => {
    const expires = Date.now() + 5000;
    assert.equal(streamTokenExpiry(`${STREAM}?token=${token(expires)}`), Math.round(expires));
    assert.equal(streamTokenExpiry(STREAM), null);
    assert.equal(streamTokenExpiry(`${STREAM}?token=garbage`), null);
  });

  test("a reconnect after the token's expiry asks for a fresh URL first", async () => {
    let refreshes = 0;
    const fresh = `${STREAM}?token=${token(Date.now() + 60_000)}`;
    const requests = script(
      () => sse([event(1)]),
      () => sse([event(2), done(3)]),
    );
    const watcher = watch(`${STREAM}?token=${token(Date.now() + 40)}`, {
      retryMs: 120, // the reconnect comes after the first token has expired
      async getStreamUrl() {
        refreshes += 1;
        return fresh;
      },
    });
    const state = await watcher.done;
    assert.equal(state.done, true);
    assert.equal(refreshes, 1);
    assert.equal(state.tokenRefreshes, 1);
    assert.equal(requests[1].url, fresh);
  });

  test("a 403 on reconnect calls the hook once and retries at once", async () => {
    let refreshes = 0;
    const requests = script(
      () => sse([event(1)]),
      () => json(403, { error: { code: "stream_token_expired", message: "expired" } }),
      () => sse([event(2), done(3)]),
    );
    const state = await watch(`${STREAM}?token=old`, {
      async getStreamUrl() {
        refreshes += 1;
        return `${STREAM}?token=new`;
      },
    }).done;
    assert.equal(state.done, true);
    assert.equal(refreshes, 1);
    assert.match(requests[2].url, /token=new/);
    assert.equal(requests[2].headers["Last-Event-ID"], "1");
  });

  test("a 403 again after the refresh, or with no hook, is fatal", async () => {
    const forbidden = () => json(403, { error: { code: "invalid_stream_token", message: "bad" } });
    script(() => sse([event(1)]), forbidden, forbidden);
    await assert.rejects(watch(`${STREAM}?token=old`, { getStreamUrl: async () => `${STREAM}?token=new` }).done, /403 invalid_stream_token/);
    const requests = script(() => sse([event(1)]), forbidden);
    await assert.rejects(watch(STREAM).done, /stream: 403/);
    assert.equal(requests.length, 2);
  });
});

describe("empty poll answers that come back at once back off", () => {
  test("exponential waits between empty answers, capped, reset by events", async () => {
    const empty = () => json(200, { events: [], last_event_id: 0, done: false });
    const requests = script(empty, empty, empty, empty, empty, () =>
      json(200, { events: [event(1), done(2)], last_event_id: 2, done: true }),
    );
    const state = await watch(STREAM, { transport: "long-poll", pollWaitS: 20, pollBackoffMs: 40, maxPollBackoffMs: 100 }).done;
    assert.equal(state.done, true);
    const waits = requests.slice(1).map((r, i) => r.at - requests[i].at);
    const expected = [40, 80, 100, 100, 100];
    waits.forEach((w, i) => assert.ok(w >= expected[i] - 5, `wait ${i}: ${w} ms < ${expected[i]} ms (${waits})`));
    assert.ok(waits[4] < 400, `capped at maxPollBackoffMs: ${waits}`);
  });
});

describe("a 200 that is not Flushline's counts as a failure", () => {
  test("a login page instead of the stream: retried, then a clear error", async () => {
    const portal = () => new Response("<html>log in</html>", { status: 200, headers: { "Content-Type": "text/html" } });
    const requests = script(portal, portal, portal, portal);
    await assert.rejects(watch(STREAM, { maxWrongAnswers: 3 }).done, /Content-Type text\/html.*3 times.*captive portal/);
    assert.equal(requests.length, 3);
  });

  test("one stray answer between good ones is retried and forgotten", async () => {
    const portal = () => new Response("<html/>", { status: 200, headers: { "Content-Type": "text/html" } });
    script(() => sse([event(1)]), portal, portal, () => sse([event(2)]), portal, portal, () => sse([done(3)]));
    const state = await watch(STREAM, { maxWrongAnswers: 3 }).done;
    assert.equal(state.done, true);
  });

  test("a poll answer that is not JSON: the same cap", async () => {
    const portal = () => new Response("<html/>", { status: 200, headers: { "Content-Type": "text/html" } });
    script(portal, portal);
    await assert.rejects(watch(STREAM, { transport: "long-poll", maxWrongAnswers: 2 }).done, /long-poll answered 200 with Content-Type text\/html/);
  });
});

describe("applySnapshot", () => {
  test("moves progress and steps forward only, never ends the watch", () => {
    const state = initialState();
    state.overallPct = 70;
    applySnapshot(state, SNAPSHOT);
    assert.equal(state.overallPct, 70);
    assert.equal(state.status, "running");
    assert.equal(state.currentStep, 1);
    assert.deepEqual(state.steps.map((s) => [s.name, s.status, s.pct, s.tokens]), [
      ["plan", "succeeded", 100, 30],
      ["write", "running", 20, 5],
    ]);
    applySnapshot(state, { ...SNAPSHOT, status: "succeeded", result: { r: 1 }, steps: [{ name: "plan", status: "running", pct: 50, tokens: 1 }] });
    assert.equal(state.steps[0].status, "succeeded");
    assert.deepEqual(state.result, { r: 1 });
    assert.equal(state.done, false);
  });
});
