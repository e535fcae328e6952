"""``ironcore profile-summary PATH [--json]``: where each profiled step's time went, from the
torch.profiler traces of a run (all ranks).

PATH is a trace file, a run's ``profile/`` folder, or its ``model_path`` (the traces are
``<model_path>/profile/rank{R}_step{first}-{last}.json``, see `ironcore.observe.profiling`). Per rank
and step (the ``ProfilerStep#N`` range, N numbered as the console numbers steps) it reports, in ms:

* ``step_ms``: the length of the ``ProfilerStep#N`` range;
* ``comm_ms``: time in communication, by group, each the union of its intervals. IronCore names its
  communication (`profiling.PHASES`): ``tp-*`` ranges are TP, ``cp-*`` CP, ``pp-*`` PP,
  ``grad-reduce`` DP. A collective operator (``c10d::*``) outside those ranges is DP when it runs
  inside a ``forward``/``backward`` range (DDP's bucketed all-reduce, FSDP's all-gather and
  reduce-scatter; and, under ``trainer.compile_model``, which leaves the ``tp-*``/``cp-*`` ranges out,
  TP and CP collectives) and ``other`` elsewhere (the loss broadcast, the gradient norm's all-reduce);
  ``comm_total_ms`` is the union over the groups;
* ``compute_ms``: time covered by operators, less the communication time (the union of the
  operator intervals minus the union of the communication intervals);
* ``exposed_comm_ms``: communication time that no compute overlaps;
* ``idle_ms``: the step's time covered by neither compute nor communication (Python between
  operators, data loading outside operators, waiting).

The timeline is the training thread's CPU operators, or, when the trace has GPU kernels, the
device's: compute is then the non-NCCL kernels (and memcpy/memset) launched in the step,
communication the NCCL kernels, each given the group of the range its launch ran in, and the step
lasts until its last kernel ends. The pipeline's busy time (below) then comes from the device's
``forward``/``backward`` ranges (``gpu_user_annotation``) when the trace has them. On CPU, gloo's collectives block the training
thread, so compute and communication never overlap there and all communication is exposed; on GPU,
exposed is what the streams did not hide.

With pipeline parallelism (the traces' ``ironcore`` metadata says ``pp > 1``) and a trace from every
stage, each step also gets the pipeline bubble, measured as follows. A stage is busy while it runs a
micro-batch's ``forward`` (its loss included) or ``backward`` range of the training schedule (ranges
inside ``eval``/``test``/``reference`` do not count). The step's schedule window runs from the
earliest start of such a range on any stage to the latest end on any stage (the traces' clocks are
the host's; ranks on several hosts rely on their clocks agreeing). Per rank,
``pipeline_idle = 1 − busy / window``; the step's ``bubble`` is the busiest stage's
``pipeline_idle`` (the schedule's own bubble; what the other stages idle beyond it is stage
imbalance) and ``bubble_mean`` the mean over the stages. Next to it: the bound
``(p−1)/(m+p−1)`` for ``p`` stages and ``m`` micro-batches (``(p−1)/(v·m+p−1)`` with ``v``
interleaved virtual stages), which assumes equal-cost stages and free communication.

``top_ops``: the operators with the most self time (their time less that of the operators they
called) in the step, with their call counts.
"""

from __future__ import annotations

import argparse
import bisect
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Optional, Sequence

from ironcore.observe.profiling import STEP_PREFIX

GROUPS = ("TP", "CP", "PP", "DP", "other")
_RANGE_GROUP = (("tp-", "TP"), ("cp-", "CP"), ("pp-", "PP"), ("grad-reduce", "DP"))
_COLLECTIVE_PREFIX = "c10d::"
_BUSY = ("forward", "backward")
_NOT_TRAINING = ("eval", "test", "reference")  # forward ranges inside these are not the training schedule's
_DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
_TOP_OPS = 5

Interval = tuple[float, float]


class ProfileSummaryError(Exception):
    """PATH holds no readable trace."""


# --------------------------------------------------------------------------------------- intervals

def union(intervals: Iterable[Interval]) -> list[Interval]:
    """Sorted, disjoint intervals covering the same time."""
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def length(intervals: Iterable[Interval]) -> float:
    return sum(b - a for a, b in union(intervals))


def minus(a: Iterable[Interval], b: Iterable[Interval]) -> list[Interval]:
    """union(a) with union(b) taken out."""
    out, cut = [], union(b)
    for start, end in union(a):
        i = bisect.bisect_right(cut, (start, float("inf"))) - 1
        i = max(i, 0)
        pos = start
        while i < len(cut) and cut[i][0] < end:
            s, e = cut[i]
            if e > pos:
                if s > pos:
                    out.append((pos, s))
                pos = max(pos, e)
            i += 1
        if pos < end:
            out.append((pos, end))
    return out


class _Cover:
    """Answers "is [a, b] inside one of these intervals?" for a fixed set of intervals."""

    def __init__(self, intervals: Iterable[Interval]):
        self.parts = union(intervals)
        self.starts = [s for s, _ in self.parts]

    def contains(self, start: float, end: float) -> bool:
        i = bisect.bisect_right(self.starts, start) - 1
        return i >= 0 and self.parts[i][1] >= end


# --------------------------------------------------------------------------------------- loading

def load_traces(path: str | Path) -> list[dict]:
    """The traces under PATH (a file, a profile folder or a model_path), each with its events."""
    root = Path(path)
    if root.is_file():
        files, explicit = [root], True
    else:
        folder = root / "profile" if (root / "profile").is_dir() else root
        files, explicit = sorted(p for p in folder.glob("*.json") if p.is_file()), False
    traces = []
    for file in files:
        try:
            trace = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            if explicit:
                raise ProfileSummaryError(f"{file}: not a readable JSON trace ({type(e).__name__})") from None
            continue
        if not isinstance(trace, dict) or not isinstance(trace.get("traceEvents"), list):
            if explicit:
                raise ProfileSummaryError(f"{file}: not a torch.profiler trace (no traceEvents list)")
            continue
        trace["_file"] = str(file)
        traces.append(trace)
    if not traces:
        raise ProfileSummaryError(f"{path}: no torch.profiler trace (*.json with traceEvents) there or in its "
                                  f"profile/ folder")
    return traces


def _meta(trace: dict) -> dict:
    meta = trace.get("ironcore")
    return meta if isinstance(meta, dict) else {}


def _rank_of(trace: dict) -> int:
    meta = _meta(trace) or trace.get("distributedInfo") or {}
    return int(meta.get("rank", 0))


def _group_of_range(name: str) -> Optional[str]:
    for part in name.split("+"):  # the pipeline names a batched transfer "pp-send-forward+pp-recv-backward"
        for prefix, group in _RANGE_GROUP:
            if part.startswith(prefix):
                return group
    return None


# --------------------------------------------------------------------------------------- one step

class _Trace:
    """One rank's trace: its complete events on the host's clock (µs), split by kind."""

    def __init__(self, trace: dict):
        offset = trace.get("baseTimeNanoseconds", 0) / 1000.0
        self.rank, self.meta = _rank_of(trace), _meta(trace)
        events = []
        for e in trace["traceEvents"]:
            if e.get("ph") == "X" and isinstance(e.get("ts"), (int, float)) and isinstance(e.get("dur"), (int, float)):
                events.append({**e, "ts": e["ts"] + offset})
        self.steps = [e for e in events if e.get("cat") == "user_annotation"
                      and str(e.get("name", "")).startswith(STEP_PREFIX)]
        self.events = events
        # launches (cuda_runtime / cuda_driver) by correlation id, to give a kernel its launching range
        self.launch_ts = {e["args"]["correlation"]: e["ts"] for e in events
                          if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}


def _self_times(ops: list[dict]) -> dict[str, list[float]]:
    """name -> [self µs, calls] of operators, nesting by time within each thread (or GPU stream)."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    by_thread: dict = defaultdict(list)
    for e in ops:
        by_thread[e.get("tid")].append(e)
    for thread_ops in by_thread.values():
        stack: list[list] = []  # [end, name, time of direct children, dur]
        for e in sorted(thread_ops, key=lambda e: (e["ts"], -e["dur"])):
            while stack and stack[-1][0] <= e["ts"]:
                _, name, children, dur = stack.pop()
                totals[name][0] += dur - children
            if stack:
                stack[-1][2] += e["dur"]
            totals[e["name"]][1] += 1
            stack.append([e["ts"] + e["dur"], e["name"], 0.0, e["dur"]])
        for _, name, children, dur in stack:
            totals[name][0] += dur - children
    return totals


def _step_summary(trace: _Trace, step_event: dict) -> dict:
    start, end = step_event["ts"], step_event["ts"] + step_event["dur"]
    tid = step_event.get("tid")

    def iv(e) -> Interval:
        return (e["ts"], e["ts"] + e["dur"])

    inside = [e for e in trace.events if start <= e["ts"] and e["ts"] + e["dur"] <= end]
    host = [e for e in inside if e.get("tid") == tid]  # the training thread
    ranges = [e for e in host if e.get("cat") == "user_annotation"]
    host_ops = [e for e in host if e.get("cat") == "cpu_op"]
    # the step's kernels: those launched inside it (they may run after the host has moved on)
    device = [e for e in trace.events if e.get("cat") in _DEVICE_CATS
              and start <= trace.launch_ts.get(e.get("args", {}).get("correlation"), e["ts"]) <= end]
    if device:
        end = max(end, max(e["ts"] + e["dur"] for e in device))
    # the stage's forward/backward: on the device when the trace has them there (gpu_user_annotation)
    device_ranges = [e for e in trace.events if e.get("cat") == "gpu_user_annotation"
                     and start <= e["ts"] and e["ts"] + e["dur"] <= end]
    busy_source = device_ranges if any(e["name"] in _BUSY for e in device_ranges) else ranges

    comm: dict[str, list[Interval]] = defaultdict(list)
    for e in ranges:
        group = _group_of_range(e["name"])
        if group:
            comm[group].append(iv(e))
    named = _Cover(i for g in comm.values() for i in g)
    group_of_named = sorted((iv(e), _group_of_range(e["name"])) for e in ranges if _group_of_range(e["name"]))
    busy_ranges = _Cover(iv(e) for e in ranges if e["name"] in _BUSY)

    def group_at(a: float, b: float) -> str:
        """The group of a collective running over [a, b] outside the named ranges (see the module doc)."""
        for (s, f), group in group_of_named:
            if s <= a and b <= f:
                return group
        return "DP" if busy_ranges.contains(a, b) else "other"

    if device:  # the device's timeline
        comm = defaultdict(list)  # the host ranges only measured launches
        compute_raw = []
        for e in device:
            if "nccl" in e["name"].lower():
                at = trace.launch_ts.get(e.get("args", {}).get("correlation"), e["ts"])
                comm[group_at(at, at)].append(iv(e))
            else:
                compute_raw.append(iv(e))
        ops_for_top = device
    else:
        for e in host_ops:
            if e["name"].startswith(_COLLECTIVE_PREFIX) and not named.contains(*iv(e)):
                comm[group_at(*iv(e))].append(iv(e))
        compute_raw = [iv(e) for e in host_ops]
        ops_for_top = host_ops
    all_comm = union(i for g in comm.values() for i in g)
    compute = minus(compute_raw, all_comm) if not device else union(compute_raw)
    covered = length(compute + all_comm)
    top = sorted(_self_times(ops_for_top).items(), key=lambda kv: -kv[1][0])[:_TOP_OPS]

    training_busy = [iv(e) for e in busy_source if e["name"] in _BUSY]
    not_training = _Cover(iv(e) for e in busy_source if e["name"] in _NOT_TRAINING)
    training_busy = [i for i in training_busy if not not_training.contains(*i)]
    return {
        "step_ms": (end - start) / 1000,
        "compute_ms": length(compute) / 1000,
        "comm_ms": {g: length(comm[g]) / 1000 for g in GROUPS if comm.get(g)},
        "comm_total_ms": length(all_comm) / 1000,
        "exposed_comm_ms": length(minus(all_comm, compute)) / 1000,
        "idle_ms": (end - start - covered) / 1000,
        "top_ops": [{"name": n, "self_ms": t / 1000, "calls": int(c)} for n, (t, c) in top],
        "_busy": union(training_busy),
    }


# --------------------------------------------------------------------------------------- the run

def bubble_bound(layout: dict) -> Optional[float]:
    """``(p−1)/(v·m+p−1)`` (v = 1 unless the schedule is interleaved), None without pipelining."""
    p, m = int(layout.get("pp", 1) or 1), layout.get("microbatches")
    v = int(layout.get("virtual_stages", 1) or 1) if layout.get("schedule", "1f1b") == "interleaved" else 1
    if p <= 1 or not m:
        return None
    return (p - 1) / (v * int(m) + p - 1)


def summarize(traces: list[dict]) -> dict:
    """The summary `main` prints (see the module doc): ``{"layout", "bubble_bound", "pipeline":
    {step: {bubble, bubble_mean, window_ms}}, "ranks": {rank: {step: {...}}}}``."""
    ranks: dict[int, dict[int, dict]] = defaultdict(dict)
    stage_of: dict[int, int] = {}
    layout: dict = {}
    for raw in traces:
        trace = _Trace(raw)
        layout = layout or {k: v for k, v in trace.meta.items() if k not in ("rank", "pp_rank")}
        if "pp_rank" in trace.meta:
            stage_of[trace.rank] = int(trace.meta["pp_rank"])
        for step_event in trace.steps:
            ranks[trace.rank][int(step_event["name"][len(STEP_PREFIX):])] = _step_summary(trace, step_event)
    bound = bubble_bound(layout)
    pp = int(layout.get("pp", 1) or 1)
    pipeline: dict[int, dict] = {}
    for step in sorted({s for steps in ranks.values() for s in steps}):
        rows = {r: steps[step] for r, steps in ranks.items() if step in steps}
        busy = {r: row["_busy"] for r, row in rows.items() if row["_busy"]}
        if pp <= 1 or {stage_of.get(r) for r in busy} != set(range(pp)):
            continue  # no pipeline, or not every stage traced in this step
        lo, hi = min(b[0][0] for b in busy.values()), max(b[-1][1] for b in busy.values())
        window = hi - lo
        if window <= 0:
            continue
        for r, intervals in busy.items():
            rows[r]["pipeline_busy_ms"] = length(intervals) / 1000
            rows[r]["pipeline_idle"] = 1 - length(intervals) / window
        idles = [rows[r]["pipeline_idle"] for r in busy]
        pipeline[step] = {"bubble": min(idles), "bubble_mean": sum(idles) / len(idles), "window_ms": window / 1000}
    for steps in ranks.values():
        for row in steps.values():
            row.pop("_busy")
    return {"layout": layout, "bubble_bound": bound, "pipeline": pipeline,
            "ranks": {r: dict(sorted(ranks[r].items())) for r in sorted(ranks)}}


def format_summary(summary: dict) -> str:
    lines = []
    for rank, steps in summary["ranks"].items():
        for step, r in steps.items():
            comm = ", ".join(f"{g} {ms:.1f}" for g, ms in r["comm_ms"].items()) or "none"
            line = (f"rank {rank} step {step}: {r['step_ms']:.1f} ms = compute {r['compute_ms']:.1f} | "
                    f"comm {r['comm_total_ms']:.1f} ({comm}; exposed {r['exposed_comm_ms']:.1f}) | "
                    f"idle {r['idle_ms']:.1f}")
            if "pipeline_idle" in r:
                line += f" | pipeline: busy {r['pipeline_busy_ms']:.1f}, idle {100 * r['pipeline_idle']:.1f}%"
            lines.append(line)
            lines.append("    top ops (self ms): " + ", ".join(
                f"{o['name']} {o['self_ms']:.1f} ×{o['calls']}" for o in r["top_ops"]))
    bound = summary["bubble_bound"]
    for step, p in summary["pipeline"].items():
        lines.append(f"step {step}: pipeline bubble {100 * p['bubble']:.1f}% on the busiest stage "
                     f"(mean over stages {100 * p['bubble_mean']:.1f}%, window {p['window_ms']:.1f} ms); "
                     f"bound (p-1)/(v*m+p-1) = {100 * bound:.1f}%")
    if bound is not None and not summary["pipeline"]:
        lines.append("pipeline bubble: not measured (needs a trace of every pipeline stage in the same steps)")
    return "\n".join(lines) if lines else "no ProfilerStep# ranges in the traces"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="ironcore profile-summary",
                                     description="per rank and step: compute, communication by group, exposed "
                                                 "communication, idle, pipeline bubble and top ops, from a run's "
                                                 "torch.profiler traces")
    parser.add_argument("path", metavar="PATH", help="a trace file, a run's profile/ folder or its model_path")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    try:
        summary = summarize(load_traces(args.path))
    except ProfileSummaryError as e:
        print(f"ironcore profile-summary: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
