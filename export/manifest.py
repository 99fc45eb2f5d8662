"""The ``manifest.json`` that describes an exported engine folder, and the checks made on loading it.

An engine folder is only usable with the model it was exported from and the schedule that model
samples with, so the manifest carries both (the full config and :meth:`CascadeSchedule.to_dict`)
plus a fingerprint of the weights: an engine runner refuses a folder whose fingerprint differs
from the model it is asked to serve, instead of silently generating with other weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lowdiff.errors import ManifestError
from lowdiff.hashing import file_sha256, weights_sha256

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "lowdiff-engines-v1"

# Input and output names of every exported stage graph, in call order. ``condition`` and
# ``sigma_cond`` exist only for conditioned stages (every stage but the first), ``class_labels``
# only for class-conditional models. ``sigma_cond`` is an addition to the input list: our
# Denoiser scales the condition by c_in at the condition's own noise level (lowdiff/precond.py),
# so the graph needs that level as an input to keep the preconditioning inside the graph.
INPUT_X = "x"
INPUT_SIGMA = "sigma"
INPUT_LABELS = "class_labels"
INPUT_CONDITION = "condition"
INPUT_SIGMA_COND = "sigma_cond"
OUTPUT = "denoised"
# A latent (flow) stage's graph: "sigma" carries the flow time t, "denoised" the velocity, and there is no
# "sigma_cond" (the DiT reads the condition's noise off the condition; an unused input would be dropped
# from the graph by the exporter anyway). The decode stage: normalised latents in, images out.
DECODER_INPUT = "latents"
DECODER_OUTPUT = "images"
DECODER_FILE = "decoder.onnx"


def stage_input_names(stage_index: int, conditional: bool, flow: bool = False) -> list[str]:
    names = [INPUT_X, INPUT_SIGMA]
    if conditional:
        names.append(INPUT_LABELS)
    if stage_index > 0:
        names += [INPUT_CONDITION] if flow else [INPUT_CONDITION, INPUT_SIGMA_COND]
    return names


def decoder_io(latent_resolution: int, latent_channels: int, image_resolution: int, image_channels: int) -> dict:
    """Input/output names, symbolic shapes and dtypes of the decode-stage graph."""
    return {
        "inputs": [{"name": DECODER_INPUT, "shape": ["batch", latent_channels, latent_resolution, latent_resolution],
                    "dtype": "float32"}],
        "outputs": [{"name": DECODER_OUTPUT, "shape": ["batch", image_channels, image_resolution, image_resolution],
                     "dtype": "float32"}],
    }  # fmt: skip


def stage_io(stage_index: int, resolution: int, channels: int, conditional: bool, flow: bool = False) -> dict[str, Any]:
    """Input/output names, symbolic shapes ("batch" is dynamic) and dtypes of one stage graph."""
    image = ["batch", channels, resolution, resolution]
    specs = {
        INPUT_X: (image, "float32"),
        INPUT_SIGMA: (["batch"], "float32"),
        INPUT_LABELS: (["batch"], "int64"),
        INPUT_CONDITION: (image, "float32"),
        INPUT_SIGMA_COND: (["batch"], "float32"),
    }
    inputs = [
        {"name": n, "shape": specs[n][0], "dtype": specs[n][1]}
        for n in stage_input_names(stage_index, conditional, flow)
    ]
    outputs = [{"name": OUTPUT, "shape": image, "dtype": "float32"}]
    return {"inputs": inputs, "outputs": outputs}


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> Path:
    path = out_dir / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(path)
    return path


def read_manifest(engine_dir: str | Path, expected_format: str | None = None) -> dict[str, Any]:
    """Read and sanity-check ``engine_dir/manifest.json``; ``expected_format`` is 'onnx' or 'tensorrt'."""
    path = Path(engine_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{engine_dir}: no {MANIFEST_NAME} (export one with `lowdiff export`)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{path}: not a LowDiff engine manifest")
    if expected_format is not None and manifest.get("engine_format") != expected_format:
        raise ManifestError(
            f"{path}: holds {manifest.get('engine_format')!r} engines, not {expected_format!r}; "
            f"export with `lowdiff export --format {expected_format}`"
        )
    stages = manifest.get("stages")
    if not isinstance(stages, list) or not stages or not all(isinstance(st, dict) for st in stages):
        raise ManifestError(f"{path}: 'stages' must be a non-empty list of objects")
    if not isinstance(manifest.get("weights_sha256"), str):
        raise ManifestError(f"{path}: 'weights_sha256' is missing")
    return manifest


def decoder_entry(manifest: dict[str, Any], engine_dir: str | Path) -> dict[str, Any] | None:
    """The manifest's decode stage (a latent model's), checked to be an object; None if it has none."""
    entry = manifest.get("decoder")
    if entry is not None and not isinstance(entry, dict):
        raise ManifestError(f"{engine_dir}: 'decoder' must be an object")
    return entry


def stage_file(engine_dir: str | Path, stage: dict[str, Any]) -> Path:
    """The verified path of one stage's file: inside ``engine_dir`` and with the manifest's sha256.

    Nothing in a manifest is trusted: a ``file`` that is absolute, climbs out with ``..`` or a
    symlink, or whose bytes differ from the recorded ``sha256`` (a replaced graph) is refused."""
    folder = Path(engine_dir).resolve()
    name = stage.get("file")
    if not isinstance(name, str) or not name:
        raise ManifestError(f"{engine_dir}: a stage has no 'file'")
    path = (folder / name).resolve()
    if Path(name).is_absolute() or not path.is_relative_to(folder):
        raise ManifestError(f"{engine_dir}: stage file {name!r} is outside the engine folder")
    if not path.is_file():
        raise ManifestError(f"{engine_dir}: stage file {name} is missing")
    expected = stage.get("sha256")
    if not isinstance(expected, str) or len(expected) != 64:
        raise ManifestError(f"{engine_dir}: stage file {name} has no sha256 in the manifest; re-export")
    if file_sha256(path) != expected.lower():
        raise ManifestError(f"{engine_dir}: {name} does not match its sha256 in the manifest (modified?); re-export")
    return path


def check_model_matches(manifest: dict[str, Any], model: Any, engine_dir: str | Path) -> None:
    """Refuse an engine folder exported from other weights.

    The schedule is not checked: a stage graph is one denoiser evaluation, valid for any schedule,
    and the cascade that drives it always comes from the model's own :class:`CascadeSchedule`.
    """
    if manifest["weights_sha256"] != weights_sha256(model.denoiser.net):
        raise ManifestError(
            f"{engine_dir}: exported from other weights (config {manifest['config_name']!r}, checkpoint "
            f"{str(manifest.get('checkpoint_sha256'))[:12]}); re-export it for this model"
        )
    decoder = getattr(model, "decoder", None)
    entry = decoder_entry(manifest, engine_dir)
    if (decoder is None) != (entry is None):
        raise ManifestError(
            f"{engine_dir}: {'has no decode stage' if entry is None else 'has a decode stage'}, "
            f"the model {'is latent' if decoder is not None else 'is not'}; re-export it for this model"
        )
    if decoder is not None and entry is not None and entry.get("weights_sha256") != weights_sha256(decoder):
        raise ManifestError(f"{engine_dir}: its decoder was exported from other weights; re-export it for this model")
