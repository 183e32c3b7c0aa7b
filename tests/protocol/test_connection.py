"""The sans-IO server connection: framing, acks, heartbeats, handshake, bad input."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fluentforward.errors import LocalProtocolError, RemoteProtocolError
from fluentforward.protocol import (
    Ack,
    EntriesReceived,
    HandshakeCompleted,
    HandshakeFailed,
    Heartbeat,
    Limits,
    ServerConnection,
    SharedKeyAuth,
    State,
)
from tests.helpers import capture, captures, et, feed_in_pieces, forward, message, pack, split_objects

ALL_CAPTURES = b"".join(p.read_bytes() for p in captures())


def _summary(events):
    return [(type(e).__name__, getattr(e, "raw", None), getattr(e, "chunk", None)) for e in events]


@pytest.mark.parametrize("path", captures(), ids=lambda p: p.name)
def test_capture_frames_come_out_whole(path):
    """Every request of a real capture becomes one event whose raw bytes are the request as sent."""
    data = path.read_bytes()
    conn = ServerConnection()
    events = conn.receive_data(data)
    assert conn.receive_data(b"") == []
    assert conn.state is State.CLOSED
    assert b"".join(e.raw for e in events) == data
    assert len(events) == len(split_objects(data))


def test_one_byte_at_a_time():
    """Feeding a stream one byte at a time yields the same events as feeding it at once."""
    whole = ServerConnection().receive_data(ALL_CAPTURES)
    conn = ServerConnection()
    pieces = []
    for i in range(len(ALL_CAPTURES)):
        pieces += conn.receive_data(ALL_CAPTURES[i : i + 1])
    assert _summary(pieces) == _summary(whole)


@given(cuts=st.sets(st.integers(1, len(ALL_CAPTURES) - 1), max_size=40))
def test_chunking_does_not_change_events(cuts):
    """The same events come out however the bytes are split."""
    expected = _summary(ServerConnection().receive_data(ALL_CAPTURES))
    assert _summary(feed_in_pieces(ServerConnection(), ALL_CAPTURES, cuts)) == expected


@given(st.binary(max_size=2000))
def test_garbage_raises_only_remote_protocol_error(data):
    """Arbitrary bytes are parsed or raise RemoteProtocolError, never anything else."""
    conn = ServerConnection(limits=Limits(max_frame_bytes=4096))
    with contextlib.suppress(RemoteProtocolError):
        if data:
            conn.receive_data(data)
        conn.receive_data(b"")


@given(st.binary(max_size=600), st.sets(st.integers(1, 599), max_size=8))
def test_garbage_after_valid_frame_in_pieces(tail, cuts):
    """A valid frame followed by junk, split anywhere, raises only RemoteProtocolError."""
    data = capture("ack.bin")[:300] + tail
    conn = ServerConnection()
    with contextlib.suppress(RemoteProtocolError):
        feed_in_pieces(conn, data, cuts)
        conn.receive_data(b"")


def test_acks_echo_chunk_ids_in_order():
    """Each chunk id is echoed as {"ack": chunk} with the exact bytes the client sent."""
    conn = ServerConnection()
    events = conn.receive_data(capture("ack.bin"))
    for event in events:
        conn.send(Ack(chunk=event.chunk))
    expected = capture("ack-replies-from-server.bin")
    assert conn.data_to_send() == expected
    assert conn.data_to_send() == b""


def test_non_utf8_chunk_is_echoed_byte_for_byte():
    """A chunk id that is not UTF-8 comes back as the same bytes, packed as str."""
    raw_chunk = b"\xffchunk\xfe"
    frame = msgpack.Packer(use_bin_type=False).pack(["t", [[1, {}]], {b"chunk": raw_chunk}])
    conn = ServerConnection()
    (event,) = conn.receive_data(frame)
    conn.send(Ack(chunk=event.chunk))
    assert msgpack.unpackb(conn.data_to_send(), raw=True) == {b"ack": raw_chunk}


def test_tcp_nil_heartbeat():
    """A msgpack nil between frames is a heartbeat, not an error."""
    conn = ServerConnection()
    events = conn.receive_data(b"\xc0" + forward("t", [[1, {}]]) + b"\xc0")
    assert [type(e) for e in events] == [Heartbeat, EntriesReceived, Heartbeat]


def test_offsets_track_the_stream():
    """Each event records the byte offset of its request in the connection stream."""
    a = forward("a", [[1, {}]])
    b = message("b", 2, {"x": 1})
    conn = ServerConnection()
    events = conn.receive_data(a + b[:3])
    events += conn.receive_data(b[3:])
    assert [e.offset for e in events] == [0, len(a)]
    assert conn.bytes_received == len(a) + len(b)


def test_invalid_frame_moves_to_error_with_offset():
    """A bad request raises with its offset; the connection then refuses more input."""
    good = forward("t", [[1, {}]])
    conn = ServerConnection()
    with pytest.raises(RemoteProtocolError, match="record is an integer") as info:
        conn.receive_data(good + forward("t", [[1, 5]]))
    assert info.value.offset == len(good)
    assert conn.state is State.ERROR
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"more")


def test_frame_above_max_frame_bytes():
    """A request larger than max_frame_bytes is refused before it is buffered whole."""
    conn = ServerConnection(limits=Limits(max_frame_bytes=1000))
    big = forward("t", [[et(1), {"x": "a" * 5000}]])
    with pytest.raises(RemoteProtocolError, match="max_frame_bytes"):
        for i in range(0, len(big), 512):
            conn.receive_data(big[i : i + 512])


def test_eof_inside_a_request():
    """EOF in the middle of a request is reported with the byte count buffered."""
    conn = ServerConnection()
    data = forward("t", [[1, {"a": 1}]])
    conn.receive_data(data[:-2])
    with pytest.raises(RemoteProtocolError, match="closed inside a request"):
        conn.receive_data(b"")


def test_ack_before_established_is_local_error():
    """Acking on a connection that has not completed the handshake is our bug."""
    conn = ServerConnection(auth=SharedKeyAuth(shared_key=b"k", self_hostname="srv"), nonce=b"n" * 16)
    with pytest.raises(LocalProtocolError):
        conn.send(Ack(chunk="x"))


# -- handshake, golden against the Fluent Bit captures ---------------------------------------------


def _helo_and_pong(name):
    return split_objects(capture(name))


def test_handshake_golden_shared_key():
    """With the capture's nonce, our HELO and PONG are byte for byte what Fluent Bit accepted."""
    server_bytes = capture("handshake-helo-pong-from-server.bin")
    helo = _helo_and_pong("handshake-helo-pong-from-server.bin")[0]
    nonce = helo[1][b"nonce"]
    conn = ServerConnection(
        auth=SharedKeyAuth(shared_key=b"s3cr3t", self_hostname="capture-server"), nonce=nonce
    )
    assert conn.state is State.AWAIT_PING
    helo_bytes = conn.data_to_send()
    assert server_bytes.startswith(helo_bytes)
    events = conn.receive_data(capture("handshake-ping.bin"))
    assert events == [HandshakeCompleted(client_hostname="fb-client.local", username="")]
    assert helo_bytes + conn.data_to_send() == server_bytes
    assert conn.state is State.ESTABLISHED
    data_events = conn.receive_data(capture("shared_key.bin"))
    assert all(isinstance(e, EntriesReceived) for e in data_events)


def test_handshake_user_auth_golden():
    """User auth: the capture's PING verifies with alice/pw and our PONG matches the capture's."""
    helo = _helo_and_pong("handshake-userauth-helo-pong-from-server.bin")[0]
    nonce, salt = helo[1][b"nonce"], helo[1][b"auth"]
    auth = SharedKeyAuth(shared_key=b"s3cr3t", self_hostname="capture-server", users={"alice": b"pw"})
    conn = ServerConnection(auth=auth, nonce=nonce, auth_salt=salt)
    conn.data_to_send()
    events = conn.receive_data(capture("handshake-ping-userauth.bin"))
    assert events == [HandshakeCompleted(client_hostname="fb-client.local", username="alice")]
    pong = msgpack.unpackb(conn.data_to_send(), raw=True)
    expected = _helo_and_pong("handshake-userauth-helo-pong-from-server.bin")[1]
    assert pong == expected


@pytest.mark.parametrize(
    ("auth", "reason"),
    [
        (SharedKeyAuth(shared_key=b"wrong", self_hostname="srv"), "shared_key mismatch"),
        (
            SharedKeyAuth(shared_key=b"s3cr3t", self_hostname="srv", users={"alice": b"nope"}),
            "username/password mismatch",
        ),
        (
            SharedKeyAuth(shared_key=b"s3cr3t", self_hostname="srv", users={"bob": b"pw"}),
            "username/password mismatch",
        ),
    ],
)
def test_failed_ping_sends_pong_false_and_closes(auth, reason):
    """A wrong key, password or user gets PONG false with the reason and closes the connection."""
    helo = _helo_and_pong("handshake-userauth-helo-pong-from-server.bin")[0]
    conn = ServerConnection(auth=auth, nonce=helo[1][b"nonce"], auth_salt=helo[1][b"auth"])
    conn.data_to_send()
    events = conn.receive_data(capture("handshake-ping-userauth.bin") + capture("shared_key_userauth.bin"))
    assert events == [HandshakeFailed(reason=reason)]
    pong = msgpack.unpackb(conn.data_to_send(), raw=False)
    assert pong[:3] == ["PONG", False, reason]
    assert conn.state is State.CLOSED
    assert b"s3cr3t" not in repr(events).encode()


def test_data_without_handshake_is_refused():
    """Fluent Bit sends data on a socket whose PONG failed; no frame is accepted before PING."""
    conn = ServerConnection(auth=SharedKeyAuth(shared_key=b"s3cr3t", self_hostname="srv"), nonce=b"n" * 16)
    with pytest.raises(RemoteProtocolError, match="before the handshake"):
        conn.receive_data(capture("shared_key_after_failed_pong.bin"))
    assert conn.state is State.ERROR


def test_garbage_ping_is_rejected_not_crashing():
    """A PING with the wrong shape is answered with PONG false."""
    conn = ServerConnection(auth=SharedKeyAuth(shared_key=b"k", self_hostname="srv"), nonce=b"n" * 16)
    conn.data_to_send()
    events = conn.receive_data(pack(["PING", 1, 2]))
    assert isinstance(events[0], HandshakeFailed)
