"""Tensor parallelism is exact: TP=2 and TP=4 (real gloo groups) reproduce TP=1.

One spawn per TP size runs every check (start-up dominates on 2 cores):
- GPT and LLaMA variants, with and without sequence parallelism: same per-token loss and the same
  gradients (shards gathered along ``partition_dim``) as TP=1, to 1e-5;
- each rank's initial weights are exactly its slice of the TP=1 initial weights (same seed);
- vocab-parallel cross-entropy with the real GPT-2 vocabulary (50,257 padded) equals
  ``F.cross_entropy`` over the unpadded vocabulary, values and grads, padded ids get nothing;
- (4 ranks) a TP=2 × PP=2 grid is laid out TP-innermost, each group holding the right ranks;
- (TP=2) column-parallel (gathered) and row-parallel layers equal the linear maps they split;
- (TP=2) dropout RNG: the TP-rank stream differs per rank, the default stream matches, and
  ``get_states``/``set_states`` replay a draw; HF weights loaded at TP=2 give HF's logits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ironcore.config.schema import Config, ModelConfig, PositionalEmbeddingConfig
from ironcore.model.gpt import build_model, padded_vocab_size
from ironcore.parallel.state import ParallelState
from tests.multiproc import run_distributed

VOCAB = 300  # padded to 384 at TP=1, 512 at TP=2 and TP=4: exercises padding that changes with TP
BATCH, SEQ = 2, 8
GPT2_VOCAB = 50257


def _gpt(**kw) -> ModelConfig:
    base = dict(d_model=32, d_ffn=64, num_layers=2, num_attention_heads=4, max_seq_len=16, precision="float32",
                activation_type="gelu_tanh", dropout_embd=0.0, dropout_attn=0.0, dropout_mlp=0.0)
    return ModelConfig(**{**base, **kw})


def _llama(**kw) -> ModelConfig:
    # head_dim 8 × 8 heads = 64 != d_model 32; 4 kv groups (GQA) so TP=4 still has one per rank.
    base = dict(d_model=32, d_ffn=48, num_layers=2, num_attention_heads=8, num_attention_groups=4, head_dim=8,
                max_seq_len=16, precision="float32", ln_type="rmsnorm", ln_eps=1e-6, activation_type="swiglu",
                no_bias=True, untie_embed=True, dropout_embd=0.0, dropout_attn=0.0, dropout_mlp=0.0,
                positional_embedding=PositionalEmbeddingConfig(type="rope", base=10000))
    return ModelConfig(**{**base, **kw})


VARIANTS = {
    "gpt": (_gpt(), False),
    "gpt-sp": (_gpt(), True),
    "gpt-postln-relu-untied-sp": (_gpt(post_ln=True, activation_type="relu", untie_embed=True), True),
    "llama": (_llama(), False),
    "llama-sp": (_llama(), True),
}


def _config(model: ModelConfig, tp: int, sequence_parallel: bool) -> Config:
    cfg = Config(model=model)
    cfg.trainer.tensor_model_parallel_size = tp
    cfg.parallel.sequence_parallel = sequence_parallel
    cfg.parallel.dist_backend = "gloo"
    return cfg


def _batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    # Two packed documents in row 0 (positions restart), one in row 1.
    segment_ids = torch.tensor([[0] * 5 + [1] * 3, [0] * SEQ])
    position_ids = torch.tensor([list(range(5)) + list(range(3)), list(range(SEQ))])
    return dict(input_ids=ids, labels=labels, segment_ids=segment_ids, position_ids=position_ids)


def _run_variant(model_cfg: ModelConfig, pstate: ParallelState, sequence_parallel: bool) -> dict:
    """Initial weights, per-token loss and grads of one model on this rank (numpy for pickling)."""
    model = build_model(_config(model_cfg, pstate.tp_size, sequence_parallel), pstate, VOCAB)
    init = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    batch = _batch()
    loss = model(**batch)
    weights = torch.linspace(0.5, 1.5, loss.numel()).view_as(loss)  # non-uniform upstream grad
    (loss * weights).sum().backward()
    model.sync_sequence_parallel_grads()
    grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
    meta = {n: (getattr(p, "partition_dim", None), getattr(p, "vocab_parallel", False))
            for n, p in model.named_parameters()}
    return dict(loss=loss.detach().numpy(), init=init, grads=grads, meta=meta)


def _gpt2_vocab_logits(tp: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits over the padded GPT-2 vocabulary (padding filled with large garbage), targets, upstream grad."""
    gen = torch.Generator().manual_seed(3)
    padded = padded_vocab_size(GPT2_VOCAB, 128, tp)
    logits = torch.randn(2, 3, padded, generator=gen) * 4
    logits[..., GPT2_VOCAB:] = 50.0  # would dominate the softmax if padded ids were not masked
    target = torch.randint(0, GPT2_VOCAB, (2, 3), generator=gen)
    target[0, 0] = GPT2_VOCAB - 1  # the last real id lives in the last shard next to the padding
    upstream = torch.rand(2, 3, generator=gen)
    return logits, target, upstream


def _cross_entropy_shard(pstate: ParallelState) -> dict:
    from ironcore.parallel.cross_entropy import vocab_parallel_cross_entropy

    logits, target, upstream = _gpt2_vocab_logits(pstate.tp_size)
    shard = logits.chunk(pstate.tp_size, dim=-1)[pstate.tp_rank].clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(shard, target, GPT2_VOCAB, pstate.tp_rank * shard.shape[-1], pstate.tp_group)
    (loss * upstream).sum().backward()
    return dict(loss=loss.detach().numpy(), grad=shard.grad.numpy())


def _rng_checks(pstate: ParallelState) -> dict:
    from ironcore.parallel.random import get_rng_tracker, set_random_seed

    set_random_seed(1234, pstate.tp_rank)
    tracker = get_rng_tracker()
    replicated = torch.rand(4).numpy()
    saved = tracker.get_states()
    with tracker.fork():
        split = torch.rand(4).numpy()
    tracker.set_states(saved)
    with tracker.fork():
        replay = torch.rand(4).numpy()
    return dict(replicated=replicated, split=split, replay=replay)


def _hf_logits_shard(pstate: ParallelState, hf_sd: dict, model_cfg: ModelConfig, ids: np.ndarray) -> np.ndarray:
    from ironcore.checkpoint.hf import hf_to_ironcore

    cfg = _config(model_cfg, pstate.tp_size, True)
    model = build_model(cfg, pstate, VOCAB).eval()
    state = hf_to_ironcore({k: torch.from_numpy(v) for k, v in hf_sd.items()}, model_cfg, VOCAB,
                           tp_size=pstate.tp_size, tp_rank=pstate.tp_rank)
    model.load_state_dict(state)
    with torch.no_grad():
        return model(torch.from_numpy(ids)).numpy()


def _grid_2x2(rank: int) -> dict:
    """This rank's coordinates in a TP=2 × PP=2 grid, and the ranks each of its groups holds."""
    import torch.distributed as dist

    from ironcore.parallel.mesh import MeshShape
    from ironcore.parallel.state import build_parallel_state

    grid = build_parallel_state(MeshShape(pp=2, tp=2), rank, rank, torch.device("cpu"), "gloo")
    members = {}
    for kind in ("tp", "pp"):
        ranks = [torch.zeros(1) for _ in range(2)]
        dist.all_gather(ranks, torch.tensor([float(rank)]), group=getattr(grid, f"{kind}_group"))
        members[kind] = [int(t.item()) for t in ranks]
    return dict(coords=(grid.tp_rank, grid.pp_rank, grid.dp_rank, grid.dp_size, grid.dp_group is None,
                        grid.is_first_stage, grid.is_last_stage), **members)


def _layer_checks(pstate: ParallelState) -> dict:
    """Column (gathered output) and row-parallel layers against the plain linear maps they split."""
    from ironcore.parallel.layers import ColumnParallelLinear, RowParallelLinear

    gen = torch.Generator().manual_seed(9)
    w1, b1, w2, b2 = (torch.randn(8, 6, generator=gen), torch.randn(8, generator=gen),
                      torch.randn(6, 8, generator=gen), torch.randn(6, generator=gen))
    x = torch.randn(2, 4, 6, generator=gen, requires_grad=True)
    column = ColumnParallelLinear(6, 8, pstate, gather_output=True)
    row = RowParallelLinear(8, 6, pstate)
    with torch.no_grad():
        column.weight.copy_(w1.chunk(pstate.tp_size, 0)[pstate.tp_rank])
        column.bias.copy_(b1.chunk(pstate.tp_size, 0)[pstate.tp_rank])
        row.weight.copy_(w2.chunk(pstate.tp_size, 1)[pstate.tp_rank])
        row.bias.copy_(b2)
    hidden = column(x)
    y = row(hidden.chunk(pstate.tp_size, -1)[pstate.tp_rank])
    y.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    hidden_ref = F.linear(x_ref, w1, b1)
    y_ref = F.linear(hidden_ref, w2, b2)
    y_ref.square().sum().backward()
    def rel(a, b):  # values reach ~1e2 here: compare relative to the largest
        return ((a - b).abs().max() / b.abs().max()).item()

    return dict(hidden=rel(hidden, hidden_ref), y=rel(y, y_ref), x_grad=rel(x.grad, x_ref.grad))


def _worker(tp: int, hf_case) -> dict:
    from ironcore.parallel.state import init_distributed

    pstate = init_distributed(_config(_gpt(), tp, False))
    out = {name: _run_variant(cfg, pstate, sp) for name, (cfg, sp) in VARIANTS.items()}
    out["ce"] = _cross_entropy_shard(pstate)
    out["rank"] = pstate.tp_rank
    if tp == 4:
        out["grid"] = _grid_2x2(pstate.rank)
    if hf_case is not None:
        out["rng"] = _rng_checks(pstate)
        out["layers"] = _layer_checks(pstate)
        out["hf"] = _hf_logits_shard(pstate, *hf_case)
    return out


def _gather(shards: list[np.ndarray], dim) -> np.ndarray:
    return shards[0] if dim is None else np.concatenate(shards, axis=dim)


def _check_against_tp1(results: list[dict], tp: int) -> None:
    for name, (model_cfg, sp) in VARIANTS.items():
        ref = _run_variant(model_cfg, ParallelState(), sp)
        ranks = [r[name] for r in results]
        for rank in ranks:
            np.testing.assert_allclose(rank["loss"], ref["loss"], rtol=0, atol=1e-5, err_msg=f"{name} loss")
        for pname, (dim, vocab_parallel) in ranks[0]["meta"].items():
            for what in ("init", "grads"):
                got = _gather([r[what][pname] for r in ranks], dim)
                want = ref[what][pname]
                if vocab_parallel:  # padding differs with TP: compare the real rows, padding stays 0
                    assert not got[VOCAB:].any(), f"{name} {pname}: padded vocab rows have nonzero {what}"
                    got, want = got[:VOCAB], want[:VOCAB]
                if what == "init":
                    np.testing.assert_array_equal(got, want, err_msg=f"{name} {pname}: TP={tp} init is not a slice")
                else:
                    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=f"{name} {pname} grad")
            if dim is None:  # replicated parameters must agree on every rank
                for r in ranks[1:]:
                    np.testing.assert_allclose(r["grads"][pname], ranks[0]["grads"][pname], rtol=0, atol=1e-6)


def _check_cross_entropy(results: list[dict], tp: int) -> None:
    logits, target, upstream = _gpt2_vocab_logits(tp)
    real = logits[..., :GPT2_VOCAB].clone().requires_grad_(True)
    want = F.cross_entropy(real.reshape(-1, GPT2_VOCAB), target.reshape(-1), reduction="none").view(2, 3)
    (want * upstream).sum().backward()
    for r in results:
        np.testing.assert_allclose(r["ce"]["loss"], want.detach().numpy(), rtol=0, atol=1e-5)
    grad = np.concatenate([r["ce"]["grad"] for r in results], axis=-1)
    np.testing.assert_allclose(grad[..., :GPT2_VOCAB], real.grad.numpy(), rtol=0, atol=1e-5)
    assert not grad[..., GPT2_VOCAB:].any(), "padded vocabulary ids received gradient"


def _hf_case():
    transformers = pytest.importorskip("transformers")
    from ironcore.checkpoint.hf import hf_config_from_model_config

    model_cfg = _llama()
    hf_cfg = hf_config_from_model_config(model_cfg, VOCAB)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(11)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # norms away from 1
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = hf(ids).logits.numpy()
    sd = {k: v.numpy().copy() for k, v in hf.state_dict().items()}
    return (sd, model_cfg, ids.numpy()), logits


@pytest.mark.timeout(300)
def test_tp2_matches_tp1_loss_grads_init_cross_entropy_rng_and_hf():
    hf_case, hf_logits = _hf_case()
    results = run_distributed(_worker, 2, 2, hf_case, timeout=240)
    _check_against_tp1(results, 2)
    _check_cross_entropy(results, 2)

    rng = [r["rng"] for r in results]
    np.testing.assert_array_equal(rng[0]["replicated"], rng[1]["replicated"])
    assert not np.array_equal(rng[0]["split"], rng[1]["split"]), "TP ranks drew the same split-region dropout"
    for r in rng:
        np.testing.assert_array_equal(r["split"], r["replay"])

    for r in results:
        assert max(r["layers"].values()) < 1e-6, r["layers"]

    logits = np.concatenate([r["hf"] for r in results], axis=-1)
    assert np.abs(logits[..., :VOCAB] - hf_logits).max() < 1e-4


@pytest.mark.timeout(300)
def test_tp4_matches_tp1_loss_grads_init_and_cross_entropy():
    results = run_distributed(_worker, 4, 4, None, timeout=280)
    assert [r["grid"]["coords"] for r in results] == [
        (0, 0, 0, 1, True, True, False), (1, 0, 0, 1, True, True, False),
        (0, 1, 0, 1, True, False, True), (1, 1, 0, 1, True, False, True)]
    assert [r["grid"]["tp"] for r in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["grid"]["pp"] for r in results] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    _check_against_tp1(results, 4)
    _check_cross_entropy(results, 4)


def test_cross_entropy_tp1_equals_torch_on_padded_gpt2_vocab():
    results = [_cross_entropy_shard(ParallelState())]
    _check_cross_entropy([dict(ce=results[0])], 1)
