"""Helpers shared by the tests: frame builders, byte feeding, capture loading."""

from __future__ import annotations

import gzip
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgpack
import trio

from fluentforward.protocol import Signal
from fluentforward.spool import FrameHeader, Spool, SpoolSettings
from tests.conftest import FLUENT_BIT


def et(seconds: int, nanos: int = 0, *, ext8: bool = False) -> msgpack.ExtType | bytes:
    """An EventTime value (fixext8 by default)."""
    return msgpack.ExtType(0, struct.pack(">II", seconds, nanos))


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def packed_entries(entries: Iterable[Any]) -> bytes:
    return b"".join(pack(e) for e in entries)


def message(tag: str, time: Any, record: dict[Any, Any], options: dict[str, Any] | None = None) -> bytes:
    return pack([tag, time, record] + ([options] if options is not None else []))


def forward(tag: str, entries: list[Any], options: dict[str, Any] | None = None) -> bytes:
    return pack([tag, entries] + ([options] if options is not None else []))


def packed(
    tag: str, entries: list[Any], options: dict[str, Any] | None = None, *, as_str: bool = False
) -> bytes:
    stream = packed_entries(entries)
    packer = msgpack.Packer(use_bin_type=not as_str)
    return packer.pack([tag, stream] + ([options] if options is not None else []))


def compressed(
    tag: str, entries: list[Any], options: dict[str, Any] | None = None, *, members: int = 1
) -> bytes:
    stream = packed_entries(entries)
    step = max(1, len(stream) // members)
    parts = [stream[i : i + step] for i in range(0, len(stream), step)]
    payload = b"".join(gzip.compress(part) for part in parts)
    opts = {"compressed": "gzip", **(options or {})}
    return pack([tag, payload, opts])


def capture(name: str) -> bytes:
    return (FLUENT_BIT / name).read_bytes()


def captures(pattern: str = "*.bin") -> list[Path]:
    """Client-side capture files (what a real Fluent Bit sent as a client)."""
    skip = ("from-server", "in_forward-server", "handshake")
    return [p for p in sorted(FLUENT_BIT.glob(pattern)) if not any(s in p.name for s in skip)]


def split_objects(data: bytes) -> list[Any]:
    """Decode a capture into its top-level objects (raw=True, as on the wire)."""
    unpacker = msgpack.Unpacker(raw=True, strict_map_key=False)
    unpacker.feed(data)
    return list(unpacker)


def feed_in_pieces(conn: Any, data: bytes, cuts: Iterable[int]) -> list[Any]:
    events: list[Any] = []
    last = 0
    for cut in sorted({c for c in cuts if 0 < c < len(data)}):
        events += conn.receive_data(data[last:cut])
        last = cut
    events += conn.receive_data(data[last:])
    return events


def stored_header(tag: str, count: int, *, recv_time_ns: int = 0, chunk: str | None = None) -> FrameHeader:
    """The header the server would store with a logs frame from 127.0.0.1."""
    return FrameHeader(
        recv_time_ns=recv_time_ns,
        signal=Signal.LOGS,
        mode="forward",
        peer="127.0.0.1:9",
        chunk=chunk,
        tag=tag,
        source_key="",
        record_count=count,
    )


def fill_spool(directory: Path, frames: Iterable[tuple[str, bytes, int]], *, recv_time_ns: int = 0) -> Path:
    """Append (tag, frame bytes, record count) frames to a spool directory, outside any event loop."""

    async def write() -> None:
        spool = Spool.open(SpoolSettings(directory=directory))
        async with trio.open_nursery() as nursery:
            await nursery.start(spool.run)
            for tag, raw, count in frames:
                await spool.append(stored_header(tag, count, recv_time_ns=recv_time_ns), raw)
            nursery.cancel_scope.cancel()
        spool.close()

    trio.run(write)
    return directory
