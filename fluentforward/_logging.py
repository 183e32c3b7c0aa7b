"""structlog configuration: JSON lines in production, a readable console on a terminal.

Every log line is an event name in snake_case plus key-value pairs. Connection handlers bind ``peer``
and ``conn_id`` through contextvars, so every line about a connection names the peer.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
import structlog

__all__ = ["LOG_LEVELS", "configure_logging"]

LOG_LEVELS = ("debug", "info", "warning", "error")


def _orjson_dumps(event: dict[str, Any], **_: Any) -> str:
    return orjson.dumps(event, default=str).decode()


def _stderr_logger(*_args: Any) -> structlog.WriteLogger:
    # One write per line, newline included: the server, its workers and its delivery processes share
    # one stderr, and PrintLogger's print() writes the newline separately, so another process's line
    # could land between an event and its newline (two JSON objects on one line for a log shipper).
    return structlog.WriteLogger(sys.stderr)


def configure_logging(*, json: bool | None = None, level: str = "info") -> None:
    """Set up structlog for the process.

    Args:
        json: True for JSON lines, False for the console renderer, None to pick JSON unless stderr is a
            terminal.
        level: the minimum level name (``debug``, ``info``, ``warning``, ``error``).
    """
    use_json = (not sys.stderr.isatty()) if json is None else json
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_orjson_dumps)
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        # Looked up per logger, not bound once: tests and embedding code swap sys.stderr.
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
