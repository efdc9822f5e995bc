// The delivery-sensing rules of flushline.js on recorded arrival patterns (node --test).
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import {
  DEFAULTS,
  decide,
  fitBlock,
  groupReleases,
  judgeDelivery,
} from "../../app/web/static/flushline.js";
import { recording, unsensed } from "./fixtures.mjs";

function judge(connection, extra = {}) {
  return judgeDelivery(connection.arrivals, { requestedAt: connection.requestedAt, ...extra });
}

function firstByteMs(connection) {
  return connection.arrivals[0].at - connection.requestedAt;
}

describe("paths that deliver the default stream are left alone", () => {
  for (const name of ["emulator-4096-all", "emulator-hold-200ms"]) {
    test(`${name}: live, so the stream is kept`, () => {
      const verdict = judge(unsensed(name));
      assert.equal(verdict.held, false, verdict.reason);
      assert.equal(decide(verdict, { proxyBuffer: null, hintAttempts: 0, hasBytes: true }).action, "keep");
    });
  }

  test("emulator-hold-200ms: ~200 ms of lag on every event stays under the held bounds", () => {
    const connection = unsensed("emulator-hold-200ms");
    const lags = connection.arrivals
      .slice(1)
      .flatMap((a) => a.events.map((e) => a.at - e.ts * 1000))
      .sort((a, b) => a - b);
    const median = lags[Math.floor(lags.length / 2)];
    assert.ok(median > 150, `a time hold delays every write: median lag ${median} ms`);
    const verdict = judge(connection);
    assert.ok(verdict.maxRelLagMs < DEFAULTS.heldLagMs, verdict.reason);
    assert.ok(verdict.maxSpreadMs < DEFAULTS.burstSpanMs, verdict.reason);
  });
});

describe("size-buffering paths: held, and the fitted block flushes them", () => {
  const cases = [
    // [path, the proxy's buffer, its release model]
    ["emulator-8192-blocks", 8192, "blocks"],
    ["emulator-12000-all", 12000, "all"],
    ["nginx-http10-8k", 8192, "blocks"],
  ];
  for (const [name, buffer, model] of cases) {
    test(`${name}: held, proxy_buffer fits the ${model} buffer of ${buffer}`, () => {
      const verdict = judge(unsensed(name));
      assert.equal(verdict.held, true, verdict.reason);
      const choice = decide(verdict, { proxyBuffer: null, hintAttempts: 0, hasBytes: true });
      assert.equal(choice.action, "hint", choice.reason);
      const block = choice.proxyBuffer;
      assert.equal(block % DEFAULTS.blockUnit, 0);
      if (model === "blocks") assert.equal(block % buffer, 0, `${block} is not whole ${buffer}-byte blocks`);
      else assert.ok(block >= buffer, `${block} < threshold ${buffer}`);
      assert.ok(block < 2 * buffer, `${block} pads more than needed for ${buffer}`);
    });

    test(`${name}: judged on the first held release alone (adapts at the first bytes)`, () => {
      const connection = unsensed(name);
      const first = groupReleases(connection.arrivals)[0];
      const arrivals = connection.arrivals.filter((a) => a.at <= first.lastAt);
      const verdict = judge({ ...connection, arrivals });
      assert.equal(verdict.held, true, verdict.reason);
      assert.ok(verdict.ttfbMs > DEFAULTS.firstByteSlowMs);
    });

    test(`${name}: the stream resumed with the hint is live`, () => {
      const rec = recording(name);
      const hinted = rec.connections.filter((c) => c.proxyBuffer !== null);
      assert.equal(hinted.length, 1, rec.choice);
      const verdict = judge(hinted[0]);
      assert.equal(verdict.held, false, verdict.reason);
    });
  }

  test("nginx's first release is its buffer minus its response head: rounded up", () => {
    const releases = groupReleases(unsensed("nginx-http10-8k").arrivals);
    assert.ok(releases[0].bytes < 8192 && releases[0].bytes > 8192 - 512, `${releases[0].bytes}`);
    assert.equal(fitBlock([releases[0]]).block, 8192);
  });
});

describe("paths that hold the whole stream: no first byte within the bound", () => {
  for (const name of ["emulator-32768-blocks", "emulator-4096-gzip", "emulator-hold-all"]) {
    test(`${name}: the first byte comes after firstByteTimeoutMs, so long-poll`, () => {
      assert.ok(firstByteMs(unsensed(name)) > DEFAULTS.firstByteTimeoutMs);
      const rec = recording(name);
      assert.equal(rec.choice, "long-poll");
      assert.match(rec.decisions.at(-1).reason, /no first byte|compressed/);
    });
  }
});

describe("fitBlock", () => {
  test("the smallest release rounded up to a multiple of 1024", () => {
    assert.equal(fitBlock([{ bytes: 12288 }, { bytes: 20480 }]).block, 12288);
    assert.equal(fitBlock([{ bytes: 7958 }, { bytes: 8192 }]).block, 8192);
    assert.equal(fitBlock([{ bytes: 100 }]).block, 1024);
    assert.equal(fitBlock([{ bytes: 12001 }]).block, 12288);
  });

  test("the gcd of the release sizes is reported", () => {
    const fit = fitBlock([{ bytes: 16384 }, { bytes: 8192 }, { bytes: 24576 }]);
    assert.equal(fit.gcd, 8192);
    assert.equal(fit.block, 8192);
  });

  test("nothing to fit without byte counts", () => {
    assert.equal(fitBlock([]).block, null);
    assert.equal(fitBlock([{ bytes: 0 }]).block, null);
  });
});

describe("judgeDelivery on synthetic patterns", () => {
  const ev = (seq, tsMs) => ({ seq, ts: tsMs / 1000 });

  test("clock skew cancels out: every event 10 s 'late' by the clocks, none held", () => {
    const skew = 10_000;
    const arrivals = [0, 1000, 2000, 3000].map((t, i) => ({
      at: t + skew + 5,
      bytes: 4096,
      offset: 4096 * (i + 1),
      events: [ev(i + 1, t)],
    }));
    const verdict = judgeDelivery(arrivals, { requestedAt: skew });
    assert.equal(verdict.held, false, verdict.reason);
    assert.equal(Math.round(verdict.minLagMs), skew + 5);
  });

  test("a burst: events over 1.5 s arriving in one read are held", () => {
    const arrivals = [
      { at: 10, bytes: 4096, offset: 4096, events: [ev(1, 0)] },
      { at: 2010, bytes: 8192, offset: 12288, events: [ev(2, 500), ev(3, 2000)] },
    ];
    const verdict = judgeDelivery(arrivals, { requestedAt: 0 });
    assert.equal(verdict.held, true);
    assert.ok(verdict.maxSpreadMs >= 1500);
  });

  test("events held one at a time show as relative lag, twice", () => {
    const arrivals = [
      { at: 10, bytes: 4096, offset: 4096, events: [ev(1, 0)] },
      { at: 1010, bytes: 4096, offset: 8192, events: [ev(2, 1000)] },
      { at: 2900, bytes: 4096, offset: 12288, events: [ev(3, 2000)] },
    ];
    const once = judgeDelivery(arrivals, { requestedAt: 0 });
    assert.equal(once.held, false, "one late release may be a pause of the browser");
    assert.ok(once.maxRelLagMs > 800);
    arrivals.push({ at: 3900, bytes: 4096, offset: 16384, events: [ev(4, 3000)] });
    const twice = judgeDelivery(arrivals, { requestedAt: 0 });
    assert.equal(twice.held, true, twice.reason);
    assert.equal(twice.heldReleases.length, 2);
  });

  test("a late page's first read (long history) is not evidence when it came at once", () => {
    const arrivals = [
      { at: 20, bytes: 40960, offset: 40960, events: [ev(1, -30_000), ev(2, -10)] },
      { at: 1020, bytes: 4096, offset: 45056, events: [ev(3, 1000)] },
    ];
    const verdict = judgeDelivery(arrivals, { requestedAt: 0 });
    assert.equal(verdict.held, false, verdict.reason);
  });

  test("reads a few ms apart are one release", () => {
    const releases = groupReleases([
      { at: 100, bytes: 3828, offset: 3828, events: [] },
      { at: 122, bytes: 8460, offset: 12288, events: [ev(1, 0)] },
      { at: 900, bytes: 4096, offset: 16384, events: [] },
    ]);
    assert.deepEqual(
      releases.map((r) => [r.bytes, r.offset, r.first]),
      [
        [12288, 12288, true],
        [4096, 16384, false],
      ],
    );
  });
});

describe("decide: when the hint does not deliver", () => {
  const held = {
    held: true,
    reason: "held",
    evidence: [{ bytes: 8192 }, { bytes: 16384 }],
  };

  test("held again with the same block: long-poll", () => {
    const choice = decide(held, { proxyBuffer: 8192, hintAttempts: 1, hasBytes: true });
    assert.equal(choice.action, "long-poll");
    assert.match(choice.reason, /does not deliver/);
  });

  test("held with a hint but a larger block measured: one more hint", () => {
    const choice = decide(held, { proxyBuffer: 4096, hintAttempts: 1, hasBytes: true });
    assert.deepEqual([choice.action, choice.proxyBuffer], ["hint", 8192]);
  });

  test("out of hint attempts: long-poll", () => {
    const choice = decide(held, { proxyBuffer: 4096, hintAttempts: DEFAULTS.maxHintAttempts, hasBytes: true });
    assert.equal(choice.action, "long-poll");
  });

  test("a block over maxProxyBuffer: long-poll", () => {
    const big = { ...held, evidence: [{ bytes: 70_000 }] };
    const choice = decide(big, { proxyBuffer: null, hintAttempts: 0, hasBytes: true });
    assert.equal(choice.action, "long-poll");
    assert.equal(choice.measuredBlock, 70_656);
  });

  test("no byte sizes (EventSource): long-poll", () => {
    assert.equal(decide(held, { proxyBuffer: null, hintAttempts: 0, hasBytes: false }).action, "long-poll");
  });
});
