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
import zlib
from collections.abc import Iterator
from typing import Any

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
from fluentforward.protocol._limits import DEFAULT_LIMITS, Limits

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


def _bounded(limits: Limits) -> dict[str, int]:
    """Array and map length caps for unpacking: no container may be larger than a whole frame's
    entry limit, so a small request cannot make us build millions of objects."""
    cap = limits.max_entries_per_frame
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
        with _no_gc():
            return msgpack.unpackb(raw, **_UNPACK_RAW, **_bounded(limits))
    except Exception as exc:
        raise RemoteProtocolError(f"invalid msgpack ({type(exc).__name__})", offset=where) from exc


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
    return _time_ns(head, where, index), metadata, record


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
        # instead of a Python iteration per entry (the copy costs far less than the loop).
        try:
            with _no_gc():
                entries: list[Any] = msgpack.unpackb(
                    _array_header(count) + inflated,
                    **(_UNPACK_TEXT if text else _UNPACK_RAW),
                    **_bounded(limits),
                )
        except Exception as exc:  # msgpack raises several types; all mean a corrupt stream
            raise RemoteProtocolError(
                f"packed entries are not a msgpack stream: {type(exc).__name__}", offset=where
            ) from exc
        return mode, entries
    unpacker = msgpack.Unpacker(
        max_buffer_size=max(len(inflated), 1), **(_UNPACK_TEXT if text else _UNPACK_RAW), **_bounded(limits)
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


def decode_frame(raw: bytes, limits: Limits = DEFAULT_LIMITS) -> DecodedFrame:
    """Decode a whole stored frame into entries (delivery path).

    Raises:
        RemoteProtocolError: the bytes are not one valid Forward request.
    """
    mode_hint = _peek_second_type(raw)
    try:
        # PackedForward payloads are decoded with raw=True first: Fluentd sends them as str32 holding
        # binary, which must not go through a UTF-8 decoder.
        with _no_gc():
            request = msgpack.unpackb(
                raw, **(_UNPACK_RAW if mode_hint == Mode.PACKED else _UNPACK_TEXT), **_bounded(limits)
            )
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
