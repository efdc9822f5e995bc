"""``flushline probe URL``: measure how the path to a Flushline service delivers a stream."""

from app.pathtools.probe.analysis import (
    COMPRESSION_SETTINGS,
    DEFAULT_LATENCY_BUDGET_MS,
    MIN_FIRST_WRITE_BYTES,
    STREAMING_SETTINGS,
    Fix,
    PathKind,
    ProbeError,
    ProbeReport,
    Read,
    analyse,
    configure_parser,
    probe_pattern,
    report_json,
    run_from_args,
    run_probe,
)

__all__ = [
    "COMPRESSION_SETTINGS",
    "DEFAULT_LATENCY_BUDGET_MS",
    "MIN_FIRST_WRITE_BYTES",
    "STREAMING_SETTINGS",
    "Fix",
    "PathKind",
    "ProbeError",
    "ProbeReport",
    "Read",
    "analyse",
    "configure_parser",
    "probe_pattern",
    "report_json",
    "run_from_args",
    "run_probe",
]
