"""Linear probes on synthetic features with known answers: separable blobs, random labels, feature
scaling, seeds; the multi-label probe on labels the features encode or not."""
import pytest
import torch

from experiments.eval import linear_probe
from experiments.eval.linear import linear_probe_multilabel

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def blobs(n, dim, num_classes, spread, seed):
    generator = torch.Generator().manual_seed(seed)
    centres = spread * torch.randn(num_classes, dim, generator=generator)
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    return centres[labels] + torch.randn(n, dim, generator=generator), labels


def test_linear_probe_separates_gaussian_blobs():
    features, labels = blobs(1000, dim=16, num_classes=10, spread=5.0, seed=0)
    features = features * 100 + 7  # offset and scale are removed by standardisation
    assert linear_probe(features[:500], labels[:500], features[500:], labels[500:]) >= 0.99


def test_linear_probe_on_random_labels_is_near_chance():
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(400, 64, generator=generator)
    labels = torch.randint(0, 10, (400,), generator=generator)
    assert linear_probe(features[:200], labels[:200], features[200:], labels[200:]) < 0.5
    # ... while it does fit the training labels, so the low test score is not a failure to train
    assert linear_probe(features[:200], labels[:200], features[:200], labels[:200]) > 0.9


def test_linear_probe_ignores_per_feature_scale_and_offset():
    # overlapping blobs, so the answer depends on where the boundary lands
    features, labels = blobs(600, dim=8, num_classes=5, spread=1.0, seed=5)
    generator = torch.Generator().manual_seed(6)
    scale = 10 ** (6 * torch.rand(8, generator=generator) - 3)  # 1e-3 .. 1e3: badly conditioned unless standardised
    offset = 100 * torch.randn(8, generator=generator)
    plain = linear_probe(features[:300], labels[:300], features[300:], labels[300:])
    skewed = features * scale + offset
    assert 0.3 < plain < 0.99
    assert linear_probe(skewed[:300], labels[:300], skewed[300:], labels[300:]) == pytest.approx(plain, abs=0.01)


def test_linear_probe_is_deterministic_for_a_seed():
    features, labels = blobs(400, dim=8, num_classes=5, spread=1.0, seed=4)
    runs = [linear_probe(features[:200], labels[:200], features[200:], labels[200:], epochs=20, seed=1)
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_linear_probe_rejects_mismatched_features():
    with pytest.raises(ValueError):
        linear_probe(torch.randn(10, 4), torch.zeros(10, dtype=torch.long), torch.randn(5, 3),
                     torch.zeros(5, dtype=torch.long))


def test_linear_probe_multilabel_separates_labels_that_features_encode():
    generator = torch.Generator().manual_seed(0)
    targets = (torch.rand(400, 4, generator=generator) < 0.4).float()
    features = targets @ torch.randn(4, 16, generator=generator) + 0.3 * torch.randn(400, 16, generator=generator)
    result = linear_probe_multilabel(features[:300], targets[:300], features[300:], targets[300:])
    assert result["mean_auc"] > 0.98
    assert min(result["per_label_auc"]) > 0.95
    noise = linear_probe_multilabel(torch.randn(300, 16, generator=generator), targets[:300],
                                    torch.randn(100, 16, generator=generator), targets[300:])
    assert abs(noise["mean_auc"] - 0.5) < 0.15
