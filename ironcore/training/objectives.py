"""The training objectives, each loss defined once: language modeling and DPO.

An objective says what the model is run on and what its output costs. The model's last pipeline
stage, given labels, returns the per-token loss ``-log p(label)`` (fp32 ``[b, s]``, the
vocab-parallel cross-entropy: the logits are never gathered over TP). An objective

* `model_batch(batch)`: the loader's batch as the model's inputs (``input_ids``, ``labels``,
  ``loss_mask``, and ``position_ids`` / ``segment_ids`` when present): what the pipeline runs;
* `loss(per_token, model_batch)`: the scalar to minimize and the metrics to log (``metric_names``),
  from the last stage's per-token loss of that model batch;
* `eval_sums(per_token, model_batch)` / `eval_metrics(totals)`: evaluation adds the sums over
  micro-batches and ranks, then turns them into the loss and the metrics.

Language modeling (pretrain, SFT) is the token-averaged cross-entropy over ``loss_mask``.

DPO (Rafailov et al., 2023, "Direct Preference Optimization") trains on pairs: the chosen and the
rejected response of one prompt run in one micro-batch (chosen rows first), so their log-probs meet
on the last stage. With the policy's and the frozen reference's sequence log-probs (summed over the
response tokens only: ``loss_mask`` is 0 on the prompt and the padding)::

    logits = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    sigmoid: -(1 - ls) * log σ(β·logits) - ls * log σ(-β·logits)   (ls: label smoothing, cDPO)
    ipo:     (logits' - 1 / (2β))²                                  (Azar et al., 2023)
    hinge:   max(0, 1 - β·logits)                                   (SLiC, Zhao et al., 2023)
    rewards/chosen = β (policy_chosen - reference_chosen), rewards/rejected likewise

where IPO's ``logits'`` takes each response's log-ratio per response token (its sum over the
token count), as TRL does and the IPO authors confirmed their results use: the squared loss then
does not grow with the response length. These are the formulas and metric names of TRL's DPOTrainer. The reference log-probs come with the model
batch (``reference_logps``, ``[2 × pairs]`` in the same order), computed once per batch by the frozen
reference model, forward-only through the pipeline (`add_reference_logps`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, NamedTuple, Optional, Protocol, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ironcore.config.schema import Config
from ironcore.parallel import pipeline

_PAIR_KEYS = ("input_ids", "labels", "loss_mask")


REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy")


class Objective(Protocol):
    metric_names: tuple[str, ...]  # the keys of the metrics `loss` returns, in a fixed order
    eval_width: int                # how many sums `eval_sums` returns

    def model_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def loss(self, per_token: torch.Tensor, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def eval_sums(self, per_token: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def eval_metrics(self, totals: torch.Tensor) -> tuple[float, dict[str, float]]: ...


class LanguageModeling:
    """Pretrain and SFT: the mean per-token loss over the tokens ``loss_mask`` trains on.

    Under context parallelism (`cp_group`) a rank sees only its share of each sequence, so the mean
    is over the whole CP group's tokens: this rank's sum over the group's count, times ``cp_size``.
    The gradient average over ``dp × cp`` then divides the ``cp_size`` out again, and the mean of
    the ranks' values is the micro-batch's token mean (as Megatron scales its CP loss)."""

    metric_names: tuple[str, ...] = ()
    eval_width: int = 2

    def __init__(self, cp_group: Optional[dist.ProcessGroup] = None):
        self.cp_group = cp_group

    def model_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return batch

    def loss_sums(self, per_token: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ per-token loss × loss_mask, Σ loss_mask): evaluation adds these over batches and ranks."""
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

    def eval_sums(self, per_token: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[Σ loss, Σ tokens]`` in float64, so long evaluations add up exactly enough."""
        return torch.stack([part.double() for part in self.loss_sums(per_token, batch)])

    def eval_metrics(self, totals: torch.Tensor) -> tuple[float, dict[str, float]]:
        return (totals[0] / totals[1].clamp(min=1)).item(), {}


class DPOOutput(NamedTuple):
    losses: torch.Tensor  # [pairs]
    chosen_rewards: torch.Tensor  # [pairs], β (policy - reference) of the chosen response
    rejected_rewards: torch.Tensor  # [pairs]


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, chosen_tokens: Optional[torch.Tensor] = None,
             rejected_tokens: Optional[torch.Tensor] = None) -> DPOOutput:
    """Per-pair DPO losses and implicit rewards from sequence log-probs (each ``[pairs]``);
    `chosen_tokens` / `rejected_tokens`: the response token counts, which IPO averages over."""
    chosen_ratio, rejected_ratio = policy_chosen - reference_chosen, policy_rejected - reference_rejected
    logits = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * logits)
                  - label_smoothing * F.logsigmoid(-beta * logits))
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss averages over the response tokens: pass their counts")
        per_token = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (per_token - 1 / (2 * beta)) ** 2
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
    metric_names: ClassVar[tuple[str, ...]] = REWARD_METRICS
    eval_width: ClassVar[int] = 5

    def model_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The pairs as one batch of ``2 × pairs`` rows: every chosen row, then every rejected row."""
        return {key: torch.cat([batch[f"chosen_{key}"], batch[f"rejected_{key}"]]) for key in _PAIR_KEYS}

    def sequence_logps(self, per_token: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[2 × pairs]`` response log-probs of a model batch (the reference's are computed so too)."""
        return sequence_logps(per_token, batch["loss_mask"])

    def _output(self, per_token: torch.Tensor, batch: dict[str, torch.Tensor]) -> DPOOutput:
        logps = self.sequence_logps(per_token, batch)
        reference = batch["reference_logps"].to(logps.device)
        tokens = batch["loss_mask"].to(logps.device).sum(-1).to(logps.dtype)
        pairs = logps.shape[0] // 2
        return dpo_loss(logps[:pairs], logps[pairs:], reference[:pairs], reference[pairs:], self.beta,
                        self.loss_type, self.label_smoothing, tokens[:pairs], tokens[pairs:])

    def loss(self, per_token: torch.Tensor, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self._output(per_token, batch)
        return out.losses.mean(), reward_metrics(out)

    def eval_sums(self, per_token: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[Σ loss, Σ chosen reward, Σ rejected reward, Σ correct, pairs]`` over the pairs (float64)."""
        out = self._output(per_token, batch)
        correct = (out.chosen_rewards > out.rejected_rewards).double().sum()
        return torch.stack([out.losses.double().sum(), out.chosen_rewards.double().sum(),
                            out.rejected_rewards.double().sum(), correct,
                            torch.tensor(float(out.losses.numel()), dtype=torch.float64, device=correct.device)])

    def eval_metrics(self, totals: torch.Tensor) -> tuple[float, dict[str, float]]:
        loss, chosen, rejected, correct = (totals[:4] / totals[4].clamp(min=1)).tolist()
        return loss, dict(zip(REWARD_METRICS, (chosen, rejected, chosen - rejected, correct)))


ForwardStep = Callable[[nn.Module, dict, Optional[torch.Tensor]], torch.Tensor]


def add_reference_logps(objective: DPO, reference: Sequence[nn.Module], batches: list[dict], pstate,
                        forward_step: ForwardStep, *, schedule: str, hidden_size: int, sequence_parallel: bool,
                        timeout_minute: float = 10.0) -> None:
    """Put the frozen reference's ``reference_logps`` into each model batch of `batches`, computed
    forward-only (no graph) through the pipeline: only the last stage, where the loss is computed,
    gets them. Collective over the pipeline group."""
    logps = pipeline.forward_backward(schedule, reference, iter(batches), len(batches), pstate,
                                      objective.sequence_logps, hidden_size=hidden_size,
                                      sequence_parallel=sequence_parallel, forward_step=forward_step,
                                      forward_only=True, timeout_minute=timeout_minute)
    for batch, ref in zip(batches, logps):  # empty on the other stages
        batch["reference_logps"] = ref


def build_objective(cfg: Config, cp_group: Optional[dist.ProcessGroup] = None) -> Objective:
    """The objective ``data.task_type`` names (DPO with the ``trainer.dpo_*`` keys); `cp_group`:
    the context-parallel group the language-modeling mean spans (validation keeps DPO at CP 1)."""
    if cfg.data.task_type == "dpo":
        t = cfg.trainer
        return DPO(beta=t.dpo_beta, loss_type=t.dpo_loss_type, label_smoothing=t.dpo_label_smoothing)
    return LanguageModeling(cp_group)
