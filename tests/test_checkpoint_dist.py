"""Distributed checkpoints reshard: saved at TP=2, loaded at TP=1 and at TP=2 × DP=2 (real gloo ranks).

The real GPT model (tied GPT-2 style, and untied LLaMA style with GQA), the real optimizer and LR
schedule of the trainer. The vocabulary (100) is padded to 256 at TP=2 but 128 at TP=1, so the
embedding/head shards change shape between layouts, and at TP=2 one rank's shard is cut short at
the real vocabulary while the other holds padding only. After one step the TP=2 run saves, then takes
a second step; each loading layout must give the same loss as the saver after the first step (the
weights moved over) and after one more step (Adam's moments, the optimizer's lr and the schedule
moved over too), to 1e-5. The same checkpoint converted with ``to_single_file`` loads at TP=1 too,
and at PP=2 each stage loads exactly the TP=1 weights and Adam moments of its layers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
from torch.nn.parallel import DistributedDataParallel

import ironcore.checkpoint.io as ckpt_io
from ironcore.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ironcore.checkpoint.distributed import global_namer, to_single_file
from ironcore.checkpoint.io import read_latest
from ironcore.config.schema import Config, ModelConfig, PositionalEmbeddingConfig
from ironcore.model.gpt import build_model
from ironcore.parallel.state import init_distributed
from ironcore.training.optimizer import build_optimizer
from ironcore.training.scheduler import build_scheduler
from tests.multiproc import run_distributed
from tools.convert_checkpoint import main as convert_tool

VOCAB = 100  # padded to 128 at TP=1, 256 at TP=2: TP rank 1 holds padding rows only
BATCH, SEQ = 2, 8
COMMON = dict(d_model=32, num_layers=2, max_seq_len=16, precision="float32",
              dropout_embd=0.0, dropout_attn=0.0, dropout_mlp=0.0)
MODELS = {
    "gpt": ModelConfig(d_ffn=64, num_attention_heads=4, activation_type="gelu_tanh", **COMMON),
    "llama": ModelConfig(d_ffn=48, num_attention_heads=4, num_attention_groups=2, ln_type="rmsnorm",
                         activation_type="swiglu", no_bias=True, untie_embed=True,
                         positional_embedding=PositionalEmbeddingConfig(type="rope"), **COMMON),
}


def _config(model: ModelConfig, model_path: Path, tp: int, seed: int) -> Config:
    cfg = Config(model=model)
    cfg.trainer.model_path = str(model_path)
    cfg.trainer.tensor_model_parallel_size = tp
    cfg.trainer.use_flash_attn = False
    cfg.operation.save_dist_ckpt = True
    cfg.parallel.dist_backend = "gloo"
    cfg.data.vocab_size = VOCAB
    cfg.init.seed = seed
    cfg.optim.warmup_steps = 2  # the lr changes every step: a wrong schedule/lr shows in the loss
    cfg.optim.max_lr = 1e-2
    return cfg


def _batch(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return dict(input_ids=torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen),
                labels=torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen))


class _Run:
    """Model, optimizer and schedule of one layout; every DP rank takes the same batch (no DDP needed)."""

    def __init__(self, cfg: Config, pstate) -> None:
        self.cfg, self.pstate = cfg, pstate
        self.model = build_model(cfg, pstate, VOCAB)
        self.optimizer = build_optimizer(self.model, cfg.optim, pstate.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, train_steps=10)

    def step(self) -> None:
        self.model.train()
        self.model(**_batch(1)).mean().backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def eval_loss(self) -> float:
        self.model.eval()
        with torch.no_grad():
            return self.model(**_batch(2)).mean().item()

    def save(self) -> None:
        save_checkpoint(self.cfg, self.pstate, 1, self.model, self.optimizer, self.scheduler, None,
                        {"consumed_samples": 4})

    def load(self) -> dict:
        return load_checkpoint(self.cfg, self.pstate, self.model, self.optimizer, self.scheduler, None)


def _save_tp2(root: Path) -> dict:
    pstate = init_distributed(_config(MODELS["gpt"], root, tp=2, seed=1))
    losses = {}
    for name, model_cfg in MODELS.items():
        run = _Run(_config(model_cfg, root / name, tp=2, seed=1), pstate)
        run.step()
        after_first = run.eval_loss()
        run.save()
        run.step()
        losses[name] = (after_first, run.eval_loss())
    return losses


def _snapshot(run: _Run) -> dict:
    """Weights and Adam exp_avg by global name (real vocabulary rows only), as numpy."""
    state, global_name = run.optimizer.state, global_namer(run.model)
    out = {}
    for local, p in run.model.named_parameters():
        rows = slice(0, VOCAB) if getattr(p, "vocab_parallel", False) else slice(None)
        out[global_name(local)] = (p.detach()[rows].numpy().copy(),
                                               state[p]["exp_avg"][rows].numpy().copy())
    return out


def _load(root: Path, tp: int, single_file_root: Path | None) -> dict:
    """Load into a model built from another seed: only the checkpoint can make the losses match."""
    pstate = init_distributed(_config(MODELS["gpt"], root, tp=tp, seed=5))
    losses = {}
    for name, model_cfg in MODELS.items():
        for fmt, path in (("dist", root / name), ("single", single_file_root and single_file_root / name)):
            if path is None:
                continue
            run = _Run(_config(model_cfg, path, tp=tp, seed=5), pstate)
            resumed = run.load()
            assert (resumed["iteration"], resumed["data_state"]) == (1, {"consumed_samples": 4})
            if tp == 1 and fmt == "dist":
                losses[f"{name}/snapshot"] = _snapshot(run)
            after_load = run.eval_loss()
            run.step()
            losses[f"{name}/{fmt}"] = (after_load, run.eval_loss())
    return losses


def _load_pp2(root: Path) -> dict:
    """Each pipeline stage loads its layers (global layer names) and, for the tied GPT, the last
    stage's copy of the embedding (the embedding's name)."""
    cfg = _config(MODELS["gpt"], root, tp=1, seed=5)
    cfg.trainer.pipeline_model_parallel_size = 2
    pstate = init_distributed(cfg)
    snapshots = {}
    for name, model_cfg in MODELS.items():
        cfg = _config(model_cfg, root / name, tp=1, seed=5)
        cfg.trainer.pipeline_model_parallel_size = 2
        run = _Run(cfg, pstate)
        run.load()
        snapshots[name] = _snapshot(run)
    return snapshots


@pytest.mark.timeout(300)
def test_tp2_distributed_checkpoint_loads_at_tp1_and_tp2_dp2(tmp_path):
    saved = run_distributed(_save_tp2, 2, tmp_path / "dist")[0]
    for name in MODELS:
        assert read_latest(tmp_path / "dist" / name) == 1
    # One model through the package function, the other through the command-line tool.
    first, second = MODELS
    to_single_file(tmp_path / "dist" / first / "iter_0000001", tmp_path / "single" / first)
    assert convert_tool(["--from", "ironcore", "--to", "single", "--input",
                         str(tmp_path / "dist" / second / "iter_0000001"),
                         "--output", str(tmp_path / "single" / second)]) == 0
    # The distributed checkpoint exports to Hugging Face: HF's logits give the saved model's loss.
    batch = _batch(2)
    for name in MODELS:
        hf_dir = tmp_path / "hf" / name
        assert convert_tool(["--from", "ironcore", "--input", str(tmp_path / "dist" / name),
                             "--output", str(hf_dir)]) == 0
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
        with torch.no_grad():
            logits = hf(batch["input_ids"]).logits.float()
        hf_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1)).item()
        assert hf_loss == pytest.approx(saved[name][0], abs=1e-5), name

    tp1 = run_distributed(_load, 1, tmp_path / "dist", 1, tmp_path / "single")[0]
    tp2_dp2 = run_distributed(_load, 4, tmp_path / "dist", 2, None)
    pp2 = run_distributed(_load_pp2, 2, tmp_path / "dist")
    for name, (after_first, after_second) in saved.items():
        assert after_first != after_second  # the second step moved the loss: matching it needs Adam's state
        for got in (tp1[f"{name}/dist"], tp1[f"{name}/single"], *(r[f"{name}/dist"] for r in tp2_dp2)):
            assert got == pytest.approx((after_first, after_second), abs=1e-5, rel=1e-5)
        reference = tp1[f"{name}/snapshot"]
        stages = [pp2[0][name], pp2[1][name]]
        assert set(stages[0]) | set(stages[1]) == set(reference)
        for stage in stages:
            for key, (weight, exp_avg) in stage.items():
                assert np.array_equal(weight, reference[key][0]) and np.array_equal(exp_avg, reference[key][1]), key


def _ddp_dp2(root: Path) -> dict:
    """DP=2 with a DDP-wrapped model: one model file without ``module.``, one RNG file per rank,
    per-rank RNG streams restored; a save failing on rank 1 and a bad file found by rank 1 stop
    both ranks with the error."""
    cfg = _config(MODELS["gpt"], root, tp=1, seed=1)
    cfg.operation.save_dist_ckpt = False
    pstate = init_distributed(cfg)
    torch.manual_seed(100 + pstate.rank)  # per-rank streams, as dropout under DP has
    model = DistributedDataParallel(build_model(cfg, pstate, VOCAB))
    optimizer = build_optimizer(model.module, cfg.optim, pstate.device)
    scheduler = build_scheduler(optimizer, cfg.optim, train_steps=10)
    model(**_batch(pstate.rank)).mean().backward()
    optimizer.step()
    scheduler.step()
    folder = save_checkpoint(cfg, pstate, 1, model, optimizer, scheduler, None, {"consumed_samples": 4})
    after_save = torch.rand(4)
    weights = {k: v.clone() for k, v in model.module.state_dict().items()}
    saved_keys = sorted(torch.load(folder / "model_tp00_pp00.pt", weights_only=True))

    torch.manual_seed(7)
    fresh = DistributedDataParallel(build_model(_config(MODELS["gpt"], root, tp=1, seed=9), pstate, VOCAB))
    fresh_opt = build_optimizer(fresh.module, cfg.optim, pstate.device)
    resumed = load_checkpoint(cfg, pstate, fresh, fresh_opt, build_scheduler(fresh_opt, cfg.optim, train_steps=10), None)
    ckpt_io.set_rng_state(resumed["rng_state"])  # as the trainer does, right before its first step
    restored = {"rng": torch.equal(torch.rand(4), after_save),
                "weights": all(torch.equal(weights[k], v) for k, v in fresh.module.state_dict().items())}

    if pstate.rank == 1:  # a save failing on one rank fails on every rank, latest untouched
        ckpt_io.rng_state = lambda: 1 / 0
    try:
        save_checkpoint(cfg, pstate, 2, model, optimizer, scheduler, None, {"consumed_samples": 8})
        save_error = None
    except CheckpointError as e:
        save_error = str(e)
    latest_after_failure = read_latest(root)

    if pstate.rank == 0:  # rank 1 checks this file (round-robin over the sorted names)
        path = folder / "rng_rank00001.pt"
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    dist.barrier()
    try:
        load_checkpoint(cfg, pstate, fresh, fresh_opt, None, None)
        error = None
    except CheckpointError as e:
        error = str(e)
    return dict(saved_keys=saved_keys, bare_keys=sorted(model.module.state_dict()), files=sorted(
        p.name for p in folder.iterdir()), error=error, save_error=save_error, latest=latest_after_failure,
        **restored)


@pytest.mark.timeout(180)
def test_dp2_ddp_single_file_checkpoint(tmp_path):
    results = run_distributed(_ddp_dp2, 2, tmp_path)
    r0 = results[0]
    assert r0["saved_keys"] == r0["bare_keys"] and not any(k.startswith("module.") for k in r0["saved_keys"])
    assert r0["files"] == ["common.pt", "config.yaml", "manifest.json", "model_tp00_pp00.pt",
                           "optim_tp00_pp00.pt", "rng_rank00000.pt", "rng_rank00001.pt"]
    for r in results:
        assert r["rng"] and r["weights"]
        assert "rng_rank00001.pt does not match its sha256" in r["error"]
        assert "rank 1: ZeroDivisionError" in r["save_error"] and r["latest"] == 1
