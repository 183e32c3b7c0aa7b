"""Delivery in a child process: the pipe codec, the parent's bookkeeping, and real server processes."""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.testing
import typer.main
from hypothesis import given
from hypothesis import strategies as st

from fluentforward.cli import _wire_options, app, delivery_settings_from_wire
from fluentforward.config import DeliveryProcessSettings, DeliverySettings
from fluentforward.delivery import (
    CHILD_MESSAGES,
    MAX_MESSAGE_BYTES,
    PARENT_MESSAGES,
    DeliveryProcess,
    MessageDecoder,
    MessageStream,
    RemoteSpool,
    _ChildRun,
    _lane_from_wire,
    combine_stats,
    encode_message,
    lanes_cursor,
    stats_from_wire,
    stats_to_wire,
)
from fluentforward.errors import ConfigError, RemoteProtocolError
from fluentforward.ids import DEFAULT_RULES
from fluentforward.pipeline import CursorStore, DeliveredSpace, DeliveryStats, ShipperSettings
from fluentforward.records import build_rules
from fluentforward.spool import Position, Spool, SpoolSettings, list_segments, segment_path
from tests.fakeloki import FakeLoki
from tests.helpers import et, forward, stored_header
from tests.procs import ServerProcess

NOW = time.time_ns() // 10**9


# -- codec -------------------------------------------------------------------------------------------

_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_messages = st.builds(
    lambda kind, body: {**body, "type": kind},
    st.sampled_from(sorted(CHILD_MESSAGES)),
    st.dictionaries(st.text(max_size=8), _values, max_size=4),
)


@given(
    messages=st.lists(_messages, min_size=1, max_size=5), cuts=st.lists(st.integers(0, 10_000), max_size=8)
)
def test_messages_survive_any_split_of_the_byte_stream(messages, cuts):
    """Messages cut into arbitrary pieces decode to the same messages, in order."""
    data = b"".join(encode_message(m) for m in messages)
    decoder = MessageDecoder(CHILD_MESSAGES)
    out = []
    last = 0
    for cut in sorted({c % (len(data) + 1) for c in cuts}):
        out += decoder.feed(data[last:cut])
        last = cut
    out += decoder.feed(data[last:])
    assert out == messages
    assert decoder.pending == 0


@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_decode_or_raise_remote_protocol_error(data):
    """Garbage on the pipe yields messages or RemoteProtocolError, never another exception."""
    decoder = MessageDecoder(PARENT_MESSAGES)
    error = None
    try:
        messages = decoder.feed(data)
    except RemoteProtocolError as exc:
        error, messages = exc, []
    assert error is None or str(error).startswith("delivery pipe: ")
    assert all(message["type"] in PARENT_MESSAGES for message in messages)


def _framed(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (struct.pack(">I", MAX_MESSAGE_BYTES + 1), "message length"),
        (struct.pack(">I", 0), "message length"),
        (_framed(b"\xc1"), "undecodable"),
        (_framed(msgpack.packb({"type": "progress"}) + b"\x00"), "undecodable"),
        (_framed(b"\x81\xa4type\xc4\x08progress"), "unexpected message type"),
        (_framed(b"\x81\x01\x02"), "undecodable"),
        (_framed(b"\x81\xa4type\xa2\xff\xfe"), "undecodable"),
        (_framed(msgpack.packb(["progress"])), "a message is a map"),
        (_framed(msgpack.packb({"kind": "progress"})), "unexpected message type None"),
        (_framed(msgpack.packb({"type": "start"})), "unexpected message type 'start'"),
    ],
    ids=[
        "over-limit",
        "empty",
        "reserved-byte",
        "trailing-data",
        "binary-type",
        "int-key",
        "bad-utf8",
        "array",
        "no-type",
        "wrong-direction",
    ],
)
def test_bad_messages_raise_a_clear_error(data, reason):
    """A bad length or body is a RemoteProtocolError that says what was wrong (as soon as it is seen)."""
    with pytest.raises(RemoteProtocolError, match=reason):
        MessageDecoder(CHILD_MESSAGES).feed(data)


def test_encoding_refuses_a_message_over_the_limit():
    """A message larger than MAX_MESSAGE_BYTES is our bug and is refused before it is written."""
    with pytest.raises(ValueError, match="exceeds"):
        encode_message({"type": "failed", "error": "x" * MAX_MESSAGE_BYTES})


def _busy_stats() -> DeliveryStats:
    stats = DeliveryStats(frames=3, records=40, entries_delivered=39, retries=2, oldest_undelivered_ns=17)
    stats.status_codes.update({"204": 5, "500": 2})
    stats.trace_sources.update({"none": 1, "trace_id": 39})
    stats.last_push_seconds = 0.25
    stats.push_seconds.observe(0.003)
    stats.push_seconds.observe(7.0)
    return stats


def test_stats_cross_the_pipe_unchanged():
    """Counters, label counts and the push histogram arrive as the child had them."""
    stats = _busy_stats()
    [message] = MessageDecoder(CHILD_MESSAGES).feed(
        encode_message({"type": "progress", "stats": stats_to_wire(stats)})
    )
    back = stats_from_wire(message["stats"])
    assert stats_to_wire(back) == stats_to_wire(stats)
    assert back.push_seconds.cumulative() == stats.push_seconds.cumulative()
    assert back.status_codes == collections.Counter({"204": 5, "500": 2})


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda w: w.pop("frames"), "stats.frames is not an integer"),
        (lambda w: w.update(records=True), "stats.records is not an integer"),
        (lambda w: w.update(records=1.5), "stats.records is not an integer"),
        (lambda w: w.update(status_codes={"204": "5"}), "stats.status_codes is not a map of counts"),
        (lambda w: w.update(trace_sources=[1]), "stats.trace_sources is not a map of counts"),
        (lambda w: w.update(oldest_undelivered_ns="now"), "stats.oldest_undelivered_ns is not an integer"),
        (lambda w: w.update(last_push_seconds=None), "stats.last_push_seconds is not a number"),
        (lambda w: w["push_seconds"].update(counts=[1]), "buckets"),
        (lambda w: w["push_seconds"].update(sum="x"), "stats.push_seconds is not a histogram"),
    ],
    ids=["missing", "bool", "float", "count-str", "not-map", "optional", "number", "buckets", "sum"],
)
def test_bad_stats_raise_a_clear_error(change, reason):
    """A stats field missing or of the wrong type is a RemoteProtocolError naming the field."""
    wire = stats_to_wire(_busy_stats())
    change(wire)
    with pytest.raises(RemoteProtocolError, match=reason):
        stats_from_wire(wire)
    with pytest.raises(RemoteProtocolError, match="stats is not a map"):
        stats_from_wire([wire])


def test_remote_spool_reports_only_newer_ends():
    """The child's spool view moves forward only, telling its listeners each time."""
    view = RemoteSpool(Path("/spool"), Position(segment=1, offset=8))
    seen: list[Position] = []
    view.subscribe(seen.append)
    view.advance(Position(segment=1, offset=100))
    view.advance(Position(segment=1, offset=50))
    view.advance(Position(segment=2, offset=8))
    assert seen == [Position(segment=1, offset=100), Position(segment=2, offset=8)]
    assert view.durable_end == Position(segment=2, offset=8)


# -- settings ----------------------------------------------------------------------------------------


def _serve_defaults(**overrides: Any) -> dict[str, Any]:
    from fluentforward.cli import SERVE_DELIVERY_OPTIONS  # noqa: PLC0415

    params = typer.main.get_command(app).commands["serve"].params  # type: ignore[attr-defined]
    values = {p.name: p.default for p in params if p.name in SERVE_DELIVERY_OPTIONS}
    return {**values, **overrides}


def test_settings_are_rebuilt_in_the_child_from_plain_values(tmp_path):
    """Option values survive msgpack and build the same settings; the password is read from its file."""
    secret = tmp_path / "password"
    secret.write_text("hunter2\n")
    options = _serve_defaults(
        loki_url="http://127.0.0.1:3100",
        loki_password_file=secret,
        loki_username="ff",
        label=["team=$record['team']"],
        spool_retention="1h",
    )
    wire = msgpack.unpackb(msgpack.packb(_wire_options(options)))
    settings = delivery_settings_from_wire(wire)
    assert settings.loki is not None
    assert settings.loki.password == "hunter2"
    assert settings.shipper.retention_s == 3600
    assert "team" in dict(settings.shape_rules.labels)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda o: o.update(extra="x"), "missing or unknown options extra"),
        (lambda o: o.pop("loki_url"), "missing or unknown options loki_url"),
        (lambda o: o.update(label=[1]), "label: unexpected value of type list"),
        (lambda o: o.update(loki_timeout={"s": 1}), "loki_timeout: unexpected value of type dict"),
        (lambda o: o.update(loki_password_file="/nonexistent/pw"), "/nonexistent/pw"),
    ],
    ids=["unknown", "missing", "list-of-int", "map", "vanished-file"],
)
def test_bad_settings_in_the_child_are_config_errors(change, reason):
    """Options the child cannot use are a ConfigError naming the option, not a crash."""
    options = _wire_options(_serve_defaults(loki_url="http://127.0.0.1:3100"))
    change(options)
    with pytest.raises(ConfigError, match=reason):
        delivery_settings_from_wire(options)


_ALLOCATIONS_PROBE = """
import resource, sys
from fluentforward.app import tune_allocator
from fluentforward.delivery import tune_child_allocator
if not (tune_child_allocator if sys.argv[1] == "child" else tune_allocator)():
    print("no glibc")
    raise SystemExit
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(100):
    buffer = b"x" * (1024 * 1024)  # a frame-sized buffer, written whole, then freed
    del buffer
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.parametrize("settings", ["child", "server"])
def test_the_child_keeps_frame_sized_buffers_on_its_heap(settings):
    # The server's 128 KiB mmap threshold makes each 1 MiB buffer a fresh mapping (256 page faults);
    # the child's allocator reuses the freed one. Run in a process of its own: allocator settings last.
    out = subprocess.run(
        [sys.executable, "-c", _ALLOCATIONS_PROBE, settings],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    if out == "no glibc":
        pytest.skip("the C library is not glibc")
    faults = int(out)
    if settings == "child":
        assert faults < 100 * 256 // 10
    else:  # the probe can tell: the server's settings fault on every buffer
        assert faults >= 100 * 256 * 9 // 10


# -- the parent's bookkeeping ------------------------------------------------------------------------


async def _spool_with_segments(directory: Path, nursery: trio.Nursery, frames: int) -> Spool:
    """A running spool of 4 KiB segments holding ``frames`` frames of about 2 KiB."""
    spool = Spool.open(SpoolSettings(directory=directory, segment_bytes=4096))
    await nursery.start(spool.run)
    for i in range(frames):
        raw = forward("t", [[et(NOW), {"log": f"{i:04d}" + "x" * 2000}]])
        await spool.append(stored_header("t", 1), raw)
    return spool


@pytest.mark.parametrize("retention_s", [0.0, 3600.0])
async def test_delivered_space_releases_bytes_and_applies_retention(tmp_path, nursery, retention_s):
    """Bytes before the cursor stop counting against the spool's limit; old delivered segments go."""
    spool = await _spool_with_segments(tmp_path / "spool", nursery, 8)
    segments = list_segments(spool.directory)
    assert len(segments) >= 3
    cursor = Position(segment=segments[-2], offset=100)
    kept = [s for s in segments if s >= cursor.segment]
    undelivered = sum(segment_path(spool.directory, s).stat().st_size for s in kept) - 100
    space = DeliveredSpace(spool, ShipperSettings(retention_s=retention_s))
    await space.advance(cursor)
    assert spool.used_bytes == undelivered
    expected = kept if retention_s == 0 else segments
    assert list_segments(spool.directory) == expected
    spool.close()


async def test_delivered_space_keeps_at_most_retention_bytes_of_delivered_segments(tmp_path, nursery):
    """Within retention_s, the oldest delivered segments go until the rest fit in retention_bytes."""
    spool = await _spool_with_segments(tmp_path / "spool", nursery, 8)
    segments = list_segments(spool.directory)
    cursor = Position(segment=segments[-1], offset=100)
    delivered = segments[:-1]
    assert len(delivered) >= 3
    newest_two = sum(segment_path(spool.directory, s).stat().st_size for s in delivered[-2:])
    space = DeliveredSpace(spool, ShipperSettings(retention_s=3600, retention_bytes=newest_two))
    await space.advance(cursor)
    assert list_segments(spool.directory) == [*delivered[-2:], segments[-1]]
    last = segment_path(spool.directory, segments[-1]).stat().st_size
    assert spool.used_bytes == last - 100
    spool.close()


def _parent(spool: Spool, processes: int = 1) -> DeliveryProcess:
    delivery = DeliverySettings(
        loki=None,
        shape_rules=build_rules(),
        id_rules=DEFAULT_RULES,
        shipper=ShipperSettings(retention_s=3600),
        process=DeliveryProcessSettings(options={}, processes=processes),
    )
    return DeliveryProcess(spool, delivery)


async def _read(stream: trio.abc.ReceiveStream, decoder: MessageDecoder, count: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while len(out) < count:
        out += decoder.feed(await stream.receive_some(65536))
    return out


async def test_durable_ends_are_coalesced_and_drain_comes_last(tmp_path, nursery):
    """While the child does not read, commits collapse into the newest end; drain follows the last end."""
    spool = await _spool_with_segments(tmp_path / "spool", nursery, 0)
    parent = _parent(spool)
    to_child, child_reads = trio.testing.lockstep_stream_one_way_pair()
    _, nothing = trio.testing.lockstep_stream_one_way_pair()
    nursery.start_soon(
        parent._feed, parent._lanes[0], MessageStream(nothing, to_child, accept=CHILD_MESSAGES)
    )
    decoder = MessageDecoder(PARENT_MESSAGES)
    [start] = await _read(child_reads, decoder, 1)
    assert start["type"] == "start"
    assert start["spool_dir"] == str(spool.directory)
    for i in range(30):  # the child is not reading: the feeder blocks on its first update
        await spool.append(stored_header("t", 1), forward("t", [[et(NOW), {"log": str(i)}]]))
    nursery.start_soon(parent.flush)
    messages = []
    while not messages or messages[-1]["type"] != "drain":
        messages += await _read(child_reads, decoder, 1)
    ends = [m["position"] for m in messages if m["type"] == "durable"]
    assert 1 <= len(ends) <= 2
    assert ends[-1] == [spool.durable_end.segment, spool.durable_end.offset]
    assert [m["type"] for m in messages[-2:]] == ["durable", "drain"]
    spool.close()


async def test_parent_follows_the_child_reports_and_stops_at_a_bad_message(tmp_path, nursery):
    """Progress sets cursor, stats and auth state and releases spool bytes; garbage ends the child's run."""
    spool = await _spool_with_segments(tmp_path / "spool", nursery, 3)
    parent = _parent(spool)
    to_parent, parent_reads = trio.testing.memory_stream_one_way_pair()
    pipe = MessageStream(parent_reads, trio.testing.memory_stream_one_way_pair()[0], accept=CHILD_MESSAGES)
    ready = []
    run = _ChildRun()
    end = spool.durable_end
    progress = {
        "type": "progress",
        "cursor": [end.segment, end.offset],
        "stats": stats_to_wire(_busy_stats()),
        "auth_failed": True,
    }
    await to_parent.send_all(encode_message(progress) + encode_message({"type": "failed", "error": "boom"}))
    await to_parent.send_all(_framed(msgpack.packb({"type": "progress", "cursor": "x"})))
    with trio.fail_after(10):
        await parent._listen(parent._lanes[0], pipe, run, lambda: ready.append(1), trio.CancelScope())
    assert ready == [1]
    assert parent.caught_up
    assert parent.auth_failed
    assert parent.stats.entries_delivered == 39
    assert spool.used_bytes == 0
    assert run.error == "boom"
    assert run.broken_pipe
    spool.close()


def test_lanes_cursor_is_the_slowest_lane_once_all_reported():
    a, b, c = Position(segment=1, offset=100), Position(segment=2, offset=8), Position(segment=3, offset=50)
    assert lanes_cursor([a, None]) is None
    assert lanes_cursor([]) is None
    assert lanes_cursor([c, a, b]) == a
    assert lanes_cursor([b]) == b


def test_lane_stats_combine():
    one, two = _busy_stats(), _busy_stats()
    one.oldest_undelivered_ns, two.oldest_undelivered_ns = 500, 300
    one.last_push_seconds, two.last_push_seconds = 0.5, 2.0
    total = combine_stats([one, DeliveryStats(), two])
    assert total.entries_delivered == 2 * one.entries_delivered
    assert total.status_codes == one.status_codes + two.status_codes
    assert total.push_seconds.count == 2 * one.push_seconds.count
    assert total.oldest_undelivered_ns == 300
    assert total.last_push_seconds == 2.0
    assert combine_stats([DeliveryStats()]).oldest_undelivered_ns is None


@pytest.mark.parametrize("lane", [[2, 2], [-1, 2], [0], "0/2", [0, 17], [True, 2]])
def test_bad_lanes_in_the_start_message_are_refused(lane):
    with pytest.raises(RemoteProtocolError, match="lane"):
        _lane_from_wire(lane)


def test_delivery_processes_out_of_range_is_a_config_error():
    with pytest.raises(ConfigError, match="--delivery-processes"):
        DeliveryProcessSettings(options={}, processes=0)
    with pytest.raises(ConfigError, match="--delivery-processes"):
        DeliveryProcessSettings(options={}, processes=17)


async def test_lanes_move_the_spool_cursor_only_together(tmp_path, nursery):
    """With two lanes the parent saves cursor.json as the slower lane's cursor, and frees only up to it."""
    spool = await _spool_with_segments(tmp_path / "spool", nursery, 3)
    parent = _parent(spool, processes=2)
    first, second = parent._lanes
    segments = list_segments(spool.directory)
    end = spool.durable_end
    used = spool.used_bytes

    async def report(lane: Any, cursor: Position) -> None:
        to_parent, parent_reads = trio.testing.memory_stream_one_way_pair()
        pipe = MessageStream(
            parent_reads, trio.testing.memory_stream_one_way_pair()[0], accept=CHILD_MESSAGES
        )
        message = {
            "type": "progress",
            "cursor": [cursor.segment, cursor.offset],
            "stats": stats_to_wire(DeliveryStats()),
            "auth_failed": False,
        }
        await to_parent.send_all(encode_message(message))
        await to_parent.aclose()
        with trio.fail_after(10):
            await parent._listen(lane, pipe, _ChildRun(), lambda: None, trio.CancelScope())

    await report(first, end)
    assert parent.cursor == Position(segment=0, offset=0)  # the second lane has not reported
    assert not (spool.directory / "cursor.json").exists()
    assert spool.used_bytes == used
    await report(second, Position(segment=segments[1], offset=8))
    assert parent.cursor == Position(segment=segments[1], offset=8)
    assert CursorStore(spool.directory).load() == Position(segment=segments[1], offset=8)
    assert 0 < spool.used_bytes < used
    assert not parent.caught_up
    await report(second, end)
    assert parent.caught_up
    assert CursorStore(spool.directory).load() == end
    assert spool.used_bytes == 0
    spool.close()


# -- real processes ----------------------------------------------------------------------------------


def _send(port: int, ids: range, tag: str = "dp", per_frame: int = 50, timeout: float = 20) -> None:
    """Send records ``id=N`` in acked Forward frames over one connection, waiting for every ack."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        for first in range(ids.start, ids.stop, per_frame):
            last = min(first + per_frame, ids.stop)
            entries = [[[et(NOW - 60 + i % 50), {}], {"log": f"id={i}"}] for i in range(first, last)]
            chunk = f"{tag}-{first}"
            sock.sendall(forward(tag, entries, {"chunk": chunk}))
            assert msgpack.unpackb(sock.recv(200)) == {"ack": chunk}


def _until(predicate, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _get(port: int | None, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:  # noqa: S310
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _children(server: ServerProcess) -> list[int]:
    return [e["pid"] for e in server.events() if e.get("event") == "delivery_process_started"]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in {"Z", "X"}


def _lines(loki: FakeLoki) -> set[str]:
    return {e.line for e in loki.entries()}


def _no_tracebacks(server: ServerProcess) -> None:
    text = (server.spool_dir.parent / f"{server.spool_dir.name}.log").read_text()
    assert "Traceback" not in text


@contextlib.contextmanager
def _serving(
    tmp_path: Path, *extra: str, auth: bool = False, batch: tuple[str, ...] = ("50ms", "16KiB")
) -> Iterator[tuple[FakeLoki, ServerProcess, int]]:
    """A fake Loki and a server shipping to it; yields them and the first delivery child's pid."""
    wait, size = batch
    with FakeLoki(auth_enabled=auth) as loki:
        args = ("--loki-url", loki.url, "--loki-batch-wait", wait, "--loki-batch-bytes", size, *extra)
        with ServerProcess(tmp_path / "spool", *args) as server:
            children = _children(server)
            yield loki, server, children[0] if children else 0
    _no_tracebacks(server)


def _delivered_total(server: ServerProcess) -> float:
    prefix = 'fluentforward_loki_entries_total{outcome="delivered"} '
    lines = _get(server.http_port, "/metrics")[1].splitlines()
    return sum(float(line.removeprefix(prefix)) for line in lines if line.startswith(prefix))


def _stop_reasons(server: ServerProcess) -> list[str]:
    return [str(e["reason"]) for e in server.events() if e["event"] == "delivery_process_stopped"]


def _stop_reason(server: ServerProcess) -> str:
    [stopped] = [e for e in server.events() if e["event"] == "delivery_process_stopped"]
    return str(stopped["reason"])


@pytest.mark.slow
def test_records_reach_loki_from_a_child_process_with_metrics(tmp_path):
    """With --loki-url a child process ships; /metrics shows its counters; SIGTERM drains, exit 0."""
    with _serving(tmp_path) as (loki, server, child):
        assert child != server.proc.pid
        assert _alive(child)
        _send(server.port, range(300))
        _until(lambda: _lines(loki) == {f"id={i}" for i in range(300)}, what="delivery")
        delivered = 'fluentforward_loki_entries_total{outcome="delivered"} 300.0'
        _until(lambda: delivered in _get(server.http_port, "/metrics")[1], what="metrics")
        text = _get(server.http_port, "/metrics")[1]
        assert 'fluentforward_records_trace_id_total{source="none"} 300.0' in text
        assert "fluentforward_loki_auth_failed 0.0" in text
        # The counters arrive before the cursor (saved, then reported): the space follows shortly.
        undelivered = "fluentforward_spool_undelivered_bytes 0.0"
        _until(lambda: undelivered in _get(server.http_port, "/metrics")[1], what="space released")
        assert _get(server.http_port, "/readyz") == (200, "ready\n")
        assert server.stop() == 0
    assert not _alive(child)
    assert _stop_reason(server) == "drained"
    assert any(e["event"] == "shipper_started" and e.get("process") == "delivery" for e in server.events())


@pytest.mark.slow
def test_sigterm_drains_the_child_and_saves_the_cursor(tmp_path):
    """Records still waiting for a batch at SIGTERM are shipped before exit; cursor.json is at the end."""
    spool_dir = tmp_path / "spool"
    with _serving(tmp_path, batch=("1h", "1MiB")) as (loki, server, child):
        _send(server.port, range(120))
        time.sleep(0.3)
        assert loki.entries() == []  # a batch waits for an hour or for 1 MiB
        assert server.stop() == 0
        assert _lines(loki) == {f"id={i}" for i in range(120)}
    assert not _alive(child)
    assert _stop_reason(server) == "drained"
    last = list_segments(spool_dir)[-1]
    size = segment_path(spool_dir, last).stat().st_size
    assert CursorStore(spool_dir).load() == Position(segment=last, offset=size)


@pytest.mark.slow
def test_killed_child_is_restarted_and_loses_nothing(tmp_path):
    """SIGKILL of the child mid-delivery is logged, a new child resumes from the cursor, all records arrive."""
    with _serving(tmp_path) as (loki, server, child):
        _send(server.port, range(3000))
        _until(lambda: len(loki.requests) >= 2, what="delivery to start")
        os.kill(child, signal.SIGKILL)
        _until(lambda: len(_children(server)) == 2, what="a restart")
        _send(server.port, range(3000, 3500))
        expected = {f"id={i}" for i in range(3500)}
        _until(lambda: _lines(loki) == expected, timeout=60, what="delivery after the restart")
        # The counters carry on from the killed child's last report: they never go backwards.
        _until(lambda: _delivered_total(server) >= 3500, what="metrics of both children")
        assert server.stop() == 0
    [exited] = [e for e in server.events() if e["event"] == "delivery_process_exited"]
    assert exited["level"] == "error"
    assert exited["code"] == -signal.SIGKILL
    assert exited["reason"] == "killed by SIGKILL"


@pytest.mark.slow
def test_delivery_processes_share_the_spool_by_segment(tmp_path):
    """--delivery-processes 2: two children ship alternate segments, every record arrives, a killed lane
    restarts alone, SIGTERM drains both, and cursor.json ends at the spool's end."""
    spool_dir = tmp_path / "spool"
    lanes = ("--delivery-processes", "2", "--spool-segment-bytes", "8KiB")
    with _serving(tmp_path, *lanes) as (loki, server, _child):
        pids = {e["lane"]: e["pid"] for e in server.events() if e.get("event") == "delivery_process_started"}
        first, second = pids[0], pids[1]
        assert _alive(first)
        assert _alive(second)
        _send(server.port, range(1500))
        _until(lambda: _lines(loki) == {f"id={i}" for i in range(1500)}, what="delivery")
        assert len(list_segments(spool_dir)) > 4
        started = [e for e in server.events() if e.get("event") == "shipper_started"]
        assert sorted(e["lane"] for e in started) == [0, 1]
        os.kill(second, signal.SIGKILL)
        _until(lambda: len(_children(server)) == 3, what="a restart of the killed lane")
        _send(server.port, range(1500, 2000))
        _until(lambda: _lines(loki) == {f"id={i}" for i in range(2000)}, timeout=60, what="delivery after it")
        _until(lambda: _delivered_total(server) >= 2000, what="metrics of all children")
        assert _alive(first)
        assert server.stop() == 0
    [exited] = [e for e in server.events() if e["event"] == "delivery_process_exited"]
    assert exited["lane"] == 1
    assert sorted(_stop_reasons(server)) == ["drained", "drained"]
    last = list_segments(spool_dir)[-1]
    end = Position(segment=last, offset=segment_path(spool_dir, last).stat().st_size)
    assert CursorStore(spool_dir).load() == end
    assert (spool_dir / "cursor.lane-0-of-2.json").exists()
    assert (spool_dir / "cursor.lane-1-of-2.json").exists()
    assert len(loki.entries()) == 2000  # what a restarted lane sends again, Loki stores once


@pytest.mark.slow
def test_child_exits_by_itself_when_the_server_is_killed(tmp_path):
    """SIGKILL of the server closes the child's stdin; the child stops within seconds."""
    with _serving(tmp_path) as (_loki, server, child):
        _send(server.port, range(200))
        server.kill()
        _until(lambda: not _alive(child), timeout=5, what="the child to exit")
    assert _stop_reason(server).startswith("parent gone")


@pytest.mark.slow
def test_readyz_reports_loki_auth_failure_from_the_child(tmp_path):
    """A Loki answering 401 to the child makes /readyz 503 and sets loki_auth_failed in /metrics; a
    child that cannot drain within the shutdown grace is stopped and the server still exits 0."""
    with _serving(tmp_path, "--shutdown-grace", "1s", auth=True) as (loki, server, child):
        _send(server.port, range(10))
        _until(lambda: _get(server.http_port, "/readyz")[0] == 503, what="not ready")
        assert _get(server.http_port, "/readyz") == (503, "not ready: Loki rejects our credentials or URL\n")
        assert "fluentforward_loki_auth_failed 1.0" in _get(server.http_port, "/metrics")[1]
        assert loki.entries() == []
        assert server.stop() == 0
    assert not _alive(child)
    assert any(e["event"] == "shipper_flush_incomplete" for e in server.events())
    assert _stop_reason(server) == "SIGTERM"


@pytest.mark.slow
def test_spool_limit_slows_clients_until_the_child_delivers(tmp_path):
    """With Loki down the undelivered-bytes limit holds acks back; once the child delivers, acks resume
    and delivered segments are deleted (retention 0)."""
    limits = ("--spool-max-bytes", "48KiB", "--spool-segment-bytes", "16KiB", "--spool-retention", "0s")
    with _serving(tmp_path, *limits) as (loki, server, _child):
        loki.set_down(True)
        sender = threading.Thread(
            target=_send, args=(server.port, range(2000)), kwargs={"per_frame": 25, "timeout": 60}
        )
        sender.start()
        _until(lambda: _get(server.http_port, "/readyz")[1] == "not ready: spool full\n", what="a full spool")
        assert "fluentforward_spool_full 1.0" in _get(server.http_port, "/metrics")[1]
        assert sender.is_alive()
        loki.set_down(False)
        sender.join(90)
        assert not sender.is_alive()
        _until(lambda: _lines(loki) == {f"id={i}" for i in range(2000)}, timeout=60, what="delivery")
        _until(lambda: len(list_segments(tmp_path / "spool")) <= 2, what="retention")
        assert server.stop() == 0
    assert any(e["event"] == "spool_full" for e in server.events())


@pytest.mark.slow
def test_no_delivery_process_ships_from_the_server_process(tmp_path):
    """--no-delivery-process starts no child and still delivers everything."""
    with _serving(tmp_path, "--no-delivery-process") as (loki, server, child):
        assert child == 0
        _send(server.port, range(100))
        _until(lambda: len(_lines(loki)) == 100, what="delivery")
    assert _children(server) == []
    assert not any(e.get("process") == "delivery" for e in server.events())


@pytest.mark.slow
def test_each_worker_has_its_own_delivery_child(tmp_path):
    """With --workers 2 every worker starts a child, and records sent to either reach Loki."""
    with _serving(tmp_path, "--workers", "2") as (loki, server, _child):
        _until(lambda: len(_children(server)) == 2, what="two delivery children")
        for n in range(4):  # new connections: the kernel spreads them over the workers
            _send(server.port, range(n * 50, n * 50 + 50), tag=f"w{n}")
        _until(lambda: len(_lines(loki)) == 200, what="delivery")
        assert server.stop() == 0
    workers = {e.get("worker") for e in server.events() if e.get("event") == "shipper_started"}
    assert workers == {0, 1}


@pytest.mark.slow
def test_a_child_that_cannot_start_fails_the_server_start(tmp_path):
    """Settings only the child uses (a missing token file) end serve with exit 2 and one clear line."""
    token = tmp_path / "missing-token"
    server = ServerProcess(
        tmp_path / "spool", "--loki-url", "http://127.0.0.1:9", "--loki-bearer-token-file", str(token)
    )
    with pytest.raises(RuntimeError, match="server exited with 2"):
        server.start()
    stderr = (tmp_path / "spool.log").read_text()
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("fluentforward: the delivery process could not start: ")
    assert str(token) in last
    assert "Traceback" not in stderr
    [failed] = [e for e in server.events() if e["event"] == "delivery_process_failed"]
    assert failed["process"] == "delivery"
