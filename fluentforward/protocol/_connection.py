"""The server side of one Forward connection, as a sans-IO state machine.

Bytes go in through ``receive_data``; events come out. Replies (HELO, PONG, acks) are queued and drained
with ``data_to_send``. Nothing here does I/O, reads a clock or draws random numbers: the nonce and auth
salt are arguments, so tests compare bytes exactly.

States and transitions (all of them live in this file)::

    AWAIT_PING --PING ok--> ESTABLISHED --EOF--> CLOSED
        |  \\--PING bad--> CLOSED (PONG false queued)
        \\--anything else--> ERROR
    ESTABLISHED --invalid request--> ERROR

A connection with a shared key starts in AWAIT_PING with the HELO queued; one without starts
ESTABLISHED. No data frame is accepted before the handshake succeeds: Fluent Bit keeps a socket after a
failed PONG and sends data on it (captured in ``shared_key_after_failed_pong.bin``).
"""

from __future__ import annotations

import enum
from typing import Any

import msgpack

from fluentforward.errors import LocalProtocolError, RemoteProtocolError
from fluentforward.protocol import _auth
from fluentforward.protocol._decode import RequestInfo, inspect_request, validate_request
from fluentforward.protocol._decode import decode_raw_request as _decode_raw
from fluentforward.protocol._events import (
    Ack,
    EntriesReceived,
    Event,
    HandshakeCompleted,
    HandshakeFailed,
    Heartbeat,
)
from fluentforward.protocol._limits import DEFAULT_LIMITS, Limits

__all__ = ["ServerConnection", "State"]

# Bytes handed to the msgpack unpacker at a time (see receive_data).
FEED_SLICE = 16 * 1024
# Chunk ids are echoed byte for byte: decoded with surrogateescape, packed back the same way. One
# packer serves every connection (pack() is synchronous), instead of a 128 KiB buffer per connection.
_ACK_PACKER = msgpack.Packer(unicode_errors="surrogateescape")


class State(enum.Enum):
    """Where a connection is in its life."""

    AWAIT_PING = "await_ping"
    ESTABLISHED = "established"
    CLOSED = "closed"
    ERROR = "error"


class ServerConnection:
    """One Forward connection, server side.

    Args:
        auth: shared-key (and optional user) authentication; None accepts data at once.
        nonce: the HELO nonce (16 random bytes in production); only used with ``auth``.
        auth_salt: the HELO user-auth salt; only used with ``auth``.
        limits: decoding bounds.
    """

    def __init__(
        self,
        *,
        auth: _auth.SharedKeyAuth | None = None,
        nonce: bytes = b"",
        auth_salt: bytes = b"",
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self._auth = auth
        self._nonce = nonce
        # HELO announces user authentication with a non-empty auth salt; without users it is empty.
        self._auth_salt = auth_salt if auth is not None and auth.user_auth else b""
        self._limits = limits
        # The unpacker only finds where each request ends (skip() builds no objects and keeps no
        # consumed bytes); the request's bytes are kept once, in self._chunks, then inspected
        # (``inspect_request``) or, when that cannot vouch for them, decoded whole.
        # A small first buffer: msgpack's default is up to 1 MiB per connection.
        self._unpacker = msgpack.Unpacker(
            max_buffer_size=limits.max_frame_bytes, read_size=min(FEED_SLICE, limits.max_frame_bytes)
        )
        self._chunks: list[bytes] = []  # bytes received but not yet part of a completed request
        self._pending = 0  # len(b"".join(self._chunks))
        self._base = 0  # stream offset of the first pending byte
        self._outgoing = bytearray()
        if auth is None:
            self.state = State.ESTABLISHED
        else:
            self.state = State.AWAIT_PING
            self._outgoing += _auth.encode_helo(nonce, self._auth_salt, keepalive=True)

    @property
    def bytes_received(self) -> int:
        """Total bytes fed so far (the stream offset of the next byte)."""
        return self._base + self._pending

    @property
    def buffered_bytes(self) -> int:
        """Bytes of an incomplete request held for this connection."""
        return self._pending

    def receive_data(self, data: bytes | bytearray) -> list[Event]:
        """Feed bytes from the peer (``b""`` means EOF) and return the completed events.

        Raises:
            RemoteProtocolError: the peer broke the protocol; the state is ERROR and the connection
                must be closed. Events completed earlier in the same call are discarded with it: they
                were not acked, so the client still holds them.
            LocalProtocolError: called after the connection ended.
        """
        if self.state in (State.CLOSED, State.ERROR):
            raise LocalProtocolError(f"receive_data in state {self.state.value}")
        if not data:
            return self._end_of_stream()
        chunk = bytes(data)
        events: list[Event] = []
        try:
            self._chunks.append(chunk)
            self._pending += len(chunk)
            view = memoryview(chunk)
            # Fed in slices: skip() consumes what it parsed after each one, so the unpacker's own
            # buffer stays near FEED_SLICE instead of growing to the largest read.
            for offset in range(0, len(view), FEED_SLICE):
                self._unpacker.feed(view[offset : offset + FEED_SLICE])
                self._complete_requests(events)
                if self.state not in (State.ESTABLISHED, State.AWAIT_PING):
                    break
            if self._pending > self._limits.max_frame_bytes:
                raise RemoteProtocolError(
                    f"request exceeds max_frame_bytes ({self._limits.max_frame_bytes})", offset=self._base
                )
        except RemoteProtocolError:
            self.state = State.ERROR
            raise
        except msgpack.BufferFull:
            self.state = State.ERROR
            raise RemoteProtocolError(
                f"request exceeds max_frame_bytes ({self._limits.max_frame_bytes})", offset=self._base
            ) from None
        except Exception as exc:  # FormatError, StackError, ValueError...: all corrupt input
            self.state = State.ERROR
            raise RemoteProtocolError(f"invalid msgpack ({type(exc).__name__})", offset=self._base) from exc
        return events

    def _complete_requests(self, events: list[Event]) -> None:
        while self.state in (State.ESTABLISHED, State.AWAIT_PING):
            try:
                self._unpacker.skip()
            except msgpack.OutOfData:
                return
            end = self._unpacker.tell()
            start = self._base
            raw = self._take(end - start)
            info = inspect_request(raw, start, self._limits) if self.state is State.ESTABLISHED else None
            if info is not None:  # the common case: records checked in place, none built
                events.append(self._received(info, raw, start))
                continue
            event = self._handle(_decode_raw(raw, start, self._limits), raw, start)
            if event is not None:
                events.append(event)

    def _take(self, size: int) -> bytes:
        """Remove and return the first ``size`` pending bytes, copying them at most once."""
        chunks = self._chunks
        taken = index = 0
        while index < len(chunks) and taken + len(chunks[index]) <= size:
            taken += len(chunks[index])
            index += 1
        if taken == size:  # the request ends on a chunk boundary
            raw = b"".join(chunks[:index])  # a single chunk is returned as is, not copied
            del chunks[:index]
        else:
            cut = size - taken
            boundary = chunks[index]
            raw = b"".join([*chunks[:index], boundary[:cut]])
            chunks[: index + 1] = [boundary[cut:]]
        self._pending -= size
        self._base += size
        return raw

    def _handle(self, request: Any, raw: bytes, start: int) -> Event | None:
        if self.state is State.AWAIT_PING:
            return self._handshake(request, start)
        if request is None:  # TCP heartbeat (Fluentd, Vector ignore it too)
            return Heartbeat()
        return self._received(validate_request(request, start, self._limits), raw, start)

    def _received(self, info: RequestInfo, raw: bytes, start: int) -> EntriesReceived:
        return EntriesReceived(
            tag=info.tag,
            signal=info.signal,
            record_count=info.record_count,
            raw=raw,
            chunk=info.chunk,
            offset=start,
            mode=info.mode,
        )

    def _handshake(self, request: Any, start: int) -> Event:
        assert self._auth is not None
        if type(request) is not list or not request or request[0] != b"PING":
            raise RemoteProtocolError("data before the handshake: expected PING", offset=start)
        verdict, pong = _auth.respond_to_ping(
            request, nonce=self._nonce, auth_salt=self._auth_salt, auth=self._auth
        )
        self._outgoing += pong
        if isinstance(verdict, _auth.PingRejected):
            self.state = State.CLOSED
            return HandshakeFailed(reason=verdict.reason)
        self.state = State.ESTABLISHED
        outcome = verdict
        return HandshakeCompleted(client_hostname=outcome.client_hostname, username=outcome.username)

    def _end_of_stream(self) -> list[Event]:
        if self._pending:
            self.state = State.ERROR
            raise RemoteProtocolError(
                f"connection closed inside a request ({self._pending} bytes buffered)", offset=self._base
            )
        self.state = State.CLOSED
        return []

    def send(self, command: Ack) -> None:
        """Queue ``{"ack": chunk}`` for a chunk that is durable.

        Raises:
            LocalProtocolError: the connection is not ESTABLISHED.
        """
        if self.state is not State.ESTABLISHED:
            raise LocalProtocolError(f"cannot ack in state {self.state.value}")
        self._outgoing += _ACK_PACKER.pack({"ack": command.chunk})

    def data_to_send(self) -> bytes:
        """Drain the queued reply bytes (HELO, PONG, acks). Never blocks, never does I/O."""
        out = bytes(self._outgoing)
        self._outgoing.clear()
        return out
