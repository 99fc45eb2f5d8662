"""Sample-quality evaluation with a small committed classifier (``lowdiff eval``).

* **Class agreement**: the share of generated images that the classifier assigns to the class
  they were generated for. Its ceiling is the classifier's accuracy on held-out real images.
* **Fréchet distance (FD)**: between Gaussian fits of the classifier's penultimate features on
  generated and on held-out real images, FID's formula on our own features (so its values are
  not comparable with Inception FID). Its floor is the FD of held-out real images against the
  training images.
* **Inception FID** (optional, ``lowdiff eval --inception-fid``): the standard metric through
  torch-fidelity, when it and its weights are available; otherwise a clear error, never a guess.

The classifier is trained on the training split only (``lowdiff train-classifier``); the one
shipped in ``lowdiff/weights`` is for Fashion-MNIST padded to 32×32.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from torch import nn

from lowdiff.errors import CheckpointError, LowDiffError
from lowdiff.model import atomic_torch_save, default_checkpoint_path
from lowdiff.progress import Progress

CLASSIFIER_FORMAT = "lowdiff-classifier-v1"


def default_classifier_path() -> Path:
    return default_checkpoint_path().with_name("fashion32-classifier.pt")


class Classifier(nn.Module):
    """A small CNN on [−1, 1] images; ``features`` is the penultimate layer used for FD."""

    def __init__(self, channels: int, num_classes: int, resolution: int, feature_dim: int = 128):
        super().__init__()
        self.channels, self.num_classes, self.resolution = channels, num_classes, resolution

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )

        self.body = nn.Sequential(block(channels, 32), block(32, 64), block(64, 128))
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(128 * (resolution // 8) ** 2, feature_dim), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(feature_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def save(self, path: Path, metadata: dict[str, Any]) -> None:
        atomic_torch_save(
            {
                "format": CLASSIFIER_FORMAT,
                "shape": {"channels": self.channels, "num_classes": self.num_classes, "resolution": self.resolution},
                "state_dict": self.state_dict(),
                "metadata": metadata,
            },
            path,
        )

    @classmethod
    def load(cls, path: Path | None = None) -> Classifier:
        path = path or default_classifier_path()
        if not path.is_file():
            raise CheckpointError(f"classifier not found: {path}", "classifier")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{path}: not a readable classifier ({type(exc).__name__})", "classifier") from None
        if not isinstance(payload, dict) or payload.get("format") != CLASSIFIER_FORMAT:
            raise CheckpointError(f"{path}: not a LowDiff classifier (missing format tag)", "classifier")
        model = cls(**payload["shape"])
        model.load_state_dict(payload["state_dict"])
        model.metadata = payload.get("metadata", {})
        return model.eval()


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    epochs: int = 3,
    batch_size: int = 128,
    seed: int = 0,
    log: TextIO = sys.stderr,
) -> Classifier:
    """Train on [−1, 1] images with ±2-pixel random shifts; progress (images, running accuracy) on ``log``."""
    torch.manual_seed(seed)
    model = Classifier(images.shape[1], num_classes, images.shape[-1])
    per_epoch = len(images) // batch_size
    steps = epochs * per_epoch
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    progress = Progress(steps * batch_size, "training classifier", "img", stream=log)
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        correct = total = 0
        for i in range(per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            x = images[idx]
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
            x = torch.roll(F.pad(x, (2, 2, 2, 2), value=-1.0), (dy, dx), dims=(2, 3))[..., 2:-2, 2:-2]
            logits = model(x)
            loss = F.cross_entropy(logits, labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            correct += int((logits.argmax(1) == labels[idx]).sum())
            total += len(idx)
            progress.update(len(idx), epoch=f"{epoch + 1}/{epochs}", train_accuracy=correct / total)
    progress.close()
    return model.eval()


@torch.no_grad()
def classify(
    model: Classifier, images: torch.Tensor, batch_size: int = 500, progress: Progress | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted labels, penultimate features) for [−1, 1] images, in eval mode (BatchNorm, dropout)."""
    model.eval()
    preds, feats = [], []
    for i in range(0, len(images), batch_size):
        f = model.features(images[i : i + batch_size])
        feats.append(f.double())
        preds.append(model.head(f).argmax(1))
        if progress is not None:
            progress.update(len(f))
    return torch.cat(preds), torch.cat(feats)


def classify_with_progress(
    model: Classifier, images: torch.Tensor, desc: str, log: TextIO | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`classify` with a :class:`~lowdiff.progress.Progress` of its own (scoring 60k images takes a minute)."""
    with Progress(len(images), desc, "img", stream=log) as progress:
        return classify(model, images, progress=progress)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2(Σa Σb)^½), with the trace of the root from a symmetric eigenproblem."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
    inner = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * inner)


@dataclass
class QualityReport:
    num_samples: int
    class_agreement: float | None
    fd: float
    classifier_accuracy_real: float | None  # ceiling of class agreement
    fd_real_floor: float | None  # held-out real vs training real
    seconds: float
    class_agreement_per_class: list[float] | None = None
    inception_fid: float | None = None
    inception_fid_error: str | None = None  # why Inception FID was asked for but not computed
    warnings: list[str] | None = None  # what makes these figures hard to compare or to trust

    def as_dict(self) -> dict[str, Any]:
        def rounded(v: Any) -> Any:
            if isinstance(v, float):
                return round(v, 5)
            return [rounded(x) for x in v] if isinstance(v, list) else v

        return {k: rounded(v) for k, v in self.__dict__.items()}


GenerateFn = Callable[[Sequence[int], Sequence[int] | None], torch.Tensor]


def uint8_to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1


def generate_samples(
    generate: GenerateFn,
    num_samples: int,
    num_classes: int,
    batch_size: int = 64,
    seed0: int = 0,
    log: TextIO | None = sys.stderr,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images for seeds seed0…seed0+n−1 with classes cycling 0…K−1; progress every batch."""
    labels = torch.arange(num_samples) % num_classes if num_classes else None
    out = []
    with Progress(num_samples, "generating", "img", stream=log) as progress:
        for i in range(0, num_samples, batch_size):
            seeds = list(range(seed0 + i, seed0 + min(i + batch_size, num_samples)))
            batch_labels = labels[i : i + len(seeds)].tolist() if labels is not None else None
            out.append(generate(seeds, batch_labels))
            progress.update(len(seeds))
    return torch.cat(out), labels


def score_samples(
    samples: torch.Tensor, labels: torch.Tensor | None, classifier: Classifier, reference_features: torch.Tensor
) -> dict[str, Any]:
    """FD against the reference features and (with labels) overall and per-class agreement of uint8 samples."""
    preds, feats = classify(classifier, uint8_to_unit(samples))
    result: dict[str, Any] = {"fd": frechet_distance(feats, reference_features), "class_agreement": None}
    if labels is not None:
        hits = (preds == labels).float()
        result["class_agreement"] = float(hits.mean())
        result["class_agreement_per_class"] = [
            float(hits[labels == c].mean()) if bool((labels == c).any()) else None
            for c in range(classifier.num_classes)
        ]
    return result


class InceptionUnavailable(LowDiffError):
    """Inception FID was asked for, but torch-fidelity or its weights are not available here."""

    def __init__(self, message: str, field: str | None = "inception_fid"):
        super().__init__(message, field)


def check_inception_available() -> None:
    """Fail fast (before generating anything) when torch-fidelity is not installed."""
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        raise InceptionUnavailable(
            "Inception FID needs torch-fidelity, which is not installed (pip install torch-fidelity; it also "
            "downloads its Inception weights from GitHub on first use)"
        ) from None


def inception_fid(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Standard Inception FID (torch-fidelity) between uint8 samples and [−1, 1] reference images.

    Both sets are written as RGB PNGs (greyscale repeated) and handed to torch-fidelity, which
    resizes them for Inception-v3. Not exercised in this project's CI: it needs torch-fidelity and
    its weights (downloaded on first use), which CI machines do not have."""
    check_inception_available()
    import tempfile

    import torch_fidelity
    from PIL import Image

    def write(images: torch.Tensor, folder: Path) -> None:
        folder.mkdir()
        for i, image in enumerate(images):
            array = (
                image.expand(3, -1, -1).permute(1, 2, 0).numpy()
                if image.shape[0] == 1
                else image.permute(1, 2, 0).numpy()
            )
            Image.fromarray(array).save(folder / f"{i:06d}.png")

    with tempfile.TemporaryDirectory() as tmp:
        write(samples, Path(tmp) / "generated")
        write(((reference + 1) * 127.5).round().clamp(0, 255).to(torch.uint8), Path(tmp) / "reference")
        try:
            metrics = torch_fidelity.calculate_metrics(
                input1=str(Path(tmp) / "generated"),
                input2=str(Path(tmp) / "reference"),
                cuda=torch.cuda.is_available(),
                fid=True,
                verbose=False,
            )
        except Exception as exc:  # e.g. no network for the weights download; report it, keep the rest
            raise InceptionUnavailable(f"torch-fidelity failed ({type(exc).__name__}: {exc})") from exc
    return float(metrics["frechet_inception_distance"])


def evaluate(
    generate: GenerateFn,
    classifier: Classifier,
    reference: torch.Tensor,
    reference_labels: torch.Tensor | None,
    num_samples: int,
    training: torch.Tensor | None = None,
    batch_size: int = 64,
    seed0: int = 0,
    log: TextIO | None = sys.stderr,
    with_inception: bool = False,
) -> QualityReport:
    """Generate ``num_samples`` images and score them against ``reference`` ([−1, 1] images)."""
    if with_inception:
        check_inception_available()
    start = time.perf_counter()
    num_classes = classifier.num_classes if reference_labels is not None else 0
    samples, labels = generate_samples(generate, num_samples, num_classes, batch_size, seed0, log)
    ref_preds, ref_feats = classify_with_progress(classifier, reference, "scoring held-out reference", log)
    scores = score_samples(samples, labels, classifier, ref_feats)
    ceiling = float((ref_preds == reference_labels).float().mean()) if reference_labels is not None else None
    floor = None
    if training is not None:
        train_feats = classify_with_progress(classifier, training, "scoring training images (FD floor)", log)[1]
        floor = frechet_distance(ref_feats, train_feats)
    report = QualityReport(
        num_samples=num_samples,
        class_agreement=scores["class_agreement"],
        fd=scores["fd"],
        classifier_accuracy_real=ceiling,
        fd_real_floor=floor,
        seconds=0.0,
        class_agreement_per_class=scores.get("class_agreement_per_class"),
    )
    if with_inception:
        try:
            report.inception_fid = inception_fid(samples, reference)
        except InceptionUnavailable as exc:
            report.inception_fid_error = str(exc)
    report.seconds = time.perf_counter() - start
    report.warnings = comparability_warnings(report, classifier) or None
    return report


# The model card's figures (lowdiff/weights/MODEL_CARD.md) are at this many samples.
MODEL_CARD_SAMPLES = 5000


def comparability_warnings(report: QualityReport, classifier: Classifier) -> list[str]:
    """Plain-language reasons not to compare or trust a report's figures as they stand."""
    out = []
    if report.num_samples != MODEL_CARD_SAMPLES:
        out.append(
            f"FD at N = {report.num_samples} is not comparable with figures at another N (it is biased upward "
            f"at small N); the model card's figures are at N = {MODEL_CARD_SAMPLES}"
        )
    own = (getattr(classifier, "metadata", None) or {}).get("held_out_accuracy")
    real = report.classifier_accuracy_real
    if real is not None and isinstance(own, float) and real < own - 0.25:
        out.append(
            f"the classifier scores {real:.1%} on your reference images but {own:.1%} on its own held-out "
            "data: the reference set is probably not the data it was trained for (wrong --reference or "
            "--classifier?), so class agreement and FD mean little"
        )
    return out
