"""The cascaded deterministic Heun sampler (paper Algorithm 2 on EDM's sampler).

It walks a :class:`~lowdiff.schedule.CascadeSchedule`, handing each stage to a *stage runner*
(``run_stage(stage, noise, class_labels, condition, sigma_cond) -> x``). Most runtimes only
provide one denoiser evaluation, a *stage function* ``fn(x, sigma, class_labels, condition,
sigma_cond) -> D(x; σ)``, and get the shared Heun loop (:func:`heun_stage`) through
:class:`FunctionStage`; a runtime that must own the loop (CUDA graphs capture all of a stage's
steps) implements ``run_stage`` itself from the same :class:`StageSchedule`.

Determinism: every random draw for image i comes from ``torch.Generator().manual_seed(seed_i % 2**32)``
(all stages' starting noise, float32 as EDM draws it, in stage order), and the solver runs in float64, so an
image depends only on its (class, seed), not on batch size, position or neighbours.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

from lowdiff.schedule import AnyStage, CascadeSchedule, FlowStageSchedule, StageSchedule


class StageFunction(Protocol):
    def __call__(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        class_labels: torch.Tensor | None,
        condition: torch.Tensor | None,
        sigma_cond: torch.Tensor | None,
    ) -> torch.Tensor: ...


class StageRunner(Protocol):
    def run_stage(
        self,
        stage: AnyStage,
        noise: torch.Tensor,
        class_labels: torch.Tensor | None,
        condition: torch.Tensor | None,
        sigma_cond: float | None,
    ) -> torch.Tensor: ...


class DecodeStage(Protocol):
    """A latent model's last pipeline stage: the cascade's float64 latents → float64 images in about
    [−1, 1]. ``resolution`` is the side of the images it makes, its key in per-stage timings (as a
    diffusion stage's resolution is), so benchmarks and metrics show it as one more stage."""

    resolution: int

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


StageCallback = Callable[[int, float], None]  # (resolution, seconds)


def initial_noise(seeds: Sequence[int], schedule: CascadeSchedule, channels: int) -> list[torch.Tensor]:
    """Unit-variance starting noise for every stage, [B, C, r, r] float64, one generator per seed.

    Drawn as EDM's generate.py draws it: one CPU ``torch.Generator`` per seed, seeded with
    ``seed % 2**32``, ``randn`` in float32, then converted to float64 for the solver. So a single-stage
    model imported from EDM starts from EDM's own noise for the same seed (EDM run on the CPU; CUDA
    generators give other numbers), and a cascade's first stage draws what EDM would draw at that
    resolution. Later stages continue the same generator, in stage order, so every stage's noise still
    depends only on the seed.
    """
    per_stage: list[list[torch.Tensor]] = [[] for _ in schedule.stages]
    for seed in seeds:
        gen = torch.Generator().manual_seed(int(seed) % 2**32)
        for k, stage in enumerate(schedule.stages):
            r = stage.resolution
            per_stage[k].append(torch.randn(channels, r, r, generator=gen, dtype=torch.float32))
    return [torch.stack(xs).to(torch.float64) for xs in per_stage]


def upsample_condition(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """The previous stage's truncated output, brought to ``resolution`` (nearest, as in training)."""
    factor = resolution // x.shape[-1]
    return F.interpolate(x, scale_factor=float(factor), mode="nearest") if factor > 1 else x


def heun_stage(
    stage: StageSchedule,
    fn: StageFunction,
    noise: torch.Tensor,
    class_labels: torch.Tensor | None,
    condition: torch.Tensor | None,
    sigma_cond: float | None,
) -> torch.Tensor:
    """One stage's Heun/Euler steps from σ_max to its hand-off level (or 0); returns float64 x."""
    sigmas = stage.sigmas()
    batch = noise.shape[0]
    cond_sigma = None if sigma_cond is None else torch.full((batch,), sigma_cond, dtype=torch.float32)

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = torch.full((batch,), float(sigma), dtype=torch.float32)
        return fn(x.float(), s, class_labels, condition, cond_sigma).to(torch.float64)

    x = noise.to(torch.float64) * sigmas[0]
    for order, t_cur, t_next in zip(stage.step_orders(), sigmas[:-1], sigmas[1:]):
        d_cur = (x - denoise(x, t_cur)) / t_cur
        x_next = x + (t_next - t_cur) * d_cur
        if order == 2:
            d_next = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
    return x


def flow_euler_stage(
    stage: FlowStageSchedule,
    fn: StageFunction,
    noise: torch.Tensor,
    class_labels: torch.Tensor | None,
    condition: torch.Tensor | None,
    sigma_cond: float | None,
    null_label: int | None = None,
) -> torch.Tensor:
    """One rectified-flow stage: Euler steps x ← x + (t_next − t)·v(x, t) from noise (t = 0) to the
    hand-off time (or data, t = 1); returns float64 x. ``fn`` returns the velocity (its "σ" is t).

    A guided step evaluates the conditional and the null-class halves as one doubled batch (one
    network call, as LightningDiT does), then mixes them on the stage's guidance channels. The solver
    state stays float64 and every draw was made per seed before, so an image depends only on its
    (class, seed): guidance pairs each image with its own null twin, never with a neighbour.
    """
    times = stage.times()
    batch = noise.shape[0]
    guided = stage.guided()
    if any(guided) and (class_labels is None or null_label is None):
        raise ValueError("classifier-free guidance needs class labels and the null class of the network")
    cond_t = None if sigma_cond is None else torch.full((batch,), sigma_cond, dtype=torch.float32)
    doubled_labels = doubled_cond = doubled_t = None
    if any(guided):
        assert class_labels is not None and null_label is not None
        doubled_labels = torch.cat([class_labels, torch.full_like(class_labels, null_label)])
        doubled_cond = None if condition is None else torch.cat([condition, condition])
        doubled_t = None if cond_t is None else torch.cat([cond_t, cond_t])
    channels = noise.shape[1] if stage.guidance_channels is None else min(stage.guidance_channels, noise.shape[1])
    x = noise.to(torch.float64)
    for guide, t_cur, t_next in zip(guided, times[:-1], times[1:]):
        t = torch.full((batch,), float(t_cur), dtype=torch.float32, device=noise.device)
        if guide:
            both = fn(torch.cat([x, x]).float(), torch.cat([t, t]), doubled_labels, doubled_cond, doubled_t)
            v_cond, v_null = both.to(torch.float64).split(batch)
            v = v_cond.clone()
            w = stage.guidance_scale
            v[:, :channels] = v_null[:, :channels] + w * (v_cond[:, :channels] - v_null[:, :channels])
        else:
            v = fn(x.float(), t, class_labels, condition, cond_t).to(torch.float64)
        x = x + (t_next - t_cur) * v
    return x


def run_any_stage(
    stage: AnyStage,
    fn: StageFunction,
    noise: torch.Tensor,
    class_labels: torch.Tensor | None,
    condition: torch.Tensor | None,
    sigma_cond: float | None,
    null_label: int | None = None,
) -> torch.Tensor:
    """The stage's own loop: Heun/Euler in σ for a pixel stage, flow Euler in t for a latent one."""
    if isinstance(stage, FlowStageSchedule):
        return flow_euler_stage(stage, fn, noise, class_labels, condition, sigma_cond, null_label)
    return heun_stage(stage, fn, noise, class_labels, condition, sigma_cond)


class FunctionStage:
    """A stage runner from a one-evaluation stage function, using the shared Heun loop.

    With ``device``, the loop's state (inputs and the float64 solver state) lives on that device and
    only the stage's result comes back to the host: on a GPU this avoids a host round trip, and a
    synchronisation, around every evaluation. Without it the loop runs on the host (``fn`` then takes
    and returns host tensors, as the ONNX Runtime and TensorRT runners do).
    """

    def __init__(self, fn: StageFunction, device: torch.device | None = None, null_label: int | None = None):
        self.fn = fn
        self.device = device
        self.null_label = null_label  # a flow model's null class, for guided stages

    def run_stage(
        self,
        stage: AnyStage,
        noise: torch.Tensor,
        class_labels: torch.Tensor | None,
        condition: torch.Tensor | None,
        sigma_cond: float | None,
    ) -> torch.Tensor:
        if self.device is None:
            return run_any_stage(stage, self.fn, noise, class_labels, condition, sigma_cond, self.null_label)

        def to(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(self.device)

        args = (to(noise), to(class_labels), to(condition), sigma_cond, self.null_label)
        return run_any_stage(stage, self.fn, *args).cpu()


def run_cascade(
    schedule: CascadeSchedule,
    runners: Mapping[int, StageRunner],
    seeds: Sequence[int],
    class_labels: torch.Tensor | None,
    channels: int,
    on_stage: StageCallback | None = None,
) -> torch.Tensor:
    """Generate one image per seed; returns float64 [B, C, R, R] in roughly [−1, 1]."""
    noises = initial_noise(seeds, schedule, channels)
    condition: torch.Tensor | None = None
    sigma_cond: float | None = None
    x = noises[0]
    for stage, noise in zip(schedule.stages, noises):
        start = time.perf_counter()
        cond = None if condition is None else upsample_condition(condition, stage.resolution).float()
        x = runners[stage.resolution].run_stage(stage, noise, class_labels, cond, sigma_cond)
        if on_stage is not None:
            on_stage(stage.resolution, time.perf_counter() - start)
        if stage.truncated:
            condition, sigma_cond = x, stage.handoff_level
    return x


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[−1, 1] images → uint8, EDM's rounding (x·127.5 + 128, clipped)."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


def run_decode(decode: DecodeStage, latents: torch.Tensor, on_stage: StageCallback | None = None) -> torch.Tensor:
    """The decode stage on the cascade's output, timed like a stage (``on_stage(decode.resolution, s)``)."""
    start = time.perf_counter()
    images = decode.decode(latents)
    if on_stage is not None:
        on_stage(decode.resolution, time.perf_counter() - start)
    return images


def generate_images(
    schedule: CascadeSchedule,
    runners: Mapping[int, StageRunner],
    seeds: Sequence[int],
    class_labels: torch.Tensor | None,
    channels: int,
    on_stage: StageCallback | None = None,
    decode: DecodeStage | None = None,
) -> torch.Tensor:
    """uint8 images [B, C, R, R]: :func:`run_cascade`, the decode stage of a latent model (its images,
    never its latents, are what a caller gets), then :func:`to_uint8` (labels already validated)."""
    x = run_cascade(schedule, runners, seeds, class_labels, channels, on_stage)
    if decode is not None:
        x = run_decode(decode, x, on_stage)
    return to_uint8(x)
