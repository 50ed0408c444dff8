"""Weighted k-NN (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance
Discrimination"; the protocol DINO's eval_knn follows): the k training features most cosine-similar to
a test feature vote for their class with weight exp(similarity / T). No training, no hyper-parameters
to tune beyond k and T."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from experiments.eval.checks import check_features, check_train_test
from experiments.eval.metrics import accuracy


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                k: int = 20, temperature: float = 0.07, chunk_size: int = 256) -> torch.Tensor:
    """Weighted k-NN class predictions, int64 [M], on train_features' device.

    k must lie in 1 .. len(train_features): a larger k is an error rather than silently clamped,
    since it would mean every test point is voted on by the whole training set.
    """
    check_features(train_features, train_labels, "train")
    if test_features.ndim != 2 or test_features.shape[1] != train_features.shape[1] or len(test_features) == 0:
        raise ValueError(f"test features must be non-empty [M, {train_features.shape[1]}], "
                         f"got {tuple(test_features.shape)}")
    if not 1 <= k <= len(train_features):
        raise ValueError(f"k must be in 1..{len(train_features)} (the training set size), got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    device = train_features.device
    train = F.normalize(train_features.float(), dim=1)
    labels = train_labels.to(device).long()
    num_classes = int(labels.max()) + 1
    predictions = []
    # one [chunk, N_train] similarity block at a time: 10k x 60k at once would be 2.4 GB
    for test in F.normalize(test_features.float().to(device), dim=1).split(chunk_size):
        similarity, neighbours = (test @ train.T).topk(k, dim=1)
        # exp((s - s_max) / T) is exp(s / T) times one factor per row: same argmax, no overflow at small T
        weights = ((similarity - similarity[:, :1]) / temperature).exp()
        votes = torch.zeros(len(test), num_classes, device=device).scatter_add_(1, labels[neighbours], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07, chunk_size: int = 256) -> float:
    """Test accuracy of weighted k-NN classification (cosine similarity, votes exp(sim / T))."""
    check_train_test(train_features, train_labels, test_features, test_labels)
    return accuracy(knn_predict(train_features, train_labels, test_features, k, temperature, chunk_size), test_labels)
