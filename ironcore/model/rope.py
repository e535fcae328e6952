"""Rotary position embedding (``model.positional_embedding``: ``base``, ``scaling_factor``, ``offset``).

Angles come from each token's position id (not its index in the batch), so packed or shifted
sequences rotate correctly. The pairing is rotate-half (dims ``i`` and ``i + head_dim/2``), the
convention of Hugging Face LLaMA checkpoints, so their q/k weights load without permutation.
``scaling_factor`` is linear position interpolation: position ``p`` becomes ``(p + offset) / factor``.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, base: float, scaling_factor: float = 1.0, offset: int = 0):
        super().__init__()
        if head_dim % 2 != 0:
            raise ValueError(f"RoPE needs an even head dim, got model.head_dim={head_dim}")
        self.scaling_factor = scaling_factor
        self.offset = offset
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape ``[b, s, head_dim]`` (fp32) for position ids ``[b, s]``."""
        positions = (position_ids.float() + self.offset) / self.scaling_factor
        freqs = positions.unsqueeze(-1) * self.inv_freq.float()
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [b, heads, s, head_dim]`` by ``cos/sin [b, s, head_dim]`` (in fp32, cast back)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x32 = x.float()
    return (x32 * cos + _rotate_half(x32) * sin).to(x.dtype)
