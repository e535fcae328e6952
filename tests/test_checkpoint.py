"""Single-file checkpoints in one process: atomic layout, keep-last-K, exact resume of every state,
weights-only loads, integrity checks, model-shape refusal, and a SIGKILL in the middle of a save."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ironcore.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ironcore.checkpoint.io import complete_checkpoints, read_latest, set_rng_state
from ironcore.config import Config, to_dict
from ironcore.parallel.random import get_rng_tracker, set_random_seed
from ironcore.parallel.state import ParallelState
from ironcore.training.scheduler import build_scheduler

REPO = Path(__file__).resolve().parents[1]


class Toy(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = torch.nn.Linear(6, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.fc2 = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.dropout(self.norm(self.fc1(x)), 0.2, self.training))


class Run:
    """A toy training run: model, AdamW with two groups, a warmup schedule, random batches."""

    def __init__(self, cfg: Config, seed: int = 0) -> None:
        self.cfg = cfg
        self.model = Toy(seed)
        decay = [p for p in self.model.parameters() if p.dim() > 1]
        no_decay = [p for p in self.model.parameters() if p.dim() <= 1]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=1e-2)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.operation.train_steps)
        self.consumed = 0

    def step(self) -> float:
        # Every source of randomness a real step uses: data from numpy/python, dropout from torch.
        x = torch.from_numpy(np.random.randn(4, 6).astype(np.float32)) * random.uniform(0.5, 1.5)
        loss = self.model(x).square().mean()
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.consumed += 4
        return loss.item()

    def save(self, iteration: int) -> Path:
        return save_checkpoint(self.cfg, ParallelState(), iteration, self.model, self.optimizer, self.scheduler,
                               None, {"consumed_samples": self.consumed})

    def load(self) -> dict | None:
        """load_checkpoint, then its RNG states applied as the trainer does (right before stepping)."""
        resumed = load_checkpoint(self.cfg, ParallelState(), self.model, self.optimizer, self.scheduler, None)
        if resumed is not None:
            rng = resumed.pop("rng_state")
            if rng is not None:
                set_rng_state(rng)
        return resumed


def _config(tmp_path: Path, **trainer) -> Config:
    cfg = Config()
    cfg.trainer.model_path = str(tmp_path / "ckpt")
    cfg.optim.lr_scheduler, cfg.optim.max_lr, cfg.optim.warmup_steps = "constant", 1e-2, 5  # lr 1e-2 × (s + 1) / 5
    for key, value in trainer.items():
        setattr(cfg.trainer, key, value)
    return cfg


def _saved(tmp_path: Path, iterations=(1, 2), **trainer) -> Run:
    run = Run(_config(tmp_path, **trainer))
    for iteration in iterations:
        run.step()
        run.save(iteration)
    return run


def _draws() -> list:
    with get_rng_tracker().fork():
        tracked = torch.rand(3).tolist()
    return [random.random(), np.random.rand(), torch.rand(3).tolist(), tracked]


def test_save_is_atomic_folder_with_manifest_then_latest(tmp_path):
    run = _saved(tmp_path)
    root = tmp_path / "ckpt"
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000001", "iter_0000002", "latest"]
    assert (root / "latest").read_text() == "2\n"
    folder = root / "iter_0000002"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == {p.name for p in folder.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == {"common.pt", "config.yaml", "model_tp00_pp00.pt", "optim_tp00_pp00.pt",
                                      "rng_rank00000.pt"}
    for name, meta in manifest["files"].items():
        assert (folder / name).stat().st_size == meta["size"]
    assert yaml.safe_load((folder / "config.yaml").read_text()) == to_dict(run.cfg)
    weights = torch.load(folder / "model_tp00_pp00.pt", weights_only=True)
    assert all(torch.equal(weights[k], v) for k, v in run.model.state_dict().items())


def test_keep_last_k_deletes_older_checkpoints_and_stale_temp_folders(tmp_path):
    root = tmp_path / "ckpt"
    run = _saved(tmp_path, iterations=(1, 2, 3), keep_last_checkpoints=2)
    assert complete_checkpoints(root) == [2, 3]
    (root / "iter_0000009.tmp-dead").mkdir()  # left by a killed save
    run.save(4)
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000003", "iter_0000004", "latest"]


def test_resume_restores_model_optimizer_schedule_data_and_every_rng_exactly(tmp_path):
    set_random_seed(11)
    run = _saved(tmp_path, iterations=(1, 2, 3))
    expected = (_draws(), [run.step() for _ in range(3)], run.optimizer.param_groups[0]["lr"])

    set_random_seed(99)  # a restarted process: other seeds, fresh model, optimizer and schedule
    random.seed(99)
    np.random.seed(99)
    resumed = Run(run.cfg, seed=5)
    assert resumed.load() == {"iteration": 3, "data_state": {"consumed_samples": 12}}
    got = (_draws(), [resumed.step() for _ in range(3)], resumed.optimizer.param_groups[0]["lr"])
    assert got == expected  # bitwise: same draws, same losses, same lr
    assert all(torch.equal(a, b) for a, b in zip(run.model.parameters(), resumed.model.parameters()))


def test_weights_only_load_starts_optimizer_and_schedule_fresh(tmp_path):
    run = _saved(tmp_path, iterations=(1, 2, 3))
    cfg = run.cfg
    cfg.optim.load_checkpoint_optim_state = False
    cfg.optim.load_checkpoint_lr_scheduler = False
    fresh = Run(cfg, seed=5)
    assert fresh.load()["iteration"] == 3
    assert all(torch.equal(a, b) for a, b in zip(run.model.parameters(), fresh.model.parameters()))
    assert fresh.optimizer.state_dict()["state"] == {}
    # The config's schedule at the resumed step: warmup does not restart while the step counter goes on.
    assert fresh.scheduler.last_epoch == 3
    assert fresh.optimizer.param_groups[0]["lr"] == pytest.approx(fresh.scheduler.fn(3)) == run.optimizer.param_groups[0]["lr"]

    cfg.optim.load_checkpoint_optim_state = True  # optimizer yes, schedule no
    fresh = Run(cfg, seed=5)
    fresh.load()
    assert fresh.optimizer.state_dict()["state"][0]["step"].item() == 3
    assert torch.equal(fresh.optimizer.state_dict()["state"][0]["exp_avg"], run.optimizer.state_dict()["state"][0]["exp_avg"])
    assert fresh.scheduler.last_epoch == 3


def test_lr_schedule_on_resume_is_the_checkpoints_or_the_configs_at_the_resumed_step(tmp_path, caplog):
    run = _saved(tmp_path, iterations=(1, 2, 3))  # constant schedule, max_lr 1e-2, warmup 5: lr(3) = 8e-3
    cfg = run.cfg
    cfg.optim.max_lr, cfg.optim.warmup_steps = 4e-2, 10  # the schedule changed in the config
    with caplog.at_level("INFO", logger="ironcore.checkpoint.io"):
        kept = Run(cfg, seed=5)
        kept.load()
    assert kept.scheduler.last_epoch == 3 and kept.optimizer.param_groups[0]["lr"] == pytest.approx(8e-3)
    kept.step()
    assert kept.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2)  # the checkpoint's warmup goes on
    assert "differs from the config in optim.max_lr, optim.warmup_steps" in caplog.text
    assert "the checkpoint's settings and position (step 3)" in caplog.text

    caplog.clear()
    cfg.optim.load_checkpoint_lr_scheduler = False  # Megatron's --override-opt_param-scheduler
    with caplog.at_level("INFO", logger="ironcore.checkpoint.io"):
        override = Run(cfg, seed=5)
        override.load()
    assert override.scheduler.last_epoch == 3
    assert override.optimizer.param_groups[0]["lr"] == pytest.approx(4e-2 * 4 / 10)  # the config's, at step 3
    override.step()
    assert override.optimizer.param_groups[0]["lr"] == pytest.approx(4e-2 * 5 / 10)
    assert "the config's settings at the resumed step 3 (optim.load_checkpoint_lr_scheduler: false)" in caplog.text


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupted_checkpoint_is_refused_naming_the_file_and_the_previous_one(tmp_path, damage):
    run = _saved(tmp_path, iterations=(1, 2, 3))
    os.remove(tmp_path / "ckpt" / "iter_0000002" / "manifest.json")  # incomplete: never offered
    path = tmp_path / "ckpt" / "iter_0000003" / "model_tp00_pp00.pt"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[:-10]
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model_tp00_pp00\.pt .*iter_0000001.*trainer\.load_iteration=1"):
        Run(run.cfg).load()
    run.cfg.trainer.load_iteration = 1
    assert Run(run.cfg).load()["iteration"] == 1


def test_half_written_folder_is_never_chosen(tmp_path):
    run = _saved(tmp_path)
    partial = tmp_path / "ckpt" / "iter_0000003.tmp-0badf00d"
    partial.mkdir()
    (partial / "model_tp00_pp00.pt").write_bytes(b"half")
    assert read_latest(tmp_path / "ckpt") == 2 and complete_checkpoints(tmp_path / "ckpt") == [1, 2]
    assert Run(run.cfg).load()["iteration"] == 2


def test_other_model_shape_is_refused_naming_the_keys(tmp_path):
    run = _saved(tmp_path)
    run.cfg.model.d_model = 64
    run.cfg.model.num_layers = 3
    with pytest.raises(CheckpointError, match=r"model\.d_model: checkpoint 512 vs config 64, "
                                              r"model\.num_layers: checkpoint 2 vs config 3"):
        Run(run.cfg).load()


def test_nothing_to_resume_start_fresh_and_missing_iteration(tmp_path):
    cfg = _config(tmp_path)
    assert Run(cfg).load() is None  # no model_path folder yet
    cfg.trainer.model_path = ""
    assert Run(cfg).load() is None
    run = _saved(tmp_path)
    run.cfg.trainer.load_iteration = 0
    assert Run(run.cfg).load() is None
    run.cfg.trainer.load_iteration = 7
    with pytest.raises(CheckpointError, match=r"load_iteration=7: .*iter_0000007 does not exist.*\[1, 2\]"):
        Run(run.cfg).load()


_KILLED_SAVE = """
import sys, time
from pathlib import Path
import torch
import ironcore.checkpoint.io as ckpt_io
from ironcore.config import Config
from ironcore.parallel.state import ParallelState

cfg = Config()
cfg.trainer.model_path = sys.argv[1]
torch.manual_seed(0)
model = torch.nn.Linear(4, 4)
ckpt_io.save_checkpoint(cfg, ParallelState(), 1, model, None, None, None, {"consumed_samples": 1})

def pause(tmp):  # every file of iteration 2 is written; the folder is not published yet
    (Path(sys.argv[1]) / "paused").write_text(str(tmp))
    time.sleep(120)

ckpt_io._before_commit = pause
with torch.no_grad():
    model.weight.add_(1.0)
ckpt_io.save_checkpoint(cfg, ParallelState(), 2, model, None, None, None, {"consumed_samples": 2})
"""


@pytest.mark.timeout(120)
def test_sigkill_during_save_keeps_latest_at_the_previous_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(root)], env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 90
        while not (root / "paused").exists():
            assert proc.poll() is None, "the saving process exited before reaching the pause"
            assert time.monotonic() < deadline, "the save never reached the pause"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    tmp = Path((root / "paused").read_text())
    assert tmp.name.startswith("iter_0000002.tmp-") and (tmp / "manifest.json").is_file()
    assert read_latest(root) == 1 and complete_checkpoints(root) == [1]

    cfg = _config(tmp_path)
    model = torch.nn.Linear(4, 4)
    resumed = load_checkpoint(cfg, ParallelState(), model, None, None, None)
    assert {k: resumed[k] for k in ("iteration", "data_state")} == {"iteration": 1, "data_state": {"consumed_samples": 1}}
    torch.manual_seed(0)
    assert torch.equal(model.weight, torch.nn.Linear(4, 4).weight)
    save_checkpoint(cfg, ParallelState(), 2, model, None, None, None, {"consumed_samples": 2})
    assert read_latest(root) == 2 and not tmp.exists()  # the next save clears the leftover
