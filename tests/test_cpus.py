"""``--delivery-processes auto``: the CPUs this process may use (affinity and cgroup v1/v2 quota, from
fake files under tmp_path), and the lanes that makes (rounded down, at least 1, at most 4)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fluentforward._cpus import (
    AUTO_MAX_DELIVERY_PROCESSES,
    AutoDeliveryProcesses,
    CpuBudget,
    affinity_count,
    auto_delivery_processes,
    usable_cpus,
)
from fluentforward.config import (
    DeliveryProcessCount,
    DeliveryProcessSettings,
    parse_delivery_processes,
)
from fluentforward.errors import ConfigError


def v2(root: Path, content: str | bytes) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "cpu.max"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return root


def v1(root: Path, quota: str, period: str = "100000", directory: str = "cpu") -> Path:
    (root / directory).mkdir(parents=True, exist_ok=True)
    (root / directory / "cpu.cfs_quota_us").write_text(quota + "\n")
    (root / directory / "cpu.cfs_period_us").write_text(period + "\n")
    return root


def lanes(root: Path, affinity: int) -> int:
    return auto_delivery_processes(usable_cpus(cgroup_root=root, affinity=lambda: affinity)).processes


# -- the CPU budget ----------------------------------------------------------------------------------


def test_no_cgroup_files_leaves_the_affinity_count(tmp_path):
    budget = usable_cpus(cgroup_root=tmp_path / "none", affinity=lambda: 3)
    assert budget == CpuBudget(cpus=3.0, affinity=3, quota=None, quota_source="none")


def test_cgroup_v2_unlimited_is_no_quota(tmp_path):
    budget = usable_cpus(cgroup_root=v2(tmp_path, "max 100000\n"), affinity=lambda: 2)
    assert budget == CpuBudget(cpus=2.0, affinity=2, quota=None, quota_source="none")


def test_cgroup_v2_quota_bounds_the_cpus(tmp_path):
    budget = usable_cpus(cgroup_root=v2(tmp_path, "150000 100000\n"), affinity=lambda: 8)
    assert budget == CpuBudget(cpus=1.5, affinity=8, quota=1.5, quota_source="cgroup-v2")


def test_affinity_smaller_than_the_quota_wins(tmp_path):
    """taskset/cpuset to 2 CPUs under a 6-CPU quota: 2."""
    budget = usable_cpus(cgroup_root=v2(tmp_path, "600000 100000"), affinity=lambda: 2)
    assert budget.cpus == 2.0
    assert budget.quota == 6.0
    assert lanes(tmp_path, 2) == 2


def test_cgroup_v1_quota(tmp_path):
    budget = usable_cpus(cgroup_root=v1(tmp_path, "300000"), affinity=lambda: 16)
    assert budget == CpuBudget(cpus=3.0, affinity=16, quota=3.0, quota_source="cgroup-v1")
    assert lanes(tmp_path, 16) == 3


def test_cgroup_v1_unlimited_is_no_quota(tmp_path):
    budget = usable_cpus(cgroup_root=v1(tmp_path, "-1"), affinity=lambda: 2)
    assert budget == CpuBudget(cpus=2.0, affinity=2, quota=None, quota_source="none")


def test_cgroup_v1_combined_controller_directory(tmp_path):
    """Some hosts mount the controller as cpu,cpuacct without the cpu symlink."""
    root = v1(tmp_path, "200000", "100000", directory="cpu,cpuacct")
    assert usable_cpus(cgroup_root=root, affinity=lambda: 8).quota == 2.0


def test_cgroup_v2_is_read_before_v1(tmp_path):
    v1(v2(tmp_path, "100000 100000"), "300000")
    assert usable_cpus(cgroup_root=tmp_path, affinity=lambda: 8).quota_source == "cgroup-v2"


def test_unreadable_v2_falls_back_to_v1(tmp_path):
    v1(v2(tmp_path, "garbage"), "300000")
    budget = usable_cpus(cgroup_root=tmp_path, affinity=lambda: 8)
    assert (budget.cpus, budget.quota_source) == (3.0, "cgroup-v1")


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\n",
        b"max",
        b"banana",
        b"150000",
        b"150000 100000 7",
        b"0 100000",
        b"-5 100000",
        b"150000 0",
        b"150000 -100000",
        b"1.5 1",
        b"--1 100000",
        b"\xff\xfe 100000",
        b"\x00\x00\x00",
        b"\xd9\xa1\xd9\xa5 100000",  # Arabic-Indic digits: int() would take them
        b"99999999999999999999999999 1",
        b"1 " * 200,  # longer than any control file
    ],
)
def test_garbage_cpu_max_leaves_the_affinity_count(tmp_path, content):
    budget = usable_cpus(cgroup_root=v2(tmp_path, content), affinity=lambda: 3)
    assert budget == CpuBudget(cpus=3.0, affinity=3)


@pytest.mark.parametrize(
    ("quota", "period"), [("abc", "100000"), ("100000", "abc"), ("0", "100000"), ("100000", "0"), ("", "")]
)
def test_garbage_cgroup_v1_files_leave_the_affinity_count(tmp_path, quota, period):
    budget = usable_cpus(cgroup_root=v1(tmp_path, quota, period), affinity=lambda: 3)
    assert budget == CpuBudget(cpus=3.0, affinity=3)


def test_a_directory_or_a_missing_period_is_no_quota(tmp_path):
    (tmp_path / "cpu.max").mkdir()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000")
    assert usable_cpus(cgroup_root=tmp_path, affinity=lambda: 2) == CpuBudget(cpus=2.0, affinity=2)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_an_unreadable_file_is_no_quota(tmp_path):
    v2(tmp_path, "100000 100000").joinpath("cpu.max").chmod(0)
    assert usable_cpus(cgroup_root=tmp_path, affinity=lambda: 2).quota is None


def test_a_bad_affinity_reader_counts_as_one_cpu(tmp_path):
    def broken() -> int:
        raise OSError("no")

    assert usable_cpus(cgroup_root=tmp_path, affinity=broken).cpus == 1.0
    assert usable_cpus(cgroup_root=tmp_path, affinity=lambda: 0).cpus == 1.0


@given(st.binary(max_size=300), st.integers(min_value=1, max_value=512))
def test_any_cpu_max_content_is_survived(content, affinity):
    """Whatever the file holds, detection returns a sane budget and never raises."""
    with tempfile.TemporaryDirectory() as directory:
        root = v2(Path(directory), content)
        budget = usable_cpus(cgroup_root=root, affinity=lambda: affinity)
    assert 0 < budget.cpus <= affinity
    assert budget.affinity == affinity
    assert 1 <= auto_delivery_processes(budget).processes <= AUTO_MAX_DELIVERY_PROCESSES


def test_this_machine():
    """With the real files: at least one CPU, no more than the affinity mask, lanes within 1..4."""
    budget = usable_cpus()
    assert budget.affinity == len(os.sched_getaffinity(0)) == affinity_count()
    assert 0 < budget.cpus <= budget.affinity
    assert 1 <= auto_delivery_processes().processes <= AUTO_MAX_DELIVERY_PROCESSES


# -- lanes from the budget ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "affinity", "expected"),
    [
        ("max 100000", 1, 1),
        ("max 100000", 2, 2),
        ("max 100000", 3, 3),
        ("max 100000", 4, 4),
        ("max 100000", 64, AUTO_MAX_DELIVERY_PROCESSES),  # a big node without a CPU limit
        ("150000 100000", 8, 1),  # 1.5 CPUs: rounded down
        ("50000 100000", 8, 1),  # 0.5 CPU: still one lane
        ("1000 100000", 8, 1),  # 10m
        ("250000 100000", 8, 2),
        ("299999 100000", 8, 2),
        ("300000 100000", 8, 3),
        ("1600000 100000", 32, AUTO_MAX_DELIVERY_PROCESSES),  # limits.cpu 16: capped
        ("400000 100000", 2, 2),  # affinity below the quota
    ],
)
def test_auto_lanes(tmp_path, content, affinity, expected):
    assert lanes(v2(tmp_path, content), affinity) == expected


def test_auto_lanes_from_cgroup_v1(tmp_path):
    assert lanes(v1(tmp_path, "150000"), 8) == 1
    assert lanes(v1(tmp_path / "b", "50000"), 8) == 1
    assert lanes(v1(tmp_path / "c", "-1"), 64) == AUTO_MAX_DELIVERY_PROCESSES


def test_capped_lanes_say_so():
    auto = auto_delivery_processes(CpuBudget(cpus=64.0, affinity=64))
    assert auto.capped
    assert auto.log_fields() == {"cpus": 64.0, "affinity": 64, "quota": "none", "capped_at": 4}
    assert auto.describe() == "auto: 64 CPUs usable (affinity 64, no cgroup quota), capped at 4"


def test_quota_reason_in_the_log_fields():
    auto = auto_delivery_processes(CpuBudget(cpus=1.5, affinity=4, quota=1.5, quota_source="cgroup-v2"))
    assert (auto.processes, auto.capped) == (1, False)
    assert auto.log_fields() == {"cpus": 1.5, "affinity": 4, "quota": "cgroup-v2", "quota_cpus": 1.5}
    assert auto.describe() == "auto: 1.5 CPUs usable (affinity 4, cgroup-v2 quota 1.5)"


@pytest.mark.parametrize(
    ("cpus", "workers", "expected"),
    [(8.0, 2, 4), (8.0, 3, 2), (4.0, 2, 2), (2.0, 2, 1), (1.0, 4, 1), (64.0, 2, 4)],
)
def test_workers_share_the_cpus(cpus, workers, expected):
    """Each --workers worker runs its own lanes: it plans for its share of the CPUs."""
    auto = auto_delivery_processes(CpuBudget(cpus=cpus, affinity=int(cpus)), workers=workers)
    assert auto.processes == expected
    assert auto.log_fields()["workers"] == workers
    assert auto.describe().endswith(f"shared by {workers} workers" + (", capped at 4" if auto.capped else ""))


def test_parse_passes_the_workers_to_auto():
    seen = []
    parse_delivery_processes("auto", workers=3, auto=lambda **kw: seen.append(kw) or FAKE)
    assert seen == [{"workers": 3}]


# -- the option value --------------------------------------------------------------------------------

FAKE = AutoDeliveryProcesses(
    processes=3, budget=CpuBudget(cpus=3.5, affinity=8, quota=3.5, quota_source="cgroup-v2"), capped=False
)


@pytest.mark.parametrize("value", ["auto", "AUTO", " auto "])
def test_auto_resolves_to_a_number(value):
    resolved = parse_delivery_processes(value, auto=lambda **_: FAKE)
    assert resolved == DeliveryProcessCount(processes=3, auto=FAKE)
    assert resolved.log_fields() == {
        "delivery_processes": 3,
        "source": "auto",
        "cpus": 3.5,
        "affinity": 8,
        "quota": "cgroup-v2",
        "quota_cpus": 3.5,
    }


@pytest.mark.parametrize(
    ("value", "expected"), [("1", 1), ("2", 2), ("16", 16), (1, 1), (16, 16), (" 4 ", 4)]
)
def test_a_number_is_taken_as_given(value, expected):
    resolved = parse_delivery_processes(value, auto=lambda **_: pytest.fail("auto was not asked for"))
    assert resolved == DeliveryProcessCount(processes=expected)
    assert resolved.log_fields() == {"delivery_processes": expected, "source": "option"}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "must be 1 to 16, got 0"),
        (0, "must be 1 to 16, got 0"),
        ("17", "must be 1 to 16, got 17"),
        ("-1", "must be 1 to 16, got -1"),
        ("abc", "expected auto or a number from 1 to 16, got 'abc'"),
        ("auto2", "expected auto or a number from 1 to 16, got 'auto2'"),
        ("", "expected auto or a number from 1 to 16, got ''"),
        ("2.5", "expected auto or a number from 1 to 16, got '2.5'"),
        (True, "expected auto or a number from 1 to 16, got True"),
    ],
)
def test_bad_values_are_config_errors(value, message):
    with pytest.raises(ConfigError, match="^--delivery-processes: ") as caught:
        parse_delivery_processes(value)
    assert str(caught.value).endswith(message)


@pytest.mark.parametrize("value", ["auto", "2", 2.0, True, None])
def test_delivery_process_settings_hold_a_resolved_count(value):
    """``auto`` depends on ``--workers``: it is resolved once, by ``parse_delivery_processes`` where the
    CLI knows both, so the settings take only the resulting int (the lanes use range() on it)."""
    with pytest.raises(ConfigError, match="^--delivery-processes: expected a resolved number of lanes"):
        DeliveryProcessSettings(options={}, processes=value)
    assert DeliveryProcessSettings(options={}, processes=2).processes == 2
    assert DeliveryProcessSettings(options={}).processes == 1
