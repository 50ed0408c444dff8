"""ROC AUC against a brute-force pair count, closed forms and invariances; the mean over labels."""
import math

import pytest
import torch

from experiments.eval.metrics import mean_auc, roc_auc

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def brute_force_auc(scores, targets):
    positives = [s for s, t in zip(scores.tolist(), targets.tolist()) if t == 1]
    negatives = [s for s, t in zip(scores.tolist(), targets.tolist()) if t == 0]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in positives for q in negatives)
    return wins / (len(positives) * len(negatives))


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_the_pairwise_count_with_ties_as_halves(seed):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (60,), generator=generator).float()  # many ties
    targets = (torch.rand(60, generator=generator) < 0.3).float()
    targets[:2] = torch.tensor([0.0, 1.0])
    assert roc_auc(scores, targets) == pytest.approx(brute_force_auc(scores, targets), abs=1e-12)


def test_auc_closed_forms_and_monotone_invariance():
    targets = torch.tensor([0, 0, 1, 0, 1, 1, 0, 1.0])
    ranking = torch.tensor([0.1, 0.2, 0.9, 0.3, 0.8, 0.7, 0.4, 0.6])
    assert roc_auc(ranking, targets) == 1.0
    assert roc_auc(-ranking, targets) == 0.0
    assert roc_auc(torch.full((8,), 3.0), targets) == 0.5
    scores = torch.randn(8, generator=torch.Generator().manual_seed(0))
    for transform in (torch.exp, torch.sigmoid, lambda s: 3 * s - 7, lambda s: s**3):
        assert roc_auc(transform(scores), targets) == pytest.approx(roc_auc(scores, targets), abs=1e-12)


def test_auc_rejects_a_single_class_and_non_binary_targets():
    with pytest.raises(ValueError, match="both classes"):
        roc_auc(torch.randn(5), torch.ones(5))
    with pytest.raises(ValueError, match="0 or 1"):
        roc_auc(torch.randn(3), torch.tensor([0.0, 2.0, 1.0]))


def test_mean_auc_averages_usable_labels_and_names_the_skipped():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(30, 3, generator=generator)
    targets = (torch.rand(30, 3, generator=generator) < 0.5).float()
    targets[:, 1] = 1  # label 1: positives only
    with pytest.warns(UserWarning, match=r"\[1\]"):
        mean, per_label = mean_auc(scores, targets)
    expected = [brute_force_auc(scores[:, c], targets[:, c]) for c in (0, 2)]
    assert per_label[0] == pytest.approx(expected[0]) and per_label[2] == pytest.approx(expected[1])
    assert math.isnan(per_label[1])
    assert mean == pytest.approx(sum(expected) / 2)
    with pytest.raises(ValueError, match="no label"):
        mean_auc(scores, torch.zeros(30, 3))
