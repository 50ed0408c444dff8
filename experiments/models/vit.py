"""A compact Vision Transformer (Dosovitskiy et al. 2021) exposing the pieces MAE needs (`patchify`,
`embed_patches`, `blocks`, `norm`, `cls_token`), and what fine-tuning it takes: DropPath and the
layer numbering of layer-wise learning-rate decay."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth (Huang et al. 2016): drop a residual branch for whole samples, rescale those kept."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


class Attention(nn.Module):
    """Multi-head self-attention over all tokens, or (causal, for a language model) over the tokens up to
    each one's own position."""

    def __init__(self, dim: int, heads: int, causal: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # [B, heads, L, D / heads]
        return self.proj(x.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4, drop_path_rate: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al. 2021): patch tokens + cls token + learned position embedding; features are
    the final-norm cls token. Defaults are ViT-Tiny on 28x28 images with 4x4 patches (49 tokens)."""

    def __init__(self, image_size: int = 28, patch_size: int = 4, in_channels: int = 1, dim: int = 192,
                 depth: int = 12, heads: int = 3, mlp_ratio: int = 4, drop_path_rate: float = 0.0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.image_size, self.patch_size, self.in_channels = image_size, patch_size, in_channels
        self.num_patches = (image_size // patch_size) ** 2
        # a conv with stride = kernel = patch is a linear map of each flattened patch
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, dim))  # position 0 is the cls token's
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.set_drop_path(drop_path_rate)
        self.norm = nn.LayerNorm(dim)
        self.feature_dim = dim
        self.apply(self._init_weights)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth growing linearly from 0 in the first block to `rate` in the last (DeiT)."""
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {rate}")
        for block, block_rate in zip(self.blocks, torch.linspace(0.0, rate, len(self.blocks)).tolist()):
            block.drop_path_rate = block_rate

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, L, patch*patch*C], patches in row-major order, pixels (row, column, channel)."""
        B, C, H, W = images.shape
        p = self.patch_size
        x = images.reshape(B, C, H // p, p, W // p, p)
        return torch.einsum("bchpwq->bhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """Inverse of patchify: [B, L, patch*patch*C] -> [B, C, H, W]."""
        p, C, h = self.patch_size, self.in_channels, self.image_size // self.patch_size
        B = patches.shape[0]
        x = patches.reshape(B, h, h, p, p, C)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(B, C, h * p, h * p)

    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> patch tokens [B, L, D] with their position embeddings added (no cls token)."""
        if images.shape[1:] != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(f"expected images [B, {self.in_channels}, {self.image_size}, {self.image_size}], "
                             f"got {list(images.shape)}")
        tokens = self.patch_embed(images).flatten(2).transpose(1, 2)
        return tokens + self.pos_embed[:, 1:]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.embed_patches(images)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]


def vit_layer(name: str, depth: int) -> int:
    """Layer of a ViT parameter for layer-wise LR decay (BEiT's numbering): the embeddings are layer 0,
    block i is layer i + 1, and what follows the blocks (final norm) is layer depth + 1."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1
