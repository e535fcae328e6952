"""Random-number streams for dropout under tensor parallelism.

Two kinds of regions need different randomness:

* replicated regions (embedding / residual dropout without sequence parallelism) hold the same
  activations on every TP rank, so their dropout masks must match: they use torch's default
  generator, seeded identically on the ranks of a TP group;
* split regions (attention probabilities of this rank's heads, and every activation that is
  sequence-split under sequence parallelism) hold different data per rank, so each TP rank must
  draw its own mask: they run inside ``get_rng_tracker().fork()``, a separate generator state seeded
  per TP rank.

The tracker's states are plain tensors (``get_states``/``set_states``) so activation recompute can
restore them and replay the same masks.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

MODEL_PARALLEL_RNG = "model-parallel-rng"
_TP_SEED_OFFSET = 2718  # Megatron's: keeps the TP stream away from the default one


def _get_device_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_device_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class RNGStatesTracker:
    """Named generator states of one device, swapped in and out of its default generator."""

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self._states: dict[str, torch.Tensor] = {}

    def reset(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self._states = {}

    def add(self, name: str, seed: int) -> None:
        """Register a stream `name` starting from `seed` (the default generator is left untouched)."""
        if name in self._states:
            raise ValueError(f"RNG stream {name!r} already exists")
        saved = _get_device_state(self.device)
        torch.manual_seed(seed) if self.device.type == "cpu" else torch.cuda.manual_seed(seed)
        self._states[name] = _get_device_state(self.device)
        _set_device_state(self.device, saved)

    def get_states(self) -> dict[str, torch.Tensor]:
        return {name: state.clone() for name, state in self._states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._states = {name: state.clone() for name, state in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        """Run the block with stream `name` as the device's default generator, then put it back."""
        if name not in self._states:
            raise RuntimeError(f"RNG stream {name!r} is not seeded: call ironcore.parallel.random.set_random_seed first")
        saved = _get_device_state(self.device)
        _set_device_state(self.device, self._states[name])
        try:
            yield
        finally:
            self._states[name] = _get_device_state(self.device)
            _set_device_state(self.device, saved)


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    return _TRACKER


def set_random_seed(seed: int, tp_rank: int = 0, pp_rank: int = 0,
                    device: torch.device = torch.device("cpu")) -> None:
    """Seed torch (same on the ranks of a TP group; offset per pipeline stage, as Megatron) and the
    TP-rank stream of the tracker (different on every TP rank)."""
    stage_seed = seed + 100 * pp_rank
    torch.manual_seed(stage_seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(stage_seed)
    _TRACKER.reset(device)
    _TRACKER.add(MODEL_PARALLEL_RNG, stage_seed + _TP_SEED_OFFSET + tp_rank)
