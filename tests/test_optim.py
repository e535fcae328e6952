"""Weight-decay parameter groups and the Adam flavour built by ironcore.training.optimizer."""

import pytest
import torch
from torch import nn

from ironcore.config.schema import OptimConfig
from ironcore.training.optimizer import build_optimizer, param_groups


class RMSNorm(nn.Module):  # a norm that is not an nn.LayerNorm, matched by its class name
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))


class Toy(nn.Module):
    def __init__(self, tie: bool):
        super().__init__()
        self.wte = nn.Embedding(50, 8)
        self.wpe = nn.Embedding(16, 8)
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.norm = RMSNorm(8)
        self.head = nn.Linear(8, 50, bias=False)
        if tie:
            self.head.weight = self.wte.weight


def _names(groups):
    return {g["weight_decay"]: set(g["names"]) for g in groups}


def test_no_decay_on_embeddings_norms_and_biases():
    groups = _names(param_groups(Toy(tie=False), 0.1, no_decay_on_embedding=True))
    assert groups == {0.1: {"fc.weight", "head.weight"},
                      0.0: {"wte.weight", "wpe.weight", "ln.weight", "ln.bias", "fc.bias", "norm.weight"}}


def test_embeddings_decay_when_not_excluded():
    groups = _names(param_groups(Toy(tie=False), 0.1, no_decay_on_embedding=False))
    assert groups[0.1] == {"wte.weight", "wpe.weight", "fc.weight", "head.weight"}
    assert groups[0.0] == {"ln.weight", "ln.bias", "fc.bias", "norm.weight"}


def test_tied_head_is_counted_once_as_the_embedding():
    model = Toy(tie=True)
    groups = param_groups(model, 0.1, no_decay_on_embedding=True)
    assert _names(groups)[0.1] == {"fc.weight"}
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_frozen_parameters_are_left_out():
    model = Toy(tie=False)
    model.fc.weight.requires_grad_(False)
    names = {n for g in param_groups(model, 0.1, True) for n in g["names"]}
    assert "fc.weight" not in names and "fc.bias" in names


def test_adamw_builds_adam_with_decoupled_weight_decay():
    model = Toy(tie=False)
    cfg = OptimConfig(optimizer="adamw", max_lr=0.1, weight_decay=0.5, adam_beta1=0.8, adam_beta2=0.9,
                      adam_eps=1e-6)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]
    assert opt.param_groups[0]["betas"] == (0.8, 0.9) and opt.param_groups[0]["eps"] == 1e-6
    before, bias = model.fc.weight.detach().clone(), model.fc.bias.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    # Zero gradient: Adam's update is 0, so only the decoupled decay w *= 1 - lr * wd acts
    # (L2-coupled Adam would instead move every weight by ~lr).
    torch.testing.assert_close(model.fc.weight.detach(), before * (1 - 0.1 * 0.5), rtol=0, atol=1e-7)
    torch.testing.assert_close(model.fc.bias.detach(), bias, rtol=0, atol=0)  # no decay group


def _steps(name: str, weight_decay: float, steps: int = 3) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = Toy(tie=False)
    opt = build_optimizer(model, OptimConfig(optimizer=name, max_lr=0.1, weight_decay=weight_decay),
                          torch.device("cpu"))
    x = torch.randn(8, 8)
    for _ in range(steps):
        opt.zero_grad()
        model.fc(x).square().mean().backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_adam_is_coupled_l2_and_agrees_with_adamw_without_decay():
    model = Toy(tie=False)
    opt = build_optimizer(model, OptimConfig(optimizer="adam", max_lr=0.1, weight_decay=0.5),
                          torch.device("cpu"))
    assert type(opt) is torch.optim.Adam
    before = model.fc.weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    # Zero gradient: coupled L2 makes the gradient wd * w, and Adam's first step moves each
    # weight by lr * sign(grad) (not the decoupled lr * wd * w).
    torch.testing.assert_close(model.fc.weight.detach(), before - 0.1 * before.sign(), rtol=0, atol=1e-5)
    with_decay = zip(_steps("adam", 0.5), _steps("adamw", 0.5))
    assert max((a - b).abs().max().item() for a, b in with_decay) > 1e-3
    for a, b in zip(_steps("adam", 0.0), _steps("adamw", 0.0)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_unknown_optimizer_is_a_clear_error():
    with pytest.raises(ValueError, match="optim.optimizer"):
        build_optimizer(Toy(tie=False), OptimConfig(optimizer="sgd"), torch.device("cpu"))
