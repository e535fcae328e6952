"""Shared by the Hugging Face parity tests: presets as ModelConfig and random HF models."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from ironcore.checkpoint.hf import hf_config_from_model_config
from ironcore.config.schema import ModelConfig, PositionalEmbeddingConfig

REPO = Path(__file__).resolve().parents[1]


def preset(name: str) -> ModelConfig:
    """``configs/model/NAME.yaml`` as a ModelConfig (head_dim left to the model to derive)."""
    values = yaml.safe_load((REPO / "configs" / "model" / f"{name}.yaml").read_text())
    values["positional_embedding"] = PositionalEmbeddingConfig(**values.get("positional_embedding", {}))
    return ModelConfig(**values)


def random_hf_model(cfg: ModelConfig, vocab: int, seed: int = 0, attn_implementation: str | None = "eager"):
    """A seeded, randomly initialised GPT2LMHeadModel / LlamaForCausalLM of ``cfg``'s shape. Weights
    get extra noise beyond HF's small default init, so the top logits are clearly apart (greedy
    comparisons then cannot flip on rounding)."""
    import transformers

    hf_cfg = hf_config_from_model_config(cfg, vocab)
    if attn_implementation:
        hf_cfg._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model
