"""The Fluent Forward protocol, sans-IO: bytes in, events out; commands in, bytes out.

Nothing in this package imports trio or does I/O (a test enforces it). The public surface is what
``__all__`` lists; the ``_modules`` behind it may change.
"""

from __future__ import annotations

from fluentforward.protocol._auth import SharedKeyAuth
from fluentforward.protocol._connection import ServerConnection, State
from fluentforward.protocol._decode import (
    DecodedFrame,
    EventParts,
    Mode,
    RequestInfo,
    decode_frame,
    validate_request,
)
from fluentforward.protocol._events import (
    Ack,
    EntriesReceived,
    Entry,
    Event,
    HandshakeCompleted,
    HandshakeFailed,
    Heartbeat,
    Signal,
)
from fluentforward.protocol._eventtime import event_time
from fluentforward.protocol._limits import DEFAULT_LIMITS, STORED_LIMITS, Limits

__all__ = [
    "DEFAULT_LIMITS",
    "STORED_LIMITS",
    "Ack",
    "DecodedFrame",
    "EntriesReceived",
    "Entry",
    "Event",
    "EventParts",
    "HandshakeCompleted",
    "HandshakeFailed",
    "Heartbeat",
    "Limits",
    "Mode",
    "RequestInfo",
    "ServerConnection",
    "SharedKeyAuth",
    "Signal",
    "State",
    "decode_frame",
    "event_time",
    "validate_request",
]
