"""k-NN, linear probe and fine-tuning checked on synthetic features and images with known answers."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from experiments.data import ImageDataset, stratified_fraction, to_float
from experiments.eval import extract_features, fine_tune, knn_accuracy, knn_predict, linear_probe


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


def blobs(n, dim, num_classes, spread, seed):
    generator = torch.Generator().manual_seed(seed)
    centres = spread * torch.randn(num_classes, dim, generator=generator)
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    return centres[labels] + torch.randn(n, dim, generator=generator), labels


# extract_features

def test_extract_features_batches_match_one_eval_forward_and_mode_is_restored():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.Dropout(0.5), nn.BatchNorm1d(16))
    images = random_images(23, seed=1)
    backbone.eval()
    expected = backbone(to_float(images)).detach()
    for training in (True, False):
        backbone.train(training)
        features = extract_features(backbone, images, batch_size=5)
        assert all(module.training == training for module in backbone.modules())
        # dropout and batch statistics would change the result if it had run in train mode
        torch.testing.assert_close(features, expected)
        assert features.dtype == torch.float32 and not features.requires_grad


def test_extract_features_restores_mixed_submodule_modes():
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(784, 4), nn.Dropout(0.5))
    backbone.train()
    backbone[2].eval()  # e.g. a frozen part of the model
    extract_features(backbone, random_images(3, seed=0))
    assert [m.training for m in backbone.modules()] == [True, True, True, False]


def test_extract_features_rejects_bad_input():
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(784, 4))
    with pytest.raises(ValueError):
        extract_features(backbone, random_images(3, seed=0)[:, None])
    with pytest.raises(ValueError):
        extract_features(backbone, random_images(3, seed=0), batch_size=0)


# k-NN

def naive_knn(train_features, train_labels, test_features, k, temperature):
    """Per test point: cosine similarity to each training point, sort, sum exp(sim / T) per class."""
    predictions = []
    for x in test_features:
        similarities = [float(x @ t) / float(x.norm() * t.norm()) for t in train_features]
        order = sorted(range(len(similarities)), key=lambda i: -similarities[i])[:k]
        votes = {}
        for i in order:
            label = int(train_labels[i])
            votes[label] = votes.get(label, 0.0) + math.exp(similarities[i] / temperature)
        predictions.append(max(votes, key=votes.get))
    return torch.tensor(predictions)


def test_knn_on_one_hot_class_features_is_perfect():
    train_labels, test_labels = torch.arange(100) % 10, torch.arange(37) % 10
    assert knn_accuracy(F.one_hot(train_labels, 10).float(), train_labels,
                        F.one_hot(test_labels, 10).float(), test_labels) == 1.0


def test_knn_matches_naive_loop_on_random_data():
    generator = torch.Generator().manual_seed(0)
    train, test = torch.randn(60, 8, generator=generator), torch.randn(25, 8, generator=generator)
    train_labels = torch.randint(0, 5, (60,), generator=generator)
    for k, temperature in [(1, 0.07), (5, 0.07), (20, 0.5), (60, 0.1)]:
        expected = naive_knn(train, train_labels, test, k, temperature)
        assert torch.equal(knn_predict(train, train_labels, test, k, temperature), expected)
        test_labels = torch.randint(0, 5, (25,), generator=generator)
        assert knn_accuracy(train, train_labels, test, test_labels, k, temperature) == pytest.approx(
            (expected == test_labels).float().mean().item())


def test_knn_with_k1_is_the_nearest_neighbour_by_cosine():
    generator = torch.Generator().manual_seed(1)
    train, test = torch.randn(40, 6, generator=generator), torch.randn(30, 6, generator=generator)
    train = train * torch.rand(40, 1, generator=generator) * 10  # lengths must not matter
    train_labels = torch.randint(0, 7, (40,), generator=generator)
    cosine = (test @ train.T) / (test.norm(dim=1)[:, None] * train.norm(dim=1)[None, :])
    assert torch.equal(knn_predict(train, train_labels, test, k=1), train_labels[cosine.argmax(dim=1)])


def test_knn_votes_are_weighted_by_exp_similarity_over_temperature():
    # one neighbour of class 1 at similarity 1, two of class 0 at similarity 0.5
    train = torch.tensor([[1.0, 0.0], [0.5, 3 ** 0.5 / 2], [0.5, -(3 ** 0.5) / 2], [-1.0, 0.0]])
    train_labels = torch.tensor([1, 0, 0, 2])
    test = torch.tensor([[2.0, 0.0]])
    # T = 0.07: exp(1/T) >> 2 exp(0.5/T); T = 100: almost equal weights, so the majority wins
    assert knn_predict(train, train_labels, test, k=3, temperature=0.07).item() == 1
    assert knn_predict(train, train_labels, test, k=3, temperature=100.0).item() == 0
    # tiny temperatures must not overflow into inf / nan votes
    assert knn_predict(train, train_labels, test, k=3, temperature=1e-4).item() == 1


def test_knn_chunking_does_not_change_predictions():
    generator = torch.Generator().manual_seed(2)
    train, test = torch.randn(200, 16, generator=generator), torch.randn(77, 16, generator=generator)
    train_labels = torch.randint(0, 10, (200,), generator=generator)
    whole = knn_predict(train, train_labels, test, k=10, chunk_size=1000)
    for chunk_size in (1, 7, 64):
        assert torch.equal(knn_predict(train, train_labels, test, k=10, chunk_size=chunk_size), whole)


def test_knn_rejects_bad_arguments():
    train, labels = torch.randn(10, 4), torch.arange(10) % 2
    with pytest.raises(ValueError, match="k must be"):
        knn_accuracy(train, labels, train, labels, k=11)
    with pytest.raises(ValueError):
        knn_accuracy(train, labels, train, labels, k=0)
    with pytest.raises(ValueError):
        knn_accuracy(train, labels, train, labels, temperature=0.0)
    with pytest.raises(ValueError):
        knn_accuracy(train, labels, torch.randn(10, 5), labels, k=3)
    with pytest.raises(ValueError):
        knn_accuracy(train, labels[:9], train, labels, k=3)


# linear probe

def test_linear_probe_separates_gaussian_blobs():
    features, labels = blobs(1000, dim=16, num_classes=10, spread=5.0, seed=0)
    features = features * 100 + 7  # offset and scale are removed by standardisation
    assert linear_probe(features[:500], labels[:500], features[500:], labels[500:]) >= 0.99


def test_linear_probe_on_random_labels_is_near_chance():
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(400, 64, generator=generator)
    labels = torch.randint(0, 10, (400,), generator=generator)
    assert linear_probe(features[:200], labels[:200], features[200:], labels[200:]) < 0.5
    # ... while it does fit the training labels, so the low test score is not a failure to train
    assert linear_probe(features[:200], labels[:200], features[:200], labels[:200]) > 0.9


def test_linear_probe_ignores_per_feature_scale_and_offset():
    # overlapping blobs, so the answer depends on where the boundary lands
    features, labels = blobs(600, dim=8, num_classes=5, spread=1.0, seed=5)
    generator = torch.Generator().manual_seed(6)
    scale = 10 ** (6 * torch.rand(8, generator=generator) - 3)  # 1e-3 .. 1e3: badly conditioned unless standardised
    offset = 100 * torch.randn(8, generator=generator)
    plain = linear_probe(features[:300], labels[:300], features[300:], labels[300:])
    skewed = features * scale + offset
    assert 0.3 < plain < 0.99
    assert linear_probe(skewed[:300], labels[:300], skewed[300:], labels[300:]) == pytest.approx(plain, abs=0.01)


def test_linear_probe_is_deterministic_for_a_seed():
    features, labels = blobs(400, dim=8, num_classes=5, spread=1.0, seed=4)
    runs = [linear_probe(features[:200], labels[:200], features[200:], labels[200:], epochs=20, seed=1)
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_linear_probe_rejects_mismatched_features():
    with pytest.raises(ValueError):
        linear_probe(torch.randn(10, 4), torch.zeros(10, dtype=torch.long), torch.randn(5, 3),
                     torch.zeros(5, dtype=torch.long))


# fine-tuning

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
