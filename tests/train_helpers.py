"""Small configs for training tests: the tiny GPT on Shakespeare with short sequences."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ironcore.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, name: str = "run", **groups) -> Path:
    """A YAML config in tmp_path: tiny model, Shakespeare, fp32, checkpoints off unless asked;
    `groups` are merged into the base (e.g. trainer={"micro_batch_size": 4})."""
    base = {
        "trainer": {"model_name": name, "model_path": str(tmp_path / name), "micro_batch_size": 2,
                    "train_batch_size": 4, "log_interval": 1, "num_workers": 0},
        "operation": {"train_steps": 10, "no_save": True},
        "model": "tiny",
        "data": {"config_path": str(ROOT / "configs" / "data" / "shakespeare.yaml")},
        "optim": {"max_lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2},
        "parallel": {"dist_backend": "gloo"},
        "utils": {"log_level": "WARNING"},
    }
    for group, values in groups.items():
        if isinstance(base.get(group), dict) and isinstance(values, dict):
            base[group].update(values)
        else:
            base[group] = values
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def load(path: Path, *overrides: str):
    """load_config with short sequences by default (the LM head dominates the tiny model's cost)."""
    return load_config(str(path), ["model.max_seq_len=32", *overrides])


def metric(model_path: str | Path, key: str) -> dict[int, float]:
    """step -> `key` from metrics.jsonl, for the records that have it."""
    records = (json.loads(line) for line in (Path(model_path) / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r[key] for r in records if key in r}


def losses(model_path: str | Path) -> dict[int, float]:
    """step -> training loss (log_interval 1 makes each step's exact loss)."""
    return metric(model_path, "loss")


def eval_losses(model_path: str | Path) -> dict[int, float]:
    return metric(model_path, "eval_loss")
