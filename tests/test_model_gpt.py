"""GPTModel on one process: shapes and errors, packing, pipeline stages, init, autocast, RNG replay."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from ironcore.config.schema import Config, ModelConfig, PositionalEmbeddingConfig
from ironcore.model.gpt import GPTModel, build_model, padded_vocab_size
from ironcore.parallel.random import get_rng_tracker
from ironcore.parallel.state import ParallelState

VOCAB = 500


def _gpt(**kw) -> ModelConfig:
    base = dict(d_model=32, d_ffn=64, num_layers=2, num_attention_heads=4, max_seq_len=32, precision="float32",
                activation_type="gelu_tanh", dropout_embd=0.0, dropout_attn=0.0, dropout_mlp=0.0)
    return ModelConfig(**{**base, **kw})


def _llama(**kw) -> ModelConfig:
    base = dict(d_model=32, d_ffn=48, num_layers=2, num_attention_heads=4, num_attention_groups=2, max_seq_len=32,
                precision="float32", ln_type="rmsnorm", activation_type="swiglu", no_bias=True, untie_embed=True,
                dropout_embd=0.0, dropout_attn=0.0, dropout_mlp=0.0,
                positional_embedding=PositionalEmbeddingConfig(type="rope"))
    return ModelConfig(**{**base, **kw})


def _build(model_cfg: ModelConfig, pstate: ParallelState | None = None, **init) -> GPTModel:
    cfg = Config(model=model_cfg)
    for key, value in init.items():
        setattr(cfg.init, key, value)
    return build_model(cfg, pstate or ParallelState(), VOCAB)


def test_padded_vocab_size():
    assert padded_vocab_size(50257, 128, 1) == 50304
    assert padded_vocab_size(50257, 128, 2) == 50432
    assert padded_vocab_size(50257, 128, 4) == 50688
    assert padded_vocab_size(512, 128, 4) == 512


@pytest.mark.parametrize("model_kw, tp, message", [
    (dict(num_attention_heads=6, d_model=48), 4,
     r"model.num_attention_heads \(6\) must be divisible by trainer.tensor_model_parallel_size \(4\)"),
    (dict(num_attention_heads=8, num_attention_groups=3), 1,
     r"model.num_attention_groups \(3\) must divide model.num_attention_heads \(8\)"),
    (dict(num_attention_heads=8, num_attention_groups=2), 4,
     r"model.num_attention_groups \(2\) must be divisible by trainer.tensor_model_parallel_size \(4\)"),
    (dict(d_model=30, num_attention_heads=4), 1, r"model.d_model \(30\) is not divisible by model.num_attention_heads"),
])
def test_bad_shapes_fail_with_a_clear_message(model_kw, tp, message):
    with pytest.raises(ValueError, match=message):
        _build(_gpt(**model_kw), ParallelState(tp_size=tp))


@pytest.mark.parametrize("model_cfg", [_gpt(), _llama()], ids=["gpt", "llama"])
def test_packed_segments_equal_separate_documents(model_cfg):
    model = _build(model_cfg).eval()
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(ids, -1, dims=1)
    cut = 7
    packed = model(ids, labels, position_ids=torch.cat([torch.arange(cut), torch.arange(12 - cut)]).unsqueeze(0),
                   segment_ids=torch.tensor([[0] * cut + [1] * (12 - cut)]))
    first = model(ids[:, :cut], labels[:, :cut])
    second = model(ids[:, cut:], labels[:, cut:])
    torch.testing.assert_close(packed, torch.cat([first, second], dim=1), rtol=0, atol=1e-5)
    # Without the segment mask the second document sees the first: the loss changes.
    unmasked = model(ids, labels, position_ids=torch.cat([torch.arange(cut), torch.arange(12 - cut)]).unsqueeze(0))
    assert (unmasked[:, cut:] - second).abs().max() > 1e-4


@pytest.mark.parametrize("model_cfg", [_gpt(), _llama()], ids=["tied-gpt", "untied-llama"])
def test_pipeline_stages_chain_to_the_full_model(model_cfg):
    full = _build(model_cfg)
    stages = [_build(model_cfg, ParallelState(pp_size=2, pp_rank=r)) for r in range(2)]
    assert [len(s.layers) for s in stages] == [1, 1] and stages[1].layer_offset == 1
    assert stages[0].embedding is not None and stages[0].output is None and stages[0].final_norm is None
    assert stages[1].embedding is None and stages[1].output is not None
    # Each stage holds exactly the weights the single-stage model has at those layers.
    for r, stage in enumerate(stages):
        for name, p in stage.named_parameters():
            source = name.replace("layers.0.", f"layers.{r}.")
            if name == "output.weight" and not model_cfg.untie_embed:
                assert getattr(p, "shared_embedding", False)
                source = "embedding.word_embeddings.weight"
            assert torch.equal(p, dict(full.named_parameters())[source]), name
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    hidden = stages[0](ids)
    assert hidden.shape == (2, 10, model_cfg.d_model)
    torch.testing.assert_close(stages[1](None, labels=ids, hidden_states=hidden), full(ids, labels=ids),
                               rtol=0, atol=1e-6)


def test_init_is_seeded_scaled_and_padded():
    cfg = _gpt(d_model=256, d_ffn=1024, num_layers=4, num_attention_heads=4)
    model = _build(cfg, init_std=0.02)
    params = dict(model.named_parameters())
    assert params["layers.0.attention.q_proj.weight"].std().item() == pytest.approx(0.02, rel=0.03)
    scaled = 0.02 / math.sqrt(2 * 4)
    assert params["layers.3.mlp.down_proj.weight"].std().item() == pytest.approx(scaled, rel=0.03)
    assert params["layers.1.attention.o_proj.weight"].std().item() == pytest.approx(scaled, rel=0.03)
    assert torch.equal(params["layers.0.attn_norm.weight"], torch.ones(256))
    assert not params["layers.0.mlp.up_proj.bias"].any()
    emb = params["embedding.word_embeddings.weight"]
    assert emb.shape[0] == 512 and not emb[VOCAB:].any() and emb[:VOCAB].std().item() == pytest.approx(0.02, rel=0.05)
    again, other = _build(cfg, init_std=0.02), _build(cfg, init_std=0.02, seed=7)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))
    assert not torch.equal(params["layers.0.attention.q_proj.weight"],
                           dict(other.named_parameters())["layers.0.attention.q_proj.weight"])
    xavier = dict(_build(cfg, xavier_init=True).named_parameters())["layers.0.mlp.up_proj.weight"]
    bound = math.sqrt(6 / (256 + 1024))
    assert xavier.abs().max().item() <= bound and xavier.abs().max().item() > 0.9 * bound


def test_autocast_bf16_with_fp32_parameters():
    model = _build(_llama())
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    reference = model(ids, labels=ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids)
    assert loss.dtype == torch.float32
    assert (loss.mean() - reference.mean()).abs().item() < 0.05
    loss.mean().backward()
    assert all(p.dtype == torch.float32 and p.grad is not None for p in model.parameters())


def test_dropout_replays_from_saved_rng_states_and_logs_the_attention_path(caplog, monkeypatch):
    from ironcore.model import attention

    monkeypatch.setattr(attention, "_LOGGED_PATHS", set())  # logged once per process
    model = _build(_gpt(dropout_embd=0.1, dropout_attn=0.2, dropout_mlp=0.1)).train()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    cpu_state, tracker_states = torch.get_rng_state(), get_rng_tracker().get_states()
    with caplog.at_level(logging.INFO, logger="ironcore.model.attention"):
        first = model(ids, labels=ids)
    second = model(ids, labels=ids)
    torch.set_rng_state(cpu_state)
    get_rng_tracker().set_states(tracker_states)
    replay = model(ids, labels=ids)
    assert not torch.equal(first, second)
    assert torch.equal(first, replay)
    assert "scaled_dot_product_attention" in caplog.text
    model.eval()
    assert torch.equal(model(ids, labels=ids), model(ids, labels=ids))


def test_sequence_longer_than_position_table_is_rejected():
    model = _build(_gpt(max_seq_len=8))
    with pytest.raises(ValueError, match=r"exceeds model.max_seq_len \(8\)"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_offset_is_the_first_tokens_position():
    """``positional_embedding.offset = 3``: the first token takes row 3 of the learned table, which
    has ``max_seq_len + 3`` rows (OPT's convention), in training forwards and in cached decoding."""
    from ironcore.checkpoint.hf import hf_architecture
    from ironcore.inference import InferenceCache

    shifted = _build(_gpt(max_seq_len=16, positional_embedding=PositionalEmbeddingConfig(offset=3))).eval()
    assert shifted.embedding.position_embeddings.weight.shape[0] == 19
    plain = _build(_gpt(max_seq_len=19)).eval()
    plain.load_state_dict(shifted.state_dict())  # the same weights, positions counted from 0
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16).expand(2, 16)
    with torch.no_grad():
        out = shifted(ids)
        assert (out - plain(ids, position_ids=positions + 3)).abs().max() < 1e-6
        assert (out - plain(ids)).abs().max() > 1e-3  # the key acts
        cache = InferenceCache(len(shifted.layers), 2, 16)
        prefill, rest = shifted(ids[:, :6], inference_cache=cache), shifted(ids[:, 6:], inference_cache=cache)
    assert (torch.cat([prefill, rest], dim=1) - out).abs().max() < 1e-5
    with pytest.raises(ValueError, match=r"absolute positions \(offset 0\)"):
        hf_architecture(_gpt(positional_embedding=PositionalEmbeddingConfig(offset=3)))


def test_a_rope_offset_changes_no_logit():
    """RoPE is relative: shifting every position rotates q and k alike (why validation warns that
    the key is inert under rope)."""
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    rope = _llama().positional_embedding
    model = _build(_llama()).eval()
    shifted = _build(_llama(positional_embedding=PositionalEmbeddingConfig(type=rope.type, offset=5))).eval()
    shifted.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (model(ids) - shifted(ids)).abs().max() < 1e-5
