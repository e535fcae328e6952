"""``ironcore profile-summary PATH [--json]``: where each profiled step's time went, from the
torch.profiler traces of a run (all ranks).

PATH is a trace file, a run's ``profile/`` folder, or its ``model_path``. Per rank and step (the
``ProfilerStep#N`` ranges, numbered as the console numbers steps) it reports, in milliseconds:

* ``compute``: time covered by operators (CPU ops, GPU kernels) outside communication;
* ``comm``: time in communication by group. IronCore names its communication ranges
  (``profiling.PHASES``): ``tp-*`` is TP, ``cp-*`` CP, ``pp-*`` PP, ``grad-reduce`` DP; a collective
  operator outside all of them (DDP's bucketed all-reduce inside ``backward``) counts as DP;
* ``exposed_comm``: communication that no compute overlaps (on CPU, where collectives block, all
  of it; on GPU, what the streams did not hide);
* ``idle``: the step's time covered by neither;
* ``pipeline_idle``: ``1 − busy / span``, where busy is the rank's time in ``forward``/``backward``
  and span runs from the earliest step start to the latest ``backward`` end over all ranks (the
  traces' clocks are the host's; ranks on several hosts rely on their clocks agreeing);
* per step, the pipeline ``bubble``: the busiest stage's ``pipeline_idle`` (the schedule's own
  bubble; what other stages idle beyond it is stage imbalance), next to its bound
  ``(p−1)/(v·m+p−1)`` for ``p`` stages, ``v`` virtual stages and ``m`` micro-batches (read from
  the trace's ``ironcore`` metadata);
* ``top_ops``: the operators with the most total time.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Optional, Sequence

from ironcore.observe.profiling import STEP_PREFIX

GROUPS = ("TP", "CP", "PP", "DP")
_RANGE_GROUP = (("tp-", "TP"), ("cp-", "CP"), ("pp-", "PP"), ("grad-reduce", "DP"))
_COLLECTIVE_PREFIXES = ("c10d::", "gloo:", "nccl:", "record_param_comms")
_TOP_OPS = 5

Interval = tuple[float, float]


class ProfileSummaryError(Exception):
    """PATH holds no readable trace."""


def _union(intervals: Iterable[Interval]) -> list[Interval]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def _length(intervals: Iterable[Interval]) -> float:
    return sum(b - a for a, b in _union(intervals))


def _minus(a: list[Interval], b: list[Interval]) -> float:
    """Length of union(a) not covered by union(b)."""
    return _length(a) - _length(_clip_to(a, b))


def _clip_to(a: list[Interval], b: list[Interval]) -> list[Interval]:
    """The parts of b inside union(a)."""
    out = []
    for s, e in _union(b):
        for x, y in _union(a):
            lo, hi = max(s, x), min(e, y)
            if lo < hi:
                out.append((lo, hi))
    return out


def _group_of_range(name: str) -> Optional[str]:
    for part in name.split("+"):
        for prefix, group in _RANGE_GROUP:
            if part.startswith(prefix):
                return group
    return None


def _inside(interval: Interval, ranges: list[Interval]) -> bool:
    return any(s <= interval[0] and interval[1] <= e for s, e in ranges)


def load_traces(path: str | Path) -> list[dict]:
    """The traces under PATH (file, profile folder or model_path), each with its events."""
    root = Path(path)
    if root.is_file():
        files = [root]
    else:
        folder = root / "profile" if (root / "profile").is_dir() else root
        files = sorted(p for p in folder.glob("*.json") if p.is_file())
    if not files:
        raise ProfileSummaryError(f"{path}: no torch.profiler trace (*.json) there or in its profile/ folder")
    traces = []
    for file in files:
        try:
            trace = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ProfileSummaryError(f"{file}: not a readable JSON trace ({type(e).__name__})") from None
        if not isinstance(trace, dict) or not isinstance(trace.get("traceEvents"), list):
            raise ProfileSummaryError(f"{file}: not a torch.profiler trace (no traceEvents list)")
        trace["_file"] = str(file)
        traces.append(trace)
    return traces


def _rank_of(trace: dict) -> int:
    meta = trace.get("ironcore") or trace.get("distributedInfo") or {}
    return int(meta.get("rank", 0))


def _spans(trace: dict) -> tuple[float, list[dict]]:
    """(clock offset in µs, the complete events) of one trace."""
    offset = trace.get("baseTimeNanoseconds", 0) / 1000.0
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "dur" in e and "ts" in e]
    return offset, events


def _step_summary(events: list[dict], offset: float, start: float, end: float) -> dict:
    def iv(e):
        return (e["ts"] + offset, e["ts"] + offset + e["dur"])

    inside = [e for e in events if start <= e["ts"] + offset and e["ts"] + offset + e["dur"] <= end]
    annotations = [e for e in inside if e.get("cat") in ("user_annotation", "gpu_user_annotation")]
    comm: dict[str, list[Interval]] = defaultdict(list)
    for e in annotations:
        group = _group_of_range(e["name"])
        if group:
            comm[group].append(iv(e))
    named = [i for g in comm.values() for i in g]
    ops = [e for e in inside if e.get("cat") in ("cpu_op", "kernel", "gpu_memcpy", "gpu_memset")]
    compute = []
    for e in ops:
        if e["name"].startswith(_COLLECTIVE_PREFIXES) or "nccl" in e["name"].lower():
            if not _inside(iv(e), named):
                comm["DP"].append(iv(e))
        elif not _inside(iv(e), named):
            compute.append(iv(e))
    all_comm = [i for g in comm.values() for i in g]
    totals: dict[str, float] = defaultdict(float)
    for e in ops:
        totals[e["name"]] += e["dur"]
    busy = [iv(e) for e in annotations if e["name"] in ("forward", "backward")]
    return {
        "step_ms": (end - start) / 1000,
        "compute_ms": _length(compute) / 1000,
        "comm_ms": {g: _length(comm[g]) / 1000 for g in GROUPS if comm.get(g)},
        "exposed_comm_ms": _minus(all_comm, compute) / 1000,
        "idle_ms": (end - start - _length(compute + all_comm)) / 1000,
        "top_ops": [{"name": n, "ms": t / 1000} for n, t in sorted(totals.items(), key=lambda x: -x[1])[:_TOP_OPS]],
        "_busy": _length(busy), "_last_backward": max((b for a, b in busy), default=None), "_start": start,
    }


def _bound(meta: dict) -> Optional[float]:
    p, m, v = meta.get("pp", 1), meta.get("microbatches"), meta.get("virtual_stages", 1) or 1
    if p <= 1 or not m:
        return None
    return (p - 1) / (v * m + p - 1)


def summarize(traces: list[dict]) -> dict:
    """``{"ranks": {rank: {step: {...}}}, "bubble_bound": float | None}`` (see the module doc)."""
    ranks: dict[int, dict[int, dict]] = {}
    for trace in traces:
        offset, events = _spans(trace)
        steps = {}
        for e in events:
            if e["name"].startswith(STEP_PREFIX) and e.get("cat") in ("user_annotation", "cpu_op"):
                start = e["ts"] + offset
                steps[int(e["name"][len(STEP_PREFIX):])] = _step_summary(events, offset, start, start + e["dur"])
        ranks[_rank_of(trace)] = steps
    meta = next((t["ironcore"] for t in traces if isinstance(t.get("ironcore"), dict)), {})
    bound = _bound(meta)
    bubbles: dict[int, float] = {}
    for step in sorted({s for steps in ranks.values() for s in steps}):
        rows = [steps[step] for steps in ranks.values() if step in steps]
        ends = [r["_last_backward"] for r in rows if r["_last_backward"] is not None]
        if bound is not None and ends:
            span = max(ends) - min(r["_start"] for r in rows)
            for r in rows:
                r["pipeline_idle"] = 1 - r["_busy"] / span if span > 0 else 0.0
            bubbles[step] = min(r["pipeline_idle"] for r in rows)
    for steps in ranks.values():
        for r in steps.values():
            for key in ("_busy", "_last_backward", "_start"):
                r.pop(key)
    return {"ranks": {r: ranks[r] for r in sorted(ranks)}, "bubble": bubbles, "bubble_bound": bound, "layout": meta}


def format_summary(summary: dict) -> str:
    lines = []
    bound = summary["bubble_bound"]
    for rank, steps in summary["ranks"].items():
        for step, r in sorted(steps.items()):
            comm = ", ".join(f"{g} {ms:.1f}" for g, ms in r["comm_ms"].items()) or "none"
            line = (f"rank {rank} step {step}: {r['step_ms']:.1f} ms = compute {r['compute_ms']:.1f} | comm {comm} "
                    f"(exposed {r['exposed_comm_ms']:.1f}) | idle {r['idle_ms']:.1f}")
            if "pipeline_idle" in r:
                line += f" | idle in pipeline {100 * r['pipeline_idle']:.1f}%"
            lines.append(line)
            lines.append("    top ops: " + ", ".join(f"{o['name']} {o['ms']:.1f}" for o in r["top_ops"]))
    for step, bubble in sorted(summary["bubble"].items()):
        lines.append(f"step {step}: pipeline bubble {100 * bubble:.1f}% (bound (p-1)/(v*m+p-1) = {100 * bound:.1f}%)")
    return "\n".join(lines) if lines else "no ProfilerStep# ranges in the traces"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="ironcore profile-summary",
                                     description="per rank and step: compute, communication by group, exposed "
                                                 "communication, idle and pipeline bubble, from a run's traces")
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
