"""lowdiff.threads: the default thread count is the CPUs idle now, within the container's quota."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import lowdiff.threads as threads


def test_cgroup_quota_caps_the_affinity_mask(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("50000 100000\n")  # half a CPU: rounds up to 1
    assert threads.usable_cpus(cpu_max) == 1
    cpu_max.write_text("max 100000\n")
    assert threads.usable_cpus(cpu_max) == affinity
    cpu_max.write_text("garbage")
    assert threads.usable_cpus(cpu_max) == affinity
    assert threads.usable_cpus(tmp_path / "missing") == affinity


def test_idle_cpus_from_two_readings_of_proc_stat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal
    stat.write_text("cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 1 2 3\n")

    def advance(_seconds: float) -> None:  # 200 jiffies pass, 50 of them idle: a quarter of the machine
        stat.write_text("cpu  200 0 150 840 10 0 0 0 0 0\ncpu0 1 2 3\n")

    monkeypatch.setattr(threads.time, "sleep", advance)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 8)
    assert threads.idle_cpus(0.1, stat) == pytest.approx(2.0)


def test_idle_cpus_is_none_when_unreadable(tmp_path: Path) -> None:
    assert threads.idle_cpus(0.0, tmp_path / "missing") is None
    bad = tmp_path / "stat"
    bad.write_text("not a stat file")
    assert threads.idle_cpus(0.0, bad) is None


@pytest.mark.parametrize(
    ("idle", "usable", "expected"), [(0.0, 2, 1), (0.4, 2, 1), (1.6, 2, 2), (7.0, 4, 4), (None, 3, 3)]
)
def test_default_threads_rounds_the_idle_cpus_within_bounds(
    monkeypatch: pytest.MonkeyPatch, idle: float | None, usable: int, expected: int
) -> None:
    monkeypatch.setattr(threads, "idle_cpus", lambda window_s=0.2: idle)
    monkeypatch.setattr(threads, "usable_cpus", lambda: usable)
    assert threads.default_threads() == expected


def test_on_this_machine_it_is_a_usable_count() -> None:
    n = threads.default_threads(window_s=0.05)
    assert 1 <= n <= threads.usable_cpus()
