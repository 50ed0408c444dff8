"""SwAV (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments"):
embeddings are scored against learned prototypes; the scores of each global view are turned into soft
cluster assignments ("codes") by Sinkhorn-Knopp under an equal-partition constraint, and every other
view must predict them ("swapped prediction").

Multi-crop, introduced by this paper, lives in multicrop.py (DINO uses it as well).

Left out: SwAV's queue of past embeddings (which it adds when the batch is small next to the number of
prototypes); the codes here come from the current batch alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from experiments.data.augment import AugmentConfig
from experiments.distributed import gather_from_ranks, own_rows
from experiments.methods.base import SSLMethod
from experiments.methods.multicrop import (
    check_views_of_scores,
    cross_entropy_between_views,
    encode_multi_crop,
    multi_crop_for,
)


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """SwAV's codes (its Algorithm 1): Q = exp(scores / epsilon), then alternately scale the rows of Q^T
    [K, B] so each prototype holds mass 1 / K and its columns so each sample holds 1 / B; returned as
    [B, K] per-sample assignments that sum to 1. No gradient flows through the codes."""
    if scores.dim() != 2:
        raise ValueError(f"expected scores [B, K], got {list(scores.shape)}")
    if epsilon <= 0 or iterations < 1:
        raise ValueError(f"epsilon must be > 0 and iterations >= 1, got {epsilon} and {iterations}")
    batch, n_prototypes = scores.shape
    # minus the max: a constant factor, removed by the first normalisation, that keeps exp finite
    q = torch.exp((scores - scores.max()) / epsilon).T
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True) * n_prototypes  # rows: equal partition over the prototypes
        q /= q.sum(dim=0, keepdim=True) * batch  # columns: each sample holds 1 / B
    return (q * batch).T


def swav_loss(scores_per_view: list[torch.Tensor], codes_per_view: list[torch.Tensor],
              temperature: float = 0.1) -> torch.Tensor:
    """Swapped prediction (SwAV eq. 1-2): for each view s with codes q_s and every other view t,
    -sum_k q_s log softmax(scores_t / T)_k; mean over the (s, t) pairs and the batch.
    codes_per_view[s] is for the same crop as scores_per_view[s] (the global views come first)."""
    check_views_of_scores("swav_loss", codes_per_view, scores_per_view)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_predictions = [F.log_softmax(scores / temperature, dim=1) for scores in scores_per_view]
    return cross_entropy_between_views(codes_per_view, log_predictions)


class SwAV(SSLMethod):
    def __init__(self, backbone: nn.Module, feature_dim: int, hidden_dim: int = 512, out_dim: int = 128,
                 n_prototypes: int = 100, temperature: float = 0.1, epsilon: float = 0.05,
                 sinkhorn_iterations: int = 3, freeze_prototypes_steps: int = 0, n_local: int = 4,
                 local_crop_size: int | None = None, global_crop_scale: tuple[float, float] = (0.4, 1.0),
                 local_crop_scale: tuple[float, float] = (0.05, 0.4)):
        super().__init__(backbone)
        if temperature <= 0 or epsilon <= 0:
            raise ValueError(f"temperature and epsilon must be > 0, got {temperature} and {epsilon}")
        if n_prototypes < 1 or sinkhorn_iterations < 1 or freeze_prototypes_steps < 0:
            raise ValueError(f"need n_prototypes >= 1, sinkhorn_iterations >= 1 and freeze_prototypes_steps >= 0, "
                             f"got {n_prototypes}, {sinkhorn_iterations} and {freeze_prototypes_steps}")
        self.temperature, self.epsilon, self.sinkhorn_iterations = temperature, epsilon, sinkhorn_iterations
        self.freeze_prototypes_steps = freeze_prototypes_steps
        self.multi_crop = multi_crop_for(backbone, n_local, local_crop_size, global_crop_scale, local_crop_scale)
        # SwAV's projection head: Linear -> BatchNorm -> ReLU -> Linear, output L2-normalised in forward
        self.head = nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.BatchNorm1d(hidden_dim),
                                  nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))
        self.prototypes = nn.Linear(out_dim, n_prototypes, bias=False)
        self.normalize_prototypes()
        self.steps_done = 0  # optimizer steps so far, for the prototype freeze; kept in state_dict

    @property
    def may_leave_parameters_unused(self) -> bool:
        return self.freeze_prototypes_steps > 0

    def get_extra_state(self) -> dict:
        return {"steps_done": self.steps_done}

    def set_extra_state(self, state: dict) -> None:
        self.steps_done = state["steps_done"]

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """Project each prototype back onto the unit sphere, as SwAV does before every step."""
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def view_configs(self, base: AugmentConfig) -> list[AugmentConfig]:
        return self.multi_crop.view_configs(base)

    def on_step_end(self, step: int, total_steps: int) -> None:
        self.steps_done = step + 1

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Swapped prediction between the codes of the 2 global views and the scores of all views. The
        prototypes are put back on the unit sphere first, in eval mode too (a projection: idempotent)."""
        self.multi_crop.check(views)
        self.normalize_prototypes()
        embeddings = F.normalize(self.head(encode_multi_crop(self.backbone, views)), dim=1)
        prototypes = self.prototypes.weight
        if self.steps_done < self.freeze_prototypes_steps:
            # SwAV freezes the prototypes for its first epoch by dropping their gradient; detaching
            # them leaves their .grad None, so the optimizer skips them, as SwAV's `p.grad = None` does
            prototypes = prototypes.detach()
        scores = (embeddings @ prototypes.T).chunk(len(views))
        # the equal partition is over the global batch: Sinkhorn on every rank's scores, keep our rows
        codes = [own_rows(sinkhorn_knopp(gather_from_ranks(s), self.epsilon, self.sinkhorn_iterations))
                 for s in scores[:2]]
        return swav_loss(list(scores), codes, self.temperature)

