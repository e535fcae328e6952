"""Distributed checkpoints (``operation.save_dist_ckpt``) that load into another TP / DP / PP layout.

Model weights and optimizer state are written with PyTorch's own ``torch.distributed.checkpoint``
(DCP): every rank writes its shards in parallel into ``dist/`` and DCP's ``.metadata`` records where
each piece of each *global* tensor lives, so a run with another layout reads exactly the pieces it
needs.

What is saved is the layout-free, global view of every tensor:

* a tensor-parallel parameter (``tensor_model_parallel=True``, split along ``partition_dim``) is
  saved as the full tensor it is a shard of: each TP rank contributes its chunk at its offset
  (a ``ShardedTensor`` over the TP group, built from local shards without any communication);
* a vocabulary-parallel parameter (``vocab_parallel=True``: embedding and output head, padded to a
  multiple of ``vocab_padding_unit × TP``, which depends on TP) is saved as its **real** rows only,
  ``[vocab_size, ...]``; the padding rows are never stored, and a loading layout keeps its own
  padding rows as built (they never receive probability mass);
* a replicated tensor (norms, row-parallel biases, Adam's ``step``) is saved once (DCP removes the
  duplicates of the other TP/DP ranks);
* an FSDP shard (``parallel.use_fsdp``: a ``DTensor`` over the DP ranks) is written by the rank
  that holds it (DCP reads and writes DTensors natively) when TP = 1. A vocabulary one, and under
  TP every TP-split one, is gathered first to this TP rank's whole shard (FSDP's even shards
  cannot end at the real vocabulary, and a DTensor over the DP mesh cannot say where its TP
  shard sits) and then saved as above; on load each rank copies its rows back into its FSDP shard;
* the distributed optimizer's state is saved by parameter, whole (it gathers its DP slices), so
  it loads at another DP size or into a plain optimizer.

Adam's ``exp_avg``/``exp_avg_sq`` have the shape of their parameter and are saved the same way, so
the optimizer state follows the weights into the new layout. The optimizer's param-group settings
(lr, betas, ...) are not tensors; they are kept beside the shards in ``stage_ppNN.pt`` (one per
pipeline stage) and read back with ``torch.load(weights_only=True)``, not through DCP's pickle path.
DCP's own index, ``.metadata``, is a pickle that torch reads with plain ``pickle.load``; it is read
here instead through an unpickler that admits only the classes of an index of tensors
(`read_metadata`), so a crafted index cannot run code.

Names are layout-free too: layer indices are global (``layer_offset`` of a pipeline stage) and the
last stage's copy of a tied embedding is saved under the embedding's name. A rank holding several
pipeline chunks (interleaved schedule) passes them as an ``nn.ModuleList``: the chunk index that
prefixes their names is dropped and each chunk's own ``layer_offset`` applies.
"""

from __future__ import annotations

import contextlib
import pickle
import re
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor

from ironcore.checkpoint.errors import CheckpointError, load_file, one_line
from ironcore.model.gpt import padded_vocab_size
from ironcore.parallel.distributed_optimizer import optimizer_state_dict, optimizer_template, set_optimizer_state

_STAGE_FILE = "stage_pp{:02d}.pt"  # per pipeline stage: optimizer param groups, vocab-parallel names
_TIED_EMBEDDING = "embedding.word_embeddings.weight"
_LAYER = re.compile(r"^layers\.(\d+)\.")


# --------------------------------------------------------------------------------------------
# Local shards <-> global tensors


@contextlib.contextmanager
def _quiet_dcp():
    """Silence two notices DCP repeats on every call, neither of which asks anything of us.

    * ShardedTensor's deprecation: it is used on purpose, as vocabulary shards cut at the real
      vocabulary are uneven chunks at arbitrary offsets, which DTensor's even (chunk-style)
      sharding cannot describe, and DCP reads and writes ShardedTensors natively;
    * "assuming the intent is to load in a single process": said even when asked for
      (``no_dist=True`` in `to_single_file`).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecating ShardedTensor", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        yield


def _chunks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The pipeline chunks of this rank: the model itself, or the members of an ``nn.ModuleList``."""
    return list(model) if isinstance(model, torch.nn.ModuleList) else [model]


def global_namer(model: torch.nn.Module) -> Callable[[str], str]:
    """Maps a local parameter/state name to its layout-free name: layer indices made global
    (``layer_offset`` of this pipeline stage, or of chunk ``k`` for a name ``k.…`` of a
    ``ModuleList`` of chunks), and the last stage's copy of a tied embedding named as the embedding."""
    shared = {n for n, p in _params(model).items() if getattr(p, "shared_embedding", False)}
    chunked = isinstance(model, torch.nn.ModuleList)
    offsets = [getattr(chunk, "layer_offset", 0) for chunk in _chunks(model)]

    def global_name(name: str) -> str:
        if name in shared:
            return _TIED_EMBEDDING
        chunk = 0
        if chunked:
            index, name = name.split(".", 1)
            chunk = int(index)
        return _LAYER.sub(lambda m: f"layers.{int(m.group(1)) + offsets[chunk]}.", name)

    return global_name


def _params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Parameters by every name they have (tied weights have two)."""
    return dict(model.named_parameters(remove_duplicate=False))


def _vocab_size(model: torch.nn.Module) -> int:
    vocab = getattr(_chunks(model)[0], "vocab_size", None)
    if not isinstance(vocab, int):
        raise TypeError(f"{type(model).__name__} has no integer `vocab_size` attribute (the real, unpadded "
                        "vocabulary): distributed checkpoints need it to drop the TP-dependent padding rows")
    return vocab


def _to_global(local: torch.Tensor, param: torch.nn.Parameter, pstate, vocab_size: Optional[int]):
    """Wrap this TP rank's shard as its part of the global tensor (no copy, no communication).

    TP rank ``r`` of this group is the mesh's ``r``-th member of this rank's TP group; every rank of
    the group describes all chunks identically.
    For vocabulary tensors the global tensor ends at the real vocabulary: padding rows are cut off.
    """
    vocab = getattr(param, "vocab_parallel", False)
    if not getattr(param, "tensor_model_parallel", False) or (pstate.tp_size == 1 and not vocab):
        return local
    dim = param.partition_dim
    per_rank = local.shape[dim]
    extent = vocab_size if vocab else per_rank * pstate.tp_size
    chunks, mine = [], []
    tp_ranks = dist.get_process_group_ranks(pstate.tp_group) if pstate.tp_group is not None else [pstate.rank]
    for r in range(pstate.tp_size):
        start = r * per_rank
        length = min(per_rank, extent - start)
        if length <= 0:
            continue  # this rank holds padding rows only
        offsets, sizes = [0] * local.dim(), list(local.shape)
        offsets[dim], sizes[dim] = start, length
        chunk = ShardMetadata(offsets, sizes, f"rank:{tp_ranks[r]}/{local.device}")
        chunks.append(chunk)
        if r == pstate.tp_rank:
            mine.append(Shard(local.narrow(dim, 0, length), chunk))
    size = list(local.shape)
    size[dim] = extent
    metadata = ShardedTensorMetadata(chunks, torch.Size(size), TensorProperties(dtype=local.dtype, layout=local.layout))
    return ShardedTensor._init_from_local_shards_and_global_metadata(mine, metadata)


def _fsdp_global(shard: DTensor, param: torch.nn.Parameter, pstate, vocab_size: Optional[int],
                 gathered: Optional[list]):
    """An FSDP shard as saved: itself, or (vocabulary and TP-split tensors) this TP rank's gathered
    whole shard, placed in the global tensor by `_to_global`. ``gathered`` (on load) receives the
    (shard, whole) pairs for `_scatter_gathered`."""
    tp_split = getattr(param, "tensor_model_parallel", False) and pstate.tp_size > 1
    if not (getattr(param, "vocab_parallel", False) or tp_split):
        return shard
    whole = shard.full_tensor()
    if gathered is not None:
        gathered.append((shard, whole))
    return _to_global(whole, param, pstate, vocab_size)


def _scatter_gathered(gathered: list) -> None:
    """After a load: this rank's rows of each gathered vocabulary tensor back into its FSDP shard."""
    with torch.no_grad():
        for shard, whole in gathered:
            mine = distribute_tensor(whole, shard.device_mesh, shard.placements, src_data_rank=None)
            shard.to_local().copy_(mine.to_local())


def _globalize(model: torch.nn.Module, model_sd: dict, optim_sd: Optional[dict], pstate,
               gathered: Optional[list] = None) -> dict:
    """The DCP state dict: every model and optimizer tensor under its global name, TP-split ones as
    views of their global tensor, FSDP shards as `_fsdp_global` says. Optimizer tensors shaped like
    their parameter (Adam's moments) are split like it; others (``step``) are replicated."""
    if pstate.pp_size > 1 and not all(isinstance(getattr(c, "layer_offset", None), int) for c in _chunks(model)):
        raise TypeError(f"{type(model).__name__} has no integer `layer_offset`: with pipeline parallelism a "
                        "distributed checkpoint needs models (or a ModuleList of pipeline chunks) that know "
                        "their first global layer")
    params = _params(model)
    vocab_size = _vocab_size(model) if any(getattr(p, "vocab_parallel", False) for p in params.values()) else None

    def globalize(name: str, value: torch.Tensor):
        param = params.get(name)
        if param is None or value.shape != param.shape:
            return value
        if isinstance(value, DTensor):
            return _fsdp_global(value, param, pstate, vocab_size, gathered)
        return _to_global(value, param, pstate, vocab_size)

    global_name = global_namer(model)
    state = {"model": {global_name(k): globalize(k, v) for k, v in model_sd.items()}}
    if optim_sd is not None:
        state["optim"] = {}
        for name, per_param in optim_sd["state"].items():
            for key, value in per_param.items():
                if not isinstance(value, torch.Tensor):
                    raise TypeError(f"optimizer state {name}.{key} is a {type(value).__name__}: distributed "
                                    "checkpoints store tensor state only")
            state["optim"][global_name(name)] = {k: globalize(name, v) for k, v in per_param.items()}
    return state


# --------------------------------------------------------------------------------------------
# DCP's index, read without executing anything

# What a DCP ``.metadata`` index of tensors is made of. torch reads the file with plain
# ``pickle.load``, which calls whatever a crafted file names (``os.system``...): the manifest's
# sha256 proves the file is the one listed, not that its writer is trusted. These are the only
# globals an index may name; each builds plain data (dataclasses, sizes, dtypes, paths) and
# nothing else.
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_SAFE_GLOBALS = {
    (_DCP_METADATA, name) for name in (
        "Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
        "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a torch.layout by its name ("torch.strided")
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),  # StorageMeta.checkpoint_id
    ("collections", "OrderedDict"),
}
_SHARD_FILE = re.compile(r"^__\d+_\d+\.distcp$")  # where DCP's FileSystemWriter puts the shards


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which is not part of a DCP tensor index")


def read_metadata(path: Path) -> Metadata:
    """DCP's ``.metadata`` index at ``path``, unpickled admitting only the classes of an index of
    tensors stored in this folder's shard files; CheckpointError (naming the file) otherwise."""
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        _check_metadata(metadata)
    except (pickle.UnpicklingError, ValueError, TypeError, AttributeError, EOFError, IndexError, KeyError,
            ImportError, OverflowError, MemoryError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path} is not a valid distributed-checkpoint index, refusing to load it: {e}") from None
    return metadata


def _check_metadata(metadata) -> None:
    """Only tensors (DCP's non-tensor entries are unpickled with torch.load(weights_only=False) on
    load), stored in this folder's shard files, with no storage transforms."""
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise ValueError(f"it holds a {type(metadata).__name__}, not a DCP Metadata")
    for key, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):
            raise ValueError(f"entry {key!r} is a {type(entry).__name__}, IronCore stores tensors only")
    for info in (metadata.storage_data or {}).values():
        if not isinstance(info, _StorageInfo) or not _SHARD_FILE.match(str(info.relative_path)) \
                or getattr(info, "transform_descriptors", None):
            raise ValueError(f"storage entry {info!r} is not a plain shard file of this folder")


class _SafeReader(dcp.FileSystemReader):
    """DCP's file reader, with the index read by `read_metadata`."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_metadata(Path(self.path) / ".metadata")
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


@contextlib.contextmanager
def _dcp_errors(directory: Path, action: str):
    """DCP reports a failure on any rank as a CheckpointException, a BaseException (it escapes
    ``except Exception``) whose text is a traceback: turn it into one line naming the folder."""
    try:
        yield
    except CheckpointException as e:
        causes = [exc for exc, _ in e.failures.values()] if isinstance(e.failures, dict) else []
        first = next((c for c in causes if isinstance(c, CheckpointError)), causes[0] if causes else None)
        if isinstance(first, CheckpointError):
            raise CheckpointError(str(first)) from None
        detail = one_line(first) if first is not None else "failed"
        raise CheckpointError(f"{action} the distributed checkpoint {directory} failed: {detail}") from None


# --------------------------------------------------------------------------------------------
# Save and load (collective: every rank calls them)


def save(directory: Path, pstate, model: torch.nn.Module, optimizer) -> list[Path]:
    """Write model (and optimizer) shards into ``directory``; return the files this rank wrote."""
    directory = Path(directory)
    model_sd = get_model_state_dict(model)
    optim_sd = optimizer_state_dict(model, optimizer) if optimizer is not None else None
    with _quiet_dcp(), _dcp_errors(directory, "writing"):
        dcp.save(_globalize(model, model_sd, optim_sd, pstate), storage_writer=dcp.FileSystemWriter(directory))
    written = sorted(directory.glob(f"__{pstate.rank}_*"))
    if pstate.tp_rank == 0 and pstate.dp_cp_rank == 0:
        global_name = global_namer(model)
        groups = None
        if optim_sd is not None:
            groups = [{**g, "params": [global_name(n) for n in g["params"]]} for g in optim_sd["param_groups"]]
        stage = {"param_groups": groups,
                 "vocab_size": getattr(_chunks(model)[0], "vocab_size", None),
                 "vocab_parallel": sorted({global_name(n) for n, p in _params(model).items()
                                           if getattr(p, "vocab_parallel", False)})}
        written.append(directory / _STAGE_FILE.format(pstate.pp_rank))
        torch.save(stage, written[-1])
    if pstate.rank == 0:
        written.append(directory / ".metadata")  # DCP's coordinator (rank 0) wrote it
    return written


def load(directory: Path, pstate, model: torch.nn.Module, optimizer) -> None:
    """Load the pieces this layout needs from ``directory`` into ``model`` (and ``optimizer``).

    ``optimizer`` None loads the weights only. A fresh optimizer is first given zero state of the
    right shapes (``get_optimizer_state_dict`` does that), which DCP then fills in place; its
    param-group settings (lr, betas, ...) come from the first stage's file, as they are the same
    at every stage.
    """
    directory = Path(directory)
    model_sd = get_model_state_dict(model)
    optim_sd = optimizer_template(model, optimizer) if optimizer is not None else None
    # DCP copies into the tensors (the local shards) of this dict in place: model_sd and optim_sd
    # hold the same tensors and are filled by this call (gathered FSDP vocabulary tensors: after it).
    gathered: list = []
    read_metadata(directory / ".metadata")  # refuse a bad index on every rank, before any collective
    with _quiet_dcp(), _dcp_errors(directory, "reading"):
        dcp.load(_globalize(model, model_sd, optim_sd, pstate, gathered), storage_reader=_SafeReader(directory))
    _scatter_gathered(gathered)
    set_model_state_dict(model, model_sd)
    if optim_sd is not None:
        first_stage = directory / _STAGE_FILE.format(0)
        stage = load_file(first_stage)
        saved_groups = stage.get("param_groups") if isinstance(stage, dict) else None
        if not isinstance(saved_groups, list) or len(saved_groups) != len(optim_sd["param_groups"]):
            raise CheckpointError(f"{first_stage} holds {len(saved_groups or [])} optimizer param groups, this "
                             f"optimizer has {len(optim_sd['param_groups'])}: load the weights only with "
                             "optim.load_checkpoint_optim_state=false")
        for mine, saved in zip(optim_sd["param_groups"], saved_groups):
            mine.update({k: v for k, v in saved.items() if k != "params"})
        set_optimizer_state(model, optimizer, optim_sd)


# --------------------------------------------------------------------------------------------
# Conversion to the single-file format


def to_single_file(dist_dir: str | Path, out_dir: str | Path) -> Path:
    """Turn a distributed checkpoint folder into a single-file one for TP=1, PP=1; return it.

    ``dist_dir`` is a checkpoint folder saved with ``operation.save_dist_ckpt`` (``iter_NNNNNNN``);
    ``out_dir`` is a model_path that receives ``iter_NNNNNNN/`` in the single-file format and a
    ``latest`` pointer, loadable with ``load_checkpoint`` by a TP=1 run (or
    ``tools/convert_checkpoint.py``). Vocabulary tensors are padded to TP=1's padded size with zero
    rows. RNG states are not carried over (they belong to the ranks of the old layout). Runs in one
    process without ``torch.distributed``.
    """
    # io builds on this module, so it is imported here rather than at the top.
    from ironcore.checkpoint import io as ckpt_io

    folder = Path(dist_dir)
    common, config = _verified_source(folder, ckpt_io)
    source = folder / ckpt_io.DIST_DIR
    stages = [load_file(path) for path in sorted(source.glob("stage_pp*.pt"))]
    tensors = _read_all_tensors(source)

    vocab = {name for stage in stages for name in stage["vocab_parallel"]}
    vocab_size = stages[0]["vocab_size"]
    if vocab:
        pad_to = padded_vocab_size(vocab_size, config["trainer"]["vocab_padding_unit"], tp_size=1)

    def padded(name: str, value: torch.Tensor) -> torch.Tensor:
        if name not in vocab or value.dim() == 0:
            return value
        return torch.cat([value, value.new_zeros((pad_to - value.shape[0], *value.shape[1:]))])

    contents: dict[str, object] = {ckpt_io.model_file(0, 0): {
        k.removeprefix("model."): padded(k.removeprefix("model."), v) for k, v in tensors.items()
        if k.startswith("model.")}}
    if stages[0]["param_groups"] is not None:
        state: dict[str, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                name, field = key.removeprefix("optim.").rsplit(".", 1)
                state.setdefault(name, {})[field] = padded(name, value)
        # Each stage lists its own parameters per group; one model holds them all (a tied
        # embedding appears in the first and the last stage: listed once).
        groups = [{**group, "params": list(dict.fromkeys(
            name for stage in stages for name in stage["param_groups"][i]["params"]))}
            for i, group in enumerate(stages[0]["param_groups"])]
        contents[ckpt_io.optim_file(0, 0)] = {"state": state, "param_groups": groups}

    common["layout"] = {"tp_size": 1, "pp_size": 1, "dp_size": 1, "world_size": 1, "format": "single"}
    config["trainer"].update(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    config["operation"]["save_dist_ckpt"] = False
    # Keys that only make sense with the old layout's TP/PP sizes go back to their defaults.
    single_layout = {"world_size": 1, "sequence_parallel": False, "pipeline_layer_split": None,
                     "virtual_pipeline_stages": 1}
    config["parallel"].update({k: v for k, v in single_layout.items() if k in config["parallel"]})
    contents[ckpt_io.COMMON_FILE] = common
    contents[ckpt_io.CONFIG_FILE] = yaml.safe_dump(config, sort_keys=False).encode()
    return ckpt_io.write_checkpoint(out_dir, common["iteration"], contents)


def _verified_source(folder: Path, ckpt_io) -> tuple[dict, dict]:
    """(common, config) of a distributed checkpoint folder after checking all its files."""
    manifest = ckpt_io.read_manifest(folder)
    problem = ckpt_io.verify_files(folder, manifest, sorted(manifest["files"]))
    if problem:
        raise ckpt_io.CheckpointError(problem)
    common = load_file(folder / ckpt_io.COMMON_FILE)
    if common["layout"]["format"] != "dist":
        raise ValueError(f"{folder} is a single-file checkpoint already (saved without operation.save_dist_ckpt)")
    return common, yaml.safe_load((folder / ckpt_io.CONFIG_FILE).read_text())


def _read_all_tensors(source: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP folder, whole, keyed by its flattened name (``model.<fqn>``, ...)."""
    tensors = {key: torch.empty(md.size, dtype=md.properties.dtype)
               for key, md in read_metadata(source / ".metadata").state_dict_metadata.items()}
    with _quiet_dcp(), _dcp_errors(source, "reading"):
        dcp.load(tensors, storage_reader=_SafeReader(source), no_dist=True)
    return tensors
