"""Hugging Face interop: numerics match GPT2LMHeadModel / LlamaForCausalLM, conversions round-trip.

Reference models are built offline from a config with random weights (perturbed so that norms and
biases are not their trivial initial values).
"""

from __future__ import annotations


import pytest
import torch

from ironcore.checkpoint.hf import (
    hf_architecture,
    check_matches_hf,
    hf_config_from_model_config,
    hf_to_ironcore,
    ironcore_to_hf,
    merge_shards,
    model_config_from_hf,
    shard_state_dict,
)
from ironcore.config.schema import ModelConfig
from ironcore.model.gpt import GPTModel
from ironcore.parallel.state import ParallelState
from tests.hf_helpers import REPO, random_hf_model
from tests.hf_helpers import preset as model_preset

transformers = pytest.importorskip("transformers")
VOCAB = 1000


def _ironcore(cfg: ModelConfig, hf_model) -> GPTModel:
    model = GPTModel(cfg, ParallelState(), VOCAB).eval()
    model.load_state_dict(hf_to_ironcore(hf_model.state_dict(), cfg, VOCAB))
    return model


@pytest.mark.parametrize("preset, arch", [("tiny", "gpt2"), ("tiny-llama", "llama")])
def test_logits_and_loss_match_hugging_face(preset, arch):
    cfg = model_preset(preset)
    assert hf_architecture(cfg) == arch
    hf = random_hf_model(cfg, VOCAB)
    model = _ironcore(cfg, hf)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids, labels=ids)
        logits = model(ids)
        per_token = model(ids[:, :-1], labels=ids[:, 1:])
    assert logits.shape == (2, 24, model.padded_vocab_size)
    assert (logits[..., :VOCAB] - want.logits).abs().max() < 1e-4
    assert per_token.dtype == torch.float32
    assert abs(per_token.mean().item() - want.loss.item()) < 1e-5


def test_llama_rope_uses_position_ids_like_hugging_face():
    cfg = model_preset("tiny-llama")
    hf = random_hf_model(cfg, VOCAB, seed=2)
    model = _ironcore(cfg, hf)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    positions = torch.stack([torch.arange(16) + 7, torch.arange(16) * 2])  # per row, not per batch index
    with torch.no_grad():
        want = hf(ids, position_ids=positions).logits
        got = model(ids, position_ids=positions)[..., :VOCAB]
    assert (got - want).abs().max() < 1e-4


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_round_trip_export_gives_identical_hf_weights(preset):
    cfg = model_preset(preset)
    hf = random_hf_model(cfg, VOCAB)
    back = ironcore_to_hf(_ironcore(cfg, hf).state_dict(), cfg, VOCAB)
    original = hf.state_dict()
    assert set(back) == set(original)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name


def test_hf_config_round_trip():
    for preset in ("tiny", "tiny-llama"):
        cfg = model_preset(preset)
        again, vocab = model_config_from_hf(hf_config_from_model_config(cfg, VOCAB))
        assert vocab == VOCAB
        for key in ("d_model", "d_ffn", "num_layers", "num_attention_heads", "ln_type", "ln_eps",
                    "activation_type", "no_bias", "untie_embed", "max_seq_len"):
            assert getattr(again, key) == getattr(cfg, key), (preset, key)
        assert again.positional_embedding.type == cfg.positional_embedding.type


def test_shard_and_merge_round_trip_over_tp_and_pp():
    cfg = model_preset("tiny-llama")
    full = {k: v for k, v in _ironcore(cfg, random_hf_model(cfg, VOCAB)).state_dict().items()}
    shards = {(pp, tp): shard_state_dict(full, cfg, VOCAB, tp_size=2, tp_rank=tp, pp_size=2, pp_rank=pp)
              for pp in range(2) for tp in range(2)}
    # Stage 1 holds global layer 1 as its layers.0; q_proj rows are split, o_proj columns.
    q = full["layers.1.attention.q_proj.weight"]
    assert torch.equal(shards[(1, 1)]["layers.0.attention.q_proj.weight"], q.chunk(2, dim=0)[1])
    o = full["layers.0.attention.o_proj.weight"]
    assert torch.equal(shards[(0, 1)]["layers.0.attention.o_proj.weight"], o.chunk(2, dim=1)[1])
    assert "embedding.word_embeddings.weight" not in shards[(1, 0)] and "output.weight" not in shards[(0, 0)]
    merged = merge_shards(shards, cfg, VOCAB, tp_size=2, pp_size=2)
    assert set(merged) == set(full)
    for name, tensor in full.items():
        want = tensor[:VOCAB] if name in ("embedding.word_embeddings.weight", "output.weight") else tensor
        assert torch.equal(merged[name], want), name


def test_unsupported_configs_fail_clearly():
    with pytest.raises(ValueError, match="no Hugging Face equivalent"):
        hf_architecture(ModelConfig(ln_type="rmsnorm", activation_type="gelu"))
    with pytest.raises(ValueError, match="model_type 'bert'"):
        model_config_from_hf(transformers.BertConfig())
    # HF options that change the numerics and that IronCore does not implement are refused.
    for bad, match in [(transformers.GPT2Config(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse"),
                       (transformers.GPT2Config(scale_attn_weights=False), "scale_attn_weights"),
                       (transformers.LlamaConfig(rope_parameters={"rope_type": "default", "rope_theta": 5e5 + 0.5}),
                        "rope_theta 500000.5"),
                       (transformers.LlamaConfig(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4,
                                                                  "factor": 2.0}), "rope_type 'yarn'")]:
        with pytest.raises(ValueError, match=match):
            model_config_from_hf(bad)
    # A model config whose norm epsilon differs from the checkpoint's is refused, naming the key.
    llama = model_preset("tiny-llama")
    hf_config = hf_config_from_model_config(llama, VOCAB)
    llama.ln_eps = 1e-5
    with pytest.raises(ValueError, match="model.ln_eps: config has 1e-05, the Hugging Face model has 1e-06"):
        check_matches_hf(llama, hf_config)


def test_convert_tool_hf_to_ironcore_tp2_and_back(tmp_path):
    from tools.convert_checkpoint import main

    cfg = model_preset("tiny-llama")
    hf = random_hf_model(cfg, VOCAB, seed=4)
    hf.save_pretrained(tmp_path / "hf")
    preset = str(REPO / "configs" / "model" / "tiny-llama.yaml")
    assert main(["--from", "hf", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "ckpt"),
                 "--model", preset, "--tp", "2"]) == 0
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "0"
    assert main(["--from", "ironcore", "--input", str(tmp_path / "ckpt"), "--output", str(tmp_path / "back")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").state_dict()
    for name, tensor in hf.state_dict().items():
        assert torch.equal(back[name], tensor), name
    # A model config that does not match the HF weights is refused, naming the key.
    assert main(["--from", "hf", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "bad"),
                 "--model", str(REPO / "configs" / "model" / "tiny.yaml")]) == 1


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def _llama3_hf_folder(path) -> None:
    """A random tiny LlamaConfig with Llama 3.1's RoPE scaling, built by transformers itself (not from
    an IronCore config). original_max_position_embeddings 32 with head_dim 32 puts frequencies in all
    three bands (kept, smoothed, divided by factor) at positions up to 100."""
    hf_config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, rope_parameters=dict(LLAMA3_ROPE),
        tie_word_embeddings=False)
    torch.manual_seed(6)
    model = transformers.AutoModelForCausalLM.from_config(hf_config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)


def _checkpoint_logits(ckpt, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the TP=1 IronCore checkpoint in `ckpt`, built from its own config.yaml."""
    import yaml

    from ironcore.checkpoint import io as ckpt_io
    from ironcore.checkpoint.errors import load_file
    from ironcore.checkpoint.hf import _model_config_from_dict

    folder = ckpt_io.checkpoint_dir(ckpt, ckpt_io.read_latest(ckpt))
    cfg = _model_config_from_dict(yaml.safe_load((folder / ckpt_io.CONFIG_FILE).read_text())["model"])
    model = GPTModel(cfg, ParallelState(), VOCAB).eval()
    model.load_state_dict(load_file(folder / ckpt_io.model_file(0, 0)))
    with torch.no_grad():
        return model(ids)[..., :VOCAB]


def test_llama3_rope_scaling_matches_hugging_face_both_directions(tmp_path):
    """HF → IronCore (convert tool, a model config with the llama3 keys) gives HF's logits to 1e-5;
    IronCore → HF writes the same rope_parameters and the exported model gives the same logits."""
    import yaml

    from tools.convert_checkpoint import main

    _llama3_hf_folder(tmp_path / "hf")
    model_yaml = yaml.safe_load((REPO / "configs" / "model" / "tiny-llama.yaml").read_text())
    model_yaml["positional_embedding"].update(scaling_type="llama3", scaling_factor=8.0, low_freq_factor=1.0,
                                              high_freq_factor=4.0, original_max_seq_len=32)
    (tmp_path / "llama3.yaml").write_text(yaml.safe_dump(model_yaml))
    assert main(["--from", "hf", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "ckpt"),
                 "--model", str(tmp_path / "llama3.yaml")]) == 0
    ids = torch.randint(0, VOCAB, (2, 100), generator=torch.Generator().manual_seed(7))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        want = hf(ids).logits
        unscaled = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "hf", rope_parameters={"rope_type": "default", "rope_theta": 10000.0}).eval()(ids).logits
    assert (want - unscaled).abs().max() > 1e-2  # the scaling changes these logits: the comparison means something
    assert (_checkpoint_logits(tmp_path / "ckpt", ids) - want).abs().max() < 1e-5

    assert main(["--from", "ironcore", "--input", str(tmp_path / "ckpt"), "--output", str(tmp_path / "back")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert {k: back.config.rope_parameters[k] for k in LLAMA3_ROPE} == LLAMA3_ROPE
    with torch.no_grad():
        assert (back(ids).logits - want).abs().max() < 1e-5


def test_llama3_keys_must_match_the_hugging_face_checkpoint():
    """A model config without (or with other) llama3 keys than the checkpoint's is refused, naming them."""
    hf_config = transformers.LlamaConfig(rope_parameters=dict(LLAMA3_ROPE), max_position_embeddings=128)
    cfg = model_preset("tiny-llama")
    with pytest.raises(ValueError, match="scaling_type: config has 'linear', the Hugging Face model has 'llama3'"):
        check_matches_hf(cfg, hf_config)
    again = model_config_from_hf(hf_config)[0].positional_embedding
    assert (again.scaling_type, again.scaling_factor, again.original_max_seq_len) == ("llama3", 8.0, 32)
    assert hf_config_from_model_config(model_config_from_hf(hf_config)[0], VOCAB).rope_parameters["rope_type"] == \
        "llama3"
