"""The LM head fused with the vocab-parallel cross-entropy, in chunks of tokens (never all logits).

At GPT-2's vocabulary the logits ``[tokens, V/tp]`` (and the softmax the unfused loss keeps for
backward) dwarf every other activation. Like Liger-Kernel's fused linear cross-entropy, this
computes ``logits = hidden @ Wᵀ`` for ``chunk_size`` tokens at a time and reduces each chunk to its
per-token loss at once, so at most one chunk's logits exist:

- forward: per chunk, the logits and the same three all-reduces over TP as
  `ironcore.parallel.cross_entropy` (max, target logit, sum of exponentials); only the per-token
  loss and log-normaliser ``logsumexp`` (``[tokens]`` fp32) are kept;
- backward: per chunk, the logits again, ``softmax = exp(logits - logsumexp)`` (no collective:
  the normaliser is already global), ``grad_logits = (softmax - one_hot) * grad_loss`` per token,
  then ``grad_hidden = grad_logits @ W`` and ``grad_W += grad_logitsᵀ @ hidden``.

Recomputing in backward (rather than building the grads in forward, as Liger does for a mean loss)
makes the result exact for any per-token upstream grad: the objectives mask and weight the
per-token loss after this function. It costs one more head matmul per chunk.

Parallel semantics are those of `parallel_lm_logits` followed by `vocab_parallel_cross_entropy`:
the hidden states enter the TP region (copy, or all-gather of the sequence under sequence
parallelism), each rank multiplies by its vocabulary shard ``W [V/tp, d]``, and the grad of the
hidden states, a partial sum over the vocabulary shards, is all-reduced (reduce-scattered) by that
same mapping in backward. ``W`` gets its grad through autograd, so a tied embedding accumulates
it as usual.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ironcore.parallel.cross_entropy import logits_grad_, mask_padded_ids, shard_target, softmax_statistics
from ironcore.parallel.mappings import enter_tensor_parallel_region


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype `F.linear` would compute the logits in here: autocast's when it is on, else the
    inputs' promoted dtype. Backward runs outside autocast, so the recomputation casts explicitly
    to this dtype to get the forward's logits again."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, vocab_start: int, vocab_size: int) -> torch.Tensor:
    """fp32 logits ``[chunk, V/tp]`` of this shard, padded ids at ``-inf``."""
    return mask_padded_ids(F.linear(hidden, weight).float(), vocab_start, vocab_size)


class _FusedLinearVocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, vocab_start, vocab_size, group, chunk_size, dtype):
        w = weight.to(dtype)
        loss = torch.empty(target.shape, dtype=torch.float32, device=hidden.device)
        logsumexp = torch.empty_like(loss)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            logits = _chunk_logits(hidden[rows].to(dtype), w, vocab_start, vocab_size)
            local_target, in_shard = shard_target(target[rows], vocab_start, logits.shape[-1])
            _, sum_exp, logits_max, chunk_loss = softmax_statistics(logits, local_target, in_shard, group)
            loss[rows] = chunk_loss
            logsumexp[rows] = logits_max + sum_exp.log()
        ctx.save_for_backward(hidden, weight, target, logsumexp)
        ctx.vocab_start, ctx.vocab_size, ctx.chunk_size, ctx.dtype = vocab_start, vocab_size, chunk_size, dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, target, logsumexp = ctx.saved_tensors
        w = weight.to(ctx.dtype)
        grad_hidden = torch.empty_like(hidden)
        # fp32 accumulator: summing many bf16 chunk products would lose the small ones.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            h = hidden[rows].to(ctx.dtype)
            logits = _chunk_logits(h, w, ctx.vocab_start, ctx.vocab_size)
            softmax = logits.sub_(logsumexp[rows].unsqueeze(-1)).exp_()
            local_target, in_shard = shard_target(target[rows], ctx.vocab_start, logits.shape[-1])
            grad_logits = logits_grad_(softmax, local_target, in_shard, grad_loss[rows]).to(ctx.dtype)
            grad_hidden[rows] = grad_logits @ w
            grad_weight += grad_logits.t() @ h
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None, None, None


def fused_vocab_parallel_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                       vocab_size: int, vocab_start: int = 0, group=None,
                                       sequence_parallel: bool = False, chunk_size: int = 1024) -> torch.Tensor:
    """Per-token loss (fp32 ``[b, s]``) of the vocab-parallel head, as
    ``vocab_parallel_cross_entropy(parallel_lm_logits(hidden, weight, ...), target, ...)`` computes
    it, with at most ``chunk_size`` tokens' logits alive at a time (forward and backward).

    Args:
        hidden: final hidden states, replicated ``[b, s, d]`` (sequence-split ``[b, s/tp, d]`` under
            sequence parallelism; gathered here).
        weight: this rank's vocabulary shard of the head ``[V/tp, d]`` (or of the tied embedding).
        target: ``[b, s]`` token ids of the full vocabulary, replicated on the TP ranks; ids outside
            ``[0, vocab_size)`` give ``logsumexp`` and must be masked by the caller's loss mask.
        vocab_size: the real (unpadded) vocabulary size.
        vocab_start: first vocabulary id of this shard (``tp_rank * V/tp``).
        group: the TP process group (``None`` for one rank).
        sequence_parallel: whether `hidden` is sequence-split.
        chunk_size: tokens per chunk (the last chunk may be shorter).
    """
    hidden = enter_tensor_parallel_region(hidden, group, sequence_parallel)
    loss = _FusedLinearVocabParallelCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, target.reshape(-1), vocab_start, vocab_size, group,
        chunk_size, _matmul_dtype(hidden, weight))
    return loss.view(target.shape)
