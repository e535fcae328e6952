"""LayerNorm and RMSNorm (``model.ln_type``, ``model.ln_eps``).

Norm weights are replicated across TP ranks. Under sequence parallelism each rank normalises only
its sequence chunk, so the parameters are marked ``sequence_parallel`` and their grads are summed
over TP by ``GPTModel.sync_sequence_parallel_grads``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ironcore.parallel.layers import mark_sequence_parallel


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float, bias: bool = True, sequence_parallel: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None
        for p in (self.weight, self.bias):
            if p is not None:
                mark_sequence_parallel(p, sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x²) + eps)``, normalised in fp32 and cast back (as LLaMA does)."""

    def __init__(self, dim: int, eps: float, sequence_parallel: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        mark_sequence_parallel(self.weight, sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def build_norm(ln_type: str, dim: int, eps: float, no_bias: bool, sequence_parallel: bool) -> nn.Module:
    if ln_type == "rmsnorm":
        return RMSNorm(dim, eps, sequence_parallel)
    if ln_type == "layernorm":
        return LayerNorm(dim, eps, bias=not no_bias, sequence_parallel=sequence_parallel)
    raise ValueError(f"model.ln_type must be 'layernorm' or 'rmsnorm', got {ln_type!r}")
