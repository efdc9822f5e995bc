"""``flushline probe URL``: measure how the path to a Flushline service delivers a stream.

The probe reads ``/api/diagnostics/stream`` (see ``app.web.diagnostics``) through whatever
sits between the user and the service, works out from *when* and *how many* bytes
arrived what kind of path it is (:class:`PathKind`) and what fixes it (:class:`Fix`), and
prints the settings to use, or the fix (long-polling, or the proxy's setting, with its
configuration lines) when no setting of ours can help.

``pattern`` is what the probe asks the service to send, ``reader`` reads it through the
path, ``analysis`` infers the path from the reads (a pure function), ``report`` holds the
findings and renders them, ``advice`` the fixes and each proxy's configuration lines,
``command`` the command line.
"""

from app.pathtools.probe.advice import COMPRESSION_SETTINGS, STREAMING_SETTINGS, Fix
from app.pathtools.probe.analysis import Read, analyse
from app.pathtools.probe.command import configure_parser, run_from_args
from app.pathtools.probe.pattern import MIN_FIRST_WRITE_BYTES, probe_pattern
from app.pathtools.probe.reader import ProbeError, run_probe
from app.pathtools.probe.report import DEFAULT_LATENCY_BUDGET_MS, PathKind, ProbeReport, report_json

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
