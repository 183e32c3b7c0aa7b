"""Differential tests of ``Shaper.encode_events`` (the shipper's fused shape + encode path).

The reference is the plain path: ``Shaper.shape_event`` per event, ``pipeline.batches_by_tenant`` and
``encode_push_protobuf`` per batch. The fast path (``encode_events`` into a ``PushBuffer``, its
``batches`` and ``EncodedBatch.encode_protobuf``) must give the same batches (tenant, size, count),
the same decompressed request bodies byte for byte, and entries that decode back to the same
``LokiEntry`` values.
"""

from __future__ import annotations

import collections
import re
from typing import Any

import cramjam
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fluentforward.ids import TraceContext
from fluentforward.pipeline import batches_by_tenant
from fluentforward.records import MAX_STRUCTURED_METADATA_BYTES, Shaper, ShapeRules, build_rules
from fluentforward.sinks.loki import PushBuffer, encode_push_protobuf

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"
NS = 1_000_000_000
SURROGATE = re.compile("[\ud800-\udfff]")

RULE_SETS: dict[str, ShapeRules] = {
    "default": build_rules(cluster="prod"),
    "short_lines": build_rules(max_line_bytes=64),
    # Tenants from the namespace: several tenants in one buffer.
    "tenants": build_rules(tenant="$kubernetes['namespace_name']", max_line_bytes=100),
    "json": build_rules(line_format="json"),
    "key_value": build_rules(line_format="key_value", max_line_bytes=80),
    "raw": build_rules(line_format="raw"),
    # span_id before trace_id: the slots are not the usual pair.
    "span_first": build_rules(
        structured_metadata={"trace_id": "", "span_id": "", "sid": "$span_id", "tid": "$trace_id"}
    ),
    # Only a trace id slot.
    "trace_only": build_rules(structured_metadata={"span_id": ""}),
    # No trace slots at all; metadata from a record key (per record: big values near Loki's limit).
    "no_trace": build_rules(structured_metadata={"trace_id": "", "span_id": "", "blob": "$blob"}),
    # Memoized metadata near the limit: whether the trace ids still fit depends on the pod.
    "near_limit": build_rules(structured_metadata={"note": "$kubernetes['annotations']['note']"}),
    # Labels from the group's resource and the kubernetes map, both: a record sharing the record
    # before's map may still belong to another stream.
    "resource": build_rules(labels={"svc": "$resource['service.name']|none"}),
    # A template that reads the trace id inside metadata: no memo plan at all.
    "unmemoized": build_rules(structured_metadata={"both": "$trace_id/$span_id"}),
}


def pod(index: int, note_bytes: int) -> dict[str, Any]:
    return {
        "pod_name": f"api-{index}",
        "namespace_name": ["shop", "bank", "é-ns", "x.y"][index % 4],
        "container_name": "api" if index % 3 else "sidecar",
        "host": f"node-{index % 2}",
        "labels": {"app": ["checkout", 'pay"ments\n', "ünï"][index % 3]},
        "annotations": {"note": "n" * note_bytes},
    }


texts = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="ascii"), max_size=150),
    st.sampled_from(["plain\n", "crlf\r\n", "\n", "", "bad \udc80 utf-8\n", "über", "x" * 300, "é" * 90]),
)
values = st.one_of(texts, st.binary(max_size=8), st.integers(), st.none(), st.booleans())
traces = st.one_of(
    st.none(),
    st.just(TraceContext(TRACE_ID, SPAN_ID, "trace_id")),
    st.just(TraceContext(TRACE_ID, None, "traceparent")),
    st.builds(TraceContext, st.text(max_size=40), st.one_of(st.none(), st.text(max_size=20)), st.just("odd")),
    # Lone surrogates (written as U+FFFD), and a 32-character id that is not 32 bytes.
    st.just(TraceContext("\udc80" * 32, "é" * 16, "odd")),
    st.just(TraceContext("é" * 32, SPAN_ID, "odd")),
)


@st.composite
def records(draw: st.DrawFn) -> dict[Any, Any]:
    record: dict[Any, Any] = {}
    if draw(st.booleans()):
        record["stream"] = "stdout"
    message = draw(st.sampled_from(["log", "message", "msg", b"log"]))
    record[message] = draw(st.one_of(texts, st.binary(max_size=20)) if message == "log" else texts)
    if draw(st.integers(0, 3)) == 0:  # a payload of more than the message: a JSON line
        record[draw(st.sampled_from(["level", "n", b"raw", "log"]))] = draw(values)
    note = draw(
        st.sampled_from([0, 10, MAX_STRUCTURED_METADATA_BYTES - 120, MAX_STRUCTURED_METADATA_BYTES - 60])
    )
    record["kubernetes"] = pod(draw(st.integers(0, 5)), note)
    if draw(st.integers(0, 7)) == 0:
        record["blob"] = "b" * draw(
            st.sampled_from([1, MAX_STRUCTURED_METADATA_BYTES - 4, MAX_STRUCTURED_METADATA_BYTES])
        )
    if draw(st.integers(0, 15)) == 0:
        record["kubernetes"] = {**record["kubernetes"], "host": 7}  # not plain: no memo
    if draw(st.integers(0, 5)) == 0:  # decoded raw: the map under the key's bytes
        record[b"kubernetes"] = record.pop("kubernetes")
    return record


times = st.one_of(
    st.integers(1_714_557_600 * NS, 1_714_557_610 * NS),
    st.integers(-3 * NS, 3 * NS),
    st.integers(0, 2**64),
)
metadatas = st.sampled_from([{}, {"otlp": {"severity_text": "INFO"}}, {"otlp": {"severity_text": "WARN"}}])
GROUPS = [None, {"resource": {"attributes": {"service.name": "a"}}}, {"resource": {"attributes": {}}}]


@st.composite
def event_lists(draw: st.DrawFn) -> list[tuple[int, dict[Any, Any], Any, dict[Any, Any], Any]]:
    """Events as the decoder gives them: a record often shares the record before's `kubernetes`
    object; metadata and group vary (a shared map must not hide a change of the other inputs)."""
    out: list[tuple[int, dict[Any, Any], Any, dict[Any, Any], Any]] = []
    group = None
    for _ in range(draw(st.integers(0, 30))):
        record = draw(records())
        if out and "kubernetes" in out[-1][1] and draw(st.booleans()):
            record["kubernetes"] = out[-1][1]["kubernetes"]
        if draw(st.integers(0, 4)) == 0:
            group = GROUPS[draw(st.integers(0, len(GROUPS) - 1))]
        out.append((draw(times), record, draw(traces), dict(draw(metadatas)), group))
    return out


events = event_lists()
frames = st.lists(st.tuples(st.sampled_from(["kube.a", "kube.b"]), events), min_size=1, max_size=4)


def reference(rules: ShapeRules, frames: list[Any], max_bytes: int) -> tuple[list[Any], list[bytes], Counter]:
    shaper = Shaper(rules=rules)
    sources: Counter = collections.Counter()
    entries = []
    for tag, items in frames:
        for time_ns, record, trace, metadata, group in items:
            sources[trace.source if trace is not None else "none"] += 1
            entries.append(shaper.shape_event(tag, time_ns, record, metadata, group, trace))
    batches = batches_by_tenant(entries, max_bytes)
    bodies = [bytes(cramjam.snappy.decompress_raw(encode_push_protobuf(b.entries).body)) for b in batches]
    return batches, bodies, sources


Counter = collections.Counter


def fast(rules: ShapeRules, frames: list[Any], max_bytes: int) -> tuple[list[Any], list[bytes], Counter]:
    shaper = Shaper(rules=rules)
    sources: Counter = collections.Counter()
    buffer = PushBuffer()
    for tag, items in frames:
        found = {id(record): trace for _, record, trace, _, _ in items}
        shaper.encode_events(
            tag,
            [(time_ns, record, metadata, group) for time_ns, record, _, metadata, group in items],
            lambda record, _metadata, found=found: found[id(record)],
            buffer,
            sources,
        )
    batches = buffer.batches(max_bytes)
    bodies = [bytes(cramjam.snappy.decompress_raw(b.encode_protobuf().body)) for b in batches]
    return batches, bodies, sources


def clean(entries: Any) -> list[Any]:
    """Entries with trace values as the encoder writes them (lone surrogates become U+FFFD)."""
    return [
        e._replace(
            structured_metadata=tuple((n, SURROGATE.sub("\ufffd", v)) for n, v in e.structured_metadata)
        )
        for e in entries
    ]


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(st.sampled_from(sorted(RULE_SETS)), frames, st.sampled_from([1, 200, 5000, 1 << 20]))
def test_encode_events_matches_shape_and_encode_push_protobuf(name, frames, max_bytes):
    """Same batches, same request bytes, same decoded entries, same trace-source counts."""
    rules = RULE_SETS[name]
    want_batches, want_bodies, want_sources = reference(rules, frames, max_bytes)
    got_batches, got_bodies, got_sources = fast(rules, frames, max_bytes)
    assert got_sources == want_sources
    assert [(b.tenant, b.size, b.count) for b in got_batches] == [
        (b.tenant, b.size, b.count) for b in want_batches
    ]
    assert got_bodies == want_bodies
    for got, want in zip(got_batches, want_batches, strict=True):
        assert list(got.entries) == clean(want.entries)
        got_halves, want_halves = got.split(), want.split()
        if want_halves is None:
            assert got_halves is None
        else:
            assert got_halves is not None
            for got_half, want_half in zip(got_halves, want_halves, strict=True):
                assert (got_half.size, list(got_half.entries)) == (want_half.size, clean(want_half.entries))


def test_memo_carries_over_between_calls_and_shape_calls():
    """Interleaving shape_event and encode_events on one shaper changes nothing (one shared memo)."""
    rules = RULE_SETS["default"]
    record = {"log": "hello\n", "kubernetes": pod(1, 0)}
    other = {"log": "bye", "kubernetes": pod(2, 0)}
    trace = TraceContext(TRACE_ID, SPAN_ID, "trace_id")
    shaper = Shaper(rules=rules)
    buffer = PushBuffer()
    want = []
    for n, rec in enumerate([record, record, other, record]):
        want.append(Shaper(rules=rules).shape_event("t", n, rec, {}, None, trace))
        shaper.shape_event("t", n, rec, {}, None, trace)
        shaper.encode_events("t", [(n, rec, {}, None)], lambda _r, _m: trace, buffer)
    (batch,) = buffer.batches(1 << 20)
    assert list(batch.entries) == want
