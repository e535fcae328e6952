"""The distributed optimizer (``parallel.use_distributed_optimizer``, Megatron's flag; ZeRO-1).

Without FSDP, every data-parallel replica holds all parameters, but the optimizer state (Adam's
moments) and the update are split over the DP group (``pstate.dp_cp``: with context parallelism
the CP ranks of a replica join it, as they hold the same weights and reduce gradients together):

* each param group's parameters are laid end to end in one flat fp32 buffer (padded to a multiple
  of the DP size), and the model's parameters become views of it; DP rank ``r`` owns the ``r``-th
  contiguous ``1/DP`` slice of every buffer, and the inner optimizer (the same fused Adam/AdamW
  `build_optimizer` makes) sees only that slice, as one parameter per group;
* after backward, `reduce_scatter_grads` flattens the gradients and reduce-scatters them, so each
  rank receives the DP-average of its slice only;
* `clip_grad_norm_` computes the global norm from the slices (TP-split elements summed over TP,
  TP-replicated ones counted once, a tied head's copy skipped, stages summed, as
  ``metrics.global_norm`` does for whole gradients);
* `step` updates the slice in place (it is a view of the buffer) and all-gathers the buffer, so
  every replica holds the updated parameters again.

The parameters stay fp32 (autocast computes in bf16/fp16: ``precision.py``), so the slice *is*
the fp32 main copy Megatron keeps beside bf16 weights: it is sharded with the state.

Checkpoints are layout-free: `full_state_dict` gathers each parameter's moments whole, in the
format ``get_optimizer_state_dict`` gives for a plain optimizer, and `load_full_state_dict` takes
that format back (from any DP size, with or without this optimizer), cutting this rank's slice.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from ironcore.parallel.state import ParallelState

logger = logging.getLogger(__name__)


@dataclass
class _Bucket:
    """One param group's flat buffer and this rank's slice ``[start, start + size)`` of it."""

    params: list[nn.Parameter]
    offsets: list[int]
    buffer: torch.Tensor
    start: int
    size: int
    shard: nn.Parameter        # a view of buffer[start:start+size]: the inner optimizer's parameter
    split: torch.Tensor        # bool per shard element: part of a TP-split parameter
    counted: torch.Tensor      # bool per shard element: counted in the norm (not a tied head's copy)


class DistributedOptimizer:
    """An Adam/AdamW whose state is sharded over the data-parallel group, context-parallel ranks
    included (``dp_cp``: they hold the same weights, as Megatron shards over them; module docstring)."""

    def __init__(self, groups: list[dict], make_optimizer: Callable[[list[dict]], torch.optim.Optimizer],
                 pstate: ParallelState):
        self.pstate = pstate
        self.buckets = [self._bucket(g["params"]) for g in groups]
        inner_groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [b.shard]}
                        for g, b in zip(groups, self.buckets)]
        self.optimizer = make_optimizer(inner_groups)

    def _bucket(self, params: list[nn.Parameter]) -> _Bucket:
        dp, rank = self.pstate.dp_cp_size, self.pstate.dp_cp_rank
        numel = sum(p.numel() for p in params)
        size = math.ceil(numel / dp)
        buffer = torch.zeros(size * dp, dtype=torch.float32, device=params[0].device)
        split = torch.zeros(size * dp, dtype=torch.bool, device=buffer.device)
        counted = torch.zeros(size * dp, dtype=torch.bool, device=buffer.device)
        offsets, offset = [], 0
        for p in params:
            view = buffer[offset:offset + p.numel()]
            view.copy_(p.detach().reshape(-1))
            p.data = view.view_as(p)  # the model's parameter now lives in the buffer
            split[offset:offset + p.numel()] = bool(getattr(p, "tensor_model_parallel", False))
            counted[offset:offset + p.numel()] = not getattr(p, "shared_embedding", False)
            offsets.append(offset)
            offset += p.numel()
        start = rank * size
        return _Bucket(params, offsets, buffer, start, size, nn.Parameter(buffer[start:start + size]),
                       split[start:start + size].clone(), counted[start:start + size].clone())

    # ------------------------------------------------------------------ the optimizer interface

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        for bucket in self.buckets:
            bucket.shard.grad = None
            for p in bucket.params:
                p.grad = None

    def reduce_scatter_grads(self) -> None:
        """Each rank's slice of the DP-averaged gradients (call after backward and any gradient
        fix-ups on whole gradients: sequence-parallel and tied-embedding sums)."""
        group, dp = self.pstate.dp_cp_group, self.pstate.dp_cp_size
        for b in self.buckets:
            flat = torch.zeros_like(b.buffer)
            for p, offset in zip(b.params, b.offsets):
                if p.grad is not None:
                    flat[offset:offset + p.numel()] = p.grad.reshape(-1)
                p.grad = None  # the whole gradient is no longer needed
            mine = flat[b.start:b.start + b.size].clone()
            if group is not None:
                dist.reduce_scatter_single(mine, flat, group=group)
                mine /= dp
            b.shard.grad = mine

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale the slices' gradients so the global norm is at most ``max_norm`` (0: only
        measure); returns the norm before clipping (a non-finite one leaves them untouched)."""
        p = self.pstate
        split = torch.zeros((), device=self.buckets[0].buffer.device)
        replicated = torch.zeros_like(split)
        for b in self.buckets:
            sq = b.shard.grad.float().pow(2)
            split += sq[b.split & b.counted].sum()
            replicated += sq[~b.split & b.counted].sum()
        sums = torch.stack([split, replicated])
        if p.dp_cp_group is not None:
            dist.all_reduce(sums, group=p.dp_cp_group)  # the slices partition each gradient
        if p.tp_group is not None:
            dist.all_reduce(sums[0:1], group=p.tp_group)
        total = sums.sum()
        if p.pp_group is not None:
            dist.all_reduce(total, group=p.pp_group)
        total = total.sqrt()
        if max_norm > 0 and torch.isfinite(total):
            coef = max_norm / (float(total) + 1e-6)
            if coef < 1.0:
                for b in self.buckets:
                    b.shard.grad.mul_(coef)
        return total

    def step(self) -> None:
        """Update this rank's slices, then all-gather every buffer (the parameters are views)."""
        self.optimizer.step()
        if self.pstate.dp_cp_group is None:
            return
        for b in self.buckets:
            dist.all_gather_single(b.buffer, b.shard.detach().clone(), group=self.pstate.dp_cp_group)

    # ------------------------------------------------------------------ checkpoints

    def init_state(self) -> None:
        """Adam's state as a first step creates it (zero moments, step 0) where there is none yet,
        so a checkpoint can be read into it."""
        for b in self.buckets:
            if b.shard not in self.optimizer.state:
                self.optimizer.state[b.shard] = {
                    "step": torch.zeros((), dtype=torch.float32, device=b.buffer.device),
                    "exp_avg": torch.zeros_like(b.shard.detach()), "exp_avg_sq": torch.zeros_like(b.shard.detach())}

    def _names(self, model: nn.Module) -> dict[int, str]:
        return {id(p): name for name, p in model.named_parameters()}

    def full_state_dict(self, model: nn.Module) -> dict:
        """``get_optimizer_state_dict``'s format for a plain optimizer over ``model``: every
        parameter's state whole, by name. Collective over the DP group."""
        names = self._names(model)
        state, groups = {}, []
        for b, group in zip(self.buckets, self.param_groups):
            groups.append({**{k: v for k, v in group.items() if k != "params"},
                           "params": [names[id(p)] for p in b.params]})
            slice_state = self.state.get(b.shard, {})
            whole = {key: self._gather(b, value) for key, value in slice_state.items()
                     if isinstance(value, torch.Tensor) and value.shape == b.shard.shape}
            for p, offset in zip(b.params, b.offsets):
                entry = {key: value[offset:offset + p.numel()].view_as(p).clone() for key, value in whole.items()}
                entry.update({key: value.clone() for key, value in slice_state.items() if key not in whole})
                state[names[id(p)]] = entry
        return {"state": state, "param_groups": groups}

    def _gather(self, b: _Bucket, value: torch.Tensor) -> torch.Tensor:
        if self.pstate.dp_cp_group is None:
            return value
        whole = torch.empty(b.size * self.pstate.dp_cp_size, dtype=value.dtype, device=value.device)
        dist.all_gather_single(whole, value.contiguous(), group=self.pstate.dp_cp_group)
        return whole

    def load_full_state_dict(self, model: nn.Module, saved: dict) -> None:
        """Load `full_state_dict`'s format (saved at any DP size, or by a plain optimizer)."""
        names = self._names(model)
        groups = saved.get("param_groups")
        if not isinstance(groups, list) or len(groups) != len(self.buckets):
            raise ValueError(f"the saved optimizer state has {len(groups or [])} param groups, this optimizer "
                             f"has {len(self.buckets)}")
        for b, group, saved_group in zip(self.buckets, self.param_groups, groups):
            group.update({k: v for k, v in saved_group.items() if k != "params"})
            entries = [saved["state"].get(names[id(p)]) for p in b.params]
            if any(e is None for e in entries):
                continue  # no state saved yet (a checkpoint before the first step)
            slice_state = {}
            for key, value in entries[0].items():
                if isinstance(value, torch.Tensor) and value.shape == b.params[0].shape:
                    flat = torch.zeros_like(b.buffer)
                    for p, offset, entry in zip(b.params, b.offsets, entries):
                        flat[offset:offset + p.numel()] = entry[key].reshape(-1).to(flat)
                    slice_state[key] = flat[b.start:b.start + b.size].clone()
                else:
                    slice_state[key] = value.clone().to(b.buffer.device) if isinstance(value, torch.Tensor) else value
            self.optimizer.state[b.shard] = slice_state


def is_distributed_optimizer(optimizer) -> bool:
    return isinstance(optimizer, DistributedOptimizer)


def optimizer_state_dict(model: nn.Module, optimizer, options=None) -> dict:
    """The optimizer's state by parameter name (``get_optimizer_state_dict`` for torch's)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if is_distributed_optimizer(optimizer):
        return optimizer.full_state_dict(model)
    return get_optimizer_state_dict(model, optimizer, options=options)


def optimizer_template(model: nn.Module, optimizer) -> dict:
    """`optimizer_state_dict` with every state tensor present (zeros before the first step), for
    a distributed checkpoint to read into in place."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if is_distributed_optimizer(optimizer):
        optimizer.init_state()
        return optimizer.full_state_dict(model)
    return get_optimizer_state_dict(model, optimizer)  # it initialises torch's state itself


def set_optimizer_state(model: nn.Module, optimizer, state: dict, options=None) -> None:
    """Load `optimizer_state_dict`'s format into ``optimizer`` (``set_optimizer_state_dict``)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    if is_distributed_optimizer(optimizer):
        optimizer.load_full_state_dict(model, state)
    else:
        set_optimizer_state_dict(model, optimizer, state, options=options)


def inner_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer whose param groups the LR schedule drives."""
    return optimizer.optimizer if is_distributed_optimizer(optimizer) else optimizer


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of optimizer state (tensors) this rank holds."""
    opt = inner_optimizer(optimizer)
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))

