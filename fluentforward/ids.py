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

Decoded records follow the convention of ``fluentforward.protocol``: msgpack ``str`` is ``str``
(invalid UTF-8 as lone surrogates), msgpack ``bin`` is ``bytes``, and map keys are ``str`` or ``bytes``.
"""

from __future__ import annotations

import base64
import operator
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final
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


@attrs.frozen(kw_only=True)
class TraceContext:
    """A normalized trace context found in a record.

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


# TraceContext's attrs __init__ sets each slot through object.__setattr__, which costs about 1 us
# here: half the per-record budget. _resolve sets the slots through their descriptors instead,
# for a third of that; the object is equal in every way (tested), and TraceContext has no
# validators or converters to skip.
_new_object = object.__new__
_set_trace_id = TraceContext.__dict__["trace_id"].__set__
_set_span_id = TraceContext.__dict__["span_id"].__set__
_set_source = TraceContext.__dict__["source"].__set__


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


def _trace_hex(text: str) -> str | None:
    # Callers pass 1-32 hex characters; W3C: shorter ids are left-padded with zeros.
    trace = text.lower().zfill(32)
    return None if trace == _ZERO_TRACE else trace


def _span_hex(text: str) -> str | None:
    span = text.lower().zfill(16)
    return None if span == _ZERO_SPAN else span


def _pair(trace_text: str, span_text: str | None) -> _Pair | None:
    """Validate the two hex parts of one value; a bad span rejects both (W3C: ignore the header)."""
    trace = _trace_hex(trace_text)
    if trace is None or span_text is None:
        return None if trace is None else (trace, None)
    span = _span_hex(span_text) if _HEX_SPAN.fullmatch(span_text) else None
    return None if span is None else (trace, span)


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
    # Bounded caches, raw key -> classification: keys repeat across records, and a dict lookup
    # is far cheaper than canonicalizing every key of every record.
    _top: dict[Any, _Rule | str | None] = attrs.field(init=False, eq=False, repr=False)
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


def _remember(cache: dict[Any, Any], key: object, value: object) -> None:
    # Only str and bytes keys are cached: other keys (ints, floats, NaN) repeat rarely, and a
    # NaN key would never hit. The cache restarts when full instead of growing.
    if type(key) is str or type(key) is bytes:
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
    _remember(rules._top, key, info)
    return info


def _scan(
    rules: IdRules, mapping: Mapping[Any, Any], prefix: str, depth: int, found: list[_Candidate]
) -> None:
    """Collect the candidates of a nested map (or of a JSON object / metadata map at depth 0)."""
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


def _dd_span(value: object) -> str | None:
    low = _u64(value)
    return None if low is None else format(low, "016x")


def _dd_trace(value: object, found: list[_Candidate]) -> _Pair | None:
    text = _as_text(value)
    if text is not None and _HEX_32.fullmatch(text := text.strip()):
        return _pair(text, None)  # 128-bit logging enabled: the full id
    low = _dd_span(value)
    if low is None:
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


# Span kinds in the order tried, by whether the trace came from a Datadog field: Datadog trace
# ids pair with Datadog (decimal) span ids first, since the same tracer wrote both.
_SPAN_ORDER: Final = {False: (_K_SPAN, _K_DD_SPAN), True: (_K_DD_SPAN, _K_SPAN)}


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
    elif len(found) > 2:
        found.sort(key=_by_priority)
    for _, rule, value in found:
        kind = rule.kind
        pair: _Pair | None = None
        if kind == _K_TRACE:
            if type(value) is str and len(value) == 32:  # hot path: _trace_any's first case, inlined
                try:
                    if len(_fromhex(value)) == 16 and (trace := value.lower()) != _ZERO_TRACE:
                        pair = trace, None
                except ValueError:
                    pass
            if pair is None:
                pair = _trace_any(value)
        elif kind >= _K_SPAN:
            return None  # sorted: only span and tid fields follow
        elif kind == _K_DD_TRACE:
            pair = _dd_trace(value, found)
        else:
            text = _as_text(value)
            pair = None if text is None else _COMPOSITE_PARSERS[kind](text.strip())
        if pair is not None:
            trace, span = pair
            if span is None:
                first, second = _SPAN_ORDER[rule.datadog]
                for _, other, raw in found:  # hot path: _span_of(found, first), inlined
                    if other.kind == first:
                        span = normalize_span_id(raw) if first == _K_SPAN else _dd_span(raw)
                        if span is not None:
                            break
                else:
                    span = _span_of(found, second)
                if span is None and fallback:
                    span = _span_of(fallback, first) or _span_of(fallback, second)
            if source is None:
                source = rule.label
            elif source is _METADATA_PREFIX:
                source = rule.metadata_label
            ctx: TraceContext = _new_object(TraceContext)
            _set_trace_id(ctx, trace)
            _set_span_id(ctx, span)
            _set_source(ctx, source)
            return ctx
    return None


# A JSON object starts with `{`, possibly after whitespace: the one-character test that keeps
# plain lines away from the parser.
_JSON_HEADS: Final = frozenset(["{", b"{", *" \t\r\n", *(bytes([c]) for c in b" \t\r\n")])
_BRACES: Final = ("{", b"{")


def _json_object(value: str | bytes) -> Mapping[Any, Any] | None:
    if value[:1] not in _BRACES and value.lstrip()[:1] not in _BRACES:
        return None
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError:  # also: lone surrogates, too deep
        return None
    return obj if isinstance(obj, dict) else None


# `key=value`, `key: value`, `"key": "value"` in a lowercased line: logfmt, the Python OTel logging
# format, Datadog's text injection and JSON alike. The regex is anchored at the places str.find
# reports for "trace" and "span": a regex search trying every position of the line costs ten times
# more. A `dd.`/`dd_`/`otel` prefix joins the key, and the key must start a word (`my_trace_id=` and
# `x.trace_id=` are not ids).
_TEXT_ID = re.compile(
    r"""(trace(?:parent|[_.-]?id)|span[_.-]?id)["']?\s{0,4}[=:]\s{0,4}["']?([0-9a-z-]{1,64})(?![0-9a-z-])""",
    re.ASCII,
)
_KEY_WORDS: Final = ("trace", "span")
_KEY_PREFIXES: Final = {"dd.": "dd", "dd_": "dd", "otel": "otel"}  # text -> canonical
_WORD_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_.@-")


def _scan_text(rules: IdRules, value: object) -> list[_Candidate] | None:
    # A span id without a trace id is dropped anyway, so a line without "trace" (any case, as
    # in traceparent, otelTraceID, TRACE_ID) returns at once: the common case costs two `in`s.
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
    line = (value[:end] if len(value) > end else value).lower()
    found: list[_Candidate] = []
    budget = TEXT_MAX_KEYS
    for word in _KEY_WORDS:
        pos = line.find(word)
        while pos >= 0 and budget:
            budget -= 1
            match = _TEXT_ID.match(line, pos)
            if match is not None:
                start, prefix = pos, ""
                for size in (3, 4):
                    if pos >= size and (known := _KEY_PREFIXES.get(line[pos - size : pos])) is not None:
                        start, prefix = pos - size, known
                if start == 0 or line[start - 1] not in _WORD_CHARS:
                    key = match[1].replace("_", "").replace("-", "").replace(".", "")
                    rule = rules._by_name.get(prefix + key)
                    if rule is not None and rule.kind != _K_MESSAGE:
                        found.append((rule.priority, rule, match[2]))
            pos = line.find(word, pos + 1)
    return found


def _from_messages(rules: IdRules, messages: list[Any], fallback: list[_Candidate]) -> TraceContext | None:
    # All JSON objects first, then all text: B4 orders by kind of source, not by field.
    cap = rules.json_max_bytes
    if cap:
        for value in messages:
            if isinstance(value, (str, bytes)) and len(value) <= cap and value[:1] in _JSON_HEADS:
                obj = _json_object(value)
                if obj is not None:
                    found: list[_Candidate] = []
                    _scan(rules, obj, "", 0, found)
                    if found and (ctx := _resolve(found, fallback, SOURCE_LOG_JSON)) is not None:
                        return ctx
    if rules.scan_text:
        for value in messages:
            text_found = _scan_text(rules, value)
            if text_found and (ctx := _resolve(text_found, fallback, SOURCE_LOG_TEXT)) is not None:
                return ctx
    return None


def _from_metadata(
    rules: IdRules, metadata: Mapping[Any, Any], fallback: list[_Candidate]
) -> TraceContext | None:
    found: list[_Candidate] = []
    _scan(rules, metadata, "", 0, found)
    if found and (ctx := _resolve(found, fallback, _METADATA_PREFIX)) is not None:
        return ctx
    for key in _OTLP_KEYS:
        otlp = metadata.get(key)
        if isinstance(otlp, Mapping):
            found = []
            _scan(rules, otlp, "", 0, found)
            if found and (ctx := _resolve(found, fallback, SOURCE_METADATA_OTLP)) is not None:
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
    found: list[_Candidate] = []
    messages: list[Any] = []
    lookup, miss = rules._top.get, _MISS
    for key in record:  # values are fetched only for the few keys that matter
        info = lookup(key, miss)
        if info is None:
            continue  # the common case: a known key that can never lead to an id
        if info is miss and (info := _classify(rules, key)) is None:
            continue
        value = record[key]
        if isinstance(info, str):
            if isinstance(value, Mapping):
                _scan(rules, value, info, 1, found)
        elif info.kind != _K_MESSAGE:
            found.append((info.priority, info, value))
        else:
            messages.append(value)
    if found and (ctx := _resolve(found, None, None)) is not None:
        return ctx
    if messages and (ctx := _from_messages(rules, messages, found)) is not None:
        return ctx
    if metadata:
        return _from_metadata(rules, metadata, found)
    return None
