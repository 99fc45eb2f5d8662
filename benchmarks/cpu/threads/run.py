"""Which default thread count survives a busy machine? `lowdiff sample`'s work, timed per policy and load.

For each background load (0, 1, … `--max-spinners` pure-Python busy loops, on top of whatever the
machine already runs) and each thread policy — 1 thread, every usable CPU (torch's default on this
machine), and ``lowdiff.threads.default_threads()`` (the CPUs idle now) — a fresh process loads the
embedded fashion32 model, generates one warm-up batch, then times ``--repeats`` batches of
``--images`` images (the same seeds each time). Rounds are interleaved so that every cell sees the
same drift of a shared machine. Prints a table and writes results.json/.md into --out (default: a new temp folder).

    python benchmarks/cpu/threads/run.py --rounds 2 --out benchmarks/cpu/threads
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from lowdiff.bench.report import results_dir

HERE = Path(__file__).resolve().parent
WORKER = r"""
import json, sys, time, torch
from lowdiff.model import load_model
from lowdiff.threads import default_threads
policy, images, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
threads = {"one": 1, "all": torch.get_num_threads(), "idle": default_threads()}[policy]
torch.set_num_threads(threads)
model = load_model(None)
seeds = list(range(images))
labels = [s % model.config.num_classes for s in seeds]
model.generate(seeds[:2], labels[:2])
times = []
for _ in range(repeats):
    t = time.perf_counter(); model.generate(seeds, labels); times.append(time.perf_counter() - t)
print(json.dumps({"threads": threads, "times": times}))
"""


def spin() -> None:
    while True:
        pass


def run_cell(policy: str, images: int, repeats: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run(
        [sys.executable, "-c", WORKER, policy, str(images), str(repeats)],
        capture_output=True, text=True, env=env, check=True, timeout=900,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-spinners", type=int, default=(os.cpu_count() or 2) - 1)
    parser.add_argument("--out", type=Path, default=None, help="default: a new temp folder")
    args = parser.parse_args()
    policies = ("one", "all", "idle")
    cells: dict[tuple[int, str], dict] = {}
    for rnd in range(args.rounds):
        for spinners in range(args.max_spinners + 1):
            procs = [mp.Process(target=spin, daemon=True) for _ in range(spinners)]
            for p in procs:
                p.start()
            time.sleep(1.0)  # let the load register before the idle-CPU policy looks
            try:
                for policy in policies:
                    load = os.getloadavg()[0]
                    r = run_cell(policy, args.images, args.repeats)
                    cell = cells.setdefault((spinners, policy), {"times": [], "threads": [], "load1": []})
                    cell["times"] += r["times"]
                    cell["threads"].append(r["threads"])
                    cell["load1"].append(round(load, 2))
                    print(f"round {rnd + 1}/{args.rounds}  spinners {spinners}  {policy:4s}  threads {r['threads']}  "
                          f"{statistics.median(r['times']):.2f} s", file=sys.stderr, flush=True)  # fmt: skip
            finally:
                for p in procs:
                    p.terminate()
    rows = []
    for (spinners, policy), cell in sorted(cells.items()):
        rows.append({
            "spinners": spinners, "policy": policy, "threads": cell["threads"],
            "median_s": round(statistics.median(cell["times"]), 3), "max_s": round(max(cell["times"]), 3),
            "times_s": [round(t, 3) for t in cell["times"]], "load1_at_start": cell["load1"],
        })  # fmt: skip
    header = f"| busy loops | policy | threads | median s ({args.images} images) | worst s |\n|---|---|---|---|---|\n"
    table = header + "".join(
        f"| {r['spinners']} | {r['policy']} | {','.join(map(str, r['threads']))} "
        f"| {r['median_s']:.2f} | {r['max_s']:.2f} |\n"
        for r in rows
    )
    report = {
        "command": "python benchmarks/cpu/threads/run.py " + " ".join(sys.argv[1:]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "policies": {"one": "1 thread", "all": "torch's default (one per core)",
                     "idle": "lowdiff.threads.default_threads(): CPUs idle now"},
        "rows": rows,
    }  # fmt: skip
    args.out = results_dir(args.out, "threads")
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
