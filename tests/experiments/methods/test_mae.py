"""MAE: random masking (counts, partition, restore, per-sample, reproducible), the loss against a loop and
its closed forms, and the method on a tiny ViT whose backbone stays usable for evaluation."""
import math

import pytest
import torch
from torch import nn

from experiments.data.augment import AugmentConfig
from experiments.methods import make_method
from experiments.methods.mae import MAE, forward_loss, patchify, random_masking
from experiments.models.vit import VisionTransformer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def numbered_tokens(batch, length, dim=3):
    """tokens[b, l] = (l, l, ...), so a token says where it came from."""
    return torch.arange(length, dtype=torch.float64)[None, :, None].expand(batch, length, dim).clone()


@pytest.mark.parametrize("length, mask_ratio, n_keep", [(49, 0.75, 12), (49, 0.9, 5), (16, 0.5, 8), (10, 0.25, 8),
                                                         (4, 0.0, 4), (5, 0.9, 0)])
def test_masking_keeps_round_of_the_kept_fraction_in_every_sample(length, mask_ratio, n_keep):
    # n_keep = round(L (1 - ratio)), worked out by hand: 12.25 -> 12, 4.9 -> 5, 7.5 -> 8 (half to even), 0.5 -> 0
    tokens = numbered_tokens(6, length)
    if n_keep == 0:
        with pytest.raises(ValueError, match="keep at least one"):
            random_masking(tokens, mask_ratio)
        return
    kept, mask, ids_restore = random_masking(tokens, mask_ratio, torch.Generator().manual_seed(0))
    assert kept.shape == (6, n_keep, 3) and mask.shape == ids_restore.shape == (6, length)
    assert torch.equal(mask.sum(dim=1), torch.full((6,), float(length - n_keep), dtype=torch.float64))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_kept_and_masked_tokens_partition_the_sequence_and_ids_restore_undoes_the_shuffle():
    tokens = numbered_tokens(5, 49)
    kept, mask, ids_restore = random_masking(tokens, 0.75, torch.Generator().manual_seed(1))
    ids_shuffle = ids_restore.argsort(dim=1)
    for b in range(5):
        kept_positions = [int(x) for x in kept[b, :, 0].tolist()]
        assert sorted(kept_positions) == [i for i in range(49) if mask[b, i] == 0]  # kept = unmasked
        assert len(set(kept_positions)) == len(kept_positions)
        assert sorted(ids_shuffle[b].tolist()) == list(range(49))  # a permutation
        assert ids_shuffle[b, :12].tolist() == kept_positions  # kept tokens come first in shuffled order
        shuffled = tokens[b, ids_shuffle[b]]
        assert torch.equal(shuffled[ids_restore[b]], tokens[b])  # ids_restore inverts the shuffle


def test_masks_differ_between_samples_and_follow_the_generator_or_global_seed():
    tokens = numbered_tokens(8, 49)
    _, mask, _ = random_masking(tokens, 0.75, torch.Generator().manual_seed(0))
    assert len({tuple(row.tolist()) for row in mask}) == 8
    _, again, _ = random_masking(tokens, 0.75, torch.Generator().manual_seed(0))
    _, other, _ = random_masking(tokens, 0.75, torch.Generator().manual_seed(1))
    assert torch.equal(mask, again) and not torch.equal(mask, other)
    torch.manual_seed(3)
    _, first, _ = random_masking(tokens, 0.75)
    torch.manual_seed(3)
    _, second, _ = random_masking(tokens, 0.75)
    assert torch.equal(first, second)


def test_masking_rejects_bad_input():
    with pytest.raises(ValueError, match=r"expected tokens \[B, L, D\]"):
        random_masking(torch.zeros(4, 49), 0.75)
    for ratio in (-0.1, 1.0):
        with pytest.raises(ValueError, match="mask_ratio"):
            random_masking(torch.zeros(2, 49, 3), ratio)


def test_patchify_is_the_vits():
    vit = VisionTransformer(image_size=12, patch_size=4, in_channels=2, dim=8, depth=1, heads=2)
    images = torch.randn(3, 2, 12, 12)
    assert torch.equal(patchify(images, 4), vit.patchify(images))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        patchify(torch.zeros(1, 1, 10, 10), 4)


def forward_loss_by_the_paper(images, predictions, mask, patch_size, norm_pix_loss):
    """MAE's loss in Python floats: for each masked patch, the mean over its pixels of (prediction - target)^2,
    target the patch's pixels (row, column, channel), normalised by the patch's mean and unbiased variance
    if norm_pix_loss; averaged over the masked patches."""
    B, C, H, W = images.shape
    total, n_masked = 0.0, 0
    for b in range(B):
        for i in range(H // patch_size):
            for j in range(W // patch_size):
                index = i * (W // patch_size) + j
                if mask[b, index] == 0:
                    continue
                pixels = [images[b, c, i * patch_size + r, j * patch_size + q].item()
                          for r in range(patch_size) for q in range(patch_size) for c in range(C)]
                if norm_pix_loss:
                    mean = sum(pixels) / len(pixels)
                    var = sum((x - mean) ** 2 for x in pixels) / (len(pixels) - 1)
                    pixels = [(x - mean) / math.sqrt(var + 1e-6) for x in pixels]
                prediction = predictions[b, index].tolist()
                total += sum((p - x) ** 2 for p, x in zip(prediction, pixels)) / len(pixels)
                n_masked += 1
    return total / n_masked


@pytest.mark.parametrize("norm_pix_loss", [False, True])
@pytest.mark.parametrize("channels, size, patch", [(1, 8, 4), (2, 6, 2), (3, 8, 2)])
def test_forward_loss_matches_the_paper(norm_pix_loss, channels, size, patch):
    torch.manual_seed(channels * 10 + size)
    images = torch.rand(3, channels, size, size, dtype=torch.float64)
    length = (size // patch) ** 2
    predictions = torch.randn(3, length, patch * patch * channels, dtype=torch.float64)
    mask = (torch.rand(3, length) < 0.6).double()
    mask[:, 0] = 1  # at least one masked patch
    expected = forward_loss_by_the_paper(images, predictions, mask, patch, norm_pix_loss)
    loss = forward_loss(images, predictions, mask, patch, norm_pix_loss)
    assert abs(loss.item() - expected) < 1e-10 * max(1.0, expected)


def test_loss_ignores_the_predictions_of_visible_patches():
    torch.manual_seed(0)
    images = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    predictions = torch.randn(2, 4, 16, dtype=torch.float64)
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    loss = forward_loss(images, predictions, mask, 4, True)
    changed = predictions.clone()
    changed[mask == 0] += 100.0
    assert forward_loss(images, changed, mask, 4, True).item() == loss.item()
    changed[0, 0] += 1.0  # a masked patch
    assert abs(forward_loss(images, changed, mask, 4, True).item() - loss.item()) > 1e-3


def test_normalised_pixel_target_closed_form():
    # every 4x4 patch holds a + (0, 1, ..., 15) in row-major order: mean a + 7.5, unbiased variance
    # 16 * 17 / 12, so the target is (k - 7.5) / sqrt(var + 1e-6) whatever a is
    ramp = torch.arange(16, dtype=torch.float64).reshape(4, 4)
    images = torch.cat([torch.cat([ramp + 5.0, ramp - 2.0], dim=1), torch.cat([ramp, ramp + 1.0], dim=1)])
    images = images[None, None]
    var = 16 * 17 / 12
    target = ((torch.arange(16, dtype=torch.float64) - 7.5) / math.sqrt(var + 1e-6)).expand(1, 4, 16)
    mask = torch.ones(1, 4, dtype=torch.float64)
    assert forward_loss(images, target, mask, 4, True).item() < 1e-24
    # predicting zeros costs the mean squared target: (15 / 16) var / (var + 1e-6)
    zeros = torch.zeros(1, 4, 16, dtype=torch.float64)
    assert abs(forward_loss(images, zeros, mask, 4, True).item() - 15 / 16 * var / (var + 1e-6)) < 1e-12
    # without normalisation the target is the raw pixels
    assert abs(forward_loss(images, patchify(images, 4), mask, 4, False).item()) < 1e-24


def test_forward_loss_rejects_bad_shapes():
    images = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"expected predictions \[2, 4, 16\]"):
        forward_loss(images, torch.zeros(2, 4, 15), torch.ones(2, 4), 4, True)
    with pytest.raises(ValueError, match="mask"):
        forward_loss(images, torch.zeros(2, 4, 16), torch.ones(2, 3), 4, True)


# ------------------------------------------------------------------------------------------------- MAE

def tiny_vit():
    return VisionTransformer(image_size=16, patch_size=4, dim=32, depth=2, heads=2)


def tiny_mae(**options) -> MAE:
    return make_method("mae", tiny_vit(), 32, **({"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2} | options))


def test_defaults_options_and_bad_backbones():
    torch.manual_seed(0)
    mae = make_method("mae", tiny_vit(), 32)
    assert (mae.mask_ratio, mae.norm_pix_loss, mae.decoder_embed.out_features, len(mae.decoder_blocks)) == (
        0.75, True, 128, 2)
    assert mae.decoder_blocks[0].attn.heads == 4 and mae.decoder_pred.out_features == 16
    assert tiny_mae(mask_ratio=0.9, norm_pix_loss=False).mask_ratio == 0.9
    with pytest.raises(ValueError, match="needs the experiments.models VisionTransformer"):
        make_method("mae", nn.Sequential(nn.Flatten(), nn.Linear(256, 32)), 32)
    with pytest.raises(ValueError, match="feature_dim"):
        make_method("mae", tiny_vit(), 16)
    with pytest.raises(ValueError, match="mask_ratio"):
        tiny_mae(mask_ratio=0.99)  # round(16 * 0.01) = 0 patches kept
    with pytest.raises(ValueError, match="decoder_dim divisible"):
        tiny_mae(decoder_dim=15)


def test_one_view_cropped_and_flipped_only():
    base = AugmentConfig(crop_scale=(0.3, 1.0), solarize_p=0.2)
    (config,) = tiny_mae().view_configs(base)
    assert (config.jitter_p, config.blur_p, config.solarize_p) == (0.0, 0.0, 0.0)
    assert (config.crop_scale, config.flip_p, config.output_size) == ((0.3, 1.0), 0.5, 28)
    with pytest.raises(ValueError, match="expected 1 view"):
        tiny_mae()([torch.rand(2, 1, 16, 16)] * 2)


def test_encoder_without_masking_is_the_backbone():
    # attention does not depend on the order of its tokens, so with no patch masked the encoder's cls
    # token, whatever the shuffle, is the backbone's features
    torch.manual_seed(0)
    mae = tiny_mae(mask_ratio=0.0).double()
    images = torch.rand(3, 1, 16, 16, dtype=torch.float64)
    encoded, mask, _ = mae.forward_encoder(images, torch.Generator().manual_seed(0))
    assert mask.sum() == 0 and encoded.shape == (3, 17, 32)
    torch.testing.assert_close(encoded[:, 0], mae.backbone(images), rtol=1e-10, atol=1e-12)


def test_decoder_puts_tokens_back_in_order():
    # with a decoder that ignores its input, mask tokens land exactly on the masked positions
    torch.manual_seed(0)
    mae = tiny_mae().double()
    images = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    encoded, mask, ids_restore = mae.forward_encoder(images, torch.Generator().manual_seed(0))
    captured = {}
    mae.decoder_blocks[0].register_forward_pre_hook(lambda module, args: captured.setdefault("x", args[0]))
    mae.forward_decoder(encoded, ids_restore)
    tokens = captured["x"] - mae.decoder_pos_embed
    visible = mae.decoder_embed(encoded)
    for b in range(2):
        masked = mask[b].nonzero().flatten()
        torch.testing.assert_close(tokens[b, 1 + masked], mae.mask_token[0].expand(len(masked), -1))
        # the token encoded at shuffled slot j came from patch ids_shuffle[j] and goes back there
        ids_shuffle = ids_restore[b].argsort()
        for j in range(encoded.shape[1] - 1):
            torch.testing.assert_close(tokens[b, 1 + ids_shuffle[j]], visible[b, 1 + j])
        torch.testing.assert_close(tokens[b, 0], visible[b, 0])  # the cls token stays first


def test_forward_gives_a_finite_loss_and_gradients_reach_encoder_and_decoder():
    torch.manual_seed(0)
    mae = tiny_mae()
    images = torch.rand(4, 1, 16, 16)
    loss = mae([images])
    assert math.isfinite(loss.item())
    loss.backward()
    vit = mae.backbone
    for name, parameter in [("patch_embed", vit.patch_embed.weight), ("cls_token", vit.cls_token),
                            ("pos_embed", vit.pos_embed), ("encoder block", vit.blocks[0].attn.qkv.weight),
                            ("encoder norm", vit.norm.weight), ("decoder_embed", mae.decoder_embed.weight),
                            ("mask_token", mae.mask_token), ("decoder_pos_embed", mae.decoder_pos_embed),
                            ("decoder block", mae.decoder_blocks[0].mlp[0].weight),
                            ("decoder_pred", mae.decoder_pred.weight)]:
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert mae.trainable_parameters() == list(mae.parameters())
    # a generator makes the masks, and so the loss, reproducible
    generator_loss = mae([images], torch.Generator().manual_seed(5))
    assert generator_loss.item() == mae([images], torch.Generator().manual_seed(5)).item()


def test_training_lowers_the_loss_and_the_backbone_still_gives_features():
    torch.manual_seed(0)
    mae = tiny_mae(norm_pix_loss=False)
    # images made of smooth ramps, which the visible patches predict
    ramp = torch.linspace(0, 1, 16)
    images = torch.stack([(a * ramp[None, :] + (1 - a) * ramp[:, None]) for a in torch.rand(8)])[:, None]
    optimizer = torch.optim.AdamW(mae.trainable_parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        loss = mae([images], torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.3 * sum(losses[:5])
    mae.eval()
    with torch.no_grad():
        features = mae.backbone(images)
    assert features.shape == (8, 32) and torch.isfinite(features).all()
    assert features.std(dim=0).max() > 0  # not one constant vector
