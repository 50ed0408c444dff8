"""DINO: the loss against a double loop over views and its entropy closed form; centring, the teacher's
EMA and the temperature and momentum schedules; multi-crop; a few training steps."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from experiments.data.augment import AugmentConfig, augment
from experiments.methods import make_method
from experiments.methods.dino import DINO, DINOHead, cosine_momentum, dino_loss
from experiments.models import make_backbone
from experiments.models.vit import VisionTransformer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def dino_loss_by_the_paper(student_outputs, teacher_outputs, center, student_temperature, teacher_temperature):
    """DINO eq. 3 in Python floats: for each teacher view i and student view j != i, the batch mean of
    -sum_k P_t,k log P_s,k; then the mean over those pairs."""
    def softmax(values, temperature):
        exps = [math.exp(v / temperature) for v in values]
        return [e / sum(exps) for e in exps]

    center = center.flatten().tolist()
    total, pairs = 0.0, 0
    for i, teacher in enumerate(teacher_outputs):
        for j, student in enumerate(student_outputs):
            if i == j:
                continue
            for t, s in zip(teacher.tolist(), student.tolist()):
                p_t = softmax([a - c for a, c in zip(t, center)], teacher_temperature)
                p_s = softmax(s, student_temperature)
                total += -sum(p * math.log(q) for p, q in zip(p_t, p_s)) / len(teacher)
            pairs += 1
    return total / pairs


@pytest.mark.parametrize("n_teacher, n_student", [(1, 2), (2, 2), (2, 3), (2, 6)])
@pytest.mark.parametrize("student_temperature, teacher_temperature", [(0.1, 0.04), (0.1, 0.07), (1.0, 0.5)])
def test_dino_loss_matches_the_paper(n_teacher, n_student, student_temperature, teacher_temperature):
    torch.manual_seed(10 * n_teacher + n_student)
    student = [torch.randn(4, 6, dtype=torch.float64) for _ in range(n_student)]
    teacher = [torch.randn(4, 6, dtype=torch.float64) for _ in range(n_teacher)]
    center = 0.3 * torch.randn(1, 6, dtype=torch.float64)
    expected = dino_loss_by_the_paper(student, teacher, center, student_temperature, teacher_temperature)
    loss = dino_loss(student, teacher, center, student_temperature, teacher_temperature)
    assert abs(loss.item() - expected) < 1e-10 * max(1.0, expected)


@pytest.mark.parametrize("temperature", [0.04, 0.1, 1.0])
def test_dino_loss_of_a_student_equal_to_the_teacher_is_the_teachers_entropy(temperature):
    logits = torch.tensor([[1.0, 0.0, -2.0], [0.5, 0.5, 0.5]], dtype=torch.float64)
    loss = dino_loss([logits] * 4, [logits] * 2, torch.zeros(3, dtype=torch.float64), temperature, temperature)
    entropies = []
    for row in logits.tolist():
        p = [math.exp(x / temperature) / sum(math.exp(y / temperature) for y in row) for x in row]
        entropies.append(-sum(pk * math.log(pk) for pk in p))
    assert abs(loss.item() - sum(entropies) / 2) < 1e-12
    assert abs(entropies[1] - math.log(3)) < 1e-12  # equal logits: the uniform distribution


def test_dino_loss_gives_the_teacher_no_gradient_and_bad_input():
    teacher = [torch.randn(3, 5, requires_grad=True) for _ in range(2)]
    student = [torch.randn(3, 5, requires_grad=True) for _ in range(3)]
    center = torch.zeros(1, 5, requires_grad=True)
    dino_loss(student, teacher, center).backward()
    assert all(t.grad is None for t in teacher) and center.grad is None
    assert all(s.grad.abs().sum() > 0 for s in student)
    with pytest.raises(ValueError, match="target views"):
        dino_loss(student, student + student, torch.zeros(5))
    with pytest.raises(ValueError, match="one shape"):
        dino_loss(student + [torch.randn(3, 4)], teacher, torch.zeros(5))
    with pytest.raises(ValueError, match="center of 5 values"):
        dino_loss(student, teacher, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="temperatures"):
        dino_loss(student, teacher, torch.zeros(5), teacher_temperature=0.0)


def test_head_outputs_are_cosines_with_unit_directions():
    torch.manual_seed(0)
    head = DINOHead(16, 32, 8, 50).double()
    with torch.no_grad():
        head.last_layer.weight.mul_(7.0)  # the weight's norm does not matter: g is fixed to 1
    x = torch.randn(5, 16, dtype=torch.float64)
    bottleneck = F.normalize(head.mlp(x), dim=1)
    directions = head.last_layer.weight / head.last_layer.weight.norm(dim=1, keepdim=True)
    torch.testing.assert_close(head(x), bottleneck @ directions.T, rtol=0, atol=1e-14)
    assert head(x).abs().max() <= 1 + 1e-12
    assert [type(m) for m in head.mlp] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]


def tiny_backbone():
    """An MLP over any image size (adaptive pooling to 4x4), so local crops work, without BatchNorm."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))


def tiny_dino(**options) -> DINO:
    sizes = {"hidden_dim": 32, "bottleneck_dim": 8, "out_dim": 20}
    return make_method("dino", tiny_backbone(), 16, **(sizes | options))


def multi_crop_views(batch=8, n_local=4, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return ([torch.rand(batch, 1, 16, 16, generator=generator, dtype=dtype) for _ in range(2)]
            + [torch.rand(batch, 1, 8, 8, generator=generator, dtype=dtype) for _ in range(n_local)])


def student_parameters(dino):
    return list(dino.backbone.parameters()) + list(dino.head.parameters())


def test_defaults_and_options():
    torch.manual_seed(0)
    dino = make_method("dino", tiny_backbone(), 16)
    assert (dino.momentum, dino.center_momentum, dino.student_temperature) == (0.996, 0.9, 0.1)
    assert (dino.warmup_teacher_temperature, dino.final_teacher_temperature, dino.teacher_temperature_warmup) == (
        0.04, 0.07, 0.3)
    assert dino.teacher_temperature == 0.04 and tuple(dino.center.shape) == (1, 1024)
    assert (dino.head.mlp[0].out_features, dino.head.mlp[-1].out_features) == (512, 64)
    assert (dino.multi_crop.n_local, dino.multi_crop.local_crop_size) == (4, 12)
    for bad, message in (({"momentum": 1.5}, "momentum"), ({"center_momentum": -0.1}, "center_momentum"),
                         ({"student_temperature": 0}, "temperatures"), ({"teacher_temperature_warmup": 2}, "fraction")):
        with pytest.raises(ValueError, match=message):
            tiny_dino(**bad)


def test_teacher_starts_as_an_independent_copy_and_gets_no_gradient():
    torch.manual_seed(0)
    dino = tiny_dino()
    teacher = list(dino.teacher.parameters())
    assert all(torch.equal(s, t) and s.data_ptr() != t.data_ptr() for s, t in zip(student_parameters(dino), teacher))
    assert {id(p) for p in dino.trainable_parameters()} == {id(p) for p in student_parameters(dino)}
    dino(multi_crop_views()).backward()
    assert all(t.grad is None and not t.requires_grad for t in teacher)
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student_parameters(dino))


def perturbed(dino):
    with torch.no_grad():  # make student and teacher differ, as after some training steps
        for s in student_parameters(dino):
            s.add_(0.1 * torch.randn_like(s))
    return dino


def test_forward_is_the_loss_of_teacher_on_global_and_student_on_all_views():
    torch.manual_seed(0)
    dino = perturbed(tiny_dino().double())
    with torch.no_grad():
        dino.center.copy_(0.1 * torch.randn_like(dino.center))
    dino.teacher_temperature = 0.05
    views = multi_crop_views(dtype=torch.float64)
    center = dino.center.clone()
    with torch.no_grad():
        student = [dino.head(dino.backbone(v)) for v in views]
        teacher = [dino.teacher(v) for v in views[:2]]
    expected = dino_loss_by_the_paper(student, teacher, center, 0.1, 0.05)
    assert abs(dino(views).item() - expected) < 1e-10 * expected


def test_center_is_the_ema_of_the_teachers_batch_means_in_training_only():
    torch.manual_seed(0)
    dino = perturbed(tiny_dino(center_momentum=0.8).double())
    views = multi_crop_views(dtype=torch.float64)
    with torch.no_grad():
        dino.center.copy_(torch.randn_like(dino.center))
        old = dino.center.clone()
        teacher_mean = torch.cat([dino.teacher(v) for v in views[:2]]).mean(dim=0)
    dino(views)
    torch.testing.assert_close(dino.center, 0.8 * old + 0.2 * teacher_mean, rtol=0, atol=1e-15)
    state = {name: value.clone() for name, value in dino.state_dict().items() if torch.is_tensor(value)}
    dino.eval()(views)
    assert all(torch.equal(value, dino.state_dict()[name]) for name, value in state.items())


@pytest.mark.parametrize("step, total, momentum", [(0, 10, 0.9), (50, 100, 0.95), (3, 10, None), (9, 10, None)])
def test_teacher_is_the_ema_of_the_student_with_a_cosine_momentum(step, total, momentum):
    # the schedule starts at the base momentum and is halfway to 1 at mid-training
    if momentum is None:
        momentum = 1 - 0.1 * (math.cos(math.pi * step / total) + 1) / 2
    torch.manual_seed(0)
    dino = perturbed(tiny_dino(momentum=0.9).double())
    old = [t.clone() for t in dino.teacher.parameters()]
    dino.on_step_end(step, total)
    for s, before, after in zip(student_parameters(dino), old, dino.teacher.parameters()):
        torch.testing.assert_close(after, momentum * before + (1 - momentum) * s, rtol=0, atol=1e-15)


def test_momentum_reaches_one_at_the_end():
    assert cosine_momentum(0, 100, 0.996) == 0.996
    assert cosine_momentum(100, 100, 0.996) == 1.0
    assert 0.996 < cosine_momentum(99, 100, 0.996) < 1.0


def test_teacher_temperature_warms_up_linearly_then_stays():
    dino = tiny_dino()  # 0.04 -> 0.07 over the first 30% of the steps
    assert dino.teacher_temperature == 0.04
    expected = {0: 0.041, 14: 0.055, 28: 0.069, 29: 0.07, 30: 0.07, 99: 0.07}  # after step s: step s + 1's
    for step, temperature in expected.items():
        dino.on_step_end(step, 100)
        assert abs(dino.teacher_temperature - temperature) < 1e-12, step
    no_warmup = tiny_dino(teacher_temperature_warmup=0.0, teacher_temperature=0.06)
    assert no_warmup.teacher_temperature == 0.06
    with pytest.raises(ValueError, match="0 <= step < total_steps"):
        dino.on_step_end(100, 100)


def test_state_dict_holds_center_and_temperature_and_a_restored_dino_continues_identically():
    torch.manual_seed(0)
    dino = tiny_dino()
    optimizer = torch.optim.SGD(dino.trainable_parameters(), lr=0.1)
    for step in range(3):
        loss = dino(multi_crop_views(seed=step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        dino.on_step_end(step, 10)
    state = dino.state_dict()
    torch.manual_seed(1)
    restored = tiny_dino()
    restored.load_state_dict(state)
    assert restored.teacher_temperature == dino.teacher_temperature != 0.04
    assert torch.equal(restored.center, dino.center) and dino.center.abs().sum() > 0
    views = multi_crop_views(seed=5)
    assert torch.equal(dino(views), restored(views))


def test_multi_crop_views_and_bad_views():
    dino = tiny_dino(n_local=3)
    configs = dino.view_configs(AugmentConfig())
    assert [(c.output_size, c.crop_scale) for c in configs] == [(28, (0.4, 1.0))] * 2 + [(12, (0.05, 0.4))] * 3
    with pytest.raises(ValueError, match="expected 5 views"):
        dino(multi_crop_views(n_local=4))
    with pytest.raises(ValueError, match="share a shape"):
        dino(multi_crop_views(n_local=3)[1:] + [torch.rand(8, 1, 8, 8)])


def test_vit_backbone_takes_local_crops_of_its_own_size_only():
    vit = VisionTransformer(image_size=16, dim=16, depth=1, heads=2)
    with pytest.raises(ValueError, match="no position-embedding interpolation"):
        make_method("dino", vit, 16, local_crop_size=12)
    dino = make_method("dino", vit, 16, hidden_dim=16, bottleneck_dim=8, out_dim=10, n_local=1)
    views = [augment(torch.rand(4, 1, 16, 16), c, torch.Generator().manual_seed(0))
             for c in dino.view_configs(AugmentConfig(output_size=16))]
    assert [v.shape[-1] for v in views] == [16, 16, 16]
    assert math.isfinite(dino(views).item())


def test_resnet_tiny_takes_the_local_crops_and_a_few_steps_train_student_and_teacher():
    torch.manual_seed(0)
    backbone, dim = make_backbone("resnet-tiny")
    dino = make_method("dino", backbone, dim, hidden_dim=32, bottleneck_dim=8, out_dim=32, n_local=2, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(8, 1, 28, 28, generator=generator)
    optimizer = torch.optim.SGD(dino.trainable_parameters(), lr=0.1)
    student_before = [p.clone() for p in student_parameters(dino)]
    teacher_before = [p.clone() for p in dino.teacher.parameters()]
    for step in range(3):
        views = [augment(images, c, generator) for c in dino.view_configs(AugmentConfig())]
        assert [v.shape[-1] for v in views] == [28, 28, 12, 12]
        loss = dino(views)
        assert math.isfinite(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        dino.on_step_end(step, 3)
    assert all(not torch.equal(b, p) for b, p in zip(student_before, student_parameters(dino)))
    assert all(not torch.equal(b, p) for b, p in zip(teacher_before, dino.teacher.parameters()))
    assert dino.teacher_temperature == 0.07  # past the warm-up
