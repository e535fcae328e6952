"""Autoregressive generation with a KV cache: prefill the prompts in one pass, then decode.

::

    prompts ──left-pad──> ids [b, L], valid [b, L], position ids (count real tokens only)
    prefill: model(ids, position_ids, inference_cache) ──> logits of the last column
    repeat:  gather vocab shards (TP) ──> sample ──> broadcast from TP rank 0 ──> model(one token)
    stop:    every row produced the end-of-document id, or max_new_tokens

Left padding puts the end of every prompt in the same column, so each decode step writes one
shared cache column. Padding never changes a result: padded keys are masked out of attention and
position ids (RoPE angles, learned position rows) count only a row's real tokens.

Under tensor parallelism every TP rank runs the same loop on its heads and vocabulary shard; the
logits are all-gathered over TP before sampling, and the chosen tokens are broadcast from TP rank
0 so the ranks cannot drift apart. Pipeline parallelism is not used for generation: load any
checkpoint layout into PP=1 (see `ironcore.inference.loading`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from ironcore.inference.kv_cache import InferenceCache
from ironcore.inference.sampling import SamplingParams, sample_next_token
from ironcore.model.gpt import GPTModel
from ironcore.parallel.mappings import gather_from_tensor_parallel_region
from ironcore.training.precision import autocast

logger = logging.getLogger(__name__)


@dataclass
class GenerationOutput:
    """New tokens per prompt (the end-of-document id that stopped a row is not included) and the
    timings of the two phases. ``decode_tokens`` counts the tokens produced by decode steps."""

    tokens: list[list[int]]
    stopped_at_eod: list[bool]
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_tokens: int = 0
    prompt_lengths: list[int] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


def full_vocab_logits(model: GPTModel, logits: torch.Tensor) -> torch.Tensor:
    """This TP rank's vocabulary shard ``[..., V_padded/tp]`` -> the real vocabulary
    ``[..., vocab_size]`` in fp32, identical on every TP rank (all-gather; padding ids dropped)."""
    logits = gather_from_tensor_parallel_region(logits, model.tp_group)
    return logits[..., :model.vocab_size].float()


def left_pad(prompts: list[list[int]], pad_id: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids, valid, position_ids)``, each ``[b, longest]``: prompts right-aligned, ``valid``
    False on the padding, positions counting real tokens from 0 (padding gets 0)."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), longest), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        valid[row, longest - len(prompt):] = True
    positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
    return ids.to(device), valid.to(device), positions.to(device)


def check_prompt_lengths(prompts: list[list[int]], max_seq_len: int, max_new_tokens: int) -> int:
    """The number of new tokens that fit: ValueError for an empty prompt or one that leaves no room
    within ``model.max_seq_len``; fewer than asked (with a warning) when the longest prompt plus
    ``max_new_tokens`` would pass it."""
    if not prompts:
        raise ValueError("no prompts to generate from")
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {i} is empty: generation needs at least one token to start from")
        if len(prompt) >= max_seq_len:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens, but model.max_seq_len is {max_seq_len}: "
                             f"a prompt must be shorter than max_seq_len to leave room for a new token; "
                             f"shorten the prompt (keep its last {max_seq_len - 1} tokens at most)")
    room = max_seq_len - max(len(p) for p in prompts)
    if room < max_new_tokens:
        logger.warning("max_new_tokens %d reduced to %d: the longest prompt has %d tokens and model.max_seq_len "
                       "is %d", max_new_tokens, room, max_seq_len - room, max_seq_len)
    return min(room, max_new_tokens)


def _broadcast_from_tp_rank0(tokens: torch.Tensor, group) -> torch.Tensor:
    """Make every TP rank use TP rank 0's tokens (they are equal by construction; this guarantees
    it, so a rounding difference can never make the ranks decode different sequences)."""
    if group is None or dist.get_world_size(group) == 1:
        return tokens
    dist.broadcast(tokens, src=dist.get_global_rank(group, 0), group=group)
    return tokens


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(model: GPTModel, prompts: list[list[int]], params: SamplingParams,
             eod_id: Optional[int] = None) -> GenerationOutput:
    """Continue each prompt (a list of token ids) with up to ``params.max_new_tokens`` tokens.

    A row stops at ``eod_id`` (None: never) and the batch stops when every row has stopped. The
    model must hold every layer (PP=1); under TP>1 every TP rank calls this with the same
    arguments and gets the same result. Runs in the model's ``model.precision`` (autocast).
    Raises ValueError for an empty prompt or one of ``model.max_seq_len`` tokens or more.
    """
    if not (model.is_first_stage and model.is_last_stage):
        raise ValueError("generation needs the whole model in one process group: load it with "
                         "pipeline_model_parallel_size=1 (any checkpoint layout loads that way)")
    model.eval()
    device = next(model.parameters()).device
    max_new = check_prompt_lengths(prompts, model.cfg.max_seq_len, params.max_new_tokens)
    batch = len(prompts)
    ids, valid, positions = left_pad(prompts, pad_id=eod_id or 0, device=device)
    cache = InferenceCache(len(model.layers), batch, ids.shape[1] + max_new, device)
    cache.mark_padding(valid)
    generator = torch.Generator(device=device).manual_seed(params.seed)
    next_position = positions[:, -1:] + 1
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    new_tokens: list[torch.Tensor] = []
    out = GenerationOutput(tokens=[], stopped_at_eod=[], prompt_lengths=[len(p) for p in prompts])

    with autocast(model.cfg.precision, device):
        _sync(device)
        start = time.perf_counter()
        logits = model(ids, position_ids=positions, inference_cache=cache)[:, -1]
        for step in range(max_new):
            token = sample_next_token(full_vocab_logits(model, logits), params, generator)
            token = _broadcast_from_tp_rank0(token, model.tp_group)
            if eod_id is not None:
                token = token.masked_fill(done, eod_id)  # finished rows only repeat the EOD id
            new_tokens.append(token)
            if step > 0:
                out.decode_tokens += int((~done).sum())
            if eod_id is not None:
                done |= token == eod_id
            if step == 0:
                _sync(device)
                out.prefill_seconds = time.perf_counter() - start
                start = time.perf_counter()
            if step == max_new - 1 or bool(done.all()):
                break
            logits = model(token.unsqueeze(1), position_ids=next_position, inference_cache=cache)[:, -1]
            next_position = next_position + 1
        _sync(device)
        out.decode_seconds = time.perf_counter() - start if len(new_tokens) > 1 else 0.0

    generated = torch.stack(new_tokens, dim=1).tolist()
    for row in generated:
        stop = row.index(eod_id) if eod_id is not None and eod_id in row else len(row)
        out.tokens.append(row[:stop])
        out.stopped_at_eod.append(stop < len(row))
    return out
