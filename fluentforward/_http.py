"""A minimal HTTP/1.1 listener for probes and metrics (h11 over trio).

Routes are a mapping from path to a callable returning (status, content type, body). Requests are
bounded (headers only, no bodies accepted) and each connection serves requests until the client closes
or stays idle for ``IDLE_TIMEOUT`` seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import h11
import structlog
import trio

from fluentforward.config import ServerConfig
from fluentforward.errors import ConfigError

__all__ = ["Route", "open_http_listeners", "serve_http"]

log = structlog.get_logger("fluentforward.http")

Route = Callable[[], tuple[int, str, bytes]]

# Probes and scrapes are tiny; a client that sends more than this in headers is not one of them.
MAX_REQUEST_BYTES = 16 * 1024
IDLE_TIMEOUT = 30.0


async def _respond(
    stream: trio.SocketStream, conn: h11.Connection, status: int, ctype: str, body: bytes
) -> None:
    headers = [("content-type", ctype), ("content-length", str(len(body)))]
    await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
    await stream.send_all(conn.send(h11.Data(data=body)) or b"")
    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")


async def _handle(stream: trio.SocketStream, routes: Mapping[str, Route]) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                with trio.fail_after(IDLE_TIMEOUT):
                    data = await stream.receive_some(MAX_REQUEST_BYTES)
                conn.receive_data(data)
                if not data:
                    return
                continue
            if isinstance(event, h11.Request):
                path = event.target.decode("ascii", "replace").split("?", 1)[0]
                route = routes.get(path)
                if event.method not in (b"GET", b"HEAD"):
                    await _respond(stream, conn, 405, "text/plain", b"method not allowed\n")
                elif route is None:
                    await _respond(stream, conn, 404, "text/plain", b"not found\n")
                else:
                    status, ctype, body = route()
                    await _respond(stream, conn, status, ctype, b"" if event.method == b"HEAD" else body)
            elif isinstance(event, h11.ConnectionClosed):
                return
            elif conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
    except (h11.RemoteProtocolError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
        return
    finally:
        await trio.aclose_forcefully(stream)


async def open_http_listeners(config: ServerConfig) -> list[trio.SocketListener]:
    """Bind ``--http-listen`` (nothing when it is off).

    Raises:
        ConfigError: the address cannot be bound.
    """
    if config.http_listen is None:
        return []
    try:
        return await trio.open_tcp_listeners(config.http_listen.port, host=config.http_listen.host)
    except OSError as exc:
        raise ConfigError(f"--http-listen {config.http_listen}: {exc.strerror or exc}") from exc


async def serve_http(
    listeners: list[trio.SocketListener],
    routes: Mapping[str, Route],
) -> None:
    """Serve ``routes`` on already-open listeners until cancelled."""

    async def handler(stream: trio.SocketStream) -> None:
        await _handle(stream, routes)

    await trio.serve_listeners(handler, listeners)
