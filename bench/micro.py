"""Micro-benchmarks of the hot paths, in-process: ``python -m bench.micro [--quick]``.

* decoder: the receive path (``ServerConnection.receive_data`` fed 64 KiB at a time, as the server
  reads) and the delivery path (``decode_frame``) per carrier mode, next to the floor's full msgpack
  decode of the same frame;
* trace ids: ``extract_trace_context`` over the benchmark's record mix, per logging style, plus the
  fixed records of ``bench.micro_ids``;
* Loki: ``Shaper.shape`` and ``encode_push_protobuf`` / ``encode_push_json`` over 1 MiB batches, and
  shaping + batching + protobuf both ways: ``shape_event`` + ``batches_by_tenant`` + ``encode_push_protobuf``
  (``shape_batch_protobuf_us``) and the shipper's fused ``Shaper.encode_events`` + ``PushBuffer.batches``
  + ``EncodedBatch.encode_protobuf`` (``encode_events_us``);
* delivery path: decode + extract + shape + encode per record, i.e. the shipper's CPU before HTTP
  (``<mode>``: through ``Entry`` and ``LokiEntry`` values as before; ``<mode>_shipper``: what
  ``pipeline.Shipper`` runs, ``Transformer.encode`` into a ``PushBuffer`` then the batches' bodies);
* delivery stages on the throughput scenario's own frames (its eight pods and three modes, not one
  pod): ``decode_frame``, then ``extract_trace_context`` on top, then the whole shipper's encoding
  (``stages``); what each stage adds is what ``bench.run`` sets against the CPU target's budget;
* spool: ``Spool.append`` of 1 MB frames with an fsync per batch, 1 to 32 concurrent appenders.

CPU-bound figures use ``time.process_time`` and keep the best of several repeats: on a shared machine
other processes only ever add time. The spool figures are wall-clock (the fsync is the cost).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import msgpack
import trio

from bench.floor import decode_request
from bench.loadgen import MODES, LoadSpec, SplitFrame, build_frames, frames_for
from bench.records import make_pods, make_records
from fluentforward.app import tune_gc
from fluentforward.ids import extract_trace_context
from fluentforward.protocol import Entry, Mode, ServerConnection, Signal, decode_frame
from fluentforward.records import Shaper, build_rules
from fluentforward.server import RECEIVE_BYTES
from fluentforward.spool import FrameHeader, Spool, SpoolSettings

__all__ = [
    "bench_decoder",
    "bench_delivery",
    "bench_delivery_stages",
    "bench_ids",
    "bench_loki",
    "bench_spool",
    "run_micro",
]

try:  # another engineer's module; optional so this file never breaks on its absence
    from fluentforward.pipeline import batches_by_tenant
    from fluentforward.sinks.loki import PushBuffer, encode_push_json, encode_push_protobuf
except ImportError:  # pragma: no cover
    encode_push_json = encode_push_protobuf = None  # type: ignore[assignment]

CHUNK_RECORDS = 1000
# Loki batches close at 1 MiB of line bytes; about 2000 of our lines.
LOKI_BATCH_RECORDS = 2000
SPOOL_FRAME_BYTES = 1 << 20
_MODE_NAMES = {"forward": Mode.FORWARD, "packed": Mode.PACKED, "gzip": Mode.COMPRESSED}


def _best_cpu(func: Callable[[], object], repeat: int) -> float:
    """Fewest CPU seconds of ``repeat`` calls of ``func``."""
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        func()
        best = min(best, time.process_time() - start)
    return best


def _whole(frame: SplitFrame) -> bytes:
    """The frame as sent, with a chunk id (any 24-character base64 id) in its place."""
    return frame.head + b"4OHi4+Tl5ufo6err7O3u7w==" + frame.tail


def _frame_bytes(mode: str) -> tuple[bytes, int]:
    pod = make_pods()[0]
    frame = build_frames(pod, mode, CHUNK_RECORDS, 1, seed=1)[0]
    return _whole(frame), frame.records


def _ship_encoded(shaper: Shaper, frames: Iterable[bytes], sources: collections.Counter[str]) -> None:
    """What ``pipeline.Shipper`` runs before HTTP: ``decode_frame``, ``Shaper.encode_events`` into a
    ``PushBuffer`` (with ``extract_trace_context``, bare, as ``pipeline.Transformer`` passes it), then
    every batch's protobuf body."""
    buffer = PushBuffer()
    for data in frames:
        frame = decode_frame(data)
        shaper.encode_events(frame.tag, frame.events, extract_trace_context, buffer, sources)
    for batch in buffer.batches(1 << 20):
        batch.encode_protobuf()


def bench_decoder(repeat: int) -> list[dict[str, Any]]:
    """Microseconds per record of the receive path, the delivery decode and the floor, per mode."""
    rows = []
    for mode in MODES:
        data, records = _frame_bytes(mode)

        def receive(data: bytes = data) -> None:
            conn = ServerConnection()
            for at in range(0, len(data), RECEIVE_BYTES):
                conn.receive_data(data[at : at + RECEIVE_BYTES])

        def deliver(data: bytes = data) -> None:
            decode_frame(data)

        def floor(data: bytes = data) -> None:
            unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=len(data))
            for at in range(0, len(data), RECEIVE_BYTES):
                unpacker.feed(data[at : at + RECEIVE_BYTES])
                for request in unpacker:
                    decode_request(request)

        rows.append(
            {
                "mode": mode,
                "frame_bytes": len(data),
                "records": records,
                "receive_us": _best_cpu(receive, repeat) / records * 1e6,
                "decode_frame_us": _best_cpu(deliver, repeat) / records * 1e6,
                "floor_us": _best_cpu(floor, repeat) / records * 1e6,
            }
        )
    return rows


def bench_ids(count: int, repeat: int) -> dict[str, Any]:
    """Microseconds per record of ``extract_trace_context`` over the record mix and per style."""
    pairs = make_records(count)
    records = [record for _, record in pairs]
    by_style: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for pod, record in pairs:
        by_style[pod.style].append(record)

    def run(batch: list[dict[str, Any]]) -> Callable[[], None]:
        return lambda: [extract_trace_context(r) for r in batch] and None

    found = sum(extract_trace_context(r) is not None for r in records)
    out: dict[str, Any] = {
        "mix_us": _best_cpu(run(records), repeat) / len(records) * 1e6,
        "with_id_share": found / len(records),
        "styles": {
            style: _best_cpu(run(batch), repeat) / len(batch) * 1e6
            for style, batch in sorted(by_style.items())
        },
    }
    try:
        from bench import micro_ids  # noqa: PLC0415 (another engineer's module; optional)
    except ImportError:  # pragma: no cover
        return out
    out["micro_ids"] = {
        name: micro_ids.per_record_us(record, 20_000 * repeat)[0]
        for name, record in micro_ids.RECORDS.items()
    }
    return out


def _decoded_entries(count: int) -> list[tuple[str, Any]]:
    pairs = make_records(count)
    return [(pod.tag, record) for pod, record in pairs]


def bench_loki(repeat: int) -> dict[str, Any]:
    """Microseconds per entry of shaping and of the protobuf and JSON push encoders (1 MiB batches)."""
    shaper = Shaper(rules=build_rules(cluster="bench"))
    # Grouped by container, as Forward chunks arrive (one tag per chunk).
    decoded = sorted(
        (
            (tag, Entry(time_ns=1_714_557_600_000_000_000 + i, record=record))
            for i, (tag, record) in enumerate(_decoded_entries(LOKI_BATCH_RECORDS))
        ),
        key=lambda pair: pair[0],
    )
    traces = [extract_trace_context(entry.record) for _, entry in decoded]
    n = len(decoded)
    shaped = [shaper.shape(tag, entry, trace) for (tag, entry), trace in zip(decoded, traces, strict=True)]
    out: dict[str, Any] = {
        "batch_entries": n,
        "line_bytes": sum(len(e.line) for e in shaped),
        "shape_us": _best_cpu(
            lambda: [shaper.shape(t, e, c) for (t, e), c in zip(decoded, traces, strict=True)], repeat
        )
        / n
        * 1e6,
    }
    if encode_push_protobuf is not None:
        body = encode_push_protobuf(shaped)
        out["streams"] = body.streams
        out["protobuf_body_bytes"] = len(body.body)
        out["protobuf_us"] = _best_cpu(lambda: encode_push_protobuf(shaped), repeat) / n * 1e6
        out["json_us"] = _best_cpu(lambda: encode_push_json(shaped), repeat) / n * 1e6
        out.update(_bench_shape_and_encode(decoded, traces, repeat))
    return out


def _bench_shape_and_encode(
    decoded: list[tuple[str, Entry]], traces: list[Any], repeat: int
) -> dict[str, float]:
    """Shaping + batching + protobuf bodies, the LokiEntry way and the shipper's fused way.

    Both get each record's trace context from the same lookup (a dict by record id), so the figures
    differ only by the path. Runs of one tag are passed as one call, as a frame is.
    """
    runs: list[tuple[str, list[Any]]] = []
    for tag, entry in decoded:
        if not runs or runs[-1][0] != tag:
            runs.append((tag, []))
        runs[-1][1].append((entry.time_ns, entry.record, entry.metadata, entry.group))
    by_record = {id(entry.record): trace for (_, entry), trace in zip(decoded, traces, strict=True)}

    def find(record: Any, _metadata: Any) -> Any:
        return by_record[id(record)]

    n = len(decoded)
    old_shaper = Shaper(rules=build_rules(cluster="bench"))
    new_shaper = Shaper(rules=build_rules(cluster="bench"))

    def entries_way() -> None:
        shape = old_shaper.shape_event
        entries = [shape(tag, t, r, m, g, find(r, m)) for tag, events in runs for t, r, m, g in events]
        for batch in batches_by_tenant(entries, 1 << 20):
            encode_push_protobuf(batch.entries)

    def fused_way() -> None:
        buffer = PushBuffer()
        for tag, events in runs:
            new_shaper.encode_events(tag, events, find, buffer)
        for batch in buffer.batches(1 << 20):
            batch.encode_protobuf()

    return {
        "shape_batch_protobuf_us": _best_cpu(entries_way, repeat) / n * 1e6,
        "encode_events_us": _best_cpu(fused_way, repeat) / n * 1e6,
    }


def bench_delivery(repeat: int) -> dict[str, Any]:
    """Microseconds per record of the shipper's CPU work before HTTP, per mode, on 1000-record frames.

    ``<mode>``: decode_frame + extract_trace_context + Shaper.shape + encode_push_protobuf (the path
    through ``LokiEntry`` values). ``<mode>_shipper``: decode_frame + Shaper.encode_events (with
    extract_trace_context) + PushBuffer.batches + EncodedBatch.encode_protobuf (``pipeline.Shipper``'s).
    """
    shaper = Shaper(rules=build_rules(cluster="bench"))
    fused = Shaper(rules=build_rules(cluster="bench"))
    sources: collections.Counter[str] = collections.Counter()
    out = {}
    for mode in MODES:
        data, records = _frame_bytes(mode)

        def ship(data: bytes = data) -> None:
            frame = decode_frame(data)
            entries = [
                shaper.shape(frame.tag, e, extract_trace_context(e.record, e.metadata)) for e in frame.entries
            ]
            if encode_push_protobuf is not None:
                encode_push_protobuf(entries)

        def shipper(data: bytes = data) -> None:
            _ship_encoded(fused, (data,), sources)

        out[mode] = _best_cpu(ship, repeat) / records * 1e6
        if encode_push_protobuf is not None:
            out[f"{mode}_shipper"] = _best_cpu(shipper, repeat) / records * 1e6
    return out


def _load_frames() -> list[bytes]:
    """Every distinct frame the throughput scenario's load generator sends (8 connections, mixed)."""
    spec = LoadSpec(port=0, connections=8, mode="mixed", chunk_records=CHUNK_RECORDS)
    return [_whole(frame) for frames in frames_for(spec).values() for frame in frames]


def bench_delivery_stages(repeat: int) -> dict[str, float]:
    """Microseconds per record of the delivery path in cumulative stages, on the throughput load's frames.

    ``decode_us``: ``decode_frame``; ``ids_us``: plus ``extract_trace_context`` per event;
    ``shipper_us``: what ``pipeline.Shipper`` runs before HTTP (``Transformer.encode`` into a
    ``PushBuffer``, then every batch's protobuf body, snappy included).
    """
    frames = _load_frames()
    records = sum(len(decode_frame(data).events) for data in frames)

    def decode() -> None:
        for data in frames:
            decode_frame(data)

    def ids() -> None:
        for data in frames:
            for _time_ns, record, metadata, _group in decode_frame(data).events:
                extract_trace_context(record, metadata)

    def shipper() -> None:
        _ship_encoded(Shaper(rules=build_rules()), frames, collections.Counter())

    return {
        "frames": len(frames),
        "records": records,
        "decode_us": _best_cpu(decode, repeat) / records * 1e6,
        "ids_us": _best_cpu(ids, repeat) / records * 1e6,
        "shipper_us": _best_cpu(shipper, repeat) / records * 1e6,
    }


async def _spool_round(directory: Path, appenders: int, appends_each: int) -> dict[str, Any]:
    spool = Spool.open(SpoolSettings(directory=directory, max_bytes=1 << 40))
    frame = b"\x00" * SPOOL_FRAME_BYTES
    latencies: list[float] = []

    async def appender(index: int) -> None:
        for n in range(appends_each):
            header = FrameHeader(
                recv_time_ns=0,
                signal=Signal.LOGS,
                mode=Mode.PACKED,
                peer="127.0.0.1:1",
                chunk=f"{index}-{n}",
                tag="bench",
                source_key="",
                record_count=1600,
            )
            t0 = time.perf_counter()
            await spool.append(header, frame)
            latencies.append(time.perf_counter() - t0)

    try:
        async with trio.open_nursery() as outer:
            await outer.start(spool.run)
            cpu0, wall0 = time.process_time(), time.perf_counter()
            async with trio.open_nursery() as nursery:
                for index in range(appenders):
                    nursery.start_soon(appender, index)
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            outer.cancel_scope.cancel()
    finally:
        spool.close()
    total = appenders * appends_each
    latencies.sort()
    return {
        "appenders": appenders,
        "appends_per_s": total / wall,
        "mb_per_s": total * SPOOL_FRAME_BYTES / wall / 1e6,
        "fsyncs": spool.fsync_count,
        "append_ms_p50": statistics.median(latencies) * 1e3,
        "append_ms_p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e3,
        "cpu_ms_per_mb": cpu / (total * SPOOL_FRAME_BYTES / 1e6) * 1e3,
    }


def bench_spool(appends: int, parent: Path | None = None) -> list[dict[str, Any]]:
    """Spool appends of 1 MB frames, fsync per batch, with 1, 8 and 32 concurrent appenders."""
    rows = []
    for appenders in (1, 8, 32):
        directory = Path(tempfile.mkdtemp(prefix="ffbench-spool-micro-", dir=parent))
        try:
            rows.append(trio.run(_spool_round, directory, appenders, max(1, appends // appenders)))
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    return rows


def run_micro(
    quick: bool = False, *, spool_parent: Path | None = None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run every micro-benchmark; ``log`` gets one line per figure as it is measured."""
    # The collector settings of a running server: with CPython's defaults, collections of the frames
    # decoded by earlier repeats make every figure noisier and larger than the server's.
    tune_gc()
    repeat = 3 if quick else 7
    out: dict[str, Any] = {}
    log("micro: decoder (us/record; receive = ServerConnection.receive_data, 64 KiB reads)")
    out["decoder"] = bench_decoder(repeat)
    for row in out["decoder"]:
        log(
            f"  {row['mode']:8} receive {row['receive_us']:5.2f}  decode_frame {row['decode_frame_us']:5.2f}"
            f"  floor {row['floor_us']:5.2f}  ({row['frame_bytes'] / 1e3:.0f} kB frame)"
        )
    log("micro: extract_trace_context (us/record)")
    out["ids"] = bench_ids(2000 if quick else 10_000, repeat)
    log(f"  mix {out['ids']['mix_us']:.2f} ({out['ids']['with_id_share']:.0%} with an id)")
    for style, us in out["ids"]["styles"].items():
        log(f"    {style:12} {us:5.2f}")
    for name, us in out["ids"].get("micro_ids", {}).items():
        log(f"    micro_ids: {name:28} {us:5.2f}")
    log("micro: Loki (us/entry, 1 MiB batches)")
    out["loki"] = bench_loki(repeat)
    log("  " + "  ".join(f"{k} {v:.2f}" for k, v in out["loki"].items() if k.endswith("_us")))
    log("micro: delivery path = decode_frame + ids + shape + protobuf (us/record; _shipper: fused path)")
    out["delivery"] = bench_delivery(repeat)
    log("  " + "  ".join(f"{k} {v:.2f}" for k, v in out["delivery"].items()))
    log("micro: delivery stages on the throughput load's frames (us/record, cumulative)")
    stages = out["delivery_stages"] = bench_delivery_stages(repeat)
    log(
        f"  decode_frame {stages['decode_us']:.2f}  + ids {stages['ids_us']:.2f}"
        f"  whole shipper {stages['shipper_us']:.2f}  ({stages['records']} records)"
    )
    log("micro: spool append, 1 MB frames, fsync per batch")
    out["spool"] = bench_spool(32 if quick else 128, spool_parent)
    for row in out["spool"]:
        log(
            f"  {row['appenders']:3} appenders: {row['mb_per_s']:6.0f} MB/s  {row['appends_per_s']:5.0f}/s"
            f"  p50 {row['append_ms_p50']:6.1f} ms  p99 {row['append_ms_p99']:6.1f} ms  fsyncs {row['fsyncs']}"
        )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.micro", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    run_micro(args.quick)
    sys.exit(0)


if __name__ == "__main__":
    main()
