"""The Python client of Flushline: watch jobs, and publish your own backend's progress.

Watch a job (every event once, in order, resuming across dropped connections)::

    from flushline_client import create_job, stream_url, watch_job

    job = await create_job("http://localhost:8080", pipeline="chat", input={"prompt": "Hi"})
    async for event in watch_job(stream_url("http://localhost:8080", job)):
        print(event.seq, event.type, event.data)

Publish the progress of a job that runs in your own process (:class:`Publisher` for
asyncio code, :class:`SyncPublisher` for threads and blocking code)::

    from flushline_client import SyncPublisher, create_external_job_sync

    job = create_external_job_sync("http://localhost:8080", ["research", "write"])
    with SyncPublisher("http://localhost:8080", job.id, job.publish_token) as pub:
        pub.step_started("research")
        pub.progress("research", 50)
        ...
        pub.succeeded({"answer": "..."})

With auth on (``FLUSHLINE_API_TOKEN`` set on the service), pass ``token=`` (the API
token) to the job calls: it goes out as ``Authorization: Bearer``. ``stream_url`` is the
snapshot's ``links.stream``, which then carries the job's signed stream token; a watch
given ``token=`` too keeps working once that stream token has expired. A publisher needs
only the job's ``publish_token``.

The package depends on ``aiohttp`` alone and never imports the service.
"""

from __future__ import annotations

from flushline_client.errors import (
    ClientError,
    JobCancelled,
    JobFinished,
    ProducerSeqGap,
    PublisherClosed,
    PublishFailed,
    StreamLost,
)
from flushline_client.jobs import (
    ExternalJob,
    StepSpec,
    cancel_job,
    create_external_job,
    create_job,
    get_job,
    stream_url,
)
from flushline_client.publisher import PublishAck, Publisher, PublisherStats
from flushline_client.sse import SSEMessage, SSEParser
from flushline_client.sync import SyncPublisher, create_external_job_sync
from flushline_client.watch import (
    MAX_ATTEMPTS,
    MAX_RETRY_WAIT_S,
    READ_TIMEOUT_S,
    JobEvent,
    watch_job,
)

__all__ = [
    "MAX_ATTEMPTS",
    "MAX_RETRY_WAIT_S",
    "READ_TIMEOUT_S",
    "ClientError",
    "ExternalJob",
    "JobCancelled",
    "JobEvent",
    "JobFinished",
    "ProducerSeqGap",
    "PublishAck",
    "PublishFailed",
    "Publisher",
    "PublisherClosed",
    "PublisherStats",
    "SSEMessage",
    "SSEParser",
    "StepSpec",
    "StreamLost",
    "SyncPublisher",
    "cancel_job",
    "create_external_job",
    "create_external_job_sync",
    "create_job",
    "get_job",
    "stream_url",
    "watch_job",
]

__version__ = "0.1.0"
