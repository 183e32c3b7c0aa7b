"""--config TOML files, their precedence, check-config, and --workers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import msgpack
import pytest
from typer.testing import CliRunner

from fluentforward._cpus import auto_delivery_processes
from fluentforward.cli import app, config_default_map
from tests.helpers import forward
from tests.procs import REPO, cli

runner = CliRunner()


def check(args, env=None):
    env = env or {}
    default_map = config_default_map(args, env)
    return runner.invoke(app, ["check-config", *args], env=env, default_map=default_map)


def settings(output: str) -> dict[str, str]:
    return dict(line.split(" = ", 1) for line in output.splitlines() if " = " in line)


def test_config_file_sets_options(tmp_path):
    """Keys of the TOML file (option names with _) become the settings, lists included."""
    path = tmp_path / "ff.toml"
    path.write_text(
        'loki_url = "http://loki:3100"\nidle_timeout = "30s"\nmax_connections = 10\n'
        "label = [\"team=$kubernetes['labels']['team'] | none\"]\n"
    )
    result = check(["--config", str(path)])
    assert result.exit_code == 0, result.output
    values = settings(result.stdout)
    assert values["loki_url"] == '"http://loki:3100"'
    assert values["idle_timeout"] == '"30s"'
    assert values["max_connections"] == "10"
    assert values["label"] == "[\"team=$kubernetes['labels']['team'] | none\"]"


def test_precedence_flag_over_env_over_file(tmp_path):
    """Flags win over FLUENTFORWARD_* variables, which win over the file, which wins over defaults."""
    path = tmp_path / "ff.toml"
    path.write_text('idle_timeout = "30s"\ntag_prefix = "file."\nmax_tag_bytes = 100\n')
    env = {"FLUENTFORWARD_IDLE_TIMEOUT": "40s", "FLUENTFORWARD_TAG_PREFIX": "env."}
    result = check(["--config", str(path), "--tag-prefix", "flag."], env=env)
    values = settings(result.stdout)
    assert values["tag_prefix"] == '"flag."'
    assert values["idle_timeout"] == '"40s"'
    assert values["max_tag_bytes"] == "100"
    assert values["max_connections"] == "1024"


def test_config_from_env_variable(tmp_path):
    """FLUENTFORWARD_CONFIG names the file (the Helm chart's way)."""
    path = tmp_path / "ff.toml"
    path.write_text('cluster = "prod"\n')
    result = check([], env={"FLUENTFORWARD_CONFIG": str(path)})
    assert settings(result.stdout)["cluster"] == '"prod"'


def test_secrets_are_redacted(tmp_path):
    """check-config never prints the shared key or passwords."""
    result = check(["--shared-key", "s3cr3t-value", "--user", "alice:pw-secret"])
    assert result.exit_code == 0, result.output
    assert "s3cr3t-value" not in result.stdout
    assert "pw-secret" not in result.stdout
    assert 'shared_key = "<redacted>"' in result.stdout
    assert "alice:<redacted>" in result.stdout


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("no_such_setting = 1\n", "unknown setting 'no_such_setting'"),
        ("listen = \n", "not valid TOML"),
        ('listen = "nope"\n', "--listen: expected HOST:PORT"),
        ('loki_url = "ftp://x"\n', "loki"),
        ('label = ["trace=$trace_id"]\n', "trace"),
        ("delivery_processes = 0\n", "--delivery-processes: must be 1 to 16, got 0"),
        ('delivery_processes = "auto2"\n', "--delivery-processes: expected auto or a number from 1 to 16"),
        ("delivery_processes = 2.5\n", "--delivery-processes: expected auto or a number from 1 to 16"),
    ],
)
def test_bad_config_exits_2(tmp_path, content, message):
    """A bad file or value is one line on stderr and exit code 2 (the suite's lane pin removed, so
    the file's delivery_processes counts)."""
    path = tmp_path / "bad.toml"
    path.write_text(content)
    result = cli("check-config", "--config", str(path), env={"FLUENTFORWARD_DELIVERY_PROCESSES": None})
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("content", "shown"), [("delivery_processes = 2\n", "2"), ('delivery_processes = "3"\n', "3")]
)
def test_delivery_processes_from_the_file(tmp_path, content, shown):
    """The file's delivery_processes, a number or its text, is used (the suite's pin removed)."""
    path = tmp_path / "ff.toml"
    path.write_text(content)
    result = check(["--config", str(path)], env={"FLUENTFORWARD_DELIVERY_PROCESSES": None})
    assert result.exit_code == 0, result.output
    assert settings(result.stdout)["delivery_processes"] == shown


def test_delivery_processes_auto_from_the_file(tmp_path):
    """delivery_processes = "auto" shows as the number it resolves to here."""
    path = tmp_path / "ff.toml"
    path.write_text('delivery_processes = "auto"\n')
    result = check(["--config", str(path)], env={"FLUENTFORWARD_DELIVERY_PROCESSES": None})
    assert result.exit_code == 0, result.output
    assert settings(result.stdout)["delivery_processes"] == str(auto_delivery_processes().processes)


def test_missing_config_file_exits_2(tmp_path):
    """A config path that does not exist is exit 2."""
    result = cli("serve", "--config", str(tmp_path / "missing.toml"))
    assert result.returncode == 2
    assert "missing.toml" in result.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:  # noqa: S310
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


@pytest.mark.slow
def test_workers_share_the_port_with_a_spool_each(tmp_path):
    """--workers 2: two processes accept on one port, each spools under worker-<i>, the parent reports both."""
    port, http_port = _free_port(), _free_port()
    spool = tmp_path / "spool"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fluentforward",
            "serve",
            "--workers",
            "2",
            "--listen",
            f"127.0.0.1:{port}",
            "--http-listen",
            f"127.0.0.1:{http_port}",
            "--spool-dir",
            str(spool),
            "--log-format",
            "json",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ},
    )
    try:
        deadline = time.monotonic() + 30
        while _get(http_port, "/readyz")[0] != 200:
            assert time.monotonic() < deadline, "workers did not become ready"
            assert proc.poll() is None
            time.sleep(0.2)
        for i in range(40):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(forward("w", [[1, {"n": i}]], {"chunk": f"c{i}"}))
                assert msgpack.unpackb(sock.recv(100)) == {"ack": f"c{i}"}
        time.sleep(1.5)  # a snapshot interval
        status, metrics = _get(http_port, "/metrics")
        assert status == 200
        assert 'worker="0"' in metrics
        assert 'worker="1"' in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert sorted(p.name for p in spool.iterdir() if p.is_dir()) == ["worker-0", "worker-1"]
    rows = [json.loads(line) for line in cli("spool", "cat", str(spool)).stdout.splitlines()]
    assert sorted(r["record"]["n"] for r in rows) == list(range(40))
    per_worker = [len(cli("spool", "cat", str(spool / f"worker-{i}")).stdout.splitlines()) for i in range(2)]
    assert all(count > 0 for count in per_worker), per_worker
    listing = cli("spool", "ls", str(spool)).stdout
    assert "worker-0/" in listing
    assert "worker-1/" in listing
