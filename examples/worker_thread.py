"""A blocking worker whose agent runs in a thread and publishes through ``SyncPublisher``.

The shape of most backends: the request handler (here, ``main``) hands the work to a
thread and goes on; the thread reports as it works, exactly where the seed's code called
``stream_manager.emit_from_thread(...)``. It needs only the client distribution
(``pip install ./clients/python``)::

    flushline serve &
    python examples/worker_thread.py --url http://127.0.0.1:8080
    # prints the job id and the page to watch it: http://127.0.0.1:8080/?job=ID

``--job`` and ``--publish-token`` publish to a job created elsewhere. Exit status: 0 when
the job succeeded, 3 when it was cancelled (the agent stops at its next report), 1 on an
error (published as the job's ``failed``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

from flushline_client import JobCancelled, SyncPublisher, create_external_job_sync

STEPS = ("research", "outline", "draft", "review")
#: Reports per step (tokens with their text, then the step's percentage).
REPORTS = 10
TOKENS_PER_REPORT = 20


def agent(pub: SyncPublisher, step_s: float) -> None:
    """Four steps of pretend work, each reporting tokens, text, progress and a status line."""
    for step in STEPS:
        pub.step_started(step)
        pub.insight(f"Working on the {step}...")
        for report in range(1, REPORTS + 1):
            time.sleep(step_s / REPORTS)  # the real work: a model call, a query, a render
            pub.tokens(step, TOKENS_PER_REPORT, f"{step} {report}. ")
            pub.progress(step, 100 * report // (REPORTS + 1))
        pub.step_completed(step)
    pub.succeeded({"steps": list(STEPS), "words": len(STEPS) * REPORTS * 2})


def main(argv: list[str] | None = None) -> int:
    """Create the job (or take the one given), run the agent in a thread, wait for it."""
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
        steps = [{"name": step, "expected_tokens": REPORTS * TOKENS_PER_REPORT} for step in STEPS]
        job = create_external_job_sync(base_url, steps, token=os.environ.get("FLUSHLINE_API_TOKEN"))
        job_id, publish_token = job.id, job.publish_token
    print(json.dumps({"job": job_id, "page": f"{base_url}/?job={job_id}"}), flush=True)

    outcome = {"status": 1}

    def cancelled() -> None:
        # Called from the publisher's thread as the cancel arrives: a real worker would
        # abort its blocking call here (close the model's stream, set an event).
        print("the job was cancelled", file=sys.stderr, flush=True)

    def work() -> None:
        try:
            # Leaving the block by an exception publishes `failed` with its text.
            with SyncPublisher(base_url, job_id, publish_token, on_cancel=cancelled) as pub:
                agent(pub, args.step_seconds)
            outcome["status"] = 0
        except JobCancelled:  # from the agent's next report after the cancel
            print("the agent stopped", file=sys.stderr, flush=True)
            outcome["status"] = 3
        except Exception as exc:
            print(f"the agent failed: {exc}", file=sys.stderr, flush=True)

    worker = threading.Thread(target=work, name="agent")
    worker.start()
    worker.join()
    return outcome["status"]


if __name__ == "__main__":
    sys.exit(main())
