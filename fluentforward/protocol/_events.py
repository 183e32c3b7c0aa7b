"""Events the sans-IO Forward core emits (facts) and the commands it accepts (nouns).

Values are attrs-frozen. Decoded msgpack follows one convention everywhere in fluentforward:
msgpack ``str`` becomes ``str`` (invalid UTF-8 is kept losslessly as lone surrogates, PEP 383
``surrogateescape``), msgpack ``bin`` becomes ``bytes``. Map keys are usually ``str`` but may be
``bytes`` when a peer sent them as ``bin``.
"""

from __future__ import annotations

import enum
from typing import Any

import attrs

__all__ = [
    "Ack",
    "EntriesReceived",
    "Entry",
    "Event",
    "HandshakeCompleted",
    "HandshakeFailed",
    "Heartbeat",
    "Signal",
]


class Signal(enum.IntEnum):
    """What a frame carries (option ``fluent_signal``; absent means logs)."""

    LOGS = 0
    METRICS = 1
    TRACES = 2


@attrs.frozen(kw_only=True)
class Entry:
    """One log event: its time, its record map and its Fluent Bit v2 metadata map (``{}`` if none)."""

    time_ns: int
    record: dict[Any, Any]
    metadata: dict[Any, Any] = attrs.field(factory=dict)
    # For events inside a Fluent Bit OTLP group (in_opentelemetry -> out_forward): the group-start
    # record, i.e. ``{"resource": {"attributes": {...}, ...}, "scope": {...}}``. None otherwise.
    group: dict[Any, Any] | None = None


class Event:
    """Base class of everything ``ServerConnection.receive_data`` returns."""

    __slots__ = ()


@attrs.frozen(kw_only=True)
class EntriesReceived(Event):
    """A complete, validated data frame.

    Attributes:
        tag: the frame's tag.
        signal: logs, metrics or traces (metrics and traces are spooled and acked, never decoded).
        record_count: number of events in the frame (for logs: entries after validation).
        raw: the frame exactly as received; this is what the spool keeps.
        chunk: set when the client expects ``{"ack": chunk}``; echoed byte for byte.
        offset: byte offset of the frame in the connection's input stream.
        mode: the carrier mode (``message``, ``forward``, ``packed``, ``compressed``).
    """

    tag: str
    signal: Signal
    record_count: int
    raw: bytes
    chunk: str | None
    offset: int
    mode: str = "forward"


@attrs.frozen(kw_only=True)
class Heartbeat(Event):
    """A msgpack ``nil`` on TCP (ignored by the server, reported for counting)."""


@attrs.frozen(kw_only=True)
class HandshakeCompleted(Event):
    """The peer's PING verified; PONG true is queued; data may flow."""

    client_hostname: str
    username: str


@attrs.frozen(kw_only=True)
class HandshakeFailed(Event):
    """The peer's PING failed; PONG false is queued and the connection is closed."""

    reason: str


@attrs.frozen(kw_only=True)
class Ack:
    """Command: acknowledge a durable chunk with ``{"ack": chunk}``."""

    chunk: str
