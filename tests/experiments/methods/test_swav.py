"""SwAV: Sinkhorn-Knopp against a loop over the paper's algorithm and a scaling-vector numpy version, its
marginals; the swapped-prediction loss against a loop; multi-crop; the method's prototypes and codes."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from experiments.data.augment import AugmentConfig, augment
from experiments.methods import make_method
from experiments.methods.multicrop import MultiCrop, encode_multi_crop
from experiments.methods.swav import SwAV, sinkhorn_knopp, swav_loss
from experiments.models import make_backbone
from experiments.models.vit import VisionTransformer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sinkhorn_by_the_paper(scores, epsilon, iterations):
    """SwAV's Algorithm 1 in Python floats: Q = exp(scores / eps)^T [K][B], Q /= sum Q, then each
    iteration rows Q[k] /= (sum Q[k]) * K and columns Q[:, b] /= (sum Q[:, b]) * B; returns (B Q)^T."""
    B, K = len(scores), len(scores[0])
    q = [[math.exp(scores[b][k] / epsilon) for b in range(B)] for k in range(K)]
    total = sum(map(sum, q))
    q = [[x / total for x in row] for row in q]
    for _ in range(iterations):
        for k in range(K):
            row_sum = sum(q[k])
            q[k] = [x / row_sum / K for x in q[k]]
        for b in range(B):
            column_sum = sum(q[k][b] for k in range(K))
            for k in range(K):
                q[k][b] = q[k][b] / column_sum / B
    return [[B * q[k][b] for k in range(K)] for b in range(B)]


def sinkhorn_by_scaling_vectors(scores, epsilon, iterations):
    """The same fixed point in the classical form Q = diag(u) P diag(v), P = exp(S / eps) [B, K]: the
    prototype step sets v so each column of Q sums to 1 / K, the sample step sets u so each row sums to 1 / B."""
    p = np.exp(np.asarray(scores, dtype=np.float64) / epsilon)
    B, K = p.shape
    u = np.ones(B)
    for _ in range(iterations):
        v = 1.0 / (K * (u @ p))
        u = 1.0 / (B * (p @ v))
    return B * u[:, None] * p * v[None, :]


def unit_scores(batch, n_prototypes, dim, seed):
    """Cosines between random unit embeddings and unit prototypes, as SwAV's scores are."""
    generator = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(batch, dim, generator=generator, dtype=torch.float64), dim=1)
    c = F.normalize(torch.randn(n_prototypes, dim, generator=generator, dtype=torch.float64), dim=1)
    return z @ c.T


@pytest.mark.parametrize("batch, n_prototypes, dim", [(1, 3, 4), (5, 3, 8), (6, 9, 2), (16, 10, 32)])
@pytest.mark.parametrize("epsilon, iterations", [(0.05, 3), (0.5, 1), (0.1, 7)])
def test_sinkhorn_matches_the_paper_and_the_scaling_form(batch, n_prototypes, dim, epsilon, iterations):
    scores = unit_scores(batch, n_prototypes, dim, seed=batch + n_prototypes)
    codes = sinkhorn_knopp(scores, epsilon, iterations)
    expected = torch.tensor(sinkhorn_by_the_paper(scores.tolist(), epsilon, iterations), dtype=torch.float64)
    torch.testing.assert_close(codes, expected, rtol=1e-10, atol=1e-14)
    scaling = torch.from_numpy(sinkhorn_by_scaling_vectors(scores.numpy(), epsilon, iterations))
    torch.testing.assert_close(codes, scaling, rtol=1e-10, atol=1e-14)


def test_sinkhorn_assignments_sum_to_one_per_sample_and_spread_over_the_prototypes():
    batch, n_prototypes = 64, 100  # the method's defaults at batch 64
    worst = 0.0
    for seed in range(10):
        codes = sinkhorn_knopp(unit_scores(batch, n_prototypes, 128, seed))
        assert codes.min() >= 0
        torch.testing.assert_close(codes.sum(dim=1), torch.ones(batch, dtype=torch.float64), rtol=0, atol=1e-12)
        worst = max(worst, (codes.sum(dim=0) / (batch / n_prototypes) - 1).abs().max().item())
    # After 3 iterations each prototype holds B / K of the mass to within 15% for these random cosines
    # (about 9% at worst over 50 seeds); the equal partition is exact only in the limit of many iterations.
    assert 1e-3 < worst < 0.15
    codes = sinkhorn_knopp(unit_scores(batch, n_prototypes, 128, 0), iterations=1000)
    torch.testing.assert_close(codes.sum(dim=0), torch.full((n_prototypes,), batch / n_prototypes,
                                                            dtype=torch.float64), rtol=1e-10, atol=0)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(batch, dtype=torch.float64), rtol=0, atol=1e-12)


def test_sinkhorn_of_equal_scores_is_uniform_and_a_shift_changes_nothing():
    uniform = sinkhorn_knopp(torch.full((6, 4), 0.3, dtype=torch.float64))
    torch.testing.assert_close(uniform, torch.full((6, 4), 0.25, dtype=torch.float64), rtol=0, atol=1e-15)
    scores = unit_scores(6, 4, 3, seed=1)
    torch.testing.assert_close(sinkhorn_knopp(scores + 0.7), sinkhorn_knopp(scores), rtol=1e-12, atol=1e-15)
    # a sharper epsilon gives sharper codes
    assert sinkhorn_knopp(scores, epsilon=0.01).max() > sinkhorn_knopp(scores, epsilon=0.5).max()


def test_sinkhorn_codes_carry_no_gradient_and_bad_input():
    scores = unit_scores(4, 3, 5, seed=0).requires_grad_()
    assert not sinkhorn_knopp(scores).requires_grad
    with pytest.raises(ValueError, match=r"expected scores \[B, K\]"):
        sinkhorn_knopp(torch.randn(4))
    for bad in ({"epsilon": 0.0}, {"iterations": 0}):
        with pytest.raises(ValueError, match="epsilon must be > 0 and iterations >= 1"):
            sinkhorn_knopp(torch.randn(4, 3), **bad)


def swav_loss_by_the_paper(scores_per_view, codes_per_view, temperature):
    """SwAV eq. 1-2 in Python floats: mean over code views s and prediction views t != s of the batch mean
    of -sum_k q_sk log(exp(z.c_k / T) / sum_k' exp(z.c_k' / T))."""
    total, pairs = 0.0, 0
    for s, codes in enumerate(codes_per_view):
        for t, scores in enumerate(scores_per_view):
            if t == s:
                continue
            for q, p in zip(codes.tolist(), scores.tolist()):
                log_normaliser = math.log(sum(math.exp(x / temperature) for x in p))
                total += -sum(qk * (pk / temperature - log_normaliser) for qk, pk in zip(q, p)) / len(codes)
            pairs += 1
    return total / pairs


@pytest.mark.parametrize("n_codes, n_views", [(1, 2), (2, 2), (2, 3), (2, 6)])
@pytest.mark.parametrize("temperature", [0.1, 1.0])
def test_swav_loss_matches_the_paper(n_codes, n_views, temperature):
    torch.manual_seed(n_codes * 10 + n_views)
    scores = [torch.randn(5, 7, dtype=torch.float64) for _ in range(n_views)]
    codes = [torch.softmax(torch.randn(5, 7, dtype=torch.float64), dim=1) for _ in range(n_codes)]
    expected = swav_loss_by_the_paper(scores, codes, temperature)
    assert abs(swav_loss(scores, codes, temperature).item() - expected) < 1e-10 * max(1.0, expected)


def test_swav_loss_closed_form_for_uninformative_scores_and_bad_input():
    codes = [torch.softmax(torch.randn(3, 8, dtype=torch.float64), dim=1) for _ in range(2)]
    scores = [torch.full((3, 8), 0.4, dtype=torch.float64)] * 4  # softmax 1/K whatever the codes
    assert abs(swav_loss(scores, codes).item() - math.log(8)) < 1e-12
    with pytest.raises(ValueError, match="target views"):
        swav_loss(scores[:1], codes[:1])
    with pytest.raises(ValueError, match="one shape"):
        swav_loss([torch.randn(3, 8), torch.randn(3, 7)], codes[:1])
    with pytest.raises(ValueError, match="temperature"):
        swav_loss(scores, codes, temperature=0.0)


# --------------------------------------------------------------------------------------------- multi-crop

def test_multi_crop_view_configs_and_checks():
    base = AugmentConfig(blur_p=0.3)
    configs = MultiCrop(n_local=3).view_configs(base)
    assert [(c.output_size, c.crop_scale) for c in configs] == [(28, (0.4, 1.0))] * 2 + [(12, (0.05, 0.4))] * 3
    assert all(c.blur_p == 0.3 for c in configs)  # the rest of the base config is kept
    assert MultiCrop(n_local=0, global_crop_scale=[0.3, 0.9]).view_configs(base)[0].crop_scale == (0.3, 0.9)
    with pytest.raises(ValueError, match="n_local"):
        MultiCrop(n_local=-1)
    with pytest.raises(ValueError, match="crop_scale"):
        MultiCrop(local_crop_scale=(0.5, 0.1))
    crops = MultiCrop(n_local=2)
    big, small = torch.zeros(3, 1, 28, 28), torch.zeros(3, 1, 12, 12)
    crops.check([big, big, small, small])
    with pytest.raises(ValueError, match="expected 4 views"):
        crops.check([big, big, small])
    with pytest.raises(ValueError, match="share a shape"):
        crops.check([big, small, small, small])
    with pytest.raises(ValueError, match="one batch size"):
        crops.check([big, big, small, torch.zeros(2, 1, 12, 12)])


def test_encode_multi_crop_batches_each_size_once():
    sizes = []

    def encoder(images):
        sizes.append(tuple(images.shape))
        return images.mean(dim=(1, 2, 3))[:, None]

    views = [torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8), torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4)]
    features = encode_multi_crop(encoder, views)
    assert sizes == [(4, 1, 8, 8), (4, 1, 4, 4)]
    torch.testing.assert_close(features[:, 0], torch.cat([v.mean(dim=(1, 2, 3)) for v in views]))


def test_vit_backbone_takes_local_crops_of_its_own_size_only():
    vit = VisionTransformer(image_size=16, dim=16, depth=1, heads=2)
    swav = make_method("swav", vit, 16)
    assert [c.output_size for c in swav.view_configs(AugmentConfig(output_size=16))] == [16] * 6
    with pytest.raises(ValueError, match="position-embedding interpolation.*local_crop_size=16"):
        make_method("swav", vit, 16, local_crop_size=12)
    assert len(make_method("swav", vit, 16, local_crop_size=12, n_local=0).view_configs(AugmentConfig())) == 2


# -------------------------------------------------------------------------------------------------- SwAV

def tiny_backbone():
    """An MLP over any image size (adaptive pooling to 4x4), so local crops work, without BatchNorm."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))


def tiny_swav(**options) -> SwAV:
    return make_method("swav", tiny_backbone(), 16, **({"hidden_dim": 32, "out_dim": 8, "n_prototypes": 10} | options))


def multi_crop_views(batch=8, n_local=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return ([torch.rand(batch, 1, 16, 16, generator=generator) for _ in range(2)]
            + [torch.rand(batch, 1, 8, 8, generator=generator) for _ in range(n_local)])


def test_defaults_and_options():
    torch.manual_seed(0)
    swav = make_method("swav", tiny_backbone(), 16)
    assert (swav.temperature, swav.epsilon, swav.sinkhorn_iterations, swav.freeze_prototypes_steps) == (0.1, 0.05, 3, 0)
    assert tuple(swav.prototypes.weight.shape) == (100, 128) and swav.head[0].out_features == 512
    assert swav.multi_crop == MultiCrop(4, 12, (0.4, 1.0), (0.05, 0.4))
    for bad, message in (({"temperature": 0}, "temperature"), ({"epsilon": -1}, "epsilon"),
                         ({"n_prototypes": 0}, "n_prototypes"), ({"freeze_prototypes_steps": -1}, "freeze")):
        with pytest.raises(ValueError, match=message):
            tiny_swav(**bad)


def test_prototypes_stay_unit_vectors():
    torch.manual_seed(0)
    swav = tiny_swav()
    ones = torch.ones(10)
    torch.testing.assert_close(swav.prototypes.weight.norm(dim=1), ones)
    optimizer = torch.optim.SGD(swav.trainable_parameters(), lr=1.0)
    swav(multi_crop_views()).backward()
    optimizer.step()
    assert (swav.prototypes.weight.norm(dim=1) - 1).abs().max() > 1e-3  # the step moved them off the sphere
    swav(multi_crop_views())
    torch.testing.assert_close(swav.prototypes.weight.norm(dim=1), ones)


def test_forward_is_swapped_prediction_with_codes_of_the_global_views():
    torch.manual_seed(0)
    swav = tiny_swav().double()
    views = [v.double() for v in multi_crop_views()]
    loss = swav(views)
    with torch.no_grad():  # the head's BatchNorm normalises over all views together, so one head call
        features = torch.cat([swav.backbone(torch.cat(views[:2])), swav.backbone(torch.cat(views[2:]))])
        scores = (F.normalize(swav.head(features), dim=1) @ swav.prototypes.weight.T).chunk(6)
    codes = [sinkhorn_by_scaling_vectors(s.numpy(), 0.05, 3) for s in scores[:2]]
    expected = swav_loss_by_the_paper(scores, [torch.from_numpy(c) for c in codes], 0.1)
    assert abs(loss.item() - expected) < 1e-9 * expected


def test_codes_are_targets_without_gradient():
    # the gradient of the loss must equal that of the same loss with the codes as constants
    torch.manual_seed(0)
    swav = tiny_swav().double()
    views = [v.double() for v in multi_crop_views()]
    swav(views).backward()
    grads = [p.grad.clone() for p in swav.parameters()]
    swav.zero_grad()
    scores = (F.normalize(swav.head(encode_multi_crop(swav.backbone, views)), dim=1) @ swav.prototypes.weight.T)
    scores = scores.chunk(6)
    constant_codes = [torch.from_numpy(sinkhorn_by_scaling_vectors(s.detach().numpy(), 0.05, 3)) for s in scores[:2]]
    swav_loss(list(scores), constant_codes).backward()
    for grad, p in zip(grads, swav.parameters()):
        torch.testing.assert_close(grad, p.grad, rtol=1e-9, atol=1e-12)
    assert all(g.abs().sum() > 0 for g in grads)


def test_freezing_the_prototypes_drops_their_gradient_for_the_first_steps():
    torch.manual_seed(0)
    swav = tiny_swav(freeze_prototypes_steps=2)
    for step in range(3):
        swav.zero_grad(set_to_none=True)
        swav(multi_crop_views(seed=step)).backward()
        assert (swav.prototypes.weight.grad is None) == (step < 2)
        assert swav.head[0].weight.grad.abs().sum() > 0
        swav.on_step_end(step, 10)
    state = swav.state_dict()
    restored = tiny_swav(freeze_prototypes_steps=2)
    restored.load_state_dict(state)
    assert restored.steps_done == 3


def test_resnet_tiny_takes_the_local_crops_and_training_runs():
    torch.manual_seed(0)
    backbone, dim = make_backbone("resnet-tiny")
    swav = make_method("swav", backbone, dim, hidden_dim=32, out_dim=16, n_prototypes=8, n_local=2)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(8, 1, 28, 28, generator=generator)
    optimizer = torch.optim.SGD(swav.trainable_parameters(), lr=0.1)
    before = [p.clone() for p in swav.parameters()]
    for step in range(3):
        views = [augment(images, c, generator) for c in swav.view_configs(AugmentConfig())]
        assert [v.shape[-1] for v in views] == [28, 28, 12, 12]
        loss = swav(views)
        assert math.isfinite(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        swav.on_step_end(step, 3)
    assert all(not torch.equal(b, p) for b, p in zip(before, swav.parameters()))


def test_training_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    swav = tiny_swav(n_local=0)
    images = torch.rand(32, 1, 16, 16)
    views = [images + 0.05 * torch.randn_like(images), images + 0.05 * torch.randn_like(images)]
    optimizer = torch.optim.SGD(swav.trainable_parameters(), lr=0.1, momentum=0.9)
    losses = []
    for step in range(30):
        loss = swav(views)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
