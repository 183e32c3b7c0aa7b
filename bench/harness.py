"""Process plumbing shared by ``bench.run`` and ``bench.soak``: start receivers, read the OS's figures.

Every receiver runs in its own process so the OS accounts its CPU and memory apart from the load
generator's and the Loki sink's. Figures come from ``/proc`` (Linux), not from psutil:

* CPU: ``utime + stime`` of the receiver and of every live descendant (``--workers``), plus
  ``cutime + cstime`` (children already reaped), in ``SC_CLK_TCK`` ticks (10 ms): over a window of
  several seconds that is well under 1 % of the total.
* Memory: ``VmRSS`` (now) and ``VmHWM`` (peak since start) from ``/proc/<pid>/status``, summed over
  the process tree.

Invariants: every process started here is stopped by its ``Child.stop`` (SIGTERM, then SIGKILL after a
bound), temporary spool directories are removed, and no wait is unbounded.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import attrs
import msgpack
import orjson
import trio

from fluentforward import __version__

__all__ = [
    "Capabilities",
    "Child",
    "capabilities",
    "finish_loadgen",
    "free_port",
    "machine_info",
    "read_json_url",
    "server_command",
    "start_floor",
    "start_loadgen",
    "start_lokisink",
    "start_server",
    "tree_cpu_seconds",
    "tree_memory_mb",
    "workdir",
]

CLK_TCK = os.sysconf("SC_CLK_TCK")
# A receiver that has not bound its port after this long is broken, not slow.
START_TIMEOUT = 30.0
# SIGTERM gives the server its shutdown grace (2 s: a benchmark has nothing left to save once its window
# closed); after STOP_TIMEOUT it is killed.
STOP_TIMEOUT = 20.0
SERVER_SHUTDOWN_GRACE = "2s"
# Lines of a child's stderr kept for the report when something went wrong.
STDERR_TAIL_LINES = 8


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    return text[text.rindex(")") + 2 :].split()


def _children_map() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))) is not None:
            tree.setdefault(int(fields[1]), []).append(int(entry.name))
    return tree


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants."""
    tree = _children_map()
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(tree.get(current, ()))
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid``, its live descendants and reaped children."""
    ticks = 0
    for member in process_tree(pid):
        fields = _stat_fields(member)
        if fields is not None:
            # After the name: state ppid ... utime(14) stime(15) cutime(16) cstime(17), 1-based overall.
            ticks += sum(int(v) for v in fields[11:15])
    return ticks / CLK_TCK


DELIVERY_MODULE = b"fluentforward.delivery"


def _is_delivery(pid: int) -> bool:
    try:
        return DELIVERY_MODULE in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def tree_cpu_by_role(pid: int) -> dict[str, float]:
    """CPU seconds of ``pid``'s tree split into ``deliver`` (``fluentforward.delivery`` child processes,
    with their own reaped children) and ``receive`` (everything else: the server, its workers)."""
    ticks = {"receive": 0, "deliver": 0}
    for member in process_tree(pid):
        fields = _stat_fields(member)
        if fields is not None:
            ticks["deliver" if _is_delivery(member) else "receive"] += sum(int(v) for v in fields[11:15])
    return {role: count / CLK_TCK for role, count in ticks.items()}


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_memory_mb(pid: int) -> dict[str, float]:
    """``rss`` (now) and ``hwm`` (peak of each process, summed) of the tree in MiB; ``processes``."""
    members = process_tree(pid)
    return {
        "rss": sum(_status_kb(p, "VmRSS") for p in members) / 1024,
        "hwm": sum(_status_kb(p, "VmHWM") for p in members) / 1024,
        "processes": len(members),
    }


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the receiver binds it next; a race is unlikely)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@attrs.define
class Child:
    """A started process with its stderr in a file; ``port`` is where it listens."""

    name: str
    process: subprocess.Popen[str]
    stderr_path: Path
    port: int = 0
    cleanup: list[Path] = attrs.field(factory=list)

    @property
    def pid(self) -> int:
        """The process id."""
        return self.process.pid

    def stderr_tail(self, lines: int = STDERR_TAIL_LINES) -> list[str]:
        """The last lines the process wrote to stderr."""
        try:
            return self.stderr_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return []

    def stop(self) -> int | None:
        """SIGTERM, wait (bounded), SIGKILL if needed; remove its temporary directories. Returns the exit code."""
        code = self.process.poll()
        if code is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                code = self.process.wait(STOP_TIMEOUT)
        if self.process.stdout is not None:
            self.process.stdout.close()
        for path in self.cleanup:
            shutil.rmtree(path, ignore_errors=True)
        return code


def _spawn(name: str, cmd: Sequence[str], workdir: Path, *, stdout: bool) -> Child:
    stderr_path = workdir / f"{name}.stderr"
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            list(cmd),
            stdout=subprocess.PIPE if stdout else subprocess.DEVNULL,
            stderr=stderr,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"},
        )
    return Child(name=name, process=process, stderr_path=stderr_path)


def _read_listening(child: Child) -> int:
    """Read the ``LISTENING <port>`` line a bench helper prints once bound."""
    stream: TextIO | None = child.process.stdout
    assert stream is not None
    line = stream.readline()  # the helpers print it within a second; a crash closes stdout (EOF)
    if not line.startswith("LISTENING "):
        child.stop()
        raise RuntimeError(f"{child.name} did not start: {' | '.join(child.stderr_tail())}")
    return int(line.split()[1])


def start_floor(workdir: Path) -> Child:
    """Start ``bench.floor`` on a free port."""
    child = _spawn("floor", [sys.executable, "-m", "bench.floor"], workdir, stdout=True)
    child.port = _read_listening(child)
    return child


def start_lokisink(workdir: Path) -> Child:
    """Start ``bench.lokisink`` on a free port."""
    child = _spawn("lokisink", [sys.executable, "-m", "bench.lokisink"], workdir, stdout=True)
    child.port = _read_listening(child)
    return child


@attrs.frozen(kw_only=True)
class Capabilities:
    """Which optional ``fluentforward serve`` options this checkout has."""

    loki: bool
    workers: bool


def capabilities() -> Capabilities:
    """Read ``fluentforward serve --help`` to see whether ``--loki-url`` and ``--workers`` exist."""
    out = subprocess.run(
        [sys.executable, "-m", "fluentforward", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "250", "TERM": "dumb", "NO_COLOR": "1"},
        check=False,
    ).stdout
    return Capabilities(
        loki=re.search(r"--loki-url\b", out) is not None,
        workers=re.search(r"--workers\b", out) is not None,
    )


def server_command(
    port: int,
    spool_dir: Path,
    *,
    loki_url: str | None = None,
    workers: int = 1,
    spool_max_bytes: int | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The ``fluentforward serve`` command line for a benchmark run (durable spool: fsync per ack)."""
    cmd = [
        sys.executable,
        "-m",
        "fluentforward",
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--spool-dir",
        str(spool_dir),
        "--spool-fsync-interval",
        "0",
        "--http-listen",
        "off",
        "--no-udp-heartbeat",
        "--log-level",
        "warning",
        "--log-format",
        "json",
        "--shutdown-grace",
        SERVER_SHUTDOWN_GRACE,
    ]
    if spool_max_bytes is not None:
        cmd += ["--spool-max-bytes", str(spool_max_bytes)]
    if loki_url is not None:
        # One delivery lane (the default, auto, follows the CPUs): a scenario that wants more passes its
        # own --delivery-processes in `extra`, which comes later and wins.
        cmd += ["--loki-url", loki_url, "--delivery-processes", "1"]
    if workers != 1:
        cmd += ["--workers", str(workers)]
    cmd += list(extra)
    return cmd


def _wait_for_port(child: Child, port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if child.process.poll() is not None:
            break
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    child.stop()
    raise RuntimeError(f"fluentforward serve did not start: {' | '.join(child.stderr_tail())}")


def start_server(
    workdir: Path,
    *,
    loki_url: str | None = None,
    workers: int = 1,
    spool_parent: Path | None = None,
    extra: Sequence[str] = (),
) -> Child:
    """Start ``fluentforward serve`` with a fresh spool directory (removed by ``stop``).

    Without Loki shipping nothing ever frees the spool, so its cap is set to half the free disk space
    (at most 64 GiB): the cap must not throttle a benchmark, and the disk must not fill up.
    """
    spool_dir = Path(tempfile.mkdtemp(prefix="ffbench-spool-", dir=spool_parent))
    max_bytes = min(shutil.disk_usage(spool_dir).free // 2, 64 << 30)
    port = free_port()
    cmd = server_command(
        port, spool_dir, loki_url=loki_url, workers=workers, spool_max_bytes=max_bytes, extra=extra
    )
    child = _spawn("server", cmd, workdir, stdout=False)
    child.port = port
    child.cleanup.append(spool_dir)
    _wait_for_port(child, port)
    return child


def start_loadgen(workdir: Path, port: int, args: Sequence[str]) -> tuple[Child, float]:
    """Start ``bench.loadgen`` against ``port``; wait until its frames are built. Returns its READY time.

    ``args`` are further loadgen options (``--connections 8 --rate 50000``...).
    """
    cmd = [sys.executable, "-m", "bench.loadgen", "--port", str(port), *args]
    child = _spawn("loadgen", cmd, workdir, stdout=True)
    stream = child.process.stdout
    assert stream is not None
    line = stream.readline()  # frames are built first: a few seconds for 2 MB frames
    if not line.startswith("READY "):
        child.stop()
        raise RuntimeError(f"loadgen did not start: {' | '.join(child.stderr_tail())}")
    return child, float(line.split()[1])


def finish_loadgen(child: Child) -> dict[str, Any]:
    """Wait for the loadgen to finish (it bounds its own run) and return its JSON report."""
    stream = child.process.stdout
    assert stream is not None
    out = stream.read()
    child.stop()
    lines = out.strip().splitlines()
    if not lines:
        raise RuntimeError(f"loadgen failed: {' | '.join(child.stderr_tail())}")
    report: dict[str, Any] = orjson.loads(lines[-1])
    return report


def read_json_url(url: str, timeout: float = 5.0) -> Any:
    """GET ``url`` and decode its JSON body."""
    with urllib.request.urlopen(url, timeout=timeout) as response:  # local sink only
        return orjson.loads(response.read())


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=False).stdout
    except OSError:
        return ""


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mem_total_gib() -> float:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    return 0.0


def machine_info() -> dict[str, Any]:
    """The machine, for the report: CPUs, CPU model, RAM, kernel, Python, versions."""
    return {
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "ram_gib": round(_mem_total_gib(), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "fluentforward": __version__,
        "msgpack": ".".join(str(v) for v in msgpack.version),
        "trio": trio.__version__,
        "commit": _git("rev-parse", "--short", "HEAD").strip(),
        # Uncommitted changes to the package: the figures describe the working tree, not the commit.
        "dirty": bool(_git("status", "--porcelain", "--", "fluentforward").strip()),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    """A temporary directory for children's stderr files, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="ffbench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
