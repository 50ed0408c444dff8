"""SwAV (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments"):
embeddings are scored against learned prototypes; the scores of each global view are turned into soft
cluster assignments ("codes") by Sinkhorn-Knopp under an equal-partition constraint, and every other
view must predict them ("swapped prediction").

Multi-crop, introduced by this paper, is defined here too: two global crops plus small local crops, with
targets computed from the global crops only. DINO uses it as well.

Left out: SwAV's queue of past embeddings (which it adds when the batch is small next to the number of
prototypes); the codes here come from the current batch alone.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from experiments.augment import AugmentConfig
from experiments.backbones import VisionTransformer
from experiments.distributed import gather_from_ranks, own_rows
from experiments.methods import SSLMethod

# ------------------------------------------------------------------------------------------ multi-crop


@dataclass(frozen=True)
class MultiCrop:
    """Two global crops of the base view size and n_local local crops of local_crop_size pixels.
    Scales follow DINO (global (0.4, 1), local (0.05, 0.4)); local 12 px on 28 px images is DINO's 96 / 224."""
    n_local: int = 4
    local_crop_size: int = 12
    global_crop_scale: tuple[float, float] = (0.4, 1.0)
    local_crop_scale: tuple[float, float] = (0.05, 0.4)

    def __post_init__(self):
        if not isinstance(self.n_local, int) or self.n_local < 0:
            raise ValueError(f"n_local must be an integer >= 0, got {self.n_local!r}")
        # AugmentConfig checks the size and the scale ranges (and turns config-file lists into tuples)
        local = AugmentConfig(output_size=self.local_crop_size, crop_scale=self.local_crop_scale)
        global_scale = AugmentConfig(crop_scale=self.global_crop_scale).crop_scale
        object.__setattr__(self, "local_crop_scale", local.crop_scale)
        object.__setattr__(self, "global_crop_scale", global_scale)

    @property
    def n_views(self) -> int:
        return 2 + self.n_local

    def view_configs(self, base: AugmentConfig) -> list[AugmentConfig]:
        global_view = replace(base, crop_scale=self.global_crop_scale)
        local_view = replace(base, output_size=self.local_crop_size, crop_scale=self.local_crop_scale)
        return [global_view, global_view] + [local_view] * self.n_local

    def check(self, views: list[torch.Tensor]) -> None:
        """The views are 2 global then n_local local image batches, one batch size, one shape per kind."""
        if len(views) != self.n_views:
            raise ValueError(f"expected {self.n_views} views (2 global + {self.n_local} local), got {len(views)}")
        shapes = [tuple(v.shape) for v in views]
        if any(len(s) != 4 or s[0] != shapes[0][0] for s in shapes):
            raise ValueError(f"expected image batches [B, C, H, W] of one batch size, got {shapes}")
        if shapes[1] != shapes[0] or len(set(shapes[2:])) > 1:
            raise ValueError(f"the global views must share a shape, and so must the local views; got {shapes}")


def multi_crop_for(backbone: nn.Module, n_local: int, local_crop_size: int | None,
                   global_crop_scale: tuple[float, float], local_crop_scale: tuple[float, float]) -> MultiCrop:
    """MultiCrop whose local crops the backbone can take. Our ViT has a position embedding for one image
    size and does not interpolate it, so its local crops default to, and must be, that size."""
    if isinstance(backbone, VisionTransformer):
        if local_crop_size is None:
            local_crop_size = backbone.image_size
        if n_local > 0 and local_crop_size != backbone.image_size:
            raise ValueError(f"the ViT backbone only takes {backbone.image_size}x{backbone.image_size} images "
                             f"(no position-embedding interpolation), so local crops of {local_crop_size} px "
                             f"cannot be encoded: use local_crop_size={backbone.image_size} or n_local=0")
    elif local_crop_size is None:
        local_crop_size = MultiCrop.local_crop_size
    return MultiCrop(n_local, local_crop_size, global_crop_scale, local_crop_scale)


def encode_multi_crop(encoder: nn.Module, views: list[torch.Tensor]) -> torch.Tensor:
    """encoder over all views -> [len(views) * B, D]: one forward per run of same-size views, since views of
    different sizes cannot share a batch."""
    runs = itertools.groupby(views, key=lambda view: view.shape)
    return torch.cat([encoder(torch.cat(list(same_size))) for _, same_size in runs])


def cross_entropy_between_views(targets: list[torch.Tensor], log_predictions: list[torch.Tensor]) -> torch.Tensor:
    """Mean over pairs (i, j), j != i, of -sum_k targets[i] * log_predictions[j], averaged over the batch.
    Target view i is the same crop as prediction view i, so those pairs are skipped."""
    losses = [-(target * log_prediction).sum(dim=1).mean()
              for i, target in enumerate(targets)
              for j, log_prediction in enumerate(log_predictions) if j != i]
    return torch.stack(losses).mean()


def check_views_of_scores(name: str, targets: list[torch.Tensor], predictions: list[torch.Tensor]) -> None:
    """1 to len(predictions) target views and >= 2 prediction views, all outputs of one shape [B, K]."""
    shapes = [tuple(t.shape) for t in targets + predictions]
    if not targets or len(predictions) < 2 or len(targets) > len(predictions):
        raise ValueError(f"{name}: expected 1 to {len(predictions)} target views and >= 2 prediction views, "
                         f"got {len(targets)} and {len(predictions)}")
    if len(shapes[0]) != 2 or len(set(shapes)) > 1:
        raise ValueError(f"{name}: expected every view's outputs as one shape [B, K], got {shapes}")


# ------------------------------------------------------------------------------------------------- SwAV

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

