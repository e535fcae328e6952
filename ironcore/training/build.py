"""The seam: ``build_run(cfg, pstate)`` builds and parallelizes everything a run holds, in one
fixed order, for the trainer, ``ironcore eval``, generation and ``tools/benchmark.py`` alike:

1. the tokenizer and the (padded) vocabulary;
2. this rank's model chunks (`model_stages`: one, or several under the interleaved schedule),
   tensor-parallel by construction (the layers of ``ironcore.parallel.layers``), initialised
   identically at any layout; then ``trainer.pretrained_checkpoint``'s weights;
3. `parallelize`: activation recompute → ``torch.compile`` → data parallelism (DDP, FSDP2 over the
   mesh, or nothing for pipeline stages and the distributed optimizer). Recompute wraps blocks
   before compile traces them; FSDP comes last because it replaces the parameters, and the
   optimizer must be built on the replacements;
4. the optimizer (sharded over DP with ``parallel.use_distributed_optimizer``), LR schedule and
   fp16 loss scaler;
5. resume from ``trainer.model_path`` (weights, optimizer, schedule, scaler; the data position and
   RNG states are returned for the loop to apply);
6. for DPO (``data.task_type: dpo``, "train" and "eval"), the frozen reference model: chunks of the
   same TP/PP layout (`build_reference`), outside the optimizer and the checkpoints.

Context parallelism will slot in at 3, before recompute, when the training loop splits sequences.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from ironcore.config import Config
from ironcore.parallel.data_parallel import wrap_data_parallel
from ironcore.parallel.distributed_optimizer import inner_optimizer
from ironcore.parallel.state import ParallelState
from ironcore.training.optimizer import build_optimizer
from ironcore.training.precision import build_grad_scaler
from ironcore.training.recompute import apply_activation_recompute
from ironcore.training.scheduler import build_scheduler

logger = logging.getLogger(__name__)

MODES = ("train", "eval", "inference")


@dataclass
class Run:
    """What `build_run` made for this rank."""

    cfg: Config
    pstate: ParallelState
    tokenizer: Any
    vocab_size: int
    chunks: list[nn.Module]          # the model chunks, bare: what checkpoints and evaluation see
    stages: list[nn.Module]          # what the pipeline schedule runs (the chunks or their DDP wrapper)
    optimizer: Any = None            # a torch optimizer or a DistributedOptimizer ("train" only)
    scheduler: Any = None
    scaler: Optional[torch.amp.GradScaler] = None
    resumed: Optional[dict] = None   # {"iteration", "data_state", "rng_state"} after a resume
    embedding_group: Optional[dist.ProcessGroup] = None
    reference: Optional[list[nn.Module]] = None  # DPO: the frozen reference's chunks (same layout)

    def __post_init__(self) -> None:
        # The chunk, or an nn.ModuleList of this rank's chunks: what the optimizer, checkpoints
        # and evaluation see (checkpoint names say which chunk a parameter is in).
        self.model: nn.Module = self.chunks[0] if len(self.chunks) == 1 else nn.ModuleList(self.chunks)


def build_run(cfg: Config, pstate: ParallelState, mode: str = "train", tokenizer: Any = None) -> Run:
    """Build this rank's part of a run (module docstring). ``mode``: ``train`` (everything),
    ``eval`` (the model, compiled when asked, with the weights of model_path's checkpoint),
    ``inference`` (the bare model, for a caller that loads weights itself). ``tokenizer``: one the
    caller already built (the trainer reads its data first, so bad data fails before any model
    is built). Collective."""
    from ironcore.checkpoint.io import load_checkpoint
    from ironcore.checkpoint.pretrained import load_pretrained
    from ironcore.data import build_tokenizer, resolve_vocab_size
    from ironcore.model import build_model, model_stages
    from ironcore.training.tied_embedding import build_embedding_group

    if mode not in MODES:
        raise ValueError(f"build_run: mode {mode!r} is not one of {', '.join(MODES)}")
    tokenizer = tokenizer or build_tokenizer(cfg.model)
    # A loaded model's vocabulary is the one it was saved with (its caller checks the tokenizer).
    vocab_size = cfg.data.vocab_size if mode == "inference" and cfg.data.vocab_size else \
        resolve_vocab_size(cfg, tokenizer)
    chunks = [build_model(cfg, pstate, vocab_size, stage) for stage in model_stages(cfg, pstate)]
    run = Run(cfg, pstate, tokenizer, vocab_size, chunks, list(chunks))
    if mode == "inference":
        return run
    if mode == "eval":
        run.stages = parallelize(chunks, cfg, pstate, training=False)
        if cfg.trainer.model_path:
            run.resumed = load_checkpoint(cfg, pstate, run.model, None, None, None)
        run.reference = build_reference(cfg, pstate, vocab_size)
        return run
    load_pretrained(cfg, pstate, chunks)  # trainer.pretrained_checkpoint, unless resuming
    run.stages = parallelize(chunks, cfg, pstate, training=True)
    model = run.model
    # On the parameters' device: CPU under FSDP's CPU offload.
    run.optimizer = build_optimizer(model, cfg.optim, next(model.parameters()).device,
                                    shard_over=pstate if cfg.parallel.use_distributed_optimizer else None)
    run.scheduler = build_scheduler(inner_optimizer(run.optimizer), cfg.optim, cfg.operation.train_steps)
    run.scaler = build_grad_scaler(cfg.model.precision, pstate.device)
    if cfg.trainer.model_path:
        run.resumed = load_checkpoint(cfg, pstate, model, run.optimizer, run.scheduler, run.scaler)
    run.scheduler.apply()  # the optimizer's lr must follow the (possibly fresh) schedule
    if run.scaler is not None and pstate.pp_size > 1:
        # Only the last stage scales a loss, but every stage unscales its (scaled) gradients:
        # make the scaler hold its scale on every rank.
        run.scaler.scale(torch.zeros((), device=pstate.device))
    run.embedding_group = build_embedding_group(pstate, not cfg.model.untie_embed)
    run.reference = build_reference(cfg, pstate, vocab_size)
    return run


def reference_source(cfg: Config) -> tuple[Optional[str], str]:
    """(checkpoint, the key naming it) of the DPO reference's weights: ``trainer.dpo_reference_checkpoint``,
    else ``trainer.pretrained_checkpoint``, else (None, ...): the initialization from ``init.seed``."""
    t = cfg.trainer
    if t.dpo_reference_checkpoint:
        return t.dpo_reference_checkpoint, "trainer.dpo_reference_checkpoint"
    if t.pretrained_checkpoint:
        return t.pretrained_checkpoint, "trainer.pretrained_checkpoint"
    return None, "init.seed"


def build_reference(cfg: Config, pstate: ParallelState, vocab_size: int) -> Optional[list[nn.Module]]:
    """DPO's frozen reference: this rank's chunks at the policy's TP/PP layout, in eval mode, without
    gradients, compiled when asked but never wrapped for data parallelism (it has no gradients to
    reduce). None unless ``data.task_type`` is dpo. Its weights are the policy's *initial* ones
    (`reference_source`), never the resumed policy's: building from the seed again (or reading the
    same checkpoint) gives the same reference at step 0 and after any resume. Collective."""
    from ironcore.checkpoint.pretrained import load_weights
    from ironcore.model import build_model, model_stages

    if cfg.data.task_type != "dpo":
        return None
    chunks = [build_model(cfg, pstate, vocab_size, stage) for stage in model_stages(cfg, pstate)]
    source, key = reference_source(cfg)
    if source is not None:
        load_weights(cfg, pstate, chunks, source, key)
    for chunk in chunks:
        chunk.requires_grad_(False).eval()
    logger.info("DPO reference model: %s (frozen)", f"{key}={source}" if source else "the initialization (init.seed)")
    return parallelize(chunks, cfg, pstate, training=False)


def parallelize(chunks: list[nn.Module], cfg: Config, pstate: ParallelState, training: bool) -> list[nn.Module]:
    """Recompute → compile → data parallelism (training only), applied to this rank's chunks in
    place; returns what the schedule runs."""
    for chunk in chunks:
        if training:
            apply_activation_recompute(chunk, cfg.operation)
        if cfg.trainer.compile_model:
            chunk.compile()  # in place: parameter names (and checkpoints) are unchanged
    return wrap_data_parallel(chunks, cfg, pstate) if training else list(chunks)
