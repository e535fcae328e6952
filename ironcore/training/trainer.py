"""The training loop: ``train(cfg)`` is ``ironcore train CONFIG`` / ``torchrun -m ironcore CONFIG``.

One optimizer step ("step") of ``train_batch_size = micro_batch_size × gradient_accumulation_steps ×
data-parallel size`` sequences:

1. each of the ``gradient_accumulation_steps`` micro-batches runs forward under autocast and
   backward on ``loss / accumulation`` (scaled for fp16), where ``loss = Σ per-token loss × loss_mask
   / Σ loss_mask``, through ``ironcore.parallel.pipeline.forward_backward``: micro-batch by
   micro-batch on one stage, or the ``parallel.pipeline_schedule`` (1F1B, GPipe, interleaved) over
   ``trainer.pipeline_model_parallel_size`` stages, whose last stage computes the loss. With one stage
   the model is wrapped by ``ironcore.parallel.data_parallel`` (``DistributedDataParallel`` over the DP
   group, or FSDP2 with ``parallel.use_fsdp``); gradients are reduced only on the last micro-batch
   (``no_sync`` on the others), so DP=2 computes exactly what DP=1 with twice the accumulation does.
   With several stages the chunks are plain modules and ``pipeline.finalize_model_grads`` averages
   their grads over DP and sums a tied embedding's grads between the first and last stages;
2. under sequence parallelism the TP-replicated grads are all-reduced (``sync_sequence_parallel_grads``);
3. the step's loss (the last stage's, broadcast over the pipeline) is averaged over the DP group
   (not the world: TP ranks hold the same loss) and a
   NaN/inf loss on any rank stops the run, naming the step and the rank, before the weights change
   (or, with ``trainer.skip_nonfinite_steps``, skips that step's update on every rank, and stops
   after ``trainer.max_skipped_steps`` consecutive skipped steps);
4. gradients are unscaled (fp16), clipped to ``optim.clip_grad`` by their global norm (TP shards summed,
   TP-replicated parameters counted once, pipeline stages summed), and the optimizer and LR schedule step.

Around the steps: resume from ``trainer.model_path`` when it holds a checkpoint; evaluate at step 0
and every ``operation.eval_interval`` steps (``trainer.do_eval``) and on the test split at the end
(``do_eval`` or ``do_test``); save a checkpoint every ``trainer.save_checkpoint_steps`` steps, at
the end, at ``operation.exit_interval`` and after SIGTERM/SIGINT (the signal only sets a flag; the
run saves and exits cleanly at the next step boundary); log per ``trainer.log_interval``
(``ironcore.observe.loggers``); profile per ``utils.profile_*``.
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ironcore.checkpoint.io import claim_model_path, set_rng_state
from ironcore.config import Config, to_dict
from ironcore.config.memory import MemoryEstimate, check_memory
from ironcore.data.tokenizer import Tokenizer, build_tokenizer, resolve_vocab_size
from ironcore.observe import metrics
from ironcore.observe.loggers import TrainingLogger
from ironcore.observe.run_info import collect_run_info
from ironcore.observe.profiling import Profiler, phase
from ironcore.model import batch_inputs
from ironcore.training.tied_embedding import sync_tied_embedding_grads
from ironcore.parallel import pipeline
from ironcore.parallel.context import shard_batch
from ironcore.parallel.distributed_optimizer import is_distributed_optimizer, optimizer_state_bytes
from ironcore.parallel.state import ParallelState, destroy_distributed, init_distributed
from ironcore.training.build import build_run
from ironcore.training.evaluate import EvalResult, evaluate
from ironcore.training.precision import autocast, compute_dtype
from ironcore.training.objectives import add_reference_logps, build_objective

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf; the message names the step and the rank."""


@dataclass
class StepResult:
    loss: float          # averaged over the micro-batches and the DP group
    lr: float            # the learning rate this step used
    grad_norm: Optional[float]
    skipped: bool        # no update: fp16 found inf/NaN gradients, or a skipped non-finite loss
    tokens: int          # tokens of the whole step, all DP ranks
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)  # the objective's (DPO: rewards/*), averaged


def train(cfg: Config, provenance: Optional[dict[str, str]] = None) -> dict:
    """Train as ``cfg`` says; returns the run's summary (also logged on rank 0). ``provenance``
    (each key's source, from the config loader) is recorded in the run metadata of checkpoints.

    Raises ``NonFiniteLossError`` when the loss becomes NaN/inf. A SIGTERM/SIGINT ends the run
    normally after saving a checkpoint.
    """
    package_logger = logging.getLogger("ironcore")
    log_level, deterministic = package_logger.level, torch.are_deterministic_algorithms_enabled()
    pstate = init_distributed(cfg)
    lock = None
    try:
        # Before anything is allocated or written: refuse a config that cannot fit (ConfigError).
        tokenizer = build_tokenizer(cfg.model)
        estimate = check_memory(cfg, provenance, resolve_vocab_size(cfg, tokenizer), pstate.device)
        lock = claim_model_path(cfg, pstate)  # one run per model_path; leftovers of crashed saves tidied
        return Trainer(cfg, pstate, provenance, estimate, tokenizer).run()
    finally:
        if lock is not None:
            lock.release()
        destroy_distributed()
        # Leave the process as we found it (train() may be called again, e.g. by tests or notebooks).
        package_logger.setLevel(log_level)
        torch.use_deterministic_algorithms(deterministic)


def _configure_logging(log_level: str, rank: int) -> None:
    # Rank 0 logs at utils.log_level; the other ranks report warnings and errors only.
    level = logging.getLevelName(log_level)
    logging.getLogger("ironcore").setLevel(level if rank == 0 else max(level, logging.WARNING))


def _set_determinism(seed: int, deterministic: bool, device: torch.device) -> None:
    random.seed(seed)
    np.random.seed(seed)
    if deterministic:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
            torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True)
        logger.info("deterministic mode: torch.use_deterministic_algorithms(True)")


class _StopSignal:
    """SIGTERM/SIGINT set a flag instead of killing the process mid-step."""

    def __init__(self) -> None:
        self.received: Optional[str] = None
        self._previous: dict = {}

    def __enter__(self) -> "_StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Builds everything a run needs from ``cfg`` on this rank, then ``run()`` trains."""

    def __init__(self, cfg: Config, pstate: ParallelState, provenance: Optional[dict[str, str]] = None,
                 memory_estimate: Optional[MemoryEstimate] = None, tokenizer: Optional[Tokenizer] = None):
        from ironcore.data import build_datasets, build_loader

        self.cfg, self.pstate = cfg, pstate
        _configure_logging(cfg.utils.log_level, pstate.rank)
        self.objective = build_objective(cfg, pstate.cp_group)
        _set_determinism(cfg.init.seed, cfg.utils.deterministic, pstate.device)

        tokenizer = tokenizer or build_tokenizer(cfg.model)
        if memory_estimate is None:
            memory_estimate = check_memory(cfg, provenance, resolve_vocab_size(cfg, tokenizer), pstate.device)
        self.memory_estimate = memory_estimate
        logger.info("%s", memory_estimate.summary())
        self.datasets = build_datasets(cfg, tokenizer)  # bad data fails before a model is built
        run = build_run(cfg, pstate, tokenizer=tokenizer)
        self.chunks, self.stages, self.model = run.chunks, run.stages, run.model
        self.optimizer, self.scheduler, self.scaler = run.optimizer, run.scheduler, run.scaler
        self.embedding_group = run.embedding_group
        self.reference = run.reference  # DPO's frozen reference chunks, else None
        self.step_metrics: list[dict[str, torch.Tensor]] = []  # the objective's, per micro-batch of a step
        resumed = run.resumed
        self.step = resumed["iteration"] if resumed else 0
        self.rng_state = resumed["rng_state"] if resumed else None  # restored by run(), last
        consumed = resumed["data_state"]["consumed_samples"] if resumed else 0
        self.loader = build_loader(self.datasets["train"], cfg.trainer.micro_batch_size, pstate.dp_rank,
                                   pstate.dp_size, cfg.init.seed, consumed_samples=consumed)

        flops = metrics.model_flops_per_token(cfg.model, self.chunks[0].padded_vocab_size, cfg.model.max_seq_len)
        peak = metrics.device_peak_flops(pstate.device, compute_dtype(cfg.model.precision))
        self.throughput = metrics.Throughput(flops, peak, pstate.world_size)
        self.run_info = collect_run_info(pstate, provenance)
        self.log = TrainingLogger(cfg, pstate.rank, to_dict(cfg), resumed=resumed is not None,
                                  run_info=self.run_info)
        self.profiler = Profiler(cfg.utils, pstate.rank, cfg.trainer.model_path, layout={
            "pp": pstate.pp_size, "tp": pstate.tp_size, "dp": pstate.dp_size, "cp": pstate.cp_size,
            "pp_rank": pstate.pp_rank, "schedule": cfg.parallel.pipeline_schedule,
            "virtual_stages": cfg.parallel.virtual_pipeline_stages,
            "microbatches": cfg.trainer.gradient_accumulation_steps})
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.last_saved: Optional[int] = self.step if resumed else None
        self.last_checkpoint: Optional[str] = None
        self.last_grad_norm: Optional[float] = None
        self.warned_no_save = False
        self.skipped_in_a_row = 0  # consecutive steps skipped for a non-finite loss
        self.warned_no_eval = False

    # ------------------------------------------------------------------ one step

    def _forward_step(self, model: nn.Module, batch: dict, hidden_states: Optional[torch.Tensor]) -> torch.Tensor:
        with autocast(self.cfg.model.precision, self.pstate.device):  # in the pipeline's "forward" range
            return model(**batch_inputs(batch, self.pstate.device), hidden_states=hidden_states)

    def _loss(self, per_token: torch.Tensor, batch: dict) -> torch.Tensor:
        loss, step_metrics = self.objective.loss(per_token, batch)
        self.step_metrics.append(step_metrics)
        return loss

    def _pipeline_options(self) -> dict:
        cfg = self.cfg
        return dict(hidden_size=cfg.model.d_model, sequence_parallel=cfg.parallel.sequence_parallel,
                    forward_step=self._forward_step, timeout_minute=cfg.parallel.timeout_minute)

    def forward_backward(self) -> tuple[torch.Tensor, int]:
        """Forward and backward over the step's micro-batches; returns (the step's mean loss
        followed by the means of the objective's metrics, the last stage's, on every stage; this
        rank's token count)."""
        cfg, pstate = self.cfg, self.pstate
        m = cfg.trainer.gradient_accumulation_steps
        # Drawn up front (the schedule would draw the same m, in order): DPO's reference runs on them first.
        batches = [self.objective.model_batch(next(self.loader)) for _ in range(m)]
        tokens = sum(batch["input_ids"].numel() for batch in batches)  # this replica's, all its CP ranks' together
        batches = [shard_batch(batch, pstate.cp_size, pstate.cp_rank) for batch in batches]
        if self.reference is not None:
            with phase("reference"):
                add_reference_logps(self.objective, self.reference, batches, pstate,
                                    schedule=cfg.parallel.pipeline_schedule, **self._pipeline_options())
        self.step_metrics = []
        losses = pipeline.forward_backward(
            cfg.parallel.pipeline_schedule, self.stages, iter(batches), m, pstate, self._loss,
            scale_loss=self.scaler.scale if self.scaler is not None else None, **self._pipeline_options())
        return self._last_stage_means(losses), tokens

    def _last_stage_means(self, losses: list[torch.Tensor]) -> torch.Tensor:
        """``[loss, *metrics]``, each the mean over the micro-batches, from the last stage on every stage
        (one broadcast), so rank 0 can log them and every rank sees a NaN."""
        names = self.objective.metric_names
        rows = [torch.stack([loss.float(), *(metrics[n].float() for n in names)])
                for loss, metrics in zip(losses, self.step_metrics)]  # both empty on other stages
        return pipeline.last_stage_mean(rows, self.pstate, self.pstate.device, shape=(1 + len(names),))

    def _check_and_average(self, local: torch.Tensor, stop: "_StopSignal") -> tuple[float, dict[str, float], bool]:
        """DP- (and CP-) averaged loss and metrics (from ``[loss, *metrics]``; the loss is NaN when any rank's
        loss is non-finite and ``trainer.skip_nonfinite_steps`` is on; otherwise such a loss raises).
        Also agrees across all ranks on whether a stop signal arrived (any rank's signal stops every
        rank at the same step)."""
        pstate = self.pstate
        local_loss = local[0]
        averaged = local.detach().float().clone()
        if pstate.dp_cp_group is not None:  # CP ranks' losses average to the token mean (objectives.py)
            dist.all_reduce(averaged, group=pstate.dp_cp_group)
            averaged /= pstate.dp_cp_size
        # One MIN-reduction over the world: the first rank with a bad loss, and 0 if any rank got a signal.
        flags = torch.tensor([pstate.rank if not torch.isfinite(local_loss) else pstate.world_size,
                              0 if stop.received else 1], dtype=torch.int64, device=pstate.device)
        if pstate.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        bad_rank, no_signal = int(flags[0]), int(flags[1])
        if bad_rank < pstate.world_size:
            value = local_loss.item() if bad_rank == pstate.rank else "non-finite"
            where = f"at step {self.step + 1} on rank {bad_rank} (this is rank {pstate.rank})"
            if not self.cfg.trainer.skip_nonfinite_steps:
                raise NonFiniteLossError(
                    f"training loss is {value} {where}; stopping before the optimizer step. Lower "
                    f"optim.max_lr, raise optim.warmup_steps, check the data, or set trainer.skip_nonfinite_steps.")
            if pstate.rank == 0:
                logger.warning("training loss is %s %s: skipping this step's update "
                               "(trainer.skip_nonfinite_steps)", value, where)
            return math.nan, {}, no_signal == 0
        values = averaged.tolist()
        return values[0], dict(zip(self.objective.metric_names, values[1:])), no_signal == 0

    def train_step(self, stop: "_StopSignal") -> tuple[StepResult, bool]:
        """One optimizer step; returns its result and whether a stop signal was received."""
        t0 = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        local, tokens = self.forward_backward()
        loss, step_metrics, signalled = self._check_and_average(local, stop)
        if math.isnan(loss):  # skipped non-finite step: its data is consumed, nothing is updated
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.skipped_in_a_row += 1
            limit = self.cfg.trainer.max_skipped_steps
            if self.skipped_in_a_row >= limit:
                raise NonFiniteLossError(
                    f"training loss was non-finite at {limit} consecutive steps ({self.step - limit + 1} to "
                    f"{self.step}, trainer.max_skipped_steps={limit}): the model is broken, stopping without "
                    "saving. Resume from the last checkpoint with a lower optim.max_lr, or check the data.")
            return StepResult(loss, lr, None, True, tokens * self.pstate.dp_size, time.perf_counter() - t0), signalled
        self.skipped_in_a_row = 0
        with phase("grad-reduce"):
            self._finalize_grads()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = None
        if self.cfg.optim.clip_grad > 0 or self.cfg.trainer.grad_norm_log_interval:
            grad_norm = self._clip_grad_norm().item()
        skipped = False
        with phase("optimizer"):
            if self.scaler is not None:
                scale = self.scaler.get_scale()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                skipped = self.scaler.get_scale() < scale  # the scaler backed off: the update was skipped
            else:
                self.optimizer.step()
        if not skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        seconds = time.perf_counter() - t0
        return StepResult(loss, lr, grad_norm, skipped, tokens * self.pstate.dp_size, seconds, step_metrics), signalled

    def _finalize_grads(self) -> None:
        """Whole gradients fixed up (sequence-parallel and tied-embedding sums), reduced over DP."""
        for chunk in self.chunks:
            chunk.sync_sequence_parallel_grads()
        if is_distributed_optimizer(self.optimizer):
            sync_tied_embedding_grads(self.chunks, self.pstate, self.embedding_group)
            self.optimizer.reduce_scatter_grads()
        else:
            pipeline.finalize_model_grads(self.stages, self.pstate)
            sync_tied_embedding_grads(self.chunks, self.pstate, self.embedding_group)

    def _log_optimizer_memory(self) -> None:
        # Known only after the first step: torch's Adam creates its state lazily.
        if self.pstate.rank == 0:
            sharded = (" (sharded over DP %d)" % self.pstate.dp_size
                       if is_distributed_optimizer(self.optimizer) or self.cfg.parallel.use_fsdp else "")
            logger.info("optimizer state: %.2f MiB on rank 0%s", optimizer_state_bytes(self.optimizer) / 2**20,
                        sharded)

    def _clip_grad_norm(self) -> torch.Tensor:
        if is_distributed_optimizer(self.optimizer):
            return self.optimizer.clip_grad_norm_(self.cfg.optim.clip_grad)
        return metrics.clip_grad_norm_(self.params, self.cfg.optim.clip_grad, self.pstate.tp_group,
                                       self.pstate.pp_group)

    # ------------------------------------------------------------------ around the steps

    def _eval(self, split: str) -> Optional[EvalResult]:
        cfg = self.cfg
        samples = cfg.operation.eval_samples if split == "eval" else cfg.operation.test_samples
        batch = cfg.trainer.eval_batch_size or cfg.trainer.micro_batch_size
        with phase(split):
            result = evaluate(self.model, self.datasets[split], samples, batch, self.pstate, cfg.model.precision,
                              self.objective, self.reference)
        if result is None:
            if not (split == "eval" and self.warned_no_eval):
                logger.warning("no %s data: the %s split is empty (data.splits / data.%s_datasets) or "
                               "operation.%s_samples is 0; skipping %s", split, split, split, split, split)
            self.warned_no_eval |= split == "eval"
            return None
        self.log.log_eval(self.step, split, result.loss, result.ppl, result.metrics)
        return result

    def _save(self) -> Optional[str]:
        from ironcore.checkpoint.io import save_checkpoint

        cfg = self.cfg
        if cfg.operation.no_save or self.last_saved == self.step:
            return None
        if not cfg.trainer.model_path:
            if not self.warned_no_save:
                logger.warning("trainer.model_path is empty: checkpoints are not saved")
                self.warned_no_save = True
            return None
        with phase("checkpoint"):
            path = save_checkpoint(cfg, self.pstate, self.step, self.model, self.optimizer, self.scheduler,
                                   self.scaler, self.loader.state_dict(), self.run_info)
        self.last_saved, self.last_checkpoint = self.step, str(path)
        norms = {}
        if cfg.trainer.grad_norm_log_interval == "checkpoint" and self.last_grad_norm is not None:
            norms["grad_norm"] = self.last_grad_norm
        if cfg.trainer.param_norm_log_interval == "checkpoint":
            norms["param_norm"] = self._param_norm()
        self.log.log_checkpoint(self.step, str(path), norms)
        return str(path)

    def _param_norm(self) -> float:
        return metrics.param_norm(self.params, self.pstate.tp_group, self.pstate.pp_group).item()

    def _log_step(self, window: list[StepResult], started: float, start_step: int) -> None:
        cfg = self.cfg
        rate = self.throughput.report()
        elapsed = time.perf_counter() - started
        per_step = elapsed / max(self.step - start_step, 1)
        record = {
            "loss": sum(r.loss for r in window) / len(window),
            "lr": window[-1].lr,
            **rate,
            "elapsed_s": elapsed,
            "eta_s": per_step * (cfg.operation.train_steps - self.step),
        }
        for name in self.objective.metric_names:
            record[name] = sum(r.metrics[name] for r in window) / len(window)
        if cfg.trainer.grad_norm_log_interval == "log" and window[-1].grad_norm is not None:
            record["grad_norm"] = window[-1].grad_norm
        if cfg.trainer.param_norm_log_interval == "log":
            record["param_norm"] = self._param_norm()
        if cfg.utils.report_memory_usage:
            record["peak_memory_gib"] = metrics.peak_memory_bytes(self.pstate.device) / 2**30
        skipped = sum(r.skipped for r in window)
        if skipped:
            record["skipped_steps"] = skipped
        self.log.log_step(self.step, record)

    def run(self) -> dict:
        """Train until ``operation.train_steps``, ``exit_interval``, a signal or the profiling end."""
        cfg, op = self.cfg, self.cfg.operation
        started, start_step = time.perf_counter(), self.step
        window: list[StepResult] = []
        losses: list[float] = []
        evaluated = tested = None
        stopped_by = "train_steps"
        total_tokens, total_seconds = 0, 0.0
        if self.step >= op.train_steps:
            logger.info("nothing to train: resumed at step %d >= operation.train_steps (%d)", self.step, op.train_steps)
        elif cfg.trainer.do_eval and self.step == 0:
            evaluated = self._eval("eval")  # the baseline before any update
        self.model.train()
        if self.rng_state is not None:
            # The resumed RNG streams are restored only now, right before the first step: nothing
            # between loading the checkpoint and here (the MFU probe, loggers, the loader) may draw
            # from them, or dropout would differ from the uninterrupted run's.
            set_rng_state(self.rng_state)
            self.rng_state = None
        # The handlers stay installed until the end, so a signal can never cut a checkpoint write short.
        with _StopSignal() as stop:
            try:
                while self.step < op.train_steps:
                    self.profiler.step_begin(self.step + 1)  # the console's number for this step
                    result, signalled = self.train_step(stop)
                    profile_done = self.profiler.step_end(self.step)
                    if self.step == start_step + 1:
                        self._log_optimizer_memory()
                    if not math.isnan(result.loss):  # a skipped non-finite step was logged as a warning
                        window.append(result)
                        losses.append(result.loss)
                    self.last_grad_norm = result.grad_norm
                    self.throughput.add(result.tokens, result.seconds)
                    total_tokens, total_seconds = total_tokens + result.tokens, total_seconds + result.seconds
                    if window and (self.step % cfg.trainer.log_interval == 0 or self.step == op.train_steps):
                        self._log_step(window, started, start_step)
                        window = []
                    if signalled:  # preemption: save now, skip everything else
                        stopped_by = f"signal ({stop.received or 'on another rank'})"
                        break
                    if cfg.trainer.do_eval and self.step % op.eval_interval == 0:
                        evaluated = self._eval("eval")
                    if self.step % cfg.trainer.save_checkpoint_steps == 0:
                        self._save()
                    if op.exit_interval and self.step % op.exit_interval == 0:
                        stopped_by = "operation.exit_interval"
                        break
                    if profile_done:
                        stopped_by = "utils.stop_on_profile_end"
                        break
                if stopped_by != "train_steps":
                    logger.info("stopping at step %d: %s", self.step, stopped_by)
                if window:
                    self._log_step(window, started, start_step)
                if self.step > start_step:
                    self._save()
                if not stopped_by.startswith("signal"):
                    if cfg.trainer.do_eval and self.step > start_step and self.step % op.eval_interval != 0:
                        evaluated = self._eval("eval")
                    if cfg.trainer.do_eval or cfg.trainer.do_test:
                        tested = self._eval("test")
            except BaseException:
                self.log.close(failed=True)
                raise
            finally:
                self.profiler.close()
                self.log.close()
        return self._summary(losses, evaluated, tested, self.last_checkpoint, stopped_by, total_tokens,
                             total_seconds, time.perf_counter() - started)

    def _summary(self, losses, evaluated: Optional[EvalResult], tested: Optional[EvalResult], checkpoint,
                 stopped_by, tokens, seconds, elapsed) -> dict:
        eval_loss = evaluated.loss if evaluated is not None else None
        test_loss = tested.loss if tested is not None else None
        tokens_per_s = tokens / seconds if seconds else 0.0
        peak = self.throughput.peak_flops
        mfu = tokens_per_s * self.throughput.flops_per_token / self.pstate.world_size / peak if peak else None
        summary = {
            "steps": self.step,
            "stopped_by": stopped_by,
            "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
            "eval_loss": eval_loss,
            "eval_ppl": evaluated.ppl if evaluated is not None else None,
            "test_loss": test_loss,
            "tokens_per_s": tokens_per_s,
            "mfu": mfu,
            "elapsed_s": elapsed,
            "consumed_samples": self.loader.state_dict()["consumed_samples"],
            "checkpoint": checkpoint,
            "optimizer_state_bytes": optimizer_state_bytes(self.optimizer),  # this rank's
        }
        if self.pstate.rank == 0:
            fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
            logger.info(
                "training done: %d steps (%s) in %.1fs | loss %s -> %s | eval_loss %s | test_loss %s | "
                "%s tokens/s | MFU %s | checkpoint %s", self.step, stopped_by, elapsed,
                fmt(summary["first_loss"], ".4f"), fmt(summary["final_loss"], ".4f"), fmt(eval_loss, ".4f"),
                fmt(test_loss, ".4f"), format(tokens_per_s, ",.0f"),
                "unknown" if mfu is None else f"{100 * mfu:.1f}%", checkpoint or "none")
        return summary
