"""Micro-benchmark of record shaping: ``.venv/bin/python -m bench.micro_records``.

Prints microseconds per call for typical records (Fluent Bit tail + kubernetes filter, the same
with Merge_Log, an OTLP event inside a group) and for ``jsonable``. Figures are CPU time, indicative only.
"""

from __future__ import annotations

import time
import timeit

from fluentforward.ids import TraceContext
from fluentforward.protocol._events import Entry
from fluentforward.records import LineFormat, Shaper, build_rules, jsonable

KUBERNETES = {
    "pod_name": "checkout-7d9f8b6c5d-x2x9q",
    "namespace_name": "shop",
    "pod_id": "3f1c2a9e-5b7d-4c1e-9f0a-6e2d8c4b1a7f",
    "labels": {
        "app.kubernetes.io/name": "checkout",
        "app.kubernetes.io/instance": "checkout-prod",
        "pod-template-hash": "7d9f8b6c5d",
    },
    "annotations": {"kubectl.kubernetes.io/restartedAt": "2024-05-01T10:00:00Z"},
    "host": "worker-3",
    "container_name": "checkout",
    "docker_id": "9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b",
    "container_hash": "registry.example.com/shop/checkout@sha256:0123456789abcdef",
    "container_image": "registry.example.com/shop/checkout:1.4.2",
}
TAIL = {
    "log": "2024-05-01T10:00:00.123Z INFO order placed id=A-1001 amount=19.99 user=42\n",
    "stream": "stdout",
    "time": "2024-05-01T10:00:00.123456789Z",
    "_p": "F",
    "kubernetes": KUBERNETES,
}
MERGED = {
    **TAIL,
    "level": "info",
    "msg": "order placed",
    "order_id": "A-1001",
    "amount": 19.99,
    "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
}
OTLP_GROUP = {
    "resource": {"attributes": {"service.name": "checkout", "k8s.namespace.name": "shop"}},
    "scope": {"name": "checkout.logger"},
}
OTLP_METADATA = {
    "otlp": {
        "severity_text": "INFO",
        "severity_number": 9,
        "attributes": {"order.id": "A-1001"},
        "trace_id": bytes(range(16)),
        "span_id": bytes(range(8)),
    }
}
TRACE = TraceContext(
    trace_id="4bf92f3577b34da6a3ce929d0e0e4736", span_id="00f067aa0ba902b7", source="trace_id"
)


def _measure(label: str, func: object, number: int = 100_000) -> None:
    # CPU time, not wall time: the benchmark host is shared, and descheduled time is not ours.
    timer = timeit.Timer(func, timer=time.process_time)  # type: ignore[arg-type]
    seconds = min(timer.repeat(number=number, repeat=7))
    print(f"{label:<44} {seconds / number * 1e6:6.2f} us")


def main() -> None:
    shaper = Shaper(rules=build_rules(cluster="prod"))
    json_shaper = Shaper(rules=build_rules(cluster="prod", line_format=LineFormat.JSON))
    kv_shaper = Shaper(rules=build_rules(cluster="prod", line_format=LineFormat.KEY_VALUE))
    tail = Entry(time_ns=1_714_557_600_123_456_789, record=TAIL)
    merged = Entry(time_ns=1_714_557_600_123_456_789, record=MERGED)
    otlp = Entry(time_ns=1, record={"log": "order placed"}, metadata=OTLP_METADATA, group=OTLP_GROUP)
    tag = "kube.var.log.containers.checkout-7d9f8b6c5d-x2x9q_shop_checkout-9a8b.log"

    _measure("shape: tail+k8s, auto (text line)", lambda: shaper.shape(tag, tail, TRACE))
    _measure("shape: tail+k8s, no trace", lambda: shaper.shape(tag, tail, None))
    _measure("shape: Merge_Log, auto (JSON line)", lambda: shaper.shape(tag, merged, TRACE))
    _measure("shape: Merge_Log, json", lambda: json_shaper.shape(tag, merged, TRACE))
    _measure("shape: Merge_Log, key_value", lambda: kv_shaper.shape(tag, merged, TRACE))
    _measure("shape: OTLP event in group", lambda: shaper.shape("v1_logs", otlp, TRACE))
    _measure("jsonable: OTLP metadata (bytes ids)", lambda: jsonable(OTLP_METADATA))
    _measure("jsonable: tail+k8s record", lambda: jsonable(TAIL))


if __name__ == "__main__":
    main()
