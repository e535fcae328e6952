"""Profiling windows: Nsight Systems capture ranges, torch.profiler traces and NVTX ranges.

Between ``utils.profile_step_start`` (inclusive) and ``utils.profile_step_end`` (exclusive), on the
ranks in ``utils.profile_ranks``:

* ``profile_nsys``: ``cudaProfilerStart/Stop`` bracket the window, so
  ``nsys profile --capture-range=cudaProfilerApi`` records only those steps; NVTX ranges
  (``nvtx_range``) name the phases of each step in the timeline.
* ``profile_torch``: a ``torch.profiler`` session records the window and writes a Chrome/Perfetto
  trace to ``<trainer.model_path or .>/profile/rank{R}_step{start}-{end}.json``.

``utils.stop_on_profile_end`` ends the run when the window closes. Without CUDA, NVTX and nsys are
no-ops (said once in the log); the torch profiler works on CPU too.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import ContextManager

import torch

logger = logging.getLogger(__name__)


def nvtx_range(name: str) -> ContextManager:
    """An NVTX range on CUDA (visible in nsys); nothing elsewhere."""
    if torch.cuda.is_available():
        return torch.cuda.nvtx.range(name)
    return contextlib.nullcontext()


class Profiler:
    """Call ``step_begin(step)`` before and ``step_end(step)`` after each training step;
    ``step_end`` returns True when the run should stop (``stop_on_profile_end``)."""

    def __init__(self, utils, rank: int, output_dir: str):
        self.start, self.end = utils.profile_step_start, utils.profile_step_end
        wanted = (utils.profile_nsys or utils.profile_torch) and rank in list(utils.profile_ranks)
        self.nsys = wanted and utils.profile_nsys and torch.cuda.is_available()
        self.torch = wanted and utils.profile_torch
        self.stop_on_end = utils.stop_on_profile_end and (utils.profile_nsys or utils.profile_torch)
        self.trace_path = Path(output_dir or ".") / "profile" / f"rank{rank}_step{self.start}-{self.end}.json"
        self._session = None
        self._nsys_on = False
        if wanted and utils.profile_nsys and not torch.cuda.is_available():
            logger.info("profile_nsys: no CUDA device, Nsight capture range and NVTX ranges are no-ops")
        if self.start >= self.end and wanted:
            logger.warning("profiling window is empty: utils.profile_step_start (%d) >= utils.profile_step_end (%d)",
                           self.start, self.end)

    def step_begin(self, step: int) -> None:
        if step != self.start:
            return
        if self.nsys:
            torch.cuda.cudart().cudaProfilerStart()
            self._nsys_on = True
            logger.info("nsys capture started at step %d", step)
        if self.torch:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._session = torch.profiler.profile(activities=activities, record_shapes=True)
            self._session.__enter__()
            logger.info("torch.profiler started at step %d", step)

    def step_end(self, step: int) -> bool:
        if step + 1 != self.end:
            return False
        self.close()
        return self.stop_on_end

    def close(self) -> None:
        """End an open window (also called when training ends inside it)."""
        if self._nsys_on:
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStop()
            logger.info("nsys capture stopped")
            self._nsys_on = self.nsys = False
        if self._session is not None:
            self._session.__exit__(None, None, None)
            self.trace_path.parent.mkdir(parents=True, exist_ok=True)
            self._session.export_chrome_trace(str(self.trace_path))
            logger.info("torch.profiler trace: %s", self.trace_path)
            self._session = None
            self.torch = False
