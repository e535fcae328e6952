"""Every preset loads and validates with its published shape; example.yaml runs on any process count."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from ironcore.config import DataConfig, ModelConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
MODEL_PRESETS = ["gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl", "gpt3", "llama", "tiny", "tiny-llama"]
DATA_PRESETS = ["pretrain_example", "full_owt_pretrain", "sft_example", "dpo_example", "shakespeare"]
GPT2_VOCAB = 50257

# Published shapes: layers, d_model, heads, d_ffn, max_seq_len and the switches that make the family.
SHAPES = {
    "gpt2-small": dict(num_layers=12, d_model=768, num_attention_heads=12, d_ffn=3072, max_seq_len=1024),
    "gpt2-medium": dict(num_layers=24, d_model=1024, num_attention_heads=16, d_ffn=4096, max_seq_len=1024),
    "gpt2-large": dict(num_layers=36, d_model=1280, num_attention_heads=20, d_ffn=5120, max_seq_len=1024),
    "gpt2-xl": dict(num_layers=48, d_model=1600, num_attention_heads=25, d_ffn=6400, max_seq_len=1024),
    "gpt3": dict(num_layers=24, d_model=2048, num_attention_heads=16, d_ffn=8192, max_seq_len=2048),
    "llama": dict(num_layers=32, d_model=4096, num_attention_heads=32, num_attention_groups=8, d_ffn=11008,
                  max_seq_len=4096, ln_type="rmsnorm", activation_type="swiglu", no_bias=True, untie_embed=True),
    "tiny": dict(num_layers=2, d_model=128, num_attention_heads=4, d_ffn=512, max_seq_len=128, precision="float32",
                 dropout_embd=0.0, dropout_attn=0.0, dropout_mlp=0.0, activation_type="gelu_tanh",
                 ln_type="layernorm"),
    "tiny-llama": dict(num_layers=2, d_model=128, num_attention_heads=4, num_attention_groups=2, d_ffn=352,
                       max_seq_len=128, precision="float32", dropout_embd=0.0, dropout_attn=0.0, dropout_mlp=0.0,
                       ln_type="rmsnorm", ln_eps=1e-6, activation_type="swiglu", no_bias=True, untie_embed=True),
}
GPT2_FAMILY = dict(activation_type="gelu_tanh", ln_type="layernorm", ln_eps=1e-5, no_bias=False, untie_embed=False)
POSITIONS = {"llama": "rope", "tiny-llama": "rope"}


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)


def _load_model(tmp_path: Path, name: str) -> ModelConfig:
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(f"model: {name}\n")
    return load_config(cfg_file).model


def test_preset_folders_hold_exactly_the_documented_presets():
    assert sorted(p.stem for p in (ROOT / "configs" / "model").glob("*.yaml")) == sorted(MODEL_PRESETS)


@pytest.mark.parametrize("name", MODEL_PRESETS)
def test_model_preset_loads_with_published_shape(tmp_path, name):
    model = _load_model(tmp_path, name)
    expected = {**(GPT2_FAMILY if name.startswith(("gpt2", "gpt3")) else {}), **SHAPES[name]}
    assert {k: getattr(model, k) for k in expected} == expected
    assert model.positional_embedding.type == POSITIONS.get(name, "absolute")
    assert model.head_dim * model.num_attention_heads == model.d_model
    raw = yaml.safe_load((ROOT / "configs" / "model" / f"{name}.yaml").read_text())
    assert set(raw) <= {f.name for f in fields(ModelConfig)}, "a model preset sets model keys only"


@pytest.mark.parametrize("name", DATA_PRESETS)
def test_data_preset_loads(tmp_path, name):
    path = ROOT / "configs" / "data" / f"{name}.yaml"
    if not path.exists():
        pytest.skip(f"{path} not written yet")
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(f"data:\n  config_path: {path}\n")
    data = load_config(cfg_file).data
    assert data.task_type in ("pretrain", "sft", "dpo") and data.train_datasets
    assert all(Path(d["path"]).is_absolute() and d["weight"] > 0 for d in data.train_datasets)
    raw = yaml.safe_load(path.read_text())
    assert set(raw) <= {f.name for f in fields(DataConfig)}, "a data preset sets data keys only"


def count_params(m: ModelConfig, vocab: int = GPT2_VOCAB) -> int:
    """Parameters of the model a config describes: embeddings, blocks, final norm and (untied) head."""
    d, f, h, hd = m.d_model, m.d_ffn, m.num_attention_heads, m.head_dim
    groups = m.num_attention_groups or h
    bias = 0 if m.no_bias else 1
    norm = 2 * d if m.ln_type == "layernorm" else d
    attn = d * h * hd + 2 * d * groups * hd + h * hd * d + bias * (h * hd + 2 * groups * hd + d)
    if m.activation_type == "swiglu":
        mlp = 3 * d * f + bias * (2 * f + d)
    else:
        mlp = 2 * d * f + bias * (f + d)
    positions = m.max_seq_len * d if m.positional_embedding.type == "absolute" else 0
    head = vocab * d if m.untie_embed else 0
    return vocab * d + positions + m.num_layers * (attn + mlp + 2 * norm) + norm + head


@pytest.mark.parametrize("name,published", [
    ("gpt2-small", 124e6), ("gpt2-medium", 355e6), ("gpt2-large", 774e6), ("gpt2-xl", 1.56e9), ("gpt3", 1.3e9),
])
def test_parameter_counts_match_published(tmp_path, name, published):
    n = count_params(_load_model(tmp_path, name))
    assert abs(n - published) / published < 0.02, f"{name}: {n:,} parameters"


def test_parameter_count_formula_is_exact_for_gpt2_small(tmp_path):
    # The released GPT-2 small checkpoint holds 124,439,808 parameters (tied head).
    assert count_params(_load_model(tmp_path, "gpt2-small")) == 124_439_808


@pytest.mark.parametrize("world,accum", [(None, 2), ("2", 1)])
def test_example_runs_on_one_or_two_processes(monkeypatch, world, accum):
    if not (ROOT / "configs" / "data" / "shakespeare.yaml").exists():
        pytest.skip("configs/data/shakespeare.yaml not written yet")
    if world:
        monkeypatch.setenv("WORLD_SIZE", world)
    cfg = load_config(ROOT / "example.yaml")
    t = cfg.trainer
    assert (t.micro_batch_size, t.train_batch_size, t.gradient_accumulation_steps) == (4, 8, accum)
    assert cfg.model.d_model == 128 and cfg.model.precision == "float32"
    assert cfg.trainer.do_eval and cfg.operation.eval_interval > 0 and cfg.trainer.model_path == "outputs/example"
    assert cfg.data.task_type == "pretrain"
    assert [Path(d["path"]) for d in cfg.data.train_datasets] == [ROOT / "ironcore" / "assets" / "tinyshakespeare.txt"]
    assert Path(cfg.data.train_datasets[0]["path"]).is_file()


def test_example_commented_switch_to_gpt2_small_is_valid(monkeypatch):
    if not (ROOT / "configs" / "data" / "full_owt_pretrain.yaml").exists():
        pytest.skip("configs/data/full_owt_pretrain.yaml not written yet")
    monkeypatch.setenv("WORLD_SIZE", "8")
    cfg = load_config(ROOT / "example.yaml", [
        "model=gpt2-small", "data.config_path=configs/data/full_owt_pretrain.yaml",
        "trainer.micro_batch_size=8", "trainer.train_batch_size=512", "operation.train_steps=600000",
        "optim.max_lr=6.0e-4", "optim.min_lr=6.0e-5"])
    assert cfg.model.d_model == 768 and cfg.model.precision == "bfloat16"
    assert cfg.trainer.gradient_accumulation_steps == 512 // (8 * 8)
