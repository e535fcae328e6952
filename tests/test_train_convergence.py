"""End to end: the tiny GPT trained 200 steps on Shakespeare lowers its eval loss by at least 3
nats, and the run's TensorBoard events and MLflow metrics read back with the same numbers as
metrics.jsonl."""

import json

import pytest

from ironcore.training.trainer import train
from tests.train_helpers import eval_losses, load, losses, write_config


@pytest.mark.timeout(600)
def test_tiny_gpt_200_steps_learns_and_logs_everywhere(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    mlflow_uri = (tmp_path / "mlruns").as_uri()
    path = write_config(
        tmp_path, "converge",
        trainer={"micro_batch_size": 4, "train_batch_size": 4, "log_interval": 20, "do_eval": True,
                 "grad_norm_log_interval": "log"},
        operation={"train_steps": 200, "eval_interval": 100, "eval_samples": 32, "test_samples": 16,
                   "no_save": True},
        optim={"max_lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 10},
        utils={"log_level": "WARNING", "tensorboard_dir": str(tmp_path / "tb"),
               "mlflow_tracking_uri": mlflow_uri, "mlflow_experiment_name": "convergence"})
    summary = train(load(path))

    evals = eval_losses(tmp_path / "converge")
    assert sorted(evals) == [0, 100, 200]
    assert evals[0] == pytest.approx(10.83, abs=0.1)  # ln(50257) = 10.82: an untrained model
    assert evals[200] <= evals[0] - 3.0, evals
    assert summary["eval_loss"] == evals[200] and summary["test_loss"] < evals[0] - 3.0
    train_losses = losses(tmp_path / "converge")
    assert sorted(train_losses) == list(range(20, 201, 20))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tb_loss = {e.step: e.value for e in events.Scalars("train/loss")}
    assert sorted(tb_loss) == sorted(train_losses)
    assert all(tb_loss[s] == pytest.approx(train_losses[s], rel=1e-6) for s in tb_loss)  # float32 in TB
    assert [e.step for e in events.Scalars("eval/eval_loss")] == [0, 100, 200]
    assert len(events.Scalars("train/grad_norm")) == 10 and len(events.Scalars("train/mfu")) == 10

    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=mlflow_uri)
    run = client.search_runs([client.get_experiment_by_name("convergence").experiment_id])[0]
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert history == pytest.approx(train_losses, rel=1e-12)
    eval_history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval/eval_loss")}
    assert eval_history == pytest.approx(evals, rel=1e-12)
    assert run.data.params["operation.train_steps"] == "200"
    assert json.loads(run.data.params["data.splits"]) == [0.9, 0.09, 0.01]
