"""Shape decoded Forward entries into Loki entries (pure: no I/O).

Role: turn one decoded ``Entry`` (record, Fluent Bit metadata, OTLP group) plus the trace context
``fluentforward.ids`` already extracted into one ``LokiEntry``: index labels, log line, structured
metadata and tenant. Settings are compiled once by ``build_rules`` (templates into one generated
Python function per rule set, see ``_Emitter``); ``Shaper.shape`` parses nothing and never raises.

Public API::

    build_rules(*, line_format="auto", labels=None, structured_metadata=None, cluster="",
                tenant=None, envelope_keys=None, max_line_bytes=DEFAULT_MAX_LINE_BYTES) -> ShapeRules
    Shaper(rules=...).shape(tag, entry, trace) -> LokiEntry
    Shaper(rules=...).encode_events(tag, events, find_trace, into, sources=None)   (the shipper's path)
    Template.parse(source) -> Template;  Template.render(tag, entry, trace=None) -> str
    LineFormat, jsonable(value), clean_text(text), sanitize_label_name(name)

Template grammar (in the spirit of Fluent Bit's record accessor)::

    template    = alternative *( "|" alternative )       first non-empty alternative wins
    alternative = 1*( accessor / group / literal )       concatenation
    group       = "(" template ")"
    accessor    = "$" name *( "[" key "]" )
    name        = ( ALPHA / "_" ) *( ALPHA / DIGIT / "_" )
    key         = "'" text "'" / DQUOTE text DQUOTE / 1*DIGIT   (inside quotes "\\" escapes a char)
    literal     = 1*( any char but "$|()\\" / "\\" any-char )

A template is at most ``MAX_TEMPLATE_CHARS`` characters with groups nested at most
``MAX_TEMPLATE_DEPTH`` deep; anything else is a ``ConfigError`` naming the column.

Roots: ``$record`` (the record), ``$metadata`` (the entry's metadata map), ``$resource`` (the OTLP
group's ``resource.attributes``), ``$group`` (the whole group record), ``$tag``, ``$trace_id`` and
``$span_id`` (from the ``TraceContext`` argument; the last three take no keys). Any other name is
shorthand for a record key: ``$kubernetes['pod_name']`` is ``$record['kubernetes']['pod_name']``
(so a record key named like a root needs the long form, ``$record['tag']``). A digit key indexes
an array. A string key also matches a ``bytes`` map key with the same UTF-8 spelling.

Evaluation: an accessor is *empty* when the path is missing or ends at None, ``""``, ``b""``, an
empty map or an empty array. An alternative is empty when any accessor or group in it is empty (so
``$a/$b`` needs both); literals alone are never empty. A group or template yields its first
non-empty alternative, else ``""``. Whitespace at the ends of an alternative is ignored. Values
become text as: str as is, bool ``true``/``false``, numbers via ``str``/``repr``, bytes as below,
maps and arrays as compact JSON of ``jsonable(value)``.

Defaults (LOKI.md A5 policy). Labels: ``namespace``, ``container``, ``app`` (pod label
``app.kubernetes.io/name``, ``app``, ``k8s-app``, ``name``, then OTLP ``service.name``), ``job``
(``<namespace>/<app>`` when both resolve), ``cluster`` (the ``cluster`` setting, when non-empty);
each falls back to the OTLP resource attribute (``k8s.namespace.name``...). Structured metadata:
``trace_id``, ``span_id``, ``pod``, ``node`` and ``level`` (OTLP ``severity_text``; Loki cannot see
it otherwise). User settings are merged over the defaults by (sanitized) name; an empty template
removes a default. A label that resolves to ``""`` is omitted; if none resolves the entry gets
``FALLBACK_LABEL`` (``job="fluentforward"``, like Fluent Bit's ``job="fluent-bit"``; never the tag,
which embeds the pod name). A user label that also exists as default structured metadata replaces it.

Line (``LineFormat``): the *payload* is the record without ``envelope_keys`` (Fluent Bit's ``stream``,
``_p``, ``time``, ``logtag``, ``kubernetes``...). ``auto`` sends the text of ``log``/``message``/``msg``
when that is the payload's only key, else the payload as compact JSON; ``raw`` sends the first of
those texts, JSON when there is none; ``json`` always JSON; ``key_value`` logfmt (values with spaces,
quotes, ``=`` or nothing are JSON-quoted; maps and arrays as JSON). One trailing ``\n`` or ``\r\n``
is removed from a text line. JSON keys keep the record's order.

Trace ids are never labels (LOKI.md A3): a label named, or reading a key named, ``trace_id``,
``span_id``, ``traceparent`` (any case or punctuation), or using ``$trace_id``/``$span_id``, is a
``ConfigError``: such a label would create one stream per request.

Bounds (LOKI.md A2/A6): at most ``MAX_LABELS`` labels and ``MAX_STRUCTURED_METADATA_ENTRIES`` metadata
entries may be configured (else ``ConfigError``); names are sanitized once at build time; label
values are cut to ``MAX_LABEL_VALUE_BYTES`` at a UTF-8 boundary; structured metadata is kept in
configured order (``trace_id`` and ``span_id`` first) and an entry that would push the total past
``MAX_STRUCTURED_METADATA_BYTES`` is dropped; a line over ``max_line_bytes`` is cut at a UTF-8
boundary and ends with ``LINE_TRUNCATION_MARKER`` (same total size), because Loki would drop it whole.
A per-record tenant has characters outside Loki's set replaced by ``_`` and is cut to 150 bytes.

Text invariants: every string in a ``LokiEntry`` is valid Unicode. Invalid UTF-8 that arrived in a
msgpack str (kept as lone surrogates by the decoder) becomes one U+FFFD per invalid byte; any other
lone surrogate likewise. A msgpack bin value (or map key) becomes its text when it is valid UTF-8,
else its lowercase hex (``b"\\x5b\\x8e"`` -> ``"5b8e"``), except a bin log message in the line, which
is decoded with U+FFFD. A msgpack ext value (the decoder's ``slice(code, data)``) becomes the JSON
``[code, "<hex of data>"]``. The record, metadata and group are never mutated.
"""

from __future__ import annotations

import enum
import functools
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from typing import Any

import attrs
import msgpack
import orjson

from fluentforward.errors import ConfigError
from fluentforward.ids import TraceContext
from fluentforward.protocol._events import Entry
from fluentforward.sinks import LokiEntry
from fluentforward.sinks._loki_proto import (
    _GROUP as _VARINT_GROUP,
)
from fluentforward.sinks._loki_proto import (
    _GROUP_BITS,
    _GROUP_MASK,
    _NS_PER_S,
    _UINT64_MASK,
    _VARINT,
    _VARINT_LOW,
    EncodedEntry,
    PushBuffer,
    Stream,
    _metadata_prefix,
    _utf8,
    _varint,
    metadata_field,
    stream_of,
)

__all__ = [
    "DEFAULT_ENVELOPE_KEYS",
    "DEFAULT_LABELS",
    "DEFAULT_MAX_LINE_BYTES",
    "DEFAULT_STRUCTURED_METADATA",
    "FALLBACK_LABEL",
    "JSONABLE_MAX_DEPTH",
    "LINE_TRUNCATION_MARKER",
    "MAX_LABELS",
    "MAX_LABEL_VALUE_BYTES",
    "MAX_STRUCTURED_METADATA_BYTES",
    "MAX_STRUCTURED_METADATA_ENTRIES",
    "LineFormat",
    "ShapeRules",
    "Shaper",
    "Template",
    "build_rules",
    "clean_text",
    "jsonable",
    "sanitize_label_name",
]

# Loki's max_label_names_per_series default; a 16th label makes Loki reject the entry (400).
MAX_LABELS = 15
# Loki's max_label_name_length default.
MAX_LABEL_NAME_BYTES = 1024
# Loki's max_label_value_length default (bytes); longer values are rejected with 400.
MAX_LABEL_VALUE_BYTES = 2048
# Loki's max_structured_metadata_entries_count default.
MAX_STRUCTURED_METADATA_ENTRIES = 128
# Loki's max_structured_metadata_size "64KB"; Loki parses KB as 1000 bytes, so this is the safe value.
MAX_STRUCTURED_METADATA_BYTES = 64_000
# Loki's max_line_size "256KB", read as 256 000 bytes for the same reason; 0 disables the bound.
DEFAULT_MAX_LINE_BYTES = 256_000
# Smallest useful line bound: room for the marker and some text.
MIN_MAX_LINE_BYTES = 64
# Loki tenant ids: at most 150 bytes (Cortex's MaxTenantIDLength).
MAX_TENANT_BYTES = 150
# Deeper containers are replaced by JSONABLE_TOO_DEEP: keeps recursion well under Python's limit
# and orjson's 255-level limit.
JSONABLE_MAX_DEPTH = 100
JSONABLE_TOO_DEEP = "[too deep]"
LINE_TRUNCATION_MARKER = "...[truncated]"
FALLBACK_LABEL: tuple[str, str] = ("job", "fluentforward")

# Fluent Bit tail/CRI/docker parsers, the kubernetes filter and Fluentd's kubernetes_metadata add
# these around the application's own fields; they are not part of the log payload.
DEFAULT_ENVELOPE_KEYS: frozenset[str] = frozenset(
    {"stream", "_p", "time", "logtag", "kubernetes", "kubernetes_namespace", "docker"}
)
# Keys that hold the log text itself, in order of preference (bytes: keys sent as msgpack bin).
_MESSAGE_KEYS: tuple[str | bytes, ...] = ("log", b"log", "message", b"message", "msg", b"msg")
_MESSAGE_KEY_SET = frozenset(_MESSAGE_KEYS)

_NAMESPACE = "$kubernetes['namespace_name'] | $resource['k8s.namespace.name']"
_APP = (
    "$kubernetes['labels']['app.kubernetes.io/name'] | $kubernetes['labels']['app']"
    " | $kubernetes['labels']['k8s-app'] | $kubernetes['labels']['name'] | $resource['service.name']"
)
DEFAULT_LABELS: Mapping[str, str] = {
    "namespace": _NAMESPACE,
    "container": "$kubernetes['container_name'] | $resource['k8s.container.name']",
    "app": _APP,
    "job": f"({_NAMESPACE})/({_APP})",
}
DEFAULT_STRUCTURED_METADATA: Mapping[str, str] = {
    "trace_id": "$trace_id",
    "span_id": "$span_id",
    "pod": "$kubernetes['pod_name'] | $resource['k8s.pod.name']",
    "node": "$kubernetes['host'] | $resource['k8s.node.name']",
    "level": "$metadata['otlp']['severity_text']",
}

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_LABEL_NAME_INVALID = re.compile(r"[^A-Za-z0-9_]")
_TENANT_INVALID = re.compile(r"[^A-Za-z0-9!\-_.*'()]")
_KV_KEY_INVALID = re.compile(r'[\s"=\x00-\x1f\x7f]')
_KV_NEEDS_QUOTES = re.compile(r'[\s"=\\\x00-\x1f\x7f]')
_TRACE_NAMES = ("traceid", "spanid", "traceparent")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DIGITS = re.compile(r"[0-9]+")
_I64_MIN = -(2**63)
_U64_MAX = 2**64 - 1

_RECORD, _METADATA, _RESOURCE, _GROUP, _TAG, _TRACE_ID, _SPAN_ID = range(7)
_ROOTS = {
    "record": _RECORD,
    "metadata": _METADATA,
    "resource": _RESOURCE,
    "group": _GROUP,
    "tag": _TAG,
    "trace_id": _TRACE_ID,
    "span_id": _SPAN_ID,
}
_SCALAR_ROOTS = frozenset({_TAG, _TRACE_ID, _SPAN_ID})


class LineFormat(enum.StrEnum):
    """How the log line is built from the record's payload (the record minus envelope keys)."""

    AUTO = "auto"  # the log text if the payload is just log/message/msg, else JSON
    RAW = "raw"  # the log/message/msg text, JSON of the payload when there is none
    JSON = "json"  # compact JSON of the payload
    KEY_VALUE = "key_value"  # logfmt: k=v, quoted when needed, maps and arrays as JSON


# --- text helpers -----------------------------------------------------------------------------


def clean_text(text: str) -> str:
    """Return ``text`` with every lone surrogate replaced by U+FFFD (valid Unicode, encodable)."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _LONE_SURROGATE.sub("\ufffd", text)
    return text


def _bytes_text(data: bytes) -> str:
    """A bin value as text: its UTF-8 text when valid, else lowercase hex (ids arrive as bin)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.hex()


def _cut_utf8(text: str, limit: int) -> str:
    """Valid ``text`` cut to at most ``limit`` UTF-8 bytes without splitting a character."""
    if text.isascii():
        return text[:limit]
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    return data[:limit].decode("utf-8", "ignore")


def _key_text(key: Any) -> str:
    if type(key) is str:
        return clean_text(key)
    return "null" if key is None else clean_text(_value_text(key))


def _value_text(value: Any) -> str:
    """Template text of a decoded value; ``""`` means empty. May hold surrogates (cleaned later)."""
    if type(value) is str:
        return value
    if value is None:
        return ""
    if isinstance(value, bytes):
        return _bytes_text(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (dict, list, tuple, slice)):
        return _json_bytes(value).decode("utf-8") if value else ""
    if isinstance(value, str):
        return str(value)
    return clean_text(str(value))


def jsonable(value: Any) -> Any:
    """Return a copy of a decoded value that ``orjson.dumps`` always accepts.

    Strings are cleaned (lone surrogates -> U+FFFD); bytes become their UTF-8 text when valid, else
    lowercase hex; map keys become strings the same way (None -> ``"null"``, bool ->
    ``"true"``/``"false"``, numbers via ``str``); tuples become lists; msgpack ext values (``ExtType``
    or the decoder's ``slice(code, data)``) become ``[code, "<hex of data>"]``;
    integers outside 64 bits become decimal strings; containers nested deeper than
    ``JSONABLE_MAX_DEPTH`` become ``"[too deep]"``; anything else becomes ``str(value)``. When two
    keys map to the same string the later one wins.

    Args:
        value: anything msgpack decoding produced (record, metadata, group).

    Returns:
        A structure of dict/list/str/int/float/bool/None.
    """
    return _jsonable(value, 0)


def _jsonable(value: Any, depth: int) -> Any:
    kind = type(value)
    if kind is str:
        return clean_text(value)
    if kind is float or kind is bool or value is None:
        return value
    if kind is int:
        return value if _I64_MIN <= value <= _U64_MAX else str(value)
    if isinstance(value, dict):
        if depth >= JSONABLE_MAX_DEPTH:
            return JSONABLE_TOO_DEEP
        return {_key_text(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if kind is slice or kind is msgpack.ExtType:  # slice(code, data): the decoder's ext_hook
        code, data = (value.start, value.stop) if kind is slice else value
        return [code, data.hex() if isinstance(data, (bytes, bytearray, memoryview)) else str(data)]
    if isinstance(value, (list, tuple)):
        if depth >= JSONABLE_MAX_DEPTH:
            return JSONABLE_TOO_DEEP
        return [_jsonable(v, depth + 1) for v in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _bytes_text(bytes(value))
    if isinstance(value, int):  # subclasses such as IntEnum; bool is handled above
        return _jsonable(int(value), depth)
    if isinstance(value, float):
        return float(value)
    return clean_text(str(value))


def _json_bytes(value: Any) -> bytes:
    """Compact JSON; tries orjson on the value as is (the common, clean case) before copying it."""
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError: bytes, surrogates, odd keys, huge ints, depth
        return orjson.dumps(jsonable(value))


def sanitize_label_name(name: str) -> str:
    """Map ``name`` onto Loki's ``[a-zA-Z_][a-zA-Z0-9_]*`` without the reserved ``__`` prefix.

    Other characters become ``_``, a leading digit gets a ``_`` prefix, leading underscores collapse
    to one (``app.kubernetes.io/name`` -> ``app_kubernetes_io_name``, ``__x`` -> ``_x``).
    """
    out = _LABEL_NAME_INVALID.sub("_", name)
    if out.startswith("__"):
        out = "_" + out.lstrip("_")
    if not out or out[0].isdigit():
        out = "_" + out
    return out


def _clean_tenant(text: str) -> str:
    out = _TENANT_INVALID.sub("_", text)[:MAX_TENANT_BYTES]
    # Loki refuses "." and ".." as tenant ids (they would be path components).
    return out.replace(".", "_") if out in {".", ".."} else out


# --- templates --------------------------------------------------------------------------------
# A template is parsed into a small tree: alternatives of parts, each part a literal ``str``, an
# _Accessor or a _Group. The tree is compared (reuse) and inspected (trace-id policy); evaluation
# goes through code generated from it (see _Emitter).

_Step = tuple[str | int, bytes | None]
_Alternatives = tuple[tuple[Any, ...], ...]
# Limits nesting in the generated code (Python's parser caps indentation at 100 levels).
MAX_TEMPLATE_DEPTH = 8
# Bounds the generated code and the time to build it; real templates are well under 200 chars.
MAX_TEMPLATE_CHARS = 4096


@attrs.frozen(kw_only=True)
class _Accessor:
    root: int
    # Each step is (key, bytes spelling of a str key or None); int keys index arrays.
    steps: tuple[_Step, ...]


@attrs.frozen(kw_only=True)
class _Group:
    alternatives: _Alternatives


class _Parser:
    """Recursive descent over the grammar in the module docstring; runs once per setting."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.pos = 0
        self.depth = 0

    def error(self, message: str, pos: int | None = None) -> ConfigError:
        column = (self.pos if pos is None else pos) + 1
        return ConfigError(f"template {self.source!r}, column {column}: {message}")

    def parse(self) -> _Alternatives:
        alternatives = self.alternatives()
        if self.pos < len(self.source):
            raise self.error("')' without a matching '('")
        return alternatives

    def alternatives(self) -> _Alternatives:
        found = [self.sequence()]
        while self.pos < len(self.source) and self.source[self.pos] == "|":
            self.pos += 1
            found.append(self.sequence())
        return tuple(found)

    def sequence(self) -> tuple[Any, ...]:
        start = self.pos
        parts: list[Any] = []
        while self.pos < len(self.source) and self.source[self.pos] not in "|)":
            char = self.source[self.pos]
            if char == "$":
                parts.append(self.accessor())
            elif char == "(":
                parts.append(self.group())
            else:
                parts.append(self.literal())
        if parts and isinstance(parts[0], str):
            parts[0] = parts[0].lstrip()
        if parts and isinstance(parts[-1], str):
            parts[-1] = parts[-1].rstrip()
        parts = [part for part in parts if part != ""]
        if not parts:
            raise self.error("empty alternative", start)
        return tuple(parts)

    def group(self) -> _Group:
        start = self.pos
        self.depth += 1
        if self.depth > MAX_TEMPLATE_DEPTH:
            raise self.error(f"groups nested more than {MAX_TEMPLATE_DEPTH} deep")
        self.pos += 1
        alternatives = self.alternatives()
        if self.pos >= len(self.source):
            raise self.error("'(' is never closed", start)
        self.pos += 1
        self.depth -= 1
        return _Group(alternatives=alternatives)

    def literal(self) -> str:
        chars = []
        while self.pos < len(self.source) and self.source[self.pos] not in "$|()":
            char = self.source[self.pos]
            if char == "\\":
                self.pos += 1
                if self.pos >= len(self.source):
                    raise self.error("'\\' at the end escapes nothing", self.pos - 1)
                char = self.source[self.pos]
            chars.append(char)
            self.pos += 1
        return "".join(chars)

    def accessor(self) -> _Accessor:
        start = self.pos
        match = _NAME.match(self.source, self.pos + 1)
        if match is None:
            raise self.error("expected a name after '$' (write '\\$' for a literal '$')")
        self.pos = match.end()
        name = match.group()
        root = _ROOTS.get(name)
        steps: list[_Step] = []
        if root is None:
            root = _RECORD
            steps.append((name, name.encode("utf-8")))
        while self.pos < len(self.source) and self.source[self.pos] == "[":
            steps.append(self.subscript())
        if root in _SCALAR_ROOTS and steps:
            raise self.error(f"${name} is a string and takes no keys", start)
        return _Accessor(root=root, steps=tuple(steps))

    def subscript(self) -> _Step:
        open_pos = self.pos
        self.pos += 1
        source = self.source
        if self.pos < len(source) and source[self.pos] in "'\"":
            quote = source[self.pos]
            self.pos += 1
            chars = []
            while self.pos < len(source) and source[self.pos] != quote:
                if source[self.pos] == "\\":
                    self.pos += 1
                if self.pos < len(source):
                    chars.append(source[self.pos])
                    self.pos += 1
            if self.pos >= len(source):
                raise self.error(f"unterminated {quote} in key", open_pos)
            self.pos += 1
            text = "".join(chars)
            key: _Step = (text, text.encode("utf-8", "surrogatepass"))
        else:
            digits = _DIGITS.match(source, self.pos)
            if digits is None:
                raise self.error("expected a quoted key or an array index after '['")
            self.pos = digits.end()
            key = (int(digits.group()), None)
        if self.pos >= len(source) or source[self.pos] != "]":
            raise self.error("expected ']'")
        self.pos += 1
        return key


@attrs.frozen(kw_only=True)
class Template:
    """A parsed template (grammar in the module docstring). Build it with ``Template.parse``."""

    source: str
    _alternatives: _Alternatives

    @classmethod
    def parse(cls, source: str) -> Template:
        """Parse ``source`` once into accessor objects.

        Raises:
            ConfigError: the template is empty or malformed; the message names the column.
        """
        if not isinstance(source, str):
            raise ConfigError(f"template {source!r} must be a string")
        if len(source) > MAX_TEMPLATE_CHARS:
            raise ConfigError(f"template {source[:40]!r}... is over {MAX_TEMPLATE_CHARS} chars")
        return cls(source=source, alternatives=_Parser(source).parse())

    @classmethod
    def literal(cls, text: str) -> Template:
        """A template that always yields ``text`` (no ``$`` or ``|`` interpretation)."""
        return cls(source=text, alternatives=((text,),))

    @property
    def is_literal(self) -> bool:
        """True when the template reads nothing from the entry."""
        return all(type(part) is str for parts in self._alternatives for part in parts)

    def render(self, tag: str, entry: Entry, trace: TraceContext | None = None) -> str:
        """Evaluate against one entry; ``""`` when nothing resolves. The result is valid Unicode."""
        roots = _roots(tag, entry.record, entry.metadata, entry.group, trace)
        _, _, text = _render_function(self._alternatives)(*roots)
        return clean_text(text or "")

    def _accessors(self) -> Iterator[_Accessor]:
        """Every accessor, groups included (used to check the trace-id policy)."""
        stack = [self._alternatives]
        while stack:
            for parts in stack.pop():
                for part in parts:
                    if isinstance(part, _Accessor):
                        yield part
                    elif isinstance(part, _Group):
                        stack.append(part.alternatives)


def _roots(
    tag: str,
    record: dict[Any, Any],
    metadata: dict[Any, Any],
    group: dict[Any, Any] | None,
    trace: TraceContext | None,
) -> tuple[Any, ...]:
    """The arguments of a generated function: the values accessors start from, by root index."""
    resource = group.get("resource") if isinstance(group, dict) else None
    resource = resource.get("attributes") if isinstance(resource, dict) else None
    if trace is None:
        return (record, metadata, resource, group, tag, None, None)
    return (record, metadata, resource, group, tag, trace.trace_id, trace.span_id)


# --- code generation --------------------------------------------------------------------------

# (labels, structured metadata, raw extra value) for one entry; see _compile.
_Fields = Callable[..., tuple[list[tuple[str, str]], list[tuple[str, str]], str | None]]
_UNSET = object()


def _step(value: Any, key: str | int, alt: bytes | None) -> Any:
    """One accessor step on anything but a plain dict or None (those are inlined)."""
    if isinstance(value, dict):
        found = value.get(key)
        return value.get(alt) if found is None and alt is not None else found
    if isinstance(value, (list, tuple)) and type(key) is int:
        return value[key] if key < len(value) else None
    return None


def _label_value(text: str) -> str:
    return _cut_utf8(clean_text(text), MAX_LABEL_VALUE_BYTES)


def _size(alternatives: _Alternatives) -> int:
    return sum(
        _size(part.alternatives) + 1 if isinstance(part, _Group) else 1
        for parts in alternatives
        for part in parts
    )


class _Emitter:
    """Writes the source of one function that evaluates every template of a rule set.

    Why generated code: a rule set is about ten templates of a few lookups each; evaluated through
    objects or closures, Python call overhead was most of the cost of shaping a record. The function
    takes the roots as ``r0``..``r6`` (indices of ``_ROOTS``). Each distinct path prefix is looked
    up at most once per call and kept in a local ``p<n>`` (which starts as ``_UNSET`` when it is
    first looked up inside a branch). Each distinct template is evaluated once, smallest first,
    into ``v<n>``, so a group equal to a whole template (the default ``job`` is
    ``(<namespace>)/(<app>)``) reuses its value. Only sanitized names and ``repr()`` of
    str/bytes/int keys and literals reach the source, so settings cannot inject code.
    """

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.paths: dict[tuple[int, tuple[_Step, ...]], str] = {}
        self.assigned: set[str] = set()  # path locals set unconditionally above the current line
        self.unset: dict[str, None] = {}  # path locals tested against _UNSET (ordered set)
        self.known: dict[_Alternatives, str] = {}
        self.temps = 0

    def emit(self, depth: int, text: str) -> None:
        self.lines.append("    " * depth + text)

    def template(self, alternatives: _Alternatives) -> str:
        name = self.known.get(alternatives)
        if name is None:
            name = f"v{len(self.known)}"
            self.alternatives(alternatives, name, 1)
            self.known[alternatives] = name
        return name

    def alternatives(self, alternatives: _Alternatives, target: str, depth: int) -> None:
        for index, parts in enumerate(alternatives):
            if index:
                self.emit(depth, f"if not {target}:")
            self.sequence(parts, target, depth + (index > 0))

    def sequence(self, parts: tuple[Any, ...], target: str, depth: int) -> None:
        if len(parts) == 1:
            self.part(parts[0], target, depth)
            return
        pieces: list[str] = []
        ok = ""  # the first piece doubles as the "every piece so far is non-empty" flag
        for part in parts:
            if isinstance(part, str):
                pieces.append(repr(part))
                continue
            self.temps += 1
            piece = f"t{self.temps}"
            if not ok:
                self.part(part, piece, depth)
                ok = piece
            else:
                self.emit(depth, f"if {ok}:")
                self.part(part, piece, depth + 1)
                self.emit(depth + 1, f"if not {piece}:")
                self.emit(depth + 2, f"{ok} = ''")
            pieces.append(piece)
        # A long "+" chain nests deeply in Python's compiler; join() keeps it flat.
        joined = " + ".join(pieces) if len(pieces) <= 8 else f"''.join(({', '.join(pieces)}))"
        self.emit(depth, f"{target} = {joined} if {ok} else ''")

    def part(self, part: Any, target: str, depth: int) -> None:
        if isinstance(part, str):
            self.emit(depth, f"{target} = {part!r}")
        elif isinstance(part, _Group):
            known = self.known.get(part.alternatives)
            if known is None:
                self.alternatives(part.alternatives, target, depth)
            else:
                self.emit(depth, f"{target} = {known}")
        else:
            value = self.path(part, depth)
            self.emit(depth, f"{target} = {value} if type({value}) is str else _text({value})")

    def path(self, accessor: _Accessor, depth: int) -> str:
        name = f"r{accessor.root}"
        for end, (key, alt) in enumerate(accessor.steps, 1):
            parent = name
            seen = (accessor.root, accessor.steps[:end]) in self.paths
            name = self.paths.setdefault((accessor.root, accessor.steps[:end]), f"p{len(self.paths)}")
            if name in self.assigned:
                continue
            inner = depth
            if seen:  # first looked up in a branch that may not have run
                self.emit(depth, f"if {name} is _UNSET:")
                self.unset.setdefault(name)
                inner += 1
            self.emit(inner, f"if type({parent}) is dict:")
            self.emit(inner + 1, f"{name} = {parent}.get({key!r})")
            if alt is not None:
                self.emit(inner + 1, f"if {name} is None:")
                self.emit(inner + 2, f"{name} = {parent}.get({alt!r})")
            self.emit(inner, f"elif {parent} is None:")
            self.emit(inner + 1, f"{name} = None")
            self.emit(inner, "else:")
            self.emit(inner + 1, f"{name} = _step({parent}, {key!r}, {alt!r})")
            if depth == 1:  # unconditional: every later line can rely on it
                self.assigned.add(name)
        return name


def _compile(
    labels: tuple[tuple[str, Template], ...],
    metadata: tuple[tuple[str, Template], ...],
    extra: _Alternatives | None,
    text: Callable[[Any], str] = _value_text,
) -> _Fields:
    """Generate ``fields(r0..r6) -> (labels, structured metadata, raw extra)`` for a rule set.

    Labels come out in the given order, cut to ``MAX_LABEL_VALUE_BYTES``, empty ones omitted.
    Metadata values are cleaned and kept in order while they fit ``MAX_STRUCTURED_METADATA_BYTES``.
    ``extra`` (the tenant, or the template ``Template.render`` evaluates) comes back raw, or None.
    """
    emitter = _Emitter()
    everything = [t._alternatives for _, t in labels + metadata] + ([extra] if extra else [])
    for alternatives in sorted(everything, key=_size):
        emitter.template(alternatives)
    lines = ["def fields(r0, r1, r2, r3, r4, r5, r6):"]
    if emitter.unset:
        lines.append(f"    {' = '.join(emitter.unset)} = _UNSET")
    lines += emitter.lines
    lines.append("    labels = []")
    for name, template in labels:
        value = emitter.known[template._alternatives]
        fits = f"{value}.isascii() and len({value}) <= {MAX_LABEL_VALUE_BYTES}"
        lines += [
            f"    if {value}:",
            f"        labels.append(({name!r}, {value} if {fits} else _label_value({value})))",
        ]
    lines += ["    metadata = []", f"    budget = {MAX_STRUCTURED_METADATA_BYTES}"]
    for name, template in metadata:
        value = emitter.known[template._alternatives]
        lines += [  # Loki counts name + value bytes against its limit
            f"    if {value}:",
            f"        if {value}.isascii():",
            f"            size = {len(name)} + len({value})",
            "        else:",
            f"            {value} = _clean({value})",
            f"            size = {len(name)} + len({value}.encode())",
            "        if size <= budget:",
            "            budget -= size",
            f"            metadata.append(({name!r}, {value}))",
        ]
    lines.append(f"    return labels, metadata, {emitter.known[extra] if extra else None}")
    namespace: dict[str, Any] = {
        "_UNSET": _UNSET,
        "_step": _step,
        "_text": text,
        "_clean": clean_text,
        "_label_value": _label_value,
    }
    try:
        code = compile("\n".join(lines), "<fluentforward.records rules>", "exec")
    except (RecursionError, MemoryError, SyntaxError) as exc:  # limits make this unreachable
        raise ConfigError(f"templates too complex to compile: {exc}") from None
    exec(code, namespace)  # noqa: S102 - generated from parsed templates only, see _Emitter
    fields: _Fields = namespace["fields"]
    return fields


@functools.lru_cache(maxsize=64)
def _render_function(alternatives: _Alternatives) -> _Fields:
    return _compile((), (), alternatives)


# --- memoized stream fields -------------------------------------------------------------------

# The values a rule set reads (the ``kubernetes`` map, the OTLP resource) are the same for every record
# of a container, and a Forward chunk holds one container's records. So labels, tenant and every
# structured metadata entry but the trace ids are computed once per run of equal inputs: the shaper
# compares the inputs with the previous record's (one C-level ``==``) and reuses the result, including
# the labels tuple itself, which the encoders then group by identity.
#
# ``==`` is trusted only where equal means identical for rendering: inputs made of str, bytes, None,
# dicts with str/bytes keys and lists (``1 == True == 1.0`` would render differently, and
# ``{1: x} == {True: x}``), and no template rendering a map or array as JSON (key order is not part of
# ``==``). Anything else takes the full path, whose result the memoized one always equals.

# Inputs with more containers than this are not memoized: the plain check walks them once per miss.
MEMO_MAX_NODES = 4096
_TRACE_ROOTS = frozenset({_TRACE_ID, _SPAN_ID})
# Normalized ids: 32 and 16 hex characters (fluentforward.ids), so their metadata size is known.
_ID_LENGTHS = {_TRACE_ID: 32, _SPAN_ID: 16}


class _RendersContainerError(Exception):
    """A memoized template met a map or array (rendered as JSON, whose key order ``==`` ignores)."""


def _memo_text(value: Any) -> str:
    if isinstance(value, (dict, list, tuple)) and value:
        raise _RendersContainerError
    return _value_text(value)


def _is_plain(value: Any) -> bool:
    """True when ``value == other`` implies both render the same (see the comment above)."""
    stack = [value]
    budget = MEMO_MAX_NODES
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is str or kind is bytes or item is None:
            continue
        budget -= 1
        if budget < 0:
            return False
        if kind is dict:
            for key, member in item.items():
                if type(key) is not str and type(key) is not bytes:
                    return False
                stack.append(member)
        elif kind is list or kind is tuple:
            stack.extend(item)
        else:
            return False
    return True


@attrs.frozen(kw_only=True)
class _MemoPlan:
    """How a rule set is memoized: the inputs that key it and the trace-id entries added per record."""

    key: Callable[[dict[Any, Any], dict[Any, Any], Any, str], tuple[Any, ...]]
    # The record fields the key reads, when they are one or two (else None; a plan reading one names
    # _UNSET as the second, never a key). A record whose values there and group are the very objects
    # of the record before's, and whose metadata equals it (usually both empty), has the same key:
    # the tag is one per call.
    only_fields: tuple[Any, Any] | None
    # (metadata name, root) of the leading structured metadata entries that are just $trace_id/$span_id.
    trace_slots: tuple[tuple[str, int], ...]
    # The most bytes the trace slots can add (names plus normalized ids).
    trace_bytes: int
    fields: _Fields


def _memo_plan(
    labels: tuple[tuple[str, Template], ...],
    metadata: tuple[tuple[str, Template], ...],
    tenant: Template | None,
) -> _MemoPlan | None:
    """Split a rule set into per-stream fields and per-record trace ids; None if it cannot be."""
    slots: list[tuple[str, int]] = []
    rest = list(metadata)
    while rest:
        parts = rest[0][1]._alternatives
        accessor = parts[0][0] if len(parts) == 1 and len(parts[0]) == 1 else None
        if not isinstance(accessor, _Accessor) or accessor.root not in _TRACE_ROOTS:
            break
        slots.append((rest.pop(0)[0], accessor.root))
    templates = [t for _, t in labels] + [t for _, t in rest] + ([tenant] if tenant else [])
    record_keys: dict[str | bytes, None] = {}
    roots: set[int] = set()
    for template in templates:
        for accessor in template._accessors():
            if accessor.root in _TRACE_ROOTS or (accessor.root == _RECORD and not accessor.steps):
                return None  # per-record by nature: nothing to share between records
            roots.add(accessor.root)
            if accessor.root == _RECORD:
                key, alt = accessor.steps[0]
                if not isinstance(key, str):
                    return None
                record_keys[key] = None
                if alt is not None:
                    record_keys[alt] = None
    inputs = [f"get({key!r})" for key in record_keys]
    inputs += ["metadata"] if _METADATA in roots else []
    inputs += ["group"] if roots & {_GROUP, _RESOURCE} else []
    inputs += ["tag"] if _TAG in roots else []
    source = "def key(record, metadata, group, tag):\n    get = record.get\n"
    source += f"    return ({', '.join(inputs)}{',' if inputs else ''})\n"
    namespace: dict[str, Any] = {}
    exec(compile(source, "<fluentforward.records memo key>", "exec"), namespace)  # noqa: S102 - reprs only
    fields = [*record_keys, _UNSET]
    return _MemoPlan(
        key=namespace["key"],
        only_fields=(fields[0], fields[1]) if 1 <= len(record_keys) <= 2 else None,
        trace_slots=tuple(slots),
        trace_bytes=sum(len(name.encode()) + _ID_LENGTHS[root] for name, root in slots),
        fields=_compile(labels, tuple(rest), None if tenant is None else tenant._alternatives, _memo_text),
    )


# --- rules ------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class ShapeRules:
    """Compiled shaping settings; build with ``build_rules``.

    Attributes:
        line_format: how the line is built.
        labels: (sanitized name, template), sorted by name, at most ``MAX_LABELS``.
        structured_metadata: (sanitized name, template) in keep-first order.
        tenant: per-entry tenant template, or None for the sink's tenant.
        envelope_keys: record keys that are not payload (str and bytes spellings).
        max_line_bytes: line bound in UTF-8 bytes (``sys.maxsize`` when unbounded).
    """

    line_format: LineFormat
    labels: tuple[tuple[str, Template], ...]
    structured_metadata: tuple[tuple[str, Template], ...]
    tenant: Template | None
    envelope_keys: frozenset[str | bytes]
    max_line_bytes: int
    _fields: _Fields = attrs.field(
        init=False,
        eq=False,
        repr=False,
        default=attrs.Factory(
            lambda rules: _compile(
                rules.labels,
                rules.structured_metadata,
                None if rules.tenant is None else rules.tenant._alternatives,
            ),
            takes_self=True,
        ),
    )
    _memo: _MemoPlan | None = attrs.field(
        init=False,
        eq=False,
        repr=False,
        default=attrs.Factory(
            lambda rules: _memo_plan(rules.labels, rules.structured_metadata, rules.tenant),
            takes_self=True,
        ),
    )


def _is_trace_name(name: str) -> bool:
    letters = re.sub(r"[^a-z]", "", name.lower())
    return any(word in letters for word in _TRACE_NAMES)


def _reads_trace_ids(template: Template) -> bool:
    return any(
        acc.root in {_TRACE_ID, _SPAN_ID}
        or any(isinstance(key, str) and _is_trace_name(key) for key, _ in acc.steps)
        for acc in template._accessors()
    )


def _compile_templates(
    kind: str, defaults: Mapping[str, str | Template], settings: Mapping[str, str] | None
) -> tuple[dict[str, Template], set[str]]:
    """Merge ``settings`` over ``defaults`` by sanitized name; ``""`` removes a name.

    Returns:
        The compiled templates, and the names the user configured with a non-empty template.
    """
    if settings is not None and not isinstance(settings, Mapping):
        raise ConfigError(f"{kind} must be a table of name = template, not {settings!r}")
    merged = dict(defaults)
    origin: dict[str, str] = {}
    for raw_name, source in (settings or {}).items():
        if not isinstance(raw_name, str) or not raw_name:
            raise ConfigError(f"{kind}: name {raw_name!r} must be a non-empty string")
        if not isinstance(source, str):
            raise ConfigError(f"{kind}.{raw_name}: template must be a string, not {source!r}")
        name = sanitize_label_name(raw_name)
        if name in origin:
            raise ConfigError(f"{kind}: {origin[name]!r} and {raw_name!r} both become {name!r}")
        if len(name.encode("utf-8")) > MAX_LABEL_NAME_BYTES:
            raise ConfigError(f"{kind}: name {raw_name[:40]!r}... is over {MAX_LABEL_NAME_BYTES} bytes")
        origin[name] = raw_name
        merged[name] = source
    compiled: dict[str, Template] = {}
    for name, setting in merged.items():
        if isinstance(setting, Template):
            compiled[name] = setting
        elif setting.strip():
            try:
                compiled[name] = Template.parse(setting)
            except ConfigError as exc:
                raise ConfigError(f"{kind}.{origin.get(name, name)}: {exc}") from None
    return compiled, {name for name in origin if name in compiled}


def build_rules(
    *,
    line_format: str = LineFormat.AUTO,
    labels: Mapping[str, str] | None = None,
    structured_metadata: Mapping[str, str] | None = None,
    cluster: str = "",
    tenant: str | None = None,
    envelope_keys: Iterable[str] | None = None,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> ShapeRules:
    """Validate simple settings (CLI flags, TOML) and compile them into ``ShapeRules``.

    Args:
        line_format: ``auto``, ``raw``, ``json`` or ``key_value``.
        labels: name -> template, merged over ``DEFAULT_LABELS``; ``""`` removes a default.
        structured_metadata: name -> template, merged over ``DEFAULT_STRUCTURED_METADATA``.
        cluster: value of the ``cluster`` label, taken literally; no label when empty (a
            ``labels.cluster`` entry wins).
        tenant: tenant template (``acme`` or ``$kubernetes['namespace_name']``); None or ``""``:
            the sink's tenant. A per-record value that resolves to ``""`` also means the sink's.
        envelope_keys: record keys that are not payload; None means ``DEFAULT_ENVELOPE_KEYS``.
        max_line_bytes: line bound in UTF-8 bytes; 0 disables it.

    Raises:
        ConfigError: a bad value, a malformed template, more than ``MAX_LABELS`` labels, a
            trace-id label, names colliding after sanitization.
    """
    try:
        fmt = LineFormat(line_format)
    except ValueError:
        choices = ", ".join(f.value for f in LineFormat)
        raise ConfigError(f"line_format {line_format!r} is not one of {choices}") from None

    default_labels: dict[str, str | Template] = dict(DEFAULT_LABELS)
    if not isinstance(cluster, str):
        raise ConfigError(f"cluster must be a string, not {cluster!r}")
    if cluster:
        if clean_text(cluster) != cluster or len(cluster.encode()) > MAX_LABEL_VALUE_BYTES:
            raise ConfigError(f"cluster {cluster[:40]!r}: not text of at most 2048 UTF-8 bytes")
        default_labels["cluster"] = Template.literal(cluster)
    label_templates, _ = _compile_templates("labels", default_labels, labels)
    if len(label_templates) > MAX_LABELS:
        names = ", ".join(sorted(label_templates))
        raise ConfigError(f"labels: {len(label_templates)} configured ({names}); Loki allows 15")
    for name, template in label_templates.items():
        if _is_trace_name(name) or _reads_trace_ids(template):
            raise ConfigError(
                f"labels.{name}: a trace or span id label makes one stream per request; "
                "put it in structured_metadata instead"
            )

    sm_templates, user_sm = _compile_templates(
        "structured_metadata", DEFAULT_STRUCTURED_METADATA, structured_metadata
    )
    for name in label_templates.keys() & sm_templates.keys():
        if name in user_sm:
            raise ConfigError(f"{name!r} is configured both as a label and as structured metadata")
        del sm_templates[name]  # the user's label replaces the default metadata entry
    if len(sm_templates) > MAX_STRUCTURED_METADATA_ENTRIES:
        raise ConfigError(
            f"structured_metadata: {len(sm_templates)} configured; Loki allows "
            f"{MAX_STRUCTURED_METADATA_ENTRIES}"
        )

    tenant_template = None
    if tenant is not None:
        if not isinstance(tenant, str):
            raise ConfigError(f"tenant must be a string, not {tenant!r}")
        if tenant.strip():
            try:
                tenant_template = Template.parse(tenant)
            except ConfigError as exc:
                raise ConfigError(f"tenant: {exc}") from None
            value = tenant_template.render("", Entry(time_ns=0, record={}))
            if tenant_template.is_literal and _clean_tenant(value) != value:
                raise ConfigError(
                    f"tenant {tenant!r}: Loki accepts at most {MAX_TENANT_BYTES} bytes of "
                    "A-Z a-z 0-9 ! - _ . * ' ( ), and not '.' or '..'"
                )

    if envelope_keys is None:
        envelope: frozenset[str] = DEFAULT_ENVELOPE_KEYS
    elif isinstance(envelope_keys, str) or not all(isinstance(k, str) for k in envelope_keys):
        raise ConfigError(f"envelope_keys must be a list of strings, not {envelope_keys!r}")
    else:
        envelope = frozenset(envelope_keys)

    if (
        not isinstance(max_line_bytes, int)
        or isinstance(max_line_bytes, bool)
        or not (max_line_bytes == 0 or max_line_bytes >= MIN_MAX_LINE_BYTES)
    ):
        raise ConfigError(f"max_line_bytes must be 0 or >= {MIN_MAX_LINE_BYTES}, not {max_line_bytes!r}")

    return ShapeRules(
        line_format=fmt,
        labels=tuple(sorted(label_templates.items())),
        structured_metadata=tuple(sm_templates.items()),
        tenant=tenant_template,
        envelope_keys=envelope | {k.encode("utf-8", "surrogatepass") for k in envelope},
        max_line_bytes=max_line_bytes or sys.maxsize,
    )


# --- shaping ----------------------------------------------------------------------------------


def _message_text(value: Any) -> str | None:
    """The text of a log/message/msg value without one trailing line ending; None if not text."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, bytes):
        text = value.decode("utf-8", "replace")  # a log line is text even when sent as bin
    else:
        return None
    if text.endswith("\n"):
        text = text[:-2] if text.endswith("\r\n") else text[:-1]
    return text


@functools.lru_cache(maxsize=4096, typed=True)  # keys repeat across records; typed: 1 != True
def _kv_name(key: Any) -> str:
    return _KV_KEY_INVALID.sub("_", _key_text(key)) or "_"


def _kv_line(payload: Mapping[Any, Any]) -> str:
    pairs = []
    for key, value in payload.items():
        name = _kv_name(key)
        text = "null" if value is None else clean_text(_value_text(value))
        if text == "" or _KV_NEEDS_QUOTES.search(text):
            text = orjson.dumps(text).decode("utf-8")
        pairs.append(f"{name}={text}")
    return " ".join(pairs)


def _no_append(_entry: EncodedEntry) -> None:  # pragma: no cover - replaced before the first use
    raise AssertionError


_NO_STREAM = Stream(())
# Nanoseconds from here on (most of them) take the five-byte varint of three 14-bit groups.
_NANOS_3_GROUPS = 1 << (2 * _GROUP_BITS)


def _trace_fields(slots: tuple[tuple[str, int], ...], trace: TraceContext) -> tuple[bytes, int]:
    """The encoded trace-id metadata fields of one entry, and their ``entry_size`` bytes."""
    fields = []
    cost = 0
    for name, root in slots:
        value = trace.trace_id if root == _TRACE_ID else trace.span_id
        if value:
            data = _utf8(value)
            fields.append(_metadata_prefix(name, len(data)) + data)
            cost += len(name.encode()) + len(data)
    return b"".join(fields), cost


@attrs.define
class _Memo:
    """The last memoized inputs and what they gave (see ``_MemoPlan``)."""

    key: Any = _UNSET
    labels: tuple[tuple[str, str], ...] = ()
    metadata: tuple[tuple[str, str], ...] = ()
    metadata_bytes: int = 0
    tenant: str | None = None
    # For encode_events: the labels' Stream and the metadata's encoded EntryAdapter fields.
    stream: Stream | None = None
    encoded_metadata: bytes = b""


@attrs.frozen(kw_only=True)
class Shaper:
    """Applies one ``ShapeRules`` to entries.

    It remembers the inputs of the last record it shaped (see ``_MemoPlan``), which changes no result:
    share one between trio tasks freely, but give each thread its own.
    """

    rules: ShapeRules
    _memo: _Memo = attrs.field(init=False, factory=_Memo, eq=False, repr=False)

    def shape(self, tag: str, entry: Entry, trace: TraceContext | None = None) -> LokiEntry:
        """Build the Loki entry for one decoded event; never raises for any decoded input.

        Args:
            tag: the Forward tag (only used through ``$tag``).
            entry: the decoded event; it is not modified.
            trace: the trace context ``fluentforward.ids`` found for this event, if any.

        Returns:
            A ``LokiEntry`` whose strings are all valid Unicode and within Loki's limits.
        """
        return self.shape_event(tag, entry.time_ns, entry.record, entry.metadata, entry.group, trace)

    def shape_event(
        self,
        tag: str,
        time_ns: int,
        record: dict[Any, Any],
        metadata: dict[Any, Any],
        group: dict[Any, Any] | None,
        trace: TraceContext | None,
    ) -> LokiEntry:
        """``shape`` for an event given as its parts (the shipper's hot path builds no ``Entry``)."""
        plan = self.rules._memo
        if plan is not None:
            memo = self._memo
            key = plan.key(record, metadata, group, tag)
            if key != memo.key and not self._remember(plan, key, record, metadata, group, tag):
                return self._shape_fully(time_ns, record, _roots(tag, record, metadata, group, trace))
            if trace is None:
                return LokiEntry(memo.labels, time_ns, self._line(record), memo.metadata, memo.tenant)
            if memo.metadata_bytes + plan.trace_bytes <= MAX_STRUCTURED_METADATA_BYTES:
                found: list[tuple[str, str]] = []
                for name, root in plan.trace_slots:
                    value = trace.trace_id if root == _TRACE_ID else trace.span_id
                    if value:
                        found.append((name, value))
                return LokiEntry(
                    memo.labels, time_ns, self._line(record), (*found, *memo.metadata), memo.tenant
                )
        return self._shape_fully(time_ns, record, _roots(tag, record, metadata, group, trace))

    def encode_events(
        self,
        tag: str,
        events: Iterable[tuple[int, dict[Any, Any], dict[Any, Any], dict[Any, Any] | None]],
        find_trace: Callable[[dict[Any, Any], dict[Any, Any]], TraceContext | None],
        into: PushBuffer,
        sources: MutableMapping[str, int] | None = None,
    ) -> None:
        """Shape events and append them to ``into`` already encoded for Loki's protobuf push.

        The shipper's hot path: for each event the result is ``shape_event``'s entry, but written as
        its encoded ``EntryAdapter`` (``sinks._loki_proto.PushBuffer``); labels, tenant and the
        memoized metadata are encoded once per stream, and no ``LokiEntry`` is built while the memo
        holds. ``EncodedBatch.encode_protobuf`` then gives the body ``encode_push_protobuf`` gives
        for the shaped entries, byte for byte.

        Args:
            tag: the Forward tag of every event.
            events: ``(time_ns, record, metadata, group)`` tuples, as ``reader.events_of`` returns.
            find_trace: ``(record, metadata) -> TraceContext | None`` (``ids.extract_trace_context``).
            into: where the encoded entries go, per tenant.
            sources: if given, counts each event under its trace context's ``source`` (``"none"``
                when there is none).
        """
        plan = self.rules._memo
        if plan is None:
            for time_ns, record, metadata, group in events:
                trace = find_trace(record, metadata)
                if sources is not None:
                    sources[trace.source if trace is not None else "none"] += 1
                into.add(self._shape_fully(time_ns, record, _roots(tag, record, metadata, group, trace)))
            return
        rules = self.rules
        memo = self._memo
        memo_key = plan.key
        only_fields = plan.only_fields
        field_a, field_b = only_fields or (None, None)
        last_value: Any = _UNSET
        last_other: Any = _UNSET
        last_group: Any = _UNSET
        last_metadata: Any = _UNSET
        shape_fully = self._shape_fully
        line_bytes = self._line_bytes
        auto = rules.line_format is LineFormat.AUTO
        envelope = rules.envelope_keys
        limit = rules.max_line_bytes
        varints = _VARINT
        slots = plan.trace_slots
        # The usual slots, trace_id then span_id: their ids are 32 and 16 bytes, so the fields'
        # prefixes are constants. Any other shape of slot or value takes _trace_fields.
        pair = len(slots) == 2 and slots[0][1] == _TRACE_ID and slots[1][1] == _SPAN_ID
        trace_prefix = _metadata_prefix(slots[0][0], 32) if pair else b""
        span_prefix = _metadata_prefix(slots[1][0], 16) if pair else b""
        both_len = len(trace_prefix) + 32 + len(span_prefix) + 16
        trace_only_cost = len(slots[0][0].encode()) + 32 if pair else 0
        both_cost = trace_only_cost + len(slots[1][0].encode()) + 16 if pair else 0
        last_key: Any = _UNSET
        stream = _NO_STREAM
        encoded_metadata = b""
        metadata_len = metadata_cost = 0
        append: Callable[[EncodedEntry], None] = _no_append
        traced_ok = False
        last_keys: tuple[Any, ...] | None = None
        message_key: Any = _UNSET
        second_start = 0
        seconds_field = b""
        ts_head = b"\x0a\x06\x10"  # for nanos of 28 bits or more: the field up to their 5 bytes
        for time_ns, record, metadata, group in events:
            trace = find_trace(record, metadata)
            if sources is not None:
                sources[trace.source if trace is not None else "none"] += 1
            # The memo key, unless the one field it reads is the record before's object (records of
            # one container share their decoded `kubernetes` map: protocol.decode_frame).
            if only_fields is None:
                same = False
            else:
                value = record.get(field_a)
                other = record.get(field_b)
                same = (
                    value is last_value
                    and other is last_other
                    and group is last_group
                    and metadata == last_metadata
                    and last_key is not _UNSET
                )
                last_value = value
                last_other = other
                last_group = group
                last_metadata = metadata
            if not same and (key := memo_key(record, metadata, group, tag)) != last_key:
                if key != memo.key and not self._remember(plan, key, record, metadata, group, tag):
                    last_key = _UNSET
                    into.add(shape_fully(time_ns, record, _roots(tag, record, metadata, group, trace)))
                    continue
                last_key = memo.key
                stream = memo.stream or _NO_STREAM  # _remember sets it
                encoded_metadata = memo.encoded_metadata
                metadata_len = len(encoded_metadata)
                metadata_cost = memo.metadata_bytes
                append = into.entries_of(memo.tenant).append
                traced_ok = memo.metadata_bytes + plan.trace_bytes <= MAX_STRUCTURED_METADATA_BYTES
            if trace is not None and not traced_ok:
                into.add(shape_fully(time_ns, record, _roots(tag, record, metadata, group, trace)))
                continue

            # The line: Shaper._line_bytes, with the usual case inlined (AUTO, and the payload is one
            # text). Records of a stream have the same keys: the payload's key is found once per run.
            line = None
            if auto:
                keys = tuple(record)
                if keys != last_keys:
                    last_keys = keys
                    message_key = _UNSET
                    rest = record.keys() - envelope
                    if len(rest) == 1:
                        (only,) = rest
                        if only in _MESSAGE_KEY_SET:
                            message_key = only
                if message_key is not _UNSET:
                    text = record[message_key]
                    if type(text) is str:
                        if text[-1:] == "\n":
                            text = text[:-2] if text[-2:] == "\r\n" else text[:-1]
                        if text.isascii() and len(text) <= limit:
                            line = text.encode()
                        else:
                            line = self._bound_utf8_bytes(clean_text(text).encode("utf-8"))
            if line is None:
                line = line_bytes(record)
            line_len = len(line)
            line_len_bytes = varints[line_len] if line_len < _VARINT_GROUP else _varint(line_len)

            # EntryAdapter field 1, as encode_push_protobuf writes it.
            nanos = time_ns - second_start
            if not 0 <= nanos < _NS_PER_S:
                seconds, nanos = divmod(time_ns, _NS_PER_S)  # floor: nanos in [0, 1e9)
                second_start = time_ns - nanos
                # int64 seconds: a negative value is its 64-bit two's complement.
                seconds_field = b"\x08" + _varint(seconds & _UINT64_MASK) if seconds else b""
                ts_head = b"\x0a" + varints[len(seconds_field) + 6] + seconds_field + b"\x10"
            if nanos >= _NANOS_3_GROUPS:  # most nanos need 28 bits or more: five bytes
                ts_field = (
                    ts_head
                    + _VARINT_LOW[nanos & _GROUP_MASK]
                    + _VARINT_LOW[(nanos >> _GROUP_BITS) & _GROUP_MASK]
                    + varints[nanos >> (2 * _GROUP_BITS)]
                )
            else:
                ts_body = seconds_field + b"\x10" + _varint(nanos) if nanos else seconds_field
                ts_field = b"\x0a" + varints[len(ts_body)] + ts_body

            body_len = len(ts_field) + 1 + len(line_len_bytes) + line_len + metadata_len
            if trace is None:
                body_len_bytes = varints[body_len] if body_len < _VARINT_GROUP else _varint(body_len)
                data = b"".join(
                    (b"\x12", body_len_bytes, ts_field, b"\x12", line_len_bytes, line, encoded_metadata)
                )
                append((stream, time_ns, data, line_len + metadata_cost))
                continue
            span_id = trace.span_id
            try:
                trace_b = trace.trace_id.encode()
                span_b = span_id.encode() if span_id is not None else b""
            except (AttributeError, UnicodeEncodeError):  # not what fluentforward.ids makes
                trace_b = span_b = b""
            if pair and len(trace_b) == 32 and len(span_b) == 16:
                body_len += both_len
                body_len_bytes = varints[body_len] if body_len < _VARINT_GROUP else _varint(body_len)
                data = b"".join(
                    (
                        b"\x12",
                        body_len_bytes,
                        ts_field,
                        b"\x12",
                        line_len_bytes,
                        line,
                        trace_prefix,
                        trace_b,
                        span_prefix,
                        span_b,
                        encoded_metadata,
                    )
                )
                append((stream, time_ns, data, line_len + both_cost + metadata_cost))
                continue
            if pair and len(trace_b) == 32 and span_id is None:
                found = trace_prefix + trace_b
                cost = trace_only_cost
            else:
                found, cost = _trace_fields(slots, trace)
            body_len += len(found)
            body_len_bytes = varints[body_len] if body_len < _VARINT_GROUP else _varint(body_len)
            data = b"".join(
                (b"\x12", body_len_bytes, ts_field, b"\x12", line_len_bytes, line, found, encoded_metadata)
            )
            append((stream, time_ns, data, line_len + cost + metadata_cost))

    def _remember(
        self,
        plan: _MemoPlan,
        key: tuple[Any, ...],
        record: dict[Any, Any],
        metadata: dict[Any, Any],
        group: dict[Any, Any] | None,
        tag: str,
    ) -> bool:
        """Compute and keep the per-stream fields for ``key``; False if it must not be memoized."""
        memo = self._memo
        memo.key = _UNSET
        if not _is_plain(key):
            return False
        try:
            labels, metadata_pairs, tenant = plan.fields(*_roots(tag, record, metadata, group, None))
        except _RendersContainerError:
            return False
        memo.labels = tuple(labels) if labels else (FALLBACK_LABEL,)
        memo.metadata = tuple(metadata_pairs)
        memo.metadata_bytes = sum(len(n.encode()) + len(v.encode()) for n, v in metadata_pairs)
        memo.tenant = None if tenant is None else (_clean_tenant(tenant) or None)
        memo.stream = stream_of(memo.labels)
        memo.encoded_metadata = b"".join([metadata_field(n, v) for n, v in memo.metadata])
        memo.key = key
        return True

    def _shape_fully(self, time_ns: int, record: dict[Any, Any], roots: tuple[Any, ...]) -> LokiEntry:
        """Evaluate every template for this record (``roots``: see ``_roots``)."""
        labels, metadata_pairs, tenant = self.rules._fields(*roots)
        if tenant is not None:
            tenant = _clean_tenant(tenant) or None
        return LokiEntry(
            tuple(labels) if labels else (FALLBACK_LABEL,),
            time_ns,
            self._line(record),
            tuple(metadata_pairs),
            tenant,
        )

    def _line_source(self, record: dict[Any, Any]) -> str | bytes:
        """The line before the length bound: text (a message, logfmt) or compact JSON bytes."""
        rules = self.rules
        fmt = rules.line_format
        envelope = rules.envelope_keys
        if fmt is LineFormat.AUTO:
            text = None
            for key, value in record.items():
                if key in envelope:
                    continue
                if text is not None or key not in _MESSAGE_KEY_SET:
                    text = None
                    break
                text = _message_text(value)
                if text is None:
                    break
            if text is not None:
                return text
        elif fmt is LineFormat.RAW:
            for key in _MESSAGE_KEYS:
                text = _message_text(record.get(key))
                if text is not None:
                    return text
        payload = {k: v for k, v in record.items() if k not in envelope}
        if fmt is LineFormat.KEY_VALUE:
            return _kv_line(payload)
        return _json_bytes(payload)

    def _line(self, record: dict[Any, Any]) -> str:
        line = self._line_source(record)
        return self._bound_text(line) if isinstance(line, str) else self._bound_utf8(line)

    def _line_bytes(self, record: dict[Any, Any]) -> bytes:
        """``_line(record)`` as UTF-8."""
        line = self._line_source(record)
        if isinstance(line, str):
            if line.isascii() and len(line) <= self.rules.max_line_bytes:
                return line.encode()
            line = clean_text(line).encode("utf-8")
        return self._bound_utf8_bytes(line)

    def _bound_text(self, text: str) -> str:
        if text.isascii() and len(text) <= self.rules.max_line_bytes:
            return text
        return self._bound_utf8(clean_text(text).encode("utf-8"))

    def _bound_utf8(self, data: bytes) -> str:
        """Decode valid UTF-8 ``data``, cut and marked when it is over the line bound."""
        limit = self.rules.max_line_bytes
        if len(data) <= limit:
            return data.decode("utf-8")
        head = data[: limit - len(LINE_TRUNCATION_MARKER)]
        return head.decode("utf-8", "ignore") + LINE_TRUNCATION_MARKER

    def _bound_utf8_bytes(self, data: bytes) -> bytes:
        """``_bound_utf8(data)`` as UTF-8."""
        if len(data) <= self.rules.max_line_bytes:
            return data
        return self._bound_utf8(data).encode("utf-8")
