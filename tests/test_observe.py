"""Loggers write what SPEC §6 promises (metrics.jsonl, TensorBoard, MLflow) and read back."""

import json

import pytest

from ironcore.config import Config, to_dict
from ironcore.observe.loggers import TrainingLogger, flatten, format_step_line

STEP = {"loss": 4.25, "lr": 3e-4, "grad_norm": 1.5, "tokens_per_s": 1234.0, "tflops_per_device": 0.05,
        "mfu": 0.25, "peak_memory_gib": 0.5, "elapsed_s": 62.0, "eta_s": 300.0}


def test_console_line_has_every_spec_field():
    line = format_step_line(20, 200, STEP)
    for part in ["step 20/200", "loss 4.2500", "lr 3.000e-04", "grad_norm 1.500", "tokens/s 1,234",
                 "TFLOP/s/device 0.05", "MFU 25.0%", "peak_mem 0.50 GiB", "elapsed 0:01:02", "eta 0:05:00"]:
        assert part in line
    assert "MFU unknown" in format_step_line(1, 2, {**STEP, "mfu": None})


def test_flatten_nested_config():
    assert flatten({"model": {"d_model": 8, "positional_embedding": {"type": "rope"}}}) == {
        "model.d_model": 8, "model.positional_embedding.type": "rope"}


def test_jsonl_tensorboard_and_mlflow_read_back(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    cfg = Config()
    cfg.trainer.model_path = str(tmp_path / "run")
    cfg.trainer.model_name = "logger-test"
    cfg.utils.tensorboard_dir = str(tmp_path / "tb")
    cfg.utils.mlflow_tracking_uri = (tmp_path / "mlruns").as_uri()
    info = {"git_commit": "ab" * 20, "git_dirty": True, "layout": {"tp_size": 2}, "hostnames": ["n1", "n2"],
            "provenance": {"model.d_model": "default"}}
    log = TrainingLogger(cfg, rank=0, resolved_config=to_dict(cfg), run_info=info)
    log.log_step(1, STEP)
    log.log_step(2, {**STEP, "loss": 4.0})
    log.log_eval(2, "eval", 3.5, 33.1)
    log.close()

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 2]
    assert records[1]["loss"] == 4.0 and records[0]["mfu"] == 0.25 and records[2]["eval_loss"] == 3.5

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/loss")] == [4.25, 4.0]
    assert [e.value for e in acc.Scalars("eval/eval_loss")] == [3.5]
    logged_info = acc.Tensors("run_info/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(logged_info.strip("`\n")) == {k: v for k, v in info.items() if k != "provenance"}

    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=cfg.utils.mlflow_tracking_uri)
    run = client.search_runs([client.get_experiment_by_name("logger-test").experiment_id])[0]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")] == [4.25, 4.0]
    assert run.data.params["model.d_model"] == "512"
    assert run.data.params["optim.lr_scheduler"] == "cosine"
    tags = run.data.tags
    assert tags["run.git_commit"] == tags["mlflow.source.git.commit"] == "ab" * 20
    assert (tags["run.git_dirty"], tags["run.layout.tp_size"], tags["run.hostnames"]) == ("true", "2", '["n1", "n2"]')
    assert not any(k.startswith("run.provenance") for k in tags)


def test_sqlite_store_without_full_mlflow_is_a_config_error(tmp_path, monkeypatch):
    import importlib.util

    from ironcore.config import ConfigError

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sqlalchemy" else real_find_spec(name, *a))
    cfg = Config()
    cfg.utils.mlflow_tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(ConfigError, match=r"utils.mlflow_tracking_uri = 'sqlite:///.*needs the full MLflow package"):
        TrainingLogger(cfg, rank=0, resolved_config=to_dict(cfg))


def test_non_zero_rank_writes_nothing(tmp_path):
    cfg = Config()
    cfg.trainer.model_path = str(tmp_path / "run")
    cfg.utils.tensorboard_dir = str(tmp_path / "tb")
    log = TrainingLogger(cfg, rank=1, resolved_config={})
    log.log_step(1, STEP)
    log.close()
    assert not (tmp_path / "run").exists() and not (tmp_path / "tb").exists()
