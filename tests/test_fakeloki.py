"""Tests for tests/fakeloki.py: the fake must stay as strict as the real Loki 3.4 (LOKI.md A6)."""

from __future__ import annotations

import gzip
import json
import socket
import time
import zlib
from collections.abc import Mapping

import cramjam
import httpx
import pytest

from tests.fakeloki import (
    FakeLimits,
    FakeLoki,
    Hangup,
    LabelError,
    PushError,
    Reply,
    Stall,
    decode_push_protobuf,
    parse_selector,
)

NOW = 1_750_000_000 * 10**9
HOUR = 3600 * 10**9
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
JSON = {"Content-Type": "application/json"}


@pytest.fixture(name="loki")
def _loki():
    with FakeLoki(now_ns=lambda: NOW) as loki:
        yield loki


@pytest.fixture(name="client")
def _client():
    with httpx.Client(trust_env=False, timeout=5) as client:
        yield client


def body(*streams: tuple[dict[str, str], list[list[object]]]) -> bytes:
    return json.dumps({"streams": [{"stream": s, "values": v} for s, v in streams]}).encode()


def value(
    offset_ns: int = 0, line: str = "hello", metadata: Mapping[str, object] | None = None
) -> list[object]:
    item: list[object] = [str(NOW + offset_ns), line]
    if metadata is not None:
        item.append(metadata)
    return item


def post(
    client: httpx.Client, loki: FakeLoki, content: bytes, headers: dict[str, str] | None = None
) -> httpx.Response:
    return client.post(loki.push_url, content=content, headers=JSON if headers is None else headers)


# ------------------------------------------------------------------------------------------------
# Protobuf by hand (independent of the encoder under test)


def varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def pb_entry(seconds: int, nanos: int, line: str, *, extra: bytes = b"") -> bytes:
    ts = varint(1 << 3) + varint(seconds) + varint(2 << 3) + varint(nanos)
    return field(1, ts) + field(2, line.encode()) + extra


def pb_request(labels: str, *entries: bytes) -> bytes:
    stream = field(1, labels.encode()) + b"".join(field(2, e) for e in entries)
    return bytes(cramjam.snappy.compress_raw(field(1, stream)))


PROTOBUF = {"Content-Type": "application/x-protobuf"}


class TestContentNegotiation:
    def test_success_is_204_with_an_empty_body(self, loki, client):
        """A valid JSON push is stored and answered 204 with no body."""
        response = post(client, loki, body(({"job": "x"}, [value(metadata={"trace_id": TRACE})])))
        assert (response.status_code, response.content) == (204, b"")
        (stored,) = loki.query(trace_id=TRACE)
        assert (stored.tenant, stored.labels, stored.ts_ns, stored.line) == (
            "fake",
            {"job": "x"},
            NOW,
            "hello",
        )

    def test_missing_content_type_is_400(self, loki, client):
        """No Content-Type gives Loki's mime error."""
        response = post(client, loki, body(({"job": "x"}, [value()])), headers={})
        assert (response.status_code, response.text) == (400, "mime: no media type\n")

    @pytest.mark.parametrize(
        ("encoding", "compress"),
        [
            ("gzip", gzip.compress),
            ("deflate", lambda b: zlib.compress(b, wbits=-15)),
            ("snappy", lambda b: b),
        ],
    )
    def test_json_content_encodings(self, loki, client, encoding, compress):
        """gzip and raw deflate are decoded; snappy on JSON is a no-op, as in Loki."""
        raw = body(({"job": "x"}, [value()]))
        response = post(client, loki, compress(raw), headers={**JSON, "Content-Encoding": encoding})
        assert response.status_code == 204
        assert len(loki.entries()) == 1

    def test_brotli_is_400(self, loki, client):
        """An unsupported Content-Encoding is refused."""
        response = post(client, loki, b"...", headers={**JSON, "Content-Encoding": "br"})
        assert response.status_code == 400
        assert "not supported" in response.text

    def test_any_other_content_type_is_read_as_snappy_protobuf(self, loki, client):
        """A non-JSON body that is not snappy block data is 400 snappy: corrupt input."""
        response = post(client, loki, b"{not snappy}", headers={"Content-Type": "text/plain"})
        assert (response.status_code, response.text) == (400, "snappy: corrupt input\n")

    def test_framed_snappy_is_refused(self, loki, client):
        """The snappy framing format (what cramjam.snappy.compress makes) is not accepted."""
        framed = bytes(cramjam.snappy.compress(b"\x0a\x00" * 50))
        assert post(client, loki, framed, headers=PROTOBUF).status_code == 400

    def test_protobuf_push_is_stored(self, loki, client):
        """A hand-built snappy protobuf request is decoded and stored."""
        response = post(
            client, loki, pb_request('{job="x"}', pb_entry(NOW // 10**9, 5, "pb line")), headers=PROTOBUF
        )
        assert response.status_code == 204
        (stored,) = loki.entries()
        assert (stored.ts_ns, stored.line) == (NOW + 5, "pb line")

    def test_gzip_on_top_of_snappy_protobuf(self, loki, client):
        """Content-Encoding gzip is undone before the snappy block is read."""
        request = gzip.compress(pb_request('{job="x"}', pb_entry(NOW // 10**9, 0, "z")))
        assert (
            post(client, loki, request, headers={**PROTOBUF, "Content-Encoding": "gzip"}).status_code == 204
        )

    def test_empty_streams_is_422(self, loki, client):
        """{"streams": []} is 422, as observed on Loki 3.4."""
        assert post(client, loki, b'{"streams": []}').status_code == 422

    def test_other_paths_are_404_and_ready_is_200(self, loki, client):
        """Only the push path accepts pushes; /ready answers."""
        assert client.post(loki.url + "/api/prom/push", content=b"", headers=JSON).status_code == 404
        assert client.get(loki.url + "/ready").status_code == 200


class TestJsonRules:
    @pytest.mark.parametrize(
        "values",
        [
            [[NOW, "numeric timestamp"]],
            [[str(NOW), "x", {"k": None}]],
            [[str(NOW), "x", {"k": 1}]],
            [[str(NOW), "x", {"k": {"nested": "object"}}]],
            [[str(NOW), "x", {"parsed": {"k": "v"}}]],
            [[str(NOW), 5]],
            [["12abc", "x"]],
            [[" 12", "x"]],
            [[str(NOW)]],
            [[str(NOW), "x", {}, "extra"]],
        ],
    )
    def test_malformed_values_reject_the_whole_request(self, loki, client, values):
        """Bad timestamps, non-string lines or metadata values are 400 and store nothing."""
        raw = json.dumps({"streams": [{"stream": {"job": "x"}, "values": [value(), *values]}]}).encode()
        assert post(client, loki, raw).status_code == 400
        assert loki.entries() == []

    def test_lone_surrogate_is_400(self, loki, client):
        """An escaped lone surrogate (what json.dumps writes for surrogateescape text) is refused."""
        raw = json.dumps(
            {"streams": [{"stream": {"job": "x"}, "values": [[str(NOW), "bad \udcff"]]}]}
        ).encode()
        assert b"\\udcff" in raw
        assert post(client, loki, raw).status_code == 400

    @pytest.mark.parametrize(
        "raw", [b"{", b"[]", b'{"streams": {}}', b'{"streams": [[]]}', b'{"streams": [{"values": [1]}]}']
    )
    def test_malformed_json_is_400(self, loki, client, raw):
        """Anything but Loki's JSON shape is a 400."""
        assert post(client, loki, raw).status_code == 400

    def test_structured_metadata_object_shape_is_accepted(self, loki, client):
        """The query-response shape {"structuredMetadata": {...}} is read as metadata."""
        response = post(
            client, loki, body(({"job": "x"}, [value(metadata={"structuredMetadata": {"trace_id": TRACE}})]))
        )
        assert response.status_code == 204
        assert loki.query(trace_id=TRACE)


class TestValidation:
    def test_a_400_stores_the_valid_entries(self, loki, client):
        """Invalid entries are named in one line; the valid ones are stored anyway."""
        raw = body(
            ({"job": "x"}, [value(0, "ok"), value(-8 * 24 * HOUR, "too old"), value(HOUR, "future")]),
            ({"bad-name": "y"}, [value(0, "bad label")]),
        )
        response = post(client, loki, raw)
        assert response.status_code == 400
        assert response.headers["content-type"].startswith("text/plain")
        assert response.text.count("\n") == 1
        for reason in (
            "greater_than_max_sample_age",
            "too_far_in_future",
            "invalid_labels",
            "total ignored: 3 out of 4",
        ):
            assert reason in response.text
        assert [e.line for e in loki.entries()] == ["ok"]

    def test_label_count_limit(self, loki, client):
        """15 labels are fine, 16 are rejected."""
        fifteen = {f"l{i}": "v" for i in range(15)}
        assert post(client, loki, body((fifteen, [value(0, "a")]))).status_code == 204
        response = post(client, loki, body(({**fifteen, "l15": "v"}, [value(0, "b")])))
        assert response.status_code == 400
        assert "max_label_names_per_series" in response.text

    def test_label_value_length_limit(self, loki, client):
        """A value of 2048 bytes passes, 2049 does not."""
        assert post(client, loki, body(({"job": "v" * 2048}, [value()]))).status_code == 204
        assert "label_value_too_long" in post(client, loki, body(({"job": "v" * 2049}, [value()]))).text

    def test_empty_label_values_are_dropped(self, loki, client):
        """Empty values vanish; a stream with only empty values has no labels (400)."""
        assert post(client, loki, body(({"job": "x", "empty": ""}, [value()]))).status_code == 204
        assert loki.entries()[0].labels == {"job": "x"}
        assert "missing_labels" in post(client, loki, body(({"empty": ""}, [value()]))).text

    def test_line_size_limit(self, loki, client):
        """A line of 256 KiB passes; one byte more is line_too_long."""
        limit = 256 * 1024
        raw = body(({"job": "x"}, [value(0, "a" * limit), value(1, "b" * (limit + 1))]))
        response = post(client, loki, raw)
        assert (response.status_code, "line_too_long" in response.text) == (400, True)
        assert [len(e.line) for e in loki.entries()] == [limit]

    def test_structured_metadata_limits(self, loki, client):
        """More than 128 pairs or more than 64 KiB of metadata rejects the entry."""
        many = {f"k{i}": "v" for i in range(129)}
        large = {"k": "v" * (64 * 1024)}
        ok = {f"k{i}": "v" for i in range(128)}
        response = post(
            client, loki, body(({"job": "x"}, [value(0, "a", many), value(1, "b", large), value(2, "c", ok)]))
        )
        assert response.status_code == 400
        assert "structured_metadata_too_many" in response.text
        assert "structured_metadata_too_large" in response.text
        assert [e.line for e in loki.entries()] == ["c"]

    def test_out_of_order_window(self, loki, client):
        """Entries up to 1 h behind the stream's newest are accepted, older ones are too_far_behind."""
        assert post(client, loki, body(({"job": "x"}, [value(0, "newest")]))).status_code == 204
        assert post(client, loki, body(({"job": "x"}, [value(-HOUR + 1, "within")]))).status_code == 204
        response = post(client, loki, body(({"job": "x"}, [value(-HOUR - 1, "behind")])))
        assert (response.status_code, "too_far_behind" in response.text) == (400, True)
        assert (
            post(client, loki, body(({"job": "other"}, [value(-HOUR - 1, "new stream")]))).status_code == 204
        )

    def test_identical_entries_are_stored_once(self, loki, client):
        """Same stream, timestamp and line is de-duplicated; a different line at the same time is kept."""
        raw = body(({"job": "x"}, [value(0, "a"), value(0, "a"), value(0, "b")]))
        assert post(client, loki, raw).status_code == 204
        assert post(client, loki, raw).status_code == 204
        assert sorted(e.line for e in loki.entries()) == ["a", "b"]

    def test_structured_metadata_names_are_normalized(self, loki, client):
        """Loki turns '.' and '-' in metadata names into '_'."""
        post(client, loki, body(({"job": "x"}, [value(metadata={"trace.id": TRACE, "span-id": "1"})])))
        assert loki.entries()[0].structured_metadata == {"trace_id": TRACE, "span_id": "1"}

    def test_burst_is_429_every_time_and_stores_nothing(self, client):
        """A request above the burst is 429 on every attempt."""
        with FakeLoki(now_ns=lambda: NOW, limits=FakeLimits(burst_bytes=100)) as loki:
            raw = body(({"job": "x"}, [value(i, "x" * 30) for i in range(4)]))
            assert [post(client, loki, raw).status_code for _ in range(3)] == [429, 429, 429]
            assert "rate limit" in loki.requests[0].response
            assert loki.entries() == []
            assert post(client, loki, body(({"job": "x"}, [value(0, "x" * 30)]))).status_code == 204

    def test_body_size_limit_is_413(self, client):
        """A body above max_recv_msg_size is 413."""
        with FakeLoki(now_ns=lambda: NOW, limits=FakeLimits(max_body_bytes=50)) as loki:
            assert post(client, loki, body(({"job": "x"}, [value(0, "x" * 100)]))).status_code == 413


class TestTenancy:
    def test_missing_org_id_is_401_with_auth_enabled(self, client):
        """Without X-Scope-OrgID the push is 401 no org id; with it, stored under the tenant."""
        with FakeLoki(auth_enabled=True, now_ns=lambda: NOW) as loki:
            raw = body(({"job": "x"}, [value()]))
            response = post(client, loki, raw)
            assert (response.status_code, response.text) == (401, "no org id\n")
            assert post(client, loki, raw, headers={**JSON, "X-Scope-OrgID": "team-a"}).status_code == 204
            assert [e.tenant for e in loki.entries()] == ["team-a"]
            assert loki.entries("other") == []
            assert post(client, loki, raw, headers={**JSON, "X-Scope-OrgID": "bad tenant"}).status_code == 401

    def test_without_auth_every_push_goes_to_fake(self, loki, client):
        """auth_enabled false ignores the header and uses tenant 'fake'."""
        post(client, loki, body(({"job": "x"}, [value()])), headers={**JSON, "X-Scope-OrgID": "a"})
        assert [e.tenant for e in loki.entries()] == ["fake"]


class TestScript:
    def test_replies_are_used_in_order_then_normal_handling(self, loki, client):
        """Scripted replies answer without storing; afterwards requests are handled normally."""
        loki.script(Reply(status=429, body="slow down"), Reply(status=503))
        raw = body(({"job": "x"}, [value()]))
        assert [(r.status_code, r.text) for r in (post(client, loki, raw) for _ in range(3))] == [
            (429, "slow down\n"),
            (503, "\n"),
            (204, ""),
        ]
        assert len(loki.entries()) == 1

    def test_hangup_closes_without_an_answer(self, loki, client):
        """Hangup reads the request and closes the connection."""
        loki.script(Hangup())
        with pytest.raises(httpx.RemoteProtocolError):
            post(client, loki, body(({"job": "x"}, [value()])))
        assert loki.requests[0].status is None

    def test_stall_delays_past_a_client_timeout(self, loki):
        """Stall holds the answer so a client with a short timeout gives up."""
        loki.script(Stall(seconds=30))
        with httpx.Client(trust_env=False, timeout=0.2) as client, pytest.raises(httpx.ReadTimeout):
            post(client, loki, body(({"job": "x"}, [value()])))

    def test_responder_decides_per_request(self, loki, client):
        """A responder callable sees each request and may answer it."""
        loki.responder = lambda request: Reply(status=500) if request.tenant is None else None
        assert post(client, loki, body(({"job": "x"}, [value()]))).status_code == 500

    def test_down_refuses_connections_then_comes_back_on_the_same_port(self, loki, client):
        """down() closes the port; afterwards the same URL works again."""
        url = loki.url
        with loki.down():
            with pytest.raises(httpx.ConnectError):
                post(client, loki, body(({"job": "x"}, [value()])))
            with (
                pytest.raises(ConnectionRefusedError),
                socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))),
            ):
                pass
        assert loki.url == url
        assert post(client, loki, body(({"job": "x"}, [value()]))).status_code == 204

    def test_records_headers_and_decoded_streams(self, loki, client):
        """Each request is recorded with lower-case headers, status and decoded streams."""
        post(
            client, loki, body(({"job": "x"}, [value(metadata={"k": "v"})])), headers={**JSON, "X-Test": "1"}
        )
        (request,) = loki.requests
        assert (request.method, request.path, request.status, request.headers["x-test"]) == (
            "POST",
            "/loki/api/v1/push",
            204,
            "1",
        )
        assert request.streams is not None
        assert request.streams[0].entries[0].structured_metadata == (("k", "v"),)

    def test_reset_forgets_everything(self, loki, client):
        """reset() clears entries, requests and the script."""
        loki.script(Reply(status=500))
        loki.reset()
        post(client, loki, body(({"job": "x"}, [value()])))
        loki.reset()
        assert (loki.entries(), loki.requests) == ([], [])


class TestSelector:
    @pytest.mark.parametrize(
        ("text", "pairs"),
        [
            ('{a="b"}', [("a", "b")]),
            ('  { a = "b" , c="d", }  ', [("a", "b"), ("c", "d")]),
            ("{a='it''s'}".replace("''", "\\'"), [("a", "it's")]),
            ("{a=`raw \\n\nline`}", [("a", "raw \\n\nline")]),
            ('{a="\\a\\b\\f\\n\\r\\t\\v\\\\\\""}', [("a", '\a\b\f\n\r\t\v\\"')]),
            ('{a="\\x41\\101\\u00e9\\U0001F389"}', [("a", "AAé🎉")]),
            ("{}", []),
        ],
    )
    def test_parses_prometheus_string_syntax(self, text, pairs):
        """Double, single and backtick quotes and Go escapes are read as Prometheus does."""
        assert parse_selector(text) == pairs

    @pytest.mark.parametrize(
        "text",
        [
            '{a="line\nbreak"}',
            '{a="\ufffd"}',
            '{a!="b"}',
            '{a=~"b"}',
            'metric{a="b"}',
            '{a="b"',
            '{a="b}',
            '{a="\\q"}',
            '{a="\\x80"}',
            '{a="\\ud800"}',
            '{a="\\\'"}',
            '{1a="b"}',
            '{a="b"} x',
            '{a="b" c="d"}',
        ],
    )
    def test_rejects_what_lokis_parser_rejects(self, text):
        """Raw newlines, raw U+FFFD, other matchers, bad escapes and stray text are errors."""
        with pytest.raises(LabelError):
            parse_selector(text)

    def test_unparseable_selector_rejects_only_its_stream(self, loki, client):
        """A protobuf stream with bad labels is a 400 naming it; other streams are stored."""
        bad = field(1, field(1, b'{job="x\n"}') + field(2, pb_entry(NOW // 10**9, 0, "lost")))
        good = field(1, field(1, b'{job="y"}') + field(2, pb_entry(NOW // 10**9, 0, "kept")))
        response = post(client, loki, bytes(cramjam.snappy.compress_raw(bad + good)), headers=PROTOBUF)
        assert (response.status_code, "invalid_labels" in response.text) == (400, True)
        assert [e.line for e in loki.entries()] == ["kept"]


class TestProtobufDecoder:
    @pytest.mark.parametrize(
        "raw",
        [
            field(1, b"\x0a\x05ab"),  # truncated length-delimited field
            b"\x08\x01",  # streams as a varint
            field(1, field(2, field(1, b"\x08"))),  # truncated varint in a timestamp
            field(1, field(2, pb_entry(1, 0, "x", extra=field(4, field(1, b"k"))))),  # `parsed` sent
            field(1, field(2, pb_entry(1, 1_000_000_000, "x"))),  # nanos out of range
            field(1, field(1, b"\xff\xfe")),  # invalid UTF-8 labels
            b"\x00\x00",  # field number 0
            b"\x0b",  # group wire type
        ],
    )
    def test_malformed_requests_are_push_errors(self, raw):
        """Malformed protobuf raises PushError(400), never anything else."""
        with pytest.raises(PushError) as info:
            decode_push_protobuf(bytes(cramjam.snappy.compress_raw(raw)))
        assert info.value.status == 400

    def test_unknown_fields_are_skipped(self):
        """Fields the schema does not know (and hash, format) are ignored, as proto3 does."""
        stream = field(1, b'{a="b"}') + b"\x18\x07" + field(9, b"??") + field(2, pb_entry(1, 2, "x"))
        (decoded,) = decode_push_protobuf(
            bytes(cramjam.snappy.compress_raw(field(1, stream) + field(2, b"loki")))
        )
        assert (decoded.labels, decoded.entries[0].ts_ns, decoded.entries[0].line) == (
            '{a="b"}',
            10**9 + 2,
            "x",
        )


def test_clock_defaults_to_wall_time(client):
    """Without now_ns the age checks use the current time."""
    with FakeLoki() as loki:
        raw = json.dumps(
            {"streams": [{"stream": {"job": "x"}, "values": [[str(time.time_ns()), "now"]]}]}
        ).encode()
        assert post(client, loki, raw).status_code == 204
