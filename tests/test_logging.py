"""Log lines: one JSON object per line, written whole."""

from __future__ import annotations

import json
import sys

import structlog

from fluentforward._logging import configure_logging


class _Recorder:
    """A stand-in for stderr that keeps each write() call apart."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def test_each_log_line_is_one_write_with_its_newline(monkeypatch):
    """The server, its workers and its delivery processes share one stderr: a line written in two
    parts (event, then newline) lets another process's line in between, and a log shipper then sees
    two JSON objects on one line."""
    recorder = _Recorder()
    monkeypatch.setattr(sys, "stderr", recorder)
    configure_logging(json=True, level="info")  # conftest resets structlog after each test
    structlog.get_logger("test").info("shipper_started", lane=1)
    structlog.get_logger("test").warning("second", peer="127.0.0.1:1")
    assert len(recorder.writes) == 2
    for text in recorder.writes:
        assert text.endswith("\n")
        assert text.count("\n") == 1
        json.loads(text)
    assert json.loads(recorder.writes[0])["lane"] == 1
