"""All 49 trace-id vectors end to end: over the wire into a running server, back out of `spool cat`."""

from __future__ import annotations

import json
import socket

import msgpack
import pytest

from tests.conftest import TRACE_VECTORS
from tests.helpers import et
from tests.procs import ServerProcess, spool_records

pytestmark = pytest.mark.slow

CASES = json.loads(TRACE_VECTORS.read_text())["cases"]


def _wire(value):
    """Turn the vectors' {"$bin": HEX} notation into real bytes (sent as msgpack bin)."""
    if isinstance(value, dict):
        if set(value) == {"$bin"}:
            return bytes.fromhex(value["$bin"])
        return {k: _wire(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_wire(v) for v in value]
    return value


def test_every_vector_survives_the_wire(tmp_path):
    """Each case's record, sent as a v2 entry (its $metadata as entry metadata), comes back with the expected ids."""
    entries = []
    for case in CASES:
        record = _wire(dict(case["record"]))
        metadata = record.pop("$metadata", {})
        record["case"] = case["id"]
        entries.append([[et(1_795_680_000 + case["id"]), metadata], record])
    frame = msgpack.packb(["vectors", entries, {"chunk": "v"}], use_bin_type=True)
    with (
        ServerProcess(tmp_path / "spool") as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock,
    ):
        sock.sendall(frame)
        assert msgpack.unpackb(sock.recv(100)) == {"ack": "v"}
    rows = {row["record"]["case"]: row for row in spool_records(tmp_path / "spool")}
    assert len(rows) == len(CASES) == 49
    mismatches = [
        (case["id"], case["source"], rows[case["id"]]["trace_id"], rows[case["id"]]["span_id"])
        for case in CASES
        if (rows[case["id"]]["trace_id"], rows[case["id"]]["span_id"]) != (case["trace_id"], case["span_id"])
    ]
    assert mismatches == []
