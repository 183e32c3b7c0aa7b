"""Delivery survives crashes and outages: SIGKILL mid-delivery, and Loki down for 30 seconds."""

from __future__ import annotations

import socket
import time

import msgpack
import pytest

from tests.fakeloki import FakeLoki
from tests.helpers import et, forward
from tests.procs import ServerProcess

pytestmark = pytest.mark.slow

NOW = time.time_ns() // 10**9


def _send_acked(port: int, start: int, count: int, per_frame: int = 50) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        for first in range(start, start + count, per_frame):
            entries = [
                [[et(NOW - 100 + (i % 90)), {}], {"log": f"id={i}"}] for i in range(first, first + per_frame)
            ]
            sock.sendall(forward("crash", entries, {"chunk": f"k{first}"}))
            assert msgpack.unpackb(sock.recv(200)) == {"ack": f"k{first}"}


def _wait_for(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_sigkill_during_delivery_loses_nothing(tmp_path):
    """Kill -9 while batches are in flight to Loki; after a restart every acked record is in Loki."""
    with FakeLoki() as loki:
        loki.responder = lambda _request: None  # default behaviour, but every request is recorded
        # 2000 records of about 20 bytes each make ten 4 KiB batches however fast they are received
        # (with 64 KiB, one round could take them all and the kill below would find nothing in flight).
        args = ("--loki-url", loki.url, "--loki-batch-wait", "50ms", "--loki-batch-bytes", "4KiB")
        server = ServerProcess(tmp_path / "spool", *args)
        with server:  # stopped however the test ends: a failed assertion must not leave it running
            _send_acked(server.port, 0, 2000)
            _wait_for(lambda: len(loki.requests) >= 2, 20)  # delivery has started
            server.kill()
            server.start()
            _send_acked(server.port, 2000, 500)
            expected = {f"id={i}" for i in range(2500)}
            _wait_for(lambda: {e.line for e in loki.entries()} >= expected, 60)
            server.stop()
    lines = [e.line for e in loki.entries()]
    assert set(lines) == expected


def test_loki_down_for_30_seconds_then_back(tmp_path):
    """With Loki refusing connections for 30 s, records wait in the spool and all arrive once it is back."""
    with FakeLoki() as loki:
        args = ("--loki-url", loki.url, "--loki-batch-wait", "100ms")
        with ServerProcess(tmp_path / "spool", *args) as server:
            with loki.down():
                _send_acked(server.port, 0, 1000)
                time.sleep(30)
                assert loki.entries() == []
            _wait_for(lambda: len({e.line for e in loki.entries()}) == 1000, 400)
    lines = [e.line for e in loki.entries()]
    assert sorted(set(lines)) == sorted(f"id={i}" for i in range(1000))
    assert len(lines) == 1000  # stored once each (Loki de-duplicates any in-flight resend)
