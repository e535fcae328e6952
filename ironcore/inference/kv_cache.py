"""Key/value cache for incremental decoding.

Generation runs the prompt through the model once (prefill), then one token per step (decode).
Each attention layer appends the keys and values of the new tokens to its cache and attends over
everything cached so far, so a decode step costs one token's work instead of the whole sequence's.

Layout (per TP rank): keys and values ``[b, groups/tp, max_len, head_dim]``. Under GQA the cache
holds the kv groups, not the (more numerous) query heads: that is the memory GQA saves. Keys are
stored after RoPE, rotated at their own absolute positions, so a cached key is never rotated again.

Batches are left-padded: every row's prompt ends at the same cache index, so one new token per row
lands in one shared column. Padding is masked out of attention (`key_valid`) and position ids count
only real tokens, so a padded prompt gives the same results as the prompt alone.
"""

from __future__ import annotations

from typing import Optional

import torch


class LayerKVCache:
    """One attention layer's keys and values; buffers are allocated on the first `update`, with the
    dtype and device of the keys the layer computes (so autocast decides the cache dtype)."""

    def __init__(self, owner: "InferenceCache"):
        self._owner = owner
        self.keys: Optional[torch.Tensor] = None
        self.values: Optional[torch.Tensor] = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v [b, groups, s, head_dim]`` of the new tokens at the cache's current length;
        return the keys and values of every token so far, ``[b, groups, length + s, head_dim]``."""
        start, end = self._owner.length, self._owner.length + k.shape[2]
        if end > self._owner.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens, the cache holds {self._owner.max_len}")
        if self.keys is None:
            shape = (k.shape[0], k.shape[1], self._owner.max_len, k.shape[3])
            self.keys = k.new_empty(shape)
            self.values = v.new_empty(shape)
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        return self.keys[:, :, :end], self.values[:, :, :end]


class InferenceCache:
    """The KV caches of every layer of one model (or pipeline stage) for one batch of sequences.

    Pass it to ``GPTModel.forward(..., inference_cache=cache)``: the model feeds each layer its
    `LayerKVCache`, builds the attention mask with `attention_mask`, and calls `advance` after the
    forward. ``length`` is the number of token positions already cached.
    """

    def __init__(self, num_layers: int, batch_size: int, max_len: int, device: torch.device | str = "cpu"):
        self.batch_size = batch_size
        self.max_len = max_len
        self.length = 0
        self.layers = [LayerKVCache(self) for _ in range(num_layers)]
        # False for padding: no query attends to it. Tokens written later are valid by default.
        self.key_valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)

    def mark_padding(self, valid: torch.Tensor) -> None:
        """Record which of the next ``valid.shape[1]`` positions hold real tokens (``valid``:
        boolean ``[b, s]``, False for left padding). Call before the forward that writes them."""
        s = valid.shape[1]
        if self.length + s > self.max_len:
            raise ValueError(f"KV cache overflow: {self.length + s} tokens, the cache holds {self.max_len}")
        self.key_valid[:, self.length:self.length + s] = valid.to(self.key_valid.device)

    def default_position_ids(self, batch_size: int, seq_len: int, device: torch.device) -> torch.Tensor:
        """Positions ``length .. length + s - 1`` for every row (no padding)."""
        positions = torch.arange(self.length, self.length + seq_len, device=device)
        return positions.unsqueeze(0).expand(batch_size, seq_len)

    def attention_mask(self, seq_len: int) -> torch.Tensor:
        """Boolean ``[b, 1, s, length + s]``, True where new token ``i`` (cache index
        ``length + i``) may attend cached index ``j``: ``j <= length + i`` and ``j`` is not padding.
        A padding query also sees itself, so no row is fully masked (that would give NaNs); its
        output is never read and no real token attends to it."""
        total = self.length + seq_len
        device = self.key_valid.device
        query_index = torch.arange(self.length, total, device=device).unsqueeze(1)
        key_index = torch.arange(total, device=device).unsqueeze(0)
        causal = key_index <= query_index
        mask = causal & self.key_valid[:, None, :total]
        mask = mask | (key_index == query_index)
        return mask.unsqueeze(1)

    def advance(self, seq_len: int) -> None:
        """Mark ``seq_len`` more positions as cached (the model calls this after its forward)."""
        self.length += seq_len
