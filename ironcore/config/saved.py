"""Read back the config a checkpoint was trained with, and where each of its values came from.

A checkpoint folder holds ``config.yaml`` (the resolved config) and ``run_info.json`` (where the
run came from: git commit, versions, command line, layout, start time, and the provenance of every
key). ``ironcore config --from-checkpoint DIR`` prints them, so a run can be reproduced from its
output folder alone. Nothing here loads torch: ``ironcore config`` stays fast.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from ironcore.config import validate
from ironcore.config.errors import ConfigError
from ironcore.config.schema import GROUPS, Config

CONFIG_FILE = "config.yaml"
RUN_INFO_FILE = "run_info.json"
_MANIFEST = "manifest.json"
_LATEST = "latest"


def _iteration_folder(path: Path) -> Path:
    """An ``iter_*`` folder itself, or the one a ``trainer.model_path``'s ``latest`` names."""
    if (path / _MANIFEST).is_file():
        return path
    latest = path / _LATEST
    text = latest.read_text(errors="replace").strip() if latest.is_file() else ""
    if not text.isdigit():
        raise ConfigError([f"--from-checkpoint {path}: not a checkpoint; expected a trainer.model_path holding a "
                           f"'{_LATEST}' iteration number or an iter_NNNNNNN folder holding '{_MANIFEST}'"])
    return path / f"iter_{int(text):07d}"


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ConfigError([f"{path}: not readable run metadata ({type(e).__name__})"]) from None
    if not isinstance(value, dict):
        raise ConfigError([f"{path}: not readable run metadata (a JSON object was expected)"])
    return value


def load_saved_config(path: str | Path) -> tuple[Config, dict[str, str], dict[str, Any]]:
    """The Config saved in a checkpoint, each key's provenance as the run recorded it, and the run
    metadata (empty for a checkpoint written before run metadata existed). ConfigError when the
    folder is not a checkpoint or its config does not fit the schema."""
    folder = _iteration_folder(Path(path))
    config_path = folder / CONFIG_FILE
    try:
        saved = yaml.safe_load(config_path.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError([f"{config_path}: the checkpoint's resolved config is not readable "
                           f"({type(e).__name__})"]) from None
    if not isinstance(saved, dict):
        raise ConfigError([f"{config_path}: the checkpoint's resolved config is not a mapping of groups"])
    info = _read_json(folder / RUN_INFO_FILE) if (folder / RUN_INFO_FILE).is_file() else {}
    recorded = info.get("provenance") if isinstance(info.get("provenance"), dict) else {}
    merged = asdict(Config())
    for group in GROUPS:  # saved keys this version does not know are dropped by _overlay
        _overlay(merged[group], saved.get(group) or {})
    prov = {key: str(recorded.get(key, f"{config_path}")) for key in validate.leaf_keys(Config)}
    errors: list[str] = []
    cfg = validate.build_config(merged, prov, set(), errors)
    if errors:
        raise ConfigError(errors)
    return cfg, prov, info


def _overlay(defaults: dict, saved: Any) -> None:
    if not isinstance(saved, dict):
        return
    for key, value in saved.items():
        if key not in defaults:
            continue
        if isinstance(defaults[key], dict) and isinstance(value, dict):
            _overlay(defaults[key], value)
        else:
            defaults[key] = value
