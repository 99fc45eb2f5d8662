from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowdiff.errors import CheckpointError
from lowdiff.evaluation import Classifier, classify, evaluate, frechet_distance


def test_frechet_distance_properties() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 8, generator=gen, dtype=torch.float64)
    b = torch.randn(4000, 8, generator=gen, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, b) < 0.05  # same distribution: only sampling error
    shifted = frechet_distance(a, b + 1.0)
    assert shifted == pytest.approx(8.0, rel=0.05)  # ‖μ shift‖² = 8 · 1²
    scaled = frechet_distance(a, b * 2.0)
    assert scaled == pytest.approx(8.0, rel=0.1)  # Tr(1 + 4 − 2·2) per dim = 1


def test_embedded_classifier_loads_and_reports_its_accuracy() -> None:
    clf = Classifier.load()
    assert (clf.channels, clf.num_classes, clf.resolution) == (1, 10, 32)
    assert clf.metadata["held_out_accuracy"] > 0.85
    preds, feats = classify(clf, torch.zeros(3, 1, 32, 32))
    assert preds.shape == (3,) and feats.shape == (3, 128)


def test_classifier_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        Classifier.load(tmp_path / "none.pt")


def test_evaluate_scores_a_perfect_generator_at_the_ceiling() -> None:
    # A "generator" that returns real images of the requested class must agree with the classifier
    # as often as the classifier is right on real images, and sit near the FD floor.
    torch.manual_seed(0)
    clf = Classifier(1, 2, 32)  # left in training mode on purpose: classify() must switch to eval
    real = torch.cat([torch.full((50, 1, 32, 32), -0.8), torch.full((50, 1, 32, 32), 0.8)])
    real_uint8 = ((real + 0.05 * torch.randn_like(real) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    real = real_uint8.float() / 127.5 - 1  # exactly what the generator's uint8 images decode to
    labels = torch.arange(100) // 50

    def generate(seeds, class_labels):
        return real_uint8[[int(c) * 50 + s % 50 for s, c in zip(seeds, class_labels)]]

    report = evaluate(generate, clf, real, labels, num_samples=100, log=None)
    assert report.class_agreement == pytest.approx(report.classifier_accuracy_real, abs=1e-9)
    assert report.fd < 1e-6
    per_class = report.class_agreement_per_class
    assert per_class is not None and len(per_class) == 2
    assert sum(per_class) / 2 == pytest.approx(report.class_agreement)  # equal class counts


def test_comparability_warnings_name_small_n_and_wrong_reference_data() -> None:
    from lowdiff.evaluation import MODEL_CARD_SAMPLES, Classifier, QualityReport, comparability_warnings

    classifier = Classifier(1, 10, 32)
    classifier.metadata = {"held_out_accuracy": 0.93}
    fine = QualityReport(MODEL_CARD_SAMPLES, 0.88, 30.5, 0.92, 0.4, 1.0)
    assert comparability_warnings(fine, classifier) == []
    small = QualityReport(64, 0.88, 90.0, 0.92, 0.4, 1.0)
    assert [w.split(" is ")[0] for w in comparability_warnings(small, classifier)] == ["FD at N = 64"]
    wrong = QualityReport(MODEL_CARD_SAMPLES, 0.1, 300.0, 0.118, 0.4, 1.0)
    (warning,) = comparability_warnings(wrong, classifier)
    assert "11.8% on your reference images but 93.0%" in warning
