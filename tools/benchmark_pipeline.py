#!/usr/bin/env python
"""The pipeline bubble of IronCore's schedules, measured against the ideal and the analytic bound.

Each of ``p`` gloo processes runs ``ironcore.parallel.pipeline.forward_backward`` (the real
schedules and batched point-to-point transfers) over stages whose compute is a fixed sleep: a
forward of ``--forward-ms`` and a backward of ``--backward-ms`` per micro-batch per rank (split
over the ``v`` chunks of the interleaved schedule). Sleeping stages need no cores, so ``p`` stages
really run concurrently even on a 2-core machine, and the measurement isolates what the schedule
and the transfers cost. The ideal step is ``m × (forward + backward)``; the bubble is the rest of
the step, compared with ``(p − 1) / (m + p − 1)`` (``(p − 1) / (v·m + p − 1)`` interleaved); what
the step takes beyond ideal + bound is reported per micro-batch (transfers, Python, sleep overshoot).

    python tools/benchmark_pipeline.py                        # p in 2 4, m in 4 8 16, all schedules
    python tools/benchmark_pipeline.py --stages 4 --microbatches 8 --schedules 1f1b

Prints one JSON object per (schedule, p, m) line, then a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402

from ironcore.parallel import pipeline  # noqa: E402
from ironcore.parallel.state import build_parallel_state  # noqa: E402

HIDDEN, SEQ = 8, 4


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, forward_s, backward_s):
        ctx.backward_s = backward_s
        time.sleep(forward_s)
        return x * 1.0

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.backward_s)
        return grad, None, None


class SleepStage(nn.Module):
    """A stage whose forward and backward take fixed times; the first builds hidden states from
    the tokens, the last returns a per-token loss."""

    def __init__(self, forward_s: float, backward_s: float, first: bool, last: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(HIDDEN))
        self.forward_s, self.backward_s, self.first, self.last = forward_s, backward_s, first, last

    def forward(self, input_ids, labels=None, position_ids=None, segment_ids=None, hidden_states=None):
        if self.first:
            hidden_states = input_ids.unsqueeze(-1).float().expand(*input_ids.shape, HIDDEN)
        out = _Sleep.apply(hidden_states * self.weight, self.forward_s, self.backward_s)
        return out.sum(-1) if self.last else out


def _worker(rank: int, world: int, port: int, args, schedule: str, microbatches: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        pstate = build_parallel_state(rank, world, rank, 1, world, torch.device("cpu"), "gloo")
        v = args.virtual if schedule == "interleaved" else 1
        stages = pipeline.pipeline_stages(v * world, world, rank, v)
        chunks = [SleepStage(args.forward_ms / 1e3 / v, args.backward_ms / 1e3 / v, s.is_first, s.is_last)
                  for s in stages]
        batch = {"input_ids": torch.ones(1, SEQ, dtype=torch.long)}
        times = []
        for _ in range(args.warmup + args.repeats):
            dist.barrier()
            start = time.perf_counter()
            pipeline.forward_backward(schedule, chunks, iter([batch] * microbatches), microbatches, pstate,
                                      lambda out, b: out.mean(), hidden_size=HIDDEN)
            dist.barrier()
            times.append(time.perf_counter() - start)
        if rank == 0:
            queue.put(statistics.median(times[args.warmup:]))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(args, schedule: str, stages: int, microbatches: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_worker, (stages, _free_port(), args, schedule, microbatches, queue), nprocs=stages,
                       start_method="spawn")
    step = queue.get(timeout=5)
    ideal = microbatches * (args.forward_ms + args.backward_ms) / 1e3
    v = args.virtual if schedule == "interleaved" else 1
    bound = (stages - 1) / (v * microbatches + stages - 1)
    predicted = ideal / (1 - bound)  # ideal work plus exactly the analytic bubble
    return {"schedule": schedule, "stages": stages, "microbatches": microbatches,
            "virtual_stages": v, "step_s": round(step, 4), "ideal_s": round(ideal, 4),
            "predicted_s": round(predicted, 4), "bubble": round((step - ideal) / step, 4), "bound": round(bound, 4),
            "overhead_ms_per_microbatch": round(1e3 * (step - predicted) / microbatches, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--microbatches", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--schedules", nargs="+", default=["gpipe", "1f1b", "interleaved"],
                        choices=pipeline.SCHEDULES)
    parser.add_argument("--virtual", type=int, default=2, help="model chunks per rank (interleaved)")
    parser.add_argument("--forward-ms", type=float, default=20.0)
    parser.add_argument("--backward-ms", type=float, default=40.0)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    rows = []
    for schedule in args.schedules:
        for p in args.stages:
            for m in args.microbatches:
                if m < p or (schedule == "interleaved" and m % p):
                    continue
                rows.append(measure(args, schedule, p, m))
                print(json.dumps(rows[-1]), flush=True)
    print("\n| schedule | p | m | v | step (s) | ideal (s) | ideal + bound (s) | bubble | bound | overhead/µb (ms) |"
          "\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['schedule']} | {r['stages']} | {r['microbatches']} | {r['virtual_stages']} | {r['step_s']:.3f} "
              f"| {r['ideal_s']:.3f} | {r['predicted_s']:.3f} | {100 * r['bubble']:.1f}% | {100 * r['bound']:.1f}% "
              f"| {r['overhead_ms_per_microbatch']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
