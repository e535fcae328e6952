"""The per-rank memory estimate (ironcore/config/memory.py): measured against a small CPU run,
its TP/PP arithmetic, the refusal of configs that cannot fit, and where it is printed."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ironcore.config import ConfigError, load_config
from ironcore.config.memory import check_memory, estimate_memory
from ironcore.config.schema import Config
from ironcore.model.gpt import build_model
from ironcore.parallel.state import ParallelState
from ironcore.training.optimizer import build_optimizer
from ironcore.training.precision import autocast
from ironcore.training.recompute import apply_activation_recompute
from tools import benchmark

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 50257


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)


def _cfg(precision="float32", recompute=False, chunk=0, **model) -> Config:
    """d_model 256, 4 layers, seq 256, micro-batch 4, GPT-2 vocabulary: logits dominate."""
    cfg = Config()
    m = cfg.model
    m.d_model, m.d_ffn, m.num_layers, m.num_attention_heads, m.max_seq_len = 256, 1024, 4, 4, 256
    m.precision, m.cross_entropy_chunk_size = precision, chunk
    m.dropout_embd = m.dropout_attn = m.dropout_mlp = 0.0
    for key, value in model.items():
        setattr(m, key, value)
    cfg.trainer.micro_batch_size, cfg.trainer.gradient_accumulation_steps = 4, 1
    cfg.data.vocab_size = VOCAB
    cfg.operation.activation_recompute = recompute
    return cfg


def _measure(cfg: Config) -> dict[str, int]:
    """One training step on CPU after a first one (so Adam's state exists): parameter, gradient and
    optimizer bytes as tensor sizes; activations as the bytes saved for backward in the forward
    (storages deduplicated, parameters excluded; autocast's weight copies included); the step's
    peak as the growth of the peak RSS (VmHWM, reset through /proc/self/clear_refs) plus the
    parameters and optimizer state already resident."""
    torch.manual_seed(0)
    model = build_model(cfg, ParallelState(), VOCAB)
    model.train()
    apply_activation_recompute(model, cfg.operation)
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    ids = torch.randint(0, VOCAB, (cfg.trainer.micro_batch_size, cfg.model.max_seq_len),
                        generator=torch.Generator().manual_seed(0))
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def step(saved: dict) -> int:
        def pack(t):
            storage = t.untyped_storage()
            saved[storage.data_ptr()] = storage.nbytes()
            return t

        with autocast(cfg.model.precision, torch.device("cpu")), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids, labels=ids).mean()
        loss.backward()
        grads = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return grads

    step({})
    saved: dict[int, int] = {}
    grads: list[int] = []
    growth = benchmark.step_peak_bytes(lambda _: grads.append(step(saved)), {}, torch.device("cpu"))
    params = sum(p.nbytes for p in model.parameters())
    opt = sum(v.nbytes for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
    return {"params": params, "grads": grads[0], "optimizer": opt,
            "activations": sum(n for ptr, n in saved.items() if ptr not in param_storages),
            "peak": growth + params + opt}


def _can_reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _can_reset_peak_rss(), reason="needs Linux's /proc/self/clear_refs to measure a peak")
@pytest.mark.parametrize("precision,recompute,chunk", [("float32", False, 0), ("float32", True, 0),
                                                       ("float32", False, 256), ("bfloat16", False, 0)],
                         ids=["plain", "full-recompute", "chunked-ce", "bf16"])
def test_estimate_matches_a_measured_cpu_step(precision, recompute, chunk):
    cfg = _cfg(precision, recompute, chunk)
    est = estimate_memory(cfg, VOCAB, "cpu")
    measured = _measure(cfg)
    print(f"\n{precision} recompute={recompute} chunk={chunk}: estimate {est.summary()}; measured "
          + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in measured.items()))
    assert est.params == measured["params"]
    assert est.grads == measured["grads"]
    assert est.optimizer == measured["optimizer"]
    # Activations (what backward keeps, with autocast's weight copies): counted from the code.
    assert est.activations + est.weight_copies == pytest.approx(measured["activations"], rel=0.05)
    assert est.train_total == pytest.approx(measured["peak"], rel=0.25)


def test_recompute_and_chunking_shrink_what_they_should():
    plain = estimate_memory(_cfg(), VOCAB, "cpu")
    full = estimate_memory(_cfg(recompute=True), VOCAB, "cpu")
    chunked = estimate_memory(_cfg(chunk=256), VOCAB, "cpu")
    assert full.activations < plain.activations and full.params == plain.params
    assert chunked.forward_workspace < plain.forward_workspace / 2
    assert chunked.parts["logits"] == 0 < plain.parts["logits"]


def _layout(tp=1, pp=1, world=None, **parallel) -> Config:
    cfg = _cfg()
    cfg.model.num_layers = 8
    cfg.trainer.tensor_model_parallel_size, cfg.trainer.pipeline_model_parallel_size = tp, pp
    cfg.trainer.gradient_accumulation_steps = 8
    cfg.parallel.world_size = world or tp * pp
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    return cfg


def test_tensor_parallel_splits_params_and_activations():
    one, two = estimate_memory(_layout(), VOCAB), estimate_memory(_layout(tp=2), VOCAB)
    # Matrices and the vocabulary split in two; norms and row-parallel biases are replicated.
    assert 0.5 < two.params / one.params < 0.52
    assert two.optimizer == 2 * two.params
    # Vocab-parallel head: V/tp logits per token (the vocabulary pads to 128 × tp: 50304 -> 50432 / 2).
    assert two.parts["logits"] == one.parts["logits"] // 50304 * 50432 // 2
    assert 0.5 < two.activations / one.activations < 0.75   # norm inputs and matmul inputs stay whole
    sp = estimate_memory(_layout(tp=2, sequence_parallel=True), VOCAB)
    assert sp.activations < two.activations and sp.params == two.params


def test_pipeline_splits_layers_and_holds_micro_batches_in_flight():
    from ironcore.config.memory import _estimate_rank
    cfg = _layout(pp=2)
    rank0, rank1 = _estimate_rank(cfg, VOCAB, "cuda", 0), _estimate_rank(cfg, VOCAB, "cuda", 1)
    assert rank0.in_flight == 2 and rank1.in_flight == 1       # 1F1B: PP - rank
    single = _estimate_rank(_layout(), VOCAB, "cuda", 0)
    # Layers split in two; the tied head is a second copy of the embedding on the last stage.
    assert rank0.params + rank1.params == single.params + 4 * 50304 * 256
    assert rank0.parts["logits"] == 0 < rank1.parts["logits"]  # only the last stage holds logits
    assert rank0.parts["layers"] == 2 * single.parts["layers"] // 2  # half the layers, two micro-batches
    gpipe = _estimate_rank(_layout(pp=2, pipeline_schedule="gpipe"), VOCAB, "cuda", 0)
    assert gpipe.in_flight == 8
    assert estimate_memory(cfg, VOCAB).total == max(rank0.total, rank1.total)


def test_distributed_optimizer_and_fsdp_shard_over_data_parallel():
    ddp = estimate_memory(_layout(world=4), VOCAB)
    zero1 = estimate_memory(_layout(world=4, use_distributed_optimizer=True), VOCAB)
    fsdp = estimate_memory(_layout(world=4, use_fsdp=True), VOCAB)
    assert zero1.optimizer == pytest.approx(ddp.optimizer / 4, rel=1e-6) and zero1.params == ddp.params
    assert fsdp.params == pytest.approx(ddp.params / 4, rel=1e-6)
    assert fsdp.optimizer == pytest.approx(ddp.optimizer / 4, rel=1e-6)


def test_check_memory_refuses_naming_the_keys(monkeypatch):
    import ironcore.config.memory as memory
    monkeypatch.setattr(memory, "device_memory", lambda device=None, local_rank=0: (2**30, "a 1 GiB test device"))
    cfg = _cfg()
    cfg.trainer.micro_batch_size = 64
    with pytest.raises(ConfigError) as error:
        check_memory(cfg, {"trainer.micro_batch_size": "override"})
    text = str(error.value)
    assert "trainer.micro_batch_size = 64 (set by a command-line override)" in text
    assert "1.00 GiB of a 1 GiB test device" in text and "cross_entropy_chunk_size" in text


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "ironcore", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("args,keys", [
    (("config", "example.yaml", "model.d_model=1048576"), ["model.d_model = 1048576 (set by a command-line override)"]),
    (("example.yaml", "trainer.eval_batch_size=1000000"),
     ["trainer.eval_batch_size = 1000000 (set by a command-line override)", "evaluation"]),
    (("config", "example.yaml", "trainer.eval_batch_size=1000000"), ["trainer.eval_batch_size = 1000000"]),
], ids=["config-d_model", "train-eval_batch", "config-eval_batch"])
def test_hostile_configs_are_refused_quickly(tmp_path, args, keys):
    started = time.perf_counter()
    result = _cli(*args, f"trainer.model_path={tmp_path / 'out'}")
    elapsed = time.perf_counter() - started
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "configuration error" in result.stderr and "per rank, more than the" in result.stderr
    for key in keys:
        assert key in result.stderr
    assert elapsed < 10
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize("override,message", [
    ("parallel.timeout_minute=.inf", "parallel.timeout_minute = inf (set by a command-line override): must be a finite number"),
    ("trainer.micro_batch_size=99999999999999999999999", "must fit in a 64-bit integer"),
])
def test_unbounded_numbers_are_config_errors(override, message):
    result = _cli("config", "example.yaml", override)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in result.stderr


def test_config_output_prints_the_estimate():
    result = _cli("config", "example.yaml")
    assert result.returncode == 0, result.stderr
    line = next(l for l in result.stdout.splitlines() if "memory estimate per rank" in l)
    assert line.startswith("# ") and "params" in line and "activations" in line and "total" in line


def test_train_start_up_log_has_the_estimate(tmp_path, caplog):
    from ironcore.training.trainer import train
    cfg = load_config(ROOT / "example.yaml", [f"trainer.model_path={tmp_path}", "operation.train_steps=1",
                                              "optim.warmup_steps=0", "optim.annealing_steps=0",
                                              "trainer.do_eval=false", "operation.no_save=true"])
    with caplog.at_level(logging.INFO, logger="ironcore"):
        train(cfg)
    lines = [r.getMessage() for r in caplog.records if "memory estimate per rank" in r.getMessage()]
    assert lines and "of host RAM" in lines[0]


def test_device_memory_override(monkeypatch):
    from ironcore.config.memory import device_memory
    monkeypatch.setenv("IRONCORE_DEVICE_MEMORY", "80GiB")
    assert device_memory() == (80 * 2**30, "IRONCORE_DEVICE_MEMORY=80GiB")
    monkeypatch.setenv("IRONCORE_DEVICE_MEMORY", "0")
    cfg = _cfg()
    cfg.trainer.micro_batch_size = 10**6
    check_memory(cfg)  # 0: no check
    monkeypatch.setenv("IRONCORE_DEVICE_MEMORY", "lots")
    with pytest.raises(ConfigError, match="IRONCORE_DEVICE_MEMORY"):
        check_memory(cfg)
