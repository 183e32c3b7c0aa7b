"""Delivery: spool -> decode -> trace ids -> shape -> Loki, with a persisted cursor.

The shipper reads stored frames in order from its cursor, turns each log event into a Loki entry
(``ids.extract_trace_context`` then ``records.Shaper``), and pushes batches with the Loki sink. For a
protobuf sink (the default) entries are shaped straight into their encoded protobuf form
(``Transformer.encode`` -> ``Shaper.encode_events`` -> ``PushBuffer``), cut into ``EncodedBatch`` values
exactly as ``batches_by_tenant`` cuts ``LokiEntry`` values, and decoded back to ``LokiEntry`` only for
dead letters; a JSON sink gets ``LokiEntry`` batches (``Transformer.entries``).
A round is the frames read at once: its batches are pushed (concurrently, per tenant), retried until
Loki takes them, and only then is the cursor moved past the round and saved atomically. A restart
resumes at the cursor: at most the round in flight is sent again, which Loki de-duplicates.

What Loki refuses for good (a 400, an entry too large even alone) is written to a dead-letter file in
the spool directory and the shipper moves on; a 400 batch is bisected first, so that only the entries
Loki actually rejects end up there (the valid part of a 400 is stored by Loki, and re-sending stored
entries is harmless). Credentials or URL rejected (401/403/404): the data stays, ``/readyz`` reports
not ready, and the sink retries slowly.

Delivered segments are kept for ``retention_s`` (and at most ``retention_bytes``) so they can be
replayed, then deleted. The spool's backpressure counts undelivered bytes only. Both are the job of
``DeliveredSpace``, in the process that owns the ``Spool``: the shipper itself only needs a
``SpoolView`` (where the segments are, how far they are durable) and reports each saved cursor to
``on_delivered``, so it runs the same in the server process and in a delivery child process
(``fluentforward.delivery``).
"""

from __future__ import annotations

import collections
import datetime as dt
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import attrs
import orjson
import structlog
import trio

from fluentforward.errors import RemoteProtocolError
from fluentforward.ids import DEFAULT_RULES, IdRules, TraceContext, extract_trace_context
from fluentforward.reader import RecordFilter, events_of
from fluentforward.records import Shaper
from fluentforward.sinks import LokiEntry
from fluentforward.sinks.loki import AnyBatch, Batch, LokiSink, PushBuffer, PushOutcome, Verdict, entry_size
from fluentforward.spool import (
    LatencyHistogram,
    Position,
    ScanEnd,
    Spool,
    StoredFrame,
    list_segments,
    read_frames,
    segment_path,
)

__all__ = [
    "DEFAULT_RETENTION_S",
    "CursorStore",
    "DeadLetters",
    "DeliveredSpace",
    "DeliveryStats",
    "Lane",
    "RoundShaper",
    "Shipper",
    "ShipperSettings",
    "SpoolView",
    "Transformer",
    "batches_by_tenant",
]

log = structlog.get_logger("fluentforward.pipeline")

# Delivered data is kept a day so an operator can replay it after a Loki incident.
DEFAULT_RETENTION_S = 24 * 3600.0
# Stored bytes read per round: a few Loki batches' worth, so a round's cursor step stays small (a
# restart re-sends at most this much) while each round still fills batches.
ROUND_BYTES = 4 * 1024 * 1024
# ...and at most this many records: gzip frames hold ten times the records of their stored size.
ROUND_RECORDS = 8192
# A 400 batch is bisected this many times to find the entries Loki refuses (at most 2**6 pieces).
MAX_BISECT_DEPTH = 6

CURSOR_FILE = "cursor.json"
DEAD_LETTER_DIR = "dead-letter"


@attrs.define
class DeliveryStats:
    """Counters of the delivery path (exported as metrics)."""

    frames: int = 0
    records: int = 0
    entries_delivered: int = 0
    entries_dead_lettered: int = 0
    batches: int = 0
    retries: int = 0
    bad_frames: int = 0
    status_codes: collections.Counter[str] = attrs.field(factory=collections.Counter)
    trace_sources: collections.Counter[str] = attrs.field(factory=collections.Counter)
    oldest_undelivered_ns: int | None = None
    last_push_seconds: float = 0.0
    push_seconds: LatencyHistogram = attrs.field(factory=LatencyHistogram)

    def plus(self, later: DeliveryStats) -> DeliveryStats:
        """These counters followed by ``later``'s (a restarted delivery process counts from zero).

        Counters and the histogram add up; the gauges (oldest undelivered, last push) are ``later``'s.
        """
        histogram = LatencyHistogram(self.push_seconds.buckets)
        for source in (self.push_seconds, later.push_seconds):
            histogram.counts = [a + b for a, b in zip(histogram.counts, source.counts, strict=True)]
            histogram.count += source.count
            histogram.sum += source.sum
        return DeliveryStats(
            frames=self.frames + later.frames,
            records=self.records + later.records,
            entries_delivered=self.entries_delivered + later.entries_delivered,
            entries_dead_lettered=self.entries_dead_lettered + later.entries_dead_lettered,
            batches=self.batches + later.batches,
            retries=self.retries + later.retries,
            bad_frames=self.bad_frames + later.bad_frames,
            status_codes=self.status_codes + later.status_codes,
            trace_sources=self.trace_sources + later.trace_sources,
            oldest_undelivered_ns=later.oldest_undelivered_ns,
            last_push_seconds=later.last_push_seconds,
            push_seconds=histogram,
        )


class Transformer:
    """Stored frame -> Loki entries (decode, find trace ids, shape). Pure apart from counting."""

    def __init__(
        self, shaper: Shaper, id_rules: IdRules = DEFAULT_RULES, stats: DeliveryStats | None = None
    ) -> None:
        self.shaper = shaper
        self.id_rules = id_rules
        self.stats = stats if stats is not None else DeliveryStats()
        # Called once per record by Shaper.encode_events: the bare function when the rules are the
        # defaults (a partial with a keyword costs a dict per call).
        self._find_trace: Callable[[dict[Any, Any], dict[Any, Any]], TraceContext | None]
        if id_rules == DEFAULT_RULES:
            self._find_trace = extract_trace_context
        else:

            def find_trace(record: dict[Any, Any], metadata: dict[Any, Any]) -> TraceContext | None:
                return extract_trace_context(record, metadata, rules=id_rules)

            self._find_trace = find_trace

    def entries(self, frame: StoredFrame, record_filter: RecordFilter | None = None) -> list[LokiEntry]:
        """Shape every log event of a frame (those the filter keeps).

        Raises:
            RemoteProtocolError: the stored bytes do not decode (a spool not written by fluentforward).
        """
        tag = frame.header.tag
        shape = self.shaper.shape_event
        rules = self.id_rules
        sources = self.stats.trace_sources
        out = []
        for time_ns, record, metadata, group in events_of(frame):
            if record_filter is not None and not record_filter.time_ok(time_ns):
                continue
            trace = extract_trace_context(record, metadata, rules=rules)
            sources[trace.source if trace is not None else "none"] += 1
            out.append(shape(tag, time_ns, record, metadata, group, trace))
        self.stats.records += len(out)
        return out

    def encode(self, frame: StoredFrame, into: PushBuffer, record_filter: RecordFilter | None = None) -> int:
        """``entries`` for a protobuf sink: append the frame's entries to ``into`` already encoded.

        Returns:
            How many entries were added.

        Raises:
            RemoteProtocolError: as ``entries`` (nothing is added then).
        """
        events = events_of(frame)
        if record_filter is not None:
            events = [event for event in events if record_filter.time_ok(event[0])]
        self.shaper.encode_events(frame.header.tag, events, self._find_trace, into, self.stats.trace_sources)
        self.stats.records += len(events)
        return len(events)


class RoundShaper:
    """Frames shaped into push batches: encoded as they are shaped for a protobuf sink (``encode``),
    through ``LokiEntry`` values for a JSON one (``entries``). The shipper uses one per round, replay
    one per step."""

    def __init__(self, transformer: Transformer, *, encoded: bool) -> None:
        self._transformer = transformer
        self._buffer = PushBuffer() if encoded else None
        self._entries: list[LokiEntry] = []
        self.records = 0

    def add(self, frame: StoredFrame, record_filter: RecordFilter | None = None) -> None:
        """Shape a frame's events (those the filter keeps).

        Raises:
            RemoteProtocolError: as ``Transformer.entries`` (nothing is added then).
        """
        if self._buffer is not None:
            self.records += self._transformer.encode(frame, self._buffer, record_filter)
        else:
            entries = self._transformer.entries(frame, record_filter)
            self._entries += entries
            self.records += len(entries)

    def batches(self, max_bytes: int) -> list[AnyBatch]:
        """Everything added, per tenant, in batches of at most ``max_bytes`` (line + metadata)."""
        if self._buffer is not None:
            return list(self._buffer.batches(max_bytes))
        return list(batches_by_tenant(self._entries, max_bytes))


@attrs.frozen
class Lane:
    """One of ``count`` delivery processes sharing a spool: it ships the segments numbered ``index``
    modulo ``count`` (see ``fluentforward.delivery``)."""

    index: int
    count: int

    def owns(self, segment: int) -> bool:
        """True for the segments this lane ships."""
        return segment % self.count == self.index

    @property
    def cursor_file(self) -> str:
        """The file this lane's own cursor is saved in."""
        return f"cursor.lane-{self.index}-of-{self.count}.json"


class CursorStore:
    """The delivery cursor of a spool directory, saved atomically (write, fsync, rename, fsync dir).

    A lane's store saves the lane's own cursor and loads the later of it and the spool's
    ``cursor.json`` (which its parent keeps at the slowest lane's): both are positions before which
    everything the lane must ship was shipped.
    """

    def __init__(self, directory: Path, lane: Lane | None = None) -> None:
        self.path = directory / (CURSOR_FILE if lane is None else lane.cursor_file)
        self._spool_cursor = None if lane is None else CursorStore(directory)

    def load(self) -> Position | None:
        """The saved cursor, or None (never delivered, or an unreadable file: start from the oldest)."""
        own = self._load()
        if self._spool_cursor is None:
            return own
        combined = self._spool_cursor.load()
        if own is None or combined is None:
            return own or combined
        return max(own, combined)

    def _load(self) -> Position | None:
        try:
            data = orjson.loads(self.path.read_bytes())
            return Position(segment=int(data["segment"]), offset=int(data["offset"]))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            log.error(
                "cursor_unreadable",
                path=str(self.path),
                error=str(exc),
                action="delivering from the oldest frame",
            )
            return None

    def save(self, position: Position) -> None:
        """Persist a cursor so that a crash leaves either the old or the new one."""
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("wb") as f:
            f.write(orjson.dumps({"segment": position.segment, "offset": position.offset}))
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class DeadLetters:
    """Append-only JSON lines of entries Loki refused, one file per UTC day under ``dead-letter/``."""

    def __init__(self, directory: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.directory = directory / DEAD_LETTER_DIR
        self._clock = clock

    def write(self, outcome: PushOutcome, entries: Iterable[LokiEntry]) -> int:
        """Record refused entries with Loki's status and message; returns how many were written."""
        self.directory.mkdir(parents=True, exist_ok=True)
        now = self._clock()
        day = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%d")
        lines = [
            orjson.dumps(
                {
                    "dead_lettered_at": now,
                    "status": outcome.status,
                    "reason": outcome.message,
                    "tenant": outcome.batch.tenant,
                    "labels": dict(entry.labels),
                    "time_ns": entry.time_ns,
                    "line": entry.line,
                    "structured_metadata": dict(entry.structured_metadata),
                }
            )
            for entry in entries
        ]
        with (self.directory / f"{day}.jsonl").open("ab") as f:
            f.write(b"\n".join(lines) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        return len(lines)


@attrs.frozen(kw_only=True)
class ShipperSettings:
    """How the shipper paces itself and how long delivered data is kept."""

    batch_bytes: int = 1024 * 1024
    batch_wait_s: float = 1.0
    retention_s: float = DEFAULT_RETENTION_S
    retention_bytes: int | None = None
    round_bytes: int = ROUND_BYTES


async def push_and_settle(
    sink: LokiSink, batch: AnyBatch, dead_letters: DeadLetters, stats: DeliveryStats, depth: int = 0
) -> tuple[int, int]:
    """Push one batch until Loki has taken or refused every entry; dead-letter the refused ones.

    Returns:
        (entries delivered, entries dead-lettered).
    """

    def on_retry(outcome: PushOutcome, _delay: float) -> None:
        stats.retries += 1
        stats.status_codes[str(outcome.status or "error")] += 1

    delivered = dead = 0
    started = time.monotonic()
    outcomes = await sink.push_with_retry(batch, on_retry=on_retry)
    stats.push_seconds.observe(time.monotonic() - started)
    for outcome in outcomes:
        stats.batches += 1
        stats.status_codes[str(outcome.status or "error")] += 1
        piece = outcome.batch
        if outcome.verdict is Verdict.DELIVERED:
            delivered += piece.count
            continue
        halves = piece.split() if outcome.verdict is Verdict.PARTIAL and depth < MAX_BISECT_DEPTH else None
        if halves is not None:
            for half in halves:
                d, x = await push_and_settle(sink, half, dead_letters, stats, depth + 1)
                delivered += d
                dead += x
            continue
        log.error(
            "loki_rejected_entries",
            status=outcome.status,
            reason=outcome.message,
            entries=piece.count,
            action="written to the dead-letter file",
        )
        dead += await trio.to_thread.run_sync(dead_letters.write, outcome, piece.entries)
    return delivered, dead


class SpoolView(Protocol):
    """What the shipper needs of a spool: its directory, how far it is durable, and news of commits.

    A ``Spool`` is one; a delivery child process has a view whose end follows the parent's spool.
    """

    @property
    def directory(self) -> Path:
        """The spool directory (segments are read from it, the cursor is saved in it)."""
        ...

    @property
    def durable_end(self) -> Position:
        """Everything before this position may be read."""
        ...

    def subscribe(self, listener: Callable[[Position], None]) -> None:
        """Call ``listener(durable_end)`` whenever the durable end advances."""
        ...


class DeliveredSpace:
    """Frees what delivery has passed, in the process that owns the ``Spool``.

    Delivered segments older than ``retention_s`` (or beyond ``retention_bytes``) are deleted, and the
    spool is told how many bytes lie before the cursor, so backpressure counts undelivered bytes only.
    """

    def __init__(
        self, spool: Spool, settings: ShipperSettings, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.spool = spool
        self.settings = settings
        self._clock = clock

    async def advance(self, cursor: Position) -> None:
        """Apply retention and release the delivered bytes, for a cursor saved by the shipper."""
        # stat() and listing run in a worker thread; the Spool is only touched from trio's thread.
        await trio.to_thread.run_sync(self._advance, cursor)

    def _advance(self, cursor: Position) -> None:
        sizes, in_cursor_segment = self._delivered_sizes(cursor)
        self._apply_retention(sizes)
        # What is left of the delivered segments, plus the cursor's own segment up to the cursor.
        delivered = sum(size for size, _ in sizes.values()) + in_cursor_segment
        trio.from_thread.run_sync(self.spool.release, delivered)

    def _delivered_sizes(self, cursor: Position) -> tuple[dict[int, tuple[int, float]], int]:
        """Size and mtime of each segment wholly before the cursor, and the delivered bytes of the
        cursor's own segment (0 when it does not exist): one listing, one stat per segment."""
        directory = self.spool.directory
        sizes: dict[int, tuple[int, float]] = {}
        for seq in list_segments(directory):
            if seq >= cursor.segment:
                return sizes, cursor.offset if seq == cursor.segment else 0
            try:
                stat = segment_path(directory, seq).stat()
            except FileNotFoundError:
                continue
            sizes[seq] = (stat.st_size, stat.st_mtime)
        return sizes, 0

    def _apply_retention(self, sizes: dict[int, tuple[int, float]]) -> None:
        """Delete delivered segments past retention_s, then the oldest beyond retention_bytes; the
        deleted ones leave ``sizes``."""
        now = self._clock()
        for seq, (_, mtime) in list(sizes.items()):
            if now - mtime > self.settings.retention_s:
                trio.from_thread.run_sync(self.spool.forget_segment, seq)
                del sizes[seq]
        limit = self.settings.retention_bytes
        kept_bytes = sum(size for size, _ in sizes.values())
        for seq in sorted(sizes):
            if limit is None or kept_bytes <= limit:
                break
            kept_bytes -= trio.from_thread.run_sync(self.spool.forget_segment, seq)
            del sizes[seq]


@attrs.frozen(kw_only=True)
class _Round:
    """A shaped round waiting to be pushed."""

    batches: list[AnyBatch]
    end: Position  # the cursor once every batch is settled
    oldest_ns: int | None  # receive time of the round's first frame
    shaping_s: float
    frames: int = 0  # stored frames read


class Shipper:
    """Ships a live spool to Loki from the persisted cursor onwards.

    After every round the cursor is saved, then handed to ``on_delivered`` (and once at start, for the
    cursor loaded from disk). By default, for a ``Spool`` of this process, that is ``DeliveredSpace``;
    a delivery child process reports it to its parent instead. ``on_counted``, if given, is called
    when a round's counters are final, before its cursor is saved. With a ``lane``, it ships only
    that lane's segments and keeps the lane's own cursor file.
    """

    def __init__(
        self,
        spool: SpoolView,
        sink: LokiSink,
        transformer: Transformer,
        settings: ShipperSettings | None = None,
        *,
        clock: Callable[[], float] = time.time,
        on_delivered: Callable[[Position], Awaitable[None]] | None = None,
        on_counted: Callable[[], Awaitable[None]] | None = None,
        lane: Lane | None = None,
    ) -> None:
        self.spool = spool
        self.lane = lane
        self.sink = sink
        self.transformer = transformer
        self.settings = settings or ShipperSettings()
        self.stats = transformer.stats
        if on_delivered is None:
            if lane is not None:
                raise TypeError("a lane reports its cursor to the process that combines the lanes")
            if not isinstance(spool, Spool):
                raise TypeError("a spool view needs on_delivered: retention belongs to the spool's owner")
            on_delivered = DeliveredSpace(spool, self.settings, clock=clock).advance
        self._on_delivered = on_delivered
        self._on_counted = on_counted
        self._cursors = CursorStore(spool.directory, lane)
        self._dead = DeadLetters(spool.directory, clock=clock)
        self._wake = trio.Event()
        self._progress = trio.Event()  # set after every round (flush waits on it)
        self._draining = False
        self.cursor = self._cursors.load() or Position(
            segment=(list_segments(spool.directory) or [1])[0], offset=8
        )
        # Where the next round is read from: ahead of ``cursor`` while a prepared round waits.
        self._read_cursor = self.cursor
        spool.subscribe(self._on_commit)

    def _on_commit(self, _end: Position) -> None:
        self._wake.set()

    @property
    def caught_up(self) -> bool:
        """True when everything durable has been delivered."""
        return self.cursor >= self.spool.durable_end

    @property
    def auth_failed(self) -> bool:
        """True while Loki rejects our credentials or URL (not ready)."""
        return self.sink.auth_failed

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver until cancelled. Reports the loaded cursor to ``on_delivered`` before it is started.

        Two tasks: one reads and shapes rounds, the other pushes them and moves the cursor, so the
        next round is shaped while Loki takes the last one. At most one shaped round waits.
        """
        await self._on_delivered(self.cursor)
        task_status.started()
        log.info("shipper_started", url=self.sink.url, cursor=attrs.asdict(self.cursor))
        send, receive = trio.open_memory_channel[_Round](0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._push_rounds, receive)
            await self._prepare_rounds(send)

    async def _prepare_rounds(self, send: trio.MemorySendChannel[_Round]) -> None:
        while True:
            if self._read_cursor >= self.spool.durable_end:
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            if not self._draining:
                await self._wait_for_batch()
            await send.send(await self._prepare_round())

    async def _push_rounds(self, receive: trio.MemoryReceiveChannel[_Round]) -> None:
        async for prepared in receive:
            await self._push_round(prepared)
            if self.caught_up:
                self.stats.oldest_undelivered_ns = None
            self._signal_progress()

    def _signal_progress(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    async def _wait_for_batch(self) -> None:
        """Wait until a batch's worth is durable or the oldest undelivered frame is batch_wait old."""
        deadline = trio.current_time() + self.settings.batch_wait_s
        while not self._draining and self._pending_bytes() < self.settings.batch_bytes:
            self._wake = trio.Event()
            with trio.move_on_at(deadline):
                await self._wake.wait()
            if trio.current_time() >= deadline:
                return

    def _pending_bytes(self) -> int:
        end = self.spool.durable_end
        if end.segment == self._read_cursor.segment:
            return max(0, end.offset - self._read_cursor.offset)
        return self.settings.batch_bytes  # at least a segment's tail: ship now

    async def _prepare_round(self) -> _Round:
        """Read the next round from the spool and shape it into batches."""
        started = time.monotonic()
        frames, end = await trio.to_thread.run_sync(self._read_round)
        self._read_cursor = end
        # Shaped straight into encoded entries (Shaper.encode_events) unless the sink wants JSON.
        shaper = RoundShaper(self.transformer, encoded=self.sink.format == "protobuf")
        for frame in frames:
            self._shape_frame(frame, shaper)
            # A checkpoint per frame: connection tasks (in-process) and the push of the previous round
            # run between frames. (A worker thread would not help: the work is CPU-bound under one
            # interpreter lock, and every hand-off delays the acks.)
            await trio.lowlevel.checkpoint()
        batches = shaper.batches(self.settings.batch_bytes)
        return _Round(
            batches=batches,
            end=end,
            oldest_ns=frames[0].header.recv_time_ns if frames else None,
            shaping_s=time.monotonic() - started,
            frames=len(frames),
        )

    async def _push_round(self, prepared: _Round) -> None:
        """Push a round's batches until Loki took or refused every entry, then save the cursor."""
        started = time.monotonic()
        if prepared.oldest_ns is not None:
            self.stats.oldest_undelivered_ns = prepared.oldest_ns
        delivered = dead = 0

        async def push(batch: AnyBatch) -> None:
            nonlocal delivered, dead
            d, x = await push_and_settle(self.sink, batch, self._dead, self.stats)
            delivered += d
            dead += x

        async with trio.open_nursery() as nursery:
            for batch in prepared.batches:
                nursery.start_soon(push, batch)
        self.stats.entries_delivered += delivered
        self.stats.entries_dead_lettered += dead
        self.stats.last_push_seconds = prepared.shaping_s + time.monotonic() - started
        if self._on_counted is not None:
            # Counters go out before the cursor is saved: a crash in between makes the next run push
            # the round again and count it again (it was pushed twice), never lose its count.
            await self._on_counted()
        if self.lane is None or prepared.frames:
            await trio.to_thread.run_sync(self._cursors.save, prepared.end)
        # else: a lane's round over other lanes' segments only. Its cursor moves (the parent's combined
        # cursor needs it) but is not saved: from the old one a restart finds nothing of its own to
        # send again, and an idle lane would otherwise fsync once per MiB the other lanes receive.
        self.cursor = prepared.end
        await self._on_delivered(prepared.end)

    def _shape_frame(self, frame: StoredFrame, shaper: RoundShaper) -> None:
        try:
            shaper.add(frame)
        except RemoteProtocolError as exc:
            self.stats.bad_frames += 1
            log.error("stored_frame_undecodable", segment=frame.segment, offset=frame.offset, error=str(exc))

    def _read_round(self) -> tuple[list[StoredFrame], Position]:
        frames: list[StoredFrame] = []
        size = 0
        end = self._read_cursor
        stop = self.spool.durable_end

        def bad(path: Path, scan: ScanEnd) -> None:
            log.error(
                "spool_segment_damaged",
                segment=str(path),
                offset=scan.offset,
                reason=scan.reason,
                action="skipping the rest of the segment",
            )

        records = 0
        owns = None if self.lane is None else self.lane.owns
        for frame in read_frames(
            self.spool.directory, self._read_cursor, on_bad=bad, stop=stop, segments=owns
        ):
            frames.append(frame)
            size += frame.size
            records += frame.header.record_count
            end = Position(segment=frame.segment, offset=frame.end)
            if size >= self.settings.round_bytes or records >= ROUND_RECORDS:
                break
        else:
            # Read to the durable end: a damaged or fully read older segment must not hold us back.
            if not frames or end < stop:
                end = stop
        return frames, end

    async def flush(self) -> None:
        """Ship everything durable now, without waiting for batches to fill (shutdown)."""
        self._draining = True
        self._wake.set()
        while not self.caught_up:
            await self._progress.wait()


def batches_by_tenant(entries: list[LokiEntry], max_bytes: int) -> list[Batch]:
    """Group entries by tenant (keeping their order) and cut each group into push-sized batches."""
    by_tenant: dict[str | None, list[LokiEntry]] = collections.defaultdict(list)
    for entry in entries:
        by_tenant[entry.tenant].append(entry)
    return [batch for tenant, group in by_tenant.items() for batch in _batches(group, tenant, max_bytes)]


def _batches(entries: list[LokiEntry], tenant: str | None, max_bytes: int) -> Iterable[Batch]:
    """Cut one tenant's entries into batches of at most max_bytes (line + metadata bytes)."""
    start = 0
    size = 0
    for index, cost in enumerate(map(entry_size, entries)):
        if size and size + cost > max_bytes:
            yield Batch(tenant=tenant, entries=tuple(entries[start:index]), size=size)
            start, size = index, 0
        size += cost
    if start < len(entries):
        yield Batch(tenant=tenant, entries=tuple(entries[start:]), size=size)
