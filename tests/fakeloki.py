"""A strict fake Grafana Loki push endpoint for tests.

A real HTTP server on 127.0.0.1 (threaded stdlib ``http.server``, port 0) that decodes push
requests the way Loki 3.4 does (LOKI.md A1, A2, A6) with its **own** decoders: nothing here
imports fluentforward's encoder, so a round trip through this fake checks the encoder against an
independent reading of the wire format.

Usable in-process from trio tests (the server runs in its own thread) and from tests that run
fluentforward as a subprocess (point it at ``loki.url``)::

    with FakeLoki(auth_enabled=True) as loki:
        loki.script(Reply(status=429, body="slow down"))    # next request gets a 429
        ... push to loki.url ...
        assert loki.query(trace_id="4bf9...")                # what Loki would have stored

What it enforces, as Loki does:
- No Content-Type: 400 ``mime: no media type``. ``application/json``: JSON (Content-Encoding gzip,
  deflate (raw), snappy (a no-op) or none; anything else is a 400). Any other type: snappy
  **block** compressed protobuf (``400 snappy: corrupt input`` otherwise).
- JSON: timestamps must be strings of integer nanoseconds, structured metadata string-valued,
  no lone surrogates anywhere; ``{"streams": []}`` is a 422.
- Missing X-Scope-OrgID with ``auth_enabled``: 401 ``no org id`` (without it, the tenant is
  ``fake``).
- Per stream: labels parse as a selector (Prometheus lexer rules), at most 15, valid names,
  names <= 1024 and values <= 2048 bytes; empty values are dropped as Loki does. Per entry: line
  <= 256 KiB, at most 128 metadata pairs of <= 64 KiB, timestamp within [now - 1 week,
  now + 10 min] and not more than 1 h behind the newest entry of its stream.
- A 400 is a partial success: valid entries are stored, the rejected ones are named in the one
  line of text/plain. Identical (stream, timestamp, line) entries are stored once.
- A request over the burst (default 6 MiB of line + metadata bytes) is a 429, every time, and
  stores nothing. Success is 204 with no body.

Stricter than Loki (our encoder must never do these): invalid UTF-8 in a protobuf string, the
query-only ``parsed`` field, a metric name before the selector's ``{``.
The fake stores labels as sent (no ``service_name``, no ``detected_level``); like Loki, it
rewrites characters other than ``[A-Za-z0-9_]`` in structured-metadata names to ``_``.
"""

from __future__ import annotations

import contextlib
import gzip
import http.server
import json
import re
import socket
import ssl
import sys
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Self

import attrs
import cramjam

__all__ = [
    "DecodedEntry",
    "DecodedStream",
    "FakeLimits",
    "FakeLoki",
    "Hangup",
    "LabelError",
    "PushError",
    "RecordedRequest",
    "Reply",
    "Stall",
    "StoredEntry",
    "decode_push_json",
    "decode_push_protobuf",
    "parse_selector",
]

NS = 1_000_000_000
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


@attrs.frozen(kw_only=True)
class FakeLimits:
    """Loki's defaults (LOKI.md A2); override to test edges cheaply."""

    max_label_names_per_series: int = 15
    max_label_name_length: int = 1024
    max_label_value_length: int = 2048
    max_line_size: int = 256 * 1024
    max_structured_metadata_entries: int = 128
    max_structured_metadata_size: int = 64 * 1024
    reject_old_samples_max_age_ns: int = 7 * 24 * 3600 * NS
    creation_grace_period_ns: int = 10 * 60 * NS
    out_of_order_window_ns: int = 3600 * NS  # max_chunk_age (2 h) / 2
    burst_bytes: int = 6 << 20  # ingestion_burst_size_mb
    max_body_bytes: int = 100 << 20  # max_recv_msg_size


class PushError(Exception):
    """The whole request is refused with ``status`` (not a partial success)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class LabelError(ValueError):
    """A stream's labels cannot be parsed or are invalid."""


@attrs.frozen
class DecodedEntry:
    ts_ns: int
    line: str
    structured_metadata: tuple[tuple[str, str], ...] = ()


@attrs.frozen
class DecodedStream:
    """One stream of a push request, as decoded; labels are selector text (protobuf) or pairs (JSON)."""

    labels: str | tuple[tuple[str, str], ...]
    entries: tuple[DecodedEntry, ...]


@attrs.frozen
class StoredEntry:
    tenant: str
    labels: dict[str, str]
    ts_ns: int
    line: str
    structured_metadata: dict[str, str]


# ------------------------------------------------------------------------------------------------
# Protobuf: a generic wire-format reader, then logproto.PushRequest on top.


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise PushError(400, "proto: unexpected EOF")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            if result >> 64:
                raise PushError(400, "proto: integer overflow")
            return result, pos
        shift += 7
        if shift >= 70:
            raise PushError(400, "proto: integer overflow")


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise PushError(400, "proto: illegal tag 0")
        value: int | bytes
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise PushError(400, "proto: unexpected EOF")
            value, pos = buf[pos : pos + size], pos + size
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            if pos + width > len(buf):
                raise PushError(400, "proto: unexpected EOF")
            value, pos = int.from_bytes(buf[pos : pos + width], "little"), pos + width
        else:
            raise PushError(400, f"proto: illegal wireType {wire}")
        yield number, wire, value


def _expect(number: int, wire: int, value: int | bytes, want: int) -> Any:
    if wire != want:
        raise PushError(400, f"proto: wrong wireType = {wire} for field {number}")
    return value


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PushError(400, f"proto: invalid UTF-8 in a string: {exc}") from exc


def _label_pair(buf: bytes) -> tuple[str, str]:
    name = value = ""
    for number, wire, v in _fields(buf):
        if number == 1:
            name = _text(_expect(number, wire, v, 2))
        elif number == 2:
            value = _text(_expect(number, wire, v, 2))
    return name, value


def _timestamp(buf: bytes) -> int:
    seconds = nanos = 0
    for number, wire, v in _fields(buf):
        if number == 1:
            seconds = _expect(number, wire, v, 0)
            if seconds >= 1 << 63:  # int64 two's complement
                seconds -= 1 << 64
        elif number == 2:
            nanos = _expect(number, wire, v, 0)
    if not 0 <= nanos < NS:
        raise PushError(400, f"timestamp: nanos not in [0, 1e9): {nanos}")
    return seconds * NS + nanos


def _entry(buf: bytes) -> DecodedEntry:
    ts_ns, line, metadata = 0, "", []
    for number, wire, v in _fields(buf):
        if number == 1:
            ts_ns = _timestamp(_expect(number, wire, v, 2))
        elif number == 2:
            line = _text(_expect(number, wire, v, 2))
        elif number == 3:
            metadata.append(_label_pair(_expect(number, wire, v, 2)))
        elif number == 4:
            raise PushError(400, "EntryAdapter.parsed is for queries; clients must not send it")
    return DecodedEntry(ts_ns=ts_ns, line=line, structured_metadata=tuple(metadata))


def _stream(buf: bytes) -> DecodedStream:
    labels, entries = "", []
    for number, wire, v in _fields(buf):
        if number == 1:
            labels = _text(_expect(number, wire, v, 2))
        elif number == 2:
            entries.append(_entry(_expect(number, wire, v, 2)))
        elif number == 3:
            _expect(number, wire, v, 0)
    return DecodedStream(labels=labels, entries=tuple(entries))


def decode_push_protobuf(body: bytes) -> list[DecodedStream]:
    """Decode a snappy-block ``logproto.PushRequest`` body.

    Raises:
        PushError: 400 with Loki's message (``snappy: corrupt input``) or a proto error.
    """
    try:
        raw = bytes(cramjam.snappy.decompress_raw(body))
    except Exception as exc:  # cramjam.DecompressionError; Loki only says this much
        raise PushError(400, "snappy: corrupt input") from exc
    streams = []
    for number, wire, v in _fields(raw):
        if number == 1:
            streams.append(_stream(_expect(number, wire, v, 2)))
        elif number == 2:
            _text(_expect(number, wire, v, 2))
    return streams


# ------------------------------------------------------------------------------------------------
# JSON, as pkg/loghttp decodes it.

_SURROGATE = re.compile("[\ud800-\udfff]")
_INT = re.compile(r"[+-]?[0-9]+")


def _json_text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise PushError(400, f"loghttp: {what} must be a string, got {type(value).__name__}")
    if _SURROGATE.search(value):
        raise PushError(400, f"loghttp: {what}: invalid Unicode (lone surrogate)")
    return value


def _json_metadata(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise PushError(400, "loghttp: structured metadata must be an object")
    pairs: list[tuple[str, str]] = []
    for key, item in value.items():
        name = _json_text(key, "structured metadata name")
        if isinstance(item, dict) and name == "structuredMetadata":  # the query-response shape
            pairs.extend(_json_metadata(item))
        elif isinstance(item, dict) and name == "parsed":
            raise PushError(400, "loghttp: 'parsed' is for queries; clients must not send it")
        else:
            pairs.append((name, _json_text(item, f"structured metadata {name!r}")))
    return tuple(pairs)


def _json_entry(value: Any) -> DecodedEntry:
    if not isinstance(value, list) or len(value) not in (2, 3):
        raise PushError(400, "loghttp: an entry must be [ts, line] or [ts, line, metadata]")
    ts = value[0]
    if not isinstance(ts, str):
        raise PushError(400, "loghttp: timestamp must be a string of nanoseconds, not a number")
    if not _INT.fullmatch(ts) or not _INT64_MIN <= int(ts) <= _INT64_MAX:
        raise PushError(400, f"loghttp: cannot parse timestamp {ts!r}")
    line = _json_text(value[1], "log line")
    metadata = _json_metadata(value[2]) if len(value) == 3 else ()
    return DecodedEntry(ts_ns=int(ts), line=line, structured_metadata=metadata)


def _reject_constant(name: str) -> Any:
    raise PushError(400, f"loghttp: invalid JSON value {name}")


def _or_empty(value: Any, empty: Any) -> Any:
    return empty if value is None else value  # Go decodes a missing field or null as empty


def decode_push_json(body: bytes) -> list[DecodedStream]:
    """Decode an (already decompressed) JSON push body.

    Raises:
        PushError: 400 for malformed JSON, a numeric timestamp, non-string metadata or a lone
            surrogate.
    """
    try:
        doc = json.loads(body, parse_constant=_reject_constant)
    except ValueError as exc:
        raise PushError(400, f"loghttp: malformed JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise PushError(400, "loghttp: the body must be an object")
    raw_streams = _or_empty(doc.get("streams"), [])
    if not isinstance(raw_streams, list):
        raise PushError(400, "loghttp: streams must be an array")
    streams = []
    for raw in raw_streams:
        if not isinstance(raw, dict):
            raise PushError(400, "loghttp: a stream must be an object")
        labels = _or_empty(raw.get("stream"), {})
        values = _or_empty(raw.get("values"), [])
        if not isinstance(labels, dict) or not isinstance(values, list):
            raise PushError(400, "loghttp: stream must be an object and values an array")
        pairs = tuple((_json_text(k, "label name"), _json_text(v, "label value")) for k, v in labels.items())
        streams.append(DecodedStream(labels=pairs, entries=tuple(_json_entry(v) for v in values)))
    return streams


# ------------------------------------------------------------------------------------------------
# Selectors, as Prometheus' lexer (promql/parser/lex.go) and strutil.Unquote read them.

_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_SPACE = " \t\n\r"
_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}
_HEX_ESCAPE_DIGITS = {"x": 2, "u": 4, "U": 8}
_HEX = frozenset("0123456789abcdefABCDEF")
_OCTAL = frozenset("01234567")


def _byte_escape(code: int, chunk: str) -> str:
    # Go's Unquote turns \xNN and \NNN into one raw byte: above 0x7f that is invalid UTF-8 in a
    # label value (and the lexer refuses octal above 255).
    if code > 0x7F:
        raise LabelError(f"escape {chunk!r} is a raw byte >= 0x80")
    return chr(code)


def _quoted(text: str, pos: int) -> tuple[str, int]:
    """Read the string literal at text[pos] (its opening quote); return (value, position after)."""
    quote = text[pos]
    pos += 1
    out: list[str] = []
    while True:
        if pos >= len(text):
            raise LabelError("unterminated quoted string")
        char = text[pos]
        pos += 1
        if char == "\ufffd":
            raise LabelError("invalid UTF-8 rune")  # the lexer cannot tell it from bad bytes
        if char == quote:
            return "".join(out), pos
        if quote == "`":
            out.append(char)
        elif char == "\n":
            raise LabelError("unterminated quoted string")
        elif char != "\\":
            out.append(char)
        else:
            if pos >= len(text):
                raise LabelError("escape sequence not terminated")
            esc = text[pos]
            pos += 1
            if esc in _SIMPLE_ESCAPES:
                out.append(_SIMPLE_ESCAPES[esc])
            elif esc == quote:
                out.append(quote)
            elif esc in _OCTAL:
                chunk = text[pos - 1 : pos + 2]
                if len(chunk) < 3 or not set(chunk) <= _OCTAL:
                    raise LabelError(f"illegal octal escape \\{chunk}")
                pos += 2
                out.append(_byte_escape(int(chunk, 8), chunk))
            elif esc in _HEX_ESCAPE_DIGITS:
                digits = _HEX_ESCAPE_DIGITS[esc]
                chunk = text[pos : pos + digits]
                if len(chunk) < digits or not set(chunk) <= _HEX:
                    raise LabelError(f"illegal escape \\{esc}{chunk}")
                pos += digits
                code = int(chunk, 16)
                if esc == "x":
                    out.append(_byte_escape(code, chunk))
                elif code > 0x10FFFF or 0xD800 <= code < 0xE000:
                    raise LabelError("escape sequence is an invalid Unicode code point")
                else:
                    out.append(chr(code))
            else:
                raise LabelError(f"unknown escape sequence \\{esc}")


def parse_selector(text: str) -> list[tuple[str, str]]:
    """Parse ``{name="value", ...}`` as Loki's ``syntax.ParseLabels`` would.

    Returns:
        The (name, value) pairs in the order written (duplicates kept; validation rejects them).

    Raises:
        LabelError: the text is not a label set.
    """
    pos, end = 0, len(text)

    def skip(p: int) -> int:
        while p < end and text[p] in _SPACE:
            p += 1
        return p

    pos = skip(pos)
    if pos >= end or text[pos] != "{":
        raise LabelError(f"expected '{{' at {pos}")
    pairs: list[tuple[str, str]] = []
    pos = skip(pos + 1)
    while pos < end and text[pos] != "}":
        match = _LABEL_NAME.match(text, pos)
        if match is None:
            raise LabelError(f"expected a label name at {pos}")
        name, pos = match.group(), skip(match.end())
        if pos >= end or text[pos] != "=" or text[pos + 1 : pos + 2] == "~":
            raise LabelError(f"expected '=' after {name!r} (a label set has no other matchers)")
        pos = skip(pos + 1)
        if pos >= end or text[pos] not in "\"'`":
            raise LabelError(f"expected a quoted value for {name!r}")
        value, pos = _quoted(text, pos)
        pairs.append((name, value))
        pos = skip(pos)
        if pos < end and text[pos] == ",":
            pos = skip(pos + 1)
        elif pos < end and text[pos] != "}":
            raise LabelError(f"expected ',' or '}}' at {pos}")
    if pos >= end:
        raise LabelError("unexpected end of input inside braces")
    if skip(pos + 1) != end:
        raise LabelError("unexpected text after '}'")
    return pairs


# ------------------------------------------------------------------------------------------------
# Validation and storage (the distributor's checks, then the ingester's).

_METADATA_NAME_INVALID = re.compile(r"[^A-Za-z0-9_]")
_TENANT = re.compile(r"[A-Za-z0-9!._*'()-]{1,150}")


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def _render(labels: Mapping[str, str]) -> str:
    return "{" + ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in labels.items()) + "}"


def _stream_labels(raw: str | tuple[tuple[str, str], ...], limits: FakeLimits) -> dict[str, str]:
    """The stream's labels after Loki's parsing and validation; LabelError names the reason."""
    if isinstance(raw, str):
        try:
            pairs = parse_selector(raw)
        except LabelError as exc:
            raise LabelError(f"invalid_labels: error parsing labels {raw!r}: {exc}") from exc
    else:
        pairs = list(raw)
    labels: dict[str, str] = {}
    for name, value in pairs:
        if not _LABEL_NAME.fullmatch(name):
            raise LabelError(f"invalid_labels: invalid label name {name!r}")
        if name in labels:
            raise LabelError(f"duplicate_label_names: {name!r}")
        if value:  # Loki's label builder drops empty values
            labels[name] = value
    if not labels:
        raise LabelError("missing_labels: at least one label pair is required per stream")
    if len(labels) > limits.max_label_names_per_series:
        raise LabelError(f"max_label_names_per_series: {len(labels)} > {limits.max_label_names_per_series}")
    for name, value in labels.items():
        if _utf8_len(name) > limits.max_label_name_length:
            raise LabelError(f"label_name_too_long: {name[:64]!r}...")
        if _utf8_len(value) > limits.max_label_value_length:
            raise LabelError(f"label_value_too_long: {name}={value[:64]!r}...")
    return dict(sorted(labels.items()))


def _entry_problem(entry: DecodedEntry, now_ns: int, limits: FakeLimits) -> str | None:
    if entry.ts_ns < now_ns - limits.reject_old_samples_max_age_ns:
        return f"greater_than_max_sample_age: timestamp {entry.ts_ns} is older than 1 week"
    if entry.ts_ns > now_ns + limits.creation_grace_period_ns:
        return f"too_far_in_future: timestamp {entry.ts_ns} is more than 10m ahead"
    if _utf8_len(entry.line) > limits.max_line_size:
        return f"line_too_long: {_utf8_len(entry.line)} bytes > {limits.max_line_size}"
    metadata = entry.structured_metadata
    if len(metadata) > limits.max_structured_metadata_entries:
        return f"structured_metadata_too_many: {len(metadata)} > {limits.max_structured_metadata_entries}"
    size = sum(_utf8_len(k) + _utf8_len(v) for k, v in metadata)
    if size > limits.max_structured_metadata_size:
        return f"structured_metadata_too_large: {size} bytes > {limits.max_structured_metadata_size}"
    return None


def _entry_bytes(entry: DecodedEntry) -> int:
    return _utf8_len(entry.line) + sum(_utf8_len(k) + _utf8_len(v) for k, v in entry.structured_metadata)


@attrs.define
class _Store:
    """Stored entries per tenant, with Loki's per-stream newest timestamp and de-duplication."""

    entries: dict[str, list[StoredEntry]] = attrs.Factory(dict)
    newest: dict[tuple[str, tuple[tuple[str, str], ...]], int] = attrs.Factory(dict)
    seen: set[tuple[str, tuple[tuple[str, str], ...], int, str]] = attrs.Factory(set)

    def push(self, tenant: str, streams: list[DecodedStream], now_ns: int, limits: FakeLimits) -> str | None:
        """Validate and store; return the one-line error text of a partial success, or None.

        Raises:
            PushError: 429 when the request is over the burst (nothing stored).
        """
        problems: list[str] = []
        accepted: list[tuple[dict[str, str], DecodedEntry]] = []
        total = 0
        for stream in streams:
            total += len(stream.entries)
            try:
                labels = _stream_labels(stream.labels, limits)
            except LabelError as exc:
                shown = stream.labels if isinstance(stream.labels, str) else _render(dict(stream.labels))
                problems.append(f"stream {shown!r}: {exc} ({len(stream.entries)} entries)")
                continue
            for entry in stream.entries:
                problem = _entry_problem(entry, now_ns, limits)
                if problem is None:
                    accepted.append((labels, entry))
                else:
                    problems.append(f"entry for stream '{_render(labels)}' {problem}")
        size = sum(_entry_bytes(e) for _, e in accepted)
        if size > limits.burst_bytes:
            raise PushError(
                429,
                f"Ingestion rate limit exceeded for user {tenant} (limit: {limits.burst_bytes} bytes/sec) "
                f"while attempting to ingest '{len(accepted)}' lines totaling '{size}' bytes, reduce log "
                "volume or contact your Loki administrator to see if the limit can be increased",
            )
        stored = self.entries.setdefault(tenant, [])
        for labels, entry in accepted:
            key = tuple(labels.items())
            newest = self.newest.get((tenant, key))
            if newest is not None and entry.ts_ns < newest - limits.out_of_order_window_ns:
                problems.append(
                    f"entry for stream '{_render(labels)}' too_far_behind: timestamp {entry.ts_ns} is more "
                    f"than 1h behind the newest entry {newest}"
                )
                continue
            self.newest[(tenant, key)] = entry.ts_ns if newest is None else max(newest, entry.ts_ns)
            identity = (tenant, key, entry.ts_ns, entry.line)
            if identity in self.seen:
                continue
            self.seen.add(identity)
            metadata = {_METADATA_NAME_INVALID.sub("_", k): v for k, v in entry.structured_metadata}
            stored.append(
                StoredEntry(
                    tenant=tenant,
                    labels=labels,
                    ts_ns=entry.ts_ns,
                    line=entry.line,
                    structured_metadata=metadata,
                )
            )
        if not problems:
            return None
        return "; ".join(problems) + f", total ignored: {len(problems)} out of {total}"


# ------------------------------------------------------------------------------------------------
# Scripted behaviour and the record of requests.


@attrs.frozen
class Reply:
    """Answer the next request with this status and text, without storing anything."""

    status: int
    body: str = ""


@attrs.frozen
class Hangup:
    """Read the next request, then close the connection without answering."""


@attrs.frozen
class Stall:
    """Wait this long before handling the next request normally (a slow Loki)."""

    seconds: float


Action = Reply | Hangup | Stall


@attrs.frozen
class RecordedRequest:
    """One request as the fake saw it, and what it answered (status None: hung up)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    tenant: str | None
    status: int | None
    response: str
    streams: list[DecodedStream] | None


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    if encoding in ("", "snappy"):  # Loki: "snappy" is a no-op (see #3407)
        return body
    try:
        if encoding == "gzip":
            out = gzip.decompress(body)
        elif encoding == "deflate":
            out = zlib.decompress(body, wbits=-15)  # Go's compress/flate: raw deflate
        else:
            raise PushError(400, f"Content-Encoding {encoding!r} not supported")
    except (OSError, EOFError, zlib.error) as exc:
        raise PushError(400, f"{encoding}: {exc}") from exc
    if len(out) > limit:
        raise PushError(413, "request_body_too_large: decompressed body over the limit")
    return out


# ------------------------------------------------------------------------------------------------
# The server.


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.loki._connections.add(self.request)

    def finish(self) -> None:
        self.server.loki._connections.discard(self.request)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # quiet: tests assert on the record, not on stderr

    def do_GET(self) -> None:
        if self.path == "/ready":
            self._answer(200, "ready")
        else:
            self._answer(404, "404 page not found")

    def do_POST(self) -> None:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._answer(411, "length required")
            return
        body = self.rfile.read(int(length))
        status, text = self.server.loki._handle(self.command, self.path, dict(self.headers.items()), body)
        if status is None:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._answer(status, text)

    def _answer(self, status: int, text: str) -> None:
        try:
            self.send_response(status)
            if status == 204:
                self.end_headers()
            else:
                data = (text + "\n").encode()
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            self.close_connection = True  # the client gave up (timeout): nothing to do


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a stalled handler must not hold up stop()
    allow_reuse_address = True
    loki: FakeLoki

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # connection resets from clients that time out are expected


class FakeLoki:
    """A strict fake Loki push endpoint running in a background thread.

    Args:
        auth_enabled: require X-Scope-OrgID (401 ``no org id`` otherwise); off, every request
            goes to tenant ``fake``, as with Loki's ``auth_enabled: false``.
        limits: Loki's limits (defaults as Loki 3.4).
        now_ns: the clock used for the age checks.
        ssl_context: serve HTTPS with this server-side context (e.g. from ``trustme``).
    """

    def __init__(
        self,
        *,
        auth_enabled: bool = False,
        limits: FakeLimits | None = None,
        now_ns: Callable[[], int] = time.time_ns,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.auth_enabled = auth_enabled
        self.ssl_context = ssl_context
        self.limits = limits or FakeLimits()
        self.now_ns = now_ns
        self.responder: Callable[[RecordedRequest], Action | None] | None = None
        self._lock = threading.Lock()
        self._store = _Store()
        self._script: deque[Action] = deque()
        self._requests: list[RecordedRequest] = []
        self._connections: set[socket.socket] = set()
        self._wake = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._port = 0

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> Self:
        """Start serving (port 0 the first time, the same port after ``set_down(False)``)."""
        server = _Server(("127.0.0.1", self._port), _Handler)
        server.loki = self
        if self.ssl_context is not None:
            # The handshake happens on the first read, in the handler thread, not in accept().
            server.socket = self.ssl_context.wrap_socket(
                server.socket, server_side=True, do_handshake_on_connect=False
            )
        self._port = server.server_address[1]
        self._wake.clear()
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and drop every open connection (clients then see connection errors)."""
        server, self._server = self._server, None
        if server is None:
            return
        self._wake.set()
        server.shutdown()
        server.server_close()
        for conn in list(self._connections):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def set_down(self, down: bool) -> None:
        """Make the port refuse connections (down) or listen again on the same port."""
        if down:
            self.stop()
        elif self._server is None:
            self.start()

    @contextlib.contextmanager
    def down(self) -> Iterator[None]:
        """Refuse connections inside the block."""
        self.set_down(True)
        try:
            yield
        finally:
            self.set_down(False)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The base URL (``http://127.0.0.1:<port>``)."""
        scheme = "http" if self.ssl_context is None else "https"
        return f"{scheme}://127.0.0.1:{self._port}"

    @property
    def push_url(self) -> str:
        return self.url + "/loki/api/v1/push"

    # -- scripting and assertions -----------------------------------------------------------------

    def script(self, *actions: Action) -> None:
        """Queue actions; each request consumes one before normal handling."""
        with self._lock:
            self._script.extend(actions)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def entries(self, tenant: str | None = None) -> list[StoredEntry]:
        """Stored entries of one tenant (all tenants when None), in storage order."""
        with self._lock:
            if tenant is not None:
                return list(self._store.entries.get(tenant, []))
            return [e for stored in self._store.entries.values() for e in stored]

    def query(
        self, *, trace_id: str | None = None, tenant: str | None = None, **labels: str
    ) -> list[StoredEntry]:
        """Entries matching the labels and, if given, structured metadata ``trace_id``, by time."""
        found = [
            e
            for e in self.entries(tenant)
            if all(e.labels.get(k) == v for k, v in labels.items())
            and (trace_id is None or e.structured_metadata.get("trace_id") == trace_id)
        ]
        return sorted(found, key=lambda e: e.ts_ns)

    def reset(self) -> None:
        """Forget stored entries, the request record and the script."""
        with self._lock:
            self._store = _Store()
            self._requests.clear()
            self._script.clear()

    # -- request handling (handler threads) -------------------------------------------------------

    def _handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int | None, str]:
        lower = {k.lower(): v for k, v in headers.items()}
        tenant = lower.get("x-scope-orgid")
        record = RecordedRequest(
            method=method,
            path=path,
            headers=lower,
            body=body,
            tenant=tenant,
            status=None,
            response="",
            streams=None,
        )
        with self._lock:
            action = self._script.popleft() if self._script else None
        if action is None and self.responder is not None:
            action = self.responder(record)
        if isinstance(action, Stall):
            self._wake.wait(action.seconds)
            action = None
        streams: list[DecodedStream] | None = None
        status: int | None
        if isinstance(action, Hangup):
            status, text = None, ""
        elif isinstance(action, Reply):
            status, text = action.status, action.body
        elif path != "/loki/api/v1/push":
            status, text = 404, "404 page not found"
        else:
            try:
                tenant, streams = self._decode(lower, body)
                with self._lock:
                    problems = self._store.push(tenant, streams, self.now_ns(), self.limits)
                status, text = (204, "") if problems is None else (400, problems)
            except PushError as exc:
                status, text = exc.status, exc.message
        record = attrs.evolve(record, tenant=tenant, status=status, response=text, streams=streams)
        with self._lock:
            self._requests.append(record)
        return status, text

    def _decode(self, headers: dict[str, str], body: bytes) -> tuple[str, list[DecodedStream]]:
        tenant = headers.get("x-scope-orgid")
        if not self.auth_enabled:
            tenant = "fake"
        elif tenant is None:
            raise PushError(401, "no org id")
        elif not _TENANT.fullmatch(tenant):
            raise PushError(401, f"tenant ID {tenant!r} is invalid")
        if len(body) > self.limits.max_body_bytes:
            raise PushError(413, "request_body_too_large")
        content_type = headers.get("content-type", "")
        media = content_type.split(";", 1)[0].strip().lower()
        if not media:
            raise PushError(400, "mime: no media type")
        if "/" not in media:
            raise PushError(400, "mime: expected slash after first token")
        data = _decompress(body, headers.get("content-encoding", ""), self.limits.max_body_bytes)
        streams = decode_push_json(data) if media == "application/json" else decode_push_protobuf(data)
        if not streams:
            raise PushError(422, "push request has no streams")
        return tenant, streams


def main() -> None:
    """Run a fake Loki in the foreground: ``python -m tests.fakeloki [--auth]``."""
    with FakeLoki(auth_enabled="--auth" in sys.argv) as loki:
        print(loki.url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
