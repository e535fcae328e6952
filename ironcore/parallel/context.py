"""Context parallelism (CP): one long sequence split over a group of ranks, with ring attention.

Load balance. Causal attention makes late tokens expensive (they see everything before them), so a
plain split would leave the last rank with most of the work. As Megatron does, a sequence is cut
into ``2·cp`` chunks and CP rank ``r`` holds chunks ``r`` and ``2·cp−1−r``: every rank then does the
same amount of work. `shard_sequence` applies this to any ``[b, s, ...]`` tensor (input ids,
labels, loss mask, position ids: positions are sharded, never recomputed locally, so RoPE and
absolute embeddings see each token's true position); `shard_batch` does it to a loader
micro-batch; `unshard_sequence`/`gather_sequence` invert it.

Around attention, nothing else changes: every other layer is token-wise, so a CP rank runs the
whole model on its ``s/cp`` tokens. The loss is a token mean over the CP group (see
``training.objectives.LanguageModeling``) and the gradients are averaged over ``dp × cp``
(``ParallelState.dp_cp_group``), the CP ranks holding the same weights.

Ring attention. Each rank keeps its queries and passes its keys/values around the ring; after
``cp`` steps every query has met every key once. Per step the (query, key) block pair is one of:

- own chunks (step 0): causal over the local ``2c`` tokens (both chunks are in position order);
- keys from an earlier rank (``src < r``): all local queries see the first key chunk, none of the
  second (it lies after both query chunks);
- keys from a later rank (``src > r``): only the second query chunk sees them, all of them.

Partial results are merged with their log-sum-exp (online softmax), which is exact. Backward
recomputes each block from the saved q/k/v/out/lse and sends dK/dV around the ring with the keys:
after ``cp`` hops each rank's accumulated dK/dV is back home. Memory: nothing of size
``s × s`` is kept for backward, only local q/k/v/out and the ``[.., s_local]`` lse.

The block kernel is a plain matmul-softmax in fp32 that returns its lse (CPU SDPA does not). GQA
is a broadcast: q is viewed as ``[b, groups, heads/groups, s, d]`` against k/v ``[b, groups, 1, s, d]``.
Dropout is applied per block with a mask regenerated in backward from a saved seed; its random
draws do not match a CP=1 run's (different kernel, different split), only its distribution does.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from ironcore.observe.profiling import comm_phase


# --- load-balanced sequence sharding -----------------------------------------------------------

def shard_sequence(x: torch.Tensor, cp_size: int, cp_rank: int, dim: int = 1) -> torch.Tensor:
    """This CP rank's part of `x` along `dim`: chunks ``cp_rank`` and ``2·cp−1−cp_rank`` of ``2·cp``."""
    if cp_size == 1:
        return x
    if x.shape[dim] % (2 * cp_size) != 0:
        raise ValueError(f"sequence length {x.shape[dim]} is not divisible by 2*cp={2 * cp_size}")
    chunks = x.chunk(2 * cp_size, dim=dim)
    return torch.cat((chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]), dim=dim)


def unshard_sequence(shards: Sequence[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """Inverse of `shard_sequence`: the full tensor from every CP rank's shard (rank order)."""
    cp_size = len(shards)
    if cp_size == 1:
        return shards[0]
    chunks: list[Optional[torch.Tensor]] = [None] * (2 * cp_size)
    for r, shard in enumerate(shards):
        chunks[r], chunks[2 * cp_size - 1 - r] = shard.chunk(2, dim=dim)
    return torch.cat(chunks, dim=dim)


SEQUENCE_KEYS = ("input_ids", "labels", "loss_mask", "position_ids")


def shard_batch(batch: dict[str, torch.Tensor], cp_size: int, cp_rank: int) -> dict[str, torch.Tensor]:
    """This CP rank's part of a loader micro-batch: every ``[b, s]`` field of `SEQUENCE_KEYS`
    sharded with `shard_sequence`. Positions are made explicit first (``arange(s)`` when the batch
    has none), so each token keeps its true position. Identity at ``cp_size == 1``."""
    if cp_size == 1:
        return batch
    if "segment_ids" in batch:  # validation refuses packed SFT under CP; this guards other callers
        raise ValueError("context parallelism does not support segment_ids (packed sequences): ring attention "
                         "is plain causal")
    batch = dict(batch)
    if "position_ids" not in batch:
        b, s = batch["input_ids"].shape
        batch["position_ids"] = torch.arange(s).unsqueeze(0).expand(b, s)
    for key in SEQUENCE_KEYS:
        if key in batch:
            batch[key] = shard_sequence(batch[key], cp_size, cp_rank)
    return batch


def gather_sequence(x: torch.Tensor, group: Optional[dist.ProcessGroup], dim: int = 1) -> torch.Tensor:
    """The full sequence from every rank's shard in `group` (``None``: no CP, `x` itself). No grad."""
    if group is None:
        return x
    shards = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    with comm_phase("cp-all-gather"):
        dist.all_gather(shards, x.contiguous(), group=group)
    return unshard_sequence(shards, dim)


# --- block attention (returns lse) -------------------------------------------------------------

def _dropout_keep(shape, seed: int, p: float, device) -> torch.Tensor:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return (torch.rand(shape, generator=gen, device=device) >= p).float() / (1.0 - p)


def _scores(q, k, scale: float, causal: bool) -> torch.Tensor:
    scores = (q @ k.transpose(-1, -2)) * scale
    if causal:  # square block on the diagonal
        n = scores.shape[-1]
        future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores


def _block_forward(q, k, v, scale, causal, dropout, seed):
    """q ``[b, g, rep, sq, d]``, k/v ``[b, g, 1, sk, d]`` (fp32) -> out ``[b, g, rep, sq, d]``, lse."""
    scores = _scores(q, k, scale, causal)
    lse = scores.logsumexp(dim=-1)
    probs = (scores - lse.unsqueeze(-1)).exp()
    if dropout > 0:
        probs = probs * _dropout_keep(probs.shape, seed, dropout, q.device)
    return probs @ v, lse


def _block_backward(dout, q, k, v, lse, delta, scale, causal, dropout, seed):
    """Gradients of one block given the *final* lse and ``delta = rowsum(dout · out)`` (as flash-attn)."""
    probs = (_scores(q, k, scale, causal) - lse.unsqueeze(-1)).exp()
    dprobs = dout @ v.transpose(-1, -2)
    kept = probs
    if dropout > 0:
        keep = _dropout_keep(probs.shape, seed, dropout, q.device)
        kept, dprobs = probs * keep, dprobs * keep
    dscores = probs * (dprobs - delta.unsqueeze(-1))
    dq = (dscores @ k) * scale
    dk = (dscores.transpose(-1, -2) @ q).sum(dim=2, keepdim=True) * scale
    dv = (kept.transpose(-1, -2) @ dout).sum(dim=2, keepdim=True)
    return dq, dk, dv


# --- the ring ----------------------------------------------------------------------------------

class _Ring:
    """Send to the next rank of `group`, receive from the previous one (asynchronously)."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        self.rank, self.size = rank, size
        self.next = dist.get_global_rank(group, (rank + 1) % size)
        self.prev = dist.get_global_rank(group, (rank - 1) % size)

    def shift(self, tensor: torch.Tensor, tag: int):
        """Start passing `tensor` on; returns (buffer that will hold the previous rank's, wait())."""
        tensor = tensor.contiguous()
        recv = torch.empty_like(tensor)
        with comm_phase("cp-ring-shift"):
            works = [dist.isend(tensor, self.next, group=self.group, tag=tag),
                     dist.irecv(recv, self.prev, group=self.group, tag=tag)]
        return recv, lambda: _wait(works)


def _wait(works) -> None:
    """The ring's exposed communication: what the block compute did not hide."""
    with comm_phase("cp-ring-wait"):
        for work in works:
            work.wait()


def _step_slices(step: int, rank: int, size: int, half: int):
    """(query slice, key slice, causal) of ring step `step` for this rank (see the module doc)."""
    src = (rank - step) % size
    if step == 0:
        return slice(None), slice(None), True
    if src < rank:
        return slice(None), slice(0, half), False
    return slice(half, None), slice(None), False


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, dropout, scale):
        ring = _Ring(group) if group is not None else None
        size, rank = (ring.size, ring.rank) if ring else (1, 0)
        b, h, s, d = q.shape
        g = k.shape[1]
        qf = q.float().view(b, g, h // g, s, d)
        kv = torch.stack((k, v)).float().unsqueeze(3)  # [2, b, g, 1, s, d]
        out = torch.zeros_like(qf)
        lse = torch.full(qf.shape[:-1], float("-inf"), device=q.device)
        seeds = [int(torch.randint(2 ** 62, (1,)).item()) if dropout > 0 else 0 for _ in range(size)]
        for step in range(size):
            pending = ring.shift(kv, tag=0) if step + 1 < size else None  # overlap with compute
            qs, ks, causal = _step_slices(step, rank, size, s // 2)
            blk_out, blk_lse = _block_forward(qf[..., qs, :], kv[0][..., ks, :], kv[1][..., ks, :],
                                              scale, causal, dropout, seeds[step])
            new_lse = torch.logaddexp(lse[..., qs], blk_lse)
            out[..., qs, :] = (out[..., qs, :] * (lse[..., qs] - new_lse).exp().unsqueeze(-1)
                               + blk_out * (blk_lse - new_lse).exp().unsqueeze(-1))
            lse[..., qs] = new_lse
            if pending is not None:
                kv, wait = pending
                wait()
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.dropout, ctx.scale, ctx.seeds = group, dropout, scale, seeds
        return out.view(b, h, s, d).to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        ring = _Ring(ctx.group) if ctx.group is not None else None
        size, rank = (ring.size, ring.rank) if ring else (1, 0)
        b, h, s, d = q.shape
        g = k.shape[1]
        qf = q.float().view(b, g, h // g, s, d)
        dout = dout.float().reshape(qf.shape)
        delta = (dout * out).sum(dim=-1)
        kv = torch.stack((k, v)).float().unsqueeze(3)
        dq = torch.zeros_like(qf)
        dkv = torch.zeros_like(kv)  # this step's keys' gradient, travelling with them
        for step in range(size):
            pending = ring.shift(kv, tag=0) if step + 1 < size else None
            qs, ks, causal = _step_slices(step, rank, size, s // 2)
            bdq, bdk, bdv = _block_backward(dout[..., qs, :], qf[..., qs, :], kv[0][..., ks, :],
                                            kv[1][..., ks, :], lse[..., qs], delta[..., qs],
                                            ctx.scale, causal, ctx.dropout, ctx.seeds[step])
            dq[..., qs, :] += bdq
            dkv[0][..., ks, :] += bdk
            dkv[1][..., ks, :] += bdv
            if ring is not None:  # after `size` hops, dK/dV of our own keys are back here
                dkv, wait_dkv = ring.shift(dkv, tag=1)
                wait_dkv()
            if pending is not None:
                kv, wait = pending
                wait()
        dk, dv = dkv.squeeze(3)
        return (dq.view(b, h, s, d).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   group: Optional[dist.ProcessGroup], dropout: float = 0.0,
                   scale: Optional[float] = None) -> torch.Tensor:
    """Exact causal attention of load-balanced shards (`shard_sequence`) over the CP `group`.

    q ``[b, heads, s_local, d]``, k/v ``[b, groups, s_local, d]`` (heads divisible by groups), as
    SDPA takes them; returns ``[b, heads, s_local, d]``. ``group=None``: no CP (plain causal)."""
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} kv groups")
    if group is not None and q.shape[2] % 2 != 0:
        raise ValueError(f"a CP shard holds two equal chunks; got {q.shape[2]} tokens")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return RingAttention.apply(q, k, v, group, dropout, scale)
