"""Weight initialisation that does not depend on the parallel layout (``init`` config group).

Every parameter's full (TP=1) weight is drawn on the CPU from its own generator, seeded by
``init.seed`` and the parameter's global name (layer numbers counted over the whole model, not the
pipeline stage), and this rank keeps its slice (Megatron's CPU initialisation). So each TP rank ends
with exactly the slice that TP=1 draws from the same seed, and pipeline stages draw what a
single-stage model would.

Rules: linear weights ~ N(0, init_std), or Xavier-uniform with ``xavier_init``; the output
projections of each block (attention ``o_proj``, MLP ``down_proj``, the row-parallel layers) are
scaled by ``1 / sqrt(2 × num_layers)`` (GPT-2 / Megatron scaled init); embeddings ~ N(0, init_std)
with the padded vocabulary rows zero; biases 0; norm weights 1.
"""

from __future__ import annotations

import math
import re
import zlib

import torch
import torch.nn as nn

from ironcore.config.schema import InitConfig
from ironcore.model.norm import LayerNorm, RMSNorm
from ironcore.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding


def global_parameter_name(name: str, layer_offset: int) -> str:
    """``layers.{i}.…`` of a pipeline stage -> ``layers.{i + layer_offset}.…`` of the whole model."""
    return re.sub(r"^layers\.(\d+)\.", lambda m: f"layers.{int(m.group(1)) + layer_offset}.", name)


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63))


def _full_shape(param: nn.Parameter, tp_size: int) -> list[int]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp_size
    return shape


def _local_slice(full: torch.Tensor, param: nn.Parameter, tp_rank: int, tp_size: int) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False):
        return full
    return full.chunk(tp_size, dim=param.partition_dim)[tp_rank]


def _draw_linear(shape: list[int], cfg: InitConfig, scale: float, gen: torch.Generator) -> torch.Tensor:
    full = torch.empty(shape)
    if cfg.xavier_init:
        return nn.init.xavier_uniform_(full, gain=scale, generator=gen)
    return nn.init.normal_(full, 0.0, cfg.init_std * scale, generator=gen)


def _draw_embedding(shape: list[int], std: float, real_rows: int, gen: torch.Generator) -> torch.Tensor:
    full = torch.zeros(shape)
    full[:real_rows].normal_(0.0, std, generator=gen)
    return full


def init_parameters(model: nn.Module, cfg: InitConfig, *, num_layers: int, vocab_size: int,
                    tp_rank: int, tp_size: int, layer_offset: int = 0,
                    seed_aliases: dict[str, str] | None = None) -> None:
    """Fill every parameter of `model` (a GPTModel or one of its stages) in place.

    `seed_aliases` maps a parameter name to the name whose draw it must copy (a tied output head
    living on another pipeline stage than the embedding it mirrors).
    """
    output_scale = 1.0 / math.sqrt(2.0 * num_layers)
    aliases = seed_aliases or {}
    with torch.no_grad():
        for module_name, module in model.named_modules():
            for param_name, param in module.named_parameters(recurse=False):
                name = f"{module_name}.{param_name}" if module_name else param_name
                gname = global_parameter_name(aliases.get(name, name), layer_offset)
                gen = _generator(cfg.seed, gname)
                shape = _full_shape(param, tp_size)
                if isinstance(module, (LayerNorm, RMSNorm)):
                    full = torch.ones(shape) if param_name == "weight" else torch.zeros(shape)
                elif param_name == "bias":
                    full = torch.zeros(shape)
                elif getattr(param, "vocab_parallel", False) or isinstance(module, VocabParallelEmbedding):
                    full = _draw_embedding(shape, cfg.init_std, vocab_size, gen)
                elif isinstance(module, nn.Embedding):
                    full = torch.empty(shape).normal_(0.0, cfg.init_std, generator=gen)
                elif isinstance(module, RowParallelLinear):
                    full = _draw_linear(shape, cfg, output_scale, gen)
                elif isinstance(module, ColumnParallelLinear):
                    full = _draw_linear(shape, cfg, 1.0, gen)
                else:
                    raise TypeError(f"no initialisation rule for parameter {name} of {type(module).__name__}")
                param.copy_(_local_slice(full, param, tp_rank, tp_size))
