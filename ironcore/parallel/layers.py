"""Tensor-parallel building blocks (Megatron-LM style), batch-first ``[batch, seq, hidden]``.

Every parameter split across the TP group is an exact contiguous slice of its TP=1 counterpart
along one dim and carries ``tensor_model_parallel = True`` and ``partition_dim`` (0 or 1): the
checkpoint code reshards with these, and gradient-norm code counts only split parameters once per
rank. Vocabulary-split parameters also carry ``vocab_parallel = True``: their full (padded) size
depends on the TP size. Under sequence parallelism, parameters replicated across TP that only see
this rank's sequence chunk carry ``sequence_parallel = True``: their grads are partial sums that
`allreduce_sequence_parallel_grads` completes.

Layers create uninitialised parameters; `ironcore.model.init` fills them (full weight drawn from a
seed, then sliced), so the values do not depend on the TP size.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ironcore.parallel.mappings import (
    enter_tensor_parallel_region,
    gather_from_tensor_parallel_region,
    leave_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
)
from ironcore.parallel.state import ParallelState


def _divide(total: int, parts: int, what: str) -> int:
    if total % parts != 0:
        raise ValueError(f"{what} ({total}) is not divisible by the tensor-parallel size ({parts})")
    return total // parts


def mark_tensor_parallel(param: nn.Parameter, partition_dim: int, vocab_parallel: bool = False) -> None:
    param.tensor_model_parallel = True
    param.partition_dim = partition_dim
    if vocab_parallel:
        param.vocab_parallel = True


def mark_sequence_parallel(param: nn.Parameter, sequence_parallel: bool) -> None:
    if sequence_parallel:
        param.sequence_parallel = True


class ColumnParallelLinear(nn.Module):
    """``y = x Aᵀ + b`` with ``A`` split along its output dim (rows of the weight).

    Input: replicated ``[b, s, in]``, or sequence-split ``[b, s/tp, in]`` under sequence parallelism
    (all-gathered here); with ``input_mapped=True`` the caller already made it full-sequence with
    `enter_tensor_parallel_region` (one gather shared by q/k/v or gate/up).
    Output: hidden-split ``[b, s, out/tp]``; replicated ``[b, s, out]`` with ``gather_output=True``.
    Weight ``[out/tp, in]`` (``partition_dim = 0``), bias ``[out/tp]`` (``partition_dim = 0``).
    """

    def __init__(self, in_features: int, out_features: int, pstate: ParallelState, bias: bool = True,
                 gather_output: bool = False, sequence_parallel: bool = False, input_mapped: bool = False):
        super().__init__()
        self.group = pstate.tp_group
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel
        self.input_mapped = input_mapped
        local_out = _divide(out_features, pstate.tp_size, "output size of a column-parallel layer")
        self.weight = nn.Parameter(torch.empty(local_out, in_features))
        mark_tensor_parallel(self.weight, 0)
        self.bias = nn.Parameter(torch.empty(local_out)) if bias else None
        if self.bias is not None:
            mark_tensor_parallel(self.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_mapped:
            x = enter_tensor_parallel_region(x, self.group, self.sequence_parallel)
        y = F.linear(x, self.weight, self.bias)
        return gather_from_tensor_parallel_region(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """``y = x Aᵀ + b`` with ``A`` split along its input dim (columns of the weight).

    Input: hidden-split ``[b, s, in/tp]`` (the output of a column-parallel layer).
    Output: replicated ``[b, s, out]`` (partial sums all-reduced), or sequence-split
    ``[b, s/tp, out]`` under sequence parallelism (reduce-scattered).
    Weight ``[out, in/tp]`` (``partition_dim = 1``); the bias ``[out]`` is replicated and added after
    the reduction (under sequence parallelism its grad is partial: ``sequence_parallel = True``).
    """

    def __init__(self, in_features: int, out_features: int, pstate: ParallelState, bias: bool = True,
                 sequence_parallel: bool = False):
        super().__init__()
        self.group = pstate.tp_group
        self.sequence_parallel = sequence_parallel
        local_in = _divide(in_features, pstate.tp_size, "input size of a row-parallel layer")
        self.weight = nn.Parameter(torch.empty(out_features, local_in))
        mark_tensor_parallel(self.weight, 1)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        if self.bias is not None:
            mark_sequence_parallel(self.bias, sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = leave_tensor_parallel_region(F.linear(x, self.weight), self.group, self.sequence_parallel)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the (padded) vocabulary split across TP ranks.

    Input: token ids ``[b, s]``, replicated. Output: replicated ``[b, s, dim]``: each rank looks up
    the ids in its vocabulary range ``[tp_rank * V/tp, (tp_rank + 1) * V/tp)``, zeros the others,
    and the partial results are all-reduced.
    Weight ``[V/tp, dim]`` (``partition_dim = 0``, ``vocab_parallel = True``).
    """

    def __init__(self, padded_vocab_size: int, dim: int, pstate: ParallelState):
        super().__init__()
        self.group = pstate.tp_group
        self.local_vocab = _divide(padded_vocab_size, pstate.tp_size, "padded vocabulary size")
        self.vocab_start = pstate.tp_rank * self.local_vocab
        self.weight = nn.Parameter(torch.empty(self.local_vocab, dim))
        mark_tensor_parallel(self.weight, 0, vocab_parallel=True)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local_ids = input_ids - self.vocab_start
        outside = (local_ids < 0) | (local_ids >= self.local_vocab)
        out = F.embedding(local_ids.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_parallel_region(out, self.group)


def parallel_lm_logits(hidden: torch.Tensor, weight: torch.Tensor, group, sequence_parallel: bool) -> torch.Tensor:
    """Logits of this rank's vocabulary shard, ``[b, s, V/tp]``, from hidden states that are
    replicated ``[b, s, d]`` (or sequence-split under sequence parallelism) and a vocab-split
    ``weight [V/tp, d]`` (the head, or the tied input embedding). Never gathers the full vocab."""
    hidden = enter_tensor_parallel_region(hidden, group, sequence_parallel)
    return F.linear(hidden, weight)


def allreduce_sequence_parallel_grads(params: Iterable[nn.Parameter], group) -> None:
    """Sum, over the TP group, the grads of parameters marked ``sequence_parallel`` (replicated
    weights such as norms that each saw only this rank's sequence chunk). One collective. Under
    FSDP the grads are shards over DP (the same shard on every TP rank): their local parts are
    summed."""
    grads = [p.grad for p in params if getattr(p, "sequence_parallel", False) and p.grad is not None]
    grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    if not grads or group is None or torch.distributed.get_world_size(group) == 1:
        return
    flat = _flatten_dense_tensors(grads)
    torch.distributed.all_reduce(flat, group=group)
    for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)


__all__ = [
    "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "parallel_lm_logits",
    "allreduce_sequence_parallel_grads", "mark_tensor_parallel", "mark_sequence_parallel",
]
