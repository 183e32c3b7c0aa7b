"""Re-send any part of a spool to Loki or to another Forward receiver (``fluentforward replay``).

Records go through the same decode -> trace ids -> shape path as live delivery, so a fix to the
normalizer also fixes a replay. Replaying twice is safe: Loki drops identical (stream, timestamp, line)
entries, and a Forward target that de-duplicates chunk ids (fluentforward does) recognises the
content-derived chunk ids of a second run. A replay only reads the spool, so it can run while the
server writes to it.
"""

from __future__ import annotations

import collections
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import attrs
import orjson
import structlog
import trio

from fluentforward.errors import RemoteProtocolError
from fluentforward.pipeline import (
    ROUND_BYTES,
    ROUND_RECORDS,
    DeadLetters,
    DeliveryStats,
    RoundShaper,
    Transformer,
    push_and_settle,
)
from fluentforward.reader import RecordFilter, entries_of
from fluentforward.sinks.loki import AnyBatch, LokiSink
from fluentforward.spool import ScanEnd, StoredFrame, list_segments, read_frames, segment_path

__all__ = [
    "PROGRESS_FILE",
    "Progress",
    "ReplayResult",
    "read_progress",
    "replay_to_forward",
    "replay_to_loki",
    "scan_frames",
]

log = structlog.get_logger("fluentforward.replay")

# Frames read from disk per step (in a worker thread), whose Loki entries are pushed together; a step
# also ends at the shipper's round bounds (ROUND_BYTES stored, ROUND_RECORDS records), so memory stays
# bounded whatever the frame size.
READ_FRAMES = 256


@attrs.define
class ReplayResult:
    """What a replay did."""

    records: int = 0
    frames: int = 0
    bytes_read: int = 0
    delivered: int = 0
    rejected: int = 0
    bad_frames: int = 0


PROGRESS_FILE = "replay-progress.json"


def read_progress(directory: Path) -> dict[str, Any] | None:
    """The last replay's progress as written into a spool directory (the server exports it as metrics)."""
    try:
        data: dict[str, Any] = orjson.loads((directory / PROGRESS_FILE).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return data


class Progress:
    """A progress line on a terminal (records, bytes, rate, ETA), and a progress file for metrics.

    The file ``replay-progress.json`` in the spool directory lets a server running on the same spool
    export the replay's progress on ``/metrics``.
    """

    def __init__(
        self,
        total_bytes: int,
        stream: TextIO | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        progress_dir: Path | None = None,
    ) -> None:
        self.total = max(total_bytes, 1)
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()
        self.progress_dir = progress_dir
        self._clock = clock
        self._start = clock()
        self._last = 0.0
        self._last_file = -1.0

    def _write_file(self, result: ReplayResult, *, final: bool) -> None:
        if self.progress_dir is None:
            return
        data = {
            "updated_at": time.time(),
            "running": not final,
            "records": result.records,
            "bytes": result.bytes_read,
            "total_bytes": self.total,
            "delivered": result.delivered,
            "rejected": result.rejected,
        }
        try:
            tmp = self.progress_dir / (PROGRESS_FILE + ".tmp")
            tmp.write_bytes(orjson.dumps(data))
            tmp.replace(self.progress_dir / PROGRESS_FILE)
        except OSError as exc:  # a read-only spool: progress is shown, not exported
            log.debug("replay_progress_not_written", error=str(exc))

    def update(self, result: ReplayResult, *, final: bool = False) -> None:
        """Redraw at most five times a second (and once at the end); write the file once a second."""
        now = self._clock()
        if final or self._last_file < 0 or now - self._last_file >= 1.0:
            self._last_file = now
            self._write_file(result, final=final)
        if not self.enabled or (not final and now - self._last < 0.2):
            return
        self._last = now
        elapsed = max(now - self._start, 1e-6)
        rate = result.bytes_read / elapsed
        remaining = max(self.total - result.bytes_read, 0)
        eta = remaining / rate if rate > 0 else 0.0
        fraction = min(result.bytes_read / self.total, 1.0)
        bar = "#" * int(fraction * 20)
        self.stream.write(
            f"\r[{bar:<20}] {fraction:4.0%} {result.records} records {result.bytes_read / 1e6:.1f} MB "
            f"{rate / 1e6:.1f} MB/s {result.records / elapsed:.0f} rec/s ETA {eta:.0f}s"
            + ("\n" if final else "")
        )
        self.stream.flush()


def spool_bytes(directory: Path) -> int:
    """Total size of a spool's segments (the progress bar's denominator)."""
    total = 0
    for sequence in list_segments(directory):
        try:
            total += segment_path(directory, sequence).stat().st_size
        except FileNotFoundError:
            continue
    return total


def scan_frames(
    directory: Path, tag_ok: Callable[[str], bool]
) -> collections.abc.Iterator[list[StoredFrame]]:
    """Yield the spool's frames in groups of READ_FRAMES, skipping other tags.

    A torn tail in the newest segment (a server writing right now) is expected and passed over; any
    other damage is logged with its place.
    """
    newest = (list_segments(directory) or [0])[-1]

    def bad(path: Path, scan: ScanEnd) -> None:
        if scan.truncated and path == segment_path(directory, newest):
            return
        log.error("spool_segment_damaged", segment=str(path), offset=scan.offset, reason=scan.reason)

    group: list[StoredFrame] = []
    size = records = 0
    for frame in read_frames(directory, on_bad=bad):
        if tag_ok(frame.header.tag):
            group.append(frame)
            size += frame.size
            records += frame.header.record_count
            if len(group) >= READ_FRAMES or size >= ROUND_BYTES or records >= ROUND_RECORDS:
                yield group
                group = []
                size = records = 0
    if group:
        yield group


async def _frame_groups(
    directory: Path, record_filter: RecordFilter
) -> collections.abc.AsyncIterator[list[StoredFrame]]:
    frames = scan_frames(directory, record_filter.tag_ok)
    done = object()
    while True:
        group = await trio.to_thread.run_sync(next, frames, done)
        if group is done:
            return
        yield group  # type: ignore[misc]


async def replay_to_loki(
    directory: Path,
    record_filter: RecordFilter,
    sink: LokiSink | None,
    transformer: Transformer,
    *,
    batch_bytes: int,
    progress: Progress | None = None,
) -> ReplayResult:
    """Replay matching records to Loki (``sink=None``: a dry run that only counts)."""
    result = ReplayResult()
    dead = DeadLetters(directory)
    stats: DeliveryStats = transformer.stats
    # Entries are shaped straight into encoded form (Shaper.encode_events) unless the sink wants JSON.
    encoded = sink is None or sink.format == "protobuf"
    async for group in _frame_groups(directory, record_filter):
        shaper = RoundShaper(transformer, encoded=encoded)
        for frame in group:
            result.frames += 1
            result.bytes_read += frame.size
            try:
                shaper.add(frame, record_filter)
            except RemoteProtocolError as exc:
                result.bad_frames += 1
                log.error(
                    "stored_frame_undecodable", segment=frame.segment, offset=frame.offset, error=str(exc)
                )
        result.records += shaper.records
        if sink is not None and shaper.records:
            await _push_all(sink, shaper.batches(batch_bytes), dead, stats, result)
        if progress is not None:
            progress.update(result)
    if progress is not None:
        progress.update(result, final=True)
    return result


async def _push_all(
    sink: LokiSink,
    batches: list[AnyBatch],
    dead: DeadLetters,
    stats: DeliveryStats,
    result: ReplayResult,
) -> None:
    async def push(batch: AnyBatch) -> None:
        delivered, rejected = await push_and_settle(sink, batch, dead, stats)
        result.delivered += delivered
        result.rejected += rejected

    async with trio.open_nursery() as nursery:
        for batch in batches:
            nursery.start_soon(push, batch)


async def replay_to_forward(
    directory: Path,
    record_filter: RecordFilter,
    host: str,
    port: int,
    *,
    dry_run: bool = False,
    progress: Progress | None = None,
    ack_timeout: float = 60.0,
) -> ReplayResult:
    """Replay matching records to a Forward receiver, acked, with content-derived chunk ids."""
    from fluentforward.client import Frame, FrameEncoder, open_forward_client  # noqa: PLC0415

    result = ReplayResult()
    encoder = FrameEncoder(mode="forward", v2_entries=True, require_ack=True, content_chunk_ids=True)

    async def run(send: Callable[[Frame], collections.abc.Awaitable[None]] | None) -> None:
        async for group in _frame_groups(directory, record_filter):
            for frame in group:
                result.frames += 1
                result.bytes_read += frame.size
                try:
                    entries = [e for e in entries_of(frame) if record_filter.time_ok(e.time_ns)]
                except RemoteProtocolError as exc:
                    result.bad_frames += 1
                    log.error(
                        "stored_frame_undecodable", segment=frame.segment, offset=frame.offset, error=str(exc)
                    )
                    continue
                result.records += len(entries)
                if send is not None and entries:
                    for out in encoder.encode(frame.header.tag, entries):
                        await send(out)
            if progress is not None:
                progress.update(result)

    if dry_run:
        await run(None)
    else:
        async with open_forward_client(host, port, ack_timeout=ack_timeout) as client:

            async def send(frame: Frame) -> None:
                await client.send(frame)
                result.delivered += frame.records

            await run(send)
    if progress is not None:
        progress.update(result, final=True)
    return result
