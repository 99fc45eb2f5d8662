"""EDM network snapshots (``network-snapshot-*.pkl``) read as data, never run.

EDM (NVlabs/edm) saves a snapshot with plain :mod:`pickle`: a dict whose ``ema`` is the
preconditioned network (``EDMPrecond``/``VPPrecond``/…), pickled through EDM's
``torch_utils.persistence``. That mechanism stores each module as a call to
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` whose ``meta`` carries the
*source code* of the module that defined the class, which EDM's own loader ``exec``\\ s. Loading a
snapshot with ``pickle.load`` therefore runs whatever code the file holds, so this module never
does: :class:`SnapshotUnpickler` resolves only a fixed list of globals, each to a function of its
own that builds plain data (a persistent object becomes a :class:`PersistentRecord` — class name,
constructor arguments, state — whose source text is kept only to be hashed), and tensors come
back through ``torch.load(..., weights_only=True)``. Any other global, e.g. ``os.system`` behind a
``__reduce__``, stops the read before it is resolved.

From the records, the SongUNet's constructor arguments rebuild a :class:`NetworkConfig` (LowDiff's
network is EDM's DDPM++ built in EDM's order and names, so with one resolution it is EDM's
network), the parameter names are mapped onto LowDiff's, and the preconditioning class picks
``edm`` or ``vp``. Whatever cannot be placed (another network class, NCSN++ options, a layer a
modified SongUNet added, a σ_data LowDiff does not carry) is an :class:`EDMImportError` naming it:
a partial import would serve a different model than the one trained.
"""

from __future__ import annotations

import hashlib
import io
import math
import pickle
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowdiff.configs import CIFAR10_CLASSES, ModelConfig
from lowdiff.errors import CheckpointError, ConfigError
from lowdiff.hashing import file_sha256
from lowdiff.network import NetworkConfig, UnifiedUNet
from lowdiff.schedule import CascadeSchedule, StageSchedule

# EDM's sampler defaults (generate.py): 18 Heun steps over σ ∈ [0.002, 80] with ρ = 7, clamped to
# the network's supported range (VP: σ(ε_t) … σ(1)).
EDM_NUM_STEPS = 18
EDM_SIGMA_MIN = 0.002
EDM_SIGMA_MAX = 80.0
SUPPORTED_PRECONDS = {"EDMPrecond": "edm", "VPPrecond": "vp"}
KNOWN_PRECONDS = (*SUPPORTED_PRECONDS, "VEPrecond", "iDDPMPrecond")
# The classes a DDPM++ SongUNet is built from; any other class in the tree is a layer LowDiff cannot place.
SONGUNET_PARTS = {"SongUNet", "UNetBlock", "Conv2d", "Linear", "GroupNorm", "PositionalEmbedding"}


class EDMImportError(CheckpointError):
    """An EDM snapshot that cannot be read (not a snapshot, unsafe) or mapped onto LowDiff (unknown layers)."""


# --- reading the pickle as data -------------------------------------------------------------------


@dataclass
class PersistentRecord:
    """One module saved by EDM's ``persistence``: what its constructor got and its ``__dict__``, as data."""

    class_name: str
    state: dict[str, Any]
    source_sha256: str

    @property
    def init_args(self) -> tuple[Any, ...]:
        args = self.state.get("_init_args")
        return tuple(args) if isinstance(args, list | tuple) else ()

    @property
    def init_kwargs(self) -> dict[str, Any]:
        kwargs = self.state.get("_init_kwargs")
        return dict(kwargs) if isinstance(kwargs, dict) else {}

    def children(self) -> dict[str, Any]:
        modules = self.state.get("_modules")
        return dict(modules) if isinstance(modules, dict) else {}


class TorchModuleRecord:
    """A plain torch container (``ModuleDict`` …) inside the network: its name and ``__dict__``."""

    type_name = "Module"

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"{self.type_name}: unexpected state {type(state).__name__}")
        self.state = state

    def children(self) -> dict[str, Any]:
        modules = self.state.get("_modules")
        return dict(modules) if isinstance(modules, dict) else {}


class PlainDict(dict):  # type: ignore[type-arg]
    """Stands in for ``dnnlib.EasyDict`` (a dict with attribute access): the keys and values only."""

    def __setstate__(self, state: Any) -> None:
        if state:
            raise pickle.UnpicklingError("EasyDict with instance state")


_NUMERIC_DTYPES = {f"{k}{n}" for k in "fiu" for n in (1, 2, 4, 8)} | {"b1"}


class NumpyDtype:
    """Stands in for ``numpy.dtype`` of a numeric scalar (EDM stores numpy floats such as √0.5)."""

    def __init__(self, spec: Any, align: Any = False, copy: Any = True):
        if not isinstance(spec, str) or spec not in _NUMERIC_DTYPES:
            raise pickle.UnpicklingError(f"numpy dtype {spec!r} is not a numeric scalar type")
        self.spec = spec
        self.byteorder = "<"

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.byteorder = "<" if state[1] in ("|", "=") else state[1]


def _numpy_scalar(dtype: Any, data: Any = None) -> float | int | bool:
    import numpy as np

    if not isinstance(dtype, NumpyDtype) or not isinstance(data, bytes):
        raise pickle.UnpicklingError("numpy scalar of a non-numeric type")
    value = np.frombuffer(data, dtype=np.dtype(dtype.byteorder + dtype.spec), count=1)[0]
    return value.item()


def _load_storage(data: Any) -> Any:
    """A tensor storage pickled by ``torch.storage`` as its own small ``torch.save`` file: read with
    ``weights_only=True`` (torch's own restricted unpickler), never the ``weights_only=False`` that
    the original ``_load_from_bytes`` uses."""
    if not isinstance(data, bytes):
        raise pickle.UnpicklingError("storage bytes expected")
    storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(storage, torch.storage.TypedStorage | torch.UntypedStorage):
        raise pickle.UnpicklingError(f"storage expected, got {type(storage).__name__}")
    return storage


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_rest: Any) -> torch.Tensor:
    if not isinstance(storage, torch.storage.TypedStorage | torch.UntypedStorage):
        raise pickle.UnpicklingError("tensor without a storage")
    if not isinstance(offset, int) or not all(isinstance(v, int) for v in (*size, *stride)):
        raise pickle.UnpicklingError("tensor with a non-integer size, stride or offset")
    return torch._utils._rebuild_tensor_v2(storage, offset, tuple(size), tuple(stride), False, OrderedDict())


def _rebuild_parameter(data: Any, *_rest: Any) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("parameter without a tensor")
    return data


def _persistent_object(meta: Any) -> PersistentRecord:
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise pickle.UnpicklingError("persistent object without a class meta dict")
    name, source, state = meta.get("class_name"), meta.get("module_src"), meta.get("state")
    if not isinstance(name, str) or not isinstance(source, str) or not isinstance(state, dict):
        raise pickle.UnpicklingError("persistent object meta lacks class_name, module_src or state")
    return PersistentRecord(name, dict(state), hashlib.sha256(source.encode()).hexdigest())


def _latin1_bytes(text: Any, encoding: Any = "latin1") -> bytes:
    """How protocol-2 pickles spell ``bytes``: ``_codecs.encode(str, 'latin1')``, and only that."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode other than str → latin-1 bytes")
    return text.encode("latin-1")


def _torch_module(name: str) -> type[TorchModuleRecord]:
    return type(name, (TorchModuleRecord,), {"type_name": name})


_TORCH_CONTAINERS = ("ModuleDict", "ModuleList", "Sequential")
_ALLOWED: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_object,
    ("collections", "OrderedDict"): OrderedDict,
    **{(m, "set"): set for m in ("builtins", "__builtin__")},  # protocols < 4 spell sets and bytes as calls
    **{(m, "frozenset"): frozenset for m in ("builtins", "__builtin__")},
    ("_codecs", "encode"): _latin1_bytes,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("dnnlib.util", "EasyDict"): PlainDict,
    ("numpy", "dtype"): NumpyDtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    **{("torch.nn.modules.container", n): _torch_module(n) for n in _TORCH_CONTAINERS},
}


class SnapshotUnpickler(pickle.Unpickler):
    """Resolves only the globals in ``_ALLOWED``, each to this module's own data-building stand-in."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not used by EDM snapshots")


def read_snapshot(path: Path) -> dict[str, Any]:
    """The snapshot's top-level dict, every module as a record; nothing from the file is executed."""
    if not path.is_file():
        raise EDMImportError(f"EDM snapshot not found: {path}")
    try:
        with path.open("rb") as f:
            data = SnapshotUnpickler(f).load()
    except pickle.UnpicklingError as exc:
        raise EDMImportError(f"{path}: not a readable EDM snapshot ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - any failure of a foreign file is "not a snapshot"
        raise EDMImportError(f"{path}: not a readable EDM snapshot ({type(exc).__name__})") from None
    if not isinstance(data, dict) or not isinstance(data.get("ema"), PersistentRecord):
        raise EDMImportError(f"{path}: not an EDM network snapshot (no 'ema' network in it)")
    return data


# --- mapping onto LowDiff ------------------------------------------------------------------------

# SongUNet's constructor defaults (EDM training/networks.py), for arguments a snapshot does not record.
_SONGUNET_DEFAULTS: dict[str, Any] = {
    "label_dim": 0,
    "augment_dim": 0,
    "model_channels": 128,
    "channel_mult": [1, 2, 2, 2],
    "channel_mult_emb": 4,
    "num_blocks": 4,
    "attn_resolutions": [16],
    "dropout": 0.10,
    "label_dropout": 0,
    "embedding_type": "positional",
    "channel_mult_noise": 1,
    "encoder_type": "standard",
    "decoder_type": "standard",
    "resample_filter": [1, 1],
}
# The DDPM++ choices LowDiff's network implements; another value is an architecture it does not have.
_DDPMPP = {
    "embedding_type": "positional",
    "channel_mult_noise": 1,
    "encoder_type": "standard",
    "decoder_type": "standard",
    "resample_filter": [1, 1],
}
_SONGUNET_POSITIONAL = ("img_resolution", "in_channels", "out_channels", *_SONGUNET_DEFAULTS)
# Preconditioning constants LowDiff's configs fix (lowdiff.precond.Denoiser's defaults).
_PRECOND_FIXED = {
    "EDMPrecond": {"sigma_data": 0.5},
    "VPPrecond": {"beta_d": 19.9, "beta_min": 0.1, "M": 1000, "epsilon_t": 1e-5},
}


@dataclass
class ImportedSnapshot:
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)


def _unmapped(path: Path, what: str) -> EDMImportError:
    return EDMImportError(f"{path}: cannot map onto LowDiff: {what}")


def _songunet_kwargs(path: Path, record: PersistentRecord) -> dict[str, Any]:
    names = _SONGUNET_POSITIONAL
    if len(record.init_args) > len(names):
        raise _unmapped(path, f"SongUNet with {len(record.init_args)} positional arguments")
    kwargs = dict(_SONGUNET_DEFAULTS)
    kwargs.update(zip(names, record.init_args))
    kwargs.update(record.init_kwargs)
    unknown = sorted(set(kwargs) - set(names))
    if unknown:
        raise _unmapped(path, f"SongUNet constructor argument(s) {', '.join(unknown)}")
    missing = [k for k in ("img_resolution", "in_channels", "out_channels") if k not in kwargs]
    if missing:
        raise _unmapped(path, f"SongUNet without recorded {', '.join(missing)} (init_kwargs not saved)")
    other = [f"{k}={kwargs[k]!r}" for k, v in _DDPMPP.items() if _normalise(kwargs[k]) != _normalise(v)]
    if other:
        raise _unmapped(path, f"SongUNet with {', '.join(other)} (LowDiff implements DDPM++ only)")
    if kwargs["in_channels"] != kwargs["out_channels"]:
        raise _unmapped(path, "SongUNet with in_channels ≠ out_channels")
    return kwargs


def _normalise(value: Any) -> Any:
    return list(value) if isinstance(value, list | tuple) else value


def _network_config(path: Path, kw: dict[str, Any]) -> NetworkConfig:
    try:
        res = int(kw["img_resolution"])
        config = NetworkConfig(
            img_resolution=res,
            img_channels=int(kw["in_channels"]),
            label_dim=int(kw["label_dim"]),
            resolutions=(res,),
            model_channels=int(kw["model_channels"]),
            channel_mult=tuple(int(m) for m in kw["channel_mult"]),
            channel_mult_emb=int(kw["channel_mult_emb"]),
            num_blocks=int(kw["num_blocks"]),
            attn_resolutions=tuple(int(r) for r in kw["attn_resolutions"]),
            dropout=float(kw["dropout"]),
            augment_dim=int(kw["augment_dim"]),
        )
    except (TypeError, ValueError) as exc:
        raise _unmapped(path, f"SongUNet arguments of unexpected types ({exc})") from None
    if res < 1 or res >> (len(config.channel_mult) - 1) < 1 or config.model_channels < 4:
        raise _unmapped(path, f"SongUNet of resolution {res} with {len(config.channel_mult)} levels")
    return config


def _collect(path: Path, node: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """Parameters and persistent buffers of a module tree by dotted name, as ``state_dict`` names them."""
    if isinstance(node, PersistentRecord):
        if node.class_name not in SONGUNET_PARTS:
            raise _unmapped(path, f"layer {prefix.rstrip('.') or 'model'} of class {node.class_name}")
        _check_layer(path, node, prefix.rstrip("."))
        state = node.state
    elif isinstance(node, TorchModuleRecord):
        state = node.state
    else:
        raise _unmapped(path, f"layer {prefix.rstrip('.')} is not a module ({type(node).__name__})")
    for kind in ("_parameters", "_buffers"):
        tensors = state.get(kind) or {}
        if not isinstance(tensors, dict):
            raise _unmapped(path, f"{prefix}{kind} is not a dict")
        skip = (state.get("_non_persistent_buffers_set") or set()) if kind == "_buffers" else set()
        for name, value in tensors.items():
            if value is None or name in skip:
                continue
            if not isinstance(value, torch.Tensor):
                raise _unmapped(path, f"{prefix}{name} is not a tensor")
            out[prefix + name] = value
    children = node.children()
    for name, child in children.items():
        if child is not None:
            _collect(path, child, f"{prefix}{name}.", out)


def _check_layer(path: Path, node: PersistentRecord, name: str) -> None:
    """The DDPM++ block options LowDiff's blocks hard-wire; a snapshot with others is another network."""
    s = node.state
    if node.class_name == "UNetBlock":
        if s.get("adaptive_scale") or s.get("num_heads") not in (0, 1):
            raise _unmapped(path, f"block {name} with adaptive_scale/num_heads (not DDPM++)")
        if not math.isclose(float(s.get("skip_scale", 0)), math.sqrt(0.5), rel_tol=1e-9):
            raise _unmapped(path, f"block {name} with skip_scale {s.get('skip_scale')}")
    elif node.class_name == "GroupNorm":
        weight = (s.get("_parameters") or {}).get("weight")
        channels = weight.shape[0] if isinstance(weight, torch.Tensor) else 0
        if s.get("eps") != 1e-6 or s.get("num_groups") != min(32, channels // 4):
            raise _unmapped(path, f"group norm {name} with eps {s.get('eps')}, {s.get('num_groups')} groups")
    elif node.class_name == "Conv2d" and s.get("fused_resample"):
        raise _unmapped(path, f"convolution {name} with fused resampling")
    elif node.class_name == "PositionalEmbedding" and (not s.get("endpoint") or s.get("max_positions") != 10000):
        raise _unmapped(path, f"noise embedding {name} other than DDPM++'s")


_NAME_RULES = (
    (re.compile(r"^enc\.(\d+)x\1_conv\.(weight|bias)$"), lambda m: f"inputs.{m[1]}.{m[2]}"),
    (re.compile(r"^dec\.(\d+)x\1_aux_norm\.(weight|bias)$"), lambda m: f"outputs.{m[1]}.norm.{m[2]}"),
    (re.compile(r"^dec\.(\d+)x\1_aux_conv\.(weight|bias)$"), lambda m: f"outputs.{m[1]}.conv.{m[2]}"),
    (re.compile(r"^enc\.(.+)$"), lambda m: f"encoder.{m[1]}"),
    (re.compile(r"^dec\.(.+)$"), lambda m: f"decoder.{m[1]}"),
    (re.compile(r"^(map_label|map_augment|map_layer0|map_layer1)\.(weight|bias)$"), lambda m: m[0]),
)
_RESAMPLE_FILTER = re.compile(r"\.resample_filter$")


def lowdiff_name(edm_name: str) -> str | None:
    """LowDiff's name for an EDM SongUNet parameter (``enc.32x32_conv.weight`` → ``inputs.32.weight``)."""
    for pattern, rename in _NAME_RULES:
        m = pattern.match(edm_name)
        if m:
            return rename(m)
    return None


def map_weights(path: Path, edm: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """EDM's SongUNet tensors renamed to LowDiff's; every tensor must land on a LowDiff tensor of its shape.

    The ``resample_filter`` buffers are EDM's [1,1] filter, which LowDiff's resampling hard-wires
    (average pool / nearest): they are checked, not copied."""
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for name, tensor in edm.items():
        if _RESAMPLE_FILTER.search(name):
            if tensor.shape != (1, 1, 2, 2) or not torch.allclose(tensor.float(), torch.full((1, 1, 2, 2), 0.25)):
                unmapped.append(f"{name} (a resampling filter other than [1,1])")
            continue
        mapped = lowdiff_name(name)
        if mapped is None or mapped not in target:
            unmapped.append(name)
            continue
        if tensor.shape != target[mapped].shape:
            unmapped.append(
                f"{name} (shape {tuple(tensor.shape)}, LowDiff's {mapped} is {tuple(target[mapped].shape)})"
            )
            continue
        out[mapped] = tensor.detach().to(torch.float32).contiguous().clone()
    if unmapped:
        more = f" and {len(unmapped) - 3} more" if len(unmapped) > 3 else ""
        raise _unmapped(path, f"{len(unmapped)} tensor(s) {', '.join(unmapped[:3])}{more}")
    return out


@dataclass
class EDMNetwork:
    """A snapshot's network, validated as a DDPM++ SongUNet under a preconditioning LowDiff has."""

    precond: PersistentRecord
    model: PersistentRecord
    kwargs: dict[str, Any]  # SongUNet's constructor arguments, defaults filled in
    tensors: dict[str, torch.Tensor]  # EDM's names, relative to the SongUNet
    dataset: str  # dataset_kwargs.path, provenance only ('' if none)


def edm_network(path: Path) -> EDMNetwork:
    """Read and validate a snapshot's ``ema`` network; any part LowDiff cannot place is an error."""
    data = read_snapshot(path)
    precond: PersistentRecord = data["ema"]
    if precond.class_name not in KNOWN_PRECONDS:
        raise _unmapped(path, f"network class {precond.class_name} (known: {', '.join(KNOWN_PRECONDS)})")
    if precond.class_name not in SUPPORTED_PRECONDS:
        raise _unmapped(path, f"preconditioning {precond.class_name} (LowDiff has EDMPrecond and VPPrecond)")
    model = precond.children().get("model")
    if not isinstance(model, PersistentRecord):
        raise _unmapped(path, f"{precond.class_name} without a model network")
    if model.class_name != "SongUNet":
        raise _unmapped(path, f"network class {model.class_name} (LowDiff maps EDM's SongUNet, DDPM++)")
    extra_children = sorted(set(precond.children()) - {"model"})
    if extra_children:
        raise _unmapped(path, f"{precond.class_name} layer(s) {', '.join(extra_children)}")
    kwargs = _songunet_kwargs(path, model)
    tensors: dict[str, torch.Tensor] = {}
    _collect(path, model, "", tensors)
    dataset_kwargs = data.get("dataset_kwargs")
    dataset = dataset_kwargs.get("path", "") if isinstance(dataset_kwargs, dict) else ""
    return EDMNetwork(precond, model, kwargs, tensors, dataset if isinstance(dataset, str) else "")


def _precond_constants(path: Path, precond: PersistentRecord) -> None:
    for key, default in _PRECOND_FIXED[precond.class_name].items():
        value = precond.state.get(key, default)
        if not isinstance(value, int | float) or not math.isclose(float(value), default, rel_tol=1e-9):
            raise _unmapped(path, f"{precond.class_name} {key}={value!r} (LowDiff's configs use {default})")


def sampler_sigma_range(precond: PersistentRecord) -> tuple[float, float]:
    """EDM's sampler range clamped to the network's, as generate.py's ``edm_sampler`` clamps it."""
    lo, hi = precond.state.get("sigma_min", 0.0), precond.state.get("sigma_max", math.inf)
    if precond.class_name == "VPPrecond" and not isinstance(lo, float):
        lo, hi = _vp_sigma(1e-5), _vp_sigma(1.0)
    lo = float(lo) if isinstance(lo, int | float) else 0.0
    hi = float(hi) if isinstance(hi, int | float) else math.inf
    return max(EDM_SIGMA_MIN, lo), min(EDM_SIGMA_MAX, hi)


def _vp_sigma(t: float) -> float:
    """σ(t) of EDM's VP schedule with its defaults, in float32 as EDM's ``VPPrecond.sigma`` computes it."""
    tt = torch.as_tensor(t)
    return float(((0.5 * 19.9 * tt**2 + 0.1 * tt).exp() - 1).sqrt())


def import_snapshot(path: str | Path, num_steps: int = EDM_NUM_STEPS) -> ImportedSnapshot:
    """An EDM snapshot as a single-stage LowDiff model: config, weights (LowDiff names) and provenance."""
    path = Path(path)
    edm = edm_network(path)
    precond = edm.precond
    _precond_constants(path, precond)
    network = _network_config(path, edm.kwargs)
    target = UnifiedUNet(network).state_dict()  # the names and shapes to fill
    weights = map_weights(path, edm.tensors, target)
    missing = sorted(set(target) - set(weights))
    if missing:
        raise _unmapped(path, f"LowDiff tensor(s) with no EDM counterpart: {', '.join(missing[:3])}")
    sigma_min, sigma_max = sampler_sigma_range(precond)
    try:
        schedule = CascadeSchedule((StageSchedule(network.img_resolution, num_steps, sigma_min, sigma_max),))
    except ConfigError as exc:  # an out-of-range σ the file claims
        raise _unmapped(path, f"its σ range {sigma_min}…{sigma_max} ({exc.message})") from None
    class_names = CIFAR10_CLASSES if network.label_dim == 10 and "cifar" in edm.dataset.lower() else ()
    config = ModelConfig(
        name=f"edm-{path.stem}",
        network=network,
        schedule=schedule,
        preconditioning=SUPPORTED_PRECONDS[precond.class_name],  # type: ignore[arg-type]
        description=f"imported from EDM snapshot {path.name} ({precond.class_name}, SongUNet DDPM++)",
        class_names=class_names,
    )
    metadata = {
        "source": "edm-snapshot",
        "edm_snapshot": path.name,
        "edm_snapshot_sha256": file_sha256(path),
        "edm_precond": precond.class_name,
        "edm_source_sha256": edm.model.source_sha256,
        "edm_dataset": edm.dataset,
    }
    return ImportedSnapshot(config, weights, metadata)


# --- LowDiff from EDM: the shared U-Net copied into a multi-resolution network ------------------


def is_resolution_specific(name: str) -> bool:
    """LowDiff's own layers: per-resolution input convolutions and output heads, the resolution embedding."""
    return name.startswith(("inputs.", "outputs.", "map_resolution."))


@dataclass
class EDMInit:
    state_dict: dict[str, torch.Tensor]  # the target network's, shared U-Net from EDM, the rest as given
    copied: list[str]
    fresh: list[str]


def init_from_edm(
    path: str | Path, config: ModelConfig, initial: dict[str, torch.Tensor], field_name: str = "init_from_edm"
) -> EDMInit:
    """A LowDiff network (``config``, any resolutions) started from an EDM snapshot: every shared
    U-Net tensor (mapping, encoder and decoder blocks) copied from EDM, the resolution-specific layers
    (input convolutions that also take the condition, output heads, the resolution embedding) kept
    from ``initial`` — a freshly initialised network of ``config``.

    EDM's network is the single-resolution case of LowDiff's, so its blocks fit by name and shape;
    what must match is the U-Net itself (channels, levels, blocks, attention, labels) and the
    preconditioning, since F(x; σ) means something else under VP than under EDM's. A mismatch is an
    error naming it rather than a partial copy that would train from a silently different start."""
    path = Path(path)
    try:
        edm = edm_network(path)
        _precond_constants(path, edm.precond)
        source = _network_config(path, edm.kwargs)
    except EDMImportError as exc:
        raise exc.for_field(field_name) from None
    target = config.network
    problems = []
    kind = SUPPORTED_PRECONDS[edm.precond.class_name]
    if kind != config.preconditioning:
        problems.append(f"preconditioning {edm.precond.class_name} vs the config's {config.preconditioning!r}")
    shape = ("img_resolution", "img_channels", "label_dim", "model_channels", "channel_mult", "num_blocks")
    for key in (*shape, "channel_mult_emb", "attn_resolutions", "augment_dim"):
        if getattr(source, key) != getattr(target, key):
            problems.append(f"{key} {getattr(source, key)} vs the config's {getattr(target, key)}")
    if problems:
        raise EDMImportError(f"{path} does not fit config {config.name!r}: {'; '.join(problems)}", field_name)
    single = UnifiedUNet(source).state_dict()
    try:
        mapped = map_weights(path, edm.tensors, single)
    except EDMImportError as exc:
        raise exc.for_field(field_name) from None
    out = {k: v.clone() for k, v in initial.items()}
    copied, fresh = [], []
    for name, tensor in initial.items():
        if is_resolution_specific(name):
            fresh.append(name)
        elif name in mapped and mapped[name].shape == tensor.shape:
            out[name] = mapped[name].to(tensor.dtype).clone()
            copied.append(name)
        else:
            raise EDMImportError(f"{path}: no EDM tensor for {config.name}'s {name}", field_name)
    return EDMInit(out, copied, fresh)
