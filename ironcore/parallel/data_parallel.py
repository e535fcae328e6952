"""Data parallelism with torch's own implementations: DDP, or FSDP2 (``fully_shard``).

`wrap_data_parallel` picks, from the config and the parallel state, for this rank's model chunks:

* DP = 1 without ``parallel.use_fsdp``, several pipeline stages (their gradients are averaged by
  ``pipeline.finalize_model_grads``) or ``parallel.use_distributed_optimizer`` (it reduce-scatters
  gradients itself, `ironcore.parallel.distributed_optimizer`): the chunks, unchanged;
* ``DistributedDataParallel`` over the DP group (every rank holds all parameters and optimizer
  state; gradients are all-reduced and averaged);
* ``parallel.use_fsdp``: FSDP2, ``torch.distributed.fsdp.fully_shard`` applied to every
  transformer block of every chunk (``chunk.layers[i]``, one all-gather / reduce-scatter unit
  each) and then to the chunk itself (embedding, final norm, head), over the mesh's data-parallel
  dimensions (`ironcore.parallel.mesh.fsdp_mesh`). It composes with TP and PP as torchtitan's does:
  the hand-written TP layers keep their local shards, which FSDP shards again over ``dp_shard``
  (a parameter is a ``DTensor`` over the DP sub-mesh whose full tensor is this TP rank's shard);
  pipeline chunks reduce-scatter their gradients in every micro-batch's backward. The optimizer,
  built afterwards, holds state for this rank's shard only. ``fully_shard`` works in place: the
  returned module is the chunk itself (its class swapped for an ``FSDPModule`` subclass), with the
  same parameter names.

FSDP keys (``parallel.*``) and what they mean in FSDP2 terms:

* ``fsdp_sharding_strategy``:
  - ``full``: ZeRO-3; parameters, gradients and optimizer state sharded over all DP ranks, and
    parameters freed again after each block's forward (``reshard_after_forward=True``);
  - ``hybrid``: HSDP on a 2-D ``(dp_replicate, dp_shard)`` mesh: sharded over the data-parallel
    ranks of a node (``LOCAL_WORLD_SIZE`` / (TP × CP)), replicated across nodes (gradients
    reduce-scattered in the node, then all-reduced across nodes);
  - ``no_shard``: DDP semantics through FSDP2: the same 2-D mesh with a shard dimension of size 1
    (``(dp, 1)``), i.e. every rank keeps whole parameters and gradients are all-reduced; this is
    how torch's own composable ``replicate`` is built. Nothing to free after forward
    (``reshard_after_forward=False``).
* ``fsdp_mixed_precision`` (``MixedPrecisionPolicy``; parameters stay fp32 in the optimizer):
  ``fp32`` no casting; ``bf16`` / ``fp16`` compute *and* reduce gradients in that dtype; ``mixed``
  computes in ``model.precision``'s dtype and reduces gradients in fp32 (with ``model.precision:
  float32``: bf16 compute on CUDA, plain fp32 on CPU, where bf16 matmuls are slower than fp32).
* ``fsdp_offload_params``: ``CPUOffloadPolicy``: shards, gradients and optimizer step live in CPU
  memory and are copied to the device per block (pinned memory on CUDA). Build the optimizer on
  the parameters' device (CPU then).
* ``fsdp_state_dict_type``: ``full`` gathers full tensors (`gather_full_tensors`) into the
  single-file checkpoint (``operation.save_dist_ckpt: false``); ``sharded`` writes each rank's
  DTensor shards with DCP into the distributed checkpoint (``operation.save_dist_ckpt: true``,
  ``ironcore.checkpoint.distributed``). Both load at any DP size, with or without FSDP; config
  validation rejects a ``save_dist_ckpt`` that disagrees. (The seed's ``local``, each rank's shards
  without a global plan, is not built: its checkpoints would load only at the same layout.)

Gradient accumulation: `no_sync` skips the gradient reduction of a micro-batch (DDP's ``no_sync``,
FSDP2's ``set_requires_gradient_sync(False)``, which accumulates unsharded gradients locally);
the last micro-batch reduces the sum. So DP = N computes the same update as DP = 1 with N times
the accumulation.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from ironcore.config import Config, ConfigError
from ironcore.parallel.mesh import fsdp_mesh
from ironcore.parallel.state import ParallelState

logger = logging.getLogger(__name__)


def wrap_data_parallel(chunks: list[nn.Module], cfg: Config, pstate: ParallelState) -> list[nn.Module]:
    """What the schedule runs for ``chunks`` (see the module docstring): themselves, DDP, or
    FSDP2-sharded in place. Call before building the optimizer (FSDP replaces the parameters)."""
    p = cfg.parallel
    if p.use_fsdp:
        mesh = fsdp_mesh(pstate.mesh, p.fsdp_sharding_strategy)
        if pstate.rank == 0:
            logger.info("FSDP2: %s sharding over mesh %s (%s), mixed precision %s, CPU offload %s",
                        p.fsdp_sharding_strategy, tuple(mesh.shape), ", ".join(mesh.mesh_dim_names),
                        p.fsdp_mixed_precision, p.fsdp_offload_params)
        return [_fully_shard(chunk, mesh, cfg, pstate) for chunk in chunks]
    if pstate.dp_cp_group is None or pstate.pp_size > 1 or p.use_distributed_optimizer:
        return list(chunks)
    device_ids = [pstate.device] if pstate.device.type == "cuda" else None
    return [DistributedDataParallel(chunks[0], process_group=pstate.dp_cp_group, device_ids=device_ids)]


def is_fsdp(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def reduces_gradients(model: nn.Module) -> bool:
    """Whether ``model`` reduces its gradients over DP itself (DDP or FSDP) in backward."""
    return isinstance(model, (DistributedDataParallel, FSDPModule))


@contextlib.contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """Skip the DP gradient reduction in the backward passes run inside: for all but the last
    micro-batch of a step. A no-op for a module that does not reduce gradients itself."""
    if isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def gather_full_tensors(state: Any, keep: bool) -> Any:
    """``state`` (a nested state dict) with every FSDP shard (``DTensor``) replaced by the whole
    tensor it is a shard of, on CPU, where ``keep`` (the rank that writes); elsewhere the gathered
    tensors are dropped at once. One tensor at a time, so no device holds a whole model; the full
    tensor of an FSDP × TP shard is this TP rank's shard. Collective over each shard's mesh: every
    rank of it calls this with the same ``state`` structure."""
    if isinstance(state, dict):
        gathered = {key: gather_full_tensors(value, keep) for key, value in state.items()}
        return {key: value for key, value in gathered.items() if value is not _DROPPED}
    if isinstance(state, list):
        return [gather_full_tensors(value, keep) for value in state]
    if isinstance(state, DTensor):
        whole = state.full_tensor()
        return whole.cpu() if keep else _DROPPED
    return state


_DROPPED = object()


# --------------------------------------------------------------------------------------------
# FSDP2


def mixed_precision_policy(fsdp_precision: str, model_precision: str, device: torch.device) -> MixedPrecisionPolicy:
    """The ``MixedPrecisionPolicy`` for ``parallel.fsdp_mixed_precision`` (module docstring)."""
    if fsdp_precision == "fp32":
        return MixedPrecisionPolicy()
    if fsdp_precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if fsdp_precision == "bf16" else torch.float16
        return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=dtype)
    if fsdp_precision != "mixed":
        raise ConfigError([f"parallel.fsdp_mixed_precision: {fsdp_precision!r} is not one of mixed, fp16, bf16, fp32"])
    compute = getattr(torch, model_precision)  # float32 / bfloat16 / float16
    if compute == torch.float32:
        compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    return MixedPrecisionPolicy(param_dtype=None if compute == torch.float32 else compute, reduce_dtype=torch.float32)


def _fully_shard(model: nn.Module, mesh: DeviceMesh, cfg: Config, pstate: ParallelState) -> nn.Module:
    p = cfg.parallel
    offload = OffloadPolicy()
    if p.fsdp_offload_params:
        offload = CPUOffloadPolicy(pin_memory=pstate.device.type == "cuda")
    kwargs = dict(mesh=mesh, reshard_after_forward=p.fsdp_sharding_strategy != "no_shard",
                  mp_policy=mixed_precision_policy(p.fsdp_mixed_precision, cfg.model.precision, pstate.device),
                  offload_policy=offload)
    # fully_shard replaces every parameter by a new DTensor one; the model's parallel attributes
    # (``vocab_parallel``, ``tensor_model_parallel``, ...) that checkpoints and norms read are kept.
    attributes = {name: dict(vars(param)) for name, param in model.named_parameters()}
    for block in model.layers:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    for name, param in model.named_parameters():
        vars(param).update(attributes[name])
    return model
