"""``lowdiff serve`` with memory probes, for the soak test's diagnostic runs (never used by the product).

Runs exactly ``lowdiff serve ARGS…`` (the CLI's own entry point, in this process) after installing
a SIGUSR1 handler that appends one JSON line to ``$SOAK_PROBE_OUT`` with:

* ``rss_mb``: the process's resident set (``/proc/self/status``, VmRSS);
* ``traced_mb`` / ``traced_peak_mb``: Python heap objects allocated and still alive, when
  tracemalloc runs (``SOAK_TRACEMALLOC=1``), and the 15 source lines whose live allocations grew
  most since the first probe;
* ``gc_objects``: objects tracked by the garbage collector, and the 10 most common types;
* when the file ``$SOAK_TRIM_FLAG`` exists, also ``rss_after_trim_mb``: RSS after glibc's
  ``malloc_trim(0)``, i.e. what is left once the free memory glibc kept is given back.

Usage: ``SOAK_PROBE_OUT=probe.jsonl python benchmarks/soak/serve_probe.py --threads 1 …``; then
``kill -USR1 <pid>`` at each sample point. The handler runs on the event loop's thread between two
bytecodes (a few hundred ms with tracemalloc), so it briefly delays requests.
"""

from __future__ import annotations

import collections
import ctypes
import gc
import json
import os
import signal
import sys
import time
import tracemalloc
from types import FrameType


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


_first: tracemalloc.Snapshot | None = None


def probe(_sig: int, _frame: FrameType | None) -> None:
    global _first
    started = time.perf_counter()
    record: dict[str, object] = {"t": time.time(), "rss_mb": round(rss_mb(), 1)}
    if tracemalloc.is_tracing():
        current, peak = tracemalloc.get_traced_memory()
        record["traced_mb"] = round(current / 2**20, 2)
        record["traced_peak_mb"] = round(peak / 2**20, 2)
        snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
        if _first is None:
            _first = snapshot
        else:
            record["top_growth"] = [
                {
                    "where": str(stat.traceback[0]),
                    "size_diff_kb": round(stat.size_diff / 1024, 1),
                    "count_diff": stat.count_diff,
                }
                for stat in snapshot.compare_to(_first, "lineno")[:15]
            ]
    objects = gc.get_objects()
    record["gc_objects"] = len(objects)
    record["gc_top_types"] = collections.Counter(type(o).__name__ for o in objects).most_common(10)
    del objects
    flag = os.environ.get("SOAK_TRIM_FLAG")
    if flag and os.path.exists(flag):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        record["rss_after_trim_mb"] = round(rss_mb(), 1)
    record["probe_s"] = round(time.perf_counter() - started, 3)
    with open(os.environ["SOAK_PROBE_OUT"], "a") as out:
        out.write(json.dumps(record) + "\n")


def main() -> int:
    if os.environ.get("SOAK_TRACEMALLOC") == "1":
        tracemalloc.start(1)
    signal.signal(signal.SIGUSR1, probe)
    from lowdiff.cli import main as lowdiff_main

    return lowdiff_main(["serve", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
