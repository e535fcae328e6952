"""Where this process sits in the layout, and the process groups it talks to.

The layout itself (rank order, group membership) is `ironcore.parallel.mesh`'s: `init_distributed`
builds the one ``DeviceMesh`` and reads every group and coordinate off it. `ParallelState` is the
flat view the model and the loop use (``tp_group``, ``dp_rank``, ...).

A group of size one is stored as ``None`` (callers test ``group is not None`` before a collective:
to torch.distributed ``None`` would mean the WORLD group). Every function in ``parallel/`` skips
communication for ``None``, so a plain ``ParallelState()`` describes a single process and is enough
to build and run a model without ``torch.distributed`` (tests, conversion tools, generation).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from ironcore.config.launcher import launch_env
from ironcore.parallel.mesh import DIMS, MeshShape, build_device_mesh, group_of, mesh_shape

logger = logging.getLogger(__name__)

ProcessGroup = Optional[dist.ProcessGroup]


@dataclass
class ParallelState:
    """Where this process sits in the PP × DP × CP × TP mesh, and the groups it talks to. ``dp`` is
    the flattened ``dp_replicate × dp_shard`` dimension (the data loader's), ``dp_cp`` the flattened
    ``dp × cp`` one (gradient reduction and loss averaging; equal to ``dp`` without CP); ``mesh`` is
    None for a single process described without torch.distributed."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = "gloo"
    tp_size: int = 1
    tp_rank: int = 0
    tp_group: ProcessGroup = None
    pp_size: int = 1
    pp_rank: int = 0
    pp_group: ProcessGroup = None
    dp_size: int = 1
    dp_rank: int = 0
    dp_group: ProcessGroup = None
    cp_size: int = 1
    cp_rank: int = 0
    cp_group: ProcessGroup = None
    dp_cp_size: int = 1
    dp_cp_rank: int = 0
    dp_cp_group: ProcessGroup = None
    shape: MeshShape = MeshShape()
    mesh: Optional[DeviceMesh] = None

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


_STATE: Optional[ParallelState] = None
_OWNS_PROCESS_GROUP = False


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list such as ``gpu[003-005,010],gpu020`` -> ``gpu003``."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if match is None:
        raise ValueError(f"cannot parse SLURM_NODELIST={nodelist!r}")
    prefix, ranges = match.groups()
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _launch_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the launcher (config/launcher.py, shared with validation)."""
    if "SLURM_NTASKS" in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", _first_slurm_host(os.environ.get("SLURM_NODELIST", "127.0.0.1")))
        os.environ.setdefault("MASTER_PORT", "29500")
    return launch_env()


def _pick_backend(requested: str, local_rank: int) -> tuple[str, torch.device]:
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return requested, device
    if requested == "nccl":
        logger.info("parallel.dist_backend=nccl but no CUDA device is available: using gloo on CPU")
    return "gloo", torch.device("cpu")


def build_parallel_state(shape: MeshShape, rank: int, local_rank: int, device: torch.device,
                         backend: str) -> ParallelState:
    """Build the mesh of ``shape`` (collective) and read this rank's groups and coordinates off it."""
    mesh, dp_mesh, dp_cp_mesh = build_device_mesh(shape, device.type)
    coords = shape.coordinates(rank)
    return ParallelState(
        rank=rank, world_size=shape.world_size, local_rank=local_rank, device=device, backend=backend,
        tp_size=shape.tp, tp_rank=coords["tp"], tp_group=group_of(mesh, "tp"),
        pp_size=shape.pp, pp_rank=coords["pp"], pp_group=group_of(mesh, "pp"),
        dp_size=shape.dp, dp_rank=coords["dp_replicate"] * shape.dp_shard + coords["dp_shard"],
        dp_group=group_of(dp_mesh),
        cp_size=shape.cp, cp_rank=coords["cp"], cp_group=group_of(mesh, "cp"),
        dp_cp_size=shape.dp * shape.cp, dp_cp_rank=dp_cp_mesh.get_local_rank(), dp_cp_group=group_of(dp_cp_mesh),
        shape=shape, mesh=mesh,
    )


_WATCHING_LAUNCHER = False


def _exit_with_launcher(rank: int) -> None:
    """Under torchrun, end this worker when its launcher (the elastic agent, our parent) dies.

    torchrun starts its workers in their own sessions, so a SIGKILL of the agent leaves them
    training and saving as orphans that collide with the relaunched job. A daemon thread notices
    the parent change (we are re-parented) within a second and exits the process at once; the
    checkpoints are atomic, so nothing half-written is ever published.
    """
    global _WATCHING_LAUNCHER
    if "TORCHELASTIC_RUN_ID" not in os.environ or _WATCHING_LAUNCHER:
        return
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(1.0)
        sys.stderr.write(f"ironcore: rank {rank}: the torchrun agent (pid {launcher}) is gone: exiting\n")
        sys.stderr.flush()
        os._exit(1)

    threading.Thread(target=watch, name="ironcore-launcher-watch", daemon=True).start()
    _WATCHING_LAUNCHER = True


def init_distributed(cfg) -> ParallelState:
    """Initialise torch.distributed from the launcher's environment and build the process groups.

    torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) or SLURM (SLURM_PROCID, SLURM_NTASKS,
    SLURM_LOCALID, master = first host of SLURM_NODELIST) decide; without either this is a single
    process (world size 1, served by an in-memory store). ``cfg.parallel.rank/local_rank/world_size``
    are filled in from what was found. Reuses a process group that is already initialised.
    """
    global _STATE, _OWNS_PROCESS_GROUP
    rank, world_size, local_rank = _launch_env()
    _exit_with_launcher(rank)
    backend, device = _pick_backend(cfg.parallel.dist_backend, local_rank)
    if not dist.is_initialized():
        timeout = timedelta(minutes=cfg.parallel.timeout_minute)
        if world_size == 1 and "MASTER_ADDR" not in os.environ:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
        _OWNS_PROCESS_GROUP = True
    else:
        rank, world_size = dist.get_rank(), dist.get_world_size()
    cfg.parallel.rank, cfg.parallel.world_size, cfg.parallel.local_rank = rank, world_size, local_rank
    shape = mesh_shape(cfg, world_size)
    _STATE = build_parallel_state(shape, rank, local_rank, device, backend)
    if rank == 0:
        logger.info("torch.distributed: backend %s, world size %d, mesh %s, device %s", backend, world_size,
                    " × ".join(f"{dim} {size}" for dim, size in zip(DIMS, shape.sizes)), device.type)
    return _STATE


def get_parallel_state() -> ParallelState:
    """The state built by `init_distributed` (raises if it was not called)."""
    if _STATE is None:
        raise RuntimeError("parallel state is not initialised: call ironcore.parallel.state.init_distributed(cfg) first")
    return _STATE


def destroy_distributed() -> None:
    """Forget the parallel state and destroy the process group if `init_distributed` created it."""
    global _STATE, _OWNS_PROCESS_GROUP
    if _OWNS_PROCESS_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _STATE, _OWNS_PROCESS_GROUP = None, False
