"""TP × PP × sharded data parallelism on one mesh, through the training loop (issue: one mesh, one
build seam): FSDP2 × TP, FSDP2 × PP, HSDP and the distributed optimizer × TP × PP follow the
single-process loss trajectory; their checkpoints resume bit-exactly in the same layout and
continue to 1e-5 in another; the distributed optimizer halves the optimizer state per rank."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ironcore.training.trainer import train
from tests.multiproc import run_distributed
from tests.train_helpers import load, losses, write_config

STEPS, HALF = 6, 3
# micro 2 × 4 accumulation at DP = 1 is 8 samples a step, at every layout below.
GROUPS = dict(trainer={"micro_batch_size": 2, "train_batch_size": 8, "save_checkpoint_steps": HALF},
              optim={"max_lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2, "clip_grad": 0.5})
FSDP = ["parallel.use_fsdp=true"]
SHARDED_CKPT = ["parallel.fsdp_state_dict_type=sharded", "operation.save_dist_ckpt=true"]
TP2, PP2 = "trainer.tensor_model_parallel_size=2", "trainer.pipeline_model_parallel_size=2"
DIST_OPT = "parallel.use_distributed_optimizer=true"
STOP_HALFWAY = f"operation.exit_interval={HALF}"  # same schedule as the whole run, saved at HALF


def _train_worker(path: str, overrides: list[str]) -> dict:
    return train(load(Path(path), *overrides))


def _run(tmp_path: Path, name: str, ranks: int, overrides: list[str], save: bool = False,
         env: dict | None = None) -> list[dict]:
    path = str(write_config(tmp_path, name, operation={"train_steps": STEPS, "no_save": not save}, **GROUPS))
    if ranks == 1:
        return [train(load(Path(path), *overrides))]
    return run_distributed(_train_worker, ranks, path, overrides, timeout=400, env=env)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    """The single-process trajectory every layout must follow."""
    tmp = tmp_path_factory.mktemp("reference")
    _run(tmp, "single", 1, [])
    trajectory = losses(tmp / "single")
    assert sorted(trajectory) == list(range(1, STEPS + 1)) and trajectory[STEPS] < trajectory[1]
    return trajectory


def _assert_follows(trajectory: dict[int, float], reference: dict[int, float], steps=range(1, STEPS + 1)):
    assert sorted(trajectory) == list(steps)
    for step in steps:
        assert trajectory[step] == pytest.approx(reference[step], abs=1e-5), step


@pytest.mark.parametrize("name, ranks, overrides, env", [
    ("fsdp_tp2", 4, [*FSDP, TP2], None),
    ("fsdp_pp2", 4, [*FSDP, PP2], None),
    # Two "nodes" of two ranks: FSDP shards within a node and replicates across the two.
    ("hsdp_2x2", 4, [*FSDP, "parallel.fsdp_sharding_strategy=hybrid"], {"LOCAL_WORLD_SIZE": "2"}),
])
def test_fsdp_composes_with_tp_pp_and_hsdp(tmp_path, reference, name, ranks, overrides, env):
    summaries = _run(tmp_path, name, ranks, overrides, env=env)
    _assert_follows(losses(tmp_path / name), reference)
    assert summaries[0]["consumed_samples"] == 8 * STEPS


def test_distributed_optimizer_with_tp2_pp2_dp2_on_8_ranks(tmp_path, reference):
    _run(tmp_path, "distopt_tp2_pp2_dp2", 8, [DIST_OPT, TP2, PP2])
    _assert_follows(losses(tmp_path / "distopt_tp2_pp2_dp2"), reference)


def test_distributed_optimizer_shards_the_state_and_reshards_on_resume(tmp_path, reference):
    dp1 = _run(tmp_path, "plain_dp1", 1, ["operation.exit_interval=1"])[0]
    full = _run(tmp_path, "distopt", 2, [DIST_OPT], save=True)
    _assert_follows(losses(tmp_path / "distopt"), reference)
    # Measured optimizer state of rank 0 (Adam's moments): half of DP = 1's, plus padding.
    assert 0 < full[0]["optimizer_state_bytes"] <= 0.55 * dp1["optimizer_state_bytes"]

    _run(tmp_path, "interrupted", 2, [DIST_OPT, STOP_HALFWAY], save=True)
    for resumed, ranks in (("same_layout", 2), ("dp1", 1)):
        shutil.copytree(tmp_path / "interrupted", tmp_path / resumed)
        (tmp_path / resumed / "metrics.jsonl").unlink()
        _run(tmp_path, resumed, ranks, [DIST_OPT], save=True)
    uninterrupted = losses(tmp_path / "distopt")
    assert losses(tmp_path / "same_layout") == {s: uninterrupted[s] for s in range(HALF + 1, STEPS + 1)}
    _assert_follows(losses(tmp_path / "dp1"), uninterrupted, range(HALF + 1, STEPS + 1))


def test_fsdp_tp2_checkpoint_resumes_bit_exactly_and_reshards_to_tp1(tmp_path, reference):
    layout = [*FSDP, *SHARDED_CKPT, TP2]
    _run(tmp_path, "uninterrupted", 4, layout)
    _run(tmp_path, "interrupted", 4, [*layout, STOP_HALFWAY], save=True)
    for resumed, ranks, overrides in (("same_layout", 4, layout), ("tp1_fsdp2", 2, [*FSDP, *SHARDED_CKPT])):
        shutil.copytree(tmp_path / "interrupted", tmp_path / resumed)
        (tmp_path / resumed / "metrics.jsonl").unlink()
        _run(tmp_path, resumed, ranks, overrides, save=True)
    uninterrupted = losses(tmp_path / "uninterrupted")
    _assert_follows(uninterrupted, reference)
    assert losses(tmp_path / "same_layout") == {s: uninterrupted[s] for s in range(HALF + 1, STEPS + 1)}
    _assert_follows(losses(tmp_path / "tp1_fsdp2"), uninterrupted, range(HALF + 1, STEPS + 1))
