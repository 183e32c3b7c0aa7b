"""The serve process as a user runs it: probes, SIGTERM drain and exit code."""

from __future__ import annotations

import gc
import socket
import urllib.request
import weakref

import msgpack
import pytest
import trio

from fluentforward.app import GC_FULL_INTERVAL_S, GC_THRESHOLDS, GC_YOUNG_INTERVAL_S, collect_garbage
from tests.helpers import forward
from tests.procs import ServerProcess, spool_records

pytestmark = pytest.mark.slow


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:  # noqa: S310
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_probes_and_sigterm_exit_zero(tmp_path):
    """/healthz and /readyz answer; SIGTERM stops the server with exit code 0 and keeps acked data."""
    server = ServerProcess(tmp_path / "spool").start()
    try:
        assert _get(server.http_port, "/healthz") == (200, b"ok\n")
        assert _get(server.http_port, "/readyz") == (200, b"ready\n")
        assert _get(server.http_port, "/nope")[0] == 404
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(forward("app", [[1, {"log": "kept"}]], {"chunk": "k1"}))
            assert msgpack.unpackb(sock.recv(100)) == {"ack": "k1"}
        status, body = _get(server.http_port, "/metrics")
        assert status == 200
        text = body.decode()
        assert "fluentforward_records_total 1.0" in text
        assert "fluentforward_acks_total 1.0" in text
        assert "fluentforward_spool_fsync_seconds_bucket" in text
        assert 'fluentforward_frames_total{signal="logs"} 1.0' in text
    finally:
        code = server.stop()
    assert code == 0
    assert [r["record"]["log"] for r in spool_records(tmp_path / "spool")] == ["kept"]
    events = [e["event"] for e in server.events()]
    assert "shutdown_requested" in events
    assert "stopped" in events


class _Cyclic:
    """An object in a reference cycle: only the cyclic collector can free it."""

    def __init__(self) -> None:
        self.me = self
        self.payload = bytearray(1024)


async def test_collect_garbage_frees_cycles_on_a_clock_despite_tuned_thresholds(autojump_clock):
    """With tune_gc's thresholds the collector would not run for a long time; collect_garbage frees
    cycles within a second (young generations) and a minute (everything, after a promotion)."""
    thresholds = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        old = _Cyclic()
        old_ref = weakref.ref(old)
        gc.collect(1)  # `old` survives the young collections: it now sits in the oldest generation
        del old
        young = _Cyclic()
        young_ref = weakref.ref(young)
        del young
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect_garbage)
            await trio.sleep(GC_YOUNG_INTERVAL_S + 0.1)
            assert young_ref() is None
            assert old_ref() is not None
            await trio.sleep(GC_FULL_INTERVAL_S)
            assert old_ref() is None
            nursery.cancel_scope.cancel()
    finally:
        gc.set_threshold(*thresholds)
