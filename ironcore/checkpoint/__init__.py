"""Checkpoints: atomic full save/resume (``io``) and resharding distributed shards (``distributed``)."""

from ironcore.checkpoint.io import CheckpointError, load_checkpoint, save_checkpoint

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]
