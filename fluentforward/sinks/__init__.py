"""Destinations for records read from the spool.

A sink receives ``LokiEntry`` values: a record already shaped for Loki (labels, line, structured
metadata). Shaping is pure code in ``fluentforward.records``; sinks only batch, encode and send. (The
shipper's hot path skips the ``LokiEntry``: ``records.Shaper.encode_events`` writes entries already
encoded into a ``loki.PushBuffer``.)
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["LokiEntry"]


class LokiEntry(NamedTuple):
    """One log line on its way to Loki (an immutable value).

    A named tuple rather than an attrs class: one is built for every record delivered, and a tuple
    is built in a third of the time of a frozen attrs instance (``python -m bench.micro``).

    Attributes:
        labels: the stream's index labels as (name, value) pairs, sorted by name, names valid for Loki.
        time_ns: the event time in Unix nanoseconds.
        line: the log line (valid UTF-8 text: never a lone surrogate).
        structured_metadata: (name, value) pairs, string values only (``trace_id``, ``span_id``, ...).
        tenant: the X-Scope-OrgID for this entry, or None for the sink's default tenant.
    """

    labels: tuple[tuple[str, str], ...]
    time_ns: int
    line: str
    structured_metadata: tuple[tuple[str, str], ...] = ()
    tenant: str | None = None
