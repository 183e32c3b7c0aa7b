"""Server settings as one validated, immutable value.

The CLI (flags and ``FLUENTFORWARD_*`` environment variables) builds a ``ServerConfig``; tests build
one directly. Parsing helpers raise ``ConfigError`` with a message fit for a one-line CLI error.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from fluentforward.errors import ConfigError
from fluentforward.protocol._limits import DEFAULT_LIMITS, Limits
from fluentforward.spool import SpoolSettings

if TYPE_CHECKING:  # delivery types stay out of the import path of `spool` and `send`
    from fluentforward.ids import IdRules
    from fluentforward.pipeline import ShipperSettings
    from fluentforward.records import ShapeRules
    from fluentforward.sinks.loki import LokiSettings

__all__ = [
    "DEFAULT_HTTP_LISTEN",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_LISTEN",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_SHUTDOWN_GRACE",
    "DeliverySettings",
    "ListenAddress",
    "ServerConfig",
    "parse_listen",
]

DEFAULT_LISTEN = "0.0.0.0:24224"  # the Forward protocol's registered port
DEFAULT_HTTP_LISTEN = "0.0.0.0:24231"
# Fluent Bit keeps output connections alive between 1 s flushes and Fluentd sends heartbeats every
# second; a peer silent for two minutes is gone, and its socket and buffers should be freed.
DEFAULT_IDLE_TIMEOUT = 120.0
# One Fluent Bit has 2 output workers; a 500-node cluster is 1000 connections. Each connection's
# buffer is bounded by max_frame_bytes, so this also bounds memory.
DEFAULT_MAX_CONNECTIONS = 1024
# SIGTERM lets frames already being received finish and get their ack for this long.
DEFAULT_SHUTDOWN_GRACE = 10.0


@attrs.frozen(kw_only=True)
class ListenAddress:
    """A TCP host and port (port 0 picks a free port)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(text: str, *, option: str = "--listen") -> ListenAddress:
    """Parse ``HOST:PORT`` (``[v6]:PORT`` for IPv6).

    Raises:
        ConfigError: the text is not an address with a port in 0-65535.
    """
    value = text.strip()
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or not host:
        raise ConfigError(f"{option}: expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{option}: {host!r} is not an IPv6 address") from None
    port = int(port_text)
    if port > 65535:
        raise ConfigError(f"{option}: port {port} is out of range")
    return ListenAddress(host=host, port=port)


@attrs.frozen(kw_only=True)
class ServerConfig:
    """Everything ``serve`` needs.

    Attributes:
        listen: where the Forward protocol is served (TCP, plus UDP heartbeats on the same port).
        spool: the spool directory and its bounds.
        limits: protocol decoding bounds.
        http_listen: where ``/healthz`` and ``/readyz`` are served; None disables the HTTP listener.
        idle_timeout: seconds a connection may stay silent before it is closed.
        max_connections: concurrent connections; more are refused and logged.
        tag_prefix: prepended to every tag (Fluentd's ``add_tag_prefix``).
        source_address_key: when set, each record gets the peer address under this key at delivery.
        udp_heartbeat: answer UDP heartbeats with ``0x00`` on the listen port.
        shutdown_grace: seconds in-flight frames get to finish after SIGTERM.
    """

    listen: ListenAddress = attrs.field(factory=lambda: parse_listen(DEFAULT_LISTEN))
    spool: SpoolSettings = attrs.field(factory=lambda: SpoolSettings(directory=Path("fluentforward-spool")))
    limits: Limits = DEFAULT_LIMITS
    http_listen: ListenAddress | None = None
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    tag_prefix: str = ""
    source_address_key: str | None = None
    udp_heartbeat: bool = True
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE


@attrs.frozen(kw_only=True)
class DeliverySettings:
    """How records leave the spool: Loki (None = spool-only), shaping, trace-id rules, pacing."""

    loki: LokiSettings | None
    shape_rules: ShapeRules
    id_rules: IdRules
    shipper: ShipperSettings
