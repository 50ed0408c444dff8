"""Parameter groups: every parameter once, weight decay on matrices only, layer-wise learning-rate
decay on a ViT and its head, checked through one AdamW step."""
import pytest
import torch
import torch.nn as nn

from experiments.eval.finetune import vit_and_head_layers
from experiments.lr_schedule import set_learning_rate
from experiments.models.vit import VisionTransformer
from experiments.param_groups import parameter_groups

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_vit(**kwargs):
    torch.manual_seed(0)
    return VisionTransformer(depth=2, dim=32, heads=2, **kwargs)


def expected_layer(name, depth):
    # a transcription of the rule: embeddings 0, blocks.i i + 1, the rest (norm, head) depth + 1
    if name.split(".")[0] in ("patch_embed", "cls_token", "pos_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def vit_with_head_groups(lr_decay, weight_decay):
    model = nn.Sequential(tiny_vit(), nn.Linear(32, 5))
    return model, parameter_groups(model.named_parameters(), weight_decay, vit_and_head_layers(model), lr_decay)


def test_layer_decay_groups_hold_every_parameter_once_with_its_scale():
    decay = 0.55
    model, groups = vit_with_head_groups(decay, weight_decay=0.05)
    names = {id(p): name for name, p in model.named_parameters()}
    seen = [id(p) for group in groups for p in group["params"]]
    assert sorted(seen) == sorted(names) and len(seen) == len(set(seen))
    layers = set()
    for group in groups:
        for p in group["params"]:
            part, name = names[id(p)].split(".", 1)
            layer = expected_layer(name, 2) if part == "0" else 3  # the head: one past the final norm
            layers.add(layer)
            assert group["lr_scale"] == pytest.approx(decay ** (3 - layer)) and group["layer"] == layer
            no_decay = p.ndim == 1 or name in ("cls_token", "pos_embed")
            assert group["weight_decay"] == (0.0 if no_decay else 0.05)
    assert layers == {0, 1, 2, 3}


def test_one_adamw_step_moves_each_layer_by_its_learning_rate():
    model, groups = vit_with_head_groups(0.5, weight_decay=0.0)
    optimizer = torch.optim.AdamW(groups)
    set_learning_rate(optimizer, 1e-2, 1.0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()  # Adam's first step is lr * g / (|g| + eps): lr for a gradient of 1
    for name, p in model.named_parameters():
        part, inner = name.split(".", 1)
        layer = expected_layer(inner, 2) if part == "0" else 3
        step = before[name] - p.detach()
        assert torch.allclose(step, torch.full_like(step, 1e-2 * 0.5 ** (3 - layer)), rtol=1e-4)


def test_parameter_groups_reject_bad_decay():
    for decay in (0.0, 1.5):
        with pytest.raises(ValueError, match="layer_decay"):
            vit_with_head_groups(decay, weight_decay=0.05)
    with pytest.raises(ValueError, match="weight_decay"):
        vit_with_head_groups(0.5, weight_decay=-1.0)
