"""PyPI fluent-logger (module ``fluent``) against a real ``fluentforward serve``: every record arrives.

fluent-logger-python speaks Message mode only and has no ack option (no ``require_ack_response``
in ``fluent.sender``), so these tests wait for delivery by polling ``spool cat``.
"""

from __future__ import annotations

import logging
import time

import pytest
from fluent import asyncsender, event, handler, sender

from tests.interop import by_tag, delivered, running_server

pytestmark = pytest.mark.slow

T0 = 1_795_680_000  # 2026-11-26T08:00:00Z

# (what the client sends, what spool cat prints): msgpack bin becomes its UTF-8 text when valid,
# else lowercase hex.
CASES = [
    ({"log": "plain ascii line", "n": 1}, {"log": "plain ascii line", "n": 1}),
    (
        {
            "msg": "héllo wörld ✓ 日本語 🚀",
            "ключ": "значение",
            "nested": {"k8s": {"pod": "api-1", "labels": {"app": "api"}}, "list": [1, 2.5, None, True, "s"]},
        },
        {
            "msg": "héllo wörld ✓ 日本語 🚀",
            "ключ": "значение",
            "nested": {"k8s": {"pod": "api-1", "labels": {"app": "api"}}, "list": [1, 2.5, None, True, "s"]},
        },
    ),
    (
        {
            "payload": b"raw\x00bytes\xff",
            "utf8": "naïve".encode(),
            "empty": b"",
            "deep": {"bin": b"\xc3\x28"},
        },
        {"payload": b"raw\x00bytes\xff".hex(), "utf8": "naïve", "empty": "", "deep": {"bin": "c328"}},
    ),
    (
        {"i64_max": 2**63 - 1, "i64_min": -(2**63), "u64_max": 2**64 - 1, "float": 0.1, "flag": False},
        {"i64_max": 2**63 - 1, "i64_min": -(2**63), "u64_max": 2**64 - 1, "float": 0.1, "flag": False},
    ),
]
LABELS = ["a", "b"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("fluent-logger-python")) as proc:
        yield proc


def _labelled(prefix):
    """Expected {tag: [(time_ns, record)]} when case i is sent with label LABELS[i % 2] at T0 + i."""
    expected: dict[str, list[tuple[int, object]]] = {}
    for i, (_sent, printed) in enumerate(CASES):
        expected.setdefault(f"{prefix}.{LABELS[i % 2]}", []).append(((T0 + i) * 10**9, printed))
    return expected


def test_sender_integer_seconds_every_record_arrives(server):
    """FluentSender in its default mode (integer seconds) delivers nested, unicode and bin records under prefix.label."""
    fluent = sender.FluentSender("py.sync", host="127.0.0.1", port=server.port)
    with fluent:
        for i, (sent, _printed) in enumerate(CASES):
            assert fluent.emit_with_time(LABELS[i % 2], T0 + i, sent), fluent.last_error
        event.Event("evt", {"via": "fluent.event"}, sender=fluent, time=T0 + 99)
    expected = _labelled("py.sync")
    expected["py.sync.evt"] = [((T0 + 99) * 10**9, {"via": "fluent.event"})]
    rows = delivered(server.spool_dir, "py.sync.*", len(CASES) + 1)
    assert by_tag(rows) == expected


def test_sender_nanosecond_precision_sends_event_time(server):
    """With nanosecond_precision the EventTime nanoseconds survive, for explicit times and for emit()'s clock."""
    fluent = sender.FluentSender("py.ns", host="127.0.0.1", port=server.port, nanosecond_precision=True)
    with fluent:
        for i, (sent, _printed) in enumerate(CASES):
            stamp = sender.EventTime.from_unix_nano((T0 + i) * 10**9 + 123_456_789)
            assert fluent.emit_with_time(LABELS[i % 2], stamp, sent), fluent.last_error
        assert fluent.emit_with_time("float", T0 + 0.25, {"k": "float time"})
        before = time.time_ns()
        assert fluent.emit("now", {"k": "clock"})
        after = time.time_ns()
    expected = {
        tag: [(t + 123_456_789, record) for t, record in items] for tag, items in _labelled("py.ns").items()
    }
    expected["py.ns.float"] = [(T0 * 10**9 + 250_000_000, {"k": "float time"})]
    got = by_tag(delivered(server.spool_dir, "py.ns.*", len(CASES) + 2))
    ((now_ns, now_record),) = got.pop("py.ns.now")
    assert now_record == {"k": "clock"}
    assert before <= now_ns <= after
    assert got == expected


def test_asyncsender_delivers_everything_queued_before_close(server):
    """asyncsender's background thread sends every queued record; close() flushes the queue."""
    count = 500
    fluent = asyncsender.FluentSender(
        "py.async", host="127.0.0.1", port=server.port, nanosecond_precision=True
    )
    try:
        for i in range(count):
            sent, _printed = CASES[i % len(CASES)]
            assert fluent.emit_with_time("x", sender.EventTime(T0 + i, i), {**sent, "seq": i})
    finally:
        fluent.close()
    assert fluent.last_error is None
    rows = delivered(server.spool_dir, "py.async.*", count)
    assert by_tag(rows) == {
        "py.async.x": [((T0 + i) * 10**9 + i, {**CASES[i % len(CASES)][1], "seq": i}) for i in range(count)]
    }


def test_logging_handler_record_arrives(server):
    """fluent.handler.FluentHandler turns a logging call into one record with its formatter's fields."""
    created: list[float] = []
    log_handler = handler.FluentHandler("py.handler", host="127.0.0.1", port=server.port)
    log_handler.setFormatter(handler.FluentRecordFormatter({"level": "%(levelname)s", "logger": "%(name)s"}))
    log_handler.addFilter(lambda record: created.append(record.created) or True)
    logger = logging.getLogger("interop.fluent")
    logger.propagate = False
    logger.addHandler(log_handler)
    try:
        logger.warning({"event": "disk almost full", "user": "zoë"})
    finally:
        logger.removeHandler(log_handler)
        log_handler.close()
    (row,) = delivered(server.spool_dir, "py.handler", 1)
    assert row["record"] == {
        "level": "WARNING",
        "logger": "interop.fluent",
        "event": "disk almost full",
        "user": "zoë",
    }
    assert row["time_ns"] == int(created[0]) * 10**9
