"""GPU check of the CUDA engines: parity with the CPU reference, determinism, speed, and serving.

One prepared run for a machine with an NVIDIA GPU; it installs nothing. In order (each step has its own
time limit, and its results are saved before the next starts, so a run cut short keeps what it did):

1. environment: torch, CUDA, GPU, ONNX Runtime and its execution providers;
2. parity of every CUDA engine and precision with the CPU fp32 reference on the embedded model
   (16 images, seeds 0–15): max / mean difference in 8-bit levels, share of pixels more than 2 off;
   fp32 twice, with TF32 convolutions (PyTorch's default) and without;
3. determinism per CUDA engine: (class 3, seed 5) alone and at position 3 of a batch of 7 (≤ 1 level),
   the same batch twice (bit-identical);
4. ``lowdiff bench`` at batch 64: fashion32 vs edm-fashion32 and the paper-size cifar10-cond vs
   edm-cifar10-cond (random weights; the issue target is ≤ 0.15 s per cifar10-cond batch on CUDA graphs);
5. ``loadtests/saturation.py`` against ``lowdiff serve --engine cudagraph --device cuda`` (needs the
   service's packages; skipped with the reason when they are missing); users=1 gives one request's latency.

``--deadline-s`` bounds the whole run: every later step gets at most the time that is left.

    python scripts/gpu_check.py --out runs/gpu-check        # then read runs/gpu-check/gpu_check.md

Everything lands in ``--out``: ``gpu_check.json`` (all measurements), ``gpu_check.md`` (tables),
``parity.png`` (CPU reference vs each CUDA engine), the bench reports and the saturation folder;
``--tar`` also packs the folder into one archive after every step. ``--device cpu`` runs the same
plumbing with the CPU engines only (a smoke test for machines without a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lowdiff.engines import EngineUnavailable, load_engine  # noqa: E402
from lowdiff.model import LowDiffModel, default_checkpoint_path  # noqa: E402

PARITY_SEEDS = list(range(16))


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["compute_capability"] = f"{props.major}.{props.minor}"
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        info["onnxruntime"] = None
    try:
        smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        info["nvidia_smi"] = None
    return info


def engine_variants(device: str) -> list[tuple[str, str, bool]]:
    """(kind, precision, tf32 convolutions allowed) to compare with the CPU fp32 reference."""
    if device == "cpu":
        return [("torch", "bf16", False), ("onnxruntime", "fp32", False)]
    return [
        ("torch", "fp32", True),
        ("torch", "fp32", False),
        ("torch", "bf16", True),
        ("cudagraph", "fp32", True),
        ("cudagraph", "fp32", False),
        ("cudagraph", "bf16", True),
        ("cudagraph", "fp16", True),
        ("onnxruntime", "fp32", True),
    ]


def level_difference(images: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    diff = (images.int() - reference.int()).abs().float()
    return {
        "max_levels": float(diff.max()),
        "mean_levels": float(diff.mean()),
        "share_over_2_levels": float((diff > 2).float().mean()),
    }


def parity_and_determinism(model: LowDiffModel, device: str, out: Path) -> dict[str, Any]:
    labels = [s % model.config.num_classes for s in PARITY_SEEDS]
    reference = load_engine(model, "torch", "cpu", "fp32").generate(PARITY_SEEDS, labels)
    results: list[dict[str, Any]] = []
    rows = [("CPU fp32 (reference)", reference)]
    for kind, precision, tf32 in engine_variants(device):
        name = f"{kind} {precision}" + (" +tf32" if tf32 and device == "cuda" and precision == "fp32" else "")
        entry: dict[str, Any] = {"engine": kind, "precision": precision, "tf32": tf32, "name": name}
        torch.backends.cudnn.allow_tf32 = tf32
        try:
            start = time.perf_counter()
            engine = load_engine(model, kind, device, precision)
            entry["load_s"] = time.perf_counter() - start
            images = engine.generate(PARITY_SEEDS, labels)
            entry.update(level_difference(images, reference))
            rows.append((name, images))
            # Determinism: alone vs position 3 of a batch of 7 (other seeds/classes around it), and
            # the same batch twice.
            alone = engine.generate([5], [3])
            batch_seeds, batch_labels = [11, 12, 13, 5, 14, 15, 16], [0, 1, 2, 3, 4, 5, 6]
            first = engine.generate(batch_seeds, batch_labels)
            second = engine.generate(batch_seeds, batch_labels)
            entry["alone_vs_batch_max_levels"] = float((alone[0].int() - first[3].int()).abs().max())
            entry["same_batch_twice_identical"] = bool(torch.equal(first, second))
            del engine
        except EngineUnavailable as exc:
            entry["unavailable"] = str(exc)
        except Exception as exc:  # noqa: BLE001 -- a failing engine is a finding, the check goes on
            entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["traceback"] = traceback.format_exc()
        finally:
            torch.backends.cudnn.allow_tf32 = True
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        print(json.dumps({k: v for k, v in entry.items() if k != "traceback"}), flush=True)
        results.append(entry)
    save_parity_picture(rows, out / "parity.png")
    return {"seeds": PARITY_SEEDS, "labels": labels, "results": results}


def evaluation_variants(device: str) -> list[dict[str, Any]]:
    """One paper-size denoiser evaluation (cifar10-cond, stage 32, batch 64), eager, timed with CUDA events
    per memory format × cuDNN benchmark mode × precision: where the time of a stage goes and what helps."""
    model = LowDiffModel.from_config("cifar10-cond")
    denoiser = model.denoiser.to(device).eval()
    gen = torch.Generator(device=device).manual_seed(0)
    batch, r = 64, 32
    x = torch.randn(batch, 3, r, r, device=device, generator=gen)
    condition = torch.randn(batch, 3, r, r, device=device, generator=gen)
    sigma = torch.full((batch,), 1.0, device=device)
    sigma_cond = torch.full((batch,), 0.5, device=device)
    labels = torch.arange(batch, device=device) % 10
    results = []
    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", None)):
        for memory_format in (torch.contiguous_format, torch.channels_last):
            for benchmark in (False, True):
                torch.backends.cudnn.benchmark = benchmark
                denoiser.to(memory_format=memory_format)
                xin = x.contiguous(memory_format=memory_format)

                def call(xin: torch.Tensor, dtype: torch.dtype | None) -> None:
                    with torch.no_grad(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=bool(dtype)):
                        denoiser(xin, sigma, labels, r, condition, sigma_cond)

                for _ in range(3):
                    call(xin, dtype)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(10):
                    call(xin, dtype)
                end.record()
                torch.cuda.synchronize()
                entry = {
                    "precision": precision,
                    "memory_format": "channels_last" if memory_format == torch.channels_last else "contiguous",
                    "cudnn_benchmark": benchmark,
                    "ms_per_evaluation": start.elapsed_time(end) / 10,
                }
                print(json.dumps(entry), flush=True)
                results.append(entry)
    torch.backends.cudnn.benchmark = False
    return results


def save_parity_picture(rows: list[tuple[str, torch.Tensor]], path: Path) -> None:
    """One row per engine (16 images), reference first, so differences can be seen, not only counted."""
    from PIL import Image, ImageDraw

    label_w, gap = 170, 2
    first = rows[0][1]
    n, c, h, w = first.shape
    canvas = Image.new("L", (label_w + n * (w + gap), len(rows) * (h + gap)), 255)
    draw = ImageDraw.Draw(canvas)
    for i, (name, images) in enumerate(rows):
        y = i * (h + gap)
        draw.text((4, y + h // 2 - 6), name, fill=0)
        for j in range(n):
            tile = images[j, 0] if c == 1 else images[j].float().mean(0).to(torch.uint8)
            canvas.paste(Image.fromarray(tile.numpy(), "L"), (label_w + j * (w + gap), y))
    canvas = canvas.resize((canvas.width * 2, canvas.height * 2), Image.NEAREST)
    canvas.save(path)


def run_step(cmd: list[str], timeout: float, log: Path) -> dict[str, Any]:
    """A subprocess step (own CUDA context, own time limit); its output goes to ``log``."""
    start = time.perf_counter()
    print("$", " ".join(cmd), flush=True)
    with open(log, "w") as handle:
        try:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout)
            rc: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            rc = f"timed out after {timeout:.0f} s"
    tail = log.read_text()[-1500:]
    print(f"  -> {rc} in {time.perf_counter() - start:.0f} s", flush=True)
    return {"command": " ".join(cmd), "returncode": rc, "seconds": time.perf_counter() - start, "log_tail": tail}


def bench_steps(device: str, out: Path) -> list[tuple[str, list[str], float]]:
    """(name, lowdiff bench arguments, time limit) for every speed measurement."""
    ckpt = str(default_checkpoint_path())
    if device == "cpu":  # smoke only: tiny runs of the same commands
        return [
            ("fashion32-b2", ["--checkpoint", ckpt, "--compare", "edm-fashion32", "--engine", "torch",
                              "--batch", "2", "--runs", "1"], 300),
        ]  # fmt: skip
    return [
        ("cifar10-b64", ["--config", "cifar10-cond", "--compare", "edm-cifar10-cond",
                         "--engine", "cudagraph:bf16,cudagraph",
                         "--batch", "64", "--runs", "5"], 200),
        ("fashion32-b64", ["--checkpoint", ckpt, "--compare", "edm-fashion32",
                           "--engine", "cudagraph,cudagraph:bf16,torch", "--batch", "64", "--runs", "10"], 120),
    ]  # fmt: skip


def summary_markdown(report: dict[str, Any]) -> str:
    lines = ["# GPU check", "", "```", json.dumps(report.get("environment", {}), indent=1), "```", ""]
    parity = report.get("parity", {}).get("results", [])
    if parity:
        lines += [
            "## Parity with the CPU fp32 reference (16 images) and determinism",
            "",
            "| engine | max levels | mean levels | > 2 levels | alone vs batch (levels) | same batch twice | note |",
            "|---|---|---|---|---|---|---|",
        ]
        for e in parity:
            note = e.get("unavailable") or e.get("error") or ""
            if "max_levels" in e:
                alone = e.get("alone_vs_batch_max_levels", float("nan"))
                lines.append(
                    f"| {e['name']} | {e['max_levels']:.0f} | {e['mean_levels']:.3f} | "
                    f"{100 * e['share_over_2_levels']:.2f} % | {alone:.0f} | "
                    f"{'identical' if e.get('same_batch_twice_identical') else 'DIFFERENT'} | {note} |"
                )
            else:
                lines.append(f"| {e['name']} | – | – | – | – | – | {note} |")
        lines.append("")
    for name, step in report.get("bench", {}).items():
        lines += [f"## bench {name}", "", f"`{step['command']}` → {step['returncode']}", ""]
        md = step.get("table")
        lines += [md, ""] if md else ["```", step["log_tail"], "```", ""]
        if step.get("ratio") is not None:
            lines += [f"throughput ratio (first engine): {step['ratio']:.3f}", ""]
    sat = report.get("saturation")
    if sat:
        lines += ["## saturation", "", f"`{sat['command']}` → {sat['returncode']}", ""]
        lines += [sat.get("readme") or f"```\n{sat['log_tail']}\n```", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for every result")
    p.add_argument("--device", default="cuda", help="cuda (the check), or cpu (plumbing smoke test)")
    p.add_argument("--tar", type=Path, default=None, help="also pack --out into this .tgz after every step")
    p.add_argument("--deadline-s", type=float, default=540.0, help="time budget of the whole run")
    p.add_argument("--skip", default="", help="comma list of steps to skip: parity,variants,saturation,bench")
    args = p.parse_args()
    deadline = time.monotonic() + args.deadline_s

    def limit(step_limit: float) -> float:
        return max(1.0, min(step_limit, deadline - time.monotonic()))

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"no CUDA GPU here (torch {torch.__version__}); nothing to check (--device cpu smoke-tests)")
        raise SystemExit(0)
    args.out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    report: dict[str, Any] = {"environment": environment(), "bench": {}}
    print(json.dumps(report["environment"], indent=1), flush=True)

    def save() -> None:
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "gpu_check.md").write_text(summary_markdown(report))
        if args.tar is not None:
            with tarfile.open(args.tar, "w:gz") as tar:
                tar.add(args.out, arcname=args.out.name)

    def guarded(name: str, fn: Callable[[], Any]) -> None:
        try:
            report[name] = fn()
        except Exception as exc:  # noqa: BLE001 -- record and go on to the next step
            report[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            print(report[name]["traceback"], flush=True)
        save()

    save()
    if "parity" not in skip:
        guarded("parity", lambda: parity_and_determinism(LowDiffModel.load(None), args.device, args.out))
    if "variants" not in skip and args.device == "cuda":
        guarded("evaluation_variants", lambda: evaluation_variants(args.device))
    if "saturation" not in skip:
        try:
            import fastapi  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError as exc:
            report["saturation"] = {"command": "-", "returncode": f"skipped: {exc}", "log_tail": ""}
        else:
            sat_dir = args.out / "saturation"
            engine = ["--engine", "cudagraph"] if args.device == "cuda" else ["--engine", "torch", "--threads", "1"]
            users = "1,16,64,256" if args.device == "cuda" else "1,2"
            cmd = [sys.executable, "loadtests/saturation.py", *engine, "--device", args.device, "--max-batch",
                   "64" if args.device == "cuda" else "2", "--users", users, "--ramp-s", "3", "--window-s", "10",
                   "--bench-runs", "5" if args.device == "cuda" else "1", "--out-dir", str(sat_dir)]  # fmt: skip
            step = run_step(cmd, limit(150), args.out / "saturation.log")
            readme = sat_dir / "README.md"
            step["readme"] = readme.read_text() if readme.exists() else None
            report["saturation"] = step
        save()
    if "bench" not in skip:
        for name, flags, timeout in bench_steps(args.device, args.out):
            json_path = args.out / f"bench-{name}.json"
            cmd = [
                sys.executable,
                "-m",
                "lowdiff",
                "bench",
                *flags,
                "--device",
                args.device,
                "--json",
                str(json_path),
            ]
            step = run_step(cmd, limit(timeout), args.out / f"bench-{name}.log")
            if json_path.exists():
                step["ratio"] = json.loads(json_path.read_text())["ratio"]
                step["table"] = json_path.with_suffix(".md").read_text()
            report["bench"][name] = step
            save()
    print(summary_markdown(report))


if __name__ == "__main__":
    main()
