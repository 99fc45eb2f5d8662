"""Parameter and FLOP counts per config and stage, counted by running the network.

GFLOP per image is one denoiser evaluation of a stage's sub-network at batch 1, counted with
``torch.utils.flop_counter`` (convolutions, matmuls, attention; 1 MAC = 2 FLOP). Networks are
built on the ``meta`` device, so even the paper-size configs cost no memory or time to count.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from lowdiff.configs import BUILTIN_CONFIGS, ModelConfig, get_config
from lowdiff.precond import Denoiser
from lowdiff.schedule import FlowStageSchedule


def build_denoiser(config: ModelConfig, device: str | torch.device = "cpu") -> Denoiser:
    with torch.device(device):
        return Denoiser.build(config.network, config.preconditioning).eval()


def stage_gflops(denoiser: Denoiser, config: ModelConfig, resolution: int, device: str = "meta") -> float:
    c = config.network
    with torch.device(device):
        x = torch.zeros(1, c.img_channels, resolution, resolution)
        sigma = torch.ones(1)
        labels = torch.zeros(1, dtype=torch.long) if c.label_dim else None
        conditioned = config.resolutions.index(resolution) > 0
        cond = torch.zeros_like(x) if conditioned else None
        sigma_cond = torch.ones(1) if conditioned else None
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        denoiser(x, sigma, labels, resolution, cond, sigma_cond)
    return counter.get_total_flops() / 1e9


def describe(config: ModelConfig) -> dict[str, Any]:
    denoiser = build_denoiser(config, "meta")
    params = sum(p.numel() for p in denoiser.parameters())
    stages: list[dict[str, Any]] = []
    for stage in config.schedule.stages:
        entry: dict[str, Any] = {
            "resolution": stage.resolution,
            "gflops_per_evaluation": round(stage_gflops(denoiser, config, stage.resolution), 6),
            "nfe": stage.nfe,
        }
        if isinstance(stage, FlowStageSchedule):
            # A guided step runs the network on the conditional and the null half: NFE counts steps
            # (the paper's and LightningDiT's convention), network_evaluations counts per-image passes.
            entry["solver"] = stage.solver
            entry["guided_steps"] = sum(stage.guided())
            entry["network_evaluations"] = stage.nfe + entry["guided_steps"]
        stages.append(entry)
    per_image = sum(s["gflops_per_evaluation"] * s.get("network_evaluations", s["nfe"]) for s in stages)
    return {
        "params": params,
        "preconditioning": config.preconditioning,
        "num_classes": config.num_classes,
        "class_names": list(config.class_names),
        "gflops_per_image": round(per_image, 6),
        "stages": stages,
        "training": config.training.to_dict(),
    }


def describe_all(names: list[str] | None = None) -> dict[str, dict[str, Any]]:
    names = names or list(BUILTIN_CONFIGS)
    return {name: describe(get_config(name)) for name in names}
