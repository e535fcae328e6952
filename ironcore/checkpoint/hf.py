"""Hugging Face interop: GPT2LMHeadModel / LlamaForCausalLM state dicts <-> IronCore's.

IronCore names (TP=1, whole model)::

    embedding.word_embeddings.weight          [V_padded, d]
    embedding.position_embeddings.weight      [max_seq_len, d]          (absolute positions)
    layers.{i}.attn_norm.{weight,bias}
    layers.{i}.attention.{q,k,v,o}_proj.{weight,bias}   weights [out, in]
    layers.{i}.mlp_norm.{weight,bias}
    layers.{i}.mlp.{gate,up,down}_proj.{weight,bias}    (gate only for SwiGLU)
    final_norm.{weight,bias}
    output.weight                             [V_padded, d]             (untied head)

GPT-2 stores linear weights as ``Conv1D`` ``[in, out]`` (transposed here) and q/k/v fused in
``c_attn`` (split here). LLaMA needs no q/k permutation: HF LLaMA already uses the rotate-half RoPE
pairing that IronCore uses.

`shard_state_dict` / `merge_shards` convert between a whole-model (TP=1) state dict and the state
dict of one (pipeline stage, TP rank), reading split dims from the model's own parameter attributes,
so they work for any IronCore state dict, not only converted ones.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from ironcore.config.schema import ModelConfig, PositionalEmbeddingConfig
from ironcore.model.gpt import GPTModel, resolved_head_dim
from ironcore.model.init import global_parameter_name
from ironcore.parallel.state import ParallelState

StateDict = dict[str, torch.Tensor]

_GPT2_ACTIVATIONS = {"gelu_new", "gelu_pytorch_tanh", "gelu_fast"}
GPT2_EOD_ID = 50256  # `<|endoftext|>` of the GPT-2 BPE


def hf_architecture(cfg: ModelConfig) -> str:
    """``"gpt2"`` or ``"llama"``: the HF model class that has exactly this architecture."""
    pe = cfg.positional_embedding.type
    if (cfg.ln_type, cfg.activation_type, pe, cfg.no_bias, cfg.untie_embed, cfg.post_ln) == (
            "layernorm", "gelu_tanh", "absolute", False, False, False) and cfg.num_attention_groups in (
            None, cfg.num_attention_heads) and cfg.head_dim in (None, cfg.d_model // cfg.num_attention_heads) \
            and cfg.positional_embedding.offset == 0:
        return "gpt2"
    if (cfg.ln_type, cfg.activation_type, pe, cfg.post_ln) == ("rmsnorm", "swiglu", "rope", False) \
            and cfg.positional_embedding.offset == 0:
        return "llama"
    raise ValueError(
        "this model config has no Hugging Face equivalent: GPT-2 needs layernorm + gelu_tanh + absolute "
        "positions (offset 0) + biases + tied embeddings + pre-LN; LLaMA needs rmsnorm + swiglu + rope (offset 0) + pre-LN")


# --------------------------------------------------------------------------- configs

def model_config_from_hf(hf_config: Any) -> tuple[ModelConfig, int]:
    """(ModelConfig, vocab_size) equivalent to a transformers GPT2Config or LlamaConfig."""
    kind = hf_config.model_type
    if kind == "gpt2":
        if hf_config.activation_function not in _GPT2_ACTIVATIONS:
            raise ValueError(f"GPT-2 activation {hf_config.activation_function!r} is not supported (gelu_new only)")
        _refuse(hf_config, {"scale_attn_by_inverse_layer_idx": False, "scale_attn_weights": True,
                            "add_cross_attention": False})
        cfg = ModelConfig(
            d_model=hf_config.n_embd, d_ffn=hf_config.n_inner or 4 * hf_config.n_embd,
            num_layers=hf_config.n_layer, num_attention_heads=hf_config.n_head,
            max_seq_len=hf_config.n_positions, precision="float32", ln_type="layernorm",
            ln_eps=hf_config.layer_norm_epsilon, activation_type="gelu_tanh",
            dropout_embd=hf_config.embd_pdrop, dropout_attn=hf_config.attn_pdrop,
            dropout_mlp=hf_config.resid_pdrop, no_bias=False, untie_embed=False,
            positional_embedding=PositionalEmbeddingConfig(type="absolute"))
        return cfg, hf_config.vocab_size
    if kind == "llama":
        if hf_config.attention_bias != hf_config.mlp_bias:
            raise ValueError("LLaMA configs with attention_bias != mlp_bias are not supported (one model.no_bias)")
        if hf_config.hidden_act != "silu":
            raise ValueError(f"LLaMA hidden_act {hf_config.hidden_act!r} is not supported (silu only)")
        cfg = ModelConfig(
            d_model=hf_config.hidden_size, d_ffn=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers, num_attention_heads=hf_config.num_attention_heads,
            num_attention_groups=hf_config.num_key_value_heads,
            head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads,
            max_seq_len=hf_config.max_position_embeddings, precision="float32", ln_type="rmsnorm",
            ln_eps=hf_config.rms_norm_eps, activation_type="swiglu", dropout_embd=0.0,
            dropout_attn=hf_config.attention_dropout, dropout_mlp=0.0, no_bias=not hf_config.attention_bias,
            untie_embed=not hf_config.tie_word_embeddings,
            positional_embedding=_rope_from_hf(hf_config))
        return cfg, hf_config.vocab_size
    raise ValueError(f"Hugging Face model_type {kind!r} is not supported (gpt2, llama)")


def _rope_from_hf(hf_config: Any) -> PositionalEmbeddingConfig:
    """``model.positional_embedding`` for a LlamaConfig's ``rope_parameters`` (``rope_scaling`` in
    transformers 4.x): ``default``, ``linear`` and ``llama3``; any other RoPE variant is refused."""
    rope = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise ValueError(f"LLaMA rope_type {rope_type!r} is not supported (default, linear, llama3)")
    if float(theta) != int(theta):
        raise ValueError(f"LLaMA rope_theta {theta} is not supported: model.positional_embedding.base is an "
                         "integer")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("LLaMA partial_rotary_factor != 1 is not supported (RoPE rotates the whole head)")
    pe = PositionalEmbeddingConfig(type="rope", base=int(theta))
    if rope_type == "linear":
        pe.scaling_factor = float(rope["factor"])
    if rope_type == "llama3":
        if rope.get("attention_factor", 1.0) != 1.0:
            raise ValueError("LLaMA llama3 RoPE with attention_factor != 1 is not supported")
        pe.scaling_type, pe.scaling_factor = "llama3", float(rope["factor"])
        pe.low_freq_factor, pe.high_freq_factor = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
        pe.original_max_seq_len = int(rope["original_max_position_embeddings"])
    return pe


def _rope_to_hf(pe: PositionalEmbeddingConfig) -> dict[str, Any]:
    """``rope_parameters`` of a LlamaConfig for ``model.positional_embedding`` (inverse of _rope_from_hf)."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(pe.base)}
    if pe.scaling_type == "llama3":
        return {**rope, "rope_type": "llama3", "factor": pe.scaling_factor, "low_freq_factor": pe.low_freq_factor,
                "high_freq_factor": pe.high_freq_factor, "original_max_position_embeddings": pe.original_max_seq_len}
    if pe.scaling_factor != 1.0:
        return {**rope, "rope_type": "linear", "factor": pe.scaling_factor}
    return rope


def _refuse(hf_config: Any, supported: dict[str, Any]) -> None:
    """ValueError naming the HF config fields (that change the numerics) set to what IronCore does
    not implement."""
    wrong = [f"{k}={getattr(hf_config, k)!r} (supported: {v!r})" for k, v in supported.items()
             if getattr(hf_config, k, v) != v]
    if wrong:
        raise ValueError(f"{hf_config.model_type} config fields not supported by IronCore: {', '.join(wrong)}")


def hf_config_from_model_config(cfg: ModelConfig, vocab_size: int, bos_token_id: Optional[int] = None,
                                eos_token_id: Optional[int] = None):
    """A transformers GPT2Config or LlamaConfig for this model (needs `transformers`), with the
    tokenizer's special ids (default: GPT-2 BPE's ``<|endoftext|>``, 50256, when the vocabulary has it)."""
    import transformers

    default = GPT2_EOD_ID if vocab_size > GPT2_EOD_ID else None
    special = {"bos_token_id": default if bos_token_id is None else bos_token_id,
               "eos_token_id": default if eos_token_id is None else eos_token_id}
    head_dim = cfg.head_dim or cfg.d_model // cfg.num_attention_heads
    if hf_architecture(cfg) == "gpt2":
        return transformers.GPT2Config(
            vocab_size=vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model, n_layer=cfg.num_layers,
            n_head=cfg.num_attention_heads, n_inner=cfg.d_ffn, activation_function="gelu_new",
            layer_norm_epsilon=cfg.ln_eps, embd_pdrop=cfg.dropout_embd, attn_pdrop=cfg.dropout_attn,
            resid_pdrop=cfg.dropout_mlp, **special)
    return transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ffn,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_groups or cfg.num_attention_heads, head_dim=head_dim,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.ln_eps,
        rope_parameters=_rope_to_hf(cfg.positional_embedding),
        attention_bias=not cfg.no_bias, mlp_bias=not cfg.no_bias, attention_dropout=cfg.dropout_attn,
        tie_word_embeddings=not cfg.untie_embed, hidden_act="silu", **special)


# --------------------------------------------------------------------------- names

def _gpt2_pairs(num_layers: int) -> list[tuple[str, str]]:
    """(ironcore, hf) names mapped one-to-one (Conv1D weights are transposed by the caller)."""
    pairs = [("embedding.word_embeddings.weight", "transformer.wte.weight"),
             ("embedding.position_embeddings.weight", "transformer.wpe.weight"),
             ("final_norm.weight", "transformer.ln_f.weight"), ("final_norm.bias", "transformer.ln_f.bias")]
    for i in range(num_layers):
        ours, theirs = f"layers.{i}.", f"transformer.h.{i}."
        for kind in ("weight", "bias"):
            pairs += [(f"{ours}attn_norm.{kind}", f"{theirs}ln_1.{kind}"),
                      (f"{ours}attention.o_proj.{kind}", f"{theirs}attn.c_proj.{kind}"),
                      (f"{ours}mlp_norm.{kind}", f"{theirs}ln_2.{kind}"),
                      (f"{ours}mlp.up_proj.{kind}", f"{theirs}mlp.c_fc.{kind}"),
                      (f"{ours}mlp.down_proj.{kind}", f"{theirs}mlp.c_proj.{kind}")]
    return pairs


def _llama_pairs(cfg: ModelConfig) -> list[tuple[str, str]]:
    pairs = [("embedding.word_embeddings.weight", "model.embed_tokens.weight"), ("final_norm.weight", "model.norm.weight")]
    if cfg.untie_embed:
        pairs.append(("output.weight", "lm_head.weight"))
    kinds = ("weight",) if cfg.no_bias else ("weight", "bias")
    for i in range(cfg.num_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        pairs += [(f"{ours}attn_norm.weight", f"{theirs}input_layernorm.weight"),
                  (f"{ours}mlp_norm.weight", f"{theirs}post_attention_layernorm.weight")]
        for kind in kinds:
            pairs += [(f"{ours}attention.{p}.{kind}", f"{theirs}self_attn.{p}.{kind}") for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
            pairs += [(f"{ours}mlp.{p}.{kind}", f"{theirs}mlp.{p}.{kind}") for p in ("gate_proj", "up_proj", "down_proj")]
    return pairs


def _is_conv1d_weight(hf_name: str) -> bool:
    return hf_name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))


def _get(sd: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in sd:
        raise KeyError(f"Hugging Face state dict has no {name!r}: does the model config match the checkpoint?")
    return sd[name]


def hf_to_full(hf_state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig) -> StateDict:
    """Whole-model (TP=1) IronCore state dict, vocabulary not padded."""
    sd: StateDict = {}
    if hf_architecture(cfg) == "gpt2":
        for ours, theirs in _gpt2_pairs(cfg.num_layers):
            w = _get(hf_state_dict, theirs)
            sd[ours] = w.t().contiguous() if _is_conv1d_weight(theirs) else w.clone()
        for i in range(cfg.num_layers):
            prefix = f"transformer.h.{i}.attn.c_attn."
            q, k, v = _get(hf_state_dict, prefix + "weight").t().chunk(3, dim=0)
            qb, kb, vb = _get(hf_state_dict, prefix + "bias").chunk(3, dim=0)
            for name, w, b in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
                sd[f"layers.{i}.attention.{name}.weight"] = w.contiguous()
                sd[f"layers.{i}.attention.{name}.bias"] = b.clone()
        return sd
    for ours, theirs in _llama_pairs(cfg):
        sd[ours] = _get(hf_state_dict, theirs).clone()
    return sd


def full_to_hf(full_state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig, vocab_size: int) -> StateDict:
    """HF state dict (GPT2LMHeadModel / LlamaForCausalLM names) from a whole-model IronCore one;
    vocabulary padding is dropped. Tied heads appear as ``lm_head.weight`` too, as HF lists them."""
    full = dict(full_state_dict)
    for name in ("embedding.word_embeddings.weight", "output.weight"):
        if name in full:
            full[name] = full[name][:vocab_size]
    hf: StateDict = {}
    if hf_architecture(cfg) == "gpt2":
        for ours, theirs in _gpt2_pairs(cfg.num_layers):
            w = _get(full, ours)
            hf[theirs] = w.t().contiguous() if _is_conv1d_weight(theirs) else w.clone()
        for i in range(cfg.num_layers):
            att = f"layers.{i}.attention."
            hf[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat(
                [full[att + f"{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")], dim=0).t().contiguous()
            hf[f"transformer.h.{i}.attn.c_attn.bias"] = torch.cat([full[att + f"{p}.bias"] for p in ("q_proj", "k_proj", "v_proj")])
        hf["lm_head.weight"] = hf["transformer.wte.weight"]
        return hf
    for ours, theirs in _llama_pairs(cfg):
        hf[theirs] = _get(full, ours).clone()
    if not cfg.untie_embed:
        hf["lm_head.weight"] = hf["model.embed_tokens.weight"]
    return hf


# --------------------------------------------------------------------------- sharding

def _skeleton(cfg: ModelConfig, vocab_size: int, tp_size: int, tp_rank: int, pp_size: int, pp_rank: int,
              vocab_padding_unit: int) -> GPTModel:
    """The model of one (stage, TP rank) on the meta device: names, shapes and split attributes."""
    pstate = ParallelState(tp_size=tp_size, tp_rank=tp_rank, pp_size=pp_size, pp_rank=pp_rank)
    with torch.device("meta"):
        return GPTModel(cfg, pstate, vocab_size, vocab_padding_unit=vocab_padding_unit)


def shard_state_dict(full_state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig, vocab_size: int, *,
                     tp_size: int = 1, tp_rank: int = 0, pp_size: int = 1, pp_rank: int = 0,
                     vocab_padding_unit: int = 128) -> StateDict:
    """This (pipeline stage, TP rank)'s state dict from a whole-model one (any vocab padding):
    each split parameter is the rank's contiguous chunk along its ``partition_dim``."""
    model = _skeleton(cfg, vocab_size, tp_size, tp_rank, pp_size, pp_rank, vocab_padding_unit)
    return local_state_dict(full_state_dict, model, tp_size=tp_size, tp_rank=tp_rank)


def local_state_dict(full_state_dict: Mapping[str, torch.Tensor], model: GPTModel, *, tp_size: int,
                     tp_rank: int) -> StateDict:
    """The state dict of `model` (one pipeline chunk of one TP rank: a live model or a meta
    skeleton) cut from a whole-model one: each split parameter is the rank's contiguous chunk along
    its ``partition_dim``, vocabulary rows padded to the model's."""
    out: StateDict = {}
    for name, meta in model.named_parameters():
        source = global_parameter_name(name, model.layer_offset)
        if name == "output.weight" and source not in full_state_dict and not model.cfg.untie_embed:
            source = "embedding.word_embeddings.weight"  # tied head held by a separate last stage
        if source not in full_state_dict:
            raise KeyError(f"state dict has no {source!r} (needed by the chunk at layer offset "
                           f"{model.layer_offset}, TP rank {tp_rank})")
        full = full_state_dict[source]
        if getattr(meta, "vocab_parallel", False):
            padded = torch.zeros(model.padded_vocab_size, full.shape[1], dtype=full.dtype)
            padded[:model.vocab_size] = full[:model.vocab_size]
            full = padded
        if getattr(meta, "tensor_model_parallel", False):
            full = full.chunk(tp_size, dim=meta.partition_dim)[tp_rank]
        if tuple(full.shape) != tuple(meta.shape):
            raise ValueError(f"{source}: shape {tuple(full.shape)} does not fit the model's {tuple(meta.shape)} "
                             f"(TP rank {tp_rank}/{tp_size}): does the model config match the weights?")
        out[name] = full.clone().contiguous()
    return out


def merge_shards(shards: Mapping[tuple[int, int], Mapping[str, torch.Tensor]], cfg: ModelConfig, vocab_size: int, *,
                 tp_size: int, pp_size: int = 1, vocab_padding_unit: int = 128) -> StateDict:
    """Whole-model state dict (vocabulary unpadded) from ``{(pp_rank, tp_rank): state dict}``."""
    full: StateDict = {}
    for pp_rank in range(pp_size):
        model = _skeleton(cfg, vocab_size, tp_size, 0, pp_size, pp_rank, vocab_padding_unit)
        for name, meta in model.named_parameters():
            if name == "output.weight" and not cfg.untie_embed:
                continue  # the tied head's copy on a last stage mirrors the embedding
            parts = [shards[(pp_rank, r)][name] for r in range(tp_size)]
            tensor = torch.cat(parts, dim=meta.partition_dim) if getattr(meta, "tensor_model_parallel", False) else parts[0]
            if getattr(meta, "vocab_parallel", False):
                tensor = tensor[:vocab_size]
            full[global_parameter_name(name, model.layer_offset)] = tensor.clone()
    return full


def hf_to_ironcore(hf_state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig, vocab_size: int, *,
                   tp_size: int = 1, tp_rank: int = 0, pp_size: int = 1, pp_rank: int = 0,
                   vocab_padding_unit: int = 128) -> StateDict:
    """HF GPT2LMHeadModel / LlamaForCausalLM state dict -> the state dict of IronCore's
    (pipeline stage, TP rank) for `cfg` (see `model_config_from_hf`), ready for `load_state_dict`."""
    return shard_state_dict(hf_to_full(hf_state_dict, cfg), cfg, vocab_size, tp_size=tp_size, tp_rank=tp_rank,
                            pp_size=pp_size, pp_rank=pp_rank, vocab_padding_unit=vocab_padding_unit)


def ironcore_to_hf(full_state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig, vocab_size: int) -> StateDict:
    """Whole-model (TP=1, or `merge_shards` output) IronCore state dict -> HF state dict."""
    return full_to_hf(full_state_dict, cfg, vocab_size)


# --------------------------------------------------------------------------------------------- folders

_SHAPE_FIELDS = ("d_model", "d_ffn", "num_layers", "num_attention_heads", "ln_type", "ln_eps", "activation_type",
                 "no_bias", "untie_embed", "post_ln")


def _shape_of(cfg: ModelConfig) -> dict[str, Any]:
    shape = {f"model.{k}": getattr(cfg, k) for k in _SHAPE_FIELDS}
    shape["model.num_attention_groups"] = cfg.num_attention_groups or cfg.num_attention_heads
    shape["model.head_dim"] = resolved_head_dim(cfg)
    pe = cfg.positional_embedding
    shape["model.positional_embedding.type"] = pe.type
    if pe.type == "absolute":
        shape["model.max_seq_len"] = cfg.max_seq_len
    if pe.type == "rope":
        shape["model.positional_embedding.base"] = pe.base
        shape["model.positional_embedding.scaling_factor"] = pe.scaling_factor
        shape["model.positional_embedding.scaling_type"] = pe.scaling_type
        if pe.scaling_type == "llama3":
            for key in ("low_freq_factor", "high_freq_factor", "original_max_seq_len"):
                shape[f"model.positional_embedding.{key}"] = getattr(pe, key)
    return shape


def check_matches_hf(cfg: ModelConfig, hf_config: Any) -> None:
    """ValueError listing every model key whose value differs from the HF config's architecture."""
    ours, theirs = _shape_of(cfg), _shape_of(model_config_from_hf(hf_config)[0])
    diffs = [f"{k}: config has {ours.get(k)!r}, the Hugging Face model has {v!r}" for k, v in theirs.items()
             if ours.get(k) != v]
    if diffs:
        raise ValueError("the model config does not match the Hugging Face checkpoint:\n  " + "\n  ".join(diffs))


def convert_hf_folder(hf_dir: str, cfg: Any, output: str, tp_size: int = 1, pp_size: int = 1):
    """Write a Hugging Face folder (``save_pretrained`` output) as an IronCore checkpoint at
    iteration 0 in `output` (a ``trainer.model_path``), split for `tp_size` × `pp_size`.

    `cfg` is the full Config the weights will be trained with; its model section must match the HF
    architecture (checked). Returns the checkpoint folder.
    """
    import copy

    import transformers
    import yaml

    from ironcore.checkpoint import io as ckpt_io
    from ironcore.config import to_dict

    hf_config = transformers.AutoConfig.from_pretrained(hf_dir)
    check_matches_hf(cfg.model, hf_config)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    hf_sd = {k: v.float() for k, v in hf_model.state_dict().items()}
    cfg = copy.deepcopy(cfg)
    cfg.data.vocab_size = hf_config.vocab_size
    cfg.trainer.tensor_model_parallel_size, cfg.trainer.pipeline_model_parallel_size = tp_size, pp_size
    cfg.parallel.world_size = tp_size * pp_size
    full = hf_to_full(hf_sd, cfg.model)
    contents: dict[str, Any] = {}
    for pp_rank in range(pp_size):
        for tp_rank in range(tp_size):
            contents[ckpt_io.model_file(tp_rank, pp_rank)] = shard_state_dict(
                full, cfg.model, hf_config.vocab_size, tp_size=tp_size, tp_rank=tp_rank, pp_size=pp_size,
                pp_rank=pp_rank, vocab_padding_unit=cfg.trainer.vocab_padding_unit)
    contents[ckpt_io.COMMON_FILE] = {
        "iteration": 0, "scheduler": None, "scaler": None, "data_state": {},
        "model_shape": ckpt_io.model_shape(cfg),
        "layout": {"tp_size": tp_size, "pp_size": pp_size, "dp_size": 1, "world_size": tp_size * pp_size,
                   "format": "single"},
    }
    contents[ckpt_io.CONFIG_FILE] = yaml.safe_dump(to_dict(cfg), sort_keys=False).encode()
    return ckpt_io.write_checkpoint(output, 0, contents)


def _model_config_from_dict(model: dict) -> ModelConfig:
    values = dict(model)
    values["positional_embedding"] = PositionalEmbeddingConfig(**values.get("positional_embedding", {}))
    return ModelConfig(**values)


def export_hf_folder(checkpoint: str, output: str) -> None:
    """Write an IronCore checkpoint (a ``model_path`` with ``latest``, or one ``iter_*`` folder; any
    TP/PP layout, single-file or distributed) as a Hugging Face folder via ``save_pretrained``."""
    import tempfile
    from pathlib import Path

    import transformers
    import yaml

    from ironcore.checkpoint import distributed
    from ironcore.checkpoint import io as ckpt_io
    from ironcore.checkpoint.errors import load_file

    folder = Path(checkpoint)
    if (folder / ckpt_io.LATEST).is_file():
        folder = ckpt_io.checkpoint_dir(folder, ckpt_io.read_latest(folder))
    manifest = ckpt_io.read_manifest(folder)
    problem = ckpt_io.verify_files(folder, manifest, sorted(manifest["files"]))
    if problem:
        raise ckpt_io.CheckpointError(problem)
    common = load_file(folder / ckpt_io.COMMON_FILE)
    if common["layout"]["format"] == "dist":
        with tempfile.TemporaryDirectory() as tmp:
            return export_hf_folder(str(distributed.to_single_file(folder, tmp)), output)

    config = yaml.safe_load((folder / ckpt_io.CONFIG_FILE).read_text())
    cfg = _model_config_from_dict(config["model"])
    vocab_size = common["model_shape"]["data.vocab_size"]
    tp_size, pp_size = common["layout"]["tp_size"], common["layout"]["pp_size"]
    shards = {(pp, tp): load_file(folder / ckpt_io.model_file(tp, pp))
              for pp in range(pp_size) for tp in range(tp_size)}
    full = merge_shards(shards, cfg, vocab_size, tp_size=tp_size, pp_size=pp_size,
                        vocab_padding_unit=config["trainer"]["vocab_padding_unit"])
    bos_id, eos_id = save_hf_tokenizer(cfg, output)
    hf_config = hf_config_from_model_config(cfg, vocab_size, bos_id, eos_id)
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_config)
    hf_model.load_state_dict(ironcore_to_hf(full, cfg, vocab_size), strict=True)
    hf_model.generation_config = transformers.GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id,
                                                               pad_token_id=eos_id)
    hf_model.save_pretrained(output)


def save_hf_tokenizer(cfg: ModelConfig, output: str) -> tuple[int, int]:
    """Write the model's tokenizer into `output` as files ``AutoTokenizer.from_pretrained`` loads,
    encoding exactly as IronCore's; returns its (bos, eos) ids. The GPT-2 BPE is built from the
    shipped tiktoken ranks by transformers' ``TikTokenConverter`` (offline); a Hugging Face
    tokenizer folder is saved again as it is."""
    import transformers

    from ironcore.data import tokenizer as tokenizers

    ours = tokenizers.make_tokenizer(cfg.tokenizer_type, cfg.vocab_name_or_path)
    if isinstance(ours, tokenizers.GPT2Tokenizer):
        from transformers.convert_slow_tokenizer import TikTokenConverter

        eod = tokenizers.GPT2_EOD
        backend = TikTokenConverter(vocab_file=str(tokenizers.GPT2_RANKS), pattern=tokenizers.GPT2_PATTERN,
                                    extra_special_tokens=[eod]).converted()
        tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=eod, eos_token=eod,
                                                   unk_token=eod)
    else:
        tok = transformers.AutoTokenizer.from_pretrained(cfg.vocab_name_or_path, local_files_only=True)
    if tok.eos_token_id != ours.eod_id:
        raise ValueError(f"the exported tokenizer's EOS id {tok.eos_token_id} is not IronCore's end-of-document "
                         f"id {ours.eod_id}")
    tok.save_pretrained(output)
    return (ours.eod_id if tok.bos_token_id is None else tok.bos_token_id), ours.eod_id
