"""The durable spool: every acked frame is here before its ack is sent.

Public surface: ``Spool`` (open, append, run), ``SpoolSettings``, ``Position``, ``read_frames`` and
``list_segments`` for readers, and the format's ``FrameHeader`` / ``StoredFrame``.
"""

from __future__ import annotations

from fluentforward.spool._format import FrameHeader, ScanEnd, StoredFrame
from fluentforward.spool._store import (
    DEFAULT_DEDUP_CAPACITY,
    DEFAULT_SEGMENT_BYTES,
    DEFAULT_SPOOL_MAX_BYTES,
    AppendResult,
    LatencyHistogram,
    Position,
    Spool,
    SpoolSettings,
    list_segments,
    read_frames,
    segment_path,
    spool_dirs,
)

__all__ = [
    "DEFAULT_DEDUP_CAPACITY",
    "DEFAULT_SEGMENT_BYTES",
    "DEFAULT_SPOOL_MAX_BYTES",
    "AppendResult",
    "FrameHeader",
    "LatencyHistogram",
    "Position",
    "ScanEnd",
    "Spool",
    "SpoolSettings",
    "StoredFrame",
    "list_segments",
    "read_frames",
    "segment_path",
    "spool_dirs",
]
