"""Micro-benchmark of ``fluentforward.ids.extract_trace_context`` (us per record).

Run: ``.venv/bin/python -m bench.micro_ids [iterations]``. Five typical records: a Kubernetes
record with ``trace_id``/``span_id`` fields, the same without any id, a JSON log line (Fluent
Bit ``Merge_Log`` off) with ids and one without, and a logfmt text line; then the benchmark's mix
(``bench.records``: seven logging styles, about 30 % of records without an id).

Timings use ``time.perf_counter`` over a loop of calls, in chunks (see CHUNKS). The rows take
turns chunk by chunk, so a slow spell of a shared machine falls on all rows alike instead of on
whichever row was running then.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

from bench.records import make_records
from fluentforward.ids import extract_trace_context

ITERATIONS = 200_000
# The loop is timed in chunks and the fastest and the median chunk are reported: on a shared
# machine other processes only ever add time, so the fastest chunk is the closest to the cost.
# The least CPU time (time.process_time) of a chunk is printed too: it leaves out the time the
# process spent waiting for a core.
CHUNKS = 40
# Records of the mix row: enough for every style and pod, few enough to stay in the CPU caches
# as the single records do.
MIX_RECORDS = 2000
MIX_ROW = "record mix (bench.records)"

_KUBERNETES = {
    "pod_name": "checkout-7d9f8c6b5-x2kqp",
    "namespace_name": "shop",
    "pod_id": "3f1c2a9e-1b7d-4c1e-9a55-0c9d8e7f6a5b",
    "labels": {"app": "checkout", "pod-template-hash": "7d9f8c6b5"},
    "host": "node-3",
    "container_name": "checkout",
    "docker_id": "4e1b5c0d9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c",
    "container_image": "registry.example.com/shop/checkout:1.4.2",
}

RECORDS: dict[str, dict[str, Any]] = {
    "k8s with trace_id/span_id": {
        "log": "processing order 1234 for customer 42",
        "stream": "stdout",
        "time": "2026-11-26T10:00:00.123456789Z",
        "kubernetes": _KUBERNETES,
        "level": "info",
        "logger": "app.orders",
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "span_id": "00f067aa0ba902b7",
        "trace_flags": "01",
        "service": "checkout",
    },
    "k8s without any id": {
        "log": "GET /healthz 200 0.4ms user-agent=kube-probe/1.30",
        "stream": "stdout",
        "time": "2026-11-26T10:00:00.123456789Z",
        "kubernetes": _KUBERNETES,
        "level": "info",
        "logger": "app.http",
        "method": "GET",
        "path": "/healthz",
        "status": 200,
        "service": "checkout",
    },
    "JSON in log": {
        "log": '{"level": "info", "msg": "processing order", "trace_id": '
        '"4bf92f3577b34da6a3ce929d0e0e4736", "span_id": "00f067aa0ba902b7"}\n',
        "stream": "stdout",
        "time": "2026-11-26T10:00:00.123456789Z",
        "kubernetes": _KUBERNETES,
    },
    "JSON in log without ids": {
        "log": '{"level": "info", "msg": "GET /healthz 200", "duration_ms": 0.4}\n',
        "stream": "stdout",
        "time": "2026-11-26T10:00:00.123456789Z",
        "kubernetes": _KUBERNETES,
    },
    "logfmt text line": {
        "log": 'level=info msg="processing order" trace_id=4bf92f3577b34da6a3ce929d0e0e4736 '
        "span_id=00f067aa0ba902b7\n",
        "stream": "stdout",
        "time": "2026-11-26T10:00:00.123456789Z",
        "kubernetes": _KUBERNETES,
    },
}


def time_rows(
    rows: dict[str, list[dict[str, Any]]], iterations: int
) -> dict[str, tuple[float, float, float]]:
    """Fastest and median wall-clock chunk, and fastest CPU-time chunk, in us per call, per row.

    Args:
        rows: the records of each row; a chunk calls ``extract_trace_context`` on them in turn,
            from the start again when they run out.
        iterations: calls per row, split into CHUNKS chunks.

    Returns:
        ``(best, median, best_cpu)`` per row name.
    """
    chunk = max(1, iterations // CHUNKS)
    batches = {name: [records[i % len(records)] for i in range(chunk)] for name, records in rows.items()}
    wall: dict[str, list[float]] = {name: [] for name in rows}
    cpu: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(CHUNKS):
        for name, batch in batches.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            for record in batch:
                extract_trace_context(record)
            cpu[name].append((time.process_time() - start_cpu) / chunk * 1e6)
            wall[name].append((time.perf_counter() - start) / chunk * 1e6)
    return {name: (min(wall[name]), statistics.median(wall[name]), min(cpu[name])) for name in rows}


def per_record_us(record: dict[str, Any], iterations: int) -> tuple[float, float, float]:
    """Fastest and median wall-clock chunk, and fastest CPU-time chunk, in us per call."""
    return time_rows({"record": [record]}, iterations)["record"]


def main() -> None:
    iterations = int(sys.argv[1]) if len(sys.argv) > 1 else ITERATIONS
    print(f"extract_trace_context: {iterations} iterations per row in {CHUNKS} chunks (us/record)")
    rows = {name: [record] for name, record in RECORDS.items()}
    rows[MIX_ROW] = [record for _, record in make_records(MIX_RECORDS)]
    for records in rows.values():  # warm the key caches, as a running shipper has them
        for record in records:
            extract_trace_context(record)
    for name, (best, median, cpu) in time_rows(rows, iterations).items():
        if name in RECORDS:
            ctx = extract_trace_context(RECORDS[name])
            source = "none" if ctx is None else ctx.source
        else:
            found = sum(extract_trace_context(record) is not None for record in rows[name])
            source = f"{found / len(rows[name]):.0%} with ids"
        print(f"  {name:27} best {best:5.2f}  median {median:5.2f}  cpu {cpu:5.2f}  (source: {source})")


if __name__ == "__main__":
    main()
