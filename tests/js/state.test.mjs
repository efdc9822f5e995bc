// The job state flushline.js keeps, and the URLs it derives (node --test).
import assert from "node:assert/strict";
import { test } from "node:test";

import { applyEvent, initialState, pollUrl, withParam } from "../../app/web/static/flushline.js";

const JOB = [
  { type: "job_started", seq: 1, steps: ["plan", "write"], strategy: "aligned" },
  { type: "step_started", seq: 2, step: "plan", index: 0, total_steps: 2 },
  { type: "insight", seq: 3, text: "Planning...", step: "plan" },
  { type: "chunk", seq: 4, step: "plan", text: "Hello ", tokens: 2 },
  { type: "step_progress", seq: 5, step: "plan", pct: 40, overall_pct: 20, tokens: 2, eta_s: 3, job_eta_s: 9 },
  { type: "chunk", seq: 6, step: "plan", text: "world", tokens: 1 },
  { type: "step_completed", seq: 7, step: "plan", index: 0, pct: 100, overall_pct: 50, tokens: 3, duration_s: 1 },
  { type: "step_started", seq: 8, step: "write", index: 1, total_steps: 2 },
  { type: "step_progress", seq: 9, step: "write", pct: 10, overall_pct: 49, tokens: 1, eta_s: 2, job_eta_s: null },
  { type: "chunk", seq: 10, step: "write", text: "Done.", tokens: 1 },
  { type: "step_completed", seq: 11, step: "write", index: 1, pct: 100, overall_pct: 100, tokens: 5, duration_s: 1 },
  { type: "done", seq: 12, status: "succeeded", overall_pct: 100, result: { ok: true } },
].map((e) => ({ job_id: "J", ts: 1000 + e.seq, ...e }));

test("a whole job folds into the documented state", () => {
  const state = initialState();
  for (const event of JOB) assert.equal(applyEvent(state, event), true);
  assert.equal(state.jobId, "J");
  assert.equal(state.status, "succeeded");
  assert.equal(state.overallPct, 100);
  assert.equal(state.done, true);
  assert.deepEqual(state.result, { ok: true });
  assert.equal(state.lastEventId, 12);
  assert.equal(state.events, 12);
  assert.equal(state.currentStep, null);
  assert.equal(state.insight, "Planning...");
  assert.deepEqual(
    state.steps.map((s) => [s.name, s.index, s.status, s.pct, s.tokens, s.text]),
    [
      ["plan", 0, "succeeded", 100, 3, "Hello world"],
      ["write", 1, "succeeded", 100, 5, "Done."],
    ],
  );
});

test("mid-job: current step, ETA of the job, progress never decreasing", () => {
  const state = initialState();
  for (const event of JOB.slice(0, 9)) applyEvent(state, event);
  assert.equal(state.currentStep, 1);
  assert.equal(state.overallPct, 50, "49 after 50 must not move the bar back");
  assert.equal(state.etaS, 2, "job_eta_s null: the step's eta_s");
  assert.equal(state.steps[1].status, "running");
});

test("an event seen twice (a replay after a reconnect) is applied once", () => {
  const state = initialState();
  for (const event of JOB.slice(0, 6)) applyEvent(state, event);
  for (const event of JOB.slice(2, 8)) applyEvent(state, event);
  assert.equal(state.steps[0].text, "Hello world");
  assert.equal(state.events, 8);
  assert.equal(state.lastEventId, 8);
});

test("a failed job: the running step fails, the error is kept", () => {
  const state = initialState();
  for (const event of JOB.slice(0, 4)) applyEvent(state, event);
  applyEvent(state, { type: "error", seq: 5, message: "boom", step: "plan", ts: 1 });
  applyEvent(state, { type: "done", seq: 6, status: "failed", overall_pct: 10, error: "boom", ts: 2 });
  assert.equal(state.status, "failed");
  assert.equal(state.error, "boom");
  assert.deepEqual(state.steps.map((s) => s.status), ["failed", "pending"]);
});

test("a cancelled job: the running step is cancelled", () => {
  const state = initialState();
  for (const event of JOB.slice(0, 2)) applyEvent(state, event);
  applyEvent(state, { type: "done", seq: 3, status: "cancelled", overall_pct: 0, ts: 2 });
  assert.deepEqual(state.steps.map((s) => s.status), ["cancelled", "pending"]);
});

test("the long-poll URL: /stream becomes /events, the query kept, relative to the page", () => {
  const base = "https://example.test/prefix/index.html";
  assert.equal(
    pollUrl("api/jobs/J/stream?token=abc&proxy_buffer=8192", 7, 20, 100, base),
    "https://example.test/prefix/api/jobs/J/events?token=abc&after=7&wait_s=20&limit=100",
  );
  assert.equal(
    withParam("api/jobs/J/stream?token=abc", "proxy_buffer", 8192, base),
    "https://example.test/prefix/api/jobs/J/stream?token=abc&proxy_buffer=8192",
  );
  assert.equal(
    withParam("/api/jobs/J/stream?proxy_buffer=8192", "proxy_buffer", null, base),
    "https://example.test/api/jobs/J/stream",
  );
});
