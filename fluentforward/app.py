"""The running server process: signals, the Forward server, the HTTP probes and (later) the shipper.

``run_server`` is what ``fluentforward serve`` hands to ``trio.run``. SIGTERM and SIGINT stop accepting,
let in-flight frames finish within the shutdown grace, fsync and return (exit 0).
"""

from __future__ import annotations

import functools
import signal

import structlog
import trio

from fluentforward._http import Route, serve_http
from fluentforward.config import ServerConfig
from fluentforward.errors import ConfigError
from fluentforward.server import ServerState, serve
from fluentforward.spool import Spool

__all__ = ["health_routes", "run_server"]

log = structlog.get_logger("fluentforward.app")


def health_routes(state: ServerState) -> dict[str, Route]:
    """The probe routes: /healthz (the process is alive), /readyz (it should receive traffic)."""

    def healthz() -> tuple[int, str, bytes]:
        return 200, "text/plain", b"ok\n"

    def readyz() -> tuple[int, str, bytes]:
        problems = []
        if not state.listening:
            problems.append("not listening")
        if state.spool.is_full:
            problems.append("spool full")
        if problems:
            return 503, "text/plain", ("not ready: " + ", ".join(problems) + "\n").encode()
        return 200, "text/plain", b"ready\n"

    return {"/healthz": healthz, "/readyz": readyz}


async def run_server(
    config: ServerConfig,
    spool: Spool,
    *,
    task_status: trio.TaskStatus[ServerState] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until SIGTERM/SIGINT, then drain and return."""
    shutdown = trio.Event()
    http_listeners: list[trio.SocketListener] = []
    if config.http_listen is not None:
        try:
            http_listeners = await trio.open_tcp_listeners(
                config.http_listen.port, host=config.http_listen.host
            )
        except OSError as exc:
            raise ConfigError(f"--http-listen {config.http_listen}: {exc.strerror or exc}") from exc

    async def http(state: ServerState) -> None:
        if http_listeners:
            state.http_port = http_listeners[0].socket.getsockname()[1]
            log.info("http_listening", port=state.http_port, routes=["/healthz", "/readyz"])
            await serve_http(http_listeners, health_routes(state))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_signals, shutdown)
        state: ServerState = await nursery.start(
            functools.partial(serve, config, spool, shutdown=shutdown, extra_tasks=[http])
        )
        task_status.started(state)
        await shutdown.wait()
        # serve() returns after draining; then stop the signal watcher and the HTTP listener.
    log.info("exit", reason="signal")


async def _watch_signals(shutdown: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("shutdown_requested", signal=signal.Signals(signum).name)
            shutdown.set()
            return
