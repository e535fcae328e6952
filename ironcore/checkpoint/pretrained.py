"""``trainer.pretrained_checkpoint``: start a run from another model's weights (fine-tuning,
continued pretraining), as Megatron's ``--pretrained-checkpoint --finetune`` and torchtitan's
``initial_load_path`` do.

Only the model weights are read; the run starts at step 0 with a fresh optimizer, LR schedule and
data position. It applies only while ``trainer.model_path`` holds no checkpoint of its own: once
the fine-tune has saved one, resuming from it wins (a crash resumes the fine-tune, not the base).

The source is an IronCore checkpoint (a ``model_path`` or one ``iter_*`` folder) or a Hugging Face
folder (``save_pretrained`` output), in any TP/PP layout:

* distributed checkpoints are read by ``torch.distributed.checkpoint`` (each rank its pieces);
* single-file checkpoints and Hugging Face folders are read whole on every rank (CPU memory) and
  each rank keeps its shards (`ironcore.checkpoint.hf.local_state_dict`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ironcore.checkpoint import distributed
from ironcore.checkpoint import io as ckpt_io
from ironcore.checkpoint.hf import check_matches_hf, hf_to_full, local_state_dict, merge_shards
from ironcore.config import ConfigError

logger = logging.getLogger(__name__)

_KEY = "trainer.pretrained_checkpoint"


def load_pretrained(cfg: Any, pstate: Any, chunks: list[nn.Module]) -> None:
    """Fill this rank's model `chunks` from ``trainer.pretrained_checkpoint`` when it is set and
    ``trainer.model_path`` has no checkpoint to resume from; otherwise do nothing. Collective.

    ConfigError when the source is not a checkpoint or was saved for another model shape;
    CheckpointError when its files are damaged."""
    source = cfg.trainer.pretrained_checkpoint
    if not source or ckpt_io._resume_iteration(cfg) is not None:
        return
    load_weights(cfg, pstate, chunks, source, _KEY)
    logger.info("initialised the model from %s=%s (step 0, fresh optimizer, schedule and data position)",
                _KEY, source)


def load_weights(cfg: Any, pstate: Any, chunks: list[nn.Module], source: str, key: str) -> None:
    """Fill this rank's model `chunks` with the weights of the checkpoint `source` (an IronCore
    checkpoint or a Hugging Face folder, any layout), whatever ``model_path`` holds; `key` is the
    config key that named it, for the errors. Collective."""
    path = Path(source)
    if (path / "config.json").is_file() and not (path / ckpt_io.MANIFEST).is_file():
        full = _hf_state_dict(cfg, path, key)
    else:
        folder = _ironcore_folder(path, key)
        full = _ironcore_state_dict(cfg, pstate, chunks, folder, key)
    if full is not None:
        for chunk in chunks:
            chunk.load_state_dict(local_state_dict(full, chunk, tp_size=pstate.tp_size, tp_rank=pstate.tp_rank))


def _ironcore_folder(path: Path, key: str) -> Path:
    if (path / ckpt_io.MANIFEST).is_file():
        return path
    iteration = ckpt_io.read_latest(path) if path.is_dir() else None
    if iteration is None:
        raise ConfigError([f"{key} = {str(path)!r}: not a checkpoint; allowed: an IronCore model_path (holding "
                           f"'{ckpt_io.LATEST}'), one iter_NNNNNNN folder, or a Hugging Face folder (config.json)"])
    return ckpt_io.checkpoint_dir(path, iteration)


def _vocab_size(chunks: list[nn.Module]) -> int:
    return chunks[0].vocab_size


def _hf_state_dict(cfg: Any, path: Path, key: str) -> dict[str, torch.Tensor]:
    import transformers

    hf_config = transformers.AutoConfig.from_pretrained(str(path))
    try:
        check_matches_hf(cfg.model, hf_config)
    except ValueError as err:
        raise ConfigError([f"{key} = {str(path)!r}: {err}"]) from None
    if cfg.data.vocab_size not in (None, hf_config.vocab_size):
        raise ConfigError([f"{key} = {str(path)!r}: the Hugging Face model has vocab_size {hf_config.vocab_size}, "
                           f"data.vocab_size is {cfg.data.vocab_size}"])
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(path))
    state = {k: v.float() for k, v in hf_model.state_dict().items()}
    del hf_model
    return hf_to_full(state, cfg.model)


def _ironcore_state_dict(cfg: Any, pstate: Any, chunks: list[nn.Module], folder: Path, key: str):
    """The whole-model state dict of a single-file checkpoint, or None after loading a distributed
    one straight into `chunks`."""
    manifest = ckpt_io.read_manifest(folder)
    share = sorted(manifest["files"])[pstate.rank::pstate.world_size]
    ckpt_io._raise_if_any(ckpt_io._all_gather(ckpt_io.verify_files(folder, manifest, share)))
    ckpt_io._require_listed(folder, manifest, ckpt_io.COMMON_FILE, ckpt_io.CONFIG_FILE)
    common = ckpt_io._read_common(folder / ckpt_io.COMMON_FILE)
    saved, current = common["model_shape"], ckpt_io.model_shape(cfg, _vocab_size(chunks))
    differing = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if differing:
        raise ConfigError([f"{key} = {str(folder)!r} was saved for another model: "
                           + ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}"
                                       for k in differing)])
    layout = common["layout"]
    if layout["format"] == "dist":
        ckpt_io._require_listed(folder, manifest, f"{ckpt_io.DIST_DIR}/.metadata")
        model = chunks[0] if len(chunks) == 1 else nn.ModuleList(chunks)
        with ckpt_io._reading(folder / ckpt_io.DIST_DIR):
            distributed.load(folder / ckpt_io.DIST_DIR, pstate, model, None)
        return None
    tp_size, pp_size = layout["tp_size"], layout["pp_size"]
    names = {(pp, tp): ckpt_io.model_file(tp, pp) for pp in range(pp_size) for tp in range(tp_size)}
    ckpt_io._require_listed(folder, manifest, *names.values())
    shards = {place: ckpt_io._torch_load(folder / name) for place, name in names.items()}
    # The shards are padded as the saved run padded its vocabulary.
    padding = (yaml.safe_load((folder / ckpt_io.CONFIG_FILE).read_text()) or {})["trainer"]["vocab_padding_unit"]
    with ckpt_io._reading(folder):
        return merge_shards(shards, cfg.model, _vocab_size(chunks), tp_size=tp_size, pp_size=pp_size,
                            vocab_padding_unit=padding)
