"""The one learning-rate schedule: linear warm-up without a zero step, then half a cosine to zero."""
import math

import pytest
import torch

from experiments.lr_schedule import set_learning_rate, warmup_cosine


def test_warms_up_linearly_then_decays_to_zero():
    factors = [warmup_cosine(step, 10, 40) for step in range(41)]
    assert factors[:10] == pytest.approx([(step + 1) / 10 for step in range(10)])  # no step at 0
    assert factors[10] == 1.0 and factors[25] == pytest.approx(0.5) and factors[40] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))


def test_without_warm_up_it_is_the_closed_form_of_torch_cosine_annealing():
    steps = 17
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    for step in range(steps):
        assert warmup_cosine(step, 0, steps) * 0.3 == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9)
        optimizer.step()
        schedule.step()
    assert warmup_cosine(steps, 0, steps) == pytest.approx(0.5 * (1 + math.cos(math.pi)))


def test_bad_arguments():
    for warmup, total in ((-1, 10), (11, 10), (0, 0)):
        with pytest.raises(ValueError, match="warmup_steps"):
            warmup_cosine(0, warmup, total)


def test_set_learning_rate_scales_each_group():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"params": [a]}, {"params": [b], "lr_scale": 0.25}])
    assert set_learning_rate(optimizer, 0.2, 0.5) == pytest.approx(0.1)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.1, 0.025])
