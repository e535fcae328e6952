"""Mixed precision: autocast for bf16/fp16 compute, fp32 master weights, fp16 loss scaling.

``model.precision`` selects the compute dtype of matmuls inside ``torch.autocast``; the parameters
(and so the optimizer state) always stay fp32 — they are the master weights users expect, and the
model's per-token loss is computed in fp32. ``float16`` additionally needs dynamic loss scaling
(gradients of small losses underflow in fp16): a ``torch.amp.GradScaler`` scales the loss, unscales
the gradients before clipping and skips the optimizer step (halving the scale) when any gradient
is inf/NaN. With several processes the inf check must agree on every rank — a TP or PP rank whose
shard overflowed has to make all ranks skip — so the scaler max-reduces its found-inf flags over
the world group (`DistributedGradScaler`).
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
import torch.distributed as dist

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compute_dtype(precision: str) -> torch.dtype:
    """The torch dtype named by ``model.precision``."""
    if precision not in DTYPES:
        raise ValueError(f"model.precision: {precision!r} is not supported; allowed: {', '.join(DTYPES)}")
    return DTYPES[precision]


def autocast(precision: str, device: torch.device) -> ContextManager:
    """The forward-pass context: ``torch.autocast`` to bf16/fp16 on ``device``, nothing for fp32."""
    dtype = compute_dtype(precision)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class DistributedGradScaler(torch.amp.GradScaler):
    """``torch.amp.GradScaler`` whose inf/NaN verdict is the same on every rank.

    After unscaling, the found-inf flags are max-reduced over ``group``, so one rank's overflow makes
    every rank skip the step and halve the scale together (otherwise replicas would diverge).
    torch's ``ShardedGradScaler`` does the same reduction but keeps 1-element flags, which torch's
    fused Adam rejects (it needs 0-d flags); this keeps GradScaler's own 0-d flags.
    """

    def __init__(self, device: str, group: dist.ProcessGroup | None = None):
        super().__init__(device)
        self.group = group

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        super().unscale_(optimizer)
        for found_inf in self._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values():
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX, group=self.group)


def build_grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A dynamic loss scaler for ``float16``; ``None`` for bf16/fp32 (their range needs none)."""
    if compute_dtype(precision) != torch.float16:
        return None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DistributedGradScaler(device.type, group=dist.group.WORLD)
    return torch.amp.GradScaler(device.type)
