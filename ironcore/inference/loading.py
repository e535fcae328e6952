"""Build a model for generation from an IronCore checkpoint or a Hugging Face folder.

A checkpoint folder holds the resolved config it was trained with (``config.yaml``), so nothing
else is needed to rebuild the model. Generation uses TP = the number of processes and PP = 1;
the checkpoint may have any layout:

* distributed (``operation.save_dist_ckpt``): ``torch.distributed.checkpoint`` reads the pieces
  this TP rank needs (`ironcore.checkpoint.distributed.load`);
* single-file with the same TP and PP = 1: this rank's file is loaded as it is;
* single-file with another layout: all shards are merged into the whole model and this rank's
  shard is cut from it (`ironcore.checkpoint.hf.merge_shards` / `shard_state_dict`), so each
  process briefly holds the whole model in CPU memory.

Files are checked against the checkpoint's manifest (size and sha256) before they are read.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
import yaml

from ironcore.checkpoint import distributed
from ironcore.checkpoint import io as ckpt_io
from ironcore.checkpoint.errors import load_file
from ironcore.checkpoint.hf import hf_to_ironcore, merge_shards, model_config_from_hf, shard_state_dict
from ironcore.config.schema import GROUPS, Config
from ironcore.model.gpt import GPTModel
from ironcore.parallel.state import ParallelState

logger = logging.getLogger(__name__)

_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def checkpoint_folder(path: str | Path) -> Path:
    """The ``iter_*`` folder for `path`: a ``trainer.model_path`` (its ``latest`` checkpoint) or
    one ``iter_*`` folder itself. CheckpointError when it is neither."""
    path = Path(path)
    if (path / ckpt_io.MANIFEST).is_file():
        return path
    iteration = ckpt_io.read_latest(path) if path.is_dir() else None
    if iteration is None:
        raise ckpt_io.CheckpointError(
            f"--checkpoint {path}: not a checkpoint; expected a trainer.model_path holding a "
            f"'{ckpt_io.LATEST}' file or an iter_NNNNNNN folder holding '{ckpt_io.MANIFEST}'")
    return ckpt_io.checkpoint_dir(path, iteration)


def _dataclass_from_dict(cls: type, values: dict[str, Any]) -> Any:
    """A config dataclass from a saved dict; nested groups recurse, unknown keys are ignored (a
    checkpoint written by another IronCore version) with a debug note."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        f = known.get(key)
        if f is None:
            logger.debug("ignoring unknown config key %s.%s in the checkpoint", cls.__name__, key)
            continue
        nested = f.default_factory if dataclasses.is_dataclass(f.default_factory) else None
        kwargs[key] = _dataclass_from_dict(nested, value) if nested and isinstance(value, dict) else value
    return cls(**kwargs)


def config_from_checkpoint(folder: Path) -> Config:
    """The Config saved in a checkpoint folder (``config.yaml``, written by the trainer)."""
    path = folder / ckpt_io.CONFIG_FILE
    if not path.is_file():
        raise ckpt_io.CheckpointError(f"checkpoint {folder} has no {ckpt_io.CONFIG_FILE}: cannot rebuild the model")
    saved = yaml.safe_load(path.read_text()) or {}
    return Config(**{group: _dataclass_from_dict(cls, saved.get(group) or {}) for group, cls in GROUPS.items()})


def _verify(folder: Path, manifest: dict, names: list[str]) -> None:
    problem = ckpt_io.verify_files(folder, manifest, names)
    if problem:
        raise ckpt_io.CheckpointError(problem)


def _build(cfg: Config, pstate: ParallelState) -> GPTModel:
    """This rank's PP=1 model, built by the training seam (the weights are loaded next)."""
    from ironcore.training.build import build_run

    return build_run(cfg, pstate, mode="inference").model


def _generation_state(pstate: ParallelState) -> None:
    if pstate.pp_size != 1:
        raise ValueError(f"generation runs with pipeline_model_parallel_size=1 (got {pstate.pp_size}); "
                         "launch as many processes as the tensor-parallel size you want")


def _load_weights(model: GPTModel, cfg: Config, pstate: ParallelState, folder: Path, manifest: dict,
                  layout: dict) -> None:
    """Fill `model` (this TP rank, PP=1) from a checkpoint folder of any layout (module docstring)."""
    padding = cfg.trainer.vocab_padding_unit
    if layout["format"] == "dist":
        _verify(folder, manifest, sorted(n for n in manifest["files"] if n.startswith(ckpt_io.DIST_DIR + "/")))
        distributed.load(folder / ckpt_io.DIST_DIR, pstate, model, None)
        return
    if (layout["tp_size"], layout["pp_size"]) == (pstate.tp_size, 1):
        name = ckpt_io.model_file(pstate.tp_rank, 0)
        _verify(folder, manifest, [name])
        model.load_state_dict(load_file(folder / name))
        return
    tp_size, pp_size = layout["tp_size"], layout["pp_size"]
    names = {(pp, tp): ckpt_io.model_file(tp, pp) for pp in range(pp_size) for tp in range(tp_size)}
    _verify(folder, manifest, sorted(names.values()))
    shards = {key: load_file(folder / name) for key, name in names.items()}
    full = merge_shards(shards, cfg.model, model.vocab_size, tp_size=tp_size, pp_size=pp_size,
                        vocab_padding_unit=padding)
    model.load_state_dict(shard_state_dict(full, cfg.model, model.vocab_size, tp_size=pstate.tp_size,
                                           tp_rank=pstate.tp_rank, vocab_padding_unit=padding))


def load_checkpoint_model(checkpoint: str | Path, pstate: ParallelState) -> tuple[GPTModel, Config]:
    """The model of a checkpoint (``model_path`` or ``iter_*`` folder), split for this TP rank,
    in eval mode, and the Config it was trained with (its TP/PP keys set to this layout)."""
    _generation_state(pstate)
    folder = checkpoint_folder(checkpoint)
    manifest = ckpt_io.read_manifest(folder)
    _verify(folder, manifest, [ckpt_io.COMMON_FILE, ckpt_io.CONFIG_FILE])
    cfg = config_from_checkpoint(folder)
    common = load_file(folder / ckpt_io.COMMON_FILE)
    vocab_size = common["model_shape"]["data.vocab_size"]
    if vocab_size is None:
        raise ckpt_io.CheckpointError(f"checkpoint {folder} does not record data.vocab_size")
    layout = common["layout"]
    cfg.data.vocab_size = vocab_size
    cfg.trainer.tensor_model_parallel_size, cfg.trainer.pipeline_model_parallel_size = pstate.tp_size, 1
    cfg.parallel.sequence_parallel = False
    model = _build(cfg, pstate)
    _load_weights(model, cfg, pstate, folder, manifest, layout)
    logger.info("loaded %s (saved with TP %d, PP %d, %s format) into TP %d", folder, layout["tp_size"],
                layout["pp_size"], layout["format"], pstate.tp_size)
    return model.eval(), cfg


def load_hf_model(hf_dir: str | Path, pstate: ParallelState) -> tuple[GPTModel, Config, Any]:
    """A Hugging Face GPT-2 / LLaMA folder (``save_pretrained`` output) converted with
    `ironcore.checkpoint.hf`, split for this TP rank, in eval mode. Returns (model, Config, the HF
    config); the Config's tokenizer is the folder's own when it has one, else tiktoken GPT-2."""
    import transformers

    _generation_state(pstate)
    hf_config = transformers.AutoConfig.from_pretrained(str(hf_dir))
    model_cfg, vocab_size = model_config_from_hf(hf_config)
    if any((Path(hf_dir) / name).is_file() for name in _HF_TOKENIZER_FILES):
        model_cfg.tokenizer_type, model_cfg.vocab_name_or_path = "hf", str(hf_dir)
    cfg = Config(model=model_cfg)
    cfg.data.vocab_size = vocab_size
    cfg.trainer.tensor_model_parallel_size = pstate.tp_size
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir))
    hf_state = {k: v.float() for k, v in hf_model.state_dict().items()}
    del hf_model
    model = _build(cfg, pstate)
    model.load_state_dict(hf_to_ironcore(hf_state, model_cfg, vocab_size, tp_size=pstate.tp_size,
                                         tp_rank=pstate.tp_rank, vocab_padding_unit=cfg.trainer.vocab_padding_unit))
    return model.eval(), cfg, hf_config


@dataclasses.dataclass
class GenerationModel:
    """Everything generation needs: the model (this TP rank's shard), its config, the tokenizer
    and the id that ends a document (generation stops there)."""

    model: GPTModel
    cfg: Config
    tokenizer: Any
    eod_id: int


def load_for_generation(pstate: ParallelState, checkpoint: str | Path | None = None,
                        hf_dir: str | Path | None = None) -> GenerationModel:
    """Load exactly one of an IronCore `checkpoint` or a Hugging Face folder `hf_dir`, with the
    tokenizer of its config (`ironcore.data.tokenizer.build_tokenizer`)."""
    from ironcore.data.tokenizer import build_tokenizer

    if (checkpoint is None) == (hf_dir is None):
        raise ValueError("give exactly one of an IronCore checkpoint or a Hugging Face folder")
    eod_id = None
    if checkpoint is not None:
        model, cfg = load_checkpoint_model(checkpoint, pstate)
    else:
        model, cfg, hf_config = load_hf_model(hf_dir, pstate)
        eod_id = getattr(hf_config, "eos_token_id", None)
        if isinstance(eod_id, list):  # some configs list several end tokens; the first ends documents
            eod_id = eod_id[0] if eod_id else None
    tokenizer = build_tokenizer(cfg.model)
    if tokenizer.vocab_size > model.vocab_size:
        raise ValueError(f"the tokenizer ({cfg.model.tokenizer_type}: {cfg.model.vocab_name_or_path}) has "
                         f"{tokenizer.vocab_size} ids but the model only {model.vocab_size}: the model's folder "
                         "needs its own tokenizer files")
    return GenerationModel(model, cfg, tokenizer, tokenizer.eod_id if eod_id is None else int(eod_id))
