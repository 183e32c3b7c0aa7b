"""Trace and span ids in every spelling, normalized to W3C hex (pure: no I/O).

Role: find the trace context of a decoded log record (its fields, nested maps, a JSON object or a
text line held in its message field, and its Fluent Bit event metadata) and return it as W3C hex.
The spellings and the policies are those of TRACE_IDS.md (B1-B4).

Invariants:
- A trace id returned here is 32 lowercase hex characters, a span id 16, and neither is all zero.
  Anything else is ``None``: there is no "partly valid" id.
- Nothing here raises for bad input. A value that does not parse is simply not an id.
- Records and metadata are only read, never mutated.
- Work per record is bounded: values, keys, nesting, text scans and JSON parsing all have caps
  (the module constants below), so a hostile record costs little.
- ``TraceContext.source`` is one of a fixed set of labels per ``IdRules`` (``IdRules.sources``), so it
  is safe as a metrics label. It never echoes a key from the record.
- Each ``IdRules`` keeps bounded caches (what each key means, and a plan per shape of record: see
  _plan), holding only short str and bytes keys. They save work and never change a result: the
  fast paths they enable give what the key-by-key reading gives (tested value by value).

Decoded records follow the convention of ``fluentforward.protocol``: msgpack ``str`` is ``str``
(invalid UTF-8 as lone surrogates), msgpack ``bin`` is ``bytes``, and map keys are ``str`` or ``bytes``.
"""

from __future__ import annotations

import base64
import operator
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, NamedTuple
from urllib.parse import unquote

import attrs
import orjson

from fluentforward.errors import ConfigError

__all__ = [
    "DEFAULT_RULES",
    "IdRules",
    "TraceContext",
    "extract_trace_context",
    "normalize_span_id",
    "normalize_trace_id",
]

# Longest text value parsed as an id. The longest real spelling (an X-Ray header with Self and
# Lineage parts, a GCP resource name with a 30-char project) is far below it; the cap bounds the
# strip and regex work a hostile value can cause.
MAX_ID_CHARS: Final = 256
# Longest key looked at. Every known id field name is under 40 characters.
MAX_KEY_CHARS: Final = 128
# Entries in each per-rules key cache. Keys repeat across records (same app, same schema), so a
# few thousand cover real traffic; records with random keys only make the cache restart.
KEY_CACHE_MAX: Final = 4096
# Entries in each per-rules plan cache (a plan: what the keys of a map, in their order, say about
# ids). Each app writes a handful of record shapes, so a few hundred cover a node; random shapes only
# make the cache restart. With PLAN_MAX_KEYS it bounds the memory the cache holds: at most
# PLAN_CACHE_MAX * PLAN_MAX_KEYS keys of at most MAX_KEY_CHARS characters (about 4 MB if ASCII).
PLAN_CACHE_MAX: Final = 512
# Maps with more keys than this are read key by key, without a plan: a plan costs a tuple of the
# keys, and real records have a few dozen keys at most.
PLAN_MAX_KEYS: Final = 48
# How deep nested maps are followed. `{"dd": {...}}` and `{"trace": {"id": ...}}` need 1.
MAX_NESTING: Final = 3
# Only the head of a text line is scanned: formatted lines put ids in their prefix, and a
# megabyte stack trace must not cost a regex pass over all of it.
TEXT_SCAN_MAX_CHARS: Final = 16 * 1024
# Occurrences of "trace"/"span" examined per line: real lines have a few; a line made of them must
# not cost thousands of regex matches.
TEXT_MAX_KEYS: Final = 32
# Default cap for parsing a JSON object held in a message string (Fluent Bit Merge_Log off).
JSON_MAX_BYTES: Final = 64 * 1024
# Ceiling for a configured json_max_bytes: it bounds CPU per record, so it must stay bounded too.
JSON_MAX_BYTES_LIMIT: Final = 1024 * 1024

SOURCE_LOG_JSON: Final = "log:json"
SOURCE_LOG_TEXT: Final = "log:text"
SOURCE_METADATA_OTLP: Final = "metadata:otlp"
_METADATA_PREFIX: Final = "metadata:"
# Fluent Bit in_opentelemetry keeps the OTLP LogRecord fields in the event metadata under this key.
_OTLP_KEYS: Final = ("otlp", b"otlp")


class TraceContext(NamedTuple):
    """A normalized trace context found in a record (an immutable value).

    A named tuple rather than an attrs class: the shipper builds one for most records, and a tuple
    costs half of a frozen attrs instance (whose ``__init__`` sets each slot through
    ``object.__setattr__``).

    Attributes:
        trace_id: 32 lowercase hex characters, never all zero.
        span_id: 16 lowercase hex characters, never all zero, or None.
        source: where the ids came from: the field name as found (``trace_id``, ``dd.trace_id``,
            ``traceparent``...) or a format tag such as ``log:json``, ``log:text``, ``metadata:otlp``.
            Used as a metrics label, so it is bounded: one of a fixed set of names per rule set.
    """

    trace_id: str
    span_id: str | None
    source: str


_new_tuple = tuple.__new__
_json_loads = orjson.loads


# --- Single values -------------------------------------------------------------------------------

_ZERO_TRACE: Final = "0" * 32
_ZERO_SPAN: Final = "0" * 16
_U64: Final = 1 << 64
_I64_MIN: Final = -(1 << 63)

_HEX_TRACE = re.compile(r"[0-9a-fA-F]{1,32}")
_HEX_SPAN = re.compile(r"[0-9a-fA-F]{1,16}")
_HEX_32 = re.compile(r"[0-9a-fA-F]{32}")
# `[0-9]`, not `\d`: `\d` also matches non-ASCII digits, which int() would then accept.
_DECIMAL = re.compile(r"-?[0-9]{1,20}")
_TRACEPARENT = re.compile(
    r"([0-9a-fA-F]{2})-([0-9a-fA-F]{32})-([0-9a-fA-F]{16})-[0-9a-fA-F]{2}(-.*)?", re.DOTALL
)
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
# B3 single header and sentry-trace: trace-span[-sampled[-parent]].
_B3 = re.compile(r"([0-9a-fA-F]{32}|[0-9a-fA-F]{16})-([0-9a-fA-F]{16})(?:-[01dD](?:-[0-9a-fA-F]{16})?)?")
_XRAY_ROOT = re.compile(r"1-([0-9a-fA-F]{8})-([0-9a-fA-F]{24})")
_JAEGER = re.compile(r"([0-9a-fA-F]{1,32}):([0-9a-fA-F]{1,16}):[0-9a-fA-F]{1,16}:[0-9a-fA-F]{1,2}")
_CLOUD = re.compile(r"([0-9a-fA-F]{32})(?:/([0-9]{1,20}))?(?:;o=[0-9]{1,2})?")
_GCP_RESOURCE = re.compile(r"projects/[^/]{1,100}/traces/([0-9a-fA-F]{1,32})")

_Pair = tuple[str, str | None]


def _span_hex(text: str) -> str | None:
    span = text.lower().zfill(16)
    return None if span == _ZERO_SPAN else span


def _pair(trace_text: str, span_text: str | None) -> _Pair | None:
    """The two hex parts of one value (1-32 and 1-16 hex characters, checked by the caller).

    W3C: shorter ids are left-padded with zeros; an all-zero span rejects the whole value (the
    header is ignored), as does an all-zero trace.
    """
    trace = trace_text.lower().zfill(32)
    if trace == _ZERO_TRACE:
        return None
    if span_text is None:
        return trace, None
    span = span_text.lower().zfill(16)
    return None if span == _ZERO_SPAN else (trace, span)


def _u64(value: object) -> int | None:
    """An unsigned 64-bit id from an int or a decimal string; negatives as int64 two's complement."""
    if isinstance(value, bool):
        return None
    if not isinstance(value, int):
        text = _as_text(value)
        if text is None or not _DECIMAL.fullmatch(text := text.strip()):
            return None
        value = int(text)
    if _I64_MIN <= value < 0:
        value += _U64
    return value if 0 < value < _U64 else None


def _as_text(value: object) -> str | None:
    """A bounded text value: str as is, ASCII bytes decoded (some clients send strings as bin)."""
    if isinstance(value, str):
        return value if len(value) <= MAX_ID_CHARS else None
    if isinstance(value, (bytes, bytearray)) and len(value) <= MAX_ID_CHARS and value.isascii():
        return value.decode("ascii")
    return None


def _base64(text: str, size: int) -> str | None:
    # Protobuf's generic JSON mapping writes bytes as base64 (standard or URL-safe alphabet).
    try:
        raw = base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
    except ValueError:  # binascii.Error, or non-ASCII text
        return None
    return raw.hex() if len(raw) == size else None


def _traceparent(text: str) -> _Pair | None:
    match = _TRACEPARENT.fullmatch(text)
    if match is None:
        return None
    version = match[1].lower()
    # Version ff is invalid; version 00 has exactly four fields; later versions may add fields.
    if version == "ff" or (version == "00" and match[4] is not None):
        return None
    return _pair(match[2], match[3])


def _b3(text: str) -> _Pair | None:
    match = _B3.fullmatch(text)  # a lone sampling state (`0`, `1`, `d`) carries no ids
    return None if match is None else _pair(match[1], match[2])


def _jaeger(text: str) -> _Pair | None:
    if "%" in text:  # the header is often URL-encoded (`%3A`)
        text = unquote(text)
    match = _JAEGER.fullmatch(text)
    return None if match is None else _pair(match[1], match[2])


def _xray(text: str) -> _Pair | None:
    """``Root=1-<8 hex>-<24 hex>;Parent=<16 hex>;...`` or the bare root ``1-...-...``."""
    root, parent = text, None
    if not text.startswith("1-"):
        root = ""
        for part in text.split(";"):
            name, _, value = part.partition("=")
            name = name.strip().lower()
            if name == "root":
                root = value.strip()
            elif name == "parent":
                parent = value.strip()
    if parent is not None and not _HEX_SPAN.fullmatch(parent):
        return None  # a bad span rejects the whole header
    match = _XRAY_ROOT.fullmatch(root)
    return None if match is None else _pair(match[1] + match[2], parent)


def _cloud(text: str) -> _Pair | None:
    """``X-Cloud-Trace-Context: TRACE/SPAN;o=1``; the span is decimal there."""
    match = _CLOUD.fullmatch(text)
    if match is None:
        return None
    if match[2] is None:
        return _pair(match[1], None)
    span = _u64(match[2])
    return None if span is None else _pair(match[1], format(span, "016x"))


def _trace_text(text: str) -> _Pair | None:
    """Any text spelling of a trace id, with the span id when the spelling carries one."""
    if len(text) > MAX_ID_CHARS:
        return None
    text = text.strip()
    if _HEX_TRACE.fullmatch(text):
        return _pair(text, None)
    pair = None
    # The spellings below have disjoint shapes, so trying them in turn is unambiguous.
    if "-" in text:
        if _UUID.fullmatch(text):
            return _pair(text.replace("-", ""), None)
        pair = _traceparent(text) or _b3(text) or (_xray(text) if text.startswith("1-") else None)
    if pair is None and "=" in text:
        pair = _xray(text)
        if pair is None and len(text) == 24:  # 16 bytes; never pure hex, so no clash with hex
            raw = _base64(text, 16)
            pair = None if raw is None else _pair(raw, None)
    if pair is None and (":" in text or "%" in text):
        pair = _jaeger(text)
    if pair is None and ("/" in text or ";" in text):
        match = _GCP_RESOURCE.fullmatch(text)
        pair = _cloud(text) if match is None else _pair(match[1], None)
    return pair


# bytes.fromhex checks the one spelling nearly all logs use (exactly 32 or 16 hex digits) at a
# third of the price of a regex match. It skips whitespace between digit pairs, which the length
# check on its result then rejects.
_fromhex = bytes.fromhex


def _trace_any(value: object) -> _Pair | None:
    if isinstance(value, str):
        if len(value) == 32:
            try:
                if len(_fromhex(value)) == 16:
                    trace = value.lower()
                    return None if trace == _ZERO_TRACE else (trace, None)
            except ValueError:
                pass
        return _trace_text(value)
    if isinstance(value, (bytes, bytearray)):
        if len(value) == 16:  # OTLP bytes / msgpack bin
            trace = value.hex()
            return None if trace == _ZERO_TRACE else (trace, None)
        text = _as_text(value)
        return None if text is None else _trace_text(text)
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 1 << 128:
        return format(value, "032x"), None
    return None


def normalize_trace_id(value: object) -> str | None:
    """Normalize any spelling of a trace id to 32 lowercase hex characters.

    Accepted: hex of 1-32 characters (case and surrounding whitespace ignored, left-padded with
    zeros), UUID with dashes, 16 raw bytes, base64 of 16 bytes (24 characters), an int, and the
    trace part of traceparent, B3 single, sentry-trace, Jaeger, X-Ray (header or bare ``1-...``),
    X-Cloud-Trace-Context and GCP ``projects/<p>/traces/<id>`` values. ASCII bytes of any other
    length are read as text. A value whose span part is invalid is rejected whole.

    Args:
        value: anything; typically a decoded msgpack value.

    Returns:
        The trace id, or None when the value is not a valid (non-zero) trace id. Never raises.
    """
    pair = _trace_any(value)
    return None if pair is None else pair[0]


def _span_text(text: str) -> str | None:
    if len(text) > MAX_ID_CHARS:
        return None
    text = text.strip()
    if _HEX_SPAN.fullmatch(text):
        return _span_hex(text)
    if len(text) == 12 and text.endswith("="):  # base64 of 8 bytes; never pure hex
        raw = _base64(text, 8)
        return None if raw is None else _span_hex(raw)
    return None


def normalize_span_id(value: object) -> str | None:
    """Normalize a span id to 16 lowercase hex characters.

    Accepted: hex of 1-16 characters (case and whitespace ignored, left-padded), 8 raw bytes,
    base64 of 8 bytes (12 characters), an int, and ASCII bytes of other lengths read as text.

    Args:
        value: anything; typically a decoded msgpack value.

    Returns:
        The span id, or None when the value is not a valid (non-zero) span id. Never raises.
    """
    if isinstance(value, str):
        if len(value) == 16:
            try:
                if len(_fromhex(value)) == 8:
                    span = value.lower()
                    return None if span == _ZERO_SPAN else span
            except ValueError:
                pass
        return _span_text(value)
    if isinstance(value, (bytes, bytearray)):
        if len(value) == 8:
            span = value.hex()
            return None if span == _ZERO_SPAN else span
        text = _as_text(value)
        return None if text is None else _span_text(text)
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < _U64:
        return format(value, "016x")
    return None


# --- Rules ---------------------------------------------------------------------------------------

# Field kinds. A name's kind says how its value is read; its position in IdRules says its priority.
_K_TRACE: Final = 0  # any trace spelling (hex, UUID, bytes, base64, traceparent-shaped, X-Ray...)
_K_DD_TRACE: Final = 1  # Datadog: unsigned 64-bit decimal (low half), or 32 hex
_K_TRACEPARENT: Final = 2
_K_B3: Final = 3  # B3 single header and sentry-trace share the trace-span[-...] shape
_K_JAEGER: Final = 4
_K_XRAY: Final = 5
_K_CLOUD: Final = 6
_K_SPAN: Final = 7  # hex, bytes, base64
_K_DD_SPAN: Final = 8  # Datadog decimal
_K_DD_TID: Final = 9  # Datadog `_dd.p.tid`: the high 64 bits of a decimal dd.trace_id
_K_MESSAGE: Final = 10  # a log line: JSON object or text to scan

_COMPOSITE_PARSERS: Final = {
    _K_TRACEPARENT: _traceparent,
    _K_B3: _b3,
    _K_JAEGER: _jaeger,
    _K_XRAY: _xray,
    _K_CLOUD: _cloud,
}

# Defaults: every system of TRACE_IDS.md B2. Names match case-insensitively with `_`, `-` and `.`
# ignored, so `trace_id` also covers traceId, TraceId, TraceID (Go stdoutlog, .NET), trace.id (ECS)
# and trace-id, and `span_id` covers SpanId, spanId (OTLP/JSON) and span.id (ECS).
DEFAULT_TRACE_FIELDS: Final = (
    "trace_id",
    "otelTraceID",  # OTel Python logging (deprecated alias, still emitted)
    "@tr",  # Serilog compact JSON
    "X-B3-TraceId",
    "ElasticApmTraceId",
    "xray_trace_id",  # AWS Lambda Powertools: bare `1-<epoch>-<id>`
    "logging.googleapis.com/trace",  # `projects/<p>/traces/<id>` or bare
)
DEFAULT_SPAN_FIELDS: Final = (
    "span_id",
    "otelSpanID",
    "@sp",
    "X-B3-SpanId",
    "ElasticApmSpanId",
    "logging.googleapis.com/spanId",
    # ECS: span.id wins, else the transaction (the service-entry span).
    "transaction.id",
    "ElasticApmTransactionId",
)
DEFAULT_MESSAGE_FIELDS: Final = ("log", "message", "msg")


# Text scanning (_scan_text) finds keys where these words are, in the spellings _TEXT_ID accepts,
# after one of these prefixes (as canonical names spell them: `dd.` and `dd_` are `dd`). IdRules
# maps each spelling to its rule per prefix, once.
_KEY_WORDS: Final = ("trace", "span")
_TEXT_SPELLINGS: Final = (
    "traceparent",
    *(f"{word}{sep}id" for word in _KEY_WORDS for sep in ("", "_", ".", "-")),
)
_TEXT_PREFIXES: Final = ("", "dd", "otel")


def _names(value: Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str):  # a bare string would otherwise become a tuple of letters
        raise ConfigError(f"expected a list of field names, got the string {value!r}")
    return tuple(value)


def _check_json_cap(_instance: object, _attribute: object, value: int) -> None:
    if not 0 <= value <= JSON_MAX_BYTES_LIMIT:
        raise ConfigError(f"json_max_bytes must be within 0..{JSON_MAX_BYTES_LIMIT}, got {value}")


def _canonical(name: object) -> str | None:
    """The matching form of a field name: lowercase, without `_`, `-` and `.`."""
    if isinstance(name, bytes):
        name = name.decode("latin-1")  # never fails; non-ASCII names match nothing anyway
    if not isinstance(name, str) or len(name) > MAX_KEY_CHARS:
        return None
    return _canonical_str(name)


def _canonical_str(name: str) -> str:
    return name.replace("_", "").replace("-", "").replace(".", "").lower()


@attrs.frozen(kw_only=True)
class _Rule:
    label: str  # the name as configured: the bounded `source` label
    metadata_label: str  # the label when found in event metadata
    kind: int
    priority: int  # position in IdRules: the first valid candidate in this order wins
    datadog: bool  # Datadog fields pair with Datadog fields first (decimal span ids)


@attrs.frozen(kw_only=True)
class IdRules:
    """Where ``extract_trace_context`` looks for ids, and how it reads each field.

    Each attribute is a list of field names; a name matches a record key case-insensitively with
    ``_``, ``-`` and ``.`` ignored, so ``trace_id`` also matches ``traceId``, ``TraceID`` and
    ``trace.id``, and a dotted name also matches nested maps (``dd.trace_id`` matches
    ``{"dd": {"trace_id": ...}}``). When several fields hold a trace id, the first valid one wins
    in this order: ``trace_fields``, ``datadog_trace_fields``, then the composite fields in the
    order listed below. The span id comes from the same value when it carries one, else from the
    first valid ``span_fields``/``datadog_span_fields`` (Datadog ones first for a Datadog trace).
    A name may appear in only one list. Build from plain lists with ``IdRules.from_names``.

    Attributes:
        trace_fields: any trace id spelling (see ``normalize_trace_id``).
        datadog_trace_fields: Datadog decimal ids (or 32 hex), high half from ``datadog_tid_fields``.
        traceparent_fields, b3_fields, jaeger_fields, xray_fields, cloud_trace_fields: headers
            read with their own grammar (``b3: 1`` is a sampling flag, not trace id 1).
        span_fields: span id spellings (see ``normalize_span_id``).
        datadog_span_fields: Datadog decimal span ids.
        datadog_tid_fields: Datadog ``_dd.p.tid`` (16 hex, the high 64 bits).
        message_fields: log lines scanned for a JSON object and for ``trace_id=...`` text.
        scan_text: whether message text is scanned (logfmt, Python OTel logging format...).
        json_max_bytes: longest message (characters for str) parsed as JSON; 0 disables it.
    """

    trace_fields: tuple[str, ...] = attrs.field(default=DEFAULT_TRACE_FIELDS, converter=_names)
    datadog_trace_fields: tuple[str, ...] = attrs.field(default=("dd.trace_id",), converter=_names)
    traceparent_fields: tuple[str, ...] = attrs.field(default=("traceparent",), converter=_names)
    b3_fields: tuple[str, ...] = attrs.field(default=("b3", "sentry-trace"), converter=_names)
    jaeger_fields: tuple[str, ...] = attrs.field(default=("uber-trace-id",), converter=_names)
    xray_fields: tuple[str, ...] = attrs.field(default=("X-Amzn-Trace-Id",), converter=_names)
    cloud_trace_fields: tuple[str, ...] = attrs.field(default=("X-Cloud-Trace-Context",), converter=_names)
    span_fields: tuple[str, ...] = attrs.field(default=DEFAULT_SPAN_FIELDS, converter=_names)
    datadog_span_fields: tuple[str, ...] = attrs.field(default=("dd.span_id",), converter=_names)
    datadog_tid_fields: tuple[str, ...] = attrs.field(default=("_dd.p.tid",), converter=_names)
    message_fields: tuple[str, ...] = attrs.field(default=DEFAULT_MESSAGE_FIELDS, converter=_names)
    scan_text: bool = True
    json_max_bytes: int = attrs.field(default=JSON_MAX_BYTES, validator=_check_json_cap)

    # Compiled tables, derived from the lists above.
    _by_name: dict[str, _Rule] = attrs.field(init=False, eq=False, repr=False)
    _prefixes: frozenset[str] = attrs.field(init=False, eq=False, repr=False)
    _sources: frozenset[str] = attrs.field(init=False, eq=False, repr=False)
    # Bounded caches of top-level keys: keys repeat across records, and a set or dict lookup is
    # far cheaper than canonicalizing every key of every record. `_skip` holds the keys that can
    # never lead to an id (nearly all of them: one `in` each), `_top` the others with their rule,
    # or the prefix to descend with when their value is a nested map.
    _skip: set[Any] = attrs.field(init=False, eq=False, repr=False)
    _top: dict[Any, _Rule | str] = attrs.field(init=False, eq=False, repr=False)
    # Bounded cache, a map's keys in order -> its plan (see _plan).
    _plans: dict[tuple[Any, ...], _Plan | None] = attrs.field(init=False, eq=False, repr=False)
    # For text scanning, per prefix in _TEXT_PREFIXES: key spelling -> rule (id fields only).
    _text_rules: tuple[dict[str, _Rule], ...] = attrs.field(init=False, eq=False, repr=False)
    _canon: dict[Any, str | None] = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        groups = (
            (self.trace_fields, _K_TRACE),
            (self.datadog_trace_fields, _K_DD_TRACE),
            (self.traceparent_fields, _K_TRACEPARENT),
            (self.b3_fields, _K_B3),
            (self.jaeger_fields, _K_JAEGER),
            (self.xray_fields, _K_XRAY),
            (self.cloud_trace_fields, _K_CLOUD),
            (self.span_fields, _K_SPAN),
            (self.datadog_span_fields, _K_DD_SPAN),
            (self.datadog_tid_fields, _K_DD_TID),
            (self.message_fields, _K_MESSAGE),
        )
        by_name: dict[str, _Rule] = {}
        for names, kind in groups:
            for name in names:
                canon = _canonical(name)
                if not canon:
                    raise ConfigError(f"not a usable field name: {name!r}")
                other = by_name.get(canon)
                if other is not None and other.kind != kind:
                    raise ConfigError(f"field name {name!r} is configured for two purposes")
                if other is None:  # a repeated spelling keeps its first label and priority
                    by_name[canon] = _Rule(
                        label=name,
                        metadata_label=_METADATA_PREFIX + name,
                        kind=kind,
                        priority=len(by_name),
                        datadog=kind in (_K_DD_TRACE, _K_DD_SPAN),
                    )
        traces = [rule for rule in by_name.values() if rule.kind < _K_SPAN]
        set_ = object.__setattr__  # frozen: the derived tables are set once, here
        set_(self, "_by_name", by_name)
        set_(
            self,
            "_prefixes",
            frozenset(
                canon[:end]
                for canon, rule in by_name.items()
                if rule.kind != _K_MESSAGE
                for end in range(1, len(canon))
            ),
        )
        set_(
            self,
            "_sources",
            frozenset(
                [SOURCE_LOG_JSON, SOURCE_LOG_TEXT, SOURCE_METADATA_OTLP]
                + [rule.label for rule in traces]
                + [rule.metadata_label for rule in traces]
            ),
        )
        set_(self, "_skip", set())
        set_(self, "_plans", {})
        set_(
            self,
            "_text_rules",
            tuple(
                {
                    spelling: rule
                    for spelling in _TEXT_SPELLINGS
                    if (rule := by_name.get(prefix + _canonical_str(spelling))) is not None
                    and rule.kind != _K_MESSAGE
                }
                for prefix in _TEXT_PREFIXES
            ),
        )
        set_(self, "_top", {})
        set_(self, "_canon", {})

    @property
    def sources(self) -> frozenset[str]:
        """Every value ``TraceContext.source`` can take under these rules (for metrics)."""
        return self._sources

    @classmethod
    def from_names(
        cls,
        *,
        trace_fields: Iterable[str] = (),
        span_fields: Iterable[str] = (),
        message_fields: Iterable[str] | None = None,
        scan_text: bool = True,
        json_max_bytes: int = JSON_MAX_BYTES,
        replace_defaults: bool = False,
    ) -> IdRules:
        """Rules from plain lists of names, as the CLI and config files give them.

        Args:
            trace_fields: extra trace id fields (any spelling), tried before the defaults.
            span_fields: extra span id fields, tried before the defaults.
            message_fields: the log line fields; None keeps ``log``, ``message``, ``msg``.
            scan_text: whether log lines are scanned as text.
            json_max_bytes: longest log line parsed as a JSON object; 0 disables it.
            replace_defaults: use only the given trace and span fields (composite headers and
                Datadog fields stay), instead of adding them to the defaults.

        Returns:
            The rules.

        Raises:
            ConfigError: a name is empty, used for two purposes, or a limit is out of range.
        """
        trace, span = _names(trace_fields), _names(span_fields)
        if not replace_defaults:
            trace += DEFAULT_TRACE_FIELDS
            span += DEFAULT_SPAN_FIELDS
        messages = DEFAULT_MESSAGE_FIELDS if message_fields is None else _names(message_fields)
        return cls(
            trace_fields=trace,
            span_fields=span,
            message_fields=messages,
            scan_text=scan_text,
            json_max_bytes=json_max_bytes,
        )


DEFAULT_RULES: Final = IdRules()


# --- Extraction ----------------------------------------------------------------------------------

# (priority, rule, value): a list of these sorts by priority in C, with no Python key calls.
_Candidate = tuple[int, _Rule, Any]
_by_priority = operator.itemgetter(0)
_MISS: Any = object()


def _cacheable(key: object) -> bool:
    # Only short str and bytes keys are cached: other keys (ints, floats, NaN) repeat rarely, a
    # NaN key would never hit, and a long key would hold memory (no id name is long anyway).
    return (type(key) is str or type(key) is bytes) and len(key) <= MAX_KEY_CHARS


def _remember(cache: dict[Any, Any], key: object, value: object) -> None:
    # The cache restarts when full instead of growing.
    if _cacheable(key):
        if len(cache) >= KEY_CACHE_MAX:
            cache.clear()
        cache[key] = value


def _classify(rules: IdRules, key: object) -> _Rule | str | None:
    """A top-level key: its rule, the prefix to descend with when it is a nested map, or None."""
    canon = _canonical(key)
    info: _Rule | str | None = None
    if canon is not None:
        info = rules._by_name.get(canon)
        if info is None and canon in rules._prefixes:
            info = canon
    if info is not None:
        _remember(rules._top, key, info)
    elif _cacheable(key):  # as _remember does, for the set
        skip = rules._skip
        if len(skip) >= KEY_CACHE_MAX:
            skip.clear()
        skip.add(key)
    return info


def _scan(
    rules: IdRules, mapping: Mapping[Any, Any], prefix: str, depth: int, found: list[_Candidate]
) -> None:
    """Collect the candidates of a map nested under ``prefix`` (depth 1 and deeper)."""
    by_name, canon_cache = rules._by_name, rules._canon
    for key, value in mapping.items():
        canon = canon_cache.get(key, _MISS)
        if canon is _MISS:
            canon = _canonical(key)
            _remember(canon_cache, key, canon)
        if canon is None:
            continue
        name = prefix + canon
        rule = by_name.get(name)
        if rule is not None:
            if rule.kind != _K_MESSAGE:
                found.append((rule.priority, rule, value))
        elif depth < MAX_NESTING and name in rules._prefixes and isinstance(value, Mapping):
            _scan(rules, value, name, depth + 1, found)


def _collect(
    rules: IdRules, mapping: Mapping[Any, Any], found: list[_Candidate], messages: list[Any] | None
) -> None:
    """Collect a map's candidates key by key: its fields, and its nested maps through _scan.

    The keys of the message fields go to ``messages``, or nowhere when it is None (in a JSON
    object or in metadata a message field is not a candidate).
    """
    skip, top = rules._skip, rules._top
    for key in mapping:
        if key in skip:
            continue  # the common case: a known key that can never lead to an id
        info = top.get(key)
        if info is None and (info := _classify(rules, key)) is None:
            continue
        if isinstance(info, str):
            value = mapping[key]
            if isinstance(value, Mapping):
                _scan(rules, value, info, 1, found)
        elif info.kind != _K_MESSAGE:
            found.append((info.priority, info, mapping[key]))
        elif messages is not None:
            messages.append(key)


# A plan says, for the keys of a map in their order, where ids can be: the fields as
# (priority, rule, key) sorted as _resolve sorts candidates, and the message keys in map order. It
# depends on the keys alone, so it is computed once per shape of record and replaces the per-key
# loop by one tuple and one dict lookup. A map with a key that leads to nested maps has no plan
# (None): its candidates depend on the values.
#
# `fast` is set when the first field (the one _resolve tries first) has a common spelling that
# settles the answer alone (_fast_context): a trace id field with the first span id field after it,
# both canonical hex; a Datadog trace id field with the first Datadog span id field, both plain
# decimal, and no `_dd.p.tid` field; a traceparent field, version 00 with nothing after the flags.
# Anything else goes through _resolve with the plan's fields.
_Fast = tuple[_Rule, Any, Any]  # the first field's rule, its key, the span field's key (or None)
_Plan = tuple[_Fast | None, tuple[tuple[int, _Rule, Any], ...], tuple[Any, ...]]


def _plan(rules: IdRules, keys: tuple[Any, ...]) -> _Plan | None:
    """The plan of a map's keys (see above), cached when its keys are plain short strings."""
    fields: list[tuple[int, _Rule, Any]] = []
    messages: list[Any] = []
    plan: _Plan | None = None
    nested = False
    cacheable = True
    skip, top = rules._skip, rules._top
    for key in keys:
        if not _cacheable(key):
            cacheable = False
        if key in skip:
            continue
        info = top.get(key)
        if info is None and (info := _classify(rules, key)) is None:
            continue
        if isinstance(info, str):
            nested = True
        elif info.kind == _K_MESSAGE:
            messages.append(key)
        else:
            fields.append((info.priority, info, key))
    if not nested:
        fields.sort(key=_by_priority)
        plan = _fast_plan(fields), tuple(fields), tuple(messages)
    if cacheable:
        plans = rules._plans
        if len(plans) >= PLAN_CACHE_MAX:
            plans.clear()
        plans[keys] = plan
    return plan


def _fast_plan(fields: list[tuple[int, _Rule, Any]]) -> _Fast | None:
    """The plan's fast spelling, from its sorted fields (see above), if it has one."""
    if not fields:
        return None
    _, rule, key = fields[0]
    if rule.kind == _K_TRACEPARENT:
        return rule, key, None
    if rule.kind == _K_DD_TRACE and any(other.kind == _K_DD_TID for _, other, _ in fields):
        return None
    if rule.kind in (_K_TRACE, _K_DD_TRACE):
        span_kind = _K_DD_SPAN if rule.datadog else _K_SPAN  # the one _resolve looks at first
        for _, other, span_key in fields:
            if other.kind == span_kind:
                return rule, key, span_key
    return None


def _context(trace: str, span: str | None, source: str) -> TraceContext:
    """A TraceContext, built without the keyword-argument handling of its constructor."""
    ctx: TraceContext = _new_tuple(TraceContext, (trace, span, source))
    return ctx


def _fast_context(mapping: Mapping[Any, Any], fast: _Fast, source: str | None) -> TraceContext | None:
    """The context from a plan's fast spelling (see above), or None when the values lack it.

    None is no answer: the caller then resolves the plan's fields. ``source`` as for _resolve.
    """
    rule, key, span_key = fast
    value = mapping[key]
    if type(value) is not str:
        return None
    kind = rule.kind
    if kind == _K_TRACE:
        span = mapping[span_key]
        if len(value) != 32 or type(span) is not str or len(span) != 16:
            return None
        hex_text = value + span
    elif kind == _K_DD_TRACE:
        span = mapping[span_key]
        if type(span) is not str or not 0 < len(value) <= 20 or not 0 < len(span) <= 20:
            return None
        digits = value + span  # both parts non-empty: all ASCII digits when the whole is
        if not (digits.isascii() and digits.isdigit()):
            return None
        low, span_int = int(value), int(span)
        if not (0 < low < _U64 and 0 < span_int < _U64):
            return None
        # No `_dd.p.tid` here (a plan with one has no fast spelling): the high half is zeros. For
        # 64-bit ints, to_bytes().hex() costs a fifth less than `%016x`, itself half of format().
        value, span = _ZERO_SPAN + low.to_bytes(8, "big").hex(), span_int.to_bytes(8, "big").hex()
        hex_text = ""
    else:  # traceparent: 00-<32 hex>-<16 hex>-<2 hex>
        header = value
        if len(header) != 55 or header[:3] != "00-" or header[35] != "-" or header[52] != "-":
            return None
        value, span = header[3:35], header[36:52]
        hex_text = value + span + header[53:]
    if hex_text:
        # One fromhex for all parts: it skips whitespace between digit pairs, so the bytes are half
        # the characters only when every character is a hex digit, and each part has an even
        # length, so no pair straddles two parts.
        try:
            if len(_fromhex(hex_text)) * 2 != len(hex_text):
                return None
        except ValueError:
            return None
        value, span = value.lower(), span.lower()
        if value == _ZERO_TRACE or span == _ZERO_SPAN:
            return None
    if source is None:
        source = rule.label
    elif source is _METADATA_PREFIX:
        source = rule.metadata_label
    ctx: TraceContext = _new_tuple(TraceContext, (value, span, source))  # _context, inlined
    return ctx


def _dd_span(value: object) -> str | None:
    # Hot path: dd-trace writes plain decimal strings; for them _u64 would give this same value.
    if type(value) is str and len(value) <= 20 and value.isascii() and value.isdigit():
        low = int(value)
        return "%016x" % low if 0 < low < _U64 else None  # noqa: UP031
    number = _u64(value)
    return None if number is None else "%016x" % number  # noqa: UP031


def _dd_trace(value: object, found: list[_Candidate]) -> _Pair | None:
    # A decimal id (at most 20 digits) and 32 hex digits never share a spelling, so the order of
    # the two readings does not matter; the decimal one is far more common.
    low = _dd_span(value)
    if low is None:
        text = _as_text(value)
        if text is not None and _HEX_32.fullmatch(text := text.strip()):
            return _pair(text, None)  # 128-bit logging enabled: the full id
        return None
    high = _ZERO_SPAN  # without _dd.p.tid only the low half is known (TRACE_IDS.md B3.6)
    for _, rule, tid in found:
        if rule.kind == _K_DD_TID:
            text = _as_text(tid)
            if text is not None and _HEX_SPAN.fullmatch(text := text.strip()):
                high = text.lower().zfill(16)
                break
    return high + low, None


def _span_of(found: list[_Candidate], kind: int) -> str | None:
    """The first valid span id among the candidates of one kind (hex or Datadog decimal)."""
    read = normalize_span_id if kind == _K_SPAN else _dd_span
    for _, rule, value in found:
        if rule.kind == kind and (span := read(value)) is not None:
            return span
    return None


def _resolve(
    found: list[_Candidate], fallback: list[_Candidate] | None, source: str | None
) -> TraceContext | None:
    """The first valid trace id among the candidates in priority order, with its span id.

    A span id without a valid trace id is dropped (TRACE_IDS.md B3.11). ``fallback`` holds the
    record's own fields, whose span ids serve a trace found in a log line or in metadata.
    ``source`` is the label to report; None means the matching rule's own label, and
    ``_METADATA_PREFIX`` its metadata label.
    """
    if len(found) == 2:  # the common pair (trace field, span field): no sort call needed
        if found[0][0] > found[1][0]:
            found.reverse()
        # Hot path (text lines, mostly): a trace id field then a span id field, 32 and 16 hex
        # digits. For them the loop below gives exactly this; anything else goes through it.
        (_, rule, value), (_, other, raw) = found
        if (
            rule.kind == _K_TRACE
            and other.kind == _K_SPAN
            and type(value) is str
            and type(raw) is str
            and len(value) == 32
            and len(raw) == 16
        ):
            try:  # one fromhex for both parts, as in _fast_context
                hex_pair = len(_fromhex(value + raw)) == 24
            except ValueError:
                hex_pair = False
            if (
                hex_pair
                and (trace_id := value.lower()) != _ZERO_TRACE
                and (span_id := raw.lower()) != _ZERO_SPAN
            ):
                if source is None:
                    source = rule.label
                elif source is _METADATA_PREFIX:
                    source = rule.metadata_label
                pair_ctx: TraceContext = _new_tuple(TraceContext, (trace_id, span_id, source))
                return pair_ctx
    elif len(found) > 2:
        found.sort(key=_by_priority)
    for _, rule, value in found:
        kind = rule.kind
        trace: str | None = None
        span: str | None = None
        if kind == _K_TRACE:
            # Hot path, _trace_any's first case inlined: 32 hex digits, as nearly all logs write.
            if type(value) is str and len(value) == 32:
                try:
                    if len(_fromhex(value)) == 16:
                        trace = value.lower()
                except ValueError:
                    pass
            if trace is None:
                pair = _trace_any(value)
                if pair is None:
                    continue
                trace, span = pair
            elif trace == _ZERO_TRACE:
                continue
        elif kind >= _K_SPAN:
            return None  # sorted: only span and tid fields follow
        else:
            if kind == _K_DD_TRACE:
                pair = _dd_trace(value, found)
            else:
                text = _as_text(value)
                pair = None if text is None else _COMPOSITE_PARSERS[kind](text.strip())
            if pair is None:
                continue
            trace, span = pair
        if span is None:
            if rule.datadog:  # Datadog trace ids pair with Datadog (decimal) span ids first
                first, second = _K_DD_SPAN, _K_SPAN
                span = _span_of(found, _K_DD_SPAN) or _span_of(found, _K_SPAN)
            else:
                first, second = _K_SPAN, _K_DD_SPAN
                for _, other, raw in found:  # hot path: _span_of(found, _K_SPAN), inlined
                    if other.kind != _K_SPAN:
                        continue
                    if type(raw) is str and len(raw) == 16:  # normalize_span_id's first case
                        try:
                            if len(_fromhex(raw)) == 8 and (span := raw.lower()) != _ZERO_SPAN:
                                break
                        except ValueError:
                            pass
                    if (span := normalize_span_id(raw)) is not None:
                        break
                else:
                    span = _span_of(found, _K_DD_SPAN)
            if span is None and fallback:
                span = _span_of(fallback, first) or _span_of(fallback, second)
        if source is None:
            source = rule.label
        elif source is _METADATA_PREFIX:
            source = rule.metadata_label
        return _context(trace, span, source)
    return None


# A JSON object starts with `{`, possibly after whitespace: the one-character test that keeps
# plain lines away from the parser.
_BRACES: Final = frozenset(["{", b"{"])
_JSON_SPACES: Final = frozenset([*" \t\r\n", *(bytes([c]) for c in b" \t\r\n")])


# `key=value`, `key: value`, `"key": "value"` in a lowercased line: logfmt, the Python OTel logging
# format, Datadog's text injection and JSON alike. The regex is anchored at the places str.find
# reports for "trace" and "span": a regex search trying every position of the line costs ten times
# more. A `dd.`/`dd_`/`otel` prefix joins the key, and the key must start a word (`my_trace_id=` and
# `x.trace_id=` are not ids).
_TEXT_ID = re.compile(
    r"""(trace(?:parent|[_.-]?id)|span[_.-]?id)["']?\s{0,4}[=:]\s{0,4}["']?([0-9a-z-]{1,64})(?![0-9a-z-])""",
    re.ASCII,
)
_WORD_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_.@-")


def _text_line(value: object) -> str | None:
    """The lowercased head of a message to scan, or None when it holds no "trace" (see below)."""
    end = TEXT_SCAN_MAX_CHARS
    if isinstance(value, str):
        if len(value) <= end:
            if "race" not in value and "RACE" not in value:
                return None
        elif value.find("race", 0, end) < 0 and value.find("RACE", 0, end) < 0:
            return None
    elif isinstance(value, (bytes, bytearray)):
        if value.find(b"race", 0, end) < 0 and value.find(b"RACE", 0, end) < 0:
            return None
        value = value[:end].decode("latin-1")  # ids are ASCII; latin-1 keeps every offset
    else:
        return None
    return (value[:end] if len(value) > end else value).lower()


def _scan_text(rules: IdRules, line: str) -> list[_Candidate]:
    """The candidates written as `key=value` text in a lowercased line (_text_line)."""
    plain, after_dd, after_otel = rules._text_rules
    found: list[_Candidate] = []
    budget = TEXT_MAX_KEYS
    for word in _KEY_WORDS:
        pos = line.find(word)
        while pos >= 0 and budget:
            budget -= 1
            # The key must start a word, counting a known prefix as part of it. The prefixes end
            # in word characters (`.`, `_`, `l`), so the common case (a space or a quote before
            # the key) needs no prefix test.
            before = line[pos - 1] if pos else " "
            if before not in _WORD_CHARS:
                rules_after: dict[str, _Rule] | None = plain
            elif before in "._":
                rules_after = None
                if (
                    pos >= 3
                    and line[pos - 3 : pos - 1] == "dd"
                    and (pos == 3 or line[pos - 4] not in _WORD_CHARS)
                ):
                    rules_after = after_dd
            elif before == "l" and pos >= 4 and line[pos - 4 : pos] == "otel":
                rules_after = after_otel if pos == 4 or line[pos - 5] not in _WORD_CHARS else None
            else:
                rules_after = None
            if (
                rules_after is not None
                and (match := _TEXT_ID.match(line, pos)) is not None
                and (rule := rules_after.get(match[1])) is not None
            ):
                found.append((rule.priority, rule, match[2]))
            pos = line.find(word, pos + 1)
    return found


def _from_map(
    rules: IdRules, mapping: Mapping[Any, Any], fallback: list[_Candidate] | None, source: str
) -> TraceContext | None:
    """The context held in the fields of a JSON object or a metadata map (``source`` as for _resolve)."""
    plan = None
    if len(mapping) <= PLAN_MAX_KEYS:
        keys = tuple(mapping)
        if (plan := rules._plans.get(keys, _MISS)) is _MISS:
            plan = _plan(rules, keys)
    if plan is None:
        found: list[_Candidate] = []
        _collect(rules, mapping, found, None)
    else:
        fast, fields, _ = plan
        if not fields:
            return None  # the common case of a line without ids: no list to build
        if fast is not None and (ctx := _fast_context(mapping, fast, source)) is not None:
            return ctx
        found = [(priority, rule, mapping[key]) for priority, rule, key in fields]
    return _resolve(found, fallback, source) if found else None


def _from_metadata(
    rules: IdRules, metadata: Mapping[Any, Any], fallback: list[_Candidate] | None
) -> TraceContext | None:
    if (ctx := _from_map(rules, metadata, fallback, _METADATA_PREFIX)) is not None:
        return ctx
    for key in _OTLP_KEYS:
        otlp = metadata.get(key)
        if isinstance(otlp, Mapping) and (ctx := _from_map(rules, otlp, fallback, SOURCE_METADATA_OTLP)):
            return ctx
    return None


def extract_trace_context(
    record: Mapping[Any, Any],
    metadata: Mapping[Any, Any] | None = None,
    *,
    rules: IdRules = DEFAULT_RULES,
) -> TraceContext | None:
    """Find the trace context of a decoded log record.

    Looks, in this order (TRACE_IDS.md B4): the record's trace id fields (top level, nested maps,
    dotted keys), its composite header fields, a JSON object held in a message field, ``key=id``
    text in a message field, then the Fluent Bit event metadata (its fields, then ``otlp``).

    Args:
        record: the record map as decoded (keys str or bytes). Never mutated.
        metadata: the Fluent Bit v2 event metadata map, if any.
        rules: field names and switches; ``DEFAULT_RULES`` covers every system in TRACE_IDS.md.

    Returns:
        The first valid trace id with its span id and a bounded source label, or None.
        Never raises for any record content.
    """
    # One function for the whole walk (plan, log lines, metadata): on the hot path, each Python
    # call saved is about 2 % of the cost of a record.
    plan = None
    if len(record) <= PLAN_MAX_KEYS:
        keys = tuple(record)
        if (plan := rules._plans.get(keys, _MISS)) is _MISS:
            plan = _plan(rules, keys)
    found: list[_Candidate] | None = None
    messages: Sequence[Any]
    if plan is not None:
        fast, fields, messages = plan
        if fast is not None and (ctx := _fast_context(record, fast, None)) is not None:
            return ctx
        if fields:
            found = [(priority, rule, record[key]) for priority, rule, key in fields]
            if (ctx := _resolve(found, None, None)) is not None:
                return ctx
    else:  # key by key: records with nested id maps, or wider than a plan
        found, messages = [], []
        _collect(rules, record, found, messages)
        if found and (ctx := _resolve(found, None, None)) is not None:
            return ctx
    if not messages:
        return _from_metadata(rules, metadata, found) if metadata else None
    # The log lines: all JSON objects first, then all text (B4 orders by kind of source, not by
    # field). The record's own fields (`found`) lend their span ids to a trace found here.
    cap = rules.json_max_bytes
    if cap:
        for key in messages:
            value = record[key]
            if type(value) is str:  # the common case, tested with str comparisons
                first = value[:1]
                if first != "{" and (first not in _JSON_SPACES or value.lstrip()[:1] != "{"):
                    continue
                if len(value) > cap:
                    continue
            elif isinstance(value, (str, bytes)):
                head = value[:1]
                if head not in _BRACES and (head not in _JSON_SPACES or value.lstrip()[:1] not in _BRACES):
                    continue
                if len(value) > cap:
                    continue
            else:
                continue
            # No prefilter (skip a line no trace id key can be in) before the parse: measured, its
            # exact test (case, `_-.` in keys, escapes, nesting) costs more than the parse it saves.
            try:
                obj = _json_loads(value)
            except orjson.JSONDecodeError:  # also: lone surrogates, too deep
                continue
            if type(obj) is not dict:
                continue
            # _from_map, inlined: a planned object, its fast spelling first.
            obj_plan = None
            if len(obj) <= PLAN_MAX_KEYS:
                obj_keys = tuple(obj)
                if (obj_plan := rules._plans.get(obj_keys, _MISS)) is _MISS:
                    obj_plan = _plan(rules, obj_keys)
            if obj_plan is None:  # a wide object, or one with nested id maps
                in_obj: list[_Candidate] = []
                _collect(rules, obj, in_obj, None)
            else:
                fast, fields, _ = obj_plan
                if not fields:
                    continue  # the common case of a line without ids
                if fast is not None and (ctx := _fast_context(obj, fast, SOURCE_LOG_JSON)) is not None:
                    return ctx
                in_obj = [(priority, rule, obj[name]) for priority, rule, name in fields]
            if in_obj and (ctx := _resolve(in_obj, found, SOURCE_LOG_JSON)) is not None:
                return ctx
    if rules.scan_text:
        for key in messages:
            # A span id without a trace id is dropped anyway, so a line without "trace" (any case,
            # as in traceparent, otelTraceID, TRACE_ID) is not scanned: the common case costs two
            # `in`s. For a short str, _text_line is inlined.
            value = record[key]
            if type(value) is str and len(value) <= TEXT_SCAN_MAX_CHARS:
                if "race" not in value and "RACE" not in value:
                    continue
                line = value.lower()
            else:
                text = _text_line(value)
                if text is None:
                    continue
                line = text
            in_text = _scan_text(rules, line)
            if in_text and (ctx := _resolve(in_text, found, SOURCE_LOG_TEXT)) is not None:
                return ctx
    return _from_metadata(rules, metadata, found) if metadata else None
