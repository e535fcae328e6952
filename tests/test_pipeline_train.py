"""Pipeline parallelism through the training loop (`ironcore train`): the tiny GPT on Shakespeare.

- PP=2 (1F1B, 2 processes) logs the same training and eval losses as one process, to 1e-5;
- a checkpoint saved at PP=2 resumes at PP=2 exactly (the steps after it match the uninterrupted
  run), and the same checkpoint in the distributed format loads at PP=1 and continues identically;
- the interleaved schedule (two chunks per rank) trains like one process, and its distributed
  checkpoint loads at PP=1.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ironcore.training.trainer import train
from tests.multiproc import run_distributed
from tests.train_helpers import eval_losses, load, losses, write_config

STEPS = 4


def _train_worker(path: str, *overrides: str) -> dict:
    return train(load(Path(path), *overrides))


def _config(tmp_path: Path, name: str, **operation) -> Path:
    # micro 2 × accumulation 2 at DP=1: two micro-batches per step, as many as stages.
    return write_config(tmp_path, name, trainer={"save_checkpoint_steps": 2, "do_eval": True},
                        operation={"train_steps": STEPS, "eval_interval": 2, "eval_samples": 8, **operation})


def test_pp2_trains_like_one_process_and_resumes_at_pp2_and_pp1(tmp_path):
    pp2 = _config(tmp_path, "pp2", no_save=False, save_dist_ckpt=True)
    summaries = run_distributed(_train_worker, 2, str(pp2), "trainer.pipeline_model_parallel_size=2",
                                timeout=240)
    single = train(load(_config(tmp_path, "pp1")))
    a, b = losses(tmp_path / "pp2"), losses(tmp_path / "pp1")
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-5), step
    assert a[STEPS] < a[1]  # it trained
    ea, eb = eval_losses(tmp_path / "pp2"), eval_losses(tmp_path / "pp1")
    assert sorted(ea) == sorted(eb) == [0, 2, 4]
    for step in ea:
        assert ea[step] == pytest.approx(eb[step], abs=1e-5), step
    # Every stage reports the last stage's loss.
    assert summaries[0]["final_loss"] == summaries[1]["final_loss"] == pytest.approx(single["final_loss"], abs=1e-5)

    # Resume from iteration 2 at PP=2: steps 3 and 4 are those of the uninterrupted run.
    resumed = run_distributed(_train_worker, 2, str(pp2), "trainer.pipeline_model_parallel_size=2",
                              "trainer.load_iteration=2", "operation.no_save=true", "trainer.do_eval=false",
                              timeout=240)
    assert resumed[0]["first_loss"] == pytest.approx(a[3], abs=1e-6)
    assert resumed[0]["final_loss"] == pytest.approx(a[4], abs=1e-6)
    # The distributed checkpoint written at PP=2 loads at PP=1 and continues the same way.
    at_pp1 = train(load(pp2, "trainer.load_iteration=2", "operation.no_save=true", "trainer.do_eval=false"))
    assert at_pp1["steps"] == STEPS
    assert at_pp1["first_loss"] == pytest.approx(a[3], abs=1e-5)
    assert at_pp1["final_loss"] == pytest.approx(a[4], abs=1e-5)


def test_interleaved_pp2_dist_checkpoint_loads_at_pp1(tmp_path):
    # 4 layers: two chunks of one layer on each of the two ranks.
    layout = ["model.num_layers=4", "trainer.pipeline_model_parallel_size=2",
              "parallel.pipeline_schedule=interleaved", "parallel.virtual_pipeline_stages=2"]
    path = write_config(tmp_path, "il", trainer={"save_checkpoint_steps": 2},
                        operation={"train_steps": 3, "no_save": False, "save_dist_ckpt": True})
    run_distributed(_train_worker, 2, str(path), *layout, timeout=240)
    single = write_config(tmp_path, "one", operation={"train_steps": 3})
    train(load(single, "model.num_layers=4"))
    a, b = losses(tmp_path / "il"), losses(tmp_path / "one")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-5), step
    at_pp1 = train(load(path, "model.num_layers=4", "trainer.load_iteration=2", "operation.no_save=true"))
    assert at_pp1["first_loss"] == pytest.approx(a[3], abs=1e-5)
