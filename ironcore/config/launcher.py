"""The launcher's view of this process, read in one place.

torchrun sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; SLURM's ``srun`` sets ``SLURM_PROCID``/
``SLURM_NTASKS``/``SLURM_LOCALID``; without either this is a single process (rank 0 of 1). Validation
(batch arithmetic, layout rules) and ``parallel.state.init_distributed`` both read these variables
through ``launcher_vars`` so the world size a config is checked against is the one the run uses.
"""

from __future__ import annotations

import os

# Per key, the variables that may carry it, torchrun's first.
LAUNCHER_VARS: dict[str, tuple[str, str]] = {
    "rank": ("RANK", "SLURM_PROCID"),
    "world_size": ("WORLD_SIZE", "SLURM_NTASKS"),
    "local_rank": ("LOCAL_RANK", "SLURM_LOCALID"),
}
SINGLE_PROCESS = {"rank": 0, "world_size": 1, "local_rank": 0}


def launcher_vars() -> dict[str, tuple[str, str]]:
    """``{key: (variable name, raw value)}`` for each of rank/world_size/local_rank the launcher set."""
    found = {}
    for key, names in LAUNCHER_VARS.items():
        name = next((n for n in names if os.environ.get(n)), None)
        if name is not None:
            found[key] = (name, os.environ[name])
    return found


def launch_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as the launcher set them (single process: 0, 1, 0)."""
    found = launcher_vars()
    values = {key: int(found[key][1]) if key in found else SINGLE_PROCESS[key] for key in LAUNCHER_VARS}
    return values["rank"], values["world_size"], values["local_rank"]
