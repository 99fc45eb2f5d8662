"""lowdiff.sampler: batch-independent, reproducible images; each stage's NFE; the truncated hand-off."""

from __future__ import annotations

import pytest
import torch

from lowdiff.errors import RequestError
from lowdiff.model import LowDiffModel, TorchStage
from lowdiff.sampler import FunctionStage, generate_images, initial_noise


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


def test_class_label_validation(tiny_model: LowDiffModel) -> None:
    with pytest.raises(RequestError, match="out of range 0…9") as caught:
        tiny_model.generate([0], [10])
    assert caught.value.field == "class_label"
    with pytest.raises(RequestError, match="required") as caught:
        tiny_model.generate([0], None)
    assert caught.value.field == "class_label"


def test_starting_noise_is_drawn_as_edm_draws_it() -> None:
    """One CPU generator per seed (seed mod 2³²), randn in float32 for each stage in turn, then float64:
    a single-stage model's noise is exactly EDM generate.py's for the seed."""
    from lowdiff.configs import get_config

    noises = initial_noise([5, 2**32 + 5, 6], get_config("fashion32").schedule, 1)
    gen = torch.Generator().manual_seed(5)
    for noise, r in zip(noises, (8, 16, 32)):
        assert noise.dtype == torch.float64 and noise.shape == (3, 1, r, r)
        assert torch.equal(noise[0], torch.randn(1, r, r, generator=gen).double())
        assert torch.equal(noise[1], noise[0])  # the seed wraps at 2³², as EDM's manual_seed(seed % (1 << 32))
        assert not torch.equal(noise[2], noise[0])
    (single,) = initial_noise([7], get_config("edm-fashion32").schedule, 1)
    assert torch.equal(single[0], torch.randn([1, 32, 32], generator=torch.Generator().manual_seed(7)).double())
