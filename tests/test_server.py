"""The trio server: captures over real loopback TCP, acks after spool, errors, limits, heartbeats."""

from __future__ import annotations

import socket

import msgpack
import pytest
import structlog
import trio

from fluentforward.config import ServerConfig, parse_listen
from fluentforward.protocol import Limits
from fluentforward.reader import iter_records
from fluentforward.server import serve
from fluentforward.spool import Spool, SpoolSettings, read_frames
from tests.helpers import captures, forward, split_objects

_OPEN: list[trio.SocketStream] = []


@pytest.fixture(autouse=True)
async def _close_client_streams():
    yield
    while _OPEN:
        await trio.aclose_forcefully(_OPEN.pop())


async def _connect(state):
    stream = await trio.open_tcp_stream("127.0.0.1", state.port)
    _OPEN.append(stream)
    return stream


async def _read_objects(stream, count, timeout=5):
    unpacker = msgpack.Unpacker(raw=False)
    out = []
    with trio.fail_after(timeout):
        while len(out) < count:
            data = await stream.receive_some(65536)
            if not data:
                break
            unpacker.feed(data)
            out.extend(unpacker)
    return out


@pytest.mark.parametrize("path", captures(), ids=lambda p: p.name)
async def test_capture_replayed_into_running_server(server, path):
    """Each capture, sent byte for byte, lands in the spool exactly; chunk ids come back as acks."""
    state = await server()
    data = path.read_bytes()
    requests = split_objects(data)
    chunks = [r[-1].get(b"chunk").decode() for r in requests if isinstance(r[-1], dict) and b"chunk" in r[-1]]
    stream = await _connect(state)
    await stream.send_all(data)
    acks = await _read_objects(stream, len(chunks))
    assert acks == [{"ack": c} for c in chunks]
    await stream.aclose()
    with trio.fail_after(5):
        while state.stats.connections_open:
            await trio.sleep(0.01)
    frames = list(read_frames(state.spool.directory))
    assert b"".join(f.raw for f in frames) == data
    if "metrics" in path.name:
        assert state.stats.signal_frames == len(requests)
        assert list(iter_records(state.spool.directory)) == []
    else:
        assert state.stats.records == sum(f.header.record_count for f in frames)
        assert len(list(iter_records(state.spool.directory))) == state.stats.records


async def test_ack_only_after_spool_append(server, monkeypatch):
    """The ack for a chunk is not written until the spool append has returned."""
    state = await server()
    gate = trio.Event()
    original = state.spool.append

    async def slow_append(*args, **kwargs):
        await gate.wait()
        return await original(*args, **kwargs)

    monkeypatch.setattr(state.spool, "append", slow_append)
    stream = await _connect(state)
    await stream.send_all(forward("t", [[1, {"a": 1}]], {"chunk": "c-1"}))
    with trio.move_on_after(0.3):
        assert await stream.receive_some(100) == b"never"  # pragma: no cover
    gate.set()
    assert await _read_objects(stream, 1) == [{"ack": "c-1"}]
    assert len(list(read_frames(state.spool.directory))) == 1


async def test_protocol_error_logs_peer_reason_offset_and_spares_others(server):
    """A bad frame gets one warning naming the peer, reason and offset; other connections go on."""
    state = await server()
    good = await _connect(state)
    bad = await _connect(state)
    with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        await bad.send_all(forward("t", [[1, {}]]) + forward("t", [[1, "not a map"]]))
        assert await bad.receive_some(100) == b""  # closed by the server
    warnings = [entry for entry in logs if entry["event"] == "protocol_error"]
    assert len(warnings) == 1
    assert "record is a string" in warnings[0]["reason"]
    assert warnings[0]["offset"] > 0
    assert warnings[0]["log_level"] == "warning"
    await good.send_all(forward("t", [[1, {"ok": 1}]], {"chunk": "g"}))
    assert await _read_objects(good, 1) == [{"ack": "g"}]


async def test_peer_is_bound_in_logs(server):
    """Connection log lines carry the peer address."""
    state = await server()
    with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        stream = await _connect(state)
        await stream.send_all(b"\x05")
        await stream.receive_some(10)
    err = [e for e in logs if e["event"] == "protocol_error"][0]
    assert err.get("peer", "").startswith("127.0.0.1:")


async def test_retry_of_acked_chunk_is_acked_not_stored(server):
    """A chunk resent after a lost ack is acked again and stored once."""
    state = await server()
    frame = forward("t", [[1, {"a": 1}]], {"chunk": "again"})
    for _ in range(2):
        stream = await _connect(state)
        await stream.send_all(frame)
        assert await _read_objects(stream, 1) == [{"ack": "again"}]
        await stream.aclose()
    assert len(list(read_frames(state.spool.directory))) == 1
    assert state.stats.frames_duplicate == 1


async def test_idle_timeout_closes_connection(server):
    """A silent connection is closed after idle_timeout."""
    state = await server(idle_timeout=0.2)
    stream = await _connect(state)
    with trio.fail_after(3):
        assert await stream.receive_some(10) == b""


async def test_max_connections_refuses_extra(server):
    """Connections beyond max_connections are closed at once and counted."""
    state = await server(max_connections=1)
    first = await _connect(state)
    await first.send_all(b"\xc0")
    with trio.fail_after(2):
        while state.stats.connections_open < 1:
            await trio.sleep(0.01)
    second = await _connect(state)
    with trio.fail_after(3):
        assert await second.receive_some(10) == b""
    assert state.stats.connections_refused == 1


async def test_frame_limit_closes_connection(server):
    """A frame above max_frame_bytes closes the connection with no ack."""
    state = await server(limits=Limits(max_frame_bytes=1024))
    stream = await _connect(state)
    await stream.send_all(forward("t", [[1, {"x": "a" * 4000}]], {"chunk": "big"}))
    with trio.fail_after(3):
        assert await stream.receive_some(100) == b""
    assert list(read_frames(state.spool.directory)) == []


async def test_udp_heartbeat_is_answered(server):
    """A UDP datagram on the listen port is answered with 0x00."""
    state = await server()
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.sendto(b"\x00", ("127.0.0.1", state.port))
    with trio.fail_after(3):
        data, _ = await sock.recvfrom(10)
    assert data == b"\x00"
    sock.close()


async def test_tag_prefix_and_source_address_key(server):
    """--tag-prefix renames tags; --source-address-key adds the peer to each record at delivery."""
    state = await server(tag_prefix="k8s.", source_address_key="source_addr")
    stream = await _connect(state)
    await stream.send_all(forward("app", [[1, {"a": 1}]], {"chunk": "p"}))
    await _read_objects(stream, 1)
    (record,) = list(iter_records(state.spool.directory))
    assert record.tag == "k8s.app"
    assert record.entry.record["source_addr"].startswith("127.0.0.1:")


async def test_shutdown_drains_and_returns(tmp_path):
    """Setting shutdown stops accepting and serve returns; acked frames are durable."""
    spool = Spool.open(SpoolSettings(directory=tmp_path))
    config = ServerConfig(listen=parse_listen("127.0.0.1:0"), spool=spool.settings)
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        state = await nursery.start(
            lambda task_status: serve(config, spool, shutdown=shutdown, task_status=task_status)
        )
        stream = await _connect(state)
        await stream.send_all(forward("t", [[1, {"a": 1}]], {"chunk": "s"}))
        assert await _read_objects(stream, 1) == [{"ack": "s"}]
        shutdown.set()
    spool.close()
    assert len(list(read_frames(tmp_path))) == 1
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", state.port)
