"""quantlab.nn.StableEmbedding."""
import math

import torch

import quantlab.optim as qo
from quantlab.nn import StableEmbedding


def test_xavier_uniform_initialisation():
    torch.manual_seed(0)
    emb = StableEmbedding(5000, 64)
    bound = math.sqrt(6 / (5000 + 64))
    w = emb.weight.detach()
    assert w.abs().max() <= bound
    assert w.abs().max() > 0.95 * bound  # fills the range, as a uniform sample of 320k values does
    assert abs(w.std().item() - bound / math.sqrt(3)) < 0.01 * bound


def test_output_is_layer_normalised_and_padding_is_zero():
    emb = StableEmbedding(100, 32, padding_idx=0)
    assert torch.count_nonzero(emb.weight[0]) == 0
    out = emb(torch.tensor([[1, 2, 3], [4, 5, 6]]))
    assert out.shape == (2, 3, 32)
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(-1, unbiased=False), torch.ones(2, 3), atol=1e-3, rtol=0)


def test_weight_keeps_32bit_state_in_quantlab_optimizers():
    emb = StableEmbedding(1000, 64)  # 64000 weights: large enough for 8-bit state otherwise
    linear = torch.nn.Linear(64, 128)  # 8192 weights: 8-bit state
    opt = qo.Adam(list(emb.parameters()) + list(linear.parameters()))
    linear(emb(torch.tensor([1, 2, 3]))).sum().backward()
    opt.step()
    assert opt.state[emb.weight]["exp_avg"].dtype == torch.float32
    assert isinstance(opt.state[linear.weight]["exp_avg"], qo.QuantizedState)
