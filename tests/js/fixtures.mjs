// Recorded arrival patterns: what flushline.js saw in Chromium through each path of issue 6,
// with the service on its default settings (written by `python -m bench.client_paths
// --record tests/js/fixtures`). `<path>-unsensed.json`: sensing off, the path's effect on
// the default stream; `<path>.json`: sensing on, each connection the client opened.
import { readFileSync } from "node:fs";

const DIR = new URL("./fixtures/", import.meta.url);

/** The recording of one path: {path, sensing, choice, connections, decisions}. */
export function recording(name) {
  const data = JSON.parse(readFileSync(new URL(`${name}.json`, DIR), "utf8"));
  // The page records a connection whenever state.arrivals changes; the initial empty
  // array (before the first request) is not a connection.
  data.connections = data.connections.filter((c) => c.requestedAt !== null && c.arrivals.length);
  return data;
}

/** The first stream connection of a path with sensing off. */
export function unsensed(name) {
  const connections = recording(`${name}-unsensed`).connections;
  if (connections.length !== 1) throw new Error(`${name}: expected one connection`);
  return connections[0];
}
