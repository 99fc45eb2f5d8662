"""`lowdiff train` on a latent config: the flow loss through the Trainer on tiny random latents, the
autoencoder carried from --init-from into the checkpoint, and bad latents files refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lowdiff.model import config_to_dict, load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def latent_setup(tiny_latent_model, tmp_path: Path) -> tuple[Path, Path, Path]:
    source = tiny_latent_model()
    with torch.no_grad():
        source.decoder.latent_std.fill_(2.0)  # the autoencoder the latents belong to
    init = tmp_path / "init.pt"
    source.save(init)
    config = tmp_path / "tiny-latent.json"
    data = config_to_dict(source.config)
    data["training"] = {**data["training"], "batch_size": 4, "lr_rampup_kimg": 0.0, "ema_halflife_kimg": 0.001}
    config.write_text(json.dumps(data))
    gen = torch.Generator().manual_seed(0)
    latents = tmp_path / "latents.pt"
    torch.save({"latents": torch.randn(12, 4, 8, 8, generator=gen), "labels": torch.arange(12) % 10}, latents)
    return config, latents, init


def test_train_runs_the_flow_loss_and_keeps_the_autoencoder(lowdiff_cli, latent_setup, tmp_path: Path) -> None:
    config, latents, init = latent_setup
    out = tmp_path / "final.pt"
    r = lowdiff_cli("train", "--config", str(config), "--data", str(latents), "--run-dir", str(tmp_path / "run"),
                    "--kimg", "0.012", "--grid-every", "0", "--threads", "1", "--init-from", str(init),
                    "--export", str(out), "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr
    trained, start = load_model(out), load_model(init)
    assert trained.metadata["step"] == 3
    assert torch.equal(trained.decoder.latent_std, start.decoder.latent_std)  # from --init-from, not fresh
    before = start.denoiser.net.state_dict()
    changed = [k for k, v in trained.denoiser.net.state_dict().items() if not torch.equal(v, before[k])]
    assert changed  # the EMA moved: the flow loss reached the weights
    assert trained.generate([0], [1]).shape == (1, 3, 16, 16)
    r = lowdiff_cli("train", "--config", str(config), "--data", str(latents), "--run-dir", str(tmp_path / "run"),
                    "--kimg", "0.016", "--grid-every", "0", "--threads", "1", "--resume", "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr
    resumed = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert resumed["train_state"]["step"] == 4
    assert torch.equal(resumed["autoencoder_state_dict"]["latent_std"], start.decoder.latent_std)


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ({"latents": torch.zeros(3, 4, 4, 4)}, "must be [N, 4, 8, 8]"),
        ({"latents": torch.full((3, 4, 8, 8), float("nan")), "labels": torch.arange(3)}, "finite"),
        ({"latents": torch.zeros(3, 4, 8, 8)}, "needs 'labels'"),
        ({"latents": torch.zeros(3, 4, 8, 8), "labels": torch.zeros(2, dtype=torch.long)}, "labels must be"),
        ({"images": torch.zeros(3)}, "float tensor 'latents'"),
    ],
)
def test_bad_latents_are_one_line(lowdiff_cli, latent_setup, tmp_path: Path, payload: dict, needle: str) -> None:
    config, _, init = latent_setup
    bad = tmp_path / "bad.pt"
    torch.save(payload, bad)
    r = lowdiff_cli("train", "--config", str(config), "--data", str(bad), "--run-dir", str(tmp_path / "run"),
                    "--kimg", "0.004", "--init-from", str(init), "--quiet")  # fmt: skip
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert needle in r.stderr and "--data" in r.stderr
