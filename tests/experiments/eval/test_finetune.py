"""Fine-tuning, single- and multi-label: it learns constructed tasks, trains on exactly the labelled
fraction, and leaves the backbone and the caller's random state untouched."""
import pytest
import torch
import torch.nn as nn

from experiments.data import ImageDataset, stratified_fraction, to_float
from experiments.data.mosaic import make_mosaics
from experiments.eval import fine_tune
from experiments.eval.finetune import fine_tune_multilabel
from experiments.models.vit import VisionTransformer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_images(n, seed):
    return torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def dataset(images, labels, num_classes):
    return ImageDataset("synthetic", images, labels, tuple(str(c) for c in range(num_classes)))


def tiny_cnn():
    # keeps a 2x2 spatial map so "which quadrant" stays visible in the features
    return nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AvgPool2d(7), nn.Flatten())


def quadrant_images(n, seed):
    """Noise with one bright 14x14 quadrant; the class is which one."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    images = torch.randint(0, 80, (n, 28, 28), generator=generator)
    for quadrant in range(4):
        rows, cols = divmod(quadrant, 2)
        images[labels == quadrant, 14 * rows:14 * rows + 14, 14 * cols:14 * cols + 14] += 150
    return dataset(images.to(torch.uint8), labels, 4)


def test_fine_tune_learns_quadrant_task_and_leaves_backbone_untouched():
    torch.manual_seed(0)
    backbone = tiny_cnn().eval()
    before = {name: value.clone() for name, value in backbone.state_dict().items()}
    rng_before = torch.get_rng_state()
    train, test = quadrant_images(256, seed=0), quadrant_images(100, seed=1)
    result = fine_tune(backbone, train, test, label_fraction=1.0, epochs=8, lr=1e-2, seed=0, batch_size=32)
    assert result >= 0.95
    assert all(torch.equal(value, before[name]) for name, value in backbone.state_dict().items())
    assert not backbone.training
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's random stream is not consumed
    again = fine_tune(backbone, train, test, label_fraction=1.0, epochs=8, lr=1e-2, seed=0, batch_size=32)
    assert again == result


def test_fine_tune_trains_on_exactly_the_stratified_fraction_each_epoch():
    labels = torch.arange(80) % 4
    train = dataset(random_images(80, seed=5), labels, 4)
    seen = []
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(784, 8))
    # a hook function survives deepcopy as the same object, so it records what the copy is fed
    backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()) if module.training else None)
    fine_tune(backbone, train, train, label_fraction=0.25, epochs=2, lr=1e-3, seed=3, batch_size=8)
    inputs = torch.cat(seen)
    matches = (inputs.flatten(1)[:, None, :] == to_float(train.images).flatten(1)[None, :, :]).all(dim=2)
    assert torch.equal(matches.sum(dim=1), torch.ones(len(inputs), dtype=torch.long))  # every input is a train image
    indices = matches.int().argmax(dim=1)
    expected = stratified_fraction(labels, 0.25, 3)
    assert len(indices) == 2 * len(expected)
    for epoch in indices.split(len(expected)):
        assert torch.equal(epoch.sort().values, expected.sort().values)


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5])
def test_fine_tune_rejects_label_fraction_outside_0_1(fraction):
    data = quadrant_images(8, seed=0)
    with pytest.raises(ValueError, match="label_fraction"):
        fine_tune(tiny_cnn(), data, data, label_fraction=fraction, epochs=1, lr=1e-3, seed=0)


def tiny_vit(**kwargs):
    torch.manual_seed(0)
    return VisionTransformer(depth=2, dim=32, heads=2, **kwargs)


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
