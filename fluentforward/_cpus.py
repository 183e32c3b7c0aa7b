"""How many CPUs this process may use, and so how many delivery lanes ``--delivery-processes auto`` runs.

The CPUs a process may use are the fewer of the CPUs it may be scheduled on (its affinity mask, which
``taskset``, ``docker --cpuset-cpus`` and Kubernetes' static CPU manager narrow) and its cgroup's CPU
quota (``docker --cpus``; in Kubernetes a container's ``resources.limits.cpu``): cgroup v2
``cpu.max`` ("max 100000" = no quota, "150000 100000" = 1.5 CPUs), or cgroup v1
``cpu/cpu.cfs_quota_us`` over ``cpu/cpu.cfs_period_us`` (-1 = no quota). Only the files at the root of
``/sys/fs/cgroup`` are read: inside a container that is the container's own cgroup.

Detection never raises: a missing, unreadable or malformed file means "no quota known" and the
affinity count stands. The readers are arguments, so tests feed fake files.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import attrs

__all__ = [
    "AUTO_MAX_DELIVERY_PROCESSES",
    "CGROUP_ROOT",
    "AutoDeliveryProcesses",
    "CpuBudget",
    "affinity_count",
    "auto_delivery_processes",
    "usable_cpus",
]

# `--delivery-processes auto` runs one delivery lane per usable CPU, but at most this many: each lane is
# a process with its own memory (60-100 MB resident, more under load), and on a big node without a CPU
# limit one receiver cannot feed more lanes than this anyway (it receives ~4 CPU-us per record, a lane
# delivers ~15). A larger number can still be given explicitly.
AUTO_MAX_DELIVERY_PROCESSES = 4
CGROUP_ROOT = Path("/sys/fs/cgroup")
_MAX_FILE_BYTES = 256  # cgroup control files are one short line; anything longer is not one
_INTEGER = re.compile(r"-?[0-9]{1,19}")


@attrs.frozen(kw_only=True)
class CpuBudget:
    """The CPUs this process may use, and where the bound came from.

    Attributes:
        cpus: min(affinity, quota): what the process may use, possibly fractional (1.5).
        affinity: CPUs in the affinity mask (``os.cpu_count()`` where there is no mask).
        quota: the cgroup CPU quota in CPUs; None when there is none or it could not be read.
        quota_source: ``cgroup-v2``, ``cgroup-v1`` or ``none``.
    """

    cpus: float
    affinity: int
    quota: float | None = None
    quota_source: str = "none"


@attrs.frozen(kw_only=True)
class AutoDeliveryProcesses:
    """What ``--delivery-processes auto`` resolved to, and why (for the start log and check-config)."""

    processes: int
    budget: CpuBudget
    capped: bool  # the usable CPUs (per worker) were more than AUTO_MAX_DELIVERY_PROCESSES
    workers: int = 1  # --workers: each worker's lanes plan for its share of the CPUs

    def log_fields(self) -> dict[str, object]:
        """Key-values for the start log line: ``cpus=2.0 affinity=2 quota=cgroup-v2 quota_cpus=1.5``."""
        fields: dict[str, object] = {
            "cpus": self.budget.cpus,
            "affinity": self.budget.affinity,
            "quota": self.budget.quota_source,
        }
        if self.budget.quota is not None:
            fields["quota_cpus"] = self.budget.quota
        if self.workers > 1:
            fields["workers"] = self.workers
        if self.capped:
            fields["capped_at"] = AUTO_MAX_DELIVERY_PROCESSES
        return fields

    def describe(self) -> str:
        """One phrase: ``auto: 1.5 CPUs usable (affinity 4, cgroup-v2 quota 1.5)``."""
        budget = self.budget
        quota = "no cgroup quota" if budget.quota is None else f"{budget.quota_source} quota {budget.quota:g}"
        text = f"auto: {budget.cpus:g} CPUs usable (affinity {budget.affinity}, {quota})"
        if self.workers > 1:
            text += f", shared by {self.workers} workers"
        if self.capped:
            text += f", capped at {AUTO_MAX_DELIVERY_PROCESSES}"
        return text


def affinity_count() -> int:
    """CPUs this process may be scheduled on: the affinity mask, else ``os.cpu_count()``, else 1."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no sched_getaffinity off Linux
        count = 0
    return count if count >= 1 else max(os.cpu_count() or 1, 1)


def _read(path: Path) -> str | None:
    try:
        with path.open("rb") as file:
            data = file.read(_MAX_FILE_BYTES + 1)
    except (OSError, ValueError):
        return None
    if len(data) > _MAX_FILE_BYTES:
        return None
    try:
        return data.decode("ascii").strip()
    except UnicodeDecodeError:
        return None


def _int(text: str | None) -> int | None:
    if text is None or _INTEGER.fullmatch(text) is None:
        return None
    return int(text)


def _cgroup_v2_quota(root: Path) -> float | None:
    """``cpu.max`` as CPUs; None for "max" (no quota), a missing file or garbage."""
    text = _read(root / "cpu.max")
    if text is None:
        return None
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    quota, period = _int(parts[0]), _int(parts[1])
    if quota is None or period is None or quota <= 0 or period <= 0:
        return None
    return quota / period


def _cgroup_v1_quota(root: Path) -> float | None:
    """``cpu.cfs_quota_us / cpu.cfs_period_us`` as CPUs; None for -1 (no quota), missing or garbage."""
    for directory in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        quota = _int(_read(root / directory / "cpu.cfs_quota_us"))
        period = _int(_read(root / directory / "cpu.cfs_period_us"))
        if quota is not None and period is not None:
            return quota / period if quota > 0 and period > 0 else None
    return None


def usable_cpus(*, cgroup_root: Path | None = None, affinity: Callable[[], int] | None = None) -> CpuBudget:
    """The CPUs this process may use: its affinity count, lowered by a cgroup CPU quota if any.

    Args:
        cgroup_root: where cgroup v2's ``cpu.max`` or cgroup v1's ``cpu/`` directory is found
            (default ``/sys/fs/cgroup``).
        affinity: returns the affinity count (default ``affinity_count``); a count below 1 or an error
            counts as 1.
    """
    cgroup_root = CGROUP_ROOT if cgroup_root is None else cgroup_root
    try:
        cpus = int((affinity or affinity_count)())
    except Exception:
        cpus = 1
    cpus = max(cpus, 1)
    for source, read in (("cgroup-v2", _cgroup_v2_quota), ("cgroup-v1", _cgroup_v1_quota)):
        try:
            quota = read(cgroup_root)
        except Exception:  # never let an odd file stop the server from starting
            quota = None
        if quota is not None and math.isfinite(quota):
            return CpuBudget(cpus=min(float(cpus), quota), affinity=cpus, quota=quota, quota_source=source)
    return CpuBudget(cpus=float(cpus), affinity=cpus)


def auto_delivery_processes(
    budget: CpuBudget | None = None, *, workers: int = 1, limit: int = AUTO_MAX_DELIVERY_PROCESSES
) -> AutoDeliveryProcesses:
    """One lane per usable CPU, rounded down, at least 1 and at most ``limit`` (per worker).

    Args:
        budget: the CPUs to plan for; None detects them (``usable_cpus()``).
        workers: the ``--workers`` processes sharing those CPUs, each with its own lanes: each plans
            for its share.
        limit: the most lanes ``auto`` runs.
    """
    budget = usable_cpus() if budget is None else budget
    workers = max(workers, 1)
    whole = math.floor(budget.cpus / workers) if math.isfinite(budget.cpus) else 1
    return AutoDeliveryProcesses(
        processes=max(1, min(whole, limit)), budget=budget, capped=whole > limit, workers=workers
    )
