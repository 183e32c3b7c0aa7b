"""Deterministic, realistic Fluent Bit ``tail`` + ``kubernetes`` records for the benchmarks.

Every record looks like what Fluent Bit v5 forwards from a node: ``log`` (the container's line,
``Merge_Log`` off), ``stream``, ``time`` (the CRI timestamp), ``_p`` (CRI partial flag) and the
``kubernetes`` map the filter adds (pod_name, namespace_name, pod_id, labels, annotations on some pods,
host, container_name, docker_id, container_hash, container_image).

Log lines come from a fixed set of services, each with the logging style of a real stack:

============  ===========================================  =============================
style         line                                         trace id spelling
============  ===========================================  =============================
zap           Go zap JSON                                  ``trace_id`` / ``span_id``
structlog     Python structlog JSON                        ``traceId`` / ``spanId``
log4j2        Java log4j2 JsonTemplateLayout               ``traceparent``
datadog       Java/Python with dd-trace, JSON              ``dd.trace_id`` (decimal)
otel-python   Python logging + OTel instrumentation, JSON  ``otelTraceID`` / ``otelSpanID``
logfmt        Go/Ruby logfmt text                          ``trace_id=`` in text
nginx         access log text                              none
============  ===========================================  =============================

Instrumented services log without a trace context a fifth of the time (health checks, start-up,
background jobs); with the id-free nginx traffic, about 30 % of all records carry no id.

Invariants: the same ``seed`` always gives the same records (``random.Random`` only, no clock, no
global state). Each record's target msgpack size is drawn from ``RECORD_BYTES`` and the message text
is padded with words to reach it; a record whose fixed part (kubernetes map, ids) is already larger
keeps its natural size, so records are 530-660 bytes, about 620 on average.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from typing import Any

import attrs
import msgpack
import orjson

__all__ = [
    "DEFAULT_SEED",
    "NO_ID_SHARE",
    "NO_ID_SHARE_TOTAL",
    "RECORD_BYTES",
    "STYLES",
    "Pod",
    "make_pods",
    "make_records",
    "pod_records",
    "record_size_stats",
]

DEFAULT_SEED = 20240501
# Target msgpack size of a record, drawn uniformly per record. The records are "500-600 bytes"
# and the floor was measured at 600; the kubernetes map alone is 380-440 bytes, so a line carrying a
# trace id rarely fits under 560 and the records come out at about 620 bytes on average (530-660).
RECORD_BYTES = (520, 620)
# Share of lines an instrumented service writes outside any span (health checks, start-up, cron).
NO_ID_SHARE = 0.2
# Base of the synthetic clock: records are 1 ms apart from here (fixed, so runs are reproducible).
BASE_TIME_NS = 1_714_557_600_000_000_000
_STEP_NS = 1_000_000

_MESSAGES = (
    "order placed",
    "payment authorized",
    "request completed",
    "cache miss, loading from store",
    "inventory reserved",
    "session renewed",
    "batch flushed to queue",
    "upstream call succeeded",
)
# Padding words, taken from the messages so padded lines read like the others.
_WORDS = tuple(word.strip(",") for message in _MESSAGES for word in message.split())
_ROUTES = ("/api/v1/orders", "/api/v1/cart", "/healthz", "/api/v1/users/42", "/metrics", "/static/app.js")

# (service, namespace, style, share of traffic). Shares sum to 1; nginx is 12 % of the traffic, which
# with NO_ID_SHARE of the other 88 % makes about 30 % of records id-free.
_SERVICES: tuple[tuple[str, str, str, float], ...] = (
    ("checkout", "shop", "zap", 0.16),
    ("cart", "shop", "structlog", 0.14),
    ("payments", "billing", "log4j2", 0.14),
    ("invoices", "billing", "datadog", 0.14),
    ("recommend", "ml", "otel-python", 0.14),
    ("gateway", "edge", "logfmt", 0.16),
    ("ingress", "edge", "nginx", 0.12),
)
STYLES = tuple(sorted({style for _, _, style, _ in _SERVICES}))
# Share of records without a trace id, by construction (nginx traffic + NO_ID_SHARE of the rest).
NO_ID_SHARE_TOTAL = sum(
    share if style == "nginx" else share * NO_ID_SHARE for _, _, style, share in _SERVICES
)
_PODS_PER_SERVICE = 3


@attrs.frozen(kw_only=True)
class Pod:
    """One container of one pod: its Fluent Bit tag, its kubernetes map and its logging style."""

    tag: str
    style: str
    service: str
    kubernetes: dict[str, Any]


def _hex(rng: random.Random, digits: int) -> str:
    return format(rng.getrandbits(digits * 4) | 1, f"0{digits}x")  # | 1: never all zeros


def _suffix(rng: random.Random, length: int) -> str:
    return "".join(rng.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(length))


def make_pods(seed: int = DEFAULT_SEED) -> list[Pod]:
    """Return the pods of the synthetic cluster (``_PODS_PER_SERVICE`` per service), deterministically."""
    rng = random.Random(seed)
    pods = []
    for service, namespace, style, _share in _SERVICES:
        template_hash = _suffix(rng, 10)
        version = f"1.{rng.randrange(20)}.{rng.randrange(10)}"
        image = f"acme/{service}:{version}"
        digest = _hex(rng, 64)
        for _ in range(_PODS_PER_SERVICE):
            pod_name = f"{service}-{template_hash}-{_suffix(rng, 5)}"
            docker_id = _hex(rng, 64)
            kubernetes: dict[str, Any] = {
                "pod_name": pod_name,
                "namespace_name": namespace,
                "pod_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                "labels": {"app": service, "pod-template-hash": template_hash},
            }
            if style == "nginx":  # the ingress pods carry annotations (their lines are the shortest)
                kubernetes["annotations"] = {"prometheus.io/scrape": "true"}
            kubernetes.update(
                host=f"node-{rng.randrange(1, 40)}",
                container_name=service,
                docker_id=docker_id,
                container_hash=f"acme/{service}@sha256:{digest}",
                container_image=image,
            )
            tag = f"kube.var.log.containers.{pod_name}_{namespace}_{service}-{docker_id}.log"
            pods.append(Pod(tag=tag, style=style, service=service, kubernetes=kubernetes))
    return pods


def _iso(time_ns: int) -> str:
    seconds, nanos = divmod(time_ns, 1_000_000_000)
    days, rest = divmod(seconds, 86_400)
    hour, rest = divmod(rest, 3600)
    minute, second = divmod(rest, 60)
    # 2024-05-01 is day 19844 of the epoch; the synthetic clock never leaves that month.
    day = 1 + days - 19844
    return f"2024-05-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}.{nanos:09d}Z"


def _json(payload: dict[str, Any]) -> str:
    return orjson.dumps(payload).decode()


def _zap(rng: random.Random, ctx: tuple[str, str] | None, msg: str, time_ns: int) -> str:
    payload: dict[str, Any] = {
        "level": rng.choice(("info", "info", "info", "warn", "debug")),
        "ts": time_ns / 1e9,
        "msg": msg,
    }
    if ctx:
        payload["trace_id"], payload["span_id"] = ctx
    return _json(payload)


def _structlog(rng: random.Random, ctx: tuple[str, str] | None, msg: str, time_ns: int) -> str:
    payload: dict[str, Any] = {
        "event": msg,
        "level": rng.choice(("info", "info", "warning")),
        "timestamp": _iso(time_ns)[:26] + "Z",
    }
    if ctx:
        payload["traceId"], payload["spanId"] = ctx
    return _json(payload)


def _log4j2(rng: random.Random, ctx: tuple[str, str] | None, msg: str, time_ns: int) -> str:
    payload: dict[str, Any] = {
        "@timestamp": _iso(time_ns)[:23] + "Z",
        "log.level": rng.choice(("INFO", "INFO", "WARN")),
        "message": msg,
    }
    if ctx:
        payload["traceparent"] = f"00-{ctx[0]}-{ctx[1]}-01"
    return _json(payload)


def _datadog(rng: random.Random, ctx: tuple[str, str] | None, msg: str, time_ns: int) -> str:
    payload: dict[str, Any] = {
        "timestamp": _iso(time_ns)[:23] + "Z",
        "level": rng.choice(("INFO", "INFO", "ERROR")),
        "message": msg,
    }
    if ctx:
        # dd-trace logs the low 64 bits of the trace id as an unsigned decimal (TRACE_IDS.md B3).
        payload["dd.trace_id"] = str(int(ctx[0][16:], 16))
        payload["dd.span_id"] = str(int(ctx[1], 16))
    return _json(payload)


def _otel_python(rng: random.Random, ctx: tuple[str, str] | None, msg: str, time_ns: int) -> str:
    payload: dict[str, Any] = {
        "asctime": _iso(time_ns)[:23].replace("T", " "),
        "levelname": rng.choice(("INFO", "INFO", "WARNING")),
        "message": msg,
    }
    if ctx:
        payload["otelTraceID"], payload["otelSpanID"] = ctx
    return _json(payload)


def _logfmt(rng: random.Random, ctx: tuple[str, str] | None, msg: str, time_ns: int) -> str:
    level = rng.choice(("info", "info", "warn"))
    line = f'time={_iso(time_ns)[:23]}Z level={level} msg="{msg}"'
    if ctx:
        line += f" trace_id={ctx[0]} span_id={ctx[1]}"
    return line


def _nginx(rng: random.Random, _ctx: tuple[str, str] | None, msg: str, _time_ns: int) -> str:
    client = f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
    return (
        f'{client} - - [01/May/2024:10:00:00 +0000] "GET {rng.choice(_ROUTES)} HTTP/1.1" '
        f'{rng.choice((200, 200, 200, 304, 404, 502))} {rng.randrange(100, 90000)} "-" "{msg}"'
    )


_STYLE_LINES: dict[str, Callable[[random.Random, tuple[str, str] | None, str, int], str]] = {
    "zap": _zap,
    "structlog": _structlog,
    "log4j2": _log4j2,
    "datadog": _datadog,
    "otel-python": _otel_python,
    "logfmt": _logfmt,
    "nginx": _nginx,
}

_PACK = msgpack.Packer()


def _record(rng: random.Random, pod: Pod, time_ns: int) -> dict[str, Any]:
    has_id = pod.style != "nginx" and rng.random() >= NO_ID_SHARE
    ctx = (_hex(rng, 32), _hex(rng, 16)) if has_id else None
    render = _STYLE_LINES[pod.style]
    words = [rng.choice(_MESSAGES)]
    target = rng.randint(*RECORD_BYTES)
    stream = "stderr" if rng.random() < 0.1 else "stdout"
    while True:
        record = {
            "time": _iso(time_ns),
            "stream": stream,
            "_p": "F",
            "log": render(rng, ctx, " ".join(words), time_ns) + "\n",
            "kubernetes": pod.kubernetes,
        }
        size = len(_PACK.pack(record))
        if size >= target - 8:
            return record
        # Pad with whole words; each one adds about 7 bytes.
        words.extend(rng.choice(_WORDS) for _ in range(max(1, (target - size) // 8)))


def pod_records(pod: Pod, count: int, *, seed: int = DEFAULT_SEED, start: int = 0) -> list[dict[str, Any]]:
    """Return ``count`` records of one pod (a Fluent Bit chunk holds one tag, i.e. one container).

    Args:
        pod: the container the lines come from.
        count: how many records.
        seed: the random seed; with ``start`` it fixes the records exactly.
        start: index of the first record on the synthetic clock (records are 1 ms apart).
    """
    rng = random.Random(f"{seed}:{pod.tag}:{start}")
    return [_record(rng, pod, BASE_TIME_NS + (start + i) * _STEP_NS) for i in range(count)]


def make_records(count: int, *, seed: int = DEFAULT_SEED) -> list[tuple[Pod, dict[str, Any]]]:
    """Return ``count`` records across all pods, weighted by each service's share of the traffic.

    Returns:
        ``(pod, record)`` pairs; the pod gives the record's tag.
    """
    pods = make_pods(seed)
    rng = random.Random(seed + 1)
    weights = [share for _, _, _, share in _SERVICES for _ in range(_PODS_PER_SERVICE)]
    out = []
    for i in range(count):
        pod = rng.choices(pods, weights)[0]
        out.append((pod, _record(rng, pod, BASE_TIME_NS + i * _STEP_NS)))
    return out


def record_size_stats(records: list[dict[str, Any]]) -> dict[str, float]:
    """Return min, mean and max msgpack size of ``records`` in bytes."""
    sizes = [len(_PACK.pack(r)) for r in records]
    return {"min": min(sizes), "mean": sum(sizes) / len(sizes), "max": max(sizes)}
