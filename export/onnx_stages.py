"""Per-stage ONNX export: one graph per cascade stage, one denoiser evaluation per call.

Each stage's graph is traced from :class:`StageGraph`, which fixes the stage's resolution so
that only that resolution's sub-network (lowdiff/network.py ``stage_modules``) is reached; the
exporter keeps only the weights a graph uses, so a stage file holds its own weights and nothing
above its resolution. Preconditioning (c_skip, c_out, c_in, c_noise and the condition's scaling)
is inside the graph: one engine call is exactly ``Denoiser.forward`` for that stage.

Exporter: torch's TorchScript-based ``torch.onnx.export(dynamo=False)`` by default. It exports a
paper-size stage in seconds and gives a graph with a symbolic batch dimension; the dynamo
exporter (``exporter="dynamo"``, needs onnxscript) also works but is ~10× slower to export, too slow
for CI. CI tests the default; the dynamo path was checked for parity by hand (tiny model, batch 1/7/64).
"""

from __future__ import annotations

import importlib.metadata
import platform
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lowdiff.autoencoder import LatentDecoder
from lowdiff.errors import ConfigError
from lowdiff.export.manifest import (
    DECODER_FILE,
    DECODER_INPUT,
    DECODER_OUTPUT,
    MANIFEST_FORMAT,
    OUTPUT,
    decoder_io,
    stage_input_names,
    stage_io,
    write_manifest,
)
from lowdiff.hashing import file_sha256, weights_sha256
from lowdiff.model import LowDiffModel, config_to_dict
from lowdiff.precond import Denoiser
from lowdiff.progress import Progress

Exporter = Literal["torchscript", "dynamo"]
DEFAULT_OPSET = 17
MAX_BATCH = 64  # the dynamic batch range every runtime is validated for: 1 … MAX_BATCH


class StageGraph(nn.Module):
    """The denoiser at one fixed resolution, with positional inputs named by :func:`stage_input_names`.

    It references the whole denoiser (the unified network shares its modules between stages);
    tracing at a fixed resolution reaches only that stage's modules, so only those end up in the file.
    """

    def __init__(self, denoiser: Denoiser, resolution: int, input_names: Sequence[str]):
        super().__init__()
        self.denoiser = denoiser
        self.resolution = resolution
        self.input_names = tuple(input_names)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        named = dict(zip(self.input_names, inputs))
        return self.denoiser(
            named["x"],
            named["sigma"],
            named.get("class_labels"),
            self.resolution,
            named.get("condition"),
            named.get("sigma_cond"),
        )


def example_inputs(
    model: LowDiffModel, stage_index: int, batch: int, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """Random inputs of the right shapes and dtypes for one stage, in graph input order."""
    config = model.config
    resolution = config.resolutions[stage_index]
    channels = config.network.img_channels
    out: list[torch.Tensor] = []
    for name in stage_input_names(stage_index, config.conditional, config.latent):
        if name in ("x", "condition"):
            out.append(torch.randn(batch, channels, resolution, resolution, generator=generator))
        elif name == "sigma" and config.latent:  # flow time t ∈ [0, 1]
            out.append(torch.rand(batch, generator=generator))
        elif name in ("sigma", "sigma_cond"):
            # log-uniform over the sampler's σ range, so every preconditioning branch sees real values
            out.append(torch.exp(torch.rand(batch, generator=generator) * 10.6 - 6.2))
        else:  # a latent model's labels include its null class (guidance's unconditional half)
            top = config.num_classes + (1 if config.latent else 0)
            out.append(torch.randint(0, top, (batch,), generator=generator))
    return out


def stage_parameter_count(model: LowDiffModel, resolution: int) -> int:
    """Parameters a stage evaluation reads: its sub-network, plus the class embedding if any."""
    net = model.denoiser.net
    names = net.stage_modules(resolution)
    if model.config.conditional and not model.config.latent:  # the DiT lists its label table itself
        names.append("map_label")
    return sum(p.numel() for n in names for p in net.get_submodule(n).parameters())


def onnx_initializer_elements(path: Path) -> int:
    import numpy as np
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return int(sum(int(np.prod(init.dims)) for init in graph.initializer))


def _versions(exporter: Exporter) -> dict[str, str | None]:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    versions = {"torch": torch.__version__, "onnx": version("onnx"), "onnxruntime": version("onnxruntime")}
    if exporter == "dynamo":
        versions["onnxscript"] = version("onnxscript")
    versions["python"] = platform.python_version()
    return versions


class DecoderGraph(nn.Module):
    """The decode stage as one graph: normalised latents → images (statistics inside the graph)."""

    def __init__(self, decoder: LatentDecoder):
        super().__init__()
        self.decoder = decoder
        self.input_names = (DECODER_INPUT,)
        self.output_name = DECODER_OUTPUT

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents)


def _export_stage(
    graph: StageGraph | DecoderGraph, args: list[torch.Tensor], path: Path, opset: int, exporter: Exporter
) -> None:
    names = list(graph.input_names)
    output = getattr(graph, "output_name", OUTPUT)
    with warnings.catch_warnings():
        # The TorchScript exporter warns about Python control flow on shapes (constant per stage)
        # and about its own deprecation; neither changes the graph.
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(
                graph,
                tuple(args),
                str(path),
                input_names=names,
                output_names=[output],
                dynamic_axes={n: {0: "batch"} for n in [*names, output]},
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        elif exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
            program = torch.onnx.export(
                graph,
                tuple(args),
                input_names=names,
                output_names=[output],
                dynamic_shapes=(tuple({0: batch} for _ in names),),
                opset_version=opset,
                dynamo=True,
                verbose=False,
            )
            program.save(str(path))
        else:
            raise ConfigError(f"expected 'torchscript' or 'dynamo', got {exporter!r}", "exporter")


@torch.no_grad()
def export_onnx(
    model: LowDiffModel,
    out_dir: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    exporter: Exporter = "torchscript",
    check: bool = True,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write ``stage{r}.onnx`` per stage and ``manifest.json`` into ``out_dir``; returns the manifest.

    ``progress`` counts stages (a stage's export takes seconds with torchscript, minutes with dynamo).
    """
    import onnx

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    denoiser = model.denoiser.eval()
    gen = torch.Generator().manual_seed(0)
    stages = []
    for k, stage in enumerate(config.schedule.stages):
        r = stage.resolution
        names = stage_input_names(k, config.conditional, config.latent)
        graph = StageGraph(denoiser, r, names).eval()
        path = out / f"stage{r}.onnx"
        _export_stage(graph, example_inputs(model, k, 2, gen), path, opset, exporter)
        if check:
            onnx.checker.check_model(str(path))
        stages.append(
            {
                "resolution": r,
                "file": path.name,
                "sha256": file_sha256(path),
                "parameters": stage_parameter_count(model, r),
                "initializer_elements": onnx_initializer_elements(path),
                "nfe": stage.nfe,
                **stage_io(k, r, config.network.img_channels, config.conditional, config.latent),
            }
        )
        if progress is not None:
            progress.update(1, stage=f"{r}×{r}")
    decoder = None
    if model.decoder is not None and config.autoencoder is not None:
        decoder = _export_decoder(model, out, opset, exporter, check, gen)
        if progress is not None:
            progress.update(1, stage="decode")
    manifest = {
        "format": MANIFEST_FORMAT,
        "engine_format": "onnx",
        "config_name": config.name,
        "config": config_to_dict(config),
        "conditional": config.conditional,
        "num_classes": config.num_classes,
        "image_channels": config.network.img_channels,
        "checkpoint_sha256": model.metadata.get("checkpoint_sha256"),
        "weights_sha256": weights_sha256(denoiser.net),
        "precision": "fp32",
        "opset": opset,
        "batch": {"dynamic": True, "min": 1, "max": MAX_BATCH},
        "exporter": {"name": f"torch.onnx.export ({exporter})", "versions": _versions(exporter)},
        "schedule": config.schedule.to_dict(),
        "stages": stages,
        **({"decoder": decoder} if decoder is not None else {}),
        "notes": (
            "One graph per stage = one denoiser evaluation D(x; sigma) with preconditioning inside. "
            "Conditioned stages take 'sigma_cond', the condition's own noise level, because the "
            "denoiser scales the condition by c_in(sigma_cond). Drive the stages with 'schedule'. "
            "A latent model's stages take the flow time t as 'sigma' and return the velocity; its "
            "'decoder' graph turns the last stage's latents into images in [-1, 1]."
        ),
    }
    write_manifest(out, manifest)
    return manifest


def _export_decoder(
    model: LowDiffModel, out: Path, opset: int, exporter: Exporter, check: bool, gen: torch.Generator
) -> dict[str, Any]:
    """Write the decode stage's graph; returns its manifest entry (file, sha256, shapes, fingerprint)."""
    import onnx

    config = model.config
    assert model.decoder is not None and config.autoencoder is not None
    r, channels = config.resolutions[-1], config.network.img_channels
    path = out / DECODER_FILE
    example = [torch.randn(2, channels, r, r, generator=gen)]
    _export_stage(DecoderGraph(model.decoder.eval()).eval(), example, path, opset, exporter)
    if check:
        onnx.checker.check_model(str(path))
    return {
        "file": path.name,
        "sha256": file_sha256(path),
        "latent_resolution": r,
        "resolution": config.image_resolution,
        "parameters": sum(p.numel() for p in model.decoder.parameters()),
        "initializer_elements": onnx_initializer_elements(path),
        "weights_sha256": weights_sha256(model.decoder),
        **decoder_io(r, channels, config.image_resolution, config.image_channels),
    }
