"""``make soak``: ten minutes of 120 connections sending ~2 MB frames; is the server's memory flat?

``python -m bench.soak [--minutes 10] [--rate 10000] [--connections 120] [--aligned]``

Starts ``fluentforward serve`` (durable spool; Loki shipping to ``bench.lokisink`` when the server has
``--loki-url``) and one load generator process for the whole soak, samples the server's resident memory
(``VmRSS`` of its process tree) every ``--interval`` seconds, and fits a least-squares line through the
samples after the first minute (warm-up: buffers and caches reach their working size). Memory is "flat"
when the fitted growth over the soak stays within ``max(FLAT_MB, FLAT_SHARE x mean)``.

Writes ``bench/results/soak.json`` (``bench.run`` quotes the latest soak in docs/benchmarks.md) and prints
a summary. Like ``make bench`` it never fails on a figure; it exits non-zero only if it cannot run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from bench import harness
from bench.run import BIG_CHUNK_RECORDS, RESULTS_DIR, TARGET_PEAK_RSS_MB

__all__ = ["fit_slope", "main", "soak"]

# Growth over the whole soak below this many MB, or below this share of the mean RSS, counts as flat:
# allocator noise on a ~200 MB process is a few MB.
FLAT_MB = 10.0
FLAT_SHARE = 0.05
# The first minute is warm-up: per-connection buffers grow to the frame size once, then stay.
WARMUP_S = 60.0
DEFAULT_RATE = 10_000  # records/s: moderate, so the 10-minute spool stays a few GB


def fit_slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (x, y) points; 0 with fewer than two distinct x."""
    n = len(points)
    if n < 2:
        return 0.0
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    if var == 0:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var


def soak(
    minutes: float, rate: float, connections: int, interval: float, aligned: bool, log: Any = print
) -> dict[str, Any]:
    """Run the soak and return its report."""
    caps = harness.capabilities()
    duration = minutes * 60
    samples: list[tuple[float, float]] = []
    with harness.workdir() as wd:
        sink = harness.start_lokisink(wd) if caps.loki else None
        server = harness.start_server(wd, loki_url=f"http://127.0.0.1:{sink.port}" if sink else None)
        try:
            args = ["--connections", str(connections), "--mode", "forward"]
            args += ["--chunk-records", str(BIG_CHUNK_RECORDS), "--rate", str(rate)]
            args += ["--warmup", "0", "--duration", str(duration)]
            loadgen, ready = harness.start_loadgen(wd, server.port, [*args, "--aligned"] if aligned else args)
            end = ready + duration
            while (now := time.monotonic()) < end:
                rss = harness.tree_memory_mb(server.pid)["rss"]
                samples.append((now - ready, rss))
                log(f"  {now - ready:6.0f} s  RSS {rss:7.1f} MB", flush=True)
                time.sleep(min(interval, max(0.0, end - time.monotonic())))
            memory = harness.tree_memory_mb(server.pid)
            load = harness.finish_loadgen(loadgen)
            delivered = (
                harness.read_json_url(f"http://127.0.0.1:{sink.port}/stats")["entries"] if sink else None
            )
        finally:
            server.stop()
            if sink is not None:
                sink.stop()
    steady = [(t / 60, rss) for t, rss in samples if t >= min(WARMUP_S, duration / 2)]
    slope = fit_slope(steady)
    mean = sum(rss for _, rss in steady) / len(steady) if steady else 0.0
    growth = slope * minutes
    flat = abs(growth) <= max(FLAT_MB, FLAT_SHARE * mean)
    peak = memory["hwm"]
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "minutes": minutes,
        "rate": rate,
        "connections": connections,
        "aligned": aligned,
        "loki": caps.loki,
        "samples": samples,
        "slope_mb_per_min": slope,
        "growth_mb": growth,
        "mean_rss_mb": mean,
        "peak_rss_mb": peak,
        "flat": flat,
        "verdict": "met" if flat and peak <= TARGET_PEAK_RSS_MB else "missed",
        "records_per_s": load["records_per_s"],
        "records_acked": load["records_acked"],
        "records_delivered": delivered,
        "ack_ms": load["ack_ms"],
        "errors": load["errors"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE, help="records/s over all connections")
    parser.add_argument("--connections", type=int, default=120)
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between RSS samples")
    parser.add_argument("--aligned", action="store_true", help="all connections send at the same instants")
    args = parser.parse_args(argv)
    print(
        f"soak: {args.minutes:g} min, {args.connections} connections x ~2 MB frames, {args.rate:,.0f} records/s",
        flush=True,
    )
    report = soak(args.minutes, args.rate, args.connections, args.interval, args.aligned)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / "soak.json"
    out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(
        f"RSS slope {report['slope_mb_per_min']:+.2f} MB/min (growth {report['growth_mb']:+.1f} MB over the soak, "
        f"mean {report['mean_rss_mb']:.0f} MB): {'flat' if report['flat'] else 'NOT flat'}; "
        f"peak {report['peak_rss_mb']:.0f} MB (target {TARGET_PEAK_RSS_MB:.0f}); "
        f"{report['records_per_s']:,.0f} records/s acked, ack p99 {report['ack_ms']['p99']:.0f} ms, "
        f"errors {report['errors'] or 'none'}"
    )
    print(f"wrote {out.relative_to(Path(__file__).resolve().parent.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
