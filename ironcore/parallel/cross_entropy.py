"""Cross-entropy over a vocabulary split across TP ranks, without gathering the logits.

Each rank holds logits ``[..., V/tp]`` for vocabulary ids ``[tp_rank * V/tp, (tp_rank + 1) * V/tp)``
of the padded vocabulary. Three all-reduces of ``[...]``-shaped tensors (max, target logit, sum of
exponentials) give the exact softmax statistics, so per-token memory stays ``O(V/tp)``.

Padded ids (``>= vocab_size``, added so the vocabulary splits evenly) are set to ``-inf`` before
any statistic: they get no probability mass and no gradient, so the loss equals
``F.cross_entropy`` over the real vocabulary at any TP size.

The helpers below are shared with `ironcore.parallel.fused_cross_entropy`, which runs the same
statistics on chunks of tokens fused with the head's matmul.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ironcore.parallel.mappings import _size


def _all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if _size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def mask_padded_ids(logits: torch.Tensor, vocab_start: int, vocab_size: int) -> torch.Tensor:
    """`logits` ``[..., V/tp]`` with the ids at or above `vocab_size` set to ``-inf`` (a new tensor
    only when this shard holds padded ids)."""
    local_vocab = logits.shape[-1]
    if vocab_start + local_vocab <= vocab_size:
        return logits
    ids = torch.arange(vocab_start, vocab_start + local_vocab, device=logits.device)
    return logits.masked_fill(ids >= vocab_size, float("-inf"))


def shard_target(target: torch.Tensor, vocab_start: int, local_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(local_target, in_shard)``: target ids relative to this shard (0 where the id lives on
    another rank, or is out of range such as -100) and whether this shard holds them."""
    local_target = target - vocab_start
    in_shard = (local_target >= 0) & (local_target < local_vocab)
    return local_target.masked_fill(~in_shard, 0), in_shard


def softmax_statistics(logits: torch.Tensor, local_target: torch.Tensor, in_shard: torch.Tensor,
                       group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(exp_logits, sum_exp, logits_max, loss)`` of padding-masked fp32 `logits` ``[..., V/tp]``
    over the whole vocabulary (three all-reduces over `group`): ``exp(logits - max)`` of this
    shard, its all-reduced sum and max, and the per-token loss ``log(sum_exp) - (target - max)``."""
    logits_max = _all_reduce(logits.max(dim=-1).values, group, dist.ReduceOp.MAX)
    logits = logits - logits_max.unsqueeze(-1)
    target_logit = logits.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
    target_logit = _all_reduce(target_logit.masked_fill(~in_shard, 0.0), group)
    exp_logits = logits.exp_()  # padded ids: exp(-inf) = 0
    sum_exp = _all_reduce(exp_logits.sum(dim=-1), group)
    return exp_logits, sum_exp, logits_max, sum_exp.log() - target_logit


def logits_grad_(softmax: torch.Tensor, local_target: torch.Tensor, in_shard: torch.Tensor,
                 grad_loss: torch.Tensor) -> torch.Tensor:
    """``(softmax - one_hot(target)) * grad_loss``, the grad of the loss wrt this shard's logits,
    built in place in `softmax` (as Megatron does) to avoid another ``[tokens, V/tp]`` buffer."""
    softmax.scatter_add_(-1, local_target.unsqueeze(-1), -in_shard.unsqueeze(-1).to(softmax.dtype))
    return softmax.mul_(grad_loss.unsqueeze(-1))


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, vocab_size, group):
        logits = mask_padded_ids(logits, vocab_start, vocab_size)
        local_target, in_shard = shard_target(target, vocab_start, logits.shape[-1])
        exp_logits, sum_exp, _, loss = softmax_statistics(logits, local_target, in_shard, group)
        softmax = exp_logits.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, in_shard)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, in_shard = ctx.saved_tensors
        # In place in the saved softmax, so this backward runs once.
        return logits_grad_(softmax, local_target, in_shard, grad_loss), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_size: int,
                                 vocab_start: int = 0, group=None) -> torch.Tensor:
    """Per-token loss (fp32, shaped like `target`) from this rank's logits shard.

    Args:
        logits: ``[..., V/tp]`` vocab-split logits (any float dtype; computed in fp32).
        target: ``[...]`` token ids of the full vocabulary, replicated on the TP ranks. Ids outside
            ``[0, vocab_size)`` (e.g. -100 padding) give ``logsumexp`` and must be masked by the
            caller's loss mask.
        vocab_size: the real (unpadded) vocabulary size; logits of ids at or above it are ignored.
        vocab_start: first vocabulary id of this shard (``tp_rank * V/tp``).
        group: the TP process group (``None`` for one rank).
    """
    return _VocabParallelCrossEntropy.apply(logits.float(), target, vocab_start, vocab_size, group)
