"""Weighted k-NN against a naive loop, closed forms (one-hot features, k = 1) and its vote weights."""
import math

import pytest
import torch
import torch.nn.functional as F

from experiments.eval import knn_accuracy, knn_predict

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
