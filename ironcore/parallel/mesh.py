"""The one rank layout: a ``DeviceMesh`` with named dimensions ``(pp, dp_replicate, dp_shard, cp, tp)``.

Every process group, rank formula and checkpoint shard name in IronCore comes from here. The
dimensions are laid out row-major in that order, so **TP is innermost**: a TP group is a run of
consecutive ranks, i.e. one node's GPUs, where NVLink carries the per-layer all-reduces; CP (the
next most talkative, a ring of K/V blocks per layer) sits next to it; the data-parallel dimensions
(one reduce per step) come next, and PP (point-to-point activations only) is outermost, so
pipeline stages may span nodes::

    rank = (((pp · R + dp_replicate) · S + dp_shard) · C + cp) · T + tp

with ``R, S, C, T`` the sizes of dp_replicate, dp_shard, cp and tp. Example, 8 ranks with TP=2,
PP=2, DP=2: TP groups [0,1] [2,3] [4,5] [6,7]; DP groups [0,2] [1,3] [4,6] [5,7]; PP groups [0,4]
[1,5] [2,6] [3,7] (this is Megatron's order too, so checkpoints of both rounds agree).

The data-parallel size ``dp = dp_replicate × dp_shard`` is split by the data-parallel method:
DDP and the distributed optimizer replicate (``dp_replicate = dp``); FSDP ``full`` shards over all
of it (``dp_shard = dp``); HSDP (``hybrid``) shards within a node and replicates across nodes;
``no_shard`` replicates through FSDP. The flattened ``dp`` dimension is the data loader's (CP ranks
of a replica read the same sequences); the flattened ``dp_cp = dp × cp`` dimension is the gradient
reduction's and the loss average's (DDP, the distributed optimizer, FSDP's ``dp_shard × cp``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ironcore.config import ConfigError

DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class MeshShape:
    """Sizes of the mesh dimensions; the rank arithmetic, without any process group."""

    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(getattr(self, dim) for dim in DIMS)

    @property
    def world_size(self) -> int:
        return math.prod(self.sizes)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    def coordinates(self, rank: int) -> dict[str, int]:
        """Where ``rank`` sits: its index along every dimension."""
        coords = {}
        for dim in reversed(DIMS):
            rank, coords[dim] = divmod(rank, getattr(self, dim))
        return {dim: coords[dim] for dim in DIMS}

    def rank(self, **coords: int) -> int:
        """The rank at ``coords`` (missing dimensions are 0)."""
        rank = 0
        for dim in DIMS:
            rank = rank * getattr(self, dim) + coords.get(dim, 0)
        return rank

    def groups(self, *dims: str) -> list[list[int]]:
        """Every group that varies along ``dims`` (the others fixed), each in rank order; the
        groups are ordered by their first rank, as every rank must create them."""
        others = [d for d in DIMS if d not in dims]
        result = []
        for fixed in _product({d: getattr(self, d) for d in others}):
            members = [self.rank(**fixed, **varying) for varying in _product({d: getattr(self, d) for d in dims})]
            result.append(sorted(members))
        return sorted(result)


def _product(sizes: dict[str, int]) -> list[dict[str, int]]:
    combos: list[dict[str, int]] = [{}]
    for dim, size in sizes.items():
        combos = [{**c, dim: i} for c in combos for i in range(size)]
    return combos


def mesh_shape(cfg, world_size: int) -> MeshShape:
    """The mesh for ``cfg`` on ``world_size`` ranks. Layout rules are checked by config validation;
    what is only known at launch (world size, ranks per node) is checked here."""
    t = cfg.trainer
    tp, pp, cp = t.tensor_model_parallel_size, t.pipeline_model_parallel_size, t.context_parallel_size
    if world_size % (tp * pp * cp):
        raise ConfigError([
            f"world size {world_size} is not divisible by trainer.tensor_model_parallel_size ({tp}) × "
            f"trainer.pipeline_model_parallel_size ({pp}) × trainer.context_parallel_size ({cp})"])
    dp = world_size // (tp * pp * cp)
    p = cfg.parallel
    if not p.use_fsdp or p.fsdp_sharding_strategy == "no_shard":
        replicate, shard = dp, 1
    elif p.fsdp_sharding_strategy == "full":
        replicate, shard = 1, dp
    else:
        replicate, shard = _hybrid_split(dp, _ranks_per_node() // (tp * cp) or 1)
    return MeshShape(pp=pp, dp_replicate=replicate, dp_shard=shard, cp=cp, tp=tp)


def _hybrid_split(dp: int, dp_per_node: int) -> tuple[int, int]:
    """``(replicate, shard)`` of HSDP: shard over the data-parallel ranks of a node."""
    if dp % dp_per_node and dp_per_node % dp:
        raise ConfigError([
            f"parallel.fsdp_sharding_strategy: hybrid shards within a node and replicates across nodes, but the "
            f"data-parallel size {dp} and the {dp_per_node} data-parallel ranks per node (LOCAL_WORLD_SIZE / "
            f"(TP × CP)) do not divide: launch the same number of ranks on every node, or use full"])
    shard = min(dp, dp_per_node)
    return dp // shard, shard


def _ranks_per_node() -> int:
    if os.environ.get("LOCAL_WORLD_SIZE"):
        return int(os.environ["LOCAL_WORLD_SIZE"])
    if torch.cuda.is_available():
        return torch.cuda.device_count()
    raise ConfigError(["parallel.fsdp_sharding_strategy: hybrid needs the number of ranks per node: launch with "
                       "torchrun (it sets LOCAL_WORLD_SIZE) or set LOCAL_WORLD_SIZE"])


def build_device_mesh(shape: MeshShape, device_type: str) -> tuple[DeviceMesh, DeviceMesh, DeviceMesh]:
    """The process groups of ``shape`` (collective: every rank calls it, after
    ``init_process_group``): the mesh, its flattened ``dp = dp_replicate × dp_shard`` mesh (the data
    loader's ranks) and its flattened ``dp_cp = dp × cp`` mesh (the gradient reduction's ranks: the
    CP ranks of a replica hold the same weights and different tokens, so, as Megatron does, their
    gradients are averaged with the data-parallel ones). ``dp_shard_cp`` is flattened too: FSDP
    shards over it."""
    mesh = init_device_mesh(device_type, shape.sizes, mesh_dim_names=DIMS)
    dp_mesh = mesh["dp_replicate", "dp_shard"]._flatten("dp")
    dp_cp_mesh = mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
    mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
    return mesh, dp_mesh, dp_cp_mesh


def fsdp_mesh(mesh: DeviceMesh, strategy: str) -> DeviceMesh:
    """The sub-mesh FSDP2 shards over: ``dp_shard × cp`` for ``full``; ``(dp_replicate,
    dp_shard × cp)`` for ``hybrid`` (HSDP) and ``no_shard`` (a shard size of 1 without CP). CP
    ranks share the shards (as torchtitan's ``dp_shard_cp``), so their gradients are reduced too."""
    return mesh["dp_shard_cp"] if strategy == "full" else mesh["dp_replicate", "dp_shard_cp"]


def group_of(mesh: DeviceMesh, dim: Optional[str] = None):
    """The process group of this rank along ``dim`` of ``mesh`` (a 1-D mesh's own without it);
    ``None`` for a size-1 dimension, which every collective in ``parallel/`` skips."""
    sub = mesh[dim] if dim is not None else mesh
    return None if sub.size() == 1 else sub.get_group()
