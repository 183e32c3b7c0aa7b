"""Delivery to a strict fake Loki: labels, trace ids, outages, partial 400s, restarts."""

from __future__ import annotations

import json
import time

import pytest
import trio

from fluentforward.app import AppState
from fluentforward.config import ServerConfig, parse_listen
from fluentforward.ids import DEFAULT_RULES
from fluentforward.metrics import render, snapshot
from fluentforward.pipeline import CursorStore, DeliveryStats, Lane, Shipper, ShipperSettings, Transformer
from fluentforward.protocol import Signal
from fluentforward.records import Shaper, build_rules
from fluentforward.server import serve
from fluentforward.sinks.loki import LokiSettings, LokiSink
from fluentforward.spool import FrameHeader, Position, Spool, SpoolSettings, list_segments, read_frames
from tests.fakeloki import FakeLoki, Reply
from tests.helpers import et, forward, stored_header

NOW = time.time_ns() // 10**9
K8S = {
    "namespace_name": "shop",
    "pod_name": "checkout-7d9f-abcde",
    "container_name": "api",
    "host": "node-1",
    "labels": {"app.kubernetes.io/name": "checkout"},
}


@pytest.fixture
def loki():
    with FakeLoki() as fake:
        yield fake


class Stack:
    def __init__(self, state, shipper, sink):
        self.state, self.shipper, self.sink = state, shipper, sink

    async def send(self, frame: bytes) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", self.state.port)
        try:
            await stream.send_all(frame)
            with trio.fail_after(10):
                assert await stream.receive_some(1000)
        finally:
            await stream.aclose()

    async def delivered(self, timeout: float = 20) -> None:
        with trio.fail_after(timeout):
            while not self.shipper.caught_up:
                await trio.sleep(0.02)


@pytest.fixture
async def stack(tmp_path, nursery, loki):
    """Server + shipper + sink on loopback; the factory takes Loki settings overrides."""
    spools = []
    sinks = []

    async def start(directory=None, **loki_overrides):
        spool = Spool.open(SpoolSettings(directory=directory or tmp_path / "spool"))
        spools.append(spool)
        settings = LokiSettings(url=loki.url, min_backoff_s=0.05, max_backoff_s=0.2, **loki_overrides)
        sink = LokiSink(settings)
        sinks.append(sink)
        transformer = Transformer(Shaper(rules=build_rules(cluster="prod")), DEFAULT_RULES)
        shipper = Shipper(spool, sink, transformer, ShipperSettings(batch_wait_s=0.05))
        await nursery.start(shipper.run)
        config = ServerConfig(listen=parse_listen("127.0.0.1:0"), spool=spool.settings)
        state = await nursery.start(serve, config, spool)
        return Stack(state, shipper, sink)

    yield start
    nursery.cancel_scope.cancel()
    for sink in sinks:
        await sink.aclose()
    for spool in spools:
        spool.close()


def _quick_shipper(spool, sink, **options):
    """A shipper with the default rules that ships within 10 ms of a commit."""
    transformer = Transformer(Shaper(rules=build_rules()), DEFAULT_RULES)
    return Shipper(spool, sink, transformer, ShipperSettings(batch_wait_s=0.01), **options)


def k8s_record(i: int, **extra):
    return {"log": f"line {i}\n", "stream": "stdout", "kubernetes": K8S, **extra}


async def test_records_reach_loki_with_labels_and_trace_metadata(stack, loki):
    """Every record reaches Loki with the default labels and trace_id/span_id structured metadata."""
    s = await stack()
    entries = [
        [
            [et(NOW - 10 + i), {}],
            k8s_record(i, traceId="4BF92F3577B34DA6A3CE929D0E0E4736", span_id="00f067aa0ba902b7"),
        ]
        for i in range(5)
    ]
    entries.append([[et(NOW), {}], k8s_record(99)])
    await s.send(forward("kube.var.log", entries, {"chunk": "c1"}))
    await s.delivered()
    stored = loki.entries()
    assert len(stored) == 6
    first = stored[0]
    assert first.labels == {
        "namespace": "shop",
        "container": "api",
        "app": "checkout",
        "job": "shop/checkout",
        "cluster": "prod",
    }
    assert first.structured_metadata["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert first.structured_metadata["span_id"] == "00f067aa0ba902b7"
    assert first.structured_metadata["pod"] == "checkout-7d9f-abcde"
    assert json.loads(first.line) == {
        "log": "line 0\n",
        "traceId": "4BF92F3577B34DA6A3CE929D0E0E4736",
        "span_id": "00f067aa0ba902b7",
    }
    assert loki.entries()[-1].line == "line 99"
    assert "trace_id" not in loki.entries()[-1].structured_metadata
    assert len(loki.query(trace_id="4bf92f3577b34da6a3ce929d0e0e4736", namespace="shop")) == 5
    assert s.shipper.stats.trace_sources["none"] == 1
    text = render([({}, snapshot(AppState(s.state, s.shipper)))]).decode()
    assert 'fluentforward_records_trace_id_total{source="none"} 1.0' in text
    assert 'fluentforward_loki_entries_total{outcome="delivered"} 6.0' in text
    assert "fluentforward_loki_push_seconds_count" in text


async def test_loki_down_then_back_delivers_everything_once(stack, loki):
    """While Loki is down records wait in the spool; when it is back every one arrives, none twice."""
    s = await stack()
    with loki.down():
        for batch in range(3):
            entries = [[[et(NOW - 50 + batch * 10 + i), {}], k8s_record(batch * 10 + i)] for i in range(10)]
            await s.send(forward("t", entries, {"chunk": f"d{batch}"}))
        await trio.sleep(1.0)
        assert loki.entries() == []
        assert not s.shipper.caught_up
    await s.delivered()
    lines = sorted(e.line for e in loki.entries())
    assert lines == sorted(f"line {i}" for i in range(30))
    assert s.shipper.stats.retries > 0


async def test_partial_400_dead_letters_only_rejected_entries(stack, loki, tmp_path):
    """Entries Loki refuses (too old) go to the dead-letter file; the valid ones are delivered."""
    s = await stack()
    old = NOW - 8 * 24 * 3600
    entries = [[[et(NOW - 5 + i), {}], k8s_record(i)] for i in range(6)]
    entries[2] = [[et(old), {}], k8s_record(2)]
    entries[4] = [[et(old + 1), {}], k8s_record(4)]
    await s.send(forward("t", entries, {"chunk": "p"}))
    await s.delivered()
    assert sorted(e.line for e in loki.entries()) == ["line 0", "line 1", "line 3", "line 5"]
    files = list((tmp_path / "spool" / "dead-letter").glob("*.jsonl"))
    dead = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert sorted(d["line"] for d in dead) == ["line 2", "line 4"]
    assert all(d["status"] == 400 for d in dead)
    assert s.shipper.stats.entries_dead_lettered == 2


async def test_auth_failure_keeps_data_and_reports(stack, loki):
    """A 401 keeps the data (nothing dead-lettered) and marks the sink as failing auth."""
    s = await stack()
    loki.script(Reply(401, "no org id"), Reply(401, "no org id"))
    await s.send(forward("t", [[[et(NOW), {}], k8s_record(1)]], {"chunk": "a"}))
    with trio.fail_after(10):
        while not s.sink.auth_failed:
            await trio.sleep(0.01)


async def test_cursor_persisted_and_restart_resumes(tmp_path, nursery, loki):
    """After a restart the shipper resumes at its saved cursor and does not resend delivered rounds."""
    directory = tmp_path / "spool"

    async def run_once(records):
        spool = Spool.open(SpoolSettings(directory=directory))
        sink = LokiSink(LokiSettings(url=loki.url))
        shipper = _quick_shipper(spool, sink)
        async with trio.open_nursery() as n:
            await n.start(spool.run)
            await n.start(shipper.run)
            for r in records:
                await spool.append(
                    FrameHeader(
                        recv_time_ns=0,
                        signal=Signal.LOGS,
                        mode="forward",
                        peer="p",
                        chunk=None,
                        tag="t",
                        source_key="",
                        record_count=1,
                    ),
                    forward("t", [[et(NOW), k8s_record(r)]]),
                )
            with trio.fail_after(10):
                while not shipper.caught_up:
                    await trio.sleep(0.01)
            n.cancel_scope.cancel()
        await sink.aclose()
        spool.close()

    await run_once([1, 2])
    assert CursorStore(directory).load() is not None
    requests_before = len(loki.requests)
    await run_once([3])
    assert sorted(e.line for e in loki.entries()) == ["line 1", "line 2", "line 3"]
    assert len(loki.requests) == requests_before + 1


def test_delivery_stats_plus_adds_counters_and_keeps_the_later_gauges():
    """Counters and the push histogram add up across a restart; gauges come from the later stats."""
    earlier = DeliveryStats(frames=2, entries_delivered=10, oldest_undelivered_ns=5, last_push_seconds=1.0)
    earlier.status_codes["204"] = 3
    earlier.push_seconds.observe(0.01)
    later = DeliveryStats(frames=1, entries_delivered=4, oldest_undelivered_ns=None, last_push_seconds=0.5)
    later.status_codes.update({"204": 1, "500": 2})
    later.push_seconds.observe(0.01)
    later.push_seconds.observe(100.0)
    total = earlier.plus(later)
    assert (total.frames, total.entries_delivered) == (3, 14)
    assert total.status_codes == {"204": 4, "500": 2}
    assert (total.oldest_undelivered_ns, total.last_push_seconds) == (None, 0.5)
    assert total.push_seconds.count == 3
    assert total.push_seconds.cumulative()[-1] == ("+Inf", 3)
    assert sum(total.push_seconds.counts) == 2  # 100 s is above the last bucket
    assert earlier.entries_delivered == 10  # inputs unchanged


async def test_json_sink_delivers_and_dead_letters_through_plain_entries(stack, loki, tmp_path):
    """With a JSON sink the shipper shapes LokiEntry values (no pre-encoded batches), same outcome."""
    s = await stack(format="json")
    old = NOW - 8 * 24 * 3600
    entries = [[[et(NOW - 5 + i), {}], k8s_record(i, trace_id=f"{i + 1:032x}")] for i in range(4)]
    entries[1] = [[et(old), {}], k8s_record(1)]
    await s.send(forward("t", entries, {"chunk": "j"}))
    await s.delivered()
    assert sorted(e.line for e in loki.entries()) == [
        json.dumps({"log": f"line {i}\n", "trace_id": f"{i + 1:032x}"}, separators=(",", ":"))
        for i in (0, 2, 3)
    ]
    assert {e.structured_metadata["trace_id"] for e in loki.entries()} == {f"{i + 1:032x}" for i in (0, 2, 3)}
    files = list((tmp_path / "spool" / "dead-letter").glob("*.jsonl"))
    dead = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert [(d["line"], d["labels"]["app"]) for d in dead] == [("line 1", "checkout")]
    assert (s.shipper.stats.entries_delivered, s.shipper.stats.entries_dead_lettered) == (3, 1)


async def test_lanes_ship_only_their_own_segments(tmp_path, nursery, loki):
    """Two lanes over one spool: each ships the segments it owns, together everything once, and each
    reports its own cursor (the spool's cursor.json is its parent's to write)."""
    directory = tmp_path / "spool"
    spool = Spool.open(SpoolSettings(directory=directory, segment_bytes=4096))
    await nursery.start(spool.run)
    for i in range(12):
        record = {**k8s_record(i), "log": f"line {i} {'x' * 1500}\n"}
        await spool.append(stored_header("t", 1), forward("t", [[et(NOW), record]]))
    owners = {lane: 0 for lane in (0, 1)}
    for frame in read_frames(directory):
        owners[frame.segment % 2] += 1
    assert owners[0]
    assert owners[1]
    sink = LokiSink(LokiSettings(url=loki.url))
    reports: dict[int, list[Position]] = {0: [], 1: []}
    shippers = []
    for index in (0, 1):

        async def report(cursor: Position, index: int = index) -> None:
            reports[index].append(cursor)

        shipper = _quick_shipper(
            spool,
            sink,
            on_delivered=report,
            lane=Lane(index=index, count=2),
        )
        shippers.append(shipper)
        await nursery.start(shipper.run)
    with trio.fail_after(10):
        while not all(s.caught_up for s in shippers):
            await trio.sleep(0.01)
    assert [s.stats.records for s in shippers] == [owners[0], owners[1]]
    assert sorted(e.line.split()[1] for e in loki.entries()) == sorted(str(i) for i in range(12))
    assert reports[0][-1] == reports[1][-1] == spool.durable_end
    assert CursorStore(directory, Lane(index=1, count=2)).load() == spool.durable_end
    assert CursorStore(directory).load() is None
    with pytest.raises(TypeError, match="lane"):
        Shipper(spool, sink, shippers[0].transformer, lane=Lane(index=0, count=2))
    await sink.aclose()
    spool.close()


def test_lane_cursor_loads_the_later_of_its_own_and_the_spools(tmp_path):
    lane = Lane(index=1, count=3)
    own, combined = CursorStore(tmp_path, lane), CursorStore(tmp_path)
    assert own.load() is None
    combined.save(Position(segment=4, offset=8))
    assert own.load() == Position(segment=4, offset=8)
    own.save(Position(segment=7, offset=100))
    assert own.load() == Position(segment=7, offset=100)
    combined.save(Position(segment=9, offset=8))
    assert own.load() == Position(segment=9, offset=8)
    assert (tmp_path / "cursor.lane-1-of-3.json").exists()


async def test_counters_are_reported_before_the_cursor_is_saved(tmp_path, nursery, loki):
    """A crash between the two re-sends a round and counts it twice; the other order would lose its count."""
    directory = tmp_path / "spool"
    spool = Spool.open(SpoolSettings(directory=directory))
    await nursery.start(spool.run)
    await spool.append(
        stored_header("t", 2), forward("t", [[et(NOW), k8s_record(1)], [et(NOW), k8s_record(2)]])
    )
    sink = LokiSink(LokiSettings(url=loki.url))
    seen: list[tuple[int, Position | None]] = []

    async def counted() -> None:
        seen.append((shipper.stats.entries_delivered, CursorStore(directory).load()))

    async def delivered(_cursor: Position) -> None:
        pass

    shipper = _quick_shipper(
        spool,
        sink,
        on_delivered=delivered,
        on_counted=counted,
    )
    await nursery.start(shipper.run)
    with trio.fail_after(10):
        while not shipper.caught_up:
            await trio.sleep(0.01)
    assert seen == [(2, None)]
    assert CursorStore(directory).load() == spool.durable_end
    await sink.aclose()
    spool.close()


async def test_a_lane_with_nothing_of_its_own_reports_but_does_not_save(tmp_path, nursery, loki):
    """Rounds over other lanes' segments move and report the lane's cursor without an fsync'd save:
    from its old cursor a restarted lane finds nothing of its own to send again."""
    directory = tmp_path / "spool"
    spool = Spool.open(SpoolSettings(directory=directory))
    await nursery.start(spool.run)
    for i in range(3):
        await spool.append(stored_header("t", 1), forward("t", [[et(NOW), k8s_record(i)]]))
    assert list_segments(directory) == [1]  # lane 1 of 2 owns it; lane 0 owns nothing here
    sink = LokiSink(LokiSettings(url=loki.url))
    reports: list[Position] = []

    async def report(cursor: Position) -> None:
        reports.append(cursor)

    idle = _quick_shipper(
        spool,
        sink,
        on_delivered=report,
        lane=Lane(index=0, count=2),
    )
    await nursery.start(idle.run)
    with trio.fail_after(10):
        while not idle.caught_up:
            await trio.sleep(0.01)
    assert reports[-1] == spool.durable_end
    assert idle.stats.records == 0
    assert loki.entries() == []
    assert not (directory / Lane(index=0, count=2).cursor_file).exists()
    await sink.aclose()
    spool.close()
