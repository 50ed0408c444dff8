"""StableEmbedding (Dettmers et al. 2022, section 2.3): the embedding layer that keeps 8-bit
optimizers stable in language models. Xavier-uniform initialisation, layer norm on the output,
and 32-bit optimizer state for its weight (recorded with ``quantlab.optim.set_options``, which
every quantlab optimizer honours whatever the order of construction)."""
from __future__ import annotations

import torch

from .optim.optimizer import set_options


class StableEmbedding(torch.nn.Embedding):
    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx=None, **kwargs):
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx, **kwargs)
        self.norm = torch.nn.LayerNorm(embedding_dim, device=self.weight.device)
        set_options(self.weight, state_bits=32)

    def reset_parameters(self) -> None:
        torch.nn.init.xavier_uniform_(self.weight)
        self._fill_padding_idx_with_zero()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(input))
