"""lowdiff.schedule: Karras σ steps, truncation, validation, dict round trip."""

from __future__ import annotations

import pytest
import torch

from lowdiff.configs import get_config
from lowdiff.errors import ConfigError
from lowdiff.schedule import CascadeSchedule, StageSchedule


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
