"""The indexed dataset format: `PREFIX.bin` token ids, `PREFIX.idx` header and document offsets.

Layout (all little-endian):

    PREFIX.idx   header (40 bytes)
                   magic      8 bytes  b"IRNIDX\\x00\\x00"
                   version    uint32   1
                   dtype      uint32   1 = uint16, 2 = int32 (token ids in .bin)
                   task       uint32   0 = pretrain, 1 = sft, 2 = dpo
                   vocab      uint32   vocabulary size of the tokenizer that wrote it
                   documents  uint64   number of documents
                   tokens     uint64   number of tokens
                 offsets      uint64[documents + 1]: document d is tokens[offsets[d]:offsets[d+1]]
    PREFIX.bin   token ids, `tokens` of them, every document ending with the end-of-document id
    PREFIX.mask  (sft and dpo only) uint8[tokens]: 1 where the token is a response token whose
                 prediction is trained on, 0 on prompt tokens

A DPO dataset stores each pair as two consecutive documents: prompt + chosen, then prompt + rejected.

Files are written to temporary names and renamed into place with the `.idx` last, and a reader
checks every size against the header, so a half-written dataset is always detected, never read.
"""

from __future__ import annotations

import os
import struct
from array import array
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

MAGIC = b"IRNIDX\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<8sIIIIQQ")
DTYPES = {1: np.dtype(np.uint16), 2: np.dtype(np.int32)}
TASKS = {0: "pretrain", 1: "sft", 2: "dpo"}


class IndexedDatasetError(ValueError):
    """A dataset file that is missing, truncated, or does not match its index."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab < 65,536), else int32."""
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.int32)


def strip_suffix(path: str | os.PathLike) -> str:
    """`x.bin` / `x.idx` / `x` -> `x` (users pass any of them)."""
    p = str(path)
    for ext in (".bin", ".idx", ".mask"):
        if p.endswith(ext):
            return p[: -len(ext)]
    return p


def dataset_paths(prefix: str) -> dict[str, Path]:
    return {ext: Path(f"{prefix}.{ext}") for ext in ("bin", "idx", "mask")}


class IndexedDatasetBuilder:
    """Appends documents to temporary files; `finalize()` renames the complete set into place."""

    def __init__(self, prefix: str, vocab_size: int, task: str = "pretrain") -> None:
        if task not in TASKS.values():
            raise ValueError(f"task {task!r} is not one of {list(TASKS.values())}")
        self.prefix = strip_suffix(prefix)
        self.vocab_size = vocab_size
        self.task = task
        self.dtype = dtype_for_vocab(vocab_size)
        self.paths = dataset_paths(self.prefix)
        self._tmp = {k: p.with_name(f"{p.name}.tmp{os.getpid()}") for k, p in self.paths.items()}
        self.paths["bin"].parent.mkdir(parents=True, exist_ok=True)
        self._bin = open(self._tmp["bin"], "wb")
        self._mask = open(self._tmp["mask"], "wb") if task != "pretrain" else None
        self._lengths = array("Q")
        self.num_tokens = 0

    def add_document(self, tokens: Sequence[int], mask: Optional[Sequence[int]] = None) -> None:
        """Append one document (its tokens already end with the end-of-document id)."""
        ids = np.asarray(tokens, dtype=np.int64)
        self.add_documents(ids, np.array([len(ids)]), None if mask is None else np.asarray(mask))

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray, mask: Optional[np.ndarray] = None) -> None:
        """Append several documents given as one concatenated token array and their lengths."""
        if len(lengths) == 0:
            return
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size}) after document {len(self._lengths)}")
        if int(np.sum(lengths)) != tokens.size:
            raise ValueError("document lengths do not add up to the number of tokens")
        self._bin.write(tokens.astype(self.dtype, copy=False).tobytes())
        if self._mask is not None:
            if mask is None or len(mask) != tokens.size:
                raise ValueError(f"{self.task} documents need a loss mask as long as their tokens")
            self._mask.write(np.asarray(mask, dtype=np.uint8).tobytes())
        self._lengths.frombytes(np.asarray(lengths, dtype=np.uint64).tobytes())
        self.num_tokens += int(tokens.size)

    @property
    def num_documents(self) -> int:
        return len(self._lengths)

    def finalize(self) -> None:
        self._bin.close()
        if self._mask is not None:
            self._mask.close()
        offsets = np.zeros(len(self._lengths) + 1, dtype=np.uint64)
        np.cumsum(np.frombuffer(self._lengths, dtype=np.uint64), out=offsets[1:])
        code = {v: k for k, v in DTYPES.items()}[self.dtype]
        task = {v: k for k, v in TASKS.items()}[self.task]
        with open(self._tmp["idx"], "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, code, task, self.vocab_size, len(self._lengths), self.num_tokens))
            f.write(offsets.tobytes())
            f.flush()
            os.fsync(f.fileno())
        # Drop the old index first: between the renames below no stale pair can look complete.
        self.paths["idx"].unlink(missing_ok=True)
        names = ["bin", "mask", "idx"] if self._mask is not None else ["bin", "idx"]
        if self._mask is None:
            self.paths["mask"].unlink(missing_ok=True)
        for k in names:
            os.replace(self._tmp[k], self.paths[k])

    def abort(self) -> None:
        """Close and delete the temporary files (after an error)."""
        for f in (self._bin, self._mask):
            if f is not None:
                f.close()
        for p in self._tmp.values():
            p.unlink(missing_ok=True)


class IndexedDataset:
    """Read-only view of a `.bin`/`.idx` pair through `numpy.memmap`; every size is checked."""

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = strip_suffix(prefix)
        paths = dataset_paths(self.prefix)
        idx_path, bin_path = paths["idx"], paths["bin"]
        for p in (idx_path, bin_path):
            if not p.is_file():
                raise IndexedDatasetError(f"{p}: file not found (an indexed dataset needs {bin_path.name} "
                                          f"and {idx_path.name}; make them with tools/preprocess_data.py)")
        idx_size = idx_path.stat().st_size
        with open(idx_path, "rb") as f:
            raw = f.read(_HEADER.size)
        if len(raw) < _HEADER.size:
            raise IndexedDatasetError(f"{idx_path}: truncated header ({idx_size} bytes, need {_HEADER.size})")
        magic, version, code, task, vocab, ndocs, ntokens = _HEADER.unpack(raw)
        if magic != MAGIC:
            raise IndexedDatasetError(f"{idx_path}: wrong magic {magic!r} (expected {MAGIC!r}); "
                                      "not an IronCore index file")
        if version != VERSION:
            raise IndexedDatasetError(f"{idx_path}: format version {version} is not supported (expected {VERSION})")
        if code not in DTYPES:
            raise IndexedDatasetError(f"{idx_path}: unknown dtype code {code} (allowed: "
                                      f"{ {k: v.name for k, v in DTYPES.items()} })")
        if task not in TASKS:
            raise IndexedDatasetError(f"{idx_path}: unknown task code {task} (allowed: {TASKS})")
        self.dtype, self.task, self.vocab_size = DTYPES[code], TASKS[task], vocab
        if vocab > np.iinfo(self.dtype).max + 1:
            raise IndexedDatasetError(f"{idx_path}: dtype {self.dtype.name} cannot hold ids of vocabulary {vocab}")
        expected_idx = _HEADER.size + 8 * (ndocs + 1)
        if idx_size != expected_idx:
            raise IndexedDatasetError(f"{idx_path}: size {idx_size} bytes, but the header's {ndocs} documents "
                                      f"need {expected_idx} (truncated or corrupt index)")
        expected_bin = ntokens * self.dtype.itemsize
        if bin_path.stat().st_size != expected_bin:
            raise IndexedDatasetError(
                f"{bin_path}: size {bin_path.stat().st_size} bytes does not match {idx_path.name} "
                f"({ntokens} tokens x {self.dtype.itemsize} bytes as {self.dtype.name} = {expected_bin}); "
                "truncated, or the pair was written with a different dtype")
        self.offsets = np.memmap(idx_path, dtype=np.uint64, mode="r", offset=_HEADER.size, shape=(ndocs + 1,))
        if self.offsets[0] != 0 or self.offsets[-1] != ntokens or np.any(np.diff(self.offsets.astype(np.int64)) < 0):
            raise IndexedDatasetError(f"{idx_path}: document offsets are inconsistent with {ntokens} tokens")
        self.tokens = (np.memmap(bin_path, dtype=self.dtype, mode="r", shape=(ntokens,))
                       if ntokens else np.zeros(0, dtype=self.dtype))
        self.mask: Optional[np.ndarray] = None
        if self.task != "pretrain":
            mask_path = paths["mask"]
            if not mask_path.is_file() or mask_path.stat().st_size != ntokens:
                size = mask_path.stat().st_size if mask_path.is_file() else "missing"
                raise IndexedDatasetError(f"{mask_path}: {size} (expected {ntokens} bytes of loss mask for "
                                          f"this {self.task} dataset)")
            self.mask = (np.memmap(mask_path, dtype=np.uint8, mode="r", shape=(ntokens,))
                         if ntokens else np.zeros(0, dtype=np.uint8))
        self.num_documents = int(ndocs)
        self.num_tokens = int(ntokens)
        self.doc_lengths = np.diff(self.offsets.astype(np.int64))
        _check_token_ids(bin_path, idx_path, self.tokens, vocab)

    def __len__(self) -> int:
        return self.num_documents

    def document(self, d: int) -> np.ndarray:
        return self.tokens[int(self.offsets[d]): int(self.offsets[d + 1])]

    def document_mask(self, d: int) -> np.ndarray:
        assert self.mask is not None, "pretrain datasets have no loss mask"
        return self.mask[int(self.offsets[d]): int(self.offsets[d + 1])]


_SCAN_CHUNK = 1 << 24  # tokens per step of the range scan (32-64 MB of memmap at a time)


def _check_token_ids(bin_path: Path, idx_path: Path, tokens: np.ndarray, vocab: int) -> None:
    """Every id in ``tokens`` must be a token of the header's vocabulary: an id past it would index
    past the real embedding rows (or into the padding) and train silently on garbage.

    The scan reads the whole file once; a pair that passed is remembered (by its files' sizes and
    modification times) in ``$IRONCORE_CACHE_DIR/verified/``, so later opens cost nothing.
    """
    if vocab > np.iinfo(tokens.dtype).max and np.iinfo(tokens.dtype).min >= 0:
        return  # no stored id can be out of range
    marker = _verified_marker(bin_path, idx_path, vocab)
    if marker is not None and marker.is_file():
        return
    for start in range(0, len(tokens), _SCAN_CHUNK):
        chunk = tokens[start:start + _SCAN_CHUNK]
        bad = np.flatnonzero((chunk >= vocab) | (chunk < 0)) if chunk.size else []
        if len(bad):
            position = start + int(bad[0])
            raise IndexedDatasetError(
                f"{bin_path}: token id {int(tokens[position])} at position {position} is outside the vocabulary of "
                f"{idx_path.name} ({vocab} ids): the file is damaged or was written for another tokenizer; "
                "re-run tools/preprocess_data.py")
    if marker is not None:
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        except OSError:
            pass  # an unwritable cache only means the scan is repeated next time


def _verified_marker(bin_path: Path, idx_path: Path, vocab: int) -> Optional[Path]:
    import hashlib

    from ironcore.data.cache import cache_dir  # cache builds on this module: imported when used

    try:
        stats = [(p.resolve(), p.stat().st_size, p.stat().st_mtime_ns) for p in (bin_path, idx_path)]
    except OSError:
        return None
    digest = hashlib.sha256(f"{stats}|{vocab}|v{VERSION}".encode()).hexdigest()[:24]
    return cache_dir() / "verified" / f"{bin_path.stem}-{digest}"


def is_complete(prefix: str) -> bool:
    """True when the pair (and mask) exist and pass every header and size check."""
    try:
        IndexedDataset(prefix)
    except IndexedDatasetError:
        return False
    return True
