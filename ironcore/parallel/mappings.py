"""Autograd-aware communication across the tensor-parallel (TP) group.

Each function is the forward half of a conjugate pair (its backward is the other half), as in
Megatron-LM. Activations are batch-first ``[batch, seq, hidden]``; "hidden split" means the last dim
is divided across TP ranks, "sequence split" means dim 1 is (sequence parallelism).

=======================================  ===========================  ===========================
function                                 forward                      backward
=======================================  ===========================  ===========================
copy_to_tensor_parallel_region           identity                     all-reduce
reduce_from_tensor_parallel_region       all-reduce                   identity
gather_from_tensor_parallel_region       all-gather (last dim)        split (last dim)
scatter_to_sequence_parallel_region      split (seq dim)              all-gather (seq dim)
gather_from_sequence_parallel_region     all-gather (seq dim)         reduce-scatter (seq dim)
reduce_scatter_to_sequence_parallel_region  reduce-scatter (seq dim)  all-gather (seq dim)
=======================================  ===========================  ===========================

A ``group`` of ``None`` (or of size one) means no communication: every function is then the
identity, so single-process code runs the same path. The collectives run inside ``tp-*`` ranges
(`profiling.comm_phase`, ``profiling.PHASES``), so profile traces tell TP communication from the rest.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ironcore.observe.profiling import comm_phase

SEQ_DIM = 1

# torch 2.13 renamed the single-tensor collectives (the old names warn); older torch has only those.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _size(group: Optional[dist.ProcessGroup]) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if _size(group) == 1:
        return x
    x = x.contiguous()
    with comm_phase("tp-all-reduce"):
        dist.all_reduce(x, group=group)
    return x


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    size = _size(group)
    if size == 1:
        return x
    if x.shape[dim] % size != 0:
        raise ValueError(f"dim {dim} of size {x.shape[dim]} does not split evenly across {size} TP ranks")
    return x.chunk(size, dim=dim)[dist.get_rank(group)].contiguous()


def _gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    size = _size(group)
    if size == 1:
        return x
    front = x.movedim(dim, 0).contiguous()
    out = front.new_empty((size * front.shape[0],) + tuple(front.shape[1:]))
    with comm_phase("tp-all-gather"):
        _all_gather_single(out, front, group=group)
    return out.movedim(0, dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    size = _size(group)
    if size == 1:
        return x
    if x.shape[dim] % size != 0:
        raise ValueError(f"dim {dim} of size {x.shape[dim]} does not split evenly across {size} TP ranks")
    front = x.movedim(dim, 0).contiguous()
    out = front.new_empty((front.shape[0] // size,) + tuple(front.shape[1:]))
    with comm_phase("tp-reduce-scatter"):
        _reduce_scatter_single(out, front, group=group)
    return out.movedim(0, dim)


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone() if _size(group) > 1 else x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, -1, ctx.group), None


class _ScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, SEQ_DIM, ctx.group), None


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, SEQ_DIM, ctx.group), None


class _ReduceScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, SEQ_DIM, ctx.group), None


def copy_to_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Replicated input entering a TP region: identity forward, all-reduce of the grad backward."""
    return _Copy.apply(x, group)


def reduce_from_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Partial sums leaving a TP region: all-reduce forward, identity backward."""
    return _Reduce.apply(x, group)


def gather_from_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Hidden-split -> replicated: all-gather the last dim forward, keep this rank's split backward."""
    return _GatherLast.apply(x, group)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Replicated -> sequence-split: keep this rank's chunk of dim 1; all-gather backward."""
    return _ScatterSeq.apply(x, group)


def gather_from_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Sequence-split -> full sequence entering a TP region; the grad is reduce-scattered back."""
    return _GatherSeq.apply(x, group)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Partial sums leaving a TP region -> summed and sequence-split; all-gather backward."""
    return _ReduceScatterSeq.apply(x, group)


def enter_tensor_parallel_region(x: torch.Tensor, group, sequence_parallel: bool) -> torch.Tensor:
    """The input mapping of column-parallel layers: full-sequence input that every TP rank holds.

    Replicated ``[b, s, h]`` -> copy (grad all-reduced); sequence-split ``[b, s/tp, h]`` -> all-gather
    (grad reduce-scattered). Several column layers reading one input (q/k/v, gate/up) share one call.
    """
    if sequence_parallel:
        return gather_from_sequence_parallel_region(x, group)
    return copy_to_tensor_parallel_region(x, group)


def leave_tensor_parallel_region(x: torch.Tensor, group, sequence_parallel: bool) -> torch.Tensor:
    """The output mapping of row-parallel layers: sum partial results (reduce-scatter under SP)."""
    if sequence_parallel:
        return reduce_scatter_to_sequence_parallel_region(x, group)
    return reduce_from_tensor_parallel_region(x, group)
