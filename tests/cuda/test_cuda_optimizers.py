"""quantlab.optim on CUDA parameters (a real GPU only: torch CUDA tensors do not exist under Numba's
simulator). Run by experiments/bench/gpu_check.sh with QUANTLAB_GPU_TESTS=1.

Every step on the GPU must be bit-identical to the same step on the CPU (the kernels share their
maths and avoid FMA contraction), and checkpoints must move between the devices exactly.
"""
from __future__ import annotations

import io

import numba
import pytest
import torch

import quantlab.optim as qo

pytestmark = pytest.mark.skipif(numba.config.ENABLE_CUDASIM or not torch.cuda.is_available(),
                                reason="needs torch with a CUDA device")

OPTIMIZERS = {
    "AdamW": lambda ps, **kw: qo.AdamW(ps, lr=1e-2, weight_decay=0.1, **kw),
    "SGD": lambda ps, **kw: qo.SGD(ps, lr=0.1, momentum=0.9, **kw),
    "Lion": lambda ps, **kw: qo.Lion(ps, lr=1e-3, **kw),
    "RMSprop": lambda ps, **kw: qo.RMSprop(ps, lr=1e-3, **kw),
    "Adagrad": lambda ps, **kw: qo.Adagrad(ps, lr=0.1, **kw),
    "LARS": lambda ps, **kw: qo.LARS(ps, lr=1.0, **kw),
    "LAMB": lambda ps, **kw: qo.LAMB(ps, lr=1e-2, **kw),
}


def model(seed, device, dtype):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 4))
    return net.to(device=device, dtype=dtype)


def train(net, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    device, dtype = next(net.parameters()).device, next(net.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(32, 64, generator=gen)
        opt.zero_grad()
        # the loss is computed on the CPU in float32 so that both devices get the same gradients
        for p, g in zip(net.parameters(), gradients(net, x)):
            p.grad = g.to(device=device, dtype=dtype)
        opt.step()


def gradients(net, x):
    cpu_net = model(0, "cpu", torch.float32)
    cpu_net.load_state_dict({k: v.float().cpu() for k, v in net.state_dict().items()})
    cpu_net(x).pow(2).mean().backward()
    return [p.grad for p in cpu_net.parameters()]


def assert_same(net_a, opt_a, net_b, opt_b):
    for a, b in zip(net_a.parameters(), net_b.parameters()):
        assert torch.equal(a.detach().cpu(), b.detach().cpu())
        sa, sb = opt_a.state[a], opt_b.state[b]
        assert sa.keys() == sb.keys()
        for key, value in sa.items():
            other = sb[key]
            if isinstance(value, qo.QuantizedState):
                assert (value.code, value.block_size) == (other.code, other.block_size), key
                pairs = [(value.indices, other.indices), (value.absmax, other.absmax)]
            else:
                pairs = [(value, other)] if torch.is_tensor(value) else []
            for x, y in pairs:
                assert x.dtype == y.dtype and torch.equal(x.cpu(), y.cpu()), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("state_bits", [8, 32])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_gpu_steps_equal_cpu_steps(name, state_bits, dtype):
    nets = [model(0, device, dtype) for device in ("cpu", "cuda")]
    opts = [OPTIMIZERS[name](net.parameters(), state_bits=state_bits, min_8bit_size=1024) for net in nets]
    for net, opt in zip(nets, opts):
        train(net, opt, 5, seed=1)
    assert_same(nets[0], opts[0], nets[1], opts[1])
    assert all((v.indices if isinstance(v, qo.QuantizedState) else v).is_cuda
               for p in nets[1].parameters() for v in opts[1].state[p].values() if not isinstance(v, int))


@pytest.mark.parametrize("source, target", [("cpu", "cuda"), ("cuda", "cpu")])
def test_checkpoint_moves_between_devices_exactly(source, target):
    straight = model(0, source, torch.float32)
    opt = qo.AdamW(straight.parameters(), lr=1e-2, min_8bit_size=1024)
    train(straight, opt, 3, seed=1)
    buffer = io.BytesIO()
    torch.save({"model": straight.state_dict(), "opt": opt.state_dict()}, buffer)
    train(straight, opt, 3, seed=2)

    resumed = model(1, target, torch.float32)
    opt2 = qo.AdamW(resumed.parameters(), lr=1e-2, min_8bit_size=1024)
    buffer.seek(0)
    saved = torch.load(buffer, map_location="cpu")
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    train(resumed, opt2, 3, seed=2)
    assert_same(straight, opt, resumed, opt2)
