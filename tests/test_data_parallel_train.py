"""`parallel.use_fsdp` through the training loop: FSDP2 over DP = 2 trains, evaluates and saves
exactly what DP = 1 (plain, unsharded) does with twice the gradient accumulation."""

from pathlib import Path

import pytest
import torch

from ironcore.checkpoint.io import checkpoint_dir, model_file, optim_file
from ironcore.training.trainer import train
from tests.multiproc import run_distributed
from tests.train_helpers import load, losses, write_config

STEPS = 4


def _train_worker(path: str) -> dict:
    return train(load(Path(path)))


def _run_config(tmp_path: Path, name: str, fsdp: bool) -> Path:
    # micro 2 × accumulation 2 × DP 2 (FSDP) and micro 2 × accumulation 4 × DP 1: 8 samples per step.
    return write_config(tmp_path, name, trainer={"micro_batch_size": 2, "train_batch_size": 8, "do_eval": True},
                        operation={"train_steps": STEPS, "no_save": False, "eval_interval": STEPS,
                                   "eval_samples": 8},
                        parallel={"dist_backend": "gloo", "use_fsdp": fsdp})


def test_fsdp_training_loop_matches_dp1_and_saves_the_same_checkpoint(tmp_path):
    summaries = run_distributed(_train_worker, 2, str(_run_config(tmp_path, "fsdp", True)))
    cfg = load(_run_config(tmp_path, "dp1", False))
    assert cfg.trainer.gradient_accumulation_steps == 4
    single = train(cfg)

    a, b = losses(tmp_path / "fsdp"), losses(tmp_path / "dp1")
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-5), step
    assert a[STEPS] < a[1]  # it trained
    assert summaries[0]["eval_loss"] == pytest.approx(single["eval_loss"], abs=1e-5)
    assert summaries[0]["consumed_samples"] == single["consumed_samples"] == 8 * STEPS

    # The FSDP run gathered full tensors into the single-file format: the same files as DP = 1.
    for name in (model_file(0, 0), optim_file(0, 0)):
        sharded, plain = (_tensors(torch.load(checkpoint_dir(tmp_path / run, STEPS) / name, weights_only=True))
                          for run in ("fsdp", "dp1"))
        assert sharded.keys() == plain.keys()
        for key, want in plain.items():
            torch.testing.assert_close(sharded[key], want, atol=1e-5, rtol=0, msg=f"{name}: {key}")


def _tensors(saved: dict) -> dict:
    """A model file's tensors, or an optimizer file's state as ``param.field`` -> tensor."""
    if "state" not in saved:
        return saved
    return {f"{param}.{field}": value for param, fields in saved["state"].items() for field, value in fields.items()}
