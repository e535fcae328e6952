"""Data parallelism with torch's own implementations: DDP, or FSDP2 (``fully_shard``).

`wrap_data_parallel` picks, from the config and the parallel state:

* DP = 1 without ``parallel.use_fsdp``: the model, unchanged;
* ``DistributedDataParallel`` over the DP group (every rank holds all parameters and optimizer
  state; gradients are all-reduced and averaged);
* ``parallel.use_fsdp``: FSDP2, ``torch.distributed.fsdp.fully_shard`` applied to every
  transformer block (``model.layers[i]``, one all-gather / reduce-scatter unit each) and then to
  the root (embedding, final norm, head). Parameters become ``DTensor`` shards of the DP mesh
  (dim 0, evenly); the optimizer, built afterwards, holds state for this rank's shard only.
  ``fully_shard`` works in place: the returned module is the model itself (its class swapped for
  an ``FSDPModule`` subclass), with the same parameter names.

FSDP keys (``parallel.*``) and what they mean in FSDP2 terms:

* ``fsdp_sharding_strategy``:
  - ``full``: ZeRO-3; parameters, gradients and optimizer state sharded over all DP ranks, and
    parameters freed again after each block's forward (``reshard_after_forward=True``);
  - ``hybrid``: HSDP on a 2-D ``(dp_replicate, dp_shard)`` mesh: sharded within a node (the
    ``LOCAL_WORLD_SIZE`` ranks torchrun starts per node), replicated across nodes (gradients
    reduce-scattered in the node, then all-reduced across nodes). The DP size must be a multiple
    of the ranks per node;
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
* ``fsdp_state_dict_type``: ``full`` gathers full tensors (``torch.distributed.checkpoint.state_dict``
  with ``full_state_dict=True, cpu_offload=True``, see `full_state_dict_options`) into the
  single-file checkpoint (``operation.save_dist_ckpt: false``); ``sharded`` writes each rank's
  DTensor shards with DCP into the distributed checkpoint (``operation.save_dist_ckpt: true``,
  ``ironcore.checkpoint.distributed``). Both load at any DP size, with or without FSDP. ``local``
  is rejected by config validation, as is a ``save_dist_ckpt`` that disagrees.

Supported with ``trainer.tensor_model_parallel_size = 1`` and ``pipeline_model_parallel_size =
1`` (config validation rejects the rest): the DP group is then the whole world.

Gradient accumulation: `no_sync` skips the gradient reduction of a micro-batch (DDP's ``no_sync``,
FSDP2's ``set_requires_gradient_sync(False)``, which accumulates unsharded gradients locally);
the last micro-batch reduces the sum. So DP = N computes the same update as DP = 1 with N times
the accumulation.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from ironcore.config import Config, ConfigError
from ironcore.parallel.state import ParallelState

logger = logging.getLogger(__name__)


def wrap_data_parallel(model: nn.Module, cfg: Config, pstate: ParallelState) -> nn.Module:
    """``model`` ready for data-parallel training (see the module docstring): itself, DDP, or
    FSDP2-sharded in place. Call before building the optimizer (FSDP replaces the parameters)."""
    if cfg.parallel.use_fsdp:
        return _fully_shard(model, cfg, pstate)
    if pstate.dp_group is None:
        return model
    return DistributedDataParallel(model, process_group=pstate.dp_group,
                                   device_ids=[pstate.device] if pstate.device.type == "cuda" else None)


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


def full_state_dict_options(model: nn.Module) -> StateDictOptions:
    """Options for ``get_model_state_dict`` / ``get_optimizer_state_dict`` (and their ``set_``)
    that give whole tensors, as the single-file checkpoint stores them. Under FSDP the shards are
    gathered to CPU on rank 0 only (the rank that writes; the others get empty dicts), so no
    device holds a full copy; otherwise the tensors are views of the live ones, no copy."""
    return StateDictOptions(full_state_dict=True, cpu_offload=is_fsdp(model))


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


def hsdp_shape(dp_size: int, ranks_per_node: int) -> tuple[int, int]:
    """``(replicate, shard)`` sizes of the hybrid mesh: shard within a node, replicate across."""
    if ranks_per_node < 1 or dp_size % ranks_per_node:
        raise ConfigError([
            f"parallel.fsdp_sharding_strategy: hybrid shards within a node and replicates across nodes, "
            f"but the data-parallel size {dp_size} is not a multiple of the {ranks_per_node} ranks per node "
            f"(LOCAL_WORLD_SIZE): launch the same number of ranks on every node, or use full"])
    return dp_size // ranks_per_node, ranks_per_node


def _ranks_per_node(device: torch.device) -> int:
    if os.environ.get("LOCAL_WORLD_SIZE"):
        return int(os.environ["LOCAL_WORLD_SIZE"])
    if device.type == "cuda":
        return torch.cuda.device_count()
    raise ConfigError(["parallel.fsdp_sharding_strategy: hybrid needs the number of ranks per node: launch with "
                       "torchrun (it sets LOCAL_WORLD_SIZE) or set LOCAL_WORLD_SIZE"])


def dp_mesh(cfg: Config, pstate: ParallelState) -> DeviceMesh:
    """The FSDP mesh over the DP ranks: 1-D for ``full``; 2-D ``(dp_replicate, dp_shard)`` for
    ``hybrid`` and ``no_shard`` (HSDP). Collective: creates process groups on every rank."""
    if pstate.tp_size > 1 or pstate.pp_size > 1:
        raise ConfigError(["parallel.use_fsdp supports trainer.tensor_model_parallel_size = 1 and "
                           "trainer.pipeline_model_parallel_size = 1 only"])
    strategy = cfg.parallel.fsdp_sharding_strategy
    if strategy == "full":
        return init_device_mesh(pstate.device.type, (pstate.dp_size,), mesh_dim_names=("dp_shard",))
    if strategy == "no_shard":
        shape = (pstate.dp_size, 1)
    elif strategy == "hybrid":
        shape = hsdp_shape(pstate.dp_size, _ranks_per_node(pstate.device))
    else:
        raise ConfigError([f"parallel.fsdp_sharding_strategy: {strategy!r} is not one of full, hybrid, no_shard"])
    return init_device_mesh(pstate.device.type, shape, mesh_dim_names=("dp_replicate", "dp_shard"))


def _fully_shard(model: nn.Module, cfg: Config, pstate: ParallelState) -> nn.Module:
    p = cfg.parallel
    mesh = dp_mesh(cfg, pstate)
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
    if pstate.rank == 0:
        logger.info("FSDP2: %s sharding over mesh %s (%s), mixed precision %s, CPU offload %s",
                    p.fsdp_sharding_strategy, tuple(mesh.shape), ", ".join(mesh.mesh_dim_names),
                    p.fsdp_mixed_precision, p.fsdp_offload_params)
    return model
