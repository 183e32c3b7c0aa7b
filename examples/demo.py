#!/usr/bin/env python3
"""Send traced log records to a fluentforward server, the way real applications spell trace ids.

Each record carries its trace context in one of the spellings found in the wild (OpenTelemetry, OTLP/JSON,
Python OTel logging, W3C traceparent, ASP.NET ``Activity.Id``, Datadog decimal, ECS, AWS X-Ray, Jaeger,
B3, logfmt text, a JSON string under ``log``) or in none at all, plus the ``kubernetes`` map Fluent Bit's
kubernetes filter adds. The records go through ``fluentforward send --ack`` (a subprocess), so the server
sees real Forward frames and acks them after its fsync::

    python examples/demo.py --to 127.0.0.1:24224
    fluentforward spool cat fluentforward-spool | head

Invariants: the same ``--seed`` gives the same records and ids; every expected trace id is the W3C form
(32 lowercase hex) of the id the record was built from, or null for records without a valid trace.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["SPELLINGS", "DemoRecord", "build_records", "main"]

_U64 = (1 << 64) - 1
_U96 = (1 << 96) - 1
# fluentforward send waits this long for each ack before it gives up; a demo should not hang forever.
SEND_TIMEOUT_S = 60

Record = dict[str, Any]
# A spelling builds a record from (trace id, span id, message); ids are ints. `bits` is the width of the
# trace ids it carries: Datadog decimal and 64-bit B3 carry 64; the Jaeger one gets a leading zero digit.
Spelling = tuple[str, int, Callable[[int, int, str], Record]]


def _otel(t: int, s: int, msg: str) -> Record:
    # OpenTelemetry's spec for non-OTLP logs; also pino/winston/bunyan and the Java MDC instrumentation.
    return {
        "level": "info",
        "message": msg,
        "trace_id": f"{t:032x}",
        "span_id": f"{s:016x}",
        "trace_flags": "01",
    }


def _otlp_json(t: int, s: int, msg: str) -> Record:
    # OTLP/JSON allows any case; the spec's own example is uppercase.
    return {"severityText": "INFO", "body": msg, "traceId": f"{t:032X}", "spanId": f"{s:016X}"}


def _python_otel(t: int, s: int, msg: str) -> Record:
    return {"levelname": "INFO", "message": msg, "otelTraceID": f"{t:032x}", "otelSpanID": f"{s:016x}"}


def _traceparent(t: int, s: int, msg: str) -> Record:
    return {"level": "info", "msg": msg, "traceparent": f"00-{t:032x}-{s:016x}-01"}


def _aspnet(t: int, s: int, msg: str) -> Record:
    # ASP.NET code that logs Activity.Current.Id under "traceId" writes a whole traceparent.
    return {"Level": "Information", "Message": msg, "traceId": f"00-{t:032x}-{s:016x}-01"}


def _datadog(t: int, s: int, msg: str) -> Record:
    # Datadog writes the low 64 bits as an unsigned decimal, nested under "dd" in Node's dd-trace.
    return {"status": "info", "message": msg, "dd": {"trace_id": str(t & _U64), "span_id": str(s)}}


def _ecs(t: int, s: int, msg: str) -> Record:
    return {"log.level": "info", "message": msg, "trace": {"id": f"{t:032x}"}, "span": {"id": f"{s:016x}"}}


def _xray(t: int, _s: int, msg: str) -> Record:
    # Lambda Powertools: 1-<8 hex epoch>-<24 hex>; the span id is not in the log line.
    return {"level": "INFO", "message": msg, "xray_trace_id": f"1-{t >> 96:08x}-{t & _U96:024x}"}


def _jaeger(t: int, s: int, msg: str) -> Record:
    # Old Jaeger clients dropped leading zeros (%x, not %032x); its ids here start with a zero digit.
    return {"level": "info", "msg": msg, "uber-trace-id": f"{t:x}:{s:x}:0:1"}


def _b3_64(t: int, s: int, msg: str) -> Record:
    return {"level": "info", "msg": msg, "X-B3-TraceId": f"{t & _U64:016x}", "X-B3-SpanId": f"{s:016x}"}


def _logfmt(t: int, s: int, msg: str) -> Record:
    # A plain-text line, as a Go or Ruby logfmt logger writes it.
    return {"log": f'level=info msg="{msg}" trace_id={t:032x} span_id={s:016x}', "stream": "stdout"}


def _json_string(t: int, s: int, msg: str) -> Record:
    # Fluent Bit with Merge_Log Off keeps the application's JSON line as a string.
    line = json.dumps({"level": "info", "msg": msg, "trace_id": f"{t:032x}", "span_id": f"{s:016x}"})
    return {"log": line, "stream": "stdout"}


def _no_trace(_t: int, _s: int, msg: str) -> Record:
    return {"log": f"{msg} (outside any request)", "stream": "stdout"}


def _python_no_span(_t: int, _s: int, msg: str) -> Record:
    # Python OTel logging writes "0" when no span is active: not a trace id.
    return {"levelname": "INFO", "message": msg, "otelTraceID": "0", "otelSpanID": "0"}


SPELLINGS: tuple[Spelling, ...] = (
    ("otel", 128, _otel),
    ("otlp-json", 128, _otlp_json),
    ("python-otel", 128, _python_otel),
    ("traceparent", 128, _traceparent),
    ("aspnet-activity-id", 128, _aspnet),
    ("datadog", 64, _datadog),
    ("ecs", 128, _ecs),
    ("aws-xray", 128, _xray),
    ("jaeger", 124, _jaeger),
    ("b3-64bit", 64, _b3_64),
    ("logfmt-text", 128, _logfmt),
    ("json-string", 128, _json_string),
    ("no-trace", 128, _no_trace),
    ("python-no-span", 128, _python_no_span),
)
_UNTRACED = frozenset({"no-trace", "python-no-span"})
_SPANLESS = frozenset({"aws-xray"})
_MESSAGES = ("order received", "payment authorized", "stock reserved", "order shipped", "payment declined")
_APPS = ("checkout", "payments", "inventory")


class DemoRecord:
    """One generated record and the trace context fluentforward must find in it."""

    __slots__ = ("record", "span_id", "spelling", "trace_id")

    def __init__(self, record: Record, spelling: str, trace_id: str | None, span_id: str | None) -> None:
        self.record = record
        self.spelling = spelling
        self.trace_id = trace_id
        self.span_id = span_id


def build_records(count: int, seed: int = 0) -> list[DemoRecord]:
    """Build ``count`` records cycling through every spelling, deterministic for a seed.

    Args:
        count: number of records.
        seed: seed of the id generator.

    Returns:
        The records with their expected W3C ``trace_id``/``span_id`` (None when there is no valid trace).
    """
    rng = random.Random(seed)  # noqa: S311 - demo ids, not secrets
    out: list[DemoRecord] = []
    for seq in range(count):
        name, bits, build = SPELLINGS[seq % len(SPELLINGS)]
        trace = rng.getrandbits(bits) or 1
        span = rng.getrandbits(64) or 1
        app = _APPS[seq % len(_APPS)]
        record = build(trace, span, _MESSAGES[seq % len(_MESSAGES)])
        record["demo_seq"] = seq
        record["kubernetes"] = {
            "namespace_name": "shop",
            "pod_name": f"{app}-7d9f8b6c5-{seq % 3:05d}",
            "container_name": app,
            "host": "node-1",
            "labels": {"app": app},
        }
        traced = name not in _UNTRACED
        out.append(
            DemoRecord(
                record,
                name,
                f"{trace:032x}" if traced else None,
                f"{span:016x}" if traced and name not in _SPANLESS else None,
            )
        )
    return out


def _fluentforward_command() -> list[str]:
    # Prefer the package next to this interpreter (a virtualenv), else the console script on PATH.
    if importlib.util.find_spec("fluentforward") is not None:
        return [sys.executable, "-m", "fluentforward"]
    script = shutil.which("fluentforward")
    if script is None:
        sys.exit("demo: fluentforward is not installed (pip install . in the repository)")
    return [script]


def send(records: Sequence[DemoRecord], args: argparse.Namespace) -> None:
    """Pipe the records as JSON lines into ``fluentforward send --ack``; exit if it fails."""
    command = [*_fluentforward_command(), "send", args.to, "-", "--ack", "--tag", args.tag]
    if args.shared_key:
        command += ["--shared-key", args.shared_key, "--self-hostname", "demo"]
    if args.username:
        command += ["--username", args.username, "--password", args.password]
    lines = "".join(json.dumps(item.record) + "\n" for item in records)
    result = subprocess.run(  # noqa: S603 - the command is built from our own arguments
        command, input=lines, text=True, capture_output=True, timeout=SEND_TIMEOUT_S, check=False
    )
    if result.returncode != 0:
        sys.exit(f"demo: fluentforward send failed ({result.returncode}): {result.stderr.strip()}")


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the arguments, build the records, send them and print what fluentforward should find."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--to", default="127.0.0.1:24224", help="fluentforward HOST:PORT")
    parser.add_argument("--count", type=int, default=2 * len(SPELLINGS), help="records to send")
    parser.add_argument("--seed", type=int, default=0, help="seed of the ids (same seed, same ids)")
    parser.add_argument("--tag", default="kube.var.log.containers.demo", help="Forward tag")
    parser.add_argument("--shared-key", default="", help="shared key, when the server requires one")
    parser.add_argument("--username", default="", help="user, when the server requires user auth")
    parser.add_argument("--password", default="")
    parser.add_argument("--json", action="store_true", help="print the expected ids as JSON lines")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    records = build_records(args.count, args.seed)
    send(records, args)
    out = sys.stdout
    if args.json:
        for item in records:
            expected = {"demo_seq": item.record["demo_seq"], "spelling": item.spelling}
            out.write(json.dumps({**expected, "trace_id": item.trace_id, "span_id": item.span_id}) + "\n")
        return
    out.write(f"sent {len(records)} records to {args.to} (all acked)\n\n")
    out.write(f"{'SPELLING':<20} {'TRACE_ID (W3C, as stored in Loki)':<34} SPAN_ID\n")
    for item in records[: len(SPELLINGS)]:
        out.write(f"{item.spelling:<20} {item.trace_id or '-':<34} {item.span_id or '-'}\n")
    first = next(item.trace_id for item in records if item.trace_id)
    out.write(f'\nIn Grafana Explore (Loki): {{namespace="shop"}} | trace_id="{first}"\n')


if __name__ == "__main__":
    main()
