"""Parallel state on one process: world size 1 without a launcher, SLURM host parsing, bad layouts."""

import pytest
import torch
import torch.distributed as dist

from ironcore.config import ConfigError
from ironcore.config.schema import Config
from ironcore.parallel.mesh import mesh_shape
from ironcore.parallel.state import (
    _first_slurm_host,
    destroy_distributed,
    get_parallel_state,
    init_distributed,
)

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")


def test_single_process_without_launcher(monkeypatch):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    cfg = Config()
    state = init_distributed(cfg)
    try:
        assert get_parallel_state() is state
        assert (state.world_size, state.tp_size, state.pp_size, state.dp_size) == (1, 1, 1, 1)
        assert state.backend == ("nccl" if torch.cuda.is_available() else "gloo")
        assert state.is_first_stage and state.is_last_stage
        assert state.tp_group is None and state.pp_group is None and state.dp_group is None  # size one
        assert (cfg.parallel.rank, cfg.parallel.world_size) == (0, 1)
        t = torch.ones(1)
        dist.all_reduce(t)  # the world group works for code that always communicates
        assert t.item() == 1.0
    finally:
        destroy_distributed()
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_distributed"):
        get_parallel_state()


def test_slurm_first_host():
    assert _first_slurm_host("gpu[003-005,010],gpu020") == "gpu003"
    assert _first_slurm_host("node7") == "node7"
    assert _first_slurm_host("a[1,4]") == "a1"


def test_world_size_must_divide_by_tp_times_pp_times_cp():
    cfg = Config()
    cfg.trainer.tensor_model_parallel_size = 4
    with pytest.raises(ConfigError, match=r"world size 6 is not divisible by trainer.tensor_model_parallel_size \(4\)"):
        mesh_shape(cfg, 6)
