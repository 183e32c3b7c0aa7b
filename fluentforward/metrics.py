"""Prometheus metrics, computed at scrape time from the counters the server already keeps.

Nothing on the hot path calls a metrics library: the server, spool and shipper keep plain integers, and
a collector turns a ``Snapshot`` of them into metric families when ``/metrics`` is scraped. A snapshot
is plain data (JSON-serializable), so with ``--workers`` each worker writes its own and the parent
serves their sum with a ``worker`` label.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from fluentforward.app import AppState
    from fluentforward.spool import LatencyHistogram

__all__ = ["CONTENT_TYPE", "Snapshot", "render", "snapshot"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# One sample: (metric name, kind, help, labels, value). Histograms carry (buckets, sum, count).
Sample = tuple[str, str, str, dict[str, str], Any]
Snapshot = list[Sample]


def _histogram(h: LatencyHistogram) -> tuple[list[tuple[str, int]], float, int]:
    return h.cumulative(), h.sum, h.count


def snapshot(app: AppState, *, now: float | None = None) -> Snapshot:
    """Read every counter of a running server (and its shipper) into plain data."""
    server = app.server
    stats = server.stats
    spool = server.spool
    out: Snapshot = []

    def add(metric: str, metric_type: str, text: str, value: Any, /, **labels: str) -> None:
        out.append((metric, metric_type, text, labels, value))

    add("connections", "counter", "Connections accepted.", stats.connections_total)
    add("connections_open", "gauge", "Connections open now.", stats.connections_open)
    add(
        "connections_refused",
        "counter",
        "Connections refused (max_connections, --allow).",
        stats.connections_refused,
    )
    add("frames", "counter", "Forward requests spooled.", stats.frames - stats.signal_frames, signal="logs")
    add("frames", "counter", "Forward requests spooled.", stats.signal_frames, signal="metrics_or_traces")
    add("frames_duplicate", "counter", "Retried chunks acked again without storing.", stats.frames_duplicate)
    add("records", "counter", "Events received in spooled requests.", stats.records)
    add("received_bytes", "counter", "Bytes read from clients.", stats.bytes)
    add("acks", "counter", "Acks sent.", stats.acks)
    add("heartbeats", "counter", "Heartbeats received.", stats.heartbeats_tcp, transport="tcp")
    add("heartbeats", "counter", "Heartbeats received.", stats.heartbeats_udp, transport="udp")
    for reason, count in sorted(stats.protocol_errors.items()):
        add("protocol_errors", "counter", "Connections closed for a protocol error.", count, reason=reason)
    add("handshake_failures", "counter", "Forward handshakes refused.", stats.handshake_failures)
    add("tls_failures", "counter", "TLS handshakes that failed.", stats.tls_failures)
    for kind, count in sorted(stats.timeouts.items()):
        add("timeouts", "counter", "Connections closed by a timeout.", count, kind=kind)

    add("spool_bytes", "gauge", "Bytes in spool segments.", spool.total_bytes)
    add("spool_undelivered_bytes", "gauge", "Spool bytes not yet delivered.", spool.used_bytes)
    add(
        "spool_max_bytes",
        "gauge",
        "Undelivered bytes allowed before clients are slowed.",
        spool.settings.max_bytes,
    )
    add("spool_full", "gauge", "1 while appends wait for space.", int(spool.is_full))
    add("spool_segment", "gauge", "Sequence number of the segment being written.", spool.active_segment)
    add("spool_fsyncs", "counter", "fsync calls by the spool.", spool.fsync_count)
    add("spool_fsync_seconds", "histogram", "fsync latency.", _histogram(spool.fsync_seconds))

    from fluentforward.replay import read_progress  # noqa: PLC0415

    replay = read_progress(spool.directory) or read_progress(spool.directory.parent)
    if replay is not None:
        add(
            "replay_running",
            "gauge",
            "1 while a replay on this spool is running.",
            int(bool(replay["running"])),
        )
        add("replay_records", "gauge", "Records the last replay read so far.", replay["records"])
        add("replay_bytes", "gauge", "Spool bytes the last replay read so far.", replay["bytes"])
        add("replay_total_bytes", "gauge", "Spool bytes the last replay will read.", replay["total_bytes"])
        add("replay_delivered", "gauge", "Entries the last replay delivered.", replay["delivered"])
        add("replay_rejected", "gauge", "Entries the last replay had rejected.", replay["rejected"])

    shipper = app.shipper
    if shipper is not None:
        d = shipper.stats
        oldest = d.oldest_undelivered_ns
        age = 0.0 if oldest is None else max(0.0, (now if now is not None else time.time()) - oldest / 1e9)
        add("spool_oldest_undelivered_age_seconds", "gauge", "Age of the oldest undelivered frame.", age)
        add("loki_batches", "counter", "Push requests that ended (delivered or refused).", d.batches)
        add(
            "loki_entries",
            "counter",
            "Entries sent to Loki by outcome.",
            d.entries_delivered,
            outcome="delivered",
        )
        add(
            "loki_entries",
            "counter",
            "Entries sent to Loki by outcome.",
            d.entries_dead_lettered,
            outcome="dead_lettered",
        )
        add("loki_retries", "counter", "Push attempts that will be retried.", d.retries)
        for status, count in sorted(d.status_codes.items()):
            add(
                "loki_responses",
                "counter",
                "Loki responses by HTTP status ('error': no response).",
                count,
                status=status,
            )
        add(
            "loki_push_seconds",
            "histogram",
            "Time to deliver a batch, retries included.",
            _histogram(d.push_seconds),
        )
        add(
            "loki_auth_failed",
            "gauge",
            "1 while Loki rejects our credentials or URL.",
            int(shipper.auth_failed),
        )
        for source, count in sorted(d.trace_sources.items()):
            add(
                "records_trace_id",
                "counter",
                "Delivered records by where their trace id came from ('none': no trace id).",
                count,
                source=source,
            )
        add("delivery_bad_frames", "counter", "Stored frames that could not be decoded.", d.bad_frames)
    return out


class _SnapshotCollector(Collector):
    def __init__(self, snapshots: Iterable[tuple[dict[str, str], Snapshot]]) -> None:
        self._snapshots = snapshots

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Any] = {}
        for extra, samples in self._snapshots:
            for name, kind, text, labels, value in samples:
                all_labels = {**extra, **labels}
                full = f"fluentforward_{name}"
                family = families.get(full)
                if family is None:
                    cls = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily}.get(
                        kind, HistogramMetricFamily
                    )
                    family = cls(full, text, labels=sorted(all_labels))
                    families[full] = family
                keys = sorted(all_labels)
                if kind == "histogram":
                    buckets, total, _count = value
                    family.add_metric([all_labels[k] for k in keys], buckets, total)
                else:
                    family.add_metric([all_labels[k] for k in keys], value)
        yield from families.values()


def render(snapshots: Iterable[tuple[dict[str, str], Snapshot]]) -> bytes:
    """Prometheus text exposition of one or more snapshots (each with extra labels, e.g. worker)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(list(snapshots)))
    return generate_latest(registry)
