# ruff: noqa: INP001 - a stand-alone example program, not part of a package
"""Log JSON lines with structlog and put the OpenTelemetry trace context on each line.

A structlog processor adds ``trace_id`` and ``span_id`` (W3C lowercase hex, as the article formats them)
whenever a span is active, so no call site has to pass them. fluentforward reads the fields from the
record Fluent Bit forwards and ships them to Loki as structured metadata.

    pip install structlog opentelemetry-sdk && python app.py
"""

from __future__ import annotations

from typing import Any

import structlog
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider


def add_trace_context(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Add the active span's ids; outside a valid span add nothing (all-zero ids are not ids)."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event_dict["trace_id"] = format(context.trace_id, "032x")
        event_dict["span_id"] = format(context.span_id, "016x")
        event_dict["trace_flags"] = format(context.trace_flags, "02x")
    return event_dict


structlog.configure(
    processors=[
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_trace_context,
        structlog.processors.JSONRenderer(),  # one JSON object per line on stdout
    ]
)
# Add a BatchSpanProcessor with an OTLP exporter to send the spans to Tempo; ids are generated either way.
trace.set_tracer_provider(TracerProvider())
tracer = trace.get_tracer("shop.orders")
logger = structlog.get_logger()


def process_order(order_id: str) -> None:
    """Handle one order inside a span; every line logged here carries its trace context."""
    with tracer.start_as_current_span("process_order"):
        logger.info("processing_order", order_id=order_id)
        logger.info("order_processed", order_id=order_id)


if __name__ == "__main__":
    process_order("o-1001")
    logger.info("outside_any_request")  # no trace fields
