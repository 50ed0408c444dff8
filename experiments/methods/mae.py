"""MAE (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners"): mask most patches of an
image at random, encode only the visible ones with the ViT, and have a light decoder reconstruct the
pixels of the masked ones from the encoded patches plus mask tokens.

The encoder is the backbone ViT itself (its patch embedding, cls token, position embedding, blocks and
final norm), so after pre-training `backbone` is used unchanged: cls token through all blocks, unmasked.
Differences from the paper: the decoder's position embedding is learned rather than fixed sin-cos, like
our ViT's; one view, cropped and flipped only, as MAE augments.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from experiments.data.augment import AugmentConfig
from experiments.methods.base import SSLMethod
from experiments.models.vit import Block, VisionTransformer


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, patch*patch*C], patches row-major, pixels (row, column, channel):
    the order of VisionTransformer.patchify, for the loss's targets without a ViT at hand."""
    B, C, H, W = images.shape
    if H % patch_size or W % patch_size:
        raise ValueError(f"image size {H}x{W} is not a multiple of patch_size {patch_size}")
    x = images.reshape(B, C, H // patch_size, patch_size, W // patch_size, patch_size)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(B, (H // patch_size) * (W // patch_size), -1)


def random_masking(tokens: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None):
    """Per-sample random masking by sorting noise (MAE's shuffle): keep round(L * (1 - mask_ratio)) tokens
    of each sample (Python's round, halves to even; MAE's code truncates instead).

    tokens [B, L, D] -> (kept tokens [B, L_keep, D] in shuffled order, mask [B, L] with 1 = masked and
    0 = kept in the original order, ids_restore [B, L] that puts the shuffled sequence back in order).
    The noise is drawn on the CPU, from `generator` or else torch's global generator, so one seed masks
    the same patches on any device."""
    if tokens.dim() != 3:
        raise ValueError(f"expected tokens [B, L, D], got {list(tokens.shape)}")
    B, L, D = tokens.shape
    n_keep = round(L * (1 - mask_ratio))
    if not 0 <= mask_ratio < 1 or n_keep < 1:
        raise ValueError(f"mask_ratio must be in [0, 1) and keep at least one of the {L} tokens, got {mask_ratio}")
    noise = torch.rand(B, L, generator=generator).to(tokens.device)
    ids_shuffle = noise.argsort(dim=1)  # ascending: the n_keep smallest noises are kept
    ids_restore = ids_shuffle.argsort(dim=1)
    ids_keep = ids_shuffle[:, :n_keep]
    kept = tokens.gather(1, ids_keep[:, :, None].expand(-1, -1, D))
    mask = torch.ones(B, L, dtype=tokens.dtype, device=tokens.device)
    mask[:, :n_keep] = 0
    return kept, mask.gather(1, ids_restore), ids_restore


def forward_loss(images: torch.Tensor, predictions: torch.Tensor, mask: torch.Tensor, patch_size: int,
                 norm_pix_loss: bool) -> torch.Tensor:
    """Mean squared error per patch, averaged over the masked patches only (mask 1). With norm_pix_loss the
    target is each patch's pixels normalised by that patch's mean and (unbiased) variance, + 1e-6."""
    target = patchify(images, patch_size)
    if predictions.shape != target.shape or mask.shape != target.shape[:2]:
        raise ValueError(f"expected predictions {list(target.shape)} and mask {list(target.shape[:2])}, "
                         f"got {list(predictions.shape)} and {list(mask.shape)}")
    if norm_pix_loss:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    loss_per_patch = ((predictions - target) ** 2).mean(dim=-1)
    return (loss_per_patch * mask).sum() / mask.sum()


class MAE(SSLMethod):
    def __init__(self, backbone: nn.Module, feature_dim: int, mask_ratio: float = 0.75, norm_pix_loss: bool = True,
                 decoder_dim: int = 128, decoder_depth: int = 2, decoder_heads: int = 4):
        if not isinstance(backbone, VisionTransformer):
            raise ValueError(f"MAE needs the experiments.models VisionTransformer (vit-tiny) as backbone, "
                             f"got {type(backbone).__name__}")
        if feature_dim != backbone.feature_dim:
            raise ValueError(f"feature_dim {feature_dim} is not the ViT's width {backbone.feature_dim}")
        if not 0 <= mask_ratio < 1 or round(backbone.num_patches * (1 - mask_ratio)) < 1:
            raise ValueError(f"mask_ratio must be in [0, 1) and keep at least one of the {backbone.num_patches} "
                             f"patches, got {mask_ratio}")
        if decoder_dim % decoder_heads or decoder_depth < 1:
            raise ValueError(f"need decoder_depth >= 1 and decoder_dim divisible by decoder_heads, got depth "
                             f"{decoder_depth}, dim {decoder_dim}, heads {decoder_heads}")
        super().__init__(backbone)
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        patch_pixels = backbone.patch_size ** 2 * backbone.in_channels
        self.decoder_embed = nn.Linear(feature_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + backbone.num_patches, decoder_dim))
        self.decoder_blocks = nn.ModuleList(Block(decoder_dim, decoder_heads) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, patch_pixels)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            module.apply(VisionTransformer._init_weights)  # the ViT's own initialisation
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.decoder_pos_embed, std=0.02)

    def view_configs(self, base: AugmentConfig) -> list[AugmentConfig]:
        """One view: MAE uses random resized crops and flips only."""
        return [replace(base, jitter_p=0.0, blur_p=0.0, solarize_p=0.0)]

    def forward_encoder(self, images: torch.Tensor, generator: torch.Generator | None = None):
        """The ViT on the cls token and the visible patches -> (encoded [B, 1 + L_keep, D], mask, ids_restore)."""
        vit = self.backbone
        tokens, mask, ids_restore = random_masking(vit.embed_patches(images), self.mask_ratio, generator)
        cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(len(tokens), -1, -1)
        x = torch.cat([cls, tokens], dim=1)
        for block in vit.blocks:
            x = block(x)
        return vit.norm(x), mask, ids_restore

    def forward_decoder(self, encoded: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Encoded visible patches + a mask token for each masked one, put back in order -> pixels [B, L, p*p*C]."""
        x = self.decoder_embed(encoded)
        B, L = ids_restore.shape
        patches = torch.cat([x[:, 1:], self.mask_token.expand(B, L + 1 - x.shape[1], -1)], dim=1)
        patches = patches.gather(1, ids_restore[:, :, None].expand(-1, -1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # no prediction for the cls token

    def forward(self, views: list[torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        if len(views) != 1:
            raise ValueError(f"expected 1 view, got {len(views)}")
        images = views[0]
        encoded, mask, ids_restore = self.forward_encoder(images, generator)
        predictions = self.forward_decoder(encoded, ids_restore)
        return forward_loss(images, predictions, mask, self.backbone.patch_size, self.norm_pix_loss)
