"""The running server process: signals, the Forward server, HTTP probes and the Loki shipper.

``run_server`` is what ``fluentforward serve`` hands to ``trio.run``. SIGTERM and SIGINT stop accepting,
let in-flight frames finish within the shutdown grace, flush the shipper within the same grace, persist
its cursor and return (exit 0). The shipper is a ``pipeline.Shipper`` task of this process, or (the
default with ``--loki-url``) a ``delivery.DeliveryProcess`` running it in a child process; both are a
``Delivery`` to the probes, the metrics and the shutdown.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import signal
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol

import structlog
import trio

from fluentforward._http import Route, open_http_listeners, serve_http
from fluentforward.config import DeliverySettings, ServerConfig
from fluentforward.server import ServerState, serve
from fluentforward.spool import Spool

if TYPE_CHECKING:
    from fluentforward.pipeline import DeliveryStats

__all__ = [
    "AppState",
    "Delivery",
    "collect_garbage",
    "health_routes",
    "readiness_problems",
    "run_server",
    "tune_allocator",
    "tune_gc",
]

log = structlog.get_logger("fluentforward.app")


class Delivery(Protocol):
    """What the server process needs of Loki delivery, whether it runs here or in a child process."""

    @property
    def stats(self) -> DeliveryStats:
        """The delivery counters (exported on /metrics)."""
        ...

    @property
    def auth_failed(self) -> bool:
        """True while Loki rejects our credentials or URL."""
        ...

    @property
    def caught_up(self) -> bool:
        """True when everything durable has been delivered."""
        ...

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver until cancelled (started once delivery can begin)."""
        ...

    async def flush(self) -> None:
        """Deliver everything durable now (shutdown)."""
        ...


class AppState:
    """What the probes and metrics look at: the server and, when Loki is configured, the shipper."""

    def __init__(self, server: ServerState, shipper: Delivery | None = None) -> None:
        self.server = server
        self.shipper = shipper


def readiness_problems(app: AppState) -> list[str]:
    """Why the server should not receive traffic now (empty when it is ready)."""
    state = app.server
    problems = []
    if not state.listening:
        problems.append("not listening")
    if state.spool.is_full:
        problems.append("spool full")
    if app.shipper is not None and app.shipper.auth_failed:
        problems.append("Loki rejects our credentials or URL")
    return problems


def health_routes(app: AppState) -> dict[str, Route]:
    """/healthz (the process is alive), /readyz (it should receive traffic) and /metrics."""

    def healthz() -> tuple[int, str, bytes]:
        return 200, "text/plain", b"ok\n"

    def readyz() -> tuple[int, str, bytes]:
        problems = readiness_problems(app)
        if problems:
            return 503, "text/plain", ("not ready: " + ", ".join(problems) + "\n").encode()
        return 200, "text/plain", b"ready\n"

    def metrics() -> tuple[int, str, bytes]:
        from fluentforward.metrics import CONTENT_TYPE, render, snapshot  # noqa: PLC0415

        return 200, CONTENT_TYPE, render([({}, snapshot(app))])

    return {"/healthz": healthz, "/readyz": readyz, "/metrics": metrics}


@contextlib.asynccontextmanager
async def _shipper(spool: Spool, delivery: DeliverySettings | None) -> AsyncIterator[Delivery | None]:
    if delivery is None or delivery.loki is None:
        yield None
        return
    if delivery.process is not None:
        from fluentforward.delivery import DeliveryProcess  # noqa: PLC0415

        yield DeliveryProcess(spool, delivery)
        return
    from fluentforward.pipeline import Shipper, Transformer  # noqa: PLC0415
    from fluentforward.records import Shaper  # noqa: PLC0415
    from fluentforward.sinks.loki import LokiSink  # noqa: PLC0415

    async with LokiSink(delivery.loki) as sink:
        yield Shipper(
            spool, sink, Transformer(Shaper(rules=delivery.shape_rules), delivery.id_rules), delivery.shipper
        )


# glibc's allocator in the server process (tune_allocator): buffers above 128 KiB are mapped and
# returned to the OS when freed, free heap past 128 KiB is trimmed, two arenas.
SERVER_MMAP_THRESHOLD = 128 * 1024
SERVER_TRIM_THRESHOLD = 128 * 1024
SERVER_ARENA_MAX = 2


def tune_allocator(
    *,
    mmap_threshold: int = SERVER_MMAP_THRESHOLD,
    trim_threshold: int = SERVER_TRIM_THRESHOLD,
    arena_max: int = SERVER_ARENA_MAX,
) -> bool:
    """Fix glibc's allocator thresholds; False (nothing changed) where the C library is not glibc.

    The server's defaults make glibc return freed request buffers to the OS instead of keeping them
    in the heap. By default glibc raises its mmap threshold after a large buffer is freed, so later
    2 MB request buffers come from the heap, and a burst of them leaves hundreds of MB resident
    afterwards. Fixed thresholds (and two arenas: our threads only write to disk) keep RSS near the
    live data. The delivery child passes its own (``delivery.CHILD_MMAP_THRESHOLD``).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    return bool(
        mallopt(m_mmap_threshold, mmap_threshold)
        and mallopt(m_trim_threshold, trim_threshold)
        and mallopt(m_arena_max, arena_max)
    )


# Collections of the youngest generation every 700 allocations (CPython's default) cost a fifth of the
# server's CPU: decoded records are thousands of short-lived containers that hold no cycles.
GC_THRESHOLDS = (100_000, 50, 100)


def tune_gc() -> None:
    """Move start-up objects out of the collector's sight and collect the young generation less often.

    A process that calls this must also run ``collect_garbage``: the thresholds count containers
    allocated *and not yet freed*, which barely grows when records are freed as fast as they are
    decoded, so collections would almost never run.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


# With GC_THRESHOLDS the collector seldom runs by itself, while reference cycles keep forming: each
# push leaves httpx's request and response in a cycle holding the request body (about 150 KB), and
# connections and trio tasks leave their own. Measured in a delivery process at 10k records/s: 0.8 MB/s
# of such garbage, 30 MB reclaimed by one collection. The young generations are collected every
# second (about a millisecond: they hold only what is in flight), everything once a minute.
GC_YOUNG_INTERVAL_S = 1.0
GC_FULL_INTERVAL_S = 60.0


async def collect_garbage(
    *, young_s: float = GC_YOUNG_INTERVAL_S, full_s: float = GC_FULL_INTERVAL_S
) -> None:
    """Collect reference cycles on a clock instead of by allocation counts (see ``tune_gc``); forever."""
    since_full = 0.0
    while True:
        await trio.sleep(young_s)
        since_full += young_s
        if since_full >= full_s:
            since_full = 0.0
            gc.collect()
        else:
            gc.collect(1)


async def run_server(
    config: ServerConfig,
    spool: Spool,
    delivery: DeliverySettings | None = None,
    worker_index: int | None = None,
    *,
    task_status: trio.TaskStatus[AppState] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until SIGTERM/SIGINT, then drain: stop accepting, finish frames, flush the shipper."""
    shutdown = trio.Event()
    http_listeners = await open_http_listeners(config)
    try:
        async with _shipper(spool, delivery) as shipper, trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, shutdown)
            nursery.start_soon(collect_garbage)
            if shipper is not None:
                await nursery.start(shipper.run)
            served = trio.Event()

            async def run_serve(task_status: trio.TaskStatus[ServerState]) -> None:
                try:
                    await serve(config, spool, shutdown=shutdown, task_status=task_status)
                finally:
                    served.set()

            server: ServerState = await nursery.start(run_serve)
            app = AppState(server, shipper)
            if http_listeners:
                server.http_port = http_listeners[0].socket.getsockname()[1]
                nursery.start_soon(functools.partial(serve_http, http_listeners, health_routes(app)))
                log.info("http_listening", port=server.http_port, routes=["/healthz", "/readyz", "/metrics"])
            if worker_index is not None:
                nursery.start_soon(_report_to_parent, app)
            task_status.started(app)
            await served.wait()
            if shipper is not None:
                with trio.move_on_after(config.shutdown_grace) as grace:
                    await shipper.flush()
                if grace.cancelled_caught:
                    log.warning("shipper_flush_incomplete", action="the rest is delivered after restart")
            nursery.cancel_scope.cancel()
    finally:
        for listener in http_listeners:
            listener.socket.close()
    log.info("exit")


async def _report_to_parent(app: AppState) -> None:
    """A ``--workers`` worker: write a metrics and readiness snapshot for the parent every second."""
    from fluentforward.metrics import snapshot  # noqa: PLC0415
    from fluentforward.workers import SNAPSHOT_INTERVAL, write_snapshot  # noqa: PLC0415

    directory = app.server.spool.directory
    while True:
        data = {"written_at": time.time(), "problems": readiness_problems(app), "samples": snapshot(app)}
        try:
            await trio.to_thread.run_sync(write_snapshot, directory, data)
        except OSError as exc:
            log.warning("snapshot_write_failed", error=str(exc))
        await trio.sleep(SNAPSHOT_INTERVAL)


async def _watch_signals(shutdown: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("shutdown_requested", signal=signal.Signals(signum).name)
            shutdown.set()
            return
