"""Mosaics: each tile is its pooled source image and the targets are the classes present."""
import math

import pytest
import torch

from experiments.data import ImageDataset
from experiments.data.mosaic import make_mosaics

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_dataset(n, num_classes, seed):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    return ImageDataset("synthetic", images, labels, tuple(str(c) for c in range(num_classes)))


def test_mosaic_tiles_are_the_pooled_sources_and_targets_their_classes():
    dataset = random_dataset(40, num_classes=6, seed=0)
    n, seed = 12, 3
    mosaics, targets = make_mosaics(dataset, n, seed)
    assert mosaics.dtype == torch.uint8 and mosaics.shape == (n, 28, 28)
    assert targets.dtype == torch.float32 and targets.shape == (n, 6)
    sources = torch.randint(len(dataset), (n, 4), generator=torch.Generator().manual_seed(seed))  # the documented draw
    for i in range(n):
        for tile in range(4):
            row, col = divmod(tile, 2)
            source = dataset.images[sources[i, tile]].tolist()
            for y in range(14):
                for x in range(14):
                    total = source[2 * y][2 * x] + source[2 * y][2 * x + 1] + source[2 * y + 1][2 * x] \
                        + source[2 * y + 1][2 * x + 1]
                    assert mosaics[i, 14 * row + y, 14 * col + x] == math.floor(total / 4 + 0.5)
        present = {dataset.labels[j].item() for j in sources[i]}
        assert targets[i].tolist() == [1.0 if c in present else 0.0 for c in range(6)]


def test_mosaics_are_deterministic_per_seed_with_one_to_four_labels():
    dataset = random_dataset(50, num_classes=10, seed=1)
    mosaics, targets = make_mosaics(dataset, 200, seed=5)
    again, again_targets = make_mosaics(dataset, 200, seed=5)
    other, _ = make_mosaics(dataset, 200, seed=6)
    assert torch.equal(mosaics, again) and torch.equal(targets, again_targets)
    assert not torch.equal(mosaics, other)
    counts = targets.sum(dim=1)
    assert counts.min() >= 1 and counts.max() <= 4 and (counts < 4).any()  # repeated classes occur


def test_mosaics_reject_bad_input():
    dataset = random_dataset(5, num_classes=2, seed=0)
    with pytest.raises(ValueError, match="n >= 1"):
        make_mosaics(dataset, 0, seed=0)
    odd = ImageDataset("odd", torch.zeros(3, 27, 27, dtype=torch.uint8), torch.zeros(3, dtype=torch.long), ("a",))
    with pytest.raises(ValueError, match="even"):
        make_mosaics(odd, 2, seed=0)
