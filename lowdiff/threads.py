"""How many CPU threads torch should use when the user did not say: the CPUs that are free *now*.

torch's own default is one OpenMP thread per physical core of the machine. That is right on a quiet
machine and badly wrong on a busy one: OpenMP threads spin at every barrier waiting for the slowest
member of the team, so when another process holds one of the cores, every parallel region waits for
a thread the scheduler has parked. On this project's 2-core machine, ``lowdiff sample --num-images 8``
took 18–45 s with torch's default while another process was busy and 2–5 s with one thread
(benchmarks/cpu/threads/ has the measured table behind the choice made here).

:func:`default_threads` therefore counts the CPUs this process may use (affinity mask, and a
container's CPU quota from cgroup v2 ``cpu.max`` — Kubernetes' CPU limit), measures how many of
them are idle over a short window (``/proc/stat``), and takes that many, at least 1. Where
``/proc/stat`` is not readable (not Linux) it falls back to the usable CPU count.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

PROC_STAT = Path("/proc/stat")
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (rounded up)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def _cpu_times(stat: Path) -> tuple[int, int]:
    """(idle, total) jiffies of all CPUs from the first line of /proc/stat."""
    fields = [int(v) for v in stat.read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return idle, sum(fields[:8])  # guest time is already counted in user


def idle_cpus(window_s: float = 0.2, stat: Path = PROC_STAT) -> float | None:
    """How many CPUs of the machine were idle over ``window_s`` seconds (None where unmeasurable)."""
    try:
        idle0, total0 = _cpu_times(stat)
        time.sleep(window_s)
        idle1, total1 = _cpu_times(stat)
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (idle1 - idle0) / (total1 - total0) * (os.cpu_count() or 1)


def default_threads(window_s: float = 0.2) -> int:
    """The free CPUs now (rounded to nearest, ≥ 1, ≤ usable CPUs); see the module docstring."""
    cpus = usable_cpus()
    idle = idle_cpus(window_s)
    if idle is None:
        return cpus
    return max(1, min(cpus, int(idle + 0.5)))
