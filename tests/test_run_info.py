"""Where a run came from: run_info.json next to config.yaml in every checkpoint, and
`ironcore config --from-checkpoint` printing the config a checkpoint was trained with."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import torch

from ironcore import cli
from ironcore.observe import run_info
from tests.train_helpers import write_config


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          capture_output=True, text=True, check=True).stdout.strip()


def _test_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "code"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "model.py").write_text("x = 1\n")
    _git(repo, "add", "model.py")
    _git(repo, "commit", "-q", "-m", "first")
    return repo


def test_git_state_commit_dirty_flag_and_no_checkout(tmp_path):
    repo = _test_repo(tmp_path)
    head = _git(repo, "rev-parse", "HEAD")
    assert run_info.git_state(repo) == {"git_commit": head, "git_dirty": False}
    (repo / "notes.txt").write_text("untracked outputs are not code\n")
    assert run_info.git_state(repo)["git_dirty"] is False
    (repo / "model.py").write_text("x = 2\n")
    assert run_info.git_state(repo) == {"git_commit": head, "git_dirty": True}
    elsewhere = tmp_path / "not_a_checkout"
    elsewhere.mkdir()
    assert run_info.git_state(elsewhere) == {"git_commit": None, "git_dirty": None}


def test_checkpoint_records_the_run_and_config_from_checkpoint_reprints_it(tmp_path, monkeypatch, capsys):
    repo = _test_repo(tmp_path)
    monkeypatch.setattr(run_info, "CODE_DIR", repo)  # the code that ran: the test's repository
    path = write_config(tmp_path, operation={"train_steps": 3, "no_save": False},
                        trainer={"save_checkpoint_steps": 3})
    overrides = ["model.max_seq_len=32", "optim.max_lr=2e-3"]
    assert cli.main(["config", str(path), *overrides]) == 0
    resolved = capsys.readouterr().out.split("\ntrainer:\n", 1)[1]
    resolved = "trainer:\n" + resolved  # past the header comments (source, memory estimate)
    assert cli.main(["train", str(path), *overrides]) == 0

    folder = tmp_path / "run" / "iter_0000003"
    info = json.loads((folder / "run_info.json").read_text())
    assert json.loads((folder / "manifest.json").read_text())["files"]["run_info.json"]["size"] > 0
    assert info["git_commit"] == _git(repo, "rev-parse", "HEAD") and info["git_dirty"] is False
    assert info["versions"]["torch"] == torch.__version__ and info["versions"]["ironcore"] == "0.1.0"
    assert info["layout"] == {"tp_size": 1, "pp_size": 1, "cp_size": 1, "dp_size": 1, "world_size": 1,
                              "backend": "gloo"}
    assert info["hostnames"] == [socket.gethostname()]
    assert info["provenance"]["optim.max_lr"] == "override"
    assert info["provenance"]["trainer.micro_batch_size"].startswith(f"{path}:")
    assert info["start_time"].endswith("+00:00")

    capsys.readouterr()
    assert cli.main(["config", "--from-checkpoint", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    header, body = out.split("\ntrainer:\n", 1)
    # The same values with the same provenance comments as `ironcore config` printed before the run,
    # except the process's place, which the launcher sets at run time.
    changed = [(a, b) for a, b in zip(("trainer:\n" + body).splitlines(), resolved.splitlines()) if a != b]
    assert len(body.splitlines()) + 1 == len(resolved.splitlines())
    assert sorted(a.split(":")[0].strip() for a, _ in changed) == ["local_rank", "rank", "world_size"]
    assert all(a.endswith("# derived (the launcher, at run time)") for a, _ in changed)
    assert f"# git commit: {info['git_commit']}" in header and "# uncommitted changes: false" in header
    assert cli.main(["config", "--from-checkpoint", str(folder)]) == 0  # an iter_* folder itself
    assert capsys.readouterr().out.split("\n", 1)[1] == out.split("\n", 1)[1]


def test_from_checkpoint_refuses_a_folder_that_is_not_one_and_extra_arguments(tmp_path, capsys):
    assert cli.main(["config", "--from-checkpoint", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") <= 2 and f"--from-checkpoint {tmp_path}: not a checkpoint" in err
    assert cli.main(["config", "--from-checkpoint", str(tmp_path), "optim.max_lr=1"]) == 2
    assert "takes no CONFIG or overrides" in capsys.readouterr().err
