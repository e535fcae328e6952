"""DPO end to end through `ironcore train` / `ironcore eval`: the tiny GPT on pairs of the shipped
Shakespeare preference set (configs/data/dpo_example.yaml's training file).

- reference = the initial policy, dropout 0: the first step's loss is ln 2 and every reward is 0;
- TP=2 and PP=2 log the losses and rewards of one process, to 1e-5, over 4 steps (and at eval);
- a resumed run continues bit-exactly (its reference is still the initial weights), `ironcore eval`
  reports the DPO eval loss and rewards of the checkpoint, and `trainer.dpo_reference_checkpoint`
  / `trainer.pretrained_checkpoint` pick the reference's weights;
- on 32 training pairs, the reward accuracy on those pairs rises above 0.9 in 20 steps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ironcore import cli
from ironcore.training.trainer import train
from tests.multiproc import run_distributed
from tests.train_helpers import ROOT, load, losses, metric, write_config

PAIRS = ROOT / "ironcore" / "assets" / "shakespeare_prefs_train.jsonl"
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy")
STEPS = 4


@pytest.fixture(scope="module")
def pairs32(tmp_path_factory) -> Path:
    """The first 32 pairs of the shipped training set."""
    path = tmp_path_factory.mktemp("prefs") / "pairs32.jsonl"
    path.write_text("".join(PAIRS.read_text().splitlines(keepends=True)[:32]))
    return path


def _config(tmp_path: Path, name: str, pairs: Path, trainer: dict | None = None, **operation) -> Path:
    # 2 pairs per micro-batch × accumulation 2: two micro-batches per step, as many as PP stages.
    data = {"task_type": "dpo", "train_datasets": [{"path": str(pairs)}], "eval_datasets": [{"path": str(pairs)}],
            "test_datasets": [{"path": str(pairs)}]}
    return write_config(tmp_path, name, data=data, optim={"max_lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 0},
                        trainer={"save_checkpoint_steps": 2, "do_eval": True, **(trainer or {})},
                        operation={"train_steps": STEPS, "eval_interval": 2, "eval_samples": 8, "test_samples": 0,
                                   **operation})


def _train_worker(path: str, *overrides: str) -> dict:
    return train(load(Path(path), *overrides))


def _assert_same_run(a: Path, b: Path, tol: float) -> None:
    for key in ("loss", *REWARDS, "eval_loss", *(f"eval_{r}" for r in REWARDS)):
        ma, mb = metric(a, key), metric(b, key)
        assert sorted(ma) == sorted(mb) and ma, key
        for step in ma:
            assert ma[step] == pytest.approx(mb[step], abs=tol), (key, step)


def test_first_step_costs_ln2_with_zero_rewards_when_the_reference_is_the_initial_policy(tmp_path, pairs32):
    summary = train(load(_config(tmp_path, "first", pairs32, train_steps=1)))
    run = tmp_path / "first"
    assert abs(losses(run)[1] - math.log(2)) < 1e-6
    assert abs(summary["first_loss"] - math.log(2)) < 1e-6
    for key in REWARDS:
        assert metric(run, key)[1] == 0.0, key
    assert abs(metric(run, "eval_loss")[0] - math.log(2)) < 1e-6  # the baseline eval, before any update
    assert metric(run, "eval_rewards/margins")[0] == 0.0
    assert summary["eval_ppl"] is None  # a DPO loss has no perplexity


@pytest.mark.parametrize("layout", ["trainer.tensor_model_parallel_size=2", "trainer.pipeline_model_parallel_size=2"],
                         ids=["tp2", "pp2"])
def test_dpo_at_tp2_and_pp2_equals_one_process(tmp_path, pairs32, layout):
    path = _config(tmp_path, "parallel", pairs32)
    summaries = run_distributed(_train_worker, 2, str(path), layout, timeout=240)
    train(load(_config(tmp_path, "single", pairs32)))
    _assert_same_run(tmp_path / "parallel", tmp_path / "single", 1e-5)
    assert sorted(losses(tmp_path / "single")) == list(range(1, STEPS + 1))
    assert metric(tmp_path / "single", "rewards/margins")[STEPS] != 0.0  # the policy moved
    assert summaries[0]["final_loss"] == pytest.approx(summaries[1]["final_loss"], abs=1e-6)


def test_resume_is_bit_exact_and_eval_reports_the_rewards(tmp_path, pairs32, capsys):
    path = _config(tmp_path, "full", pairs32, no_save=False)
    train(load(path))
    full = tmp_path / "full"
    resumed = train(load(path, "trainer.load_iteration=2", "operation.no_save=true", "trainer.do_eval=false"))
    # The resumed run appended steps 3 and 4 to metrics.jsonl: the same numbers, bit for bit.
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    first, again = {r["step"]: r for r in steps[:STEPS]}, {r["step"]: r for r in steps[STEPS:]}
    assert sorted(again) == [3, 4]
    for step in again:
        for key in ("loss", *REWARDS):
            assert again[step][key] == first[step][key], (step, key)
    assert resumed["final_loss"] == first[4]["loss"]

    assert cli.main(["eval", str(path), "model.max_seq_len=32"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["iteration"] == STEPS
    assert out["eval_loss"] == pytest.approx(metric(full, "eval_loss")[STEPS], abs=1e-6)
    for key in REWARDS:
        assert out[f"eval_{key}"] == pytest.approx(metric(full, f"eval_{key}")[STEPS], abs=1e-6), key

    # The reference from a checkpoint: the trained model as the reference of a fresh policy moves the
    # first loss off ln 2; as the reference of the same model (pretrained_checkpoint) it is ln 2 again.
    ref = [f"trainer.dpo_reference_checkpoint={full}", "operation.train_steps=1", "trainer.do_eval=false"]
    other = train(load(_config(tmp_path, "other_ref", pairs32), *ref))
    assert abs(other["first_loss"] - math.log(2)) > 1e-3
    same = train(load(_config(tmp_path, "same_ref", pairs32), *ref, f"trainer.pretrained_checkpoint={full}"))
    assert abs(same["first_loss"] - math.log(2)) < 1e-6


def test_reward_accuracy_on_the_training_pairs_rises_above_0_9(tmp_path, pairs32):
    path = _config(tmp_path, "learn", pairs32, trainer={"micro_batch_size": 8, "train_batch_size": 8},
                   train_steps=20, eval_interval=20, eval_samples=32)
    train(load(path, "optim.max_lr=3e-3", "optim.min_lr=3e-4", "optim.warmup_steps=0"))
    accuracy = metric(tmp_path / "learn", "eval_rewards/accuracy")
    assert accuracy[0] == 0.0  # policy = reference: every reward is 0, no pair is ranked right yet
    assert accuracy[20] > 0.9, accuracy
    assert metric(tmp_path / "learn", "eval_rewards/margins")[20] > 0
