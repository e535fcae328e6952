"""Where a run came from: the record saved next to ``config.yaml`` in every checkpoint
(``run_info.json``) and logged once to TensorBoard and MLflow.

It holds the git commit and dirty flag of the code that ran (when it runs from a git checkout),
the IronCore/Python/torch/CUDA/NCCL versions, the command line, the world layout (TP/PP/CP/DP
sizes, world size, every rank's hostname), the start time, and each config key's provenance.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

import ironcore

# The code that runs: the folder the ironcore package was imported from.
CODE_DIR = Path(ironcore.__file__).resolve().parent
_GIT_TIMEOUT_S = 10
_SET_AT_RUN_TIME = ("parallel.rank", "parallel.world_size", "parallel.local_rank")


def git_state(folder: Path) -> dict[str, Any]:
    """``{"git_commit": sha, "git_dirty": bool}`` of the checkout holding ``folder``; both None
    when it is not in one (an installed wheel) or git is not installed."""
    def git(*args: str) -> Optional[str]:
        try:
            done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True,
                                  timeout=_GIT_TIMEOUT_S, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"git_commit": None, "git_dirty": None}
    # Untracked files (outputs, caches) are not part of the code; changed tracked files are.
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit.strip(), "git_dirty": None if status is None else bool(status.strip())}


def _nccl_version() -> Optional[str]:
    if not torch.cuda.is_available():
        return None
    try:
        version = torch.cuda.nccl.version()
    except Exception:  # noqa: BLE001 - a torch built without NCCL
        return None
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def _hostnames() -> list[str]:
    """Every rank's hostname, in rank order (a collective when distributed)."""
    name = socket.gethostname()
    if not (dist.is_available() and dist.is_initialized()):
        return [name]
    names: list = [None] * dist.get_world_size()
    dist.all_gather_object(names, name)
    return names


def collect_run_info(pstate, provenance: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """This run's record. Collective (the hostnames): every rank calls it."""
    info: dict[str, Any] = {
        **git_state(CODE_DIR),
        "code_dir": str(CODE_DIR),
        "versions": {"ironcore": ironcore.__version__, "python": platform.python_version(),
                     "torch": torch.__version__, "cuda": torch.version.cuda, "nccl": _nccl_version()},
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "cwd": os.getcwd(),
        # Context parallelism is not a layout axis of the parallel state yet: 1 until it is.
        "layout": {"tp_size": pstate.tp_size, "pp_size": pstate.pp_size,
                   "cp_size": getattr(pstate, "cp_size", 1), "dp_size": pstate.dp_size,
                   "world_size": pstate.world_size, "backend": pstate.backend},
        "hostnames": _hostnames(),
        "start_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if provenance is not None:
        # init_distributed writes this process's place into the config after it was loaded.
        info["provenance"] = {**provenance, **{key: "derived (the launcher, at run time)" for key in _SET_AT_RUN_TIME}}
    return info
