"""SimCLR: NT-Xent against a loop over the paper's equation and its closed forms; the method; make_method."""
import math

import pytest
import torch
from torch import nn

from experiments.methods import METHODS, SSLMethod, make_method
from experiments.methods.simclr import SimCLR, nt_xent_loss


def nt_xent_by_the_paper(z1, z2, temperature):
    """SimCLR's Algorithm 1 in Python floats: views 2k and 2k + 1 are the two of image k,
    l(i, j) = -log exp(s_ij / T) / sum over k != i of exp(s_ik / T), L = mean of l(2k, 2k+1) and l(2k+1, 2k)."""
    views = [v.tolist() for pair in zip(z1, z2) for v in pair]

    def sim(a, b):
        dot = sum(x * y for x, y in zip(a, b))
        return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    def loss(i, j):
        denominator = sum(math.exp(sim(views[i], views[k]) / temperature) for k in range(len(views)) if k != i)
        return -math.log(math.exp(sim(views[i], views[j]) / temperature) / denominator)

    return sum(loss(2 * k, 2 * k + 1) + loss(2 * k + 1, 2 * k) for k in range(len(z1))) / len(views)


@pytest.mark.parametrize("n, dim", [(1, 4), (2, 3), (5, 8), (9, 2)])
@pytest.mark.parametrize("temperature", [0.05, 0.1, 0.5, 2.0])
def test_nt_xent_matches_the_paper(n, dim, temperature):
    torch.manual_seed(10 * n + dim)
    z1, z2 = torch.randn(n, dim, dtype=torch.float64), torch.randn(n, dim, dtype=torch.float64)
    expected = nt_xent_by_the_paper(z1, z2, temperature)
    assert abs(nt_xent_loss(z1, z2, temperature).item() - expected) < 1e-10 * max(1.0, expected)


@pytest.mark.parametrize("n, temperature", [(1, 0.1), (3, 0.1), (4, 0.5)])
def test_nt_xent_closed_form_for_identical_views_of_orthogonal_images(n, temperature):
    z = torch.eye(n, 6, dtype=torch.float64)  # sim 1 to its other view, 0 to the other 2N - 2 views
    expected = -math.log(math.exp(1 / temperature) / (math.exp(1 / temperature) + (2 * n - 2)))
    assert abs(nt_xent_loss(z, z.clone(), temperature).item() - expected) < 1e-12


def test_nt_xent_is_symmetric_and_ignores_the_scale_of_each_embedding():
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    loss = nt_xent_loss(z1, z2, 0.1)
    torch.testing.assert_close(nt_xent_loss(z2, z1, 0.1), loss, rtol=0, atol=1e-12)
    scales = torch.rand(6, 1, dtype=torch.float64) * 10 + 0.1
    torch.testing.assert_close(nt_xent_loss(z1 * scales, z2 * scales.flip(0), 0.1), loss, rtol=0, atol=1e-12)
    # the pairing matters: swapping the views of two images within z2 changes the loss
    assert abs(nt_xent_loss(z1, z2[[1, 0, 2, 3, 4, 5]], 0.1).item() - loss.item()) > 1e-3


def test_nt_xent_rejects_bad_input():
    with pytest.raises(ValueError, match="one shape"):
        nt_xent_loss(torch.randn(4, 3), torch.randn(5, 3), 0.1)
    with pytest.raises(ValueError, match="one shape"):
        nt_xent_loss(torch.randn(4), torch.randn(4), 0.1)
    with pytest.raises(ValueError, match="temperature"):
        nt_xent_loss(torch.randn(4, 3), torch.randn(4, 3), 0.0)


def tiny_backbone():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))


def test_simclr_defaults_and_loss_of_its_head_outputs():
    torch.manual_seed(0)
    simclr = make_method("simclr", tiny_backbone(), 16)
    assert isinstance(simclr, SimCLR) and simclr.temperature == 0.1
    assert [type(m) for m in simclr.head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (simclr.head[0].out_features, simclr.head[-1].out_features) == (512, 128)
    views = [torch.randn(8, 1, 8, 8), torch.randn(8, 1, 8, 8)]
    # BatchNorm normalises over both views together
    z = simclr.head(simclr.backbone(torch.cat(views)))
    torch.testing.assert_close(simclr(views), nt_xent_loss(z[:8], z[8:], 0.1))


def test_simclr_trains_every_parameter():
    torch.manual_seed(0)
    simclr = make_method("simclr", tiny_backbone(), 16, hidden_dim=32, out_dim=8, temperature=0.5)
    assert simclr.temperature == 0.5 and simclr.head[-1].out_features == 8
    assert simclr.trainable_parameters() == list(simclr.parameters())
    simclr([torch.randn(8, 1, 8, 8), torch.randn(8, 1, 8, 8)]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in simclr.parameters())


def test_training_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    simclr = make_method("simclr", tiny_backbone(), 16, hidden_dim=32, out_dim=16)
    images = torch.randn(16, 1, 8, 8)
    views = [images + 0.05 * torch.randn_like(images), images + 0.05 * torch.randn_like(images)]
    optimizer = torch.optim.SGD(simclr.trainable_parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(20):
        loss = simclr(views)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_base_class_defaults_and_make_method_errors():
    assert set(METHODS) == {"moco", "simclr", "dino", "swav", "mae"}
    assert all(issubclass(m, SSLMethod) for m in METHODS.values())
    simclr = make_method("simclr", tiny_backbone(), 16)
    base = object()  # the defaults pass the caller's config through untouched
    assert simclr.view_configs(base) == [base, base]
    assert simclr.on_step_end(1, 10) is None
    with pytest.raises(ValueError, match="unknown method 'byol'"):
        make_method("byol", tiny_backbone(), 16)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['queue_size'\]"):
        make_method("simclr", tiny_backbone(), 16, queue_size=4096)
    with pytest.raises(ValueError, match="temperature"):
        make_method("simclr", tiny_backbone(), 16, temperature=0)
    with pytest.raises(ValueError, match="expected 2 views"):
        simclr([torch.randn(4, 1, 8, 8)])
