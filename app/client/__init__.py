"""The Python client, as the service uses it: a re-export of :mod:`flushline_client`.

The code lives in the client's own distribution (``clients/python``, import name
``flushline_client``), which the service's setup.py ships too; this module keeps
``from app.client import ...`` working for ``flushline watch`` and the tests. Code outside
the service should import ``flushline_client``: a project whose own package is named
``app`` (FastAPI's convention) could not import this one.
"""

from __future__ import annotations

from flushline_client import (
    MAX_ATTEMPTS,
    MAX_RETRY_WAIT_S,
    READ_TIMEOUT_S,
    ClientError,
    ExternalJob,
    JobCancelled,
    JobEvent,
    JobFinished,
    ProducerSeqGap,
    PublishAck,
    Publisher,
    PublisherClosed,
    PublisherStats,
    PublishFailed,
    StreamLost,
    SyncPublisher,
    cancel_job,
    create_external_job,
    create_external_job_sync,
    create_job,
    get_job,
    stream_url,
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
