"""The job API: create a job (built-in or external), read it, cancel it, find its stream."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urljoin

import aiohttp

from flushline_client._http import call

__all__ = [
    "ExternalJob",
    "StepSpec",
    "cancel_job",
    "create_external_job",
    "create_job",
    "get_job",
    "stream_url",
]

#: A declared step of an external job: its name, or ``{"name": ..., "expected_tokens": N}``.
StepSpec = str | Mapping[str, Any]


async def create_job(
    base_url: str,
    *,
    pipeline: str | None = None,
    input: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    strategy: str | None = None,
    session: aiohttp.ClientSession | None = None,
    headers: Mapping[str, str] | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    """``POST {base_url}/api/jobs``; the new job's snapshot, or :class:`ClientError`.

    ``token``: the API token, sent as ``Authorization: Bearer`` (needed when the service
    has auth on).
    """
    body: dict[str, Any] = {}
    for key, value in (
        ("pipeline", pipeline),
        ("input", input),
        ("options", options),
        ("strategy", strategy),
    ):
        if value is not None:
            body[key] = value
    url = base_url.rstrip("/") + "/api/jobs"
    return await call("POST", url, 201, session=session, headers=headers, token=token, body=body)


async def get_job(
    base_url: str,
    job_id: str,
    *,
    session: aiohttp.ClientSession | None = None,
    headers: Mapping[str, str] | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    """``GET {base_url}/api/jobs/{job_id}``: the job's snapshot, or :class:`ClientError`."""
    url = f"{base_url.rstrip('/')}/api/jobs/{job_id}"
    return await call("GET", url, 200, session=session, headers=headers, token=token)


async def cancel_job(
    base_url: str,
    job_id: str,
    *,
    session: aiohttp.ClientSession | None = None,
    headers: Mapping[str, str] | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    """``POST {base_url}/api/jobs/{job_id}/cancel``: the snapshot (``202``), else
    :class:`ClientError` (``409`` once the job has ended)."""
    url = f"{base_url.rstrip('/')}/api/jobs/{job_id}/cancel"
    return await call("POST", url, 202, session=session, headers=headers, token=token)


def stream_url(base_url: str, snapshot: Mapping[str, Any]) -> str:
    """The absolute stream URL of a job ``snapshot`` from ``base_url``: its ``links.stream``,
    with the stream token the service put in its query when auth is on."""
    return urljoin(base_url.rstrip("/") + "/", str(snapshot["links"]["stream"]))


@dataclasses.dataclass(frozen=True)
class ExternalJob:
    """A job created for a producer of your own: what it needs to publish, and the links to
    hand to watchers."""

    id: str
    #: The job's publish secret (``Authorization: Bearer`` on its events): keep it private.
    publish_token: str
    #: ``links`` of the snapshot, as the service gave them (relative; with auth on the
    #: stream and events links carry the job's stream token).
    links: Mapping[str, str]
    #: The whole ``201`` body.
    snapshot: Mapping[str, Any]
    base_url: str

    @property
    def stream_url(self) -> str:
        """The absolute URL of the job's stream, for ``EventSource`` or :func:`watch_job`."""
        return stream_url(self.base_url, self.snapshot)


def _step_body(step: StepSpec) -> dict[str, Any]:
    if isinstance(step, str):
        return {"name": step}
    return dict(step)


async def create_external_job(
    base_url: str,
    steps: Sequence[StepSpec],
    *,
    token: str | None = None,
    strategy: str | None = None,
    session: aiohttp.ClientSession | None = None,
    headers: Mapping[str, str] | None = None,
) -> ExternalJob:
    """``POST {base_url}/api/jobs`` with ``"pipeline": "external"`` and the declared
    ``steps`` (names, or ``{"name", "expected_tokens"}`` mappings): a job that Flushline
    does not run, waiting for its producer. ``token``: the API token when auth is on.
    """
    body: dict[str, Any] = {"pipeline": "external", "steps": [_step_body(s) for s in steps]}
    if strategy is not None:
        body["strategy"] = strategy
    url = base_url.rstrip("/") + "/api/jobs"
    snapshot = await call(
        "POST", url, 201, session=session, headers=headers, token=token, body=body
    )
    return ExternalJob(
        id=str(snapshot["id"]),
        publish_token=str(snapshot["publish_token"]),
        links=dict(snapshot["links"]),
        snapshot=snapshot,
        base_url=base_url,
    )
