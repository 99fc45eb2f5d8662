"""The Python API (lowdiff.load / Pipeline.generate), including the README's example, executed."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

import lowdiff
from lowdiff.errors import CheckpointError, RequestError

ROOT = Path(__file__).resolve().parents[2]


def test_the_readme_example_runs(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python API") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    assert (tmp_path / "sneaker.png").is_file()


def test_names_and_indices_give_the_same_pixels_as_the_model() -> None:
    pipe = lowdiff.load()
    by_name = pipe.generate(class_labels=["ankle boot", "Bag"], seeds=[3, 4], output_type="tensor")
    by_index = pipe.engine.model.generate([3, 4], [9, 8])
    assert np.array_equal(by_name.numpy(), by_index.numpy())
    pil = pipe.generate(class_labels=9, seeds=3)
    assert np.array_equal(np.array(pil[0]), by_index[0, 0].numpy())


def test_bad_input_names_what_is_wrong(tmp_path: Path) -> None:
    pipe = lowdiff.load("fashion32")
    with pytest.raises(RequestError, match="unknown class 'Hat'; valid: 0 'T-shirt/top'"):
        pipe.generate(class_labels=["Hat"], seeds=[0])
    with pytest.raises(RequestError, match="out of range"):
        pipe.generate(class_labels=[10], seeds=[0])
    with pytest.raises(CheckpointError, match="neither an embedded model"):
        lowdiff.load(tmp_path / "missing.pt")


def test_every_embedded_model_loads_by_its_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each name in EMBEDDED_MODELS is a packaged file holding the config of that name; a file of the same
    name in the working directory wins over the packaged one (a path is a path)."""
    from lowdiff.model import EMBEDDED_MODELS, load_model, resolve_checkpoint

    for name in EMBEDDED_MODELS:
        path = resolve_checkpoint(name)
        assert path.is_file() and path.parent.name == "weights", (name, path)
        assert load_model(name).config.name == name
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fashion32-latent").write_bytes(b"not a checkpoint")
    assert resolve_checkpoint("fashion32-latent") == Path("fashion32-latent")
    with pytest.raises(CheckpointError, match="not a readable LowDiff checkpoint"):
        load_model("fashion32-latent")
    with pytest.raises(CheckpointError, match="embedded models: fashion32, edm-fashion32"):
        load_model(tmp_path / "missing.pt")
