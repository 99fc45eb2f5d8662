from __future__ import annotations

import pytest
import torch

from lowdiff.configs import get_config
from lowdiff.errors import ConfigError, RequestError
from lowdiff.model import LowDiffModel, TorchStage
from lowdiff.sampler import FunctionStage, generate_images
from lowdiff.schedule import CascadeSchedule, StageSchedule


def test_image_does_not_depend_on_batch(tiny_model: LowDiffModel) -> None:
    alone = tiny_model.generate([1234], [7])
    seeds = [11, 12, 13, 1234, 15, 16, 17]
    labels = [0, 1, 2, 7, 4, 5, 6]
    batch = tiny_model.generate(seeds, labels)
    diff = (alone[0].int() - batch[3].int()).abs().max()
    assert diff <= 1
    # The test is not vacuous: different seeds give different images.
    assert (batch[0].int() - batch[1].int()).abs().max() > 5


def test_same_batch_twice_is_bit_identical(tiny_model: LowDiffModel) -> None:
    seeds, labels = [3, 1, 4, 1, 5], [9, 2, 6, 5, 3]
    assert torch.equal(tiny_model.generate(seeds, labels), tiny_model.generate(seeds, labels))


def test_each_stage_gets_exactly_its_nfe(tiny_model: LowDiffModel) -> None:
    calls: dict[int, int] = {}
    fns = {r: TorchStage(tiny_model.denoiser, r) for r in (8, 16, 32)}

    def counting(res: int):
        def fn(x, sigma, labels, cond, sigma_cond):
            calls[res] = calls.get(res, 0) + 1
            assert (cond is None) == (res == 8)
            return fns[res](x, sigma, labels, cond, sigma_cond)

        return fn

    generate_images(tiny_model.schedule, {r: FunctionStage(counting(r)) for r in fns}, [0, 1], torch.tensor([0, 1]), 1)
    assert tuple(calls[r] for r in (8, 16, 32)) == tiny_model.schedule.nfe == (18, 13, 17)


def test_truncated_stage_hands_off_its_noise_level(tiny_model: LowDiffModel) -> None:
    seen: dict[int, set[float]] = {}
    fns = {r: TorchStage(tiny_model.denoiser, r) for r in (8, 16, 32)}

    def recording(res: int):
        def fn(x, sigma, labels, cond, sigma_cond):
            if sigma_cond is not None:
                seen.setdefault(res, set()).add(round(float(sigma_cond[0]), 5))
            return fns[res](x, sigma, labels, cond, sigma_cond)

        return fn

    generate_images(tiny_model.schedule, {r: FunctionStage(recording(r)) for r in fns}, [0], torch.tensor([0]), 1)
    stages = tiny_model.schedule.stages
    assert seen[16] == {round(float(stages[0].sigmas()[-1]), 5)}
    assert seen[32] == {round(float(stages[1].sigmas()[-1]), 5)}


def test_schedule_sigmas_follow_karras() -> None:
    stage = StageSchedule(32, 18)
    sigmas = stage.sigmas()
    assert sigmas[0] == pytest.approx(80.0) and sigmas[-2] == pytest.approx(0.002) and sigmas[-1] == 0
    assert len(sigmas) == 19 and stage.nfe == 35
    truncated = StageSchedule(16, 18, truncate_at=10, final_step="euler")
    assert torch.equal(truncated.sigmas(), sigmas[:11]) and truncated.nfe == 19
    assert StageSchedule(16, 18, truncate_at=10, final_step="heun").nfe == 20


def test_schedule_validation() -> None:
    with pytest.raises(ConfigError, match="truncate_at"):
        CascadeSchedule((StageSchedule(8, 10), StageSchedule(16, 10)))
    with pytest.raises(ConfigError, match="increase"):
        CascadeSchedule((StageSchedule(16, 10, truncate_at=3), StageSchedule(8, 10)))
    with pytest.raises(ConfigError, match="truncate_at"):
        StageSchedule(8, 10, truncate_at=10)


def test_schedule_round_trips_through_dict() -> None:
    schedule = get_config("ffhq64").schedule
    assert CascadeSchedule.from_dict(schedule.to_dict()) == schedule
    swept = schedule.with_stage(8, truncate_at=12)
    assert swept.stages[0].truncate_at == 12 and swept.stages[1:] == schedule.stages[1:]


def test_class_label_validation(tiny_model: LowDiffModel) -> None:
    with pytest.raises(RequestError, match="out of range 0…9") as caught:
        tiny_model.generate([0], [10])
    assert caught.value.field == "class_label"
    with pytest.raises(RequestError, match="required") as caught:
        tiny_model.generate([0], None)
    assert caught.value.field == "class_label"
