"""Runtimes that execute the cascade: one stage runner per resolution, one shared schedule.

:class:`CascadeEngine` is what callers (the CLI, the benchmark, the HTTP service) hold: a model's
cascade bound to one runtime, loaded and warmed once. It owns generation: it validates the labels
(:mod:`lowdiff.requests`) and calls :func:`lowdiff.sampler.generate_images` with its runners. Each
runtime provides those stage runners (:class:`lowdiff.sampler.StageRunner`); the cascade loop is
always the sampler's, driven by the model's :class:`~lowdiff.schedule.CascadeSchedule`.

A new runtime: a module here with ``<name>_runners(model, …) -> {resolution: StageRunner}``, one
branch in :func:`load_engine`, its name in :data:`ENGINE_KINDS`.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lowdiff.errors import ConfigError, EngineUnavailable, SettingsError
from lowdiff.model import LowDiffModel, TorchStage
from lowdiff.requests import check_class_labels, labels_tensor
from lowdiff.sampler import (
    DecodeStage,
    FunctionStage,
    StageCallback,
    StageRunner,
    generate_images,
    initial_noise,
    run_decode,
    upsample_condition,
)

# torch: PyTorch eager (CPU/CUDA). cudagraph: PyTorch with each stage captured as CUDA graphs (GPU).
# onnxruntime: the exported per-stage ONNX graphs (CPU EP; CUDA/TensorRT EPs on a GPU).
# tensorrt: per-stage TensorRT engines (GPU; written against the docs, never run here).
# compile: torch.compile (inductor) of each stage's evaluation (CPU; on CUDA inside CUDA graphs).
ENGINE_KINDS = ("torch", "cudagraph", "onnxruntime", "tensorrt", "compile")
ENGINES_WITH_DIR = ("onnxruntime", "tensorrt", "compile")  # compile: inductor's on-disk cache
# Engines that run latent (flow + decode) models: cudagraph and tensorrt own a Heun stage loop and
# have no decode stage yet.
LATENT_ENGINES = ("torch", "onnxruntime", "compile")
# Engines whose stage calls may run in two threads at once, each on its own CUDA stream (the staged
# scheduler's --stage-overlap): eager torch (the caching allocator keeps each stream's blocks apart) and
# cudagraph (a graph memory pool per stage, see engines/cudagraph.py). The others are refused, with the
# reason, in lowdiff/service/settings.py (STAGE_OVERLAP_REFUSED).
STAGE_OVERLAP_ENGINES = ("torch", "cudagraph")


@dataclass(frozen=True)
class EngineInfo:
    """What an engine serves and how: typed, and JSON for ``/v1/models`` by :meth:`to_dict`."""

    model: str
    engine: str
    device: str
    precision: str
    resolutions: tuple[int, ...]
    nfe_per_stage: tuple[int, ...]
    schedule: dict[str, Any]
    conditional: bool
    num_classes: int
    image_channels: int
    image_resolution: int
    checkpoint_sha256: str | None
    engine_dir: str | None
    class_names: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.model

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["resolutions"] = list(self.resolutions)
        out["nfe_per_stage"] = list(self.nfe_per_stage)
        out["class_names"] = list(self.class_names)
        return out


class CascadeEngine:
    def __init__(
        self,
        model: LowDiffModel,
        runners: Mapping[int, StageRunner],
        kind: str,
        device: str,
        precision: str,
        decoder: DecodeStage | None = None,
    ):
        missing = set(model.config.resolutions) - set(runners)
        if missing:
            raise ConfigError(f"engine {kind!r} has no runner for stage(s) {sorted(missing)}", "engine")
        if (decoder is None) != (model.config.autoencoder is None):
            raise ConfigError(f"engine {kind!r}: a decode stage goes with a latent model and only with one", "engine")
        self.model = model
        self.runners = dict(runners)
        self.decoder = decoder  # a latent model's last stage: latents → images
        self.kind = kind
        self.device = device
        self.precision = precision
        self.engine_dir: str | None = None
        self.scratch: tempfile.TemporaryDirectory | None = None

    @property
    def config(self) -> Any:
        return self.model.config

    def generate(
        self,
        seeds: Sequence[int],
        class_labels: Sequence[int] | None = None,
        on_stage: StageCallback | None = None,
    ) -> torch.Tensor:
        """uint8 images [B, C, R, R]; image i depends only on (class_labels[i], seeds[i]). A latent model's
        images are its decoded latents (``on_stage`` then also times the decode stage)."""
        config = self.model.config
        labels = labels_tensor(check_class_labels(config, class_labels, len(seeds)))
        channels = config.network.img_channels
        return generate_images(config.schedule, self.runners, seeds, labels, channels, on_stage, self.decoder)

    # --- one stage at a time (the service's stage-level scheduler)
    def stage_noise(self, seeds: Sequence[int]) -> list[torch.Tensor]:
        """Every stage's starting noise for these seeds (:func:`lowdiff.sampler.initial_noise`), drawn
        when an image enters the cascade and carried with it, so that it is the noise ``generate`` uses."""
        config = self.model.config
        return initial_noise(seeds, config.schedule, config.network.img_channels)

    def run_stage(
        self,
        index: int,
        noise: torch.Tensor,
        class_labels: Sequence[int] | None,
        condition: torch.Tensor | None,
        sigma_cond: float | None,
        on_stage: StageCallback | None = None,
    ) -> tuple[torch.Tensor, float | None]:
        """Stage ``index`` of the cascade for a batch: what one turn of :func:`lowdiff.sampler.run_cascade`'s
        loop does, for images that may come from different requests and entered the cascade at different
        times. ``condition`` is the previous stage's output as it returned it (this method upsamples it);
        returns this stage's float64 output and the level (σ, or flow time t) it hands the next stage
        (None after the last). A latent model's last stage also runs the decode stage (timed apart by
        ``on_stage``), so what it returns after the last stage is always an image in about [−1, 1].

        Why here and not in the sampler: the batch's images share nothing but the stage, so the loop
        over stages moves to the caller, while the per-stage work (labels checked, condition upsampled,
        the runtime's stage runner) stays the one the whole-cascade path runs; a test checks that both
        give the same pixels."""
        config = self.model.config
        stage = config.schedule.stages[index]
        labels = labels_tensor(check_class_labels(config, class_labels, noise.shape[0]))
        start = time.perf_counter()
        cond = None if condition is None else upsample_condition(condition, stage.resolution).float()
        x = self.runners[stage.resolution].run_stage(stage, noise, labels, cond, sigma_cond)
        if on_stage is not None:
            on_stage(stage.resolution, time.perf_counter() - start)
        if stage.truncated:
            return x, stage.handoff_level
        if self.decoder is not None:
            x = run_decode(self.decoder, x, on_stage)
        return x, None

    def denoised_preview(
        self,
        index: int,
        x: torch.Tensor,
        class_labels: Sequence[int] | None,
        condition: torch.Tensor | None,
        sigma_cond: float | None,
    ) -> torch.Tensor:
        """D(x; σ) of stage ``index``'s hand-off ``x`` (at the σ it hands on), brought to the output
        resolution (nearest), float64 in [−1, 1]: a preview of the image. One extra evaluation, run only
        for images whose client asked for previews; a runtime that owns its stage loop (no stage
        function) gets the model's reference PyTorch function (fp32) instead. A latent (flow) stage's
        evaluation is the velocity v at time t, so its preview is the predicted data x + (1 − t)·v,
        brought to the last stage's latent resolution and decoded (one decode-stage call more)."""
        config = self.model.config
        stage = config.schedule.stages[index]
        sigma = stage.handoff_level
        labels = labels_tensor(check_class_labels(config, class_labels, x.shape[0]))
        runner = self.runners[stage.resolution]
        if isinstance(runner, FunctionStage):
            fn, device = runner.fn, runner.device
        else:  # TorchStage moves its inputs to the denoiser's device itself
            where = next(self.model.denoiser.parameters()).device
            fn, device = TorchStage(self.model.denoiser, stage.resolution, where), None
        cond = None if condition is None else upsample_condition(condition, stage.resolution).float()
        batch = x.shape[0]

        def to(t: torch.Tensor | None) -> torch.Tensor | None:
            return t if t is None or device is None else t.to(device)

        sig = torch.full((batch,), sigma, dtype=torch.float32)
        csig = None if sigma_cond is None else torch.full((batch,), sigma_cond, dtype=torch.float32)
        out = fn(to(x.float()), to(sig), to(labels), to(cond), to(csig))
        out = out.detach().cpu().to(torch.float64)
        if config.schedule.flow:
            out = x.to(torch.float64) + (1.0 - sigma) * out
        out = upsample_condition(out, config.network.img_resolution)
        return out if self.decoder is None else self.decoder.decode(out)

    def warmup(self, batch_size: int = 1) -> None:
        labels = [0] * batch_size if self.model.config.conditional else None
        self.generate(list(range(batch_size)), labels)

    def info(self) -> EngineInfo:
        config = self.model.config
        return EngineInfo(
            model=config.name,
            engine=self.kind,
            device=self.device,
            precision=self.precision,
            resolutions=tuple(config.resolutions),
            nfe_per_stage=tuple(config.schedule.nfe),
            schedule=config.schedule.to_dict(),
            conditional=config.conditional,
            num_classes=config.num_classes,
            class_names=config.class_names,
            image_channels=config.image_channels,
            image_resolution=config.image_resolution,
            checkpoint_sha256=self.model.metadata.get("checkpoint_sha256"),
            engine_dir=self.engine_dir,
        )


def check_engine_options(kind: str, engine_dir: str | Path | None, device: str = "cpu") -> None:
    """What can be refused before any loading (``lowdiff serve`` does it before the port opens): an
    unknown kind, a folder the kind would ignore or need, a GPU runtime on a machine without a GPU."""
    if kind not in ENGINE_KINDS:
        raise SettingsError(f"unknown engine {kind!r}; available: {', '.join(ENGINE_KINDS)}", "engine")
    if engine_dir is not None and kind not in ENGINES_WITH_DIR:
        raise SettingsError(
            f"engine {kind!r} does not use an engine folder (only {' and '.join(ENGINES_WITH_DIR)} do)", "engine_dir"
        )
    if engine_dir is None and kind == "tensorrt":
        raise SettingsError(
            "engine 'tensorrt' needs one: build it with `lowdiff export --format tensorrt`", "engine_dir"
        )
    if engine_dir is not None and kind != "compile" and not Path(engine_dir).is_dir():
        raise SettingsError(f"not a folder: {engine_dir}", "engine_dir")
    needs_gpu = kind in ("cudagraph", "tensorrt") or device.startswith("cuda")
    if needs_gpu and not torch.cuda.is_available():
        raise EngineUnavailable(
            f"{kind!r} on {device!r} needs an NVIDIA GPU and a CUDA build of torch; this machine has torch "
            f"{torch.__version__} and no usable GPU (use --engine torch --device cpu)",
            "device" if kind in ("torch", "onnxruntime") else "engine",
        )


def load_engine(
    model: LowDiffModel,
    kind: str = "torch",
    device: str = "cpu",
    precision: str = "fp32",
    *,
    engine_dir: str | Path | None = None,
    threads: int | None = None,
    warmup: bool = False,
    stage_limits: Mapping[int, int] | None = None,
) -> CascadeEngine:
    """Bind ``model`` to runtime ``kind``; a runtime this machine lacks raises :class:`EngineUnavailable`.

    ``engine_dir`` is an exported folder (`lowdiff export`) for ``onnxruntime`` and ``tensorrt``;
    without one, ``onnxruntime`` exports the model's stages into a private temporary folder first
    (TensorRT engines take minutes to build, so ``tensorrt`` needs a prebuilt folder). ``threads``
    sets ONNX Runtime's intra-op threads (default: torch's). With ``warmup`` the engine
    runs one batch-1 cascade before it is returned, so the first real request pays no set-up cost.
    ``stage_limits`` (resolution → most images per call, as the service's scheduler makes them) sizes the
    ``cudagraph`` engine's batch buckets per stage (:func:`lowdiff.engines.cudagraph.bucket_ladder`); the
    other engines take any batch and ignore it.
    Every refusal is a :class:`lowdiff.errors.LowDiffError` naming the option concerned.
    """
    if model.config.latent and kind in ENGINE_KINDS and kind not in LATENT_ENGINES:
        raise SettingsError(
            f"engine {kind!r} runs pixel (Heun) cascades only; a latent model runs on {', '.join(LATENT_ENGINES)}",
            "engine",
        )
    check_engine_options(kind, engine_dir, device)
    scratch = None
    decoder: DecodeStage | None = None
    if kind == "torch":
        from lowdiff.engines.torch_eager import torch_decoder, torch_runners

        runners = torch_runners(model, device, precision)
        decoder = torch_decoder(model, device, precision)
    elif kind == "cudagraph":
        from lowdiff.engines.cudagraph import cudagraph_runners

        runners = cudagraph_runners(model, device, precision, stage_limits=stage_limits)
    elif kind == "onnxruntime":
        from lowdiff.engines.onnxruntime_engine import onnxruntime_decoder, onnxruntime_runners, providers_for

        providers_for(device)  # fail on a missing runtime or provider before spending time on export
        if engine_dir is None:
            from lowdiff.export.onnx_stages import export_onnx

            scratch = tempfile.TemporaryDirectory(prefix=f"lowdiff-onnx-{model.config.name}-")
            export_onnx(model, scratch.name)
        runners = onnxruntime_runners(model, engine_dir or scratch.name, device, precision, threads)
        decoder = onnxruntime_decoder(model, engine_dir or scratch.name, device, threads)
    elif kind == "compile":
        from lowdiff.engines.compiled import compiled_runners
        from lowdiff.engines.torch_eager import torch_decoder

        runners = compiled_runners(model, device, precision, engine_dir)
        decoder = torch_decoder(model, device, precision)  # the decoder runs eager: one call per batch
    else:  # tensorrt
        from lowdiff.engines.tensorrt_engine import tensorrt_runners

        runners = tensorrt_runners(model, engine_dir, device, precision)  # type: ignore[arg-type]
    engine = CascadeEngine(model, runners, kind, device, precision, decoder)
    engine.scratch = scratch  # a temporary export lives (and is removed) with the engine
    engine.engine_dir = None if engine_dir is None else str(engine_dir)
    if warmup:
        engine.warmup()
    return engine
