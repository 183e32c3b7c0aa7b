"""Trace and span ids in every spelling, normalized to W3C hex (pure: no I/O)."""

from __future__ import annotations

import attrs

__all__ = ["TraceContext"]


@attrs.frozen(kw_only=True)
class TraceContext:
    """A normalized trace context found in a record.

    Attributes:
        trace_id: 32 lowercase hex characters, never all zero.
        span_id: 16 lowercase hex characters, never all zero, or None.
        source: where the ids came from: the field name as found (``trace_id``, ``dd.trace_id``,
            ``traceparent``...) or a format tag such as ``log:json``, ``log:text``, ``metadata:otlp``.
            Used as a metrics label, so it is bounded: one of a fixed set of names per rule set.
    """

    trace_id: str
    span_id: str | None
    source: str
