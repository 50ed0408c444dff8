"""Encoders for the SSL experiments: small ResNets and a compact ViT.

    backbone, feature_dim = make_backbone("resnet-tiny")    # float [B, 1, 28, 28] -> [B, 128]
"""
from __future__ import annotations

from torch import nn

from experiments.models.resnet import TinyResNet, cifar_resnet18
from experiments.models.vit import VisionTransformer

BACKBONES = ("resnet-tiny", "resnet18", "vit-tiny")


def make_backbone(name: str, in_channels: int = 1, image_size: int = 28) -> tuple[nn.Module, int]:
    """(module mapping float [B, C, H, W] to features [B, D], D) for a name in BACKBONES."""
    if name == "resnet-tiny":
        model = TinyResNet(in_channels)
        return model, model.feature_dim
    if name == "resnet18":
        return cifar_resnet18(in_channels), 512
    if name == "vit-tiny":
        model = VisionTransformer(image_size=image_size, in_channels=in_channels)
        return model, model.feature_dim
    raise ValueError(f"unknown backbone {name!r}; choose from {BACKBONES}")
