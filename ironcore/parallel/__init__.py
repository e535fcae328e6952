"""Tensor-parallel primitives: process groups, communication mappings, parallel layers, the
vocab-parallel loss and dropout RNG tracking. Knows nothing about transformers."""

from ironcore.parallel.state import ParallelState, destroy_distributed, get_parallel_state, init_distributed

__all__ = ["ParallelState", "init_distributed", "get_parallel_state", "destroy_distributed"]
