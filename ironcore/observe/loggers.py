"""Where training metrics go: the console, ``metrics.jsonl``, TensorBoard and MLflow.

One ``TrainingLogger`` per process; only global rank 0 writes anything (the metrics it receives
are already reduced over the ranks that matter). Each sink is opened only when configured:

* console: one line per logged step (SPEC §6) through the ``ironcore`` logger (with DPO's
  ``rewards/*`` when the objective reports them);
* ``metrics.jsonl`` in ``trainer.model_path``: one JSON object per logged step
  (``step, loss, lr, tokens_per_s, mfu`` and whatever else was measured) and per evaluation
  (``step, eval_loss, eval_ppl`` / ``test_loss``; DPO: ``eval_loss`` and ``eval_rewards/*``, no
  perplexity); skipped when ``model_path`` is empty;
* TensorBoard: ``utils.tensorboard_dir``, scalars under ``train/`` and ``eval/`` / ``test/``, and
  the resolved config and the run metadata (``ironcore.observe.run_info``) as text;
* MLflow: ``utils.mlflow_tracking_uri`` (an HTTP server, ``file:`` or ``sqlite:`` store), the
  experiment ``utils.mlflow_experiment_name`` (default ``trainer.model_name``); params = the resolved
  config flattened to ``group.key``, tags ``run.*`` = the run metadata (and MLflow's own
  ``mlflow.source.git.commit``), metrics per logged step. An HTTP server that does not answer
  stops the run at once with one line; a run that fails is marked FAILED; a resumed run continues
  the MLflow run whose id ``model_path/mlflow_run.json`` keeps.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

import yaml

from ironcore.config import ConfigError

logger = logging.getLogger("ironcore.train")


class LoggerError(RuntimeError):
    """A metrics sink that cannot be opened (unwritable TensorBoard folder, unreachable MLflow server):
    one line naming it; the command line exits with status 1."""

_MLFLOW_PARAMS_PER_CALL = 100  # MLflow's batch limit
_MLFLOW_PARAM_CHARS = 6000  # MLflow's value length limit
_MLFLOW_TAG_CHARS = 5000  # MLflow's tag value length limit
_MLFLOW_RUN_FILE = "mlflow_run.json"  # in model_path: the run a resumed run continues


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{"model": {"positional_embedding": {"type": "rope"}}}`` -> ``{"model.positional_embedding.type": "rope"}``."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _without_provenance(run_info: dict) -> dict:
    """The run metadata less the per-key provenance (the config itself is logged separately)."""
    return {k: v for k, v in run_info.items() if k != "provenance"}


def _check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, with one line, when nothing listens at an HTTP tracking URI."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "localhost", port), timeout=timeout).close()
    except OSError as e:
        raise LoggerError(f"utils.mlflow_tracking_uri {uri}: no MLflow server answers at {parts.hostname}:{port} "
                          f"({e.strerror or e}); start it, correct the URI, or unset utils.mlflow_tracking_uri") from None


def _continue_run(mlflow, record: Path, uri: str):
    """The MLflow run a resumed run continues (its id kept in ``model_path``), or None."""
    try:
        saved = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("tracking_uri") != uri or not isinstance(saved.get("run_id"), str):
        return None
    try:
        return mlflow.start_run(run_id=saved["run_id"])
    except Exception as e:  # noqa: BLE001 - deleted on the server, another store: start a new one
        logger.warning("MLflow: cannot continue run %s (%s): starting a new run", saved["run_id"],
                       " ".join(str(e).split())[:200])
        return None


def _hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def format_step_line(step: int, train_steps: int, m: dict) -> str:
    """The console line of SPEC §6 from a step's metrics (keys that are absent are left out)."""
    parts = [f"step {step}/{train_steps}", f"loss {m['loss']:.4f}", f"lr {m['lr']:.3e}"]
    if m.get("grad_norm") is not None:
        parts.append(f"grad_norm {m['grad_norm']:.3f}")
    if m.get("param_norm") is not None:
        parts.append(f"param_norm {m['param_norm']:.3f}")
    parts.append(f"tokens/s {m['tokens_per_s']:,.0f}")
    parts.append(f"TFLOP/s/device {m['tflops_per_device']:.2f}")
    parts.append("MFU " + (f"{100 * m['mfu']:.1f}%" if m.get("mfu") is not None else "unknown"))
    if m.get("peak_memory_gib") is not None:
        parts.append(f"peak_mem {m['peak_memory_gib']:.2f} GiB")
    # DPO's implicit rewards (TRL's names: rewards/chosen, .../rejected, .../margins, .../accuracy)
    parts += [f"{k} {v:.4f}" for k, v in m.items() if k.startswith("rewards/")]
    if m.get("skipped_steps"):
        parts.append(f"skipped {m['skipped_steps']}")
    parts.append(f"elapsed {_hms(m['elapsed_s'])} eta {_hms(m['eta_s'])}")
    return " | ".join(parts)


class TrainingLogger:
    """Console + ``metrics.jsonl`` + TensorBoard + MLflow sinks for one run (active on rank 0)."""

    def __init__(self, cfg, rank: int, resolved_config: dict, resumed: bool = False,
                 run_info: Optional[dict] = None):
        """``resumed``: the run continues from a checkpoint, so it continues its MLflow run too.
        ``run_info``: where the run came from, logged once to TensorBoard and MLflow."""
        self.active = rank == 0
        self.train_steps = cfg.operation.train_steps
        self._jsonl = None
        self._tb = None
        self._mlflow = None
        if not self.active:
            return
        if cfg.trainer.model_path:
            Path(cfg.trainer.model_path).mkdir(parents=True, exist_ok=True)
            self._jsonl = open(Path(cfg.trainer.model_path) / "metrics.jsonl", "a", encoding="utf-8")
        if cfg.utils.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter
            try:
                self._tb = SummaryWriter(log_dir=cfg.utils.tensorboard_dir)
            except OSError as e:
                raise LoggerError(f"utils.tensorboard_dir {cfg.utils.tensorboard_dir} cannot be written: "
                                  f"{e.strerror or e} ({e.filename or cfg.utils.tensorboard_dir})") from None
            self._tb.add_text("config", "```\n" + yaml.safe_dump(resolved_config, sort_keys=False) + "```", 0)
            if run_info is not None:
                self._tb.add_text("run_info", "```\n" + json.dumps(_without_provenance(run_info), indent=1)
                                  + "\n```", 0)
            logger.info("TensorBoard: %s", cfg.utils.tensorboard_dir)
        if cfg.utils.mlflow_tracking_uri:
            self._mlflow = self._start_mlflow(cfg, resolved_config, resumed)
            if run_info is not None:
                self._tag_mlflow(cfg.utils.mlflow_tracking_uri, run_info)

    @staticmethod
    def _start_mlflow(cfg, resolved_config: dict, resumed: bool):
        uri = cfg.utils.mlflow_tracking_uri
        if uri.startswith("sqlite:") and importlib.util.find_spec("sqlalchemy") is None:
            # mlflow-skinny (our dependency) has no database stores; it would fail deep inside MLflow.
            raise ConfigError([f"utils.mlflow_tracking_uri = {uri!r}: a sqlite: store needs the full MLflow "
                               "package (pip install mlflow); the installed client logs to file: stores and "
                               "HTTP tracking servers"])
        if uri.startswith("file:"):
            # MLflow 3 refuses its (maintenance-mode) file store unless explicitly allowed.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        if uri.startswith(("http:", "https:")):
            _check_reachable(uri)
            # MLflow retries an unanswered request for minutes by default: a server that goes away
            # mid-run should cost seconds per logged step, not stall the training.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        import mlflow
        record = Path(cfg.trainer.model_path) / _MLFLOW_RUN_FILE if cfg.trainer.model_path else None
        try:
            mlflow.set_tracking_uri(uri)
            mlflow.set_experiment(cfg.utils.mlflow_experiment_name or cfg.trainer.model_name)
            run = _continue_run(mlflow, record, uri) if resumed and record is not None else None
            if run is None:
                run = mlflow.start_run(run_name=cfg.trainer.model_name)
            logged = run.data.params
            params = {k: str(v)[:_MLFLOW_PARAM_CHARS] for k, v in flatten(resolved_config).items()}
            changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
            if changed:  # MLflow params cannot change: the run keeps the first values
                logger.warning("MLflow run %s continues with changed config keys, logged with their first "
                               "values only: %s", run.info.run_id, ", ".join(changed))
            items = [(k, v) for k, v in params.items() if k not in logged]
            for i in range(0, len(items), _MLFLOW_PARAMS_PER_CALL):
                mlflow.log_params(dict(items[i:i + _MLFLOW_PARAMS_PER_CALL]))
        except Exception as e:  # noqa: BLE001 - MLflow's errors (server, store, permissions): one line
            raise LoggerError(f"utils.mlflow_tracking_uri {uri}: MLflow failed ({' '.join(str(e).split())[:300]})") \
                from None
        if record is not None:
            record.write_text(json.dumps({"tracking_uri": uri, "run_id": run.info.run_id}) + "\n")
        logger.info("MLflow: run %s at %s", run.info.run_id, uri)
        return mlflow

    def _tag_mlflow(self, uri: str, run_info: dict) -> None:
        """The run metadata as MLflow tags (which, unlike params, a resumed run may update)."""
        tags = {f"run.{k}": v if isinstance(v, str) else json.dumps(v)
                for k, v in flatten(_without_provenance(run_info)).items()}
        if run_info.get("git_commit"):
            tags["mlflow.source.git.commit"] = run_info["git_commit"]
        try:
            self._mlflow.set_tags({k: v[:_MLFLOW_TAG_CHARS] for k, v in tags.items()})
        except Exception as e:  # noqa: BLE001 - MLflow's errors (server, store): one line
            raise LoggerError(f"utils.mlflow_tracking_uri {uri}: MLflow failed ({' '.join(str(e).split())[:300]})") \
                from None

    def _write(self, record: dict, prefix: str) -> None:
        step = record["step"]
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        scalars = {k: float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(f"{prefix}/{key}", value, step)
            self._tb.flush()
        if self._mlflow is not None:
            self._mlflow.log_metrics({f"{prefix}/{k}": v for k, v in scalars.items()}, step=step)

    def log_step(self, step: int, metrics: dict) -> None:
        """A training step: console line, then the machine-readable sinks."""
        if not self.active:
            return
        logger.info(format_step_line(step, self.train_steps, metrics))
        self._write({"step": step, **metrics}, "train")

    def log_eval(self, step: int, split: str, loss: float, ppl: Optional[float],
                 metrics: Optional[dict[str, float]] = None) -> None:
        """An evaluation of ``split`` (``eval`` or ``test``) at ``step``: the loss, its perplexity
        (language modeling; None for DPO) and the objective's metrics (DPO: ``rewards/*``), each
        recorded as ``{split}_{name}``."""
        if not self.active:
            return
        record = {f"{split}_loss": loss}
        if ppl is not None:
            record[f"{split}_ppl"] = ppl
        record.update({f"{split}_{name}": value for name, value in (metrics or {}).items()})
        logger.info("%s at step %d | %s", split, step,
                    " | ".join(f"{k} {v:.2f}" if k.endswith("_ppl") else f"{k} {v:.4f}" for k, v in record.items()))
        self._write({"step": step, **record}, split)

    def log_checkpoint(self, step: int, path: str, norms: dict) -> None:
        """A saved checkpoint, with the norms whose cadence is ``checkpoint``."""
        if not self.active:
            return
        logger.info("checkpoint at step %d: %s%s", step, path,
                    "".join(f" | {k} {v:.3f}" for k, v in norms.items()))
        if norms:
            self._write({"step": step, **norms}, "train")

    def close(self, failed: bool = False) -> None:
        """Close every sink; ``failed`` marks the MLflow run FAILED (a run that raised)."""
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._mlflow is not None:
            try:
                self._mlflow.end_run(status="FAILED" if failed else "FINISHED")
            except Exception as e:  # noqa: BLE001 - the server went away: the run's outcome stands
                logger.warning("MLflow: could not end the run (%s)", " ".join(str(e).split())[:200])
        self._jsonl = self._tb = self._mlflow = None
