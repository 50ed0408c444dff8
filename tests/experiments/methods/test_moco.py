"""MoCo v2: InfoNCE against a loop over the paper's equation, the momentum update, the queue, learning."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from experiments.methods import make_method
from experiments.methods.moco import MoCo, info_nce_loss


def info_nce_by_the_paper(query, key, queue, temperature):
    """MoCo eq. 1, one query at a time, in Python floats."""
    def dot(a, b):
        return sum(x * y for x, y in zip(a.tolist(), b.tolist()))
    total = 0.0
    for q, k in zip(query, key):
        positive = math.exp(dot(q, k) / temperature)
        negatives = sum(math.exp(dot(q, n) / temperature) for n in queue)
        total += -math.log(positive / (positive + negatives))
    return total / len(query)


def unit_rows(*shape):
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


@pytest.mark.parametrize("n, dim, queue_size", [(1, 3, 1), (4, 8, 16), (7, 5, 3)])
@pytest.mark.parametrize("temperature", [0.07, 0.2, 1.0])
def test_info_nce_matches_the_paper(n, dim, queue_size, temperature):
    torch.manual_seed(n * 100 + queue_size)
    query, key, queue = unit_rows(n, dim), unit_rows(n, dim), unit_rows(queue_size, dim)
    expected = info_nce_by_the_paper(query, key, queue, temperature)
    assert abs(info_nce_loss(query, key, queue, temperature).item() - expected) < 1e-10 * max(1.0, expected)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_info_nce_closed_form_for_a_queue_orthogonal_to_the_queries(temperature):
    n, queue_size = 3, 5
    basis = torch.eye(n + queue_size, dtype=torch.float64)
    query = key = basis[:n]  # q . k = 1, q . negative = 0
    loss = info_nce_loss(query, key, basis[n:], temperature)
    expected = -math.log(math.exp(1 / temperature) / (math.exp(1 / temperature) + queue_size))
    assert abs(loss.item() - expected) < 1e-12


def test_info_nce_rejects_bad_input():
    q = unit_rows(4, 8)
    with pytest.raises(ValueError, match="expected query and key"):
        info_nce_loss(q, unit_rows(3, 8), unit_rows(5, 8), 0.2)
    with pytest.raises(ValueError, match="expected query and key"):
        info_nce_loss(q, q, unit_rows(5, 7), 0.2)
    with pytest.raises(ValueError, match="temperature"):
        info_nce_loss(q, q, unit_rows(5, 8), 0.0)


def tiny_moco(**options) -> MoCo:
    """MoCo on an MLP backbone over 1x8x8 images: no BatchNorm, so every output is exact."""
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    return make_method("moco", backbone, 16, **({"hidden_dim": 32, "out_dim": 16, "queue_size": 64} | options))


def noisy_views(images):
    return [images + 0.05 * torch.randn_like(images), images + 0.05 * torch.randn_like(images)]


def query_parameters(moco):
    return list(moco.backbone.parameters()) + list(moco.head.parameters())


def test_defaults_and_options():
    torch.manual_seed(0)
    moco = make_method("moco", nn.Flatten(), 64)
    assert (moco.momentum, moco.temperature, tuple(moco.queue.shape)) == (0.99, 0.2, (4096, 128))
    assert moco.head[0].out_features == 512
    moco = tiny_moco(momentum=0.9, queue_size=10, temperature=0.5)
    assert (moco.momentum, moco.temperature, tuple(moco.queue.shape)) == (0.9, 0.5, (10, 16))
    for bad in ({"momentum": 1.0}, {"queue_size": 0}, {"temperature": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            tiny_moco(**bad)
    with pytest.raises(ValueError, match="unknown option"):
        tiny_moco(momentum_schedule="cosine")


def test_key_encoder_starts_as_an_independent_copy_and_is_not_trained():
    torch.manual_seed(0)
    moco = tiny_moco()
    keys = list(moco.key_encoder.parameters())
    assert all(torch.equal(q, k) and q.data_ptr() != k.data_ptr() for q, k in zip(query_parameters(moco), keys))
    assert not any(k.requires_grad for k in keys)
    assert {id(p) for p in moco.trainable_parameters()} == {id(p) for p in query_parameters(moco)}


def test_gradients_reach_only_the_query_encoder():
    torch.manual_seed(0)
    moco = tiny_moco()
    moco(noisy_views(torch.randn(8, 1, 8, 8))).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in query_parameters(moco))
    assert all(k.grad is None for k in moco.key_encoder.parameters())


def test_momentum_update_is_the_ema_of_the_query_encoder():
    torch.manual_seed(0)
    moco = tiny_moco(momentum=0.9).double()
    with torch.no_grad():  # make the encoders differ, as after some training steps
        for q in query_parameters(moco):
            q.add_(torch.randn_like(q))
    old_keys = [k.clone() for k in moco.key_encoder.parameters()]
    moco(noisy_views(torch.randn(4, 1, 8, 8, dtype=torch.float64)))
    for q, old, new in zip(query_parameters(moco), old_keys, moco.key_encoder.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * q, rtol=0, atol=1e-15)


def test_queue_starts_with_random_unit_keys_drawn_from_the_global_generator():
    torch.manual_seed(3)
    first = tiny_moco().queue
    torch.manual_seed(3)
    again = tiny_moco().queue
    torch.manual_seed(4)
    other = tiny_moco().queue
    torch.testing.assert_close(first.norm(dim=1), torch.ones(64))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.std(dim=0).min() > 0.1  # not one repeated key


def test_enqueue_replaces_the_oldest_keys_and_wraps_around():
    torch.manual_seed(0)
    moco = tiny_moco(queue_size=10)
    initial = moco.queue.clone()
    a, b, c = (torch.randn(4, 16) for _ in range(3))
    moco.enqueue(a)
    assert int(moco.queue_ptr) == 4 and torch.equal(moco.queue, torch.cat([a, initial[4:]]))
    moco.enqueue(b)
    moco.enqueue(c)  # slots 8, 9, then 0, 1
    assert int(moco.queue_ptr) == 2
    assert torch.equal(moco.queue, torch.cat([c[2:], a[2:], b, c[:2]]))
    moco.enqueue(torch.ones(10, 16))  # a batch the size of the queue
    assert int(moco.queue_ptr) == 2 and torch.all(moco.queue == 1)
    with pytest.raises(ValueError, match="larger than the queue"):
        moco.enqueue(torch.ones(11, 16))


def test_forward_enqueues_the_normalised_keys_of_the_second_view():
    torch.manual_seed(0)
    moco = tiny_moco()
    views = noisy_views(torch.randn(8, 1, 8, 8))
    moco(views)
    with torch.no_grad():
        keys = F.normalize(moco.key_encoder(views[1]), dim=1)  # the key encoder after this step's update
    assert int(moco.queue_ptr) == 8
    torch.testing.assert_close(moco.queue[:8], keys)


def test_eval_mode_changes_no_state():
    torch.manual_seed(0)
    moco = tiny_moco()
    moco(noisy_views(torch.randn(8, 1, 8, 8)))
    for q in query_parameters(moco):
        q.data.add_(1.0)
    state = {name: value.clone() for name, value in moco.state_dict().items()}
    moco.eval()(noisy_views(torch.randn(8, 1, 8, 8)))
    assert all(torch.equal(value, moco.state_dict()[name]) for name, value in state.items())


def test_state_dict_holds_the_queue_and_a_restored_moco_continues_identically():
    torch.manual_seed(0)
    moco = tiny_moco()
    for _ in range(3):
        moco(noisy_views(torch.randn(8, 1, 8, 8)))
    state = moco.state_dict()
    assert {"queue", "queue_ptr"} <= set(state) and int(state["queue_ptr"]) == 24
    torch.manual_seed(1)
    restored = tiny_moco()
    restored.load_state_dict(state)
    views = noisy_views(torch.randn(8, 1, 8, 8))
    assert torch.equal(moco(views), restored(views))
    assert torch.equal(moco.queue, restored.queue) and torch.equal(moco.queue_ptr, restored.queue_ptr)


def test_bad_views():
    moco = tiny_moco()
    with pytest.raises(ValueError, match="expected 2 views"):
        moco([torch.randn(4, 1, 8, 8)] * 3)
    with pytest.raises(ValueError, match="one shape"):
        moco([torch.randn(4, 1, 8, 8), torch.randn(5, 1, 8, 8)])


def test_training_lowers_the_loss_on_a_held_fixed_batch():
    # A fixed training batch would be a poor check: the queue fills with keys of the same images, so
    # each query meets its own earlier keys as negatives. Instead train on fresh batches and measure
    # a fixed probe batch against keys of fixed other images from the current key encoder.
    torch.manual_seed(0)
    moco = tiny_moco(momentum=0.9)
    probe, others = noisy_views(torch.randn(16, 1, 8, 8)), torch.randn(64, 1, 8, 8)

    def probe_loss():
        moco.eval()
        with torch.no_grad():
            moco.enqueue(F.normalize(moco.key_encoder(others), dim=1))
            loss = moco(probe).item()
        moco.train()
        return loss

    before = probe_loss()
    assert before > 3.0  # the random encoder maps all images to about the same direction: log(65) = 4.17
    optimizer = torch.optim.SGD(moco.trainable_parameters(), lr=0.02, momentum=0.9)
    for _ in range(30):
        loss = moco(noisy_views(torch.randn(16, 1, 8, 8)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert probe_loss() < 0.6 * before
