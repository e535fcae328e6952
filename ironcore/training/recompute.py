"""Activation recompute (gradient checkpointing) of the transformer blocks in ``model.layers``.

``operation.activation_recompute`` turns it on; ``operation.recompute_strategy`` picks what is
recomputed in each block during the backward pass:

* ``default`` — full recompute: only each block's input is kept; the whole block runs again in
  backward. Least memory, about one extra forward of compute.
* ``optimized`` — selective recompute: the outputs of the compute-heavy ops (matmuls and fused
  attention kernels) are saved, and only the cheap memory-heavy ones (norms, activations, dropout,
  softmax, elementwise) are recomputed — most of the memory saving for a few percent of compute
  (the idea of Megatron's selective recompute, expressed with torch's selective checkpoint policy).

Both use non-reentrant ``torch.utils.checkpoint``, which restores the default CPU/CUDA RNG so
dropout masks match. Dropout in tensor-parallel regions draws from IronCore's per-TP-rank RNG
tracker (``ironcore.parallel.random``), whose states live outside torch's default generator: we
capture them at forward time and put them back around the recompute, so the recomputed masks equal
the original ones.

Wrapping patches each block's ``forward`` in place instead of inserting a wrapper module, so
parameter names and checkpoints are identical with and without recompute.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ironcore.config.schema import OperationConfig

logger = logging.getLogger(__name__)

_aten = torch.ops.aten
# Ops whose outputs selective recompute keeps (expensive to recompute, cheap to store per FLOP).
_SAVE_OPS = {
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _tracker_states() -> Any:
    from ironcore.parallel.random import get_rng_tracker
    return get_rng_tracker().get_states()


@contextlib.contextmanager
def _restored_tracker(states: Any):
    """Run the recompute with the TP RNG tracker as it was at forward time, then put back the
    states the rest of the backward pass expects."""
    from ironcore.parallel.random import get_rng_tracker
    tracker = get_rng_tracker()
    current = tracker.get_states()
    tracker.set_states(states)
    try:
        yield
    finally:
        tracker.set_states(current)


def _context_fn(selective: bool) -> Callable[[], tuple]:
    def make() -> tuple:
        forward_ctx, recompute_ctx = (create_selective_checkpoint_contexts(_selective_policy) if selective
                                      else (contextlib.nullcontext(), contextlib.nullcontext()))
        states = _tracker_states()

        @contextlib.contextmanager
        def recompute():
            with _restored_tracker(states), recompute_ctx:
                yield

        return forward_ctx, recompute()
    return make


def _checkpointed_forward(block: nn.Module, forward: Callable, context_fn: Callable, *args, **kwargs):
    if not (block.training and torch.is_grad_enabled()):
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs)


def apply_activation_recompute(model: nn.Module, operation: OperationConfig) -> int:
    """Wrap every block of ``model.layers`` for recompute when ``operation.activation_recompute``;
    returns the number of blocks wrapped (0 when off)."""
    if not operation.activation_recompute:
        return 0
    if operation.recompute_strategy not in ("default", "optimized"):
        raise ValueError(f"operation.recompute_strategy: {operation.recompute_strategy!r} is not "
                         "supported; allowed: default, optimized")
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError("activation recompute needs the transformer blocks in `model.layers` (nn.ModuleList)")
    context_fn = _context_fn(selective=operation.recompute_strategy == "optimized")
    for block in layers:
        block.forward = functools.partial(_checkpointed_forward, block, block.forward, context_fn)
    logger.info("activation recompute: %s (%s) on %d blocks",
                "full" if operation.recompute_strategy == "default" else "selective",
                operation.recompute_strategy, len(layers))
    return len(layers)
