"""``--workers N``: N server processes share the listen port (SO_REUSEPORT), each with its own spool.

The parent process starts the workers (``serve`` again, with ``--worker-index i``), restarts one that
dies, forwards SIGTERM/SIGINT to all of them and waits for their drain. It serves ``/healthz``,
``/readyz`` and ``/metrics`` itself: each worker writes a metrics snapshot to
``SPOOL_DIR/worker-<i>/metrics.json`` every second, and the parent serves their union with a ``worker``
label. The kernel spreads new connections over the workers; Fluent Bit keeps each connection on one
worker, so chunk-id de-duplication per worker spool still recognises retries on the same connection.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import structlog
import trio

from fluentforward._http import Route, open_http_listeners, serve_http
from fluentforward.config import ServerConfig

__all__ = [
    "SNAPSHOT_FILE",
    "SNAPSHOT_INTERVAL",
    "read_snapshot",
    "run_parent",
    "worker_dir",
    "write_snapshot",
]

log = structlog.get_logger("fluentforward.workers")

SNAPSHOT_FILE = "metrics.json"
SNAPSHOT_INTERVAL = 1.0
# A worker whose snapshot is older than this is not ready (stuck or dead).
SNAPSHOT_STALE_S = 5.0
RESTART_DELAY_S = 1.0


def worker_dir(spool_dir: Path, index: int) -> Path:
    """The spool directory of worker ``index``."""
    return spool_dir / f"worker-{index}"


def write_snapshot(directory: Path, data: dict[str, Any]) -> None:
    """Atomically replace a worker's snapshot file."""
    tmp = directory / (SNAPSHOT_FILE + ".tmp")
    tmp.write_bytes(orjson.dumps(data))
    tmp.replace(directory / SNAPSHOT_FILE)


def read_snapshot(directory: Path) -> dict[str, Any] | None:
    """A worker's last snapshot, or None when it has none yet."""
    try:
        data: dict[str, Any] = orjson.loads((directory / SNAPSHOT_FILE).read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None
    return data


def _routes(spool_dir: Path, workers: int, procs: list[trio.Process | None]) -> dict[str, Route]:
    def snapshots() -> list[tuple[int, dict[str, Any] | None]]:
        return [(i, read_snapshot(worker_dir(spool_dir, i))) for i in range(workers)]

    def healthz() -> tuple[int, str, bytes]:
        return 200, "text/plain", b"ok\n"

    def readyz() -> tuple[int, str, bytes]:
        problems = []
        now = time.time()
        for index, snap in snapshots():
            proc = procs[index]
            if proc is None or proc.returncode is not None:
                problems.append(f"worker {index} not running")
            elif snap is None or now - snap["written_at"] > SNAPSHOT_STALE_S:
                problems.append(f"worker {index} not reporting")
            elif snap["problems"]:
                problems.append(f"worker {index}: " + ", ".join(snap["problems"]))
        if problems:
            return 503, "text/plain", ("not ready: " + "; ".join(problems) + "\n").encode()
        return 200, "text/plain", b"ready\n"

    def metrics() -> tuple[int, str, bytes]:
        from fluentforward.metrics import CONTENT_TYPE, render  # noqa: PLC0415

        parts = [({"worker": str(i)}, snap["samples"]) for i, snap in snapshots() if snap is not None]
        return 200, CONTENT_TYPE, render(parts)

    return {"/healthz": healthz, "/readyz": readyz, "/metrics": metrics}


def _worker_argv(index: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fluentforward",
        *sys.argv[1:],
        "--workers",
        "1",
        "--worker-index",
        str(index),
    ]


async def _parent(config: ServerConfig, workers: int) -> int:
    spool_dir = config.spool.directory
    procs: list[trio.Process | None] = [None] * workers
    shutdown = trio.Event()
    http_listeners = await open_http_listeners(config)

    async def supervise(index: int) -> None:
        while not shutdown.is_set():
            proc = await trio.lowlevel.open_process(_worker_argv(index), env=dict(os.environ))
            procs[index] = proc
            log.info("worker_started", worker=index, pid=proc.pid)
            code = await proc.wait()
            if shutdown.is_set():
                return
            log.error("worker_exited", worker=index, code=code, action=f"restarting in {RESTART_DELAY_S:g}s")
            await trio.sleep(RESTART_DELAY_S)

    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            for index in range(workers):
                nursery.start_soon(supervise, index)
            if http_listeners:
                nursery.start_soon(serve_http, http_listeners, _routes(spool_dir, workers, procs))
                log.info("http_listening", port=http_listeners[0].socket.getsockname()[1], workers=workers)
            async for signum in signals:
                log.info("shutdown_requested", signal=signal.Signals(signum).name, workers=workers)
                shutdown.set()
                break
        for proc in procs:
            if proc is not None and proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(config.shutdown_grace * 2 + 10):
            for proc in procs:
                if proc is not None:
                    await proc.wait()
        for proc in procs:
            if proc is not None and proc.returncode is None:
                log.error("worker_killed", pid=proc.pid, reason="did not stop in time")
                proc.kill()
        nursery.cancel_scope.cancel()
    for listener in http_listeners:
        listener.socket.close()
    codes = [proc.returncode for proc in procs if proc is not None]
    log.info("exit", worker_exit_codes=codes)
    return 0 if all(code == 0 for code in codes) else 1


def run_parent(config: ServerConfig, workers: int) -> int:
    """Run the parent of ``workers`` worker processes until SIGTERM; return the exit code."""
    return trio.run(_parent, config, workers)
