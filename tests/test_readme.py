"""The README stays true: its opening commands, its generated config reference, its sample output, and
`.ci/run` running exactly its test command."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from ironcore import cli
from ironcore.config import reference

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
SETUP_AND_RUN = ("python -m pip install torch==2.13.0 -e . && "
                 "torchrun --standalone --nproc_per_node=2 -m ironcore example.yaml")
SETUP_AND_TEST = 'python -m pip install torch==2.13.0 -e ".[dev]" && python -m pytest -q'


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_readme_opens_with_the_two_commands():
    first, second = _blocks("bash")[:2]
    assert first.strip() == SETUP_AND_RUN
    assert second.strip() == SETUP_AND_TEST
    assert README.index(SETUP_AND_RUN) < README.index("## ")  # before any section


def test_config_reference_matches_schema():
    assert reference.BEGIN in README and reference.END in README
    generated = reference.splice(README)
    assert generated == README, (
        "README's config reference is stale: run `python -m ironcore.config.reference README.md`")


def test_ci_runs_exactly_the_readme_test_command():
    script = ROOT / ".ci" / "run"
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    assert os.access(script, os.X_OK)
    commands = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert commands[-1] == SETUP_AND_TEST
    assert all(c.startswith(("set ", "cd ")) for c in commands[:-1])


def test_readme_mentions_cluster_launches_and_components():
    assert "--rdzv_backend c10d" in README and "srun " in README
    assert "ironcore config" in README and "## Components" in README


def _console(command: str) -> list[str]:
    block = next(b for b in _blocks("console") if b.startswith(f"$ {command}\n"))
    return block.splitlines()[1:]


@pytest.fixture
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    for name in ("WORLD_SIZE", "RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)


def test_readme_sample_config_output_is_real(at_root, capsys):
    command = "ironcore config example.yaml optim.max_lr=3e-4"
    assert cli.main(command.split()[1:]) == 0
    printed = capsys.readouterr().out.splitlines()
    for line in _console(command):
        assert line == "..." or line in printed, line


def test_readme_sample_errors_are_real(at_root, capsys):
    command = "ironcore config example.yaml model.ln_type=batchnorm trainer.micro_bach_size=4"
    assert cli.main(command.split()[1:]) == 2
    assert capsys.readouterr().err.splitlines() == _console(command)


def test_readme_single_node_gpu_command_validates(at_root, monkeypatch, capsys):
    block = next(b for b in _blocks("bash") if "torchrun --nproc_per_node=8" in b)
    command = block.split("torchrun --nproc_per_node=8 -m ironcore ", 1)[1].split("\n\n", 1)[0]
    args = command.replace("\\\n", " ").split()
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("IRONCORE_DEVICE_MEMORY", "80GiB")  # a GPU command: checked against a GPU's memory
    assert cli.main(["config", *args]) == 0
    out = capsys.readouterr().out
    assert "  gradient_accumulation_steps: 8 " in out and "  d_model: 768 " in out
