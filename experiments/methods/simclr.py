"""SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations"):
two views of each image, projected by an MLP head, are pulled together against the other 2N - 2
views of the batch as negatives."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from experiments.distributed import gather_with_grad
from experiments.methods.base import SSLMethod, two_views


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent: for each of the 2N views, -log exp(sim(z_i, z_j) / T) / sum over k != i of
    exp(sim(z_i, z_k) / T), with j the other view of the same image and sim the cosine similarity;
    averaged over all 2N anchors. z1[n] and z2[n] are the two views of image n."""
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(f"expected z1 and z2 of one shape [N, D], got {list(z1.shape)} and {list(z2.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = len(z1)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    similarity = z @ z.T / temperature  # [2N, 2N]
    self_pairs = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    similarity = similarity.masked_fill(self_pairs, float("-inf"))  # k != i in the denominator
    positives = torch.arange(2 * n, device=z.device).roll(n)  # anchor i's positive is i + N, and i + N's is i
    return F.cross_entropy(similarity, positives)


class SimCLR(SSLMethod):
    def __init__(self, backbone: nn.Module, feature_dim: int, hidden_dim: int = 512, out_dim: int = 128,
                 temperature: float = 0.1):
        super().__init__(backbone)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        # SimCLR's projection head g: Linear -> BatchNorm -> ReLU -> Linear (the BN as in its reference code)
        self.head = nn.Sequential(nn.Linear(feature_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
                                  nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        first, second = two_views(views)
        # both views in one batch, so BatchNorm normalises over all 2N (SimCLR's global BN)
        z1, z2 = self.head(self.backbone(torch.cat([first, second]))).chunk(2)
        # over several processes, every rank's views are negatives: the loss of the global batch
        return nt_xent_loss(gather_with_grad(z1), gather_with_grad(z2), self.temperature)
