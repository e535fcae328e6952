"""Cross-entropy over a vocabulary split across TP ranks, without gathering the logits.

Each rank holds logits ``[..., V/tp]`` for vocabulary ids ``[tp_rank * V/tp, (tp_rank + 1) * V/tp)``
of the padded vocabulary. Three all-reduces of ``[...]``-shaped tensors (max, target logit, sum of
exponentials) give the exact softmax statistics, so per-token memory stays ``O(V/tp)``.

Padded ids (``>= vocab_size``, added so the vocabulary splits evenly) are set to ``-inf`` before
any statistic: they get no probability mass and no gradient, so the loss equals
``F.cross_entropy`` over the real vocabulary at any TP size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ironcore.parallel.mappings import _size


def _all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if _size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, vocab_size, group):
        local_vocab = logits.shape[-1]
        if vocab_start + local_vocab > vocab_size:  # this shard holds padded ids
            ids = torch.arange(vocab_start, vocab_start + local_vocab, device=logits.device)
            logits = logits.masked_fill(ids >= vocab_size, float("-inf"))

        logits_max = _all_reduce(logits.max(dim=-1).values, group, dist.ReduceOp.MAX)
        logits = logits - logits_max.unsqueeze(-1)

        local_target = target - vocab_start
        in_shard = (local_target >= 0) & (local_target < local_vocab)
        local_target = local_target.masked_fill(~in_shard, 0)
        target_logit = logits.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        target_logit = _all_reduce(target_logit.masked_fill(~in_shard, 0.0), group)

        exp_logits = logits.exp_()  # padded ids: exp(-inf) = 0
        sum_exp = _all_reduce(exp_logits.sum(dim=-1), group)
        loss = sum_exp.log() - target_logit

        softmax = exp_logits.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, in_shard)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, in_shard = ctx.saved_tensors
        # d loss / d logits = softmax - one_hot(target); built in place in the saved softmax (as
        # Megatron does) to avoid another [tokens, V/tp] buffer, so this backward runs once.
        grad = softmax
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -in_shard.unsqueeze(-1).to(grad.dtype))
        return grad.mul_(grad_loss.unsqueeze(-1)), None, None, None, None


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
