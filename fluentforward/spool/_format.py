"""The spool's on-disk format (pure: encode and parse, no trio).

A spool directory holds append-only segment files ``segments/<20-digit sequence>.seg``. Each segment
starts with the 8-byte magic ``FFSPOOL1`` and then holds frames back to back::

    u32 body_len | u32 crc32(body) | body
    body = u64 recv_time_ns | u8 signal | u8 mode | u16 peer_len | u16 chunk_len | u16 tag_len
           | u16 source_key_len | u32 record_count | peer | chunk | tag | source_key | frame bytes

All integers are big-endian; strings are UTF-8 (invalid input bytes survive via surrogateescape).
``frame bytes`` is the Forward request exactly as received. ``tag`` is the effective tag (the
``--tag-prefix`` applied) and ``source_key`` the record key the peer address is added under at
delivery (empty when ``--source-address-key`` is off), so a replay ships exactly what serve would.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from typing import BinaryIO

import attrs

from fluentforward.protocol._decode import Mode
from fluentforward.protocol._events import Signal

__all__ = [
    "FRAME_PREFIX",
    "MAX_BODY_BYTES",
    "SEGMENT_MAGIC",
    "FrameHeader",
    "ScanEnd",
    "StoredFrame",
    "encode_frame",
    "scan_segment",
]

SEGMENT_MAGIC = b"FFSPOOL1"
FRAME_PREFIX = struct.Struct(">II")
_BODY_HEAD = struct.Struct(">QBBHHHHI")
# A stored body is one request plus small headers; anything larger than this is a corrupt length field.
MAX_BODY_BYTES = 1 << 30

_MODES = (Mode.MESSAGE, Mode.FORWARD, Mode.PACKED, Mode.COMPRESSED)
_MODE_CODE = {mode: code for code, mode in enumerate(_MODES)}


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


@attrs.frozen(kw_only=True)
class FrameHeader:
    """Everything about a stored frame except its Forward bytes."""

    recv_time_ns: int
    signal: Signal
    mode: str
    peer: str
    chunk: str | None
    tag: str
    source_key: str
    record_count: int


@attrs.frozen(kw_only=True)
class StoredFrame:
    """A frame as read back from a segment.

    Attributes:
        segment: the segment's sequence number.
        offset: byte offset of the frame's prefix in the segment file.
        size: bytes the frame occupies in the file (prefix included).
        header: the metadata stored with it.
        raw: the Forward request exactly as received.
    """

    segment: int
    offset: int
    size: int
    header: FrameHeader
    raw: bytes

    @property
    def end(self) -> int:
        """Offset just past this frame."""
        return self.offset + self.size


def encode_frame(header: FrameHeader, raw: bytes) -> tuple[bytes, bytes]:
    """Serialize one frame as (prefix and header, the frame's bytes), to be written back to back.

    The Forward bytes are not copied: a 2 MB frame waiting for its fsync is held once, not three times.
    """
    peer = _raw(header.peer)
    chunk = b"" if header.chunk is None else _raw(header.chunk)
    tag = _raw(header.tag)
    source_key = _raw(header.source_key)
    head = b"".join(
        (
            _BODY_HEAD.pack(
                header.recv_time_ns,
                int(header.signal),
                _MODE_CODE[header.mode],
                len(peer),
                len(chunk),
                len(tag),
                len(source_key),
                header.record_count,
            ),
            peer,
            chunk,
            tag,
            source_key,
        )
    )
    crc = zlib.crc32(raw, zlib.crc32(head))
    return FRAME_PREFIX.pack(len(head) + len(raw), crc) + head, raw


def _parse_header(fields: tuple[int, ...], texts: bytes) -> FrameHeader:
    """A header from the unpacked fixed part and the bytes that follow it (the strings first)."""
    recv, signal, mode, n_peer, n_chunk, n_tag, n_key, count = fields
    pos = 0
    peer = texts[pos : pos + n_peer]
    pos += n_peer
    chunk = texts[pos : pos + n_chunk]
    pos += n_chunk
    tag = texts[pos : pos + n_tag]
    pos += n_tag
    key = texts[pos : pos + n_key]
    pos += n_key
    if pos > len(texts) or mode >= len(_MODES) or signal > 2:
        msg = "frame header fields are inconsistent"
        raise ValueError(msg)
    return FrameHeader(
        recv_time_ns=recv,
        signal=Signal(signal),
        mode=_MODES[mode],
        peer=_text(peer),
        chunk=_text(chunk) if n_chunk else None,
        tag=_text(tag),
        source_key=_text(key),
        record_count=count,
    )


@attrs.define
class ScanEnd:
    """How a scan of a segment ended.

    Attributes:
        offset: where the last good frame ended.
        reason: None for a clean end of file, else why the bytes at ``offset`` are not a good frame.
        truncated: True when the bad bytes run to the end of the file (a torn write), False when a
            complete-looking frame fails its checksum (corruption).
    """

    offset: int = 0
    reason: str | None = None
    truncated: bool = False


def scan_segment(
    stream: BinaryIO,
    segment: int,
    *,
    start: int = len(SEGMENT_MAGIC),
    end: int | None = None,
    verify: bool = True,
    want_raw: bool = True,
    result: ScanEnd | None = None,
) -> Iterator[StoredFrame]:
    """Yield the good frames of one segment from ``start``; describe how the scan ended in ``result``.

    Args:
        stream: the segment file opened for binary reading.
        segment: its sequence number (copied into each StoredFrame).
        start: offset of the first frame to read.
        end: stop at this offset (the durable end of a segment being written); None reads to EOF.
        verify: check each frame's checksum (skip only when just counting).
        want_raw: False reads only headers, seeking over the Forward bytes (dedup rebuild, ``ls``).
        result: filled with the end state; the generator stops at the first bad frame.
    """
    state = result if result is not None else ScanEnd()
    stream.seek(0)
    magic = stream.read(len(SEGMENT_MAGIC))
    if magic != SEGMENT_MAGIC:
        state.offset = 0
        state.truncated = len(magic) < len(SEGMENT_MAGIC) and SEGMENT_MAGIC.startswith(magic)
        state.reason = "missing segment magic"
        return
    offset = start
    stream.seek(offset)
    while end is None or offset < end:
        state.offset = offset
        prefix = stream.read(FRAME_PREFIX.size)
        if not prefix:
            return
        if len(prefix) < FRAME_PREFIX.size:
            state.reason, state.truncated = "torn frame prefix", True
            return
        body_len, crc = FRAME_PREFIX.unpack(prefix)
        if body_len < _BODY_HEAD.size or body_len > MAX_BODY_BYTES:
            state.reason = f"impossible frame length {body_len}"
            state.truncated = _at_eof(stream)
            return
        if not verify and not want_raw:
            head = stream.read(min(body_len, _BODY_HEAD.size + 4 * 65535))
            if len(head) < _BODY_HEAD.size:
                state.reason, state.truncated = "torn frame body", True
                return
            stream.seek(offset + FRAME_PREFIX.size + body_len)
            fields = _BODY_HEAD.unpack_from(head)
            texts = head[_BODY_HEAD.size :]
            raw = b""
        else:
            # The body in three reads (fixed head, strings, Forward bytes) rather than one: the Forward
            # bytes are then read into their own object, not copied out of the body (a frame is up
            # to MBs, and a copy is as many fresh pages). Lengths that overrun the body leave the raw
            # part empty; the checksum or the header check then fails as it would on the whole body.
            fixed = stream.read(_BODY_HEAD.size)
            if len(fixed) < _BODY_HEAD.size:
                state.reason, state.truncated = "torn frame body", True
                return
            fields = _BODY_HEAD.unpack(fixed)
            rest = body_len - _BODY_HEAD.size
            texts_len = min(sum(fields[3:7]), rest)
            texts = stream.read(texts_len)
            raw = stream.read(rest - texts_len)
            if len(texts) < texts_len or len(raw) < rest - texts_len:
                state.reason, state.truncated = "torn frame body", True
                return
            if verify and zlib.crc32(raw, zlib.crc32(texts, zlib.crc32(fixed))) != crc:
                state.reason = "checksum mismatch"
                state.truncated = _at_eof(stream)
                return
        try:
            header = _parse_header(fields, texts)
        except ValueError:
            state.reason = "unreadable frame header"
            state.truncated = _at_eof(stream)
            return
        size = FRAME_PREFIX.size + body_len
        yield StoredFrame(
            segment=segment,
            offset=offset,
            size=size,
            header=header,
            raw=raw if want_raw else b"",
        )
        offset += size
    state.offset = offset


def _at_eof(stream: BinaryIO) -> bool:
    """True when nothing follows the bad frame (its write was torn by a crash)."""
    here = stream.tell()
    stream.seek(0, 2)
    at_end = stream.tell() <= here
    stream.seek(here)
    return at_end
