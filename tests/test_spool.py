"""The durable spool: append, group commit, repair, dedup, bounds, reading back."""

from __future__ import annotations

import io
import os
import struct
import zlib

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from fluentforward.errors import SpoolError
from fluentforward.protocol._events import Signal
from fluentforward.spool import (
    FrameHeader,
    Position,
    ScanEnd,
    Spool,
    SpoolSettings,
    list_segments,
    read_frames,
    segment_path,
)
from fluentforward.spool._format import SEGMENT_MAGIC, encode_frame, scan_segment
from tests.helpers import fill_spool, stored_header


def header(chunk: str | None = None, tag: str = "t", count: int = 1) -> FrameHeader:
    return stored_header(tag, count, recv_time_ns=123, chunk=chunk)


@pytest.fixture
async def spool(tmp_path, nursery):
    s = Spool.open(SpoolSettings(directory=tmp_path / "sp"))
    await nursery.start(s.run)
    yield s
    s.close()


async def test_append_and_read_back(spool):
    """Frames come back in order with their header and exact bytes."""
    await spool.append(header("c1"), b"frame-one")
    await spool.append(header(None, tag="x\udcff"), b"frame-two")
    frames = list(read_frames(spool.directory))
    assert [f.raw for f in frames] == [b"frame-one", b"frame-two"]
    assert frames[0].header == header("c1")
    assert frames[1].header.tag == "x\udcff"
    assert frames[1].header.chunk is None


async def test_concurrent_appends_share_fsyncs(spool):
    """Many concurrent appends are committed with far fewer fsyncs than frames."""
    async with trio.open_nursery() as n:
        for i in range(200):
            n.start_soon(spool.append, header(f"c{i}"), b"x" * 100)
    assert spool.frames_appended == 200
    assert spool.fsync_count < 50
    assert len(list(read_frames(spool.directory))) == 200


async def test_retried_chunk_is_not_stored_twice(spool):
    """A chunk id seen before is acked again as a duplicate, not appended."""
    first = await spool.append(header("same"), b"a")
    again = await spool.append(header("same"), b"a")
    other_tag = await spool.append(header("same", tag="other"), b"a")
    assert not first.duplicate
    assert again.duplicate
    assert again.position == first.position
    assert not other_tag.duplicate
    assert len(list(read_frames(spool.directory))) == 2


async def test_concurrent_retry_of_inflight_chunk(spool):
    """The same chunk arriving on two connections at once is stored once."""
    results = []

    async def put():
        results.append(await spool.append(header("dup"), b"payload"))

    async with trio.open_nursery() as n:
        n.start_soon(put)
        n.start_soon(put)
    assert sorted(r.duplicate for r in results) == [False, True]
    assert len(list(read_frames(spool.directory))) == 1


async def test_dedup_survives_restart(tmp_path):
    """The memory of recent chunk ids is rebuilt from the segments on open."""
    settings = SpoolSettings(directory=tmp_path)
    s = Spool.open(settings)
    async with trio.open_nursery() as n:
        await n.start(s.run)
        await s.append(header("keep"), b"a")
        n.cancel_scope.cancel()
    s.close()
    s2 = Spool.open(settings)
    async with trio.open_nursery() as n:
        await n.start(s2.run)
        assert (await s2.append(header("keep"), b"a")).duplicate
        n.cancel_scope.cancel()
    s2.close()


async def test_dedup_memory_is_bounded(tmp_path, nursery):
    """Only dedup_capacity ids are remembered; the oldest is forgotten."""
    s = Spool.open(SpoolSettings(directory=tmp_path, dedup_capacity=2))
    await nursery.start(s.run)
    for c in ("a", "b", "c"):
        await s.append(header(c), b"x")
    assert not (await s.append(header("a"), b"x")).duplicate
    assert (await s.append(header("c"), b"x")).duplicate
    s.close()


def test_torn_tail_is_repaired(tmp_path):
    """A crash mid-write leaves a partial frame; reopening truncates it and keeps the rest."""
    settings = SpoolSettings(directory=tmp_path)

    fill_spool(tmp_path, [("t", b"data" * 10, 1)] * 3)
    seg = segment_path(tmp_path, list_segments(tmp_path)[0])
    size = seg.stat().st_size
    with seg.open("ab") as f:
        f.write(b"\x00\x00\x01\x00garbage-partial")
    Spool.open(settings).close()
    assert seg.stat().st_size == size
    assert len(list(read_frames(tmp_path))) == 3
    assert list(seg.parent.glob("*.dropped-*"))


def test_torn_tail_mid_frame_cut(tmp_path):
    """Cutting the last frame anywhere loses only that frame."""
    settings = SpoolSettings(directory=tmp_path)

    fill_spool(tmp_path, [("t", b"first", 1), ("t", b"second-frame-bytes", 1)])
    seg = segment_path(tmp_path, 1)
    full = seg.read_bytes()
    first_end = list(read_frames(tmp_path))[0].end
    for cut in range(first_end + 1, len(full)):
        seg.write_bytes(full[:cut])
        Spool.open(settings).close()
        frames = list(read_frames(tmp_path))
        assert [f.raw for f in frames] == [b"first"], cut
        # remove the new empty segment created by the open
        for extra in list_segments(tmp_path)[1:]:
            segment_path(tmp_path, extra).unlink()
        for dropped in seg.parent.glob("*.dropped-*"):
            dropped.unlink()


def test_corrupt_frame_is_reported(tmp_path):
    """A checksum mismatch stops the segment's scan and names the place."""

    fill_spool(tmp_path, [("t", b"first", 1), ("t", b"second", 1)])
    seg = segment_path(tmp_path, 1)
    data = bytearray(seg.read_bytes())
    data[20] ^= 0xFF
    seg.write_bytes(bytes(data))
    bad: list[ScanEnd] = []
    assert list(read_frames(tmp_path, on_bad=lambda _p, end: bad.append(end))) == []
    assert bad[0].reason == "checksum mismatch"
    assert bad[0].offset == 8


async def test_segments_rotate(tmp_path, nursery):
    """Past segment_bytes a new segment starts; reading spans them in order."""
    s = Spool.open(SpoolSettings(directory=tmp_path, segment_bytes=200))
    await nursery.start(s.run)
    for i in range(10):
        await s.append(header(f"c{i}"), bytes([i]) * 50)
    assert len(list_segments(tmp_path)) > 3
    assert [f.raw[0] for f in read_frames(tmp_path)] == list(range(10))
    later = list(read_frames(tmp_path, Position(segment=2, offset=8)))
    assert later[0].segment == 2
    s.close()


async def test_full_spool_blocks_until_space_frees(tmp_path, nursery):
    """Past max_bytes an append waits (nothing is dropped) and resumes when bytes are released."""
    s = Spool.open(SpoolSettings(directory=tmp_path, max_bytes=400))
    await nursery.start(s.run)
    await s.append(header("a"), b"x" * 200)
    done = trio.Event()

    async def blocked():
        await s.append(header("b"), b"y" * 200)
        done.set()

    nursery.start_soon(blocked)
    await trio.testing.wait_all_tasks_blocked()
    assert not done.is_set()
    assert s.is_full
    s.release(s.total_bytes)
    await done.wait()
    assert not s.is_full
    assert len(list(read_frames(tmp_path))) == 2
    s.close()


def test_second_process_cannot_open_same_spool(tmp_path):
    """The spool directory is locked by the process that opened it."""
    s = Spool.open(SpoolSettings(directory=tmp_path))
    try:
        with pytest.raises(SpoolError, match="in use"):
            Spool.open(SpoolSettings(directory=tmp_path))
    finally:
        s.close()


def test_unwritable_directory_is_a_spool_error(tmp_path):
    """A spool directory that cannot be created is a clear SpoolError."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SpoolError):
        Spool.open(SpoolSettings(directory=blocker / "sub"))


async def test_fsync_interval_mode(tmp_path, nursery):
    """With a sync interval, appends return after the write and fsyncs are batched by time."""
    s = Spool.open(SpoolSettings(directory=tmp_path, fsync_interval=0.05))
    await nursery.start(s.run)
    for i in range(20):
        await s.append(header(f"c{i}"), b"z")
    assert s.fsync_count < 20
    await trio.sleep(0.2)
    assert not s._dirty
    s.close()
    assert os.path.getsize(segment_path(tmp_path, 1)) > 8


async def test_dedup_rebuild_reads_only_the_newest_segments(tmp_path, monkeypatch):
    """On open, chunk ids are collected from the newest segments until the memory is full."""
    settings = SpoolSettings(directory=tmp_path, segment_bytes=200, dedup_capacity=3)
    s = Spool.open(settings)
    async with trio.open_nursery() as n:
        await n.start(s.run)
        for i in range(12):
            await s.append(header(f"c{i}"), bytes([i]) * 60)
        n.cancel_scope.cancel()
    s.close()
    assert len(list_segments(tmp_path)) >= 6
    frames_read = []
    original = read_frames

    def counting(directory, start=None, **kwargs):
        for frame in original(directory, start, **kwargs):
            frames_read.append(frame.offset)
            yield frame

    monkeypatch.setattr("fluentforward.spool._store.read_frames", counting)
    s2 = Spool.open(settings)
    try:
        assert 3 <= len(frames_read) < 12  # the newest segments only, not all twelve frames
        assert list(s2._seen) == [("t", "c9"), ("t", "c10"), ("t", "c11")]
    finally:
        s2.close()


# -- the segment format, read back ---------------------------------------------------------------------

_SCAN_MODES = [(True, True), (False, True), (True, False), (False, False)]  # (verify, want_raw)
_texts = st.text(st.characters(codec="utf-8"), max_size=12)
_frames = st.lists(
    st.tuples(
        st.builds(
            FrameHeader,
            recv_time_ns=st.integers(0, 2**64 - 1),
            signal=st.sampled_from(list(Signal)),
            mode=st.sampled_from(["message", "forward", "packed", "compressed"]),
            peer=_texts,
            chunk=st.none() | _texts.filter(bool),
            tag=_texts,
            source_key=_texts,
            record_count=st.integers(0, 2**32 - 1),
        ),
        st.binary(max_size=300),
    ),
    max_size=4,
)


def _segment(frames: list[tuple[FrameHeader, bytes]]) -> tuple[bytes, list[int]]:
    """A segment's bytes and where each frame ends."""
    data = bytearray(SEGMENT_MAGIC)
    ends = []
    for frame_header, raw in frames:
        head, body = encode_frame(frame_header, raw)
        data += head + body
        ends.append(len(data))
    return bytes(data), ends


def _scan(data: bytes, verify: bool, want_raw: bool) -> tuple[list[tuple[FrameHeader, bytes]], ScanEnd]:
    end = ScanEnd()
    frames = scan_segment(io.BytesIO(data), 1, verify=verify, want_raw=want_raw, result=end)
    return [(frame.header, frame.raw) for frame in frames], end


@given(frames=_frames, cut=st.floats(0, 1))
def test_every_scan_mode_reads_back_each_whole_frame(frames, cut):
    """Headers and Forward bytes come back as written; a segment cut short loses only the cut frame."""
    data, ends = _segment(frames)
    size = len(SEGMENT_MAGIC) + round(cut * (len(data) - len(SEGMENT_MAGIC)))
    whole = [frame for frame, end in zip(frames, ends, strict=True) if end <= size]
    for verify, want_raw in _SCAN_MODES:
        got, end = _scan(data, verify, want_raw)
        assert got == [(h, raw if want_raw else b"") for h, raw in frames]
        assert (end.reason, end.offset) == (None, len(data))
        if not (verify or want_raw):
            continue  # headers only, seeking over the rest: a cut is not looked for
        got, end = _scan(data[:size], verify, want_raw)
        assert got == [(h, raw if want_raw else b"") for h, raw in whole]
        assert end.offset == ([len(SEGMENT_MAGIC), *ends][len(whole)])
        if size in (len(SEGMENT_MAGIC), *ends):
            assert end.reason is None
        else:
            assert end.reason is not None
            assert end.reason.startswith("torn")
            assert end.truncated


def test_header_lengths_past_the_body_are_an_unreadable_header():
    """A frame whose checksum holds but whose string lengths overrun its body is refused in every mode."""
    head, raw = encode_frame(header(tag="tag"), b"forward-bytes")
    body = bytearray(head[8:] + raw)
    struct.pack_into(">H", body, 14, len(body))  # tag_len: past the end of the body
    frame = struct.pack(">II", len(body), zlib.crc32(body)) + body
    for verify, want_raw in _SCAN_MODES:
        got, end = _scan(SEGMENT_MAGIC + frame + frame, verify, want_raw)
        assert got == []
        assert (end.reason, end.offset, end.truncated) == ("unreadable frame header", 8, False)
