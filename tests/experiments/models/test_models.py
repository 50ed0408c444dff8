"""Backbones: shapes, parameter counts from the architectures' formulas, the ViT pieces MAE reuses."""
import functools
import math

import pytest
import torch

from experiments.models import BACKBONES, make_backbone
from experiments.models.vit import Attention, VisionTransformer, drop_path


@functools.cache
def default_backbone(name):
    """Built once per module (the 5M-parameter ViT's initialisation alone takes seconds on 2 cores)."""
    torch.manual_seed(0)
    return make_backbone(name)


def tiny_vit(**overrides):
    options = dict(image_size=8, patch_size=2, in_channels=3, dim=16, depth=2, heads=2)
    return VisionTransformer(**(options | overrides))


@pytest.mark.parametrize("name, feature_dim", [("resnet-tiny", 128), ("resnet18", 512), ("vit-tiny", 192)])
def test_feature_shapes_and_every_parameter_gets_a_gradient(name, feature_dim):
    backbone, dim = default_backbone(name)
    features = backbone(torch.rand(2, 1, 28, 28))
    assert dim == feature_dim and features.shape == (2, feature_dim)
    features.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.parameters())


@pytest.mark.parametrize("name", BACKBONES)
def test_three_channel_images(name):
    backbone, dim = make_backbone(name, in_channels=3, image_size=16)
    assert backbone(torch.rand(2, 3, 16, 16)).shape == (2, dim)


def conv_bn(c_in, c_out, k):
    return k * k * c_in * c_out + 2 * c_out


def test_resnet_tiny_parameter_count():
    # CIFAR stem, then one BasicBlock per stage (two 3x3 conv-BNs; a 1x1 conv-BN shortcut where the shape changes)
    widths, expected, c_in = (16, 32, 64, 128), conv_bn(1, 16, 3), 16
    for width in widths:
        shortcut = conv_bn(c_in, width, 1) if c_in != width else 0
        expected += conv_bn(c_in, width, 3) + conv_bn(width, width, 3) + shortcut
        c_in = width
    assert sum(p.numel() for p in default_backbone("resnet-tiny")[0].parameters()) == expected


def test_resnet18_is_imagenet_resnet18_with_a_cifar_stem():
    # torchvision's ResNet-18 has 11,689,512 parameters: less the 1000-way fc and the 7x7 RGB stem, plus a 3x3 one
    expected = 11_689_512 - (512 * 1000 + 1000) - 7 * 7 * 3 * 64 + 3 * 3 * 1 * 64
    backbone, _ = default_backbone("resnet18")
    assert sum(p.numel() for p in backbone.parameters()) == expected
    # stride-1 stem and no max-pool: 28x28 reaches layer4 at 4x4 (the ImageNet stem would leave 1x1)
    shapes = []
    backbone.layer4.register_forward_hook(lambda module, inputs, output: shapes.append(output.shape))
    backbone(torch.rand(1, 1, 28, 28))
    assert shapes == [(1, 512, 4, 4)]


@pytest.mark.parametrize("options", [{}, dict(image_size=12, patch_size=3, in_channels=1, dim=24, depth=3, heads=4)])
def test_vit_parameter_count(options):
    vit = tiny_vit(**options) if options else default_backbone("vit-tiny")[0]
    D, p, C, depth = vit.feature_dim, vit.patch_size, vit.in_channels, len(vit.blocks)
    L = (vit.image_size // p) ** 2
    per_block = 2 * 2 * D + (3 * D * D + 3 * D) + (D * D + D) + (4 * D * D + 4 * D) + (4 * D * D + D)
    expected = (p * p * C * D + D) + D + (L + 1) * D + depth * per_block + 2 * D
    assert sum(q.numel() for q in vit.parameters()) == expected
    if not options:
        assert 5.0e6 < expected < 5.7e6  # ViT-Ti is 5.7M with 196 patches of 16x16x3


def test_vit_init():
    vit = default_backbone("vit-tiny")[0]
    assert 0.015 < vit.blocks[0].mlp[0].weight.std() < 0.021  # trunc normal std 0.02, cut at +-2
    assert vit.blocks[0].mlp[0].weight.abs().max() <= 2.0
    assert torch.all(vit.blocks[0].attn.qkv.bias == 0)
    assert torch.all(vit.norm.weight == 1) and torch.all(vit.norm.bias == 0)
    assert 0.01 < vit.pos_embed.std() < 0.021 and vit.cls_token.abs().sum() > 0


def test_patchify_takes_patches_row_by_row_and_unpatchify_inverts_it():
    vit = tiny_vit(image_size=6, patch_size=3, in_channels=2)
    images = torch.randn(2, 2, 6, 6)
    patches = vit.patchify(images)
    assert patches.shape == (2, 4, 3 * 3 * 2)
    for row in range(2):
        for column in range(2):
            block = images[:, :, 3 * row:3 * row + 3, 3 * column:3 * column + 3]  # [B, C, p, p]
            assert torch.equal(patches[:, 2 * row + column], block.permute(0, 2, 3, 1).reshape(2, -1))
    assert torch.equal(vit.unpatchify(patches), images)


def test_patch_embedding_is_a_linear_map_of_the_patchified_pixels():
    vit = tiny_vit()
    images = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    vit.double()
    # the conv weight [D, C, p, p] in patchify's (row, column, channel) order
    weight = vit.patch_embed.weight.permute(0, 2, 3, 1).reshape(vit.feature_dim, -1)
    expected = vit.patchify(images) @ weight.T + vit.patch_embed.bias + vit.pos_embed[:, 1:]
    torch.testing.assert_close(vit.embed_patches(images), expected, rtol=0, atol=1e-12)


def test_mae_pieces_compose_into_the_encoder():
    torch.manual_seed(0)
    vit = tiny_vit().eval()
    images = torch.randn(3, 3, 8, 8)
    cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(3, -1, -1)
    x = torch.cat([cls, vit.embed_patches(images)], dim=1)
    for block in vit.blocks:
        x = block(x)
    torch.testing.assert_close(vit(images), vit.norm(x)[:, 0])


def test_attention_matches_softmax_of_scaled_dot_products():
    torch.manual_seed(0)
    attention = Attention(dim=12, heads=3).double()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    q, k, v = attention.qkv(x).split(12, dim=-1)
    heads = []
    for h in range(3):
        part = slice(4 * h, 4 * h + 4)
        weights = torch.softmax(q[..., part] @ k[..., part].transpose(1, 2) / math.sqrt(4), dim=-1)
        heads.append(weights @ v[..., part])
    expected = attention.proj(torch.cat(heads, dim=-1))
    torch.testing.assert_close(attention(x), expected, rtol=0, atol=1e-12)


def test_drop_path_drops_whole_samples_and_keeps_the_mean():
    torch.manual_seed(0)
    x = torch.rand(4000, 3, 5) + 1.0
    out = drop_path(x, 0.25, training=True)
    kept = (out != 0).flatten(1)
    assert torch.all(kept.all(1) | ~kept.any(1))  # a sample is kept or dropped as a whole
    torch.testing.assert_close(out[kept.all(1)], x[kept.all(1)] / 0.75)
    assert abs(kept.all(1).float().mean().item() - 0.75) < 0.03
    assert torch.equal(drop_path(x, 0.25, training=False), x)


def test_vit_drop_path_is_random_in_training_and_the_identity_in_eval():
    torch.manual_seed(0)
    images = torch.randn(8, 3, 8, 8)
    vit = tiny_vit(drop_path_rate=0.5)
    plain = tiny_vit()
    plain.load_state_dict(vit.state_dict())
    assert not torch.allclose(vit(images), vit(images))
    assert torch.equal(plain(images), plain(images))  # no other randomness in training mode
    vit.eval(), plain.eval()
    assert torch.equal(vit(images), plain(images))
    assert [block.drop_path_rate for block in vit.blocks] == [0.0, 0.5]  # linear in depth


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown backbone"):
        make_backbone("resnet50")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        tiny_vit(image_size=9)
    with pytest.raises(ValueError, match="divisible by heads"):
        tiny_vit(dim=10, heads=3)
    with pytest.raises(ValueError, match="drop path rate"):
        tiny_vit(drop_path_rate=1.0)
    with pytest.raises(ValueError, match="expected images"):
        tiny_vit()(torch.rand(2, 3, 12, 12))


def test_set_drop_path_matches_the_constructor_rates():
    vit = VisionTransformer(depth=5, dim=16, heads=2)
    vit.set_drop_path(0.2)
    assert [block.drop_path_rate for block in vit.blocks] == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    built = VisionTransformer(depth=5, dim=16, heads=2, drop_path_rate=0.2)
    assert [b.drop_path_rate for b in vit.blocks] == [b.drop_path_rate for b in built.blocks]
    for rate in (-0.1, 1.0):
        with pytest.raises(ValueError, match="drop path"):
            vit.set_drop_path(rate)
