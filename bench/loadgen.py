"""The load generator: Fluent Bit-shaped Forward traffic, acks on, one chunk in flight per connection.

``python -m bench.loadgen --port P [options]`` builds its frames first (so sending costs little CPU),
opens ``--connections`` connections, prints ``READY <monotonic>`` and sends for ``--warmup`` +
``--duration`` seconds. Each connection behaves like a Fluent Bit output worker: it sends one chunk,
waits for ``{"ack": chunk}``, then sends the next. The result is one JSON line on stdout.

Frames (built with ``fluentforward.client.FrameEncoder``, records from ``bench.records``):

* ``forward``: Fluent Bit v5's default, Forward mode with ``[[EventTime, {}], record]`` entries and
  options ``{chunk, size, fluent_signal: 0}``;
* ``packed``: PackedForward (Fluentd's out_forward shape, ``[EventTime, record]`` entries);
* ``gzip``: CompressedPackedForward with gzip, v2 entries (Fluent Bit ``compress gzip``);
* ``mixed``: connection *i* uses the modes above in turn.

Every frame of a connection holds one pod's records (a Fluent Bit chunk is one tag). A few distinct
frames per connection are built once and sent in rotation; each send gets a fresh chunk id, spliced
in without copying the frame (the id sits in the options map at the end: the bulk is written once,
then ``id + options tail``), so the server never sees a retry.

Measurement: the caller's window is ``[READY + warmup, READY + warmup + duration]`` on the shared
monotonic clock (``time.monotonic`` is system-wide on Linux), so it can sample the server's CPU at the
same instants. Records and bytes count when their ack arrives in the window; ack latency (first byte
sent to ack received) counts for chunks whose send starts in it.

Pacing: ``--rate`` records/s overall (0 = as fast as acks allow). Connections are staggered evenly over
the send interval, or all send at once with ``--aligned`` (the worst case for the server's memory). A
connection that falls behind sends at once but never bursts to catch up.
"""

from __future__ import annotations

import argparse
import base64
import math
import os
import resource
import sys
import time
from typing import Any

import attrs
import orjson
import trio

from bench.records import DEFAULT_SEED, Pod, make_pods, pod_records
from fluentforward.client import ForwardClient, Frame, FrameEncoder, open_connection
from fluentforward.errors import RemoteProtocolError, SinkUnavailable
from fluentforward.protocol import Entry, Mode

__all__ = [
    "MODES",
    "LoadResult",
    "LoadSpec",
    "SplitFrame",
    "build_frames",
    "main",
    "percentile",
    "run_load",
]

MODES = ("forward", "packed", "gzip")
# Fluent Bit flushes a chunk when it reaches ~2 MB; 1000 records of ~620 bytes is a 600 KB chunk.
DEFAULT_CHUNK_RECORDS = 1000
# Distinct frames each connection rotates through: enough that the same bytes do not repeat back to back.
FRAMES_PER_CONNECTION = 3
# After the window closes, outstanding acks get this long before the connection is dropped.
DRAIN_TIMEOUT = 10.0
# A connection that failed waits this long before reconnecting (the server may be restarting).
RECONNECT_DELAY = 0.5
# Latency samples kept (one per chunk); a 10-minute soak at 100 chunks/s stays far below.
MAX_LATENCY_SAMPLES = 1_000_000

_CHUNK_MARKER = bytes(range(0xE0, 0xF0))  # a recognisable placeholder chunk id (16 bytes)
_MARKER_B64 = base64.b64encode(_CHUNK_MARKER)


@attrs.frozen(kw_only=True)
class LoadSpec:
    """What load to apply.

    Attributes:
        host, port: the receiver.
        connections: concurrent connections, each with one chunk in flight.
        mode: ``forward``, ``packed``, ``gzip`` or ``mixed``.
        chunk_records: records per frame.
        rate: records/s over all connections; 0 sends as fast as acks come back.
        warmup: seconds sent before the measurement window.
        duration: the measurement window in seconds.
        aligned: all connections send at the same instants (rate mode only).
        seed: records seed.
    """

    host: str = "127.0.0.1"
    port: int
    connections: int = 8
    mode: str = "mixed"
    chunk_records: int = DEFAULT_CHUNK_RECORDS
    rate: float = 0.0
    warmup: float = 3.0
    duration: float = 10.0
    aligned: bool = False
    seed: int = DEFAULT_SEED


@attrs.frozen(kw_only=True)
class SplitFrame:
    """A frame cut around its chunk id: send ``head``, then ``id + tail``; ``records`` entries."""

    head: bytes
    tail: bytes
    records: int

    @property
    def size(self) -> int:
        """Bytes on the wire per send (the chunk id is 24 base64 characters)."""
        return len(self.head) + len(_MARKER_B64) + len(self.tail)


def _encoder(mode: str, chunk_records: int) -> FrameEncoder:
    common: dict[str, Any] = {
        "require_ack": True,
        "fluent_signal": 0,
        "batch_records": chunk_records,
        "random_bytes": lambda _n: _CHUNK_MARKER,
    }
    if mode == "forward":
        return FrameEncoder(mode=Mode.FORWARD, v2_entries=True, **common)
    if mode == "packed":
        return FrameEncoder(mode=Mode.PACKED, v2_entries=False, **common)
    if mode == "gzip":
        return FrameEncoder(mode=Mode.COMPRESSED, compression="gzip", v2_entries=True, **common)
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def _split(frame: Frame) -> SplitFrame:
    at = frame.data.rfind(_MARKER_B64)
    if at < 0:
        raise AssertionError("the placeholder chunk id is missing from the frame")
    return SplitFrame(head=frame.data[:at], tail=frame.data[at + len(_MARKER_B64) :], records=frame.records)


def build_frames(pod: Pod, mode: str, chunk_records: int, count: int, *, seed: int) -> list[SplitFrame]:
    """Build ``count`` distinct frames of ``chunk_records`` records of ``pod`` in ``mode``."""
    encoder = _encoder(mode, chunk_records)
    frames = []
    for n in range(count):
        records = pod_records(pod, chunk_records, seed=seed, start=n * chunk_records)
        entries = [
            Entry(time_ns=1_714_557_600_000_000_000 + (n * chunk_records + i) * 1_000_000, record=record)
            for i, record in enumerate(records)
        ]
        frames.append(_split(encoder.encode_batch(pod.tag, entries)))
    return frames


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-quantile (0..1) of already sorted values, nearest rank; NaN when empty."""
    if not sorted_values:
        return math.nan
    rank = max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[rank]


@attrs.define
class LoadResult:
    """Counters of one run (window figures only count inside the measurement window)."""

    ready: float = 0.0
    window_start: float = 0.0
    window_end: float = 0.0
    records_sent: int = 0
    chunks_acked: int = 0
    records_acked: int = 0
    window_records: int = 0
    window_bytes: int = 0
    window_chunks: int = 0
    latencies: list[float] = attrs.field(factory=list)
    errors: dict[str, int] = attrs.field(factory=dict)
    late_sends: int = 0
    frame_bytes: list[int] = attrs.field(factory=list)
    cpu_at_ready: float = 0.0  # our CPU seconds once the frames were built

    def error(self, text: str) -> None:
        """Count one connection error by its message."""
        self.errors[text] = self.errors.get(text, 0) + 1

    def summary(self, spec: LoadSpec) -> dict[str, Any]:
        """The JSON report."""
        window = self.window_end - self.window_start
        lat = sorted(self.latencies)
        cpu = _cpu_seconds()
        return {
            "spec": attrs.asdict(spec),
            "window_s": window,
            "window_start": self.window_start,
            "window_end": self.window_end,
            "records_per_s": self.window_records / window if window > 0 else 0.0,
            "mb_per_s": self.window_bytes / window / 1e6 if window > 0 else 0.0,
            "chunks_per_s": self.window_chunks / window if window > 0 else 0.0,
            "window_records": self.window_records,
            "records_sent": self.records_sent,
            "records_acked": self.records_acked,
            "chunks_acked": self.chunks_acked,
            "ack_ms": {
                "samples": len(lat),
                "p50": percentile(lat, 0.50) * 1e3,
                "p90": percentile(lat, 0.90) * 1e3,
                "p99": percentile(lat, 0.99) * 1e3,
                "max": (lat[-1] * 1e3) if lat else math.nan,
            },
            "late_sends": self.late_sends,
            "frame_bytes_mean": sum(self.frame_bytes) / len(self.frame_bytes) if self.frame_bytes else 0,
            "errors": self.errors,
            # CPU spent sending and waiting for acks (building the frames came before READY).
            "loadgen_cpu_s": cpu - self.cpu_at_ready,
            "loadgen_cpu_cores": (cpu - self.cpu_at_ready) / (self.window_end - self.ready),
            "loadgen_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }


async def _connection(
    index: int, spec: LoadSpec, frames: list[SplitFrame], result: LoadResult, start: float
) -> None:
    end = result.window_end
    interval = 0.0
    if spec.rate > 0:
        interval = spec.connections * frames[0].records / spec.rate
    next_send = start + (0.0 if spec.aligned or interval == 0 else interval * index / spec.connections)
    n = index  # start connections on different frames
    while time.monotonic() < end:
        try:
            stream = await open_connection(spec.host, spec.port)
        except SinkUnavailable as exc:
            result.error(str(exc))
            await trio.sleep(RECONNECT_DELAY)
            continue
        client = ForwardClient(stream, ack_timeout=60.0, send_timeout=60.0, max_in_flight=1)
        try:
            while True:
                now = time.monotonic()
                if interval:
                    if next_send > now:
                        await trio.sleep(next_send - now)
                    elif now - next_send > interval:
                        result.late_sends += 1
                        next_send = now  # behind by a whole interval: restart the schedule, no burst
                    next_send += interval
                t0 = time.monotonic()
                if t0 >= end:
                    break
                frame = frames[n % len(frames)]
                n += 1
                chunk = base64.b64encode(os.urandom(16))
                result.records_sent += frame.records
                await client.send(Frame(data=frame.head))  # no chunk: returns once written
                await client.send(Frame(data=chunk + frame.tail, chunk=chunk.decode()))  # waits for ack
                t1 = time.monotonic()
                result.chunks_acked += 1
                result.records_acked += frame.records
                if result.window_start <= t1 <= end:
                    result.window_records += frame.records
                    result.window_bytes += frame.size
                    result.window_chunks += 1
                if result.window_start <= t0 < end and len(result.latencies) < MAX_LATENCY_SAMPLES:
                    result.latencies.append(t1 - t0)
        except (SinkUnavailable, RemoteProtocolError) as exc:
            result.error(str(exc))
            await trio.sleep(RECONNECT_DELAY)
        finally:
            await client.aclose()


async def run_load(
    spec: LoadSpec, *, on_ready: Any = None, frames: dict[int, list[SplitFrame]] | None = None
) -> LoadResult:
    """Apply ``spec``'s load; return its counters. ``on_ready(monotonic)`` is called before sending.

    Args:
        spec: the load.
        on_ready: called with the start time once the frames are built.
        frames: prebuilt frames per connection index (default: built here).
    """
    if frames is None:
        frames = frames_for(spec)
    result = LoadResult()
    result.frame_bytes = [f.size for fs in frames.values() for f in fs]
    # time.monotonic(), not trio.current_time() (which has a random offset): the caller samples the
    # server's CPU on the same clock.
    start = time.monotonic()
    result.ready = start
    result.cpu_at_ready = _cpu_seconds()
    result.window_start = start + spec.warmup
    result.window_end = result.window_start + spec.duration
    if on_ready is not None:
        on_ready(start)
    async with trio.open_nursery() as nursery:
        # Connections stop sending at window_end; their last acks get DRAIN_TIMEOUT.
        nursery.cancel_scope.deadline = trio.current_time() + spec.warmup + spec.duration + DRAIN_TIMEOUT
        for index in range(spec.connections):
            nursery.start_soon(_connection, index, spec, frames[index], result, start)
    return result


def frames_for(spec: LoadSpec) -> dict[int, list[SplitFrame]]:
    """Build the frames of every connection (connections of the same pod and mode share them)."""
    pods = make_pods(spec.seed)
    cache: dict[tuple[int, str], list[SplitFrame]] = {}
    out = {}
    for index in range(spec.connections):
        mode = MODES[index % len(MODES)] if spec.mode == "mixed" else spec.mode
        key = (index % len(pods), mode)
        if key not in cache:
            cache[key] = build_frames(
                pods[key[0]], mode, spec.chunk_records, FRAMES_PER_CONNECTION, seed=spec.seed
            )
        out[index] = cache[key]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--mode", choices=(*MODES, "mixed"), default="mixed")
    parser.add_argument("--chunk-records", type=int, default=DEFAULT_CHUNK_RECORDS)
    parser.add_argument("--rate", type=float, default=0.0, help="records/s overall; 0 = as fast as acked")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--aligned", action="store_true", help="all connections send at the same instants")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    spec = LoadSpec(
        host=args.host,
        port=args.port,
        connections=args.connections,
        mode=args.mode,
        chunk_records=args.chunk_records,
        rate=args.rate,
        warmup=args.warmup,
        duration=args.duration,
        aligned=args.aligned,
        seed=args.seed,
    )
    frames = frames_for(spec)

    def ready(start: float) -> None:
        print(f"READY {start!r}", flush=True)

    result = trio.run(lambda: run_load(spec, on_ready=ready, frames=frames))
    sys.stdout.write(orjson.dumps(result.summary(spec)).decode() + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
