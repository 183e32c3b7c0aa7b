"""The server's memory with many connections open: ``python -m bench.connections [--connections 1000]``.

Two runs, each against a fresh ``fluentforward serve`` (durable spool in a temporary directory, an fsync
before every ack, ``--max-connections 2000``, default timeouts and limits):

1. **Held connections**: ``--connections`` TCP connections each send the first ``--partial-kib`` (64)
   KiB of a Fluent Bit-shaped Forward frame (~75 KiB, ``bench.records`` records) and stop there, as a
   slow or stalled sender would. Once every connection has sent its part and the server has read it
   all, the server's resident memory is sampled. Then every connection sends the rest of its frame and
   waits for its ack.
2. **Big frames**: ``--big-connections`` (120) connections each send a ~2 MB frame (3300 records, the
   size of a Fluent Bit flush) at the same moment and wait for the acks: the worst burst the default
   limits allow for a 120-node cluster.

Figures, in MiB, from ``/proc/<pid>/status``: ``VmRSS`` before any connection (baseline), ``VmRSS``
while all connections are open, and ``VmHWM`` (the peak since start). The script prints them and one
JSON line; it exits non-zero only when a run could not complete (a refused connection, a missing ack).

Invariants: the open-file limit is raised to its hard limit here and in the server (``preexec_fn``), so
neither side runs out of descriptors below ~2000 connections; every wait is bounded by ``PHASE_TIMEOUT``;
the server is stopped and its spool removed whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgpack
import orjson
import trio

from bench import harness
from bench.loadgen import SplitFrame, build_frames
from bench.records import DEFAULT_SEED, make_pods
from bench.run import BIG_CHUNK_RECORDS
from fluentforward.client import new_chunk_id
from fluentforward.config import DEFAULT_MAX_RECEIVING

__all__ = ["main", "measure_big_frames", "measure_held_connections", "raise_open_files_limit"]

# Enough records that a frame is larger than the partial send (~620 bytes each: ~75 KiB).
HELD_FRAME_RECORDS = 120
# Distinct frames built per run; connections use them in turn, each send with a fresh chunk id.
DISTINCT_FRAMES = 4
# Connecting 1000 sockets at once overflows nothing on Linux (somaxconn 4096), but a bounded number of
# connects in flight keeps the accept queue short and the run reproducible.
CONNECTS_IN_FLIGHT = 128
# Any phase (connect all, send all, ack all) that takes longer than this is a failure, not a figure.
PHASE_TIMEOUT = 120.0
# After the last partial send, how long the server gets to read every socket (when /metrics cannot tell).
SETTLE_SECONDS = 2.0
MAX_CONNECTIONS = 2000
# After the last ack, the server closes its side and frees the connections' buffers; the last sample is
# taken this much later, to tell memory still in use from memory the allocator kept.
QUIET_SECONDS = 3.0
OPEN_METRIC = "fluentforward_connections_open"


def raise_open_files_limit() -> int:
    """Raise this process's RLIMIT_NOFILE soft limit to the hard limit; returns the new soft limit."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _frames(records: int, seed: int) -> list[SplitFrame]:
    pod = make_pods(seed)[0]
    return build_frames(pod, "forward", records, DISTINCT_FRAMES, seed=seed)


def _with_chunk(frame: SplitFrame) -> tuple[bytes, str]:
    chunk = new_chunk_id(secrets.token_bytes(16))
    return frame.head + chunk.encode("ascii") + frame.tail, chunk


@contextlib.contextmanager
def running_server(workdir: Path) -> Iterator[tuple[harness.Child, int]]:
    """``fluentforward serve`` with a fresh spool; yields it and its HTTP (metrics) port; stopped on exit."""
    spool_dir = Path(tempfile.mkdtemp(prefix="ffbench-conn-spool-"))
    port, http_port = harness.free_port(), harness.free_port()
    cmd = harness.server_command(
        port,
        spool_dir,
        extra=["--max-connections", str(MAX_CONNECTIONS), "--http-listen", f"127.0.0.1:{http_port}"],
    )
    stderr_path = workdir / "server.stderr"
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            text=True,
            preexec_fn=raise_open_files_limit,  # noqa: PLW1509 - no threads exist yet in this process
        )
    child = harness.Child(name="server", process=process, stderr_path=stderr_path, port=port)
    child.cleanup.append(spool_dir)
    try:
        _wait_for_port(child)
        yield child, http_port
    finally:
        child.stop()


def _wait_for_port(child: harness.Child) -> None:
    deadline = time.monotonic() + harness.START_TIMEOUT
    while time.monotonic() < deadline:
        if child.process.poll() is not None:
            break
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", child.port), timeout=0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"fluentforward serve did not start: {' | '.join(child.stderr_tail())}")


def _metrics(http_port: int) -> dict[str, float] | None:
    """The server's unlabelled metrics by name, or None when this checkout serves no /metrics."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if line and not line.startswith("#") and "{" not in name:
            values[name] = float(value)
    return values


async def _wait_until_read(http_port: int, connections: int, received_bytes: int) -> bool:
    """Wait until the server has ``connections`` open and has read ``received_bytes``; False if unknown."""
    with trio.move_on_after(PHASE_TIMEOUT):
        while True:
            metrics = await trio.to_thread.run_sync(_metrics, http_port)
            if metrics is None:
                await trio.sleep(SETTLE_SECONDS)
                return False
            if (
                metrics.get(OPEN_METRIC, 0) >= connections
                and metrics.get("fluentforward_received_bytes_total", 0) >= received_bytes
            ):
                return True
            await trio.sleep(0.1)
    raise RuntimeError("the server did not read every partial frame in time")


async def _read_ack(stream: trio.SocketStream, chunk: str) -> None:
    unpacker = msgpack.Unpacker(raw=False)
    while True:
        data = await stream.receive_some(4096)
        if not data:
            raise RuntimeError("the server closed a connection before its ack")
        unpacker.feed(data)
        for reply in unpacker:
            if reply != {"ack": chunk}:
                raise RuntimeError(f"unexpected reply {reply!r}")
            return


class _Barrier:
    """Counts connections that reached a point; ``all`` is set when every one of them has."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.count = 0
        self.all = trio.Event()

    def arrive(self) -> None:
        self.count += 1
        if self.count == self.total:
            self.all.set()


async def _run_connections(
    port: int, payloads: Sequence[tuple[bytes, str]], first_bytes: int, on_held: Any
) -> None:
    """Each connection sends ``first_bytes`` of its payload and holds; ``on_held()`` runs once all
    have; then each sends the rest and waits for its ack."""
    held = _Barrier(len(payloads))
    release = trio.Event()
    connects = trio.CapacityLimiter(CONNECTS_IN_FLIGHT)

    async def connection(data: bytes, chunk: str) -> None:
        async with connects:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            if first_bytes:
                await stream.send_all(data[:first_bytes])
            held.arrive()
            await release.wait()
            await stream.send_all(data[first_bytes:])
            await _read_ack(stream, chunk)

    with trio.fail_after(PHASE_TIMEOUT * 3):
        async with trio.open_nursery() as nursery:
            for data, chunk in payloads:
                nursery.start_soon(connection, data, chunk)
            await held.all.wait()
            await on_held()
            release.set()


def _mb(pid: int) -> dict[str, float]:
    memory = harness.tree_memory_mb(pid)
    return {"rss_mb": round(memory["rss"], 1), "hwm_mb": round(memory["hwm"], 1)}


def measure_held_connections(workdir: Path, connections: int, partial_kib: int, seed: int) -> dict[str, Any]:
    """Run 1: ``connections`` connections each holding ``partial_kib`` KiB of an unfinished frame."""
    frames = _frames(HELD_FRAME_RECORDS, seed)
    partial = partial_kib * 1024
    if min(len(f.head) for f in frames) <= partial:
        raise ValueError(f"frames of {HELD_FRAME_RECORDS} records are not larger than {partial_kib} KiB")
    payloads = [_with_chunk(frames[i % len(frames)]) for i in range(connections)]
    report: dict[str, Any] = {
        "connections": connections,
        "partial_bytes": partial,
        "frame_bytes": len(payloads[0][0]),
    }
    with running_server(workdir) as (server, http_port):
        report["baseline"] = _mb(server.pid)

        async def on_held() -> None:
            # Each connection's first read needs no slot; past it, only --max-receiving connections
            # are read mid-request and the others' bytes wait in the kernel (TCP backpressure).
            report["confirmed_by_metrics"] = await _wait_until_read(
                http_port, connections, min(connections, DEFAULT_MAX_RECEIVING) * partial
            )
            report["all_open"] = _mb(server.pid)

        started = time.monotonic()
        trio.run(_run_connections, server.port, payloads, partial, on_held)
        report["seconds"] = round(time.monotonic() - started, 1)
        report["after_acks"] = _mb(server.pid)
    report["per_connection_kib"] = round(
        (report["all_open"]["rss_mb"] - report["baseline"]["rss_mb"]) * 1024 / connections, 1
    )
    return report


def measure_big_frames(workdir: Path, connections: int, seed: int) -> dict[str, Any]:
    """Run 2: ``connections`` connections each send a ~2 MB frame at the same moment."""
    frames = _frames(BIG_CHUNK_RECORDS, seed)
    payloads = [_with_chunk(frames[i % len(frames)]) for i in range(connections)]
    report: dict[str, Any] = {"connections": connections, "frame_bytes": len(payloads[0][0])}
    with running_server(workdir) as (server, http_port):
        report["baseline"] = _mb(server.pid)

        async def on_connected() -> None:
            report["all_connected"] = _mb(server.pid)

        started = time.monotonic()
        trio.run(_run_connections, server.port, payloads, 0, on_connected)
        report["seconds"] = round(time.monotonic() - started, 1)
        report["after_acks"] = _mb(server.pid)
        time.sleep(QUIET_SECONDS)
        report["quiet"] = _mb(server.pid)
        metrics = _metrics(http_port)
        report["quiet_connections_open"] = None if metrics is None else metrics.get(OPEN_METRIC)
    return report


def _print_report(held: dict[str, Any], big: dict[str, Any]) -> None:
    print(
        f"held: {held['connections']} connections x {held['partial_bytes'] // 1024} KiB of a "
        f"{held['frame_bytes'] / 1024:.0f} KiB frame ({held['seconds']} s)"
    )
    print(f"  baseline RSS        {held['baseline']['rss_mb']:8.1f} MiB")
    print(
        f"  RSS, all open       {held['all_open']['rss_mb']:8.1f} MiB"
        f"  (+{held['per_connection_kib']} KiB per connection"
        f"{'' if held['confirmed_by_metrics'] else '; read not confirmed by /metrics'})"
    )
    print(f"  peak RSS (VmHWM)    {held['after_acks']['hwm_mb']:8.1f} MiB")
    print(
        f"big: {big['connections']} connections x {big['frame_bytes'] / 1e6:.1f} MB frames at once "
        f"({big['seconds']} s)"
    )
    print(f"  baseline RSS        {big['baseline']['rss_mb']:8.1f} MiB")
    print(f"  peak RSS (VmHWM)    {big['after_acks']['hwm_mb']:8.1f} MiB")
    print(f"  RSS after the acks  {big['after_acks']['rss_mb']:8.1f} MiB")
    still_open = big["quiet_connections_open"]
    print(
        f"  RSS {QUIET_SECONDS:g} s later      {big['quiet']['rss_mb']:8.1f} MiB"
        f"  ({'?' if still_open is None else int(still_open)} connections open)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.connections", description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=1000, help="held connections (run 1)")
    parser.add_argument("--partial-kib", type=int, default=64, help="KiB each held connection sends first")
    parser.add_argument("--big-connections", type=int, default=120, help="connections sending ~2 MB (run 2)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    limit = raise_open_files_limit()
    if args.connections + 64 > limit:
        parser.error(f"--connections {args.connections} needs more descriptors than the limit {limit}")
    if args.connections > MAX_CONNECTIONS:
        parser.error(f"--connections is at most {MAX_CONNECTIONS} (the server's --max-connections)")
    with harness.workdir() as workdir:
        try:
            held = measure_held_connections(workdir, args.connections, args.partial_kib, args.seed)
            big = measure_big_frames(workdir, args.big_connections, args.seed)
        except (RuntimeError, OSError, trio.TooSlowError, ExceptionGroup) as exc:
            print(f"bench.connections: {exc}", file=sys.stderr)
            return 1
    _print_report(held, big)
    print(orjson.dumps({"held": held, "big": big, "machine": harness.machine_info()}).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
