"""A multi-label task made from single-label images: the medical-MAE protocol's stand-in for chest X-rays
(several findings an image), with 2x2 mosaics of 28x28 images and the classes present as targets."""
from __future__ import annotations

import torch

from experiments.data.dataset import ImageDataset


def make_mosaics(dataset: ImageDataset, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n mosaics, uint8 [n, H, W], each a 2x2 grid of dataset images shrunk to H/2 x W/2 by 2x2 average
    pooling (rounded half up, in integers), and their multi-hot targets float32 [n, len(dataset.classes)]:
    1 for each class among the four tiles (so 1 to 4 labels an image).

    The sources are torch.randint(len(dataset), (n, 4), generator=torch.Generator().manual_seed(seed)),
    drawn with replacement, in tile order top-left, top-right, bottom-left, bottom-right."""
    if n < 1 or len(dataset) == 0:
        raise ValueError(f"need n >= 1 and a non-empty dataset, got n={n} and {len(dataset)} images")
    height, width = dataset.images.shape[1:]
    if height % 2 or width % 2:
        raise ValueError(f"images must have even sides to be pooled 2x2, got {height}x{width}")
    sources = torch.randint(len(dataset), (n, 4), generator=torch.Generator().manual_seed(seed))
    pixels = dataset.images[sources].view(n, 4, height // 2, 2, width // 2, 2).to(torch.int32)
    tiles = (pixels.sum(dim=(3, 5)) + 2) // 4  # round(sum / 4), halves up: the same on every machine
    rows = tiles.view(n, 2, 2, height // 2, width // 2).permute(0, 1, 3, 2, 4)  # [n, tile row, y, tile col, x]
    mosaics = rows.reshape(n, height, width).to(torch.uint8)
    targets = torch.zeros(n, len(dataset.classes)).scatter_(1, dataset.labels[sources], 1.0)
    return mosaics, targets
