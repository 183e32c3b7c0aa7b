"""The benchmark report's CPU budget paragraph (``bench.run.budget_lines``) and the stage figures it
reads (``bench.micro.bench_delivery_stages``)."""

from __future__ import annotations

from typing import Any

import pytest

from bench import micro, run


def _report(*, stages: bool = True, split: bool = True) -> dict[str, Any]:
    server: dict[str, Any] = {"name": "throughput", "receiver": "server", "cpu_us_per_record": 19.0}
    server["cpu_us_split"] = {"receive": 5.25, "deliver": 14.0} if split else None
    floor = {"name": "throughput", "receiver": "floor", "cpu_us_per_record": 4.75}
    report: dict[str, Any] = {"scenarios": [floor, server], "micro": {}}
    if stages:
        report["micro"]["delivery_stages"] = {"decode_us": 2.5, "ids_us": 4.75, "shipper_us": 8.0}
    return report


def test_budget_is_twice_the_floor_less_receive() -> None:
    (line,) = run.budget_lines(_report())
    assert "leaves **4.25 us** per record for delivery" in line  # 2.0 x 4.75 - 5.25
    assert "it costs **14.00 us**" in line
    assert "`decode_frame` 2.50, trace ids 2.25, shaping + protobuf + snappy 3.25, in all 8.00 us" in line
    assert "alone take 4.75 us" in line


@pytest.mark.parametrize(
    "report", [_report(stages=False), _report(split=False)], ids=["no-micro", "no-split"]
)
def test_budget_needs_the_split_and_the_stages(report: dict[str, Any]) -> None:
    assert run.budget_lines(report) == []


def test_budget_without_the_floor_is_empty() -> None:
    report = _report()
    report["scenarios"] = report["scenarios"][1:]
    assert run.budget_lines(report) == []


def test_delivery_stages_run_over_the_throughput_load() -> None:
    stages = micro.bench_delivery_stages(repeat=1)
    assert stages["frames"] == 24  # 8 connections x FRAMES_PER_CONNECTION distinct frames
    assert stages["records"] == 24 * micro.CHUNK_RECORDS
    # Timings are not compared (never a timed unit test): each stage only has to have been measured.
    assert all(stages[key] > 0 for key in ("decode_us", "ids_us", "shipper_us"))
