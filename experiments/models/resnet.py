"""Small ResNets for 28x28 images, built from torchvision's BasicBlock."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.models.resnet import BasicBlock


def cifar_stem(in_channels: int, width: int) -> nn.Conv2d:
    """3x3 stride-1 first convolution: 28x28 inputs are too small for ImageNet's 7x7 stride-2 conv + max-pool."""
    conv = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # as torchvision inits its convs
    return conv


class TinyResNet(nn.Module):
    """ResNet with one BasicBlock per stage, widths 16-32-64-128: the 2-core demo's encoder."""

    def __init__(self, in_channels: int = 1, widths: tuple[int, ...] = (16, 32, 64, 128)):
        super().__init__()
        self.stem = nn.Sequential(cifar_stem(in_channels, widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages, channels = [], widths[0]
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or channels != width:  # the shortcut must match the block's output shape
                downsample = nn.Sequential(nn.Conv2d(channels, width, 1, stride, bias=False), nn.BatchNorm2d(width))
            stages.append(BasicBlock(channels, width, stride, downsample))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.feature_dim = channels
        for module in self.modules():  # torchvision's ResNet initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(images)).mean(dim=(2, 3))  # global average pool


def cifar_resnet18(in_channels: int = 1) -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR stem (no max-pool) and no classifier: 512 features."""
    model = resnet18(weights=None)
    model.conv1 = cifar_stem(in_channels, 64)
    model.maxpool = nn.Identity()
    model.fc = nn.Identity()
    return model
