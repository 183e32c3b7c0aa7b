"""``fluentforward send`` against a real ``fluentforward serve``: every mode delivers; bad input exits 2.

The server is a subprocess (one per module); ``send`` runs in-process through typer's runner, except
one test that pipes standard input into the real console command.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from fluentforward.cli import app
from tests.interop import delivered, running_server, spool_cat
from tests.procs import REPO

pytestmark = pytest.mark.slow

runner = CliRunner()

T0 = 1_795_680_000  # 2026-11-26T08:00:00Z

# (JSON line as sent with --time-key ts, expected time_ns, record as spool cat prints it)
LINES = [
    ({"ts": T0, "log": "first", "n": 1}, T0 * 10**9, {"log": "first", "n": 1}),
    (
        {"ts": T0 + 1.5, "msg": "héllo ✓ 日本語 🚀", "nested": {"a": {"b": [1, None, True, 2.5]}}},
        (T0 + 1) * 10**9 + 500_000_000,
        {"msg": "héllo ✓ 日本語 🚀", "nested": {"a": {"b": [1, None, True, 2.5]}}},
    ),
    (
        {"ts": "2026-11-26T08:00:02.25Z", "ключ": "значение"},
        (T0 + 2) * 10**9 + 250_000_000,
        {"ключ": "значение"},
    ),
]

# (--mode, --compression): every carrier the client can produce.
MODES = [
    ("message", "gzip"),
    ("forward", "gzip"),
    ("packed", "gzip"),
    ("compressed", "gzip"),
    ("compressed", "zstd"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("cli-send")) as proc:
        yield proc


def _jsonl(tmp_path, objects, extra=""):
    path = tmp_path / "records.jsonl"
    path.write_text(
        "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objects) + extra, encoding="utf-8"
    )
    return path


def send(server_or_port, *args, source=None, stdin=None):
    """Invoke ``fluentforward send 127.0.0.1:PORT [SOURCE] ARGS`` in-process."""
    port = server_or_port if isinstance(server_or_port, int) else server_or_port.port
    argv = ["send", f"127.0.0.1:{port}", *([str(source)] if source is not None else []), *args]
    return runner.invoke(app, argv, input=stdin)


def _rows(server, tag, count, ack):
    # With --ack, send returned only after every ack, so the records are already spooled.
    return spool_cat(server.spool_dir, tag) if ack else delivered(server.spool_dir, tag, count)


@pytest.mark.parametrize("ack", [False, True], ids=["no-ack", "ack"])
@pytest.mark.parametrize(("mode", "compression"), MODES, ids=[f"{m}-{c}" for m, c in MODES])
def test_every_mode_delivers(server, tmp_path, mode, compression, ack):
    """Each --mode (and compression), with or without --ack, delivers every JSON line with its --time-key time."""
    tag = f"cli.{mode}.{compression}.{'ack' if ack else 'noack'}"
    # A blank line in the input is skipped, not an error.
    source = _jsonl(tmp_path, [sent for sent, _, _ in LINES], extra="\n")
    args = ["--tag", tag, "--mode", mode, "--compression", compression, "--time-key", "ts"]
    result = send(server, *args, *(["--ack"] if ack else []), source=source)
    assert result.exit_code == 0, result.output
    frames = len(LINES) if mode == "message" else 1
    assert result.stderr.strip() == f"sent {len(LINES)} records in {frames} frames" + (
        " (all acked)" if ack else ""
    )
    rows = _rows(server, tag, len(LINES), ack)
    assert [(row["tag"], row["time_ns"], row["record"]) for row in rows] == [
        (tag, time_ns, printed) for _, time_ns, printed in LINES
    ]


def test_batch_splits_frames(server, tmp_path):
    """--batch N cuts the input into frames of at most N records, each acked."""
    count = 2500
    source = _jsonl(tmp_path, [{"seq": i} for i in range(count)])
    result = send(server, "--tag", "cli.batch", "--batch", "1000", "--ack", source=source)
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == f"sent {count} records in 3 frames (all acked)"
    assert [row["record"] for row in spool_cat(server.spool_dir, "cli.batch")] == [
        {"seq": i} for i in range(count)
    ]


def test_time_key_formats_and_missing_time(server, tmp_path):
    """--time-key reads Unix seconds and RFC 3339 (offset or UTC when none), drops the field; records without it get now."""
    lines = [
        {"ts": "2026-11-26T10:00:03+02:00", "n": 3},
        {"ts": "2026-11-26T08:00:04", "n": 4},
        {"ts": T0 + 5, "n": 5},
        {"n": 6},
    ]
    before = time.time_ns()
    result = send(server, "--tag", "cli.time", "--time-key", "ts", "--ack", source=_jsonl(tmp_path, lines))
    after = time.time_ns()
    assert result.exit_code == 0, result.output
    rows = spool_cat(server.spool_dir, "cli.time")
    assert [row["record"] for row in rows] == [{"n": n} for n in (3, 4, 5, 6)]
    assert [row["time_ns"] for row in rows[:3]] == [(T0 + s) * 10**9 for s in (3, 4, 5)]
    assert before <= rows[3]["time_ns"] <= after


def test_without_time_key_the_field_stays_and_time_is_now(server, tmp_path):
    """Without --time-key a time-like field is ordinary data and the event is stamped with the current time."""
    before = time.time_ns()
    result = send(server, "--tag", "cli.notime", "--ack", source=_jsonl(tmp_path, [{"ts": T0, "n": 1}]))
    after = time.time_ns()
    assert result.exit_code == 0, result.output
    (row,) = spool_cat(server.spool_dir, "cli.notime")
    assert row["record"] == {"ts": T0, "n": 1}
    assert before <= row["time_ns"] <= after


def test_console_command_reads_standard_input(server):
    """The installed command with source - sends what is piped into it, acked."""
    lines = "".join(json.dumps({"seq": i, "msg": "ü"}) + "\n" for i in range(3))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fluentforward",
            "send",
            f"127.0.0.1:{server.port}",
            "-",
            "--tag",
            "cli.stdin",
            "--ack",
        ],
        input=lines,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "sent 3 records in 1 frames (all acked)"
    assert [row["record"] for row in spool_cat(server.spool_dir, "cli.stdin")] == [
        {"seq": i, "msg": "ü"} for i in range(3)
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"n": 1}\n{"n": 2}\n{not json\n', "line 3: invalid JSON"),
        ('{"n": 1}\n[1, 2]\n', "line 2: expected a JSON object, got list"),
        ('\n{"ts": "yesterday"}\n', "line 2: field 'ts'"),
        ('{"ts": true}\n', "line 1: field 'ts'"),
    ],
    ids=["invalid-json", "not-an-object", "bad-time-text", "bool-time"],
)
def test_bad_input_line_exits_2_naming_the_line(server, text, message):
    """A line that is not a usable JSON object stops send with exit 2 and one line naming it."""
    result = send(server, "--tag", "cli.bad", "--time-key", "ts", "-", stdin=text)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert message in result.stderr


def test_unreachable_server_exits_2_with_one_line(tmp_path):
    """Sending to a port nobody listens on exits 2 with one line, never a traceback."""
    # Bound but not listening: connecting is refused, and nobody else can take the port meanwhile.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        result = send(port, "--timeout", "5s", source=_jsonl(tmp_path, [{"n": 1}]))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("fluentforward: ")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mode", "bulk"], "--mode: expected one of message, forward, packed, compressed"),
        (["--batch", "0"], "--batch: must be at least 1"),
        (["--timeout", "soon"], "--timeout"),
    ],
)
def test_bad_options_exit_2(tmp_path, args, message):
    """Bad --mode, --batch or --timeout values exit 2 with one line before connecting."""
    result = send(9, *args, source=_jsonl(tmp_path, [{"n": 1}]))
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert message in result.stderr
