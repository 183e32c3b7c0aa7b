"""Differential tests of the fast paths of fluentforward.ids against its generic path.

``extract_trace_context`` answers most records through shortcuts: a plan per record shape, the
fast spellings of a plan (_fast_context), the JSON log line read inline, and the two-candidate
shortcut of _resolve. The reference below turns all of them off (no plans, so every map is read key
by key, and _resolve always takes its general loop); both must give the same context for any
record, in particular for JSON log lines with id keys in any case and spelling, escaped, nested,
and for lines without ids.
"""

from __future__ import annotations

import itertools
import json
import operator
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fluentforward import ids
from fluentforward.ids import DEFAULT_RULES, IdRules, TraceContext, extract_trace_context
from tests import test_ids

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
# Ids whose text holds no part of an id field name (TRACE holds `b3`): in a line whose only id key is
# spelled oddly, nothing else looks like an id name, so a reader that wrongly skips it is seen.
TRACE2 = "0af7651916cd43dd8448eb211c80319c"
SPAN2 = "c7ad6c7169203331"

# A candidate sorted after every real one, of a kind that never yields an id: with it, _resolve
# never sees exactly two candidates, so it takes its general loop.
_INERT = ids._Rule(
    label="inert", metadata_label="metadata:inert", kind=ids._K_DD_TID, priority=1 << 62, datadog=False
)
_resolve = ids._resolve


def _general_resolve(found: list[Any], fallback: list[Any] | None, source: str | None) -> TraceContext | None:
    found.sort(key=operator.itemgetter(0))  # as _resolve sorts in place (callers reuse the list)
    return _resolve([*found, (_INERT.priority, _INERT, None)], fallback, source)


def reference(record: Any, metadata: Any = None, rules: IdRules = DEFAULT_RULES) -> TraceContext | None:
    """extract_trace_context with every shortcut off: no plans, no fast spellings, no pair path."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ids, "PLAN_MAX_KEYS", -1)
        patch.setattr(ids, "_resolve", _general_resolve)
        return extract_trace_context(record, metadata, rules=rules)


# --- generated JSON log lines ---------------------------------------------------------------------

# Names of id fields (and of their parts, which nest: {"dd": {"trace_id": ...}}), other keys.
ID_NAMES = [
    "trace_id", "traceId", "TraceID", "trace.id", "trace-id", "traceid", "span_id", "spanId", "SpanID",
    "span.id", "otelTraceID", "otelSpanID", "traceparent", "dd.trace_id", "dd.span_id", "dd_trace_id",
    "_dd.p.tid", "b3", "@tr", "@sp", "X-B3-TraceId", "X-B3-SpanId", "uber-trace-id", "sentry-trace",
    "X-Amzn-Trace-Id", "X-Cloud-Trace-Context", "logging.googleapis.com/trace", "transaction.id",
    "xray_trace_id", "ElasticApmTraceId",
]  # fmt: skip
NAME_PARTS = ["trace", "span", "id", "dd", "t", "race_id", "tr", "ace", "otel", "p", "tid", "logging"]
OTHER_NAMES = ["level", "msg", "message", "log", "ts", "event", "logger", "x", "Trace", "spans", "stacktrace"]


@st.composite
def key_spellings(draw: st.DrawFn) -> str:
    """A key as a log line writes it: an id name, a part of one or another key, in any case, and
    (sometimes) with a character dropped or a separator (`_`, `-`, `.`) added."""
    name = draw(st.sampled_from(ID_NAMES + ID_NAMES + NAME_PARTS + OTHER_NAMES))
    case = draw(st.sampled_from([str, str.lower, str.upper, None]))
    if case is not None:
        return case(name)
    chars = []
    for char in name:
        if draw(st.integers(0, 19)) == 0:
            continue
        chars.append(char.upper() if draw(st.booleans()) else char.lower())
        if draw(st.integers(0, 11)) == 0:
            chars.append(draw(st.sampled_from("_-.")))
    return "".join(chars) or name


def json_key(key: str, escape: list[bool]) -> str:
    """The key as JSON text, some characters written as `\\uXXXX` (or `\\/`) escapes."""
    out = []
    for i, char in enumerate(key):
        if escape[i % len(escape)]:
            out.append("\\/" if char == "/" else f"\\u{ord(char):04x}")
        else:
            out.append(json.dumps(char)[1:-1])
    return '"' + "".join(out) + '"'


HEX = "0123456789abcdefABCDEF"
VALID_IDS = [TRACE, SPAN, TRACE2, SPAN2, TRACE2.upper(), "11803532876627986230", "67667974448284343",
             f"00-{TRACE2}-{SPAN2}-01", f"{TRACE2}-{SPAN2}-1"]  # fmt: skip
ODD_IDS = [
    f"01-{TRACE}-{SPAN}-01",
    f"ff-{TRACE}-{SPAN}-01",
    f"00-{TRACE}-{SPAN}-01-",
    "4bf92f3577b34da6",
    "\u0663\u0664",
    "1\u0663",
    SPAN.upper(),
    f"00-{TRACE.upper()}-{SPAN}-01",
    "00-" + TRACE + "-" + SPAN + "-0g",
]
id_values = st.one_of(
    st.sampled_from(VALID_IDS),
    st.sampled_from(ODD_IDS),
    st.sampled_from(
        [
            TRACE,
            SPAN,
            TRACE.upper(),
            SPAN.upper(),
            "0" * 32,
            "0" * 16,
            f"00-{TRACE}-{SPAN}-01",
            f"00-{TRACE}-{'0' * 16}-01",
            "11803532876627986230",
            "67667974448284343",
            "0",
            "",
            f"{TRACE}-{SPAN}-1",
            f"1-{TRACE[:8]}-{TRACE[8:]}",
            "4BF92F3577B34DA6",
        ]
    ),  # fmt: skip
    st.text(alphabet=HEX, min_size=14, max_size=34),
    st.text(alphabet=HEX + " -g", max_size=40),
    st.integers(min_value=-1, max_value=1 << 64),
    st.none(),
    st.booleans(),
)


def json_objects(depth: int = 0) -> st.SearchStrategy[str]:
    """JSON objects as text: id and other keys, escaped or not, nested up to 3 levels."""
    value = id_values.map(json.dumps)
    if depth < 3:  # noqa: PLR2004
        value = st.one_of(value, st.deferred(lambda: json_objects(depth + 1)))
    member = st.builds(
        lambda key, escape, item, space: f"{json_key(key, escape)}:{space}{item}",
        key_spellings(),
        st.one_of(st.just([False]), st.lists(st.booleans(), min_size=1, max_size=5)),
        value,
        st.sampled_from(["", " ", "\n  "]),
    )
    members = st.lists(member, max_size=5 if depth else 8)
    if depth == 0:  # often a trace and a span field of one family, as the fast spellings read them
        members = (
            st.builds(
                lambda pair, values, others, at: [*others[:at], *pair_members(pair, values), *others[at:]],
                st.sampled_from(FIELD_PAIRS),
                st.tuples(id_values, id_values),
                st.lists(member, max_size=3),
                st.integers(0, 3),
            )
            | members
        )
    return members.map(lambda members: "{" + ", ".join(members) + "}")


# (trace field, span field) pairs, as the fast spellings of a plan read them (or just miss).
FIELD_PAIRS = [
    ("trace_id", "span_id"), ("traceId", "spanId"), ("otelTraceID", "otelSpanID"), ("dd.trace_id", "dd.span_id"),
    ("traceparent", "span_id"), ("traceparent", None), ("dd.trace_id", "span_id"), ("trace_id", "dd.span_id"),
    ("dd.trace_id", "_dd.p.tid"),
]  # fmt: skip


def pair_members(pair: tuple[str, str | None], values: tuple[Any, Any]) -> list[str]:
    trace_key, span_key = pair
    members = [f"{json.dumps(trace_key)}: {json.dumps(values[0])}"]
    if span_key is not None:
        members.append(f"{json.dumps(span_key)}: {json.dumps(values[1])}")
    return members


json_lines = st.builds(
    lambda lead, obj, trail: lead + obj + trail,
    st.sampled_from(["", "", " ", "\n\t "]),
    json_objects(),
    st.sampled_from(["", "\n", " x", "}"]),
)
# One trace id field in a line that holds no other part of an id name: its key in any case, with
# separators, escapes, and split over nested maps (`{"tr": {"ace_id": ...}}` is `trace_id` too).
HIDDEN_NAMES = {
    "trace_id": TRACE2, "traceId": TRACE2, "otelTraceID": TRACE2, "@tr": TRACE2, "X-B3-TraceId": TRACE2,
    "ElasticApmTraceId": TRACE2, "logging.googleapis.com/trace": f"projects/p/traces/{TRACE2}",
    "b3": f"{TRACE2}-{SPAN2}-1", "traceparent": f"00-{TRACE2}-{SPAN2}-01", "dd.trace_id": "11803532876627986230",
    "xray_trace_id": f"1-{TRACE2[:8]}-{TRACE2[8:]}", "uber-trace-id": f"{TRACE2}:{SPAN2}:0:1",
}  # fmt: skip


@st.composite
def hidden_id_lines(draw: st.DrawFn) -> str:
    name = draw(st.sampled_from(sorted(HIDDEN_NAMES)))
    spelled = ""
    for char in name:
        spelled += char.upper() if draw(st.booleans()) else char.lower()
        if draw(st.integers(0, 5)) == 0:
            spelled += draw(st.sampled_from("_-."))
    cuts = sorted(set(draw(st.lists(st.integers(1, len(spelled) - 1), max_size=3))))
    escape = draw(st.lists(st.booleans(), min_size=1, max_size=4))
    member = json.dumps(HIDDEN_NAMES[name])
    for start, end in reversed(list(zip([0, *cuts], [*cuts, len(spelled)], strict=True))):
        member = f"{json_key(spelled[start:end], escape)}: {member}"
        if start:
            member = "{" + member + "}"
    filler = draw(st.lists(st.sampled_from(['"level": "info"', '"msg": "done"', '"n": 1']), max_size=2))
    return "{" + ", ".join(draw(st.permutations([*filler, member]))) + "}"


TEXT_KEYS = ["trace_id", "TRACE_ID", "traceid", "trace.id", "trace-id", "traceparent", "dd.trace_id",
             "dd_trace_id", "otelTraceID", "otelTraceId", "xtrace_id", "span_id", "SPAN_ID"]  # fmt: skip
text_lines = st.builds(
    lambda key, sep, value, rest: f"level=info {key}{sep}{value} {rest}",
    st.one_of(st.sampled_from(TEXT_KEYS), key_spellings()),
    st.sampled_from(["=", ": ", '":"', " = "]),
    id_values.map(str),
    st.one_of(st.just(f"span_id={SPAN}"), st.just("span_id=0000000000000000"), st.text(max_size=30)),
)
# Record fields besides the log line: none, or span ids (which serve a trace found in the line) and
# trace ids (which win over it).
record_fields = st.dictionaries(
    st.sampled_from(["span_id", "dd.span_id", "spanId", "trace_id", "stream", "transaction.id"]),
    id_values,
    max_size=3,
)


@settings(max_examples=300)
@given(
    st.lists(st.one_of(json_lines, text_lines, hidden_id_lines()), min_size=1, max_size=2),
    record_fields,
    st.booleans(),
)
@example([f'{{"trace_id":"{TRACE}","span_id":"{SPAN}"}}'], {}, False)  # noqa: FBT003
@example(['{"\\u0074race_id":"' + TRACE + '"}'], {}, False)  # noqa: FBT003
@example(['{"t\\u0072ace_id":"' + TRACE2 + '"}'], {}, False)  # escaped  # noqa: FBT003
@example(['{"logging.googleapis.com\\/trace":"' + TRACE2 + '"}'], {}, False)  # noqa: FBT003
@example([f'{{"t": {{"race_id": "{TRACE}"}}}}'], {"span_id": SPAN}, False)  # noqa: FBT003
@example([f'{{"tr": {{"ace": {{"id": "{TRACE2}"}}}}}}'], {"span_id": SPAN2}, False)  # nested  # noqa: FBT003
@example([f'{{"TR_ACE-ID": "{TRACE2}", "x": 1}}'], {}, False)  # separators, case  # noqa: FBT003
@example([f'{{"TRACEID": "{TRACE2}"}}'], {}, False)  # noqa: FBT003
@example([f'{{"B3": "{TRACE2}-{SPAN2}-1"}}'], {}, False)  # noqa: FBT003
@example([f'{{"@Tr": "{TRACE2}", "@sp": "{SPAN2}"}}'], {}, False)  # noqa: FBT003
@example([f'{{"Trace_ID":"{TRACE}","span_id":"{"0" * 16}"}}'], {"span_id": SPAN}, False)  # noqa: FBT003
@example([f'{{"dd.trace_id":"11803532876627986230","dd.span_id":"{SPAN}"}}'], {}, True)  # noqa: FBT003
@example(['{"msg":"x"}', f"trace_id={TRACE} span_id=0000000000000000"], {"span_id": SPAN}, False)  # noqa: FBT003
def test_json_and_text_lines_agree_with_the_generic_path(lines, fields, as_bytes):
    """Any log lines (JSON objects with id keys in any spelling, escaped, nested, or without ids;
    text lines) and record fields give the same context as the generic path."""
    record: dict[str, Any] = dict(fields)
    for key, line in zip(["log", "message"], lines, strict=False):
        record[key] = line.encode() if as_bytes and key == "log" else line
    assert extract_trace_context(record) == reference(record)
    assert extract_trace_context(record) == reference(record)  # again, from the plan caches


@given(st.lists(st.one_of(json_lines, text_lines), min_size=1, max_size=2), record_fields)
def test_custom_rules_agree_with_the_generic_path(lines, fields):
    """The same with user-configured names (no `race` in them) and with text scanning off."""
    rules = IdRules.from_names(trace_fields=["corrId", "X-Request-T"], span_fields=["SpanRef"])
    no_text = IdRules(scan_text=False)
    record: dict[str, Any] = dict(fields)
    for key, line in zip(["msg", "log"], lines, strict=False):
        record[key] = line.replace("traceId", "corr_ID").replace("spanId", "span-Ref")
    assert extract_trace_context(record, rules=rules) == reference(record, rules=rules)
    assert extract_trace_context(record, rules=no_text) == reference(record, rules=no_text)


# --- the two-candidate shortcut of _resolve -------------------------------------------------------

pair_values = st.one_of(
    st.text(alphabet=HEX, min_size=15, max_size=33),
    st.text(alphabet=HEX + " \t-", min_size=15, max_size=33),
    st.sampled_from([TRACE, SPAN, "0" * 32, "0" * 16, TRACE.upper(), f" {SPAN[1:]}", "\u0663" * 16]),
    st.binary(min_size=8, max_size=16),
    st.integers(),
)


RULE_NAMES = ["traceid", "spanid", "ddtraceid", "ddspanid", "ddptid", "oteltraceid", "otelspanid"]


@given(
    pair_values,
    pair_values,
    st.sampled_from(RULE_NAMES),
    st.sampled_from(RULE_NAMES),
    st.sampled_from([None, ids._METADATA_PREFIX, "log:text"]),
    st.one_of(st.none(), st.lists(st.sampled_from([SPAN, "0" * 16, "x", "67667974448284343"]), max_size=2)),
)
@example(TRACE, "0" * 16, "traceid", "spanid", "log:text", [SPAN])
@example("0" * 32, SPAN, "traceid", "spanid", None, None)
@example(TRACE.upper(), SPAN, "oteltraceid", "spanid", ids._METADATA_PREFIX, None)
def test_pair_shortcut_gives_what_the_general_loop_gives(trace, span, first, second, source, spans):
    """Two candidates resolve as the general loop resolves them, with or without fallback spans."""
    rule_of = DEFAULT_RULES._by_name
    fallback = None
    if spans is not None:
        fallback = [
            (rule_of[name].priority, rule_of[name], value)
            for name, value in zip(["spanid", "ddspanid"], spans, strict=False)
        ]
    found = [
        (rule_of[first].priority, rule_of[first], trace),
        (rule_of[second].priority, rule_of[second], span),
    ]
    for order in (found, found[::-1]):
        assert _resolve(list(order), fallback, source) == _general_resolve(list(order), fallback, source)


# --- every edge value of the fast spellings, exhaustively -----------------------------------------

EDGE_VALUES = [
    *test_ids.EDGE_VALUES,
    *ODD_IDS,
    "",
    " ",
    "1",
    "-1",
    "0" * 20,
    "1" * 20,
    "18446744073709551615",
]


@pytest.mark.parametrize(("trace_key", "span_key"), FIELD_PAIRS)
def test_every_edge_pair_agrees_with_the_generic_path(trace_key, span_key):
    """Each pair of edge values, as record fields, in a JSON line (with a record span field to
    lend) and in metadata, gives the generic path's context."""
    cases: list[tuple[dict[str, Any], dict[str, Any] | None]] = []
    for trace, span in itertools.product(EDGE_VALUES, EDGE_VALUES):
        fields = {trace_key: trace} if span_key is None else {trace_key: trace, span_key: span}
        cases.append((fields, None))
        cases.append(({"log": "x"}, fields))
        if not any(isinstance(value, bytes) for value in fields.values()):
            cases.append(({"log": json.dumps(fields), "span_id": SPAN}, None))
    planned = [extract_trace_context(record, metadata) for record, metadata in cases]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ids, "PLAN_MAX_KEYS", -1)
        patch.setattr(ids, "_resolve", _general_resolve)
        generic = [extract_trace_context(record, metadata) for record, metadata in cases]
    assert list(zip(cases, planned, strict=True)) == list(zip(cases, generic, strict=True))
    assert any(ctx is not None for ctx in planned)
