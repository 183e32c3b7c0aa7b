"""The server's security features over real loopback sockets.

Shared key and users, TLS and mutual TLS, the ``--allow`` filter, the handshake, frame and idle
timeouts, ``max_connections`` and Unix sockets. In-process servers (``serve`` on 127.0.0.1 port 0)
carry most tests; ``fluentforward serve`` subprocesses (marked ``slow``) check that the CLI options
reach the same code, and ``CliRunner`` checks that bad security options are one-line exit-2 errors.

Every refusal is checked three ways: the client gets nothing that says "accepted" (no ack; PONG
false, or the connection is simply closed), nothing reaches the spool, and the server logged one
event naming the peer and the reason, never a secret.
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
import msgpack
import pytest
import structlog
import trio
import trustme
from typer.testing import CliRunner

from fluentforward.cli import app
from fluentforward.client import ClientAuth, ForwardClient, Frame, FrameEncoder, open_forward_client
from fluentforward.config import parse_listen, parse_networks, server_tls_context
from fluentforward.errors import ConfigError, RemoteProtocolError, SinkUnavailable
from fluentforward.protocol import Entry, SharedKeyAuth
from fluentforward.protocol._auth import encode_ping, parse_helo
from fluentforward.spool import read_frames
from tests.helpers import capture, forward
from tests.procs import REPO, ServerProcess

# Every wait in this module is bounded by this. The timeouts under test are 0.3-0.5 s, so a closed
# connection within WAIT proves a short timer fired, not the 120 s idle default.
WAIT = 10.0
RECORDS = 3

SHARED_KEY = b"k3y-9f2c-cluster-secret"
WRONG_KEY = b"wrong-key-0c1d"
ALICE_PW = b"alice-pw-51d0"
BOB_PW = b"bob:pw-with-colon"
WRONG_PW = b"wrong-pw-77aa"
USERS = {"alice": ALICE_PW, "bob": BOB_PW}
# What must never appear in a log line, whether the server knows it or a client tried it.
SECRETS = tuple(s.decode() for s in (SHARED_KEY, WRONG_KEY, ALICE_PW, BOB_PW, WRONG_PW))

SERVER_NAME = "ff.test"
CLIENT_NAME = "node-1.test"
SALT = b"0123456789abcdef"

runner = CliRunner()


# --- fixtures and helpers ------------------------------------------------------------------------


def server_auth(users: dict[str, bytes] | None = None) -> SharedKeyAuth:
    return SharedKeyAuth(shared_key=SHARED_KEY, self_hostname=SERVER_NAME, users=users or {})


def client_auth(key: bytes = SHARED_KEY, username: str = "", password: bytes = b"") -> ClientAuth:
    return ClientAuth(shared_key=key, self_hostname=CLIENT_NAME, username=username, password=password)


@pytest.fixture
def server(server):
    """The shared in-process server starter (conftest), with UDP heartbeats off unless asked for."""
    return functools.partial(server, udp_heartbeat=False)


@pytest.fixture
async def connect():
    """Open raw client streams (TCP to 127.0.0.1, or a Unix socket path); all closed at teardown."""
    opened: list[trio.abc.Stream] = []

    async def open_stream(port: int = 0, *, unix: Path | None = None) -> trio.SocketStream:
        stream = await (trio.open_unix_socket(str(unix)) if unix else trio.open_tcp_stream("127.0.0.1", port))
        opened.append(stream)
        return stream

    yield open_stream
    for stream in opened:
        await trio.aclose_forcefully(stream)


@pytest.fixture
def logs():
    with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as captured:
        yield captured


@pytest.fixture
def short_dir():
    """A directory under /tmp with a short path: AF_UNIX paths are limited to about 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="ffsec-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


def assert_no_secrets(text: str) -> None:
    leaked = [secret for secret in SECRETS if secret in text]
    assert leaked == [], f"secrets in the log: {leaked}"


def peer_of(stream: trio.SocketStream) -> str:
    """How the server names this client: our local address."""
    host, port = stream.socket.getsockname()[:2]
    return f"{host}:{port}"


def acked_frames(count: int = RECORDS) -> list[Frame]:
    encoder = FrameEncoder(require_ack=True, batch_records=1)
    entries = [Entry(time_ns=1_700_000_000_000_000_000 + i, record={"n": i}) for i in range(count)]
    return list(encoder.encode("sec", entries))


async def deliver(
    port: int, *, auth: ClientAuth | None = None, ssl_context: ssl.SSLContext | None = None
) -> int:
    """Send RECORDS acked one-record frames with our client; returns the acks received."""
    async with open_forward_client(
        "127.0.0.1",
        port,
        auth=auth,
        ssl_context=ssl_context,
        connect_timeout=WAIT,
        handshake_timeout=WAIT,
        ack_timeout=WAIT,
        send_timeout=WAIT,
    ) as client:
        for frame in acked_frames():
            await client.send(frame)
    return client.acks_received


async def send_frames(stream: trio.abc.Stream) -> int:
    """Send RECORDS acked frames over an established stream (no handshake); returns the acks."""
    client = ForwardClient(stream, ack_timeout=WAIT, send_timeout=WAIT)
    for frame in acked_frames():
        await client.send(frame)
    return client.acks_received


def spooled(directory: Path) -> int:
    """Records in a spool directory, read back from disk."""
    return sum(frame.header.record_count for frame in read_frames(directory))


async def all_closed(state) -> None:
    """Wait until the server has finished with every connection (its log lines are written by then)."""
    with trio.fail_after(WAIT):
        while state.stats.connections_open:
            await trio.sleep(0.01)


async def next_message(stream: trio.abc.Stream, unpacker: msgpack.Unpacker) -> Any:
    with trio.fail_after(WAIT):
        while True:
            for message in unpacker:
                return message
            data = await stream.receive_some(65536)
            assert data, "closed by the server"
            unpacker.feed(data)


async def read_until_closed(stream: trio.abc.Stream) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    out = bytearray()
    with trio.fail_after(WAIT):
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not data:
                break
            out += data
    return bytes(out)


def decode_all(data: bytes) -> list[Any]:
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(data)
    return list(unpacker)


async def send_ping(
    stream: trio.abc.Stream,
    *,
    key: bytes = SHARED_KEY,
    username: str = "",
    password: bytes = b"",
    then: bytes = b"",
) -> None:
    """Read HELO and answer with a PING for these credentials, followed by ``then`` in the same write."""
    nonce, auth_salt, _ = parse_helo(await next_message(stream, msgpack.Unpacker(raw=False)))
    ping = encode_ping(
        CLIENT_NAME, SALT, nonce, key, username=username, password=password, auth_salt=auth_salt
    )
    await stream.send_all(ping + then)


@attrs.frozen(kw_only=True)
class Pki:
    """A CA with a server certificate for 127.0.0.1 (PEM files on disk), and a CA nobody trusts."""

    ca: trustme.CA
    other_ca: trustme.CA
    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self, *, mutual: bool = False, min_version: str = "1.2") -> ssl.SSLContext:
        client_ca = self.ca_file if mutual else None
        return server_tls_context(self.cert_file, self.key_file, client_ca=client_ca, min_version=min_version)

    def client_context(
        self,
        *,
        trust: bool = True,
        cert_from: str | None = None,
        max_version: ssl.TLSVersion | None = None,
    ) -> ssl.SSLContext:
        """A client context; ``cert_from`` "ca" or "other" presents a certificate that CA issued."""
        context = ssl.create_default_context()
        if trust:
            self.ca.configure_trust(context)
        if cert_from is not None:
            issuer = self.ca if cert_from == "ca" else self.other_ca
            issuer.issue_cert("client.test").configure_cert(context)
        if max_version is not None:
            context.maximum_version = max_version
        return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(directory / "server.pem"))
    leaf.private_key_pem.write_to_path(str(directory / "server.key"))
    return Pki(
        ca=ca,
        other_ca=trustme.CA(),
        ca_file=directory / "ca.pem",
        cert_file=directory / "server.pem",
        key_file=directory / "server.key",
    )


# --- shared key and users ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("users", "auth", "user"),
    [
        pytest.param({}, client_auth(), "", id="shared-key"),
        pytest.param(USERS, client_auth(username="alice", password=ALICE_PW), "alice", id="user-alice"),
        pytest.param(USERS, client_auth(username="bob", password=BOB_PW), "bob", id="user-with-colon-pw"),
    ],
)
async def test_right_credentials_deliver(server, logs, users, auth, user):
    """The right shared key (and user/password) completes the handshake; every record is acked and spooled."""
    state = await server(auth=server_auth(users))
    assert await deliver(state.port, auth=auth) == RECORDS
    assert spooled(state.spool.directory) == RECORDS
    completed = events(logs, "handshake_completed")
    assert [(e["client_hostname"], e["user"]) for e in completed] == [(CLIENT_NAME, user)]
    assert_no_secrets(repr(logs))


REFUSALS = [
    pytest.param({}, {"key": WRONG_KEY}, "shared_key mismatch", id="wrong-key"),
    pytest.param(
        USERS, {"username": "alice", "password": WRONG_PW}, "username/password mismatch", id="wrong-password"
    ),
    pytest.param(
        USERS, {"username": "mallory", "password": ALICE_PW}, "username/password mismatch", id="unknown-user"
    ),
    pytest.param(USERS, {}, "username/password mismatch", id="no-user"),
    pytest.param(
        USERS,
        {"key": WRONG_KEY, "username": "alice", "password": ALICE_PW},
        "shared_key mismatch",
        id="right-user-wrong-key",
    ),
]


@pytest.mark.parametrize(("users", "credentials", "reason"), REFUSALS)
async def test_wrong_credentials_are_refused(server, connect, logs, users, credentials, reason):
    """Wrong credentials get PONG false and a closed connection; a frame sent after the PING is not spooled."""
    state = await server(auth=server_auth(users))
    stream = await connect(state.port)
    # Fluent Bit keeps writing on the socket after a failed PONG: that frame must go nowhere.
    await send_ping(stream, **credentials, then=forward("sec", [[1, {"n": 1}]], {"chunk": "after-pong"}))
    assert decode_all(await read_until_closed(stream)) == [["PONG", False, reason, "", ""]]
    await all_closed(state)
    assert spooled(state.spool.directory) == 0
    assert state.stats.handshake_failures == 1
    (failed,) = events(logs, "handshake_failed")
    assert (failed["peer"], failed["reason"], failed["log_level"]) == (peer_of(stream), reason, "warning")
    assert_no_secrets(repr(logs))


async def test_our_client_reports_a_refused_key(server):
    """Our own client raises RemoteProtocolError naming the server's reason, and nothing is spooled."""
    state = await server(auth=server_auth())
    with pytest.raises(RemoteProtocolError, match="shared_key mismatch"):
        await deliver(state.port, auth=client_auth(WRONG_KEY))
    await all_closed(state)
    assert spooled(state.spool.directory) == 0


async def test_data_before_the_handshake_is_refused(server, connect, logs):
    """Fluent Bit's frames sent without any handshake (its capture after a failed PONG) close the connection unspooled."""
    state = await server(auth=server_auth())
    stream = await connect(state.port)
    await stream.send_all(capture("shared_key_after_failed_pong.bin"))
    replies = decode_all(await read_until_closed(stream))
    assert [reply[0] for reply in replies] == ["HELO"]  # no PONG, no ack
    await all_closed(state)
    assert spooled(state.spool.directory) == 0
    (error,) = events(logs, "protocol_error")
    assert "data before the handshake" in error["reason"]
    assert error["peer"] == peer_of(stream)


async def test_client_without_key_meets_helo_and_is_not_served(server):
    """A client that skips the handshake is told a shared key is required; nothing is spooled."""
    state = await server(auth=server_auth())
    with pytest.raises(RemoteProtocolError, match="requires a shared-key handshake"):
        await deliver(state.port)
    await all_closed(state)
    assert spooled(state.spool.directory) == 0


# --- TLS ------------------------------------------------------------------------------------------


async def test_tls_client_trusting_the_ca_delivers(server, pki):
    """A TLS client that trusts the server's CA delivers; the spool holds its records."""
    state = await server(tls=pki.server_context())
    assert await deliver(state.port, ssl_context=pki.client_context()) == RECORDS
    assert spooled(state.spool.directory) == RECORDS


async def test_tls_client_not_trusting_the_ca_refuses_to_send(server, pki, logs):
    """A client that cannot verify the certificate never sends; the server logs the failed TLS handshake."""
    state = await server(tls=pki.server_context())
    with pytest.raises(SinkUnavailable):
        await deliver(state.port, ssl_context=pki.client_context(trust=False))
    await all_closed(state)
    assert spooled(state.spool.directory) == 0
    assert len(events(logs, "tls_handshake_failed")) == 1


async def test_plain_client_to_tls_server_is_refused(server, pki, connect, logs):
    """Plain Forward bytes sent to a TLS server close the connection with tls_handshake_failed; nothing is spooled."""
    state = await server(tls=pki.server_context())
    stream = await connect(state.port)
    await stream.send_all(forward("sec", [[1, {"n": 1}]], {"chunk": "plain-text"}))
    reply = await read_until_closed(stream)
    assert b"plain-text" not in reply  # at most a TLS alert, never an ack
    await all_closed(state)
    assert spooled(state.spool.directory) == 0
    assert state.stats.tls_failures == 1
    (failed,) = events(logs, "tls_handshake_failed")
    assert (failed["peer"], failed["log_level"]) == (peer_of(stream), "warning")


async def test_tls_handshake_timeout(server, pki, connect, logs):
    """A TCP client that never starts TLS is closed after handshake_timeout."""
    state = await server(tls=pki.server_context(), handshake_timeout=0.3)
    stream = await connect(state.port)
    assert await read_until_closed(stream) == b""
    await all_closed(state)
    (failed,) = events(logs, "tls_handshake_failed")
    assert failed["reason"] == "no TLS handshake within 0.3s"


@pytest.mark.parametrize(
    ("cert_from", "accepted"),
    [pytest.param(None, False, id="no-cert"), ("ca", True), pytest.param("other", False, id="other-ca")],
)
async def test_mutual_tls(server, pki, logs, cert_from, accepted):
    """With a client CA, only clients presenting a certificate it issued deliver."""
    state = await server(tls=pki.server_context(mutual=True))
    context = pki.client_context(cert_from=cert_from)
    if accepted:
        assert await deliver(state.port, ssl_context=context) == RECORDS
    else:
        # With TLS 1.3 the client finishes its handshake before the server checks its certificate, so
        # the refusal may only surface when the ack is awaited: either way, SinkUnavailable.
        with pytest.raises(SinkUnavailable):
            await deliver(state.port, ssl_context=context)
    await all_closed(state)
    assert spooled(state.spool.directory) == (RECORDS if accepted else 0)
    assert len(events(logs, "tls_handshake_failed")) == (0 if accepted else 1)


async def test_tls_with_shared_key(server, pki, logs):
    """TLS and the shared-key handshake combine: the right key delivers, a wrong key is refused inside TLS."""
    state = await server(tls=pki.server_context(), auth=server_auth())
    assert await deliver(state.port, auth=client_auth(), ssl_context=pki.client_context()) == RECORDS
    with pytest.raises(RemoteProtocolError, match="shared_key mismatch"):
        await deliver(state.port, auth=client_auth(WRONG_KEY), ssl_context=pki.client_context())
    await all_closed(state)
    assert spooled(state.spool.directory) == RECORDS
    assert len(events(logs, "handshake_failed")) == 1
    assert_no_secrets(repr(logs))


@pytest.mark.parametrize(("min_version", "accepted"), [("1.2", True), ("1.3", False)])
async def test_tls_min_version(server, pki, logs, min_version, accepted):
    """A TLS 1.2-only client is served by default and refused with min_version 1.3."""
    state = await server(tls=pki.server_context(min_version=min_version))
    context = pki.client_context(max_version=ssl.TLSVersion.TLSv1_2)
    if accepted:
        assert await deliver(state.port, ssl_context=context) == RECORDS
    else:
        with pytest.raises(SinkUnavailable):
            await deliver(state.port, ssl_context=context)
        assert await deliver(state.port, ssl_context=pki.client_context()) == RECORDS  # TLS 1.3 still works
    await all_closed(state)
    assert spooled(state.spool.directory) == RECORDS
    assert len(events(logs, "tls_handshake_failed")) == (0 if accepted else 1)


# --- --allow ----------------------------------------------------------------------------------------


async def test_allow_refuses_other_networks_at_once(server, connect, logs):
    """A client outside --allow is closed before any byte (not even HELO) and counted as refused."""
    state = await server(allow=parse_networks(["10.0.0.0/8", "::1/128"]), auth=server_auth())
    stream = await connect(state.port)
    assert await read_until_closed(stream) == b""
    assert (state.stats.connections_refused, state.stats.connections_total) == (1, 0)
    (refused,) = events(logs, "connection_refused")
    assert (refused["peer"], refused["reason"]) == (peer_of(stream), "address not in --allow")
    assert spooled(state.spool.directory) == 0


async def test_allow_admits_listed_networks(server):
    """A client inside one of the --allow networks is served."""
    state = await server(allow=parse_networks(["10.0.0.0/8", "127.0.0.0/8"]))
    assert await deliver(state.port) == RECORDS
    assert state.stats.connections_refused == 0
    assert spooled(state.spool.directory) == RECORDS


# --- timeouts and limits ----------------------------------------------------------------------------


async def test_handshake_timeout(server, connect, logs):
    """A client that never answers HELO is closed after handshake_timeout (the idle timeout is 120 s)."""
    state = await server(auth=server_auth(), handshake_timeout=0.3)
    stream = await connect(state.port)
    assert [reply[0] for reply in decode_all(await read_until_closed(stream))] == ["HELO"]
    await all_closed(state)
    (timeout,) = events(logs, "connection_timeout")
    assert (timeout["kind"], timeout["seconds"], timeout["peer"]) == ("handshake", 0.3, peer_of(stream))
    assert state.stats.timeouts == {"handshake": 1}


async def test_handshake_deadline_is_not_extended_by_dribbling(server, connect, logs):
    """A PING dribbled a byte at a time is cut off at handshake_timeout however steadily it arrives."""
    state = await server(auth=server_auth(), handshake_timeout=0.5)
    stream = await connect(state.port)
    nonce, auth_salt, _ = parse_helo(await next_message(stream, msgpack.Unpacker(raw=False)))
    ping = encode_ping(CLIENT_NAME, SALT, nonce, SHARED_KEY, auth_salt=auth_salt)
    with trio.fail_after(WAIT), contextlib.suppress(trio.BrokenResourceError):
        for byte in ping:  # ~200 bytes at 20 bytes/s: 10 s, far past the 0.5 s deadline
            await stream.send_all(bytes([byte]))
            await trio.sleep(0.05)
    await all_closed(state)
    assert events(logs, "handshake_completed") == []
    assert [e["kind"] for e in events(logs, "connection_timeout")] == ["handshake"]


async def test_handshake_timer_stops_after_the_handshake(server, connect):
    """Once the handshake is done the short handshake timeout no longer applies; the idle timeout does."""
    state = await server(auth=server_auth(), handshake_timeout=0.3)
    stream = await connect(state.port)
    await send_ping(stream)
    unpacker = msgpack.Unpacker(raw=False)
    assert (await next_message(stream, unpacker))[:2] == ["PONG", True]
    await trio.sleep(1.0)  # three handshake timeouts
    await stream.send_all(forward("sec", [[1, {"n": 1}]], {"chunk": "late"}))
    assert await next_message(stream, unpacker) == {"ack": "late"}


async def test_frame_timeout_closes_a_half_sent_frame(server, connect, logs):
    """Half a frame followed by silence is dropped after frame_timeout, unspooled and unacked."""
    state = await server(frame_timeout=0.3)
    stream = await connect(state.port)
    frame = forward("sec", [[1, {"pad": "x" * 2000}]], {"chunk": "half"})
    await stream.send_all(frame[: len(frame) // 2])
    assert await read_until_closed(stream) == b""
    await all_closed(state)
    assert spooled(state.spool.directory) == 0
    (timeout,) = events(logs, "connection_timeout")
    assert (timeout["kind"], timeout["seconds"], timeout["buffered_bytes"]) == ("frame", 0.3, len(frame) // 2)


async def test_frame_deadline_is_not_extended_by_dribbling(server, connect, logs):
    """The rest of a frame dribbled a byte at a time is cut off at frame_timeout (slowloris)."""
    state = await server(frame_timeout=0.5)
    stream = await connect(state.port)
    frame = forward("sec", [[1, {"pad": "x" * 2000}]], {"chunk": "dribble"})
    await stream.send_all(frame[:1000])
    with trio.fail_after(WAIT), contextlib.suppress(trio.BrokenResourceError):
        for byte in frame[1000:]:  # ~1000 bytes at 20 bytes/s
            await stream.send_all(bytes([byte]))
            await trio.sleep(0.05)
    await all_closed(state)
    assert spooled(state.spool.directory) == 0
    assert [e["kind"] for e in events(logs, "connection_timeout")] == ["frame"]


async def test_frame_timeout_counts_from_the_start_of_each_frame(server, connect, logs):
    """Frames streamed back to back, each complete well within frame_timeout, are all acked."""
    state = await server(frame_timeout=1.0)
    stream = await connect(state.port)
    frames = [forward("sec", [[1, {"n": i, "pad": "x" * 500}]], {"chunk": f"c{i}"}) for i in range(30)]
    data = b"".join(frames)
    step = len(frames[0]) * 3 // 2  # every write ends in the middle of a frame
    unpacker = msgpack.Unpacker(raw=False)
    acks: list[Any] = []
    with trio.fail_after(WAIT), contextlib.suppress(trio.BrokenResourceError):
        for offset in range(0, len(data), step):  # 20 writes, 0.1 s apart: each frame takes ~0.1 s
            await stream.send_all(data[offset : offset + step])
            await trio.sleep(0.1)
        while len(acks) < len(frames) and (received := await stream.receive_some(65536)):
            unpacker.feed(received)
            acks.extend(unpacker)
    assert events(logs, "connection_timeout") == []
    assert acks == [{"ack": f"c{i}"} for i in range(len(frames))]


async def test_idle_timeout_after_the_handshake(server, connect, logs):
    """An authenticated connection that goes silent after an ack is closed by idle_timeout."""
    state = await server(auth=server_auth(), idle_timeout=0.3)
    stream = await connect(state.port)
    await send_ping(stream, then=forward("sec", [[1, {"n": 1}]], {"chunk": "one"}))
    remaining = decode_all(await read_until_closed(stream))
    assert [remaining[0][:2], remaining[1]] == [["PONG", True], {"ack": "one"}]
    await all_closed(state)
    assert spooled(state.spool.directory) == 1
    assert [e["kind"] for e in events(logs, "connection_timeout")] == ["idle"]


async def test_max_connections(server, connect, logs):
    """Beyond max_connections a client is closed before HELO and counted; a freed slot serves again."""
    state = await server(auth=server_auth(), max_connections=2)
    first, second = await connect(state.port), await connect(state.port)
    for stream in (first, second):  # HELO received: both are counted as open
        assert (await next_message(stream, msgpack.Unpacker(raw=False)))[0] == "HELO"
    extra = await connect(state.port)
    assert await read_until_closed(extra) == b""
    assert state.stats.connections_refused == 1
    (refused,) = events(logs, "connection_refused")
    assert (refused["reason"], refused["limit"], refused["peer"]) == ("max_connections", 2, peer_of(extra))
    await first.aclose()
    with trio.fail_after(WAIT):
        while state.stats.connections_open > 1:
            await trio.sleep(0.01)
    assert await deliver(state.port, auth=client_auth()) == RECORDS


# --- Unix sockets -----------------------------------------------------------------------------------


def unix_listen(path: Path):
    return parse_listen(f"unix://{path}", allow_unix=True)


@pytest.mark.parametrize("mode", [0o600, 0o660])
async def test_unix_socket_mode_and_delivery(server, connect, short_dir, mode):
    """serve on unix:///path creates a socket file with the configured mode; a client over it gets its acks."""
    path = short_dir / "ff.sock"
    state = await server(listen=unix_listen(path), unix_socket_mode=mode)
    info = path.stat()
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == mode
    assert await send_frames(await connect(unix=path)) == RECORDS
    assert spooled(state.spool.directory) == RECORDS


async def test_allow_does_not_apply_to_unix_sockets(server, connect, short_dir):
    """--allow filters IP peers only: over a Unix socket the file mode decides who may connect."""
    path = short_dir / "ff.sock"
    state = await server(listen=unix_listen(path), allow=parse_networks(["10.0.0.0/8"]))
    assert await send_frames(await connect(unix=path)) == RECORDS
    assert state.stats.connections_refused == 0


async def test_stale_unix_socket_is_replaced(server, connect, short_dir):
    """A socket file left by a previous run (nobody listening) is replaced and served."""
    path = short_dir / "ff.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as old:
        old.bind(str(path))  # closing leaves the file behind, as a killed server does
    assert stat.S_ISSOCK(path.stat().st_mode)
    state = await server(listen=unix_listen(path))
    assert await send_frames(await connect(unix=path)) == RECORDS
    assert spooled(state.spool.directory) == RECORDS


async def test_unix_path_holding_a_regular_file_is_left_alone(server, short_dir):
    """A regular file at the socket path is not deleted: serve fails with ConfigError."""
    path = short_dir / "ff.sock"
    path.write_text("not a socket")
    with pytest.raises(ConfigError, match="--listen unix://"):
        await server(listen=unix_listen(path))
    assert path.read_text() == "not a socket"


async def test_unix_socket_of_a_running_server_is_not_taken_over(server, connect, short_dir):
    """A second server on the path of a live one fails with ConfigError; the first keeps serving."""
    path = short_dir / "ff.sock"
    first = await server(listen=unix_listen(path))
    with pytest.raises(ConfigError):
        await server(listen=unix_listen(path))
    assert await send_frames(await connect(unix=path)) == RECORDS
    assert spooled(first.spool.directory) == RECORDS


# --- the command line -------------------------------------------------------------------------------


@pytest.fixture
def secret_files(tmp_path):
    """A shared-key file and a users file in the formats the CLI reads."""
    key_file = tmp_path / "shared_key"
    key_file.write_text(SHARED_KEY.decode() + "\n")
    users_file = tmp_path / "users"
    users_file.write_text(f"# tenants\nalice:{ALICE_PW.decode()}\n\nbob:{BOB_PW.decode()}\n")
    return key_file, users_file


# Options with {placeholders} for the files of the test: {key_file} and {users_file} (secret_files),
# {cert}, {key} (pki), {bad_users} (a users line without a colon), {missing} (a path that does not exist).
BAD_OPTIONS = [
    pytest.param(["--user", "alice:" + ALICE_PW.decode()], "need a shared key", id="user-without-key"),
    pytest.param(["--users-file", "{users_file}"], "need a shared key", id="users-file-without-key"),
    pytest.param(
        ["--shared-key", SHARED_KEY.decode(), "--shared-key-file", "{key_file}"], "not both", id="key-twice"
    ),
    pytest.param(["--shared-key-file", "{missing}"], "--shared-key-file", id="missing-key-file"),
    pytest.param(
        ["--shared-key", SHARED_KEY.decode(), "--users-file", "{bad_users}"],
        "expected NAME:PASSWORD",
        id="user-without-colon",
    ),
    pytest.param(["--allow", "10.0.0.0/33"], "--allow: '10.0.0.0/33' is not an IP network", id="bad-cidr"),
    pytest.param(["--allow", "cluster-nodes"], "--allow", id="not-a-network"),
    pytest.param(
        ["--tls-cert", "{cert}", "--tls-key", "{key}", "--tls-min-version", "1.1"],
        "--tls-min-version: expected 1.2 or 1.3",
        id="tls-1.1",
    ),
    pytest.param(["--tls-key", "{key}"], "need --tls-cert", id="key-without-cert"),
    pytest.param(["--tls-cert", "{missing}"], "--tls-cert", id="missing-cert"),
    pytest.param(
        ["--tls-cert", "{cert}", "--tls-key", "{key}", "--tls-client-ca", "{missing}"],
        "--tls-client-ca",
        id="missing-client-ca",
    ),
    pytest.param(["--handshake-timeout", "0"], "--handshake-timeout", id="zero-handshake-timeout"),
    pytest.param(["--frame-timeout", "soon"], "--frame-timeout", id="bad-frame-timeout"),
    pytest.param(["--unix-socket-mode", "0999"], "--unix-socket-mode", id="non-octal-mode"),
    pytest.param(["--listen", "unix://ff.sock"], "expected unix:///absolute/path", id="relative-unix-path"),
]


@pytest.mark.parametrize(("template", "message"), BAD_OPTIONS)
def test_bad_security_options_exit_2(tmp_path, pki, secret_files, template, message):
    """Each bad security option is exit 2 with one line naming the option, and never echoes a secret."""
    key_file, users_file = secret_files
    bad_users = tmp_path / "users-bad"
    bad_users.write_text("alice" + ALICE_PW.decode() + "\n")
    files = {
        "key_file": key_file,
        "users_file": users_file,
        "bad_users": bad_users,
        "cert": pki.cert_file,
        "key": pki.key_file,
        "missing": tmp_path / "missing.pem",
    }
    args = [arg.format(**files) for arg in template]
    result = runner.invoke(
        app, ["serve", *args, "--spool-dir", str(tmp_path / "spool"), "--http-listen", "off"]
    )
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.output
    assert_no_secrets(result.output)


@pytest.mark.slow
async def test_cli_shared_key_file_and_users_file(tmp_path, secret_files):
    """--shared-key-file, --users-file and --self-hostname configure the handshake; no secret reaches the log."""
    key_file, users_file = secret_files
    proc = ServerProcess(
        tmp_path / "spool",
        "--shared-key-file",
        str(key_file),
        "--users-file",
        str(users_file),
        "--self-hostname",
        SERVER_NAME,
    )
    with proc:
        assert await deliver(proc.port, auth=client_auth(username="bob", password=BOB_PW)) == RECORDS
        with pytest.raises(RemoteProtocolError, match="username/password mismatch"):
            await deliver(proc.port, auth=client_auth(username="alice", password=WRONG_PW))
        with pytest.raises(RemoteProtocolError, match="shared_key mismatch"):
            await deliver(proc.port, auth=client_auth(WRONG_KEY, username="alice", password=ALICE_PW))
    logged = proc.events()
    assert spooled(tmp_path / "spool") == RECORDS
    failed = [e for e in logged if e["event"] == "handshake_failed"]
    assert [e["reason"] for e in failed] == ["username/password mismatch", "shared_key mismatch"]
    assert all(e["peer"].startswith("127.0.0.1:") for e in failed)
    listening = next(e for e in logged if e["event"] == "listening")
    assert (listening["shared_key"], listening["user_auth"]) == (True, True)
    assert_no_secrets(json.dumps(logged))


@pytest.mark.slow
async def test_cli_tls_options(tmp_path, pki):
    """--tls-cert, --tls-key, --tls-client-ca and --tls-min-version 1.3 reach the server."""
    proc = ServerProcess(
        tmp_path / "spool",
        "--tls-cert",
        str(pki.cert_file),
        "--tls-key",
        str(pki.key_file),
        "--tls-client-ca",
        str(pki.ca_file),
        "--tls-min-version",
        "1.3",
    )
    with proc:
        assert await deliver(proc.port, ssl_context=pki.client_context(cert_from="ca")) == RECORDS
        tls12 = pki.client_context(cert_from="ca", max_version=ssl.TLSVersion.TLSv1_2)
        for refused in (tls12, pki.client_context(), pki.client_context(cert_from="other")):
            with pytest.raises(SinkUnavailable):
                await deliver(proc.port, ssl_context=refused)
    logged = proc.events()
    assert spooled(tmp_path / "spool") == RECORDS
    assert len([e for e in logged if e["event"] == "tls_handshake_failed"]) == 3
    assert next(e for e in logged if e["event"] == "listening")["tls"] is True


@pytest.mark.slow
async def test_cli_unix_socket(tmp_path, short_dir):
    """serve --listen unix:///path --unix-socket-mode 0640 creates that socket and serves over it."""
    path = short_dir / "ff.sock"
    stderr = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fluentforward",
            "serve",
            "--listen",
            f"unix://{path}",
            "--unix-socket-mode",
            "0640",
            "--http-listen",
            "off",
            "--spool-dir",
            str(tmp_path / "spool"),
            "--log-format",
            "json",
        ],
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        cwd=REPO,
    )
    stderr.close()
    try:
        deadline = time.monotonic() + 30
        while not (path.exists() and stat.S_ISSOCK(path.stat().st_mode)):
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "the socket never appeared"
            await trio.sleep(0.05)
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
        with trio.fail_after(WAIT):
            stream = await trio.open_unix_socket(str(path))
        try:
            assert await send_frames(stream) == RECORDS
        finally:
            await trio.aclose_forcefully(stream)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert spooled(tmp_path / "spool") == RECORDS
