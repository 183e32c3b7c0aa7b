"""Reading records back out of the spool (delivery path, ``spool cat``, ``replay``).

A stored frame decodes into entries with ``decode_frame``; this module adds what the server recorded
beside the frame (the effective tag, the peer address under ``source_key``) and filters by time and
tag. It never changes what is stored.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs

from fluentforward.errors import RemoteProtocolError
from fluentforward.protocol import STORED_LIMITS, Entry, EventParts, Limits, Signal, decode_frame
from fluentforward.spool import Position, ScanEnd, StoredFrame, read_frames

__all__ = ["RecordFilter", "SpooledRecord", "entries_of", "events_of", "iter_records"]


@attrs.frozen(kw_only=True)
class SpooledRecord:
    """One log record read from the spool, with the frame it came from."""

    tag: str
    entry: Entry
    frame: StoredFrame


@attrs.frozen(kw_only=True)
class RecordFilter:
    """Which records to keep: event time in [since_ns, until_ns) and tag matching a glob."""

    since_ns: int | None = None
    until_ns: int | None = None
    tag_glob: str | None = None
    _tag_re: re.Pattern[str] | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        if self.tag_glob is not None:
            object.__setattr__(self, "_tag_re", re.compile(fnmatch.translate(self.tag_glob)))

    def tag_ok(self, tag: str) -> bool:
        """True when the tag matches the glob (or there is none)."""
        return self._tag_re is None or self._tag_re.match(tag) is not None

    def time_ok(self, time_ns: int) -> bool:
        """True when the time is inside the window."""
        if self.since_ns is not None and time_ns < self.since_ns:
            return False
        return self.until_ns is None or time_ns < self.until_ns


def events_of(frame: StoredFrame, limits: Limits = STORED_LIMITS) -> list[EventParts]:
    """Decode a stored log frame into ``(time_ns, record, metadata, group)`` events, adding the peer
    address to each record when the server was told to (``--source-address-key``).

    Raises:
        RemoteProtocolError: the stored bytes are not valid Forward (only possible for a spool written
            by another program, since the server validated every frame before storing it).
    """
    if frame.header.signal is not Signal.LOGS:
        return []
    events = decode_frame(frame.raw, limits).events
    key = frame.header.source_key
    if key:
        peer = frame.header.peer
        events = [(t, {**record, key: peer}, m, g) for t, record, m, g in events]
    return events


def entries_of(frame: StoredFrame, limits: Limits = STORED_LIMITS) -> list[Entry]:
    """``events_of`` as ``Entry`` values.

    Raises:
        RemoteProtocolError: as ``events_of``.
    """
    return [Entry(time_ns=t, record=r, metadata=m, group=g) for t, r, m, g in events_of(frame, limits)]


def iter_records(
    directory: Path,
    record_filter: RecordFilter | None = None,
    *,
    start: Position | None = None,
    on_bad_segment: Callable[[Path, ScanEnd], None] | None = None,
    on_bad_frame: Callable[[StoredFrame, RemoteProtocolError], None] | None = None,
) -> Iterator[SpooledRecord]:
    """Yield the log records of a spool directory in stored order, filtered."""
    wanted = record_filter or RecordFilter()
    for frame in read_frames(directory, start, on_bad=on_bad_segment):
        if not wanted.tag_ok(frame.header.tag):
            continue
        try:
            entries = entries_of(frame)
        except RemoteProtocolError as exc:
            if on_bad_frame is not None:
                on_bad_frame(frame, exc)
            continue
        for entry in entries:
            if wanted.time_ok(entry.time_ns):
                yield SpooledRecord(tag=frame.header.tag, entry=entry, frame=frame)
