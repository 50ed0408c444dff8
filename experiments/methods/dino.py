"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers"): self-distillation
with no labels. A student is trained to match the output distribution of a teacher on other crops of the
same image; the teacher is an exponential moving average of the student and sees only the two global
crops (multi-crop, from SwAV). Centring plus a sharp teacher temperature keep the outputs from collapsing.

Left out: freezing the head's last layer in the first epoch and gradient clipping (the engine's concern).
`backbone` is the student, which evaluation uses; the paper evaluates the teacher, `teacher[0]` here.
"""
from __future__ import annotations

import copy
import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from experiments.data.augment import AugmentConfig
from experiments.distributed import gather_from_ranks
from experiments.methods.base import SSLMethod
from experiments.methods.multicrop import (
    check_views_of_scores,
    cross_entropy_between_views,
    encode_multi_crop,
    multi_crop_for,
)


def dino_loss(student_outputs: list[torch.Tensor], teacher_outputs: list[torch.Tensor], center: torch.Tensor,
              student_temperature: float = 0.1, teacher_temperature: float = 0.04) -> torch.Tensor:
    """DINO's loss (eq. 3): H(P_t(x_i), P_s(x_j)) = -sum_k P_t log P_s for each teacher (global) view i and
    every student view j != i, with P_t = softmax((t - center) / T_t), held fixed (no gradient), and
    P_s = softmax(s / T_s); mean over the pairs and the batch. Student view i < len(teacher_outputs) is
    the crop that teacher view i saw."""
    check_views_of_scores("dino_loss", teacher_outputs, student_outputs)
    if center.shape[-1] != student_outputs[0].shape[1] or center.numel() != center.shape[-1]:
        raise ValueError(f"expected a center of {student_outputs[0].shape[1]} values, got {list(center.shape)}")
    if student_temperature <= 0 or teacher_temperature <= 0:
        raise ValueError(f"temperatures must be > 0, got {student_temperature} and {teacher_temperature}")
    teacher_probs = [F.softmax((t - center) / teacher_temperature, dim=1).detach() for t in teacher_outputs]
    student_log_probs = [F.log_softmax(s / student_temperature, dim=1) for s in student_outputs]
    return cross_entropy_between_views(teacher_probs, student_log_probs)


def cosine_momentum(step: int, total_steps: int, base: float) -> float:
    """The teacher's EMA momentum, raised from `base` at step 0 to 1 at total_steps by half a cosine."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * step / total_steps) + 1.0) / 2.0


def warmed_up_temperature(step: int, total_steps: int, start: float, end: float, warmup_fraction: float) -> float:
    """The teacher temperature: linear from `start` to `end` over the first warmup_fraction of the steps, then `end`."""
    warmup_steps = warmup_fraction * total_steps
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


class DINOHead(nn.Module):
    """3-layer MLP with GELU to an L2-normalised bottleneck, then a weight-normalised linear layer whose
    norm is fixed to 1 (DINO's norm_last_layer): the outputs are cosines with out_dim learned directions."""

    def __init__(self, in_dim: int, hidden_dim: int, bottleneck_dim: int, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=1)
        return F.linear(x, F.normalize(self.last_layer.weight, dim=1))


class DINO(SSLMethod):
    def __init__(self, backbone: nn.Module, feature_dim: int, hidden_dim: int = 512, bottleneck_dim: int = 64,
                 out_dim: int = 1024, momentum: float = 0.996, center_momentum: float = 0.9,
                 student_temperature: float = 0.1, teacher_temperature: float = 0.07,
                 warmup_teacher_temperature: float = 0.04, teacher_temperature_warmup: float = 0.3,
                 n_local: int = 4, local_crop_size: int | None = None,
                 global_crop_scale: tuple[float, float] = (0.4, 1.0),
                 local_crop_scale: tuple[float, float] = (0.05, 0.4)):
        super().__init__(backbone)
        if not 0.0 <= momentum <= 1.0 or not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"momentum and center_momentum must be in [0, 1], got {momentum} and {center_momentum}")
        if min(student_temperature, teacher_temperature, warmup_teacher_temperature) <= 0:
            raise ValueError(f"temperatures must be > 0, got student {student_temperature}, teacher "
                             f"{teacher_temperature}, warmup teacher {warmup_teacher_temperature}")
        if not 0.0 <= teacher_temperature_warmup <= 1.0:
            raise ValueError(f"teacher_temperature_warmup is a fraction of the steps in [0, 1], "
                             f"got {teacher_temperature_warmup}")
        self.momentum, self.center_momentum = momentum, center_momentum
        self.student_temperature = student_temperature
        self.final_teacher_temperature = teacher_temperature
        self.warmup_teacher_temperature = warmup_teacher_temperature
        self.teacher_temperature_warmup = teacher_temperature_warmup
        self.multi_crop = multi_crop_for(backbone, n_local, local_crop_size, global_crop_scale, local_crop_scale)
        self.head = DINOHead(feature_dim, hidden_dim, bottleneck_dim, out_dim)
        # the teacher starts as a copy of the student and only ever moves by the EMA in on_step_end
        self.teacher = nn.Sequential(copy.deepcopy(backbone), copy.deepcopy(self.head))
        self.teacher.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, out_dim))
        # the temperature of the next step; a float in the state_dict's extra state, so a resumed run
        # goes on with it
        self.teacher_temperature = warmed_up_temperature(0, 1, warmup_teacher_temperature, teacher_temperature,
                                                         teacher_temperature_warmup)

    def get_extra_state(self) -> dict:
        return {"teacher_temperature": self.teacher_temperature}

    def set_extra_state(self, state: dict) -> None:
        self.teacher_temperature = state["teacher_temperature"]

    def view_configs(self, base: AugmentConfig) -> list[AugmentConfig]:
        return self.multi_crop.view_configs(base)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """theta_t <- m theta_t + (1 - m) theta_s, over the parameters (BatchNorm statistics stay the teacher's own)."""
        student = itertools.chain(self.backbone.parameters(), self.head.parameters())
        for s, t in zip(student, self.teacher.parameters(), strict=True):
            t.mul_(momentum).add_(s, alpha=1.0 - momentum)

    @torch.no_grad()
    def update_center(self, teacher_outputs: list[torch.Tensor]) -> None:
        """c <- m c + (1 - m) mean of this batch's teacher outputs over both global views (DINO eq. 4)."""
        batch_center = gather_from_ranks(torch.cat(teacher_outputs)).mean(dim=0, keepdim=True)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)

    def on_step_end(self, step: int, total_steps: int) -> None:
        """After optimizer step `step` (0-based) of total_steps: move the teacher, set the next step's temperature."""
        if not 0 <= step < total_steps:
            raise ValueError(f"expected 0 <= step < total_steps, got step {step} of {total_steps}")
        self.update_teacher(cosine_momentum(step, total_steps, self.momentum))
        self.teacher_temperature = warmed_up_temperature(step + 1, total_steps, self.warmup_teacher_temperature,
                                                         self.final_teacher_temperature,
                                                         self.teacher_temperature_warmup)

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        """DINO's loss between the teacher on the 2 global views and the student on all views. In training
        mode this also updates the centre; in eval mode it changes nothing."""
        self.multi_crop.check(views)
        student = self.head(encode_multi_crop(self.backbone, views)).chunk(len(views))
        with torch.no_grad():
            teacher = self.teacher(torch.cat(views[:2])).chunk(2)
        loss = dino_loss(list(student), list(teacher), self.center, self.student_temperature, self.teacher_temperature)
        if self.training:
            self.update_center(teacher)  # after the loss, which used the centre of the previous steps
        return loss
