"""GPTModel: embedding -> transformer blocks -> final norm -> vocab-parallel head and loss.

One class covers GPT-2/GPT-3 and LLaMA through ``model`` config switches (norm type, activation,
positional embedding, biases, tied embeddings, GQA). Layout of activations through the model
(``tp`` = tensor-parallel size, ``sp`` = ``parallel.sequence_parallel``)::

    input_ids [b, s] ──embedding──> [b, s, d] (replicated) ──sp: scatter──> [b, s/tp, d]
    blocks: attention/MLP gather the sequence (sp) or copy (no sp), work on this rank's heads /
            ffn columns, and reduce (or reduce-scatter) back to the residual stream's layout
    final norm ──head (vocab-parallel)──> logits [b, s, V/tp] ──vocab-parallel CE──> loss [b, s]
    (with labels and ``model.cross_entropy_chunk_size``: head and CE fused per chunk of tokens,
    never all logits at once: `ironcore.parallel.fused_cross_entropy`)

Pipeline stages: a model built for pipeline rank ``p`` of ``P`` holds layers
``[p·L/P, (p+1)·L/P)``, or the layers of the `PipelineStage` it is given (``parallel.pipeline_layer_split``,
virtual stages: `model_stages`); the first stage owns the embedding, the last the final norm and the head.
A stage that is not first takes the previous stage's output through ``forward(hidden_states=...)``
(layout of the residual stream above); a stage that is not last returns its hidden states.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ironcore.config.memory import padded_vocab_size  # torch-free, shared with the memory estimate
from ironcore.config.schema import Config, ModelConfig
from ironcore.model.attention import Attention, segment_causal_mask
from ironcore.model.init import init_parameters
from ironcore.model.mlp import MLP
from ironcore.model.norm import build_norm
from ironcore.model.rope import RotaryEmbedding
from ironcore.parallel.cross_entropy import vocab_parallel_cross_entropy
from ironcore.parallel.fused_cross_entropy import fused_vocab_parallel_cross_entropy
from ironcore.parallel.layers import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    allreduce_sequence_parallel_grads,
    mark_tensor_parallel,
    parallel_lm_logits,
)
from ironcore.parallel.mappings import scatter_to_sequence_parallel_region
from ironcore.parallel.pipeline import PipelineStage, pipeline_stages
from ironcore.parallel.random import get_rng_tracker, set_random_seed
from ironcore.parallel.state import ParallelState

logger = logging.getLogger(__name__)


def resolved_head_dim(cfg: ModelConfig) -> int:
    if cfg.head_dim is not None:
        return cfg.head_dim
    if cfg.d_model % cfg.num_attention_heads != 0:
        raise ValueError(f"model.d_model ({cfg.d_model}) is not divisible by model.num_attention_heads "
                         f"({cfg.num_attention_heads}); set model.head_dim explicitly")
    return cfg.d_model // cfg.num_attention_heads


def check_model_shapes(cfg: ModelConfig, tp_size: int) -> None:
    """Raise ValueError naming the keys when the model cannot be split over TP as asked (the
    pipeline split is checked by `ironcore.parallel.pipeline.pipeline_stages`)."""
    heads = cfg.num_attention_heads
    groups = cfg.num_attention_groups or heads
    errors = []
    if heads % tp_size:
        errors.append(f"model.num_attention_heads ({heads}) must be divisible by "
                      f"trainer.tensor_model_parallel_size ({tp_size})")
    if heads % groups:
        errors.append(f"model.num_attention_groups ({groups}) must divide model.num_attention_heads ({heads})")
    elif groups % tp_size:
        errors.append(f"model.num_attention_groups ({groups}) must be divisible by "
                      f"trainer.tensor_model_parallel_size ({tp_size})")
    if cfg.d_ffn % tp_size:
        errors.append(f"model.d_ffn ({cfg.d_ffn}) must be divisible by trainer.tensor_model_parallel_size ({tp_size})")
    if errors:
        raise ValueError("invalid model shape: " + "; ".join(errors))
    resolved_head_dim(cfg)


def _dropout(x: torch.Tensor, p: float, training: bool, sequence_split: bool) -> torch.Tensor:
    """Dropout on the residual stream: sequence-split activations differ per TP rank and draw from
    the TP-rank stream; replicated ones must match across TP ranks (default generator)."""
    if not training or p == 0.0:
        return x
    if sequence_split:
        with get_rng_tracker().fork():
            return F.dropout(x, p, training=True)
    return F.dropout(x, p, training=True)


class Embedding(nn.Module):
    """Token embedding (vocab-parallel) plus learned absolute positions when asked.
    Input ``[b, s]`` ids; output replicated ``[b, s, d]``."""

    def __init__(self, cfg: ModelConfig, padded_vocab: int, pstate: ParallelState):
        super().__init__()
        self.max_seq_len = cfg.max_seq_len
        self.word_embeddings = VocabParallelEmbedding(padded_vocab, cfg.d_model, pstate)
        absolute = cfg.positional_embedding.type == "absolute"
        # Positions run from `offset` (OPT's learned table starts at 2): the table covers them all.
        rows = cfg.max_seq_len + cfg.positional_embedding.offset
        self.position_embeddings = nn.Embedding(rows, cfg.d_model) if absolute else None

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        h = self.word_embeddings(input_ids)
        if self.position_embeddings is not None:
            if input_ids.shape[1] > self.max_seq_len:
                raise ValueError(f"sequence length {input_ids.shape[1]} exceeds model.max_seq_len ({self.max_seq_len})")
            h = h + self.position_embeddings(position_ids)
        return h


class TransformerBlock(nn.Module):
    """Attention and MLP sublayers with residuals, pre-LN (``x + f(norm(x))``) or post-LN
    (``norm(x + f(x))``). Input and output: the residual stream (``[b, s, d]``, or ``[b, s/tp, d]``
    under sequence parallelism). Call as ``block(hidden, rotary, attn_mask)`` (plus this layer's
    KV cache when generating)."""

    def __init__(self, cfg: ModelConfig, pstate: ParallelState, sequence_parallel: bool, use_flash_attn: bool):
        super().__init__()
        bias = not cfg.no_bias
        self.post_ln = cfg.post_ln
        self.sequence_parallel = sequence_parallel
        self.dropout_attn = cfg.dropout_attn
        self.dropout_mlp = cfg.dropout_mlp
        norm = dict(ln_type=cfg.ln_type, dim=cfg.d_model, eps=cfg.ln_eps, no_bias=cfg.no_bias,
                    sequence_parallel=sequence_parallel)
        self.attn_norm = build_norm(**norm)
        self.attention = Attention(cfg.d_model, cfg.num_attention_heads,
                                   cfg.num_attention_groups or cfg.num_attention_heads, resolved_head_dim(cfg),
                                   bias, cfg.dropout_attn, pstate, sequence_parallel, use_flash_attn)
        self.mlp_norm = build_norm(**norm)
        self.mlp = MLP(cfg.d_model, cfg.d_ffn, cfg.activation_type, bias, pstate, sequence_parallel)

    def forward(self, x: torch.Tensor, rotary: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                attn_mask: Optional[torch.Tensor] = None, kv_cache=None) -> torch.Tensor:
        def drop(y: torch.Tensor, p: float) -> torch.Tensor:
            return _dropout(y, p, self.training, self.sequence_parallel)

        if self.post_ln:
            x = self.attn_norm(x + drop(self.attention(x, rotary, attn_mask, kv_cache), self.dropout_attn))
            return self.mlp_norm(x + drop(self.mlp(x), self.dropout_mlp))
        x = x + drop(self.attention(self.attn_norm(x), rotary, attn_mask, kv_cache), self.dropout_attn)
        return x + drop(self.mlp(self.mlp_norm(x)), self.dropout_mlp)


class GPTModel(nn.Module):
    """A GPT/LLaMA decoder, or one pipeline stage of it (see the module docstring).

    Attributes: ``vocab_size`` (real), ``padded_vocab_size``, ``vocab_start`` (first id of this TP
    rank's shard), ``layer_offset`` (global index of ``layers[0]``), ``layers`` (``nn.ModuleList``).
    Parameters are created uninitialised; `build_model` initialises them. `stage` (default: this
    pipeline rank's share of an even split) says which layers and ends of the model to hold.
    """

    def __init__(self, cfg: ModelConfig, pstate: ParallelState, vocab_size: int, *, vocab_padding_unit: int = 128,
                 sequence_parallel: bool = False, use_flash_attn: bool = True, stage: Optional[PipelineStage] = None):
        super().__init__()
        check_model_shapes(cfg, pstate.tp_size)
        if stage is None:
            (stage,) = pipeline_stages(cfg.num_layers, pstate.pp_size, pstate.pp_rank)
        self.cfg = cfg
        self.tp_group, self.tp_size = pstate.tp_group, pstate.tp_size
        self.sequence_parallel = sequence_parallel and pstate.tp_size > 1
        self.is_first_stage, self.is_last_stage = stage.is_first, stage.is_last
        self.vocab_size = vocab_size
        self.padded_vocab_size = padded_vocab_size(vocab_size, vocab_padding_unit, pstate.tp_size)
        self.vocab_start = pstate.tp_rank * (self.padded_vocab_size // pstate.tp_size)
        layers_per_stage = stage.num_layers
        self.layer_offset = stage.layer_start

        self.embedding = Embedding(cfg, self.padded_vocab_size, pstate) if self.is_first_stage else None
        self.rotary = None
        if cfg.positional_embedding.type == "rope":
            self.rotary = RotaryEmbedding(resolved_head_dim(cfg), cfg.positional_embedding)
        self.layers = nn.ModuleList(
            TransformerBlock(cfg, pstate, self.sequence_parallel, use_flash_attn) for _ in range(layers_per_stage))
        self.final_norm = None
        self.output = None
        if self.is_last_stage:
            if not cfg.post_ln:  # post-LN blocks already end with a norm
                self.final_norm = build_norm(cfg.ln_type, cfg.d_model, cfg.ln_eps, cfg.no_bias, self.sequence_parallel)
            if cfg.untie_embed or not self.is_first_stage:
                # With tied embeddings on a separate last stage this is a copy of the embedding
                # (same initial values); keeping the copies' grads in sync is the pipeline's job.
                self.output = ColumnParallelLinear(cfg.d_model, self.padded_vocab_size, pstate, bias=False,
                                                   sequence_parallel=self.sequence_parallel)
                mark_tensor_parallel(self.output.weight, 0, vocab_parallel=True)
                if not cfg.untie_embed:
                    self.output.weight.shared_embedding = True

    def forward(self, input_ids: Optional[torch.Tensor], labels: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, segment_ids: Optional[torch.Tensor] = None,
                hidden_states: Optional[torch.Tensor] = None, inference_cache=None) -> torch.Tensor:
        """Run this stage.

        Args:
            input_ids: ``[b, s]`` token ids (needed by the first stage; others may pass None).
            labels: ``[b, s]`` target ids; on the last stage the result is then the per-token loss.
            position_ids: ``[b, s]`` positions for RoPE / absolute embeddings (default ``arange(s)``),
                counted from ``model.positional_embedding.offset`` (added here).
            segment_ids: ``[b, s]``; tokens attend only to earlier tokens of the same segment.
            hidden_states: the previous pipeline stage's output (stages that are not first).
            inference_cache: an ``ironcore.inference.kv_cache.InferenceCache`` for incremental
                decoding: `input_ids` are the tokens after the ``inference_cache.length`` cached
                ones, whose keys/values are reused and extended; position ids default to
                ``length + arange(s)``; attention follows ``inference_cache.attention_mask``
                (causal over the cache, padding masked). Not with `segment_ids` or sequence
                parallelism.

        Returns:
            last stage: fp32 per-token loss ``[b, s]`` with `labels`, else logits
            ``[b, s, padded_vocab/tp]`` of this TP rank's vocabulary shard; other stages: hidden
            states (``[b, s, d]``, or ``[b, s/tp, d]`` under sequence parallelism).
        """
        batch, seq = self._batch_shape(input_ids, hidden_states)
        if inference_cache is not None:
            if segment_ids is not None or self.sequence_parallel:
                raise ValueError("inference_cache works without segment_ids and without sequence parallelism")
            if position_ids is None:
                device = input_ids.device if input_ids is not None else hidden_states.device
                position_ids = inference_cache.default_position_ids(batch, seq, device)
        if position_ids is None:
            device = input_ids.device if input_ids is not None else hidden_states.device
            position_ids = torch.arange(seq, device=device).unsqueeze(0).expand(batch, seq)
        position_ids = position_ids + self.cfg.positional_embedding.offset  # the first token's index
        if self.is_first_stage:
            if input_ids is None:
                raise ValueError("the first pipeline stage needs input_ids")
            hidden_states = self.embedding(input_ids, position_ids)
            if self.sequence_parallel:
                hidden_states = scatter_to_sequence_parallel_region(hidden_states, self.tp_group)
            hidden_states = _dropout(hidden_states, self.cfg.dropout_embd, self.training, self.sequence_parallel)
        elif hidden_states is None:
            raise ValueError("a pipeline stage that is not first needs hidden_states from the previous stage")

        rotary = self.rotary(position_ids) if self.rotary is not None else None
        attn_mask = segment_causal_mask(segment_ids) if segment_ids is not None else None
        if inference_cache is not None:
            attn_mask = inference_cache.attention_mask(seq)
        for i, layer in enumerate(self.layers):
            kv_cache = inference_cache.layers[i] if inference_cache is not None else None
            hidden_states = layer(hidden_states, rotary, attn_mask, kv_cache)
        if inference_cache is not None:
            inference_cache.advance(seq)
        if not self.is_last_stage:
            return hidden_states

        if self.final_norm is not None:
            hidden_states = self.final_norm(hidden_states)
        head = self.output.weight if self.output is not None else self.embedding.word_embeddings.weight
        if labels is not None and self.cfg.cross_entropy_chunk_size:
            return fused_vocab_parallel_cross_entropy(hidden_states, head, labels, self.vocab_size, self.vocab_start,
                                                      self.tp_group, self.sequence_parallel,
                                                      self.cfg.cross_entropy_chunk_size)
        logits = parallel_lm_logits(hidden_states, head, self.tp_group, self.sequence_parallel)
        if labels is None:
            return logits
        return vocab_parallel_cross_entropy(logits, labels, self.vocab_size, self.vocab_start, self.tp_group)

    def _batch_shape(self, input_ids, hidden_states) -> tuple[int, int]:
        if input_ids is not None:
            return input_ids.shape[0], input_ids.shape[1]
        if hidden_states is None:
            raise ValueError("GPTModel.forward needs input_ids or hidden_states")
        tp = self.tp_size if self.sequence_parallel else 1  # a sequence-parallel stage input is [b, s/tp, d]
        return hidden_states.shape[0], hidden_states.shape[1] * tp

    def shared_embedding_weight(self) -> Optional[nn.Parameter]:
        """This stage's copy of a tied embedding split over the pipeline (the first stage's word
        embedding, the last stage's head), whose gradient the pipeline sums over the embedding
        group; None when the embedding is untied or this stage holds both ends."""
        if self.cfg.untie_embed or self.is_first_stage == self.is_last_stage:
            return None
        return self.embedding.word_embeddings.weight if self.is_first_stage else self.output.weight

    def sync_sequence_parallel_grads(self) -> None:
        """Under sequence parallelism, all-reduce over TP the grads of replicated parameters that saw
        only this rank's sequence chunk (norms, row-parallel biases). Call after backward, before
        clipping and the optimizer step. A no-op without sequence parallelism."""
        if self.sequence_parallel:
            allreduce_sequence_parallel_grads(self.parameters(), self.tp_group)


BATCH_INPUTS = ("input_ids", "labels", "position_ids", "segment_ids")


def batch_inputs(batch: dict, device: torch.device) -> dict[str, Optional[torch.Tensor]]:
    """`GPTModel.forward`'s keyword arguments from a micro-batch of ``ironcore.data`` (keys it does
    not hold, such as ``segment_ids`` of unpacked data, are None), on ``device``."""
    return {key: batch[key].to(device) if key in batch else None for key in BATCH_INPUTS}


def model_stages(cfg: Config, pstate: ParallelState) -> list[PipelineStage]:
    """The pipeline stages (model chunks) this rank holds, in order, as ``parallel`` lays them out:
    ``virtual_pipeline_stages`` chunks of ``pipeline_layer_split`` layers (an even split when unset)."""
    return pipeline_stages(cfg.model.num_layers, pstate.pp_size, pstate.pp_rank,
                           cfg.parallel.virtual_pipeline_stages, cfg.parallel.pipeline_layer_split)


def build_model(cfg: Config, pstate: ParallelState, vocab_size: int, stage: Optional[PipelineStage] = None) -> GPTModel:
    """Build this rank's part of the model (its pipeline stage, its TP shards), initialised from
    ``cfg.init`` identically at any TP/PP layout, on ``pstate.device`` with fp32 parameters.

    `vocab_size` is the real vocabulary; the model pads it (``trainer.vocab_padding_unit × TP``).
    `stage` picks the pipeline stage, one of `model_stages` (default: this rank's only one; a rank
    holding several chunks builds each with its stage). Also seeds torch and the TP-rank dropout RNG
    stream from ``init.seed``.
    """
    if stage is None:
        stages = model_stages(cfg, pstate)
        if len(stages) > 1:
            raise ValueError(f"this rank holds {len(stages)} model chunks (parallel.virtual_pipeline_stages): "
                             f"build each with build_model(..., stage) for stage in model_stages(cfg, pstate)")
        stage = stages[0]
    model = GPTModel(cfg.model, pstate, vocab_size, vocab_padding_unit=cfg.trainer.vocab_padding_unit,
                     sequence_parallel=cfg.parallel.sequence_parallel, use_flash_attn=cfg.trainer.use_flash_attn,
                     stage=stage)
    aliases = {"output.weight": "embedding.word_embeddings.weight"} if not cfg.model.untie_embed else None
    init_parameters(model, cfg.init, num_layers=cfg.model.num_layers, vocab_size=vocab_size,
                    tp_rank=pstate.tp_rank, tp_size=pstate.tp_size, layer_offset=model.layer_offset,
                    seed_aliases=aliases)
    set_random_seed(cfg.init.seed, pstate.tp_rank, pstate.pp_rank, pstate.device)
    if pstate.rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        logger.info("model: %d layers on this stage, %.2fM parameters on this rank (TP %d, PP %d, SP %s), "
                    "vocab %d padded to %d", len(model.layers), n_params / 1e6, pstate.tp_size, pstate.pp_size,
                    model.sequence_parallel, vocab_size, model.padded_vocab_size)
    return model.to(pstate.device)

