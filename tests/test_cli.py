"""The `ironcore` command line: subcommand dispatch, the accepted spellings, and `ironcore config` output."""

from __future__ import annotations

import importlib
import types
from pathlib import Path

import pytest

from ironcore import cli
from ironcore.config import load_config, to_dict


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def cfg_file(tmp_path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text("model: tiny\ntrainer:\n  micro_batch_size: 2\n  train_batch_size: 8\n")
    return path


@pytest.fixture
def fake_modules(monkeypatch):
    """Stand-ins for the lazily imported trainer/evaluator/tools, recording what they were given."""
    calls: dict[str, object] = {}
    modules = {
        "ironcore.training.trainer": types.SimpleNamespace(train=lambda cfg, provenance: calls.setdefault("train", cfg)),
        "ironcore.training.evaluate": types.SimpleNamespace(main=lambda cfg: calls.setdefault("eval", cfg) and 0),
        "ironcore.data.preprocess": types.SimpleNamespace(main=lambda argv: calls.setdefault("preprocess", argv) and 0),
        "ironcore.data.stats": types.SimpleNamespace(main=lambda argv: calls.setdefault("data-stats", argv) and 3),
    }
    monkeypatch.setattr(cli, "_module", lambda name: modules[name])
    return calls


@pytest.mark.parametrize("form", [
    ["train", "{cfg}", "trainer.micro_batch_size=4"],
    ["train", "--config", "{cfg}", "trainer.micro_batch_size=4"],
    ["{cfg}", "trainer.micro_batch_size=4"],  # train is the default subcommand
    ["train", "trainer.micro_batch_size=4", "--config", "{cfg}"],
])
def test_train_spellings_reach_the_trainer_with_the_resolved_config(fake_modules, cfg_file, form):
    assert cli.main([a.replace("{cfg}", str(cfg_file)) for a in form]) == 0
    cfg = fake_modules["train"]
    assert (cfg.trainer.micro_batch_size, cfg.trainer.gradient_accumulation_steps, cfg.model.d_model) == (4, 2, 128)


def test_eval_and_tools_dispatch(fake_modules, cfg_file):
    assert cli.main(["eval", str(cfg_file), "optim.max_lr=1e-4"]) == 0
    assert fake_modules["eval"].optim.max_lr == 1e-4
    assert cli.main(["preprocess", "--input", "x.txt", "--output-prefix", "out/x"]) == 0
    assert fake_modules["preprocess"] == ["--input", "x.txt", "--output-prefix", "out/x"]
    assert cli.main(["data-stats", "out/x"]) == 3  # the tool's own exit status is passed through
    assert fake_modules["data-stats"] == ["out/x"]


def test_run_time_failure_is_one_line_naming_the_rank(monkeypatch, cfg_file, capsys):
    from ironcore.training.trainer import NonFiniteLossError

    def train(cfg, provenance):
        raise NonFiniteLossError("loss is nan at step 3 on rank 1")

    monkeypatch.setattr(cli, "_module", lambda name: types.SimpleNamespace(train=train)
                        if name == "ironcore.training.trainer" else importlib.import_module(name))
    monkeypatch.setenv("RANK", "1")
    assert cli.main([str(cfg_file)]) == 1
    err = capsys.readouterr().err
    assert err == "ironcore train: rank 1: loss is nan at step 3 on rank 1\n"


def test_config_prints_yaml_with_sources_that_reloads(cfg_file, tmp_path, capsys):
    assert cli.main(["config", str(cfg_file), "model.num_layers=3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Resolved by `ironcore config")
    lines = out.splitlines()
    assert any(ln.startswith("  num_layers: 3 ") and ln.endswith("# override") for ln in lines)
    assert any(ln.startswith("  micro_batch_size: 2 ") and ln.endswith(f"# {cfg_file}:3") for ln in lines)
    assert any(ln.startswith("  d_model: 128 ") and ln.endswith("configs/model/tiny.yaml:2") for ln in lines)
    assert any(ln.startswith("  gradient_accumulation_steps: 4 ") and "# derived" in ln for ln in lines)
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(out)
    assert to_dict(load_config(resolved)) == to_dict(load_config(cfg_file, ["model.num_layers=3"]))


def test_help_and_usage(capsys):
    assert cli.main(["--help"]) == 0
    assert "ironcore [train] CONFIG" in capsys.readouterr().out
    assert cli.main([]) == 2
    assert cli.main(["config"]) == 2
    assert "a CONFIG file is required" in capsys.readouterr().err
    assert cli.main(["config", "--help"]) == 0


def test_only_rank_zero_prints_config_errors(monkeypatch, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  ln_type: batchnorm\n")
    monkeypatch.setenv("RANK", "1")
    assert cli.main([str(bad)]) == 2
    assert capsys.readouterr().err == ""


def test_a_missing_dataset_found_at_run_time_is_a_config_error(cfg_file, tmp_path, capsys):
    missing = tmp_path / "nowhere.txt"
    status = cli.main([str(cfg_file), f"data.train_datasets=[{{path: {missing}}}]",
                       f"trainer.model_path={tmp_path / 'run'}", "parallel.dist_backend=gloo"])
    err = capsys.readouterr().err
    assert status == 2
    assert f"data.train_datasets[0]: {missing}: file not found" in err and "Traceback" not in err
