"""Faults injected into checkpoints, runs and data through the public CLI or the checkpoint API.

Each case states the promise it checks: a crafted checkpoint never runs code, resume is exact with
dropout, a crash at any instant of a save leaves a loadable ``latest``, no checkpoint holds a
non-finite value, and every corruption is one line naming the file, exit status 1, no traceback.
One distributed checkpoint is saved per module and copied for each case.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ironcore import cli
from ironcore.observe import metrics
from ironcore.training.trainer import train
from tests.multiproc import run_distributed
from tests.train_helpers import ROOT, load, losses, write_config

TIMEOUT = 120


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1"}


def _run(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=TIMEOUT,
                          cwd=cwd, env=_env())


def _one_line_error(stderr: str, *fragments: str) -> None:
    """Exactly one line on stderr, naming what is wrong, and no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _rewrite_manifest(folder: Path, name: str) -> None:
    """Make the manifest vouch for the current bytes of `name` (an attacker can always do this)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    data = (folder / name).read_bytes()
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))


# ---------------------------------------------------------------------------------------------
# One saved distributed checkpoint, copied for every case


SAVE_STEPS = 2


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A model_path holding iter_0000002, saved by `ironcore train` with save_dist_ckpt."""
    root = tmp_path_factory.mktemp("saved")
    config = write_config(root, "run", operation={"train_steps": SAVE_STEPS, "no_save": False, "save_dist_ckpt": True,
                                                  "eval_samples": 4, "test_samples": 4},
                          trainer={"micro_batch_size": 1, "train_batch_size": 1}, optim={"max_lr": 1e-3, "warmup_steps": 1})
    assert cli.main([str(config), "model.max_seq_len=32"]) == 0
    return config


@pytest.fixture
def ckpt(saved: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(config, model_path): a private copy of the saved run."""
    shutil.copytree(saved.parent / "run", tmp_path / "run")
    text = saved.read_text().replace(str(saved.parent), str(tmp_path))
    config = tmp_path / "run.yaml"
    config.write_text(text)
    return config, tmp_path / "run"


# ---------------------------------------------------------------------------------------------
# 1. A crafted DCP index never runs code


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("entry", ["train", "eval", "convert-single", "convert-hf", "generate"])
def test_crafted_dcp_metadata_never_runs_code(ckpt, tmp_path, entry):
    config, model_path = ckpt
    folder = model_path / f"iter_{SAVE_STEPS:07d}"
    marker = tmp_path / "pwned"
    (folder / "dist" / ".metadata").write_bytes(pickle.dumps(_Exploit(marker)))
    _rewrite_manifest(folder, "dist/.metadata")
    argv = {
        "train": ["-m", "ironcore", str(config), "model.max_seq_len=32", f"operation.train_steps={SAVE_STEPS + 1}"],
        "eval": ["-m", "ironcore", "eval", str(config), "model.max_seq_len=32"],
        "convert-single": [str(ROOT / "tools" / "convert_checkpoint.py"), "--from", "ironcore", "--to", "single",
                           "--input", str(folder), "--output", str(tmp_path / "single")],
        "convert-hf": [str(ROOT / "tools" / "convert_checkpoint.py"), "--from", "ironcore", "--to", "hf",
                       "--input", str(folder), "--output", str(tmp_path / "hf")],
        "generate": [str(ROOT / "tools" / "generate.py"), "--checkpoint", str(model_path), "--prompt", "Hi",
                     "--max-new-tokens", "2"],
    }[entry]
    proc = _run(*argv, cwd=tmp_path)
    assert not marker.exists()
    assert proc.returncode == 1, proc.stderr
    _one_line_error(proc.stderr, str(folder / "dist" / ".metadata"), "posix.system")


# ---------------------------------------------------------------------------------------------
# 2. Exact resume with dropout: 12 steps straight == 6 + resume 6, bit for bit

STEPS, STOP = 12, 6


def _dropout_config(tmp_path: Path, name: str, **extra) -> str:
    return str(write_config(tmp_path, name, operation={"train_steps": STEPS, "no_save": False},
                            trainer={"save_checkpoint_steps": STOP, "micro_batch_size": 1, "train_batch_size": 2,
                                     **extra},
                            utils={"deterministic": True, "log_level": "WARNING"}))


def _train(path: str, *overrides: str) -> dict:
    dropout = [f"model.dropout_{kind}=0.1" for kind in ("embd", "attn", "mlp")]
    metrics._cpu_gemm_flops.clear()  # probe again, as a fresh process does (the cache is per process)
    return train(load(Path(path), *dropout, *overrides))


def _resume_copy(tmp_path: Path) -> None:
    """`resumed` starts from the straight run's checkpoint of step STOP (saved on its way)."""
    shutil.copytree(tmp_path / "straight" / f"iter_{STOP:07d}", tmp_path / "resumed" / f"iter_{STOP:07d}")
    (tmp_path / "resumed" / "latest").write_text(f"{STOP}\n")


def _check_exact(tmp_path: Path) -> None:
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(straight) == list(range(1, STEPS + 1)) and sorted(resumed) == list(range(STOP + 1, STEPS + 1))
    for step in resumed:
        assert resumed[step] == straight[step], step  # bitwise: float equality, no tolerance


def test_resume_with_dropout_is_bitwise_exact_dp1(tmp_path):
    straight, resumed = _dropout_config(tmp_path, "straight"), _dropout_config(tmp_path, "resumed")
    _train(straight)
    _resume_copy(tmp_path)
    assert _train(resumed)["steps"] == STEPS
    _check_exact(tmp_path)
    # Dropout is on: the losses depend on the RNG streams (so the test can fail).
    assert _train(straight, "model.dropout_mlp=0.0", "operation.no_save=true")["final_loss"] \
        != losses(tmp_path / "resumed")[STEPS]


@pytest.mark.parametrize("layout", ["dp2", "tp2"])
def test_resume_with_dropout_is_bitwise_exact_on_two_ranks(tmp_path, layout):
    extra = {"tensor_model_parallel_size": 2} if layout == "tp2" else {}
    straight, resumed = _dropout_config(tmp_path, "straight", **extra), _dropout_config(tmp_path, "resumed", **extra)
    run_distributed(_train, 2, straight)
    _resume_copy(tmp_path)
    assert run_distributed(_train, 2, resumed)[0]["steps"] == STEPS
    _check_exact(tmp_path)
