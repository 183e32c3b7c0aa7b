"""Tests for fluentforward.ids: the 49 shared vectors, each spelling family, rules, and properties."""

from __future__ import annotations

import base64
import copy
import itertools
import json
import re
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fluentforward import ids
from fluentforward.errors import ConfigError
from fluentforward.ids import (
    DEFAULT_RULES,
    IdRules,
    TraceContext,
    extract_trace_context,
    normalize_span_id,
    normalize_trace_id,
)
from tests.conftest import TRACE_VECTORS

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
OTHER_TRACE = "0af7651916cd43dd8448eb211c80319c"
OTHER_SPAN = "b7ad6b7169203331"
TRACE_RE = re.compile(r"[0-9a-f]{32}")
SPAN_RE = re.compile(r"[0-9a-f]{16}")


def decode_vector(value: Any) -> Any:
    """Turn the vectors' ``{"$bin": HEX}`` markers into bytes, recursively."""
    if isinstance(value, dict):
        if value.keys() == {"$bin"}:
            return bytes.fromhex(value["$bin"])
        return {key: decode_vector(item) for key, item in value.items()}
    if isinstance(value, list):
        return [decode_vector(item) for item in value]
    return value


def bytes_keys(value: Any) -> Any:
    """The same map with every key sent as msgpack bin (bytes)."""
    if isinstance(value, dict):
        return {key.encode(): bytes_keys(item) for key, item in value.items()}
    return value


CASES = json.loads(TRACE_VECTORS.read_text())["cases"]


def split_case(case: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    record = decode_vector(case["record"])
    metadata = record.pop("$metadata", None)
    return record, metadata


def ids_of(ctx: TraceContext | None) -> tuple[str | None, str | None]:
    return (None, None) if ctx is None else (ctx.trace_id, ctx.span_id)


def test_all_49_vectors_are_present():
    """The shared vector file holds cases 1 to 49."""
    assert [case["id"] for case in CASES] == list(range(1, 50))


@pytest.mark.parametrize("case", CASES, ids=[f"case{c['id']}" for c in CASES])
def test_vector(case):
    """Each shared vector yields exactly its expected trace and span ids."""
    record, metadata = split_case(case)
    ctx = extract_trace_context(record, metadata)
    assert ids_of(ctx) == (case["trace_id"], case["span_id"])
    if ctx is not None:
        assert ctx.source in DEFAULT_RULES.sources


@pytest.mark.parametrize("case", CASES, ids=[f"case{c['id']}" for c in CASES])
def test_vector_with_bytes_keys(case):
    """Keys sent as msgpack bin give the same ids as str keys."""
    record, metadata = split_case(case)
    ctx = extract_trace_context(bytes_keys(record), bytes_keys(metadata))
    assert ids_of(ctx) == (case["trace_id"], case["span_id"])


def test_vector_sources():
    """The source label names the rule that matched, never the key as spelled in the record."""
    sources = {}
    for case in CASES:
        record, metadata = split_case(case)
        ctx = extract_trace_context(record, metadata)
        if ctx is not None:
            sources[case["id"]] = ctx.source
    assert sources[1] == "traceparent"
    assert sources[11] == "trace_id"  # TraceId
    assert sources[18] == "trace_id"  # trace.id (ECS)
    assert sources[27] == "dd.trace_id"  # {"dd": {"trace_id": ...}}
    assert sources[28] == "X-Amzn-Trace-Id"
    assert sources[46] == "log:json"
    assert sources[47] == "log:text"
    assert sources[49] == "metadata:otlp"


# --- normalize_trace_id / normalize_span_id, one family at a time ---------------------------------

B64_TRACE = "W47/95gDgQPSabYzgT/GDA=="
B64_TRACE_HEX = "5b8efff798038103d269b633813fc60c"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # hex: case, whitespace, left padding, length and zero rules
        (TRACE, TRACE),
        (" 4BF92F3577B34DA6A3CE929D0E0E4736\n", TRACE),
        ("a3ce929d0e0e4736", "0000000000000000a3ce929d0e0e4736"),
        ("1", "00000000000000000000000000000001"),
        ("0", None),
        ("0" * 32, None),
        ("", None),
        ("   ", None),
        ("0" + TRACE, None),
        (TRACE[:-1] + "g", None),
        ("0x" + TRACE[2:], None),
        ("4b f92f3577b34da6a3ce929d0e0e4736", None),
        ("\u0663" * 32, None),  # Arabic-Indic digit three: a digit, but not hex
        ("\udcff" * 32, None),  # lone surrogates from surrogateescape
        # UUID
        ("4bf92f35-77b3-4da6-a3ce-929d0e0e4736", TRACE),
        ("4BF92F35-77B3-4DA6-A3CE-929D0E0E4736", TRACE),
        ("4bf92f35-77b3-4da6-a3ce-929d0e0e473", None),
        # raw bytes, ASCII bytes, base64
        (bytes.fromhex(TRACE), TRACE),
        (bytearray.fromhex(TRACE), TRACE),
        (bytes(16), None),
        (bytes.fromhex(TRACE)[:15], None),
        (TRACE.encode(), TRACE),
        (B64_TRACE, B64_TRACE_HEX),
        (B64_TRACE.replace("/", "_"), B64_TRACE_HEX),  # URL-safe alphabet
        (base64.b64encode(bytes(16)).decode(), None),
        ("a3ce929d0e0e4736a3ce929d", "00000000a3ce929d0e0e4736a3ce929d"),  # 24 hex: hex, not base64
        ("W47/95gDgQPSabYzgT/GDA=", None),
        # traceparent-shaped
        (f"00-{TRACE}-{SPAN}-01", TRACE),
        (f"00-{TRACE.upper()}-{SPAN}-01", TRACE),
        (f"00-{TRACE}-{'0' * 16}-01", None),
        (f"ff-{TRACE}-{SPAN}-01", None),
        (f"00-{TRACE}-{SPAN}-01-extra", None),
        (f"cc-{TRACE}-{SPAN}-01-extra", TRACE),
        # B3 single and sentry-trace
        (f"{TRACE}-{SPAN}-1-05e3ac9a4f6e3b90", TRACE),
        (f"a3ce929d0e0e4736-{SPAN}", "0000000000000000a3ce929d0e0e4736"),
        (f"{TRACE}-{SPAN}-1", TRACE),
        (f"{TRACE}-{SPAN}-x", None),
        # Jaeger
        (f"3ce929d0e0e4736:{SPAN}:0:1", "000000000000000003ce929d0e0e4736"),
        (f"{TRACE}%3A{SPAN}%3A0%3A1", TRACE),
        (f"0:{SPAN}:0:1", None),
        (f"{TRACE}:0:0:1", None),
        (f"{TRACE}:{SPAN}:0", None),
        # AWS X-Ray
        ("1-5759e988-bd862e3fe1be46a994272793", "5759e988bd862e3fe1be46a994272793"),
        (
            "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1",
            "5759e988bd862e3fe1be46a994272793",
        ),
        ("Self=1-abc;Root=1-5759e988-bd862e3fe1be46a994272793", "5759e988bd862e3fe1be46a994272793"),
        ("2-5759e988-bd862e3fe1be46a994272793", None),
        ("Root=1-5759e988-bd862e3fe1be46a994272793;Parent=zz", None),
        # GCP
        (f"projects/my-project/traces/{TRACE}", TRACE),
        (f"projects/my-project/spans/{TRACE}", None),
        (f"{TRACE}/1;o=1", TRACE),
        (f"{TRACE}/0;o=1", None),
        (f"{TRACE};o=1", TRACE),
        # numbers and other types
        (1, "00000000000000000000000000000001"),
        (int(TRACE, 16), TRACE),
        ((1 << 128) - 1, "f" * 32),
        (1 << 128, None),
        (0, None),
        (-1, None),
        (True, None),
        (1.0, None),
        (float("nan"), None),
        (None, None),
        ([TRACE], None),
        ({"id": TRACE}, None),
        ("x" * 10_000, None),
    ],
)
def test_normalize_trace_id(value, expected):
    """Every documented trace id spelling normalizes to lowercase hex, and everything else to None."""
    assert normalize_trace_id(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (SPAN, SPAN),
        (" 00F067AA0BA902B7 ", SPAN),
        ("f067aa0ba902b7", SPAN),
        ("1", "0000000000000001"),
        ("0", None),
        ("0" * 16, None),
        ("0" + SPAN, None),
        (SPAN[:-1] + "g", None),
        ("", None),
        (bytes.fromhex(SPAN), SPAN),
        (bytes(8), None),
        (SPAN.encode(), SPAN),
        ("7uGbfsPBsXQ=", "eee19b7ec3c1b174"),
        ("f067aa0ba902", "0000f067aa0ba902"),  # 12 hex: hex, not base64
        (int(SPAN, 16), SPAN),
        ((1 << 64) - 1, "f" * 16),
        (1 << 64, None),
        (False, None),
        (None, None),
        (f"00-{TRACE}-{SPAN}-01", None),
        ("\udcff" * 16, None),
    ],
)
def test_normalize_span_id(value, expected):
    """Every documented span id spelling normalizes to lowercase hex, and everything else to None."""
    assert normalize_span_id(value) == expected


# --- extract_trace_context: names, nesting, priority, pairing -------------------------------------


@pytest.mark.parametrize(
    "record",
    [
        {"trace_id": TRACE},
        {"traceId": TRACE},
        {"traceID": TRACE},
        {"TraceId": TRACE},
        {"TRACE_ID": TRACE},
        {"trace-id": TRACE},
        {"trace.id": TRACE},
        {b"trace_id": TRACE},
        {"trace": {"id": TRACE}},
        {"Trace": {"ID": TRACE}},
        {b"trace": {b"id": TRACE}},
    ],
)
def test_trace_field_spellings(record):
    """Case, `_`, `-`, `.`, camelCase, bytes keys and nesting all reach the same trace field."""
    assert extract_trace_context(record) == TraceContext(trace_id=TRACE, span_id=None, source="trace_id")


def test_ids_under_unrelated_maps_are_ignored():
    """Only maps whose key can lead to an id field are descended into."""
    assert extract_trace_context({"kubernetes": {"trace_id": TRACE, "labels": {"trace_id": TRACE}}}) is None


def test_trace_identifier_is_not_a_trace_id():
    """ASP.NET's TraceIdentifier and .NET's ParentId are not id fields."""
    assert extract_trace_context({"TraceIdentifier": TRACE, "ParentId": SPAN}) is None


def test_dedicated_field_beats_composite():
    """A dedicated trace field wins over a header field, and keeps its own (absent) span."""
    ctx = extract_trace_context({"traceparent": f"00-{OTHER_TRACE}-{OTHER_SPAN}-01", "trace_id": TRACE})
    assert (ctx.trace_id, ctx.span_id, ctx.source) == (TRACE, None, "trace_id")


def test_invalid_dedicated_field_falls_back_to_composite():
    """An invalid trace field gives way to the next valid candidate, with that candidate's span."""
    ctx = extract_trace_context({"trace_id": "0", "traceparent": f"00-{TRACE}-{SPAN}-01"})
    assert (ctx.trace_id, ctx.span_id, ctx.source) == (TRACE, SPAN, "traceparent")


def test_priority_follows_rules_not_record_order():
    """Among trace fields the first configured name wins, whatever the key order in the record."""
    ctx = extract_trace_context({"@tr": OTHER_TRACE, "trace_id": TRACE})
    assert ctx.trace_id == TRACE


def test_record_fields_beat_json_log():
    """Ids in record fields win over ids inside the log line."""
    log = json.dumps({"trace_id": OTHER_TRACE})
    assert extract_trace_context({"log": log, "trace_id": TRACE}).trace_id == TRACE


def test_json_log_beats_text_and_metadata():
    """A JSON log line wins over text in another message field and over metadata."""
    record = {"message": f"trace_id={OTHER_TRACE}", "log": json.dumps({"trace_id": TRACE})}
    metadata = {"otlp": {"trace_id": bytes.fromhex(OTHER_TRACE)}}
    assert extract_trace_context(record, metadata).source == "log:json"
    assert extract_trace_context(record, metadata).trace_id == TRACE


def test_text_beats_metadata():
    """Ids in a text log line win over the event metadata."""
    metadata = {"otlp": {"trace_id": bytes.fromhex(OTHER_TRACE)}}
    ctx = extract_trace_context({"log": f"trace_id={TRACE}"}, metadata)
    assert (ctx.trace_id, ctx.source) == (TRACE, "log:text")


def test_metadata_fields_beat_otlp_map():
    """Metadata fields are read with the record rules, before the OTLP map, and labelled as metadata."""
    metadata = {"trace_id": TRACE, "otlp": {"trace_id": bytes.fromhex(OTHER_TRACE)}}
    ctx = extract_trace_context({}, metadata)
    assert (ctx.trace_id, ctx.source) == (TRACE, "metadata:trace_id")


def test_otlp_metadata_with_bytes_keys_and_bad_lengths():
    """OTLP metadata ids must be 16/8 bytes; keys may be bytes."""
    ok = {b"otlp": {b"trace_id": bytes.fromhex(TRACE), b"span_id": bytes.fromhex(SPAN)}}
    assert ids_of(extract_trace_context({}, ok)) == (TRACE, SPAN)
    short = {"otlp": {"trace_id": bytes.fromhex(TRACE)[:8], "span_id": bytes.fromhex(SPAN)}}
    assert extract_trace_context({}, short) is None


def test_span_without_trace_is_dropped():
    """A span id with no valid trace id gives no context at all (TRACE_IDS.md B3 rule 11)."""
    assert extract_trace_context({"span_id": SPAN}) is None
    assert extract_trace_context({"trace_id": "0", "span_id": SPAN, "dd.span_id": "5"}) is None


def test_ecs_span_id_before_transaction_id():
    """ECS span.id wins over transaction.id, which serves when span.id is invalid."""
    record = {"trace.id": TRACE, "transaction.id": OTHER_SPAN, "span.id": SPAN}
    assert extract_trace_context(record).span_id == SPAN
    record["span.id"] = "not hex"
    assert extract_trace_context(record).span_id == OTHER_SPAN


def test_datadog_trace_pairs_with_datadog_span_first():
    """A Datadog trace id takes the Datadog (decimal) span id before a generic span field."""
    record = {"dd.trace_id": "11803532876627986230", "span_id": OTHER_SPAN, "dd.span_id": "67667974448284343"}
    assert extract_trace_context(record).span_id == SPAN


def test_generic_trace_falls_back_to_datadog_span():
    """A non-Datadog trace id takes a Datadog span id when no other span field is valid."""
    record = {"trace_id": TRACE, "dd.span_id": "67667974448284343"}
    assert extract_trace_context(record).span_id == SPAN


def test_composite_span_wins_over_span_field():
    """When the trace comes from a value carrying a span, that span is used."""
    record = {"traceparent": f"00-{TRACE}-{SPAN}-01", "span_id": OTHER_SPAN}
    assert extract_trace_context(record).span_id == SPAN


def test_json_trace_takes_record_span_field():
    """A trace found in the log line without a span there takes the record's span field."""
    record = {"log": json.dumps({"trace_id": TRACE}), "span_id": SPAN}
    assert ids_of(extract_trace_context(record)) == (TRACE, SPAN)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"dd.trace_id": "1234567890123456"}, "0000000000000000000462d53c8abac0"),  # decimal, not hex
        ({"dd.trace_id": 11803532876627986230}, "0000000000000000a3ce929d0e0e4736"),  # JSON number
        ({"dd.trace_id": "-9223372036854775808"}, "00000000000000008000000000000000"),
        ({"dd.trace_id": "-9223372036854775809"}, None),
        ({"dd.trace_id": "a3ce929d0e0e4736"}, None),  # 16 hex: not decimal
        ({"dd.trace_id": "1.5"}, None),
        ({"dd.trace_id": True}, None),
        ({"dd.trace_id": "11803532876627986230", "_dd.p.tid": "nothex"}, "0000000000000000a3ce929d0e0e4736"),
        ({"dd": {"trace_id": "1"}, "_dd.p.tid": "4BF92F3577B34DA6"}, "4bf92f3577b34da60000000000000001"),
        ({"trace_id": "1234567890123456"}, "00000000000000001234567890123456"),  # other fields: hex
    ],
)
def test_datadog_decimal_rules(fields, expected):
    """Datadog fields are unsigned 64-bit decimal (signed accepted), other fields are hex."""
    ctx = extract_trace_context(fields)
    assert (None if ctx is None else ctx.trace_id) == expected


def test_b3_sampling_flag_is_not_an_id():
    """A B3 header holding only a sampling state yields nothing, even though `1` is hex."""
    assert extract_trace_context({"b3": "1"}) is None
    assert extract_trace_context({"b3": "d"}) is None


def test_composite_values_as_bytes():
    """Header values sent as msgpack bin are read as text."""
    assert ids_of(extract_trace_context({"traceparent": f"00-{TRACE}-{SPAN}-01".encode()})) == (TRACE, SPAN)


def test_nesting_is_bounded():
    """Nested maps are followed three levels deep, no further; dotted keys work at any depth."""
    rules = IdRules.from_names(trace_fields=["a.b.c.d", "a.b.c.d.e"])
    assert extract_trace_context({"a": {"b": {"c": {"d": TRACE}}}}, rules=rules).trace_id == TRACE
    assert extract_trace_context({"a": {"b": {"c": {"d": {"e": TRACE}}}}}, rules=rules) is None
    assert extract_trace_context({"a.b.c.d.e": TRACE}, rules=rules).trace_id == TRACE


# --- log lines: JSON and text ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        f"level=info traceId={TRACE} spanId={SPAN}",
        f"[trace_id={TRACE} span_id={SPAN} trace_sampled=True] done",
        f'not json: "trace_id": "{TRACE}", "span_id": "{SPAN}"',
        f"trace.id: {TRACE} span.id: {SPAN}",
        f"TRACE_ID={TRACE.upper()} SPAN_ID={SPAN.upper()}",
        f"traceparent=00-{TRACE}-{SPAN}-01",
        f"span_id={SPAN} trace_id={TRACE}",
    ],
)
def test_text_line_spellings(line):
    """Common key=value spellings in a text line give the trace and span ids."""
    ctx = extract_trace_context({"log": line})
    assert (ctx.trace_id, ctx.span_id, ctx.source) == (TRACE, SPAN, "log:text")


def test_text_line_datadog_injection():
    """Datadog's text injection (`dd.trace_id=<decimal>`) is read as decimal."""
    line = "INFO [dd.service=shop dd.trace_id=11803532876627986230 dd.span_id=67667974448284343] hi"
    assert ids_of(extract_trace_context({"message": line})) == ("0000000000000000a3ce929d0e0e4736", SPAN)


@pytest.mark.parametrize(
    "line",
    [
        f"my_trace_id={TRACE}",
        f"x.trace_id={TRACE}",
        "retrace the trace_id later",
        f"trace_id={TRACE}0",
        f"span_id={SPAN} only",
        "trace_id=0 span_id=0",
    ],
)
def test_text_line_non_matches(line):
    """Keys that merely end in trace_id, overlong ids, spans alone and zero ids give nothing."""
    assert extract_trace_context({"log": line}) is None


def test_text_scan_is_bounded():
    """An id beyond the scanned head of a long line is not looked for."""
    padding = "x" * ids.TEXT_SCAN_MAX_CHARS
    assert extract_trace_context({"log": f"{padding} trace_id={TRACE}"}) is None
    assert extract_trace_context({"log": f"trace_id={TRACE} {padding}"}).trace_id == TRACE


def test_text_scan_examines_a_bounded_number_of_keys():
    """Only the first TEXT_MAX_KEYS occurrences of "trace"/"span" in a line are examined."""
    words = "trace " * ids.TEXT_MAX_KEYS
    assert extract_trace_context({"log": f"{words}trace_id={TRACE}"}) is None
    assert extract_trace_context({"log": f"{words[6:]}trace_id={TRACE}"}).trace_id == TRACE


def test_text_line_otel_prefixed_keys():
    """The OTel Python attribute names (otelTraceID=...) are read in text too."""
    line = f"otelTraceID={TRACE} otelSpanID={SPAN}"
    assert ids_of(extract_trace_context({"log": line})) == (TRACE, SPAN)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("dd.trace_id=5", "5".zfill(32)),
        ("[dd_trace_id=5]", "5".zfill(32)),
        ("xdd.trace_id=5", None),  # the prefix must start a word too
        ("-dd.trace_id=5", None),
        (f"xdd.trace_id=5 trace_id={TRACE}", TRACE),
        (f"(otelTraceID={TRACE})", TRACE),
        (f"dotelTraceID={TRACE}", None),
        (f"x.otelTraceID={TRACE}", None),
        (f"dd.traceparent=00-{TRACE}-{SPAN}-01", None),  # not a configured name
    ],
)
def test_text_line_key_prefixes(line, expected):
    """A `dd.`/`dd_`/`otel` prefix joins the key only when the prefix itself starts a word."""
    ctx = extract_trace_context({"log": line})
    assert (None if ctx is None else ctx.trace_id) == expected


def test_text_line_as_bytes():
    """A log line sent as bin is scanned too."""
    assert ids_of(extract_trace_context({"log": f"trace_id={TRACE} span_id={SPAN}".encode()})) == (
        TRACE,
        SPAN,
    )


@pytest.mark.parametrize(
    "log",
    [
        f'  \n{{"trace_id": "{TRACE}", "span_id": "{SPAN}"}}',
        f'{{"dd": {{"trace_id": "11803532876627986230"}}, "traceId": "{TRACE}", "spanId": "{SPAN}"}}',
        f'{{"trace": {{"id": "{TRACE}"}}, "span": {{"id": "{SPAN}"}}}}'.encode(),
    ],
)
def test_json_log_line(log):
    """A JSON object in a message field is parsed, with leading whitespace, nesting and bin values."""
    ctx = extract_trace_context({"msg": log})
    assert (ctx.trace_id, ctx.span_id, ctx.source) == (TRACE, SPAN, "log:json")


def test_json_log_that_is_not_an_object_is_scanned_as_text():
    """Broken JSON, arrays and lone surrogates fall back to the text scan."""
    for log in [
        f'{{"trace_id": "{TRACE}"',
        f'[{{"trace_id": "{TRACE}"}}]',
        f'{{"trace_id": "{TRACE}", "x": "\udcff"}}',
    ]:
        ctx = extract_trace_context({"log": log})
        assert (ctx.trace_id, ctx.source) == (TRACE, "log:text")


# --- rules -----------------------------------------------------------------------------------------


def test_scan_text_off_disables_text_cases():
    """With scan_text off, the text-line vectors (47, 48) give nothing and the others are unchanged."""
    rules = IdRules(scan_text=False)
    for case in CASES:
        record, metadata = split_case(case)
        expected = (None, None) if case["id"] in (47, 48) else (case["trace_id"], case["span_id"])
        assert ids_of(extract_trace_context(record, metadata, rules=rules)) == expected, case["id"]


def test_json_cap():
    """A log line longer than json_max_bytes is not parsed as JSON (only scanned as text)."""
    log = json.dumps({"trace_id": TRACE, "pad": "x" * 100})
    assert extract_trace_context({"log": log}, rules=IdRules(json_max_bytes=len(log))).source == "log:json"
    assert (
        extract_trace_context({"log": log}, rules=IdRules(json_max_bytes=len(log) - 1)).source == "log:text"
    )
    assert extract_trace_context({"log": log}, rules=IdRules(json_max_bytes=0, scan_text=False)) is None


def test_from_names_adds_fields_in_front():
    """Extra names from plain lists are tried before the defaults and label the source."""
    rules = IdRules.from_names(trace_fields=["x_request_trace"], span_fields=["x_request_span"])
    record = {"trace_id": OTHER_TRACE, "x_request_trace": TRACE, "x_request_span": SPAN}
    ctx = extract_trace_context(record, rules=rules)
    assert (ctx.trace_id, ctx.span_id, ctx.source) == (TRACE, SPAN, "x_request_trace")
    assert "x_request_trace" in rules.sources
    assert "metadata:x_request_trace" in rules.sources


def test_from_names_can_replace_defaults():
    """With replace_defaults only the given trace and span fields are read."""
    rules = IdRules.from_names(trace_fields=["tid"], replace_defaults=True, message_fields=["body"])
    assert extract_trace_context({"trace_id": TRACE}, rules=rules) is None
    assert extract_trace_context({"tid": TRACE}, rules=rules).trace_id == TRACE
    assert extract_trace_context({"body": f"trace_id={TRACE}"}, rules=rules) is None  # not a configured name
    assert extract_trace_context({"log": f"tid={TRACE}"}, rules=rules) is None
    assert (
        extract_trace_context({"traceparent": f"00-{TRACE}-{SPAN}-01"}, rules=rules).source == "traceparent"
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"trace_fields": "trace_id"},
        {"trace_fields": ["trace_id"], "span_fields": ["Trace-Id"]},
        {"trace_fields": ["-._"]},
        {"message_fields": ["traceparent"]},
        {"json_max_bytes": -1},
        {"json_max_bytes": ids.JSON_MAX_BYTES_LIMIT + 1},
    ],
)
def test_bad_rules_raise_config_error(kwargs):
    """A bare string, a name with two purposes, an empty name or an out-of-range cap is a ConfigError."""
    with pytest.raises(ConfigError):
        IdRules(**kwargs)


def test_from_names_rejects_a_bare_string():
    """from_names wants lists of names, not one string spelled letter by letter."""
    with pytest.raises(ConfigError):
        IdRules.from_names(trace_fields="trace_id")


def test_rules_compare_by_configuration():
    """Rules are values: equal and hashable by their settings, whatever their caches hold."""
    rules = IdRules()
    extract_trace_context({"trace_id": TRACE}, rules=rules)
    assert rules == DEFAULT_RULES
    assert hash(rules) == hash(IdRules())
    assert IdRules(scan_text=False) != rules


def test_key_cache_is_bounded():
    """Records with ever-new keys never grow the key caches beyond their limit."""
    rules = IdRules()
    for i in range(ids.KEY_CACHE_MAX + 10):
        extract_trace_context({f"k{i}": 1, "trace": {f"n{i}": 2}}, rules=rules)
    assert 0 < len(rules._top) <= ids.KEY_CACHE_MAX
    assert 0 < len(rules._canon) <= ids.KEY_CACHE_MAX


def test_contexts_are_equal_to_constructed_ones_and_immutable():
    """The context returned equals one built by TraceContext's own constructor, and is immutable."""
    ctx = extract_trace_context({"trace_id": TRACE, "span_id": SPAN})
    assert ctx == TraceContext(trace_id=TRACE, span_id=SPAN, source="trace_id")
    assert repr(ctx) == repr(TraceContext(trace_id=TRACE, span_id=SPAN, source="trace_id"))
    assert hash(ctx) == hash(TraceContext(trace_id=TRACE, span_id=SPAN, source="trace_id"))
    with pytest.raises(AttributeError):
        ctx.trace_id = OTHER_TRACE  # type: ignore[misc]


# --- properties -----------------------------------------------------------------------------------

ID_KEYS = [
    "trace_id", "traceId", "span_id", "SpanId", "trace", "span", "id", "dd", "dd.trace_id",
    "dd.span_id", "_dd.p.tid", "traceparent", "b3", "sentry-trace", "uber-trace-id",
    "X-Amzn-Trace-Id", "X-Cloud-Trace-Context", "logging.googleapis.com/trace", "transaction",
    "log", "message", "msg", "otlp", "@tr", "xray_trace_id",
]  # fmt: skip
ID_ALPHABET = "0123456789abcdefABCDEF-:/;=%. \nRootParentxXg"

texts = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=ID_ALPHABET, max_size=80),
    st.lists(st.one_of(st.characters(), st.sampled_from(["\udcff", "\udc80", "\ud800"]))).map("".join),
    st.sampled_from([TRACE, SPAN, TRACE.upper(), f"00-{TRACE}-{SPAN}-01", B64_TRACE, "0", "-1"]),
    st.sampled_from(ID_KEYS).map(lambda key: f"{key}={TRACE} span_id={SPAN}"),
    st.builds(
        lambda t, s: json.dumps({"trace_id": t, "span_id": s}), st.text(ID_ALPHABET), st.text(ID_ALPHABET)
    ),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(1 << 200), max_value=1 << 200),
    st.floats(),
    texts,
    st.binary(max_size=40),
)
keys = st.one_of(
    st.sampled_from(ID_KEYS),
    st.sampled_from(ID_KEYS).map(str.encode),
    st.text(max_size=12),
    st.binary(max_size=12),
    st.integers(),
    st.floats(),
)
json_like = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=5),
    max_leaves=25,
)
records = st.dictionaries(keys, json_like, max_size=8)


@given(json_like)
def test_normalizers_never_raise_and_return_w3c_hex(value):
    """Any value normalizes to None or to lowercase hex of the right length, without raising."""
    trace, span = normalize_trace_id(value), normalize_span_id(value)
    assert trace is None or (TRACE_RE.fullmatch(trace) and trace != "0" * 32)
    assert span is None or (SPAN_RE.fullmatch(span) and span != "0" * 16)


@given(st.one_of(json_like, texts))
def test_normalizers_are_idempotent(value):
    """Normalizing a normalized id gives it back unchanged."""
    if (trace := normalize_trace_id(value)) is not None:
        assert normalize_trace_id(trace) == trace
    if (span := normalize_span_id(value)) is not None:
        assert normalize_span_id(span) == span


@given(st.binary(min_size=16, max_size=16))
def test_all_trace_spellings_agree(raw):
    """Every spelling of the same 16 bytes gives the same trace id (None when all zero)."""
    expected = None if raw == bytes(16) else raw.hex()
    h = raw.hex()
    spellings = [
        h, h.upper(), f" {h}\n", h.lstrip("0") or "0",
        f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}",
        raw, bytearray(raw), h.encode(), int.from_bytes(raw, "big"),
        base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode(),
        f"00-{h}-{SPAN}-01", f"{h.upper()}-{SPAN}-1", f"{h}:{SPAN}:0:1",
        f"1-{h[:8]}-{h[8:]}", f"Root=1-{h[:8]}-{h[8:]};Parent={SPAN}",
        f"projects/p/traces/{h}", f"{h}/1;o=1",
    ]  # fmt: skip
    assert [normalize_trace_id(spelling) for spelling in spellings] == [expected] * len(spellings)
    from_records = [ids_of(extract_trace_context({"trace_id": spelling}))[0] for spelling in spellings]
    assert from_records == [expected] * len(spellings)


@given(st.binary(min_size=8, max_size=8))
def test_all_span_spellings_agree(raw):
    """Every spelling of the same 8 bytes gives the same span id (None when all zero)."""
    expected = None if raw == bytes(8) else raw.hex()
    h = raw.hex()
    spellings = [h, h.upper(), f"\t{h} ", h.lstrip("0") or "0", raw, h.encode(), int.from_bytes(raw, "big"),
                 base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()]  # fmt: skip
    assert [normalize_span_id(spelling) for spelling in spellings] == [expected] * len(spellings)


@given(records, st.one_of(st.none(), records))
def test_extract_never_raises_nor_mutates(record, metadata):
    """Any record and metadata give None or a valid context with a known source, and stay unchanged."""
    before = copy.deepcopy((record, metadata))
    ctx = extract_trace_context(record, metadata)
    assert (record, metadata) == before
    if ctx is not None:
        assert TRACE_RE.fullmatch(ctx.trace_id)
        assert ctx.trace_id != "0" * 32
        assert ctx.span_id is None or SPAN_RE.fullmatch(ctx.span_id)
        assert ctx.source in DEFAULT_RULES.sources


# --- fast paths: plans and fast spellings agree with the key-by-key path --------------------------

# Values at the edges of each fast spelling (hex pair, Datadog decimal pair, traceparent 00): valid,
# off by one character, other case, whitespace, zero, non-ASCII digits, other types.
EDGE_VALUES = [
    TRACE, TRACE.upper(), SPAN, SPAN.upper(), "0" * 32, "0" * 16, f" {TRACE[1:]}", TRACE[:-1] + "g",
    SPAN[:-1] + "g", "ab cd" * 6 + "ab", "00f067aa 0ba902b7", TRACE[:31], SPAN + "0", "\u0663" * 16,
    "11803532876627986230", "67667974448284343", "18446744073709551615", "18446744073709551616", "0",
    "-1", "+1", " 1", "1_0", "\u0663\u0664", "0" * 20, "1" * 21, f"00-{TRACE}-{SPAN}-01",
    f"00-{TRACE.upper()}-{SPAN}-zz", f"00-{TRACE}-{SPAN}-0g", f"01-{TRACE}-{SPAN}-01",
    f"00-{'0' * 32}-{SPAN}-01", f"00-{TRACE}-{'0' * 16}-01", f"00-{TRACE}-{SPAN}-01-x",
    f"00_{TRACE}-{SPAN}-01", f"00-{TRACE} {SPAN}-01", bytes.fromhex(TRACE), bytes.fromhex(SPAN),
    TRACE.encode(), 11803532876627986230, None, 1.5,
]  # fmt: skip
# (trace field, span field) pairs whose plans take a fast spelling, or just miss one.
EDGE_PAIRS = [
    ("trace_id", "span_id"), ("traceId", "spanId"), ("otelTraceID", "otelSpanID"),
    ("dd.trace_id", "dd.span_id"), ("traceparent", "span_id"), ("trace_id", "dd.span_id"),
    ("dd.trace_id", "span_id"),
]  # fmt: skip


def edge_cases(trace_key: str, span_key: str) -> list[tuple[dict[Any, Any], dict[Any, Any] | None]]:
    """Records and metadata holding the pair with every combination of EDGE_VALUES."""
    cases: list[tuple[dict[Any, Any], dict[Any, Any] | None]] = []
    for trace, span in itertools.product(EDGE_VALUES, EDGE_VALUES):
        cases.append(({"log": "x", trace_key: trace, "level": 1, span_key: span}, None))
        cases.append(({span_key: span, trace_key: trace, "_dd.p.tid": "4BF92F3577B34DA6"}, None))
        cases.append(({"log": "x"}, {trace_key: trace, span_key: span}))
        if not isinstance(trace, bytes) and not isinstance(span, bytes):
            cases.append(({"log": json.dumps({"msg": "x", trace_key: trace, span_key: span})}, None))
    return cases


def key_by_key(record: Any, metadata: Any = None, rules: IdRules = DEFAULT_RULES) -> TraceContext | None:
    """extract_trace_context without plans: every map read key by key, every candidate resolved."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ids, "PLAN_MAX_KEYS", -1)
        return extract_trace_context(record, metadata, rules=rules)


@pytest.mark.parametrize(("trace_key", "span_key"), EDGE_PAIRS)
def test_fast_spellings_agree_with_the_key_by_key_path(trace_key, span_key, monkeypatch):
    """For every edge value of a fast spelling, the plan's answer is the key-by-key answer."""
    cases = edge_cases(trace_key, span_key)
    planned = [extract_trace_context(record, metadata) for record, metadata in cases]
    monkeypatch.setattr(ids, "PLAN_MAX_KEYS", -1)
    by_keys = [extract_trace_context(record, metadata) for record, metadata in cases]
    assert [(case, ctx) for case, ctx in zip(cases, planned, strict=True)] == list(
        zip(cases, by_keys, strict=True)
    )
    assert any(ctx is not None for ctx in planned)
    assert any(ctx is None for ctx in planned)


json_values = st.one_of(
    st.sampled_from([value for value in EDGE_VALUES if not isinstance(value, bytes)]), texts, st.integers()
)
id_values = st.one_of(json_values, st.binary(max_size=20))
id_records = st.dictionaries(
    st.one_of(st.sampled_from(ID_KEYS + [key for pair in EDGE_PAIRS for key in pair]), keys),
    st.one_of(
        id_values,
        st.dictionaries(st.sampled_from(["id", "trace_id", "span_id", "x"]), id_values, max_size=3),
        st.dictionaries(st.sampled_from(ID_KEYS), json_values, max_size=4).map(json.dumps),
    ),
    max_size=8,
)
custom_rules = st.sampled_from(
    [
        DEFAULT_RULES,
        IdRules(scan_text=False, json_max_bytes=40),
        IdRules.from_names(trace_fields=["myTrace"], span_fields=["mySpan"]),
        IdRules.from_names(
            trace_fields=["otelTraceID"], replace_defaults=True, message_fields=["span_id", "log"]
        ),
    ]
)


@given(id_records, st.one_of(st.none(), id_records), custom_rules)
def test_plans_agree_with_the_key_by_key_path(record, metadata, rules):
    """Any record, metadata and rules give the same context with plans as key by key."""
    assert extract_trace_context(record, metadata, rules=rules) == key_by_key(record, metadata, rules)


@given(
    st.one_of(st.text(alphabet="0123456789abcdefABCDEF \t", max_size=34), st.binary(), st.integers()),
    st.one_of(st.text(alphabet="0123456789abcdefABCDEF \t", max_size=18), st.binary(), st.integers()),
)
@example(TRACE, "0" * 16)
@example(TRACE.upper(), SPAN.upper())
@example(TRACE, f" {SPAN}")
@example(TRACE, bytes(8))
@example("0" * 32, SPAN)
def test_trace_and_span_fields_read_as_the_normalizers_read(trace, span):
    """A record with a trace_id and a span_id field gets them exactly as the normalizers read them."""
    ctx = extract_trace_context({"trace_id": trace, "span_id": span, "log": "x"})
    expected = normalize_trace_id(trace)
    if expected is None:
        assert ctx is None
    else:
        assert ctx == TraceContext(trace_id=expected, span_id=normalize_span_id(span), source="trace_id")


@pytest.mark.parametrize(
    ("record", "metadata"),
    [
        ({"trace_id": TRACE, "span_id": SPAN}, None),  # fast hex pair
        ({"dd.trace_id": "11803532876627986230", "dd.span_id": "67667974448284343"}, None),  # Datadog
        ({"log": json.dumps({"traceparent": f"00-{TRACE}-{SPAN}-01"})}, None),  # traceparent, JSON
        ({"log": f"trace_id={TRACE} span_id={SPAN}"}, None),  # text: through _resolve
        ({"trace": {"id": TRACE}}, None),  # no plan: nested map
        ({}, {"otlp": {"trace_id": bytes.fromhex(TRACE)}}),  # metadata
    ],
)
def test_contexts_from_every_path_are_plain_trace_contexts(record, metadata):
    """Each path returns an exact, immutable TraceContext that equals its constructed twin."""
    ctx = extract_trace_context(record, metadata)
    twin = TraceContext(trace_id=ctx.trace_id, span_id=ctx.span_id, source=ctx.source)
    assert type(ctx) is TraceContext
    assert (ctx, repr(ctx), hash(ctx)) == (twin, repr(twin), hash(twin))
    assert ctx._replace(source="x") == TraceContext(trace_id=ctx.trace_id, span_id=ctx.span_id, source="x")
    with pytest.raises(AttributeError):
        ctx.source = "x"  # type: ignore[misc]


def test_plan_and_skip_caches_are_bounded():
    """Records of ever-new shapes never grow the plan and key caches beyond their limits."""
    rules = IdRules()
    for i in range(max(ids.PLAN_CACHE_MAX, ids.KEY_CACHE_MAX) + 10):
        assert extract_trace_context({f"k{i}": 1, "trace_id": TRACE}, rules=rules).trace_id == TRACE
    assert 0 < len(rules._plans) <= ids.PLAN_CACHE_MAX
    assert 0 < len(rules._skip) <= ids.KEY_CACHE_MAX


def test_long_keys_are_not_cached():
    """A key longer than any id name is read but kept in no cache."""
    rules = IdRules()
    long_key = "k" * (ids.MAX_KEY_CHARS + 1)
    assert extract_trace_context({long_key: 1, "trace_id": TRACE}, rules=rules).trace_id == TRACE
    assert long_key not in rules._skip
    assert not rules._plans
    assert extract_trace_context({"trace_id": TRACE}, rules=rules).trace_id == TRACE
    assert rules._plans


def test_maps_with_more_keys_than_a_plan_are_read_key_by_key():
    """Records and JSON lines wider than PLAN_MAX_KEYS give their ids without a plan."""
    rules = IdRules()
    wide = {f"k{i}": i for i in range(ids.PLAN_MAX_KEYS)}
    assert ids_of(extract_trace_context({**wide, "trace_id": TRACE, "span_id": SPAN}, rules=rules)) == (
        TRACE,
        SPAN,
    )
    ctx = extract_trace_context({"log": json.dumps({**wide, "traceId": TRACE})}, rules=rules)
    assert (ctx.trace_id, ctx.source) == (TRACE, "log:json")
    assert list(rules._plans) == [("log",)]  # the record's own plan: only the wide maps have none
