"""Mixed precision: autocast for bf16/fp16 compute, fp32 master weights, fp16 loss scaling.

``model.precision`` selects the compute dtype of matmuls inside ``torch.autocast``; the parameters
(and so the optimizer state) always stay fp32 — they are the master weights users expect, and the
model's per-token loss is computed in fp32. ``float16`` additionally needs dynamic loss scaling
(gradients of small losses underflow in fp16): a ``torch.amp.GradScaler`` scales the loss, unscales
the gradients before clipping and skips the optimizer step (halving the scale) when any gradient
is inf/NaN. With several processes the inf check must agree on every rank — a TP or PP rank whose
shard overflowed has to make all ranks skip — so the scaler all-reduces its found-inf flag over
the world group (torch's ``ShardedGradScaler``, which does exactly that for any optimizer).
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


def build_grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A dynamic loss scaler for ``float16``; ``None`` for bf16/fp32 (their range needs none)."""
    if compute_dtype(precision) != torch.float16:
        return None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
        return ShardedGradScaler(device=device.type, process_group=dist.group.WORLD)
    return torch.amp.GradScaler(device.type)
