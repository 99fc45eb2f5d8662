"""GPU check of the CUDA engines: parity, determinism, profile, cost table, cascade speed and serving.

One prepared run for a machine with an NVIDIA GPU; it installs nothing. An estimate of the run's time
is printed first (aim: about 9 minutes without the compile steps, so that a 15-minute device window holds
the machine's start, the run and a rerun of a step or two with ``--only``). Steps, in order; each runs in
its own process with its own time limit (a crash, a hang or a slow compile loses only that step), and the
results are saved before the next starts:

 1. ``environment``: torch, CUDA, cuDNN, GPU, Triton, ONNX Runtime and its providers, dynamo's limits;
 2. ``parity``: every CUDA engine and precision except ``compile`` (torch and cudagraph in fp32 with and
    without TF32 convolutions, bf16, fp16; onnxruntime with the CUDA/TensorRT provider when present)
    against the CPU fp32 reference on the embedded model (16 images, seeds 0–15): max / mean difference in
    8-bit levels and the share of pixels more than 2 levels off; determinism: (class 3, seed 5) alone vs
    at position 3 of a batch of 7 (≤ 1 level), the same batch twice (bit-identical); ``parity.png``;
 3. ``profile``: ``lowdiff bench --profile``: one cifar10-cond 32×32 evaluation at batch 64 per engine
    (torch, torch:bf16, cudagraph:bf16): top kernels, shares of GroupNorm/SiLU/attention/
    convolution/elementwise;
 4. ``cost-torch``, 5. ``cost-cudagraph``: ``lowdiff bench --cost-table`` for cifar10-cond, edm-cifar10-cond
    and fashion32 (random weights): seconds per evaluation vs batch, per resolution (torch to batch 512,
    cudagraph to its largest bucket, 64: above it the engine splits batches); merged into ``costs.json``;
 6. ``bench-base``: ``lowdiff bench`` cifar10-cond vs edm-cifar10-cond at batch 64, torch, cudagraph and
    cudagraph:bf16 round-robin, 3 runs (the paper's Table 5 and the cascade-vs-EDM throughput ratio);
 7. ``train-throughput`` (issue 13): training images/s of cifar10-cond and edm-cifar10-cond on one GPU,
    bf16 autocast, the recipe's global batch of 512 in rounds of ``batch_gpu`` 128 (halved on running out
    of memory): ``lowdiff.training.Trainer`` on random images and labels already on the GPU, 2 warm-up
    and 10 timed steps; peak memory; ``train-throughput.json|md``;
 8. ``dit-ratio`` (issue 18): ``lowdiff bench`` lowdiff-dit-b1-imagenet256 (45 + 50 NFE + decode) vs
    lightningdit-b1-imagenet256 (100 NFE + decode), random B/1 weights, ``torch:bf16``, batch 64, 3 runs
    each, round-robin: the cascade-vs-baseline ratio with and without the decode, beside the paper's 1.65×;
 9. ``scheduler-overlap`` (issue 14): saturated throughput of the service's batchers driven in-process
    (no HTTP), cifar10-cond random weights, max batch 64, 256 single-image requests kept outstanding, on
    ``cudagraph:bf16`` with each stage's buckets up to its staged limit (8×8: 512, 16×16: 256, as
    ``lowdiff serve --scheduler staged`` captures them; bucket 64 alone was run 4): whole-cascade
    batches vs ``--scheduler staged`` vs staged with ``--stage-overlap on`` (each lane its own CUDA stream;
    the default ``--overlap-backlog``) vs the same with backlog 0 (always beside) vs with the last lane's
    stream at high priority; images/s over a 3 s window, the share of
    it both lanes ran at once, the same (class, seed)'s pixels across them; then edm-cifar10-cond's
    whole-cascade batches in the same loop for the LowDiff/EDM ratio; goals ≥ 1.15× cascade and ≥ 1.55×
    EDM; ``scheduler-overlap.json|md``;
10. ``compile-gate``: the ``compile`` engine's parity and determinism (fp32), as step 2. It is the first
    time torch.compile runs on the GPU: if it fails or runs out of time, the compile steps below are
    skipped with its reason (and step 12 does not lose the others' results to it);
11. ``saturation-cudagraph``: ``loadtests/saturation.py`` against ``lowdiff serve --engine cudagraph``
    (its command line is read from its ``--help``; skipped with the reason when it or its packages are
    missing);
12. ``bench-all``: step 6 with every engine, ``--engine torch,cudagraph,cudagraph:bf16,compile,compile:bf16``;
13. ``cost-compile``, 14. ``profile-compile``, 15. ``parity-compile`` (bf16, fp16),
16. ``saturation-compile``: steps 3–5 and 11 for ``compile``.

``--deadline-s`` bounds the whole run: every step gets at most its own limit and what is left (a step is not
started with less than a quarter of its expected time left). Inductor's
cache goes to ``--inductor-cache`` (default: a folder in the temp dir), shared by the steps and by a
second run on the same machine.

    python scripts/gpu_check.py --out runs/gpu-check      # then read runs/gpu-check/gpu_check.md

Everything lands in ``--out``: ``gpu_check.json`` (every step: status, time, results), ``gpu_check.md``,
``parity.png``, ``profile*.json|md``, ``costs*.json|md|png``, ``bench-*.json|md|png``,
``train-throughput.json|md`` (and one file per model in ``train-throughput/``), ``dit-ratio.json|md|png``,
``scheduler-overlap.json|md`` (and one file per engine in ``scheduler-overlap/``),
``saturation-*/`` and one ``*.log`` per step; ``--tar`` also packs the folder into one archive after every step.

``--cpu-dry-run`` runs every step on the CPU with tiny sizes (two tiny 8-channel checkpoints, a 3-stage
LowDiff and a 1-stage EDM with a few steps each, and two tiny latent DiT checkpoints, a 2-stage LowDiff
and its 1-stage baseline, written to ``--out``/dry-run-models; 4 parity images, batches of 1–2, one timed
run, 2 timed fp32 training steps of batch 2, the three batchers on torch fp32 with 8 requests outstanding
for 3 s each, a one-level saturation sweep; the CUDA engines are recorded
as unavailable)
and writes the same files, to check the script itself without a GPU. torch.compile is switched off there
(``TORCHDYNAMO_DISABLE=1``: dynamo alone takes about a minute per graph on a loaded 2-core machine), so
the compile steps exercise their plumbing with the eager model; ``--dry-run-compile`` keeps it on.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SATURATION = ROOT / "loadtests" / "saturation.py"
COST_CONFIGS = "cifar10-cond,edm-cifar10-cond,fashion32"
ALL_ENGINES = "torch,cudagraph,cudagraph:bf16,compile,compile:bf16"
# The steps that run only when the compile gate passed (their time is not in the first estimate).
COMPILE_EXTRA = ("bench-all", "cost-compile", "profile-compile", "parity-compile", "saturation-compile")


def one_line(text: Any, limit: int = 240) -> str:
    """``text`` on one line (Markdown table cells), cut at ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def selected(step: str, patterns: list[str]) -> bool:
    """``step`` is named in ``patterns``: by its name, or by a group: ``cost`` (cost-torch, cost-cudagraph,
    cost-compile), ``saturation``, ``bench``, ``compile`` (compile-gate and every step that needs it)."""
    for p in patterns:
        if step == p or (p == "compile" and (step == "compile-gate" or step in COMPILE_EXTRA)):
            return True
        if p in ("cost", "saturation", "bench") and step.startswith(p + "-"):
            return True
    return False


# ---------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """Every size the run uses; :func:`gpu_plan` for the GPU, :func:`dry_run_plan` for the CPU dry run."""

    device: str
    parity_seeds: int
    parity_checkpoint: str | None  # None: the embedded model
    # (kind, precision, tf32 convolutions allowed) per parity entry
    parity_engines: list[tuple[str, str, bool]]
    compile_gate: list[tuple[str, str, bool]]
    compile_parity: list[tuple[str, str, bool]]
    # `lowdiff bench` model flags per use: profile, cost, bench; and the saturation sweep's
    models: dict[str, list[str]]
    profile_batch: int
    profile_engines: str
    cost_groups: dict[str, tuple[str, str]]  # step → (engines, batches)
    cost_warmup: int
    cost_repeats: int
    bench_engines: str
    bench_all_engines: str
    bench_batch: int
    bench_runs: int
    saturation: dict[str, str]  # step → engine
    saturation_args: dict[str, str]
    # train-throughput: built-in config names (or checkpoints: their configs), precision, the global batch
    # (0 = each config's recipe batch), images per forward/backward (0 = the whole batch), steps
    train_models: list[str]
    train_precision: str
    train_batch: int
    train_batch_gpu: int
    train_warmup: int
    train_steps: int
    # dit-ratio: the latent cascade vs its one-stage baseline through `lowdiff bench` (models in models["dit"])
    dit_engine: str
    dit_batch: int
    dit_runs: int
    # scheduler-overlap: the batchers driven in-process, closed loop (a model spec: a config name or a
    # checkpoint; "kind:precision" engines; cudagraph's batch buckets; max batch; requests kept
    # outstanding; seconds before and of the measured window)
    overlap_model: str
    overlap_compare: str  # its one-stage baseline, measured the same way with whole-cascade batches
    overlap_engines: list[str]
    overlap_buckets: tuple[int, ...]
    overlap_max_batch: int
    overlap_outstanding: int
    overlap_warm_s: float
    overlap_window_s: float
    # step → (expected seconds, limit seconds)
    times: dict[str, tuple[float, float]] = field(default_factory=dict)


def gpu_plan() -> Plan:
    p2 = ",".join(str(2**k) for k in range(10))  # 1 … 512
    p64 = ",".join(str(2**k) for k in range(7))  # 1 … 64: cudagraph's buckets
    return Plan(
        device="cuda",
        parity_seeds=16,
        parity_checkpoint=None,
        parity_engines=[
            ("torch", "fp32", True),
            ("torch", "fp32", False),
            ("torch", "bf16", True),
            ("torch", "fp16", True),
            ("cudagraph", "fp32", True),
            ("cudagraph", "fp32", False),
            ("cudagraph", "bf16", True),
            ("cudagraph", "fp16", True),
            ("onnxruntime", "fp32", True),
        ],
        compile_gate=[("compile", "fp32", True)],
        compile_parity=[("compile", "bf16", True), ("compile", "fp16", True)],
        models={
            "profile": ["--config", "cifar10-cond"],
            "cost": ["--config", COST_CONFIGS],
            "bench": ["--config", "cifar10-cond", "--compare", "edm-cifar10-cond"],
            "saturation": [],  # the embedded default model, as served
            "dit": ["--config", "lowdiff-dit-b1-imagenet256", "--compare", "lightningdit-b1-imagenet256"],
        },
        profile_batch=64,
        # cudagraph fp32 left out (to fit scheduler-overlap in the deadline): its graphs replay the kernels
        # that torch fp32 launches, so its operator shares are torch fp32's
        profile_engines="torch,torch:bf16,cudagraph:bf16",
        cost_groups={
            "cost-torch": ("torch,torch:bf16", p2),
            "cost-cudagraph": ("cudagraph,cudagraph:bf16", p64),
            "cost-compile": ("compile,compile:bf16", p64),
        },
        cost_warmup=1,
        cost_repeats=3,
        bench_engines="torch,cudagraph,cudagraph:bf16",
        bench_all_engines=ALL_ENGINES,
        bench_batch=64,
        bench_runs=3,  # run 3's 5 runs per target: max/min within 6 % (cifar10-cond), 1 % (edm)
        saturation={"saturation-cudagraph": "cudagraph", "saturation-compile": "compile"},
        saturation_args={"max-batch": "64", "users": "1,64,256", "ramp-s": "3", "window-s": "6", "bench-runs": "2"},
        train_models=["cifar10-cond", "edm-cifar10-cond"],
        train_precision="bf16",
        train_batch=0,  # the recipe's 512
        train_batch_gpu=128,  # 4 rounds of 128; halved on running out of memory
        train_warmup=2,
        train_steps=10,
        dit_engine="torch:bf16",
        dit_batch=64,
        dit_runs=3,
        overlap_model="cifar10-cond",
        overlap_compare="edm-cifar10-cond",
        # "@staged": each stage's buckets up to its staged limit, as `lowdiff serve --scheduler staged`
        # captures them (no suffix: overlap_buckets). Bucket 64 alone was run 4 (cascade 141.8, staged 141.4,
        # overlap 155.7 images/s: a 512-image 8×8 call ran as 8 replays); the whole-cascade batcher's calls
        # (≤ 64) replay the same graphs in both.
        overlap_engines=["cudagraph:bf16@staged"],
        overlap_buckets=(64,),  # a saturated run's calls are 64 images or multiples; 3 captures, not 21
        overlap_max_batch=64,
        overlap_outstanding=256,
        overlap_warm_s=1.5,
        overlap_window_s=3.0,
        # Expected seconds on one H100 (from the runs in benchmarks/gpu/: cudagraph loads 7–19 s, the
        # cifar10 bench 100 s for 4 targets, saturation 140 s for 4 levels + 2×5 bench runs) and limits.
        # The compile steps' times are unknown (first run of torch.compile on a GPU): inductor compiles
        # one static graph per (stage, batch bucket), tens of seconds each when its cache is cold.
        times={
            "environment": (5, 30),
            "parity": (60, 110),
            "profile": (30, 75),  # 3 engines (was 40 s for 4)
            "cost-torch": (35, 70),
            "cost-cudagraph": (80, 130),
            "bench-base": (59, 120),  # 3 runs (was 70 s for 5; a run of the 6 targets ≈ 5.4 s)
            # not yet run on a GPU: 2 × (build + 2 warm-up + 10 timed steps of 512 images, ~0.3–0.6 s each);
            # B/1 at batch 64 with guidance: ~2–4 s a batch per target, 1 warm-up + 3 timed each, + the
            # random-weight DiT and VA-VAE decoder built on the GPU
            "train-throughput": (45, 100),
            "dit-ratio": (42, 130),  # H200, run 4: 40 s
            # H200, run 4: 24 s for 3 schedulers × 5 s with 3 captures; now 4 × 4.5 s, 26 captures (buckets
            # up to each stage's limit) and the baseline's cascade run
            "scheduler-overlap": (50, 120),
            "compile-gate": (90, 120),
            "saturation-cudagraph": (70, 110),
            "bench-all": (240, 300),
            "cost-compile": (120, 200),
            "profile-compile": (60, 120),
            "parity-compile": (90, 150),
            "saturation-compile": (120, 180),
        },
    )


def dry_run_plan(out: Path) -> Plan:
    """Tiny sizes on the CPU: the tiny LowDiff and EDM checkpoints of :func:`write_dry_run_models` in ``out``."""
    lowdiff, edm, latent, latent_base = (
        str(out / "dry-run-models" / f"{name}.pt")
        for name in ("tiny-lowdiff", "tiny-edm", "tiny-latent-lowdiff", "tiny-latent-base")
    )
    return Plan(
        device="cpu",
        parity_seeds=4,
        parity_checkpoint=lowdiff,
        parity_engines=[("torch", "fp32", False), ("cudagraph", "fp32", False), ("onnxruntime", "fp32", False)],
        compile_gate=[("compile", "fp32", False)],
        compile_parity=[("compile", "bf16", False)],
        models={
            "profile": ["--checkpoint", lowdiff],
            "cost": ["--checkpoint", lowdiff, "--compare", edm],
            "bench": ["--checkpoint", lowdiff, "--compare", edm],
            "saturation": ["--checkpoint", lowdiff],
            "dit": ["--checkpoint", latent, "--compare", latent_base],
        },
        profile_batch=2,
        profile_engines="torch,cudagraph",
        cost_groups={
            "cost-torch": ("torch", "1,2"),
            "cost-cudagraph": ("cudagraph", "1,2"),
            "cost-compile": ("compile", "1,2"),
        },
        cost_warmup=1,
        cost_repeats=1,
        bench_engines="torch",
        bench_all_engines="torch,compile",
        bench_batch=2,
        bench_runs=1,
        saturation={"saturation-cudagraph": "torch", "saturation-compile": "compile"},
        saturation_args={
            "max-batch": "2",
            "users": "1,2",
            "ramp-s": "3",
            "window-s": "2",
            "bench-runs": "1",
            "threads": "1",
        },
        train_models=[lowdiff, edm],
        train_precision="fp32",
        train_batch=2,
        train_batch_gpu=0,
        train_warmup=2,
        train_steps=2,
        dit_engine="torch:bf16",
        dit_batch=2,
        dit_runs=1,
        overlap_model=lowdiff,
        overlap_compare=edm,
        overlap_engines=["torch:fp32"],
        overlap_buckets=(1, 2),
        overlap_max_batch=2,
        overlap_outstanding=8,
        overlap_warm_s=1.0,
        overlap_window_s=2.0,
        # Expected times measured on a loaded 2-core Xeon; the limits leave room for a 2-3x slower or busier
        # host (an AMD EPYC runner here ran the samplers 2.3x slower, and parity or cost-torch then ran out
        # of their old 120 / 60 s under load).
        times={  # most of it is starting Python processes
            "environment": (5, 30),
            "parity": (15, 240),
            "profile": (12, 60),
            "cost-torch": (15, 180),
            "cost-cudagraph": (10, 60),
            "bench-base": (12, 90),
            "train-throughput": (12, 90),
            "dit-ratio": (12, 90),
            "scheduler-overlap": (20, 90),
            "compile-gate": (12, 90),
            "saturation-cudagraph": (55, 120),
            "bench-all": (13, 90),
            "cost-compile": (16, 60),
            "profile-compile": (12, 60),
            "parity-compile": (12, 90),
            "saturation-compile": (65, 120),
        },
    )


def write_dry_run_models(out: Path) -> None:
    """Tiny checkpoints for the dry run: a 3-stage LowDiff (8-16-32, 4/4/3 Heun steps) and a 1-stage EDM
    baseline (32, 6 steps), both on an 8-channel network: every engine path, in seconds; and for
    ``dit-ratio`` a 2-stage latent LowDiff (4×4 → 8×8, 6 + 4 Euler steps) and its 1-stage baseline (8×8,
    8 steps), both a width-32 DiT with guidance on 4-channel latents and a tiny KL decoder to 16×16 RGB."""
    import torch

    from lowdiff.autoencoder import AutoencoderConfig
    from lowdiff.configs import ModelConfig
    from lowdiff.dit import DiTConfig
    from lowdiff.model import LowDiffModel
    from lowdiff.network import NetworkConfig
    from lowdiff.schedule import CascadeSchedule, FlowStageSchedule, StageSchedule

    narrow = {"sigma_min": 0.01, "sigma_max": 50.0}
    schedules = {
        "tiny-lowdiff": CascadeSchedule((
            StageSchedule(8, 4, truncate_at=2),
            StageSchedule(16, 4, truncate_at=2, final_step="euler", **narrow),
            StageSchedule(32, 3, **narrow),
        )),
        "tiny-edm": CascadeSchedule((StageSchedule(32, 6),)),
    }  # fmt: skip
    folder = out / "dry-run-models"
    folder.mkdir(parents=True, exist_ok=True)
    for name, schedule in schedules.items():
        net = NetworkConfig(
            img_resolution=32, img_channels=1, label_dim=10, resolutions=schedule.resolutions, model_channels=8,
            channel_mult=(1, 1, 2), num_blocks=1, attn_resolutions=(8,), dropout=0.0, augment_dim=0,
        )  # fmt: skip
        torch.manual_seed(0)
        model = LowDiffModel(ModelConfig(name, net, schedule, "edm", 2, "gpu_check --cpu-dry-run"))
        with torch.no_grad():  # zero-initialised output layers: perturb, so the output depends on the input
            for param in model.denoiser.parameters():
                param.add_(torch.randn_like(param) * 0.02)
        model.save(folder / f"{name}.pt")
    guide = {"guidance_scale": 2.0, "guidance_start": 0.1, "shift": 0.5}
    latent_schedules = {
        "tiny-latent-lowdiff": CascadeSchedule((
            FlowStageSchedule(4, 8, truncate_at=6, **guide), FlowStageSchedule(8, 4, **guide),
        )),
        "tiny-latent-base": CascadeSchedule((FlowStageSchedule(8, 8, **guide),)),
    }  # fmt: skip
    autoencoder = AutoencoderConfig(
        ch=32, ch_mult=(1, 1), num_res_blocks=1, z_channels=4, encoder_attn_levels=(), decoder_attn_levels=(1,)
    )  # fmt: skip
    for name, schedule in latent_schedules.items():
        dit = DiTConfig(img_resolution=8, img_channels=4, label_dim=10, resolutions=schedule.resolutions,
                        hidden_size=32, depth=2, num_heads=2)  # fmt: skip
        torch.manual_seed(0)
        model = LowDiffModel(ModelConfig(name, dit, schedule, "flow", description="gpu_check --cpu-dry-run",
                                         autoencoder=autoencoder))  # fmt: skip
        with torch.no_grad():  # LightningDiT zero-initialises adaLN and the output layers
            for param in model.denoiser.parameters():
                param.add_(torch.randn_like(param) * 0.05)
        model.save(folder / f"{name}.pt")


# ---------------------------------------------------------------------------- environment
def environment(inductor_cache: Path) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cpu_count": os.cpu_count(),
        "inductor_cache": str(inductor_cache),
    }
    try:
        import torch._dynamo

        info["dynamo_recompile_limit"] = torch._dynamo.config.recompile_limit
    except (ImportError, AttributeError):
        info["dynamo_recompile_limit"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["compute_capability"] = f"{props.major}.{props.minor}"
    for name in ("triton", "onnxruntime", "tensorrt", "fastapi", "uvicorn", "locust", "matplotlib"):
        if importlib.util.find_spec(name) is None:
            info[name] = None
            continue
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "installed")
        except Exception as exc:  # noqa: BLE001 -- a broken install is worth recording, not fatal
            info[name] = f"import failed: {type(exc).__name__}: {exc}"
    if info.get("onnxruntime") and not str(info["onnxruntime"]).startswith("import failed"):
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    try:
        smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        info["nvidia_smi"] = None
    return info


# ---------------------------------------------------------------------------- the parity worker
def variant_name(kind: str, precision: str, tf32: bool, device: str) -> str:
    return f"{kind} {precision}" + (" +tf32" if tf32 and device == "cuda" and precision == "fp32" else "")


def file_stem(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def level_difference(images: Any, reference: Any) -> dict[str, float]:
    diff = (images.int() - reference.int()).abs().float()
    return {
        "max_levels": float(diff.max()),
        "mean_levels": float(diff.mean()),
        "share_over_2_levels": float((diff > 2).float().mean()),
    }


def parity_worker(
    out: Path, device: str, variants: list[tuple[str, str, bool]], n_seeds: int, checkpoint: str | None
) -> None:
    """Each variant's parity and determinism → ``out/parity/<name>.json`` and its images ``<name>.pt``,
    written as soon as that variant is done (the orchestrator may stop this process at its time limit)."""
    import torch

    from lowdiff.engines import load_engine
    from lowdiff.errors import EngineUnavailable, LowDiffError
    from lowdiff.model import LowDiffModel

    folder = out / "parity"
    folder.mkdir(parents=True, exist_ok=True)
    model = LowDiffModel.load(checkpoint)
    seeds = list(range(n_seeds))
    labels = [s % model.config.num_classes for s in seeds]
    ref_path = folder / "reference.pt"
    if ref_path.exists():
        reference = torch.load(ref_path)
    else:
        reference = load_engine(model, "torch", "cpu", "fp32").generate(seeds, labels)
        torch.save(reference, ref_path)
    for kind, precision, tf32 in variants:
        name = variant_name(kind, precision, tf32, device)
        entry: dict[str, Any] = {"engine": kind, "precision": precision, "tf32": tf32, "name": name}
        if device == "cuda":
            torch.backends.cudnn.allow_tf32 = tf32
        try:
            start = time.perf_counter()
            engine = load_engine(model, kind, device, precision)
            entry["load_s"] = time.perf_counter() - start
            start = time.perf_counter()
            images = engine.generate(seeds, labels)
            entry["first_generate_s"] = time.perf_counter() - start
            entry.update(level_difference(images, reference))
            torch.save(images, folder / f"{file_stem(name)}.pt")
            # Determinism: alone vs position 3 of a batch of 7 (other seeds/classes around it), the same batch twice.
            alone = engine.generate([5], [3])
            batch_seeds, batch_labels = [11, 12, 13, 5, 14, 15, 16], [0, 1, 2, 3, 4, 5, 6]
            first = engine.generate(batch_seeds, batch_labels)
            second = engine.generate(batch_seeds, batch_labels)
            entry["alone_vs_batch_max_levels"] = float((alone[0].int() - first[3].int()).abs().max())
            entry["same_batch_twice_identical"] = bool(torch.equal(first, second))
            del engine
        except LowDiffError as exc:
            entry["unavailable" if isinstance(exc, EngineUnavailable) else "error"] = exc.message
        except Exception as exc:  # noqa: BLE001 -- a failing engine is a finding, the check goes on
            entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["traceback"] = traceback.format_exc()
        finally:
            if device == "cuda":
                torch.backends.cudnn.allow_tf32 = True
                torch.cuda.empty_cache()
        print(json.dumps({k: v for k, v in entry.items() if k != "traceback"}), flush=True)
        (folder / f"{file_stem(name)}.json").write_text(json.dumps(entry, indent=1) + "\n")


def collect_parity(out: Path, plan: Plan) -> dict[str, Any]:
    """The parity entries written so far, in plan order (a variant cut off by a time limit is 'not run')."""
    folder = out / "parity"
    results = []
    for kind, precision, tf32 in plan.parity_engines + plan.compile_gate + plan.compile_parity:
        name = variant_name(kind, precision, tf32, plan.device)
        path = folder / f"{file_stem(name)}.json"
        if path.exists():
            results.append(json.loads(path.read_text()))
    seeds = list(range(plan.parity_seeds))
    model = plan.parity_checkpoint or "the embedded model"
    return {"seeds": seeds, "reference": f"torch fp32 on the CPU, {model}", "results": results}


def save_parity_picture(out: Path, results: list[dict[str, Any]]) -> str | None:
    """One row per engine, the CPU reference first, so differences can be seen, not only counted."""
    try:
        import torch
        from PIL import Image, ImageDraw
    except ImportError as exc:
        return f"skipped: {exc}"
    folder = out / "parity"
    if not (folder / "reference.pt").exists():
        return None
    rows = [("CPU fp32 (reference)", torch.load(folder / "reference.pt"))]
    for entry in results:
        path = folder / f"{file_stem(entry['name'])}.pt"
        if path.exists():
            rows.append((entry["name"], torch.load(path)))
    label_w, gap = 170, 2
    n, c, h, w = rows[0][1].shape
    canvas = Image.new("L", (label_w + n * (w + gap), len(rows) * (h + gap)), 255)
    draw = ImageDraw.Draw(canvas)
    for i, (name, images) in enumerate(rows):
        y = i * (h + gap)
        draw.text((4, y + h // 2 - 6), name, fill=0)
        for j in range(n):
            tile = images[j, 0] if c == 1 else images[j].float().mean(0).to(torch.uint8)
            canvas.paste(Image.fromarray(tile.numpy(), "L"), (label_w + j * (w + gap), y))
    canvas = canvas.resize((canvas.width * 2, canvas.height * 2), Image.NEAREST)
    canvas.save(out / "parity.png")
    return str(out / "parity.png")


# ---------------------------------------------------------------------------- the training-throughput worker
PAPER_DIT_RATIO = 1.65  # the paper's speed-up of LowDiff-B/1 (45 + 50 NFE) over LightningDiT-B/1 (100 NFE)
EDM_CIFAR_MIMG = 200  # EDM's CIFAR-10 training length (Mimg), to turn images/s into days


def train_worker(out: Path, plan: Plan) -> None:
    """Per model of ``plan.train_models``: ``lowdiff.training.Trainer`` on random [−1, 1] images (256
    levels) with random labels, already on the device (no data loader), ``plan.train_warmup`` untimed
    steps, then ``plan.train_steps`` timed ones (synchronised) → ``out/train-throughput/<name>.json``,
    written as soon as that model is done. Out of memory at a ``batch_gpu``: retried at half of it."""
    import dataclasses

    import torch

    from lowdiff.configs import get_config
    from lowdiff.model import LowDiffModel

    folder = out / "train-throughput"
    folder.mkdir(parents=True, exist_ok=True)
    cuda = plan.device == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for spec in plan.train_models:
        entry: dict[str, Any] = {"model": spec, "device": plan.device, "precision": plan.train_precision}
        try:
            config = LowDiffModel.load(spec).config if spec.endswith(".pt") else get_config(spec)
            if plan.train_batch:
                config = dataclasses.replace(
                    config, training=dataclasses.replace(config.training, batch_size=plan.train_batch)
                )
            batch = config.training.batch_size
            net = config.network
            entry.update(config=config.name, batch=batch, resolutions=list(config.resolutions),
                         image_shape=[net.img_channels, net.img_resolution, net.img_resolution],
                         augment_p=config.training.augment_p)  # fmt: skip
            if cuda:
                entry["gpu"] = torch.cuda.get_device_name(0)
            batch_gpu = min(plan.train_batch_gpu or batch, batch)
            while True:
                entry["batch_gpu"] = batch_gpu
                try:
                    entry.update(time_training(config, plan, batch_gpu, sync))
                    break
                except torch.cuda.OutOfMemoryError:
                    if batch_gpu == 1 or batch % (batch_gpu // 2):
                        raise
                entry.setdefault("out_of_memory_at_batch_gpu", []).append(batch_gpu)
                print(f"{spec}: out of memory at batch_gpu {batch_gpu}; trying {batch_gpu // 2}", flush=True)
                batch_gpu //= 2
                gc.collect()  # the failed attempt's trainer, then its cached blocks
                torch.cuda.empty_cache()
        except Exception as exc:  # noqa: BLE001 -- a failing config is a finding, the next one goes on
            entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["traceback"] = traceback.format_exc()
        finally:
            if cuda:
                torch.cuda.empty_cache()
        print(json.dumps({k: v for k, v in entry.items() if k != "traceback"}), flush=True)
        (folder / f"{file_stem(Path(spec).stem)}.json").write_text(json.dumps(entry, indent=1) + "\n")


def time_training(config: Any, plan: Plan, batch_gpu: int, sync: Callable[[], None]) -> dict[str, Any]:
    """One model's timed training steps (see :func:`train_worker`)."""
    import torch

    from lowdiff.training import Trainer, TrainOptions

    device = torch.device(plan.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    batch, net = config.training.batch_size, config.network
    with tempfile.TemporaryDirectory(prefix="gpu-check-train-") as run_dir:
        start = time.perf_counter()
        options = TrainOptions(device=plan.device, precision=plan.train_precision, batch_gpu=batch_gpu, seed=0)
        trainer = Trainer(config, options, Path(run_dir))
        gen = torch.Generator(device).manual_seed(0)
        shape = (batch, net.img_channels, net.img_resolution, net.img_resolution)
        images = torch.randint(0, 256, shape, generator=gen, device=device).float() / 127.5 - 1
        labels = None
        if config.num_classes:
            labels = torch.randint(0, config.num_classes, (batch,), generator=gen, device=device)
        sync()
        result: dict[str, Any] = {
            "parameters": sum(p.numel() for p in trainer.denoiser.parameters()),
            "build_s": time.perf_counter() - start,
        }
        start = time.perf_counter()
        for _ in range(plan.train_warmup):
            trainer.train_step(images, labels)
        sync()
        result["warmup_steps"] = plan.train_warmup
        result["warmup_s"] = time.perf_counter() - start
        steps = []
        for _ in range(plan.train_steps):
            start = time.perf_counter()
            trainer.train_step(images, labels)
            sync()
            steps.append(time.perf_counter() - start)
        total, n = sum(steps), len(steps)
        result.update(
            steps=n, step_s_all=steps, step_s_mean=total / n, step_s_median=sorted(steps)[n // 2],
            images_per_s=batch * n / total, skipped_steps=trainer.skipped_steps,
            days_for_edm_cifar_length=EDM_CIFAR_MIMG * 1e6 * total / (batch * n) / 86400,
        )  # fmt: skip
        if device.type == "cuda":
            result["peak_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
            result["peak_memory_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        del trainer
    return result


def collect_train_throughput(out: Path, plan: Plan) -> dict[str, Any]:
    """The models timed so far, in plan order → ``train-throughput.json`` and ``.md`` in ``out``."""
    results = []
    for spec in plan.train_models:
        path = out / "train-throughput" / f"{file_stem(Path(spec).stem)}.json"
        if path.exists():
            results.append(json.loads(path.read_text()))
    report = {"device": plan.device, "precision": plan.train_precision, "results": results}
    (out / "train-throughput.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "train-throughput.md").write_text(train_throughput_markdown(report))
    return report


def train_throughput_markdown(report: dict[str, Any]) -> str:
    rows = []
    for e in report["results"]:
        note = one_line(e.get("error", ""), 160).replace("|", "/")
        if e.get("out_of_memory_at_batch_gpu"):
            note = f"out of memory at batch_gpu {e['out_of_memory_at_batch_gpu']}; " + note
        if "images_per_s" not in e:
            rows.append([e.get("config", e["model"]), *["–"] * 9, note])
            continue
        peak = e.get("peak_memory_allocated_gib")
        rows.append([
            e["config"], e.get("gpu", e["device"]), e["precision"], str(e["batch"]),
            f"{e['batch_gpu']} × {e['batch'] // e['batch_gpu']}", f"{e['parameters'] / 1e6:.1f} M",
            f"{e['step_s_mean']:.3f} ({e['steps']} steps)", f"**{e['images_per_s']:.1f}**",
            "–" if peak is None else f"{peak:.1f}", f"{e['days_for_edm_cifar_length']:.1f}", note,
        ])  # fmt: skip
    head = ["config", "device", "precision", "global batch", "batch_gpu × rounds", "parameters", "step s (mean)",
            "images/s", "peak memory GiB", f"days for {EDM_CIFAR_MIMG} Mimg", "note"]  # fmt: skip
    return "\n".join([
        "# Training throughput (one device, random images on the device, no data loader)", "",
        *md_table(rows, head), "",
        f"Days for {EDM_CIFAR_MIMG} Mimg: EDM's CIFAR-10 training length at this throughput on one device.",
    ]) + "\n"  # fmt: skip


def dit_ratio_summary(path: Path) -> dict[str, Any] | None:
    """The cascade-vs-baseline ratio from ``lowdiff bench``'s JSON: with the decode (the bench's own
    ``ratio``, throughput of the first model over the second) and without it (denoising alone)."""
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    results = data.get("results", [])
    if len(results) < 2 or data.get("ratio") is None:
        return None
    first, other = results[0], results[len(results) // 2]

    def split(r: dict[str, Any]) -> dict[str, Any]:
        decode = sum(s["latency_s_mean"] for s in r.get("stages", []) if s.get("stage") == "decode")
        return {"config": r["config"], "engine": r["engine"], "precision": r.get("precision"), "batch": r["batch"],
                "latency_s_mean": r["latency_s_mean"], "decode_s_mean": decode,
                "denoise_s_mean": r["latency_s_mean"] - decode, "nfe": r.get("nfe")}  # fmt: skip

    cascade, baseline = split(first), split(other)
    without = baseline["denoise_s_mean"] / cascade["denoise_s_mean"] if cascade["denoise_s_mean"] > 0 else None
    return {"cascade": cascade, "baseline": baseline, "ratio_with_decode": data["ratio"],
            "ratio_without_decode": without, "paper_ratio": PAPER_DIT_RATIO}  # fmt: skip


def dit_ratio_line(summary: dict[str, Any]) -> str:
    cascade, baseline, without = summary["cascade"], summary["baseline"], summary["ratio_without_decode"]
    return (
        f"Cascade {cascade['config']} vs baseline {baseline['config']}: **{summary['ratio_with_decode']:.3f}×** "
        f"with the decode" + ("" if without is None else f", {without:.3f}× without it")
        + f" (the paper: {summary['paper_ratio']:.2f}×); the decode takes "
        f"{cascade['decode_s_mean']:.3f} s of the cascade's {cascade['latency_s_mean']:.3f} s a batch."
    )  # fmt: skip


# ---------------------------------------------------------------------------- the scheduler-overlap worker
# staged+overlap: the served default (--overlap-backlog 2 × the last stage's limit); +always: backlog 0,
# the lower lane always beside the last (what run 4 measured); +prio: the last lane's CUDA stream at high
# priority (StagedBatcher's last_lane_priority)
OVERLAP_SCHEDULERS = ("cascade", "staged", "staged+overlap", "staged+overlap+always", "staged+overlap+prio")


def overlap_worker(out: Path, plan: Plan) -> None:
    """Saturated throughput of the service's own batchers in-process, per engine of ``plan.overlap_engines``:
    whole-cascade batches, stage-level batches, and stage-level batches with ``--stage-overlap on`` (on CUDA
    each lane its own stream). Closed loop: ``plan.overlap_outstanding`` single-image requests always
    outstanding (a new one as each is answered), measured over ``plan.overlap_window_s`` after
    ``plan.overlap_warm_s``; images/s counts the images of the last-stage batches that ended after the
    window's first such batch, up to its last, over that time (whole batches, none cut in two; at least
    two batches must end in the window). Also: the share of the window both lanes
    ran at once, and the largest difference in 8-bit levels between the schedulers' images of the same
    (class, seed) (0 expected on the CPU; on a GPU what batch composition alone changes, ≤ 1 in parity).
    → ``out/scheduler-overlap/<engine>.json``, written as soon as that engine is done."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from lowdiff.engines import CascadeEngine, load_engine
    from lowdiff.model import load_model
    from lowdiff.service.batcher import Batcher
    from lowdiff.service.metrics import ServiceMetrics
    from lowdiff.service.staged import StagedBatcher, default_stage_limits

    folder = out / "scheduler-overlap"
    folder.mkdir(parents=True, exist_ok=True)

    def load(spec: str) -> Any:
        return load_model(spec, None) if spec.endswith(".pt") else load_model(None, spec)

    def build(model: Any, engine_spec: str) -> tuple[Any, tuple[int, ...] | None]:
        """The engine of ``engine_spec`` ("kind:precision[@staged]") and its largest cudagraph bucket per stage."""
        kind_precision, _, suffix = engine_spec.partition("@")
        kind, _, precision = kind_precision.partition(":")
        if kind != "cudagraph":
            return load_engine(model, kind, plan.device, precision), None
        from lowdiff.engines.cudagraph import cudagraph_runners

        staged = suffix == "staged"
        runners = cudagraph_runners(model, plan.device, precision, buckets=plan.overlap_buckets,
                                    stage_limits=limits if staged else None)  # fmt: skip
        largest = tuple(limits.values()) if staged else (plan.overlap_buckets[-1],) * len(limits)
        return CascadeEngine(model, runners, kind, plan.device, precision), largest

    model = load(plan.overlap_model)
    resolutions = tuple(model.config.resolutions)
    limits = default_stage_limits(resolutions, plan.overlap_max_batch)
    classes = max(1, model.config.num_classes)

    async def closed_loop(engine: Any, scheduler: str) -> dict[str, Any]:
        metrics = ServiceMetrics()
        executors = [ThreadPoolExecutor(1), ThreadPoolExecutor(1)]
        queue = 4 * plan.overlap_outstanding
        if scheduler == "cascade":
            batcher: Any = Batcher(engine, executors[0], metrics, plan.overlap_max_batch, 0.0, queue)
        else:
            batcher = StagedBatcher(engine, executors[0], metrics, resolutions, limits, 0.0, queue,
                                    overlap="+overlap" in scheduler, last_executor=executors[1],
                                    device=plan.device, last_lane_priority=scheduler.endswith("+prio"),
                                    overlap_backlog=0 if scheduler.endswith("+always") else None)  # fmt: skip
        answered: list[float] = []  # ticket.last_end of every answer
        kept: dict[int, Any] = {}
        batcher.start()

        async def user(u: int) -> None:
            i = 0
            while True:
                seed = u * 100_000 + i
                ticket = batcher.submit([seed], [seed % classes], deadline=time.monotonic() + 600)
                image = (await ticket.future)[0]
                answered.append(
                    ticket.last_end or time.monotonic()
                )  # when its last-stage batch ended: one time per batch
                if i < 2:
                    kept[seed] = image
                i += 1

        start = time.monotonic()
        users = [asyncio.create_task(user(u)) for u in range(plan.overlap_outstanding)]
        await asyncio.sleep(plan.overlap_warm_s + plan.overlap_window_s)
        for task in users:
            task.cancel()
        await batcher.close()
        await asyncio.to_thread(lambda: [e.shutdown(wait=True) for e in executors])  # no call left running
        begin, end = start + plan.overlap_warm_s, start + plan.overlap_warm_s + plan.overlap_window_s
        inside = sorted(t for t in answered if begin <= t <= end)
        first, last = (inside[0], inside[-1]) if inside else (begin, begin)
        counted = sum(1 for t in inside if t > first)  # the images of the batches after the first
        text = metrics.exposition().decode()
        both = re.search(r"^lowdiff_stage_lanes_overlap_seconds_total (\S+)$", text, re.M)
        return {
            "scheduler": scheduler,
            "images_per_s": counted / (last - first) if last > first else None,
            "answered_in_window": len(inside),
            "answered_total": len(answered),
            "both_lanes_busy_s": float(both.group(1)) if both else 0.0,
            "run_s": plan.overlap_warm_s + plan.overlap_window_s,
            "images": kept,
        }

    for engine_spec in plan.overlap_engines:
        entry: dict[str, Any] = {"engine": engine_spec, "model": model.config.name, "device": plan.device,
                                 "max_batch": plan.overlap_max_batch, "limits": {str(r): n for r, n in limits.items()},
                                 "outstanding": plan.overlap_outstanding, "warm_s": plan.overlap_warm_s,
                                 "window_s": plan.overlap_window_s}  # fmt: skip
        try:
            began = time.perf_counter()
            engine, buckets = build(model, engine_spec)
            if buckets is not None:
                entry["largest_bucket_per_stage"] = list(buckets)
            entry["load_s"] = time.perf_counter() - began
            results = []
            for scheduler in OVERLAP_SCHEDULERS:
                result = asyncio.run(closed_loop(engine, scheduler))
                results.append(result)
                print(json.dumps({k: v for k, v in result.items() if k != "images"}), flush=True)
            base = results[0]["images_per_s"]
            reference = results[0]["images"]
            for result in results:
                rate, images = result["images_per_s"], result.pop("images")
                result["vs_cascade"] = rate / base if rate and base else None
                common = [seed for seed in images if seed in reference]
                result["same_seed_images"] = len(common)
                result["max_levels_vs_cascade"] = max(
                    (float((images[s].int() - reference[s].int()).abs().max()) for s in common), default=None
                )
            entry["results"] = results
        except Exception as exc:  # noqa: BLE001 -- a failing engine is a finding, the next one goes on
            entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["traceback"] = traceback.format_exc()
        finally:
            if plan.device == "cuda":
                torch.cuda.empty_cache()
        print(json.dumps({k: v for k, v in entry.items() if k not in ("traceback", "results")}), flush=True)
        (folder / f"{file_stem(engine_spec)}.json").write_text(json.dumps(entry, indent=1) + "\n")

    # The one-stage baseline on the first engine, whole-cascade batches (its only stage): the
    # LowDiff/baseline ratio of each scheduler, same engine, same run.
    engine_spec = plan.overlap_engines[0]
    compare: dict[str, Any] = {"engine": engine_spec, "model": plan.overlap_compare}
    try:
        engine, _ = build(load(plan.overlap_compare), engine_spec)
        result = asyncio.run(closed_loop(engine, "cascade"))
        result.pop("images")
        compare.update(result)
    except Exception as exc:  # noqa: BLE001 -- recorded; the schedulers' results stand without it
        compare["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if plan.device == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps(compare), flush=True)
    (folder / "compare.json").write_text(json.dumps(compare, indent=1) + "\n")


def collect_overlap(out: Path, plan: Plan) -> dict[str, Any]:
    """The engines measured so far → ``scheduler-overlap.json`` and ``.md`` in ``out``."""
    results = []
    for spec in plan.overlap_engines:
        path = out / "scheduler-overlap" / f"{file_stem(spec)}.json"
        if path.exists():
            results.append(json.loads(path.read_text()))
    report: dict[str, Any] = {"device": plan.device, "model": plan.overlap_model, "results": results}
    compare = out / "scheduler-overlap" / "compare.json"
    if compare.exists():
        report["compare"] = json.loads(compare.read_text())
    (out / "scheduler-overlap.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "scheduler-overlap.md").write_text(overlap_markdown(report))
    return report


def overlap_markdown(report: dict[str, Any]) -> str:
    rows = []
    for e in report["results"]:
        if "results" not in e:
            rows.append([e["engine"], "–", "–", "–", "–", "–", one_line(e.get("error", ""), 160).replace("|", "/")])
            continue
        for r in e["results"]:
            rate, ratio, levels = r["images_per_s"], r["vs_cascade"], r["max_levels_vs_cascade"]
            both = r["both_lanes_busy_s"] / r["run_s"] if "+overlap" in r["scheduler"] else None
            rows.append([
                e["engine"], r["scheduler"], "–" if rate is None else f"{rate:.1f}",
                "–" if ratio is None else f"**{ratio:.3f}**", "–" if both is None else f"{100 * both:.0f} %",
                "–" if levels is None else f"{levels:.0f} ({r['same_seed_images']} images)", "",
            ])  # fmt: skip
    head = ["engine", "scheduler", "images/s", "× cascade", "both lanes busy", "max levels vs cascade", "note"]
    first = report["results"][0] if report["results"] else {}
    return "\n".join([
        "# Saturated throughput: cascade vs staged vs staged + overlap (the batchers in-process, closed loop)", "",
        f"Model {first.get('model', report['model'])}, max batch {first.get('max_batch', '?')}, stage limits "
        f"{first.get('limits', '?')}, {first.get('outstanding', '?')} single-image requests outstanding, "
        f"{first.get('window_s', '?')} s measured after {first.get('warm_s', '?')} s. The issue's goal: staged + "
        "overlap ≥ 1.15× cascade.", "",
        *md_table(rows, head), "",
        *overlap_compare_lines(report),
    ]) + "\n"  # fmt: skip


def overlap_compare_lines(report: dict[str, Any]) -> list[str]:
    """The baseline's saturated throughput and every scheduler's ratio to it (the issue's ≥ 1.55)."""
    c = report.get("compare")
    if not c:
        return []
    rate = c.get("images_per_s")
    if not rate:
        return [f"Baseline {c['model']} ({c['engine']}): not measured ({c.get('error', 'no batches in the window')})."]
    ratios = [
        f"{e['engine']} {r['scheduler']} **{r['images_per_s'] / rate:.3f}×**"
        for e in report["results"]
        for r in e.get("results", [])
        if r.get("images_per_s")
    ]
    return [f"Baseline {c['model']} ({c['engine']}, whole-cascade batches, same loop): {rate:.1f} images/s. "
            f"LowDiff / baseline: {'; '.join(ratios)} (the issue's goal: ≥ 1.55 with overlap)."]  # fmt: skip


# ---------------------------------------------------------------------------- subprocess steps
def run_step(cmd: list[str], timeout: float, log: Path, env: dict[str, str]) -> dict[str, Any]:
    """A subprocess step in its own process group (its CUDA context, its time limit); at the limit the
    group is terminated, then killed, so a server or compile workers it started go with it."""
    start = time.perf_counter()
    print("$", " ".join(cmd), f"  (limit {timeout:.0f} s)", flush=True)
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc: int | str = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = f"timed out after {timeout:.0f} s"
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
    seconds = time.perf_counter() - start
    tail = log.read_text(errors="replace")[-2000:]
    print(f"  -> {rc} in {seconds:.0f} s", flush=True)
    return {"command": " ".join(cmd), "returncode": rc, "seconds": seconds, "log_tail": tail}


def saturation_command(engine: str, plan: Plan, out_dir: Path) -> tuple[list[str] | None, str | None]:
    """The sweep's command line, from the flags its ``--help`` offers; (None, reason) when it cannot run."""
    if not SATURATION.exists():
        return None, f"skipped: {SATURATION.relative_to(ROOT)} is missing"
    missing = [m for m in ("fastapi", "uvicorn", "httpx") if importlib.util.find_spec(m) is None]
    try:
        helped = subprocess.run([sys.executable, str(SATURATION), "--help"], cwd=ROOT, capture_output=True,
                                text=True, timeout=60)  # fmt: skip
    except subprocess.TimeoutExpired:
        return None, "skipped: `saturation.py --help` did not answer within 60 s"
    if helped.returncode != 0:
        return None, f"skipped: `saturation.py --help` failed: {(helped.stderr or helped.stdout)[-400:]}"
    text = helped.stdout
    if "locust" in text.lower() and importlib.util.find_spec("locust") is None and shutil.which("locust") is None:
        missing.append("locust")
    if missing:
        return None, f"skipped: the service/load-test packages are missing: {', '.join(missing)}"
    offered = set(re.findall(r"(--[a-z][a-z0-9-]*)", text))
    needed = ["--engine", "--device", "--users"]
    if not set(needed) <= offered:
        return None, f"skipped: its command line has no {', '.join(sorted(set(needed) - offered))} (read from --help)"
    out_flag = "--out-dir" if "--out-dir" in offered else "--out" if "--out" in offered else None
    if out_flag is None:
        return None, "skipped: its command line has no --out/--out-dir (read from --help)"
    cmd = [sys.executable, str(SATURATION.relative_to(ROOT)), "--engine", engine, "--device", plan.device]
    dropped = []
    model = plan.models["saturation"]
    if model and model[0] in offered:
        cmd += model
    elif model:
        dropped.append(model[0].lstrip("-"))
    for flag, value in plan.saturation_args.items():
        if f"--{flag}" in offered:
            cmd += [f"--{flag}", value]
        else:
            dropped.append(flag)
    cmd += [out_flag, str(out_dir)]
    return cmd, (f"flags it does not offer, left out: {', '.join(dropped)}" if dropped else None)


def bench_command(args: list[str], device: str, json_path: Path) -> list[str]:
    return [sys.executable, "-m", "lowdiff", "bench", *args, "--device", device, "--json", str(json_path)]


# ---------------------------------------------------------------------------- summary
def md_table(rows: list[list[str]], head: list[str]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def summary_markdown(report: dict[str, Any]) -> str:
    lines = ["# GPU check" + (" (CPU dry run)" if report.get("dry_run") else ""), ""]
    plan_rows = []
    for name, step in report["steps"].items():
        took = step.get("seconds")
        plan_rows.append([
            name, f"{step['expected_s']:.0f}", f"{step['limit_s']:.0f}",
            "–" if took is None else f"{took:.0f}", one_line(step.get("status", "not run")).replace("|", "/"),
        ])  # fmt: skip
    lines += ["## Steps", "", *md_table(plan_rows, ["step", "expected s", "limit s", "took s", "status"]), ""]
    lines += ["## Environment", "", "```", json.dumps(report.get("environment", {}), indent=1), "```", ""]
    parity = report.get("parity", {}).get("results", [])
    if parity:
        rows = []
        for e in parity:
            note = e.get("unavailable") or e.get("error") or ""
            note = one_line(note, 160).replace("|", "/")
            if "max_levels" in e:
                same = "identical" if e.get("same_batch_twice_identical") else "DIFFERENT"
                if "same_batch_twice_identical" not in e:
                    same = "–"
                alone = e.get("alone_vs_batch_max_levels")
                rows.append([
                    e["name"], f"{e['max_levels']:.0f}", f"{e['mean_levels']:.3f}",
                    f"{100 * e['share_over_2_levels']:.2f} %", "–" if alone is None else f"{alone:.0f}", same,
                    f"{e.get('load_s', 0):.1f}", note,
                ])  # fmt: skip
            else:
                rows.append([e["name"], "–", "–", "–", "–", "–", "–", note])
        head = ["engine", "max levels", "mean levels", "> 2 levels", "alone vs batch", "same batch twice", "load s",
                "note"]  # fmt: skip
        lines += ["## Parity with the CPU fp32 reference, and determinism", "", *md_table(rows, head), ""]
        if report["parity"].get("picture"):
            lines += [f"Picture: `{report['parity']['picture']}`", ""]
    for key in ("profile", "profile-compile"):
        md = report.get("outputs", {}).get(f"{key}.md")
        if md:
            md = md.replace("# Profile of one", f"## {key}: profile of one", 1).replace("\n## ", "\n### ")
            lines += [md, ""]
    costs_md = report.get("outputs", {}).get("costs.md")
    if costs_md:
        costs_md = costs_md.replace("\n### ", "\n#### ").replace("\n## ", "\n### ")
        lines += [costs_md.replace("# Cost table", "## Cost table", 1), ""]
    for key in ("bench-base", "train-throughput", "dit-ratio", "scheduler-overlap", "bench-all"):
        step = report["steps"].get(key, {})
        md = report.get("outputs", {}).get(f"{key}.md")
        if md or step.get("status") not in (None, "not run", "skipped (--skip/--only)"):
            lines += [f"## {key}", "", f"`{step.get('command', '')}` → {step.get('status')}", ""]
            if md:
                md = md.replace("\n# ", "\n### ").removeprefix("# ")
                lines += [md, ""]
            if key == "dit-ratio" and report.get("dit_ratio"):
                lines += [dit_ratio_line(report["dit_ratio"]), ""]
            if not md or step.get("status") != "ok":
                lines += ["```", step.get("log_tail", ""), "```", ""]
    for key in ("saturation-cudagraph", "saturation-compile"):
        step = report["steps"].get(key, {})
        if step.get("status") in (None, "not run", "skipped (--skip/--only)"):
            continue
        lines += [f"## {key}", "", f"`{step.get('command', '-')}` → {step.get('status')}", ""]
        readme = report.get("outputs", {}).get(f"{key}/README.md")
        lines += [readme, ""] if readme else ["```", step.get("log_tail", ""), "```", ""]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- orchestration
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for every result")
    p.add_argument("--cpu-dry-run", action="store_true", help="every step with tiny sizes on the CPU")
    p.add_argument("--dry-run-compile", action="store_true", help="keep torch.compile on in the dry run (slow)")
    p.add_argument("--tar", type=Path, default=None, help="also pack --out into this .tgz after every step")
    # 9.5 min: run 4 (H200) started in ~40 s, which leaves a 15-minute window ~4.5 min for a rerun
    p.add_argument("--deadline-s", type=float, default=570.0, help="time budget of the whole run")
    p.add_argument("--skip", default="", help="comma list of steps (or groups: cost, saturation, bench, compile)")
    p.add_argument("--only", default="", help="comma list of steps (or groups) to run, e.g. for a second run")
    p.add_argument("--inductor-cache", type=Path, default=Path(tempfile.gettempdir()) / "lowdiff-inductor-cache")
    p.add_argument("--plan", action="store_true", help="print the steps and the time estimate, run nothing")
    # internal: one step's worker process
    p.add_argument("--worker", choices=["parity", "train", "overlap"], help=argparse.SUPPRESS)
    p.add_argument("--variants", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    plan = dry_run_plan(args.out) if args.cpu_dry_run else gpu_plan()
    if args.worker == "parity":
        variants = [(k, pr, tf == "tf32") for k, pr, tf in (v.split(":") for v in args.variants.split(","))]
        parity_worker(args.out, plan.device, variants, plan.parity_seeds, plan.parity_checkpoint)
        return 0
    if args.worker == "train":
        train_worker(args.out, plan)
        return 0
    if args.worker == "overlap":
        overlap_worker(args.out, plan)
        return 0

    start_time = time.monotonic()
    deadline = start_time + args.deadline_s
    skip = [s for s in args.skip.split(",") if s]
    only = [s for s in args.only.split(",") if s]
    steps = [s for s in plan.times if not selected(s, skip) and (not only or selected(s, only))]
    expected_total = sum(plan.times[s][0] for s in steps)
    base_total = sum(plan.times[s][0] for s in steps if s not in COMPILE_EXTRA)
    print(f"gpu_check: {'CPU dry run' if args.cpu_dry_run else 'GPU run'}, {len(steps)} steps; estimated "
          f"{base_total / 60:.1f} min without the compile steps, {expected_total / 60:.1f} min with them if "
          f"torch.compile works; at most {args.deadline_s / 60:.1f} min (--deadline-s)", flush=True)  # fmt: skip
    for s in plan.times:
        if s not in steps:
            print(f"  {s:22s} skipped (--skip/--only)", flush=True)
            continue
        print(f"  {s:22s} expected {plan.times[s][0]:4.0f} s, limit {plan.times[s][1]:4.0f} s", flush=True)
    if args.plan:
        return 0

    import torch

    if not args.cpu_dry_run and not torch.cuda.is_available():
        print(f"no CUDA GPU here (torch {torch.__version__}); nothing to check (--cpu-dry-run checks the script)")
        return 0
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    args.inductor_cache.mkdir(parents=True, exist_ok=True)
    if args.cpu_dry_run:
        write_dry_run_models(out)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "TORCHINDUCTOR_CACHE_DIR": str(args.inductor_cache.resolve()),
        "PYTHONUNBUFFERED": "1",
    }
    if args.cpu_dry_run and not args.dry_run_compile:
        env["TORCHDYNAMO_DISABLE"] = "1"  # torch.compile returns the module itself
    report: dict[str, Any] = {
        "dry_run": args.cpu_dry_run,
        "device": plan.device,
        "deadline_s": args.deadline_s,
        "estimate_s": {"without_compile": base_total, "with_compile": expected_total},
        "steps": {
            s: {"expected_s": plan.times[s][0], "limit_s": plan.times[s][1], "status": "not run"} for s in plan.times
        },
        "outputs": {},
    }

    def save() -> None:
        report["elapsed_s"] = time.monotonic() - start_time
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / "gpu_check.md").write_text(summary_markdown(report))
        if args.tar is not None:
            with tarfile.open(args.tar, "w:gz") as tar:
                tar.add(out, arcname=out.name)

    def keep_text(name: str) -> None:
        path = out / name
        if path.exists():
            report["outputs"][name] = path.read_text()

    def step(name: str, body: Callable[[float], dict[str, Any]], gate: str | None = None) -> dict[str, Any]:
        """Run ``body(limit)`` unless skipped; record status/time/result; save."""
        entry = report["steps"][name]
        left = deadline - time.monotonic()
        if selected(name, skip) or (only and not selected(name, only)):
            entry["status"] = "skipped (--skip/--only)"
        elif gate is not None:
            entry["status"] = f"skipped: {gate}"
        elif left < max(5.0, plan.times[name][0] / 4):  # not worth starting with less than a quarter of it
            entry["status"] = f"skipped: deadline (--deadline-s): {left:.0f} s left"
        else:
            limit = min(plan.times[name][1], left)
            print(f"== {name} (limit {limit:.0f} s, {left:.0f} s left)", flush=True)
            entry["status"] = "running"
            began = time.perf_counter()
            try:
                result = body(limit)
                status = result.pop("status", None)
                entry.update(result)
                rc = entry.get("returncode", 0)
                entry["status"] = status or ("ok" if rc == 0 else f"failed: {rc}")
            except Exception as exc:  # noqa: BLE001 -- record and go on to the next step
                entry["status"] = f"error: {type(exc).__name__}: {exc}"
                entry["traceback"] = traceback.format_exc()
                print(entry["traceback"], flush=True)
            entry["seconds"] = time.perf_counter() - began
        save()
        return entry

    # 1. environment
    def do_environment(limit: float) -> dict[str, Any]:
        report["environment"] = environment(args.inductor_cache)
        print(json.dumps(report["environment"], indent=1), flush=True)
        return {"status": "ok"}

    step("environment", do_environment)

    # parity-type steps: the worker writes one file per variant; collect what exists afterwards
    def parity_body(variants: list[tuple[str, str, bool]], log_name: str) -> Callable[[float], dict[str, Any]]:
        def body(limit: float) -> dict[str, Any]:
            for kind, precision, tf32 in variants:  # no stale result of an earlier run in this folder
                for suffix in (".json", ".pt"):
                    (out / "parity" / f"{file_stem(variant_name(kind, precision, tf32, plan.device))}{suffix}").unlink(
                        missing_ok=True
                    )
            spec = ",".join(f"{k}:{pr}:{'tf32' if tf else 'notf32'}" for k, pr, tf in variants)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "parity", "--out", str(out),
                   "--variants", spec] + (["--cpu-dry-run"] if args.cpu_dry_run else [])  # fmt: skip
            result = run_step(cmd, limit, out / f"{log_name}.log", env)
            report["parity"] = collect_parity(out, plan)
            report["parity"]["picture"] = save_parity_picture(out, report["parity"]["results"])
            return result

        return body

    def bench_body(name: str, flags: list[str]) -> Callable[[float], dict[str, Any]]:
        def body(limit: float) -> dict[str, Any]:
            json_path = out / f"{name}.json"
            result = run_step(bench_command(flags, plan.device, json_path), limit, out / f"{name}.log", env)
            keep_text(f"{name}.md")
            return result

        return body

    def cost_body(name: str) -> Callable[[float], dict[str, Any]]:
        engines, batches = plan.cost_groups[name]

        def body(limit: float) -> dict[str, Any]:
            flags = ["--cost-table", *plan.models["cost"], "--engine", engines, "--batches", batches,
                     "--warmup-runs", str(plan.cost_warmup), "--repeats", str(plan.cost_repeats)]  # fmt: skip
            result = bench_body(name, flags)(limit)
            merge_costs()
            return result

        return body

    def merge_costs() -> None:
        from lowdiff.bench.costs import merge_cost_tables, read_cost_table, write_cost_outputs

        parts = []
        for name in plan.cost_groups:
            path = out / f"{name}.json"
            if path.exists():
                try:
                    parts.append(read_cost_table(path))
                except ValueError as exc:
                    print(f"{path}: {exc}", flush=True)
        if parts:
            write_cost_outputs(merge_cost_tables(parts), out / "costs.json")
            keep_text("costs.md")

    def profile_body(name: str, engines: str) -> Callable[[float], dict[str, Any]]:
        flags = ["--profile", *plan.models["profile"], "--engine", engines, "--batch", str(plan.profile_batch),
                 "--warmup-runs", "2"]  # fmt: skip
        return bench_body(name, flags)

    def saturation_body(name: str) -> Callable[[float], dict[str, Any]]:
        def body(limit: float) -> dict[str, Any]:
            sat_dir = out / name
            cmd, note = saturation_command(plan.saturation[name], plan, sat_dir)
            if cmd is None:
                print(f"  {note}", flush=True)
                return {"status": note, "command": "-"}
            result = run_step(cmd, limit, out / f"{name}.log", env)
            if note:
                result["note"] = note
            keep_text(f"{name}/README.md")
            summary = sat_dir / "summary.json"
            if summary.exists():
                result["summary"] = json.loads(summary.read_text())
            return result

        return body

    def train_body(limit: float) -> dict[str, Any]:
        shutil.rmtree(out / "train-throughput", ignore_errors=True)  # no stale result of an earlier run
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "train", "--out", str(out)]
        cmd += ["--cpu-dry-run"] if args.cpu_dry_run else []
        result = run_step(cmd, limit, out / "train-throughput.log", env)
        report["train_throughput"] = collect_train_throughput(out, plan)
        keep_text("train-throughput.md")
        done = report["train_throughput"]["results"]
        failed = [e.get("config", e["model"]) for e in done if "images_per_s" not in e]
        if result["returncode"] == 0 and (failed or len(done) < len(plan.train_models)):
            result["status"] = f"incomplete: {len(done) - len(failed)} of {len(plan.train_models)} models timed"
        return result

    def dit_ratio_body(flags: list[str]) -> Callable[[float], dict[str, Any]]:
        def body(limit: float) -> dict[str, Any]:
            (out / "dit-ratio.json").unlink(missing_ok=True)
            result = bench_body("dit-ratio", flags)(limit)
            report["dit_ratio"] = dit_ratio_summary(out / "dit-ratio.json")
            return result

        return body

    def overlap_body(limit: float) -> dict[str, Any]:
        shutil.rmtree(out / "scheduler-overlap", ignore_errors=True)  # no stale result of an earlier run
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "overlap", "--out", str(out)]
        cmd += ["--cpu-dry-run"] if args.cpu_dry_run else []
        result = run_step(cmd, limit, out / "scheduler-overlap.log", env)
        report["scheduler_overlap"] = collect_overlap(out, plan)
        keep_text("scheduler-overlap.md")
        done = report["scheduler_overlap"]["results"]
        measured = [e for e in done if "results" in e]
        if result["returncode"] == 0 and len(measured) < len(plan.overlap_engines):
            result["status"] = f"incomplete: {len(measured)} of {len(plan.overlap_engines)} engines measured"
        return result

    bench_models = plan.models["bench"]
    bench_sizes = ["--batch", str(plan.bench_batch), "--runs", str(plan.bench_runs)]
    step("parity", parity_body(plan.parity_engines, "parity"))
    step("profile", profile_body("profile", plan.profile_engines))
    step("cost-torch", cost_body("cost-torch"))
    step("cost-cudagraph", cost_body("cost-cudagraph"))
    step("bench-base", bench_body("bench-base", [*bench_models, "--engine", plan.bench_engines, *bench_sizes]))
    step("train-throughput", train_body)
    dit_flags = [*plan.models["dit"], "--engine", plan.dit_engine, "--batch", str(plan.dit_batch), "--runs",
                 str(plan.dit_runs)]  # fmt: skip
    step("dit-ratio", dit_ratio_body(dit_flags))
    step("scheduler-overlap", overlap_body)
    gate_entry = step("compile-gate", parity_body(plan.compile_gate, "compile-gate"))
    gate = None
    gate_results = [e for e in report.get("parity", {}).get("results", []) if e["engine"] == "compile"]
    if gate_entry["status"].startswith("skipped (--skip/--only)"):
        report["compile_gate"] = "not checked (--skip/--only)"
    elif gate_entry["status"] != "ok":
        gate = f"compile-gate {gate_entry['status']}"
    elif not gate_results or "max_levels" not in gate_results[0]:
        why = (gate_results[0].get("error") or gate_results[0].get("unavailable")) if gate_results else "no result"
        gate = f"compile-gate: the compile engine did not run ({one_line(why)})"
    report.setdefault("compile_gate", gate or "passed")
    step("saturation-cudagraph", saturation_body("saturation-cudagraph"))
    step("bench-all", bench_body("bench-all", [*bench_models, "--engine", plan.bench_all_engines, *bench_sizes]), gate)
    step("cost-compile", cost_body("cost-compile"), gate)
    step("profile-compile", profile_body("profile-compile", "compile,compile:bf16"), gate)
    step("parity-compile", parity_body(plan.compile_parity, "parity-compile"), gate)
    step("saturation-compile", saturation_body("saturation-compile"), gate)
    report["finished"] = True
    save()
    print((out / "gpu_check.md").read_text())
    print(f"gpu_check: done in {time.monotonic() - start_time:.0f} s; results in {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
