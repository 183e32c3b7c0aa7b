"""The trio glue around the sans-IO core: accept, feed bytes, spool, ack.

One task per connection. Each frame is appended to the spool and its ack is written only after the
append returned (the fsync covering it is done). When the spool is full the append waits, so the task
stops reading from that client (TCP backpressure) and its ack is withheld; nothing is dropped.

Resource handling: every connection is bounded by the protocol limits (frame and decompressed sizes)
and closed after ``idle_timeout`` of silence; at most ``max_connections`` are served at once.
Error handling: a peer that breaks the protocol gets one warning naming the peer, the reason and the
byte offset, and its connection is closed; other connections are unaffected. A bug in a handler is
logged with its traceback and closes only that connection.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import itertools
import os
import secrets
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import attrs
import structlog
import trio

from fluentforward.config import ServerConfig
from fluentforward.errors import ConfigError, RemoteProtocolError, SpoolError
from fluentforward.protocol import (
    Ack,
    EntriesReceived,
    HandshakeCompleted,
    HandshakeFailed,
    Heartbeat,
    ServerConnection,
    State,
)
from fluentforward.spool import FrameHeader, Spool

__all__ = ["RECEIVE_BYTES", "ServerState", "ServerStats", "handle_connection", "serve"]

log = structlog.get_logger("fluentforward.server")

# One read's worth: large enough that a 2 MB Fluent Bit flush takes ~32 reads, small enough that a
# thousand idle connections' pending reads cost nothing.
RECEIVE_BYTES = 64 * 1024
# A UDP heartbeat is one byte; anything up to this is answered, larger datagrams are ignored.
UDP_MAX_BYTES = 128

_conn_ids = itertools.count(1)


@attrs.define
class ServerStats:
    """Counters the server keeps (exported as metrics by the operations layer)."""

    connections_total: int = 0
    connections_open: int = 0
    connections_refused: int = 0
    frames: int = 0
    frames_duplicate: int = 0
    records: int = 0
    signal_frames: int = 0
    bytes: int = 0
    acks: int = 0
    heartbeats_tcp: int = 0
    heartbeats_udp: int = 0
    protocol_errors: dict[str, int] = attrs.field(factory=dict)
    handshake_failures: int = 0
    tls_failures: int = 0
    timeouts: dict[str, int] = attrs.field(factory=dict)


@attrs.define
class ServerState:
    """What a running server shares with its handlers and tells its starter."""

    config: ServerConfig
    spool: Spool
    stats: ServerStats = attrs.field(factory=ServerStats)
    port: int = 0
    http_port: int | None = None
    listening: bool = False
    clock: Callable[[], int] = time.time_ns
    drain_deadline: float | None = None
    _shields: set[trio.CancelScope] = attrs.field(factory=set)
    receive_slots: trio.CapacityLimiter = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.receive_slots = trio.CapacityLimiter(self.config.max_receiving)

    @contextlib.contextmanager
    def shielded(self) -> Iterator[None]:
        """Protect a frame's append and ack from shutdown cancellation, up to the drain deadline."""
        scope = trio.CancelScope(shield=True)
        if self.drain_deadline is not None:
            scope.deadline = self.drain_deadline
        self._shields.add(scope)
        try:
            with scope:
                yield
        finally:
            self._shields.discard(scope)

    def start_draining(self, grace: float) -> None:
        """Give every shielded append at most ``grace`` more seconds."""
        self.drain_deadline = trio.current_time() + grace
        for scope in self._shields:
            scope.deadline = min(scope.deadline, self.drain_deadline)


def _peer_name(stream: trio.abc.Stream) -> str:
    sock: Any = getattr(stream, "socket", None)
    if sock is None:
        transport = getattr(stream, "transport_stream", None)
        sock = getattr(transport, "socket", None)
    if sock is None:
        return "memory"
    try:
        address = sock.getpeername()
    except OSError:
        return "unknown"
    if isinstance(address, tuple):
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(address) or "unix"


def _error_reason(message: str) -> str:
    """A bounded label for a protocol error (its message minus numbers and details)."""
    head = message.split(":", 1)[0]
    return "".join(ch for ch in head if not ch.isdigit()).strip()[:60] or "invalid"


def _peer_ip(peer: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    host = peer.rsplit(":", 1)[0].strip("[]")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _allowed(config: ServerConfig, peer: str) -> bool:
    if not config.allow or config.listen.unix_path is not None:
        return True
    address = _peer_ip(peer)
    return address is not None and any(address in network for network in config.allow)


async def handle_connection(stream: trio.abc.Stream, state: ServerState, peer: str | None = None) -> None:
    """Serve one Forward connection until EOF, error, timeout or shutdown."""
    peer = peer or _peer_name(stream)
    config = state.config
    stats = state.stats
    with structlog.contextvars.bound_contextvars(peer=peer, conn_id=next(_conn_ids)):
        if stats.connections_open >= config.max_connections:
            stats.connections_refused += 1
            log.warning("connection_refused", reason="max_connections", limit=config.max_connections)
            await trio.aclose_forcefully(stream)
            return
        if not _allowed(config, peer):
            stats.connections_refused += 1
            log.warning("connection_refused", reason="address not in --allow")
            await trio.aclose_forcefully(stream)
            return
        stats.connections_total += 1
        stats.connections_open += 1
        try:
            if config.tls is not None:
                stream = await _start_tls(stream, config)
            conn = ServerConnection(
                auth=config.auth,
                nonce=secrets.token_bytes(16),
                auth_salt=secrets.token_bytes(16),
                limits=config.limits,
            )
            await _flush(stream, conn)
            await _serve_frames(stream, conn, state, peer)
        except RemoteProtocolError as exc:
            reason = _error_reason(str(exc))
            stats.protocol_errors[reason] = stats.protocol_errors.get(reason, 0) + 1
            log.warning("protocol_error", reason=str(exc), offset=exc.offset)
        except _Timeout as exc:
            stats.timeouts[exc.kind] = stats.timeouts.get(exc.kind, 0) + 1
            log.info("connection_timeout", kind=exc.kind, seconds=exc.seconds, buffered_bytes=exc.buffered)
        except _TlsFailed as exc:
            stats.tls_failures += 1
            log.warning("tls_handshake_failed", reason=str(exc))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("connection_lost", error=str(exc.__cause__ or exc) or type(exc).__name__)
        except SpoolError as exc:
            log.error("spool_append_failed", error=str(exc), action="closing without ack")
        except Exception:
            log.exception("connection_handler_bug")
        finally:
            stats.connections_open -= 1
            await trio.aclose_forcefully(stream)


class _Timeout(Exception):  # noqa: N818 - internal signal, never escapes handle_connection
    def __init__(self, kind: str, seconds: float, buffered: int) -> None:
        super().__init__(kind)
        self.kind = kind
        self.seconds = seconds
        self.buffered = buffered


class _TlsFailed(Exception):  # noqa: N818 - internal signal
    pass


async def _start_tls(stream: trio.abc.Stream, config: ServerConfig) -> trio.SSLStream[trio.abc.Stream]:
    assert config.tls is not None
    tls = trio.SSLStream(stream, config.tls, server_side=True)
    try:
        with trio.fail_after(config.handshake_timeout):
            await tls.do_handshake()
    except trio.TooSlowError:
        raise _TlsFailed(f"no TLS handshake within {config.handshake_timeout:g}s") from None
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__
        raise _TlsFailed(getattr(cause, "reason", None) or str(cause) or "connection broken") from exc
    return tls


def _read_deadline(
    conn: ServerConnection, config: ServerConfig, frame_started: float | None
) -> tuple[float, str]:
    """The deadline for the next read and what it guards: the handshake, a started frame, or idleness."""
    now = trio.current_time()
    if conn.state is State.AWAIT_PING:
        return now + config.handshake_timeout, "handshake"
    if frame_started is not None:
        frame_deadline = frame_started + config.frame_timeout
        if frame_deadline < now + config.idle_timeout:
            return frame_deadline, "frame"
    return now + config.idle_timeout, "idle"


async def _serve_frames(
    stream: trio.abc.Stream, conn: ServerConnection, state: ServerState, peer: str
) -> None:
    """Read, decode, spool and ack until the connection ends.

    Memory is bounded by ``max_receiving`` slots: a connection reads its next chunk (at most
    RECEIVE_BYTES) without one, but must hold a slot from the moment a request is in progress until it
    is spooled. Connections waiting for a slot leave their bytes in the kernel (TCP backpressure).
    """
    config = state.config
    stats = state.stats
    slots = state.receive_slots
    handshake_deadline = trio.current_time() + config.handshake_timeout
    frame_started: float | None = None
    holding = False
    try:
        while conn.state in (State.AWAIT_PING, State.ESTABLISHED):
            deadline, kind = _read_deadline(conn, config, frame_started)
            if kind == "handshake":
                deadline = handshake_deadline
            with trio.move_on_at(deadline) as scope:
                data = await stream.receive_some(RECEIVE_BYTES)
            if scope.cancelled_caught:
                limits = {"handshake": config.handshake_timeout, "frame": config.frame_timeout}
                raise _Timeout(kind, limits.get(kind, config.idle_timeout), conn.buffered_bytes)
            stats.bytes += len(data)
            events = conn.receive_data(data)
            if not conn.buffered_bytes:
                frame_started = None
            elif events or frame_started is None:  # a new request began in this read
                frame_started = trio.current_time()
            if not holding and (events or conn.buffered_bytes):
                await slots.acquire_on_behalf_of(conn)
                holding = True
            # Shielded: once frames are complete, a shutdown lets their appends and acks finish (within
            # the shutdown grace period, which sets this scope's deadline).
            with state.shielded():
                await _handle_events(events, conn, state, peer)
                await _flush(stream, conn)
            closed = not data
            # Drop the last request before waiting for the next: an idle connection must not keep a
            # 2 MB frame alive.
            del events, data
            if holding and not conn.buffered_bytes:  # the slot covers a request until it is spooled
                slots.release_on_behalf_of(conn)
                holding = False
            if closed:
                log.debug("connection_closed_by_peer")
    finally:
        if holding:
            slots.release_on_behalf_of(conn)


async def _handle_events(events: list[Any], conn: ServerConnection, state: ServerState, peer: str) -> None:
    stats = state.stats
    for event in events:
        if isinstance(event, EntriesReceived):
            await _accept(event, conn, state, peer)
        elif isinstance(event, Heartbeat):
            stats.heartbeats_tcp += 1
        elif isinstance(event, HandshakeFailed):
            stats.handshake_failures += 1
            log.warning("handshake_failed", reason=event.reason)
        elif isinstance(event, HandshakeCompleted):
            log.info("handshake_completed", client_hostname=event.client_hostname, user=event.username)


async def _accept(event: EntriesReceived, conn: ServerConnection, state: ServerState, peer: str) -> None:
    config = state.config
    header = FrameHeader(
        recv_time_ns=state.clock(),
        signal=event.signal,
        mode=event.mode,
        peer=peer,
        chunk=event.chunk,
        tag=config.tag_prefix + event.tag,
        source_key=config.source_address_key or "",
        record_count=event.record_count,
    )
    result = await state.spool.append(header, event.raw)
    stats = state.stats
    if result.duplicate:
        stats.frames_duplicate += 1
        log.info("chunk_retry_acked", chunk=event.chunk, records=event.record_count)
    else:
        stats.frames += 1
        stats.records += event.record_count
        if event.signal:
            stats.signal_frames += 1
    if event.chunk is not None:
        conn.send(Ack(chunk=event.chunk))
        stats.acks += 1


async def _flush(stream: trio.abc.Stream, conn: ServerConnection) -> None:
    if data := conn.data_to_send():
        await stream.send_all(data)


async def _udp_heartbeats(sock: trio.socket.SocketType, state: ServerState) -> None:
    """Answer Forward UDP heartbeats (any datagram up to UDP_MAX_BYTES) with a single 0x00 byte."""
    while True:
        try:
            data, address = await sock.recvfrom(UDP_MAX_BYTES + 1)
        except OSError as exc:  # ICMP errors surface here on Linux; keep serving
            log.debug("udp_receive_error", error=str(exc))
            continue
        if len(data) > UDP_MAX_BYTES:
            continue
        state.stats.heartbeats_udp += 1
        try:
            await sock.sendto(b"\x00", address)
        except OSError as exc:
            log.debug("udp_reply_failed", error=str(exc))


async def _open_udp(host: str, port: int, *, reuse_port: bool = False) -> trio.socket.SocketType | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    try:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        await sock.bind((host, port))
    except OSError as exc:
        sock.close()
        log.warning("udp_heartbeat_unavailable", error=str(exc), port=port)
        return None
    return sock


async def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a previous run; refuse if a live server still answers on it."""
    probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await probe.connect(path)
    except ConnectionRefusedError:
        await trio.Path(path).unlink()
        return
    finally:
        probe.close()
    raise ConfigError(f"--listen unix://{path}: address already in use by a running server")


async def _open_unix(config: ServerConfig) -> list[trio.SocketListener]:
    path = config.listen.unix_path
    assert path is not None
    try:
        if not stat.S_ISSOCK((await trio.Path(path).stat()).st_mode):
            raise ConfigError(f"--listen unix://{path}: the path exists and is not a socket")
        await _remove_stale_socket(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError(f"--listen unix://{path}: {exc.strerror or exc}") from exc
    # Bound, listening and given its mode under a temporary name, then renamed into place: a client
    # never finds a socket that refuses connections or has the wrong permissions.
    staging = f"{path}.{os.getpid()}.tmp"
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(staging)
        sock.listen(socket.SOMAXCONN)
        await trio.Path(staging).chmod(config.unix_socket_mode)
        await trio.Path(staging).rename(path)
    except OSError as exc:
        sock.close()
        with contextlib.suppress(OSError):
            await trio.Path(staging).unlink()
        raise ConfigError(f"--listen unix://{path}: {exc.strerror or exc}") from exc
    return [trio.SocketListener(sock)]


async def _open_reuseport(config: ServerConfig) -> list[trio.SocketListener]:
    """One listener with SO_REUSEPORT, so that ``--workers`` processes share the port (Linux)."""
    host = config.listen.host or "0.0.0.0"  # noqa: S104 - the operator chose the address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        await sock.bind((host, config.listen.port))
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"--listen {config.listen}: {exc.strerror or exc}") from exc
    return [trio.SocketListener(sock)]


async def _open_tcp(config: ServerConfig) -> list[trio.SocketListener]:
    if config.listen.unix_path is not None:
        return await _open_unix(config)
    if config.reuse_port:
        return await _open_reuseport(config)
    try:
        return await trio.open_tcp_listeners(config.listen.port, host=config.listen.host or None)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"--listen {config.listen}: address already in use") from exc
        raise ConfigError(f"--listen {config.listen}: {exc.strerror or exc}") from exc


async def serve(
    config: ServerConfig,
    spool: Spool,
    *,
    shutdown: trio.Event | None = None,
    extra_tasks: list[Callable[[ServerState], Awaitable[None]]] | None = None,
    task_status: trio.TaskStatus[ServerState] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the Forward protocol until ``shutdown`` is set (or forever), then drain and return.

    The spool must be open; ``serve`` runs its committer. ``task_status.started`` receives the
    ``ServerState`` (bound ports included), so tests can ``await nursery.start(serve, ...)`` on port 0.

    Raises:
        ConfigError: a listen address cannot be bound.
    """
    state = ServerState(config=config, spool=spool)
    listeners = await _open_tcp(config)
    unix = config.listen.unix_path is not None
    state.port = 0 if unix else listeners[0].socket.getsockname()[1]
    udp = (
        await _open_udp(config.listen.host, state.port, reuse_port=config.reuse_port)
        if config.udp_heartbeat and not unix
        else None
    )
    try:
        await _run(state, listeners, udp, shutdown, extra_tasks or [], task_status)
    finally:
        state.listening = False
        for listener in listeners:
            listener.socket.close()
        if udp is not None:
            udp.close()
    log.info("stopped", frames=state.stats.frames, records=state.stats.records, acks=state.stats.acks)


async def _run(
    state: ServerState,
    listeners: list[trio.SocketListener],
    udp: trio.socket.SocketType | None,
    shutdown: trio.Event | None,
    extra_tasks: list[Callable[[ServerState], Awaitable[None]]],
    task_status: trio.TaskStatus[ServerState],
) -> None:
    config = state.config
    async with trio.open_nursery() as root:
        await root.start(state.spool.run)
        for task in extra_tasks:
            root.start_soon(task, state)
        async with trio.open_nursery() as handlers:
            async with trio.open_nursery() as front:
                front.start_soon(_accept_loop, listeners, handlers, state)
                if udp is not None:
                    front.start_soon(_udp_heartbeats, udp, state)
                state.listening = True
                log.info(
                    "listening",
                    address=str(attrs.evolve(config.listen, port=state.port)),
                    tls=config.tls is not None,
                    shared_key=config.auth is not None,
                    user_auth=config.auth is not None and config.auth.user_auth,
                    spool=str(state.spool.directory.resolve()),
                    udp_heartbeat=udp is not None,
                )
                task_status.started(state)
                if shutdown is None:
                    await trio.sleep_forever()
                else:
                    await shutdown.wait()
                front.cancel_scope.cancel()
            state.listening = False
            for listener in listeners:
                await trio.aclose_forcefully(listener)
            log.info("draining", connections=state.stats.connections_open, grace_s=config.shutdown_grace)
            state.start_draining(config.shutdown_grace)
            # Handlers blocked in a read are cancelled at once; frames being appended are shielded.
            handlers.cancel_scope.cancel()
        root.cancel_scope.cancel()


async def _accept_loop(
    listeners: list[trio.SocketListener], handlers: trio.Nursery, state: ServerState
) -> None:
    async def accept_from(listener: trio.SocketListener) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                # EMFILE / ENFILE / ENOBUFS: out of descriptors; back off instead of spinning.
                log.error("accept_failed", error=str(exc))
                await trio.sleep(0.1)
                continue
            handlers.start_soon(handle_connection, stream, state)

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(accept_from, listener)
