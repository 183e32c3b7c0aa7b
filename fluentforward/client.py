"""A Forward protocol client: frame encoders, a JSON-lines reader and a trio connection.

Used by ``fluentforward send``, ``replay --to forward://HOST:PORT``, the benchmark load generator and
the tests. Three layers, from pure to I/O:

1. Pure encoders. :func:`pack_entries` packs events once into a MessagePackEventStream; the frame
   builders wrap those bytes in any carrier mode (Message, Forward, PackedForward,
   CompressedPackedForward) without re-packing. :class:`FrameEncoder` turns ``Entry`` values into
   ready-to-send :class:`Frame` values according to settings. Randomness (chunk ids) is injectable.
2. :func:`read_json_lines` turns a text stream into ``Entry`` values; a bad line raises
   :class:`InputLineError` (a ``ConfigError``) whose message is ``line N: <reason>``.
3. :class:`ForwardClient` / :func:`open_forward_client`: TCP or TLS, the optional HELO/PING/PONG
   handshake, and ``{"ack": chunk}`` waits with at most ``max_in_flight`` unacknowledged chunks.

Invariants: every wait is bounded by a timeout; connection failures and timeouts surface as
``SinkUnavailable``, a reply that breaks the protocol as ``RemoteProtocolError``. Text that came
from the project's decoding convention (lone surrogates for invalid UTF-8) is packed back to the
original bytes. One ``ForwardClient`` is used by one task at a time.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import datetime as dt
import gzip
import hashlib
import math
import reprlib
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from itertools import islice
from typing import Any, TextIO

import attrs
import msgpack
import orjson
import trio
import zstandard

from fluentforward.errors import ConfigError, RemoteProtocolError, SinkUnavailable
from fluentforward.protocol._auth import encode_ping, parse_helo, verify_pong
from fluentforward.protocol._decode import Mode
from fluentforward.protocol._events import Entry
from fluentforward.protocol._eventtime import event_time

__all__ = [
    "COMPRESSIONS",
    "MODES",
    "ClientAuth",
    "ForwardClient",
    "Frame",
    "FrameEncoder",
    "InputLineError",
    "PackedEntries",
    "compress",
    "content_chunk_id",
    "encode_compressed_packed_forward",
    "encode_event_time",
    "encode_forward",
    "encode_message",
    "encode_packed_forward",
    "frame_options",
    "new_chunk_id",
    "open_connection",
    "open_forward_client",
    "pack_entries",
    "read_json_lines",
]

MODES = (Mode.MESSAGE, Mode.FORWARD, Mode.PACKED, Mode.COMPRESSED)
COMPRESSIONS = ("gzip", "zstd")

# Fluent Bit flushes about 2 MB per chunk; 1000 typical records (~0.5 KiB) stay well under that and
# under every receiver's frame limit, while amortising the per-frame ack round trip.
DEFAULT_BATCH_RECORDS = 1000
# Our server refuses frames above 500k entries (protocol/_limits.py); never build one it would refuse.
MAX_BATCH_RECORDS = 500_000

# A CLI or a benchmark should fail visibly rather than hang on a dead peer. Connecting and the
# handshake are a few round trips on a healthy network; 10 s covers a slow TLS peer.
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
# A write blocks while the server applies backpressure (spool full); Fluentd's send_timeout is 60 s.
DEFAULT_SEND_TIMEOUT = 60.0
# Fluentd waits 190 s for an ack; our server acks after an fsync, so a minute means it is stuck.
DEFAULT_ACK_TIMEOUT = 60.0
# Closing a TLS stream sends close_notify; never let a dead peer hold us up on the way out.
CLOSE_TIMEOUT = 2.0

# Server replies (HELO, PONG, acks) are each under 1 KiB; more buffered than this is not a
# Forward server talking.
MAX_REPLY_BYTES = 64 * 1024
RECEIVE_BYTES = 4096
# Each in-flight chunk is a frame the server may still refuse; a larger window only adds memory.
MAX_IN_FLIGHT = 1024

# `fluentforward send` input: Loki refuses lines over 256 KB by default, so a line past 1 MiB is
# almost certainly the wrong file (binary data without newlines) rather than a log record.
MAX_JSON_LINE_CHARS = 1024 * 1024

CHUNK_ID_BYTES = 16  # the spec's "128 bits unique_id"
GZIP_LEVEL = 6  # zlib's default balance of speed and ratio
ZSTD_LEVEL = 3  # zstd's default

_NS = 1_000_000_000
_EVENT_TIME_MAX_SECONDS = 0xFFFFFFFF
_EMPTY_MAP: Mapping[Any, Any] = {}
_reply_repr = reprlib.Repr()
_reply_repr.maxstring = 60
_reply_repr.maxother = 60

Time = Any  # int seconds or an EventTime msgpack.ExtType (msgpack is untyped)
EventTuple = tuple[Time, Mapping[Any, Any]] | tuple[Time, Mapping[Any, Any], Mapping[Any, Any]]


# --- pure encoders -----------------------------------------------------------------------------


def encode_event_time(time_ns: int) -> msgpack.ExtType:
    """Return ``time_ns`` as an EventTime (ext 0), which packs as fixext8 ``d7 00 <sec> <nsec>``.

    Raises:
        ValueError: the time does not fit EventTime's unsigned 32-bit seconds.
    """
    return event_time(time_ns)


def new_chunk_id(random: bytes | None = None) -> str:
    """Return a chunk id: base64 of 16 random bytes (pass ``random`` for determinism)."""
    raw = secrets.token_bytes(CHUNK_ID_BYTES) if random is None else random
    if len(raw) != CHUNK_ID_BYTES:
        raise ValueError(f"a chunk id needs {CHUNK_ID_BYTES} random bytes, got {len(raw)}")
    return base64.b64encode(raw).decode("ascii")


def content_chunk_id(entries: bytes) -> str:
    """Return Fluent Bit's (>= 5.0.9) chunk id: base64 of the first 16 bytes of SHA-512(entries).

    The same entries always get the same id, so a resent chunk is recognisable as a retry.
    """
    return base64.b64encode(hashlib.sha512(entries).digest()[:CHUNK_ID_BYTES]).decode("ascii")


@attrs.frozen(kw_only=True)
class PackedEntries:
    """Events packed once: ``data`` is the concatenated msgpack entries, ``count`` how many."""

    data: bytes
    count: int


def _pack_stream(entries: Sequence[EventTuple], v2: bool, unicode_errors: str | None) -> bytes:
    packer = msgpack.Packer(autoreset=False, unicode_errors=unicode_errors)
    pack = packer.pack
    header = packer.pack_array_header
    if v2:
        for entry in entries:
            header(2)
            header(2)
            pack(entry[0])
            pack(entry[2] if len(entry) == 3 else _EMPTY_MAP)
            pack(entry[1])
    else:
        for entry in entries:
            if len(entry) == 2:
                pack(entry)  # a 2-tuple packs as the [time, record] array in one C call
            else:
                header(2)
                pack(entry[0])
                pack(entry[1])
    return packer.bytes()  # type: ignore[no-any-return]


def pack_entries(entries: Sequence[EventTuple], *, v2: bool = False) -> PackedEntries:
    """Pack ``(time, record)`` or ``(time, record, metadata)`` tuples into a MessagePackEventStream.

    Args:
        entries: the events; time is int seconds or an EventTime.
        v2: emit Fluent Bit v2 entries ``[[time, metadata], record]`` (metadata ``{}`` if absent)
            instead of ``[time, record]`` (metadata dropped).

    Raises:
        TypeError, ValueError: a record holds a value msgpack cannot encode.
    """
    try:
        data = _pack_stream(entries, v2, None)
    except UnicodeEncodeError:
        # Text with lone surrogates came from invalid UTF-8 on the wire: put those bytes back.
        # Tried second because strict UTF-8 packing is about a third faster.
        data = _pack_stream(entries, v2, "surrogateescape")
    return PackedEntries(data=data, count=len(entries))


def _packb(value: object) -> bytes:
    try:
        return msgpack.packb(value)  # type: ignore[no-any-return]
    except UnicodeEncodeError:  # lone surrogates: see pack_entries
        return msgpack.packb(value, unicode_errors="surrogateescape")  # type: ignore[no-any-return]


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 0x10000:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def frame_options(
    *,
    chunk: str | None = None,
    size: int | None = None,
    compressed: str | None = None,
    fluent_signal: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Build an option map in Fluent Bit's key order; None when there is nothing to send."""
    options: dict[str, Any] = {}
    if chunk is not None:
        options["chunk"] = chunk
    if size is not None:
        options["size"] = size
    if compressed is not None:
        options["compressed"] = compressed
    if fluent_signal is not None:
        options["fluent_signal"] = fluent_signal
    if extra:
        options.update(extra)
    return options or None


def encode_message(
    tag: str, time: Time, record: Mapping[Any, Any], options: Mapping[str, Any] | None = None
) -> bytes:
    """Encode Message mode: ``[tag, time, record]`` or ``[tag, time, record, options]``."""
    return _packb((tag, time, record) if options is None else (tag, time, record, options))


def _wrap(tag: str, second: bytes, options: Mapping[str, Any] | None) -> bytes:
    if options is None:
        return b"".join((b"\x92", _packb(tag), second))
    return b"".join((b"\x93", _packb(tag), second, _packb(options)))


def encode_forward(tag: str, entries: PackedEntries, options: Mapping[str, Any] | None = None) -> bytes:
    """Encode Forward mode ``[tag, [entry, ...], options?]`` around already packed entries."""
    return _wrap(tag, _array_header(entries.count) + entries.data, options)


def encode_packed_forward(
    tag: str, entries: PackedEntries, options: Mapping[str, Any] | None = None
) -> bytes:
    """Encode PackedForward ``[tag, bin(entries), options?]``."""
    return _wrap(tag, _packb(entries.data), options)


def compress(data: bytes, compression: str) -> bytes:
    """Compress with ``"gzip"`` (mtime 0, so the output is deterministic) or ``"zstd"``."""
    if compression == "gzip":
        return gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0)
    if compression == "zstd":
        # The frame records the content size, which lets the receiver bound its allocation.
        return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data)
    raise ValueError(f"unknown compression {compression!r}; expected one of {COMPRESSIONS}")


def encode_compressed_packed_forward(
    tag: str,
    entries: PackedEntries,
    *,
    compression: str = "gzip",
    options: Mapping[str, Any] | None = None,
) -> bytes:
    """Encode CompressedPackedForward ``[tag, bin(compressed entries), {..., compressed}]``."""
    merged = dict(options or {})
    merged["compressed"] = compression
    return _wrap(tag, _packb(compress(entries.data, compression)), merged)


@attrs.frozen(kw_only=True)
class Frame:
    """One encoded request, ready to send; ``chunk`` set means the server must ack it."""

    data: bytes
    chunk: str | None = None
    records: int = 1


def _copy_options(options: Mapping[str, Any]) -> dict[str, Any]:
    return dict(options)


def _check_mode(_instance: object, _attribute: object, value: str) -> None:
    if value not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {value!r}")


def _check_compression(_instance: object, _attribute: object, value: str) -> None:
    if value not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {value!r}")


@attrs.frozen(kw_only=True)
class FrameEncoder:
    """Encodes ``Entry`` values into frames, like an out_forward configured with these settings.

    Attributes:
        mode: ``message`` (one event per frame, metadata in option ``metadata``), ``forward``,
            ``packed`` or ``compressed``.
        v2_entries: Forward/Packed entries as ``[[time, metadata], record]`` (Fluent Bit >= 5.0.5
            default); otherwise ``[time, record]`` and metadata is dropped (every receiver reads it).
        time_as_integer: int seconds instead of EventTime (Fluentd v0.12 compatibility).
        compression: ``gzip`` or ``zstd`` for ``compressed`` mode.
        require_ack: give each frame a chunk id; the server must answer ``{"ack": chunk}``.
        content_chunk_ids: derive chunk ids from the entries (stable across resends) instead of
            drawing them at random.
        send_size: add option ``size`` (Fluentd always sends it); not used in message mode.
        fluent_signal: add option ``fluent_signal`` (Fluent Bit sends 0 for logs).
        extra_options: more option keys, like Fluent Bit's ``add_option``.
        batch_records: events per frame, except in message mode.
        random_bytes: randomness for chunk ids (``secrets.token_bytes``; inject for tests).
    """

    mode: str = attrs.field(default=Mode.FORWARD, validator=_check_mode)
    v2_entries: bool = False
    time_as_integer: bool = False
    compression: str = attrs.field(default="gzip", validator=_check_compression)
    require_ack: bool = False
    content_chunk_ids: bool = False
    send_size: bool = True
    fluent_signal: int | None = None
    extra_options: Mapping[str, Any] = attrs.field(factory=dict, converter=_copy_options)
    batch_records: int = attrs.field(
        default=DEFAULT_BATCH_RECORDS,
        validator=[attrs.validators.ge(1), attrs.validators.le(MAX_BATCH_RECORDS)],
    )
    random_bytes: Callable[[int], bytes] = attrs.field(default=secrets.token_bytes, eq=False, repr=False)

    def encode(self, tag: str, entries: Iterable[Entry]) -> Iterator[Frame]:
        """Yield frames for ``entries``, consuming them lazily, ``batch_records`` at a time."""
        if self.mode == Mode.MESSAGE:
            for entry in entries:
                yield self.encode_event(tag, entry)
            return
        it = iter(entries)
        while batch := list(islice(it, self.batch_records)):
            yield self.encode_batch(tag, batch)

    def _time(self, time_ns: int) -> Time:
        return time_ns // _NS if self.time_as_integer else event_time(time_ns)

    def _chunk(self, content: Callable[[], bytes]) -> str | None:
        if not self.require_ack:
            return None
        if self.content_chunk_ids:
            return content_chunk_id(content())
        return new_chunk_id(self.random_bytes(CHUNK_ID_BYTES))

    def encode_event(self, tag: str, entry: Entry) -> Frame:
        """Encode one event in Message mode (its metadata, if any, goes into option ``metadata``)."""
        time_value = self._time(entry.time_ns)
        chunk = self._chunk(lambda: _packb((time_value, entry.record)))
        options = frame_options(chunk=chunk, fluent_signal=self.fluent_signal, extra=self.extra_options)
        if entry.metadata:
            options = {**(options or {}), "metadata": entry.metadata}
        return Frame(data=encode_message(tag, time_value, entry.record, options), chunk=chunk)

    def encode_batch(self, tag: str, entries: Sequence[Entry]) -> Frame:
        """Encode ``entries`` as one Forward, PackedForward or CompressedPackedForward frame."""
        if self.v2_entries:
            packed = pack_entries([(self._time(e.time_ns), e.record, e.metadata) for e in entries], v2=True)
        else:
            packed = pack_entries([(self._time(e.time_ns), e.record) for e in entries])
        chunk = self._chunk(lambda: packed.data)
        options = frame_options(
            chunk=chunk,
            size=packed.count if self.send_size else None,
            fluent_signal=self.fluent_signal,
            extra=self.extra_options,
        )
        if self.mode == Mode.FORWARD:
            data = encode_forward(tag, packed, options)
        elif self.mode == Mode.PACKED:
            data = encode_packed_forward(tag, packed, options)
        elif self.mode == Mode.COMPRESSED:
            data = encode_compressed_packed_forward(
                tag, packed, compression=self.compression, options=options
            )
        else:
            raise ValueError(f"encode_batch does not build {self.mode!r} frames")
        return Frame(data=data, chunk=chunk, records=packed.count)


# --- JSON lines input --------------------------------------------------------------------------


class InputLineError(ConfigError):
    """A line of ``fluentforward send`` input is unusable; the message reads ``line N: <reason>``.

    Attributes:
        line: 1-based line number.
        reason: what is wrong with it.
    """

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"line {line}: {reason}")
        self.line = line
        self.reason = reason


def _parse_time(value: Any) -> int:
    """Return Unix nanoseconds for a time field (seconds as a number, or RFC 3339 text)."""
    if isinstance(value, bool):
        raise TypeError("a boolean is not a time")
    if isinstance(value, int):
        time_ns = value * _NS
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("not a finite number")
        # Split first: seconds * 1e9 as one float loses the sub-microsecond digits.
        seconds = math.floor(value)
        time_ns = seconds * _NS + round((value - seconds) * _NS)
    elif isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an RFC 3339 time") from None
        if parsed.tzinfo is None:  # no offset given: read it as UTC, as Fluent Bit's parsers do
            parsed = parsed.replace(tzinfo=dt.UTC)
        delta = parsed - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
        time_ns = (delta.days * 86_400 + delta.seconds) * _NS + delta.microseconds * 1000
    else:
        raise TypeError(f"a {type(value).__name__} is not a time")
    if not 0 <= time_ns // _NS <= _EVENT_TIME_MAX_SECONDS:
        raise ValueError("time is outside 1970..2106, the range of EventTime")
    return time_ns


def read_json_lines(
    stream: TextIO,
    *,
    time_key: str | None = None,
    keep_time_key: bool = False,
    now_ns: Callable[[], int] = time.time_ns,
) -> Iterator[Entry]:
    """Yield one ``Entry`` per JSON object line; blank lines are skipped.

    Args:
        stream: text input (a file or stdin).
        time_key: record field holding the event time (Unix seconds, or RFC 3339 text, UTC when no
            offset); records without it are stamped with ``now_ns()``.
        keep_time_key: leave the time field in the record (by default it is removed).
        now_ns: clock for records without a time.

    Raises:
        InputLineError: a line is not a JSON object, is too long, or has an unusable time.
    """
    line_no = 0
    while line := stream.readline(MAX_JSON_LINE_CHARS + 1):
        line_no += 1
        if len(line) > MAX_JSON_LINE_CHARS and not line.endswith("\n"):
            raise InputLineError(line_no, f"longer than {MAX_JSON_LINE_CHARS} characters")
        if not line.strip():
            continue
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise InputLineError(line_no, f"invalid JSON: {exc}") from None
        if not isinstance(record, dict):
            raise InputLineError(line_no, f"expected a JSON object, got {type(record).__name__}")
        if time_key is not None and time_key in record:
            value = record[time_key] if keep_time_key else record.pop(time_key)
            try:
                time_ns = _parse_time(value)
            except (TypeError, ValueError) as exc:
                raise InputLineError(line_no, f"field {time_key!r}: {exc}") from None
        else:
            time_ns = now_ns()
        yield Entry(time_ns=time_ns, record=record)


# --- the connection ----------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class ClientAuth:
    """Our side of the handshake: what Fluent Bit calls shared_key, self_hostname, username, password.

    ``self_hostname`` must differ from the server's (Fluentd's rule, which we apply too).
    """

    shared_key: bytes = attrs.field(repr=False)
    self_hostname: str
    username: str = ""
    password: bytes = attrs.field(default=b"", repr=False)


@contextlib.contextmanager
def _sink_errors(doing: str) -> Iterator[None]:
    """Report network failures and timeouts as SinkUnavailable naming what we were doing."""
    try:
        yield
    except trio.TooSlowError as exc:
        raise SinkUnavailable(f"{doing}: timed out") from exc
    except (trio.BrokenResourceError, OSError) as exc:
        raise SinkUnavailable(f"{doing}: {exc or type(exc).__name__}") from exc


async def open_connection(
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> trio.abc.Stream:
    """Open TCP (and TLS when ``ssl_context`` is given, handshake done) to ``host:port``.

    Raises:
        SinkUnavailable: refused, unreachable, timed out, or the TLS handshake failed.
    """
    with _sink_errors(f"connecting to {host}:{port}"), trio.fail_after(connect_timeout):
        tcp = await trio.open_tcp_stream(host, port)
        if ssl_context is None:
            return tcp
        tls = trio.SSLStream(tcp, ssl_context, server_hostname=server_hostname or host)
        try:
            await tls.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(tls)
            raise
        return tls


def _check_max_in_flight(value: int) -> None:
    if not 1 <= value <= MAX_IN_FLIGHT:
        raise ConfigError(f"max_in_flight must be within 1..{MAX_IN_FLIGHT}, got {value}")


class ForwardClient:
    """A Forward connection over any trio stream: handshake, frames out, acks in.

    Args:
        stream: a connected stream (see :func:`open_connection`; tests may pass a memory stream).
        ack_timeout: seconds to wait for each ack.
        send_timeout: seconds one write may block (the server applies backpressure by not reading).
        max_in_flight: most chunks sent and not yet acked (1, like a Fluent Bit output worker:
            ``send`` then returns only once its chunk is acked).
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        ack_timeout: float = DEFAULT_ACK_TIMEOUT,
        send_timeout: float = DEFAULT_SEND_TIMEOUT,
        max_in_flight: int = 1,
    ) -> None:
        _check_max_in_flight(max_in_flight)
        self._stream = stream
        self._ack_timeout = ack_timeout
        self._send_timeout = send_timeout
        self._max_in_flight = max_in_flight
        self._unpacker = msgpack.Unpacker(
            raw=False,
            unicode_errors="surrogateescape",
            strict_map_key=False,
            max_buffer_size=MAX_REPLY_BYTES,
        )
        self._pending: collections.deque[str] = collections.deque()
        self.keepalive = True  # from HELO: False means the server closes after one request
        self.frames_sent = 0
        self.acks_received = 0

    @property
    def in_flight(self) -> int:
        """Chunks sent and not yet acknowledged."""
        return len(self._pending)

    async def handshake(
        self,
        auth: ClientAuth,
        *,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        salt: bytes | None = None,
    ) -> None:
        """Receive HELO, send PING, verify PONG.

        Args:
            auth: our credentials.
            handshake_timeout: seconds to wait for each of HELO and PONG.
            salt: PING salt (default: 32 random hex characters, as Fluentd sends).

        Raises:
            RemoteProtocolError: bad HELO/PONG, authentication refused, digest mismatch.
            SinkUnavailable: the connection failed or a reply did not come in time.
        """
        helo = await self._receive(handshake_timeout, "HELO (does the server require a shared key?)")
        nonce, auth_salt, self.keepalive = parse_helo(helo)
        salt = secrets.token_hex(CHUNK_ID_BYTES).encode("ascii") if salt is None else salt
        ping = encode_ping(
            auth.self_hostname,
            salt,
            nonce,
            auth.shared_key,
            username=auth.username,
            password=auth.password,
            auth_salt=auth_salt,
        )
        await self._send_all(ping)
        pong = await self._receive(handshake_timeout, "PONG")
        verify_pong(
            pong,
            salt=salt,
            nonce=nonce,
            shared_key=auth.shared_key,
            client_hostname=auth.self_hostname,
        )

    async def send(self, frame: Frame) -> None:
        """Send one frame; if it has a chunk id, keep at most ``max_in_flight`` chunks unacked.

        Raises:
            RemoteProtocolError: an ack for a chunk we are not waiting for, or another reply.
            SinkUnavailable: the connection failed, or a write or an ack timed out.
        """
        await self._send_all(frame.data)
        self.frames_sent += 1
        if frame.chunk is not None:
            self._pending.append(frame.chunk)
            while len(self._pending) >= self._max_in_flight:
                await self._receive_ack()

    async def wait_for_acks(self) -> None:
        """Wait until every chunk sent so far is acknowledged (same errors as ``send``)."""
        while self._pending:
            await self._receive_ack()

    async def aclose(self) -> None:
        """Close the stream (without waiting for acks: call ``wait_for_acks`` first)."""
        with trio.move_on_after(CLOSE_TIMEOUT), contextlib.suppress(trio.BrokenResourceError, OSError):
            await self._stream.aclose()

    async def _send_all(self, data: bytes) -> None:
        with _sink_errors("sending"), trio.fail_after(self._send_timeout):
            await self._stream.send_all(data)

    async def _receive(self, seconds: float, what: str) -> Any:
        with _sink_errors(f"waiting for {what}"), trio.fail_after(seconds):
            while True:
                try:
                    return self._unpacker.unpack()
                except msgpack.OutOfData:
                    pass
                except Exception as exc:  # msgpack raises assorted types for malformed input
                    raise RemoteProtocolError(f"undecodable reply while waiting for {what}") from exc
                data = await self._stream.receive_some(RECEIVE_BYTES)
                if not data:
                    raise SinkUnavailable(f"waiting for {what}: connection closed by the server")
                try:
                    self._unpacker.feed(data)
                except msgpack.BufferFull as exc:
                    raise RemoteProtocolError(f"reply over {MAX_REPLY_BYTES} bytes") from exc

    async def _receive_ack(self) -> None:
        reply = await self._receive(self._ack_timeout, "ack")
        ack = reply.get("ack") if isinstance(reply, dict) else None
        if isinstance(ack, str) and ack in self._pending:
            self._pending.remove(ack)
            self.acks_received += 1
            return
        if ack is not None:
            raise RemoteProtocolError(
                f"ack mismatch: got {_reply_repr.repr(ack)}, "
                f"waiting for {_reply_repr.repr(list(self._pending))}"
            )
        if isinstance(reply, list) and reply and reply[0] == "HELO":
            raise RemoteProtocolError("the server sent HELO: it requires a shared-key handshake")
        raise RemoteProtocolError(f"expected an ack, got {_reply_repr.repr(reply)}")


@contextlib.asynccontextmanager
async def open_forward_client(
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    auth: ClientAuth | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    ack_timeout: float = DEFAULT_ACK_TIMEOUT,
    send_timeout: float = DEFAULT_SEND_TIMEOUT,
    max_in_flight: int = 1,
) -> AsyncIterator[ForwardClient]:
    """Connect (TLS when ``ssl_context`` is given), handshake when ``auth`` is given, yield a client.

    On a normal exit it waits for outstanding acks, then closes; on an error it just closes.

    Raises:
        SinkUnavailable: connecting, sending or waiting failed.
        RemoteProtocolError: the server's replies broke the protocol or refused our credentials.
    """
    _check_max_in_flight(max_in_flight)  # before connecting, so a bad setting leaks no socket
    stream = await open_connection(
        host,
        port,
        ssl_context=ssl_context,
        server_hostname=server_hostname,
        connect_timeout=connect_timeout,
    )
    client = ForwardClient(
        stream, ack_timeout=ack_timeout, send_timeout=send_timeout, max_in_flight=max_in_flight
    )
    try:
        if auth is not None:
            await client.handshake(auth, handshake_timeout=handshake_timeout)
        yield client
        await client.wait_for_acks()
    finally:
        await client.aclose()
