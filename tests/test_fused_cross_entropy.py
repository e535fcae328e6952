"""The chunked, fused LM head + vocab-parallel cross-entropy (``model.cross_entropy_chunk_size``)
equals the unfused head (`parallel_lm_logits` then `vocab_parallel_cross_entropy`):

- one process: per-token loss and the grads of the hidden states and the head, to 1e-5, for chunk
  sizes that divide the token count and that do not, with ignored (-100) labels, padded vocabulary
  ids and a non-uniform upstream grad (the objectives weight the per-token loss);
- TP=2 (real gloo ranks), with and without sequence parallelism, and a tied-embedding GPTModel:
  fused at TP=2 equals unfused at TP=1;
- memory: the bytes saved for backward where the logits dominate are a small fraction of the
  unfused path's (no logits or softmax kept);
- a short training run with the key set has the losses of one without it; a negative value is a
  config error naming the key.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ironcore.config import ConfigError
from ironcore.config.schema import Config, ModelConfig
from ironcore.model.gpt import build_model
from ironcore.parallel.cross_entropy import vocab_parallel_cross_entropy
from ironcore.parallel.fused_cross_entropy import fused_vocab_parallel_cross_entropy
from ironcore.parallel.layers import parallel_lm_logits
from ironcore.parallel.state import ParallelState
from ironcore.training.trainer import train
from tests.multiproc import run_distributed
from tests.train_helpers import load, losses, write_config

BATCH, SEQ, D = 2, 12, 16
VOCAB, PADDED = 50, 64  # the last 14 ids are padding (on rank 1 at TP=2)


def _case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden states, head weight (padded rows hold large garbage), targets with ignored ids, upstream grad."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(BATCH, SEQ, D, generator=gen)
    weight = torch.randn(PADDED, D, generator=gen) * 0.5
    weight[VOCAB:] = 3.0  # would dominate the softmax if padded ids were not masked
    target = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    target[0, :3] = -100
    target[1, -1] = VOCAB - 1
    upstream = torch.rand(BATCH, SEQ, generator=gen) + 0.5
    return hidden, weight, target, upstream


def _unfused(hidden, weight, target, upstream) -> dict[str, np.ndarray]:
    hidden, weight = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(parallel_lm_logits(hidden, weight, None, False), target, VOCAB)
    (loss * upstream).sum().backward()
    return dict(loss=loss.detach().numpy(), hidden=hidden.grad.numpy(), weight=weight.grad.numpy())


def _assert_close(got: dict, want: dict, what: str) -> None:
    for key in ("loss", "hidden", "weight"):
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-5, err_msg=f"{what}: {key}")


@pytest.mark.parametrize("chunk_size", [1, 5, 8, 24, 1000])  # 24 tokens: 5 does not divide them
def test_fused_equals_unfused_single_process(chunk_size):
    hidden, weight, target, upstream = _case()
    want = _unfused(hidden, weight, target, upstream)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = fused_vocab_parallel_cross_entropy(h, w, target, VOCAB, chunk_size=chunk_size)
    assert loss.shape == (BATCH, SEQ) and loss.dtype == torch.float32
    (loss * upstream).sum().backward()
    _assert_close(dict(loss=loss.detach().numpy(), hidden=h.grad.numpy(), weight=w.grad.numpy()), want,
                  f"chunk {chunk_size}")
    assert not w.grad[VOCAB:].any(), "padded vocabulary ids received gradient"
    assert np.abs(want["weight"]).max() > 0.1  # the comparison is not between near-zero grads


def _fused_shard(pstate: ParallelState, sequence_parallel: bool) -> dict[str, np.ndarray]:
    hidden, weight, target, upstream = _case()
    local = PADDED // pstate.tp_size
    w = weight[pstate.tp_rank * local:(pstate.tp_rank + 1) * local].clone().requires_grad_(True)
    if sequence_parallel:
        hidden = hidden.chunk(pstate.tp_size, dim=1)[pstate.tp_rank]
    h = hidden.clone().requires_grad_(True)
    loss = fused_vocab_parallel_cross_entropy(h, w, target, VOCAB, pstate.tp_rank * local, pstate.tp_group,
                                              sequence_parallel, chunk_size=5)
    (loss * upstream).sum().backward()
    return dict(loss=loss.detach().numpy(), hidden=h.grad.numpy(), weight=w.grad.numpy())


def _model_cfg(chunk_size: int) -> Config:
    cfg = Config(model=ModelConfig(d_model=32, d_ffn=64, num_layers=1, num_attention_heads=4, max_seq_len=16,
                                   precision="float32", dropout_embd=0.0, dropout_attn=0.0, dropout_mlp=0.0,
                                   cross_entropy_chunk_size=chunk_size))
    cfg.trainer.tensor_model_parallel_size = 2
    cfg.parallel.dist_backend = "gloo"
    return cfg


def _model_loss_and_head_grad(cfg: Config, pstate: ParallelState) -> dict[str, np.ndarray]:
    """Per-token loss and the tied embedding's grad (the fused head's weight) of a tiny GPTModel."""
    model = build_model(cfg, pstate, VOCAB)
    ids = torch.randint(0, VOCAB, (BATCH, 16), generator=torch.Generator().manual_seed(1))
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    loss = model(ids, labels)
    (loss * torch.linspace(0.5, 1.5, loss.numel()).view_as(loss)).sum().backward()
    return dict(loss=loss.detach().numpy(), embedding=model.embedding.word_embeddings.weight.grad.numpy())


def _tp_worker() -> dict:
    from ironcore.parallel.state import init_distributed

    pstate = init_distributed(_model_cfg(7))
    return dict(tp=_fused_shard(pstate, False), sp=_fused_shard(pstate, True),
                model=_model_loss_and_head_grad(_model_cfg(7), pstate))


@pytest.mark.timeout(120)
def test_fused_tp2_equals_unfused_tp1():
    want = _unfused(*_case())
    results = run_distributed(_tp_worker, 2, timeout=90)
    for case in ("tp", "sp"):
        weight = np.concatenate([r[case]["weight"] for r in results], axis=0)
        for rank, r in enumerate(results):
            hidden = r[case]["hidden"]
            if case == "sp":  # each rank holds the grad of its sequence chunk
                hidden = np.concatenate([q[case]["hidden"] for q in results], axis=1)
            _assert_close(dict(loss=r[case]["loss"], hidden=hidden, weight=weight), want, f"TP=2 {case} rank {rank}")

    ref = _model_loss_and_head_grad(_model_cfg(0), ParallelState())
    embedding = np.concatenate([r["model"]["embedding"] for r in results], axis=0)
    for r in results:
        np.testing.assert_allclose(r["model"]["loss"], ref["loss"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(embedding[:VOCAB], ref["embedding"][:VOCAB], rtol=0, atol=1e-5)
    assert not embedding[VOCAB:].any()


def _saved_bytes(fn) -> int:
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_fused_saves_a_fraction_of_the_unfused_bytes():
    tokens, d, vocab = 512, 64, 8192
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, tokens, d, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, d, generator=gen, requires_grad=True)
    target = torch.randint(0, vocab, (1, tokens), generator=gen)

    unfused = _saved_bytes(lambda: vocab_parallel_cross_entropy(
        parallel_lm_logits(hidden, weight, None, False), target, vocab))
    fused = _saved_bytes(lambda: fused_vocab_parallel_cross_entropy(hidden, weight, target, vocab, chunk_size=64))
    logits_bytes = tokens * vocab * 4
    # Unfused keeps the softmax [tokens, V] besides the matmul's inputs; fused keeps only the inputs,
    # the targets and one fp32 logsumexp per token.
    assert unfused > logits_bytes
    assert fused == (tokens * d + vocab * d) * 4 + tokens * 8 + tokens * 4
    assert fused < unfused / 4, (fused, unfused)


def test_training_with_fused_head_equals_unfused(tmp_path):
    steps = {"operation": {"train_steps": 4, "no_save": True}}
    train(load(write_config(tmp_path, "unfused", **steps)))
    train(load(write_config(tmp_path, "fused", **steps), "model.cross_entropy_chunk_size=48"))
    want, got = losses(tmp_path / "unfused"), losses(tmp_path / "fused")
    assert sorted(got) == [1, 2, 3, 4]
    assert got.keys() == want.keys()
    np.testing.assert_allclose([got[s] for s in got], [want[s] for s in got], rtol=0, atol=1e-5)


def test_negative_chunk_size_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="model.cross_entropy_chunk_size"):
        load(write_config(tmp_path), "model.cross_entropy_chunk_size=-1")
