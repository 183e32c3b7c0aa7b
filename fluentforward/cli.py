"""The ``fluentforward`` command line (typer).

Every option can also be set with an environment variable ``FLUENTFORWARD_<OPTION>`` (dashes become
underscores), which is how the Helm chart configures the server. Bad input of any kind (an unknown
option, an unreadable directory, a port in use, a malformed size) prints one line and exits with code 2.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, NoReturn

import attrs
import orjson
import structlog
import trio
import typer

from fluentforward import __version__
from fluentforward._logging import LOG_LEVELS, configure_logging
from fluentforward._units import parse_duration, parse_size, parse_time_ns
from fluentforward.config import (
    AUTO_MAX_DELIVERY_PROCESSES,
    DEFAULT_FRAME_TIMEOUT,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_HTTP_LISTEN,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_LISTEN,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_RECEIVING,
    DEFAULT_SHUTDOWN_GRACE,
    MAX_DELIVERY_PROCESSES,
    DeliveryProcessCount,
    DeliveryProcessSettings,
    DeliverySettings,
    ServerConfig,
    parse_delivery_processes,
    parse_listen,
    parse_networks,
    parse_users,
    server_tls_context,
)
from fluentforward.errors import ConfigError, FluentForwardError, SpoolError
from fluentforward.protocol import Limits, SharedKeyAuth
from fluentforward.protocol._limits import (
    DEFAULT_MAX_DECOMPRESSED_BYTES,
    DEFAULT_MAX_ENTRIES_PER_FRAME,
    DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_MAX_TAG_BYTES,
    MAX_TAG_BYTES_LIMIT,
)
from fluentforward.spool import (
    DEFAULT_DEDUP_CAPACITY,
    DEFAULT_SEGMENT_BYTES,
    DEFAULT_SPOOL_MAX_BYTES,
    ScanEnd,
    Spool,
    SpoolSettings,
    list_segments,
    read_frames,
    segment_path,
    spool_dirs,
)

__all__ = ["app", "delivery_settings_from_wire", "main"]

log = structlog.get_logger("fluentforward.cli")

EXIT_USAGE = 2
DEFAULT_SPOOL_DIR = "fluentforward-spool"

app = typer.Typer(
    name="fluentforward",
    help="Fluent Forward receiver: durable spool, W3C trace ids, Grafana Loki.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
spool_app = typer.Typer(help="Inspect a spool directory.", no_args_is_help=True)
app.add_typer(spool_app, name="spool")


def _env(name: str) -> str:
    return "FLUENTFORWARD_" + name.upper().replace("-", "_")


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print one line to stderr and exit (2 for bad input)."""
    typer.echo(f"fluentforward: {message}", err=True)
    raise typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fluentforward {__version__}")
        raise typer.Exit


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Fluent Forward receiver: durable spool, W3C trace ids, Grafana Loki."""


# -- delivery options, shared by serve and replay ----------------------------------------------------

LokiUrlOpt = Annotated[
    str, typer.Option(envvar=_env("loki-url"), help="Loki base or push URL; empty runs spool-only.")
]
LokiFormatOpt = Annotated[str, typer.Option(envvar=_env("loki-format"), help="protobuf or json.")]
LokiTenantOpt = Annotated[str, typer.Option(envvar=_env("loki-tenant"), help="X-Scope-OrgID.")]
LokiTenantKeyOpt = Annotated[
    str, typer.Option(envvar=_env("loki-tenant-key"), help="Per-record tenant template.")
]
LokiUsernameOpt = Annotated[str, typer.Option(envvar=_env("loki-username"), help="Basic auth user.")]
LokiPasswordFileOpt = Annotated[
    Path | None,
    typer.Option(envvar=_env("loki-password-file"), help="File holding the basic auth password."),
]
LokiBearerTokenFileOpt = Annotated[
    Path | None, typer.Option(envvar=_env("loki-bearer-token-file"), help="File holding a bearer token.")
]
LokiHeaderOpt = Annotated[
    list[str] | None,
    typer.Option(envvar=_env("loki-header"), help="Extra header 'Name: value' (repeatable)."),
]
LokiCaFileOpt = Annotated[
    Path | None, typer.Option(envvar=_env("loki-ca-file"), help="CA bundle for Loki's certificate.")
]
LokiCertFileOpt = Annotated[
    Path | None, typer.Option(envvar=_env("loki-cert-file"), help="Client certificate for mTLS.")
]
LokiKeyFileOpt = Annotated[
    Path | None, typer.Option(envvar=_env("loki-key-file"), help="Client key for mTLS.")
]
LokiTimeoutOpt = Annotated[str, typer.Option(envvar=_env("loki-timeout"), help="Per-request timeout.")]
LokiBatchBytesOpt = Annotated[
    str, typer.Option(envvar=_env("loki-batch-bytes"), help="Most line+metadata bytes per push.")
]
LokiBatchWaitOpt = Annotated[
    str, typer.Option(envvar=_env("loki-batch-wait"), help="Longest wait to fill a batch.")
]
LokiConcurrencyOpt = Annotated[
    int, typer.Option(envvar=_env("loki-concurrency"), help="Push requests in flight.")
]
SpoolRetentionOpt = Annotated[
    str, typer.Option(envvar=_env("spool-retention"), help="Keep delivered segments this long (replay).")
]
SpoolRetentionBytesOpt = Annotated[
    str,
    typer.Option(envvar=_env("spool-retention-bytes"), help="Keep at most this many delivered bytes."),
]
ClusterOpt = Annotated[str, typer.Option(envvar=_env("cluster"), help="Value of the cluster label.")]
LabelOpt = Annotated[
    list[str] | None,
    typer.Option(
        envvar=_env("label"), help="Label NAME=TEMPLATE (repeatable; empty TEMPLATE drops a default)."
    ),
]
StructuredMetadataOpt = Annotated[
    list[str] | None,
    typer.Option(envvar=_env("structured-metadata"), help="Structured metadata NAME=TEMPLATE (repeatable)."),
]
LineFormatOpt = Annotated[str, typer.Option(envvar=_env("line-format"), help="auto, raw, json or key_value.")]
TraceFieldsOpt = Annotated[
    str, typer.Option(envvar=_env("trace-fields"), help="Extra trace-id field names, comma separated.")
]
SpanFieldsOpt = Annotated[
    str, typer.Option(envvar=_env("span-fields"), help="Extra span-id field names, comma separated.")
]
ScanTextOpt = Annotated[
    bool, typer.Option(envvar=_env("scan-text"), help="Look for ids in plain-text and JSON log lines.")
]

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        envvar=_env("config"),
        help="TOML file of settings (keys are option names with _); flags and env vars win over it.",
    ),
]

# What ``replay`` shares with ``serve``; serve adds retention (``SERVE_DELIVERY_OPTIONS``).
DELIVERY_OPTIONS = (
    "loki_url",
    "loki_format",
    "loki_tenant",
    "loki_tenant_key",
    "loki_username",
    "loki_password_file",
    "loki_bearer_token_file",
    "loki_header",
    "loki_ca_file",
    "loki_cert_file",
    "loki_key_file",
    "loki_timeout",
    "loki_batch_bytes",
    "loki_batch_wait",
    "loki_concurrency",
    "cluster",
    "label",
    "structured_metadata",
    "line_format",
    "trace_fields",
    "span_fields",
    "scan_text",
)
SERVE_DELIVERY_OPTIONS = (*DELIVERY_OPTIONS, "spool_retention", "spool_retention_bytes")
PATH_OPTIONS = frozenset(
    {"loki_password_file", "loki_bearer_token_file", "loki_ca_file", "loki_cert_file", "loki_key_file"}
)


# -- serve ------------------------------------------------------------------------------------------


def _check_spool_dir(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--spool-dir {path}: not a directory")


@app.command()
def serve(
    ctx: typer.Context,
    listen: Annotated[
        str, typer.Option(envvar=_env("listen"), help="Forward protocol address HOST:PORT (TCP and UDP).")
    ] = DEFAULT_LISTEN,
    spool_dir: Annotated[
        Path, typer.Option(envvar=_env("spool-dir"), help="Spool directory (created if missing).")
    ] = Path(DEFAULT_SPOOL_DIR),
    http_listen: Annotated[
        str,
        typer.Option(
            envvar=_env("http-listen"), help="HTTP address for /healthz and /readyz; 'off' disables."
        ),
    ] = DEFAULT_HTTP_LISTEN,
    spool_max_bytes: Annotated[
        str,
        typer.Option(
            envvar=_env("spool-max-bytes"), help="Most undelivered bytes kept before clients are slowed."
        ),
    ] = str(DEFAULT_SPOOL_MAX_BYTES),
    spool_segment_bytes: Annotated[
        str, typer.Option(envvar=_env("spool-segment-bytes"), help="Segment file size before rotation.")
    ] = str(DEFAULT_SEGMENT_BYTES),
    spool_fsync_interval: Annotated[
        str,
        typer.Option(
            envvar=_env("spool-fsync-interval"),
            help="0 = fsync before every ack (durable). A duration acks after write and fsyncs that often.",
        ),
    ] = "0",
    dedup_capacity: Annotated[
        int, typer.Option(envvar=_env("dedup-capacity"), help="Recent chunk ids remembered for retries.")
    ] = DEFAULT_DEDUP_CAPACITY,
    max_frame_bytes: Annotated[
        str, typer.Option(envvar=_env("max-frame-bytes"), help="Largest request accepted.")
    ] = str(DEFAULT_MAX_FRAME_BYTES),
    max_decompressed_bytes: Annotated[
        str,
        typer.Option(envvar=_env("max-decompressed-bytes"), help="Largest inflated gzip/zstd payload."),
    ] = str(DEFAULT_MAX_DECOMPRESSED_BYTES),
    max_entries_per_frame: Annotated[
        int, typer.Option(envvar=_env("max-entries-per-frame"), help="Most events in one request.")
    ] = DEFAULT_MAX_ENTRIES_PER_FRAME,
    max_tag_bytes: Annotated[
        int, typer.Option(envvar=_env("max-tag-bytes"), help="Longest tag accepted.")
    ] = DEFAULT_MAX_TAG_BYTES,
    idle_timeout: Annotated[
        str, typer.Option(envvar=_env("idle-timeout"), help="Close a connection silent this long.")
    ] = f"{DEFAULT_IDLE_TIMEOUT:g}s",
    max_receiving: Annotated[
        int,
        typer.Option(
            envvar=_env("max-receiving"),
            help="Connections receiving a request at once; others wait (memory bound).",
        ),
    ] = DEFAULT_MAX_RECEIVING,
    max_connections: Annotated[
        int, typer.Option(envvar=_env("max-connections"), help="Concurrent connections; more are refused.")
    ] = DEFAULT_MAX_CONNECTIONS,
    tag_prefix: Annotated[
        str, typer.Option(envvar=_env("tag-prefix"), help="Prepended to every received tag.")
    ] = "",
    source_address_key: Annotated[
        str,
        typer.Option(
            envvar=_env("source-address-key"), help="Add the peer address to records under this key."
        ),
    ] = "",
    udp_heartbeat: Annotated[
        bool, typer.Option(envvar=_env("udp-heartbeat"), help="Answer UDP heartbeats on the listen port.")
    ] = True,
    shutdown_grace: Annotated[
        str, typer.Option(envvar=_env("shutdown-grace"), help="Time in-flight frames get after SIGTERM.")
    ] = f"{DEFAULT_SHUTDOWN_GRACE:g}s",
    loki_url: LokiUrlOpt = "",
    loki_format: LokiFormatOpt = "protobuf",
    loki_tenant: LokiTenantOpt = "",
    loki_tenant_key: LokiTenantKeyOpt = "",
    loki_username: LokiUsernameOpt = "",
    loki_password_file: LokiPasswordFileOpt = None,
    loki_bearer_token_file: LokiBearerTokenFileOpt = None,
    loki_header: LokiHeaderOpt = None,
    loki_ca_file: LokiCaFileOpt = None,
    loki_cert_file: LokiCertFileOpt = None,
    loki_key_file: LokiKeyFileOpt = None,
    loki_timeout: LokiTimeoutOpt = "10s",
    loki_batch_bytes: LokiBatchBytesOpt = "1MiB",
    loki_batch_wait: LokiBatchWaitOpt = "1s",
    loki_concurrency: LokiConcurrencyOpt = 2,
    spool_retention: SpoolRetentionOpt = "24h",
    spool_retention_bytes: SpoolRetentionBytesOpt = "1GiB",
    cluster: ClusterOpt = "",
    label: LabelOpt = None,
    structured_metadata: StructuredMetadataOpt = None,
    line_format: LineFormatOpt = "auto",
    trace_fields: TraceFieldsOpt = "",
    span_fields: SpanFieldsOpt = "",
    scan_text: ScanTextOpt = True,
    shared_key: Annotated[
        str | None,
        typer.Option(envvar=_env("shared-key"), help="Require the Forward handshake with this key."),
    ] = None,
    shared_key_file: Annotated[
        Path | None, typer.Option(envvar=_env("shared-key-file"), help="File holding the shared key.")
    ] = None,
    self_hostname: Annotated[
        str, typer.Option(envvar=_env("self-hostname"), help="Our name in the handshake (PONG).")
    ] = "",
    user: Annotated[
        list[str] | None,
        typer.Option(
            envvar=_env("user"), help="NAME:PASSWORD allowed to connect (repeatable; needs a shared key)."
        ),
    ] = None,
    users_file: Annotated[
        Path | None, typer.Option(envvar=_env("users-file"), help="File of NAME:PASSWORD lines.")
    ] = None,
    allow: Annotated[
        list[str] | None,
        typer.Option(envvar=_env("allow"), help="Client network allowed (CIDR, repeatable)."),
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(envvar=_env("tls-cert"), help="Server certificate (PEM): enables TLS.")
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option(envvar=_env("tls-key"), help="Server private key (PEM).")
    ] = None,
    tls_client_ca: Annotated[
        Path | None,
        typer.Option(envvar=_env("tls-client-ca"), help="CA for client certificates: requires mutual TLS."),
    ] = None,
    tls_min_version: Annotated[
        str, typer.Option(envvar=_env("tls-min-version"), help="Lowest TLS version: 1.2 or 1.3.")
    ] = "1.2",
    handshake_timeout: Annotated[
        str, typer.Option(envvar=_env("handshake-timeout"), help="Time for the TLS and Forward handshakes.")
    ] = f"{DEFAULT_HANDSHAKE_TIMEOUT:g}s",
    frame_timeout: Annotated[
        str, typer.Option(envvar=_env("frame-timeout"), help="Time a started request may take to arrive.")
    ] = f"{DEFAULT_FRAME_TIMEOUT:g}s",
    unix_socket_mode: Annotated[
        str,
        typer.Option(envvar=_env("unix-socket-mode"), help="File mode of a unix:// listen socket (octal)."),
    ] = "0660",
    workers: Annotated[
        int,
        typer.Option(
            envvar=_env("workers"), help="Processes sharing the port (SO_REUSEPORT), one spool each."
        ),
    ] = 1,
    delivery_process: Annotated[
        bool, typer.Option(envvar=_env("delivery-process"), help="Ship to Loki from a child process.")
    ] = True,
    delivery_processes: Annotated[
        str,
        typer.Option(
            envvar=_env("delivery-processes"),
            help="Child processes sharing the spool's delivery: auto (one per usable CPU, cgroup quota "
            f"included, at most {AUTO_MAX_DELIVERY_PROCESSES}) or 1-{MAX_DELIVERY_PROCESSES}.",
        ),
    ] = "auto",
    worker_index: Annotated[
        int | None, typer.Option(envvar=_env("worker-index"), hidden=True, help="Set by the parent process.")
    ] = None,
    config_file: ConfigOpt = None,
    log_level: Annotated[
        str, typer.Option(envvar=_env("log-level"), help="debug, info, warning or error.")
    ] = "info",
    log_format: Annotated[
        str, typer.Option(envvar=_env("log-format"), help="auto (JSON unless a terminal), json or console.")
    ] = "auto",
) -> None:
    """Receive Forward traffic, spool it durably and ack it (and ship it to Loki with --loki-url)."""
    checking = ctx.info_name == "check-config"
    if worker_index is not None:  # a worker of --workers: its own spool, the shared port, no HTTP
        spool_dir = spool_dir / f"worker-{worker_index}"
        http_listen = "off"
    try:
        log_json = _configure_logs(log_level, log_format)
        _check_spool_dir(spool_dir)
        config = ServerConfig(
            listen=parse_listen(listen, allow_unix=True),
            spool=SpoolSettings(
                directory=spool_dir,
                max_bytes=_positive(
                    parse_size(spool_max_bytes, option="--spool-max-bytes"), "--spool-max-bytes"
                ),
                segment_bytes=_positive(
                    parse_size(spool_segment_bytes, option="--spool-segment-bytes"), "--spool-segment-bytes"
                ),
                fsync_interval=parse_duration(spool_fsync_interval, option="--spool-fsync-interval"),
                dedup_capacity=_positive(dedup_capacity, "--dedup-capacity"),
            ),
            limits=Limits(
                max_frame_bytes=_positive(
                    parse_size(max_frame_bytes, option="--max-frame-bytes"), "--max-frame-bytes"
                ),
                max_decompressed_bytes=_positive(
                    parse_size(max_decompressed_bytes, option="--max-decompressed-bytes"),
                    "--max-decompressed-bytes",
                ),
                max_entries_per_frame=_positive(max_entries_per_frame, "--max-entries-per-frame"),
                max_tag_bytes=_at_most(
                    _positive(max_tag_bytes, "--max-tag-bytes"), MAX_TAG_BYTES_LIMIT, "--max-tag-bytes"
                ),
            ),
            http_listen=None
            if http_listen.strip().lower() in ("", "off", "none")
            else parse_listen(http_listen, option="--http-listen"),
            idle_timeout=_positive_f(parse_duration(idle_timeout, option="--idle-timeout"), "--idle-timeout"),
            max_connections=_positive(max_connections, "--max-connections"),
            max_receiving=_positive(max_receiving, "--max-receiving"),
            tag_prefix=_at_most_text(tag_prefix, 1024, "--tag-prefix"),
            source_address_key=_at_most_text(source_address_key, 1024, "--source-address-key") or None,
            udp_heartbeat=udp_heartbeat,
            shutdown_grace=parse_duration(shutdown_grace, option="--shutdown-grace"),
            auth=_auth_settings(shared_key, shared_key_file, self_hostname, user or [], users_file),
            allow=parse_networks(allow or []),
            tls=None
            if tls_cert is None
            else server_tls_context(tls_cert, tls_key, client_ca=tls_client_ca, min_version=tls_min_version),
            handshake_timeout=_positive_f(
                parse_duration(handshake_timeout, option="--handshake-timeout"), "--handshake-timeout"
            ),
            frame_timeout=_positive_f(
                parse_duration(frame_timeout, option="--frame-timeout"), "--frame-timeout"
            ),
            unix_socket_mode=_octal(unix_socket_mode, "--unix-socket-mode"),
            reuse_port=worker_index is not None,
        )
        if workers < 1:
            raise ConfigError(f"--workers: must be at least 1, got {workers}")
        lanes = parse_delivery_processes(delivery_processes, workers=workers)
        if workers > 1 and config.listen.unix_path is not None:
            raise ConfigError("--workers needs a TCP --listen address (SO_REUSEPORT)")
        if tls_cert is None and (tls_key is not None or tls_client_ca is not None):
            raise ConfigError("--tls-key and --tls-client-ca need --tls-cert")
        options = {name: ctx.params[name] for name in SERVE_DELIVERY_OPTIONS}
        delivery = _delivery_settings(**options)
        if delivery_process and delivery.loki is not None:
            process = DeliveryProcessSettings(
                options=_wire_options(options),
                log_level=log_level.lower(),
                log_json=log_json,
                worker=worker_index,
                processes=lanes.processes,
            )
            delivery = attrs.evolve(delivery, process=process)
        if checking:
            _print_effective(ctx, lanes)
            return
        if workers > 1 and worker_index is None:
            from fluentforward.workers import run_parent  # noqa: PLC0415

            raise typer.Exit(run_parent(config, workers))
        if delivery.process is not None:  # each --workers worker resolves and logs its own
            log.info("delivery_lanes", **lanes.log_fields())
        spool = Spool.open(config.spool)
    except FluentForwardError as exc:
        fail(str(exc))
    typer.echo(f"fluentforward {__version__}: spool at {spool_dir.resolve()}", err=True)
    if delivery.loki is None:
        typer.echo("fluentforward: no --loki-url: running as a spool-only receiver", err=True)
    from fluentforward.app import run_server, tune_allocator, tune_gc  # noqa: PLC0415 - keeps `spool ls` light

    tune_allocator()
    tune_gc()
    try:
        trio.run(run_server, config, spool, delivery, worker_index)
    except* ConfigError as group:
        fail(str(group.exceptions[0]))
    finally:
        spool.close()


app.command(
    "check-config",
    help="Validate serve's settings (flags, FLUENTFORWARD_*, --config); print them, secrets redacted.",
)(serve)

SECRET_OPTIONS = ("shared_key",)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return orjson.dumps(str(value)).decode()  # a JSON string is a valid TOML basic string


def _print_effective(ctx: typer.Context, lanes: DeliveryProcessCount) -> None:
    """Print every serve setting as TOML (usable as a --config file), secrets redacted.

    ``delivery_processes`` is shown resolved (``auto`` as the number it stands for on this machine).
    """
    lines = [f"# fluentforward {__version__}: effective settings of `serve`"]
    for name, value in sorted(ctx.params.items()):
        if name in ("worker_index", "config_file") or value is None:
            continue
        shown = value
        if name == "delivery_processes":
            shown = lanes.processes
            if lanes.auto is not None:
                lines.append(f"# delivery_processes: {lanes.auto.describe()}")
        elif name in SECRET_OPTIONS:
            shown = "<redacted>"
        elif name == "user":
            shown = [item.split(":", 1)[0] + ":<redacted>" for item in value]
        lines.append(f"{name} = {_toml_value(shown)}")
    typer.echo("\n".join(lines))


def _octal(text: str, option: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise ConfigError(f"{option}: expected an octal mode like 0660, got {text!r}") from None
    if not 0 <= mode <= 0o777:
        raise ConfigError(f"{option}: {text!r} is not a file mode")
    return mode


def _auth_settings(
    shared_key: str | None,
    shared_key_file: Path | None,
    self_hostname: str,
    users: list[str],
    users_file: Path | None,
) -> SharedKeyAuth | None:
    if shared_key is not None and shared_key_file is not None:
        raise ConfigError("give --shared-key or --shared-key-file, not both")
    key = shared_key if shared_key is not None else _read_secret(shared_key_file, "--shared-key-file")
    user_lines = list(users)
    if users_file is not None:
        try:
            user_lines += users_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"--users-file {users_file}: {exc.strerror or exc}") from exc
    accounts = parse_users(user_lines, option="--user/--users-file")
    if key is None:
        if accounts:
            # Fluent Bit before 4.1.1 skipped authentication entirely in this configuration.
            raise ConfigError("--user/--users-file need a shared key (--shared-key or --shared-key-file)")
        return None
    return SharedKeyAuth(
        shared_key=key.encode(), self_hostname=self_hostname or socket.gethostname(), users=accounts
    )


def _pairs(items: list[str], option: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        name, sep, template = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"{option}: expected NAME=TEMPLATE, got {item!r}")
        pairs[name.strip()] = template.strip()
    return pairs


def _read_secret(path: Path | None, option: str) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{option} {path}: {exc.strerror or exc}") from exc


def _delivery_settings(
    *,
    loki_url: str,
    loki_format: str,
    loki_tenant: str,
    loki_tenant_key: str,
    loki_username: str,
    loki_password_file: Path | None,
    loki_bearer_token_file: Path | None,
    loki_header: list[str] | None,
    loki_ca_file: Path | None,
    loki_cert_file: Path | None,
    loki_key_file: Path | None,
    loki_timeout: str,
    loki_batch_bytes: str,
    loki_batch_wait: str,
    loki_concurrency: int,
    spool_retention: str | None,
    spool_retention_bytes: str | None,
    cluster: str,
    label: list[str] | None,
    structured_metadata: list[str] | None,
    line_format: str,
    trace_fields: str,
    span_fields: str,
    scan_text: bool,
) -> DeliverySettings:
    """Validate the Loki, shaping and trace-id options (also used by ``replay``)."""
    from fluentforward.ids import IdRules  # noqa: PLC0415
    from fluentforward.pipeline import ShipperSettings  # noqa: PLC0415
    from fluentforward.records import build_rules  # noqa: PLC0415
    from fluentforward.sinks.loki import LokiSettings  # noqa: PLC0415

    headers = []
    for item in loki_header or []:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise ConfigError(f"--loki-header: expected 'Name: value', got {item!r}")
        headers.append((name.strip(), value.strip()))
    batch_bytes = _positive(parse_size(loki_batch_bytes, option="--loki-batch-bytes"), "--loki-batch-bytes")
    batch_wait = parse_duration(loki_batch_wait, option="--loki-batch-wait")
    loki = None
    if loki_url:
        loki = LokiSettings(
            url=loki_url,
            format=loki_format,  # type: ignore[arg-type]  # validated by LokiSettings
            tenant=loki_tenant or None,
            username=loki_username or None,
            password=_read_secret(loki_password_file, "--loki-password-file"),
            bearer_token_file=loki_bearer_token_file,
            headers=tuple(headers),
            ca_file=loki_ca_file,
            cert_file=loki_cert_file,
            key_file=loki_key_file,
            timeout_s=_positive_f(parse_duration(loki_timeout, option="--loki-timeout"), "--loki-timeout"),
            max_batch_bytes=batch_bytes,
            batch_wait_s=batch_wait,
            concurrency=_positive(loki_concurrency, "--loki-concurrency"),
        )
    id_rules = IdRules.from_names(
        trace_fields=[name.strip() for name in trace_fields.split(",") if name.strip()],
        span_fields=[name.strip() for name in span_fields.split(",") if name.strip()],
        scan_text=scan_text,
    )
    shape_rules = build_rules(
        line_format=line_format,
        labels=_pairs(label or [], "--label"),
        structured_metadata=_pairs(structured_metadata or [], "--structured-metadata"),
        cluster=cluster,
        tenant=loki_tenant_key or None,
    )
    return DeliverySettings(
        loki=loki,
        shape_rules=shape_rules,
        id_rules=id_rules,
        shipper=ShipperSettings(
            batch_bytes=batch_bytes,
            batch_wait_s=batch_wait,
            retention_s=parse_duration(spool_retention or "0", option="--spool-retention"),
            retention_bytes=parse_size(spool_retention_bytes or "0", option="--spool-retention-bytes"),
        ),
    )


def _wire_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Option values as plain data for a delivery child process (paths become strings)."""
    return {
        name: str(value) if name in PATH_OPTIONS and value is not None else value
        for name, value in options.items()
    }


def delivery_settings_from_wire(options: Mapping[str, Any]) -> DeliverySettings:
    """Rebuild ``serve``'s delivery settings in a delivery child process, with the same validation.

    Args:
        options: the values sent by the parent: every name of ``SERVE_DELIVERY_OPTIONS``, paths as str.

    Raises:
        ConfigError: a name is missing or unknown, a value is not plain data, or a setting is invalid
            (a password file that vanished since the parent read it).
    """
    names = set(options)
    if names != set(SERVE_DELIVERY_OPTIONS):
        wrong = sorted(names ^ set(SERVE_DELIVERY_OPTIONS))
        raise ConfigError(f"delivery settings: missing or unknown options {', '.join(wrong)}")
    values: dict[str, Any] = {}
    for name, value in options.items():
        plain = value is None or isinstance(value, str | int | bool)
        if not plain and not (isinstance(value, list) and all(isinstance(item, str) for item in value)):
            raise ConfigError(f"delivery settings: {name}: unexpected value of type {type(value).__name__}")
        values[name] = Path(value) if name in PATH_OPTIONS and isinstance(value, str) else value
    return _delivery_settings(**values)


def _positive(value: int, option: str) -> int:
    if value < 1:
        raise ConfigError(f"{option}: must be at least 1, got {value}")
    return value


def _at_most(value: int, limit: int, option: str) -> int:
    if value > limit:
        raise ConfigError(f"{option}: must be at most {limit}, got {value}")
    return value


def _at_most_text(value: str, limit: int, option: str) -> str:
    if len(value.encode()) > limit:
        raise ConfigError(f"{option}: must be at most {limit} bytes")
    return value


def _positive_f(value: float, option: str) -> float:
    if value <= 0:
        raise ConfigError(f"{option}: must be positive, got {value:g}")
    return value


def _configure_logs(level: str, fmt: str) -> bool | None:
    """Configure structlog from the options; returns the ``json`` choice (a delivery child copies it)."""
    if level.lower() not in LOG_LEVELS:
        raise ConfigError(f"--log-level: expected one of {', '.join(LOG_LEVELS)}, got {level!r}")
    formats = {"auto": None, "json": True, "console": False}
    if fmt.lower() not in formats:
        raise ConfigError(f"--log-format: expected auto, json or console, got {fmt!r}")
    configure_logging(json=formats[fmt.lower()], level=level.lower())
    return formats[fmt.lower()]


# -- send --------------------------------------------------------------------------------------------

SEND_MODES = ("message", "forward", "packed", "compressed")


@app.command()
def send(
    address: Annotated[str, typer.Argument(envvar=_env("send-address"), help="Server HOST:PORT.")],
    source: Annotated[
        str, typer.Argument(envvar=_env("send-file"), help="JSON lines file, or - for standard input.")
    ] = "-",
    tag: Annotated[
        str, typer.Option(envvar=_env("send-tag"), help="Tag of the records.")
    ] = "fluentforward.send",
    ack: Annotated[
        bool, typer.Option(envvar=_env("send-ack"), help="Ask for acks and wait for each one.")
    ] = False,
    mode: Annotated[
        str, typer.Option(envvar=_env("send-mode"), help="message, forward, packed or compressed.")
    ] = "forward",
    compression: Annotated[
        str, typer.Option(envvar=_env("send-compression"), help="gzip or zstd (compressed mode).")
    ] = "gzip",
    batch: Annotated[int, typer.Option(envvar=_env("send-batch"), help="Records per frame.")] = 1000,
    time_key: Annotated[
        str | None,
        typer.Option(envvar=_env("send-time-key"), help="Field holding the event time (Unix s or RFC 3339)."),
    ] = None,
    shared_key: Annotated[
        str | None, typer.Option(envvar=_env("send-shared-key"), help="Shared key for the handshake.")
    ] = None,
    self_hostname: Annotated[
        str, typer.Option(envvar=_env("send-self-hostname"), help="Our hostname in the handshake.")
    ] = "fluentforward-send",
    username: Annotated[str, typer.Option(envvar=_env("send-username"), help="User for user auth.")] = "",
    password: Annotated[str, typer.Option(envvar=_env("send-password"), help="Password for user auth.")] = "",
    timeout: Annotated[
        str, typer.Option(envvar=_env("send-timeout"), help="Connect, write and ack timeout.")
    ] = "30s",
) -> None:
    """Send JSON lines as Forward records (a real client for tests, demos and load)."""
    from fluentforward import client as fc  # noqa: PLC0415

    try:
        target = parse_listen(address, option="ADDRESS")
        if mode not in SEND_MODES:
            raise ConfigError(f"--mode: expected one of {', '.join(SEND_MODES)}, got {mode!r}")
        encoder = fc.FrameEncoder(
            mode=mode,
            v2_entries=True,
            compression=compression,
            require_ack=ack,
            batch_records=_positive(batch, "--batch"),
        )
        wait = _positive_f(parse_duration(timeout, option="--timeout"), "--timeout")
        stream = sys.stdin if source == "-" else Path(source).open(encoding="utf-8")  # noqa: SIM115
    except (ConfigError, ValueError) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"{source}: {exc.strerror or exc}")
    auth = (
        None
        if shared_key is None
        else fc.ClientAuth(
            shared_key=shared_key.encode(),
            self_hostname=self_hostname,
            username=username,
            password=password.encode(),
        )
    )

    async def run() -> tuple[int, int]:
        records = frames = 0
        async with fc.open_forward_client(
            target.host, target.port, auth=auth, connect_timeout=wait, ack_timeout=wait, send_timeout=wait
        ) as conn:
            entries = fc.read_json_lines(stream, time_key=time_key)
            for frame in encoder.encode(tag, entries):
                await conn.send(frame)
                records += frame.records
                frames += 1
        return records, frames

    try:
        records, frames = trio.run(run)
    except* FluentForwardError as group:
        fail(str(group.exceptions[0]))
    finally:
        if stream is not sys.stdin:
            stream.close()
    typer.echo(f"sent {records} records in {frames} frames" + (" (all acked)" if ack else ""), err=True)


# -- replay ------------------------------------------------------------------------------------------


@app.command()
def replay(
    ctx: typer.Context,
    spool_dir: Annotated[Path, typer.Argument(envvar=_env("spool-dir"), help="The spool directory.")],
    to: Annotated[
        str,
        typer.Option(envvar=_env("replay-to"), help="forward://HOST:PORT to replay to a Forward receiver."),
    ] = "",
    since: Annotated[
        str | None,
        typer.Option(envvar=_env("since"), help="Only events at or after: RFC 3339, Unix s, or 15m ago."),
    ] = None,
    until: Annotated[
        str | None, typer.Option(envvar=_env("until"), help="Only events before this time.")
    ] = None,
    tag: Annotated[str | None, typer.Option(envvar=_env("tag"), help="Only tags matching this glob.")] = None,
    dry_run: Annotated[
        bool, typer.Option(envvar=_env("dry-run"), help="Count what would be sent; send nothing.")
    ] = False,
    loki_url: LokiUrlOpt = "",
    loki_format: LokiFormatOpt = "protobuf",
    loki_tenant: LokiTenantOpt = "",
    loki_tenant_key: LokiTenantKeyOpt = "",
    loki_username: LokiUsernameOpt = "",
    loki_password_file: LokiPasswordFileOpt = None,
    loki_bearer_token_file: LokiBearerTokenFileOpt = None,
    loki_header: LokiHeaderOpt = None,
    loki_ca_file: LokiCaFileOpt = None,
    loki_cert_file: LokiCertFileOpt = None,
    loki_key_file: LokiKeyFileOpt = None,
    loki_timeout: LokiTimeoutOpt = "10s",
    loki_batch_bytes: LokiBatchBytesOpt = "1MiB",
    loki_batch_wait: LokiBatchWaitOpt = "1s",
    loki_concurrency: LokiConcurrencyOpt = 2,
    cluster: ClusterOpt = "",
    label: LabelOpt = None,
    structured_metadata: StructuredMetadataOpt = None,
    line_format: LineFormatOpt = "auto",
    trace_fields: TraceFieldsOpt = "",
    span_fields: SpanFieldsOpt = "",
    scan_text: ScanTextOpt = True,
    config_file: ConfigOpt = None,
) -> None:
    """Re-send spooled records (a time range, some tags) to Loki or to a Forward receiver."""
    from fluentforward.pipeline import Transformer  # noqa: PLC0415
    from fluentforward.reader import RecordFilter  # noqa: PLC0415
    from fluentforward.records import Shaper  # noqa: PLC0415
    from fluentforward.replay import (  # noqa: PLC0415
        Progress,
        ReplayResult,
        replay_to_forward,
        replay_to_loki,
        spool_bytes,
    )
    from fluentforward.sinks.loki import LokiSink  # noqa: PLC0415

    directories = _existing_spool(spool_dir)
    now = time.time_ns()
    try:
        configure_logging(json=None, level="warning")
        if bool(to) == bool(loki_url) and not dry_run:
            raise ConfigError("give exactly one target: --loki-url URL or --to forward://HOST:PORT")
        forward_target = None
        if to:
            if not to.startswith("forward://"):
                raise ConfigError(f"--to: expected forward://HOST:PORT, got {to!r}")
            forward_target = parse_listen(to.removeprefix("forward://"), option="--to")
        record_filter = RecordFilter(
            since_ns=None if since is None else parse_time_ns(since, option="--since", now_ns=now),
            until_ns=None if until is None else parse_time_ns(until, option="--until", now_ns=now),
            tag_glob=tag,
        )
        # A replay keeps nothing: retention only applies to a running server.
        delivery = _delivery_settings(
            **{name: ctx.params[name] for name in DELIVERY_OPTIONS},
            spool_retention=None,
            spool_retention_bytes=None,
        )
    except ConfigError as exc:
        fail(str(exc))
    progress = Progress(sum(spool_bytes(directory) for directory in directories), progress_dir=spool_dir)
    transformer = Transformer(Shaper(rules=delivery.shape_rules), delivery.id_rules)

    async def run() -> Any:
        total = ReplayResult()
        for directory in directories:
            one = await run_one(directory)
            for field in attrs.fields(ReplayResult):
                setattr(total, field.name, getattr(total, field.name) + getattr(one, field.name))
        return total

    async def run_one(directory: Path) -> Any:
        if forward_target is not None:
            return await replay_to_forward(
                directory,
                record_filter,
                forward_target.host,
                forward_target.port,
                dry_run=dry_run,
                progress=progress,
            )
        if dry_run or delivery.loki is None:
            return await replay_to_loki(
                directory,
                record_filter,
                None,
                transformer,
                batch_bytes=delivery.shipper.batch_bytes,
                progress=progress,
            )
        async with LokiSink(delivery.loki) as sink:
            return await replay_to_loki(
                directory,
                record_filter,
                sink,
                transformer,
                batch_bytes=delivery.shipper.batch_bytes,
                progress=progress,
            )

    try:
        result = trio.run(run)
    except* FluentForwardError as group:
        fail(str(group.exceptions[0]))
    verb = "would send" if dry_run else "sent"
    summary = (
        f"replay: {verb} {result.records} records from {result.frames} frames "
        f"({result.bytes_read} bytes); delivered {result.delivered}, rejected {result.rejected}"
    )
    if result.bad_frames:
        summary += f", undecodable frames {result.bad_frames}"
    typer.echo(summary, err=True)
    if result.rejected or result.bad_frames:
        raise typer.Exit(1)


# -- spool ls / verify / cat -------------------------------------------------------------------------


def _existing_spool(directory: Path) -> list[Path]:
    """The spool directories under DIR: DIR itself, or its ``worker-<i>`` directories (``--workers``)."""
    if not directory.is_dir():
        fail(f"{directory}: not a spool directory (no such directory)")
    found = spool_dirs(directory)
    if not found:
        fail(f"{directory}: not a spool directory (no segments/ or worker-*/segments/ inside)")
    return found


def _iso(ns: int | None) -> str | None:
    if ns is None:
        return None
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns / 1e9)) + f".{ns % 1_000_000_000 // 1_000_000:03d}Z"
    )


@spool_app.command("ls")
def spool_ls(
    directory: Annotated[Path, typer.Argument(envvar=_env("spool-dir"), help="The spool directory.")],
    as_json: Annotated[
        bool, typer.Option("--json", envvar=_env("json"), help="One JSON object per segment.")
    ] = False,
) -> None:
    """List segments: frames, records, bytes and the receive-time range."""
    totals = {"frames": 0, "records": 0, "bytes": 0}
    rows: list[dict[str, Any]] = []
    for one, sequence in [(d, seq) for d in _existing_spool(directory) for seq in list_segments(d)]:
        path = segment_path(one, sequence)
        prefix = "" if one == directory else f"{one.name}/"
        row: dict[str, Any] = {
            "segment": prefix + path.name,
            "frames": 0,
            "records": 0,
            "bytes": 0,
            "first": None,
            "last": None,
        }
        for frame in read_frames(
            one, _start_of(sequence), verify=False, want_raw=False, stop=_end_of(sequence)
        ):
            row["frames"] += 1
            row["records"] += frame.header.record_count
            row["first"] = row["first"] or frame.header.recv_time_ns
            row["last"] = frame.header.recv_time_ns
        row["bytes"] = path.stat().st_size
        for key in totals:
            totals[key] += row[key]
        rows.append(row)
    if as_json:
        for row in rows:
            typer.echo(orjson.dumps(row).decode())
        return
    typer.echo(f"{'SEGMENT':<35} {'FRAMES':>8} {'RECORDS':>10} {'BYTES':>12}  RECEIVED (UTC)")
    for row in rows:
        span = f"{_iso(row['first'])} .. {_iso(row['last'])}" if row["first"] else "-"
        typer.echo(f"{row['segment']:<35} {row['frames']:>8} {row['records']:>10} {row['bytes']:>12}  {span}")
    typer.echo(f"{'total':<35} {totals['frames']:>8} {totals['records']:>10} {totals['bytes']:>12}")


def _start_of(sequence: int) -> Any:
    from fluentforward.spool import Position  # noqa: PLC0415

    return Position(segment=sequence, offset=8)


def _end_of(sequence: int) -> Any:
    from fluentforward.spool import Position  # noqa: PLC0415

    return Position(segment=sequence, offset=2**62)


@spool_app.command("verify")
def spool_verify(
    directory: Annotated[Path, typer.Argument(envvar=_env("spool-dir"), help="The spool directory.")],
) -> None:
    """Check every frame's checksum; exit 1 naming the first corrupt place."""
    directories = _existing_spool(directory)
    bad: list[tuple[Path, ScanEnd]] = []
    frames = 0
    for one in directories:
        for _ in read_frames(one, want_raw=False, on_bad=lambda path, end: bad.append((path, end))):
            frames += 1
    if bad:
        path, end = bad[0]
        kind = "torn tail" if end.truncated else "corrupt"
        typer.echo(f"{path}@{end.offset}: {kind}: {end.reason} ({len(bad)} bad segment(s))", err=True)
        raise typer.Exit(1)
    segments = sum(len(list_segments(one)) for one in directories)
    typer.echo(f"ok: {frames} frames in {segments} segments verified")


@spool_app.command("cat")
def spool_cat(
    directory: Annotated[Path, typer.Argument(envvar=_env("spool-dir"), help="The spool directory.")],
    since: Annotated[
        str | None,
        typer.Option(envvar=_env("since"), help="Only events at or after: RFC 3339, Unix s, or 15m ago."),
    ] = None,
    until: Annotated[
        str | None, typer.Option(envvar=_env("until"), help="Only events before this time.")
    ] = None,
    tag: Annotated[str | None, typer.Option(envvar=_env("tag"), help="Only tags matching this glob.")] = None,
) -> None:
    """Print one JSON object per record: tag, time_ns, record, metadata, trace_id, span_id."""
    from fluentforward.ids import extract_trace_context  # noqa: PLC0415
    from fluentforward.reader import RecordFilter, iter_records  # noqa: PLC0415
    from fluentforward.records import jsonable  # noqa: PLC0415

    directories = _existing_spool(directory)
    now = time.time_ns()
    try:
        record_filter = RecordFilter(
            since_ns=None if since is None else parse_time_ns(since, option="--since", now_ns=now),
            until_ns=None if until is None else parse_time_ns(until, option="--until", now_ns=now),
            tag_glob=tag,
        )
    except ConfigError as exc:
        fail(str(exc))
    out = sys.stdout.buffer

    def bad_segment(path: Path, end: ScanEnd) -> None:
        typer.echo(f"fluentforward: {path}@{end.offset}: {end.reason}; skipping the rest of it", err=True)

    try:
        items = (
            item
            for one in directories
            for item in iter_records(one, record_filter, on_bad_segment=bad_segment)
        )
        for item in items:
            entry = item.entry
            trace = extract_trace_context(entry.record, entry.metadata)
            out.write(
                orjson.dumps(
                    {
                        "tag": item.tag,
                        "time_ns": entry.time_ns,
                        "record": jsonable(entry.record),
                        "metadata": jsonable(entry.metadata),
                        "trace_id": trace.trace_id if trace else None,
                        "span_id": trace.span_id if trace else None,
                        "peer": item.frame.header.peer,
                    }
                )
                + b"\n"
            )
    except BrokenPipeError:  # `spool cat | head` is normal use
        sys.stderr.close()
    except SpoolError as exc:
        fail(str(exc))


def _config_path(argv: list[str], environ: Mapping[str, str]) -> Path | None:
    for index, arg in enumerate(argv):
        if arg == "--config" and index + 1 < len(argv):
            return Path(argv[index + 1])
        if arg.startswith("--config="):
            return Path(arg.removeprefix("--config="))
    value = environ.get(_env("config"))
    return Path(value) if value else None


def config_default_map(argv: list[str], environ: Mapping[str, str]) -> dict[str, Any] | None:
    """Load the ``--config`` TOML file (or ``FLUENTFORWARD_CONFIG``) as click default values.

    Values from the file rank below flags and environment variables and above the built-in defaults.

    Raises:
        ConfigError: the file cannot be read, is not TOML, or names a setting that does not exist.
    """
    path = _config_path(argv, environ)
    if path is None:
        return None
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"--config {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config {path}: not valid TOML: {exc}") from exc
    serve_params = {param.name for param in typer.main.get_command(app).commands["serve"].params}  # type: ignore[attr-defined]
    settings: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in serve_params or name in ("config_file", "worker_index"):
            raise ConfigError(f"--config {path}: unknown setting {key!r}")
        settings[name] = value
    replay_params = {param.name for param in typer.main.get_command(app).commands["replay"].params}  # type: ignore[attr-defined]
    return {
        "serve": settings,
        "check-config": settings,
        "replay": {k: v for k, v in settings.items() if k in replay_params and k != "spool_dir"},
    }


def main() -> None:
    """Entry point of the ``fluentforward`` console script."""
    argv = sys.argv[1:]
    try:
        default_map = config_default_map(argv, os.environ)
    except ConfigError as exc:
        typer.echo(f"fluentforward: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    try:
        app(args=argv, default_map=default_map)
    except KeyboardInterrupt:  # pragma: no cover - interactive use
        sys.exit(130)
