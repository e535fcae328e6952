"""Learning-rate schedules: ``cosine``, ``linear``, ``constant`` and warmup-stable-decay (``wsd``).

``s`` below is the number of optimizer steps already taken (the scheduler's ``last_epoch``), so the
lr used by the first step is ``lr(0)``. With ``W = optim.warmup_steps``:

* warmup (every schedule): ``lr(s) = max_lr * (s + 1) / W`` for ``s < W``, reaching ``max_lr`` at
  ``s = W - 1`` (no step is wasted at lr 0);
* ``constant``: ``max_lr`` after warmup;
* ``cosine`` / ``linear``: decay from ``max_lr`` at ``s = W`` to ``min_lr`` at ``s = H`` and stay
  there, where the horizon ``H = optim.annealing_steps`` or, when that is 0, ``operation.train_steps``
  (Megatron's ``lr_decay_iters``: the step at which the decay ends, counted from step 0).
  ``cosine``: ``min_lr + (max_lr - min_lr) * (1 + cos(pi * p)) / 2``; ``linear``:
  ``max_lr - (max_lr - min_lr) * p``, with ``p = (s - W) / (H - W)`` clamped to ``[0, 1]``;
* ``wsd``: ``max_lr`` until ``D = train_steps - A``, then linear decay to ``min_lr`` at
  ``s = train_steps``, where the decay length ``A = optim.annealing_steps`` or, when that is 0,
  20% of ``train_steps`` (the cool-down length that matches cosine in Hägele et al., 2024).

The schedule is a ``torch.optim.lr_scheduler.LRScheduler``, so it has ``state_dict()`` /
``load_state_dict()`` for checkpoints, and it sets every param group's lr to the same value.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.optim.lr_scheduler import LRScheduler

from ironcore.config import ConfigError
from ironcore.config.schema import OptimConfig
from ironcore.config.validate import WSD_DEFAULT_DECAY_FRACTION, schedule_problem

SCHEDULES = ("cosine", "linear", "constant", "wsd")


def lr_schedule(optim: OptimConfig, train_steps: int) -> Callable[[int], float]:
    """The closed-form lr as a function of the completed step count ``s`` (see module docstring)."""
    name, max_lr, min_lr, warmup = optim.lr_scheduler, optim.max_lr, optim.min_lr, optim.warmup_steps
    if name not in SCHEDULES:
        raise ConfigError([f"optim.lr_scheduler: {name!r} is not a schedule; allowed: {', '.join(SCHEDULES)}"])
    if min_lr > max_lr:
        raise ConfigError([f"optim.min_lr ({min_lr}) must not exceed optim.max_lr ({max_lr})"])

    def warmup_lr(s: int) -> float:
        return max_lr * (s + 1) / warmup

    if name == "constant":
        return lambda s: warmup_lr(s) if s < warmup else max_lr

    problem = schedule_problem(optim, train_steps)
    if problem:
        raise ConfigError([problem])
    if name in ("cosine", "linear"):
        horizon = optim.annealing_steps or train_steps

        def decay(s: int) -> float:
            if s < warmup:
                return warmup_lr(s)
            p = min(1.0, (s - warmup) / (horizon - warmup))
            shape = 0.5 * (1.0 + math.cos(math.pi * p)) if name == "cosine" else 1.0 - p
            return min_lr + (max_lr - min_lr) * shape

        return decay

    # wsd
    decay_steps = optim.annealing_steps or max(1, round(WSD_DEFAULT_DECAY_FRACTION * train_steps))
    decay_start = train_steps - decay_steps

    def wsd(s: int) -> float:
        if s < warmup:
            return warmup_lr(s)
        if s < decay_start:
            return max_lr
        p = min(1.0, (s - decay_start) / decay_steps)
        return min_lr + (max_lr - min_lr) * (1.0 - p)

    return wsd


# The config values a schedule is built from; a checkpoint stores them beside the position.
SETTINGS = ("lr_scheduler", "max_lr", "min_lr", "warmup_steps", "annealing_steps")


class ClosedFormLR(LRScheduler):
    """Sets every param group's lr to the closed-form schedule of ``settings`` at ``last_epoch``.

    ``settings`` (``SETTINGS`` plus ``train_steps``) are state: a checkpoint restores the schedule
    it was saved with, settings and position (``optim.load_checkpoint_lr_scheduler: true``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, optim: OptimConfig, train_steps: int, last_epoch: int = -1):
        self.settings = {**{name: getattr(optim, name) for name in SETTINGS}, "train_steps": train_steps}
        self.fn = lr_schedule(optim, train_steps)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [self.fn(self.last_epoch)] * len(self.optimizer.param_groups)

    def state_dict(self) -> dict:
        # The schedule function is rebuilt from the settings; it is not state.
        return {k: v for k, v in super().state_dict().items() if k != "fn"}

    def load_state_dict(self, state_dict: dict) -> None:
        built = dict(self.settings)
        super().load_state_dict(state_dict)  # position and, from checkpoints that hold them, settings
        if self.settings != built:
            settings = dict(self.settings)
            train_steps = settings.pop("train_steps")
            self.fn = lr_schedule(OptimConfig(**settings), train_steps)
        self.apply()

    def changed_settings(self, optim: OptimConfig, train_steps: int) -> list[str]:
        """The keys whose config value differs from the schedule's (after a resume)."""
        config = {**{name: getattr(optim, name) for name in SETTINGS}, "train_steps": train_steps}
        return [f"{'operation' if k == 'train_steps' else 'optim'}.{k}" for k in config if config[k] != self.settings[k]]

    def resume_at(self, step: int) -> None:
        """Keep the schedule built from the config, at the resumed step (Megatron's
        ``--override-opt_param-scheduler``), so warmup does not restart while the step counter goes on."""
        self.last_epoch = step
        self.apply()

    def apply(self) -> None:
        """Set the optimizer's lr for the current position (after a resume, the optimizer's
        restored lr may belong to another schedule or position)."""
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, train_steps: int) -> ClosedFormLR:
    """The configured schedule (``optim.lr_scheduler``) over ``optimizer``; call ``.step()`` after
    every optimizer step."""
    return ClosedFormLR(optimizer, optim, train_steps)
