"""A worker that publishes its progress to Flushline with nothing but the standard library.

Any language can do the same: two requests. The first creates an external job (with the API
token when the service has auth on) and gets the job's ``publish_token``; the second,
repeated, publishes batches of producer events with it. Each batch carries
``producer_seq`` (1, 2, 3...); a batch whose answer was lost is sent again with the same
number and the service publishes it once. A ``409`` answer means the job has ended
(cancelled from the page or the API): the worker stops.

Run it against a service on localhost::

    flushline serve &
    python examples/worker_urllib.py --url http://127.0.0.1:8080
    # prints the job id and the page to watch it: http://127.0.0.1:8080/?job=ID

Exit status: 0 when the job succeeded, 3 when it was cancelled, 1 on any other error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

STEPS = ("research", "outline", "draft", "review")
#: Posting one batch again after a lost answer: this many tries, waiting this long at first.
TRIES = 8
FIRST_BACKOFF_S = 0.2


class JobEnded(Exception):
    """The service answered 409: the job was cancelled or has ended otherwise."""

    def __init__(self, status: str) -> None:
        super().__init__(f"the job has ended: {status}")
        self.status = status


def request(url: str, body: dict[str, Any], token: str | None) -> tuple[int, dict[str, Any]]:
    """POST ``body`` as JSON; the status and the JSON answer (error answers included)."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read() or b"{}")


class Producer:
    """Publishes batches of producer events to one job, each ``producer_seq`` once."""

    def __init__(self, base_url: str, job_id: str, publish_token: str) -> None:
        self.url = f"{base_url}/api/jobs/{job_id}/events"
        self.token = publish_token
        self.seq = 1

    def publish(self, *events: dict[str, Any]) -> None:
        """Send ``events`` as the next batch; retried with the same ``producer_seq``."""
        body = {"producer_seq": self.seq, "events": list(events)}
        for attempt in range(TRIES):
            try:
                status, answer = request(self.url, body, self.token)
            except (urllib.error.URLError, TimeoutError, ConnectionError):
                status, answer = 0, {}  # no answer: the batch may have landed, send it again
            if status == 200:  # "duplicate": true too: an earlier try had landed
                self.seq += 1
                return
            error = answer.get("error", {})
            if status == 409 and error.get("code") == "job_finished":
                raise JobEnded(error.get("status", "finished"))
            if status not in (0, 429, 500, 502, 503, 504):
                raise RuntimeError(f"publish refused: HTTP {status} {error}")
            time.sleep(FIRST_BACKOFF_S * 2**attempt)
        raise RuntimeError(f"batch {self.seq} undelivered after {TRIES} tries")


def run(producer: Producer, step_s: float) -> None:
    """A pretend agent: four steps, each reporting tokens with their text and its progress."""
    for step in STEPS:
        producer.publish(
            {"type": "step_started", "step": step},
            {"type": "insight", "text": f"Working on the {step}..."},
        )
        for tenth in range(1, 11):
            time.sleep(step_s / 10)
            producer.publish(
                {"type": "tokens", "step": step, "count": 20, "text": f"{step} part {tenth}. "},
                {"type": "progress", "step": step, "pct": tenth * 10 - 1},
            )
        producer.publish({"type": "step_completed", "step": step})
    producer.publish({"type": "succeeded", "result": {"steps": list(STEPS)}})


def main(argv: list[str] | None = None) -> int:
    """Create an external job (or take one given), publish the agent's progress to it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="the Flushline service")
    parser.add_argument("--step-seconds", type=float, default=2.0, help="how long a step takes")
    parser.add_argument("--job", help="publish to this job (with --publish-token)")
    parser.add_argument("--publish-token", help="the job's publish_token")
    args = parser.parse_args(argv)
    base_url = args.url.rstrip("/")
    if args.job and args.publish_token:
        job_id, publish_token = args.job, args.publish_token
    else:
        steps = [{"name": step, "expected_tokens": 200} for step in STEPS]
        status, job = request(
            f"{base_url}/api/jobs",
            {"pipeline": "external", "steps": steps},
            os.environ.get("FLUSHLINE_API_TOKEN"),
        )
        if status != 201:
            print(f"creating the job failed: HTTP {status} {job}", file=sys.stderr)
            return 1
        job_id, publish_token = job["id"], job["publish_token"]
    print(json.dumps({"job": job_id, "page": f"{base_url}/?job={job_id}"}), flush=True)
    producer = Producer(base_url, job_id, publish_token)
    try:
        run(producer, args.step_seconds)
    except JobEnded as ended:
        print(f"stopped: {ended}", file=sys.stderr)
        return 3 if ended.status == "cancelled" else 1
    except Exception as exc:
        print(f"failed: {exc}", file=sys.stderr)
        # Out of reach, the service ends the job producer_lost on its own.
        with contextlib.suppress(Exception):
            producer.publish({"type": "failed", "error": str(exc)})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
