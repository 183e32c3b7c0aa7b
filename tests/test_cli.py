"""The command line: bad input exits 2 with one line; spool ls, verify and cat."""

from __future__ import annotations

import json
import socket

import pytest
from typer.testing import CliRunner

import fluentforward.config
from fluentforward._cpus import AutoDeliveryProcesses, CpuBudget, auto_delivery_processes
from fluentforward.cli import app
from fluentforward.spool import segment_path
from tests.fakeloki import FakeLoki
from tests.helpers import capture, et, fill_spool, forward, message, pack
from tests.procs import ServerProcess, cli

runner = CliRunner()


def _store(directory, frames):
    fill_spool(directory, frames, recv_time_ns=1_795_680_000 * 10**9)


@pytest.fixture
def spool_dir(tmp_path):
    directory = tmp_path / "spool"
    _store(
        directory,
        [
            (
                "app.a",
                forward(
                    "app.a", [[et(1_795_680_000), {"trace_id": "4BF92F3577B34DA6A3CE929D0E0E4736", "n": 1}]]
                ),
                1,
            ),
            ("app.b", forward("app.b", [[et(1_795_680_100), {"n": 2}], [et(1_795_680_200), {"n": 3}]]), 2),
            ("other", message("other", 1_795_680_300, {"n": 4}), 1),
        ],
    )
    return directory


def _cat(*args):
    result = runner.invoke(app, ["spool", "cat", *args])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_spool_cat_prints_every_record(spool_dir):
    """spool cat prints one JSON object per record with the documented keys."""
    rows = _cat(str(spool_dir))
    assert [r["record"]["n"] for r in rows] == [1, 2, 3, 4]
    assert set(rows[0]) >= {"tag", "time_ns", "record", "metadata", "trace_id", "span_id"}
    assert rows[0]["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert rows[1]["trace_id"] is None


def test_spool_cat_filters(spool_dir):
    """--tag, --since and --until select records."""
    assert [r["record"]["n"] for r in _cat(str(spool_dir), "--tag", "app.*")] == [1, 2, 3]
    assert [
        r["record"]["n"] for r in _cat(str(spool_dir), "--since", "1795680100", "--until", "1795680300")
    ] == [2, 3]
    assert [r["record"]["n"] for r in _cat(str(spool_dir), "--since", "2026-11-26T08:03:00Z")] == [3, 4]


def test_spool_ls(spool_dir):
    """spool ls counts frames, records and bytes per segment."""
    result = runner.invoke(app, ["spool", "ls", str(spool_dir), "--json"])
    assert result.exit_code == 0
    (row,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert row["frames"] == 3
    assert row["records"] == 4


def test_spool_verify_ok_and_corrupt(spool_dir):
    """spool verify passes a good spool and exits 1 naming the first corrupt place."""
    ok = runner.invoke(app, ["spool", "verify", str(spool_dir)])
    assert ok.exit_code == 0
    assert "3 frames" in ok.stdout
    seg = segment_path(spool_dir, 1)
    data = bytearray(seg.read_bytes())
    data[-3] ^= 0x55
    seg.write_bytes(bytes(data))
    bad = runner.invoke(app, ["spool", "verify", str(spool_dir)])
    assert bad.exit_code == 1
    assert f"{seg}@" in bad.stderr
    assert "checksum mismatch" in bad.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "--listen", "nonsense"], "--listen: expected HOST:PORT"),
        (["serve", "--spool-max-bytes", "lots"], "--spool-max-bytes: expected a size"),
        (["serve", "--idle-timeout", "0"], "--idle-timeout: must be positive"),
        (["serve", "--log-level", "loud"], "--log-level"),
        (["serve", "--listen", "127.0.0.1:99999"], "out of range"),
        (["spool", "cat", "/nonexistent/dir"], "not a spool directory"),
        (["spool", "cat", ".", "--since", "yesterday-ish"], None),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, args, message):
    """Bad options and arguments give exit code 2 and a one-line message, never a traceback."""
    result = runner.invoke(
        app, [*args, *(["--spool-dir", str(tmp_path / "s")] if args[0] == "serve" else [])]
    )
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    if message:
        assert message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_unknown_option_exits_2():
    """An unknown option is a usage error (exit 2)."""
    result = runner.invoke(app, ["serve", "--no-such-option"])
    assert result.exit_code == 2


def test_spool_dir_that_is_a_file(tmp_path):
    """A spool directory that is a file is refused with exit 2."""
    path = tmp_path / "f"
    path.write_text("x")
    result = runner.invoke(app, ["serve", "--spool-dir", str(path)])
    assert result.exit_code == 2
    assert "not a directory" in result.stderr


def test_port_in_use(tmp_path):
    """A listen port already in use is exit 2 with a clear message."""
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    try:
        result = runner.invoke(
            app,
            [
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                "--spool-dir",
                str(tmp_path / "s"),
                "--http-listen",
                "off",
            ],
        )
    finally:
        blocker.close()
    assert result.exit_code == 2
    assert "address already in use" in result.stderr


def test_env_vars_configure_options(tmp_path):
    """Every option can come from FLUENTFORWARD_<OPTION>."""
    result = runner.invoke(
        app,
        ["serve", "--spool-dir", str(tmp_path / "s")],
        env={"FLUENTFORWARD_MAX_FRAME_BYTES": "tiny"},
    )
    assert result.exit_code == 2
    assert "--max-frame-bytes" in result.stderr


def test_version():
    """--version prints the version."""
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.startswith("fluentforward ")


def test_capture_data_is_loadable():
    """Test data is present in the repository (the suite runs from a plain clone)."""
    assert capture("default.bin")
    assert pack(1)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "--delivery-processes: must be 1 to 16, got 0"),
        ("17", "--delivery-processes: must be 1 to 16, got 17"),
        ("abc", "--delivery-processes: expected auto or a number from 1 to 16, got 'abc'"),
        ("auto2", "--delivery-processes: expected auto or a number from 1 to 16, got 'auto2'"),
    ],
)
@pytest.mark.parametrize("where", ["flag", "env"])
def test_delivery_processes_out_of_range_exits_2(tmp_path, value, message, where):
    """A bad --delivery-processes (or FLUENTFORWARD_DELIVERY_PROCESSES) is one line and exit 2."""
    args = ["serve", "--spool-dir", str(tmp_path / "s"), "--loki-url", "http://x"]
    if where == "flag":
        result = runner.invoke(app, [*args, "--delivery-processes", value])
    else:
        result = runner.invoke(app, args, env={"FLUENTFORWARD_DELIVERY_PROCESSES": value})
    assert result.exit_code == 2
    assert result.stderr.strip() == f"fluentforward: {message}"


def _effective(*args, env=None):
    result = runner.invoke(app, ["check-config", "--loki-url", "http://x", *args], env=env)
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()


def test_check_config_shows_auto_resolved(monkeypatch):
    """The default is auto; check-config prints the number it resolved to, and why, as a comment."""
    fake = AutoDeliveryProcesses(
        processes=3, budget=CpuBudget(cpus=3.5, affinity=8, quota=3.5, quota_source="cgroup-v2"), capped=False
    )
    monkeypatch.setattr(fluentforward.config, "auto_delivery_processes", lambda **_: fake)
    lines = _effective(env={"FLUENTFORWARD_DELIVERY_PROCESSES": None})  # the default
    at = lines.index("delivery_processes = 3")
    assert lines[at - 1] == "# delivery_processes: auto: 3.5 CPUs usable (affinity 8, cgroup-v2 quota 3.5)"
    assert "delivery_processes = 3" in _effective("--delivery-processes", "auto")
    numbered = _effective("--delivery-processes", "2")
    assert "delivery_processes = 2" in numbered
    assert not any(line.startswith("# delivery_processes") for line in numbered)


def test_check_config_resolves_auto_on_this_machine():
    """End to end, a subprocess: `check-config` with the default prints what detection finds here."""
    expected = auto_delivery_processes().processes
    result = cli("check-config", "--loki-url", "http://x", env={"FLUENTFORWARD_DELIVERY_PROCESSES": None})
    assert result.returncode == 0, result.stderr
    assert f"delivery_processes = {expected}" in result.stdout.splitlines()
    assert "# delivery_processes: auto: " in result.stdout


@pytest.mark.slow
def test_serve_starts_auto_lanes_and_logs_why(tmp_path):
    """`serve` with auto logs the resolved number and its reason once and starts that many children."""
    expected = auto_delivery_processes()
    with (
        FakeLoki() as loki,
        ServerProcess(
            tmp_path / "spool", "--loki-url", loki.url, env={"FLUENTFORWARD_DELIVERY_PROCESSES": "auto"}
        ) as server,
    ):
        events = server.events()
        assert server.stop() == 0
    [resolved] = [e for e in events if e["event"] == "delivery_lanes"]
    assert resolved["delivery_processes"] == expected.processes
    assert resolved["source"] == "auto"
    assert resolved["cpus"] == expected.budget.cpus
    assert resolved["quota"] == expected.budget.quota_source
    started = [e.get("lane", 0) for e in events if e["event"] == "delivery_process_started"]
    assert sorted(started) == list(range(expected.processes))


@pytest.mark.slow
def test_serve_pins_one_lane_in_tests(tmp_path):
    """The test helpers pin one lane; the log says it came from the option."""
    with FakeLoki() as loki, ServerProcess(tmp_path / "spool", "--loki-url", loki.url) as server:
        events = server.events()
        assert server.stop() == 0
    [resolved] = [e for e in events if e["event"] == "delivery_lanes"]
    assert resolved == {**resolved, "delivery_processes": 1, "source": "option"}
    assert len([e for e in events if e["event"] == "delivery_process_started"]) == 1
