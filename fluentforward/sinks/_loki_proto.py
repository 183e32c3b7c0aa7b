"""The Loki push protocol without I/O: wire encoders, batching and the retry policy.

This is the pure half of the Loki sink (``fluentforward.sinks.loki`` is the I/O adapter and
re-exports everything public here). It imports neither trio, httpx nor structlog, and touches
neither the network, the clock nor a random source on its own: time and randomness are arguments,
so tests compare bytes and delays exactly.

Invariants:
- ``encode_push_protobuf`` writes a ``logproto.PushRequest`` by hand (``pkg/push/push.proto``) and
  compresses it with snappy **block** format, which is what Loki's ``util.RawSnappy`` reads; the
  framed format would be rejected.
- Entries are grouped into one stream per label set; within a stream they are sorted by time, so
  Loki's 1 h out-of-order window (measured from the newest entry it has seen) is never tripped by
  our own ordering.
- Stream labels are rendered as a selector that Loki's ``syntax.ParseLabels`` (the PromQL lexer)
  accepts for any value: see ``render_selector``.
- No encoder raises on a lone surrogate: it becomes U+FFFD. ``LokiEntry`` promises valid text;
  this is the second line of defence.
- A batch holds one tenant's entries and is sized in "Loki bytes" (line + structured metadata,
  the measure of Loki's rate limiter), so a batch cap below the tenant burst (6 MB) can never be
  rate-limited for its size alone.
- Pre-encoded entries (``PushBuffer``, ``EncodedBatch``: the shipper's path) give the same batches,
  halves and request bytes as the same entries as ``LokiEntry`` values (``Batch``,
  ``encode_push_protobuf``); their ``LokiEntry`` form is decoded back from the bytes when needed.
"""

from __future__ import annotations

import bisect
import collections
import enum
import functools
import itertools
import operator
import random
import re
from collections.abc import Callable, Sequence
from typing import TypeAlias

import attrs
import cramjam
import orjson

from fluentforward.errors import SinkError, SinkRejected, SinkUnavailable
from fluentforward.sinks import LokiEntry

__all__ = [
    "DEFAULT_BATCH_WAIT_S",
    "DEFAULT_MAX_BACKOFF_S",
    "DEFAULT_MAX_BATCH_BYTES",
    "DEFAULT_MIN_BACKOFF_S",
    "AnyBatch",
    "Backoff",
    "Batch",
    "Batcher",
    "EncodedBatch",
    "EncodedEntry",
    "EncodedPush",
    "PushBuffer",
    "PushOutcome",
    "Verdict",
    "classify_status",
    "encode_push_json",
    "encode_push_protobuf",
    "entry_field",
    "entry_size",
    "metadata_field",
    "render_selector",
    "stream_of",
    "timestamp_field",
]

# Batches close at 1 MiB of line + metadata bytes, like Promtail's and Alloy's `batch_size`:
# a sixth of Loki's default tenant burst (6 MB), so one request is never 429'd for its size alone
# and a 413 (max_recv_msg_size, 100 MB) is out of reach.
DEFAULT_MAX_BATCH_BYTES = 1 << 20
# Batches also close 1 s after their first entry (Promtail's `batchwait`): bounded latency at
# low volume, full batches at high volume.
DEFAULT_BATCH_WAIT_S = 1.0
# Promtail/Alloy backoff bounds (min_backoff 500 ms, max_backoff 5 min).
DEFAULT_MIN_BACKOFF_S = 0.5
DEFAULT_MAX_BACKOFF_S = 300.0

# gzip level for the JSON body: level 1 is twice as fast as the default 6 for a few percent more
# bytes; the JSON path exists for proxies that cannot pass protobuf, not for ratio. (cramjam's gzip
# is about twice as fast as the stdlib's zlib at the same level.)
JSON_GZIP_LEVEL = 1

_NS_PER_S = 1_000_000_000
_UINT64_MASK = (1 << 64) - 1

_PROTOBUF_HEADERS = (("Content-Type", "application/x-protobuf"),)
_JSON_HEADERS = (("Content-Type", "application/json"), ("Content-Encoding", "gzip"))

_SURROGATE = re.compile("[\ud800-\udfff]")


# --------------------------------------------------------------------------------------------
# Protobuf wire encoding


def _varint_slow(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# Varints come from tables of 14-bit groups: one index for any length up to 16 KiB (tags, names,
# most lines), two or three for nanoseconds and seconds, instead of a Python loop per byte.
# The two tables cost about 1 MB of memory, once.
_GROUP_BITS = 14
_GROUP = 1 << _GROUP_BITS
_GROUP_MASK = _GROUP - 1
_VARINT = tuple(_varint_slow(i) for i in range(_GROUP))
# The same groups with the continuation bit set on both bytes: a low group of a longer varint.
_VARINT_LOW = tuple(bytes(((i & 0x7F) | 0x80, (i >> 7) | 0x80)) for i in range(_GROUP))


def _varint(value: int) -> bytes:
    if value < _GROUP:
        return _VARINT[value]
    if value < _GROUP << _GROUP_BITS:
        return _VARINT_LOW[value & _GROUP_MASK] + _VARINT[value >> _GROUP_BITS]
    if value < _GROUP << (2 * _GROUP_BITS):
        return (
            _VARINT_LOW[value & _GROUP_MASK]
            + _VARINT_LOW[(value >> _GROUP_BITS) & _GROUP_MASK]
            + _VARINT[value >> (2 * _GROUP_BITS)]
        )
    return _varint_slow(value)


# A metadata name whose (name, value) pairs missed the per-body cache this often holds per-record
# values: caching them only costs a dict insertion each.
_PAIR_MISSES = 64


def _scrub(text: str) -> str:
    # A lone surrogate cannot be encoded (and Loki refuses it in JSON); U+FFFD keeps the rest.
    return _SURROGATE.sub("\ufffd", text)


def _utf8(text: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError:
        return _scrub(text).encode()


def _metadata_prefix(name: str, value_size: int) -> bytes:
    """Field 3 of EntryAdapter, a LabelPairAdapter {string name = 1; string value = 2;}, up to
    the value bytes: they depend only on the name and the value's length."""
    name_b = _utf8(name)
    inner = b"\x0a" + _varint(len(name_b)) + name_b + b"\x12" + _varint(value_size)
    return b"\x1a" + _varint(len(inner) + value_size) + inner


# Characters that must not appear raw in a quoted PromQL string, as Loki's lexer reads it:
# `"` and `\` (syntax), newline ("unterminated quoted string"), and U+FFFD, which the lexer
# cannot tell from a decoding error ("invalid UTF-8 rune"). Other C0 controls and DEL are escaped
# too so that the selector stays printable in logs; surrogates become U+FFFD.
_SELECTOR_ESCAPES = {
    "\\": "\\\\",
    '"': '\\"',
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\ufffd": "\\ufffd",
}
_NEEDS_ESCAPE = re.compile('[\\\\"\x00-\x1f\x7f\ufffd\ud800-\udfff]')


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    escaped = _SELECTOR_ESCAPES.get(char)
    if escaped is not None:
        return escaped
    if char < "\x80":
        return f"\\x{ord(char):02x}"
    return "\\ufffd"  # a lone surrogate


def render_selector(labels: Sequence[tuple[str, str]]) -> str:
    """Render stream labels as the selector text Loki parses: ``{a="b", c="d"}``.

    Args:
        labels: (name, value) pairs; names are valid Loki label names (LokiEntry's promise).

    Returns:
        The selector, values double-quoted with Go escapes (``\\"``, ``\\\\``, ``\\n``,
        ``\\xNN``, ``\\ufffd``) so that Prometheus' lexer, which Loki uses, reads back the value.
    """
    parts = []
    for name, value in labels:
        if _NEEDS_ESCAPE.search(value) is not None:
            value = _NEEDS_ESCAPE.sub(_escape_char, value)  # noqa: PLW2901 - escaped in place
        parts.append(f'{name}="{value}"')
    return "{" + ", ".join(parts) + "}"


_TIME_NS = operator.attrgetter("time_ns")


def _group_streams(entries: Sequence[LokiEntry]) -> dict[tuple[tuple[str, str], ...], list[LokiEntry]]:
    """Group entries by label set, each group sorted by time (stable: equal times keep order)."""
    groups: dict[tuple[tuple[str, str], ...], list[LokiEntry]] = {}
    last_labels: tuple[tuple[str, str], ...] | None = None
    group: list[LokiEntry] = []
    for entry in entries:
        labels = entry.labels
        # Consecutive entries usually share one labels object: skip hashing the tuple then.
        if labels is not last_labels:
            found = groups.get(labels)
            if found is None:
                found = groups[labels] = []
            group = found
            last_labels = labels
        group.append(entry)
    for members in groups.values():
        members.sort(key=_TIME_NS)
    return groups


@attrs.frozen(kw_only=True)
class EncodedPush:
    """A push request body ready to POST.

    Attributes:
        body: the compressed request body.
        headers: the headers the body needs (Content-Type, Content-Encoding).
        entries: how many entries the body carries.
        streams: how many streams the body carries.
    """

    body: bytes
    headers: tuple[tuple[str, str], ...]
    entries: int
    streams: int


def encode_push_protobuf(entries: Sequence[LokiEntry]) -> EncodedPush:
    """Encode entries as a snappy-block-compressed ``logproto.PushRequest``.

    Args:
        entries: one tenant's entries, in any order (``tenant`` is not looked at).

    Returns:
        The body with ``Content-Type: application/x-protobuf`` (no Content-Encoding: the snappy
        block is implied by the protobuf content type).
    """
    groups = _group_streams(entries)
    out: list[bytes] = []
    extend = out.extend
    # Per-call caches: metadata pairs that repeat (pod, node) are encoded once; for unique values
    # (trace_id) the encoded prefix up to the value depends only on the name and the value length.
    pair_cache: dict[tuple[str, str], bytes] = {}
    prefix_cache: dict[tuple[str, int], bytes] = {}
    # Names whose values missed the pair cache repeatedly (trace_id, span_id) stop filling it.
    misses: dict[str, int] = collections.defaultdict(int)
    for labels, members in groups.items():
        selector = _utf8(render_selector(labels))
        stream: list[bytes] = [b"\x0a", _varint(len(selector)), selector]
        push = stream.extend
        stream_len = 1 + len(stream[1]) + len(selector)
        last_ns = last_s = None
        ts_field = seconds_field = b""
        for entry in members:
            time_ns = entry.time_ns
            if time_ns != last_ns:
                # EntryAdapter field 1: google.protobuf.Timestamp {int64 seconds=1; int32 nanos=2}.
                last_ns = time_ns
                seconds, nanos = divmod(time_ns, _NS_PER_S)  # floor: nanos in [0, 1e9)
                if seconds != last_s:
                    last_s = seconds
                    # int64 seconds: a negative value is its 64-bit two's complement.
                    seconds_field = b"\x08" + _varint(seconds & _UINT64_MASK) if seconds else b""
                if nanos >= _GROUP << _GROUP_BITS:  # most nanos need 30 bits: three groups, inlined
                    ts_body = (
                        seconds_field
                        + b"\x10"
                        + _VARINT_LOW[nanos & _GROUP_MASK]
                        + _VARINT_LOW[(nanos >> _GROUP_BITS) & _GROUP_MASK]
                        + _VARINT[nanos >> (2 * _GROUP_BITS)]
                    )
                else:
                    ts_body = seconds_field + b"\x10" + _varint(nanos) if nanos else seconds_field
                ts_field = b"\x0a" + _VARINT[len(ts_body)] + ts_body
            try:
                line = entry.line.encode()
            except UnicodeEncodeError:
                line = _utf8(entry.line)
            line_len = len(line)
            line_len_bytes = _VARINT[line_len] if line_len < _GROUP else _varint(line_len)
            body_len = len(ts_field) + 1 + len(line_len_bytes) + line_len
            if entry.structured_metadata:
                parts = [ts_field, b"\x12", line_len_bytes, line]
                for pair in entry.structured_metadata:
                    encoded = pair_cache.get(pair)
                    if encoded is None:
                        # Inlined (this runs for every unique trace_id): see _metadata_prefix.
                        try:
                            value = pair[1].encode()
                        except UnicodeEncodeError:
                            value = _utf8(pair[1])
                        name = pair[0]
                        key = (name, len(value))
                        prefix = prefix_cache.get(key)
                        if prefix is None:
                            prefix = prefix_cache[key] = _metadata_prefix(*key)
                        encoded = prefix + value
                        if misses[name] < _PAIR_MISSES:
                            misses[name] += 1
                            pair_cache[pair] = encoded
                    parts.append(encoded)
                    body_len += len(encoded)
                body_len_bytes = _VARINT[body_len] if body_len < _GROUP else _varint(body_len)
                push((b"\x12", body_len_bytes))
                push(parts)
            else:
                body_len_bytes = _varint(body_len)
                push((b"\x12", body_len_bytes, ts_field, b"\x12", line_len_bytes, line))
            stream_len += 1 + len(body_len_bytes) + body_len
        extend((b"\x0a", _varint(stream_len)))
        extend(stream)
    raw = b"".join(out)
    return EncodedPush(
        body=bytes(cramjam.snappy.compress_raw(raw)),
        headers=_PROTOBUF_HEADERS,
        entries=len(entries),
        streams=len(groups),
    )


def _json_streams(
    groups: dict[tuple[tuple[str, str], ...], list[LokiEntry]], clean: Callable[[str], str] | None
) -> list[dict[str, object]]:
    streams: list[dict[str, object]] = []
    for labels, members in groups.items():
        values: list[list[object]] = []
        if clean is None:
            for e in members:
                if e.structured_metadata:
                    values.append([str(e.time_ns), e.line, dict(e.structured_metadata)])
                else:
                    values.append([str(e.time_ns), e.line])
            stream = dict(labels)
        else:
            for e in members:
                value: list[object] = [str(e.time_ns), clean(e.line)]
                if e.structured_metadata:
                    value.append({clean(k): clean(v) for k, v in e.structured_metadata})
                values.append(value)
            stream = {clean(k): clean(v) for k, v in labels}
        streams.append({"stream": stream, "values": values})
    return streams


def encode_push_json(entries: Sequence[LokiEntry]) -> EncodedPush:
    """Encode entries as Loki's JSON push body, gzip-compressed.

    Timestamps are strings of Unix nanoseconds (a JSON number is a 400); structured metadata is
    the optional third element of each value, an object of string to string.

    Args:
        entries: one tenant's entries, in any order.

    Returns:
        The body with ``Content-Type: application/json`` and ``Content-Encoding: gzip``.
    """
    groups = _group_streams(entries)
    try:
        raw = orjson.dumps({"streams": _json_streams(groups, None)})
    except orjson.JSONEncodeError:
        # orjson refuses lone surrogates (Loki would answer 400): scrub every string and retry.
        raw = orjson.dumps({"streams": _json_streams(groups, _scrub)})
    return EncodedPush(
        body=bytes(cramjam.gzip.compress(raw, level=JSON_GZIP_LEVEL)),
        headers=_JSON_HEADERS,
        entries=len(entries),
        streams=len(groups),
    )


# --------------------------------------------------------------------------------------------
# Pre-encoded entries (the shipper's hot path)
#
# The shipper does not build a LokiEntry per record only to walk it again here: the shaper
# (``records.Shaper.encode_events``) writes each entry's ``EntryAdapter`` field straight into a
# ``PushBuffer``, next to its ``Stream`` (labels, and the selector encoded once per stream), its time
# and its ``entry_size``. A push of such entries (``EncodedBatch.encode_protobuf``) only joins bytes,
# and is byte for byte the body ``encode_push_protobuf`` makes of the same entries. The entries'
# ``LokiEntry`` form is decoded back from the bytes on the rare paths that need it (dead letters,
# a JSON sink).


class Stream:
    """A stream's labels and its encoded selector (``StreamAdapter`` field 1); see ``stream_of``.

    Attributes:
        labels: the stream's (name, value) pairs, as in ``LokiEntry.labels``.
        field: the tag, length and UTF-8 selector text (``render_selector``).
    """

    __slots__ = ("field", "labels")

    def __init__(self, labels: tuple[tuple[str, str], ...]) -> None:
        self.labels = labels
        selector = _utf8(render_selector(labels))
        self.field = b"\x0a" + _varint(len(selector)) + selector


@functools.lru_cache(maxsize=1024)
def stream_of(labels: tuple[tuple[str, str], ...]) -> Stream:
    """The ``Stream`` of a label set (cached: selectors are rendered once per label set)."""
    return Stream(labels)


# (stream, time in Unix ns, EntryAdapter field bytes (StreamAdapter field 2), entry_size).
EncodedEntry: TypeAlias = tuple[Stream, int, bytes, int]
_ITEM_STREAM = operator.itemgetter(0)
_ITEM_TIME = operator.itemgetter(1)
_ITEM_DATA = operator.itemgetter(2)
_ITEM_SIZE = operator.itemgetter(3)


def timestamp_field(time_ns: int) -> bytes:
    """EntryAdapter field 1, a ``google.protobuf.Timestamp {int64 seconds = 1; int32 nanos = 2;}``."""
    seconds, nanos = divmod(time_ns, _NS_PER_S)  # floor: nanos in [0, 1e9)
    body = b"\x08" + _varint(seconds & _UINT64_MASK) if seconds else b""
    if nanos:
        body += b"\x10" + _varint(nanos)
    return b"\x0a" + _varint(len(body)) + body


def metadata_field(name: str, value: str) -> bytes:
    """EntryAdapter field 3, one structured metadata pair (lone surrogates become U+FFFD)."""
    data = _utf8(value)
    return _metadata_prefix(name, len(data)) + data


def entry_field(entry: LokiEntry) -> bytes:
    """StreamAdapter field 2: one entry's tag, length and ``EntryAdapter`` (labels and tenant aside)."""
    line = _utf8(entry.line)
    body = b"".join(
        (
            timestamp_field(entry.time_ns),
            b"\x12",
            _varint(len(line)),
            line,
            *(metadata_field(name, value) for name, value in entry.structured_metadata),
        )
    )
    return b"\x12" + _varint(len(body)) + body


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes, pos: int, end: int) -> list[tuple[int, bytes]]:
    """(tag byte, payload) of the length-delimited fields in ``data[pos:end]`` (all ours are)."""
    out = []
    while pos < end:
        tag = data[pos]
        length, pos = _read_varint(data, pos + 1)
        out.append((tag, data[pos : pos + length]))
        pos += length
    return out


def decode_entry(entry: EncodedEntry, tenant: str | None) -> LokiEntry:
    """The ``LokiEntry`` an encoded entry was made of (the line and metadata read back from the bytes)."""
    stream, time_ns, data, _ = entry
    _, pos = _read_varint(data, 1)
    line = ""
    metadata = []
    for tag, payload in _fields(data, pos, len(data)):
        if tag == 0x12:
            line = payload.decode("utf-8")
        elif tag == 0x1A:
            pair = dict(_fields(payload, 0, len(payload)))
            metadata.append((pair.get(0x0A, b"").decode("utf-8"), pair.get(0x12, b"").decode("utf-8")))
    return LokiEntry(stream.labels, time_ns, line, tuple(metadata), tenant)


def _encode_entries(entries: Sequence[EncodedEntry]) -> EncodedPush:
    """``encode_push_protobuf`` for pre-encoded entries: the same grouping, order and bytes."""
    groups: dict[tuple[tuple[str, str], ...], list[EncodedEntry]] = {}
    # Runs of one Stream object (a Forward chunk is one container) are grouped in C.
    for stream, run in itertools.groupby(entries, _ITEM_STREAM):
        members = groups.get(stream.labels)
        if members is None:
            groups[stream.labels] = list(run)
        else:
            members.extend(run)
    out: list[bytes] = []
    for members in groups.values():
        times = list(map(_ITEM_TIME, members))
        if any(map(operator.gt, times, itertools.islice(times, 1, None))):
            members.sort(key=_ITEM_TIME)  # stable: equal times keep their order
        datas = list(map(_ITEM_DATA, members))
        field = members[0][0].field
        out += (b"\x0a", _varint(len(field) + sum(map(len, datas))), field)
        out += datas
    return EncodedPush(
        body=bytes(cramjam.snappy.compress_raw(b"".join(out))),
        headers=_PROTOBUF_HEADERS,
        entries=len(entries),
        streams=len(groups),
    )


def _halves(sizes: Sequence[int], total: int) -> tuple[int, int]:
    """Where to cut entries of these sizes in two halves by size, and the head's size."""
    count = len(sizes)
    if total == 0:
        cut = count // 2
    else:
        running = list(itertools.accumulate(sizes))
        # The first entry at which the running size reaches half goes into the head.
        cut = min(max(bisect.bisect_left(running, total / 2) + 1, 1), count - 1)
    return cut, sum(sizes[:cut])


@attrs.frozen(kw_only=True)
class EncodedBatch:
    """``Batch`` for pre-encoded entries: one push request's worth for a single tenant.

    Attributes:
        tenant: the entries' tenant, or None for the sink's default tenant.
        items: the encoded entries, in arrival order.
        size: their line + structured-metadata bytes (``entry_size``).
    """

    tenant: str | None
    items: Sequence[EncodedEntry]
    size: int

    @property
    def count(self) -> int:
        """How many entries the batch holds."""
        return len(self.items)

    @property
    def entries(self) -> tuple[LokiEntry, ...]:
        """The entries as ``LokiEntry`` values, decoded from their bytes (dead letters, JSON)."""
        tenant = self.tenant
        return tuple(decode_entry(item, tenant) for item in self.items)

    def encode_protobuf(self) -> EncodedPush:
        """The push body: what ``encode_push_protobuf(self.entries)`` gives, without decoding."""
        return _encode_entries(self.items)

    def split(self) -> tuple[EncodedBatch, EncodedBatch] | None:
        """Split into two halves by size, exactly as ``Batch.split`` does."""
        if len(self.items) < 2:
            return None
        cut, head = _halves(list(map(_ITEM_SIZE, self.items)), self.size)
        return (
            EncodedBatch(tenant=self.tenant, items=self.items[:cut], size=head),
            EncodedBatch(tenant=self.tenant, items=self.items[cut:], size=self.size - head),
        )


class PushBuffer:
    """A round's encoded entries per tenant, in arrival order, until cut into ``EncodedBatch`` values.

    Filled by ``records.Shaper.encode_events`` (and ``add`` for a ready ``LokiEntry``); ``batches``
    cuts it exactly as ``pipeline.batches_by_tenant`` cuts the same entries.
    """

    __slots__ = ("by_tenant",)

    def __init__(self) -> None:
        self.by_tenant: dict[str | None, list[EncodedEntry]] = {}

    def __len__(self) -> int:
        return sum(map(len, self.by_tenant.values()))

    def entries_of(self, tenant: str | None) -> list[EncodedEntry]:
        """The list a tenant's next entries are appended to."""
        found = self.by_tenant.get(tenant)
        if found is None:
            found = self.by_tenant[tenant] = []
        return found

    def add(self, entry: LokiEntry) -> None:
        """Encode and append one entry."""
        self.entries_of(entry.tenant).append(
            (stream_of(entry.labels), entry.time_ns, entry_field(entry), entry_size(entry))
        )

    def batches(self, max_bytes: int) -> list[EncodedBatch]:
        """Each tenant's entries (tenants in order of first entry) cut into push-sized batches.

        A batch closes before the entry that would take it over ``max_bytes`` (line + metadata
        bytes); an entry larger than that travels alone.
        """
        out = []
        for tenant, items in self.by_tenant.items():
            count = len(items)
            # running[k]: the size of the first k entries.
            running = list(itertools.accumulate(map(_ITEM_SIZE, items), initial=0))
            start = 0
            while start < count:
                base = running[start]
                # The first entry that takes the batch over the bound...
                over = bisect.bisect_right(running, base + max_bytes, lo=start + 1) - 1
                # ...starts the next batch, unless the batch is still empty (or all zero-sized): it
                # then joins, alone over the bound, and the next batch starts after it.
                cut = over if running[over] > base else over + 1
                if over >= count or cut >= count:
                    cut = count
                out.append(EncodedBatch(tenant=tenant, items=items[start:cut], size=running[cut] - base))
                start = cut
        return out


# --------------------------------------------------------------------------------------------
# Batching


def _text_size(text: str) -> int:
    # UTF-8 length without encoding in the common (ASCII) case.
    if text.isascii():
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


def entry_size(entry: LokiEntry) -> int:
    """The bytes Loki's rate limiter charges for an entry: line plus structured metadata."""
    line = entry.line
    size = len(line) if line.isascii() else _text_size(line)
    if entry.structured_metadata:
        # One joined string: a few C calls instead of two Python calls per pair.
        pairs = "".join(_flatten(entry.structured_metadata))
        size += len(pairs) if pairs.isascii() else _text_size(pairs)
    return size


_flatten = itertools.chain.from_iterable


@attrs.frozen(kw_only=True)
class Batch:
    """One push request's worth of entries for a single tenant.

    Attributes:
        tenant: the entries' tenant, or None for the sink's default tenant.
        entries: the entries, in arrival order.
        size: their line + structured-metadata bytes (``entry_size``).
    """

    tenant: str | None
    entries: tuple[LokiEntry, ...]
    size: int

    @property
    def count(self) -> int:
        """How many entries the batch holds."""
        return len(self.entries)

    @classmethod
    def of(cls, entries: Sequence[LokiEntry], tenant: str | None = None) -> Batch:
        """Build a batch from entries, measuring their size."""
        return cls(tenant=tenant, entries=tuple(entries), size=sum(map(entry_size, entries)))

    def split(self) -> tuple[Batch, Batch] | None:
        """Split into two halves by size (for a 413 or a persistent 429).

        Returns:
            Two non-empty batches in order, or None when the batch has a single entry.
        """
        if len(self.entries) < 2:
            return None
        cut, head = _halves(list(map(entry_size, self.entries)), self.size)
        return (
            Batch(tenant=self.tenant, entries=self.entries[:cut], size=head),
            Batch(tenant=self.tenant, entries=self.entries[cut:], size=self.size - head),
        )


# What a sink pushes: entries as ``LokiEntry`` values or pre-encoded (the shipper's).
AnyBatch: TypeAlias = Batch | EncodedBatch


@attrs.define
class _OpenBatch:
    opened_at: float
    entries: list[LokiEntry] = attrs.Factory(list)
    size: int = 0


_NO_BATCHES: tuple[Batch, ...] = ()


@attrs.define
class Batcher:
    """Accumulates entries per tenant and closes batches by size and by age.

    ``add`` returns the batches that closed because they are full; ``due`` returns those that
    are old enough; ``flush`` closes everything (at shutdown). ``next_deadline`` tells the caller
    when to call ``due`` next. Time is always an argument (seconds on any monotonic clock).

    Attributes:
        max_bytes: close a batch before it would exceed this many line + metadata bytes. A single
            entry larger than this travels alone.
        max_wait_s: close a batch this long after its first entry.
    """

    max_bytes: int = DEFAULT_MAX_BATCH_BYTES
    max_wait_s: float = DEFAULT_BATCH_WAIT_S
    _open: dict[str | None, _OpenBatch] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_wait_s < 0:
            raise ValueError("max_bytes must be >= 1 and max_wait_s >= 0")

    def __len__(self) -> int:
        """The number of entries in open batches."""
        return sum(len(b.entries) for b in self._open.values())

    def add(self, entry: LokiEntry, now: float) -> tuple[Batch, ...]:
        """Add an entry to its tenant's open batch.

        Returns:
            The batches closed by this entry (usually none): the tenant's previous batch if the
            entry would overflow it, and the entry's own batch if the entry alone fills it.
        """
        size = entry_size(entry)
        tenant = entry.tenant
        current = self._open.get(tenant)
        closed = _NO_BATCHES
        if current is None:
            current = self._open[tenant] = _OpenBatch(opened_at=now)
        elif current.size + size > self.max_bytes:
            closed = (self._close(tenant, current),)
            current = self._open[tenant] = _OpenBatch(opened_at=now)
        current.entries.append(entry)
        current.size += size
        if current.size >= self.max_bytes:
            closed = (*closed, self._close(tenant, current))
        return closed

    def due(self, now: float) -> list[Batch]:
        """Close and return every batch whose first entry is at least ``max_wait_s`` old."""
        ready = [t for t, b in self._open.items() if now - b.opened_at >= self.max_wait_s]
        return [self._close(t, self._open[t]) for t in ready]

    def next_deadline(self) -> float | None:
        """When the oldest open batch becomes due, or None when nothing is open."""
        if not self._open:
            return None
        return min(b.opened_at for b in self._open.values()) + self.max_wait_s

    def flush(self) -> list[Batch]:
        """Close and return every open batch."""
        return [self._close(t, b) for t, b in list(self._open.items())]

    def _close(self, tenant: str | None, batch: _OpenBatch) -> Batch:
        del self._open[tenant]
        return Batch(tenant=tenant, entries=tuple(batch.entries), size=batch.size)


# --------------------------------------------------------------------------------------------
# Retry policy


class Verdict(enum.Enum):
    """What to do after a push attempt."""

    DELIVERED = "delivered"  # 2xx (but 260): stored
    RETRY = "retry"  # 429, 5xx but 501, timeouts, connection errors: nothing stored, resend
    PARTIAL = "partial"  # 400: the valid part is stored; never resend; dead-letter and move on
    SPLIT = "split"  # 413: resend in halves
    AUTH = "auth"  # 401/403: keep the data, report not ready, retry slowly
    REJECTED = "rejected"  # 260, 501, other statuses: refused for good; dead-letter


# Statuses with their own rule; everything else falls back to its class (see classify_status).
_STATUS_VERDICTS = {
    260: Verdict.REJECTED,  # Loki's blocked_ingestion: a 2xx the operator chose to mean "no"
    400: Verdict.PARTIAL,
    401: Verdict.AUTH,
    403: Verdict.AUTH,
    # A wrong URL or method (a mistyped gateway path) is a configuration problem like bad
    # credentials: keep the data and report not ready rather than dead-letter everything.
    404: Verdict.AUTH,
    405: Verdict.AUTH,
    408: Verdict.RETRY,  # a proxy timed out reading our request: nothing was stored
    413: Verdict.SPLIT,
    429: Verdict.RETRY,
    501: Verdict.REJECTED,  # "not implemented" will not change by retrying (Vector's rule)
}


def classify_status(status: int) -> Verdict:
    """Classify an HTTP status from Loki's push endpoint (LOKI.md A2).

    Args:
        status: the response status code.

    Returns:
        The verdict: DELIVERED for 2xx except 260, RETRY for 429/408/5xx except 501, PARTIAL
        for 400, SPLIT for 413, AUTH (keep the data, not ready) for 401/403/404/405/3xx,
        REJECTED for everything else.
    """
    verdict = _STATUS_VERDICTS.get(status)
    if verdict is not None:
        return verdict
    if 200 <= status < 300:
        return Verdict.DELIVERED
    if 500 <= status < 600:
        return Verdict.RETRY
    if 300 <= status < 400:  # redirects are not followed: the URL needs fixing
        return Verdict.AUTH
    return Verdict.REJECTED


@attrs.frozen(kw_only=True)
class PushOutcome:
    """The classified result of one push attempt.

    Attributes:
        verdict: what the caller must do next.
        batch: the batch that was sent.
        status: the HTTP status, or None when no response came (timeout, connection error).
        message: Loki's one-line error text or the transport error; empty on success.
    """

    verdict: Verdict
    batch: AnyBatch
    status: int | None
    message: str = ""

    def error(self) -> SinkError | None:
        """The outcome as an exception for callers that prefer raising: None when delivered.

        Returns:
            SinkUnavailable for RETRY and AUTH (keep the data), SinkRejected otherwise.
        """
        if self.verdict is Verdict.DELIVERED:
            return None
        text = f"loki push {self.verdict.value} (status {self.status}): {self.message}"
        if self.verdict in (Verdict.RETRY, Verdict.AUTH):
            return SinkUnavailable(text)
        return SinkRejected(text)


@attrs.define
class Backoff:
    """Jittered exponential backoff in the style of grafana/dskit (Promtail, Alloy).

    The n-th delay is drawn uniformly from [min * 2**n, 2 * min * 2**n); both bounds stop at
    ``max_s``, where the delay stays in [last lower bound, max_s). There is no retry limit.

    Attributes:
        min_s: the first delay's lower bound.
        max_s: the largest delay.
        rand: the random source, a callable returning floats in [0, 1) (``random.Random.random``).
        retries: delays handed out since the last reset.
    """

    min_s: float = DEFAULT_MIN_BACKOFF_S
    max_s: float = DEFAULT_MAX_BACKOFF_S
    rand: Callable[[], float] = random.random
    retries: int = attrs.field(default=0, init=False)
    _low: float = attrs.field(default=0.0, init=False)
    _high: float = attrs.field(default=0.0, init=False)

    def __attrs_post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start over from ``min_s`` (after a success)."""
        self.retries = 0
        self._low = self.min_s
        self._high = min(2 * self.min_s, self.max_s)

    def next_delay(self) -> float:
        """Return the next delay in seconds and widen the window."""
        self.retries += 1
        if self._low >= self._high:
            return self._low
        delay = self._low + (self._high - self._low) * self.rand()
        if self._high < self.max_s:
            self._low = min(2 * self._low, self.max_s)
            self._high = min(2 * self._high, self.max_s)
        return delay
