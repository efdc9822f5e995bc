// The incremental SSE parser of flushline.js: the WHATWG grammar, fed in arbitrary pieces.
import assert from "node:assert/strict";
import { test } from "node:test";

import { SSEParser } from "../../app/web/static/flushline.js";

const STREAM =
  "retry: 3000\n" +
  ": " + ".".repeat(100) + "\n" +
  "id: 1\nevent: job_started\ndata: {\"seq\":1}\n\n" +
  ":\n" +
  "id: 2\r\nevent: chunk\r\ndata: line one\r\ndata: line two\r\n\r\n" +
  "event: heartbeat\rdata: {}\r\r" +
  "id: 3\ndata:no space\n\n";

function parseAll(pieces) {
  const parser = new SSEParser();
  const messages = pieces.flatMap((piece) => parser.push(piece));
  return { parser, messages };
}

const EXPECTED = [
  { event: "job_started", data: '{"seq":1}', id: "1" },
  { event: "chunk", data: "line one\nline two", id: "2" },
  { event: "heartbeat", data: "{}", id: "2" },
  { event: "message", data: "no space", id: "3" },
];

test("a whole stream: events, ids, multi-line data, comments, retry, all line endings", () => {
  const { parser, messages } = parseAll([STREAM]);
  assert.deepEqual(messages, EXPECTED);
  assert.equal(parser.retryMs, 3000);
  assert.equal(parser.commentChars, 103 + 2);
});

test("split at every position (a CR LF across two reads included): the same messages", () => {
  for (let i = 0; i <= STREAM.length; i++) {
    const { messages } = parseAll([STREAM.slice(0, i), STREAM.slice(i)]);
    assert.deepEqual(messages, EXPECTED, `split at ${i}`);
  }
});

test("one character at a time: the same messages", () => {
  assert.deepEqual(parseAll([...STREAM]).messages, EXPECTED);
});

test("an unfinished event is not dispatched until its blank line", () => {
  const parser = new SSEParser();
  assert.deepEqual(parser.push("id: 7\ndata: {}\n"), []);
  assert.deepEqual(parser.push("\n"), [{ event: "message", data: "{}", id: "7" }]);
});

test("a block with no data (only a comment or an id) dispatches nothing", () => {
  const parser = new SSEParser();
  assert.deepEqual(parser.push(": pad\n\nid: 5\n\n"), []);
  assert.equal(parser.lastEventId, "5");
});
