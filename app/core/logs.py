"""Logging configuration: once, at start-up, for structlog and the standard library alike.

On a TTY the console renderer; otherwise one JSON object per line with the fields
Google Cloud Logging reads (``severity``, ``message``, ``time``). ``job_id`` and
``request_id`` come from contextvars bound by the middleware and the job runner.

Every record goes through one stdlib handler whose formatter is structlog's
``ProcessorFormatter``, so aiohttp's, asyncio's and Python's own warnings render exactly
like Flushline's lines: in JSON mode a traceback is the ``exception`` field of its line,
never lines of its own, and an uncaught exception is logged the same way.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import MutableMapping
from types import TracebackType
from typing import Any

import orjson
import structlog

__all__ = ["configure_logging"]

_SEVERITY = {
    "debug": "DEBUG",
    "info": "INFO",
    "warning": "WARNING",
    "warn": "WARNING",
    "error": "ERROR",
    "exception": "ERROR",
    "critical": "CRITICAL",
}

_log = structlog.get_logger(__name__)


def _cloud_logging_fields(
    _logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    event_dict["severity"] = _SEVERITY.get(method_name, "DEFAULT")
    event_dict["message"] = event_dict.pop("event", "")
    return event_dict


def _dumps(obj: Any, **_: Any) -> str:
    return orjson.dumps(obj, default=str).decode()


def _log_uncaught(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    """``sys.excepthook`` in JSON mode: the traceback as one log line, not raw lines."""
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    _log.critical("uncaught exception", exc_info=(exc_type, exc, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    """``threading.excepthook`` in JSON mode."""
    if args.exc_value is None:
        return
    _log.critical(
        "uncaught exception in thread",
        thread=args.thread.name if args.thread else None,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


def configure_logging(level: str = "info", fmt: str = "auto") -> str:
    """Configure structlog and route stdlib logging through it; return ``json`` or ``console``.

    ``fmt``: ``auto`` (console on a TTY, else JSON), ``json`` or ``console``.
    """
    use_console = sys.stderr.isatty() if fmt == "auto" else fmt == "console"
    level_no = logging.getLevelName(level.upper())
    # Run for structlog's own lines and for stdlib records (aiohttp, asyncio, warnings).
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
    ]
    renderer: list[Any]
    if use_console:
        renderer = [structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
    else:
        renderer = [
            structlog.processors.format_exc_info,
            _cloud_logging_fields,
            structlog.processors.JSONRenderer(serializer=_dumps),
        ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=structlog.stdlib.LoggerFactory(),
        # Not cached: loggers created before configuration (module level) must follow it.
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
        )
    )
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level_no)
    logging.captureWarnings(True)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if use_console:
        return "console"
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread
    return "json"
