"""A small decoder-only transformer language model (GPT-2's shape, at a CPU's scale): token and
position embeddings, pre-norm blocks of causal self-attention (vit.py's Attention with a causal mask)
and an MLP, a final norm and a linear head over the vocabulary. The token embedding is torch's, or
quantlab's StableEmbedding (Dettmers et al. 2022, section 2.3: Xavier init, a layer norm on its
output, 32-bit optimizer state), the layer whose effect on 8-bit training the stability ablation
measures.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from experiments.models.vit import Attention
from quantlab.nn import StableEmbedding

EMBEDDINGS = ("standard", "stable")


class Block(nn.Module):
    """x + attention(norm(x)), then x + MLP(norm(x)): the pre-norm residual block of GPT-2."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = Attention(width, heads, causal=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """Next-token logits of a sequence of token ids (batch, length <= context)."""

    def __init__(self, vocab_size: int, context: int, width: int, depth: int, heads: int,
                 embedding: str = "standard", tied: bool = False):
        super().__init__()
        if embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {list(EMBEDDINGS)}, got {embedding!r}")
        self.context = context
        self.token_embedding = (StableEmbedding if embedding == "stable" else nn.Embedding)(vocab_size, width)
        self.position_embedding = nn.Parameter(torch.zeros(context, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        # GPT-2's initialisation: N(0, 0.02) weights, zero biases, the residual projections scaled down
        # by sqrt(2 * depth); StableEmbedding keeps its own (Xavier uniform)
        for name, parameter in self.named_parameters():
            if name.endswith("bias") or ".norm" in name or name.startswith("norm"):
                continue
            if name == "token_embedding.weight" and embedding == "stable":
                continue
            std = 0.02 / (2 * depth) ** 0.5 if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
            nn.init.normal_(parameter, std=std)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        if tied:
            self.head.weight = self.token_embedding.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        if length > self.context:
            raise ValueError(f"a sequence of {length} tokens is longer than the model's context of {self.context}")
        x = self.token_embedding(tokens) + self.position_embedding[:length]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy (nats a token) of predicting targets[:, t] from tokens[:, :t + 1]."""
        logits = self(tokens)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
