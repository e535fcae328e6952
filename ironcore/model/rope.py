"""Rotary position embedding (``model.positional_embedding``: ``base``, ``scaling_factor``,
``scaling_type`` and the llama3 keys; ``offset`` is added to the position ids by the model).

Angles come from each token's position id (not its index in the batch), so packed or shifted
sequences rotate correctly. The pairing is rotate-half (dims ``i`` and ``i + head_dim/2``), the
convention of Hugging Face LLaMA checkpoints, so their q/k weights load without permutation.

``scaling_type: linear``: ``scaling_factor`` is position interpolation, position ``p`` becomes
``p / factor``. ``scaling_type: llama3`` (Llama 3.1+, HF ``rope_type: llama3``): positions
stay as they are and each frequency is scaled by its wavelength ``2π / inv_freq``: below
``original_max_seq_len / high_freq_factor`` kept, above ``original_max_seq_len / low_freq_factor``
divided by ``scaling_factor``, and smoothly interpolated in between.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ironcore.config.schema import PositionalEmbeddingConfig


def llama3_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_max_seq_len: int) -> torch.Tensor:
    """Llama 3.1's frequency scaling of ``inv_freq``, written as Meta's reference and transformers'
    ``_compute_llama3_parameters`` are, so converted checkpoints reproduce their logits."""
    low_freq_wavelen = original_max_seq_len / low_freq_factor
    high_freq_wavelen = original_max_seq_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_seq_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, pe: PositionalEmbeddingConfig):
        super().__init__()
        if head_dim % 2 != 0:
            raise ValueError(f"RoPE needs an even head dim, got model.head_dim={head_dim}")
        inv_freq = 1.0 / (pe.base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        # llama3 scales the frequencies, linear the positions: exactly one of them carries the factor.
        self.position_divisor = pe.scaling_factor
        if pe.scaling_type == "llama3":
            inv_freq = llama3_inv_freq(inv_freq, pe.scaling_factor, pe.low_freq_factor, pe.high_freq_factor,
                                       pe.original_max_seq_len)
            self.position_divisor = 1.0
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape ``[b, s, head_dim]`` (fp32) for position ids ``[b, s]``."""
        positions = position_ids.float() / self.position_divisor
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
