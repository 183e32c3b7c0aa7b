"""Server settings as one validated, immutable value.

The CLI (flags and ``FLUENTFORWARD_*`` environment variables) builds a ``ServerConfig``; tests build
one directly. Parsing helpers raise ``ConfigError`` with a message fit for a one-line CLI error.
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from fluentforward._cpus import AUTO_MAX_DELIVERY_PROCESSES, AutoDeliveryProcesses, auto_delivery_processes
from fluentforward.errors import ConfigError
from fluentforward.protocol import SharedKeyAuth
from fluentforward.protocol._limits import DEFAULT_LIMITS, Limits
from fluentforward.spool import SpoolSettings

if TYPE_CHECKING:  # delivery types stay out of the import path of `spool` and `send`
    from fluentforward.ids import IdRules
    from fluentforward.pipeline import ShipperSettings
    from fluentforward.records import ShapeRules
    from fluentforward.sinks.loki import LokiSettings

__all__ = [
    "AUTO_MAX_DELIVERY_PROCESSES",
    "DEFAULT_FRAME_TIMEOUT",
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_HTTP_LISTEN",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_LISTEN",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_RECEIVING",
    "DEFAULT_SHUTDOWN_GRACE",
    "MAX_DELIVERY_PROCESSES",
    "TLS_VERSIONS",
    "DeliveryProcessCount",
    "DeliveryProcessSettings",
    "DeliverySettings",
    "ListenAddress",
    "ServerConfig",
    "parse_delivery_processes",
    "parse_listen",
    "parse_networks",
    "parse_users",
    "server_tls_context",
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
# TLS and Forward handshakes are a few small messages; a peer that needs longer is broken or hostile.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
# Once a request has started it must be complete within this time: a sender dribbling bytes would
# otherwise hold up to max_frame_bytes of memory for as long as it likes. A 32 MiB frame at 1 MB/s
# still fits.
DEFAULT_FRAME_TIMEOUT = 60.0
DEFAULT_UNIX_SOCKET_MODE = 0o660
# Delivery children sharing one spool (--delivery-processes): each needs a core to be worth having,
# and a lane's segments are its share of the work, so more lanes than cores only add processes.
# `auto` (the default) runs one per usable CPU, at most AUTO_MAX_DELIVERY_PROCESSES (fluentforward._cpus).
MAX_DELIVERY_PROCESSES = 16
# Connections that may be receiving a request, or waiting for it to be spooled, at once. Others wait,
# their bytes in the kernel (TCP backpressure), so request memory is bounded by this times the request
# size rather than by the number of connections: 16 Fluent Bit flushes of 2 MB are 32 MB.
DEFAULT_MAX_RECEIVING = 16


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@attrs.frozen(kw_only=True)
class ListenAddress:
    """A TCP host and port (port 0 picks a free port), or a Unix socket path."""

    host: str = ""
    port: int = 0
    unix_path: str | None = None

    def __str__(self) -> str:
        if self.unix_path is not None:
            return f"unix://{self.unix_path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(text: str, *, option: str = "--listen", allow_unix: bool = False) -> ListenAddress:
    """Parse ``HOST:PORT`` (``[v6]:PORT`` for IPv6), or ``unix:///path`` when ``allow_unix``.

    Raises:
        ConfigError: the text is not an address with a port in 0-65535.
    """
    value = text.strip()
    if value.startswith("unix://"):
        path = value.removeprefix("unix://")
        if not allow_unix or not path.startswith("/"):
            raise ConfigError(f"{option}: expected unix:///absolute/path, got {text!r}")
        return ListenAddress(unix_path=path)
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
        auth: shared-key (and user) authentication; None accepts any client that may connect.
        allow: client networks allowed to connect; empty allows all.
        tls: the server-side TLS context; None serves plain TCP.
        handshake_timeout: seconds for the TLS and Forward handshakes to complete.
        frame_timeout: seconds a started request may take to arrive completely.
        unix_socket_mode: file mode of a Unix listen socket.
        reuse_port: bind with SO_REUSEPORT (``--workers``: several processes share the port).
        max_receiving: connections that may be receiving a request at the same time.
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
    auth: SharedKeyAuth | None = None
    allow: tuple[Network, ...] = ()
    tls: ssl.SSLContext | None = None
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    frame_timeout: float = DEFAULT_FRAME_TIMEOUT
    unix_socket_mode: int = DEFAULT_UNIX_SOCKET_MODE
    reuse_port: bool = False
    max_receiving: int = DEFAULT_MAX_RECEIVING


def parse_networks(
    items: list[str], *, option: str = "--allow"
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Parse CIDRs (``10.0.0.0/8``, ``::1/128``; a bare address is a /32 or /128).

    Raises:
        ConfigError: an item is not a network.
    """
    networks = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ConfigError(f"{option}: {item!r} is not an IP network (CIDR)") from None
    return tuple(networks)


def parse_users(lines: list[str], *, option: str) -> dict[str, bytes]:
    """Parse ``NAME:PASSWORD`` items (a users file holds one per line; ``#`` starts a comment).

    Raises:
        ConfigError: an item has no ``:`` or an empty name.
    """
    users: dict[str, bytes] = {}
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        name, sep, password = text.partition(":")
        if not sep or not name:
            raise ConfigError(f"{option}: item {number}: expected NAME:PASSWORD")
        users[name] = password.encode()
    return users


TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def server_tls_context(
    cert: Path, key: Path | None, *, client_ca: Path | None = None, min_version: str = "1.2"
) -> ssl.SSLContext:
    """Build the server's TLS context; with ``client_ca`` clients must present a certificate it signed.

    Raises:
        ConfigError: a file is missing or unusable, or the version is not 1.2 or 1.3.
    """
    if min_version not in TLS_VERSIONS:
        raise ConfigError(f"--tls-min-version: expected 1.2 or 1.3, got {min_version!r}")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = TLS_VERSIONS[min_version]
    try:
        context.load_cert_chain(str(cert), None if key is None else str(key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"--tls-cert/--tls-key: {exc}") from exc
    if client_ca is not None:
        try:
            context.load_verify_locations(str(client_ca))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"--tls-client-ca {client_ca}: {exc}") from exc
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@attrs.frozen(kw_only=True)
class DeliveryProcessCount:
    """A resolved ``--delivery-processes``: the number, and for ``auto`` how it was found."""

    processes: int
    auto: AutoDeliveryProcesses | None = None

    def log_fields(self) -> dict[str, object]:
        """Key-values for the start log: ``delivery_processes=2 source=auto cpus=2.0 ...``."""
        fields: dict[str, object] = {
            "delivery_processes": self.processes,
            "source": "option" if self.auto is None else "auto",
        }
        if self.auto is not None:
            fields.update(self.auto.log_fields())
        return fields


_NUMBER = re.compile(r"[+-]?[0-9]{1,30}")


def parse_delivery_processes(
    value: int | str, *, workers: int = 1, auto: Callable[..., AutoDeliveryProcesses] | None = None
) -> DeliveryProcessCount:
    """``--delivery-processes``: ``auto`` (one lane per usable CPU, see ``fluentforward._cpus``) or 1-16.

    Args:
        value: the option's value (a number from a TOML file arrives as int).
        workers: ``--workers``: with ``auto``, each worker's lanes plan for its share of the CPUs.
        auto: resolves ``auto``, called with ``workers=`` (default
            ``fluentforward._cpus.auto_delivery_processes``).

    Raises:
        ConfigError: neither ``auto`` nor a whole number, or a number out of range.
    """
    number: object = value
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == "auto":
            resolved = (auto or auto_delivery_processes)(workers=workers)
            return DeliveryProcessCount(processes=resolved.processes, auto=resolved)
        number = int(text) if _NUMBER.fullmatch(text) is not None else None
    if isinstance(number, bool) or not isinstance(number, int):
        raise ConfigError(
            f"--delivery-processes: expected auto or a number from 1 to {MAX_DELIVERY_PROCESSES}, "
            f"got {value!r}"
        )
    if not 1 <= number <= MAX_DELIVERY_PROCESSES:
        raise ConfigError(f"--delivery-processes: must be 1 to {MAX_DELIVERY_PROCESSES}, got {number}")
    return DeliveryProcessCount(processes=number)


def _check_delivery_process_count(_instance: object, _attribute: object, value: int) -> None:
    """A resolved lane count: an int from 1 to 16 (``auto`` is resolved before, by the CLI)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"--delivery-processes: expected a resolved number of lanes, got {value!r}")
    parse_delivery_processes(value)  # the range check and its message


@attrs.frozen(kw_only=True)
class DeliveryProcessSettings:
    """What a delivery child process (``--delivery-process``) needs to rebuild the delivery settings.

    ``ShapeRules`` hold generated code and cannot cross a pipe, so the child gets the option values
    the settings were built from and builds them again with the same function. They travel on the
    child's stdin only: header values may be secrets, and files (passwords, tokens) stay paths.

    Attributes:
        options: the delivery option values as plain data (str, int, bool, lists, None; paths as str).
        log_level: the child logs at this level...
        log_json: ...in this format (None: JSON unless stderr is a terminal), like its parent.
        worker: the ``--workers`` index of the parent, bound to the child's log lines; None otherwise.
        processes: how many children share the spool's delivery, each a lane of its segments
            (``--delivery-processes``; see ``fluentforward.delivery``), already resolved: ``auto``
            depends on ``--workers``, so ``parse_delivery_processes`` resolves it where both are known.
    """

    options: Mapping[str, Any] = attrs.field(repr=False)
    log_level: str = "info"
    log_json: bool | None = None
    worker: int | None = None
    processes: int = attrs.field(default=1, validator=_check_delivery_process_count)


@attrs.frozen(kw_only=True)
class DeliverySettings:
    """How records leave the spool: Loki (None = spool-only), shaping, trace-id rules, pacing.

    ``process`` set: a child process ships (its own CPU core and event loop); None: a task of the
    server process does.
    """

    loki: LokiSettings | None
    shape_rules: ShapeRules
    id_rules: IdRules
    shipper: ShipperSettings
    process: DeliveryProcessSettings | None = None
