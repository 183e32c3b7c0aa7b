"""The Forward decoder: every carrier mode, every time and entry form, every bad input."""

from __future__ import annotations

import contextlib
import gzip
import struct
from typing import Any

import msgpack
import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from fluentforward.errors import RemoteProtocolError
from fluentforward.protocol import STORED_LIMITS, Limits, Mode, Signal, decode_frame, validate_request
from fluentforward.protocol._decode import (
    _decode_streamed,
    _decode_whole,
    _peek_second_type,
    decode_raw_request,
    inspect_request,
)
from tests.helpers import capture, captures, compressed, et, forward, message, pack, packed, packed_entries

RECORD = {
    "message": "hello from dummy",
    "level": "info",
    "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
    "span_id": "00f067aa0ba902b7",
    "n": 42,
    "f": 1.5,
    "ok": True,
    "nested": {"k": "v"},
}


def _oracle(frame: Any) -> list[tuple[int, Any, Any]]:
    """An independent reading of a well-formed capture frame: (time_ns, metadata, record) per event."""

    def time_ns(t: Any) -> int:
        if isinstance(t, msgpack.ExtType):
            s, n = struct.unpack(">II", t.data)
            return s * 10**9 + n
        return t * 10**9

    tag, second, *rest = frame
    if isinstance(second, list):
        entries = second
    elif isinstance(second, bytes):
        data = gzip.decompress(second) if second[:2] == b"\x1f\x8b" else second
        entries = _stream(data)
    else:
        meta = rest[1].get("metadata", {}) if len(rest) > 1 else {}
        return [(time_ns(second), meta, rest[0])]
    out = []
    for head, record in entries:
        if isinstance(head, list):
            t, meta = head[0], head[1]
        else:
            t, meta = head, {}
        if isinstance(t, msgpack.ExtType) and struct.unpack(">I", t.data[:4])[0] >= 0xFFFFFFFE:
            continue
        out.append((time_ns(t), meta, record))
    return out


def _stream(data: bytes) -> list[Any]:
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(data)
    return list(unpacker)


def _frames(name: str) -> list[bytes]:
    data = capture(name)
    unpacker = msgpack.Unpacker(raw=True, strict_map_key=False)
    unpacker.feed(data)
    frames, start = [], 0
    for _ in unpacker:
        end = unpacker.tell()
        frames.append(data[start:end])
        start = end
    return frames


@pytest.mark.parametrize("path", captures(), ids=lambda p: p.name)
def test_every_capture_decodes_exactly(path):
    """Each real Fluent Bit frame decodes to the records, times and metadata an independent reader sees."""
    for raw in _frames(path.name):
        frame = decode_frame(raw)
        wire = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        if frame.signal is not Signal.LOGS:
            assert "metrics" in path.name
            assert frame.entries == []
            continue
        expected = _oracle(wire)
        assert [(e.time_ns, e.metadata, e.record) for e in frame.entries] == expected
        assert frame.tag == wire[0]


def test_default_capture_shape():
    """Fluent Bit's default output is Forward mode with v2 entries and the dummy record."""
    frame = decode_frame(_frames("default.bin")[0])
    assert frame.mode == Mode.FORWARD
    assert frame.tag == "app.dummy"
    assert frame.entries[0].record == RECORD
    assert frame.entries[0].metadata == {}
    assert frame.entries[0].time_ns > 1_795_000_000 * 10**9


def test_metadata_capture_keeps_metadata_with_its_record():
    """v2 entry metadata stays attached to its record."""
    entry = decode_frame(_frames("metadata.bin")[0]).entries[0]
    assert entry.metadata == {"otel": {"resource": {"service.name": "checkout"}}, "source": "dummy"}
    assert entry.record == RECORD


def test_message_mode_metadata_option():
    """Message mode carries metadata in the options map; it lands on the entry."""
    frame = decode_frame(_frames("message_mode.bin")[0])
    assert frame.mode == Mode.MESSAGE
    assert frame.tag == "svc.info"
    assert frame.entries[0].metadata == {"source": "dummy"}


def test_gzip_capture_is_compressed_mode():
    """Compress gzip produces CompressedPackedForward."""
    frame = decode_frame(_frames("gzip.bin")[0])
    assert frame.mode == Mode.COMPRESSED
    assert [e.record for e in frame.entries] == [RECORD] * len(frame.entries)


def test_time_as_integer_capture():
    """Integer-second times become whole nanoseconds."""
    for entry in decode_frame(_frames("time_as_integer.bin")[0]).entries:
        assert entry.time_ns % 10**9 == 0


def test_otlp_group_markers_are_consumed_and_carried():
    """OTLP group markers are not records; their resource rides along with the events inside."""
    frame = decode_frame(_frames("otlp_logs.bin")[0])
    assert [e.record for e in frame.entries] == [
        {"log": "order placed"},
        {"log": "payment declined"},
        {"log": "cache miss without trace context"},
    ]
    first = frame.entries[0]
    assert first.metadata["otlp"]["trace_id"] == bytes.fromhex("5b8efff798038103d269b633813fc60c")
    assert first.metadata["otlp"]["span_id"] == bytes.fromhex("eee19b7ec3c1b174")
    assert first.group is not None
    assert first.group["resource"]["attributes"]["service.name"] == "checkout"
    assert first.time_ns == 1795680245123456789


def test_otlp_ack_counts_log_events_only():
    """The receive path counts the 3 log events, not the 2 group markers."""
    request = msgpack.unpackb(_frames("otlp_logs_ack.bin")[0], raw=True, strict_map_key=False)
    info = validate_request(request, 0)
    assert info.record_count == 3
    assert info.chunk == "tJSBGHo1tXEGr8kJVMsipQ=="


@pytest.mark.parametrize("name", ["metrics.bin", "metrics_gzip.bin", "metrics_fluentd_compat.bin"])
def test_metrics_frames_are_not_decoded_as_logs(name):
    """fluent_signal 1 frames validate without decoding their payload, and yield no log entries."""
    raw = _frames(name)[0]
    info = validate_request(msgpack.unpackb(raw, raw=True, strict_map_key=False), 0)
    assert info.signal is Signal.METRICS
    assert decode_frame(raw).entries == []


def _roundtrip(raw: bytes) -> Any:
    request = msgpack.unpackb(raw, raw=True, strict_map_key=False)
    info = validate_request(request, 0)
    return info, decode_frame(raw)


def test_eventtime_ext8_and_fixext8_agree():
    """EventTime as ext8 (c7 08 00) decodes like the fixext8 form."""
    fix = forward("t", [[et(100, 5), {"a": 1}]])
    ext8 = fix.replace(b"\xd7\x00", b"\xc7\x08\x00")
    assert ext8 != fix
    assert _roundtrip(fix)[1].entries == _roundtrip(ext8)[1].entries
    assert _roundtrip(fix)[1].entries[0].time_ns == 100 * 10**9 + 5


@pytest.mark.parametrize("as_str", [False, True])
def test_packed_forward_entries_as_bin_or_str(as_str):
    """PackedForward entries may arrive as bin or (Fluentd) str32 holding binary."""
    raw = packed(
        "t", [[et(1), {"k": "v"}], [2, {"k": b"\xff\xfe"}]], {"chunk": "c1", "size": 2}, as_str=as_str
    )
    info, frame = _roundtrip(raw)
    assert info.mode == Mode.PACKED
    assert info.record_count == 2
    assert info.chunk == "c1"
    assert [e.record for e in frame.entries] == [{"k": "v"}, {"k": b"\xff\xfe"}]


def test_concatenated_gzip_members():
    """Fluentd sends CompressedPackedForward as several concatenated gzip members."""
    entries = [[et(i), {"i": i}] for i in range(10)]
    info, frame = _roundtrip(compressed("t", entries, members=3))
    assert info.mode == Mode.COMPRESSED
    assert [e.record["i"] for e in frame.entries] == list(range(10))


def test_zstd_compressed():
    """compressed: zstd (Fluentd >= 1.19) is inflated."""
    stream = packed_entries([[et(1), {"z": 1}]])
    raw = pack(["t", zstandard.ZstdCompressor().compress(stream), {"compressed": "zstd"}])
    info, frame = _roundtrip(raw)
    assert info.mode == Mode.COMPRESSED
    assert frame.entries[0].record == {"z": 1}


def test_invalid_utf8_is_kept_losslessly():
    """A str that is not UTF-8 neither fails nor loses bytes: it decodes with surrogateescape."""
    raw = msgpack.Packer(use_bin_type=True, unicode_errors="surrogateescape").pack(
        ["t", [[1, {"log": "caf\udce9"}]]]
    )
    frame = decode_frame(raw)
    assert frame.entries[0].record["log"].encode("utf-8", "surrogateescape") == b"caf\xe9"


def test_bin_tag_and_keys_and_nil_options():
    """Tags and keys may be bin; Docker sends nil options."""
    raw = pack([b"bin.tag", 5, {b"k": "v"}, None])
    info, frame = _roundtrip(raw)
    assert info.tag == "bin.tag"
    assert frame.entries[0].record == {b"k": "v"}


def test_float_time_is_accepted():
    """A float time (allowed by Fluent Bit's docs) becomes nanoseconds."""
    _, frame = _roundtrip(message("t", 1.5, {"a": 1}))
    assert frame.entries[0].time_ns == 1_500_000_000


BAD = [
    (pack(5), "not an array"),
    (pack(["t"]), "1 elements"),
    (pack(["t", 1, {}, {}, {}]), "5 elements"),
    (pack([5, 1, {}]), "tag is an integer"),
    (pack(["t", {}, {}]), "second element is a map"),
    (pack(["t", 1]), "message request has 2 elements"),
    (message("t", 1, ["not", "map"]), "record is an array"),
    (message("t", "x", {}), "entry 0 is an integer"),
    (forward("t", [[1, {}, 3]]), "entry 0 is an array of 3 elements"),
    (forward("t", [[1, "rec"]]), "record is a string"),
    (forward("t", [[-5, {}]]), "negative time"),
    (forward("t", [[msgpack.ExtType(1, b"12345678"), {}]]), "not EventTime"),
    (forward("t", [[[1, "meta"], {}]]), "metadata is a string"),
    (forward("t", [[1, {}]], {"chunk": 5}), "chunk is an integer"),
    (forward("t", [[1, {}]], {"fluent_signal": 9}), "fluent_signal is invalid"),
    (pack(["t", [[1, {}]], 7]), "options is an integer"),
    (pack(["t", b"\x1f\x8bnot gzip", {"compressed": "gzip"}]), "gzip payload is corrupt"),
    (pack(["t", gzip.compress(b"\x92\x01\x80")[:-6], {"compressed": "gzip"}]), "gzip payload is truncated"),
    (pack(["t", b"\x28\xb5\x2f\xfdxx", {"compressed": "zstd"}]), "zstd payload is truncated"),
    (pack(["t", b"\x28\xb5\x2f\xfd" + b"\xff" * 20, {"compressed": "zstd"}]), "zstd payload is corrupt"),
    (pack(["t", b"\x92\x01", {}]), "truncated entry"),
    (pack(["t", b"\xc1", {}]), "not a msgpack stream"),
    (pack(["t", b"\x92\x01\x80", {"compressed": "gzip"}]), "compressed is gzip but the payload is not"),
]


@pytest.mark.parametrize(("raw", "reason"), BAD, ids=[b[1] for b in BAD])
def test_bad_requests_are_remote_protocol_errors(raw, reason):
    """Each kind of invalid request is rejected with a precise reason and the frame's offset."""
    with pytest.raises(RemoteProtocolError, match=reason) as info:
        validate_request(msgpack.unpackb(raw, raw=True, strict_map_key=False), 42)
    assert info.value.offset == 42


def test_limits_entries_tag_and_decompressed_size():
    """Limits on entries, tag length and inflated size are enforced."""
    limits = Limits(max_entries_per_frame=2, max_tag_bytes=3, max_decompressed_bytes=1000)
    three = [[1, {}]] * 3

    def check(raw: bytes, reason: str) -> None:
        with pytest.raises(RemoteProtocolError, match=reason):
            validate_request(msgpack.unpackb(raw, raw=True, strict_map_key=False), 0, limits)

    check(forward("t", three), "max_entries_per_frame")
    check(packed("t", three), "max_entries_per_frame")
    check(forward("long", [[1, {}]]), "max_tag_bytes")
    bomb = pack(["t", gzip.compress(b"\x00" * 100_000), {"compressed": "gzip"}])
    check(bomb, "beyond max_decompressed_bytes")
    zbomb = pack(["t", zstandard.ZstdCompressor().compress(b"\x00" * 100_000), {"compressed": "zstd"}])
    check(zbomb, "beyond max_decompressed_bytes")


def test_unknown_options_are_ignored():
    """Options beyond the spec (Fluent Bit add_option) are ignored."""
    info, _ = _roundtrip(forward("t", [[1, {}]], {"tenant": "acme", "size": 1, "compressed": "text"}))
    assert info.record_count == 1


def test_signal_traces_spooled_not_decoded():
    """fluent_signal 2 (traces) is accepted and counted without decoding."""
    info, frame = _roundtrip(pack(["t", b"opaque-ctraces", {"fluent_signal": 2}]))
    assert info.signal is Signal.TRACES
    assert frame.entries == []


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text() | st.binary(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text() | st.binary(), children, max_size=4)
    ),
    max_leaves=12,
)


@given(json_like)
def test_any_msgpack_value_validates_or_raises_protocol_error(value):
    """validate_request on any decoded value either succeeds or raises RemoteProtocolError."""
    with contextlib.suppress(RemoteProtocolError):
        validate_request(msgpack.unpackb(pack(value), raw=True, strict_map_key=False), 0)


@given(st.binary(max_size=300))
def test_decode_frame_of_any_bytes_raises_only_protocol_error(data):
    """decode_frame on arbitrary bytes never raises anything but RemoteProtocolError."""
    with contextlib.suppress(RemoteProtocolError):
        decode_frame(data)


# --- inspect_request: the receive path's fast way (records stepped over, not built) ---------------------


def _full(raw: bytes, limits: Limits | None = None) -> Any:
    """The full receive path's verdict: its RequestInfo, or the RemoteProtocolError it raises."""
    try:
        return validate_request(decode_raw_request(raw, 0, limits or Limits()), 0, limits or Limits())
    except RemoteProtocolError as exc:
        return exc


def _agrees(raw: bytes, limits: Limits | None = None) -> Any:
    """What inspect_request accepts, the full path accepts alike, and decode_frame decodes."""
    fast = inspect_request(raw, 0, limits or Limits())
    full = _full(raw, limits)
    if fast is not None:
        assert fast == full, (fast, full)
        frame = decode_frame(raw)
        assert len(frame.events) == (fast.record_count if fast.signal is Signal.LOGS else 0)
    return fast


@pytest.mark.parametrize("path", captures(), ids=lambda p: p.name)
def test_inspect_agrees_on_every_capture(path):
    """Every real Fluent Bit / Fluentd / client capture: inspected as the full path reads it."""
    for raw in _frames(path.name):
        _agrees(raw)


@pytest.mark.parametrize(
    "raw",
    [
        forward("t", [[et(1, 2), {"a": 1}], [[et(3, 4), {}], {"b": 2}]]),
        forward("t", [[5, {"a": 1}], [[6, {"m": 1}], {"b": 2}], [1.5, {"c": 3}]], {"chunk": "abc"}),
        packed("t", [[et(1, 2), {"a": 1}], [7, {"b": 2}]], {"chunk": b"bin-chunk"}),
        packed("t", [[et(1, 2), {"a": 1}]], as_str=True),
        compressed("t", [[[et(1, 2), {}], {"a": 1}]] * 3, {"chunk": "c"}),
        forward("t", [[[et(0xFFFFFFFF, 0), {}], {"resource": {}}], [[et(9, 0), {}], {"x": 1}]]),
        forward("t", []),
        pack([b"\xff\xfe-bin-tag", [[et(1), {"k": 1}]]]),
    ],
    ids=[
        "forward",
        "int-metadata-float",
        "packed-bin-chunk",
        "packed-str",
        "gzip",
        "otlp-group",
        "empty",
        "bin-tag",
    ],
)
def test_inspect_accepts_what_the_full_path_accepts(raw):
    assert _agrees(raw) is not None


@pytest.mark.parametrize(
    "raw",
    [
        message("t", 1, {"a": 1}),  # Message mode: one record, nothing to gain
        pack(None),  # heartbeat
        forward("t", [[et(1, 2), ["not", "a", "map"]]]),
        forward("t", [[et(1, 2), {"a": 1}, "extra"]]),
        forward("t", [[et(1, 10**9), {"a": 1}]]),  # nanoseconds out of range
        forward("t", [[-5, {"a": 1}]]),
        pack(["t", [[et(1), {"a": 1}]], {"chunk": 5}]),
        pack(["t", [[et(1), {"a": 1}]], {"fluent_signal": 9}]),
        pack(["t", [[et(1), {"a": 1}]], {}, "fourth"]),
        forward("t", [[et(1), {"a": 1}]])[:-1],
    ],
    ids=[
        "message",
        "heartbeat",
        "record-array",
        "entry-arity",
        "nanos",
        "negative-time",
        "chunk-int",
        "signal",
        "arity4",
        "truncated",
    ],
)
def test_inspect_defers_anything_unusual_or_invalid(raw):
    """None sends the request to the full decode, which accepts it or names the fault."""
    assert _agrees(raw) is None


def _timestamp_ext(length: int) -> bytes:
    """A msgpack ext of type -1 (timestamp) with ``length`` payload bytes, as raw msgpack."""
    heads = {1: b"\xd4", 2: b"\xd5", 4: b"\xd6", 8: b"\xd7", 16: b"\xd8"}
    head = heads.get(length, b"\xc7" + bytes([length]))
    return head + b"\xff" + b"\x00" * length


@pytest.mark.parametrize("length", [1, 2, 3, 4, 8, 12, 16])
def test_timestamp_ext_inside_a_record_is_left_to_the_full_decode(length):
    """skip() does not check a timestamp's length; decoding does. A record holding an ext -1 must not be
    vouched for by the fast path: a bad length would be acked and then never decode for delivery."""
    record = b"\x81\xa2ts" + _timestamp_ext(length)
    raw = b"\x93" + pack("t") + b"\x91\x92" + pack([et(1, 2), {}]) + record + pack({"chunk": "c"})
    assert inspect_request(raw, 0) is None
    full = _full(raw)
    if length in (4, 8, 12):
        assert not isinstance(full, Exception)
        assert len(decode_frame(raw).events) == 1
    else:
        assert isinstance(full, RemoteProtocolError)


def test_inspect_ignores_timestamp_like_bytes_in_entry_heads():
    """EventTime bytes that happen to read as an ext -1 header (d7 ff) are not records: still fast."""
    raw = forward("t", [[[et(0x01D7FF00, 0x00D7FF01), {}], {"a": 1}]] * 4)
    assert b"\xd7\xff" in raw
    assert _agrees(raw) is not None


def test_unhashable_map_keys_are_kept_as_text():
    """An array or map as a record key is valid msgpack but no Python dict key: kept, as text."""
    record = b"\x82" + pack([1, 2]) + pack("v1") + pack({"k": 1}) + pack("v2")
    raw = pack(["t", [[et(1), {}]]])
    raw = raw.replace(b"\x80", record, 1)
    fast = _agrees(raw)
    assert fast is not None
    assert not isinstance(_full(raw), Exception)
    (event,) = decode_frame(raw).events
    assert event[1] == {"[1, 2]": "v1", "{k: 1}": "v2"}


def test_stored_frames_decode_beyond_the_default_limits():
    """A server with raised limits acks frames the defaults would refuse; delivery must decode them."""
    raw = forward("t", [[et(1), {"a": 1}]] * 12)
    tight = Limits(max_entries_per_frame=10)
    assert inspect_request(raw, 0, tight) is None
    assert isinstance(_full(raw, tight), RemoteProtocolError)
    assert len(decode_frame(raw, STORED_LIMITS).events) == 12
    assert len(decode_frame(raw).events) == 12


def test_packed_stream_at_the_depth_limit_still_decodes():
    """Delivery decodes a clean packed stream as one array, one level deeper than its entries: at
    msgpack's depth limit that fails, and the entry-by-entry decode takes over."""
    depth = 1
    while True:
        nested: Any = "x"
        for _ in range(depth):
            nested = [nested]
        entries = packed_entries([[et(1), {"deep": nested}]])
        try:
            msgpack.unpackb(b"\x91" + entries, strict_map_key=False)
        except msgpack.StackError:
            break
        depth += 1
    raw = packed("t", [[et(1), {"deep": nested}]])
    fast = _agrees(raw)
    if fast is not None:
        assert len(decode_frame(raw).events) == 1


entry_heads = st.sampled_from(
    [
        et(1, 2),
        et(1_700_000_000, 999_999_999),
        17,
        2.5,
        [et(3, 4)],
        [et(3, 4), {}],
        [et(5), {"m": "x"}],
        et(0xFFFFFFFF),
        et(0xFFFFFFFE),
        -1,
        -3,
        "nope",
        [et(1), []],
        et(1, 10**9),
    ]
)
records = st.dictionaries(st.text(max_size=5) | st.binary(max_size=5), json_like, max_size=4) | json_like


@given(
    st.lists(st.tuples(entry_heads, records), max_size=6),
    st.sampled_from(["forward", "packed", "gzip"]),
    st.sampled_from([None, {"chunk": "c"}, {"chunk": b"c", "size": 3}, {"fluent_signal": 1, "size": 2}]),
    st.data(),
)
def test_inspect_never_vouches_for_what_the_full_path_refuses(entries, mode, options, data):
    """Generated frames, valid and not, then a few mutated bytes: whenever the fast path answers, the
    full path answers the same and the stored frame decodes with that many events."""
    pairs = [list(pair) for pair in entries]
    raw = {"forward": forward, "packed": packed, "gzip": compressed}[mode]("t", pairs, options)
    if data.draw(st.booleans()):
        raw = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 3))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        raw = bytes(raw)
    _agrees(raw)


@pytest.mark.parametrize(
    "entry",
    [[[et(1, 10**9), {}], {"a": 1}], [et(1, 10**9), {"a": 1}], [[et(1, 2**32 - 1)], {"a": 1}]],
    ids=["metadata-form", "event-time-form", "one-element-head"],
)
def test_decode_frame_refuses_eventtime_nanoseconds_out_of_range(entry):
    """The delivery decoder's inlined common-entry path checks what _split_entry checks."""
    with pytest.raises(RemoteProtocolError, match="nanoseconds"):
        decode_frame(forward("t", [entry]))


def test_decode_frame_common_entries_keep_metadata_and_groups():
    raw = forward(
        "t",
        [
            [[et(0xFFFFFFFF, 0), {"g": 1}], {"resource": "r"}],
            [[et(5, 6), {"m": "x"}], {"a": 1}],
            [et(7, 8), {"b": 2}],
            [[et(0xFFFFFFFE, 0), {}], {}],
            [[et(9, 0), {}], {"c": 3}],
        ],
    )
    assert decode_frame(raw).events == [
        (5_000_000_006, {"a": 1}, {"m": "x"}, {"resource": "r"}),
        (7_000_000_008, {"b": 2}, {}, {"resource": "r"}),
        (9_000_000_000, {"c": 3}, {}, None),
    ]


# --- decode_frame's two ways: entry by entry with shared map values, and in one call -------------------


def _both(raw: bytes) -> tuple[Any, Any]:
    """(entry-by-entry result or its exception, whole-frame result or its exception)."""
    hint = _peek_second_type(raw)
    out = []
    for way in (
        lambda: _decode_streamed(raw, hint, STORED_LIMITS),
        lambda: _decode_whole(raw, hint, STORED_LIMITS),
    ):
        try:
            out.append(way())
        except Exception as exc:  # noqa: BLE001 - compared below
            out.append(exc)
    return out[0], out[1]


@pytest.mark.parametrize("path", captures(), ids=lambda p: p.name)
def test_streamed_decode_equals_whole_decode_on_every_capture(path):
    for raw in _frames(path.name):
        streamed, whole = _both(raw)
        if not isinstance(streamed, Exception):
            assert streamed == whole
        assert decode_frame(raw) == whole


def test_streamed_decode_shares_repeated_map_values_only():
    pod = {"pod_name": "a", "labels": {"app": "x"}}
    entries = [
        [
            [et(1, i), {}],
            {"log": f"l{i}", "kubernetes": pod if i != 2 else {**pod, "pod_name": "b"}, "n": {"i": i % 2}},
        ]
        for i in range(4)
    ]
    raw = forward("t", entries)
    events = decode_frame(raw).events
    assert [e[1]["kubernetes"]["pod_name"] for e in events] == ["a", "a", "b", "a"]
    assert events[0][1]["kubernetes"] is events[1][1]["kubernetes"]
    assert events[2][1]["kubernetes"] is not events[1][1]["kubernetes"]
    assert events[3][1]["kubernetes"] is not events[1][1]["kubernetes"]  # only the record before counts
    assert [e[1]["n"] for e in events] == [{"i": 0}, {"i": 1}, {"i": 0}, {"i": 1}]
    assert decode_frame(raw) == _both(raw)[1]


def _tail(key: str, value: dict[str, Any]) -> bytes:
    return msgpack.packb(key) + msgpack.packb(value)


@pytest.mark.parametrize(
    "second",
    [
        # The record's last bytes are the record before's tail, {"k": {"x": 1}}, but its pairs are
        # "p" (a bin ending in the tail's first bytes) and "x": 1. The bytes before the tail are not
        # whole pairs: reading them runs out of data.
        {"p": b"zz" + _tail("k", {})[:-1] + b"\x81", "x": 1},
        # The tail's bytes at the end of a bin value: the bytes before them hold the header's count
        # less one of pairs, with bytes to spare.
        {"a": 1, "b": b"zz" + _tail("k", {"x": 1})},
        # The last value is not a map.
        {"k": {"x": 1}, "a": 1, "k2": 3},
    ],
    ids=["runs-out", "bytes-to-spare", "no-tail"],
)
def test_streamed_decode_vouches_for_a_repeated_tail_only_when_it_is_the_last_pair(second):
    raw = forward("t", [[[et(1, 0), {}], {"a": 1, "k": {"x": 1}}], [[et(2, 0), {}], second]])
    streamed = _decode_streamed(raw, Mode.FORWARD, STORED_LIMITS)  # answers: it must not give up
    assert streamed == _decode_whole(raw, Mode.FORWARD, STORED_LIMITS)
    assert streamed.events[1][1] == second


def test_streamed_decode_keeps_a_duplicate_tail_key_last_wins():
    """{"k": {"z": 0}, "a": 2, "k": {"x": 1}}: a map of three pairs with "k" twice, ending in the
    record before's tail. The last "k" wins, in the first "k"'s place, as in the one-call decode."""
    entry_head = b"\x92\x92" + msgpack.packb(et(1, 0)) + b"\x80"
    first = msgpack.packb({"a": 1, "k": {"x": 1}})
    second = b"\x83" + _tail("k", {"z": 0}) + msgpack.packb("a") + b"\x02" + _tail("k", {"x": 1})
    raw = b"\x92" + msgpack.packb("t") + b"\x92" + entry_head + first + entry_head + second
    streamed = _decode_streamed(raw, Mode.FORWARD, STORED_LIMITS)
    assert repr(streamed) == repr(_decode_whole(raw, Mode.FORWARD, STORED_LIMITS))
    assert list(streamed.events[1][1].items()) == [("k", {"x": 1}), ("a", 2)]
    assert streamed.events[1][1]["k"] is streamed.events[0][1]["k"]


def test_streamed_decode_shares_a_repeated_last_map_and_decodes_the_rest():
    pod = {"pod_name": "a", "labels": {"app": "x"}}
    raw = forward(
        "t", [[[et(1, i), {}], {"log": f"l{i}", "n": {"i": i}, "kubernetes": pod}] for i in range(5)]
    )
    events = _decode_streamed(raw, Mode.FORWARD, STORED_LIMITS).events
    assert [e[1] for e in events] == [{"log": f"l{i}", "n": {"i": i}, "kubernetes": pod} for i in range(5)]
    assert all(e[1]["kubernetes"] is events[0][1]["kubernetes"] for e in events)
    assert [list(e[1]) for e in events] == [["log", "n", "kubernetes"]] * 5


shared_maps = st.sampled_from([{}, {"a": 1}, {"a": 1, "b": [1, 2]}, {"k": {"x": "y"}}, {"a": "1"}])


@given(
    st.lists(
        st.tuples(
            entry_heads,
            st.dictionaries(
                st.sampled_from(["log", "kubernetes", "m", b"bin"]), shared_maps | json_like, max_size=4
            ),
        ),
        max_size=8,
    ),
    st.sampled_from(["forward", "packed", "gzip"]),
    st.booleans(),
)
def test_streamed_decode_equals_whole_decode(entries, mode, mutate):
    """Generated frames (records repeating map values, group markers, odd heads, some bytes changed):
    where the entry-by-entry decode answers, it answers what the whole-frame decode does."""
    raw = {"forward": forward, "packed": packed, "gzip": compressed}[mode]("t", [list(e) for e in entries])
    if mutate and len(raw) > 4:
        raw = raw[:-3] + bytes([raw[-3] ^ 0x01]) + raw[-2:]
    streamed, whole = _both(raw)
    if not isinstance(streamed, Exception):
        assert not isinstance(whole, Exception), whole
        assert repr(streamed) == repr(whole)  # repr: NaN != NaN
    if isinstance(whole, Exception):
        with pytest.raises(RemoteProtocolError):
            decode_frame(raw)
    else:
        assert repr(decode_frame(raw)) == repr(whole)
