"""Training metrics: model FLOPs and MFU, throughput, global grad/param norms, memory.

Model FLOPs (``model_flops_per_token``) count the dense matmuls of one training step per token,
the convention of the PaLM paper and Megatron's MFU: forward = every weight matmul
(QKV, attention output, MLP, LM head over the padded vocabulary) plus the attention scores and the
attention-weighted values over the full ``seq_len`` (causal masking is not discounted); backward
= 2 x forward; activation recompute is *not* counted (it is hardware FLOPs, not model FLOPs).
Norms, activations, softmax and the embedding lookup are ignored (a fraction of a percent).

MFU divides the achieved model FLOP/s per device by the device's peak: the dense (not sparse) bf16
tensor-core peak of a known GPU from ``GPU_PEAK_TFLOPS``, or on CPU a measured GEMM rate in the
compute dtype (the practical ceiling of the process's threads). For an unknown GPU the MFU is reported as unknown
with a message instead of guessing.
"""

from __future__ import annotations

import logging
import re
import resource
import time
from typing import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ironcore.config.schema import ModelConfig

logger = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks in TFLOP/s from the vendors' datasheets (V100 has no bf16: fp16).
# First match wins, so the more specific patterns come first.
GPU_PEAK_TFLOPS: list[tuple[str, float]] = [
    (r"GH200", 989.0),
    (r"H100.*PCIE", 756.0),
    (r"H100.*NVL", 835.0),
    (r"H100", 989.0),           # SXM5 (reported as "H100 80GB HBM3")
    (r"H200", 989.0),
    (r"H800", 989.0),
    (r"B200", 2250.0),
    (r"A100", 312.0),
    (r"A800", 312.0),
    (r"L40S", 362.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
    (r"V100", 125.0),           # fp16 tensor cores (SXM2)
]


def model_flops_per_token(model: ModelConfig, vocab_size: int, seq_len: int) -> float:
    """Training (forward + backward) model FLOPs per token; ``vocab_size`` is the padded vocabulary.

    Per layer, forward, per token, with ``a`` heads, ``g`` KV groups, head dim ``h``, model width
    ``d``, MLP width ``f``: QKV ``2 d h (a + 2 g)``, scores ``2 s a h``, values ``2 s a h``, output
    projection ``2 a h d``, MLP ``2 d f`` per matrix (2 matrices, 3 for SwiGLU); plus the LM head
    ``2 d V``. Training is 3 x that.
    """
    d, f, a, s = model.d_model, model.d_ffn, model.num_attention_heads, seq_len
    h = model.head_dim or d // a
    g = model.num_attention_groups or a
    mlp_matrices = 3 if model.activation_type == "swiglu" else 2
    per_layer = (2 * d * h * (a + 2 * g)      # QKV projection
                 + 2 * 2 * s * a * h          # QK^T and attention x V
                 + 2 * a * h * d              # attention output projection
                 + mlp_matrices * 2 * d * f)  # MLP
    forward = model.num_layers * per_layer + 2 * d * vocab_size
    return 3.0 * forward


def gpu_peak_tflops(name: str) -> float | None:
    """Dense bf16 peak of a GPU named like ``torch.cuda.get_device_name()``; None when unknown."""
    upper = name.upper()
    for pattern, tflops in GPU_PEAK_TFLOPS:
        if re.search(pattern, upper):
            return tflops
    return None


def gemm_flops(dtype: torch.dtype = torch.float32, size: int = 1024, repeats: int = 5) -> float:
    """Best-of-``repeats`` FLOP/s of a ``size``-square CPU matrix product in ``dtype`` (uncached).

    The operands come from a private generator: the probe runs while a run is being set up, and
    must not move the global RNG streams a resumed run has restored (dropout would then differ)."""
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(dtype) for _ in range(2))
    a @ b  # warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


_cpu_gemm_flops: dict[torch.dtype, float] = {}


def measured_cpu_gemm_flops(dtype: torch.dtype = torch.float32) -> float:
    """GEMM FLOP/s of this process on CPU in ``dtype`` (with its current thread count); measured
    once per dtype and cached. CPUs with bf16 instructions (AVX512-BF16, AMX) run bf16 GEMMs several
    times faster than fp32, so the ceiling must be measured in the dtype the model computes in."""
    if dtype not in _cpu_gemm_flops:
        _cpu_gemm_flops[dtype] = gemm_flops(dtype)
        logger.info("CPU peak for MFU: measured %s GEMM rate %.1f GFLOP/s (%d threads)",
                    str(dtype).removeprefix("torch."), _cpu_gemm_flops[dtype] / 1e9, torch.get_num_threads())
    return _cpu_gemm_flops[dtype]


def device_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> float | None:
    """Peak FLOP/s of one device for MFU: the GPU table (dense bf16, whatever ``dtype``); on CPU the
    faster of the measured fp32 and ``dtype`` GEMM rates (CPU autocast runs only some ops in a
    reduced dtype, and fp16 GEMMs are slower than fp32 on CPUs without fp16 units: the fp32 rate
    keeps MFU a true fraction there); None if unknown."""
    if device.type == "cpu":
        return max(measured_cpu_gemm_flops(torch.float32), measured_cpu_gemm_flops(dtype))
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tflops = gpu_peak_tflops(name)
        if tflops is None:
            logger.warning("MFU unknown: no bf16 peak on record for GPU %r (add it to "
                           "ironcore.observe.metrics.GPU_PEAK_TFLOPS)", name)
            return None
        return tflops * 1e12
    logger.warning("MFU unknown: no peak FLOP/s for device type %r", device.type)
    return None


class Throughput:
    """Tokens/s, model TFLOP/s per device and MFU over the steps added since the last ``report``.

    The trainer adds each step's tokens and its own wall time, so evaluation and checkpoint time
    between steps does not dilute the rate."""

    def __init__(self, flops_per_token: float, peak_flops: float | None, world_size: int):
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.world_size = world_size
        self._tokens = 0
        self._seconds = 0.0

    def add(self, global_tokens: int, seconds: float) -> None:
        self._tokens += global_tokens
        self._seconds += seconds

    def report(self) -> dict:
        """``tokens_per_s`` (whole job), ``tflops_per_device``, ``mfu`` (None when the peak is
        unknown); starts a new window."""
        tokens_per_s = self._tokens / max(self._seconds, 1e-9)
        flops_per_device = tokens_per_s * self.flops_per_token / self.world_size
        mfu = flops_per_device / self.peak_flops if self.peak_flops else None
        self._tokens, self._seconds = 0, 0.0
        return {"tokens_per_s": tokens_per_s, "tflops_per_device": flops_per_device / 1e12, "mfu": mfu}


def _squared_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    # vector_norm reduces without materialising t**2 (10x faster than pow(2).sum() on CPU).
    return torch.stack([torch.linalg.vector_norm(t.detach(), dtype=torch.float32) for t in tensors]).pow(2).sum()


def _sharded_squared_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """DTensors (FSDP shards of one mesh): the local shards' squared norms, summed over the mesh
    dimensions they are sharded on (a replicated dimension holds copies: counted once)."""
    total = _squared_norm([t.to_local() for t in tensors])
    if tensors:
        mesh = tensors[0].device_mesh
        for dim, placement in enumerate(tensors[0].placements):
            if placement.is_shard() and mesh.size(dim) > 1:
                dist.all_reduce(total, group=mesh.get_group(dim))
    return total


def global_norm(tensors_with_params: Iterable[tuple[torch.Tensor, torch.nn.Parameter]],
                tp_group=None, pp_group=None) -> torch.Tensor:
    """L2 norm over the whole model of ``tensors`` (grads or params), each paired with its param.

    A parameter marked ``tensor_model_parallel=True`` is split across the TP group: its squared
    norms are summed over the TP group. Every other parameter is replicated on the TP ranks and
    counted once (on this rank only). The per-stage totals are then summed over the PP group. DP
    replicas hold identical (already all-reduced) gradients, so no DP reduction is needed; FSDP
    shards (DTensors) are first summed over the DP ranks they are split across, then treated as
    their kind (TP-split or not) says. A tied
    LM head copied onto the last pipeline stage (``shared_embedding=True``) duplicates the first
    stage's embedding and is not counted again.
    """
    split, replicated = [], []  # plain tensors, and FSDP shards (DTensors) of each kind
    split_sharded, replicated_sharded = [], []
    for tensor, param in tensors_with_params:
        if getattr(param, "shared_embedding", False):
            continue
        tp_split = getattr(param, "tensor_model_parallel", False)
        if isinstance(tensor, DTensor):
            (split_sharded if tp_split else replicated_sharded).append(tensor)
        else:
            (split if tp_split else replicated).append(tensor)
    tensors = split + replicated + split_sharded + replicated_sharded
    device = next((t.device for t in tensors), torch.device("cpu"))
    split_sq = _squared_norm(split).to(device) + _sharded_squared_norm(split_sharded).to(device)
    replicated_sq = _squared_norm(replicated).to(device) + _sharded_squared_norm(replicated_sharded).to(device)
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(split_sq, group=tp_group)
    total = split_sq + replicated_sq
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(total, group=pp_group)
    return total.sqrt()


def grad_norm(params: Iterable[torch.nn.Parameter], tp_group=None, pp_group=None) -> torch.Tensor:
    """Global gradient L2 norm (see ``global_norm``); params without a grad are skipped."""
    return global_norm(((p.grad, p) for p in params if p.grad is not None), tp_group, pp_group)


def param_norm(params: Iterable[torch.nn.Parameter], tp_group=None, pp_group=None) -> torch.Tensor:
    """Global parameter L2 norm (see ``global_norm``)."""
    return global_norm(((p, p) for p in params), tp_group, pp_group)


def clip_grad_norm_(params: Iterable[torch.nn.Parameter], max_norm: float, tp_group=None,
                    pp_group=None) -> torch.Tensor:
    """Scale all gradients so their global norm is at most ``max_norm`` (0 disables clipping);
    returns the norm before clipping. A non-finite norm leaves the gradients untouched."""
    params = [p for p in params if p.grad is not None]
    total = grad_norm(params, tp_group, pp_group)
    if max_norm > 0 and torch.isfinite(total):
        coef = max_norm / (float(total) + 1e-6)
        if coef < 1.0:
            torch._foreach_mul_([p.grad for p in params], coef)
    return total


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: allocated CUDA memory on GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
