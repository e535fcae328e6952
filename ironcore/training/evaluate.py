"""Evaluation: the loss and perplexity of a model on the first samples of a split.

``evaluate`` is what the trainer calls every ``operation.eval_interval`` steps; ``main`` is
``ironcore eval CONFIG``: it loads the latest checkpoint of ``trainer.model_path`` and prints
``{"iteration": ..., "eval_loss": ..., "test_loss": ...}`` as JSON (``null`` for an empty split),
with a DPO config also each split's reward metrics (``eval_rewards/accuracy``, ...).
"""

from __future__ import annotations

import json
import logging
import math
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import nn

from ironcore.config import Config
from ironcore.model import batch_inputs
from ironcore.parallel import pipeline
from ironcore.parallel.context import shard_batch
from ironcore.training.objectives import LanguageModeling, Objective, add_reference_logps, build_objective
from ironcore.training.precision import autocast

logger = logging.getLogger(__name__)


class EvalResult(NamedTuple):
    loss: float
    ppl: Optional[float]        # language modeling only (a DPO loss has no perplexity)
    metrics: dict[str, float]   # the objective's metrics (DPO: rewards/*), averaged over the samples


@torch.no_grad()
def evaluate(model: nn.Module, dataset, num_samples: int, micro_batch_size: int, pstate, precision: str,
             objective: Optional[Objective] = None, reference: Optional[list[nn.Module]] = None
             ) -> Optional[EvalResult]:
    """The objective's loss (default: the token-averaged language-modeling loss, and its
    perplexity) and metrics over the first ``num_samples`` samples of ``dataset`` (rounded up to
    whole micro-batches on every DP rank), the same samples at every call; DPO needs the frozen
    ``reference`` chunks. Returns None for an empty dataset or ``num_samples == 0``. Collective over
    the DP (and CP) group, and over the pipeline: `model` is this rank's stage (an ``nn.ModuleList`` of its
    chunks when it holds several), run forward-only through ``ironcore.parallel.pipeline``."""
    from ironcore.data import build_loader

    if dataset is None or len(dataset) == 0 or num_samples == 0:
        return None
    objective = objective or LanguageModeling()
    draws = math.ceil(min(num_samples, len(dataset)) / (micro_batch_size * pstate.dp_size))
    loader = build_loader(dataset, micro_batch_size, pstate.dp_rank, pstate.dp_size, seed=0, shuffle=False)
    batches = [shard_batch(objective.model_batch(next(loader)), pstate.cp_size, pstate.cp_rank) for _ in range(draws)]
    chunks = list(model) if isinstance(model, nn.ModuleList) else [model]
    schedule = "interleaved" if len(chunks) > 1 else "1f1b"
    options = dict(hidden_size=chunks[0].cfg.d_model, sequence_parallel=chunks[0].sequence_parallel)

    def forward_step(chunk: nn.Module, batch: dict, hidden_states: Optional[torch.Tensor]) -> torch.Tensor:
        with autocast(precision, pstate.device):
            return chunk(**batch_inputs(batch, pstate.device), hidden_states=hidden_states)

    if reference is not None:
        add_reference_logps(objective, reference, batches, pstate, forward_step, schedule=schedule, **options)
    was_training = model.training
    model.eval()
    sums = pipeline.forward_backward(schedule, chunks, iter(batches), draws, pstate, objective.eval_sums,
                                     forward_step=forward_step, forward_only=True, **options)
    model.train(was_training)
    totals = torch.stack(sums).sum(0) if sums else torch.zeros(objective.eval_width, dtype=torch.float64,
                                                                device=pstate.device)
    totals = pipeline.broadcast_from_last_stage(totals, pstate)
    if pstate.dp_cp_group is not None:  # CP ranks hold disjoint tokens of the same sequences
        dist.all_reduce(totals, group=pstate.dp_cp_group)
    loss, metrics = objective.eval_metrics(totals)
    ppl = math.exp(min(loss, 700.0)) if isinstance(objective, LanguageModeling) else None  # exp overflows past ~709
    return EvalResult(loss, ppl, metrics)


def main(cfg: Config) -> int:
    """``ironcore eval CONFIG``: evaluate the latest checkpoint on the eval and test splits."""
    from ironcore.data import build_datasets
    from ironcore.parallel.state import destroy_distributed, init_distributed
    from ironcore.training.build import build_run

    pstate = init_distributed(cfg)
    try:
        run = build_run(cfg, pstate, mode="eval")
        datasets = build_datasets(cfg, run.tokenizer)
        model, resumed = run.model, run.resumed
        if resumed is None:
            if pstate.rank == 0:
                logger.error("ironcore eval: no checkpoint in trainer.model_path (%r) to evaluate",
                             cfg.trainer.model_path)
            return 1
        batch = cfg.trainer.eval_batch_size or cfg.trainer.micro_batch_size
        objective = build_objective(cfg)
        result = {"iteration": resumed["iteration"]}
        for split, samples in (("eval", cfg.operation.eval_samples), ("test", cfg.operation.test_samples)):
            out = evaluate(model, datasets[split], samples, batch, pstate, cfg.model.precision, objective,
                           run.reference)
            result[f"{split}_loss"] = None if out is None else out.loss
            for name in objective.metric_names:
                result[f"{split}_{name}"] = None if out is None else out.metrics[name]
        if pstate.rank == 0:
            print(json.dumps(result))
        return 0
    finally:
        destroy_distributed()
