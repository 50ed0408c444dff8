"""MoCo v2 (He et al. 2020, "Momentum Contrast"; Chen et al. 2020, "Improved Baselines with Momentum
Contrastive Learning"): a query encoder trained by InfoNCE against a momentum-averaged key encoder,
with the keys of past batches kept in a queue as negatives.

On one device there is no shuffling BN across GPUs: with BatchNorm backbones the batch statistics can
leak some information between a query and its key (MoCo's section 3.3).
"""
from __future__ import annotations

import copy
import itertools

import torch
import torch.nn.functional as F
from torch import nn

from experiments.distributed import gather_from_ranks
from experiments.methods.base import SSLMethod, two_views


def info_nce_loss(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's InfoNCE (eq. 1): -log exp(q.k+ / T) / (exp(q.k+ / T) + sum over the queue of exp(q.k / T)),
    averaged over the batch. query, key [N, D] and queue [K, D] are expected L2-normalised rows."""
    if query.dim() != 2 or query.shape != key.shape or queue.dim() != 2 or queue.shape[1] != query.shape[1]:
        raise ValueError(f"expected query and key [N, D] and queue [K, D], got {list(query.shape)}, "
                         f"{list(key.shape)} and {list(queue.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    positive = (query * key).sum(dim=1, keepdim=True)  # [N, 1]
    negatives = query @ queue.T  # [N, K]
    logits = torch.cat([positive, negatives], dim=1) / temperature
    # the positive is class 0 of a (1 + K)-way classification
    return F.cross_entropy(logits, torch.zeros(len(query), dtype=torch.long, device=query.device))


class MoCo(SSLMethod):
    def __init__(self, backbone: nn.Module, feature_dim: int, hidden_dim: int = 512, out_dim: int = 128,
                 momentum: float = 0.99, queue_size: int = 4096, temperature: float = 0.2):
        super().__init__(backbone)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.momentum, self.temperature = momentum, temperature
        # MoCo v2's projection head: a 2-layer MLP in place of v1's linear layer
        self.head = nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.ReLU(inplace=True),
                                  nn.Linear(hidden_dim, out_dim))
        # the key encoder starts as a copy of the query encoder and only ever moves by the momentum update
        self.key_encoder = nn.Sequential(copy.deepcopy(backbone), copy.deepcopy(self.head))
        self.key_encoder.requires_grad_(False)
        # buffers, so that state_dict (and so a checkpoint) holds the queue
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, out_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q (MoCo eq. 2)."""
        query_parameters = itertools.chain(self.backbone.parameters(), self.head.parameters())
        for q, k in zip(query_parameters, self.key_encoder.parameters(), strict=True):
            k.mul_(self.momentum).add_(q, alpha=1.0 - self.momentum)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Replace the oldest keys in the queue by this batch's, wrapping around its end."""
        queue_size = self.queue.shape[0]
        if len(keys) > queue_size:
            raise ValueError(f"batch of {len(keys)} keys is larger than the queue ({queue_size})")
        ptr = int(self.queue_ptr)
        slots = (ptr + torch.arange(len(keys), device=self.queue.device)) % queue_size
        self.queue[slots] = keys
        self.queue_ptr.fill_((ptr + len(keys)) % queue_size)

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        """InfoNCE of the queries from views[0] against the keys from views[1]. In training mode this
        also moves the key encoder and enqueues the keys; in eval mode it changes nothing."""
        query_view, key_view = two_views(views)
        query = F.normalize(self.head(self.backbone(query_view)), dim=1)
        with torch.no_grad():
            if self.training:
                self.momentum_update()  # before computing the keys, as in MoCo's Algorithm 1
            key = F.normalize(self.key_encoder(key_view), dim=1)
        # a copy: the queue is overwritten below, while backward still needs the negatives used here
        loss = info_nce_loss(query, key, self.queue.clone(), self.temperature)
        if self.training:
            self.enqueue(gather_from_ranks(key))  # every rank's keys, so the queue is the same on all
        return loss
