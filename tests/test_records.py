"""Tests for fluentforward.records: templates, defaults, line formats, bounds and text invariants."""

from __future__ import annotations

import copy
import re
import struct
from typing import Any

import msgpack
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fluentforward.errors import ConfigError
from fluentforward.ids import TraceContext
from fluentforward.protocol._events import Entry
from fluentforward.records import (
    DEFAULT_LABELS,
    DEFAULT_STRUCTURED_METADATA,
    FALLBACK_LABEL,
    JSONABLE_MAX_DEPTH,
    LINE_TRUNCATION_MARKER,
    MAX_LABEL_VALUE_BYTES,
    MAX_LABELS,
    MAX_STRUCTURED_METADATA_BYTES,
    MAX_STRUCTURED_METADATA_ENTRIES,
    LineFormat,
    Shaper,
    Template,
    _Group,
    _roots,
    build_rules,
    clean_text,
    jsonable,
    sanitize_label_name,
)
from tests.conftest import FLUENT_BIT

LOKI_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
TRACE = TraceContext(
    trace_id="4bf92f3577b34da6a3ce929d0e0e4736", span_id="00f067aa0ba902b7", source="trace_id"
)
# Every default removed: lets a test configure exactly the labels it looks at.
NO_DEFAULT_LABELS = dict.fromkeys(DEFAULT_LABELS, "")
NO_DEFAULT_METADATA = dict.fromkeys(DEFAULT_STRUCTURED_METADATA, "")


def k8s_record(**labels: str) -> dict[str, Any]:
    """What Fluent Bit tail + the kubernetes filter send for one container line."""
    return {
        "log": "2024-05-01T10:00:00Z INFO order placed id=A-1001\n",
        "stream": "stdout",
        "time": "2024-05-01T10:00:00.123456789Z",
        "_p": "F",
        "kubernetes": {
            "pod_name": "checkout-7d9f8b6c5d-x2x9q",
            "namespace_name": "shop",
            "pod_id": "3f1c2a9e-5b7d-4c1e-9f0a-6e2d8c4b1a7f",
            "labels": labels or {"app.kubernetes.io/name": "checkout", "app": "legacy"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2024-05-01T10:00:00Z"},
            "host": "worker-3",
            "container_name": "api",
            "docker_id": "9a8b7c6d5e4f",
            "container_hash": "registry.example.com/shop/checkout@sha256:0123",
            "container_image": "registry.example.com/shop/checkout:1.4.2",
        },
    }


def shape(record: dict[Any, Any], trace: TraceContext | None = None, **settings: Any) -> Any:
    return Shaper(rules=build_rules(**settings)).shape(
        "kube.var.log.containers.x", Entry(time_ns=7, record=record), trace
    )


def render(source: str, record: dict[Any, Any], **entry: Any) -> str:
    return Template.parse(source).render("app.tag", Entry(time_ns=0, record=record, **entry))


def otlp_capture() -> list[Entry]:
    """The log events of a real Fluent Bit in_opentelemetry -> out_forward capture, with their group."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed((FLUENT_BIT / "otlp_logs.bin").read_bytes())
    ((_tag, entries),) = list(unpacker)
    group = entries[0][1]
    assert "resource" in group
    events = []
    for (event_time, metadata), record in entries[1:-1]:
        seconds, nanos = struct.unpack(">II", event_time.data)
        events.append(Entry(time_ns=seconds * 10**9 + nanos, record=record, metadata=metadata, group=group))
    return events


class TestDefaults:
    def test_kubernetes_record(self) -> None:
        """A tail + kubernetes record gets namespace/container/app/job/cluster labels, pod/node/ids as metadata and its text as line."""
        out = shape(k8s_record(), TRACE, cluster="prod")
        assert out.labels == (
            ("app", "checkout"),
            ("cluster", "prod"),
            ("container", "api"),
            ("job", "shop/checkout"),
            ("namespace", "shop"),
        )
        assert out.structured_metadata == (
            ("trace_id", TRACE.trace_id),
            ("span_id", TRACE.span_id),
            ("pod", "checkout-7d9f8b6c5d-x2x9q"),
            ("node", "worker-3"),
        )
        assert out.line == "2024-05-01T10:00:00Z INFO order placed id=A-1001"
        assert out.time_ns == 7
        assert out.tenant is None

    def test_otlp_entry_with_group(self) -> None:
        """An OTLP event takes namespace and app from its group's resource attributes and its level from metadata."""
        first = otlp_capture()[0]
        out = Shaper(rules=build_rules()).shape("v1_logs", first, TRACE)
        assert out.labels == (("app", "checkout"), ("job", "shop/checkout"), ("namespace", "shop"))
        assert out.structured_metadata == (
            ("trace_id", TRACE.trace_id),
            ("span_id", TRACE.span_id),
            ("level", "INFO"),
        )
        assert out.line == "order placed"
        assert out.time_ns == first.time_ns

    @pytest.mark.parametrize(
        ("pod_labels", "app"),
        [
            ({"app.kubernetes.io/name": "a", "app": "b", "k8s-app": "c"}, "a"),
            ({"app": "b", "k8s-app": "c", "name": "d"}, "b"),
            ({"k8s-app": "c", "name": "d"}, "c"),
            ({"name": "d"}, "d"),
            ({"app.kubernetes.io/name": "", "app": "b"}, "b"),
        ],
    )
    def test_app_fallback_order(self, pod_labels: dict[str, str], app: str) -> None:
        """The app label is the first non-empty of the pod labels app.kubernetes.io/name, app, k8s-app, name."""
        labels = dict(shape(k8s_record(**pod_labels)).labels)
        assert labels["app"] == app
        assert labels["job"] == f"shop/{app}"

    def test_app_falls_back_to_service_name(self) -> None:
        """Without pod labels the app comes from the OTLP resource's service.name."""
        group = {"resource": {"attributes": {"service.name": "svc"}}}
        out = Shaper(rules=build_rules()).shape("t", Entry(time_ns=1, record={"log": "x"}, group=group), None)
        assert out.labels == (("app", "svc"),)

    def test_job_needs_namespace_and_app(self) -> None:
        """job is omitted when the app is unknown, instead of becoming 'shop/'."""
        record = k8s_record()
        record["kubernetes"]["labels"] = {"team": "x"}
        labels = dict(shape(record).labels)
        assert "job" not in labels
        assert "app" not in labels
        assert labels["namespace"] == "shop"

    def test_nothing_resolves_gives_fallback_label_not_tag(self) -> None:
        """A record with nothing to label gets the fixed fallback label, never the tag."""
        out = shape({"log": "hello"})
        assert out.labels == (FALLBACK_LABEL,)
        assert "kube" not in str(out.labels)

    def test_empty_cluster_gives_no_label(self) -> None:
        """The cluster label exists only when the cluster setting is non-empty."""
        assert "cluster" not in dict(shape(k8s_record(), cluster="").labels)

    def test_cluster_is_literal(self) -> None:
        """The cluster setting is taken literally, '$' and '|' included."""
        assert dict(shape({}, cluster="a|$b (c)").labels)["cluster"] == "a|$b (c)"

    def test_user_settings_merge_over_defaults(self) -> None:
        """A user label is added, one is replaced, and an empty template removes a default."""
        out = shape(
            k8s_record(),
            labels={"team": "$kubernetes['labels']['team'] | none", "container": "", "app": "$tag"},
            structured_metadata={"node": "", "image": "$kubernetes['container_image']"},
        )
        labels = dict(out.labels)
        assert labels["team"] == "none"
        assert "container" not in labels
        assert labels["app"] == "kube.var.log.containers.x"
        assert dict(out.structured_metadata)["image"] == "registry.example.com/shop/checkout:1.4.2"
        assert "node" not in dict(out.structured_metadata)

    def test_user_label_replaces_default_metadata(self) -> None:
        """Making pod a label removes the default pod structured metadata."""
        out = shape(k8s_record(), labels={"pod": "$kubernetes['pod_name']"})
        assert dict(out.labels)["pod"] == "checkout-7d9f8b6c5d-x2x9q"
        assert "pod" not in dict(out.structured_metadata)


class TestTraceIds:
    def test_trace_id_only_in_structured_metadata(self) -> None:
        """The trace and span ids go to structured metadata and never into a label value."""
        out = shape(k8s_record(), TRACE, cluster="prod")
        assert all(TRACE.trace_id not in value and TRACE.span_id not in value for _, value in out.labels)
        assert dict(out.structured_metadata)["trace_id"] == TRACE.trace_id

    def test_no_trace_no_ids(self) -> None:
        """Without a trace context there is no trace_id or span_id entry."""
        names = {name for name, _ in shape(k8s_record()).structured_metadata}
        assert not names & {"trace_id", "span_id"}

    def test_trace_without_span(self) -> None:
        """A trace context without span id gives trace_id only."""
        trace = TraceContext(trace_id=TRACE.trace_id, span_id=None, source="x")
        names = [name for name, _ in shape({}, trace).structured_metadata]
        assert names == ["trace_id"]

    @pytest.mark.parametrize(
        "labels",
        [
            {"trace_id": "$record['x']"},
            {"TraceID": "$record['x']"},
            {"otel-span-id": "$record['x']"},
            {"t": "$trace_id"},
            {"t": "$x | ($span_id)"},
            {"t": "$metadata['otlp']['trace_id']"},
            {"t": "$record['traceparent']"},
            {"t": "$dd['trace-id']"},
        ],
    )
    def test_trace_id_label_is_config_error(self, labels: dict[str, str]) -> None:
        """A label named after, or reading, a trace or span id is refused: one stream per request."""
        with pytest.raises(ConfigError, match="structured_metadata"):
            build_rules(labels=labels)

    def test_renamed_trace_metadata(self) -> None:
        """Structured metadata may rename the ids through $trace_id and $span_id."""
        out = shape({}, TRACE, structured_metadata={"trace_id": "", "traceID": "$trace_id"})
        assert dict(out.structured_metadata)["traceID"] == TRACE.trace_id
        assert "trace_id" not in dict(out.structured_metadata)

    def test_otlp_bin_ids_render_as_hex(self) -> None:
        """OTLP ids sent as bin come out as lowercase hex when a template reads them."""
        first = otlp_capture()[0]
        rules = build_rules(structured_metadata={"raw_trace": "$metadata['otlp']['trace_id']"})
        out = Shaper(rules=rules).shape("v1_logs", first, None)
        assert dict(out.structured_metadata)["raw_trace"] == "5b8efff798038103d269b633813fc60c"


class TestTemplates:
    RECORD: dict[Any, Any] = {
        "a": {"b": "ab", "n": 5, "f": 1.5, "t": True, "z": None, "e": "", "m": {}, "l": [1, "x"]},
        "list": ["zero", {"k": "one"}],
        b"bin_key": "from bytes key",
        "bin_value": b"\xff\x00\x10",
        "utf8_bin": b"caf\xc3\xa9",
        "tag": "record tag",
        "weird'key\"]": "w",
        "ext": slice(0, b"k\x07\xe7\xf5\x07[\xcd\x15"),  # what the decoder's ext_hook makes
    }

    @pytest.mark.parametrize(
        ("source", "expected"),
        [
            ("$a['b']", "ab"),
            ("$record['a']['b']", "ab"),
            ('$a["b"]', "ab"),
            ("$a['n']", "5"),
            ("$a['f']", "1.5"),
            ("$a['t']", "true"),
            ("$a['l']", '[1,"x"]'),
            ("$ext", '[0,"6b07e7f5075bcd15"]'),
            ("$a['z']", ""),
            ("$a['missing']", ""),
            ("$a['b']['deeper']", ""),
            ("$list[0]", "zero"),
            ("$list[1]['k']", "one"),
            ("$list[2]", ""),
            ("$bin_key", "from bytes key"),
            ("$bin_value", "ff0010"),
            ("$utf8_bin", "café"),
            ("$tag", "app.tag"),
            ("$record['tag']", "record tag"),
            ("$record['weird\\'key\"]']", "w"),
            ("literal", "literal"),
            ("  spaced out  ", "spaced out"),
            ("$a['missing'] | $a['b']", "ab"),
            ("$a['e'] | $a['m'] | $a['l'][5] | fallback", "fallback"),
            ("$a['missing'] | $a['z']", ""),
            ("$a['b']/$a['n']", "ab/5"),
            ("x-$a['b']-y", "x-ab-y"),
            ("$a['b']/$a['missing']", ""),
            ("$a['b']/$a['missing'] | second", "second"),
            ("($a['missing'] | $a['b'])/($a['n'])", "ab/5"),
            ("(($a['missing'] | $a['e']) | $a['b'])", "ab"),
            ("\\$a \\| \\(x\\)", "$a | (x)"),
            ("$metadata['k']", "mv"),
            ("$group['scope']['name']", "scope-name"),
            ("$resource['service.name']", "svc"),
        ],
    )
    def test_render(self, source: str, expected: str) -> None:
        """Each grammar form renders as documented."""
        group = {"resource": {"attributes": {"service.name": "svc"}}, "scope": {"name": "scope-name"}}
        assert render(source, self.RECORD, metadata={"k": "mv"}, group=group) == expected

    def test_long_compositions(self) -> None:
        """Compositions of many parts (built with join in the generated code) keep their meaning."""
        assert render("-".join(["$a['b']"] * 5), self.RECORD) == "ab-ab-ab-ab-ab"
        assert render("-".join(["$a['b']"] * 4 + ["$a['e']"]), self.RECORD) == ""
        assert render("$a['b']" * 500, self.RECORD) == "ab" * 500

    def test_record_is_bytes_keyed_map(self) -> None:
        """A str key finds the same key sent as bin."""
        assert render("$kubernetes['namespace_name']", {b"kubernetes": {b"namespace_name": b"ns"}}) == "ns"

    def test_code_looking_keys_are_keys(self) -> None:
        """Quotes, backslashes and newlines in keys stay data in the generated code."""
        key = "x'); import os; print(\"\\\n"
        source = "$record['" + key.replace("\\", "\\\\").replace("'", "\\'") + "']"
        assert render(source, {key: "ok"}) == "ok"

    @pytest.mark.parametrize(
        ("source", "message"),
        [
            ("", "column 1: empty alternative"),
            ("   ", "empty alternative"),
            ("$a |", "column 5: empty alternative"),
            ("| $a", "column 1: empty alternative"),
            ("$a || $b", "empty alternative"),
            ("$", "expected a name after '\\$'"),
            ("$1", "expected a name"),
            ("$a[", "expected a quoted key or an array index"),
            ("$a['b'", "expected '\\]'"),
            ("$a['b", "unterminated ' in key"),
            ("$a[b]", "expected a quoted key"),
            ("($a", "column 1: '\\(' is never closed"),
            ("$a)", "column 3: '\\)' without a matching"),
            ("()", "empty alternative"),
            ("$tag['x']", "\\$tag is a string and takes no keys"),
            ("$trace_id[0]", "takes no keys"),
            ("abc\\", "escapes nothing"),
            ("(" * 9 + "$a" + ")" * 9, "nested more than 8 deep"),
            ("$a" * 2049, "is over 4096 chars"),
        ],
    )
    def test_grammar_errors(self, source: str, message: str) -> None:
        """Malformed templates raise ConfigError naming the template, column and problem."""
        with pytest.raises(ConfigError, match=message):
            Template.parse(source)

    def test_render_cleans_surrogates(self) -> None:
        """Template.render returns valid Unicode even from surrogate-escaped input."""
        assert render("$a", {"a": "x\udcff"}) == "x\ufffd"

    def test_is_literal(self) -> None:
        """is_literal tells constant templates from those that read the entry."""
        assert Template.parse("acme").is_literal
        assert not Template.parse("$a | acme").is_literal


class TestLineFormats:
    MERGED: dict[str, Any] = {
        **k8s_record(),
        "level": "info",
        "msg": "order placed",
        "n": 3,
        "nested": {"k": [1, 2]},
    }

    def test_auto_single_log(self) -> None:
        """auto sends the log text without one trailing newline when log is the only payload key."""
        assert shape({"log": "a\n\n", "stream": "stderr", "kubernetes": {}}).line == "a\n"
        assert shape({"log": "crlf\r\n"}).line == "crlf"

    @pytest.mark.parametrize("key", ["log", "message", "msg", b"log"])
    def test_auto_message_keys(self, key: str | bytes) -> None:
        """auto recognises log, message and msg (also as bin keys) as the line."""
        assert shape({key: "text", "time": "t"}).line == "text"

    def test_auto_merged_json(self) -> None:
        """auto sends the payload as compact JSON, without envelope keys, when there are several keys."""
        assert orjson.loads(shape(self.MERGED).line) == {
            "log": "2024-05-01T10:00:00Z INFO order placed id=A-1001\n",
            "level": "info",
            "msg": "order placed",
            "n": 3,
            "nested": {"k": [1, 2]},
        }

    def test_auto_non_text_log_is_json(self) -> None:
        """A log value that is not text makes auto fall back to JSON."""
        assert shape({"log": {"a": 1}}).line == '{"log":{"a":1}}'
        assert shape({"stream": "stdout"}).line == "{}"

    def test_auto_bin_log_is_text(self) -> None:
        """A log sent as bin is decoded as UTF-8 with U+FFFD for invalid bytes."""
        assert shape({"log": b"caf\xc3\xa9 \xff\n"}).line == "café \ufffd"

    def test_raw(self) -> None:
        """raw prefers log, then message, then msg, and falls back to JSON."""
        assert (
            shape(self.MERGED, line_format="raw").line == "2024-05-01T10:00:00Z INFO order placed id=A-1001"
        )
        assert shape({"msg": "m", "message": "x"}, line_format="raw").line == "x"
        assert shape({"a": 1}, line_format="raw").line == '{"a":1}'

    def test_json(self) -> None:
        """json sends the payload as JSON even when it is a single log key."""
        assert shape({"log": "x", "kubernetes": {"a": 1}}, line_format="json").line == '{"log":"x"}'

    def test_json_bytes_and_surrogates(self) -> None:
        """JSON lines carry bin values as text or hex and invalid UTF-8 as U+FFFD."""
        line = shape({"a": b"\x01\xff", b"k": "v\udcff", 1: None}, line_format="json").line
        assert orjson.loads(line) == {"a": "01ff", "k": "v\ufffd", "1": None}

    def test_key_value(self) -> None:
        """key_value writes logfmt, quoting values with spaces, quotes, '=' or nothing, maps as JSON."""
        record = {
            "level": "info",
            "msg": "order placed",
            "q": 'say "hi"',
            "eq": "a=b",
            "empty": "",
            "none": None,
            "flag": False,
            "n": 1.5,
            "map": {"k": "v"},
            "bad key": "x",
            "kubernetes": {"pod_name": "p"},
        }
        assert shape(record, line_format="key_value").line == (
            'level=info msg="order placed" q="say \\"hi\\"" eq="a=b" empty="" none=null '
            'flag=false n=1.5 map="{\\"k\\":\\"v\\"}" bad_key=x'
        )

    def test_custom_envelope_keys(self) -> None:
        """envelope_keys replaces the default set of non-payload keys."""
        record = {"log": "x", "stream": "stdout", "host": "h"}
        assert shape(record, envelope_keys=["host"]).line == '{"log":"x","stream":"stdout"}'
        assert shape(record, envelope_keys=["host", "stream"]).line == "x"

    def test_long_line_truncated_with_marker(self) -> None:
        """A line over max_line_bytes is cut at a UTF-8 boundary and marked, within the bound."""
        out = shape({"log": "é" * 100}, max_line_bytes=101)
        assert len(out.line.encode()) <= 101
        assert out.line.endswith(LINE_TRUNCATION_MARKER)
        assert out.line == "é" * 43 + LINE_TRUNCATION_MARKER

    def test_long_json_line_truncated(self) -> None:
        """JSON lines are bounded the same way."""
        out = shape({"a": "x" * 500, "b": 1}, max_line_bytes=100, line_format="json")
        assert len(out.line.encode()) == 100
        assert out.line.endswith(LINE_TRUNCATION_MARKER)

    def test_unbounded_line(self) -> None:
        """max_line_bytes 0 keeps any length."""
        assert len(shape({"log": "x" * 300_000}, max_line_bytes=0).line) == 300_000

    def test_default_bound(self) -> None:
        """By default a line stays within Loki's 256 KB limit."""
        assert len(shape({"log": "x" * 300_000}).line) == 256_000


class TestBounds:
    @pytest.mark.parametrize(
        ("name", "expected"),
        [
            ("app", "app"),
            ("app.kubernetes.io/name", "app_kubernetes_io_name"),
            ("k8s-app", "k8s_app"),
            ("1st", "_1st"),
            ("__name__", "_name__"),
            ("___", "_"),
            ("é", "_"),
            ("", "_"),
        ],
    )
    def test_sanitize_label_name(self, name: str, expected: str) -> None:
        """Label names map onto Loki's alphabet without a leading digit or reserved '__'."""
        assert sanitize_label_name(name) == expected

    def test_configured_names_are_sanitized(self) -> None:
        """Configured label and metadata names are sanitized once, at build time."""
        out = shape({"a": "v"}, labels={"team.name": "$a", "9x": "$a"}, structured_metadata={"user-id": "$a"})
        assert ("team_name", "v") in out.labels
        assert ("_9x", "v") in out.labels
        assert ("user_id", "v") in out.structured_metadata

    def test_sanitized_collision_is_config_error(self) -> None:
        """Two names that sanitize to the same one are refused."""
        with pytest.raises(ConfigError, match="both become 'a_b'"):
            build_rules(labels={"a.b": "$x", "a-b": "$y"})

    def test_more_than_15_labels_is_config_error(self) -> None:
        """Configuring a 16th label fails at build time."""
        extra = {f"l{i}": "$x" for i in range(MAX_LABELS - len(DEFAULT_LABELS) - 1)}
        build_rules(labels=extra, cluster="c")
        with pytest.raises(ConfigError, match="16 configured .*Loki allows 15"):
            build_rules(labels={**extra, "one_more": "$x"}, cluster="c")

    def test_too_many_structured_metadata_is_config_error(self) -> None:
        """Configuring more than 128 structured metadata entries fails at build time."""
        extra = {f"m{i}": "$x" for i in range(MAX_STRUCTURED_METADATA_ENTRIES)}
        with pytest.raises(ConfigError, match="structured_metadata: 133 configured"):
            build_rules(structured_metadata=extra)

    def test_label_value_cut_at_utf8_boundary(self) -> None:
        """A long label value is cut to 2048 bytes without splitting a character."""
        value = dict(shape({"a": "é" * 2000}, labels={"x": "$a"}).labels)["x"]
        assert value == "é" * (MAX_LABEL_VALUE_BYTES // 2)
        odd = dict(shape({"a": "a" + "é" * 2000}, labels={"x": "$a"}).labels)["x"]
        assert len(odd.encode()) == MAX_LABEL_VALUE_BYTES - 1

    def test_surrogates_and_bytes_become_valid_text(self) -> None:
        """Lone surrogates become U+FFFD and invalid bin values hex, in labels and metadata alike."""
        record = {"s": "ns\udcc3\udca9", "b": b"\xff\xfe"}
        out = shape(record, labels={"s": "$s", "b": "$b"}, structured_metadata={"s2": "$s", "b2": "$b"})
        assert dict(out.labels) == {"s": "ns\ufffd\ufffd", "b": "fffe"}
        assert dict(out.structured_metadata) == {"s2": "ns\ufffd\ufffd", "b2": "fffe"}

    def test_structured_metadata_budget_drops_deterministically(self) -> None:
        """Entries that would exceed 64 KB are dropped in configured order; later small ones still fit."""
        record = {"big": "x" * 40_000, "small": "s"}
        out = shape(
            record,
            structured_metadata={"m1": "$big", "m2": "$big", "m3": "$small"},
        )
        assert [name for name, _ in out.structured_metadata] == ["m1", "m3"]
        assert (
            sum(len(n) + len(v.encode()) for n, v in out.structured_metadata) <= MAX_STRUCTURED_METADATA_BYTES
        )

    def test_tenant_literal_and_template(self) -> None:
        """The tenant is a literal or a per-record template; empty means the sink's tenant."""
        assert shape({}, tenant="acme").tenant == "acme"
        assert shape(k8s_record(), tenant="$kubernetes['namespace_name']").tenant == "shop"
        assert shape({}, tenant="$kubernetes['namespace_name']").tenant is None
        assert shape({}, tenant="").tenant is None

    @pytest.mark.parametrize(
        ("value", "tenant"),
        [("team a/b", "team_a_b"), ("..", "__"), (".", "_"), ("x" * 200, "x" * 150), ("é", "_")],
    )
    def test_per_record_tenant_sanitized(self, value: str, tenant: str) -> None:
        """A per-record tenant is mapped onto Loki's tenant alphabet and 150 bytes."""
        assert shape({"t": value}, tenant="$t").tenant == tenant

    @pytest.mark.parametrize(
        ("settings", "message"),
        [
            ({"line_format": "xml"}, "line_format 'xml' is not one of auto, raw, json, key_value"),
            ({"tenant": "a/b"}, "tenant 'a/b': Loki accepts"),
            ({"tenant": "$a["}, "tenant: template"),
            ({"tenant": 5}, "tenant must be a string"),
            ({"envelope_keys": "stream,_p"}, "envelope_keys must be a list"),
            ({"max_line_bytes": 10}, "max_line_bytes must be 0 or >= 64"),
            ({"max_line_bytes": True}, "max_line_bytes"),
            ({"labels": ["a"]}, "labels must be a table"),
            ({"labels": {"a": 1}}, "labels.a: template must be a string"),
            ({"labels": {"": "$a"}}, "name '' must be a non-empty string"),
            ({"labels": {"x" * 1100: "$a"}}, "over 1024 bytes"),
            ({"labels": {"a": "$a["}}, "labels.a: template '\\$a\\[', column 4"),
            (
                {"structured_metadata": {"pod": "$p"}, "labels": {"pod": "$p"}},
                "both as a label and as structured",
            ),
            ({"cluster": "x" * 3000}, "cluster"),
            ({"cluster": None}, "cluster must be a string"),
        ],
    )
    def test_invalid_settings(self, settings: dict[str, Any], message: str) -> None:
        """Each invalid setting raises ConfigError with a precise message."""
        with pytest.raises(ConfigError, match=message):
            build_rules(**settings)


class TestJsonable:
    def test_converts_everything_orjson_refuses(self) -> None:
        """bytes keys and values, surrogates, odd keys, tuples, ext values and huge ints become JSON-ready values."""
        value = {
            b"bk": b"\xff\x01",
            "s": "a\udcff",
            1: [("t", b"ok")],
            None: True,
            2.5: 2**70,
            "ext": msgpack.ExtType(5, b"\x01"),
            "slice_ext": slice(0, b"\x00\xff"),
        }
        assert jsonable(value) == {
            "bk": "ff01",
            "s": "a\ufffd",
            "1": [["t", "ok"]],
            "null": True,
            "2.5": str(2**70),
            "ext": [5, "01"],
            "slice_ext": [0, "00ff"],
        }
        orjson.dumps(jsonable(value))

    def test_depth_is_bounded(self) -> None:
        """Containers nested deeper than the bound are replaced by a marker string."""
        deep: Any = "leaf"
        for _ in range(JSONABLE_MAX_DEPTH + 50):
            deep = [deep]
        out = jsonable(deep)
        orjson.dumps(out)
        for _ in range(JSONABLE_MAX_DEPTH):
            out = out[0]
        assert out == "[too deep]"

    def test_does_not_mutate(self) -> None:
        """jsonable returns a copy."""
        value = {"a": [b"x"]}
        jsonable(value)
        assert value == {"a": [b"x"]}

    def test_clean_text(self) -> None:
        """clean_text replaces every lone surrogate and nothing else."""
        assert clean_text("a\udcff\ud800b€") == "a\ufffd\ufffdb€"
        assert clean_text("plain") == "plain"


class TestNoMutation:
    @pytest.mark.parametrize("line_format", list(LineFormat))
    def test_record_metadata_group_unchanged(self, line_format: LineFormat) -> None:
        """Shaping never modifies the record, the metadata or the group."""
        for entry in [*otlp_capture(), Entry(time_ns=1, record=k8s_record(), metadata={"m": [b"x"]})]:
            before = copy.deepcopy((entry.record, entry.metadata, entry.group))
            Shaper(rules=build_rules(line_format=line_format, tenant="$kubernetes['namespace_name']")).shape(
                "t", entry, TRACE
            )
            assert (entry.record, entry.metadata, entry.group) == before


# --- property tests ---------------------------------------------------------------------------

KEYS = ["a", "b", "log", "kubernetes", "labels", "namespace_name", "app", "service.name"]
wire_text = st.one_of(
    st.text(max_size=8),
    st.sampled_from(KEYS),
    st.binary(max_size=8).map(lambda b: b.decode("utf-8", "surrogateescape")),
)
keys = st.one_of(
    wire_text, st.binary(max_size=4), st.sampled_from([k.encode() for k in KEYS]), st.integers(-2, 2)
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    wire_text,
    st.binary(max_size=8),
    st.builds(slice, st.integers(-128, 127), st.binary(max_size=8)),  # the decoder's ext values
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=12,
)
records = st.dictionaries(keys, values, max_size=6)
entries = st.builds(
    Entry,
    time_ns=st.integers(0, 2**63),
    record=records,
    metadata=st.one_of(st.just({}), st.dictionaries(keys, values, max_size=3)),
    group=st.one_of(
        st.none(),
        st.builds(
            lambda attrs: {"resource": {"attributes": attrs}}, st.dictionaries(keys, values, max_size=3)
        ),
    ),
)


def is_valid_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@given(entry=entries, tag=wire_text, line_format=st.sampled_from(list(LineFormat)))
def test_shaping_any_record_is_valid_for_loki(entry: Entry, tag: str, line_format: LineFormat) -> None:
    """Any decoded record shapes without error into valid Unicode, valid label names and bounded sizes."""
    before = copy.deepcopy(entry)
    rules = build_rules(
        line_format=line_format,
        cluster="prod",
        tenant="$a",
        labels={"a": "$a | $b['labels'] | $tag", "b": "$b['a'][0]/$log"},
        structured_metadata={"m": "$record | $metadata"},
        max_line_bytes=200,
    )
    out = Shaper(rules=rules).shape(tag, entry, TRACE)
    assert entry == before
    assert 1 <= len(out.labels) <= MAX_LABELS
    assert [name for name, _ in out.labels] == sorted(name for name, _ in out.labels)
    for name, value in out.labels:
        assert LOKI_LABEL_NAME.fullmatch(name)
        assert not name.startswith("__")
        assert value
        assert is_valid_text(value)
        assert len(value.encode()) <= MAX_LABEL_VALUE_BYTES
    assert len(out.structured_metadata) <= MAX_STRUCTURED_METADATA_ENTRIES
    assert sum(len(n) + len(v.encode()) for n, v in out.structured_metadata) <= MAX_STRUCTURED_METADATA_BYTES
    assert all(is_valid_text(v) and v for _, v in out.structured_metadata)
    assert is_valid_text(out.line)
    assert len(out.line.encode()) <= 200
    assert out.tenant is None or re.fullmatch(r"[A-Za-z0-9!\-_.*'()]{1,150}", out.tenant)


@given(value=values)
def test_jsonable_always_dumps(value: Any) -> None:
    """orjson accepts jsonable() of any decoded value."""
    assert is_valid_text(orjson.dumps(jsonable(value)).decode())


@given(name=st.text())
def test_sanitized_names_are_valid(name: str) -> None:
    """Any text sanitizes to a valid, unreserved Loki label name."""
    out = sanitize_label_name(name)
    assert LOKI_LABEL_NAME.fullmatch(out)
    assert not out.startswith("__")


@given(source=st.text(alphabet="$ab()|'[]\\0 x", max_size=20))
def test_parse_raises_only_config_error(source: str) -> None:
    """Any template text parses or raises ConfigError, nothing else."""
    try:
        Template.parse(source)
    except ConfigError:
        pass


# A reference evaluator written from the module docstring's semantics, independent of the
# generated code; the property below checks that both agree.


def reference_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return value.hex()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value) if isinstance(value, int) else repr(value)
    return orjson.dumps(jsonable(value)).decode() if value else ""


def reference_eval(alternatives: Any, roots: list[Any]) -> str:
    for parts in alternatives:
        pieces = []
        for part in parts:
            if isinstance(part, str):
                pieces.append(part)
                continue
            if isinstance(part, _Group):
                text = reference_eval(part.alternatives, roots)
            else:
                value = roots[part.root]
                for key, alt in part.steps:
                    if isinstance(value, dict):
                        found = value.get(key)
                        value = value.get(alt) if found is None and alt is not None else found
                    elif isinstance(value, list) and isinstance(key, int):
                        value = value[key] if key < len(value) else None
                    else:
                        value = None
                text = reference_text(value)
            if not text:
                break
            pieces.append(text)
        else:
            return "".join(pieces)
    return ""


paths = st.lists(
    st.one_of(st.sampled_from(KEYS).map(lambda k: f"['{k}']"), st.integers(0, 2).map(lambda i: f"[{i}]")),
    max_size=3,
).map("".join)
accessors = st.one_of(
    st.builds(lambda k, p: f"${k}{p}", st.sampled_from(["a", "b", "log", "kubernetes"]), paths),
    st.builds(lambda r, p: f"${r}{p}", st.sampled_from(["record", "metadata", "resource", "group"]), paths),
    st.just("$tag"),
)
templates = st.recursive(
    st.one_of(accessors, st.sampled_from(["lit", "-", "x y"])),
    lambda inner: st.one_of(
        st.lists(inner, min_size=2, max_size=3).map(" | ".join),
        st.lists(inner, min_size=2, max_size=3).map("/".join),
        inner.map(lambda t: f"({t})"),
    ),
    max_leaves=6,
)


@given(entry=entries, sources=st.lists(templates, min_size=1, max_size=4))
def test_generated_code_matches_reference(entry: Entry, sources: list[str]) -> None:
    """Labels and metadata from the generated evaluator equal a naive evaluation of the same templates."""
    named = {f"x{i}": source for i, source in enumerate(sources)}
    rules = build_rules(
        labels={**NO_DEFAULT_LABELS, **named},
        structured_metadata={**NO_DEFAULT_METADATA, **{f"m{i}": s for i, s in enumerate(sources)}},
        # The same templates again as groups of a composition: exercises value reuse.
        tenant="(" + ")(".join(sources) + ")",
    )
    out = Shaper(rules=rules).shape("the.tag", entry, TRACE)
    group = entry.group
    resource = group["resource"]["attributes"] if group else None
    roots = [entry.record, entry.metadata, resource, group, "the.tag", TRACE.trace_id, TRACE.span_id]
    expected = {
        name: clean_text(reference_eval(Template.parse(s)._alternatives, roots)) for name, s in named.items()
    }
    labels = {name: value for name, value in expected.items() if value}
    assert dict(out.labels) == (labels or dict([FALLBACK_LABEL]))
    metadata = {f"m{name[1:]}": value for name, value in expected.items() if value}
    assert dict(out.structured_metadata) == metadata
    if all(expected.values()):
        assert out.tenant is not None


# --- memoized stream fields ---------------------------------------------------------------------

# Values that compare equal across types (1 == True == 1.0, 0.0 == -0.0) or differ only in key order:
# exactly what a memo keyed on == could confuse.
tricky_scalars = st.sampled_from([1, True, 1.0, 0, False, 0.0, -0.0, "1", b"1", "", None])
tricky_maps = st.recursive(
    tricky_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=2),
        st.lists(st.tuples(st.sampled_from(["a", "b", b"a", 1, True]), inner), max_size=3).map(dict),
    ),
    max_leaves=6,
)


@given(
    pool=st.lists(tricky_maps, min_size=1, max_size=3),
    picks=st.lists(st.integers(0, 2), min_size=1, max_size=6),
    traces=st.lists(st.booleans(), min_size=6, max_size=6),
    tenant=st.sampled_from([None, "$kubernetes['a']", "$tag"]),
)
def test_memoized_shaping_equals_full_shaping(
    pool: list[Any], picks: list[int], traces: list[bool], tenant: str | None
) -> None:
    """Shaping records in sequence (reusing the previous record's fields) gives what shaping each alone gives."""
    rules = build_rules(
        labels={"a": "$kubernetes['a']", "b": "$kubernetes['b'] | $kubernetes", "c": "$tag"},
        structured_metadata={"whole": "$kubernetes['a'][0]", "grp": "$resource['a']"},
        tenant=tenant,
    )
    shaper = Shaper(rules=rules)
    for index, pick in enumerate(picks):
        kubernetes = copy.deepcopy(pool[pick % len(pool)])
        entry = Entry(time_ns=index, record={"log": "x", "kubernetes": kubernetes})
        trace = TRACE if traces[index] else None
        roots = ("t", entry.record, {}, None, trace)
        expected = Shaper(rules=rules)._shape_fully(entry.time_ns, entry.record, _roots(*roots))
        assert shaper.shape("t", entry, trace) == expected


class TestMemo:
    def test_equal_streams_share_one_labels_tuple(self) -> None:
        """Consecutive records of one container get the same labels object (the encoders group by identity)."""
        shaper = Shaper(rules=build_rules())
        first = shaper.shape("t", Entry(time_ns=1, record=k8s_record()), TRACE)
        second = shaper.shape("t", Entry(time_ns=2, record=k8s_record()), None)
        assert first.labels is second.labels
        assert dict(first.structured_metadata)["trace_id"] == TRACE.trace_id
        assert "trace_id" not in dict(second.structured_metadata)
        assert dict(second.structured_metadata)["pod"] == "checkout-7d9f8b6c5d-x2x9q"

    def test_int_and_bool_values_are_not_confused(self) -> None:
        """A label read from 1 and then from True renders 1 then true, though 1 == True."""
        shaper = Shaper(rules=build_rules(labels={"v": "$kubernetes['v']"}))
        values = [1, True, 1.0, True]
        got = [
            dict(shaper.shape("t", Entry(time_ns=0, record={"kubernetes": {"v": v}})).labels)["v"]
            for v in values
        ]
        assert got == ["1", "true", "1.0", "true"]

    def test_map_label_follows_each_records_key_order(self) -> None:
        """A label rendering a whole map as JSON keeps each record's own key order."""
        shaper = Shaper(rules=build_rules(labels={"m": "$kubernetes['labels']"}))
        orders = [{"a": "1", "b": "2"}, {"b": "2", "a": "1"}]
        got = [
            dict(shaper.shape("t", Entry(time_ns=0, record=k8s_record(**labels))).labels)["m"]
            for labels in orders
        ]
        assert got == ['{"a":"1","b":"2"}', '{"b":"2","a":"1"}']

    def test_trace_ids_near_the_metadata_budget_take_the_full_path(self) -> None:
        """When the shared metadata fills Loki's budget, the trace ids still come first and others are dropped."""
        big = "x" * (MAX_STRUCTURED_METADATA_BYTES - 20)
        rules = build_rules(structured_metadata={"big": "$kubernetes['big']"})
        shaper = Shaper(rules=rules)
        record = {"log": "x", "kubernetes": {"big": big}}
        without = shaper.shape("t", Entry(time_ns=0, record=record), None)
        with_ids = shaper.shape("t", Entry(time_ns=0, record=record), TRACE)
        assert dict(without.structured_metadata)["big"] == big
        assert [name for name, _ in with_ids.structured_metadata] == ["trace_id", "span_id"]

    def test_whole_record_templates_are_not_memoized(self) -> None:
        """A template reading the whole record is evaluated for every record."""
        shaper = Shaper(rules=build_rules(structured_metadata={"r": "$record['log']", "all": "$record"}))
        lines = [
            dict(shaper.shape("t", Entry(time_ns=0, record={"log": text})).structured_metadata)["r"]
            for text in "ab"
        ]
        assert lines == ["a", "b"]
