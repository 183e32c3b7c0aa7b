"""Fluent EventTime (msgpack ext type 0) <-> integer Unix nanoseconds.

EventTime is ``uint32 BE seconds | uint32 BE nanoseconds`` in a fixext8 (``d7 00``) or an ext8 with
length 8 (``c7 08 00``); msgpack decodes both to the same ``ExtType(0, data)``. Fluent Bit marks OTLP
group boundaries with seconds 0xFFFFFFFF (start) and 0xFFFFFFFE (end): int32 -1 and -2 on its side.
"""

from __future__ import annotations

import struct

import msgpack

__all__ = [
    "EVENT_TIME_CODE",
    "GROUP_END_SECONDS",
    "GROUP_START_SECONDS",
    "event_time",
    "event_time_parts",
]

EVENT_TIME_CODE = 0
GROUP_START_SECONDS = 0xFFFFFFFF
GROUP_END_SECONDS = 0xFFFFFFFE
_NS = 1_000_000_000
_PAIR = struct.Struct(">II")


def event_time(time_ns: int) -> msgpack.ExtType:
    """Encode Unix nanoseconds as an EventTime ext value (packs as fixext8).

    Raises:
        ValueError: if the time does not fit EventTime's unsigned 32-bit seconds.
    """
    seconds, nanos = divmod(time_ns, _NS)
    if not 0 <= seconds <= 0xFFFFFFFF:
        msg = f"time {time_ns} ns is outside EventTime's range"
        raise ValueError(msg)
    return msgpack.ExtType(EVENT_TIME_CODE, _PAIR.pack(seconds, nanos))


def event_time_parts(data: bytes) -> tuple[int, int]:
    """Return (seconds, nanoseconds) of an EventTime payload; the caller checked ``len(data) == 8``."""
    seconds, nanos = _PAIR.unpack(data)
    return seconds, nanos
