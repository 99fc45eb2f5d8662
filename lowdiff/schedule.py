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

Latent (rectified-flow) cascades use :class:`FlowStageSchedule` instead: Euler steps in flow time
t ∈ [0, 1] (x_t = t·x + (1 − t)·ε, t = 1 is data, LightningDiT's convention) on a shifted uniform grid,
one evaluation per step (NFE = steps run), with classifier-free guidance inside an interval. A cascade
is all-Heun or all-flow: the two hand a condition on at different kinds of level (σ vs t).
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

    @property
    def handoff_level(self) -> float:
        """The noise level σ_t the stage stops at (0 for a full stage): the next stage's ``sigma_cond``."""
        return float(self.sigmas()[-1])


FLOW_SOLVER = "flow_euler"


@dataclass(frozen=True)
class FlowStageSchedule:
    """One rectified-flow stage: Euler steps on a shifted uniform grid of flow times.

    The grid is t_i = s·u_i / (1 + (s − 1)·u_i) with u_i = i/N, i = 0 … N (LightningDiT's
    ``timestep_shift`` s; s = 1 is uniform, s < 1 spends more steps near the noise end). Each step
    i → i+1 evaluates the velocity once at t_i. LightningDiT's ``num_sampling_steps = N + 1`` (its grid
    points) runs these N evaluations; ``num_steps`` here counts evaluations, so NFE = N for a full stage.

    A truncated stage stops at grid index ``truncate_at`` and hands x(t_trunc) on, upsampled, as the
    next stage's condition (NFE = ``truncate_at``). Guidance: v = v_null + w·(v_cond − v_null) on the
    first ``guidance_channels`` latent channels (None = all) at steps whose t_i ≥ ``guidance_start``
    (LightningDiT's ``cfg_interval_start``); elsewhere the conditional velocity. LightningDiT guides only
    channels 0–2 of its 32 (code inherited from DiT's 4-channel latents); that is the default here so
    that released weights sample as their authors evaluated them.
    """

    resolution: int
    num_steps: int  # N: Euler steps over the full grid 0 … 1
    shift: float = 1.0
    truncate_at: int | None = None  # grid index where the stage stops; None = run to t = 1
    guidance_scale: float = 1.0  # 1 = no guidance (one network evaluation per step)
    guidance_start: float = 0.0  # guide steps with t_i ≥ this
    guidance_channels: int | None = 3  # guide channels [0, n); None = every channel
    solver: str = FLOW_SOLVER

    def __post_init__(self) -> None:
        r = self.resolution
        if self.solver != FLOW_SOLVER:
            raise ConfigError(f"stage {r}: a flow stage's solver is {FLOW_SOLVER!r}, got {self.solver!r}", "schedule")
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or not 1 <= self.num_steps <= 10_000:
            raise ConfigError(f"stage {r}: num_steps must be an integer in 1…10000", "schedule")
        if not 0.0 < self.shift <= 100.0:
            raise ConfigError(f"stage {r}: shift must be in (0, 100], got {self.shift}", "schedule")
        if self.truncate_at is not None and not 1 <= self.truncate_at < self.num_steps:
            raise ConfigError(f"stage {r}: truncate_at must be in 1…{self.num_steps - 1}", "schedule")
        if not 1.0 <= self.guidance_scale <= 100.0:
            raise ConfigError(f"stage {r}: guidance_scale must be in [1, 100], got {self.guidance_scale}", "schedule")
        if not 0.0 <= self.guidance_start <= 1.0:
            raise ConfigError(f"stage {r}: guidance_start must be in [0, 1], got {self.guidance_start}", "schedule")
        if self.guidance_channels is not None and not 1 <= self.guidance_channels <= 4096:
            raise ConfigError(f"stage {r}: guidance_channels must be ≥ 1 or null (all)", "schedule")

    def times(self) -> torch.Tensor:
        """The float64 flow times this stage visits, t_0 = 0 … t_end (t_trunc or 1)."""
        u = torch.arange(self.num_steps + 1, dtype=torch.float64) / self.num_steps
        grid = self.shift * u / (1 + (self.shift - 1) * u)
        grid[-1] = 1.0  # exactly data (the formula gives 1 only up to rounding for s ≠ 1)
        end = self.truncate_at if self.truncate_at is not None else self.num_steps
        return grid[: end + 1]

    def guided(self) -> list[bool]:
        """For each step, whether it is guided (two network evaluations, conditional and null)."""
        if self.guidance_scale == 1.0:
            return [False] * (len(self.times()) - 1)
        return [bool(t >= self.guidance_start) for t in self.times()[:-1]]

    @property
    def nfe(self) -> int:
        return len(self.times()) - 1

    @property
    def truncated(self) -> bool:
        return self.truncate_at is not None

    @property
    def handoff_level(self) -> float:
        """The flow time the stage stops at (1 for a full stage): the next stage's ``sigma_cond``."""
        return float(self.times()[-1])


AnyStage = StageSchedule | FlowStageSchedule


@dataclass(frozen=True)
class CascadeSchedule:
    stages: tuple[AnyStage, ...]

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
        if len({type(s) for s in self.stages}) > 1:
            raise ConfigError("a cascade's stages must all be Heun (σ) or all flow (t) stages", "schedule")

    @property
    def flow(self) -> bool:
        """Whether this is a rectified-flow (latent) cascade."""
        return isinstance(self.stages[0], FlowStageSchedule)

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
            kind = FlowStageSchedule if fields.get("solver") == FLOW_SOLVER else StageSchedule
            stages.append(kind(**fields))
        return cls(tuple(stages))

    def with_stage(self, resolution: int, **changes: object) -> CascadeSchedule:
        """A copy with one stage's fields changed (for sweeps such as the truncation point)."""
        stages = tuple(type(s)(**(asdict(s) | changes)) if s.resolution == resolution else s for s in self.stages)
        return CascadeSchedule(stages)
