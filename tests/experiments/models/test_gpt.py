"""The GPT: shapes, the causal mask, attention against a loop transcription of its definition, the
StableEmbedding option, tied weights, and a tiny overfit."""
import math

import pytest
import torch

import quantlab.optim
from experiments.models.gpt import GPT
from experiments.models.vit import Attention
from quantlab.nn import StableEmbedding


def small(**changes):
    torch.manual_seed(0)
    return GPT(**{"vocab_size": 256, "context": 16, "width": 32, "depth": 2, "heads": 4, **changes})


def test_logits_have_one_row_per_position_over_the_vocabulary():
    tokens = torch.randint(0, 256, (3, 10))
    assert small()(tokens).shape == (3, 10, 256)


def test_a_position_sees_no_later_token():
    model = small()
    tokens = torch.randint(0, 256, (2, 16))
    changed = tokens.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 256
    before, after = model(tokens), model(changed)
    assert torch.equal(before[:, :9], after[:, :9])
    assert not torch.allclose(before[:, 9:], after[:, 9:])


def test_attention_matches_a_loop_over_positions_and_heads():
    torch.manual_seed(1)
    attention = Attention(dim=12, heads=3, causal=True)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    attention = attention.double().requires_grad_(False)
    q, k, v = attention.qkv(x).split(12, dim=-1)
    heads, size = 3, 4
    out = torch.zeros_like(x)
    for b in range(2):
        for t in range(5):
            for h in range(heads):
                part = slice(h * size, (h + 1) * size)
                scores = [float(q[b, t, part] @ k[b, s, part]) / math.sqrt(size) for s in range(t + 1)]
                weights = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0)
                out[b, t, part] = sum(w * v[b, s, part] for s, w in enumerate(weights))
    assert torch.allclose(attention(x), attention.proj(out), atol=1e-12)


def test_stable_embedding_keeps_a_32bit_state_under_an_8bit_optimizer():
    model = small(embedding="stable")
    assert isinstance(model.token_embedding, StableEmbedding)
    optimizer = quantlab.optim.Adam(model.parameters(), state_bits=8, min_8bit_size=0)
    model.loss(torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (2, 8))).backward()
    optimizer.step()
    embedding_state = optimizer.state[model.token_embedding.weight]["exp_avg_sq"]
    head_state = optimizer.state[model.head.weight]["exp_avg_sq"]
    assert isinstance(embedding_state, torch.Tensor) and embedding_state.dtype == torch.float32
    assert isinstance(head_state, quantlab.optim.QuantizedState)


def test_tied_head_shares_the_embedding_weight():
    model = small(tied=True)
    assert model.head.weight is model.token_embedding.weight
    assert len(list(model.parameters())) == len(list(small().parameters())) - 1


def test_bad_shapes_and_options_are_refused():
    with pytest.raises(ValueError, match="longer than the model's context"):
        small()(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="embedding must be one of"):
        small(embedding="sparse")
    with pytest.raises(ValueError, match="not divisible by heads"):
        small(heads=5)


def test_it_overfits_a_repeated_phrase():
    model = small(depth=1)
    phrase = torch.tensor(list(b"to be or not to be, "), dtype=torch.long)
    tokens = phrase.repeat(4)[:17].unsqueeze(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    initial = model.loss(tokens[:, :-1], tokens[:, 1:]).item()
    for _ in range(100):
        loss = model.loss(tokens[:, :-1], tokens[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert initial > math.log(256) - 0.5 and loss.item() < 0.05
