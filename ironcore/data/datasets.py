"""Pretrain, SFT and DPO datasets over an indexed dataset, and `build_datasets` from the config.

Every sample is a dict of numpy arrays with the model's shifted layout: `input_ids = tokens[:-1]`,
`labels = tokens[1:]`, `loss_mask` (float, 1 where the label is trained on), `position_ids`.

- Pretrain: the split's documents (each ending with EOD) form one token stream, cut into samples of
  `max_seq_len + 1` tokens that overlap by one token, so every token is a label exactly once.
- SFT: the loss mask is the stored mask of the label token: 0 when it is a prompt token, 1 when it
  is a response token or the closing EOD. With `pad_to_max_length: false` examples are packed
  greedily into rows of `max_seq_len` positions, with `segment_ids` (1, 2, ... per example, 0 on
  padding) so attention never crosses examples, and `position_ids` restarting per example. With
  `pad_to_max_length: true` each row holds one example padded to `max_seq_len`.
- DPO: prompt+chosen and prompt+rejected, each with its mask, padded to the same length (the longest
  of the micro-batch, or `max_seq_len` with `pad_to_max_length`).
Examples longer than `max_seq_len + 1` tokens are truncated. Padding uses `pad_token_id` (the EOD id
when -1) with loss mask 0.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ironcore.config import ConfigError
from ironcore.config.schema import Config
from ironcore.data.blend import BlendedDataset, split_documents
from ironcore.data.cache import RAW_SUFFIXES, cached_dataset
from ironcore.data.indexed import IndexedDataset, strip_suffix
from ironcore.data.tokenizer import Tokenizer, resolve_vocab_size

logger = logging.getLogger(__name__)


def _shifted(tokens: np.ndarray, mask: Optional[np.ndarray]) -> dict:
    t = tokens.astype(np.int64)
    loss = np.ones(len(t) - 1, np.float32) if mask is None else mask[1:].astype(np.float32)
    return {"input_ids": t[:-1], "labels": t[1:], "loss_mask": loss,
            "position_ids": np.arange(len(t) - 1, dtype=np.int64)}


class _Base(torch.utils.data.Dataset):
    pad_id: int = 0

    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        """Stack samples into Long/Float tensors, right-padding any ragged field."""
        out = {}
        for key in samples[0]:
            arrays = [s[key] for s in samples]
            width = max(len(a) for a in arrays)
            fill = self.pad_id if key.endswith(("input_ids", "labels")) else 0
            batch = np.full((len(arrays), width), fill, dtype=arrays[0].dtype)
            for row, a in enumerate(arrays):
                batch[row, : len(a)] = a
            out[key] = torch.from_numpy(batch)
        return out


class PretrainDataset(_Base):
    """Samples of `seq_len + 1` tokens packed across the given documents (in order)."""

    def __init__(self, data: IndexedDataset, documents: np.ndarray, seq_len: int) -> None:
        self.data, self.documents, self.seq_len = data, np.asarray(documents, np.int64), seq_len
        self.cum = np.concatenate([[0], np.cumsum(data.doc_lengths[self.documents])]).astype(np.int64)
        self.num_samples = max(0, int(self.cum[-1] - 1) // seq_len)

    def __len__(self) -> int:
        return self.num_samples

    def tokens(self, i: int) -> np.ndarray:
        """Tokens [i * seq_len, (i + 1) * seq_len + 1) of the documents' stream."""
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range [0, {self.num_samples})")
        start, end = i * self.seq_len, (i + 1) * self.seq_len + 1
        k = int(np.searchsorted(self.cum, start, side="right")) - 1
        pieces = []
        while start < end:
            doc_start = int(self.cum[k])
            doc = self.data.document(int(self.documents[k]))
            piece = doc[start - doc_start: end - doc_start]
            pieces.append(piece)
            start += len(piece)
            k += 1
        return np.concatenate(pieces)

    def __getitem__(self, i: int) -> dict:
        return _shifted(self.tokens(i), None)


class SFTDataset(_Base):
    """Prompt/response examples with the loss mask; packed rows with segment_ids, or one per row."""

    def __init__(self, data: IndexedDataset, documents: np.ndarray, seq_len: int, pad_id: int,
                 packed: bool) -> None:
        self.data, self.seq_len, self.pad_id, self.packed = data, seq_len, pad_id, packed
        docs = np.asarray(documents, np.int64)
        positions = np.minimum(data.doc_lengths[docs], seq_len + 1) - 1  # label positions per example
        docs, positions = docs[positions > 0], positions[positions > 0]
        self.rows = self._pack(docs, positions) if packed else [[int(d)] for d in docs]

    def _pack(self, docs: np.ndarray, positions: np.ndarray) -> list[list[int]]:
        """Greedy in order: start a new row when the next example does not fit."""
        rows, row, used = [], [], 0
        for d, n in zip(docs.tolist(), positions.tolist()):
            if used + n > self.seq_len:
                rows.append(row)
                row, used = [], 0
            row.append(d)
            used += n
        if row:
            rows.append(row)
        return rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        parts = []
        for seg, d in enumerate(self.rows[i], start=1):
            end = self.seq_len + 1
            part = _shifted(self.data.document(d)[:end], self.data.document_mask(d)[:end])
            if self.packed:
                part["segment_ids"] = np.full(len(part["input_ids"]), seg, dtype=np.int64)
            parts.append(part)
        sample = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        pad = self.seq_len - len(sample["input_ids"])
        for key, arr in sample.items():
            fill = self.pad_id if key in ("input_ids", "labels") else 0
            sample[key] = np.concatenate([arr, np.full(pad, fill, dtype=arr.dtype)])
        return sample


class DPODataset(_Base):
    """Pairs (prompt+chosen, prompt+rejected) stored as consecutive documents 2p and 2p+1."""

    def __init__(self, data: IndexedDataset, pairs: np.ndarray, seq_len: int, pad_id: int,
                 pad_to_max_length: bool) -> None:
        self.data, self.pairs, self.seq_len = data, np.asarray(pairs, np.int64), seq_len
        self.pad_id, self.pad_to_max_length = pad_id, pad_to_max_length

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        sample = {}
        for name, d in (("chosen", 2 * int(self.pairs[i])), ("rejected", 2 * int(self.pairs[i]) + 1)):
            end = self.seq_len + 1
            part = _shifted(self.data.document(d)[:end], self.data.document_mask(d)[:end])
            for key in ("input_ids", "labels", "loss_mask"):
                sample[f"{name}_{key}"] = part[key]
        return sample

    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        """Chosen and rejected share one width so a trainer can run them in one forward pass."""
        width = self.seq_len if self.pad_to_max_length else max(len(a) for s in samples for a in s.values())
        padded = []
        for s in samples:
            row = {}
            for key, arr in s.items():
                fill = self.pad_id if key.endswith(("input_ids", "labels")) else 0
                row[key] = np.concatenate([arr, np.full(width - len(arr), fill, dtype=arr.dtype)])
            padded.append(row)
        return super().collate(padded)


# ---- from the config ---------------------------------------------------------------------------

def _entries(value, key: str) -> list[tuple[str, float]]:
    """Validate `[{path, weight}, ...]`; returns (path, weight) pairs."""
    form = "a list of mappings like [{path: data/owt/owt_text_document, weight: 1.0}]"
    if not isinstance(value, list) or not value:
        raise ConfigError([f"{key}: expected {form}, got {value!r}"])
    out = []
    for i, entry in enumerate(value):
        if not isinstance(entry, dict) or "path" not in entry or not isinstance(entry["path"], str):
            raise ConfigError([f"{key}[{i}]: expected a mapping with a string `path` ({form}), got {entry!r}"])
        unknown = set(entry) - {"path", "weight"}
        if unknown:
            raise ConfigError([f"{key}[{i}]: unknown key(s) {sorted(unknown)} (allowed: path, weight)"])
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            raise ConfigError([f"{key}[{i}].weight: must be a positive number, got {weight!r}"])
        out.append((entry["path"], float(weight)))
    return out


def open_dataset(path: str, cfg: Config, tokenizer: Tokenizer, key: str) -> IndexedDataset:
    """An indexed dataset from a prefix, or from a raw .txt/.jsonl file through the token cache."""
    task = cfg.data.task_type or "pretrain"
    p = Path(path).expanduser()
    if p.suffix in RAW_SUFFIXES:
        if not p.is_file():
            raise ConfigError([f"{key}: {p}: file not found"])
        prefix = cached_dataset(p, cfg.model.tokenizer_type, cfg.model.vocab_name_or_path, tokenizer, task)
    else:
        prefix = strip_suffix(p)
    data = IndexedDataset(prefix)
    if data.task != task:
        raise ConfigError([f"{key}: {prefix} was prepared for task {data.task!r} but data.task_type is {task!r}"])
    if data.vocab_size != tokenizer.vocab_size:
        raise ConfigError([f"{key}: {prefix} was tokenized with a vocabulary of {data.vocab_size}, but the "
                           f"model's tokenizer ({tokenizer.name}) has {tokenizer.vocab_size}; "
                           "re-run tools/preprocess_data.py with the model's tokenizer"])
    return data


def _make(data: IndexedDataset, units: np.ndarray, cfg: Config, pad_id: int):
    task, seq_len = data.task, cfg.model.max_seq_len
    if task == "pretrain":
        return PretrainDataset(data, units, seq_len)
    if task == "sft":
        return SFTDataset(data, units, seq_len, pad_id, packed=not cfg.data.pad_to_max_length)
    return DPODataset(data, units, seq_len, pad_id, cfg.data.pad_to_max_length)


def _units(data: IndexedDataset) -> int:
    """Split units: documents, or pairs for DPO."""
    return data.num_documents // 2 if data.task == "dpo" else data.num_documents


def _blend(parts: list, weights: list[float], seed: int):
    kept = [(d, w) for d, w in zip(parts, weights) if len(d) > 0]
    if not kept:
        return None
    if len(kept) == 1:
        return kept[0][0]
    return BlendedDataset([d for d, _ in kept], [w for _, w in kept], seed)


def build_datasets(cfg: Config, tokenizer: Tokenizer) -> dict[str, Optional[torch.utils.data.Dataset]]:
    """train/eval/test datasets from `cfg.data` (None where a split is empty).

    eval/test come from `data.eval_datasets` / `data.test_datasets` when set, else from the train
    datasets split at document level by `data.splits` (seeded by `init.seed`). The train split is
    the train datasets' first part unless both eval and test datasets are given.
    """
    d, seed = cfg.data, cfg.init.seed
    vocab = resolve_vocab_size(cfg, tokenizer)
    pad_id = tokenizer.eod_id if d.pad_token_id == -1 else d.pad_token_id
    if pad_id >= vocab:
        raise ConfigError([f"data.pad_token_id: {pad_id} is outside the vocabulary (size {vocab})"])
    splits = list(d.splits)
    if len(splits) != 3 or any((not isinstance(s, (int, float))) or s < 0 for s in splits) or splits[0] <= 0:
        raise ConfigError([f"data.splits: expected three non-negative ratios with train > 0, got {splits}"])
    train_entries = _entries(d.train_datasets, "data.train_datasets")
    train_data = [open_dataset(p, cfg, tokenizer, f"data.train_datasets[{i}]")
                  for i, (p, _) in enumerate(train_entries)]
    weights = [w for _, w in train_entries]
    use_split = d.eval_datasets is None or d.test_datasets is None
    parts = [split_documents(_units(x), splits if use_split else [1, 0, 0], seed) for x in train_data]
    out = {"train": _blend([_make(x, p[0], cfg, pad_id) for x, p in zip(train_data, parts)], weights, seed)}
    if out["train"] is None:
        raise ConfigError([f"data.train_datasets: no training sample of max_seq_len + 1 = {cfg.model.max_seq_len + 1} "
                           f"tokens fits in the train split of {[p for p, _ in train_entries]}"])
    for s, name in ((1, "eval"), (2, "test")):
        explicit = getattr(d, f"{name}_datasets")
        if explicit is None:
            out[name] = _blend([_make(x, p[s], cfg, pad_id) for x, p in zip(train_data, parts)], weights, seed)
        else:
            entries = _entries(explicit, f"data.{name}_datasets")
            sets = [open_dataset(p, cfg, tokenizer, f"data.{name}_datasets[{i}]") for i, (p, _) in enumerate(entries)]
            out[name] = _blend([_make(x, np.arange(_units(x)), cfg, pad_id) for x in sets],
                               [w for _, w in entries], seed)
        if out[name] is None and (explicit is not None or splits[s] > 0):
            logger.warning("the %s split holds no complete sample of %d tokens; %s is disabled",
                           name, cfg.model.max_seq_len + 1, name)
    logger.info("datasets (%s): %s", cfg.data.task_type or "pretrain",
                ", ".join(f"{k} {len(v) if v is not None else 0:,} samples" for k, v in out.items()))
    return out
