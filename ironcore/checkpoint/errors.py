"""The one error type of checkpoint loading and saving, and the one way a checkpoint file is read
(shared by ``io`` and ``distributed``)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be saved or loaded: corrupted, incomplete, unsafe or for another model.

    The message is one line naming the file; the command line prints it and exits with status 1.
    """


def one_line(error: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line, cut at ``limit`` characters (loader messages can be pages)."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[:limit] + "..."


def load_file(path: Path) -> Any:
    """``torch.load(weights_only=True)`` of a checkpoint file; CheckpointError naming it when it is
    not a file of tensors and plain data (never retried without ``weights_only``)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"checkpoint file {path} cannot be loaded: it is not a file of tensors and plain "
                              "data (torch.load with weights_only=True refused it)") from None
    except Exception as e:  # noqa: BLE001 - whatever a damaged file makes the reader raise
        raise CheckpointError(f"checkpoint file {path} cannot be loaded ({one_line(e)})") from None
