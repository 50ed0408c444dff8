"""The multi-label protocol checked against naive transcriptions, closed forms and properties."""
import math

import pytest
import torch
import torch.nn as nn

from experiments.data import ImageDataset
from experiments.data.augment import rand_augment
from experiments.data.mosaic import make_mosaics
from experiments.eval.finetune import fine_tune_multilabel, vit_and_head_layers
from experiments.eval.linear import linear_probe_multilabel
from experiments.eval.metrics import mean_auc, roc_auc
from experiments.lr_schedule import set_learning_rate
from experiments.models.vit import VisionTransformer
from experiments.param_groups import parameter_groups

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_dataset(n, num_classes, seed):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    return ImageDataset("synthetic", images, labels, tuple(str(c) for c in range(num_classes)))


def tiny_vit(**kwargs):
    torch.manual_seed(0)
    return VisionTransformer(depth=2, dim=32, heads=2, **kwargs)


# make_mosaics

def test_mosaic_tiles_are_the_pooled_sources_and_targets_their_classes():
    dataset = random_dataset(40, num_classes=6, seed=0)
    n, seed = 12, 3
    mosaics, targets = make_mosaics(dataset, n, seed)
    assert mosaics.dtype == torch.uint8 and mosaics.shape == (n, 28, 28)
    assert targets.dtype == torch.float32 and targets.shape == (n, 6)
    sources = torch.randint(len(dataset), (n, 4), generator=torch.Generator().manual_seed(seed))  # the documented draw
    for i in range(n):
        for tile in range(4):
            row, col = divmod(tile, 2)
            source = dataset.images[sources[i, tile]].tolist()
            for y in range(14):
                for x in range(14):
                    total = source[2 * y][2 * x] + source[2 * y][2 * x + 1] + source[2 * y + 1][2 * x] \
                        + source[2 * y + 1][2 * x + 1]
                    assert mosaics[i, 14 * row + y, 14 * col + x] == math.floor(total / 4 + 0.5)
        present = {dataset.labels[j].item() for j in sources[i]}
        assert targets[i].tolist() == [1.0 if c in present else 0.0 for c in range(6)]


def test_mosaics_are_deterministic_per_seed_with_one_to_four_labels():
    dataset = random_dataset(50, num_classes=10, seed=1)
    mosaics, targets = make_mosaics(dataset, 200, seed=5)
    again, again_targets = make_mosaics(dataset, 200, seed=5)
    other, _ = make_mosaics(dataset, 200, seed=6)
    assert torch.equal(mosaics, again) and torch.equal(targets, again_targets)
    assert not torch.equal(mosaics, other)
    counts = targets.sum(dim=1)
    assert counts.min() >= 1 and counts.max() <= 4 and (counts < 4).any()  # repeated classes occur


def test_mosaics_reject_bad_input():
    dataset = random_dataset(5, num_classes=2, seed=0)
    with pytest.raises(ValueError, match="n >= 1"):
        make_mosaics(dataset, 0, seed=0)
    odd = ImageDataset("odd", torch.zeros(3, 27, 27, dtype=torch.uint8), torch.zeros(3, dtype=torch.long), ("a",))
    with pytest.raises(ValueError, match="even"):
        make_mosaics(odd, 2, seed=0)


# AUC

def brute_force_auc(scores, targets):
    positives = [s for s, t in zip(scores.tolist(), targets.tolist()) if t == 1]
    negatives = [s for s, t in zip(scores.tolist(), targets.tolist()) if t == 0]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in positives for q in negatives)
    return wins / (len(positives) * len(negatives))


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_the_pairwise_count_with_ties_as_halves(seed):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (60,), generator=generator).float()  # many ties
    targets = (torch.rand(60, generator=generator) < 0.3).float()
    targets[:2] = torch.tensor([0.0, 1.0])
    assert roc_auc(scores, targets) == pytest.approx(brute_force_auc(scores, targets), abs=1e-12)


def test_auc_closed_forms_and_monotone_invariance():
    targets = torch.tensor([0, 0, 1, 0, 1, 1, 0, 1.0])
    ranking = torch.tensor([0.1, 0.2, 0.9, 0.3, 0.8, 0.7, 0.4, 0.6])
    assert roc_auc(ranking, targets) == 1.0
    assert roc_auc(-ranking, targets) == 0.0
    assert roc_auc(torch.full((8,), 3.0), targets) == 0.5
    scores = torch.randn(8, generator=torch.Generator().manual_seed(0))
    for transform in (torch.exp, torch.sigmoid, lambda s: 3 * s - 7, lambda s: s**3):
        assert roc_auc(transform(scores), targets) == pytest.approx(roc_auc(scores, targets), abs=1e-12)


def test_auc_rejects_a_single_class_and_non_binary_targets():
    with pytest.raises(ValueError, match="both classes"):
        roc_auc(torch.randn(5), torch.ones(5))
    with pytest.raises(ValueError, match="0 or 1"):
        roc_auc(torch.randn(3), torch.tensor([0.0, 2.0, 1.0]))


def test_mean_auc_averages_usable_labels_and_names_the_skipped():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(30, 3, generator=generator)
    targets = (torch.rand(30, 3, generator=generator) < 0.5).float()
    targets[:, 1] = 1  # label 1: positives only
    with pytest.warns(UserWarning, match=r"\[1\]"):
        mean, per_label = mean_auc(scores, targets)
    expected = [brute_force_auc(scores[:, c], targets[:, c]) for c in (0, 2)]
    assert per_label[0] == pytest.approx(expected[0]) and per_label[2] == pytest.approx(expected[1])
    assert math.isnan(per_label[1])
    assert mean == pytest.approx(sum(expected) / 2)
    with pytest.raises(ValueError, match="no label"):
        mean_auc(scores, torch.zeros(30, 3))


# layer-wise LR decay, DropPath

def expected_layer(name, depth):
    # a transcription of the rule: embeddings 0, blocks.i i + 1, the rest (norm, head) depth + 1
    if name.split(".")[0] in ("patch_embed", "cls_token", "pos_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def vit_with_head_groups(lr_decay, weight_decay):
    model = nn.Sequential(tiny_vit(), nn.Linear(32, 5))
    return model, parameter_groups(model.named_parameters(), weight_decay, vit_and_head_layers(model), lr_decay)


def test_layer_decay_groups_hold_every_parameter_once_with_its_scale():
    decay = 0.55
    model, groups = vit_with_head_groups(decay, weight_decay=0.05)
    names = {id(p): name for name, p in model.named_parameters()}
    seen = [id(p) for group in groups for p in group["params"]]
    assert sorted(seen) == sorted(names) and len(seen) == len(set(seen))
    layers = set()
    for group in groups:
        for p in group["params"]:
            part, name = names[id(p)].split(".", 1)
            layer = expected_layer(name, 2) if part == "0" else 3  # the head: one past the final norm
            layers.add(layer)
            assert group["lr_scale"] == pytest.approx(decay ** (3 - layer)) and group["layer"] == layer
            no_decay = p.ndim == 1 or name in ("cls_token", "pos_embed")
            assert group["weight_decay"] == (0.0 if no_decay else 0.05)
    assert layers == {0, 1, 2, 3}


def test_one_adamw_step_moves_each_layer_by_its_learning_rate():
    model, groups = vit_with_head_groups(0.5, weight_decay=0.0)
    optimizer = torch.optim.AdamW(groups)
    set_learning_rate(optimizer, 1e-2, 1.0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()  # Adam's first step is lr * g / (|g| + eps): lr for a gradient of 1
    for name, p in model.named_parameters():
        part, inner = name.split(".", 1)
        layer = expected_layer(inner, 2) if part == "0" else 3
        step = before[name] - p.detach()
        assert torch.allclose(step, torch.full_like(step, 1e-2 * 0.5 ** (3 - layer)), rtol=1e-4)


def test_parameter_groups_reject_bad_decay():
    for decay in (0.0, 1.5):
        with pytest.raises(ValueError, match="layer_decay"):
            vit_with_head_groups(decay, weight_decay=0.05)
    with pytest.raises(ValueError, match="weight_decay"):
        vit_with_head_groups(0.5, weight_decay=-1.0)


def test_set_drop_path_matches_the_constructor_rates():
    vit = VisionTransformer(depth=5, dim=16, heads=2)
    vit.set_drop_path(0.2)
    assert [block.drop_path_rate for block in vit.blocks] == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    built = VisionTransformer(depth=5, dim=16, heads=2, drop_path_rate=0.2)
    assert [b.drop_path_rate for b in vit.blocks] == [b.drop_path_rate for b in built.blocks]
    for rate in (-0.1, 1.0):
        with pytest.raises(ValueError, match="drop path"):
            vit.set_drop_path(rate)


# RandAugment

def test_rand_augment_is_reproducible_per_seed_and_leaves_the_global_rng_alone():
    images = random_dataset(16, 2, seed=0).images
    state = torch.get_rng_state()
    first = rand_augment(images, torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)
    assert first.dtype == torch.uint8 and first.shape == images.shape
    assert torch.equal(first, rand_augment(images, torch.Generator().manual_seed(1)))
    assert not torch.equal(first, rand_augment(images, torch.Generator().manual_seed(2)))
    generator = torch.Generator().manual_seed(1)
    rand_augment(images, generator)
    assert not torch.equal(first, rand_augment(images, generator))  # the generator advances
    assert torch.equal(rand_augment(images, torch.Generator().manual_seed(1), num_ops=0), images)


def test_rand_augment_draws_ops_per_image():
    same = random_dataset(1, 2, seed=3).images.expand(32, -1, -1).contiguous()
    out = rand_augment(same, torch.Generator().manual_seed(0), num_ops=6)
    assert len({bytes(image.numpy()) for image in out}) > 16


# fine-tuning and the linear probe

def textures_dataset(n, seed):
    """Three classes a tiny ViT learns to tell apart in a few hundred steps: alternating rows, alternating
    columns and a checkerboard of 2x2 blocks (1 pixel after pooling, so the same in every tile position),
    with the same intensities, so an untrained model scores about 0.5."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    rows, cols = torch.meshgrid(torch.arange(28) // 2 % 2, torch.arange(28) // 2 % 2, indexing="ij")
    textures = 30 + 180 * torch.stack([rows, cols, rows ^ cols])
    images = textures[labels] + torch.randint(-20, 21, (n, 28, 28), generator=generator)
    return ImageDataset("textures", images.clamp(0, 255).to(torch.uint8), labels, ("rows", "columns", "checks"))


def test_fine_tune_multilabel_learns_and_leaves_backbone_and_rng_untouched():
    train_images, train_targets = make_mosaics(textures_dataset(60, seed=0), 128, seed=0)
    test_images, test_targets = make_mosaics(textures_dataset(60, seed=1), 128, seed=1)
    vit = tiny_vit()
    before = {name: value.clone() for name, value in vit.state_dict().items()}
    state = torch.get_rng_state()
    result = fine_tune_multilabel(vit, train_images, train_targets, test_images, test_targets, epochs=20, lr=4e-3,
                                  seed=0, batch_size=16, warmup_epochs=1)
    assert result["mean_auc"] > 0.95 and min(result["per_label_auc"]) > 0.9
    assert len(result["per_label_auc"]) == 3
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(before[name], value) for name, value in vit.state_dict().items())
    assert [block.drop_path_rate for block in vit.blocks] == [0.0, 0.0]


def test_fine_tune_multilabel_asks_a_cnn_for_the_plain_recipe():
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    images, targets = make_mosaics(textures_dataset(30, seed=0), 16, seed=0)
    with pytest.raises(ValueError, match="layer_decay=1 and drop_path=0"):
        fine_tune_multilabel(cnn, images, targets, images, targets, epochs=1, lr=1e-3, seed=0, warmup_epochs=0)
    result = fine_tune_multilabel(cnn, images, targets, images, targets, epochs=1, lr=1e-3, seed=0,
                                  layer_decay=1.0, drop_path=0.0, warmup_epochs=0)
    assert 0 <= result["mean_auc"] <= 1


def test_linear_probe_multilabel_separates_labels_that_features_encode():
    generator = torch.Generator().manual_seed(0)
    targets = (torch.rand(400, 4, generator=generator) < 0.4).float()
    features = targets @ torch.randn(4, 16, generator=generator) + 0.3 * torch.randn(400, 16, generator=generator)
    result = linear_probe_multilabel(features[:300], targets[:300], features[300:], targets[300:])
    assert result["mean_auc"] > 0.98
    assert min(result["per_label_auc"]) > 0.95
    noise = linear_probe_multilabel(torch.randn(300, 16, generator=generator), targets[:300],
                                    torch.randn(100, 16, generator=generator), targets[300:])
    assert abs(noise["mean_auc"] - 0.5) < 0.15
