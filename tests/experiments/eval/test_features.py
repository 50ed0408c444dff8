"""Frozen features: batched extraction equals one eval-mode forward, and every module's mode is restored."""
import pytest
import torch
import torch.nn as nn

from experiments.data import to_float
from experiments.eval import extract_features

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_images(n, seed):
    return torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_extract_features_batches_match_one_eval_forward_and_mode_is_restored():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.Dropout(0.5), nn.BatchNorm1d(16))
    images = random_images(23, seed=1)
    backbone.eval()
    expected = backbone(to_float(images)).detach()
    for training in (True, False):
        backbone.train(training)
        features = extract_features(backbone, images, batch_size=5)
        assert all(module.training == training for module in backbone.modules())
        # dropout and batch statistics would change the result if it had run in train mode
        torch.testing.assert_close(features, expected)
        assert features.dtype == torch.float32 and not features.requires_grad


def test_extract_features_restores_mixed_submodule_modes():
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(784, 4), nn.Dropout(0.5))
    backbone.train()
    backbone[2].eval()  # e.g. a frozen part of the model
    extract_features(backbone, random_images(3, seed=0))
    assert [m.training for m in backbone.modules()] == [True, True, True, False]


def test_extract_features_rejects_bad_input():
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(784, 4))
    with pytest.raises(ValueError):
        extract_features(backbone, random_images(3, seed=0)[:, None])
    with pytest.raises(ValueError):
        extract_features(backbone, random_images(3, seed=0), batch_size=0)
