"""The agent: a blocking function that reports its progress through a ``SyncPublisher``.

It stands for any long piece of work in a worker thread (an LLM chain, a render, an
import). It writes a short report in four steps, each reporting the tokens it produced
with their text, its progress and a status line, and checks ``pub.cancelled`` between
pieces of work; a publish after a cancel raises ``JobCancelled`` anyway, which ends it.
"""

from __future__ import annotations

import time

from flushline_client import SyncPublisher

#: The job's steps, declared when it is created, with the tokens each is expected to take.
STEPS = (
    ("research", 200),
    ("outline", 100),
    ("draft", 400),
    ("review", 100),
)
#: Pieces of work per step (one publish each).
PIECES = 8


def write_report(pub: SyncPublisher, topic: str, step_s: float) -> dict[str, object]:
    """Run the four steps, publishing as it goes; the report (also published as the result)."""
    sections: dict[str, str] = {}
    for name, expected_tokens in STEPS:
        pub.step_started(name)
        pub.insight(f"{name.capitalize()}: {topic}...")
        text = []
        for piece in range(1, PIECES + 1):
            time.sleep(step_s / PIECES)  # the real work: a model call, a query...
            if pub.cancelled:
                return {"topic": topic, "cancelled": True}
            words = f"{name} of {topic}, part {piece}. "
            text.append(words)
            pub.tokens(name, expected_tokens // PIECES, words)
            pub.progress(name, 100 * piece // (PIECES + 1))
        pub.step_completed(name)
        sections[name] = "".join(text)
    report: dict[str, object] = {"topic": topic, "sections": sections}
    pub.succeeded(report)
    return report
