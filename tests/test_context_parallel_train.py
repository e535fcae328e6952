"""Context parallelism through the training loop: `ironcore train` at CP=2, at TP=2 × CP=2, and
with FSDP or the distributed optimizer sharding over the CP ranks, follows the single-process loss
trajectory (training and eval losses to 1e-5, absolute positions, and RoPE with GQA); a checkpoint saved at CP=2 resumes at CP=1 and one saved at CP=1 resumes at
CP=2, on the same trajectory; validation names what CP needs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ironcore.config import ConfigError
from ironcore.training.trainer import train
from tests.multiproc import run_distributed
from tests.train_helpers import eval_losses, load, losses, write_config

STEPS, HALF = 6, 3
GROUPS = dict(trainer={"micro_batch_size": 2, "train_batch_size": 4, "save_checkpoint_steps": HALF, "do_eval": True},
              optim={"max_lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2, "clip_grad": 0.5})
CP2, TP2 = "trainer.context_parallel_size=2", "trainer.tensor_model_parallel_size=2"
LLAMA = ["model.positional_embedding.type=rope", "model.num_attention_groups=2", "model.ln_type=rmsnorm"]
STOP_HALFWAY = f"operation.exit_interval={HALF}"


def _train_worker(path: str, overrides: list[str]) -> dict:
    return train(load(Path(path), *overrides))


def _run(tmp_path: Path, name: str, ranks: int, overrides: list[str], save: bool = False) -> None:
    path = str(write_config(tmp_path, name, operation={"train_steps": STEPS, "no_save": not save,
                                                                "eval_interval": 2, "eval_samples": 4}, **GROUPS))
    if ranks == 1:
        train(load(Path(path), *overrides))
    else:
        run_distributed(_train_worker, ranks, path, overrides, timeout=300)


def _assert_follows(trajectory: dict[int, float], reference: dict[int, float], steps) -> None:
    assert sorted(trajectory) == list(steps)
    for step in steps:
        assert trajectory[step] == pytest.approx(reference[step], abs=1e-5), step


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("cp_reference")
    _run(tmp, "gpt", 1, [])
    _run(tmp, "llama", 1, LLAMA)
    assert losses(tmp / "gpt")[STEPS] < losses(tmp / "gpt")[1]
    return tmp


@pytest.mark.parametrize("name, ranks, overrides, reference", [
    ("cp2", 2, [CP2], "gpt"),
    ("tp2_cp2_rope_gqa", 4, [CP2, TP2, *LLAMA], "llama"),
    ("cp2_fsdp", 2, [CP2, "parallel.use_fsdp=true"], "gpt"),
    ("cp2_distributed_optimizer", 2, [CP2, "parallel.use_distributed_optimizer=true"], "gpt"),
])
def test_cp_training_follows_the_single_process(tmp_path, references, name, ranks, overrides, reference):
    _run(tmp_path, name, ranks, overrides)
    _assert_follows(losses(tmp_path / name), losses(references / reference), range(1, STEPS + 1))
    _assert_follows(eval_losses(tmp_path / name), eval_losses(references / reference), range(0, STEPS + 1, 2))


@pytest.mark.parametrize("saved_at, resumed_at", [(2, 1), (1, 2)])
def test_checkpoint_resumes_across_a_cp_change(tmp_path, references, saved_at, resumed_at):
    cp = lambda size: [f"trainer.context_parallel_size={size}"]  # noqa: E731
    _run(tmp_path, "interrupted", saved_at, [*cp(saved_at), STOP_HALFWAY], save=True)
    shutil.copytree(tmp_path / "interrupted", tmp_path / "resumed")
    (tmp_path / "resumed" / "metrics.jsonl").unlink()
    _run(tmp_path, "resumed", resumed_at, cp(resumed_at), save=True)
    _assert_follows(losses(tmp_path / "resumed"), losses(references / "gpt"), range(HALF + 1, STEPS + 1))


@pytest.mark.parametrize("overrides, expected", [
    (["model.max_seq_len=30"], "model.max_seq_len = 30 (set by a command-line override): must be divisible by "
                               "2 × trainer.context_parallel_size = 4"),
    (["data.task_type=sft"], "packed SFT rows need segment masks"),
    (["parallel.sequence_parallel=true", TP2, "model.max_seq_len=36"],
     "must be divisible by 2 × trainer.context_parallel_size × tensor_model_parallel_size = 8"),
])
def test_validation_names_what_cp_needs(tmp_path, monkeypatch, overrides, expected):
    monkeypatch.setenv("WORLD_SIZE", "4")
    path = write_config(tmp_path, "bad")
    with pytest.raises(ConfigError) as error:
        load(path, CP2, *overrides)
    assert expected in str(error.value)
