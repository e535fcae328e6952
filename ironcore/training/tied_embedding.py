"""A tied embedding split over the pipeline: the first stage's word embedding and the last stage's
LM head are two copies of one matrix (Megatron's layout). Their gradients are summed between the two
stages every step, so both copies take the same update and stay equal."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ironcore.parallel.state import ParallelState


def build_embedding_group(pstate: ParallelState, tied_embeddings: bool) -> Optional[dist.ProcessGroup]:
    """The group of the first and last stage of this rank's pipeline; None when there is nothing
    to sync (untied embeddings, one stage, or a rank in a middle stage). Collective: every rank
    creates every pipeline's group, in the mesh's order."""
    if not tied_embeddings or pstate.pp_size == 1:
        return None
    mine = None
    for ranks in pstate.shape.groups("pp"):
        group = dist.new_group([ranks[0], ranks[-1]], backend=pstate.backend)
        if pstate.rank in (ranks[0], ranks[-1]):
            mine = group
    return mine


def sync_tied_embedding_grads(model_chunks: Sequence[nn.Module], pstate: ParallelState,
                              embedding_group: Optional[dist.ProcessGroup]) -> None:
    """Sum the two copies' gradients over ``embedding_group`` (after the data-parallel reduction,
    before clipping). The copies are what the first chunk of the first stage and the last chunk of
    the last stage return from ``shared_embedding_weight()``. Under FSDP each copy is a DTensor
    shard; the two ranks hold the same shard of it (same data-parallel coordinate), so summing the
    local shards is the same sum."""
    if embedding_group is None:
        return
    chunks = list(model_chunks)
    weight = (chunks[0] if pstate.is_first_stage else chunks[-1]).shared_embedding_weight()
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    grad = weight.grad
    dist.all_reduce(grad.to_local() if hasattr(grad, "to_local") else grad, group=embedding_group)
