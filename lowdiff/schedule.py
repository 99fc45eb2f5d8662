"""The cascade schedule: the one definition of how many denoiser calls run at which σ, per stage.

Every executor (the PyTorch sampler, exported engines, the HTTP service) walks the same
:class:`CascadeSchedule`; nothing else decides step counts or noise levels.

How the paper's NFE counts arise. A stage has a Karras ρ=7 grid of ``num_steps`` noise levels
σ_0 = σ_max … σ_{N-1} = σ_min, then σ_N = 0 (EDM). Each step i → i+1 costs one denoiser
evaluation (Euler) plus one more for the Heun correction, except a step that lands on σ = 0.

* A full stage (the last one) runs all N steps: NFE = 2N − 1 (EDM: N=18 → 35, N=40 → 79).
* A truncated stage stops at grid index ``truncate_at`` = t and hands x(σ_t) on, upsampled, as
  the next stage's condition. It runs t steps; the last step into σ_t is Heun (NFE = 2t) or
  Euler (NFE = 2t − 1), as ``final_step`` says. The paper gives NFEs, not the rule behind
  them: both parities occur in its tables (CIFAR-10 3-stage 18/13/17, FFHQ 22/23/23/39), so the
  order of the hand-off step is explicit data here, chosen to reproduce each published count.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch

from lowdiff.errors import ConfigError

RHO = 7.0


@dataclass(frozen=True)
class StageSchedule:
    resolution: int
    num_steps: int  # N: noise levels in the grid before the final σ = 0
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    truncate_at: int | None = None  # grid index t where the stage stops; None = run to σ = 0
    final_step: Literal["heun", "euler"] = "heun"  # order of the hand-off step of a truncated stage

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ConfigError(f"stage {self.resolution}: num_steps must be ≥ 1", "schedule")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ConfigError(f"stage {self.resolution}: need 0 < sigma_min < sigma_max", "schedule")
        if self.truncate_at is not None and not 1 <= self.truncate_at < self.num_steps:
            raise ConfigError(f"stage {self.resolution}: truncate_at must be in 1…{self.num_steps - 1}", "schedule")
        if self.final_step not in ("heun", "euler"):
            raise ConfigError(f"stage {self.resolution}: final_step must be 'heun' or 'euler'", "schedule")

    def sigmas(self) -> torch.Tensor:
        """The float64 noise levels this stage visits, σ_0 … σ_end (σ_end = σ_t or 0)."""
        i = torch.arange(self.num_steps, dtype=torch.float64)
        lo, hi = self.sigma_min ** (1 / RHO), self.sigma_max ** (1 / RHO)
        grid = (hi + i / max(self.num_steps - 1, 1) * (lo - hi)) ** RHO
        grid = torch.cat([grid, torch.zeros(1, dtype=torch.float64)])
        end = self.truncate_at if self.truncate_at is not None else self.num_steps
        return grid[: end + 1]

    def step_orders(self) -> list[int]:
        """1 (Euler) or 2 (Heun) for each step, in order."""
        steps = len(self.sigmas()) - 1
        orders = [2] * steps
        if self.truncate_at is None or self.final_step == "euler":
            orders[-1] = 1
        return orders

    @property
    def nfe(self) -> int:
        return sum(self.step_orders())

    @property
    def truncated(self) -> bool:
        return self.truncate_at is not None


@dataclass(frozen=True)
class CascadeSchedule:
    stages: tuple[StageSchedule, ...]

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError("a cascade needs at least one stage", "schedule")
        res = [s.resolution for s in self.stages]
        if res != sorted(set(res)):
            raise ConfigError(f"stage resolutions must increase: {res}", "schedule")
        for s in self.stages[:-1]:
            if not s.truncated:
                raise ConfigError(f"stage {s.resolution} is not the last: it needs truncate_at", "schedule")
        if self.stages[-1].truncated:
            raise ConfigError("the last stage runs to σ = 0: it takes no truncate_at", "schedule")

    @property
    def resolutions(self) -> tuple[int, ...]:
        return tuple(s.resolution for s in self.stages)

    @property
    def nfe(self) -> tuple[int, ...]:
        return tuple(s.nfe for s in self.stages)

    def to_dict(self) -> dict:
        return {"stages": [asdict(s) | {"nfe": s.nfe} for s in self.stages]}

    @classmethod
    def from_dict(cls, data: dict) -> CascadeSchedule:
        stages = []
        for s in data["stages"]:
            fields = {k: v for k, v in s.items() if k != "nfe"}
            stages.append(StageSchedule(**fields))
        return cls(tuple(stages))

    def with_stage(self, resolution: int, **changes: object) -> CascadeSchedule:
        """A copy with one stage's fields changed (for sweeps such as the truncation point)."""
        stages = tuple(StageSchedule(**(asdict(s) | changes)) if s.resolution == resolution else s for s in self.stages)
        return CascadeSchedule(stages)
