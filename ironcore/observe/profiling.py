"""Profiling windows and named ranges: Nsight Systems capture ranges, torch.profiler traces,
NVTX / ``record_function`` ranges and CUDA memory snapshots.

The window is ``utils.profile_step_start <= step < utils.profile_step_end`` in the step numbers the
console prints (the first step is 1), on the ranks in ``utils.profile_ranks``:

* ``profile_nsys``: ``cudaProfilerStart/Stop`` bracket the window, so
  ``nsys profile --capture-range=cudaProfilerApi`` records only those steps;
* ``profile_torch``: a ``torch.profiler`` session records the window and writes a Chrome/Perfetto
  trace to ``<trainer.model_path or .>/profile/rank{R}_step{first}-{last}.json``, named by the first
  and last step it holds (and a copy in the TensorBoard profiler plugin's layout,
  ``<utils.tensorboard_dir>/profile/*.pt.trace.json``);
* ``profile_memory`` (CUDA): the allocator's history over the window, dumped as
  ``rank{R}_step{first}-{last}.memory.pickle`` for https://pytorch.org/memory_viz.

Every step is a ``ProfilerStep#N`` range (N as the console numbers it) and its phases are `phase`
ranges with the same names in NVTX and torch traces (`PHASES`). ``utils.stop_on_profile_end`` ends
the run after the window's last step. Without CUDA, NVTX, nsys and memory snapshots are no-ops
(said once in the log); the torch profiler works on CPU too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path
from typing import ContextManager, Optional

import torch

logger = logging.getLogger(__name__)

# The names `phase` is called with, so traces from every layout read the same (profile_summary uses them).
# "forward" covers a micro-batch's forward on one model chunk, its loss included (pipeline._Runner.forward).
PHASES = ("forward", "backward", "optimizer", "grad-reduce", "reference", "eval", "test", "checkpoint",
          "pp-send-forward", "pp-recv-forward", "pp-send-backward", "pp-recv-backward",
          "tp-all-reduce", "tp-all-gather", "tp-reduce-scatter", "cp-all-gather", "cp-ring-shift", "cp-ring-wait")
STEP_PREFIX = "ProfilerStep#"
_MEMORY_HISTORY_ENTRIES = 100_000  # allocator events kept; bounds the snapshot's size


def phase(name: str) -> ContextManager:
    """A named range, visible both in nsys (NVTX, on CUDA) and in torch.profiler traces.
    ``record_function`` costs about a microsecond when no profiler is running."""
    stack = contextlib.ExitStack()
    if torch.cuda.is_available():
        stack.enter_context(torch.cuda.nvtx.range(name))
    stack.enter_context(torch.profiler.record_function(name))
    return stack


def comm_phase(name: str) -> ContextManager:
    """`phase` for communication inside the model (TP / CP collectives): nothing while torch.compile
    traces (a range there would break the graph; compiled regions show as one range anyway)."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return phase(name)


class Profiler:
    """Call ``step_begin(n)`` before and ``step_end(n)`` after training step ``n`` (numbered as the
    console numbers it, from 1); ``step_end`` returns True when the run should stop
    (``stop_on_profile_end`` and ``n`` was the window's last step)."""

    def __init__(self, utils, rank: int, output_dir: Optional[str], layout: Optional[dict] = None):
        self.start, self.end = utils.profile_step_start, utils.profile_step_end
        wanted = (utils.profile_nsys or utils.profile_torch or utils.profile_memory) and rank in list(utils.profile_ranks)
        cuda = torch.cuda.is_available()
        self.nsys = wanted and utils.profile_nsys and cuda
        self.torch = wanted and utils.profile_torch
        self.memory = wanted and utils.profile_memory and cuda
        self.stop_on_end = utils.stop_on_profile_end and (utils.profile_nsys or utils.profile_torch
                                                          or utils.profile_memory)
        self.rank, self.output_dir, self.tensorboard_dir = rank, Path(output_dir or "."), utils.tensorboard_dir
        # Written into the trace as "ironcore", for profile_summary (e.g. pp, microbatches, virtual_stages).
        self.layout = {"rank": rank, **(layout or {})}
        self.first = self.last = None  # the steps the window actually held (a resume may start inside it)
        self._session = None
        self._nsys_on = self._memory_on = False
        self._step_range: Optional[ContextManager] = None
        if wanted and not cuda and (utils.profile_nsys or utils.profile_memory):
            logger.info("profile_nsys / profile_memory: no CUDA device, Nsight capture range, NVTX ranges "
                        "and memory snapshots are no-ops")
        if self.start >= self.end and wanted:
            logger.warning("profiling window is empty: utils.profile_step_start (%d) >= utils.profile_step_end (%d)",
                           self.start, self.end)

    def step_begin(self, step: int) -> None:
        """Open step ``step``'s ``ProfilerStep#`` range (every step, so nsys timelines are numbered
        too) and, at the window's first step, start the recorders."""
        if self.start <= step < self.end and self.first is None and (self.nsys or self.torch or self.memory):
            self.first = step
            self._start(step)
        if self.first is not None and step < self.end:
            self.last = step
        self._step_range = phase(f"{STEP_PREFIX}{step}")
        self._step_range.__enter__()

    def step_end(self, step: int) -> bool:
        if self._step_range is not None:
            self._step_range.__exit__(None, None, None)
            self._step_range = None
        if step + 1 != self.end:
            return False
        self.close()
        return self.stop_on_end

    def _start(self, step: int) -> None:
        if self.nsys:
            torch.cuda.cudart().cudaProfilerStart()
            self._nsys_on = True
            logger.info("nsys capture started at step %d", step)
        if self.memory:
            torch.cuda.memory._record_memory_history(max_entries=_MEMORY_HISTORY_ENTRIES)
            self._memory_on = True
            logger.info("CUDA memory history recording started at step %d", step)
        if self.torch:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._session = torch.profiler.profile(activities=activities, record_shapes=True)
            self._session.__enter__()
            logger.info("torch.profiler started at step %d", step)

    def path(self, suffix: str) -> Path:
        """``<output>/profile/rank{R}_step{first}-{last}{suffix}``, named by the steps it holds."""
        return self.output_dir / "profile" / f"rank{self.rank}_step{self.first}-{self.last}{suffix}"

    def close(self) -> None:
        """End an open window (also called when training ends inside it)."""
        if self._step_range is not None:  # an exception inside a step
            self._step_range.__exit__(None, None, None)
            self._step_range = None
        if self._nsys_on:
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStop()
            logger.info("nsys capture stopped")
            self._nsys_on = self.nsys = False
        if self._memory_on:
            path = self.path(".memory.pickle")
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.cuda.memory._dump_snapshot(str(path))
            torch.cuda.memory._record_memory_history(enabled=None)
            logger.info("CUDA memory snapshot: %s", path)
            self._memory_on = self.memory = False
        if self._session is not None:
            self._session.__exit__(None, None, None)
            path = self.path(".json")
            path.parent.mkdir(parents=True, exist_ok=True)
            self._session.export_chrome_trace(str(path))
            trace = json.loads(path.read_text())
            trace["ironcore"] = self.layout
            path.write_text(json.dumps(trace))
            logger.info("torch.profiler trace: %s", path)
            if self.tensorboard_dir:  # the plugin reads <logdir>/<run>/<worker>.pt.trace.json
                board = Path(self.tensorboard_dir) / "profile" / path.with_suffix(".pt.trace.json").name
                board.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, board)
            self._session = None
            self.torch = False
