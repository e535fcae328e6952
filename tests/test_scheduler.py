"""Each LR schedule's value at warmup end, mid-decay and end against its closed form."""

import math

import pytest
import torch

from ironcore.config import ConfigError
from ironcore.config.schema import OptimConfig
from ironcore.training.scheduler import build_scheduler, lr_schedule

MAX, MIN, W, T = 1e-3, 1e-4, 10, 110


def _cfg(name: str, annealing: int = 0) -> OptimConfig:
    return OptimConfig(lr_scheduler=name, max_lr=MAX, min_lr=MIN, warmup_steps=W, annealing_steps=annealing)


@pytest.mark.parametrize("name", ["cosine", "linear", "constant", "wsd"])
def test_warmup_is_linear_and_ends_at_max_lr(name):
    lr = lr_schedule(_cfg(name), T)
    assert lr(0) == pytest.approx(MAX / W, rel=1e-12)
    assert lr(4) == pytest.approx(MAX * 5 / W, rel=1e-12)
    assert lr(W - 1) == pytest.approx(MAX, rel=1e-12)  # warmup end
    assert lr(W) == pytest.approx(MAX, rel=1e-12)


def test_cosine_closed_form():
    lr = lr_schedule(_cfg("cosine"), T)  # horizon defaults to train_steps
    assert lr(60) == pytest.approx(MIN + (MAX - MIN) * 0.5, rel=1e-12)  # mid
    assert lr(35) == pytest.approx(MIN + (MAX - MIN) * (1 + math.cos(math.pi * 0.25)) / 2, rel=1e-12)
    assert lr(T) == pytest.approx(MIN, rel=1e-12)  # end
    assert lr(T + 50) == pytest.approx(MIN, rel=1e-12)
    short = lr_schedule(_cfg("cosine", annealing=60), T)  # explicit horizon
    assert short(35) == pytest.approx(MIN + (MAX - MIN) * 0.5, rel=1e-12)
    assert short(60) == pytest.approx(MIN, rel=1e-12)


def test_linear_closed_form():
    lr = lr_schedule(_cfg("linear"), T)
    assert lr(60) == pytest.approx(5.5e-4, rel=1e-12)
    assert lr(85) == pytest.approx(MAX - (MAX - MIN) * 0.75, rel=1e-12)
    assert lr(T) == pytest.approx(MIN, rel=1e-12)


def test_constant_closed_form():
    lr = lr_schedule(_cfg("constant"), T)
    assert lr(60) == MAX and lr(T) == MAX


def test_wsd_closed_form():
    lr = lr_schedule(_cfg("wsd", annealing=20), T)  # stable until 90, linear decay to 110
    assert lr(50) == MAX and lr(89) == MAX and lr(90) == MAX
    assert lr(100) == pytest.approx(5.5e-4, rel=1e-12)  # mid of the decay
    assert lr(T) == pytest.approx(MIN, rel=1e-12)
    default = lr_schedule(_cfg("wsd"), T)  # decay phase = 20% of 110 = 22 steps, from step 88
    assert default(88) == MAX
    assert default(99) == pytest.approx(5.5e-4, rel=1e-12)
    assert default(T) == pytest.approx(MIN, rel=1e-12)


@pytest.mark.parametrize("name", ["cosine", "linear", "constant", "wsd"])
def test_scheduler_drives_optimizer_and_round_trips_state(name):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [param]}, {"params": [], "weight_decay": 0.0}], lr=MAX)
    sched = build_scheduler(opt, _cfg(name), T)
    fn = lr_schedule(_cfg(name), T)
    for s in range(30):
        assert all(g["lr"] == pytest.approx(fn(s), rel=1e-12) for g in opt.param_groups)
        opt.step()
        sched.step()
    state = sched.state_dict()
    assert state["last_epoch"] == 30 and "fn" not in state
    opt2 = torch.optim.AdamW([param], lr=MAX)
    resumed = build_scheduler(opt2, _cfg(name), T)
    resumed.load_state_dict(state)
    assert opt2.param_groups[0]["lr"] == pytest.approx(fn(30), rel=1e-12)  # applied on load
    opt2.step()
    resumed.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(fn(31), rel=1e-12)


def test_bad_combinations_name_the_keys():
    with pytest.raises(ConfigError, match="optim.warmup_steps"):
        lr_schedule(_cfg("cosine", annealing=5), T)
    with pytest.raises(ConfigError, match="optim.warmup_steps"):
        lr_schedule(_cfg("wsd", annealing=105), T)
    with pytest.raises(ConfigError, match="optim.lr_scheduler"):
        lr_schedule(OptimConfig(lr_scheduler="step"), T)
    with pytest.raises(ConfigError, match="optim.min_lr"):
        lr_schedule(OptimConfig(max_lr=1e-4, min_lr=1e-3), T)
