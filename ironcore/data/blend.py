"""Train/eval/test splits at document level and weighted blending of several datasets."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

SPLIT_STREAM = 0x5EED_0001  # separates the split's random stream from the samplers' ones


def split_documents(num_documents: int, splits: Sequence[float], seed: int) -> list[np.ndarray]:
    """Assign documents to train/eval/test.

    Documents are permuted deterministically from `seed`, then cut by the cumulative ratios
    (normalised to sum 1), so each part has round-off-exact size (within one document of
    ratio x documents) and no document is in two parts. Each part is returned in corpus order.
    """
    ratios = np.asarray(splits, dtype=np.float64)
    ratios = ratios / ratios.sum()
    bounds = np.concatenate([[0], np.round(np.cumsum(ratios) * num_documents).astype(np.int64)])
    bounds[-1] = num_documents
    perm = np.random.default_rng([seed, SPLIT_STREAM]).permutation(num_documents)
    return [np.sort(perm[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def blend_schedule(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Which dataset serves each of `size` blended samples, and which of its samples it is.

    Dataset j's k-th sample is placed at time (k + 1/2) / w_j and all are merged in time order
    (ties by dataset index). Every prefix of the schedule then holds each dataset's share to within
    one sample, so weights decide how often each dataset is drawn, not only the order.
    """
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    times, owner, rank = [], [], []
    for j, wj in enumerate(w):
        k = np.arange(math.ceil(wj * size) + 1, dtype=np.int64)
        times.append((k + 0.5) / wj)
        owner.append(np.full(k.size, j, dtype=np.int64))
        rank.append(k)
    times_a, owner_a, rank_a = (np.concatenate(x) for x in (times, owner, rank))
    order = np.lexsort((owner_a, times_a))[:size]
    return owner_a[order], rank_a[order]


class BlendedDataset:
    """Samples drawn from several datasets in proportion to their weights.

    One pass over the blend is the smallest size at which every dataset is drawn in full at least
    once (`max_j len_j / w_j` samples); a dataset drawn more often than its size repeats, each
    repeat in its own seeded order.
    """

    def __init__(self, datasets: Sequence, weights: Sequence[float], seed: int) -> None:
        if len(datasets) != len(weights) or not datasets:
            raise ValueError("BlendedDataset needs one weight per dataset and at least one dataset")
        if any(w <= 0 for w in weights):
            raise ValueError(f"blending weights must be positive, got {list(weights)}")
        self.datasets = list(datasets)
        total = float(sum(weights))
        self.weights = [w / total for w in weights]
        self.seed = seed
        size = max(math.ceil(len(d) / w - 1e-9) for d, w in zip(self.datasets, self.weights))
        self.dataset_index, self.sample_index = blend_schedule(self.weights, size)
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.dataset_index)

    def _inner(self, j: int, k: int) -> int:
        n = len(self.datasets[j])
        repeat, r = divmod(int(k), n)
        if repeat == 0:
            return r
        key = (j, repeat)
        if key not in self._perms:
            self._perms[key] = np.random.default_rng([self.seed, SPLIT_STREAM, j, repeat]).permutation(n)
        return int(self._perms[key][r])

    def source(self, i: int) -> int:
        """Index of the dataset that serves blended sample i."""
        return int(self.dataset_index[i])

    def __getitem__(self, i: int) -> dict:
        j = int(self.dataset_index[i])
        return self.datasets[j][self._inner(j, self.sample_index[i])]

    def collate(self, samples: list[dict]) -> dict:
        return self.datasets[0].collate(samples)
