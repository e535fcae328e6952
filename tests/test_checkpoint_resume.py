"""Exact resume through the trainer: 20 steps in one go, or 12 steps, stop, resume to 20 — the
losses of steps 13–20 are bitwise equal (CPU, deterministic mode), with DP=1 and with DP=2."""

from __future__ import annotations

from pathlib import Path

from ironcore.training.trainer import train
from tests.multiproc import run_distributed
from tests.train_helpers import load, losses, write_config

STEPS, STOP = 20, 12


def _configs(tmp_path: Path) -> tuple[str, str]:
    # Micro-batch 1 keeps it cheap; DP=1 accumulates 2 micro-batches, DP=2 takes one per rank.
    common = dict(trainer={"save_checkpoint_steps": 5, "micro_batch_size": 1, "train_batch_size": 2},
                  utils={"deterministic": True, "log_level": "WARNING"})
    straight = write_config(tmp_path, "straight", operation={"train_steps": STEPS, "no_save": True}, **common)
    resumed = write_config(tmp_path, "resumed", operation={"train_steps": STEPS, "no_save": False}, **common)
    return str(straight), str(resumed)


def _train(path: str, *overrides: str) -> dict:
    return train(load(Path(path), *overrides))


def _check_stops(first: dict, second: dict) -> None:
    assert first["steps"] == STOP and first["checkpoint"].endswith(f"iter_{STOP:07d}")
    assert second["steps"] == STEPS


def _check(tmp_path: Path) -> None:
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(straight) == sorted(resumed) == list(range(1, STEPS + 1))
    assert straight[STEPS] < straight[1]  # it trained
    for step in range(STOP + 1, STEPS + 1):
        assert resumed[step] == straight[step], step  # bitwise: float equality, no tolerance


def test_resume_is_bitwise_exact_dp1(tmp_path):
    straight, resumed = _configs(tmp_path)
    _train(straight)
    _check_stops(_train(resumed, f"operation.exit_interval={STOP}"), _train(resumed))
    _check(tmp_path)


def test_resume_is_bitwise_exact_dp2(tmp_path):
    # One spawn per run: re-initialising a process group on the same port in one process can hang.
    straight, resumed = _configs(tmp_path)
    run_distributed(_train, 2, straight)
    first = run_distributed(_train, 2, resumed, f"operation.exit_interval={STOP}")
    _check_stops(first[0], run_distributed(_train, 2, resumed)[0])
    _check(tmp_path)
