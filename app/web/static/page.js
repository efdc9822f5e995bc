// The live progress page: a form that starts a demo job, and a live view of one job
// built on flushline.js. Plain ES module, no dependencies, no build step.
//
// Every URL here is relative (`api/jobs`, never `/api/...`, never the snapshot's
// absolute `links.stream`), so the page works unchanged behind a path prefix.
//
// For tests and tools: `window.flushlineWatcher` is the current watcher,
// `window.flushlineEvents` every event received ({data, info}, in order), and the DOM
// carries its state in attributes: `body[data-state]` (idle, starting, queued, running,
// succeeded, failed, cancelled, error), `body[data-job-id]`, `body[data-sensing]`,
// `#progress[aria-valuenow]`, `.phase[data-status]` (pending, running, done, failed,
// cancelled), `#health[data-transport]`, `#health[data-connection]`, `body[data-gaps]`
// (how many gaps: events the server no longer kept when the page caught up, shown in
// `#gap`) and `body[data-token-refreshes]` (stream URLs fetched anew).
//
// The watcher is wired to the job's snapshot (`GET api/jobs/ID`, with the page's API
// token): on a 410 it shows the job's state from the snapshot and resumes, and a stream
// token about to expire is replaced by the snapshot's fresh `links.stream` token.

import { watchJob } from "./flushline.js";

/** How many rows the event log keeps (the oldest go first). */
const LOG_LIMIT = 200;
/** Lag above which a log row is marked as held (the delivery target). */
const SLOW_LAG_MS = 500;
const TRANSPORT_LABELS = {
  "fetch-stream": "fetch stream",
  eventsource: "EventSource",
  "long-poll": "long-polling",
};
const PHASE_LABELS = {
  pending: "pending",
  running: "running",
  done: "done",
  failed: "failed",
  cancelled: "cancelled",
};
const FINAL_MESSAGES = {
  succeeded: "Job succeeded.",
  failed: "Job failed.",
  cancelled: "Job cancelled.",
};
/** Inputs of the start form that hold a demo option, by option name. */
const OPTION_FIELDS = ["steps", "tokens_per_step", "tokens_per_second"];

const params = new URLSearchParams(location.search);
/** `?sense=0` turns the client's delivery sensing off (the browser tests' control case). */
const sensing = params.get("sense") !== "0";
/** `?transport=long-poll` (or fetch-stream, eventsource) forces a transport; default auto. */
const transport = params.get("transport") || "auto";

const $ = (id) => document.getElementById(id);
const ui = {
  body: document.body,
  progress: $("progress"),
  fill: document.querySelector("#progress .progress-fill"),
  form: $("job-form"),
  start: $("start"),
  formError: $("form-error"),
  openForm: $("open-form"),
  openId: $("open-id"),
  jobId: $("job-id"),
  jobStatus: $("job-status"),
  jobStrategy: $("job-strategy"),
  cancel: $("cancel"),
  statusLine: $("status-line"),
  pct: $("pct"),
  eta: $("eta"),
  phases: $("phases"),
  text: $("text"),
  textStep: $("text-step"),
  health: $("health"),
  transport: $("transport"),
  connection: $("connection"),
  lastByte: $("last-byte"),
  block: $("block"),
  eventCount: $("event-count"),
  bytes: $("bytes"),
  reason: $("reason"),
  gap: $("gap"),
  log: $("log"),
  logLimit: $("log-limit"),
};

/** The job on screen: which watcher is current, and what is rendered. */
let view = null;
/** Bumped for every job opened, so callbacks of a closed watcher change nothing. */
let generation = 0;

window.flushlineWatcher = null;
window.flushlineEvents = [];

/** An error answer of the API: its message, status and the field to blame, if any. */
class ApiError extends Error {
  constructor(message, status, field) {
    super(message);
    this.status = status;
    this.field = field ?? null;
  }
}

/** The relative URL of a job resource (`api/jobs/ID` plus `tail`). */
function jobUrl(jobId, tail = "") {
  return `api/jobs/${encodeURIComponent(jobId)}${tail}`;
}

/**
 * With auth on, the API token comes in the page's fragment (`/#api_token=...`): a
 * fragment is never sent to the server, so the token stays out of every request log.
 */
const apiToken = new URLSearchParams(location.hash.slice(1)).get("api_token");

/** Fetch JSON; an error status becomes an ApiError with the API's own message. */
async function apiJson(url, init = {}) {
  let response;
  const auth = apiToken ? { Authorization: `Bearer ${apiToken}` } : {};
  try {
    response = await fetch(url, {
      ...init,
      headers: { Accept: "application/json", ...auth, ...init.headers },
    });
  } catch (err) {
    throw new ApiError(`The service could not be reached (${err.message}).`, 0);
  }
  let body = null;
  if ((response.headers.get("Content-Type") || "").includes("json")) {
    body = await response.json().catch(() => null);
  }
  if (!response.ok) {
    const error = body && typeof body.error === "object" && body.error;
    if (error && typeof error.message === "string") {
      throw new ApiError(error.message, response.status, error.field);
    }
    throw new ApiError(`HTTP ${response.status} ${response.statusText}`.trim(), response.status);
  }
  return body;
}

// ---- formatting -------------------------------------------------------------------

function formatClock(ms) {
  const d = new Date(ms);
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

function formatDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "unknown";
  if (seconds < 1) return "under a second";
  const s = Math.ceil(seconds);
  if (s < 60) return `about ${s} s`;
  return `about ${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s`;
}

function formatAgo(ms) {
  if (ms < 0) ms = 0;
  if (ms < 10_000) return `${(ms / 1000).toFixed(1)} s ago`;
  if (ms < 120_000) return `${Math.round(ms / 1000)} s ago`;
  return `${Math.round(ms / 60_000)} min ago`;
}

function formatNumber(value, digits = 1) {
  return typeof value === "number" ? String(Number(value.toFixed(digits))) : "?";
}

function formatBytes(bytes) {
  if (bytes === null || bytes === undefined) return null;
  return bytes >= 1024 && bytes % 1024 === 0 ? `${bytes / 1024} KiB` : `${bytes} B`;
}

function formatSize(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KiB`;
  return `${(bytes / 1024 / 1024).toFixed(2)} MiB`;
}

/** A one-line summary of an event for the log. */
function summarize(data) {
  switch (data.type) {
    case "job_started": {
      const steps = Array.isArray(data.steps) ? data.steps.length : data.steps;
      return `${steps} steps, strategy ${data.strategy}`;
    }
    case "step_started":
      return `${data.step} (${data.index + 1} of ${data.total_steps})`;
    case "chunk": {
      const text = String(data.text ?? "").replace(/\s+/g, " ").trim();
      const snippet = text.length > 48 ? `${text.slice(0, 48)}…` : text;
      return `${data.step}: ${data.tokens} tokens “${snippet}”`;
    }
    case "insight":
      return data.text;
    case "step_progress":
      return `${data.step} ${formatNumber(data.pct)}%, overall ${formatNumber(data.overall_pct)}%`;
    case "step_completed":
      return `${data.step} done in ${formatNumber(data.duration_s, 2)} s`;
    case "error":
      return data.message;
    case "done":
      return data.status;
    default:
      return "";
  }
}

/** The page's phase status for a client step status (succeeded reads as done). */
function phaseStatus(status) {
  return status === "succeeded" ? "done" : status in PHASE_LABELS ? status : "pending";
}

// ---- rendering --------------------------------------------------------------------

function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

function setAttr(node, name, value) {
  if (node.getAttribute(name) !== value) node.setAttribute(name, value);
}

function renderProgress(overallPct) {
  const pct = Math.min(100, Math.max(0, Number(overallPct) || 0));
  // Floor, so the bar reads 100 only when the job has really completed.
  const whole = String(Math.floor(pct));
  setAttr(ui.progress, "aria-valuenow", whole);
  setAttr(ui.progress, "aria-valuetext", `${whole}%`);
  ui.fill.style.width = `${pct}%`;
  setText(ui.pct, `${whole}%`);
}

function renderPhases(steps, currentStep) {
  while (ui.phases.children.length > steps.length) ui.phases.lastElementChild.remove();
  steps.forEach((step, i) => {
    let item = ui.phases.children[i];
    if (!item) {
      item = document.createElement("li");
      item.className = "phase";
      item.dataset.index = String(i);
      const button = document.createElement("button");
      button.type = "button";
      button.className = "phase-button";
      button.title = "Show this step's text";
      button.innerHTML = '<span class="phase-name"></span><span class="phase-state"></span>';
      button.addEventListener("click", () => selectStep(i));
      item.append(button);
      ui.phases.append(item);
    }
    const status = phaseStatus(step.status);
    setAttr(item, "data-status", status);
    if (i === currentStep) setAttr(item, "aria-current", "step");
    else item.removeAttribute("aria-current");
    const button = item.firstElementChild;
    setAttr(button, "aria-pressed", String(view.selectedStep === i));
    setText(button.querySelector(".phase-name"), `${i + 1}. ${step.name}`);
    const detail = status === "running" ? `running ${Math.floor(step.pct ?? 0)}%` : PHASE_LABELS[status];
    setText(button.querySelector(".phase-state"), detail);
  });
}

/** The step whose text is shown: the one picked, else the current one, else the last with text. */
function shownStep(state) {
  const steps = state.steps || [];
  if (view.selectedStep !== null && steps[view.selectedStep]) return steps[view.selectedStep];
  if (state.currentStep !== null && state.currentStep !== undefined && steps[state.currentStep]) {
    return steps[state.currentStep];
  }
  for (let i = steps.length - 1; i >= 0; i--) if (steps[i].text) return steps[i];
  return null;
}

function renderText(state) {
  const step = shownStep(state);
  setText(ui.textStep, step ? `step ${step.index + 1}, ${step.name}` : "the current step");
  const text = step ? step.text || "" : "";
  if (ui.text.textContent === text) return;
  const box = ui.text;
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 24;
  box.textContent = text;
  ui.text.dataset.step = step ? String(step.index) : "";
  if (atBottom) box.scrollTop = box.scrollHeight;
}

function renderStatusLine(state) {
  let line;
  if (state.done) {
    line = FINAL_MESSAGES[state.status] || `Job ${state.status}.`;
    if (state.status === "failed" && state.error) {
      line = `Job failed: ${typeof state.error === "string" ? state.error : state.error.message || JSON.stringify(state.error)}`;
    }
  } else {
    line = state.insight || (state.status === "queued" ? "Queued…" : "Waiting for the first event…");
  }
  setText(ui.statusLine, line);
}

function connectionOf(state) {
  if (state.done) return "closed";
  if (state.reconnecting) return "reconnecting";
  if (state.connected) return "connected";
  return "connecting";
}

function renderHealth(state) {
  const transport = state.transport || "";
  setAttr(ui.health, "data-transport", transport);
  setText(ui.transport, TRANSPORT_LABELS[transport] || transport || "none");
  const connection = connectionOf(state);
  setAttr(ui.health, "data-connection", connection);
  setAttr(ui.connection, "data-connection", connection);
  setText(ui.connection, connection);
  const block = formatBytes(state.measuredBlock);
  const hint = formatBytes(state.proxyBuffer);
  let blockText = block ? `measured ${block}` : "not measured";
  if (hint) blockText += `, stream padded to ${hint}`;
  setText(ui.block, blockText);
  setText(ui.eventCount, String(state.events ?? 0));
  setText(ui.bytes, typeof state.bytes === "number" ? formatSize(state.bytes) : "unknown");
  const reason = state.reason || "no decision yet";
  setText(ui.reason, sensing ? reason : `sensing off (?sense=0); ${reason}`);
  renderLastByte(state);
}

function renderGaps(state) {
  const gaps = state.gaps || [];
  ui.body.dataset.gaps = String(gaps.length);
  ui.body.dataset.tokenRefreshes = String(state.tokenRefreshes || 0);
  if (!gaps.length) {
    ui.gap.hidden = true;
    return;
  }
  const skipped = gaps.reduce((sum, gap) => sum + gap.skipped, 0);
  const shown = gaps.some((gap) => gap.snapshot) ? "showing the job's state from the server" : "the server's snapshot could not be read";
  const times = gaps.length === 1 ? "" : ` (${gaps.length} times)`;
  setText(
    ui.gap,
    `This page fell behind: ${skipped} event${skipped === 1 ? "" : "s"} the server no longer kept ` +
      `were skipped${times}; ${shown}, and live events from there on. Step text may miss a part.`,
  );
  ui.gap.hidden = false;
}

function renderLastByte(state) {
  const at = state && state.lastByteAt;
  setText(ui.lastByte, at ? formatAgo(Date.now() - at) : "never");
}

function render(state) {
  if (!view) return;
  view.state = state;
  // A watcher that stopped on a fatal error (404, 410, 400) shows that, not its last status.
  const status = view.failure ? "error" : state.status || view.snapshotStatus || "queued";
  ui.body.dataset.state = status;
  setText(ui.jobStatus, status);
  setAttr(ui.jobStatus, "data-status", status);
  ui.cancel.hidden = Boolean(state.done) || ["succeeded", "failed", "cancelled", "error"].includes(status);
  renderProgress(state.overallPct);
  renderPhases(state.steps || [], state.currentStep);
  if (view.failure) setText(ui.statusLine, view.failure);
  else renderStatusLine(state);
  setText(ui.eta, state.done ? "none, finished" : formatDuration(state.etaS));
  renderText(state);
  renderHealth(state);
  renderGaps(state);
}

function selectStep(index) {
  if (!view) return;
  view.selectedStep = view.selectedStep === index ? null : index;
  if (view.state) render(view.state);
}

function appendLog(data, info) {
  const item = document.createElement("li");
  item.dataset.seq = String(data.seq);
  item.dataset.type = data.type;
  const lag = Math.round(info.lagMs);
  item.dataset.lagMs = String(lag);
  if (lag > SLOW_LAG_MS) item.classList.add("held");
  const time = document.createElement("time");
  time.dateTime = new Date(info.arrivedAt).toISOString();
  time.textContent = formatClock(info.arrivedAt);
  const lagSpan = document.createElement("span");
  lagSpan.className = "lag";
  lagSpan.textContent = `${lag} ms`;
  const seq = document.createElement("span");
  seq.className = "seq";
  seq.textContent = `#${data.seq}`;
  const type = document.createElement("span");
  type.className = "type";
  type.textContent = data.type;
  const summary = document.createElement("span");
  summary.className = "summary";
  summary.textContent = summarize(data);
  item.append(time, lagSpan, seq, type, summary);
  ui.log.prepend(item);
  while (ui.log.children.length > LOG_LIMIT) ui.log.lastElementChild.remove();
}

// ---- jobs -------------------------------------------------------------------------

function closeWatcher() {
  generation += 1;
  if (window.flushlineWatcher) window.flushlineWatcher.close();
  window.flushlineWatcher = null;
}

function resetView(jobId) {
  view = { jobId, selectedStep: null, state: null, snapshotStatus: null, failure: null };
  window.flushlineEvents = [];
  ui.log.replaceChildren();
  ui.phases.replaceChildren();
  ui.text.textContent = "";
  ui.gap.hidden = true;
  ui.body.dataset.gaps = "0";
  ui.body.dataset.tokenRefreshes = "0";
  ui.body.dataset.jobId = jobId;
  setText(ui.jobId, jobId);
  setText(ui.jobStrategy, "…");
}

function showJobUrl(jobId) {
  const url = new URL(location.href);
  url.searchParams.set("job", jobId);
  history.replaceState(null, "", url);
}

/** Watch the job of ``snapshot`` (its id and strategy; its links are not used). */
function watch(snapshot) {
  closeWatcher();
  resetView(snapshot.id);
  view.snapshotStatus = snapshot.status;
  setText(ui.jobStrategy, snapshot.strategy || "unknown");
  const mine = generation;
  // The stream link's query carries the job's stream token when auth is on; the path
  // stays relative, so the page works under a path prefix.
  const link = (snapshot.links && snapshot.links.stream) || "";
  const streamUrl = (stream) => jobUrl(snapshot.id, "/stream") + (stream.includes("?") ? stream.slice(stream.indexOf("?")) : "");
  const watcher = watchJob(streamUrl(link), {
    sensing,
    transport,
    // The snapshot answers a gap (410) and carries a fresh stream token in its links.
    getSnapshot: () => apiJson(jobUrl(snapshot.id)),
    async getStreamUrl() {
      const fresh = await apiJson(jobUrl(snapshot.id));
      return streamUrl((fresh.links && fresh.links.stream) || "");
    },
    onEvent(data, info) {
      if (mine !== generation) return;
      window.flushlineEvents.push({ data, info });
      appendLog(data, info);
    },
    onState(state) {
      if (mine === generation) render(state);
    },
  });
  window.flushlineWatcher = watcher;
  render(watcher.state);
  watcher.done.then(
    (state) => {
      if (mine === generation) render(state || watcher.state);
    },
    (err) => {
      if (mine !== generation) return;
      view.failure = `The stream stopped: ${err && err.message ? err.message : err}`;
      render(watcher.state);
    },
  );
}

async function openJob(jobId) {
  closeWatcher();
  showFormError(null);
  let snapshot;
  try {
    snapshot = await apiJson(jobUrl(jobId));
  } catch (err) {
    view = null;
    ui.body.dataset.state = "error";
    ui.body.dataset.jobId = "";
    showFormError(err);
    return;
  }
  watch(snapshot);
}

function showFormError(err) {
  for (const name of OPTION_FIELDS) $(name).removeAttribute("aria-invalid");
  $("strategy").removeAttribute("aria-invalid");
  if (!err) {
    ui.formError.hidden = true;
    ui.formError.textContent = "";
    return;
  }
  ui.formError.textContent = err.message;
  ui.formError.hidden = false;
  const field = err.field ? String(err.field).replace(/^options\./, "") : null;
  const input = field && (OPTION_FIELDS.includes(field) || field === "strategy") ? $(field) : null;
  if (input) {
    input.setAttribute("aria-invalid", "true");
    input.setAttribute("aria-describedby", "form-error");
  }
}

function readForm() {
  const options = {};
  for (const name of OPTION_FIELDS) {
    const input = $(name);
    if (input.validity.badInput) {
      const label = document.querySelector(`label[for="${name}"]`).textContent;
      throw new ApiError(`${label}: enter a number.`, 0, name);
    }
    const raw = input.value.trim();
    if (raw !== "") options[name] = Number(raw);
  }
  return { strategy: $("strategy").value, options };
}

async function startJob(event) {
  event.preventDefault();
  showFormError(null);
  let body;
  try {
    body = readForm();
  } catch (err) {
    showFormError(err);
    return;
  }
  ui.start.disabled = true;
  const before = ui.body.dataset.state;
  ui.body.dataset.state = "starting";
  try {
    const snapshot = await apiJson("api/jobs", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    showJobUrl(snapshot.id);
    ui.openId.value = snapshot.id;
    watch(snapshot);
  } catch (err) {
    ui.body.dataset.state = before;
    showFormError(err);
  } finally {
    ui.start.disabled = false;
  }
}

async function cancelJob() {
  if (!view) return;
  ui.cancel.disabled = true;
  try {
    await apiJson(jobUrl(view.jobId, "/cancel"), { method: "POST" });
  } catch (err) {
    showFormError(err);
  } finally {
    ui.cancel.disabled = false;
  }
}

// ---- start ------------------------------------------------------------------------

ui.body.dataset.sensing = sensing ? "on" : "off";
setText(ui.logLimit, String(LOG_LIMIT));
ui.form.addEventListener("submit", startJob);
ui.openForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const jobId = ui.openId.value.trim();
  if (!jobId) return;
  showJobUrl(jobId);
  openJob(jobId);
});
ui.cancel.addEventListener("click", cancelJob);
// The time since the last byte is the one figure that changes without any event.
setInterval(() => renderLastByte(view && view.state), 1000);
window.addEventListener("pagehide", closeWatcher);

const initialJob = params.get("job");
if (initialJob) {
  ui.openId.value = initialJob;
  openJob(initialJob);
}
