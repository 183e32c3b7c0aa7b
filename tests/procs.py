"""Running ``fluentforward serve`` as a real subprocess for interop and crash tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Self

REPO = Path(__file__).resolve().parent.parent


class ServerProcess:
    """``fluentforward serve`` on 127.0.0.1 port 0; the bound port is read from its JSON log.

    One delivery lane (``tests/conftest.py`` pins ``FLUENTFORWARD_DELIVERY_PROCESSES=1`` in the
    environment) unless ``env`` or ``args`` say otherwise.
    """

    def __init__(self, spool_dir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.spool_dir = spool_dir
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.http_port: int | None = None
        self.log_lines: list[dict[str, Any]] = []
        self._log_path = spool_dir.parent / f"{spool_dir.name}.log"

    def start(self, timeout: float = 20.0) -> ServerProcess:
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = self._log_path.open("ab")
        offset = log_file.tell()
        self.port = 0  # a restart binds a new port: read it again from this run's log
        self.http_port = None
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fluentforward",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
                "--spool-dir",
                str(self.spool_dir),
                "--log-format",
                "json",
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            env=self.env,
            cwd=REPO,
        )
        log_file.close()
        try:
            return self._wait_until_listening(offset, timeout)
        except BaseException:  # no `with` block owns the process yet: never leave it running
            if self.proc.poll() is None:
                self.stop()
            raise

    def _wait_until_listening(self, offset: int, timeout: float) -> Self:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self._events(offset):
                if event.get("event") == "listening":
                    self.port = int(event["address"].rsplit(":", 1)[1])
                if event.get("event") == "http_listening":
                    self.http_port = int(event["port"])
            if self.port and self.http_port is not None:
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self._log_path.read_text()}")
            time.sleep(0.05)
        raise RuntimeError(f"server did not start: {self._log_path.read_text()}")

    def _events(self, offset: int = 0) -> list[dict[str, Any]]:
        out = []
        with self._log_path.open("rb") as f:
            f.seek(offset)
            for line in f.read().splitlines():
                if line.startswith(b"{"):
                    out.append(json.loads(line))
        return out

    def events(self) -> list[dict[str, Any]]:
        """Every JSON log event written so far (across restarts)."""
        return self._events()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()


def cli(
    *args: str, timeout: float = 60.0, env: dict[str, str | None] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m fluentforward ARGS`` and capture its output.

    ``env`` adds to the environment (where ``tests/conftest.py`` pins one delivery lane); a None value
    removes a variable.
    """
    merged = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "fluentforward", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        check=False,
        env={name: value for name, value in merged.items() if value is not None},
    )


def spool_records(spool_dir: Path) -> list[dict[str, Any]]:
    result = cli("spool", "cat", str(spool_dir))
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]
