"""Save and resume a full training checkpoint, atomically and verifiably.

Layout of one checkpoint (``trainer.model_path``)::

    latest                       text: the iteration of the newest complete checkpoint
    iter_0001000/
      manifest.json              size and sha256 of every other file (written last, by rank 0)
      config.yaml                the resolved config (``ironcore.config.to_dict``)
      run_info.json              where the run came from (``ironcore.observe.run_info``), when given
      common.pt                  iteration, LR scheduler, loss scaler, data position, model-shape keys
      model_tp00_pp00.pt         model weights of one (TP, PP) shard, written by its DP rank 0
      optim_tp00_pp00.pt         optimizer state of that shard (keyed by parameter name)
      rng_rank00000.pt           every RNG of one global rank (python, numpy, torch, CUDA, TP tracker)
      dist/                      instead of model_*/optim_* when ``operation.save_dist_ckpt``:
                                 ``torch.distributed.checkpoint`` shards that reshard on load

Crash safety: every rank writes into ``iter_0001000.tmp-<nonce>/`` and fsyncs its files; after a
barrier rank 0 writes the manifest, renames the folder to its final name, fsyncs the parent, and
only then replaces ``latest`` (temp file + ``os.replace``). A process killed at any point leaves
``latest`` naming a complete checkpoint, once `tidy` has run at the next start (under the
``model_path`` lock of `claim_model_path`): ``.tmp-*`` folders are never loaded and are removed,
and the old copy of an iteration being saved again is renamed back if the new one never arrived.
Nothing is saved that holds a NaN/inf. Everything a checkpoint holds is checked before it is used
(manifest shape, sizes, sha256, contents), and every refusal is a one-line `CheckpointError`.

Everything is read back with ``torch.load(weights_only=True)``: RNG states are stored as tensors
and plain lists for that reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

from ironcore.checkpoint import distributed
from ironcore.checkpoint.errors import CheckpointError, load_file, one_line
from ironcore.config import to_dict
from ironcore.config.saved import CONFIG_FILE, RUN_INFO_FILE
from ironcore.parallel.data_parallel import gather_full_tensors
from ironcore.parallel.distributed_optimizer import optimizer_state_dict, set_optimizer_state
from ironcore.parallel.random import get_rng_tracker

logger = logging.getLogger(__name__)

LATEST = "latest"
MANIFEST = "manifest.json"
COMMON_FILE = "common.pt"
DIST_DIR = "dist"
FORMAT_VERSION = 1

# Config keys that change the parameters' names or shapes: a checkpoint saved with other values
# cannot be loaded into this model. (max_seq_len only matters for a learned position table.)
MODEL_SHAPE_KEYS = (
    "model.d_model", "model.d_ffn", "model.num_layers", "model.num_attention_heads",
    "model.num_attention_groups", "model.head_dim", "model.activation_type", "model.ln_type",
    "model.no_bias", "model.untie_embed", "model.positional_embedding.type", "data.vocab_size",
)

_ITER_DIR = re.compile(r"^iter_(\d{7,})$")
_LEFTOVER = re.compile(r"^(iter_\d{7,})\.(tmp|old)-[0-9a-f]+$")  # an interrupted save's folders
_MAX_ITERATION_DIGITS = 12
LOCK_FILE = ".lock"


# --------------------------------------------------------------------------------------------
# Names and folders


def checkpoint_dir(model_path: str | Path, iteration: int) -> Path:
    return Path(model_path) / f"iter_{iteration:07d}"


def model_file(tp_rank: int, pp_rank: int) -> str:
    return f"model_tp{tp_rank:02d}_pp{pp_rank:02d}.pt"


def optim_file(tp_rank: int, pp_rank: int) -> str:
    return f"optim_tp{tp_rank:02d}_pp{pp_rank:02d}.pt"


def rng_file(rank: int) -> str:
    return f"rng_rank{rank:05d}.pt"


def read_latest(model_path: str | Path) -> Optional[int]:
    """The iteration the ``latest`` pointer names, or None when there is none.

    CheckpointError (naming the file, and the newest complete checkpoint to use) when it holds
    anything but an iteration number."""
    path = Path(model_path) / LATEST
    if not path.is_file():
        return None
    data = path.read_bytes()
    text = data.decode("ascii", errors="replace").strip()
    if not (text.isdigit() and len(text) <= _MAX_ITERATION_DIGITS):
        done = complete_checkpoints(model_path)
        advice = (f"the newest complete checkpoint is {checkpoint_dir(model_path, done[-1]).name}: resume from it "
                  f"with trainer.load_iteration={done[-1]}" if done else "no complete checkpoint exists")
        raise CheckpointError(f"{path} is garbled: it should hold an iteration number, it holds {len(data)} bytes "
                              f"that are not one; {advice}, or delete {path}")
    return int(text)


def complete_checkpoints(model_path: str | Path) -> list[int]:
    """Iterations of the finished checkpoint folders (renamed, with a manifest), oldest first."""
    root = Path(model_path)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _ITER_DIR.match(child.name)
        if match and (child / MANIFEST).is_file():
            found.append(int(match.group(1)))
    return sorted(found)


# --------------------------------------------------------------------------------------------
# Small distributed helpers (all no-ops in a single process)


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _is_distributed():
        dist.barrier()


def _broadcast_from_rank0(value: Any) -> Any:
    if not _is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather(value: Any) -> list:
    if not _is_distributed():
        return [value]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _raise_if_any(errors: list[Optional[str]]) -> None:
    """Raise the first rank's error on every rank, so no rank is left waiting in a collective."""
    problems = [e for e in errors if e]
    if problems:
        raise CheckpointError(problems[0])


# --------------------------------------------------------------------------------------------
# Durable file writes


class _HashingWriter:
    """A write-only file wrapper that counts and hashes what passes through (torch.save target)."""

    def __init__(self, f):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()


def _save_file(path: Path, obj: Any = None, data: Optional[bytes] = None) -> dict:
    """Write ``obj`` (torch.save) or raw ``data`` to ``path``, fsync it; return its size and sha256."""
    with open(path, "wb") as f:
        writer = _HashingWriter(f)
        if data is not None:
            writer.write(data)
        else:
            torch.save(obj, writer)
        f.flush()
        os.fsync(f.fileno())
    return {"size": writer.size, "sha256": writer.sha256.hexdigest()}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_digest(path: Path, sync: bool = False) -> dict:
    """Size and sha256 of a file on disk; with ``sync``, also fsync it (files others wrote)."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            sha.update(block)
        if sync:
            os.fsync(f.fileno())
    return {"size": path.stat().st_size, "sha256": sha.hexdigest()}


def _write_latest(model_path: Path, iteration: int) -> None:
    tmp = model_path / f"{LATEST}.tmp-{uuid.uuid4().hex[:8]}"
    _save_file(tmp, data=f"{iteration}\n".encode())
    os.replace(tmp, model_path / LATEST)
    _fsync_dir(model_path)


def _before_commit(tmp_dir: Path) -> None:
    """Called by rank 0 between writing the files and publishing the checkpoint.

    A no-op; the crash-safety test replaces it to pause there and kill the process.
    """


# --------------------------------------------------------------------------------------------
# RNG states as tensors and plain lists (loadable with weights_only=True)


def rng_state() -> dict:
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    return {
        "python": random.getstate(),
        "numpy": [np_name, np_keys.tolist(), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "tp_tracker": get_rng_tracker().get_states(),
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, gauss_np = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss_np))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            logger.warning("checkpoint holds %d CUDA RNG states, this node has %d devices: not restored",
                           len(state["cuda"]), torch.cuda.device_count())
    get_rng_tracker().set_states(state["tp_tracker"])


# --------------------------------------------------------------------------------------------
# Config bits stored with the checkpoint


def _lookup(cfg, dotted: str) -> Any:
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def model_shape(cfg, vocab_size: Optional[int] = None) -> dict:
    """The values of MODEL_SHAPE_KEYS (plus max_seq_len when a learned position table has it).

    ``vocab_size``: the model's real vocabulary, recorded instead of ``data.vocab_size`` (which is
    None when the tokenizer decides it at run time).
    """
    shape = {key: _lookup(cfg, key) for key in MODEL_SHAPE_KEYS}
    if vocab_size is not None:
        shape["data.vocab_size"] = vocab_size
    if cfg.model.positional_embedding.type == "absolute":
        shape["model.max_seq_len"] = cfg.model.max_seq_len
    return shape


def _layout(cfg, pstate) -> dict:
    return {"tp_size": pstate.tp_size, "pp_size": pstate.pp_size, "dp_size": pstate.dp_size,
            "cp_size": pstate.cp_size, "world_size": pstate.world_size,
            "format": "dist" if cfg.operation.save_dist_ckpt else "single"}


def _model_vocab_size(model: torch.nn.Module) -> Optional[int]:
    if isinstance(model, torch.nn.ModuleList):  # a rank's pipeline chunks (interleaved schedule)
        model = model[0]
    vocab = getattr(model, "vocab_size", None)
    return vocab if isinstance(vocab, int) else None


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model under DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


# --------------------------------------------------------------------------------------------
# Save


def save_checkpoint(cfg, pstate, iteration: int, model, optimizer, scheduler, scaler,
                    data_state: dict, run_info: Optional[dict] = None) -> Path:
    """Write ``model_path/iter_{iteration:07d}/`` atomically, then point ``latest`` at it.

    Collective: every rank calls it. Returns the final folder. ``optimizer``, ``scheduler`` and
    ``scaler`` may be None (nothing is stored for them); so may ``run_info``. A failure on any rank (disk full, ...)
    raises CheckpointError on every rank and leaves ``latest`` where it was.
    """
    if not cfg.trainer.model_path:
        raise CheckpointError("trainer.model_path is empty: set it to a folder to save checkpoints in")
    root = Path(cfg.trainer.model_path)
    final = checkpoint_dir(root, iteration)
    tmp = _broadcast_from_rank0(final.with_name(f"{final.name}.tmp-{uuid.uuid4().hex[:8]}"))
    model = unwrap(model)

    def write_files() -> dict[str, dict]:
        _check_finite(iteration, model, optimizer)
        if cfg.operation.save_dist_ckpt:
            files = {str(path.relative_to(tmp)): _file_digest(path, sync=True)
                     for path in distributed.save(tmp / DIST_DIR, pstate, model, optimizer)}
        else:
            files = _save_single(tmp, pstate, model, optimizer)
        files[rng_file(pstate.rank)] = _save_file(tmp / rng_file(pstate.rank), rng_state())
        if pstate.rank == 0:
            common = {
                "iteration": iteration,
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "data_state": dict(data_state),
                "model_shape": model_shape(cfg, _model_vocab_size(model)),
                "layout": _layout(cfg, pstate),
            }
            files[COMMON_FILE] = _save_file(tmp / COMMON_FILE, common)
            files[CONFIG_FILE] = _save_file(tmp / CONFIG_FILE, data=_config_yaml(cfg).encode())
            if run_info is not None:
                files[RUN_INFO_FILE] = _save_file(tmp / RUN_INFO_FILE,
                                                  data=json.dumps(run_info, indent=1).encode())
        return files

    _on_every_rank(pstate, lambda: tmp.mkdir(parents=True) if pstate.rank == 0 else None)
    try:
        gathered = _on_every_rank(pstate, write_files)
    except CheckpointError:
        if pstate.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a full disk gets its space back
        raise
    files = {name: meta for per_rank in gathered for name, meta in per_rank.items()}
    _on_every_rank(pstate, lambda: _commit(root, tmp, iteration, files, cfg.trainer.keep_last_checkpoints)
                   if pstate.rank == 0 else None)
    return final


def _check_finite(iteration: int, model: torch.nn.Module, optimizer) -> None:
    """Refuse to save a NaN/inf weight or optimizer state: such a checkpoint would become ``latest``
    and every resume would start from a broken model."""
    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t  # an FSDP shard: this rank's part

    tensors = [(name, p) for name, p in model.named_parameters()]
    if optimizer is not None:
        tensors += [(f"optimizer state {key} of a parameter", v) for state in optimizer.state.values()
                    for key, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    for name, tensor in tensors:
        if not torch.isfinite(local(tensor.detach())).all():
            raise CheckpointError(f"refusing to save the checkpoint of step {iteration}: {name} holds NaN or inf "
                                  "values (the training diverged: lower optim.max_lr or raise optim.warmup_steps, "
                                  "then resume from the previous checkpoint)")


def _on_every_rank(pstate, action: Callable[[], Any]) -> list:
    """Run this rank's part of a save, then gather every rank's result (a barrier too).

    An exception on one rank is raised as CheckpointError on all ranks, instead of leaving the
    others blocked in the next collective.
    """
    try:
        result, error = action(), None
    except Exception as e:  # noqa: BLE001 - reported on every rank below
        what = str(e) if isinstance(e, CheckpointError) else f"{type(e).__name__}: {e}"
        result, error = None, f"rank {pstate.rank}: " + " ".join(what.split())
    gathered = _all_gather((result, error))
    errors = [err for _, err in gathered if err]
    if errors:
        raise CheckpointError("saving the checkpoint failed (latest is unchanged): " + "; ".join(errors))
    return [res for res, _ in gathered]


def _save_single(tmp: Path, pstate, model, optimizer) -> dict[str, dict]:
    """Each (TP, PP) shard's weights and optimizer state, written by its DP rank 0."""
    # Every rank builds the state dicts: under FSDP that gathers the shards (a collective) to CPU
    # on DP rank 0, the writer; the distributed optimizer gathers its state slices over DP;
    # otherwise they are views of the live tensors, no copy.
    writer = pstate.dp_cp_rank == 0  # CP ranks of a replica hold the same weights, as DP ranks do
    shard = (pstate.tp_rank, pstate.pp_rank)
    contents = {model_file(*shard): gather_full_tensors(get_model_state_dict(model), writer)}
    if optimizer is not None:
        contents[optim_file(*shard)] = gather_full_tensors(optimizer_state_dict(model, optimizer), writer)
    if not writer:
        return {}
    return {name: _save_file(tmp / name, obj) for name, obj in contents.items()}


def write_checkpoint(model_path: str | Path, iteration: int, contents: dict[str, Any]) -> Path:
    """Write a whole checkpoint folder from a single process (conversion tools), atomically.

    ``contents`` maps file names (``common.pt``, ``model_tp00_pp00.pt``, ...) to an object for
    ``torch.save`` or to ``bytes`` written as they are (``config.yaml``). ``latest`` then names it.
    """
    root = Path(model_path)
    final = checkpoint_dir(root, iteration)
    tmp = final.with_name(f"{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    files = {name: _save_file(tmp / name, data=obj) if isinstance(obj, bytes) else _save_file(tmp / name, obj)
             for name, obj in contents.items()}
    _commit(root, tmp, iteration, files, keep_last=None)
    return final


def _commit(root: Path, tmp: Path, iteration: int, files: dict[str, dict], keep_last: Optional[int]) -> None:
    """Seal the finished temp folder with its manifest and publish it (rank 0 only)."""
    manifest = {"format_version": FORMAT_VERSION, "iteration": iteration, "files": files}
    _save_file(tmp / MANIFEST, data=json.dumps(manifest, indent=1, sort_keys=True).encode())
    _fsync_dir(tmp)
    if (tmp / DIST_DIR).is_dir():
        _fsync_dir(tmp / DIST_DIR)
    _before_commit(tmp)
    final = checkpoint_dir(root, iteration)
    _publish(root, tmp, final, iteration)
    _prune(root, keep_last, keep=iteration)
    logger.info("saved checkpoint %s", final)


def _config_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _publish(root: Path, tmp: Path, final: Path, iteration: int) -> None:
    """Rename the finished temp folder into place, then move ``latest`` to it (rank 0)."""
    if final.exists():
        # Saving an iteration again (e.g. after resuming from an earlier one): a folder cannot be
        # renamed over a non-empty one, so the old copy steps aside first and is deleted once the
        # new one is in place. A crash in between leaves the old copy as `.old-*`, which `tidy`
        # (at the next start) renames back: it is never deleted while it is the only copy.
        aside = final.with_name(f"{final.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
        os.rename(final, aside)
        os.rename(tmp, final)
        _fsync_dir(root)
        shutil.rmtree(aside)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)
    _write_latest(root, iteration)


def tidy(model_path: str | Path) -> None:
    """Undo what interrupted saves left in ``model_path`` (rank 0, before a run uses it).

    A ``.tmp-*`` folder (a save that never published) is deleted, and so is a ``latest.tmp-*``
    file. An ``.old-*`` folder (the previous copy of an iteration that was being saved again) is
    deleted when the new copy is complete, and renamed back to its name when it is not there.
    """
    root = Path(model_path)
    if not root.is_dir():
        return
    for child in sorted(root.iterdir()):
        match = _LEFTOVER.match(child.name)
        if child.name.startswith(f"{LATEST}.tmp-") and child.is_file():
            child.unlink()
        elif match and match.group(2) == "tmp":
            shutil.rmtree(child, ignore_errors=True)
            logger.info("removed %s, left by an interrupted save", child)
        elif match:
            final = root / match.group(1)
            if (final / MANIFEST).is_file():
                shutil.rmtree(child, ignore_errors=True)
            elif not final.exists() and (child / MANIFEST).is_file():
                os.rename(child, final)
                _fsync_dir(root)
                logger.warning("restored %s from %s: a save replacing it was interrupted", final, child.name)


def _prune(root: Path, keep_last: Optional[int], keep: int) -> None:
    """Delete leftovers of interrupted saves and, with ``keep_last``, all but the newest K."""
    tidy(root)
    if keep_last is None:
        return
    done = complete_checkpoints(root)
    for iteration in done[:-keep_last]:
        if iteration != keep:
            shutil.rmtree(checkpoint_dir(root, iteration))
            logger.info("removed old checkpoint %s (keep_last_checkpoints=%d)",
                        checkpoint_dir(root, iteration).name, keep_last)


# --------------------------------------------------------------------------------------------
# One run per model_path


class ModelPathLock:
    """An exclusive lock on ``model_path`` for the life of a run (rank 0 holds it).

    ``flock`` on ``model_path/.lock``: the kernel drops it when its process dies, so a lock left by
    a killed run is never in the way; the file records who holds it, for the refusal's message.
    """

    def __init__(self, model_path: str | Path):
        self.path = Path(model_path) / LOCK_FILE
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        import fcntl
        import socket
        import time

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise CheckpointError(f"trainer.model_path {self.path.parent} cannot be used: "
                                  f"{e.strerror or e} ({e.filename or self.path})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode("utf-8", errors="replace").strip() or "another process"
            os.close(fd)
            raise CheckpointError(f"trainer.model_path {self.path.parent} is in use by another run ({holder}, "
                                  f"lock {self.path}): wait for it to end, or use another trainer.model_path") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (harmless, reused)
            self._fd = None


def claim_model_path(cfg, pstate) -> Optional[ModelPathLock]:
    """Before a training run touches ``trainer.model_path``: rank 0 locks it (CheckpointError on
    every rank when another run holds it, or when it cannot be created or written) and tidies what
    interrupted saves left. Collective. Returns the lock to release at the end (rank 0), else None."""
    if not cfg.trainer.model_path:
        return None
    lock, error = None, None
    if pstate.rank == 0:
        try:
            lock = ModelPathLock(cfg.trainer.model_path)
            lock.acquire()
            tidy(cfg.trainer.model_path)
        except CheckpointError as e:
            lock, error = None, str(e)
        except OSError as e:
            lock.release()
            lock, error = None, f"trainer.model_path {cfg.trainer.model_path} cannot be used: {e}"
    error = _broadcast_from_rank0(error)
    if error:
        raise CheckpointError(error)
    return lock


# --------------------------------------------------------------------------------------------
# Load


def load_checkpoint(cfg, pstate, model, optimizer, scheduler, scaler) -> Optional[dict]:
    """Resume from ``trainer.model_path``: returns ``{"iteration", "data_state", "rng_state"}`` or None.

    ``rng_state`` (None when the checkpoint holds none for this layout) is *not* applied here: the
    caller restores it with `set_rng_state` as the very last thing before its first step, so that
    nothing it does in between (building loggers, measuring the device) can move the streams.

    The checkpoint is the one ``latest`` names, or ``trainer.load_iteration`` when set (``0``
    starts fresh). Optimizer state and LR scheduler are restored unless
    ``optim.load_checkpoint_optim_state`` / ``optim.load_checkpoint_lr_scheduler`` say no; then
    they keep their freshly built state. Collective: every rank calls it.
    Raises CheckpointError (naming the file, and the previous complete checkpoint to use instead)
    for a corrupted or incomplete checkpoint, and for one saved with another model shape.
    """
    iteration = _resume_iteration(cfg)
    if iteration is None:
        return None
    folder = checkpoint_dir(cfg.trainer.model_path, iteration)
    manifest = read_manifest(folder)  # every rank reads the same small file
    # The ranks share the checksum work round-robin, then all stop if any file is bad.
    share = sorted(manifest["files"])[pstate.rank::pstate.world_size]
    _raise_if_any(_all_gather(verify_files(folder, manifest, share)))
    _require_listed(folder, manifest, COMMON_FILE)
    common = _read_common(folder / COMMON_FILE)
    model = unwrap(model)
    _check_compatible(cfg, pstate, model, common, folder)

    load_optim = optimizer is not None and cfg.optim.load_checkpoint_optim_state
    if common["layout"]["format"] == "dist":
        _require_listed(folder, manifest, f"{DIST_DIR}/.metadata")
        with _reading(folder / DIST_DIR):
            distributed.load(folder / DIST_DIR, pstate, model, optimizer if load_optim else None)
    else:
        _load_single(folder, manifest, pstate, model, optimizer if load_optim else None)

    with _reading(folder / COMMON_FILE):
        if scheduler is not None:
            _resume_schedule(cfg, scheduler, common["scheduler"], int(common["iteration"]))
        if scaler is not None and common["scaler"] is not None:
            scaler.load_state_dict(common["scaler"])
    rng = _load_rng(folder, pstate, common, manifest)
    _barrier()
    logger.info("resumed from %s%s", folder, "" if load_optim or optimizer is None else " (weights only: fresh optimizer)")
    return {"iteration": int(common["iteration"]), "data_state": dict(common["data_state"]), "rng_state": rng}


def _resume_schedule(cfg, scheduler, saved: Optional[dict], iteration: int) -> None:
    """The checkpoint's LR schedule (settings and position), or with
    ``optim.load_checkpoint_lr_scheduler: false`` the config's settings at the resumed step."""
    if cfg.optim.load_checkpoint_lr_scheduler and saved is not None:
        scheduler.load_state_dict(saved)
        changed = scheduler.changed_settings(cfg.optim, cfg.operation.train_steps)
        if changed:
            logger.warning("LR schedule: the checkpoint's, which differs from the config in %s; set "
                           "optim.load_checkpoint_lr_scheduler: false to take the config's at step %d",
                           ", ".join(changed), iteration)
        logger.info("LR schedule: the checkpoint's settings and position (step %d)", scheduler.last_epoch)
        return
    scheduler.resume_at(iteration)
    logger.info("LR schedule: the config's settings at the resumed step %d (optim.load_checkpoint_lr_scheduler: "
                "false)", iteration)


def _read_common(path: Path) -> dict:
    """``common.pt``, with the fields a resume reads checked for their types."""
    common = _torch_load(path)
    expected = {"iteration": int, "data_state": dict, "model_shape": dict, "layout": dict}
    wrong = [k for k, kind in expected.items() if not isinstance(common, dict) or not isinstance(common.get(k), kind)]
    layout_keys = {"tp_size", "pp_size", "dp_size", "format"}
    if not wrong and not (layout_keys <= set(common["layout"]) and common["layout"]["format"] in ("dist", "single")):
        wrong = ["layout"]
    if not wrong and not isinstance(common["data_state"].get("consumed_samples", 0), int):
        wrong = ["data_state"]
    if wrong:
        raise CheckpointError(f"checkpoint file {path} is not an IronCore checkpoint's common state (missing or "
                              f"malformed: {', '.join(wrong)}). " + _previous_hint(path.parent))
    common.setdefault("scheduler", None)
    common.setdefault("scaler", None)
    return common


def _resume_iteration(cfg) -> Optional[int]:
    """The iteration to resume from, decided by rank 0 (it may verify files) for every rank."""
    try:
        iteration, error = (_choose_iteration(cfg), None) if not _is_distributed() or dist.get_rank() == 0 \
            else (None, None)
    except CheckpointError as e:
        iteration, error = None, str(e)
    iteration, error = _broadcast_from_rank0((iteration, error))
    if error:
        raise CheckpointError(error)
    return iteration


def _choose_iteration(cfg) -> Optional[int]:
    root = cfg.trainer.model_path
    requested = cfg.trainer.load_iteration
    if not root or requested == 0:
        return None
    if requested is not None:
        if not checkpoint_dir(root, requested).is_dir():
            raise CheckpointError(
                f"trainer.load_iteration={requested}: {checkpoint_dir(root, requested)} does not exist; "
                f"complete checkpoints in {root}: {complete_checkpoints(root) or 'none'}")
        return requested
    latest = read_latest(root)
    if latest is not None:
        return latest
    # No pointer, but checkpoint folders: a crash between publishing a first checkpoint and writing
    # `latest`, or a deleted file. Never start fresh over them (the saves would overwrite them).
    done = complete_checkpoints(root)
    for iteration in reversed(done):
        folder = checkpoint_dir(root, iteration)
        try:
            manifest = read_manifest(folder)
            problem = verify_files(folder, manifest, sorted(manifest["files"]))
        except CheckpointError as e:
            problem = str(e)
        if problem is None:
            logger.warning("%s has no '%s' pointer: resuming from the newest checkpoint that verifies, %s",
                           root, LATEST, folder.name)
            return iteration
        logger.warning("%s", problem)
    if done:
        raise CheckpointError(f"{root} has no '{LATEST}' pointer and none of its checkpoints verifies "
                              f"({', '.join(checkpoint_dir(root, i).name for i in done)}): set "
                              "trainer.load_iteration=0 to start fresh (the saves will replace them) or use "
                              "another trainer.model_path")
    return None


def _previous_hint(folder: Path) -> str:
    match = _ITER_DIR.match(folder.name)
    older = [i for i in complete_checkpoints(folder.parent) if match and i < int(match.group(1))]
    if not older:
        return "No earlier complete checkpoint exists; set trainer.load_iteration=0 to start fresh."
    return (f"The previous complete checkpoint is {checkpoint_dir(folder.parent, older[-1]).name}: "
            f"resume from it with trainer.load_iteration={older[-1]}.")


def read_manifest(folder: Path) -> dict:
    """The manifest of a checkpoint folder; CheckpointError when it is missing, unreadable or not a
    manifest (a ``files`` mapping of relative names to their ``size`` and ``sha256``)."""
    path = folder / MANIFEST
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} does not exist. " + _previous_hint(folder))
    if not path.is_file():
        raise CheckpointError(f"checkpoint {folder} is incomplete: {MANIFEST} is missing. " + _previous_hint(folder))
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"checkpoint {folder} is corrupted: {path} is not valid JSON "
                              f"({type(e).__name__}). " + _previous_hint(folder)) from None
    problem = _manifest_problem(manifest)
    if problem:
        raise CheckpointError(f"checkpoint {folder} is corrupted: {path} {problem}. " + _previous_hint(folder))
    return manifest


def _manifest_problem(manifest: Any) -> Optional[str]:
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return "has no 'files' mapping"
    for name, entry in manifest["files"].items():
        parts = Path(name).parts
        if Path(name).is_absolute() or ".." in parts or not parts:
            return f"lists a file outside its folder ({name!r})"
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int)
                and isinstance(entry.get("sha256"), str)):
            return f"entry {name!r} lacks an integer 'size' and a 'sha256'"
    return None


def _require_listed(folder: Path, manifest: dict, *names: str) -> None:
    """Only files the manifest vouches for are read."""
    for name in names:
        if name not in manifest["files"]:
            raise CheckpointError(f"checkpoint {folder} is incomplete: {folder / MANIFEST} does not list {name}. "
                                  + _previous_hint(folder))


def _hint_for(path: Path) -> str:
    folder = path.parent if path.parent.name != DIST_DIR else path.parent.parent
    return _previous_hint(folder if _ITER_DIR.match(folder.name) else path)


@contextlib.contextmanager
def _reading(path: Path):
    """A file that passed its checksum but cannot be used (written by something else, edited with
    its checksum updated): one line naming it, instead of the loader's traceback."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the file's contents make the loader raise
        raise CheckpointError(f"checkpoint file {path} cannot be loaded ({one_line(e)}). " + _hint_for(path)) from None


def _torch_load(path: Path) -> Any:
    try:
        return load_file(path)
    except CheckpointError as e:
        raise CheckpointError(f"{e}. {_hint_for(path)}") from None


def verify_files(folder: Path, manifest: dict, names: list[str]) -> Optional[str]:
    """Check the size and sha256 of the named files against the manifest: None, or what is wrong."""
    for name in names:
        path = folder / name
        expected = manifest["files"][name]
        if not path.is_file():
            problem = "is missing"
        else:
            actual = _file_digest(path)
            if actual["size"] != expected["size"]:
                problem = f"has {actual['size']} bytes, the manifest says {expected['size']} (truncated?)"
            elif actual["sha256"] != expected["sha256"]:
                problem = "does not match its sha256 checksum in the manifest (modified or corrupted)"
            else:
                continue
        return f"checkpoint {folder} is corrupted: {path} {problem}. " + _previous_hint(folder)
    return None


def _check_compatible(cfg, pstate, model: torch.nn.Module, common: dict, folder: Path) -> None:
    saved, current = common["model_shape"], model_shape(cfg, _model_vocab_size(model))
    differing = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if differing:
        detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}" for k in differing)
        raise CheckpointError(f"checkpoint {folder} was saved for a different model shape ({detail}); "
                              f"use the same model config, or start fresh with trainer.load_iteration=0 "
                              f"or another trainer.model_path")
    layout = common["layout"]
    if layout["format"] == "single" and (layout["tp_size"], layout["pp_size"]) != (pstate.tp_size, pstate.pp_size):
        raise CheckpointError(
            f"checkpoint {folder} was saved with tensor_model_parallel_size={layout['tp_size']}, "
            f"pipeline_model_parallel_size={layout['pp_size']} and this run has {pstate.tp_size}, "
            f"{pstate.pp_size}: a single-file checkpoint loads only into the same TP/PP layout. Save with "
            f"operation.save_dist_ckpt=true to change the layout on load.")


def _load_single(folder: Path, manifest: dict, pstate, model, optimizer) -> None:
    options = StateDictOptions(full_state_dict=True)
    names = [model_file(pstate.tp_rank, pstate.pp_rank)] + ([optim_file(pstate.tp_rank, pstate.pp_rank)]
                                                          if optimizer is not None else [])
    _require_listed(folder, manifest, *names)
    weights = _torch_load(folder / names[0])
    with _reading(folder / names[0]):
        set_model_state_dict(model, weights, options=options)
    if optimizer is not None:
        state = _torch_load(folder / names[1])
        with _reading(folder / names[1]):
            set_optimizer_state(model, optimizer, state, options=options)


def _load_rng(folder: Path, pstate, common: dict, manifest: dict) -> Optional[dict]:
    """Every RNG of this rank, when the checkpoint was saved by the same TP × PP × DP × CP layout (a rank's
    streams belong to its place in the grid; another layout keeps the streams it was seeded with)."""
    layout = common["layout"]
    saved = "×".join(str(layout.get(k, 1)) for k in ("tp_size", "pp_size", "dp_size", "cp_size"))
    current = "×".join(str(n) for n in (pstate.tp_size, pstate.pp_size, pstate.dp_size, pstate.cp_size))
    if saved != current or rng_file(pstate.rank) not in manifest["files"]:
        logger.warning("checkpoint %s holds no RNG states for this layout (saved with TP×PP×DP×CP %s, this run has "
                       "%s): RNGs keep this run's seeds, so the run continues, but not bit-identically to an "
                       "uninterrupted one", folder, saved, current)
        return None
    path = folder / rng_file(pstate.rank)
    state = _torch_load(path)
    with _reading(path):  # check it applies (and leave the streams as they are: the caller sets them)
        current = rng_state()
        set_rng_state(state)
        set_rng_state(current)
    return state
