"""Loki delivery in a child process, so that shaping never competes with acks for one core and loop.

The process that owns the ``Spool`` (``serve``, or one ``--workers`` worker) runs a ``DeliveryProcess``:
it starts ``python -m fluentforward.delivery`` and talks to it over the child's stdin and stdout. The
child runs ``pipeline.Shipper`` against a ``RemoteSpool``, a view of the parent's spool directory whose
durable end follows the parent's messages, and saves ``cursor.json`` itself. The parent applies
retention and backpressure accounting (``pipeline.DeliveredSpace``) for every cursor the child reports,
and serves the child's counters on ``/metrics`` and its Loki auth state on ``/readyz``.

Each message is a 4-byte big-endian length and a msgpack map whose ``type`` says what it is:

    parent -> child  start     once: option values, spool directory, durable end, logging
                     durable   the spool's durable end advanced (only the newest is sent, one at a time)
                     drain     ship everything durable, report, exit 0 (shutdown)
    child -> parent  progress  cursor, counters and auth state: after every round and every second
                     failed    the settings do not work (a file vanished); the child exits 2

With ``--delivery-processes N`` above 1 there are N children, each a lane of the spool: lane ``i``
ships the segments whose number modulo N is ``i`` (at high rates a 64 MiB segment fills in about a
second, so the lanes share the work evenly), and saves its own cursor (``cursor.lane-i-of-N.json``).
The parent combines their cursors: everything before the slowest lane's is delivered, so that is what
it saves as ``cursor.json`` and applies retention to. A lane starts from the later of ``cursor.json``
and its own file; what it re-sends after a crash, Loki de-duplicates.

Invariants: the child reads only below the durable end it was told (acked, fsynced data). The cursor
is saved before it is reported, so retention never deletes what a restarted child still needs. A
message over ``MAX_MESSAGE_BYTES`` or not matching its type closes the pipe (the child is restarted).
The child never outlives its parent: EOF on its stdin stops it, as do SIGTERM and SIGINT. A child that
dies is restarted after a backoff and resumes from ``cursor.json``; one that cannot start at all fails
the parent's start-up with its error.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import struct
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import msgpack
import structlog
import trio

from fluentforward.config import MAX_DELIVERY_PROCESSES, DeliverySettings
from fluentforward.errors import ConfigError, RemoteProtocolError
from fluentforward.pipeline import CursorStore, DeliveredSpace, DeliveryStats, Lane, Shipper, Transformer
from fluentforward.records import Shaper
from fluentforward.sinks.loki import LokiSink
from fluentforward.spool import LatencyHistogram, Position, Spool

__all__ = [
    "CHILD_COMMAND",
    "MAX_MESSAGE_BYTES",
    "DeliveryProcess",
    "MessageDecoder",
    "MessageStream",
    "RemoteSpool",
    "combine_stats",
    "encode_message",
    "lanes_cursor",
    "main",
    "stats_from_wire",
    "stats_to_wire",
    "tune_child_allocator",
]

log = structlog.get_logger("fluentforward.delivery")

CHILD_COMMAND = (sys.executable, "-m", "fluentforward.delivery")
# The largest message: a start message with many label templates is a few KiB and a progress message
# well under one; a length beyond this is a broken or hostile pipe, not data worth buffering.
MAX_MESSAGE_BYTES = 1024 * 1024
_LENGTH = struct.Struct(">I")
# Bytes read from a pipe at once (a pipe buffer's size).
READ_BYTES = 64 * 1024
PARENT_MESSAGES = frozenset({"start", "durable", "drain"})
CHILD_MESSAGES = frozenset({"progress", "failed"})
# The child reports its counters this often (and after every round), so /metrics lags at most this.
STATS_INTERVAL_S = 1.0
# Imports, settings and the cursor take well under a second; a child silent this long is stuck.
START_TIMEOUT_S = 30.0
# Restart backoff after a crash: 1 s doubling to 30 s, back to 1 s once a child ran a minute.
RESTART_DELAY_MIN_S = 1.0
RESTART_DELAY_MAX_S = 30.0
STABLE_RUN_S = 60.0
# A child whose stdout closed is exiting: wait this long for it before SIGTERM...
EXIT_WAIT_S = 5.0
# ...and this long after SIGTERM before SIGKILL.
KILL_AFTER_S = 2.0
EXIT_OK = 0
EXIT_FAILED = 2
# The child runs at a lower CPU priority: when the cores are short, the kernel serves the receive path
# first and delivery lags into the spool (which is what the spool is for) instead of delaying acks.
# With idle cores the child still gets all it can use.
CHILD_NICENESS = 10
# glibc's allocator in the child. Every frame allocates and frees several buffers of about its size
# (the stored frame, msgpack's buffers, a gzip payload inflated) and every push a few of a batch's
# size. Above the mmap threshold each is a fresh mapping whose pages all fault on first touch: with the
# server's 128 KiB (``app.tune_allocator``) that was 0.8 page faults per delivered record, 1.5-2 us of
# the child's ~11 us per record (``make bench`` frames, 2-vCPU VM). The child holds at most two rounds
# (``pipeline.ROUND_BYTES`` each) and the pushes in flight, so it keeps buffers up to 8 MiB on its heap
# and returns free heap past 8 MiB: about 10 MB more resident, a peak 2-3 MB higher. Larger buffers
# (a 32 MiB frame) are still mapped and returned at once.
CHILD_MMAP_THRESHOLD = 8 * 1024 * 1024
CHILD_TRIM_THRESHOLD = 8 * 1024 * 1024
CHILD_ARENA_MAX = 2  # the main thread and trio's worker threads (spool reads, cursor saves)


# -- codec (pure) ------------------------------------------------------------------------------------


def encode_message(message: Mapping[str, Any]) -> bytes:
    """One length-delimited message (the map must have a ``type``).

    Raises:
        ValueError: the message is larger than ``MAX_MESSAGE_BYTES`` (our bug: messages are small).
    """
    body: bytes = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_MESSAGE_BYTES:
        raise ValueError(f"delivery message of {len(body)} bytes exceeds {MAX_MESSAGE_BYTES}")
    return _LENGTH.pack(len(body)) + body


class MessageDecoder:
    """Bytes read from a pipe in, messages out (sans-IO); buffers at most one message."""

    def __init__(self, accept: frozenset[str], *, max_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self._accept = accept
        self._max_bytes = max_bytes
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message held (non-zero at EOF: the peer stopped mid-message)."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray) -> list[dict[str, Any]]:
        """Add bytes; return the messages they complete.

        Raises:
            RemoteProtocolError: a length over the limit, a body that is not a msgpack map with a
                known ``type`` (the pipe must be closed: framing is lost).
        """
        self._buffer += data
        out = []
        while len(self._buffer) >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(self._buffer)
            if not 0 < size <= self._max_bytes:
                raise RemoteProtocolError(f"delivery pipe: message length {size} (limit {self._max_bytes})")
            if len(self._buffer) < _LENGTH.size + size:
                break
            body = bytes(self._buffer[_LENGTH.size : _LENGTH.size + size])
            del self._buffer[: _LENGTH.size + size]
            out.append(self._decode(body))
        return out

    def _decode(self, body: bytes) -> dict[str, Any]:
        try:
            message = msgpack.unpackb(body, raw=False, strict_map_key=True)
        except ValueError as exc:  # msgpack's errors, UnicodeDecodeError and ExtraData included
            raise RemoteProtocolError(f"delivery pipe: undecodable message: {exc}") from None
        if not isinstance(message, dict):
            raise RemoteProtocolError(f"delivery pipe: a message is a map, got {type(message).__name__}")
        kind = message.get("type")
        if kind not in self._accept:
            raise RemoteProtocolError(f"delivery pipe: unexpected message type {kind!r}")
        return message


def _typed(value: Any, kind: type | tuple[type, ...], where: str, what: str) -> Any:
    """``value`` if it is a ``kind`` (a bool is not an int here), else a ``RemoteProtocolError``."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise RemoteProtocolError(f"delivery pipe: {where} is not {what}")
    return value


def _field(message: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    return _typed(message.get(key), kind, f"{message['type']} message: {key}", what)


def _position(message: Mapping[str, Any], key: str) -> Position:
    value = message.get(key)
    if isinstance(value, list) and len(value) == 2 and all(type(part) is int and part >= 0 for part in value):
        return Position(segment=value[0], offset=value[1])
    raise RemoteProtocolError(f"delivery pipe: {message['type']} message: {key} is not a position")


def _wire_position(position: Position) -> list[int]:
    return [position.segment, position.offset]


def stats_to_wire(stats: DeliveryStats) -> dict[str, Any]:
    """The delivery counters as plain data (a progress message's ``stats``)."""
    out: dict[str, Any] = {}
    for field in attrs.fields(DeliveryStats):
        value = getattr(stats, field.name)
        if isinstance(value, LatencyHistogram):
            value = {"counts": value.counts, "count": value.count, "sum": value.sum}
        elif isinstance(value, collections.Counter):
            value = dict(value)
        out[field.name] = value
    return out


def stats_from_wire(data: Any) -> DeliveryStats:
    """Rebuild the counters of ``stats_to_wire``, checking every field's type.

    Raises:
        RemoteProtocolError: a field is missing or of the wrong type.
    """
    fields = _typed(data, dict, "progress message: stats", "a map")
    stats = DeliveryStats()
    for field in attrs.fields(DeliveryStats):
        current = getattr(stats, field.name)
        value = fields.get(field.name)
        where = f"progress message: stats.{field.name}"
        if isinstance(current, LatencyHistogram):
            _fill_histogram(current, _typed(value, dict, where, "a histogram"), where)
        elif isinstance(current, collections.Counter):
            counts = _typed(value, dict, where, "a map of counts")
            for count in counts.values():
                _typed(count, int, where, "a map of counts")
            current.update(counts)  # msgpack map keys are str (strict_map_key)
        elif isinstance(current, float):
            setattr(stats, field.name, float(_typed(value, (int, float), where, "a number")))
        elif current is None:  # an optional integer (oldest_undelivered_ns)
            setattr(stats, field.name, None if value is None else _typed(value, int, where, "an integer"))
        else:
            setattr(stats, field.name, _typed(value, int, where, "an integer"))
    return stats


def _fill_histogram(histogram: LatencyHistogram, data: dict[str, Any], where: str) -> None:
    counts = _typed(data.get("counts"), list, where, "a histogram")
    if len(counts) != len(histogram.buckets):
        raise RemoteProtocolError(
            f"delivery pipe: {where} has {len(counts)} buckets, not {len(histogram.buckets)}"
        )
    histogram.counts = [_typed(count, int, where, "a histogram") for count in counts]
    histogram.count = _typed(data.get("count"), int, where, "a histogram")
    histogram.sum = float(_typed(data.get("sum"), (int, float), where, "a histogram"))


# -- pipe glue ---------------------------------------------------------------------------------------


class MessageStream:
    """Messages over a pair of trio byte streams; ``send`` may be called from several tasks."""

    def __init__(
        self, receive: trio.abc.ReceiveStream, send: trio.abc.SendStream, *, accept: frozenset[str]
    ) -> None:
        self._receive = receive
        self._send = send
        self._decoder = MessageDecoder(accept)
        self._ready: collections.deque[dict[str, Any]] = collections.deque()
        self._lock = trio.Lock()

    async def receive(self) -> dict[str, Any] | None:
        """The next message, or None at EOF (the peer closed or died).

        Raises:
            RemoteProtocolError: see ``MessageDecoder.feed``.
        """
        while not self._ready:
            try:
                data = await self._receive.receive_some(READ_BYTES)
            except trio.BrokenResourceError:
                return None
            if not data:
                return None
            self._ready.extend(self._decoder.feed(data))
        return self._ready.popleft()

    async def send(self, message: Mapping[str, Any]) -> None:
        """Write one message.

        Raises:
            trio.BrokenResourceError: the peer is gone.
        """
        data = encode_message(message)
        async with self._lock:
            await self._send.send_all(data)

    async def aclose(self) -> None:
        """Close both streams."""
        await self._send.aclose()
        await self._receive.aclose()


# -- parent side -------------------------------------------------------------------------------------


@attrs.define
class _ChildRun:
    """How one child ended."""

    ready: bool = False
    error: str | None = None  # from its "failed" message
    broken_pipe: bool = False  # it sent something we cannot read
    code: int | None = None


def _child_env() -> dict[str, str]:
    # Settings reach the child on its stdin; options in FLUENTFORWARD_* (a shared key among them) are
    # not its business.
    return {name: value for name, value in os.environ.items() if not name.startswith("FLUENTFORWARD_")}


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


@attrs.define(eq=False)
class _Lane:
    """One delivery child (lane ``index`` of the spool) and what it last reported."""

    index: int
    stats: DeliveryStats = attrs.field(factory=DeliveryStats)
    # What its earlier children counted: a restarted child starts from zero, the metrics must not.
    earlier: DeliveryStats = attrs.field(factory=DeliveryStats)
    cursor: Position | None = None  # None until its child reported one
    pid: int | None = None
    auth_failed: bool = False
    wake: trio.Event = attrs.field(factory=trio.Event)  # the feeder has something new to send


def combine_stats(parts: list[DeliveryStats]) -> DeliveryStats:
    """The counters of several delivery lanes as one: counters and histograms add up, the oldest
    undelivered record is the oldest of any lane, the last push the slowest."""
    total = DeliveryStats()
    for part in parts:
        total = total.plus(part)
    oldest = [p.oldest_undelivered_ns for p in parts if p.oldest_undelivered_ns is not None]
    total.oldest_undelivered_ns = min(oldest) if oldest else None
    total.last_push_seconds = max((p.last_push_seconds for p in parts), default=0.0)
    return total


def lanes_cursor(cursors: list[Position | None]) -> Position | None:
    """The spool position before which every lane has delivered its frames (None until all reported).

    A lane's cursor passes only what it delivered of its own segments, and it moves to the durable end
    when it has read everything there: the slowest lane says how far the whole spool is delivered.
    """
    if not cursors or any(cursor is None for cursor in cursors):
        return None
    return min(cursor for cursor in cursors if cursor is not None)


class DeliveryProcess:
    """The parent's handle on its delivery children: the same face as ``Shipper`` for probes and metrics.

    With ``processes`` above 1, each child is a lane: it ships the segments whose number modulo the
    lane count is its index, and saves its own cursor; the parent saves the spool's ``cursor.json``
    as the slowest lane's (``lanes_cursor``), and applies retention up to it.

    ``stats`` and ``auth_failed`` combine the children's last reports; ``caught_up`` compares the
    combined cursor with the spool's durable end. ``run`` supervises the children; ``flush`` drains
    them at shutdown.
    """

    def __init__(self, spool: Spool, delivery: DeliverySettings) -> None:
        if delivery.process is None:
            raise ValueError("DeliveryProcess needs DeliverySettings.process")
        self._spool = spool
        self._process = delivery.process
        self._space = DeliveredSpace(spool, delivery.shipper)
        self._lanes = [_Lane(index) for index in range(delivery.process.processes)]
        # One child saves cursor.json itself; lanes save their own, and the parent the combined one.
        self._cursor_file = CursorStore(spool.directory) if len(self._lanes) > 1 else None
        self._advancing = trio.Lock()
        self.cursor = Position(segment=0, offset=0)  # until every child has reported its own
        self._draining = False
        self._drained = trio.Event()
        spool.subscribe(self._on_commit)

    @property
    def stats(self) -> DeliveryStats:
        """Every child's counters, carried across restarts."""
        if len(self._lanes) == 1:
            return self._lanes[0].stats
        return combine_stats([lane.stats for lane in self._lanes])

    @property
    def pid(self) -> int | None:
        """The first lane's child process id (None before it started)."""
        return self._lanes[0].pid

    @property
    def pids(self) -> list[int | None]:
        """Each lane's child process id."""
        return [lane.pid for lane in self._lanes]

    @property
    def caught_up(self) -> bool:
        """True when the children have delivered everything durable."""
        return self.cursor >= self._spool.durable_end

    @property
    def auth_failed(self) -> bool:
        """True while Loki rejects a child's credentials or URL (not ready)."""
        return any(lane.auth_failed for lane in self._lanes)

    def _on_commit(self, _end: Position) -> None:
        for lane in self._lanes:
            lane.wake.set()

    async def flush(self) -> None:
        """Have the children ship everything durable and exit (shutdown); returns once they have."""
        self._draining = True
        self._on_commit(self._spool.durable_end)
        await self._drained.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the children, restart each whenever it dies, until they have drained (``flush``) or
        this is cancelled. Started once every first child has reported its cursor (and the spool
        accounted for it).

        Raises:
            ConfigError: a first child could not start (its error, or how it exited).
        """
        waiting = len(self._lanes)
        failure: ConfigError | None = None

        def ready() -> None:
            nonlocal waiting
            waiting -= 1
            if waiting == 0:
                task_status.started()

        async with trio.open_nursery() as nursery:

            async def supervise(lane: _Lane) -> None:
                nonlocal failure
                try:
                    await self._supervise(lane, ready)
                except ConfigError as exc:
                    failure = failure or exc
                    nursery.cancel_scope.cancel()

            for lane in self._lanes:
                nursery.start_soon(supervise, lane)
        if failure is not None:
            raise failure
        self._drained.set()

    async def _supervise(self, lane: _Lane, ready: Callable[[], None]) -> None:
        """Run one lane's child and restart it whenever it dies, until it has drained."""
        delay = RESTART_DELAY_MIN_S
        started = False

        def lane_ready() -> None:
            nonlocal started
            if not started:
                started = True
                ready()

        while True:
            began = trio.current_time()
            run = await self._run_child(lane, lane_ready)
            lane.earlier = lane.stats  # the exited child's last report, on top of earlier ones
            done = lane.cursor is not None and lane.cursor >= self._spool.durable_end
            if self._draining and run.code == EXIT_OK and done:
                return
            if not started:
                raise ConfigError(
                    f"the delivery process could not start: {run.error or _exit_text(run.code)}"
                    + ("" if run.error else " (see its log lines above)")
                )
            if trio.current_time() - began >= STABLE_RUN_S:
                delay = RESTART_DELAY_MIN_S
            log.error(
                "delivery_process_exited",
                pid=lane.pid,
                code=run.code,
                reason=run.error or _exit_text(run.code),
                action=f"restarting in {delay:g}s; it resumes from the saved cursor",
                **self._lane_fields(lane),
            )
            await trio.sleep(delay)
            delay = min(delay * 2, RESTART_DELAY_MAX_S)

    def _lane_fields(self, lane: _Lane) -> dict[str, int]:
        return {"lane": lane.index} if len(self._lanes) > 1 else {}

    async def _run_child(self, lane: _Lane, ready: Callable[[], None]) -> _ChildRun:
        run = _ChildRun()
        try:
            proc = await trio.lowlevel.open_process(
                CHILD_COMMAND,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=_child_env(),
                # Its own session: a terminal's Ctrl-C reaches the parent only, which drains the child.
                start_new_session=True,
            )
        except OSError as exc:  # no memory or processes left to fork
            run.error = f"cannot start {CHILD_COMMAND[0]}: {exc.strerror or exc}"
            return run
        lane.pid = proc.pid
        log.info("delivery_process_started", pid=proc.pid, **self._lane_fields(lane))
        assert proc.stdin is not None
        assert proc.stdout is not None
        pipe = MessageStream(proc.stdout, proc.stdin, accept=CHILD_MESSAGES)
        exited = False
        try:
            with trio.move_on_after(START_TIMEOUT_S) as startup:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._feed, lane, pipe)
                    await self._listen(lane, pipe, run, ready, startup)
                    exited = not run.broken_pipe
                    nursery.cancel_scope.cancel()
            if startup.cancelled_caught:
                run.error = f"no report within {START_TIMEOUT_S:g}s"
        finally:
            with trio.CancelScope(shield=True):
                run.code = await _stop(proc, pipe, patience=EXIT_WAIT_S if exited else 0.0)
        return run

    async def _listen(
        self,
        lane: _Lane,
        pipe: MessageStream,
        run: _ChildRun,
        ready: Callable[[], None],
        startup: trio.CancelScope,
    ) -> None:
        """Read a child's messages until it closes its stdout (exits) or sends something unreadable."""
        while True:
            try:
                message = await pipe.receive()
                if message is None:
                    return
                if message["type"] == "failed":
                    run.error = str(_field(message, "error", str, "a string"))
                    continue
                cursor = _position(message, "cursor")
                stats = stats_from_wire(message.get("stats"))
                auth_failed = bool(_field(message, "auth_failed", bool, "a boolean"))
            except RemoteProtocolError as exc:
                log.error("delivery_pipe_broken", pid=lane.pid, error=str(exc), **self._lane_fields(lane))
                run.broken_pipe = True
                return
            lane.stats = lane.earlier.plus(stats)
            lane.auth_failed = auth_failed
            if cursor != lane.cursor or not run.ready:
                lane.cursor = cursor
                await self._advance(force=not run.ready)
            if not run.ready:
                run.ready = True
                startup.deadline = float("inf")
                ready()

    async def _advance(self, *, force: bool) -> None:
        """Move the combined cursor to the slowest lane's, save it (lanes) and free the space before it."""
        async with self._advancing:
            combined = lanes_cursor([lane.cursor for lane in self._lanes])
            if combined is None or (combined == self.cursor and not force):
                return
            if self._cursor_file is not None and combined != self.cursor:
                await trio.to_thread.run_sync(self._cursor_file.save, combined)
            self.cursor = combined
            await self._space.advance(combined)

    async def _feed(self, lane: _Lane, pipe: MessageStream) -> None:
        """Send the start message, then each newer durable end (coalesced), then drain when asked."""
        sent = self._spool.durable_end
        drain_sent = False
        process = self._process
        start = {
            "type": "start",
            "options": dict(process.options),
            "spool_dir": str(self._spool.directory),
            "durable": _wire_position(sent),
            "log_level": process.log_level,
            "log_json": process.log_json,
            "worker": process.worker,
            "lane": [lane.index, len(self._lanes)] if len(self._lanes) > 1 else None,
        }
        try:
            await pipe.send(start)
            while True:
                lane.wake = trio.Event()  # replaced before reading state: no wake-up is lost
                end = self._spool.durable_end
                if end != sent:
                    await pipe.send({"type": "durable", "position": _wire_position(end)})
                    sent = end
                elif self._draining and not drain_sent:
                    await pipe.send({"type": "drain"})
                    drain_sent = True
                else:
                    await lane.wake.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the child is gone; _listen sees its stdout close


async def _stop(proc: trio.Process, pipe: MessageStream, *, patience: float) -> int:
    """Reap a child: let it exit for ``patience`` seconds, then SIGTERM, then SIGKILL. Returns its code."""
    with trio.move_on_after(patience):
        await proc.wait()
    if proc.returncode is None:
        proc.terminate()
        with trio.move_on_after(KILL_AFTER_S):
            await proc.wait()
    if proc.returncode is None:
        log.error(
            "delivery_process_killed", pid=proc.pid, reason=f"still running {KILL_AFTER_S:g}s after SIGTERM"
        )
        proc.kill()
    code = await proc.wait()
    await pipe.aclose()
    return code


# -- child side --------------------------------------------------------------------------------------


@attrs.define
class RemoteSpool:
    """The child's ``SpoolView``: the parent's spool directory and its durable end as last told."""

    directory: Path
    durable_end: Position
    _listeners: list[Callable[[Position], None]] = attrs.field(factory=list)

    def subscribe(self, listener: Callable[[Position], None]) -> None:
        """Call ``listener(durable_end)`` when the parent reports a newer end."""
        self._listeners.append(listener)

    def advance(self, end: Position) -> None:
        """Take a durable end from the parent (an older one than known is ignored)."""
        if end <= self.durable_end:
            return
        self.durable_end = end
        for listener in self._listeners:
            listener(end)


@attrs.frozen(kw_only=True)
class _Start:
    options: dict[str, Any] = attrs.field(repr=False)
    spool_dir: Path
    durable: Position
    log_level: str
    log_json: bool | None
    worker: int | None
    lane: Lane | None


def _lane_from_wire(value: Any) -> Lane | None:
    if value is None:
        return None
    if not (
        type(value) is list
        and len(value) == 2
        and all(type(v) is int for v in value)
        and 0 <= value[0] < value[1] <= MAX_DELIVERY_PROCESSES
    ):
        raise RemoteProtocolError(f"delivery pipe: start message: lane {value!r} is not [index, count]")
    return Lane(index=value[0], count=value[1])


def _start_from_wire(message: Mapping[str, Any]) -> _Start:
    from fluentforward._logging import LOG_LEVELS  # noqa: PLC0415

    if message["type"] != "start":
        raise RemoteProtocolError(f"delivery pipe: expected a start message, got {message['type']!r}")
    level = _field(message, "log_level", str, "a log level")
    if level not in LOG_LEVELS:
        raise RemoteProtocolError(f"delivery pipe: start message: log_level {level!r} is not a log level")
    log_json = message.get("log_json")
    worker = message.get("worker")
    return _Start(
        options=_field(message, "options", dict, "a map"),
        spool_dir=Path(_field(message, "spool_dir", str, "a path")),
        durable=_position(message, "durable"),
        log_level=level,
        log_json=None if log_json is None else _field(message, "log_json", bool, "a boolean or nil"),
        worker=None if worker is None else _field(message, "worker", int, "an integer or nil"),
        lane=_lane_from_wire(message.get("lane")),
    )


async def _child_main(in_fd: int, out_fd: int) -> int:
    from fluentforward._logging import configure_logging  # noqa: PLC0415
    from fluentforward.cli import delivery_settings_from_wire  # noqa: PLC0415 - the child only

    pipe = MessageStream(
        trio.lowlevel.FdStream(in_fd), trio.lowlevel.FdStream(out_fd), accept=PARENT_MESSAGES
    )
    try:
        with trio.fail_after(START_TIMEOUT_S):
            message = await pipe.receive()
        if message is None:
            return EXIT_OK  # the parent went away before it said anything
        start = _start_from_wire(message)
    except (RemoteProtocolError, trio.TooSlowError) as exc:
        configure_logging()
        log.error("delivery_process_failed", error=str(exc) or "no start message")
        return EXIT_FAILED
    configure_logging(json=start.log_json, level=start.log_level)
    structlog.contextvars.bind_contextvars(
        process="delivery",
        **({} if start.worker is None else {"worker": start.worker}),
        **({} if start.lane is None else {"lane": start.lane.index}),
    )
    try:
        delivery = delivery_settings_from_wire(start.options)
        if delivery.loki is None:
            raise ConfigError("no Loki URL in the delivery settings")
        sink = LokiSink(delivery.loki)
    except ConfigError as exc:
        log.error("delivery_process_failed", error=str(exc))
        with contextlib.suppress(trio.BrokenResourceError):
            await pipe.send({"type": "failed", "error": str(exc)})
        return EXIT_FAILED
    async with sink:
        return await _deliver(pipe, start, delivery, sink)


async def _deliver(pipe: MessageStream, start: _Start, delivery: DeliverySettings, sink: LokiSink) -> int:
    from fluentforward.app import collect_garbage  # noqa: PLC0415 - the child only, as main()'s imports

    view = RemoteSpool(start.spool_dir, start.durable)
    shipper: Shipper | None = None
    reason = "drained"

    async with trio.open_nursery() as nursery:

        def stop(why: str) -> None:
            nonlocal reason
            reason = why
            nursery.cancel_scope.cancel()

        async def report(_cursor: Position | None = None) -> None:
            assert shipper is not None
            message = {
                "type": "progress",
                "cursor": _wire_position(shipper.cursor),
                "stats": stats_to_wire(shipper.stats),
                "auth_failed": shipper.auth_failed,
            }
            try:
                await pipe.send(message)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                stop("parent gone (stdout closed)")

        shipper = Shipper(
            view,
            sink,
            Transformer(Shaper(rules=delivery.shape_rules), delivery.id_rules),
            delivery.shipper,
            on_delivered=report,
            on_counted=report,
            lane=start.lane,
        )

        async def drain() -> None:
            assert shipper is not None
            await shipper.flush()
            await report()
            stop("drained")

        async def listen() -> None:
            while True:
                try:
                    message = await pipe.receive()
                    if message is None:
                        stop("parent gone (stdin closed)")
                        return
                    if message["type"] == "durable":
                        view.advance(_position(message, "position"))
                    elif message["type"] == "drain":
                        nursery.start_soon(drain)
                    else:
                        raise RemoteProtocolError("delivery pipe: a second start message")
                except RemoteProtocolError as exc:
                    log.error("delivery_pipe_broken", error=str(exc))
                    stop("bad message from the parent")
                    return

        async def tick() -> None:
            while True:
                await trio.sleep(STATS_INTERVAL_S)
                await report()

        async def watch_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    stop(signal.Signals(signum).name)
                    return

        nursery.start_soon(watch_signals)
        nursery.start_soon(collect_garbage)
        nursery.start_soon(listen)
        await nursery.start(shipper.run)
        nursery.start_soon(tick)
    log.info("delivery_process_stopped", reason=reason, cursor=attrs.asdict(shipper.cursor))
    return EXIT_OK


def tune_child_allocator() -> bool:
    """Set the child's glibc allocator thresholds (see ``CHILD_MMAP_THRESHOLD``); False where the C
    library is not glibc (nothing is changed then)."""
    from fluentforward.app import tune_allocator  # noqa: PLC0415

    return tune_allocator(
        mmap_threshold=CHILD_MMAP_THRESHOLD, trim_threshold=CHILD_TRIM_THRESHOLD, arena_max=CHILD_ARENA_MAX
    )


def main() -> None:
    """``python -m fluentforward.delivery``: the child of a ``DeliveryProcess`` (never run by hand)."""
    from fluentforward.app import tune_gc  # noqa: PLC0415

    # The protocol owns the original stdin and stdout; fd 1 becomes stderr so that a stray print can
    # never corrupt a message, and fd 0 reads nothing.
    protocol_in, protocol_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    os.nice(CHILD_NICENESS)
    tune_child_allocator()
    tune_gc()
    try:
        code = trio.run(_child_main, protocol_in, protocol_out)
    except KeyboardInterrupt:  # a SIGINT before trio's handler was installed
        code = EXIT_OK
    sys.exit(code)


if __name__ == "__main__":
    main()
