"""Crash safety: SIGKILL under acked load never loses an acked record."""

from __future__ import annotations

import random

import msgpack
import pytest
import trio

from tests.helpers import et, forward
from tests.procs import ServerProcess, cli, spool_records

pytestmark = pytest.mark.slow


async def _client(port: int, name: str, acked: set[int], counter: list[int], stop: trio.Event) -> None:
    """Send one chunk at a time, like a Fluent Bit output worker, and record what was acked."""
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return
    unpacker = msgpack.Unpacker(raw=False)
    try:
        while not stop.is_set():
            ids = list(range(counter[0], counter[0] + 20))
            counter[0] += 20
            entries = [[et(1_795_680_000 + i), {"id": i, "log": "x" * 400}] for i in ids]
            chunk = f"{name}-{ids[0]}"
            await stream.send_all(forward("crash.test", entries, {"chunk": chunk}))
            while True:
                data = await stream.receive_some(4096)
                if not data:
                    return
                unpacker.feed(data)
                replies = list(unpacker)
                if replies:
                    assert replies == [{"ack": chunk}]
                    acked.update(ids)
                    break
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return
    finally:
        await trio.aclose_forcefully(stream)


@pytest.mark.parametrize("seed", [1, 2])
async def test_sigkill_under_load_loses_no_acked_record(tmp_path, seed):
    """Kill -9 at random moments during acked load; after restart verify passes and every acked id is there."""
    rng = random.Random(seed)
    spool_dir = tmp_path / "spool"
    server = ServerProcess(spool_dir)
    acked: set[int] = set()
    counter = [0]
    try:
        for _round in range(3):
            server.start()
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                before = len(acked)
                for c in range(4):
                    nursery.start_soon(_client, server.port, f"c{c}", acked, counter, stop)
                with trio.fail_after(30):  # load is flowing in this round before the kill
                    while len(acked) < before + 80:
                        await trio.sleep(0.01)
                await trio.sleep(rng.uniform(0.05, 0.8))
                await trio.to_thread.run_sync(server.kill)
                stop.set()
        server.start()
        server.stop()
    finally:  # a failure above must not leave the server running
        if server.proc is not None and server.proc.poll() is None:
            server.stop()
    verify = cli("spool", "verify", str(spool_dir))
    assert verify.returncode == 0, verify.stderr
    stored = {r["record"]["id"] for r in spool_records(spool_dir)}
    assert acked <= stored
