"""fluentforward replay: time ranges to Loki, to another Forward receiver, twice safely, dry runs."""

from __future__ import annotations

import time

import pytest
from typer.testing import CliRunner

from fluentforward.app import AppState
from fluentforward.cli import app
from fluentforward.config import ServerConfig
from fluentforward.metrics import render, snapshot
from fluentforward.replay import read_progress
from fluentforward.server import ServerState
from fluentforward.spool import LatencyHistogram
from tests.fakeloki import FakeLoki
from tests.helpers import et, fill_spool, forward
from tests.procs import ServerProcess, spool_records

runner = CliRunner()
NOW = time.time_ns() // 10**9
BASE = NOW - 3600


def _fill(directory, count=30):
    """A spool with `count` records one second apart, spread over three frames and two tags."""
    frames = []
    for f in range(3):
        tag = "app.web" if f < 2 else "app.db"
        entries = [
            [[et(BASE + f * 10 + i), {}], {"log": f"r{f * 10 + i}", "trace_id": f"{f * 10 + i + 1:032x}"}]
            for i in range(count // 3)
        ]
        frames.append((tag, forward(tag, entries), len(entries)))
    return fill_spool(directory, frames)


@pytest.fixture
def spool_dir(tmp_path):
    return _fill(tmp_path / "spool")


@pytest.fixture
def loki():
    with FakeLoki() as fake:
        yield fake


def test_replay_time_range_to_loki(spool_dir, loki):
    """A replay of a time range delivers exactly the records in that range, with their trace ids."""
    result = runner.invoke(
        app,
        [
            "replay",
            str(spool_dir),
            "--loki-url",
            loki.url,
            "--since",
            str(BASE + 5),
            "--until",
            str(BASE + 15),
            "--line-format",
            "raw",
        ],
    )
    assert result.exit_code == 0, result.output
    lines = sorted(e.line for e in loki.entries())
    assert lines == sorted(f"r{i}" for i in range(5, 15))
    assert {e.structured_metadata["trace_id"] for e in loki.entries()} == {
        f"{i + 1:032x}" for i in range(5, 15)
    }
    assert "delivered 10" in result.stderr


def test_replay_twice_is_safe(spool_dir, loki):
    """Running the same replay twice stores each entry once (Loki de-duplicates)."""
    for _ in range(2):
        args = ["replay", str(spool_dir), "--loki-url", loki.url, "--tag", "app.web", "--line-format", "raw"]
        assert runner.invoke(app, args).exit_code == 0
    assert sorted(e.line for e in loki.entries()) == sorted(f"r{i}" for i in range(20))


def test_replay_dry_run_sends_nothing(spool_dir, loki):
    """--dry-run counts the records without sending."""
    result = runner.invoke(app, ["replay", str(spool_dir), "--loki-url", loki.url, "--dry-run"])
    assert result.exit_code == 0
    assert "would send 30 records" in result.stderr
    assert loki.requests == []


def test_replay_reports_rejections_with_exit_1(tmp_path, loki):
    """Entries Loki rejects make the replay exit 1 with counts, and land in the dead-letter file."""
    directory = _fill(tmp_path / "old")
    loki.now_ns = lambda: (BASE + 8 * 24 * 3600) * 10**9  # every entry is now older than a week
    result = runner.invoke(app, ["replay", str(directory), "--loki-url", loki.url])
    assert result.exit_code == 1
    assert "rejected 30" in result.stderr
    assert list((directory / "dead-letter").glob("*.jsonl"))


@pytest.mark.slow
def test_replay_to_second_fluentforward_over_forward(spool_dir, tmp_path):
    """Replay to another fluentforward serve over Forward; a second run is de-duplicated by chunk id."""
    with ServerProcess(tmp_path / "target") as target:
        for _ in range(2):
            result = runner.invoke(
                app, ["replay", str(spool_dir), "--to", f"forward://127.0.0.1:{target.port}"]
            )
            assert result.exit_code == 0, result.output
    records = spool_records(tmp_path / "target")
    assert sorted(r["record"]["log"] for r in records) == sorted(f"r{i}" for i in range(30))
    assert {r["tag"] for r in records} == {"app.web", "app.db"}


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--to", "http://x:1"],
        ["--to", "forward://127.0.0.1:1", "--loki-url", "http://loki:3100"],
        ["--loki-url", "http://loki:3100", "--since", "soon"],
    ],
)
def test_replay_bad_arguments_exit_2(spool_dir, args):
    """Bad targets and times are one-line errors with exit code 2."""
    result = runner.invoke(app, ["replay", str(spool_dir), *args])
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1


def test_replay_progress_is_exported_as_metrics(spool_dir, loki):
    """A replay writes its progress into the spool directory; the server's /metrics exports it."""

    assert runner.invoke(app, ["replay", str(spool_dir), "--loki-url", loki.url]).exit_code == 0
    progress = read_progress(spool_dir)
    assert progress is not None
    assert progress["running"] is False
    assert progress["records"] == 30
    assert progress["delivered"] == 30

    class FakeSpool:  # only what the snapshot reads
        directory = spool_dir
        total_bytes = used_bytes = active_segment = fsync_count = 0
        is_full = False

        class settings:  # noqa: N801
            max_bytes = 1

        fsync_seconds = LatencyHistogram()

    state = ServerState(config=ServerConfig(), spool=FakeSpool())  # type: ignore[arg-type]
    text = render([({}, snapshot(AppState(state)))]).decode()
    assert "fluentforward_replay_records 30.0" in text
    assert "fluentforward_replay_running 0.0" in text


def test_replay_reads_the_spool_in_bounded_steps(tmp_path):
    """Replay reads frames in steps bounded by the shipper's round bounds, however many frames fit."""
    from fluentforward.pipeline import ROUND_RECORDS  # noqa: PLC0415
    from fluentforward.replay import scan_frames  # noqa: PLC0415

    per_frame = ROUND_RECORDS // 4
    entries = [[et(1_700_000_000), {"log": "x"}]] * per_frame
    frame = forward("app", entries)
    fill_spool(tmp_path / "spool", [("app", frame, per_frame)] * 10)
    groups = list(scan_frames(tmp_path / "spool", lambda _tag: True))
    assert [len(group) for group in groups] == [4, 4, 2]
    assert sum(f.header.record_count for group in groups for f in group) == 10 * per_frame


@pytest.mark.parametrize("fmt", ["protobuf", "json"])
def test_replay_in_either_loki_format(spool_dir, loki, fmt):
    """Protobuf replays send pre-encoded batches, JSON ones plain entries: the same entries arrive."""
    args = ["replay", str(spool_dir), "--loki-url", loki.url, "--line-format", "raw", "--loki-format", fmt]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sorted((e.line, e.structured_metadata["trace_id"]) for e in loki.entries()) == sorted(
        (f"r{i}", f"{i + 1:032x}") for i in range(30)
    )
    assert "delivered 30" in result.stderr
