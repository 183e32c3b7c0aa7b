"""Tests for fluentforward.client: frame encoders, JSON-lines input and the trio client."""

from __future__ import annotations

import functools
import gzip
import io
import socket
import ssl
import struct
from collections.abc import Callable
from typing import Any

import attrs
import msgpack
import pytest
import trio
import trio.testing
import trustme
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from fluentforward.client import (
    MAX_JSON_LINE_CHARS,
    ClientAuth,
    ForwardClient,
    Frame,
    FrameEncoder,
    InputLineError,
    _array_header,
    content_chunk_id,
    encode_compressed_packed_forward,
    encode_event_time,
    encode_forward,
    encode_message,
    encode_packed_forward,
    frame_options,
    new_chunk_id,
    open_forward_client,
    pack_entries,
    read_json_lines,
)
from fluentforward.errors import ConfigError, RemoteProtocolError, SinkUnavailable
from fluentforward.protocol._auth import SharedKeyAuth, encode_helo, respond_to_ping
from fluentforward.protocol._decode import decode_frame
from fluentforward.protocol._events import Entry
from tests.conftest import FLUENT_BIT

T0 = 1_795_676_000_123_456_789  # ns, in the range of the captures
ET0 = encode_event_time(T0)
RECORD = {"message": "hello", "n": 42, "f": 1.5, "ok": True, "nested": {"k": "v"}}


def unpack_all(raw: bytes) -> list[Any]:
    unpacker = msgpack.Unpacker(raw=False, unicode_errors="surrogateescape", strict_map_key=False)
    unpacker.feed(raw)
    return list(unpacker)


def unpack_one(raw: bytes) -> Any:
    (value,) = unpack_all(raw)
    return value


def entries(n: int, **metadata: Any) -> list[Entry]:
    return [Entry(time_ns=T0 + i, record={"i": i}, metadata=dict(metadata)) for i in range(n)]


def counter_bytes() -> Callable[[int], bytes]:
    calls = iter(range(256))
    return lambda n: bytes([next(calls)]) * n


class TestEventTimeAndChunkIds:
    def test_event_time_is_fixext8(self) -> None:
        """EventTime packs as fixext8 type 0 with big-endian seconds and nanoseconds."""
        assert msgpack.packb(ET0) == b"\xd7\x00" + struct.pack(">II", 1_795_676_000, 123_456_789)

    def test_event_time_out_of_range(self) -> None:
        """A time before 1970 cannot be an EventTime."""
        with pytest.raises(ValueError, match="range"):
            encode_event_time(-1)

    def test_new_chunk_id_uses_given_bytes(self) -> None:
        """A chunk id is the base64 of the 16 given bytes."""
        assert new_chunk_id(b"\x00" * 16) == "AAAAAAAAAAAAAAAAAAAAAA=="
        assert len(new_chunk_id()) == 24
        with pytest.raises(ValueError, match="16"):
            new_chunk_id(b"short")

    def test_capture_entries_and_chunk_id_reproduced(self) -> None:
        """Re-packing ack.bin's decoded v2 entries gives Fluent Bit's bytes and its content chunk id."""
        raw = (FLUENT_BIT / "ack.bin").read_bytes()
        unpacker = msgpack.Unpacker(raw=False, unicode_errors="surrogateescape", strict_map_key=False)
        unpacker.feed(raw)
        tag, wire_entries, options = unpacker.unpack()
        frame = raw[: unpacker.tell()]
        packed = pack_entries([(meta[0], record, meta[1]) for meta, record in wire_entries], v2=True)
        start = 1 + len(msgpack.packb(tag)) + 1  # fixarray, tag, fixarray header of the entries
        assert frame[start : start + len(packed.data)] == packed.data
        assert frame[start + len(packed.data)] == 0xDF  # map32 options follow the entries
        assert content_chunk_id(packed.data) == options["chunk"]

    @pytest.mark.parametrize("n", [0, 1, 15, 16, 65535, 65536, 2**20])
    def test_array_header(self, n: int) -> None:
        """The hand-written array header equals msgpack's at every size boundary."""
        assert _array_header(n) == msgpack.Packer().pack_array_header(n)


class TestFrameBuilders:
    def test_message(self) -> None:
        """Message mode is [tag, time, record] or [tag, time, record, options]."""
        assert unpack_one(encode_message("app", ET0, RECORD)) == ["app", ET0, RECORD]
        options = frame_options(chunk="c1", fluent_signal=0)
        assert unpack_one(encode_message("app", 7, RECORD, options)) == [
            "app",
            7,
            RECORD,
            {"chunk": "c1", "fluent_signal": 0},
        ]

    def test_forward_classic(self) -> None:
        """Forward mode carries [time, record] entries and the options map."""
        packed = pack_entries([(ET0, RECORD), (7, {"b": 2})])
        frame = encode_forward("app", packed, frame_options(size=2))
        assert unpack_one(frame) == ["app", [[ET0, RECORD], [7, {"b": 2}]], {"size": 2}]
        assert frame[:1] == b"\x93"

    def test_forward_v2_entries(self) -> None:
        """v2 entries are [[time, metadata], record], with {} when an event has no metadata."""
        packed = pack_entries([(ET0, RECORD, {"otel": 1}), (ET0, RECORD)], v2=True)
        assert unpack_one(encode_forward("app", packed)) == [
            "app",
            [[[ET0, {"otel": 1}], RECORD], [[ET0, {}], RECORD]],
        ]

    def test_forward_drops_metadata_without_v2(self) -> None:
        """Without v2 a metadata element is left out of the entry."""
        packed = pack_entries([(ET0, RECORD, {"otel": 1})])
        assert unpack_all(packed.data) == [[ET0, RECORD]]

    def test_packed_forward(self) -> None:
        """PackedForward carries the entry stream as bin."""
        packed = pack_entries([(ET0, RECORD), (ET0, {"b": 2})])
        tag, stream, options = unpack_one(encode_packed_forward("app", packed, {"size": 2}))
        assert (tag, options) == ("app", {"size": 2})
        assert isinstance(stream, bytes)
        assert unpack_all(stream) == [[ET0, RECORD], [ET0, {"b": 2}]]

    @pytest.mark.parametrize(
        ("compression", "decompress"),
        [("gzip", gzip.decompress), ("zstd", lambda b: zstandard.ZstdDecompressor().decompress(b))],
    )
    def test_compressed_round_trip(self, compression: str, decompress: Callable[[bytes], bytes]) -> None:
        """CompressedPackedForward inflates back to the packed entries and names its compression."""
        packed = pack_entries([(ET0, RECORD)] * 50)
        frame = encode_compressed_packed_forward(
            "app", packed, compression=compression, options=frame_options(size=50)
        )
        tag, payload, options = unpack_one(frame)
        assert (tag, options) == ("app", {"size": 50, "compressed": compression})
        assert decompress(payload) == packed.data

    def test_gzip_is_deterministic(self) -> None:
        """gzip output does not depend on the clock."""
        packed = pack_entries([(ET0, RECORD)])
        assert encode_compressed_packed_forward("a", packed) == encode_compressed_packed_forward("a", packed)

    def test_unknown_compression(self) -> None:
        """An unknown compression name raises ValueError."""
        with pytest.raises(ValueError, match="compression"):
            encode_compressed_packed_forward("a", pack_entries([]), compression="lz4")

    def test_surrogates_go_back_to_original_bytes(self) -> None:
        """Text holding lone surrogates packs as the original invalid UTF-8 bytes."""
        original = b"caf\xe9"
        text = original.decode("utf-8", "surrogateescape")
        packed = pack_entries([(ET0, {"k": text})])
        assert b"\xa4" + original in packed.data
        assert unpack_all(packed.data) == [[ET0, {"k": text}]]
        assert b"\xa2t\xff" in encode_forward("t\udcff", packed)

    def test_options_order_and_absence(self) -> None:
        """Options follow Fluent Bit's key order, and no keys means no options map."""
        options = frame_options(fluent_signal=0, size=3, chunk="c", compressed="gzip", extra={"env": "prod"})
        assert list(options or {}) == ["chunk", "size", "compressed", "fluent_signal", "env"]
        assert frame_options() is None


class TestFrameEncoder:
    def test_batches(self) -> None:
        """Forward frames hold at most batch_records events each."""
        frames = list(FrameEncoder(batch_records=2).encode("app", entries(5)))
        assert [f.records for f in frames] == [2, 2, 1]
        assert [f.chunk for f in frames] == [None, None, None]
        assert unpack_one(frames[0].data) == [
            "app",
            [[ET0, {"i": 0}], [encode_event_time(T0 + 1), {"i": 1}]],
            {"size": 2},
        ]

    def test_message_mode_one_frame_per_event(self) -> None:
        """Message mode gives each event its own frame, chunk and metadata option."""
        encoder = FrameEncoder(
            mode="message", require_ack=True, fluent_signal=0, random_bytes=counter_bytes()
        )
        frames = list(encoder.encode("svc", entries(2, source="dummy")))
        assert [f.chunk for f in frames] == [new_chunk_id(b"\x00" * 16), new_chunk_id(b"\x01" * 16)]
        assert unpack_one(frames[1].data) == [
            "svc",
            encode_event_time(T0 + 1),
            {"i": 1},
            {"chunk": frames[1].chunk, "fluent_signal": 0, "metadata": {"source": "dummy"}},
        ]

    def test_message_mode_without_options(self) -> None:
        """Message mode with nothing to say sends a 3-element array."""
        (frame,) = FrameEncoder(mode="message").encode("svc", entries(1))
        assert unpack_one(frame.data) == ["svc", ET0, {"i": 0}]

    def test_time_as_integer_without_size(self) -> None:
        """time_as_integer sends int seconds; send_size False leaves the options map out."""
        (frame,) = FrameEncoder(time_as_integer=True, send_size=False).encode("app", entries(1))
        assert unpack_one(frame.data) == ["app", [[T0 // 10**9, {"i": 0}]]]

    def test_content_chunk_ids_are_stable(self) -> None:
        """Content chunk ids are equal for equal entries, whatever the randomness."""
        encoder = FrameEncoder(require_ack=True, content_chunk_ids=True, random_bytes=counter_bytes())
        first = list(encoder.encode("app", entries(3)))
        second = list(encoder.encode("app", entries(3)))
        assert first == second
        assert first[0].chunk is not None

    def test_extra_options(self) -> None:
        """extra_options and fluent_signal appear in the options map."""
        encoder = FrameEncoder(mode="packed", fluent_signal=0, extra_options={"tenant": "acme"})
        (frame,) = encoder.encode("app", entries(1))
        assert unpack_one(frame.data)[2] == {"size": 1, "fluent_signal": 0, "tenant": "acme"}

    def test_bad_settings(self) -> None:
        """Unknown modes, compressions and batch sizes are refused."""
        with pytest.raises(ValueError, match="mode"):
            FrameEncoder(mode="stream")
        with pytest.raises(ValueError, match="compression"):
            FrameEncoder(compression="brotli")
        with pytest.raises(ValueError, match="batch_records"):
            FrameEncoder(batch_records=0)

    @pytest.mark.parametrize("mode", ["message", "forward", "packed", "compressed"])
    @pytest.mark.parametrize("v2", [False, True])
    @pytest.mark.parametrize("compression", ["gzip", "zstd"])
    def test_server_decoder_reads_every_mode(self, mode: str, v2: bool, compression: str) -> None:
        """The server's decoder reads back the same times, records, metadata and chunk for every mode."""
        source = [Entry(time_ns=T0 + i, record={"i": i, "s": "x\udcff"}, metadata={"m": i}) for i in range(3)]
        encoder = FrameEncoder(mode=mode, v2_entries=v2, compression=compression, require_ack=True)
        decoded = []
        for frame in encoder.encode("app", source):
            result = decode_frame(frame.data)
            assert (result.tag, result.mode, result.chunk) == ("app", mode, frame.chunk)
            decoded.extend(result.entries)
        keeps_metadata = v2 or mode == "message"
        assert decoded == [attrs.evolve(e, metadata=e.metadata if keeps_metadata else {}) for e in source]


text_from_wire = st.binary(max_size=20).map(lambda b: b.decode("utf-8", "surrogateescape"))
json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | text_from_wire,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(text_from_wire, children, max_size=3),
    max_leaves=10,
)
records = st.dictionaries(text_from_wire, json_like, max_size=5)


@given(
    events=st.lists(
        st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 10**9 - 1), records, records), max_size=5
    ),
    v2=st.booleans(),
)
def test_packed_entries_decode_to_their_source(
    events: list[tuple[int, int, dict[str, Any], dict[str, Any]]], v2: bool
) -> None:
    """Packed entries decode (project convention) to the same times, records and metadata."""
    tuples = [(msgpack.ExtType(0, struct.pack(">II", s, ns)), rec, meta) for s, ns, rec, meta in events]
    packed = pack_entries(tuples, v2=v2)
    expected = [[[t, meta], rec] if v2 else [t, rec] for t, rec, meta in tuples]
    assert packed.count == len(events)
    assert unpack_all(packed.data) == expected


class TestReadJsonLines:
    def read(self, text: str, **kwargs: Any) -> list[Entry]:
        return list(read_json_lines(io.StringIO(text), now_ns=lambda: 5, **kwargs))

    def test_records_and_blank_lines(self) -> None:
        """Each JSON object line becomes an entry stamped with now; blank lines are skipped."""
        assert self.read('{"a": 1}\n\n  \n{"b": [2]}') == [
            Entry(time_ns=5, record={"a": 1}),
            Entry(time_ns=5, record={"b": [2]}),
        ]

    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ("1700000000", 1_700_000_000 * 10**9),
            ("1700000000.25", 1_700_000_000_250_000_000),
            ('"2024-01-01T00:00:00.5Z"', 1_704_067_200_500_000_000),
            ('"2024-01-01T01:00:00+01:00"', 1_704_067_200_000_000_000),
            ('"2024-01-01T00:00:00"', 1_704_067_200_000_000_000),
        ],
    )
    def test_time_key(self, value: str, expected: int) -> None:
        """The time field (seconds or RFC 3339, UTC by default) sets the time and leaves the record."""
        (entry,) = self.read(f'{{"t": {value}, "a": 1}}\n', time_key="t")
        assert entry == Entry(time_ns=expected, record={"a": 1})

    def test_keep_time_key(self) -> None:
        """keep_time_key leaves the time field in the record; a record without it gets now."""
        got = self.read('{"t": 1, "a": 1}\n{"a": 2}\n', time_key="t", keep_time_key=True)
        assert got == [Entry(time_ns=10**9, record={"t": 1, "a": 1}), Entry(time_ns=5, record={"a": 2})]

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ('{"a": 1}\n{"a": \n', "line 2: invalid JSON"),
            ('{"a": 1}\n\n[1, 2]\n', "line 3: expected a JSON object, got list"),
            ('{"t": true}\n', "line 1: field 't': a boolean is not a time"),
            ('{"t": "yesterday"}\n', "line 1: field 't': 'yesterday' is not an RFC 3339 time"),
            ('{"t": -5}\n', "line 1: field 't': time is outside"),
            ('{"t": {"s": 1}}\n', "line 1: field 't': a dict is not a time"),
        ],
    )
    def test_bad_lines(self, text: str, message: str) -> None:
        """A bad line raises InputLineError, a ConfigError whose message starts with its line number."""
        with pytest.raises(InputLineError, match="^" + message) as info:
            self.read(text, time_key="t")
        assert isinstance(info.value, ConfigError)
        assert info.value.line == int(message.split(":", maxsplit=1)[0].split()[1])

    def test_line_too_long(self) -> None:
        """A line longer than the bound is refused without being parsed."""
        text = '{"a": 1}\n"' + "x" * MAX_JSON_LINE_CHARS + '"\n'
        with pytest.raises(InputLineError, match="^line 2: longer than"):
            self.read(text)


# --- the client against a tiny in-test server --------------------------------------------------

SHARED_KEY = b"s3cr3t"
NONCE = b"N" * 16
AUTH_SALT = b"A" * 16


@attrs.define
class FakeServer:
    """A minimal Forward server: optional handshake, records requests, answers chunks via ``reply``."""

    auth: SharedKeyAuth | None = None
    reply: Callable[[list[str]], list[Any]] = lambda chunks: [{"ack": chunks.pop(0)}]
    ssl_context: ssl.SSLContext | None = None
    requests: list[Any] = attrs.Factory(list)
    handshakes: list[Any] = attrs.Factory(list)
    port: int = 0

    async def handle(self, stream: trio.abc.Stream) -> None:
        if self.ssl_context is not None:
            stream = trio.SSLStream(stream, self.ssl_context, server_side=True)
        unpacker = msgpack.Unpacker(raw=False, unicode_errors="surrogateescape", strict_map_key=False)
        pending: list[str] = []
        try:
            if self.auth is not None:
                auth_salt = AUTH_SALT if self.auth.user_auth else b""
                await stream.send_all(encode_helo(NONCE, auth_salt))
                ping = await self.next_message(stream, unpacker)
                verdict, pong = respond_to_ping(ping, nonce=NONCE, auth_salt=auth_salt, auth=self.auth)
                self.handshakes.append(verdict)
                await stream.send_all(pong)
            while data := await stream.receive_some(65536):
                unpacker.feed(data)
                for request in unpacker:
                    self.requests.append(request)
                    options = request[-1] if isinstance(request[-1], dict) else {}
                    if "chunk" in options:
                        pending.append(options["chunk"])
                        for answer in self.reply(pending):
                            await stream.send_all(msgpack.packb(answer))
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(stream)

    @staticmethod
    async def next_message(stream: trio.abc.Stream, unpacker: Any) -> Any:
        while True:
            for message in unpacker:
                return message
            unpacker.feed(await stream.receive_some(65536))


@pytest.fixture(name="start_server")
def _start_server(nursery: trio.Nursery) -> Callable[..., Any]:
    async def start(**settings: Any) -> FakeServer:
        server = FakeServer(**settings)
        listeners = await nursery.start(functools.partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1"))
        server.port = listeners[0].socket.getsockname()[1]
        return server

    return start


def acked_frames(n: int) -> list[Frame]:
    encoder = FrameEncoder(require_ack=True, batch_records=1, random_bytes=counter_bytes())
    return list(encoder.encode("app", entries(n)))


class TestForwardClient:
    async def test_handshake_and_acks(self, start_server: Callable[..., Any]) -> None:
        """After a shared-key handshake every chunk is sent and acknowledged in turn."""
        server = await start_server(auth=SharedKeyAuth(shared_key=SHARED_KEY, self_hostname="server.test"))
        auth = ClientAuth(shared_key=SHARED_KEY, self_hostname="client.test")
        async with open_forward_client("127.0.0.1", server.port, auth=auth) as client:
            for frame in acked_frames(3):
                await client.send(frame)
                assert client.in_flight == 0
            assert (client.frames_sent, client.acks_received, client.keepalive) == (3, 3, True)
        assert [r[2]["chunk"] for r in server.requests] == [f.chunk for f in acked_frames(3)]
        assert server.handshakes[0].client_hostname == "client.test"

    async def test_user_auth(self, start_server: Callable[..., Any]) -> None:
        """A username and password pass the server's user check."""
        server_auth = SharedKeyAuth(
            shared_key=SHARED_KEY, self_hostname="server.test", users={"alice": b"pw"}
        )
        server = await start_server(auth=server_auth)
        auth = ClientAuth(
            shared_key=SHARED_KEY, self_hostname="client.test", username="alice", password=b"pw"
        )
        async with open_forward_client("127.0.0.1", server.port, auth=auth) as client:
            await client.send(acked_frames(1)[0])
        assert server.handshakes[0].username == "alice"

    @pytest.mark.parametrize(
        ("client_auth", "match"),
        [
            (
                ClientAuth(shared_key=b"wrong", self_hostname="client.test"),
                "authentication failed: 'shared_key mismatch'",
            ),
            (ClientAuth(shared_key=SHARED_KEY, self_hostname="server.test"), "same hostname"),
        ],
    )
    async def test_handshake_failure(
        self, start_server: Callable[..., Any], client_auth: ClientAuth, match: str
    ) -> None:
        """A refused PING or a server with our own hostname raises RemoteProtocolError."""
        server = await start_server(auth=SharedKeyAuth(shared_key=SHARED_KEY, self_hostname="server.test"))
        with pytest.raises(RemoteProtocolError, match=match):
            async with open_forward_client("127.0.0.1", server.port, auth=client_auth):
                pytest.fail("the handshake should have failed")

    async def test_missing_handshake_is_explained(self, start_server: Callable[..., Any]) -> None:
        """A client without a key meets the server's HELO and says a handshake is required."""
        server = await start_server(auth=SharedKeyAuth(shared_key=SHARED_KEY, self_hostname="server.test"))
        with pytest.raises(RemoteProtocolError, match="requires a shared-key handshake"):
            async with open_forward_client("127.0.0.1", server.port) as client:
                await client.send(acked_frames(1)[0])

    async def test_ack_mismatch(self, start_server: Callable[..., Any]) -> None:
        """An ack for another chunk raises RemoteProtocolError."""
        server = await start_server(reply=lambda chunks: [{"ack": "someone-else"}])
        with pytest.raises(RemoteProtocolError, match="ack mismatch: got 'someone-else'"):
            async with open_forward_client("127.0.0.1", server.port) as client:
                await client.send(acked_frames(1)[0])

    async def test_ack_timeout(self, start_server: Callable[..., Any]) -> None:
        """A server that never acks makes send raise SinkUnavailable once ack_timeout passes."""
        server = await start_server(reply=lambda chunks: [])
        with pytest.raises(SinkUnavailable, match="waiting for ack: timed out"):
            async with open_forward_client("127.0.0.1", server.port, ack_timeout=0.05) as client:
                await client.send(acked_frames(1)[0])

    async def test_unexpected_reply(self, start_server: Callable[..., Any]) -> None:
        """A reply that is not an ack map raises RemoteProtocolError."""
        server = await start_server(reply=lambda chunks: [["what"]])
        with pytest.raises(RemoteProtocolError, match="expected an ack"):
            async with open_forward_client("127.0.0.1", server.port) as client:
                await client.send(acked_frames(1)[0])

    async def test_frames_without_chunk_need_no_reply(self, start_server: Callable[..., Any]) -> None:
        """Frames without a chunk id are sent without waiting for anything."""
        server = await start_server(reply=lambda chunks: pytest.fail("no chunk, no reply"))
        async with open_forward_client("127.0.0.1", server.port) as client:
            for frame in FrameEncoder(batch_records=1).encode("app", entries(2)):
                await client.send(frame)
        assert client.acks_received == 0
        assert client.frames_sent == 2

    async def test_in_flight_window(self, start_server: Callable[..., Any]) -> None:
        """With max_in_flight 2 the client sends a second chunk before the first ack and accepts acks out of order."""

        def reversed_pairs(chunks: list[str]) -> list[Any]:
            if len(chunks) < 2:
                return []
            answers = [{"ack": chunk} for chunk in reversed(chunks)]
            chunks.clear()
            return answers

        server = await start_server(reply=reversed_pairs)
        async with open_forward_client("127.0.0.1", server.port, max_in_flight=2) as client:
            frames = acked_frames(4)
            await client.send(frames[0])
            assert client.in_flight == 1
            for frame in frames[1:]:
                await client.send(frame)
        assert client.acks_received == 4
        assert client.in_flight == 0

    async def test_connection_refused(self) -> None:
        """Connecting to a closed port raises SinkUnavailable."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        with pytest.raises(SinkUnavailable, match=f"connecting to 127.0.0.1:{port}"):
            async with open_forward_client("127.0.0.1", port):
                pytest.fail("should not connect")

    async def test_server_closes_before_ack(self) -> None:
        """EOF while waiting for an ack raises SinkUnavailable."""
        client_stream, server_stream = trio.testing.memory_stream_pair()
        client = ForwardClient(client_stream)
        await server_stream.aclose()
        with pytest.raises(SinkUnavailable, match="closed by the server"):
            await client._receive(1, "ack")

    async def test_undecodable_reply(self) -> None:
        """Bytes that are not msgpack raise RemoteProtocolError."""
        client_stream, server_stream = trio.testing.memory_stream_pair()
        client = ForwardClient(client_stream)
        await server_stream.send_all(b"\xc1")
        with pytest.raises(RemoteProtocolError, match="undecodable reply while waiting for ack"):
            await client.send(Frame(data=b"\x90", chunk="c"))

    def test_in_flight_bounds(self) -> None:
        """max_in_flight outside 1..MAX_IN_FLIGHT is a ConfigError."""
        client_stream, _ = trio.testing.memory_stream_pair()
        with pytest.raises(ConfigError, match="max_in_flight"):
            ForwardClient(client_stream, max_in_flight=0)

    async def test_tls(self, start_server: Callable[..., Any]) -> None:
        """Frames go through TLS when an ssl_context is given, with the handshake on top."""
        ca = trustme.CA()
        server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("forward.test").configure_cert(server_context)
        client_context = ssl.create_default_context()
        ca.configure_trust(client_context)
        server = await start_server(
            ssl_context=server_context,
            auth=SharedKeyAuth(shared_key=SHARED_KEY, self_hostname="server.test"),
        )
        auth = ClientAuth(shared_key=SHARED_KEY, self_hostname="client.test")
        async with open_forward_client(
            "127.0.0.1", server.port, ssl_context=client_context, server_hostname="forward.test", auth=auth
        ) as client:
            await client.send(acked_frames(1)[0])
        assert len(server.requests) == 1

    async def test_tls_untrusted_certificate(self, start_server: Callable[..., Any]) -> None:
        """A certificate the client does not trust makes connecting raise SinkUnavailable."""
        server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        trustme.CA().issue_cert("forward.test").configure_cert(server_context)
        client_context = ssl.create_default_context()
        trustme.CA().configure_trust(client_context)
        server = await start_server(ssl_context=server_context)
        with pytest.raises(SinkUnavailable, match="connecting to"):
            async with open_forward_client(
                "127.0.0.1", server.port, ssl_context=client_context, server_hostname="forward.test"
            ):
                pytest.fail("the TLS handshake should have failed")
