"""Causal self-attention: multi-head or grouped-query (``model.num_attention_groups``).

q projects to ``num_attention_heads × head_dim`` and k/v to ``num_attention_groups × head_dim``
(``head_dim`` may differ from ``d_model / heads``); o projects back to ``d_model``. Under TP each
rank owns ``heads/tp`` query heads and ``groups/tp`` kv groups; query head ``i`` reads kv group
``i // (heads/groups)`` on every path (flash-attn, SDPA with or without a mask), as Hugging Face's
``repeat_kv`` does.

Kernel: flash-attn when it is installed, the tensors are on CUDA in fp16/bf16, ``trainer.use_flash_attn``
is on and no segment mask is needed; otherwise ``torch.nn.functional.scaled_dot_product_attention``.
Under context parallelism (``trainer.context_parallel_size > 1``) each rank holds a load-balanced
share of every sequence, and attention is ring attention over the CP group
(``ironcore.parallel.context``), exact causal attention across the shards. Its dropout masks do not
match a CP=1 run's draws (only their distribution). Generation (the KV cache) runs at CP=1.
The path taken is logged once per process.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ironcore.model.rope import apply_rotary
from ironcore.parallel.context import ring_attention
from ironcore.parallel.layers import ColumnParallelLinear, RowParallelLinear
from ironcore.parallel.mappings import enter_tensor_parallel_region
from ironcore.parallel.random import get_rng_tracker
from ironcore.parallel.state import ParallelState

try:
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

logger = logging.getLogger(__name__)
_LOGGED_PATHS: set[str] = set()


def _log_path_once(path: str) -> None:
    if path not in _LOGGED_PATHS:
        _LOGGED_PATHS.add(path)
        logger.info("attention kernel: %s", path)


def segment_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Boolean ``[b, 1, s, s]`` mask, True where query ``i`` may attend key ``j``: ``j <= i`` and
    both tokens belong to the same segment (packed sequences do not see each other)."""
    s = segment_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    same_segment = segment_ids.unsqueeze(2) == segment_ids.unsqueeze(1)
    return (same_segment & causal).unsqueeze(1)


class Attention(nn.Module):
    """Input: replicated ``[b, s, d]`` (sequence-split ``[b, s/tp, d]`` under SP). Output: same layout.

    Inside, q/k/v are column-parallel (this rank's heads, full sequence) and o is row-parallel.
    """

    def __init__(self, d_model: int, num_heads: int, num_groups: int, head_dim: int, bias: bool,
                 dropout: float, pstate: ParallelState, sequence_parallel: bool, use_flash_attn: bool):
        super().__init__()
        self.group = pstate.tp_group
        self.cp_group = pstate.cp_group
        self.sequence_parallel = sequence_parallel
        self.local_heads = num_heads // pstate.tp_size
        self.local_groups = num_groups // pstate.tp_size
        self.head_dim = head_dim
        self.dropout = dropout
        self.use_flash_attn = use_flash_attn and flash_attn_func is not None
        column = dict(pstate=pstate, bias=bias, sequence_parallel=sequence_parallel, input_mapped=True)
        self.q_proj = ColumnParallelLinear(d_model, num_heads * head_dim, **column)
        self.k_proj = ColumnParallelLinear(d_model, num_groups * head_dim, **column)
        self.v_proj = ColumnParallelLinear(d_model, num_groups * head_dim, **column)
        self.o_proj = RowParallelLinear(num_heads * head_dim, d_model, pstate, bias=bias,
                                        sequence_parallel=sequence_parallel)

    def forward(self, x: torch.Tensor, rotary: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                attn_mask: Optional[torch.Tensor] = None, kv_cache=None) -> torch.Tensor:
        """`rotary`: (cos, sin) ``[b, s, head_dim]`` or None; `attn_mask`: boolean ``[b, 1, s, s]``
        (see `segment_causal_mask`) or None for plain causal attention.

        `kv_cache` (generation; ``ironcore.inference.kv_cache.LayerKVCache``): the new keys/values
        are appended to it (``update(k, v)`` returns all cached ones) and the queries attend over
        everything cached; `attn_mask` is then ``[b, 1, s, cached + s]``."""
        x = enter_tensor_parallel_region(x, self.group, self.sequence_parallel)
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.local_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.local_groups, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.local_groups, self.head_dim).transpose(1, 2)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)  # keys are cached after RoPE, rotated at their own positions
        dropout = self.dropout if self.training else 0.0
        # Each rank holds different heads: their dropout masks must differ (TP-rank RNG stream).
        with get_rng_tracker().fork() if dropout > 0 else contextlib.nullcontext():
            out = self._attend(q, k, v, attn_mask, dropout)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.local_heads * self.head_dim))

    def _attend(self, q, k, v, attn_mask, dropout: float) -> torch.Tensor:
        if self.cp_group is not None:
            if attn_mask is not None:
                raise ValueError("context parallelism attends causally over whole sequences: no segment or "
                                 "KV-cache mask (generate at context_parallel_size 1)")
            _log_path_once("ring attention over the context-parallel group")
            return ring_attention(q, k, v, self.cp_group, dropout)
        if (self.use_flash_attn and attn_mask is None and q.is_cuda
                and q.dtype in (torch.float16, torch.bfloat16)):
            _log_path_once("flash-attn")
            # flash-attn wants [b, s, heads, dim] and handles GQA natively.
            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                  dropout_p=dropout, causal=True)
            return out.transpose(1, 2)
        _log_path_once("torch scaled_dot_product_attention" + (" with segment mask" if attn_mask is not None else ""))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout,
                                              is_causal=attn_mask is None,
                                              enable_gqa=self.local_groups != self.local_heads)
