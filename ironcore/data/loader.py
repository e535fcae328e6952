"""Rank-aware, resumable micro-batch loader (Megatron's pretraining sampler).

The sample stream is global: epoch e visits the dataset in a permutation seeded by (seed, e), and
epochs follow each other without a gap. `consumed_samples` counts GLOBAL samples. Each draw takes
the next `micro_batch_size x dp_size` samples of the stream and data-parallel rank r keeps the r-th
contiguous slice of `micro_batch_size`. Hence ranks never share a sample within an epoch, DP=1 with
gradient accumulation 2 sees exactly what two DP ranks see in one step, and restoring
`consumed_samples` resumes at exactly the same next batch.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

SAMPLER_STREAM = 0x5EED_0002


class MicroBatchLoader(Iterator[dict]):
    """Endless iterator over this rank's micro-batches (dicts of tensors from `dataset.collate`)."""

    def __init__(self, dataset, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                 consumed_samples: int = 0, shuffle: bool = True) -> None:
        if len(dataset) == 0:
            raise ValueError("cannot load batches from an empty dataset")
        if micro_batch_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"need micro_batch_size >= 1 and 0 <= dp_rank < dp_size, got "
                             f"{micro_batch_size}, {dp_rank}, {dp_size}")
        self.dataset, self.micro_batch_size = dataset, micro_batch_size
        self.dp_rank, self.dp_size, self.seed, self.shuffle = dp_rank, dp_size, seed, shuffle
        self.consumed_samples = consumed_samples
        self._perm_epoch, self._perm = -1, np.empty(0, np.int64)

    @property
    def epoch(self) -> int:
        return self.consumed_samples // len(self.dataset)

    def _index(self, position: int) -> int:
        """Dataset index at a global stream position."""
        epoch, r = divmod(position, len(self.dataset))
        if not self.shuffle:
            return r
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, SAMPLER_STREAM, epoch])
            self._perm, self._perm_epoch = rng.permutation(len(self.dataset)), epoch
        return int(self._perm[r])

    def indices(self) -> list[int]:
        """Dataset indices of this rank's next micro-batch (without consuming it)."""
        start = self.consumed_samples + self.dp_rank * self.micro_batch_size
        return [self._index(p) for p in range(start, start + self.micro_batch_size)]

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = self.dataset.collate([self.dataset[i] for i in self.indices()])
        self.consumed_samples += self.micro_batch_size * self.dp_size
        return batch

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples = int(state["consumed_samples"])


def build_loader(dataset, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                 consumed_samples: int = 0, shuffle: bool = True) -> MicroBatchLoader:
    """This data-parallel rank's micro-batches, resumable from a global `consumed_samples`."""
    return MicroBatchLoader(dataset, micro_batch_size, dp_rank, dp_size, seed, consumed_samples, shuffle)
