"""The durable spool: append with group commit, repair on open, read in order.

Invariants:

* ``append`` returns only after the fsync that covers its frame has returned (unless the operator chose
  a sync interval). Many connections share one fsync: appends that arrive while a write is in progress
  join the next batch, and the committer task writes and fsyncs each batch in a worker thread, off the
  event loop.
* Opening a spool repairs a torn tail (a crash mid-write) by truncating the last segment at its first bad
  frame; the dropped bytes are logged and kept beside the segment for inspection. Acked frames were
  fsynced before their ack, so they are never in a torn tail.
* A chunk id seen recently (same tag and chunk) is acknowledged again without being stored twice. The
  memory of ids is bounded and rebuilt from the segments on open, so it survives a restart.
* The spool never grows past ``max_bytes`` of undelivered data: an append waits for space (the server
  stops reading from that client and withholds its ack) and is never refused or dropped.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import structlog
import trio

from fluentforward.errors import SpoolError
from fluentforward.spool._format import (
    SEGMENT_MAGIC,
    FrameHeader,
    ScanEnd,
    StoredFrame,
    encode_frame,
    scan_segment,
)

__all__ = [
    "DEFAULT_DEDUP_CAPACITY",
    "DEFAULT_SEGMENT_BYTES",
    "DEFAULT_SPOOL_MAX_BYTES",
    "LATENCY_BUCKETS",
    "AppendResult",
    "LatencyHistogram",
    "Position",
    "Spool",
    "SpoolSettings",
    "list_segments",
    "read_frames",
    "spool_dirs",
]

log = structlog.get_logger("fluentforward.spool")

# Segments are the unit of deletion after delivery; 64 MiB keeps the file count low for multi-GB spools
# while freeing space in steps small next to the default spool size.
DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024
# 8 GiB of undelivered data: about an hour of a busy node pool's logs during a Loki outage.
DEFAULT_SPOOL_MAX_BYTES = 8 * 1024 * 1024 * 1024
# Fluent Bit retries a chunk within minutes; 65536 recent ids cover that window at thousands of chunks/s.
DEFAULT_DEDUP_CAPACITY = 65536

SEGMENT_DIR = "segments"
SEGMENT_SUFFIX = ".seg"


# Buckets for fsync and push latencies, in seconds: from a fast NVMe fsync to a slow network disk.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class LatencyHistogram:
    """A cumulative histogram kept as plain numbers (rendered as a Prometheus histogram on scrape)."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.count = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        """Record one duration."""
        self.count += 1
        self.sum += seconds
        for index, bound in enumerate(self.buckets):
            if seconds <= bound:
                self.counts[index] += 1
                break

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, count)`` pairs, cumulative, ending with ``+Inf``."""
        out = []
        running = 0
        for bound, count in zip(self.buckets, self.counts, strict=True):
            running += count
            out.append((repr(bound), running))
        out.append(("+Inf", self.count))
        return out


@attrs.frozen(kw_only=True, order=True)
class Position:
    """A place in the spool: a segment sequence number and a byte offset in it."""

    segment: int
    offset: int


@attrs.frozen(kw_only=True)
class AppendResult:
    """Where a frame was stored, and whether it was a retry of a chunk already stored."""

    position: Position
    duplicate: bool


@attrs.frozen(kw_only=True)
class SpoolSettings:
    """How a spool stores data.

    Attributes:
        directory: the spool directory (created if missing).
        max_bytes: most undelivered bytes kept; appends wait beyond it.
        segment_bytes: a segment is closed and a new one started past this size.
        fsync_interval: 0 (default) fsyncs before every ack. A positive number of seconds acks after
            the write reaches the OS and fsyncs at most that often: a process crash loses nothing, a
            power loss or kernel crash may lose what was acked within the interval.
        dedup_capacity: how many recent chunk ids are remembered for retry detection.
    """

    directory: Path
    max_bytes: int = DEFAULT_SPOOL_MAX_BYTES
    segment_bytes: int = DEFAULT_SEGMENT_BYTES
    fsync_interval: float = 0.0
    dedup_capacity: int = DEFAULT_DEDUP_CAPACITY


def segment_path(directory: Path, sequence: int) -> Path:
    """The file of segment ``sequence`` in a spool directory."""
    return directory / SEGMENT_DIR / f"{sequence:020d}{SEGMENT_SUFFIX}"


def spool_dirs(directory: Path) -> list[Path]:
    """``directory`` if it is a spool, else its ``worker-<i>`` spools (``--workers``), in worker order."""
    if (directory / SEGMENT_DIR).is_dir():
        return [directory]
    workers = [
        path
        for path in directory.glob("worker-*")
        if path.name.removeprefix("worker-").isdigit() and (path / SEGMENT_DIR).is_dir()
    ]
    return sorted(workers, key=lambda path: int(path.name.removeprefix("worker-")))


def list_segments(directory: Path) -> list[int]:
    """Sequence numbers of the segments in a spool directory, oldest first."""
    folder = directory / SEGMENT_DIR
    if not folder.is_dir():
        return []
    return sorted(
        int(path.stem) for path in folder.iterdir() if path.suffix == SEGMENT_SUFFIX and path.stem.isdigit()
    )


def read_frames(
    directory: Path,
    start: Position | None = None,
    *,
    verify: bool = True,
    want_raw: bool = True,
    on_bad: Callable[[Path, ScanEnd], None] | None = None,
    stop: Position | None = None,
    segments: Callable[[int], bool] | None = None,
) -> Iterator[StoredFrame]:
    """Yield stored frames in order from ``start`` (default: the oldest) up to ``stop`` (default: the end).

    A bad frame ends the scan of its segment: ``on_bad`` is told where and why, and reading goes on
    with the next segment. ``segments``, if given, says which segment numbers to read (the others
    are skipped unopened): a delivery lane reads only its own.
    """
    for sequence in list_segments(directory):
        if start is not None and sequence < start.segment:
            continue
        if stop is not None and sequence > stop.segment:
            return
        if segments is not None and not segments(sequence):
            continue
        first = start.offset if start is not None and sequence == start.segment else len(SEGMENT_MAGIC)
        end = stop.offset if stop is not None and sequence == stop.segment else None
        path = segment_path(directory, sequence)
        result = ScanEnd()
        try:
            with path.open("rb") as stream:
                yield from scan_segment(
                    stream, sequence, start=first, end=end, verify=verify, want_raw=want_raw, result=result
                )
        except FileNotFoundError:  # deleted by retention while we read: nothing left to yield
            continue
        if result.reason is not None and on_bad is not None:
            on_bad(path, result)


@attrs.define
class _Batch:
    items: list[tuple[bytes, bytes]] = attrs.field(factory=list)
    keys: list[tuple[str, str] | None] = attrs.field(factory=list)
    size: int = 0
    done: trio.Event = attrs.field(factory=trio.Event)
    error: OSError | None = None
    positions: list[Position] = attrs.field(factory=list)


class Spool:
    """An open spool directory. Create with ``Spool.open`` (blocking I/O: call before serving)."""

    def __init__(self, settings: SpoolSettings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._dir = settings.directory
        self._lock_file: Any = None
        self._file: Any = None
        self._segment = 0
        self._segment_size = 0
        self._durable = Position(segment=0, offset=0)
        self._total_bytes = 0  # bytes in all segment files
        self._released_bytes = 0  # bytes before the delivery cursor (counted out of max_bytes)
        self._batch = _Batch()
        self._work = trio.Event()
        self._space = trio.Event()
        self._full_since: float | None = None
        self._seen: OrderedDict[tuple[str, str], Position] = OrderedDict()
        self._inflight: dict[tuple[str, str], _Batch] = {}
        self._dirty = False
        self._last_sync = 0.0
        self._listeners: list[Callable[[Position], None]] = []
        self.fsync_count = 0
        self.fsync_seconds = LatencyHistogram()
        self.frames_appended = 0

    # -- opening -----------------------------------------------------------------------------------

    @classmethod
    def open(cls, settings: SpoolSettings) -> Spool:
        """Open (or create) a spool directory, lock it, repair a torn tail and rebuild the id memory.

        Raises:
            SpoolError: the directory cannot be created, read or written, or another process holds it.
        """
        spool = cls(settings)
        try:
            spool._open()
        except SpoolError:
            spool.close()
            raise
        except OSError as exc:
            spool.close()
            raise SpoolError(f"spool directory {settings.directory}: {exc.strerror or exc}") from exc
        return spool

    def _open(self) -> None:
        (self._dir / SEGMENT_DIR).mkdir(parents=True, exist_ok=True)
        self._lock_file = (self._dir / "lock").open("a+b")
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            msg = f"spool directory {self._dir} is in use by another fluentforward process"
            raise SpoolError(msg) from None
        sequences = list_segments(self._dir)
        for sequence in sequences:
            self._total_bytes += segment_path(self._dir, sequence).stat().st_size
        if sequences:
            self._repair(sequences[-1])
        self._rebuild_dedup()
        self._start_segment((sequences[-1] + 1) if sequences else 1)

    def _repair(self, sequence: int) -> None:
        path = segment_path(self._dir, sequence)
        result = ScanEnd()
        with path.open("rb") as stream:
            for _ in scan_segment(stream, sequence, want_raw=False, result=result):
                pass
        if result.reason is None:
            return
        size = path.stat().st_size
        keep = max(result.offset, 0)
        dropped = size - keep
        if keep == 0:  # not even the magic survived: the segment never held an acked frame
            path.unlink()
        else:
            with path.open("rb") as source:
                source.seek(keep)
                tail = source.read()
            (path.with_suffix(f".dropped-{keep}")).write_bytes(tail)
            with path.open("r+b") as target:
                target.truncate(keep)
                os.fsync(target.fileno())
        self._total_bytes -= dropped
        self._fsync_dir()
        log.warning(
            "spool_tail_repaired",
            segment=str(path),
            offset=keep,
            bytes_dropped=dropped,
            reason=result.reason,
        )

    def _rebuild_dedup(self) -> None:
        """Remember the chunk ids of the newest frames, reading segments newest first and only as many
        as it takes to fill ``dedup_capacity`` (a large spool of small frames must not slow start-up)."""
        capacity = self.settings.dedup_capacity
        newest_first: list[list[tuple[tuple[str, str], Position]]] = []
        collected = 0
        for sequence in reversed(list_segments(self._dir)):
            found = [
                ((frame.header.tag, frame.header.chunk), Position(segment=frame.segment, offset=frame.offset))
                for frame in read_frames(
                    self._dir,
                    Position(segment=sequence, offset=len(SEGMENT_MAGIC)),
                    verify=False,
                    want_raw=False,
                    stop=Position(segment=sequence, offset=2**62),
                )
                if frame.header.chunk is not None
            ]
            newest_first.append(found)
            collected += len(found)
            if collected >= capacity:
                break
        for found in reversed(newest_first):  # oldest first, so the newest ids are kept
            for key, position in found:
                self._seen[key] = position
                self._seen.move_to_end(key)
                if len(self._seen) > capacity:
                    self._seen.popitem(last=False)

    def _start_segment(self, sequence: int) -> None:
        if self._file is not None:
            os.fsync(self._file.fileno())
            self._file.close()
        path = segment_path(self._dir, sequence)
        self._file = path.open("xb", buffering=0)
        self._file.write(SEGMENT_MAGIC)
        os.fsync(self._file.fileno())
        self._fsync_dir()
        self._segment = sequence
        self._segment_size = len(SEGMENT_MAGIC)
        self._total_bytes += len(SEGMENT_MAGIC)
        self._durable = Position(segment=sequence, offset=len(SEGMENT_MAGIC))

    def _fsync_dir(self) -> None:
        fd = os.open(self._dir / SEGMENT_DIR, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Flush and release the directory. Pending appends must have finished."""
        if self._file is not None:
            try:
                os.fsync(self._file.fileno())
            finally:
                self._file.close()
                self._file = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    # -- state -------------------------------------------------------------------------------------

    @property
    def directory(self) -> Path:
        """The spool directory."""
        return self._dir

    @property
    def durable_end(self) -> Position:
        """Everything before this position is on disk (and fsynced, in the default mode)."""
        return self._durable

    @property
    def total_bytes(self) -> int:
        """Bytes in all segment files."""
        return self._total_bytes

    @property
    def used_bytes(self) -> int:
        """Bytes that count against ``max_bytes``: the undelivered ones."""
        return self._total_bytes - self._released_bytes

    @property
    def is_full(self) -> bool:
        """True while appends are waiting for space."""
        return self._full_since is not None

    @property
    def active_segment(self) -> int:
        """The sequence number of the segment being written."""
        return self._segment

    def subscribe(self, listener: Callable[[Position], None]) -> None:
        """Call ``listener(durable_end)`` after every commit (the shipper wakes on it)."""
        self._listeners.append(listener)

    def release(self, delivered_bytes: int) -> None:
        """Tell the spool how many bytes lie before the delivery cursor, so they stop counting as used."""
        self._released_bytes = max(0, min(delivered_bytes, self._total_bytes))
        self._wake_space()

    def forget_segment(self, sequence: int) -> int:
        """Delete a closed segment (retention). Returns the bytes freed; the active segment is kept."""
        if sequence >= self._segment:
            return 0
        path = segment_path(self._dir, sequence)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        self._total_bytes -= size
        self._released_bytes = max(0, self._released_bytes - size)
        self._wake_space()
        return size

    def _wake_space(self) -> None:
        self._space.set()
        self._space = trio.Event()

    # -- appending ---------------------------------------------------------------------------------

    async def append(self, header: FrameHeader, raw: bytes) -> AppendResult:
        """Store one frame; return once it is durable (or a retry of a chunk already durable).

        Raises:
            SpoolError: the write or fsync failed; the frame must not be acked.
        """
        key = None if header.chunk is None else (header.tag, header.chunk)
        if key is not None:
            seen = self._seen.get(key)
            if seen is not None:
                return AppendResult(position=seen, duplicate=True)
            pending = self._inflight.get(key)
            if pending is not None:  # the same chunk is being written for another connection
                await pending.done.wait()
                if pending.error is not None:
                    raise SpoolError(f"spool write failed: {pending.error}") from pending.error
                return AppendResult(position=pending.positions[pending.keys.index(key)], duplicate=True)
        data = encode_frame(header, raw)
        size = len(data[0]) + len(data[1])
        await self._wait_for_space(size)
        batch = self._batch
        index = len(batch.items)
        batch.items.append(data)
        batch.keys.append(key)
        batch.size += size
        if key is not None:
            self._inflight[key] = batch
        self._work.set()
        try:
            await batch.done.wait()
        finally:
            if key is not None and self._inflight.get(key) is batch:
                del self._inflight[key]
        if batch.error is not None:
            raise SpoolError(f"spool write failed: {batch.error}") from batch.error
        return AppendResult(position=batch.positions[index], duplicate=False)

    async def _wait_for_space(self, size: int) -> None:
        while self.used_bytes + self._batch.size + size > self.settings.max_bytes and self.used_bytes > 0:
            if self._full_since is None:
                self._full_since = self._clock()
                log.warning(
                    "spool_full",
                    used_bytes=self.used_bytes,
                    max_bytes=self.settings.max_bytes,
                    action="not reading from clients and withholding acks until space frees",
                )
            await self._space.wait()
        if self._full_since is not None:
            log.info("spool_space_available", waited_s=round(self._clock() - self._full_since, 3))
            self._full_since = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The committer: write and fsync batches until cancelled (then finish the batch in hand)."""
        task_status.started()
        interval = self.settings.fsync_interval
        while True:
            if interval > 0 and self._dirty:
                with trio.move_on_after(max(0.0, self._last_sync + interval - self._clock())):
                    await self._work.wait()
                if not self._work.is_set():
                    await trio.to_thread.run_sync(self._sync_now)
                    continue
            else:
                await self._work.wait()
            self._work = trio.Event()
            batch = self._batch
            self._batch = _Batch()
            sync = interval <= 0 or self._clock() - self._last_sync >= interval
            try:
                await trio.to_thread.run_sync(self._write_batch, batch, sync)
            except OSError as exc:
                batch.error = exc
                log.error("spool_write_failed", error=str(exc), frames=len(batch.items))
            if batch.error is None:
                self._remember(batch)
            batch.done.set()
            if batch.error is None:
                for listener in self._listeners:
                    listener(self._durable)

    def _remember(self, batch: _Batch) -> None:
        capacity = self.settings.dedup_capacity
        for key, position in zip(batch.keys, batch.positions, strict=True):
            if key is not None:
                self._seen[key] = position
                if len(self._seen) > capacity:
                    self._seen.popitem(last=False)

    def _write_batch(self, batch: _Batch, sync: bool) -> None:
        """Runs in a worker thread: append the batch, rotate segments, fsync."""
        for head, raw in batch.items:
            size = len(head) + len(raw)
            if self._segment_size + size > self.settings.segment_bytes and self._segment_size > len(
                SEGMENT_MAGIC
            ):
                self._start_segment(self._segment + 1)
            batch.positions.append(Position(segment=self._segment, offset=self._segment_size))
            self._write_all(head)
            self._write_all(raw)
            self._segment_size += size
            self._total_bytes += size
        if sync:
            started = time.perf_counter()
            os.fsync(self._file.fileno())
            self.fsync_seconds.observe(time.perf_counter() - started)
            self.fsync_count += 1
            self._last_sync = self._clock()
            self._dirty = False
        else:
            self._dirty = True
        self.frames_appended += len(batch.items)
        self._durable = Position(segment=self._segment, offset=self._segment_size)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:  # an unbuffered file may write less than asked
            written = self._file.write(view)
            view = view[written:]

    def _sync_now(self) -> None:
        if self._file is not None and self._dirty:
            started = time.perf_counter()
            os.fsync(self._file.fileno())
            self.fsync_seconds.observe(time.perf_counter() - started)
            self.fsync_count += 1
        self._last_sync = self._clock()
        self._dirty = False
