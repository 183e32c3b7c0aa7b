"""Forward request decoding: the single translation boundary between msgpack and our events.

Two paths share one set of rules:

* ``validate_request`` runs on the receive path. It gets a request decoded with ``raw=True`` (every
  msgpack str and bin is ``bytes``: no UTF-8 work, and Fluentd's ``str32`` packed entries and Fluent
  Bit's binary salts cannot fail to decode), checks it is valid Forward and counts its events. The
  frame's bytes go to the spool untouched.
* ``decode_frame`` runs on the delivery path (shipper, ``spool cat``, ``replay``). It turns stored frame
  bytes into ``Entry`` values with text decoded as ``str`` (invalid UTF-8 kept losslessly with
  ``surrogateescape``) and ``bin`` kept as ``bytes``.

Every msgpack exception, wrong arity or type, and oversized or undecompressible payload becomes a
``RemoteProtocolError`` with a precise message; nothing else escapes for bad input.

Policy on bad input (documented in the README): a request that is not valid Forward, including one bad
event inside an otherwise valid frame, rejects the whole frame: the connection is closed and no ack is
sent, so the client keeps the data and retries or reports it. We never ack a frame we would not deliver
in full. Tolerances beyond the spec: float times (Fluent Bit's docs allow them), ``nil`` options (Docker's
fluentd driver), bin or str for tags, keys, chunk ids and packed entries, gzip/zstd recognised by magic
bytes whatever the ``compressed`` option says, and concatenated gzip members.
"""

from __future__ import annotations

import contextlib
import gc
import struct
import zlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import attrs
import msgpack
import zstandard

from fluentforward.errors import RemoteProtocolError
from fluentforward.protocol._events import Entry, Signal
from fluentforward.protocol._eventtime import (
    EVENT_TIME_CODE,
    GROUP_END_SECONDS,
    GROUP_START_SECONDS,
    event_time_parts,
)
from fluentforward.protocol._limits import DEFAULT_LIMITS, STORED_LIMITS, Limits

__all__ = [
    "GROUP_END",
    "GROUP_START",
    "DecodedFrame",
    "EventParts",
    "Mode",
    "RequestInfo",
    "decode_frame",
    "validate_request",
]

_T = TypeVar("_T")

# Chunk ids are 24-32 characters (Fluent Bit) or 25 (Fluentd); anything far longer is not a chunk id,
# and the spool stores the length in 16 bits.
MAX_CHUNK_BYTES = 1024
# Counts above this in `size` (metrics frames only) are not counts; the spool stores 32 bits.
MAX_RECORD_COUNT = 2**32 - 1

# One log event on the delivery path: (time_ns, record, metadata map, OTLP group record or None).
EventParts = tuple[int, dict[Any, Any], dict[Any, Any], dict[Any, Any] | None]

GROUP_START = -1  # time_ns sentinel of a Fluent Bit OTLP group-start marker
GROUP_END = -2  # time_ns sentinel of a group-end marker

_NS = 1_000_000_000
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# Entries read from a packed stream per Unpacker; the stream is already bounded by the frame limits.
# Ext values decode to ``slice(code, data)``: a C builtin taking two arguments is the cheapest ext_hook
# there is (msgpack's default ExtType namedtuple costs about 2 us per EventTime, more than the rest of
# a 600-byte record). EventTimes are turned into integers here; ext values inside records stay slices.
_UNPACK_RAW: dict[str, Any] = {"raw": True, "strict_map_key": False, "ext_hook": slice}
_UNPACK_TEXT: dict[str, Any] = {
    "raw": False,
    "unicode_errors": "surrogateescape",
    "strict_map_key": False,
    "ext_hook": slice,
}


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Pause the cyclic GC while a frame's objects are built: decoding creates thousands of containers
    that can hold no cycles, and generation-0 collections during it cost about a quarter of the time."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _bounded(limits: Limits, size: int) -> dict[str, int]:
    """Array and map length caps for unpacking ``size`` bytes: no container may be larger than a
    whole frame's entry limit, so a small request cannot make us build millions of objects, nor claim
    more elements than it has bytes (msgpack allocates a container's slots from its header)."""
    cap = min(limits.max_entries_per_frame, max(size, 1))
    return {"max_array_len": cap, "max_map_len": cap}


def decode_raw_request(raw: bytes, where: int, limits: Limits = DEFAULT_LIMITS) -> Any:
    """Decode one complete request with ``raw=True`` (receive path).

    Raises:
        RemoteProtocolError: the bytes are not one msgpack object, or the entry array of a Forward
            request is longer than ``max_entries_per_frame`` (checked before anything is built).
    """
    count = _forward_entry_count(raw)
    if count is not None and count > limits.max_entries_per_frame:
        raise RemoteProtocolError(
            f"frame has {count} entries, above max_entries_per_frame ({limits.max_entries_per_frame})",
            offset=where,
        )
    try:
        return _unpackb(raw, _UNPACK_RAW, limits)
    except Exception as exc:
        raise RemoteProtocolError(f"invalid msgpack ({type(exc).__name__})", offset=where) from exc


def _unpackb(data: bytes, options: dict[str, Any], limits: Limits) -> Any:
    """``msgpack.unpackb`` with the GC paused and the container caps of ``limits``.

    A map key that is an array, a map or an ext value is valid msgpack but cannot be a Python dict
    key: the map is then decoded again with such keys turned into text (``_hashable_pairs``), so a
    record that carries one is kept, not rejected (or, stored, left undeliverable).
    """
    with _no_gc():
        try:
            return msgpack.unpackb(data, **options, **_bounded(limits, len(data)))
        except TypeError:  # unhashable key; any other error is the caller's to report
            return msgpack.unpackb(
                data, **options, **_bounded(limits, len(data)), object_pairs_hook=_hashable_pairs
            )


def _hashable_pairs(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for key, value in pairs:
        try:
            hash(key)
            out[key] = value
        except TypeError:
            out[_key_text(key)] = value
    return out


def _key_text(key: Any) -> str:
    """A readable, deterministic text for an unhashable map key (array, map, ext)."""
    if isinstance(key, list | tuple):
        return "[" + ", ".join(map(_key_text, key)) + "]"
    if isinstance(key, dict):
        return "{" + ", ".join(f"{_key_text(k)}: {_key_text(v)}" for k, v in key.items()) + "}"
    if isinstance(key, slice):
        return f"ext({key.start}, {bytes(key.stop).hex()})"
    if isinstance(key, str):
        return key
    if isinstance(key, bytes):
        return key.decode("utf-8", "surrogateescape")
    return repr(key)


class Mode:
    """Carrier modes, decided by the type of a request's second element (spec: "Server MUST detect")."""

    MESSAGE = "message"
    FORWARD = "forward"
    PACKED = "packed"
    COMPRESSED = "compressed"


@attrs.frozen(kw_only=True)
class RequestInfo:
    """What the receive path needs to know about one valid request."""

    tag: str
    mode: str
    signal: Signal
    record_count: int
    chunk: str | None


@attrs.frozen(kw_only=True)
class DecodedFrame:
    """A stored frame decoded for delivery. Group markers are consumed, never returned as entries.

    Attributes:
        events: each log event as a plain ``(time_ns, record, metadata, group)`` tuple (metadata
            ``{}`` when the entry has none, group None outside an OTLP group): the shipper's hot path
            reads these; ``entries`` builds the ``Entry`` values from them.
    """

    tag: str
    mode: str
    signal: Signal
    events: list[EventParts]
    chunk: str | None

    @property
    def entries(self) -> list[Entry]:
        """The events as ``Entry`` values (built on each access)."""
        return [Entry(time_ns=t, record=r, metadata=m, group=g) for t, r, m, g in self.events]


def _text(value: bytes | str) -> str:
    return value if isinstance(value, str) else value.decode("utf-8", "surrogateescape")


def _opt(options: dict[Any, Any], name: str) -> Any:
    """Look an option up whether its key arrived as str or as bin.

    When both spellings are present the later one wins, as it does when the map is decoded with
    ``raw=True`` (the receive path), so both paths read the same value.
    """
    wire = name.encode()
    if name not in options:
        return options.get(wire)
    if wire not in options:
        return options[name]
    return options[[key for key in options if key in (name, wire)][-1]]


@attrs.frozen
class _Options:
    chunk: str | None
    compressed: bytes | None
    signal: Signal
    metadata: dict[Any, Any] | None


def _parse_options(raw_options: Any, where: int) -> _Options:
    if raw_options is None:  # Docker's fluentd log driver sends nil options
        return _Options(None, None, Signal.LOGS, None)
    if not isinstance(raw_options, dict):
        raise RemoteProtocolError(f"options is {_kind(raw_options)}, not a map", offset=where)
    chunk = _opt(raw_options, "chunk")
    if chunk is not None and not isinstance(chunk, bytes | str):
        raise RemoteProtocolError(f"option chunk is {_kind(chunk)}, not a string", offset=where)
    if chunk is not None and len(chunk) > MAX_CHUNK_BYTES:
        raise RemoteProtocolError(f"option chunk is longer than {MAX_CHUNK_BYTES} bytes", offset=where)
    compressed = _opt(raw_options, "compressed")
    if compressed is not None:
        if not isinstance(compressed, bytes | str):
            raise RemoteProtocolError(f"option compressed is {_kind(compressed)}, not a string", offset=where)
        compressed = (
            compressed.encode("utf-8", "surrogateescape") if isinstance(compressed, str) else compressed
        )
    signal_value = _opt(raw_options, "fluent_signal")
    if signal_value is None:
        signal = Signal.LOGS
    elif type(signal_value) is int and signal_value in (0, 1, 2):
        signal = Signal(signal_value)
    else:
        raise RemoteProtocolError(f"option fluent_signal is invalid: {signal_value!r}", offset=where)
    metadata = _opt(raw_options, "metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise RemoteProtocolError(f"option metadata is {_kind(metadata)}, not a map", offset=where)
    return _Options(None if chunk is None else _text(chunk), compressed, signal, metadata)


def _kind(value: Any) -> str:
    """Name a decoded value's msgpack type for error messages (never echo its content)."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, bytes | str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a map"
    if isinstance(value, slice):
        return f"ext type {value.start}"
    if isinstance(value, msgpack.ExtType):
        return f"ext type {value.code}"
    return type(value).__name__


def _time_ns(value: Any, where: int, index: int) -> int:
    """Return an event time in Unix ns, or GROUP_START / GROUP_END for Fluent Bit group markers."""
    kind = type(value)
    if kind is slice or kind is msgpack.ExtType:  # slice: our ext_hook (see _UNPACK_RAW)
        code, data = (value.start, value.stop) if kind is slice else (value.code, value.data)
        if code != EVENT_TIME_CODE or len(data) != 8:
            raise RemoteProtocolError(
                f"entry {index}: time is ext type {code} of {len(data)} bytes, not EventTime",
                offset=where,
            )
        seconds, nanos = event_time_parts(data)
        if seconds >= GROUP_END_SECONDS:
            return GROUP_START if seconds == GROUP_START_SECONDS else GROUP_END
        if nanos >= _NS:
            raise RemoteProtocolError(
                f"entry {index}: EventTime nanoseconds {nanos} out of range", offset=where
            )
        return seconds * _NS + nanos
    if type(value) is int:
        if value >= 0:
            return value * _NS
        if value in (-1, -2):  # group markers re-encoded by Time_as_Integer
            return GROUP_START if value == -1 else GROUP_END
        raise RemoteProtocolError(f"entry {index}: negative time {value}", offset=where)
    if type(value) is float and 0 <= value < 2**63 / _NS:
        return int(value * _NS)
    raise RemoteProtocolError(f"entry {index}: time is {_kind(value)}", offset=where)


def _split_entry(entry: Any, where: int, index: int) -> tuple[int, Any, dict[Any, Any]]:
    """Check one ``[time, record]`` / ``[[time, metadata], record]`` entry; return its parts."""
    if type(entry) is not list or len(entry) != 2:
        raise RemoteProtocolError(
            f"entry {index} is {_kind(entry)}"
            + (f" of {len(entry)} elements" if type(entry) is list else "")
            + ", not [time, record]",
            offset=where,
        )
    head, record = entry
    if type(record) is not dict:
        raise RemoteProtocolError(f"entry {index}: record is {_kind(record)}, not a map", offset=where)
    time_ns, metadata = _split_head(head, where, index)
    return time_ns, metadata, record


def _split_head(head: Any, where: int, index: int) -> tuple[int, Any]:
    """Check an entry's ``time`` or ``[time, metadata]``; return the time in ns and the metadata."""
    metadata: Any = None
    if type(head) is list:  # v1.5 / Fluent Bit v2: [time, metadata]
        if not 1 <= len(head) <= 2:
            raise RemoteProtocolError(f"entry {index}: metadata form has {len(head)} elements", offset=where)
        if len(head) == 2:
            metadata = head[1]
            if type(metadata) is not dict:
                raise RemoteProtocolError(
                    f"entry {index}: metadata is {_kind(metadata)}, not a map", offset=where
                )
        head = head[0]
    return _time_ns(head, where, index), metadata


def _inflate(data: bytes, compressed: bytes | None, limits: Limits, where: int) -> bytes:
    """Decompress a packed payload by magic bytes (gzip members may be concatenated), bounded."""
    cap = limits.max_decompressed_bytes
    if data.startswith(_GZIP_MAGIC):
        out = bytearray()
        rest = data
        try:
            while rest:
                inflater = zlib.decompressobj(wbits=31)
                out += inflater.decompress(rest, cap + 1 - len(out))
                if len(out) > cap:
                    raise RemoteProtocolError(
                        f"gzip payload inflates beyond max_decompressed_bytes ({cap})", offset=where
                    )
                if not inflater.eof:
                    raise RemoteProtocolError("gzip payload is truncated", offset=where)
                rest = inflater.unused_data
        except zlib.error as exc:
            raise RemoteProtocolError(f"gzip payload is corrupt: {exc}", offset=where) from exc
        return bytes(out)
    if data.startswith(_ZSTD_MAGIC):
        return _inflate_zstd(data, cap, where)
    if compressed in (b"gzip", b"zstd"):
        raise RemoteProtocolError(
            f"option compressed is {compressed.decode()} but the payload is not", offset=where
        )
    return data


# zstd has no output cap per call, so input is fed in slices: an RLE block turns 4 input bytes into
# at most 128 KiB, so one slice overshoots the cap by at most 16 MiB before it is noticed.
_ZSTD_SLICE = 512


def _inflate_zstd(data: bytes, cap: int, where: int) -> bytes:
    out = bytearray()
    view = memoryview(data)
    try:
        while view:
            inflater = zstandard.ZstdDecompressor().decompressobj()
            pos = 0
            while pos < len(view) and not inflater.eof:
                out += inflater.decompress(view[pos : pos + _ZSTD_SLICE])
                pos += _ZSTD_SLICE
                if len(out) > cap:
                    raise RemoteProtocolError(
                        f"zstd payload inflates beyond max_decompressed_bytes ({cap})", offset=where
                    )
            if not inflater.eof:
                raise RemoteProtocolError("zstd payload is truncated", offset=where)
            rest = inflater.unused_data
            view = memoryview(rest + bytes(view[pos:]))
    except zstandard.ZstdError as exc:
        raise RemoteProtocolError(f"zstd payload is corrupt: {exc}", offset=where) from exc
    return bytes(out)


def _mode_of(second: Any, n: int, where: int) -> str:
    if type(second) is list:
        mode = Mode.FORWARD
        arity = (2, 3)
    elif isinstance(second, bytes | str):
        mode = Mode.PACKED
        arity = (2, 3)
    elif type(second) in (int, slice, float, msgpack.ExtType):
        mode = Mode.MESSAGE
        arity = (3, 4)
    else:
        raise RemoteProtocolError(
            f"second element is {_kind(second)}: not Message, Forward or PackedForward",
            offset=where,
        )
    if n not in arity:
        raise RemoteProtocolError(f"{mode} request has {n} elements", offset=where)
    return mode


def _head(request: Any, where: int, limits: Limits) -> tuple[str, str, _Options]:
    if type(request) is not list:
        raise RemoteProtocolError(f"request is {_kind(request)}, not an array", offset=where)
    n = len(request)
    if not 2 <= n <= 4:
        raise RemoteProtocolError(f"request array has {n} elements", offset=where)
    tag = request[0]
    if not isinstance(tag, bytes | str):
        raise RemoteProtocolError(f"tag is {_kind(tag)}, not a string", offset=where)
    if len(tag) > limits.max_tag_bytes:
        raise RemoteProtocolError(
            f"tag of {len(tag)} bytes exceeds max_tag_bytes ({limits.max_tag_bytes})", offset=where
        )
    mode = _mode_of(request[1], n, where)
    has_options = n == (4 if mode == Mode.MESSAGE else 3)
    options = _parse_options(request[-1] if has_options else None, where)
    return _text(tag), mode, options


def _packed_stream(
    payload: bytes | str, options: _Options, limits: Limits, where: int, *, text: bool
) -> tuple[str, list[Any]]:
    data = payload.encode("utf-8", "surrogateescape") if isinstance(payload, str) else payload
    inflated = _inflate(data, options.compressed, limits, where)
    mode = Mode.COMPRESSED if inflated is not data else Mode.PACKED
    count, clean = _check_stream_count(inflated, limits, where)
    if clean:
        # A well-formed stream of `count` entries is an array body: one C call decodes it all,
        # instead of a Python iteration per entry (the copy costs far less than the loop). The
        # array adds one level of nesting: a stream at msgpack's depth limit, or any other error,
        # is left to the loop below, which decodes it entry by entry or says where it breaks.
        try:
            entries: list[Any] = _unpackb(
                _array_header(count) + inflated, _UNPACK_TEXT if text else _UNPACK_RAW, limits
            )
        except Exception:  # noqa: S110 (the loop reports it)
            pass
        else:
            return mode, entries
    unpacker = msgpack.Unpacker(
        max_buffer_size=max(len(inflated), 1),
        **(_UNPACK_TEXT if text else _UNPACK_RAW),
        **_bounded(limits, len(inflated)),
        object_pairs_hook=_hashable_pairs,  # a rare path: no need to try plain dicts first
    )
    unpacker.feed(inflated)
    entries = []
    complete = 0  # tell() after the last whole entry (a partial parse advances tell() too)
    try:
        for entry in unpacker:
            entries.append(entry)
            complete = unpacker.tell()
            if len(entries) > limits.max_entries_per_frame:  # skip() and decoding may disagree
                raise RemoteProtocolError(
                    f"frame has more than max_entries_per_frame ({limits.max_entries_per_frame})",
                    offset=where,
                )
    except RemoteProtocolError:
        raise
    except Exception as exc:  # msgpack raises several types; all mean a corrupt stream
        raise RemoteProtocolError(
            f"packed entries are not a msgpack stream: {type(exc).__name__}", offset=where
        ) from exc
    if complete != len(inflated):
        raise RemoteProtocolError("packed entries end with a truncated entry", offset=where)
    return mode, entries


def _array_header(count: int) -> bytes:
    if count < 16:
        return bytes((0x90 | count,))
    if count < 1 << 16:
        return b"\xdc" + count.to_bytes(2, "big")
    return b"\xdd" + count.to_bytes(4, "big")


def _check_stream_count(data: bytes, limits: Limits, where: int) -> tuple[int, bool]:
    """Count a packed entry stream with skip() (no objects built) before decoding it.

    Returns:
        (entries, clean): clean when the stream is exactly ``entries`` whole msgpack objects;
        otherwise decoding it entry by entry reports where it breaks.

    Raises:
        RemoteProtocolError: more than ``max_entries_per_frame`` entries.
    """
    counter = msgpack.Unpacker(max_buffer_size=max(len(data), 1))
    counter.feed(data)
    count = end = 0
    try:
        while True:
            counter.skip()
            end = counter.tell()  # after a failed skip(), tell() has moved into the partial entry
            count += 1
            if count > limits.max_entries_per_frame:
                raise RemoteProtocolError(
                    f"frame has more than max_entries_per_frame ({limits.max_entries_per_frame})",
                    offset=where,
                )
    except msgpack.OutOfData:
        return count, end == len(data)
    except RemoteProtocolError:
        raise
    except Exception:  # corrupt stream: decoding reports it precisely
        return count, False


def validate_request(request: Any, where: int, limits: Limits = DEFAULT_LIMITS) -> RequestInfo:
    """Check one request decoded with ``raw=True``; return its tag, mode, signal, count and chunk.

    Args:
        request: the decoded top-level msgpack object (not ``nil``: heartbeats are handled earlier).
        where: the request's byte offset in the connection stream, for error messages.
        limits: decoding bounds.

    Raises:
        RemoteProtocolError: the request is not valid Forward or exceeds a limit.
    """
    tag, mode, options = _head(request, where, limits)
    if options.signal is not Signal.LOGS:
        # Metrics and traces (cmetrics / ctraces msgpack) are spooled and acked as they are, never
        # decoded as log events. Fluent Bit sends no `size` for a metrics map: count one.
        size = _opt(request[-1], "size")
        count = size if type(size) is int and 0 <= size <= MAX_RECORD_COUNT else 1
        return RequestInfo(tag=tag, mode=mode, signal=options.signal, record_count=count, chunk=options.chunk)
    if mode == Mode.MESSAGE:
        _time_ns(request[1], where, 0)
        if type(request[2]) is not dict:
            raise RemoteProtocolError(f"record is {_kind(request[2])}, not a map", offset=where)
        return RequestInfo(tag=tag, mode=mode, signal=options.signal, record_count=1, chunk=options.chunk)
    if mode == Mode.FORWARD:
        entries = request[1]
        if len(entries) > limits.max_entries_per_frame:
            raise RemoteProtocolError(
                f"frame has {len(entries)} entries, above max_entries_per_frame "
                f"({limits.max_entries_per_frame})",
                offset=where,
            )
    else:
        mode, entries = _packed_stream(request[1], options, limits, where, text=False)
    count = 0
    for index, entry in enumerate(entries):
        if _split_entry(entry, where, index)[0] >= 0:
            count += 1
    return RequestInfo(tag=tag, mode=mode, signal=options.signal, record_count=count, chunk=options.chunk)


# Type bytes (msgpack spec): which first bytes start a map, an array, or a str/bin.
_MAP_START = bytes(1 if 0x80 <= b <= 0x8F or b in (0xDE, 0xDF) else 0 for b in range(256))
_ARRAY_START = bytes(1 if 0x90 <= b <= 0x9F or b in (0xDC, 0xDD) else 0 for b in range(256))
_BYTES_START = bytes(
    1 if 0xA0 <= b <= 0xBF or b in (0xD9, 0xDA, 0xDB, 0xC4, 0xC5, 0xC6) else 0 for b in range(256)
)


class _UnsureError(Exception):
    """``inspect_request`` cannot vouch for a request; the full decode decides."""


def inspect_request(raw: bytes, where: int, limits: Limits = DEFAULT_LIMITS) -> RequestInfo | None:
    """Validate a Forward or PackedForward request without building its records (receive path).

    Decoding every record only to check that it is a map costs most of the receive path: here the
    records are stepped over with ``Unpacker.skip()`` (well-formedness checked in C, no objects
    built) after their first byte shows a map, and only the small parts are decoded: tag, entry
    heads (time, metadata), options. The frame's bytes go to the spool as they are; delivery decodes
    them once (``decode_frame``).

    This is a fast path, never a second set of rules: it returns None whenever it cannot vouch for
    the request (Message mode, a heartbeat, anything unusual or invalid), and the caller then decodes
    the request whole with ``decode_raw_request`` + ``validate_request``, which accepts or rejects it
    with the precise reason. What it accepts, ``validate_request`` accepts with the same
    ``RequestInfo``, and ``decode_frame`` decodes (tests check both on generated requests).
    """
    try:
        return _inspect(raw, where, limits)
    except Exception:  # _UnsureError, msgpack's errors, a RemoteProtocolError: the full decode reports
        return None


def _inspect(raw: bytes, where: int, limits: Limits) -> RequestInfo:
    unpacker = msgpack.Unpacker(max_buffer_size=len(raw), **_UNPACK_RAW, **_bounded(limits, len(raw)))
    _, tag, walked, payload, raw_options = _request_parts(
        unpacker, raw, limits, lambda count: _walk_entries(unpacker, raw, count, where)
    )
    if not isinstance(tag, bytes) or len(tag) > limits.max_tag_bytes:
        raise _UnsureError
    records = walked or 0
    options = _parse_options(raw_options, where)
    mode = Mode.FORWARD
    if options.signal is not Signal.LOGS:
        size = _opt(raw_options, "size") if raw_options is not None else None
        records = size if type(size) is int and 0 <= size <= MAX_RECORD_COUNT else 1
        mode = Mode.PACKED if payload is not None else Mode.FORWARD
    elif payload is not None:
        inflated = _inflate(payload, options.compressed, limits, where)
        mode = Mode.COMPRESSED if inflated is not payload else Mode.PACKED
        stream = msgpack.Unpacker(
            max_buffer_size=max(len(inflated), 1), **_UNPACK_RAW, **_bounded(limits, len(inflated))
        )
        stream.feed(inflated)
        records = _walk_entries(stream, inflated, None, where, limits.max_entries_per_frame)
    return RequestInfo(
        tag=_text(tag), mode=mode, signal=options.signal, record_count=records, chunk=options.chunk
    )


def _request_parts(
    unpacker: msgpack.Unpacker, raw: bytes, limits: Limits, walk: Callable[[int], _T]
) -> tuple[int, Any, _T | None, Any, Any]:
    """Read a Forward request, its entries read by ``walk(count)``, or a PackedForward request:
    ``(elements, tag, what walk returned, payload, options)``, None for what it does not have.

    Raises:
        _UnsureError: anything else (Message mode, a heartbeat), or bytes after the request.
    """
    unpacker.feed(raw)
    n = unpacker.read_array_header()
    if n not in (2, 3):  # Forward and PackedForward only: a Message (3-4) takes the one-call decode
        raise _UnsureError
    tag = unpacker.unpack()
    second = raw[unpacker.tell()]
    walked = payload = None
    if _ARRAY_START[second]:
        count = unpacker.read_array_header()
        if count > limits.max_entries_per_frame:
            raise _UnsureError
        walked = walk(count)
    elif _BYTES_START[second]:
        payload = unpacker.unpack()
    else:
        raise _UnsureError
    options = unpacker.unpack() if n == 3 else None
    if unpacker.tell() != len(raw):
        raise _UnsureError
    return n, tag, walked, payload, options


# The entry shapes nearly every client sends, recognised by their first bytes: Fluent Bit v2+
# ``[[EventTime, {}], record]`` and Fluentd/fluent-logger ``[EventTime, record]`` (fixext8 type 0).
_FIXMAP_LESS = tuple(bytes([b - 1]) if 0x81 <= b <= 0x8F else b"" for b in range(256))
_METADATA_ENTRY = b"\x92\x92\xd7\x00"
_EVENT_TIME_ENTRY = b"\x92\xd7\x00"
_TIME_PAIR = struct.Struct(">II")


def _walk_entries(
    unpacker: msgpack.Unpacker, data: bytes, count: int | None, where: int, most: int = 0
) -> int:
    """Step over ``count`` entries (or, with None, entries up to the end of ``data``, at most
    ``most``) without building their records; return the number of log events.

    The two common entry shapes are checked from their bytes (a map must follow the head); any
    other entry has its head decoded and checked by ``_split_head``. ``skip()`` checks a record is
    well-formed but, building nothing, not what only decoding checks: the length of a msgpack
    timestamp (ext type -1). A record that may hold one is left to the full decode.
    """
    read_header = unpacker.read_array_header
    unpack = unpacker.unpack
    skip = unpacker.skip
    tell = unpacker.tell
    time_pair = _TIME_PAIR.unpack_from
    starts = data.startswith
    is_map = _MAP_START
    end = len(data)
    suspects = _timestamp_candidates(data)
    suspect = suspects[0] if suspects else end  # the next one not yet placed
    record_start = end  # of the previous entry (none yet)
    records = index = 0
    while index < count if count is not None else tell() < end:
        if count is None and index >= most:
            raise _UnsureError
        at = tell()
        if suspect < at:  # inside the previous record, or in a head (decoded or matched: harmless)
            suspect = _place_suspects(suspects, record_start, at)
        if starts(_METADATA_ENTRY, at) and data[at + 12] == 0x80 and is_map[data[at + 13]]:
            seconds, nanos = time_pair(data, at + 4)
            record_start = at + 13
        elif starts(_EVENT_TIME_ENTRY, at) and is_map[data[at + 11]]:
            seconds, nanos = time_pair(data, at + 3)
            record_start = at + 11
        else:
            seconds = nanos = _NS  # not a common shape: decode and check the head
        if nanos < _NS and seconds < GROUP_END_SECONDS:
            skip()
            records += 1
        else:
            if read_header() != 2:
                raise _UnsureError
            head = unpack()
            record_start = tell()
            if not is_map[data[record_start]]:
                raise _UnsureError
            skip()
            if _split_head(head, where, index)[0] >= 0:
                records += 1
        index += 1
    if suspect < end:
        _place_suspects(suspects, record_start, tell())
    return records


# Header bytes of an ext value of type -1 (msgpack's timestamp): fixext 1/2/4/8/16, then ext 8/16/32
# with the type after a 1/2/4-byte length. At most this many 0xFF bytes per KiB are looked at.
_FIXEXT_HEADS = range(0xD4, 0xD9)
_MAX_FF_PER_KIB = 16


def _timestamp_candidates(data: bytes) -> list[int]:
    """Positions where an ext type -1 header could start: every 0xFF byte preceded by an ext header
    byte at the right distance. Text never contains 0xFF; in log records it comes from binary
    values and EventTime bytes, so there are few, and fewer candidates.

    Raises:
        _UnsureError: too many 0xFF bytes to look at each one.
    """
    if data.count(b"\xff") > _MAX_FF_PER_KIB * (len(data) // 1024 + 1):
        raise _UnsureError
    found: set[int] = set()
    i = data.find(b"\xff", 1)
    while i != -1:
        if data[i - 1] in _FIXEXT_HEADS:
            found.add(i - 1)
        for distance, head in ((2, 0xC7), (3, 0xC8), (5, 0xC9)):
            if i >= distance and data[i - distance] == head:
                found.add(i - distance)
        i = data.find(b"\xff", i + 1)
    return sorted(found)


def _place_suspects(suspects: list[int], record_start: int, record_end: int) -> int:
    """Drop the candidates before ``record_end``; return the next one (or a position past the end).

    Raises:
        _UnsureError: a candidate lies inside the record ``[record_start, record_end)``.
    """
    while suspects and suspects[0] < record_end:
        if suspects.pop(0) >= record_start:
            raise _UnsureError
    return suspects[0] if suspects else 2**63


def _events_with_groups(raw_entries: list[Any], where: int) -> list[EventParts]:
    events: list[EventParts] = []
    append = events.append
    group: dict[Any, Any] | None = None
    for index, raw_entry in enumerate(raw_entries):
        time_ns, metadata, record = _split_entry(raw_entry, where, index)
        if time_ns < 0:
            group = record if time_ns == GROUP_START else None
            continue
        append((time_ns, record, metadata or {}, group))
    return events


def decode_frame(raw: bytes, limits: Limits = STORED_LIMITS) -> DecodedFrame:
    """Decode a whole stored frame into entries (delivery path; see ``STORED_LIMITS``).

    Forward and PackedForward frames are decoded entry by entry (``_decode_streamed``), sharing map
    values that repeat byte for byte from one record to the next; anything else, and any frame that
    path does not take whole, is decoded in one call. Both give equal events.

    Raises:
        RemoteProtocolError: the bytes are not one valid Forward request.
    """
    mode_hint = _peek_second_type(raw)
    if mode_hint in (Mode.FORWARD, Mode.PACKED):
        try:
            with _no_gc():
                return _decode_streamed(raw, mode_hint, limits)
        except Exception:  # noqa: S110 - the whole-frame decode below reports it precisely
            pass
    return _decode_whole(raw, mode_hint, limits)


def _decode_whole(raw: bytes, mode_hint: str | None, limits: Limits) -> DecodedFrame:
    """``decode_frame`` in one msgpack call for the whole request."""
    try:
        # PackedForward payloads are decoded with raw=True first: Fluentd sends them as str32 holding
        # binary, which must not go through a UTF-8 decoder.
        request = _unpackb(raw, _UNPACK_RAW if mode_hint == Mode.PACKED else _UNPACK_TEXT, limits)
    except Exception as exc:
        raise RemoteProtocolError(f"frame is not one msgpack object: {type(exc).__name__}", offset=0) from exc
    tag, mode, options = _head(request, 0, limits)
    if options.signal is not Signal.LOGS:
        return DecodedFrame(tag=tag, mode=mode, signal=options.signal, events=[], chunk=options.chunk)
    if mode == Mode.MESSAGE:
        time_ns = _time_ns(request[1], 0, 0)
        record = request[2]
        if type(record) is not dict:
            raise RemoteProtocolError(f"record is {_kind(record)}, not a map", offset=0)
        event = (max(time_ns, 0), record, options.metadata or {}, None)
        return DecodedFrame(tag=tag, mode=mode, signal=options.signal, events=[event], chunk=options.chunk)
    if mode == Mode.FORWARD:
        raw_entries = request[1]
    else:
        mode, raw_entries = _packed_stream(request[1], options, limits, 0, text=True)
    return DecodedFrame(
        tag=tag,
        mode=mode,
        signal=options.signal,
        events=_events_with_groups(raw_entries, 0),
        chunk=options.chunk,
    )


def _decode_streamed(raw: bytes, mode_hint: str, limits: Limits) -> DecodedFrame:
    """``decode_frame`` for a Forward or PackedForward frame, entry by entry.

    Records of one Fluent Bit chunk come from one container: their ``kubernetes`` maps are the same
    bytes. A map value equal, as bytes, to the same key's in the record before is shared, not decoded
    again (when it is the record's last pair, the rest of the record is decoded in one call: see
    _events_streamed): a third fewer objects to build and free, and the shaper's per-stream memo
    compares them by identity. Records are never modified after decoding, so sharing is safe.

    Raises anything on a frame it does not take whole; the caller then decodes it in one call.
    """
    packed = mode_hint == Mode.PACKED
    request = msgpack.Unpacker(
        max_buffer_size=len(raw), **(_UNPACK_RAW if packed else _UNPACK_TEXT), **_bounded(limits, len(raw))
    )
    n, tag, events, payload, options = _request_parts(
        request, raw, limits, lambda count: _events_streamed(request, raw, count, limits)
    )
    second = payload if payload is not None else []
    tag_text, mode, parsed = _head([tag, second, options][:n], 0, limits)
    if parsed.signal is not Signal.LOGS:
        return DecodedFrame(tag=tag_text, mode=mode, signal=parsed.signal, events=[], chunk=parsed.chunk)
    if payload is not None:
        data = payload.encode("utf-8", "surrogateescape") if isinstance(payload, str) else payload
        inflated = _inflate(data, parsed.compressed, limits, 0)
        mode = Mode.COMPRESSED if inflated is not data else Mode.PACKED
        stream = msgpack.Unpacker(
            max_buffer_size=max(len(inflated), 1), **_UNPACK_TEXT, **_bounded(limits, len(inflated))
        )
        stream.feed(inflated)
        events = _events_streamed(stream, inflated, None, limits)
    assert events is not None  # a Forward request's entries were walked
    return DecodedFrame(tag=tag_text, mode=mode, signal=parsed.signal, events=events, chunk=parsed.chunk)


def _events_streamed(
    unpacker: msgpack.Unpacker, data: bytes, count: int | None, limits: Limits
) -> list[EventParts]:
    """The events of ``count`` entries (None: up to the end of ``data``), as _events_with_groups
    gives them, with repeated map values shared (see _decode_streamed).

    A record whose last value is a map, with that pair the same bytes as in the record before (Fluent
    Bit appends the ``kubernetes`` map last), is decoded without the pair in one call, and the decoded
    map is shared. That is sound whenever the call succeeds: msgpack reads left to right, so if the
    bytes before that tail are exactly the record's other pairs, the tail is exactly its last pair.
    Every other record is walked key by key (_walk_record).
    """
    skip = unpacker.skip
    tell = unpacker.tell
    time_pair = _TIME_PAIR.unpack_from
    starts = data.startswith
    is_map = _MAP_START
    options = {**_UNPACK_TEXT, **_bounded(limits, len(data))}
    # Records less their tail go through this one; its buffer starts small (msgpack would allocate
    # its whole max_buffer_size, up to a MiB) and grows if a record needs more.
    reader_size = {"max_buffer_size": max(len(data), 1), "read_size": min(max(len(data), 1), 4096)}
    reader = msgpack.Unpacker(**reader_size, **options)
    read = reader.unpack
    fed = 0
    end = len(data)
    events: list[EventParts] = []
    append = events.append
    group: dict[Any, Any] | None = None
    last: dict[Any, tuple[bytes, Any]] = {}  # map values of the record before: key -> (bytes, decoded)
    tail = b""  # the record before's last pair, when its value is a map; else empty
    tail_key: Any = None
    tail_value: Any = None
    index = 0
    while index < count if count is not None else tell() < end:
        if index >= limits.max_entries_per_frame:
            raise _UnsureError
        index += 1
        at = tell()
        if starts(_METADATA_ENTRY, at) and data[at + 12] == 0x80 and is_map[data[at + 13]]:
            seconds, nanos = time_pair(data, at + 4)
            start = at + 13
        elif starts(_EVENT_TIME_ENTRY, at) and is_map[data[at + 11]]:
            seconds, nanos = time_pair(data, at + 3)
            start = at + 11
        else:
            seconds = nanos = _NS
        if nanos >= _NS or seconds >= GROUP_END_SECONDS:
            time_ns, metadata, record = _split_entry(unpacker.unpack(), 0, index - 1)
            if time_ns < 0:
                group = record if time_ns == GROUP_START else None
            else:
                append((time_ns, record, metadata or {}, group))
            continue
        if tail:
            skip()  # the whole entry: the record is its last element
            stop = tell()
            cut = stop - len(tail)
            head = data[start]
            if cut > start and 0x81 <= head <= 0x8F and starts(tail, cut):
                # The record less its tail: the same pairs under a map header one smaller.
                reader.feed(_FIXMAP_LESS[head] + data[start + 1 : cut])
                fed += cut - start
                try:
                    less: dict[Any, Any] | None = read()
                except Exception:  # the walk below decides
                    less = None
                if less is not None and reader.tell() == fed:
                    less[tail_key] = tail_value
                    append((seconds * _NS + nanos, less, {}, group))
                    continue
                reader = msgpack.Unpacker(**reader_size, **options)  # drops the bytes left
                read = reader.unpack
                fed = 0
            part = data[start:stop]
            walker = msgpack.Unpacker(max_buffer_size=len(part), **options)
            walker.feed(part)
            record, tail_at, tail_key, tail_value = _walk_record(walker, part, last, limits)
            tail = part[tail_at:] if tail_at >= 0 else b""
        else:
            unpacker.read_array_header()
            skip()  # the head, read above
            record, tail_at, tail_key, tail_value = _walk_record(unpacker, data, last, limits)
            tail = data[tail_at : tell()] if tail_at >= 0 else b""
        append((seconds * _NS + nanos, record, {}, group))
    return events


def _walk_record(
    unpacker: msgpack.Unpacker, data: bytes, last: dict[Any, tuple[bytes, Any]], limits: Limits
) -> tuple[dict[Any, Any], int, Any, Any]:
    """Decode the record map at the unpacker's position (in ``data``) key by key.

    A map value equal, as bytes, to the same key's in ``last`` (the record before's) is shared, and
    ``last`` is updated. Returns the record and, when its last value is a map, the offset of its last
    pair in ``data`` with that pair's key and value (else -1, None, None).
    """
    unpack = unpacker.unpack
    tell = unpacker.tell
    is_map = _MAP_START
    record: dict[Any, Any] = {}
    pair_at = -1
    key: Any = None
    value: Any = None
    for _ in range(unpacker.read_map_header()):
        pair_at = tell()
        key = unpack()
        start = tell()
        if is_map[data[start]]:
            unpacker.skip()
            value_bytes = data[start : tell()]
            seen = last.get(key)
            if seen is not None and seen[0] == value_bytes:
                value = seen[1]
            else:
                value = msgpack.unpackb(value_bytes, **_UNPACK_TEXT, **_bounded(limits, len(value_bytes)))
                last[key] = (value_bytes, value)
        else:
            pair_at = -1
            value = unpack()
        record[key] = value
    if pair_at < 0:
        return record, -1, None, None
    return record, pair_at, key, value


def _forward_entry_count(raw: bytes) -> int | None:
    """The entry count of a Forward request from its array header, without decoding (or None)."""
    position = _second_position(raw)
    if position is None or position >= len(raw):
        return None
    head = raw[position]
    if 0x90 <= head <= 0x9F:
        return head & 0x0F
    if head == 0xDC:
        return int.from_bytes(raw[position + 1 : position + 3], "big")
    if head == 0xDD:
        return int.from_bytes(raw[position + 1 : position + 5], "big")
    return None


def _second_position(raw: bytes) -> int | None:
    """Offset of a request's second element, read from the array and tag headers (or None)."""
    try:
        pos = 0
        head = raw[pos]
        if 0x90 <= head <= 0x9F:
            pos += 1
        elif head == 0xDC:
            pos += 3
        elif head == 0xDD:
            pos += 5
        else:
            return None
        tag_head = raw[pos]
        if 0xA0 <= tag_head <= 0xBF:
            pos += 1 + (tag_head & 0x1F)
        elif tag_head in (0xD9, 0xC4):
            pos += 2 + raw[pos + 1]
        elif tag_head in (0xDA, 0xC5):
            pos += 3 + int.from_bytes(raw[pos + 1 : pos + 3], "big")
        elif tag_head in (0xDB, 0xC6):
            pos += 5 + int.from_bytes(raw[pos + 1 : pos + 5], "big")
        else:
            return None
    except IndexError:
        return None
    return pos


def _peek_second_type(raw: bytes) -> str | None:
    """Classify a frame by the type byte of its second element without decoding it (or None)."""
    pos = _second_position(raw)
    if pos is None or pos >= len(raw):
        return None
    second = raw[pos]
    if 0xA0 <= second <= 0xBF or second in (0xD9, 0xDA, 0xDB, 0xC4, 0xC5, 0xC6):
        return Mode.PACKED
    if 0x90 <= second <= 0x9F or second in (0xDC, 0xDD):
        return Mode.FORWARD
    return Mode.MESSAGE
