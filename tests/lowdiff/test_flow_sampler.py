"""Flow-matching Euler stages: the schedule, the solver, guidance, hand-off and per-seed determinism."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from lowdiff.errors import ConfigError
from lowdiff.sampler import FunctionStage, flow_euler_stage, run_cascade, upsample_condition
from lowdiff.schedule import CascadeSchedule, FlowStageSchedule, StageSchedule


def test_the_grid_runs_from_noise_to_data_and_the_shift_spends_steps_near_noise() -> None:
    plain, shifted = FlowStageSchedule(16, 10).times(), FlowStageSchedule(16, 10, shift=0.3).times()
    for grid in (plain, shifted):
        assert grid[0] == 0 and grid[-1] == 1 and bool((grid[1:] > grid[:-1]).all())
    assert bool((shifted[1:-1] < plain[1:-1]).all())
    # LightningDiT's shift: t' = s·t / (1 + (s − 1)·t)
    assert float(shifted[5]) == pytest.approx(0.3 * 0.5 / (1 - 0.7 * 0.5))


def test_nfe_counts_euler_steps_and_truncation_stops_early() -> None:
    assert FlowStageSchedule(16, 100).nfe == 100
    stage = FlowStageSchedule(8, 60, truncate_at=45, shift=0.3)
    assert stage.nfe == 45 and stage.handoff_level == pytest.approx(
        float(FlowStageSchedule(8, 60, shift=0.3).times()[45])
    )
    assert FlowStageSchedule(16, 50).handoff_level == 1.0


def test_guided_steps_follow_the_interval() -> None:
    stage = FlowStageSchedule(16, 10, guidance_scale=4.0, guidance_start=0.35)
    assert stage.guided() == [float(t) >= 0.35 for t in stage.times()[:-1]]
    assert 0 < sum(stage.guided()) < 10
    assert not any(FlowStageSchedule(16, 10, guidance_start=0.0).guided())  # scale 1: never guided


@pytest.mark.parametrize(
    "kwargs",
    [{"num_steps": 0}, {"shift": 0.0}, {"truncate_at": 10}, {"guidance_scale": 0.5}, {"guidance_start": 1.5},
     {"guidance_channels": 0}, {"solver": "heun"}],
)  # fmt: skip
def test_bad_flow_stages_are_config_errors(kwargs: dict) -> None:
    with pytest.raises(ConfigError) as info:
        FlowStageSchedule(**({"resolution": 8, "num_steps": 10} | kwargs))
    assert info.value.field == "schedule"


def test_a_cascade_does_not_mix_heun_and_flow_stages_and_round_trips() -> None:
    with pytest.raises(ConfigError, match="all be Heun"):
        CascadeSchedule((StageSchedule(8, 10, truncate_at=5), FlowStageSchedule(16, 10)))
    schedule = CascadeSchedule(
        (FlowStageSchedule(8, 60, truncate_at=45, guidance_scale=2.0), FlowStageSchedule(16, 50))
    )
    assert CascadeSchedule.from_dict(schedule.to_dict()) == schedule and schedule.flow
    assert schedule.with_stage(8, truncate_at=40).nfe == (40, 50)


def exact_velocity(target: torch.Tensor) -> Callable:
    """The true rectified-flow velocity towards one data point: v(x, t) = (x* − x) / (1 − t)."""

    def fn(x, t, labels, cond, cond_t):
        return (target.float() - x) / (1 - t)[:, None, None, None]

    return fn


def test_euler_on_the_exact_velocity_lands_on_the_straight_path() -> None:
    """Rectified flow's paths are straight: Euler with the true velocity is exact at every grid point."""
    noise, target = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    full = flow_euler_stage(FlowStageSchedule(4, 7, shift=0.3), exact_velocity(target), noise, None, None, None)
    assert torch.allclose(full, target.float().double(), atol=1e-5)
    stage = FlowStageSchedule(4, 7, shift=0.3, truncate_at=3)
    part = flow_euler_stage(stage, exact_velocity(target), noise, None, None, None)
    t = stage.handoff_level
    assert torch.allclose(part, t * target + (1 - t) * noise, atol=1e-5)


def test_guidance_mixes_only_the_chosen_channels_inside_the_interval() -> None:
    calls: list[int] = []

    def fn(x, t, labels, cond, cond_t):
        calls.append(x.shape[0])
        # conditional rows: velocity 1; null rows (label 10): velocity 0
        return (labels != 10).float()[:, None, None, None].expand_as(x).clone()

    noise, labels = torch.zeros(2, 5, 2, 2, dtype=torch.float64), torch.tensor([1, 2])
    stage = FlowStageSchedule(2, 4, guidance_scale=3.0, guidance_start=0.5, guidance_channels=2)
    x = flow_euler_stage(stage, fn, noise, labels, None, None, null_label=10)
    assert calls == [2, 2, 4, 4]  # t = 0, 0.25 unguided; t = 0.5, 0.75 one doubled batch each
    # guided channels: 0.5·1 (unguided part) + 0.5·3 (guided: 0 + 3·(1 − 0)); the rest: 1·1
    assert torch.allclose(x[:, :2], torch.full_like(x[:, :2], 2.0)) and torch.allclose(
        x[:, 2:], torch.ones_like(x[:, 2:])
    )
    all_channels = FlowStageSchedule(2, 4, guidance_scale=3.0, guidance_start=0.5, guidance_channels=None)
    y = flow_euler_stage(all_channels, fn, noise, labels, None, None, null_label=10)
    assert torch.allclose(y, torch.full_like(y, 2.0))
    with pytest.raises(ValueError, match="null class"):
        flow_euler_stage(stage, fn, noise, labels, None, None)


def test_the_next_stage_gets_the_upsampled_partial_output_and_its_time() -> None:
    seen: dict[int, tuple] = {}

    class Recorder:
        def __init__(self, res: int, out: float):
            self.res, self.out = res, out

        def run_stage(self, stage, noise, labels, condition, sigma_cond):
            seen[self.res] = (condition, sigma_cond)
            return torch.full_like(noise, self.out) + torch.arange(noise.shape[-1], dtype=noise.dtype)

    schedule = CascadeSchedule((FlowStageSchedule(4, 10, truncate_at=6, shift=0.5), FlowStageSchedule(8, 5)))
    run_cascade(schedule, {4: Recorder(4, 0.25), 8: Recorder(8, 0.0)}, [0, 1], None, 3)
    condition, t_cond = seen[8]
    first = torch.full((2, 3, 4, 4), 0.25, dtype=torch.float64) + torch.arange(4, dtype=torch.float64)
    assert torch.equal(condition, upsample_condition(first, 8).float())
    assert t_cond == pytest.approx(schedule.stages[0].handoff_level) and seen[4] == (None, None)


def test_a_latent_image_depends_only_on_its_seed_and_class(tiny_latent_model: Callable) -> None:
    model = tiny_latent_model(guidance_scale=2.5)
    runners = model.reference_runners()
    together = run_cascade(model.schedule, runners, [5, 9, 11], torch.tensor([1, 4, 7]), 4)
    alone = run_cascade(model.schedule, runners, [9], torch.tensor([4]), 4)
    assert torch.allclose(together[1:2], alone, atol=1e-5)
    again = run_cascade(model.schedule, runners, [9], torch.tensor([4]), 4)
    assert torch.equal(alone, again)
    other_class = run_cascade(model.schedule, runners, [9], torch.tensor([5]), 4)
    assert not torch.allclose(alone, other_class, atol=1e-3)


def test_the_reference_runner_guides_with_the_null_class(tiny_latent_model: Callable) -> None:
    guided, plain = tiny_latent_model(guidance_scale=4.0), tiny_latent_model(guidance_scale=1.0)
    assert isinstance(guided.reference_runners()[8], FunctionStage)
    labels = torch.tensor([2])
    a = run_cascade(guided.schedule, guided.reference_runners(), [3], labels, 4)
    b = run_cascade(plain.schedule, plain.reference_runners(), [3], labels, 4)
    assert not torch.allclose(a[:, :3], b[:, :3], atol=1e-4)  # guided channels differ …
