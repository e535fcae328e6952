"""Feed-forward blocks: ``d_model -> d_ffn -> d_model`` with GELU/ReLU, or SwiGLU (LLaMA).

The up (and SwiGLU's gate) projections are column-parallel, the down projection row-parallel, so
the block needs one reduction (or reduce-scatter under sequence parallelism). Gate and up are
separate parameters so that each is an exact slice of its TP=1 weight and reshards exactly.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ironcore.parallel.layers import ColumnParallelLinear, RowParallelLinear
from ironcore.parallel.mappings import enter_tensor_parallel_region
from ironcore.parallel.state import ParallelState

_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's "gelu_new"
    "relu": F.relu,
}


class MLP(nn.Module):
    """Input: replicated ``[b, s, d]`` (sequence-split under SP). Output: the same layout."""

    def __init__(self, d_model: int, d_ffn: int, activation: str, bias: bool, pstate: ParallelState,
                 sequence_parallel: bool):
        super().__init__()
        self.group = pstate.tp_group
        self.sequence_parallel = sequence_parallel
        self.swiglu = activation == "swiglu"
        if not self.swiglu and activation not in _ACTIVATIONS:
            raise ValueError(f"model.activation_type must be one of {sorted(_ACTIVATIONS) + ['swiglu']}, got {activation!r}")
        self.activation = F.silu if self.swiglu else _ACTIVATIONS[activation]
        column = dict(pstate=pstate, bias=bias, sequence_parallel=sequence_parallel, input_mapped=True)
        if self.swiglu:
            self.gate_proj = ColumnParallelLinear(d_model, d_ffn, **column)
        self.up_proj = ColumnParallelLinear(d_model, d_ffn, **column)
        self.down_proj = RowParallelLinear(d_ffn, d_model, pstate, bias=bias, sequence_parallel=sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = enter_tensor_parallel_region(x, self.group, self.sequence_parallel)
        if self.swiglu:
            hidden = self.activation(self.gate_proj(x)) * self.up_proj(x)
        else:
            hidden = self.activation(self.up_proj(x))
        return self.down_proj(hidden)
