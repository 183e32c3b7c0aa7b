"""Micro-benchmark of ``fluentforward.ids.extract_trace_context`` (us per record).

Run: ``.venv/bin/python -m bench.micro_ids [iterations]``. Four typical records: a Kubernetes
record with ``trace_id``/``span_id`` fields, the same without any id, a JSON log line (Fluent
Bit ``Merge_Log`` off) and a logfmt text line. Timings use ``time.perf_counter`` over the whole
loop, in chunks (see CHUNKS).
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

from fluentforward.ids import extract_trace_context

ITERATIONS = 200_000
# The loop is timed in chunks and the fastest and the median chunk are reported: on a shared
# machine other processes only ever add time, so the fastest chunk is the closest to the cost.
# The least CPU time (time.process_time) of a chunk is printed too: it leaves out the time the
# process spent waiting for a core.
CHUNKS = 40

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
    "logfmt text line": {
        "log": 'level=info msg="processing order" trace_id=4bf92f3577b34da6a3ce929d0e0e4736 '
        "span_id=00f067aa0ba902b7\n",
        "stream": "stdout",
        "time": "2026-11-26T10:00:00.123456789Z",
        "kubernetes": _KUBERNETES,
    },
}


def per_record_us(record: dict[str, Any], iterations: int) -> tuple[float, float, float]:
    """Fastest and median wall-clock chunk, and fastest CPU-time chunk, in us per call."""
    chunk = max(1, iterations // CHUNKS)
    wall, cpu = [], []
    for _ in range(CHUNKS):
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(chunk):
            extract_trace_context(record)
        cpu.append((time.process_time() - start_cpu) / chunk * 1e6)
        wall.append((time.perf_counter() - start) / chunk * 1e6)
    return min(wall), statistics.median(wall), min(cpu)


def main() -> None:
    iterations = int(sys.argv[1]) if len(sys.argv) > 1 else ITERATIONS
    print(f"extract_trace_context: {iterations} iterations per record in {CHUNKS} chunks (us/record)")
    for name, record in RECORDS.items():
        ctx = extract_trace_context(record)
        best, median, cpu = per_record_us(record, iterations)
        source = "none" if ctx is None else ctx.source
        print(f"  {name:27} best {best:5.2f}  median {median:5.2f}  cpu {cpu:5.2f}  (source: {source})")


if __name__ == "__main__":
    main()
