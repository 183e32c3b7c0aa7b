"""Seed corpus, deterministic mutators and the oracle of the Forward protocol fuzzer.

``tests/test_fuzz.py`` drives this module; ``make fuzz`` runs 10^6 cases through it.

Invariants:

* A case is a pure function of ``(corpus, seed, index)``: the same bytes, pieces, limits and handshake in
  every process and on every run (the corpus itself is built deterministically). A finding is reported as
  ``seed:index`` and replayed with ``generate(build_corpus(), seed, index)``.
* The oracle (``check_case``) feeds a case to a fresh ``ServerConnection`` in pieces. Only
  ``RemoteProtocolError`` may escape, and it must leave the connection in ERROR. Every frame the receive
  path accepted must decode with ``decode_frame`` as delivery decodes stored frames (``STORED_LIMITS``:
  what was acked under any limits must be delivered) to the same tag, chunk, signal and mode, with ``record_count`` entries for logs, and must fit the spool's frame header (what the server
  does next with it).
* ``run_range`` gives each case at most ``SLOW_CPU_SECONDS`` of CPU time and stops it with an alarm after
  ``HANG_SECONDS`` of wall time; ``run_parallel`` also watches its workers for a hang in C code.
* Known bugs (``KNOWN_BUGS``) are excused only while their reproducer still shows them: a fix turns the
  excuse off by itself, and any other finding fails the run.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import functools
import gzip
import multiprocessing
import os
import random
import re
import signal
import struct
import time
import traceback
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import msgpack
import zstandard

import fluentforward
from fluentforward.client import (
    encode_compressed_packed_forward,
    encode_forward,
    encode_message,
    encode_packed_forward,
    pack_entries,
)
from fluentforward.errors import RemoteProtocolError
from fluentforward.protocol import (
    DEFAULT_LIMITS,
    STORED_LIMITS,
    EntriesReceived,
    Limits,
    ServerConnection,
    SharedKeyAuth,
    Signal,
    State,
    decode_frame,
    event_time,
)
from fluentforward.protocol._auth import encode_ping
from fluentforward.spool import FrameHeader
from fluentforward.spool._format import encode_frame

CAPTURES = Path(__file__).resolve().parent / "data" / "fluent-bit-5.1.1"
_PACKAGE_DIR = Path(fluentforward.__file__).resolve().parent

# --- budgets -------------------------------------------------------------------------------------

# The issue's bar for "hangs": no single frame may cost a second. CPU time, not wall time, so a busy
# machine (two fuzz workers plus a browser) does not turn into a false finding.
SLOW_CPU_SECONDS = 1.0
# Wall-clock alarm that interrupts a case stuck in Python code (a loop that never ends).
HANG_SECONDS = 10.0
# A worker that reports no finished range for this long is stuck in C code (where the alarm cannot fire).
STALL_SECONDS = 300.0
# Cases per task handed to a worker: large enough to amortise the IPC, small enough to balance two cores.
TASK_CASES = 2000
# Examples kept per finding signature; the rest are only counted.
EXAMPLES_PER_SIGNATURE = 3
# Hex bytes of a frame shown in a finding (enough to see the head of the request).
FRAME_HEAD_BYTES = 96

# --- limit profiles: small limits reach every limit check within a few hundred bytes --------------

SMALL_LIMITS = Limits(
    max_frame_bytes=16 * 1024, max_decompressed_bytes=64 * 1024, max_entries_per_frame=16, max_tag_bytes=64
)
TINY_LIMITS = Limits(
    max_frame_bytes=600, max_decompressed_bytes=600, max_entries_per_frame=2, max_tag_bytes=8
)
_PROFILES = (DEFAULT_LIMITS, SMALL_LIMITS, TINY_LIMITS)
_PROFILE_WEIGHTS = (45, 90, 100)  # cumulative: 45% default, 45% small, 10% tiny

# --- handshake settings (the shared key and user of the Fluent Bit handshake captures) ------------

SHARED_KEY = b"s3cr3t"
USERS = {"alice": b"pw"}
SERVER_HOSTNAME = "fuzz-server"
_GEN_NONCE = bytes(range(16))
_GEN_AUTH_SALT = bytes(range(16, 32))
_GEN_SALT = b"\x80salt-not-utf8\xff"


@attrs.frozen(kw_only=True)
class Handshake:
    """A HELO the server sent (nonce, auth salt) and a PING that answers it correctly."""

    nonce: bytes
    auth_salt: bytes  # b"" when user authentication is off
    ping: bytes

    def connection(self, limits: Limits) -> ServerConnection:
        """A fresh server connection that sent this HELO."""
        auth = SharedKeyAuth(
            shared_key=SHARED_KEY, self_hostname=SERVER_HOSTNAME, users=USERS if self.auth_salt else {}
        )
        return ServerConnection(auth=auth, nonce=self.nonce, auth_salt=self.auth_salt, limits=limits)


# --- msgpack encoding with control over every header ------------------------------------------------


@attrs.frozen
class Str:
    """Bytes the encoder must emit as msgpack str (trees decoded with raw=True hold plain bytes)."""

    data: bytes


@attrs.frozen
class Bin:
    """Bytes the encoder must emit as msgpack bin."""

    data: bytes


@attrs.frozen
class Ext:
    """An ext value with any type code (msgpack.ExtType refuses the negative, reserved ones)."""

    code: int
    data: bytes


@attrs.frozen
class Raw:
    """Bytes spliced into the encoding as they are."""

    data: bytes


@attrs.frozen(kw_only=True)
class Style:
    """How a tree is encoded: which plain bytes become bin, how often a header is wider than needed."""

    bin_bias: float = 1.0
    wide: float = 0.0


_SIZED_FORMS: dict[str, tuple[int | None, int, tuple[tuple[int, str, int], ...]]] = {
    "str": (0xA0, 32, ((0xD9, ">B", 0xFF), (0xDA, ">H", 0xFFFF), (0xDB, ">I", 0xFFFFFFFF))),
    "bin": (None, 0, ((0xC4, ">B", 0xFF), (0xC5, ">H", 0xFFFF), (0xC6, ">I", 0xFFFFFFFF))),
    "array": (0x90, 16, ((0xDC, ">H", 0xFFFF), (0xDD, ">I", 0xFFFFFFFF))),
    "map": (0x80, 16, ((0xDE, ">H", 0xFFFF), (0xDF, ">I", 0xFFFFFFFF))),
    "ext": (None, 0, ((0xC7, ">B", 0xFF), (0xC8, ">H", 0xFFFF), (0xC9, ">I", 0xFFFFFFFF))),
}
_INT_FORMS = (
    (0xCC, ">B", 0, 0xFF),
    (0xCD, ">H", 0, 0xFFFF),
    (0xCE, ">I", 0, 0xFFFFFFFF),
    (0xCF, ">Q", 0, 2**64 - 1),
    (0xD0, ">b", -(2**7), 2**7 - 1),
    (0xD1, ">h", -(2**15), 2**15 - 1),
    (0xD2, ">i", -(2**31), 2**31 - 1),
    (0xD3, ">q", -(2**63), 2**63 - 1),
)
_FIXEXT = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}


def _widen(rng: random.Random, style: Style) -> bool:
    return style.wide > 0 and rng.random() < style.wide


def _header(out: bytearray, family: str, n: int, rng: random.Random, style: Style) -> None:
    fix, fix_limit, sized = _SIZED_FORMS[family]
    wide = _widen(rng, style)
    if fix is not None and n < fix_limit and not wide:
        out.append(fix | n)
        return
    forms = [form for form in sized if n <= form[2]]
    marker, fmt, _ = rng.choice(forms) if wide else forms[0]
    out.append(marker)
    out += struct.pack(fmt, n)


def _encode_int(out: bytearray, value: int, rng: random.Random, style: Style) -> None:
    value = max(-(2**63), min(value, 2**64 - 1))  # msgpack has no wider integers
    if not _widen(rng, style):
        out += msgpack.packb(value)
        return
    marker, fmt, _, _ = rng.choice([form for form in _INT_FORMS if form[2] <= value <= form[3]])
    out.append(marker)
    out += struct.pack(fmt, value)


def _encode(value: Any, out: bytearray, rng: random.Random, style: Style) -> None:
    kind = type(value)
    if value is None:
        out.append(0xC0)
    elif kind is bool:
        out.append(0xC3 if value else 0xC2)
    elif kind is int:
        _encode_int(out, value, rng, style)
    elif kind is float:
        try:  # float32 only when the value fits it
            out += struct.pack(">Bf", 0xCA, value) if _widen(rng, style) else struct.pack(">Bd", 0xCB, value)
        except OverflowError:
            out += struct.pack(">Bd", 0xCB, value)
    elif kind in (bytes, Str, Bin, str):
        if kind is bytes:
            data, family = value, ("bin" if rng.random() < style.bin_bias else "str")
        elif kind is str:
            data, family = value.encode("utf-8", "surrogateescape"), "str"
        else:
            data, family = value.data, ("str" if kind is Str else "bin")
        _header(out, family, len(data), rng, style)
        out += data
    elif kind in (list, tuple):
        _header(out, "array", len(value), rng, style)
        for item in value:
            _encode(item, out, rng, style)
    elif kind is dict:
        _header(out, "map", len(value), rng, style)
        for key, item in value.items():
            _encode(key, out, rng, style)
            _encode(item, out, rng, style)
    elif kind in (msgpack.ExtType, Ext):
        size = len(value.data)
        if size in _FIXEXT and not _widen(rng, style):
            out.append(_FIXEXT[size])
        else:
            _header(out, "ext", size, rng, style)
        out += struct.pack(">b", value.code)
        out += value.data
    elif kind is Raw:
        out += value.data
    elif kind is msgpack.Timestamp:  # ext -1, what msgpack decodes a timestamp to
        out += msgpack.packb(value)
    else:
        raise TypeError(f"cannot encode {kind.__name__}")


class _NeedsSlowPath(Exception):  # noqa: N818 - control flow inside encode, never escapes
    pass


def _plain_default(use_bin_type: bool) -> Callable[[Any], Any]:
    def default(value: Any) -> Any:
        kind = type(value)
        if kind is Str:  # surrogateescape packs the str back to exactly these bytes
            return value.data.decode("utf-8", "surrogateescape")
        if kind is Bin and use_bin_type:
            return value.data
        if kind is Ext and 0 <= value.code <= 127:
            return msgpack.ExtType(value.code, value.data)
        raise _NeedsSlowPath

    return default


_PLAIN_DEFAULTS = {flag: _plain_default(flag) for flag in (False, True)}


def encode(value: Any, rng: random.Random, style: Style | None = None) -> bytes:
    """Encode a tree (bytes, Str, Bin, Ext, Raw, lists, dicts, ExtType, scalars) as msgpack.

    Minimal headers with every plain bytes value as bin (or every one as str) go through msgpack's C
    packer, about ten times faster; anything else is encoded here, header by header.
    """
    style = style or Style()
    if style.wide == 0 and style.bin_bias in (0.0, 1.0):
        use_bin_type = style.bin_bias == 1.0
        packer = msgpack.Packer(
            use_bin_type=use_bin_type, unicode_errors="surrogateescape", default=_PLAIN_DEFAULTS[use_bin_type]
        )
        with contextlib.suppress(_NeedsSlowPath, OverflowError):
            return packer.pack(value)  # type: ignore[no-any-return]
    out = bytearray()
    _encode(value, out, rng, style)
    return bytes(out)


def decode_tree(data: bytes) -> Any:
    """Decode one msgpack object with ``raw=True``, as the receive path does (raises on bad input)."""
    return msgpack.unpackb(data, raw=True, strict_map_key=False)


# --- msgpack header scan ------------------------------------------------------------------------------

_FIXED_SIZES = {
    0xC0: 1, 0xC2: 1, 0xC3: 1, 0xCA: 5, 0xCB: 9, 0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9,
    0xD0: 2, 0xD1: 3, 0xD2: 5, 0xD3: 9, 0xD4: 3, 0xD5: 4, 0xD6: 6, 0xD7: 10, 0xD8: 18,
}  # fmt: skip
# marker -> (width of its length field, family, bytes between the length and the payload)
_LENGTH_PREFIXED = {
    0xC4: (1, "bin", 0), 0xC5: (2, "bin", 0), 0xC6: (4, "bin", 0),
    0xC7: (1, "ext", 1), 0xC8: (2, "ext", 1), 0xC9: (4, "ext", 1),
    0xD9: (1, "str", 0), 0xDA: (2, "str", 0), 0xDB: (4, "str", 0),
}  # fmt: skip
_COUNTED = {0xDC: (2, "array"), 0xDD: (4, "array"), 0xDE: (2, "map"), 0xDF: (4, "map")}

Header = tuple[int, int, str]  # (offset, width of the length field, family)


def scan_headers(data: bytes) -> tuple[Header, ...]:
    """Every str/bin/array/map/ext header in ``data`` (a linear scan: msgpack is prefix order).

    Width 0 means the length lives in the marker (fixstr, fixarray, fixmap) or is fixed (fixext). The scan
    stops at the first byte that cannot start an object or at a length that runs past the end.
    """
    out: list[Header] = []
    pos = 0
    end = len(data)
    while pos < end:
        marker = data[pos]
        if marker <= 0x7F or marker >= 0xE0:
            pos += 1
        elif marker <= 0x8F:
            out.append((pos, 0, "map"))
            pos += 1
        elif marker <= 0x9F:
            out.append((pos, 0, "array"))
            pos += 1
        elif marker <= 0xBF:
            out.append((pos, 0, "str"))
            pos += 1 + (marker & 0x1F)
        elif marker in _FIXED_SIZES:
            if marker >= 0xD4:
                out.append((pos, 0, "ext"))
            pos += _FIXED_SIZES[marker]
        elif marker in _LENGTH_PREFIXED:
            width, family, extra = _LENGTH_PREFIXED[marker]
            if pos + 1 + width > end:
                break
            out.append((pos, width, family))
            pos += 1 + width + extra + int.from_bytes(data[pos + 1 : pos + 1 + width], "big")
        elif marker in _COUNTED:
            width, family = _COUNTED[marker]
            out.append((pos, width, family))
            pos += 1 + width
        else:  # 0xC1, never used
            break
    return tuple(out)


# --- compression ----------------------------------------------------------------------------------

# Seeds are small; a payload that inflates beyond this is a bomb and gets no inner stream.
_SEED_INFLATE_CAP = 4 * 1024 * 1024
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@functools.cache
def _zstd() -> zstandard.ZstdCompressor:
    return zstandard.ZstdCompressor(level=1)


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=1, mtime=0)


def _split(rng: random.Random, data: bytes, parts: int) -> list[bytes]:
    cuts = sorted({rng.randrange(len(data) + 1) for _ in range(parts - 1)})
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False)]


def compress(rng: random.Random, data: bytes, method: str) -> bytes:
    """Compress with ``gzip``, ``gzip-multi`` (concatenated members), ``zstd``, ``zstd-multi`` or not."""
    if method == "gzip":
        return _gzip(data)
    if method == "gzip-multi":
        return b"".join(_gzip(part) for part in _split(rng, data, rng.randint(2, 4)))
    if method == "zstd":
        return _zstd().compress(data)
    if method == "zstd-multi":
        return b"".join(_zstd().compress(part) for part in _split(rng, data, 2))
    return data


def _inflate_seed(payload: bytes) -> tuple[bytes, str] | None:
    """Undo a seed's compression: (stream, method), or None for a bomb or a corrupt payload."""
    try:
        if payload.startswith(_GZIP_MAGIC):
            out, rest, members = b"", payload, 0
            while rest:
                inflater = zlib.decompressobj(wbits=31)
                out += inflater.decompress(rest, _SEED_INFLATE_CAP)
                if inflater.unconsumed_tail or not inflater.eof:
                    return None
                rest, members = inflater.unused_data, members + 1
            return out, ("gzip-multi" if members > 1 else "gzip")
        if payload.startswith(_ZSTD_MAGIC):
            frames = 0
            out = b""
            rest = payload
            while rest:
                frame = zstandard.ZstdDecompressor().decompressobj()
                out += frame.decompress(rest)
                if not frame.eof or len(out) > _SEED_INFLATE_CAP:
                    return None
                rest, frames = frame.unused_data, frames + 1
            return out, ("zstd-multi" if frames > 1 else "zstd")
    except (zlib.error, zstandard.ZstdError):
        return None
    return payload, ""


# --- seeds and corpus -----------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Inner:
    """A PackedForward / CompressedPackedForward seed taken apart, to rebuild around a new entry stream."""

    tag: bytes
    stream: bytes
    options: dict[Any, Any] | None
    compression: str


@attrs.frozen(kw_only=True, eq=False)
class Seed:
    """One corpus entry.

    Attributes:
        name: where it came from (``capture.bin#2``, ``gen:forward-v2``, ``bomb:gzip-80MiB``).
        data: the request bytes.
        handshake: set for a PING: it is fed to a connection that sent this handshake's HELO.
        headers: msgpack headers in ``data`` (for the length and type-byte mutators).
        decodable: ``data`` is one msgpack object.
        inner: set for packed and compressed frames.
        bomb: inflates far beyond every limit; mutated rarely (mutations only break the bomb).
    """

    name: str
    data: bytes
    handshake: Handshake | None = None
    headers: tuple[Header, ...]
    decodable: bool
    inner: Inner | None
    bomb: bool = False


def make_seed(name: str, data: bytes, *, handshake: Handshake | None = None, bomb: bool = False) -> Seed:
    """Build a seed, working out its headers and, for a packed frame, its entry stream."""
    try:
        tree = decode_tree(data)
        decodable = True
    except Exception:
        tree, decodable = None, False
    inner = None
    if decodable and not bomb and type(tree) is list and len(tree) in (2, 3):
        tag, payload = tree[0], tree[1]
        options = tree[2] if len(tree) == 3 and type(tree[2]) is dict else None
        if type(tag) is bytes and type(payload) is bytes and (inflated := _inflate_seed(payload)):
            inner = Inner(tag=tag, stream=inflated[0], options=options, compression=inflated[1])
    return Seed(
        name=name,
        data=data,
        handshake=handshake,
        headers=scan_headers(data),
        decodable=decodable,
        inner=inner,
        bomb=bomb,
    )


@attrs.frozen(kw_only=True, eq=False)
class Corpus:
    """Seeds with their pick weights, the handshakes, and valid frames used as stream context."""

    seeds: tuple[Seed, ...]
    cum_weights: tuple[int, ...]
    handshakes: tuple[Handshake, ...]
    valid_frames: tuple[bytes, ...]
    sample_stream: bytes  # a valid MessagePackEventStream, for compressed garbage around real entries

    def pick(self, rng: random.Random) -> Seed:
        """A seed drawn by weight."""
        return self.seeds[bisect.bisect_right(self.cum_weights, rng.randrange(self.cum_weights[-1]))]

    def pick_plain(self, rng: random.Random) -> Seed:
        """A seed that is not a bomb (for splicing)."""
        while (seed := self.pick(rng)).bomb:
            pass
        return seed


# Each ordinary seed weighs this much; a bomb weighs _BOMB_WEIGHT, so bombs are about 0.2% of cases
# (each costs up to a max_decompressed_bytes inflate, about 0.1 s at the default 64 MiB).
_SEED_WEIGHT = 100
_BOMB_WEIGHT = 4


def split_requests(data: bytes) -> list[bytes]:
    """Cut a capture into its top-level msgpack objects, byte for byte."""
    unpacker = msgpack.Unpacker(raw=True, strict_map_key=False)
    unpacker.feed(data)
    out, start = [], 0
    for _ in unpacker:
        out.append(data[start : unpacker.tell()])
        start = unpacker.tell()
    return out


def _helo_of(name: str) -> tuple[bytes, bytes]:
    helo = decode_tree(split_requests((CAPTURES / name).read_bytes())[0])
    return helo[1][b"nonce"], helo[1][b"auth"]


def _captured_handshakes() -> dict[str, Handshake]:
    plain_nonce, _ = _helo_of("handshake-helo-pong-from-server.bin")
    user_nonce, user_salt = _helo_of("handshake-userauth-helo-pong-from-server.bin")
    return {
        "handshake-ping.bin": Handshake(
            nonce=plain_nonce, auth_salt=b"", ping=(CAPTURES / "handshake-ping.bin").read_bytes()
        ),
        "handshake-ping-userauth.bin": Handshake(
            nonce=user_nonce,
            auth_salt=user_salt,
            ping=(CAPTURES / "handshake-ping-userauth.bin").read_bytes(),
        ),
    }


def _generated_handshakes() -> tuple[Handshake, Handshake]:
    plain = Handshake(
        nonce=_GEN_NONCE,
        auth_salt=b"",
        ping=encode_ping("fuzz-client", _GEN_SALT, _GEN_NONCE, SHARED_KEY),
    )
    users = Handshake(
        nonce=_GEN_NONCE,
        auth_salt=_GEN_AUTH_SALT,
        ping=encode_ping(
            "fuzz-client",
            _GEN_SALT,
            _GEN_NONCE,
            SHARED_KEY,
            username="alice",
            password=b"pw",
            auth_salt=_GEN_AUTH_SALT,
        ),
    )
    return plain, users


_NS = 1_000_000_000
_T0 = 1_700_000_000 * _NS + 123_456_789
_RECORDS: tuple[dict[Any, Any], ...] = (
    {"message": "hello", "level": "info"},
    {
        "log": "x" * 100,
        "n": -7,
        "f": 1.5,
        "ok": True,
        "none": None,
        "list": [1, "a", None],
        "m": {"a": {"b": [1]}},
    },
    {"bin": b"\x00\xff", "utf8": "h\u00e9llo \u2713", "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736"},
    {},
)
_METADATA = {"otel": {"resource": {"service.name": "checkout"}}, "source": "fuzz"}
_GROUP_START = msgpack.ExtType(0, b"\xff\xff\xff\xff\x00\x00\x00\x00")
_GROUP_END = msgpack.ExtType(0, b"\xff\xff\xff\xfe\x00\x00\x00\x00")


def _entries(*, integer_times: bool = False) -> list[tuple[Any, Any]]:
    return [
        ((_T0 // _NS + i) if integer_times else event_time(_T0 + i * 1_000_001), record)
        for i, record in enumerate(_RECORDS)
    ]


def _generated_frames() -> dict[str, bytes]:
    """Frames of every carrier mode and option shape, built with the project's client encoders."""
    rng = random.Random(0)  # only for multi-member splits: fixed, so the corpus is the same every time
    entries = _entries()
    v1 = pack_entries(entries)
    v2 = pack_entries([(t, r, _METADATA) for t, r in entries], v2=True)
    ints = pack_entries(_entries(integer_times=True))
    groups = pack_entries(
        [
            (_GROUP_START, {"resource": {"attributes": {"k": "v"}}}, {}),
            *[(t, r, {}) for t, r in entries],
            (_GROUP_END, {}, {}),
        ],
        v2=True,
    )
    ack = {"chunk": "Z2VuZXJhdGVkLWNodW5r", "size": v1.count}
    metrics = msgpack.packb(
        {"meta": {"cmetrics": {}}, "metrics": [{"meta": {"type": 0}, "values": [{"ts": 1, "value": 2.5}]}]}
    )
    t = event_time(_T0)
    return {
        "message": encode_message("gen.message", t, _RECORDS[1]),
        "message-int-time": encode_message("gen.message", _T0 // _NS, _RECORDS[0]),
        "message-float-time": encode_message("gen.message", 1_700_000_000.25, _RECORDS[0]),
        "message-ack": encode_message("gen.message", t, _RECORDS[0], {"chunk": "bWVzc2FnZS1hY2s="}),
        "message-metadata": encode_message("gen.message", t, _RECORDS[2], {"metadata": _METADATA}),
        "message-nil-options": msgpack.packb(["gen.docker", t, {"log": "line"}, None]),
        "forward": encode_forward("gen.forward", v1),
        "forward-ack": encode_forward("gen.forward", v1, ack),
        "forward-v2": encode_forward("gen.forward", v2, {"size": v2.count}),
        "forward-int-times": encode_forward("gen.forward", ints),
        "forward-groups": encode_forward("v1_logs", groups, {"chunk": "Z3JvdXBz"}),
        "forward-signal-0": encode_forward("gen.forward", v1, {"fluent_signal": 0, "size": v1.count}),
        "forward-options-zoo": encode_forward(
            "gen.forward",
            v1,
            {"chunk": "em9v", "size": 4, "compressed": "text", "fluent_signal": 0, "x": [1]},
        ),
        "forward-empty": msgpack.packb(["gen.forward", []]),
        "forward-long-tag": encode_forward("t" * 4000, v1),
        "packed-bin": encode_packed_forward("gen.packed", v1),
        "packed-bin-ack": encode_packed_forward("gen.packed", v2, ack),
        "packed-str": msgpack.packb(["gen.packed", v1.data, {"size": v1.count}], use_bin_type=False),
        "gzip": encode_compressed_packed_forward("gen.gzip", v1, compression="gzip"),
        "gzip-ack": encode_compressed_packed_forward("gen.gzip", v2, compression="gzip", options=ack),
        "gzip-multi": msgpack.packb(
            ["gen.gzip", compress(rng, v1.data, "gzip-multi"), {"compressed": "gzip"}]
        ),
        "gzip-no-option": msgpack.packb(["gen.gzip", _gzip(v1.data)]),
        "zstd": encode_compressed_packed_forward("gen.zstd", v1, compression="zstd"),
        "zstd-ack": encode_compressed_packed_forward("gen.zstd", v2, compression="zstd", options=ack),
        "zstd-multi": msgpack.packb(
            ["gen.zstd", compress(rng, v1.data, "zstd-multi"), {"compressed": "zstd"}]
        ),
        "metrics": msgpack.packb(["gen.metrics", metrics, {"fluent_signal": 1}]),
        "metrics-gzip": msgpack.packb(
            ["gen.metrics", _gzip(metrics), {"fluent_signal": 1, "compressed": "gzip", "size": 1}]
        ),
        "traces": msgpack.packb(
            ["gen.traces", b"\x81\xa5spans\x90", {"fluent_signal": 2, "chunk": "dHJhY2Vz"}]
        ),
        "heartbeat": b"\xc0",
    }


def _ping_shapes(plain: Handshake) -> dict[str, bytes]:
    """PINGs that are wrong in one way each, plus server-side messages sent the wrong way."""
    good = decode_tree(plain.ping)
    return {
        "ping-short": msgpack.packb(["PING"]),
        "ping-ints": msgpack.packb(["PING", 1, 2, 3, 4, 5]),
        "ping-bad-digest": msgpack.packb([*good[:3], b"0" * 128, *good[4:]]),
        "ping-bin-name": msgpack.packb([b"PING", *good[1:]], use_bin_type=True),
        "ping-long-host": msgpack.packb(["PING", "h" * 2000, *good[2:]]),
        "ping-seven": msgpack.packb([*good, "extra"]),
        "helo-to-server": msgpack.packb(["HELO", {"nonce": b"n" * 16, "auth": b"", "keepalive": True}]),
        "pong-to-server": msgpack.packb(["PONG", True, "", "h", "d"]),
        "data-before-ping": msgpack.packb(["t", [[1, {}]]]),
    }


def _bombs() -> dict[str, bytes]:
    """Compressed frames that inflate far beyond max_decompressed_bytes (default and small)."""
    mib = bytes(1024 * 1024)
    gz_mib = _gzip(mib)
    inflater = zlib.compressobj(9, wbits=31)
    gz_80 = b"".join(inflater.compress(mib) for _ in range(80)) + inflater.flush()
    zstd_80 = zstandard.ZstdCompressor(level=3).compress(bytes(80 * 1024 * 1024))
    entry = b"\x92\x01\x80"  # [1, {}]: the smallest valid entry
    many = entry * 600_000  # above the default max_entries_per_frame
    deep = b"\x91" * 200_000  # nesting far beyond msgpack's stack
    payloads = {
        "gzip-80MiB": (gz_80, "gzip"),
        "gzip-1MiB": (gz_mib, "gzip"),
        "gzip-80-members": (gz_mib * 80, "gzip"),
        "zstd-80MiB": (zstd_80, "zstd"),
        "zstd-1MiB": (_zstd().compress(mib), "zstd"),
        "gzip-600k-entries": (zlib.compress(many, 9, wbits=31), "gzip"),
        "zstd-600k-entries": (_zstd().compress(many), "zstd"),
        "gzip-deep-nesting": (_gzip(deep), "gzip"),
    }
    return {
        name: msgpack.packb(["bomb", payload, {"compressed": method, "chunk": "Ym9tYg=="}])
        for name, (payload, method) in payloads.items()
    }


@functools.cache
def build_corpus() -> Corpus:
    """The corpus: every request of every capture, generated frames of every mode, handshakes, bombs."""
    captured = _captured_handshakes()
    plain, users = _generated_handshakes()
    seeds: list[tuple[Seed, int]] = []
    for path in sorted(CAPTURES.glob("*.bin")):
        for i, request in enumerate(split_requests(path.read_bytes())):
            seed = make_seed(f"{path.name}#{i}", request, handshake=captured.get(path.name))
            seeds.append((seed, _SEED_WEIGHT))
    generated = _generated_frames()
    seeds += [(make_seed(f"gen:{name}", data), _SEED_WEIGHT) for name, data in generated.items()]
    seeds += [(make_seed("gen:ping", plain.ping, handshake=plain), _SEED_WEIGHT)]
    seeds += [(make_seed("gen:ping-userauth", users.ping, handshake=users), _SEED_WEIGHT)]
    seeds += [
        (make_seed(f"ping:{n}", d, handshake=plain), _SEED_WEIGHT) for n, d in _ping_shapes(plain).items()
    ]
    seeds += [(make_seed(f"bomb:{n}", d, bomb=True), _BOMB_WEIGHT) for n, d in _bombs().items()]
    cum: list[int] = []
    total = 0
    for _, weight in seeds:
        total += weight
        cum.append(total)
    return Corpus(
        seeds=tuple(seed for seed, _ in seeds),
        cum_weights=tuple(cum),
        handshakes=(*captured.values(), plain, users),
        valid_frames=(
            generated["forward-ack"],
            generated["message"],
            generated["heartbeat"],
            generated["gzip"],
        ),
        sample_stream=pack_entries(_entries()).data,
    )


# --- values -------------------------------------------------------------------------------------------

INTERESTING_INTS = (
    0, 1, -1, -2, -3, 2, 127, 128, 255, 256, -32, -33, -128, -129, 0xFFFF, 0x10000, 0x7FFFFFFF,
    0x80000000, 0xFFFFFFFE, 0xFFFFFFFF, 0x100000000, 2**53, 2**63 - 1, 2**63, 2**64 - 1, -(2**31), -(2**63),
)  # fmt: skip
INTERESTING_FLOATS = (
    0.0, -0.0, 0.5, -0.5, -1.0, 1.7e9, 4294967296.5, 9.3e9, 1e19, 9.3e18, float("inf"), float("-inf"),
    float("nan"), 5e-324, 1.8e308,
)  # fmt: skip
INTERESTING_STRINGS = (
    b"", b"a", b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x00", b"\xf0\x9f\x92\xa9", b"chunk", b"size",
    b"compressed", b"fluent_signal", b"metadata", b"gzip", b"zstd", b"text", b"PING", b"HELO", b"PONG",
    b"\x1f\x8b", b"\x28\xb5\x2f\xfd", b"x" * 300,
)  # fmt: skip
_EXT_CODES = (0, 0, 1, -1, 127, -128, 2)
_EXT_SIZES = (0, 1, 2, 4, 7, 8, 8, 9, 12, 16)
_EVENT_SECONDS = (0, 1, 1_700_000_000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFD, 0xFFFFFFFE, 0xFFFFFFFF)
_EVENT_NANOS = (0, 1, 999_999_999, 1_000_000_000, 0xFFFFFFFF)


def _event_time(rng: random.Random) -> msgpack.ExtType:
    return msgpack.ExtType(0, struct.pack(">II", rng.choice(_EVENT_SECONDS), rng.choice(_EVENT_NANOS)))


def _random_bytes(rng: random.Random, n: int) -> bytes:
    return rng.getrandbits(8 * n).to_bytes(n, "little") if n else b""


_KINDS = ("int", "float", "str", "bin", "nil", "bool", "list", "map", "ext", "time")


def _kind_of(value: Any) -> str:
    kind = type(value)
    if value is None:
        return "nil"
    if kind is bool:
        return "bool"
    if kind is list:
        return "list"
    if kind is dict:
        return "map"
    if kind in (msgpack.ExtType, Ext, msgpack.Timestamp):
        return "ext"
    return {int: "int", float: "float", Bin: "bin"}.get(kind, "str")


def random_value(rng: random.Random, kind: str | None = None, depth: int = 0) -> Any:
    """A msgpack value of ``kind`` (any kind if None), biased to boundary values."""
    kind = kind or rng.choice(_KINDS)
    if kind == "int":
        return rng.choice(INTERESTING_INTS) if rng.random() < 0.8 else rng.randint(-(2**63), 2**64 - 1)
    if kind == "float":
        return rng.choice(INTERESTING_FLOATS)
    if kind in ("str", "bin"):
        data = (
            rng.choice(INTERESTING_STRINGS) if rng.random() < 0.7 else _random_bytes(rng, rng.randint(0, 40))
        )
        return Str(data) if kind == "str" else Bin(data)
    if kind == "nil":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "time":
        return _event_time(rng)
    if kind == "ext":
        return Ext(rng.choice(_EXT_CODES), _random_bytes(rng, rng.choice(_EXT_SIZES)))
    size = rng.choice((0, 1, 2, 3)) if depth < 3 else 0
    if kind == "list":
        return [random_value(rng, depth=depth + 1) for _ in range(size)]
    return {rng.choice(INTERESTING_STRINGS): random_value(rng, depth=depth + 1) for _ in range(size)}


def other_type(rng: random.Random, value: Any) -> Any:
    """A value of a different msgpack type than ``value`` (int <-> str <-> map <-> list <-> ext ...)."""
    current = _kind_of(value)
    return random_value(rng, rng.choice([kind for kind in _KINDS if kind != current]))


# --- byte mutators ------------------------------------------------------------------------------------

INTERESTING_BYTES = (
    0x00, 0xFF, 0xC1, 0xC0, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC2, 0xC3, 0xC4, 0xC5, 0xC6, 0xC7,
    0xC8, 0xC9, 0xCA, 0xCB, 0xCC, 0xCF, 0xD0, 0xD3, 0xD4, 0xD7, 0xD8, 0xD9, 0xDA, 0xDB, 0xDC, 0xDD, 0xDE,
    0xDF, 0xE0, 0x1F, 0x8B, 0x28, 0xB5,
)  # fmt: skip
_INTERESTING_WORDS = (
    b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x80\x00\x00\x00", b"\x00\x00\x00\x00", b"\x01\xff\xff\xff",
    b"\xff\xff", b"\x7f\xff", b"\x00\x00", b"\xff\xff\xff\xff\xff\xff\xff\xff", b"\x1f\x8b\x08\x00",
    b"\x28\xb5\x2f\xfd",
)  # fmt: skip

ByteMutator = Callable[[random.Random, bytes, Corpus], bytes]


def _position(rng: random.Random, n: int) -> int:
    """A position in ``n`` bytes, favouring the head, where the request's structure lives."""
    return rng.randrange(min(n, 32)) if rng.random() < 0.3 else rng.randrange(n)


def _flip_bits(rng: random.Random, data: bytes, _corpus: Corpus) -> bytes:
    if not data:
        return b"\x00"
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        buf[_position(rng, len(buf))] ^= 1 << rng.randrange(8)
    return bytes(buf)


def _interesting_bytes(rng: random.Random, data: bytes, _corpus: Corpus) -> bytes:
    if not data:
        return bytes([rng.choice(INTERESTING_BYTES)])
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        buf[_position(rng, len(buf))] = rng.choice(INTERESTING_BYTES)
    return bytes(buf)


def _interesting_word(rng: random.Random, data: bytes, _corpus: Corpus) -> bytes:
    word = rng.choice(_INTERESTING_WORDS)
    if len(data) <= len(word):
        return data + word
    pos = _position(rng, len(data) - len(word))
    return data[:pos] + word + data[pos + len(word) :]


def _truncate(rng: random.Random, data: bytes, _corpus: Corpus) -> bytes:
    if len(data) < 2:
        return b""
    if rng.random() < 0.5:
        return data[: len(data) - rng.randint(1, min(16, len(data) - 1))]
    return data[: rng.randrange(len(data))]


def _remove_range(rng: random.Random, data: bytes, _corpus: Corpus) -> bytes:
    if not data:
        return data
    start = _position(rng, len(data))
    return data[:start] + data[start + rng.randint(1, 32) :]


def _duplicate_range(rng: random.Random, data: bytes, _corpus: Corpus) -> bytes:
    if not data:
        return data
    start = rng.randrange(len(data))
    chunk = data[start : start + rng.randint(1, 64)]
    at = rng.randrange(len(data) + 1)
    return data[:at] + chunk * rng.choice((1, 1, 2, 16)) + data[at:]


def _insert_nil(rng: random.Random, data: bytes, _corpus: Corpus) -> bytes:
    at = _position(rng, len(data) + 1)
    return data[:at] + b"\xc0" + data[at:]


def _insert_random(rng: random.Random, data: bytes, _corpus: Corpus) -> bytes:
    at = _position(rng, len(data) + 1)
    return data[:at] + _random_bytes(rng, rng.randint(1, 16)) + data[at:]


def _splice(rng: random.Random, data: bytes, corpus: Corpus) -> bytes:
    other = corpus.pick_plain(rng).data
    return data[: rng.randrange(len(data) + 1)] + other[rng.randrange(len(other) + 1) :]


BYTE_MUTATORS: dict[str, ByteMutator] = {
    "flip": _flip_bits,
    "byte": _interesting_bytes,
    "word": _interesting_word,
    "truncate": _truncate,
    "remove": _remove_range,
    "dup": _duplicate_range,
    "nil": _insert_nil,
    "insert": _insert_random,
    "splice": _splice,
}
_BYTE_NAMES = tuple(BYTE_MUTATORS)


def mutate_bytes(rng: random.Random, data: bytes, corpus: Corpus, steps: list[str]) -> bytes:
    """Apply one random byte-level mutator, recording its name."""
    name = rng.choice(_BYTE_NAMES)
    steps.append(name)
    return BYTE_MUTATORS[name](rng, data, corpus)


# --- header mutators (need the seed's header table) -------------------------------------------------

_LENGTHS = {
    1: (0, 1, 0x7F, 0x80, 0xFE, 0xFF),
    2: (0, 1, 0xFF, 0x100, 0x7FFF, 0xFFFF),
    4: (
        0,
        1,
        0xFFFF,
        0x10000,
        0xFFFFFF,
        0x1FFFFFF,
        0x2000000,
        0x7FFFFFFF,
        0x80000000,
        0xFFFFFFFE,
        0xFFFFFFFF,
    ),
}
_SAME_WIDTH = {1: (0xC4, 0xC7, 0xD9), 2: (0xC5, 0xC8, 0xDA, 0xDC, 0xDE), 4: (0xC6, 0xC9, 0xDB, 0xDD, 0xDF)}
_FIX_BASES = {"map": (0x80, 0x0F), "array": (0x90, 0x0F), "str": (0xA0, 0x1F)}


def _replace(data: bytes, pos: int, new: bytes) -> bytes:
    return data[:pos] + new + data[pos + len(new) :]


def _set_length(rng: random.Random, data: bytes, headers: Sequence[Header]) -> bytes:
    pos, width, _ = rng.choice(headers)
    if width == 0:
        marker = data[pos]
        family = next((f for f, (base, mask) in _FIX_BASES.items() if base <= marker <= base + mask), None)
        if family is None:  # a fixext: its size is in the marker
            return _replace(data, pos, bytes([rng.choice((0xD4, 0xD5, 0xD6, 0xD7, 0xD8))]))
        base, mask = _FIX_BASES[family]
        return _replace(data, pos, bytes([base | rng.randint(0, mask)]))
    current = int.from_bytes(data[pos + 1 : pos + 1 + width], "big")
    if rng.random() < 0.3:
        value = (current + rng.choice((1, -1, 2, -2))) % (1 << (8 * width))
    else:
        value = rng.choice(_LENGTHS[width])
    return _replace(data, pos + 1, value.to_bytes(width, "big"))


def _retype(rng: random.Random, data: bytes, headers: Sequence[Header]) -> bytes:
    pos, width, _ = rng.choice(headers)
    if width:
        return _replace(data, pos, bytes([rng.choice(_SAME_WIDTH[width])]))
    low = data[pos] & 0x0F
    return _replace(data, pos, bytes([rng.choice((0x80 | low, 0x90 | low, 0xA0 | low, 0xD7, 0xC0))]))


def _ext_code(rng: random.Random, data: bytes, headers: Sequence[Header]) -> bytes:
    exts = [h for h in headers if h[2] == "ext"]
    if not exts:
        return _retype(rng, data, headers)
    pos, width, _ = rng.choice(exts)
    return _replace(data, pos + 1 + width, bytes([rng.choice((0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF))]))


_HEADER_MUTATORS = {"length": _set_length, "retype": _retype, "ext-code": _ext_code}


# --- tree mutators (decoded request, re-encoded) ----------------------------------------------------

Slot = tuple[Any, Any]  # (container, index or key)
# Slots collected from one tree: enough for any real frame; metrics frames have about 1500 values.
_MAX_SLOTS = 4000


def _slots(tree: Any) -> list[Slot]:
    out: list[Slot] = []
    stack = [tree]
    while stack and len(out) < _MAX_SLOTS:
        node = stack.pop()
        if type(node) is list:
            for i, child in enumerate(node):
                out.append((node, i))
                stack.append(child)
        elif type(node) is dict:
            for key, child in node.items():
                out.append((node, key))
                stack.append(child)
    return out


def _twin_key(rng: random.Random, container: dict[Any, Any], key: Any) -> None:
    """Send ``key`` both as str and as bin: decoders that fold the two disagree on which wins."""
    if type(key) is not bytes:
        container[Str(b"chunk")] = random_value(rng)
        return
    value = container.pop(key)
    pair = [(Str(key), value), (Bin(key), random_value(rng))]
    rng.shuffle(pair)
    container.update(pair)


def _tree_op(rng: random.Random, tree: Any) -> tuple[Any, str]:
    """Mutate one random value of a decoded request in place; return the (maybe new) root and the op."""
    slots = _slots(tree)
    if not slots or rng.random() < 0.1:
        return (other_type(rng, tree) if rng.random() < 0.5 else [tree]), "root"
    container, key = rng.choice(slots)
    is_list = type(container) is list
    ops = ("retype", "random", "delete", "nil", "dup", "wrap") + (() if is_list else ("twin", "key"))
    op = rng.choice(ops)
    if op == "retype":
        container[key] = other_type(rng, container[key])
    elif op == "random":
        container[key] = random_value(rng)
    elif op == "delete":
        del container[key]
    elif op == "nil":
        if is_list:
            container.insert(key, None)
        else:
            container[None] = None
    elif op == "dup":
        if is_list:
            container.insert(key, container[key])
        else:
            container[Str(b"dup")] = container[key]
    elif op == "wrap":
        container[key] = [container[key]]
    elif op == "twin":
        _twin_key(rng, container, key)
    else:  # a map key of another type; a tuple encodes as an array, which no decoder can hash
        container[rng.choice((0, -1, None, 1.5, True, (1,), Ext(1, b"")))] = container.pop(key)
    return tree, op


def _style(rng: random.Random) -> Style:
    return Style(bin_bias=rng.choice((0.0, 0.5, 1.0, 1.0)), wide=rng.choice((0.0, 0.0, 0.3)))


OPTION_VALUES: dict[bytes, tuple[Any, ...]] = {
    b"chunk": (b"", b"c", b"\xff\xfe", b"x" * 0x10000, 0, None, [], {}),
    b"size": (0, 1, -1, 2**32, 2**64 - 1, b"3", 1.5, None),
    b"compressed": (b"gzip", b"zstd", b"text", b"", b"\xff", b"GZIP", 1, None),
    b"fluent_signal": (0, 1, 2, 3, -1, True, b"1", 1.0, None),
    b"metadata": ({}, {b"k": b"v"}, [], b"m", None),
}
_OPTION_KEYS = tuple(OPTION_VALUES)


def _options_op(rng: random.Random, tree: list[Any]) -> str:
    """Mutate the options map of a request (creating it when the arity allows)."""
    where = 3 if type(tree[1]) not in (list, bytes) else 2
    if len(tree) > where and type(tree[where]) is dict:
        options = tree[where]
    else:
        options = {}
        del tree[where:]
        while len(tree) < where:
            tree.append(None)
        tree.append(options)
    op = rng.choice(("set", "set", "set", "twin", "delete", "not-a-map"))
    key = rng.choice(_OPTION_KEYS)
    if op == "set":
        options[key] = rng.choice(OPTION_VALUES[key]) if rng.random() < 0.7 else random_value(rng)
    elif op == "twin":
        options.setdefault(key, rng.choice(OPTION_VALUES[key]))
        _twin_key(rng, options, key)
    elif op == "delete" and options:
        del options[rng.choice(list(options))]
    else:
        tree[where] = random_value(rng, rng.choice(("nil", "int", "list", "str")))
    return f"option-{op}"


INTERESTING_TIMES: tuple[Any, ...] = (
    -1, -2, -3, 0, 2**32, 2**63 - 1, 2**64 - 1, -(2**63), float("nan"), float("inf"), -0.0, -0.5, 9.3e9,
    1e19, msgpack.ExtType(1, b"\x00" * 8), msgpack.ExtType(0, b"\x00" * 4), msgpack.ExtType(0, b"\x00" * 12),
    Ext(-1, b"\x00" * 8), b"2024-01-01T00:00:00Z", None, [1], {},
)  # fmt: skip


def _time_value(rng: random.Random) -> Any:
    return _event_time(rng) if rng.random() < 0.4 else rng.choice(INTERESTING_TIMES)


def _set_entry_time(rng: random.Random, entry: Any) -> str:
    """Replace the time of one ``[time, record]`` / ``[[time, metadata], record]`` entry."""
    if type(entry) is not list or not entry:
        return "time-none"
    head = entry[0]
    if type(head) is list and head:
        choice = rng.random()
        if choice < 0.15:
            entry[0] = head[:1]  # [[time], record]
            return "time-short-head"
        if choice < 0.3:
            entry[0] = [*head, random_value(rng)]
            return "time-long-head"
        if choice < 0.4 and len(head) > 1:
            head[1] = other_type(rng, head[1])
            return "time-metadata"
        head[0] = _time_value(rng)
        return "time-v2"
    entry[0] = _time_value(rng)
    return "time"


def _times_op(rng: random.Random, tree: list[Any]) -> str:
    second = tree[1]
    if type(second) is list:
        if not second:
            second.append([0, {}])
        return _set_entry_time(rng, rng.choice(second))
    tree[1] = _time_value(rng)
    return "time-message"


# --- mutation families ------------------------------------------------------------------------------


def _family_bytes(rng: random.Random, seed: Seed, corpus: Corpus, steps: list[str]) -> bytes:
    data = seed.data
    for _ in range(rng.randint(1, 3)):
        data = mutate_bytes(rng, data, corpus, steps)
    return data


def _family_header(rng: random.Random, seed: Seed, corpus: Corpus, steps: list[str]) -> bytes:
    if not seed.headers:
        return _family_bytes(rng, seed, corpus, steps)
    name = rng.choice(tuple(_HEADER_MUTATORS))
    steps.append(name)
    return _HEADER_MUTATORS[name](rng, seed.data, seed.headers)


def _decoded(seed: Seed) -> Any:
    return decode_tree(seed.data) if seed.decodable else None


def _family_tree(rng: random.Random, seed: Seed, corpus: Corpus, steps: list[str]) -> bytes:
    if not seed.decodable:
        return _family_bytes(rng, seed, corpus, steps)
    tree = _decoded(seed)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        tree, op = _tree_op(rng, tree)
        steps.append(op)
    return encode(tree, rng, _style(rng))


def _request(seed: Seed) -> list[Any] | None:
    tree = _decoded(seed)
    return tree if type(tree) is list and len(tree) >= 2 else None


def _family_options(rng: random.Random, seed: Seed, corpus: Corpus, steps: list[str]) -> bytes:
    tree = _request(seed)
    if tree is None:
        return _family_tree(rng, seed, corpus, steps)
    steps.append(_options_op(rng, tree))
    return encode(tree, rng, _style(rng))


def _family_times(rng: random.Random, seed: Seed, corpus: Corpus, steps: list[str]) -> bytes:
    if seed.inner is not None:
        return _family_inner(rng, seed, corpus, steps)
    tree = _request(seed)
    if tree is None:
        return _family_tree(rng, seed, corpus, steps)
    steps.append(_times_op(rng, tree))
    return encode(tree, rng, _style(rng))


def _stream_entries(stream: bytes) -> list[Any] | None:
    unpacker = msgpack.Unpacker(raw=True, strict_map_key=False)
    unpacker.feed(stream)
    try:
        return list(unpacker)
    except Exception:
        return None


# A repeated entry stream stays below this: past it a case costs only time (the entry limits are far lower).
_REPEAT_BYTES = 64 * 1024


def _mutate_stream(rng: random.Random, stream: bytes, corpus: Corpus, steps: list[str]) -> bytes:
    entries = _stream_entries(stream)
    choice = rng.random()
    if entries is None or choice < 0.3:
        return mutate_bytes(rng, stream, corpus, steps)
    if not entries:
        entries = [[0, {}]]
    style = _style(rng)
    if choice < 0.55:
        steps.append("inner-" + _set_entry_time(rng, rng.choice(entries)))
    elif choice < 0.8:
        root, op = _tree_op(rng, entries)
        steps.append(f"inner-{op}")
        entries = root if type(root) is list else [root]
    elif choice < 0.9:
        # 17 and 600 pass the small entry limits; the stream stays under _REPEAT_BYTES all the same.
        count = min(rng.choice((2, 3, 17, 600)), max(2, _REPEAT_BYTES // max(1, len(stream) // len(entries))))
        steps.append(f"inner-repeat-{count}")
        entries = [entries[i % len(entries)] for i in range(count)]
    else:
        steps.append("inner-append")
        entries.append(random_value(rng))
    return b"".join(encode(entry, rng, style) for entry in entries)


_COMPRESSIONS = ("", "gzip", "gzip-multi", "zstd", "zstd-multi")
_OPTION_NAMES = {"gzip": b"gzip", "gzip-multi": b"gzip", "zstd": b"zstd", "zstd-multi": b"zstd"}


def _wrap_payload(rng: random.Random, tag: bytes, payload: bytes, options: dict[Any, Any] | None) -> bytes:
    as_str = rng.random() < 0.2  # Fluentd sends packed entries as str
    request: list[Any] = [tag, Str(payload) if as_str else Bin(payload)]
    if options is not None:
        request.append(options)
    return encode(request, rng, _style(rng))


def _family_inner(rng: random.Random, seed: Seed, corpus: Corpus, steps: list[str]) -> bytes:
    inner = seed.inner
    if inner is None:
        return (
            _family_times(rng, seed, corpus, steps)
            if seed.decodable
            else _family_bytes(rng, seed, corpus, steps)
        )
    stream = _mutate_stream(rng, inner.stream, corpus, steps)
    method = inner.compression if rng.random() < 0.7 else rng.choice(_COMPRESSIONS)
    options = dict(inner.options) if inner.options is not None else None
    if method != inner.compression:
        steps.append(f"recompress-{method or 'none'}")
        if rng.random() < 0.8:  # say so in the option; otherwise leave the old (now wrong) one
            options = options if options is not None else {}
            options[b"compressed"] = _OPTION_NAMES.get(method, b"text")
    return _wrap_payload(rng, inner.tag, compress(rng, stream, method), options)


def _garbage_payload(rng: random.Random, corpus: Corpus) -> tuple[str, bytes]:
    stream = corpus.sample_stream
    junk = _random_bytes(rng, rng.randint(0, 200))
    gz = _gzip(stream)
    zs = _zstd().compress(stream)
    choices: dict[str, Callable[[], bytes]] = {
        "gzip-header-junk": lambda: b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + junk,
        "gzip-of-junk": lambda: _gzip(junk),
        "gzip-trailing-junk": lambda: gz + b"\x00" + junk,
        "gzip-truncated": lambda: gz[: rng.randrange(len(gz))],
        "gzip-bad-crc": lambda: gz[:-8] + bytes(8),
        "gzip-flags": lambda: b"\x1f\x8b\x08" + bytes([rng.randrange(256)]) + gz[4:],
        "gzip-then-zstd": lambda: gz + zs,
        "zstd-magic-junk": lambda: _ZSTD_MAGIC + junk,
        "zstd-of-junk": lambda: _zstd().compress(junk),
        "zstd-truncated": lambda: zs[: rng.randrange(len(zs))],
        "zstd-trailing-junk": lambda: zs + junk,
        "zstd-skippable": lambda: b"\x50\x2a\x4d\x18\x04\x00\x00\x00abcd" + zs,
        "zstd-then-gzip": lambda: zs + gz,
        "empty": lambda: b"",
    }
    name = rng.choice(tuple(choices))
    return name, choices[name]()


def _family_compression(rng: random.Random, _seed: Seed, corpus: Corpus, steps: list[str]) -> bytes:
    name, payload = _garbage_payload(rng, corpus)
    steps.append(name)
    options = {b"compressed": rng.choice((b"gzip", b"zstd", b"text"))}
    if rng.random() < 0.3:
        return _wrap_payload(rng, b"fuzz.compressed", payload, None)  # magic bytes alone
    if rng.random() < 0.3:
        options[b"chunk"] = b"Z2FyYmFnZQ=="
    return _wrap_payload(rng, b"fuzz.compressed", payload, options)


def _family_splice(rng: random.Random, seed: Seed, corpus: Corpus, steps: list[str]) -> bytes:
    other = corpus.pick_plain(rng).data
    data = seed.data
    op = rng.choice(("splice", "concat", "concat-nil", "truncated-then"))
    steps.append(op)
    if op == "splice":
        return data[: rng.randrange(len(data) + 1)] + other[rng.randrange(len(other) + 1) :]
    if op == "concat":
        return data + other
    if op == "concat-nil":
        return data + b"\xc0" + other
    return data[: rng.randrange(len(data) + 1)] + other


_NEST_DEPTHS = (2, 64, 500, 1100, 5000, 100_000)


def _family_nest(rng: random.Random, seed: Seed, _corpus: Corpus, steps: list[str]) -> bytes:
    depth = rng.choice(_NEST_DEPTHS)
    op = rng.choice(("arrays", "maps", "record"))
    steps.append(f"nest-{op}-{depth}")
    if op == "arrays":
        return b"\x91" * depth + seed.data
    if op == "maps":
        return b"\x81\xa1k" * depth + b"\xc0"
    # [tag, [[1, {"k": {"k": ... {}}}]]]: valid Forward while msgpack's stack holds
    return b"\x92\xa4deep\x91\x92\x01" + b"\x81\xa1k" * depth + b"\x80"


def _family_none(_rng: random.Random, seed: Seed, _corpus: Corpus, steps: list[str]) -> bytes:
    steps.append("as-is")
    return seed.data


Family = Callable[[random.Random, Seed, Corpus, list[str]], bytes]
FAMILIES: dict[str, tuple[Family, int]] = {
    "none": (_family_none, 3),
    "bytes": (_family_bytes, 24),
    "header": (_family_header, 12),
    "tree": (_family_tree, 16),
    "options": (_family_options, 11),
    "times": (_family_times, 8),
    "inner": (_family_inner, 12),
    "compression": (_family_compression, 5),
    "splice": (_family_splice, 6),
    "nest": (_family_nest, 3),
}
_FAMILY_NAMES = tuple(FAMILIES)
_FAMILY_CUM = tuple(
    sum(weight for _, weight in list(FAMILIES.values())[: i + 1]) for i in range(len(FAMILIES))
)
# Share of bomb cases run unmutated: any byte mutation breaks the compressed stream before it inflates.
_BOMB_AS_IS = 0.8
# Chance of extra byte-level mutations on top of a family's result ("havoc").
_HAVOC = 0.25


def mutate(rng: random.Random, seed: Seed, corpus: Corpus) -> tuple[bytes, tuple[str, ...]]:
    """Mutate a seed: one family, then maybe a few byte-level mutations. Returns bytes and step names."""
    steps: list[str] = []
    if seed.bomb and rng.random() < _BOMB_AS_IS:
        family = "none"
    else:
        family = _FAMILY_NAMES[bisect.bisect_right(_FAMILY_CUM, rng.randrange(_FAMILY_CUM[-1]))]
    steps.append(family)
    data = FAMILIES[family][0](rng, seed, corpus, steps)
    while rng.random() < _HAVOC and len(steps) < 8:
        data = mutate_bytes(rng, data, corpus, steps)
    return data, tuple(steps)


# --- cases --------------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Case:
    """One fuzz input: a mutated frame, the context around it and how it is cut into reads."""

    seed: int
    index: int
    base: str
    steps: tuple[str, ...]
    frame: bytes
    prefix: bytes = b""
    suffix: bytes = b""
    handshake: Handshake | None = None
    limits: Limits = DEFAULT_LIMITS
    cuts: tuple[int, ...] = ()

    @property
    def stream(self) -> bytes:
        """Everything the connection receives, in order."""
        return self.prefix + self.frame + self.suffix

    @property
    def name(self) -> str:
        """``seed:index``, what ``generate`` needs to rebuild this case."""
        return f"{self.seed}:{self.index}"


# Largest stream still cut into one-byte reads (each read is a call into the core).
_BYTEWISE_MAX = 2048
# Largest stream cut into many small reads.
_STEPWISE_MAX = 64 * 1024


def make_cuts(rng: random.Random, size: int) -> tuple[int, ...]:
    """Read boundaries for a stream of ``size`` bytes: none, a few, every byte or every n bytes."""
    if size < 2:
        return ()
    choice = rng.random()
    if choice < 0.5:
        return ()
    if choice < 0.9:
        return tuple(sorted({rng.randrange(1, size) for _ in range(rng.randint(1, 4))}))
    if choice < 0.96 and size <= _BYTEWISE_MAX:
        return tuple(range(1, size))
    if size <= _STEPWISE_MAX:
        return tuple(range(step := rng.randint(1, 64), size, step))
    return ()


def generate(corpus: Corpus, seed: int, index: int) -> Case:
    """Case ``index`` of run ``seed``: a pure function of its arguments."""
    rng = random.Random((seed << 40) | index)
    base = corpus.pick(rng)
    frame, steps = mutate(rng, base, corpus)
    limits = _PROFILES[bisect.bisect_right(_PROFILE_WEIGHTS, rng.randrange(_PROFILE_WEIGHTS[-1]))]
    handshake, prefix, suffix = base.handshake, b"", b""
    if handshake is not None:
        if rng.random() < 0.7:  # data after the handshake
            suffix = rng.choice(corpus.valid_frames)
    elif rng.random() < 0.05:
        handshake = rng.choice(corpus.handshakes)
        prefix = handshake.ping
    elif rng.random() < 0.15:
        prefix = rng.choice(corpus.valid_frames) + (b"\xc0" if rng.random() < 0.5 else b"")
    size = len(prefix) + len(frame) + len(suffix)
    return Case(
        seed=seed,
        index=index,
        base=base.name,
        steps=steps,
        frame=frame,
        prefix=prefix,
        suffix=suffix,
        handshake=handshake,
        limits=limits,
        cuts=make_cuts(rng, size),
    )


# --- the oracle ---------------------------------------------------------------------------------------

_OPEN = (State.AWAIT_PING, State.ESTABLISHED)
_PEER = "127.0.0.1:65535"


@attrs.frozen(kw_only=True)
class Finding:
    """Something the protocol core must never do, with what is needed to replay it."""

    kind: str  # crash, state, decode, mismatch, spool, slow, hang, stall
    error: str
    where: str
    case: str
    base: str
    steps: tuple[str, ...]
    frame_len: int
    frame_head: str
    known: str | None = None

    @property
    def signature(self) -> str:
        """Kind, exception type and place: one bug, however many cases hit it."""
        return f"{self.kind}: {self.error.split(':', 1)[0]} at {self.where or '?'}"

    def describe(self) -> str:
        """One paragraph for a failure message."""
        return (
            f"[{self.kind}] {self.error}\n  at {self.where or '?'}\n  case {self.case} base={self.base} "
            f"steps={'/'.join(self.steps)}\n  frame ({self.frame_len} bytes) starts {self.frame_head}"
        )


def _where(exc: BaseException) -> str:
    """The innermost traceback frame inside the fluentforward package."""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        path = Path(frame.filename)
        if path.is_relative_to(_PACKAGE_DIR):
            return f"{path.relative_to(_PACKAGE_DIR.parent)}:{frame.lineno} in {frame.name}"
    return ""


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"


# --- known bugs ---------------------------------------------------------------------------------------


def _wire(value: Any) -> bytes | None:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    return None


def _any_ext(code: int, data: bytes) -> tuple[int, bytes]:
    return code, data


def options_of(raw: bytes) -> dict[Any, Any] | None:
    """The options map of a request, decoded the way decode_frame does (str as str, bin as bytes)."""
    try:
        request = msgpack.unpackb(
            raw, raw=False, unicode_errors="surrogateescape", strict_map_key=False, ext_hook=_any_ext
        )
    except Exception:
        return None
    if type(request) is list and len(request) >= 3 and type(request[-1]) is dict:
        return request[-1]
    return None


# Options decode_frame reads with _opt (str key first, then the same name as a bin key).
_OPTION_NAMES_READ = ("chunk", "compressed", "fluent_signal", "metadata", "size")


def _option_values(raw: bytes, name: str) -> list[Any]:
    """An option's values under its str key and its bin key (validate_request sees the last one sent)."""
    options = options_of(raw) or {}
    return [options[key] for key in (name, name.encode()) if key in options]


def _has_twin_option_keys(raw: bytes) -> bool:
    return any(len(_option_values(raw, name)) == 2 for name in _OPTION_NAMES_READ)


def _not_utf8(value: Any) -> bool:
    try:
        value.encode()
    except UnicodeEncodeError:
        return True
    return False


def _compressed_option_not_utf8(raw: bytes) -> bool:
    return any(isinstance(value, str) and _not_utf8(value) for value in _option_values(raw, "compressed"))


def _size_above_u32(raw: bytes) -> bool:
    return any(type(size) is int and size > 0xFFFFFFFF for size in _option_values(raw, "size"))


def _chunk_above_u16(raw: bytes) -> bool:
    return any(len(_wire(chunk) or b"") > 0xFFFF for chunk in _option_values(raw, "chunk"))


@attrs.frozen(kw_only=True)
class KnownBug:
    """A finding the protocol core still has, excused while its reproducer shows it.

    Attributes:
        name: short id.
        summary: what goes wrong, for the report.
        reproducer: a minimal request that shows the bug on a fresh default connection.
        kinds: the finding kinds it causes.
        explains: true when a finding's frame has the shape that causes this bug.
    """

    name: str
    summary: str
    reproducer: bytes
    kinds: frozenset[str]
    explains: Callable[[bytes], bool]


def _forward_with_options(options: bytes) -> bytes:
    """``["t", [[1, {}]], <options>]`` with the options map given as raw msgpack."""
    return b"\x93\xa1t\x91\x92\x01\x80" + options


# Bugs the fuzzer found and that are fixed: their reproducers stay as regression tests.
FIXED_BUGS = (
    KnownBug(
        name="compressed-option-not-utf8",
        summary=(
            "decode_frame raises UnicodeEncodeError (not RemoteProtocolError) for a Forward or Message "
            "frame whose 'compressed' option is a msgpack str of invalid UTF-8; validate_request accepts it "
            "(it decodes raw=True), so the frame is spooled and acked but cannot be delivered"
        ),
        reproducer=_forward_with_options(b"\x81\xaacompressed\xa1\xff"),  # {"compressed": "\xff"}
        kinds=frozenset({"decode"}),
        explains=_compressed_option_not_utf8,
    ),
    KnownBug(
        name="option-key-str-and-bin",
        summary=(
            "an option key sent twice, once as str and once as bin: validate_request (raw=True) folds both "
            "to one bytes key and keeps the last value, decode_frame (raw=False) keeps both keys and _opt "
            "prefers the str one; the receive path accepts what delivery rejects or reads differently"
        ),
        # {"chunk": 5, b"chunk": "abc"}: accepted with chunk "abc", decode_frame says chunk is an integer
        reproducer=_forward_with_options(b"\x82\xa5chunk\x05\xc4\x05chunk\xa3abc"),
        kinds=frozenset({"decode", "mismatch"}),
        explains=_has_twin_option_keys,
    ),
    KnownBug(
        name="size-above-u32",
        summary=(
            "a metrics/traces frame (fluent_signal 1 or 2) takes its record_count from option 'size' "
            "unbounded; above 2**32-1 the spool's u32 record_count field raises struct.error in "
            "encode_frame, which the server logs as connection_handler_bug"
        ),
        reproducer=_forward_with_options(
            b"\x82\xadfluent_signal\x01\xa4size\xcf\x00\x00\x00\x01\x00\x00\x00\x00"
        ),
        kinds=frozenset({"spool"}),
        explains=_size_above_u32,
    ),
    KnownBug(
        name="chunk-above-u16",
        summary=(
            "a chunk id longer than 65535 bytes is accepted (only max_frame_bytes bounds it), but the spool "
            "stores its length in a u16: encode_frame raises struct.error, logged as connection_handler_bug"
        ),
        reproducer=_forward_with_options(b"\x81\xa5chunk\xdb\x00\x01\x00\x00" + b"c" * 0x10000),
        kinds=frozenset({"spool"}),
        explains=_chunk_above_u16,
    ),
)
# Bugs found and not fixed yet (excused during fuzz runs only while their reproducer still fails).
KNOWN_BUGS: tuple[KnownBug, ...] = ()
KNOWN_BUGS_BY_NAME = {bug.name: bug for bug in KNOWN_BUGS}


def excuse(kind: str, raw: bytes, known: Sequence[KnownBug]) -> str | None:
    return next((bug.name for bug in known if kind in bug.kinds and bug.explains(raw)), None)


# --- checking one case --------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Outcome:
    """What one case did: frames accepted, the protocol error (normalised) and any findings."""

    accepted: int
    reason: str | None
    findings: tuple[Finding, ...]


def _finding(kind: str, error: str, where: str, case: Case, raw: bytes, known: Sequence[KnownBug]) -> Finding:
    return Finding(
        kind=kind,
        error=error,
        where=where,
        case=case.name,
        base=case.base,
        steps=case.steps,
        frame_len=len(case.frame),
        frame_head=case.frame[:FRAME_HEAD_BYTES].hex(),
        known=excuse(kind, raw, known),
    )


def check_accepted(
    raw: bytes, facts: EntriesReceived | FrameHeader, limits: Limits
) -> list[tuple[str, str, str]]:
    """Check a frame the receive path accepted: (kind, error, where) for every broken promise.

    ``facts`` is what the receive path said about it: the event, or the header the spool stored with it.
    The frame must decode as delivery decodes it (``STORED_LIMITS``) to the same tag, chunk, signal and mode, with
    ``record_count`` entries for logs, and must fit the spool's frame header.
    """
    problems: list[tuple[str, str, str]] = []
    said = (facts.tag, facts.chunk or None, facts.signal, facts.mode)
    try:
        decoded = decode_frame(raw, STORED_LIMITS)
    except Exception as exc:
        problems.append(("decode", _error(exc), _where(exc)))
    else:
        # An empty chunk id is stored as "no chunk" by the spool; both sides compare as None.
        found = (decoded.tag, decoded.chunk or None, decoded.signal, decoded.mode)
        if found != said:
            problems.append(("mismatch", f"receive path said {said!r}, decode_frame {found!r}", ""))
        elif facts.signal is Signal.LOGS and len(decoded.entries) != facts.record_count:
            problems.append(
                ("mismatch", f"record_count {facts.record_count} but {len(decoded.entries)} entries", "")
            )
    if isinstance(facts, EntriesReceived):  # what the server's _accept stores
        header = FrameHeader(
            recv_time_ns=0,
            signal=facts.signal,
            mode=facts.mode,
            peer=_PEER,
            chunk=facts.chunk,
            tag=facts.tag,
            source_key="",
            record_count=facts.record_count,
        )
        try:
            encode_frame(header, raw)
        except Exception as exc:
            problems.append(("spool", _error(exc), _where(exc)))
    return problems


def _connection(case: Case) -> ServerConnection:
    if case.handshake is not None:
        return case.handshake.connection(case.limits)
    return ServerConnection(limits=case.limits)


def check_case(case: Case, known: Sequence[KnownBug] = ()) -> Outcome:
    """Run one case through a fresh ServerConnection and check every promise of the protocol core."""
    conn = _connection(case)
    stream = case.stream
    events: list[Any] = []
    findings: list[Finding] = []
    reason = None
    try:
        last = 0
        for cut in (*case.cuts, len(stream)):
            if conn.state not in _OPEN:
                break
            if cut > last:
                events += conn.receive_data(stream[last:cut])
            last = cut
        if conn.state in _OPEN:
            events += conn.receive_data(b"")
        conn.data_to_send()
    except RemoteProtocolError as exc:
        reason = reason_label(str(exc))
        if conn.state is not State.ERROR:
            findings.append(
                _finding(
                    "state", f"RemoteProtocolError left state {conn.state.value}", "", case, stream, known
                )
            )
    except Exception as exc:
        findings.append(_finding("crash", _error(exc), _where(exc), case, stream, known))
    accepted = 0
    for event in events:
        if not isinstance(event, EntriesReceived):
            continue
        accepted += 1
        if stream[event.offset : event.offset + len(event.raw)] != event.raw:
            findings.append(
                _finding(
                    "state", f"raw bytes differ from the input at {event.offset}", "", case, stream, known
                )
            )
        problems = check_accepted(event.raw, event, case.limits)
        findings += [_finding(kind, error, where, case, event.raw, known) for kind, error, where in problems]
    return Outcome(accepted=accepted, reason=reason, findings=tuple(findings))


_DIGITS = re.compile(r"\d+")


def reason_label(message: str) -> str:
    """A protocol error message with numbers folded, for counting which checks the fuzzer reached."""
    return _DIGITS.sub("N", message)[:70]


@functools.cache
def active_known_bugs() -> tuple[KnownBug, ...]:
    """The known bugs whose reproducer still shows them (a fixed bug is no longer excused)."""
    active = []
    for bug in KNOWN_BUGS:
        case = Case(seed=0, index=0, base=f"known:{bug.name}", steps=(), frame=bug.reproducer)
        if any(f.known == bug.name for f in check_case(case, (bug,)).findings):
            active.append(bug)
    return tuple(active)


# --- running many cases -------------------------------------------------------------------------------


@attrs.define
class Report:
    """Totals of a fuzz run, mergeable across workers."""

    cases: int = 0
    accepted_frames: int = 0
    rejected: int = 0
    reasons: collections.Counter[str] = attrs.field(factory=collections.Counter)
    families: collections.Counter[str] = attrs.field(factory=collections.Counter)
    signatures: collections.Counter[str] = attrs.field(factory=collections.Counter)
    known: collections.Counter[str] = attrs.field(factory=collections.Counter)
    examples: list[Finding] = attrs.field(factory=list)
    cpu_seconds: float = 0.0  # in the protocol core and the oracle
    generation_seconds: float = 0.0  # building the cases
    slowest_seconds: float = 0.0
    slowest_case: str = ""

    def add(self, case: Case, outcome: Outcome, seconds: float) -> None:
        """Count one case."""
        self.cases += 1
        self.accepted_frames += outcome.accepted
        self.families[case.steps[0]] += 1
        if outcome.reason is not None:
            self.rejected += 1
            self.reasons[outcome.reason] += 1
        self.cpu_seconds += seconds
        if seconds > self.slowest_seconds:
            self.slowest_seconds, self.slowest_case = seconds, case.name
        for finding in outcome.findings:
            self.note(finding)

    def note(self, finding: Finding) -> None:
        """Count a finding; keep a few examples of each signature."""
        if finding.known is not None:
            self.known[finding.known] += 1
            return
        self.signatures[finding.signature] += 1
        if self.signatures[finding.signature] <= EXAMPLES_PER_SIGNATURE:
            self.examples.append(finding)

    def merge(self, other: Report) -> None:
        """Add another report's totals to this one."""
        self.cases += other.cases
        self.accepted_frames += other.accepted_frames
        self.rejected += other.rejected
        self.reasons.update(other.reasons)
        self.families.update(other.families)
        self.known.update(other.known)
        for finding in other.examples:
            if sum(f.signature == finding.signature for f in self.examples) < EXAMPLES_PER_SIGNATURE:
                self.examples.append(finding)
        self.signatures.update(other.signatures)
        self.cpu_seconds += other.cpu_seconds
        self.generation_seconds += other.generation_seconds
        if other.slowest_seconds > self.slowest_seconds:
            self.slowest_seconds, self.slowest_case = other.slowest_seconds, other.slowest_case

    def summary(self, *, top: int = 25) -> str:
        """A human-readable account of the run."""
        lines = [
            (
                f"{self.cases} cases, {self.accepted_frames} frames accepted, {self.rejected} cases "
                f"rejected with RemoteProtocolError; CPU {self.cpu_seconds:.1f} s checking and "
                f"{self.generation_seconds:.1f} s generating; slowest case "
                f"{self.slowest_case} {self.slowest_seconds * 1000:.0f} ms"
            ),
            "families: " + ", ".join(f"{name} {count}" for name, count in self.families.most_common()),
            f"known bugs hit: {dict(self.known) or 'none'}",
            f"new findings: {dict(self.signatures) or 'none'}",
            f"{len(self.reasons)} distinct rejection reasons; most common:",
        ]
        lines += [f"  {count:8d}  {reason}" for reason, count in self.reasons.most_common(top)]
        lines += [finding.describe() for finding in self.examples]
        return "\n".join(lines)


class CaseTimeout(BaseException):  # noqa: N818 - BaseException: the code under test catches Exception
    """Raised by the alarm when a case runs longer than HANG_SECONDS."""


def _on_alarm(_signum: int, _frame: object) -> None:
    raise CaseTimeout


def _timed_check(case: Case, known: Sequence[KnownBug]) -> tuple[Outcome, float]:
    """Check a case under the hang alarm; return its outcome and the CPU seconds it took."""
    began = time.process_time()
    signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS)
    try:
        outcome = check_case(case, known)
    except CaseTimeout:
        hang = _finding("hang", f"still running after {HANG_SECONDS} s", "", case, case.stream, known)
        outcome = Outcome(accepted=0, reason=None, findings=(hang,))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return outcome, time.process_time() - began


def run_range(
    corpus: Corpus,
    seed: int,
    start: int,
    stop: int,
    known: Sequence[KnownBug],
    progress: Callable[[int], None] | None = None,
) -> Report:
    """Check cases ``start..stop-1`` of run ``seed`` (in the main thread: it uses SIGALRM)."""
    report = Report()
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        for index in range(start, stop):
            if progress is not None:
                progress(index)
            began = time.process_time()
            case = generate(corpus, seed, index)
            report.generation_seconds += time.process_time() - began
            outcome, spent = _timed_check(case, known)
            if spent > SLOW_CPU_SECONDS:  # measure again: a GC pass or a busy core is not a slow frame
                spent = min(spent, _timed_check(case, known)[1])
            report.add(case, outcome, spent)
            if spent > SLOW_CPU_SECONDS:
                report.note(_finding("slow", f"{spent:.2f} s of CPU", "", case, case.stream, known))
    finally:
        signal.signal(signal.SIGALRM, previous)
    return report


_WORKER: dict[str, Any] = {}


def _init_worker(corpus: Corpus, seed: int, known: tuple[str, ...], slots: Any, counter: Any) -> None:
    with counter.get_lock():
        slot = counter.value
        counter.value += 1
    _WORKER.update(
        corpus=corpus, seed=seed, known=tuple(KNOWN_BUGS_BY_NAME[n] for n in known), slots=slots, slot=slot
    )


def _run_task(bounds: tuple[int, int]) -> Report:
    slots, slot = _WORKER["slots"], _WORKER["slot"]

    def progress(index: int) -> None:
        slots[slot] = index

    return run_range(_WORKER["corpus"], _WORKER["seed"], *bounds, _WORKER["known"], progress)


def _tasks(cases: int) -> Iterator[tuple[int, int]]:
    for start in range(0, cases, TASK_CASES):
        yield start, min(start + TASK_CASES, cases)


def run_parallel(corpus: Corpus, *, seed: int, cases: int, workers: int) -> Report:
    """Check cases ``0..cases-1`` on ``workers`` processes; a worker stuck in C code becomes a finding."""
    known = active_known_bugs()
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    slots = context.Array("q", workers, lock=False)
    counter = context.Value("i", 0)
    report = Report()
    pool = context.Pool(
        workers,
        initializer=_init_worker,
        initargs=(corpus, seed, tuple(bug.name for bug in known), slots, counter),
    )
    try:
        pending = [pool.apply_async(_run_task, (bounds,)) for bounds in _tasks(cases)]
        for result in pending:
            try:
                report.merge(result.get(timeout=STALL_SECONDS))
            except multiprocessing.TimeoutError:
                for index in list(slots)[: counter.value]:
                    case = generate(corpus, seed, index)
                    report.note(_finding("stall", f"no progress for {STALL_SECONDS} s", "", case, b"", ()))
                break
    finally:
        pool.terminate()
        pool.join()
    return report


def default_workers() -> int:
    """Two workers (the target machine has two cores), fewer on a smaller one."""
    return max(1, min(2, os.cpu_count() or 1))


def replay(seed: int, index: int) -> Outcome:
    """Rebuild and re-check one case (for a finding's ``case`` field: ``replay(seed, index)``)."""
    return check_case(generate(build_corpus(), seed, index), active_known_bugs())
