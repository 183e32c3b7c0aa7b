"""npm fluent-logger 3.4.1 (``tests/interop/node/send.js``) against a real ``fluentforward serve``.

Every event mode the client has (Message, PackedForward, CompressedPackedForward; it has no plain
Forward mode) is sent with and without ``requireAckResponse``. With acks, send.js exits 0 only after
each chunk id came back, so the records must already be in the spool; without, delivery is polled.
Needs ``node`` on PATH (else skipped) and ``make node`` (else failed with that advice).
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import time

import pytest

from tests.interop import by_tag, delivered, running_server, spool_cat
from tests.procs import REPO

NODE = shutil.which("node")
NODE_DIR = REPO / "tests" / "interop" / "node"
SEND_JS = NODE_DIR / "send.js"
# Kills a hung send.js; its own deadline (timeoutMs) is shorter so it normally explains itself.
NODE_TIMEOUT = 30.0

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        NODE is None, reason="node is not on PATH; the npm fluent-logger interop needs Node.js"
    ),
]

EVENT_MODES = ["Message", "PackedForward", "CompressedPackedForward"]

T0 = 1_795_680_000  # 2026-11-26T08:00:00Z


def _b64(data: bytes) -> dict[str, str]:
    return {"$base64": base64.b64encode(data).decode()}


# (label, time as send.js takes it, record as sent, expected time_ns, record as spool cat prints it)
EVENTS = [
    (None, T0, {"log": "plain", "n": 1}, T0 * 10**9, {"log": "plain", "n": 1}),
    (
        "a",
        {"epoch": T0 + 1, "nano": 123_456_789},
        {"msg": "héllo ✓ 日本語 🚀", "nested": {"k8s": {"pod": "api-1"}, "list": [1, 2.5, None, True, "s"]}},
        (T0 + 1) * 10**9 + 123_456_789,
        {"msg": "héllo ✓ 日本語 🚀", "nested": {"k8s": {"pod": "api-1"}, "list": [1, 2.5, None, True, "s"]}},
    ),
    (
        "b",
        T0 + 2,
        {"bin": _b64(b"raw\x00\xff"), "utf8": _b64("zoë".encode()), "deep": {"empty": _b64(b"")}},
        (T0 + 2) * 10**9,
        {"bin": b"raw\x00\xff".hex(), "utf8": "zoë", "deep": {"empty": ""}},
    ),
    (
        None,
        {"epoch": T0 + 3, "nano": 999_999_999},
        {"ключ": "значение"},
        (T0 + 3) * 10**9 + 999_999_999,
        {"ключ": "значение"},
    ),
]


def _require_node_modules():
    if not (NODE_DIR / "node_modules" / "fluent-logger").is_dir():
        pytest.fail(f"npm fluent-logger is not installed in {NODE_DIR}: run `make node`", pytrace=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    _require_node_modules()
    with running_server(tmp_path_factory.mktemp("fluent-logger-node")) as proc:
        yield proc


def send_js(tmp_path, port, tag, events, **options):
    """Run send.js with ``events`` ([{label?, time?, record}]) and FluentSender ``options``."""
    records_file = tmp_path / "events.json"
    records_file.write_text(json.dumps(events), encoding="utf-8")
    assert NODE is not None
    return subprocess.run(
        [NODE, str(SEND_JS), "127.0.0.1", str(port), tag, str(records_file), json.dumps(options)],
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT,
        check=False,
    )


def _events_and_expected(tag):
    events = []
    expected: dict[str, list[tuple[int, object]]] = {}
    for label, sent_time, sent, time_ns, printed in EVENTS:
        events.append({"label": label, "time": sent_time, "record": sent})
        expected.setdefault(f"{tag}.{label}" if label else tag, []).append((time_ns, printed))
    return events, expected


@pytest.mark.parametrize("ack", [False, True], ids=["no-ack", "ack"])
@pytest.mark.parametrize("mode", EVENT_MODES)
def test_every_record_arrives(server, tmp_path, mode, ack):
    """Each event mode, with or without acks, delivers labelled, EventTime, unicode and bin records intact."""
    tag = f"node.{mode.lower()}.{'ack' if ack else 'noack'}"
    events, expected = _events_and_expected(tag)
    result = send_js(tmp_path, server.port, tag, events, eventMode=mode, requireAckResponse=ack)
    assert result.returncode == 0, result.stderr
    # Acked means spooled: no waiting.
    rows = (
        spool_cat(server.spool_dir, f"{tag}*") if ack else delivered(server.spool_dir, f"{tag}*", len(EVENTS))
    )
    assert by_tag(rows) == expected


# Message mode with acks is one fsync'd round trip per record, hence the smaller count.
@pytest.mark.parametrize(
    ("mode", "ack", "count"), [("Message", True, 300), ("CompressedPackedForward", False, 5000)]
)
def test_many_records_and_client_clock(server, tmp_path, mode, ack, count):
    """Hundreds to thousands of records stamped by the client's own clock (whole seconds) all arrive in order."""
    tag = f"node.many.{mode.lower()}"
    before_s = time.time_ns() // 10**9
    result = send_js(
        tmp_path,
        server.port,
        tag,
        [{"record": {"seq": i, "pad": "x" * 100}} for i in range(count)],
        eventMode=mode,
        requireAckResponse=ack,
    )
    after_s = time.time_ns() // 10**9
    assert result.returncode == 0, result.stderr
    rows = delivered(server.spool_dir, tag, count)
    assert [row["record"] for row in rows] == [{"seq": i, "pad": "x" * 100} for i in range(count)]
    assert all(row["time_ns"] % 10**9 == 0 and before_s <= row["time_ns"] // 10**9 <= after_s for row in rows)


def test_send_js_fails_when_the_server_is_unreachable(tmp_path):
    """send.js exits non-zero naming the connection error, so a broken client run cannot pass as delivered."""
    _require_node_modules()
    # Bound but not listening: connecting is refused, and nobody else can take the port meanwhile.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        result = send_js(
            tmp_path,
            closed.getsockname()[1],
            "node.unreachable",
            [{"record": {"n": 1}}],
            requireAckResponse=True,
        )
    assert result.returncode == 1
    assert "ECONNREFUSED" in result.stderr
