"""Configs that compose: `base:` files a config extends and `${env:NAME}` values, with provenance."""

from __future__ import annotations

from pathlib import Path

import pytest

from ironcore import cli
from ironcore.config import ConfigError, load_config_with_provenance
from ironcore.config.loader import MAX_BASE_FILES, MAX_ENV_VALUE


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _errors(path: Path, *overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_config_with_provenance(path, overrides)
    return e.value.errors


@pytest.fixture
def chain(tmp_path) -> Path:
    """The tiny preset (named by the deepest base) < deep base < shallow base < experiment file."""
    _write(tmp_path / "common" / "preset.yaml", "model: tiny\n")
    _write(tmp_path / "common" / "deep.yaml",
           "base: preset.yaml\nmodel:\n  num_layers: 5\n  d_ffn: 96\n  dropout_attn: 0.25\n  dropout_mlp: 0.0\n")
    _write(tmp_path / "common" / "shallow.yaml", "base: deep.yaml\nmodel:\n  num_layers: 6\n  d_ffn: 112\n")
    return _write(tmp_path / "exp" / "a.yaml", "base: ../common/shallow.yaml\nmodel:\n  num_layers: 7\n")


def test_priority_overrides_user_bases_deepest_last_presets_defaults(chain):
    cfg, prov = load_config_with_provenance(chain, ["model.dropout_attn=0.5"])
    assert cfg.model.dropout_attn == 0.5 and prov["model.dropout_attn"] == "override"
    assert cfg.model.num_layers == 7 and prov["model.num_layers"].endswith("a.yaml:3")
    assert cfg.model.d_ffn == 112 and prov["model.d_ffn"].endswith("shallow.yaml:4")
    assert cfg.model.dropout_mlp == 0.0 and prov["model.dropout_mlp"].endswith("deep.yaml:6")
    assert cfg.model.d_model == 128 and prov["model.d_model"].endswith("tiny.yaml:2")  # the preset
    assert prov["optim.weight_decay"] == "default" and "tiny.yaml:" in prov["model.dropout_embd"]


def test_base_list_later_entries_win_and_config_shows_the_base_line(tmp_path, capsys):
    _write(tmp_path / "b1.yaml", "model:\n  num_layers: 2\n  d_model: 32\n")
    _write(tmp_path / "b2.yaml", "model:\n  num_layers: 3\n")
    exp = _write(tmp_path / "exp.yaml", "base: [b1.yaml, b2.yaml]\nmodel:\n  num_attention_heads: 4\n")
    cfg, prov = load_config_with_provenance(exp)
    assert (cfg.model.num_layers, cfg.model.d_model) == (3, 32)
    assert prov["model.num_layers"].endswith("b2.yaml:2") and prov["model.d_model"].endswith("b1.yaml:3")
    assert cli.main(["config", str(exp)]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.strip().startswith("num_layers:"))
    assert line.split("#")[1].strip().endswith("b2.yaml:2")


def test_base_cycle_is_a_config_error_naming_the_chain(tmp_path, capsys):
    _write(tmp_path / "a.yaml", "base: b.yaml\nmodel: tiny\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\n")
    errors = _errors(tmp_path / "a.yaml")
    assert len(errors) == 1 and "circular base chain" in errors[0] and "b.yaml:1" in errors[0]
    assert cli.main(["config", str(tmp_path / "a.yaml")]) == 2
    assert "circular base chain" in capsys.readouterr().err


def test_long_base_chain_is_bounded(tmp_path):
    for i in range(MAX_BASE_FILES + 5):
        _write(tmp_path / f"c{i}.yaml", f"base: c{i + 1}.yaml\n")
    _write(tmp_path / f"c{MAX_BASE_FILES + 5}.yaml", "model: tiny\n")
    errors = _errors(tmp_path / "c0.yaml")
    assert any(f"more than {MAX_BASE_FILES} files" in e for e in errors)


@pytest.mark.parametrize("kind", ["missing", "binary", "directory", "scalar", "bad-type"])
def test_bad_base_file_is_one_line_naming_it_without_its_contents(tmp_path, kind):
    secret = "TOPSECRET-contents"
    target = {"missing": "nope.yaml", "binary": "bin.yaml", "directory": "dir",
              "scalar": "text.yaml", "bad-type": None}[kind]
    _write(tmp_path / "bin.yaml", "").write_bytes(b"\xff\xfe" + secret.encode())
    (tmp_path / "dir").mkdir()
    _write(tmp_path / "text.yaml", f"just a {secret} line\n")
    base = "base: 5" if target is None else f"base: {target}"
    errors = _errors(_write(tmp_path / "exp.yaml", f"{base}\nmodel: tiny\n"))
    assert len(errors) == 1 and "\n" not in errors[0] and secret not in errors[0]
    assert (target or "base") in errors[0]


def test_env_values_are_typed_by_the_schema_with_provenance(tmp_path, monkeypatch):
    monkeypatch.setenv("IC_LAYERS", "3")
    monkeypatch.setenv("IC_OUT", "/tmp/ic-out")
    monkeypatch.delenv("IC_UNSET", raising=False)
    exp = _write(tmp_path / "exp.yaml",
                 "model:\n  num_layers: ${env:IC_LAYERS}\n"
                 "  d_model: ${oc.env:IC_UNSET,48}\n  num_attention_heads: 4\n"
                 "trainer:\n  model_path: ${env:IC_OUT}/run1\n")
    cfg, prov = load_config_with_provenance(exp)
    assert cfg.model.num_layers == 3 and isinstance(cfg.model.num_layers, int)
    assert cfg.model.d_model == 48 and cfg.trainer.model_path == "/tmp/ic-out/run1"
    assert prov["model.num_layers"].startswith("env IC_LAYERS") and "exp.yaml:2" in prov["model.num_layers"]
    assert prov["model.d_model"].startswith("env IC_UNSET")
    # A value of the wrong type is the schema's ordinary error.
    monkeypatch.setenv("IC_LAYERS", "three")
    assert any(e.startswith("model.num_layers") for e in _errors(exp))


def test_missing_env_variable_is_a_config_error_naming_key_and_variable(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("IC_UNSET", raising=False)
    exp = _write(tmp_path / "exp.yaml", "model: tiny\noptim:\n  max_lr: ${env:IC_UNSET}\n")
    errors = _errors(exp)
    assert len(errors) == 1 and errors[0].startswith("optim.max_lr") and "IC_UNSET" in errors[0]
    assert cli.main(["config", str(exp)]) == 2
    assert "IC_UNSET" in capsys.readouterr().err


def test_huge_env_value_and_interpolation_loop_are_config_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("IC_HUGE", "x" * (MAX_ENV_VALUE + 1))
    exp = _write(tmp_path / "exp.yaml", "model: tiny\ntrainer:\n  model_path: ${env:IC_HUGE}\n"
                 "optim:\n  max_lr: ${optim.min_lr}\n  min_lr: ${optim.max_lr}\n")
    errors = _errors(exp)
    assert any("IC_HUGE" in e and "longer than" in e and "xxxx" not in e for e in errors)
    assert any("circular interpolation" in e for e in errors)
