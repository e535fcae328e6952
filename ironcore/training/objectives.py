"""The training objectives, each loss defined once: language modeling and DPO.

An objective says what the model is run on and what its output costs. The model's last pipeline
stage, given labels, returns the per-token loss ``-log p(label)`` (fp32 ``[b, s]``, the
vocab-parallel cross-entropy: the logits are never gathered over TP). An objective

* `model_batch(batch)`: the loader's batch as the model's inputs (``input_ids``, ``labels``,
  ``loss_mask``, and ``position_ids`` / ``segment_ids`` when present);
* `loss(per_token, batch)`: the scalar to minimize and the metrics to log, from the last stage's
  per-token loss of that model batch.

Language modeling (pretrain, SFT) is the token-averaged cross-entropy over ``loss_mask``.

DPO (Rafailov et al., 2023, "Direct Preference Optimization") trains on pairs: the chosen and the
rejected response of one prompt run in one micro-batch (chosen rows first), so their log-probs meet
on the last stage. With the policy's and the frozen reference's sequence log-probs (summed over the
response tokens only: ``loss_mask`` is 0 on the prompt and the padding)::

    logits = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    sigmoid: -(1 - ls) * log σ(β·logits) - ls * log σ(-β·logits)   (ls: label smoothing, cDPO)
    ipo:     (logits - 1 / (2β))²                                   (Azar et al., 2023)
    hinge:   max(0, 1 - β·logits)                                   (SLiC, Zhao et al., 2023)
    rewards/chosen = β (policy_chosen - reference_chosen), rewards/rejected likewise

the formulas and metric names of TRL's DPOTrainer. The reference log-probs come with the batch
(``reference_chosen_logps`` / ``reference_rejected_logps``, computed under ``torch.no_grad`` by the
frozen reference model through `DPO.sequence_logps`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ironcore.config.schema import Config

_PAIR_KEYS = ("input_ids", "labels", "loss_mask")


class Objective(Protocol):
    def model_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def loss(self, per_token: torch.Tensor, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


class LanguageModeling:
    """Pretrain and SFT: the mean per-token loss over the tokens ``loss_mask`` trains on.

    Under context parallelism (`cp_group`) a rank sees only its share of each sequence, so the mean
    is over the whole CP group's tokens: this rank's sum over the group's count, times ``cp_size``.
    The gradient average over ``dp × cp`` then divides the ``cp_size`` out again, and the mean of
    the ranks' values is the micro-batch's token mean (as Megatron scales its CP loss)."""

    def __init__(self, cp_group: Optional[dist.ProcessGroup] = None):
        self.cp_group = cp_group

    def model_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return batch

    def loss_sums(self, per_token: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ per-token loss × loss_mask, Σ loss_mask) of this rank's tokens: evaluation adds these
        over batches and ranks."""
        mask = batch["loss_mask"].to(per_token.device)
        return (per_token.float() * mask).sum(), mask.sum()

    def loss(self, per_token: torch.Tensor, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, count = self.loss_sums(per_token, batch)
        if self.cp_group is None:
            return total / count.clamp(min=1), {}
        count = count.detach().clone()
        dist.all_reduce(count, group=self.cp_group)
        return total * dist.get_world_size(self.cp_group) / count.clamp(min=1), {}


class DPOOutput(NamedTuple):
    losses: torch.Tensor  # [pairs]
    chosen_rewards: torch.Tensor  # [pairs], β (policy - reference) of the chosen response
    rejected_rewards: torch.Tensor  # [pairs]


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> DPOOutput:
    """Per-pair DPO losses and implicit rewards from sequence log-probs (each ``[pairs]``)."""
    logits = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    if loss_type == "sigmoid":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * logits)
                  - label_smoothing * F.logsigmoid(-beta * logits))
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r} (trainer.dpo_loss_type allows sigmoid, ipo, hinge)")
    # The rewards are reported, not trained on: no gradient flows through them.
    chosen_rewards = beta * (policy_chosen - reference_chosen).detach()
    rejected_rewards = beta * (policy_rejected - reference_rejected).detach()
    return DPOOutput(losses, chosen_rewards, rejected_rewards)


def reward_metrics(out: DPOOutput) -> dict[str, torch.Tensor]:
    """TRL's metric names, each a mean over the pairs."""
    return {"rewards/chosen": out.chosen_rewards.mean(), "rewards/rejected": out.rejected_rewards.mean(),
            "rewards/margins": (out.chosen_rewards - out.rejected_rewards).mean(),
            "rewards/accuracy": (out.chosen_rewards > out.rejected_rewards).float().mean()}


def sequence_logps(per_token: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """``[b]`` log-probability of each row's masked tokens, from the per-token ``-log p`` ``[b, s]``."""
    return -(per_token.float() * loss_mask.to(per_token.device)).sum(-1)


@dataclass(frozen=True)
class DPO:
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0

    def model_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The pairs as one batch of ``2 × pairs`` rows: every chosen row, then every rejected row."""
        return {key: torch.cat([batch[f"chosen_{key}"], batch[f"rejected_{key}"]]) for key in _PAIR_KEYS}

    def sequence_logps(self, per_token: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[2 × pairs]`` response log-probs of the model batch (the reference's are computed so too)."""
        return sequence_logps(per_token, self.model_batch(batch)["loss_mask"])

    def loss(self, per_token: torch.Tensor, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps = self.sequence_logps(per_token, batch)
        pairs = logps.shape[0] // 2
        device = logps.device
        out = dpo_loss(logps[:pairs], logps[pairs:], batch["reference_chosen_logps"].to(device),
                       batch["reference_rejected_logps"].to(device), self.beta, self.loss_type, self.label_smoothing)
        return out.losses.mean(), reward_metrics(out)


def build_objective(cfg: Config, cp_group: Optional[dist.ProcessGroup] = None) -> Objective:
    """The objective ``data.task_type`` names (DPO with the ``trainer.dpo_*`` keys); `cp_group`:
    the context-parallel group the language-modeling mean spans (validation keeps DPO at CP 1)."""
    if cfg.data.task_type == "dpo":
        t = cfg.trainer
        return DPO(beta=t.dpo_beta, loss_type=t.dpo_loss_type, label_smoothing=t.dpo_label_smoothing)
    return LanguageModeling(cp_group)
