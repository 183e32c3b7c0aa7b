"""Interop tests: real Forward clients against a real ``fluentforward serve`` subprocess.

Helpers shared by the interop modules and ``tests/test_cli_send.py``. What a test checks is what
``fluentforward spool cat`` prints (run in-process with typer's runner: the same command without
another second of interpreter start-up). Invariants: every wait is bounded by ``DELIVERY_TIMEOUT``;
a server started by :func:`running_server` must log no warning or error and exit 0, so a client
the server merely tolerated (a protocol error, a dropped connection) still fails the module.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from fluentforward.cli import app
from tests.procs import ServerProcess

# Clients that do not wait for acks return before the server has read their bytes. A healthy run
# needs well under a second; this is generous for a loaded 2-core CI machine.
DELIVERY_TIMEOUT = 10.0
# spool cat in-process over a few records takes milliseconds; polling faster gains nothing.
POLL_INTERVAL = 0.05
# Server log levels that mean a client was not served cleanly.
COMPLAINT_LEVELS = frozenset({"warning", "error", "critical"})

_runner = CliRunner()


@contextlib.contextmanager
def running_server(directory: Path) -> Iterator[ServerProcess]:
    """Run ``fluentforward serve`` with its spool under ``directory``; fail if it complained.

    Raises:
        AssertionError: on exit, when the server logged a warning or error or did not exit 0.
    """
    server = ServerProcess(directory / "spool").start()
    try:
        yield server
    finally:
        code = server.stop()
    complaints = [event for event in server.events() if event.get("level") in COMPLAINT_LEVELS]
    assert complaints == [], f"the server complained: {complaints}"
    assert code == 0, f"the server exited with {code}"


def spool_cat(spool_dir: Path, tag_glob: str) -> list[dict[str, Any]]:
    """The records ``fluentforward spool cat --tag TAG_GLOB`` prints, parsed."""
    result = _runner.invoke(app, ["spool", "cat", str(spool_dir), "--tag", tag_glob])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def delivered(spool_dir: Path, tag_glob: str, count: int) -> list[dict[str, Any]]:
    """Wait until ``spool cat`` shows at least ``count`` records matching ``tag_glob``, and return them.

    Returns what is there after ``DELIVERY_TIMEOUT`` even when it is fewer, so the caller's
    comparison shows what is missing.
    """
    deadline = time.monotonic() + DELIVERY_TIMEOUT
    while True:
        rows = spool_cat(spool_dir, tag_glob)
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(POLL_INTERVAL)


def by_tag(rows: Iterable[dict[str, Any]]) -> dict[str, list[tuple[int, Any]]]:
    """Group ``spool cat`` rows as {tag: [(time_ns, record), ...]} in spool order.

    Clients batch per tag (a PackedForward frame holds one tag), so only the order within a tag is
    something a client promises.
    """
    out: dict[str, list[tuple[int, Any]]] = {}
    for row in rows:
        out.setdefault(row["tag"], []).append((row["time_ns"], row["record"]))
    return out
