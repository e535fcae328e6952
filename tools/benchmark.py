#!/usr/bin/env python
"""Training throughput of IronCore against Hugging Face's GPT2LMHeadModel and a plain PyTorch GPT.

All three train the same GPT-2-style shape on the same random tokens, in one process and one run:
forward, backward, clip the gradient norm to 1.0, fused AdamW step. The measurements are
interleaved (round-robin, several rounds, the fastest kept) because shared machines are noisy.
IronCore's step is the trainer's own ``train_step`` on a run built by ``build_run`` (so the pipeline
schedule, loss checks and LR schedule are timed too, and its batches come from the real loader). MFU uses the model FLOPs of ``ironcore.observe.metrics`` (the same count for
the three models) against the device's peak: the dense bf16 table on GPUs; on CPU the best rate of
a 2048-square GEMM in the compute dtype, measured in every round beside the models.

    python tools/benchmark.py                       # 4 layers x d256, seq 256, vocab 50,304, batch 8
    python tools/benchmark.py --device cuda --precision bfloat16 --layers 12 --d-model 768 --heads 12

Prints one JSON object: per implementation tokens/s, step time, MFU and the step's peak memory,
and IronCore's ratios. ``--recompute none|selective|full`` and ``--ce-chunk N``
(``model.cross_entropy_chunk_size``) set IronCore's activation recompute and fused LM head;
``--attn auto|sdpa|flash`` its attention kernel (``auto``: flash-attn on CUDA when installed, else
SDPA; ``flash`` fails when flash-attn cannot run). ``--arch llama`` trains a LLaMA-style shape
instead (RMSNorm, SwiGLU of ``--ffn``, RoPE, no biases, untied head, ``--groups`` KV groups for
GQA), against Hugging Face's ``LlamaForCausalLM``; the plain GPT is GPT-2-only.

The step's peak memory (``step_peak_mib``) is measured in one extra untimed step after the timed
rounds: the high-water mark of memory above what was resident before the step (the weights,
optimizer state and everything else), i.e. activations, gradients and temporaries. On CUDA it is
``torch.cuda.max_memory_allocated`` minus the allocated bytes before the step. On CPU (Linux)
it is the process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) minus
its resident set before the step, with glibc told to serve every allocation over 64 KiB by
``mmap`` so freed buffers leave the process at once and do not hide the next step's peak.
``activation_mib`` is what a forward leaves alive for its backward (the same counters: memory
while the loss and its graph exist minus memory before the forward), under the recompute setting.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from ironcore.config import Config, validate_config  # noqa: E402
from ironcore.observe import metrics  # noqa: E402
from ironcore.parallel.state import destroy_distributed, init_distributed  # noqa: E402
from ironcore.training.precision import autocast, compute_dtype  # noqa: E402
from ironcore.training.trainer import Trainer, _StopSignal  # noqa: E402


# ---------------------------------------------------------------------------- a plain PyTorch GPT
class _Block(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, d)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class PlainGPT(nn.Module):
    """nanoGPT-style reference: learned positions, pre-LN blocks, tied head, F.cross_entropy."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, ffn: int, seq: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(_Block(d, heads, ffn) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1))


# ---------------------------------------------------------------------------- the three steps
def _adamw(model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    # The same fused AdamW IronCore uses, so the comparison is of the models, not the optimizers.
    return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)


def ironcore_step(args, device):
    """The trainer's own step (``Trainer.train_step``: the pipeline schedule's forward/backward,
    loss averaging and the non-finite check, clipping, fused AdamW, LR schedule) on a run built by
    ``training.build.build_run``, reading the shipped Shakespeare corpus through the real loader.
    The batch the peers get is not used: the trainer draws its own, of the same shape."""
    cfg = Config()
    m = cfg.model
    model_shape(m, args)
    m.max_seq_len, m.precision = args.seq_len, args.precision
    m.dropout_embd = m.dropout_attn = m.dropout_mlp = 0.0
    cfg.data.vocab_size = args.vocab
    shakespeare = Path(__file__).resolve().parents[1] / "ironcore" / "assets" / "tinyshakespeare.txt"
    cfg.data.train_datasets = [{"path": str(shakespeare), "weight": 1.0}]
    cfg.optim.max_lr, cfg.optim.weight_decay, cfg.optim.clip_grad = 1e-4, 0.1, 1.0
    if args.attn == "flash" and not flash_attn_usable(device, args.precision):
        raise SystemExit("--attn flash: flash-attn is not installed, or the run is not fp16/bf16 on CUDA")
    cfg.trainer.use_flash_attn = device.type == "cuda" and args.attn != "sdpa"
    cfg.trainer.micro_batch_size, cfg.trainer.train_batch_size = args.batch, args.batch
    cfg.trainer.compile_model = args.compile
    cfg.operation.activation_recompute = args.recompute != "none"
    cfg.operation.recompute_strategy = "optimized" if args.recompute == "selective" else "default"
    m.cross_entropy_chunk_size = args.ce_chunk
    cfg.operation.train_steps = 10 * (args.warmup + args.rounds * args.steps)
    cfg.parallel.dist_backend = "nccl" if device.type == "cuda" else "gloo"
    cfg = validate_config(cfg)
    trainer = Trainer(cfg, init_distributed(cfg))
    trainer.model.train()
    stop = _StopSignal()  # never entered: no signal handlers in a benchmark

    def step(batch: dict) -> None:
        trainer.train_step(stop)

    def forward(batch: dict) -> torch.Tensor:
        with autocast(args.precision, device):
            return trainer.model(input_ids=batch["input_ids"], labels=batch["labels"]).mean()

    return step, forward


def model_shape(m, args) -> None:
    """Set ``--arch``'s shape on the ModelConfig ``m`` (the trainer's, and the FLOP count's)."""
    m.d_model, m.num_layers, m.num_attention_heads = args.d_model, args.layers, args.heads
    m.d_ffn = args.ffn or 4 * args.d_model
    if args.arch == "llama":
        m.activation_type, m.ln_type, m.no_bias, m.untie_embed = "swiglu", "rmsnorm", True, True
        m.num_attention_groups = args.groups
        m.positional_embedding.type = "rope"
    else:
        m.activation_type = "gelu_tanh"


def flash_attn_usable(device: torch.device, precision: str) -> bool:
    from ironcore.model import attention

    return attention.flash_attn_func is not None and device.type == "cuda" and precision in ("bfloat16", "float16")


def hf_step(args, device):
    if args.arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.ffn or 4 * args.d_model,
                             num_hidden_layers=args.layers, num_attention_heads=args.heads,
                             num_key_value_heads=args.groups or args.heads, max_position_embeddings=args.seq_len,
                             tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
        config._attn_implementation = "sdpa"
        model = LlamaForCausalLM(config).to(device)
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=args.vocab, n_positions=args.seq_len, n_embd=args.d_model, n_layer=args.layers,
                            n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        config._attn_implementation = "sdpa"
        model = GPT2LMHeadModel(config).to(device)
    if args.compile:
        model.compile()
    optimizer = _adamw(model, device)

    def forward(batch: dict) -> torch.Tensor:
        with autocast(args.precision, device):
            return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def step(batch: dict) -> None:
        forward(batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, forward


def plain_step(args, device):
    model = PlainGPT(args.vocab, args.d_model, args.layers, args.heads, 4 * args.d_model, args.seq_len).to(device)
    if args.compile:
        model.compile()
    optimizer = _adamw(model, device)

    def forward(batch: dict) -> torch.Tensor:
        with autocast(args.precision, device):
            return model(batch["input_ids"], batch["labels"])

    def step(batch: dict) -> None:
        forward(batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, forward


# ---------------------------------------------------------------------------- measurement
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _mmap_large_allocations() -> bool:
    """Make glibc return freed buffers over 64 KiB to the OS (fixing the threshold also stops glibc
    from raising it after frees), so the resident set follows the live bytes. False off glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 64 * 1024))
    except (OSError, AttributeError):
        return False


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def _live_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    return _rss_kib("VmRSS") * 1024


def activation_bytes(forward, batch: dict, device: torch.device) -> int | None:
    """Bytes a forward leaves alive for its backward (the activations, under the recompute
    setting): memory while its loss and graph exist, minus memory before it."""
    try:
        before = _live_bytes(device)
        loss = forward(batch)
        held = _live_bytes(device) - before
    except OSError:
        return None
    del loss
    return held


def step_peak_bytes(step, batch: dict, device: torch.device) -> int | None:
    """Bytes one step allocates above what was resident before it (see the module docstring);
    None where the platform offers no measure."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(batch)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
        before = _rss_kib("VmRSS")
        step(batch)
        return (_rss_kib("VmHWM") - before) * 1024
    except OSError:
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(step, batch: dict, n: int, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step(batch)
    _sync(device)
    return (time.perf_counter() - t0) / n


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _mib(count: int | None) -> float | None:
    return round(count / 2**20, 1) if count is not None else None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--steps", type=int, default=3, help="timed steps per round and implementation")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation first")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the fastest is reported")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    p.add_argument("--precision", default=None, choices=["float32", "bfloat16", "float16"],
                   help="autocast dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile all three models")
    p.add_argument("--only", nargs="+", default=["ironcore", "hf", "plain"], choices=["ironcore", "hf", "plain"])
    p.add_argument("--recompute", default="none", choices=["none", "selective", "full"],
                   help="IronCore's activation recompute (operation.activation_recompute / recompute_strategy)")
    p.add_argument("--ce-chunk", type=int, default=0,
                   help="IronCore's model.cross_entropy_chunk_size (0: the unfused LM head)")
    p.add_argument("--arch", default="gpt2", choices=["gpt2", "llama"],
                   help="gpt2 (LayerNorm, GELU, learned positions, tied head) or llama (RMSNorm, SwiGLU, RoPE, "
                        "no biases, untied head; the peer is HF LlamaForCausalLM, no plain GPT)")
    p.add_argument("--ffn", type=int, default=None, help="MLP width (default 4 x d_model)")
    p.add_argument("--groups", type=int, default=None, help="--arch llama: KV groups for GQA (default: MHA)")
    p.add_argument("--attn", default="auto", choices=["auto", "sdpa", "flash"],
                   help="IronCore's attention kernel: auto (flash-attn on CUDA when installed), sdpa, flash")
    args = p.parse_args(argv)
    if args.arch == "llama" and "plain" in args.only:
        p.error("--arch llama: the plain GPT is GPT-2-only; pass --only ironcore hf")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    args.precision = args.precision or ("bfloat16" if device.type == "cuda" else "float32")
    mmap_fixed = device.type == "cpu" and _mmap_large_allocations()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), device=device)
    batch = {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
             "loss_mask": torch.ones(args.batch, args.seq_len, device=device),
             "position_ids": torch.arange(args.seq_len, device=device).expand(args.batch, -1)}

    builders = {"ironcore": ironcore_step, "hf": hf_step, "plain": plain_step}
    steps, forwards = {}, {}
    for name in args.only:
        steps[name], forwards[name] = builders[name](args, device)
    for name, step in steps.items():
        for _ in range(args.warmup):
            step(batch)
    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu_peaks: list[float] = []
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name].append(_time_steps(step, batch, args.steps, device))
        if device.type == "cpu":  # the CPU ceiling is measured in the same rounds, under the same load
            cpu_peaks.append(metrics.gemm_flops(compute_dtype(args.precision), size=2048, repeats=3))
    step_peaks = {name: step_peak_bytes(step, batch, device) for name, step in steps.items()}
    activations = {name: activation_bytes(forward, batch, device) for name, forward in forwards.items()}

    destroy_distributed()
    model_cfg = Config().model
    model_shape(model_cfg, args)
    flops_per_token = metrics.model_flops_per_token(model_cfg, args.vocab, args.seq_len)
    peak = max(cpu_peaks) if cpu_peaks else metrics.device_peak_flops(device, compute_dtype(args.precision))
    results = {}
    for name, ts in times.items():
        step_s = min(ts)  # noise on a shared machine only ever adds time
        tps = args.batch * args.seq_len / step_s
        results[name] = {"tokens_per_s": round(tps, 1), "step_s": round(step_s, 4),
                         "mfu": round(tps * flops_per_token / peak, 4) if peak else None,
                         "step_peak_mib": _mib(step_peaks[name]), "activation_mib": _mib(activations[name]),
                         "step_s_all_rounds": [round(t, 4) for t in ts]}
    ratios = {}
    if "ironcore" in results:
        for peer in ("hf", "plain"):
            if peer in results:
                ratio = results["ironcore"]["tokens_per_s"] / results[peer]["tokens_per_s"]
                ratios[f"ironcore_vs_{peer}"] = round(ratio, 3)
                for measure in ("step_peak", "activation"):
                    ours, theirs = results["ironcore"][f"{measure}_mib"], results[peer][f"{measure}_mib"]
                    if ours and theirs:
                        ratios[f"ironcore_{measure}_vs_{peer}"] = round(ours / theirs, 3)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    print(json.dumps({
        "shape": {"arch": args.arch, "layers": args.layers, "d_model": args.d_model, "d_ffn": model_cfg.d_ffn,
                  "heads": args.heads, "groups": model_cfg.num_attention_groups or args.heads,
                  "seq_len": args.seq_len, "vocab": args.vocab, "batch": args.batch},
        "device": device.type, "device_name": device_name, "precision": args.precision,
        "threads": torch.get_num_threads() if device.type == "cpu" else None, "compile": args.compile,
        "recompute": args.recompute, "ce_chunk": args.ce_chunk,
        "attention": ("flash-attn" if args.attn != "sdpa" and flash_attn_usable(device, args.precision) else "sdpa"),
        "step_peak_measure": ("cuda max_memory_allocated" if device.type == "cuda" else
                              "VmHWM - VmRSS" + (" (glibc mmap threshold 64 KiB)" if mmap_fixed else "")),
        "torch": torch.__version__, "model_flops_per_token": flops_per_token,
        "peak_tflops": round(peak / 1e12, 3) if peak else None,
        "results": results, "ratios": ratios,
    }, indent=1))
    return 0 if all(math.isfinite(r["tokens_per_s"]) for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
