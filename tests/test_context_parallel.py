"""Context parallelism is exact: ring attention at CP=2 and CP=4 (real gloo groups) equals full
causal attention, and CP=2 halves the activation memory one long sequence keeps for backward.

One spawn per CP size runs every check (start-up dominates on 2 cores):
- load-balanced sharding (rank r holds chunks r and 2cp-1-r) round-trips through gather;
- GQA (8 query heads over 2 kv groups) with RoPE applied at each token's sharded position: the
  gathered output and the gathered gradients of q, k, v (before RoPE) equal SDPA's to 1e-5 (fp32);
- (CP=2) bytes saved for backward (``saved_tensors_hooks``) by one attention + MLP block over a
  long sequence: CP=2's shard keeps <= 0.6x what the full sequence keeps at CP=1.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ironcore.config.schema import PositionalEmbeddingConfig
from ironcore.model.rope import RotaryEmbedding, apply_rotary
from ironcore.parallel.context import (_block_forward, gather_sequence, ring_attention,
                                       shard_sequence, unshard_sequence)
from tests.multiproc import run_distributed

B, HEADS, GROUPS, DIM = 2, 8, 2, 16


def _inputs(seq: int):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, HEADS, seq, DIM, generator=gen)
    k = torch.randn(B, GROUPS, seq, DIM, generator=gen)
    v = torch.randn(B, GROUPS, seq, DIM, generator=gen)
    weight = torch.randn(B, HEADS, seq, DIM, generator=gen)  # a loss that weighs every output
    positions = torch.arange(seq).expand(B, seq) + 3  # not starting at 0: positions are real data
    return q, k, v, weight, positions


def _attention(q, k, v, positions, group):
    cos, sin = RotaryEmbedding(DIM, PositionalEmbeddingConfig(type="rope"))(positions)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    if group is False:  # the reference: full causal SDPA
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return ring_attention(q, k, v, group)


def _saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves for backward while `fn()` runs."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


class _Block(nn.Module):
    """One transformer block's attention and MLP (no norms: they only add O(s) like the rest)."""

    def __init__(self, d: int = 64, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x, group):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.o(ring_attention(q, k, v, group).transpose(1, 2).reshape(b, s, d))
        return x + self.down(F.gelu(self.up(x)))


def _worker(seq: int) -> dict:
    dist.init_process_group("gloo")
    group = dist.new_group(list(range(dist.get_world_size())))
    cp, rank = dist.get_world_size(), dist.get_rank()
    q, k, v, weight, positions = _inputs(seq)

    full = [x.requires_grad_() for x in (q.clone(), k.clone(), v.clone())]
    ref = _attention(*full, positions, group=False)
    (ref * weight).sum().backward()

    local = [shard_sequence(x, cp, rank, dim=2).requires_grad_() for x in (q, k, v)]
    out = _attention(*local, shard_sequence(positions, cp, rank), group)
    (out * shard_sequence(weight, cp, rank, dim=2)).sum().backward()

    errors = {"out": (gather_sequence(out.detach(), group, dim=2) - ref).abs().max().item()}
    for name, mine, theirs in zip("qkv", local, full):
        errors["d" + name] = (gather_sequence(mine.grad, group, dim=2) - theirs.grad).abs().max().item()
    shards = [shard_sequence(positions, cp, r) for r in range(cp)]
    errors["roundtrip"] = int(not torch.equal(unshard_sequence(shards), positions))
    errors["rank0_chunks"] = shards[0][0, :: seq // (2 * cp)].tolist()

    if cp == 2:
        torch.manual_seed(0)
        block, x = _Block(), torch.randn(1, 4096, 64)
        errors["mem_cp1"] = _saved_bytes(lambda: block(x, None))
        errors["mem_cp2"] = _saved_bytes(lambda: block(shard_sequence(x, cp, rank), group))
    return errors


def _check(cp: int, seq: int) -> list[dict]:
    results = run_distributed(_worker, cp, seq)
    chunk = seq // (2 * cp)
    for r in results:
        assert max(r[name] for name in ("out", "dq", "dk", "dv")) < 1e-5, r
        assert r["roundtrip"] == 0
        assert r["rank0_chunks"] == [3, 3 + (2 * cp - 1) * chunk]  # chunks 0 and 2cp-1
    return results


def test_ring_attention_cp2_exact_and_halves_saved_activations():
    results = _check(cp=2, seq=32)
    for r in results:
        assert r["mem_cp2"] <= 0.6 * r["mem_cp1"], r


def test_ring_attention_cp4_exact():
    _check(cp=4, seq=32)


def test_dropout_gradients_match_autograd_of_the_same_mask():
    """With dropout the hand-written backward equals autograd through the same block (same seed)."""
    q, k, v, weight, _ = _inputs(12)
    scale = DIM ** -0.5
    torch.manual_seed(1)
    mine = [x.clone().requires_grad_() for x in (q, k, v)]
    (ring_attention(*mine, None, dropout=0.3) * weight).sum().backward()
    torch.manual_seed(1)
    seed = int(torch.randint(2 ** 62, (1,)).item())
    ref = [x.clone().requires_grad_() for x in (q, k, v)]
    shape = (B, GROUPS, HEADS // GROUPS, 12, DIM)
    out, _ = _block_forward(ref[0].view(shape), ref[1].unsqueeze(2), ref[2].unsqueeze(2),
                            scale, True, 0.3, seed)
    (out.view(B, HEADS, 12, DIM) * weight).sum().backward()
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-5)
    assert (mine[2].grad != 0).any()
