"""Data-parallel training (torch.distributed, gloo on the CPU): 2 processes started by torchrun train
the same weights as 1 process on the same global batch, with or without gradient accumulation.

What must agree and how closely. The runs see the same images and the same σ/noise/augmentation draws
(drawn for the global batch from (seed, step), sliced per rank), and DDP averages per-rank gradients
that are scaled so that their mean is the global batch's gradient. The only difference left is the order
in which per-image gradients are summed (per rank, then across ranks, vs all at once): float32
rounding, ~1e-7 relative on a gradient.
* Adam's first moment (its running mean of the gradients, which a wrong loss scaling would change in
  proportion, unlike the Adam step itself): per tensor within 1e-3 of its largest magnitude (measured
  up to ~1e-4; a gradient off by a factor 2 would be 0.5, other images give ~1).
* The weights after 3 Adam steps at lr 1e-3: within 3e-5 absolute, 1 % of the most any weight can move
  (3 × lr). Adam divides each gradient element by its own running RMS, so an element that is itself at
  rounding level (the near-zero-initialised output layers) can step by a visibly different fraction of
  lr: measured up to ~1e-5 here. Training on other images moves the weights by ≫ this (checked).
Dropout is 0: its masks come from each rank's own generator and could not match.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lowdiff.model import config_to_dict
from lowdiff.training import Trainer, TrainOptions

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3
TOLERANCE = 3e-5  # weights, absolute: 1 % of 3 steps × lr 1e-3
MOMENT_RTOL = 1e-3  # Adam's first moment, relative to its largest magnitude

WORKER = """
import json, sys
from pathlib import Path
import torch
from lowdiff.model import config_from_dict
from lowdiff.training import Distributed, Trainer, TrainOptions

torch.set_num_threads(1)
config = config_from_dict(json.loads(Path(sys.argv[1]).read_text()))
images, labels = torch.load(sys.argv[2])
steps, batch_gpu, out = int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
d = Distributed.from_env()
assert d.world == 2, d
d.start(torch.device("cpu"))
trainer = Trainer(config, TrainOptions(seed=0, batch_gpu=batch_gpu), out.parent / f"rank{d.rank}", d)
batches = iter(trainer.loader(images, labels))
for _ in range(steps):
    x, y = next(batches)
    assert x.shape[0] == config.training.batch_size // 2
    assert trainer.train_step(x, y) is not None
if d.main:
    moments = [trainer.optimizer.state[p]["exp_avg"] for p in trainer.denoiser.parameters()]
    torch.save({"net": trainer.denoiser.net.state_dict(), "ema": trainer.ema.state_dict(), "nimg": trainer.nimg,
                "moments": moments}, out)
d.stop()
"""


def _config(tiny_config):
    base = tiny_config()
    # Augmentation on, so that its per-image draws are sliced across ranks too.
    return replace(base, network=replace(base.network, augment_dim=9)).with_training(
        batch_size=8, lr_rampup_kimg=0.0, augment_p=0.5
    )


def _data(n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 32, 32, generator=gen) * 2 - 1, torch.arange(n) % 10


def _single(config, tmp_path: Path, batch_gpu: int = 0, other_images: bool = False) -> Trainer:
    images, labels = _data()
    if other_images:
        images = images.flip(0)
    trainer = Trainer(config, TrainOptions(seed=0, batch_gpu=batch_gpu), tmp_path / f"single{batch_gpu}{other_images}")
    batches = iter(trainer.loader(images, labels))
    for _ in range(STEPS):
        x, y = next(batches)
        assert trainer.train_step(x, y) is not None
    return trainer


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _moments_agree(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(float((x - y).abs().max()) <= MOMENT_RTOL * float(y.abs().max()) for x, y in zip(a, b))


def _moments(trainer: Trainer) -> list[torch.Tensor]:
    return [trainer.optimizer.state[p]["exp_avg"] for p in trainer.denoiser.parameters()]


def _torchrun() -> list[str]:
    found = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    return [found] if found else [sys.executable, "-m", "torch.distributed.run"]


def test_two_processes_train_what_one_process_trains(tiny_config, tmp_path: Path) -> None:
    config = _config(tiny_config)
    (tmp_path / "config.json").write_text(json.dumps(config_to_dict(config)))
    torch.save(_data(), tmp_path / "data.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = {}
    for batch_gpu in (0, 2):  # 0: one round of 4 per rank; 2: two accumulation rounds per rank
        out = tmp_path / f"ddp{batch_gpu}.pt"
        script = tmp_path / "worker.py"
        script.write_text(WORKER)
        args = [tmp_path / "config.json", tmp_path / "data.pt", STEPS, batch_gpu, out]
        cmd = [*_torchrun(), "--standalone", "--nproc_per_node", "2", str(script), *map(str, args)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[batch_gpu] = torch.load(out, weights_only=True)

    single = _single(config, tmp_path)
    reference = single.denoiser.net.state_dict()
    for batch_gpu, result in results.items():
        assert result["nimg"] == single.nimg == STEPS * 8
        assert _max_diff(result["net"], reference) <= TOLERANCE, batch_gpu
        assert _max_diff(result["ema"], single.ema.state_dict()) <= TOLERANCE, batch_gpu
        assert _moments_agree(result["moments"], _moments(single)), batch_gpu

    # Gradient accumulation in one process (4 rounds of 2) is the same step too.
    accumulated = _single(config, tmp_path, batch_gpu=2)
    assert _max_diff(accumulated.denoiser.net.state_dict(), reference) <= TOLERANCE
    assert _moments_agree(_moments(accumulated), _moments(single))
    # Not vacuous: the same run on other images lands far away, and so do its moments.
    other = _single(config, tmp_path, other_images=True)
    assert _max_diff(other.denoiser.net.state_dict(), reference) > 10 * TOLERANCE
    assert not _moments_agree(_moments(other), _moments(single))


def test_the_batch_must_split_over_processes_and_rounds(tiny_config, tmp_path: Path) -> None:
    from lowdiff.errors import SettingsError
    from lowdiff.training import Distributed

    config = tiny_config().with_training(batch_size=6)
    with pytest.raises(SettingsError) as caught:
        Trainer(config, TrainOptions(), tmp_path, Distributed(rank=0, world=4))
    assert caught.value.field == "batch_size"
    with pytest.raises(SettingsError) as caught:
        Trainer(config, TrainOptions(batch_gpu=4), tmp_path)
    assert caught.value.field == "batch_gpu"
