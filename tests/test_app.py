"""The serve process as a user runs it: probes, SIGTERM drain and exit code."""

from __future__ import annotations

import socket
import urllib.request

import msgpack
import pytest

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
