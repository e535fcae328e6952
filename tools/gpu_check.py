#!/usr/bin/env python
"""The steps of ``tools/gpu_check.sh``: each runs its commands as subprocesses (each under the
time the step has left) and writes its result to ``WORK/steps/NAME.json`` after every command, so a
step killed by the script's timeout still leaves what it measured; ``assemble`` joins them into the
one JSON file.

    python tools/gpu_check.py step NAME --work WORK --budget SECONDS [--dry-run]
    python tools/gpu_check.py mark NAME --work WORK --reason TEXT     # the script: a killed step
    python tools/gpu_check.py assemble --work WORK --out PATH [--dry-run] [--started EPOCH]

A step's result: ``{"status": "ok" | "skipped" | "failed", "reason": ..., "seconds": ...,
"runs": [{"command", "rc", "seconds", ...}], ...its figures}``. ``--dry-run`` runs every step at
tiny shapes in fp32 on CPU; the CUDA-only parts (the CUDA tests, flash-attn, nsys) are then
``skipped`` with the reason. Steps (see ``STEPS``): ``cuda_tests``, ``gpt2_124m``, ``llama_1b``,
``attention``, ``recompute``, ``profile``, ``nsys``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
BENCH = "tools/benchmark.py"

# name -> (what it measures, its time limit on a GPU in seconds); the script uses these limits.
STEPS: dict[str, tuple[str, int]] = {
    "cuda_tests": ("pytest -q tests/test_gpu.py: passed / failed / skipped", 60),
    "gpt2_124m": ("GPT-2 124M, seq 1024, bf16: tokens/s and MFU of IronCore, HF GPT2LMHeadModel, the plain GPT", 75),
    "llama_1b": ("a ~1.2B LLaMA-3.2-1B-like shape (GQA), seq 2048, bf16: IronCore's and HF Llama's MFU", 75),
    "attention": ("flash-attn against SDPA: IronCore's tokens/s with each kernel", 50),
    "recompute": ("activation recompute none / selective / full: step peak memory and tokens/s", 75),
    "profile": ("a short torch-profiled training run and `ironcore profile-summary --json` of its trace", 50),
    "nsys": ("the same run under `nsys profile` (capture range cudaProfilerApi): the report and its top kernels", 50),
}

# Shapes: (GPU, dry run). The dry-run shapes are tiny but keep the vocabulary (the GPT-2 tokenizer's).
GPT2_SHAPE = ["--layers", "12", "--d-model", "768", "--heads", "12", "--seq-len", "1024", "--batch", "16"]
GPU_RUN = ["--precision", "bfloat16", "--device", "cuda"]
# One thread on the dry run: on a small shared CPU box, two OpenMP threads beside other jobs' threads
# spin at every barrier (the same step ran 1.6x slower with 2 threads than with 1 there).
DRY_RUN = ["--steps", "1", "--rounds", "1", "--warmup", "1", "--precision", "float32", "--device", "cpu",
           "--threads", "1"]
GPT2 = {"gpu": [*GPT2_SHAPE, "--steps", "3", "--rounds", "3", "--warmup", "2", *GPU_RUN],
        "dry": ["--layers", "2", "--d-model", "64", "--heads", "2", "--seq-len", "64", "--batch", "2", *DRY_RUN]}
LLAMA = {"gpu": ["--arch", "llama", "--layers", "16", "--d-model", "2048", "--heads", "32", "--groups", "8",
                 "--ffn", "8192", "--seq-len", "2048", "--batch", "4", "--steps", "3", "--rounds", "2",
                 "--warmup", "2", *GPU_RUN],
         "dry": ["--arch", "llama", "--layers", "2", "--d-model", "64", "--heads", "4", "--groups", "2",
                 "--ffn", "160", "--seq-len", "64", "--batch", "2", *DRY_RUN]}
# Recompute on CPU: enough layers that activations, not the LM head, set the step's peak (chunked head).
RECOMPUTE = {"gpu": [*GPT2_SHAPE, "--steps", "3", "--rounds", "2", "--warmup", "2", *GPU_RUN],
             "dry": ["--layers", "6", "--d-model", "128", "--heads", "4", "--seq-len", "128", "--batch", "4",
                     "--ce-chunk", "128", *DRY_RUN]}
ATTENTION = {"gpu": RECOMPUTE["gpu"], "dry": GPT2["dry"]}
PROFILE = {"gpu": ["model=gpt2-small", "model.precision=bfloat16", "trainer.micro_batch_size=8",
                   "trainer.train_batch_size=8", "utils.profile_step_start=3", "utils.profile_step_end=5",
                   "operation.train_steps=5"],
           "dry": ["model.precision=float32", "model.max_seq_len=64", "trainer.micro_batch_size=2",
                   "trainer.train_batch_size=2", "utils.profile_step_start=2", "utils.profile_step_end=4",
                   "operation.train_steps=4", "parallel.dist_backend=gloo"]}
RUN_COMMON = ["trainer.do_eval=false", "operation.no_save=true", "operation.test_samples=0",
              "utils.tensorboard_dir=null", "utils.stop_on_profile_end=true", "trainer.log_interval=1"]


# ---------------------------------------------------------------------------- running commands
class Step:
    """One step's result, written to WORK/steps/NAME.json after every command."""

    def __init__(self, name: str, work: Path, budget: float, dry: bool):
        self.name, self.work, self.dry = name, work, dry
        self.deadline = time.monotonic() + budget
        self.t0 = time.monotonic()
        self.result: dict = {"step": name, "measures": STEPS[name][0], "status": "running", "runs": []}
        self.path = work / "steps" / f"{name}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.save()

    def save(self) -> None:
        self.result["seconds"] = round(time.monotonic() - self.t0, 1)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1))
        tmp.replace(self.path)

    def run(self, argv: list[str], env: dict | None = None, label: str | None = None) -> dict:
        """Run ``argv`` in the repo (its own session, killed with its children at the step's deadline);
        record and return ``{command, rc, seconds, stdout, stderr_tail}``."""
        left = self.deadline - time.monotonic() - 1
        record = {"command": shlex.join(argv)}
        if label:
            record["label"] = label
        if left < 3:
            record.update(rc=None, seconds=0.0, error="not run: the step's time was spent")
            self.result["runs"].append(record)
            self.save()
            return {**record, "stdout": ""}
        t0 = time.monotonic()
        env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if self.dry else {}), **(env or {})}
        proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, env=env)
        try:
            out, err = proc.communicate(timeout=left)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            record["error"] = f"timed out after {left:.0f} s (the step's limit)"
        record.update(rc=proc.returncode, seconds=round(time.monotonic() - t0, 1))
        if proc.returncode != 0:
            record["stderr_tail"] = (err or "")[-1500:]
        self.result["runs"].append(record)
        self.save()
        return {**record, "stdout": out or ""}

    def finish(self, status: str, reason: str | None = None, **figures) -> None:
        self.result.update(figures)
        self.result["status"] = status
        if reason:
            self.result["reason"] = reason
        self.save()


def _json_of(run: dict):
    """The JSON object a command printed, or None."""
    if run.get("rc") != 0:
        return None
    try:
        return json.loads(run["stdout"])
    except json.JSONDecodeError:
        return None


def _fail_reason(run: dict) -> str:
    if run.get("error"):
        return run["error"]
    tail = (run.get("stderr_tail") or "").strip().splitlines()
    return f"exit {run.get('rc')}" + (f": {tail[-1][:300]}" if tail else "")


def _benchmark(step: Step, args: list[str], label: str | None = None) -> tuple[dict | None, dict]:
    run = step.run([PY, BENCH, *args], label=label)
    return _json_of(run), run


def _summary(bench: dict) -> dict:
    """The figures of a benchmark run worth keeping (its per-implementation results and ratios)."""
    keep = ("shape", "device_name", "precision", "attention", "recompute", "ce_chunk", "peak_tflops",
            "model_flops_per_token", "step_peak_measure")
    return {**{k: bench.get(k) for k in keep}, "results": bench.get("results"), "ratios": bench.get("ratios")}


def _mode(dry: bool) -> str:
    return "dry" if dry else "gpu"


# ---------------------------------------------------------------------------- the steps
def step_cuda_tests(step: Step) -> None:
    junit = step.work / "cuda_tests.xml"
    run = step.run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", f"--junitxml={junit}",
                    "tests/test_gpu.py"])
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    skips: dict[str, str] = {}
    failures: dict[str, str] = {}
    try:
        for case in ET.parse(junit).getroot().iter("testcase"):
            name = case.get("name", "?")
            if case.find("skipped") is not None:
                counts["skipped"] += 1
                skips[name] = case.find("skipped").get("message", "")
            elif case.find("failure") is not None:
                counts["failed"] += 1
                failures[name] = case.find("failure").get("message", "")[:300]
            elif case.find("error") is not None:
                counts["errors"] += 1
                failures[name] = case.find("error").get("message", "")[:300]
            else:
                counts["passed"] += 1
    except (OSError, ET.ParseError):
        step.finish("failed", _fail_reason(run) if run.get("rc") else "no junit report")
        return
    figures = {"counts": counts, "skip_reasons": skips, "failures": failures}
    if counts["failed"] or counts["errors"] or run.get("rc") not in (0, 5):
        step.finish("failed", f"{counts['failed']} failed, {counts['errors']} errors", **figures)
    elif counts["passed"] == 0:
        step.finish("skipped", "every test skipped: " + "; ".join(sorted(set(skips.values()))), **figures)
    else:
        step.finish("ok", **figures)


def step_gpt2_124m(step: Step) -> None:
    bench, run = _benchmark(step, GPT2[_mode(step.dry)])
    if bench is None:
        step.finish("failed", _fail_reason(run))
        return
    step.finish("ok", **_summary(bench))


def step_llama_1b(step: Step) -> None:
    bench, run = _benchmark(step, [*LLAMA[_mode(step.dry)], "--only", "ironcore", "hf"])
    if bench is None:
        step.finish("failed", _fail_reason(run))
        return
    step.finish("ok", **_summary(bench))


def _flash_absent_reason(dry: bool) -> str | None:
    """Why flash-attn cannot run here, or None when it can."""
    import importlib.util

    if dry:
        return "dry run on CPU: flash-attn runs only on CUDA in fp16/bf16"
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn not installed"
    return None


def step_attention(step: Step) -> None:
    args = [*ATTENTION[_mode(step.dry)], "--only", "ironcore"]
    kernels: dict[str, dict] = {}
    sdpa, run = _benchmark(step, [*args, "--attn", "sdpa"], label="sdpa")
    kernels["sdpa"] = ({"status": "ok", **sdpa["results"]["ironcore"]} if sdpa else
                       {"status": "failed", "reason": _fail_reason(run)})
    absent = _flash_absent_reason(step.dry)
    if absent:
        kernels["flash"] = {"status": "skipped", "reason": absent}
    else:
        flash, run = _benchmark(step, [*args, "--attn", "flash"], label="flash")
        kernels["flash"] = ({"status": "ok", **flash["results"]["ironcore"]} if flash else
                            {"status": "failed", "reason": _fail_reason(run)})
    figures = {"kernels": kernels, "shape": sdpa["shape"] if sdpa else None}
    if kernels["sdpa"]["status"] == "ok" and kernels["flash"]["status"] == "ok":
        figures["flash_vs_sdpa"] = round(kernels["flash"]["tokens_per_s"] / kernels["sdpa"]["tokens_per_s"], 3)
    failed = [k for k, v in kernels.items() if v["status"] == "failed"]
    step.finish("failed" if failed else "ok", f"failed: {', '.join(failed)}" if failed else None, **figures)


def step_recompute(step: Step) -> None:
    args = [*RECOMPUTE[_mode(step.dry)], "--only", "ironcore"]
    settings: dict[str, dict] = {}
    shape = None
    for setting in ("none", "selective", "full"):
        bench, run = _benchmark(step, [*args, "--recompute", setting], label=setting)
        if bench:
            shape = bench["shape"]
            r = bench["results"]["ironcore"]
            settings[setting] = {"status": "ok", **{k: r[k] for k in ("tokens_per_s", "step_s", "mfu",
                                                                      "step_peak_mib", "activation_mib")}}
        else:
            settings[setting] = {"status": "failed", "reason": _fail_reason(run)}
    figures: dict = {"settings": settings, "shape": shape}
    base = settings.get("none", {})
    if base.get("status") == "ok":
        figures["vs_none"] = {
            s: {"tokens_per_s": round(v["tokens_per_s"] / base["tokens_per_s"], 3),
                "step_peak": (round(v["step_peak_mib"] / base["step_peak_mib"], 3)
                              if v.get("step_peak_mib") and base.get("step_peak_mib") else None)}
            for s, v in settings.items() if s != "none" and v["status"] == "ok"}
    failed = [s for s, v in settings.items() if v["status"] == "failed"]
    step.finish("failed" if failed else "ok", f"failed: {', '.join(failed)}" if failed else None, **figures)


def _train_argv(step: Step, run_dir: Path, extra: list[str]) -> list[str]:
    return [PY, "-m", "ironcore", "example.yaml", f"trainer.model_path={run_dir}", *RUN_COMMON,
            *PROFILE[_mode(step.dry)], *extra]


def _last_metrics(run_dir: Path) -> dict | None:
    try:
        lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    except (OSError, json.JSONDecodeError):
        return None
    train = [ln for ln in lines if "tokens_per_s" in ln]
    if not train:
        return None
    last = train[-1]
    return {k: last.get(k) for k in ("step", "loss", "tokens_per_s", "tflops_per_device", "mfu") if k in last}


def step_profile(step: Step) -> None:
    run_dir = step.work / "profile_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    train = step.run(_train_argv(step, run_dir, ["utils.profile_torch=true"]), label="train")
    traces = sorted((run_dir / "profile").glob("*.json")) if (run_dir / "profile").is_dir() else []
    if train.get("rc") != 0 or not traces:
        step.finish("failed", _fail_reason(train) if train.get("rc") != 0 else "the run wrote no trace")
        return
    summary_run = step.run([PY, "-m", "ironcore", "profile-summary", str(run_dir), "--json"], label="summary")
    summary = _json_of(summary_run)
    figures = {"traces": [str(t) for t in traces], "trace_mib": round(sum(t.stat().st_size for t in traces) / 2**20, 1),
               "last_logged_step": _last_metrics(run_dir)}
    if summary is None:
        step.finish("failed", _fail_reason(summary_run), **figures)
        return
    step.finish("ok", profile_summary=summary, **figures)


def _nsys_kernels(report: Path, step: Step) -> list[dict] | str:
    """The top kernels of an nsys report (``nsys stats -r cuda_gpu_kern_sum``), or why not."""
    run = step.run(["nsys", "stats", "-r", "cuda_gpu_kern_sum", "-f", "csv", str(report)], label="stats")
    if run.get("rc") != 0:
        return _fail_reason(run)
    return nsys_kernel_table(run["stdout"])


def nsys_kernel_table(text: str, top: int = 10) -> list[dict] | str:
    """The first ``top`` rows of the CSV kernel table in ``nsys stats`` output (after its notices)."""
    lines = text.splitlines()
    header = next((i for i, line in enumerate(lines) if "Time (%)" in line and "Name" in line), None)
    if header is None:
        return "no kernel table in nsys stats' output"
    rows = list(csv.DictReader(io.StringIO("\n".join(lines[header:]))))
    keep = ("Time (%)", "Total Time (ns)", "Instances", "Name")
    return [{k: row.get(k) for k in keep} for row in rows[:top] if row.get("Name")]


def step_nsys(step: Step) -> None:
    if step.dry:
        step.finish("skipped", "dry run on CPU: nsys records CUDA (the run's cudaProfilerStart/Stop are no-ops there)")
        return
    nsys = shutil.which("nsys")
    if nsys is None:
        step.finish("skipped", "nsys not on PATH")
        return
    run_dir = step.work / "nsys_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    report = run_dir / "ironcore"
    version = step.run([nsys, "--version"], label="version")
    train = step.run([nsys, "profile", "-t", "cuda,nvtx", "--capture-range=cudaProfilerApi",
                      "--capture-range-end=stop", "-o", str(report), "--force-overwrite", "true",
                      *_train_argv(step, run_dir, ["utils.profile_nsys=true"])], label="train")
    files = sorted(run_dir.glob("ironcore.*"))
    rep = next((f for f in files if f.suffix in (".nsys-rep", ".qdrep")), None)
    figures = {"nsys_version": version["stdout"].strip() or None, "files": [str(f) for f in files]}
    if train.get("rc") != 0 or rep is None:
        step.finish("failed", _fail_reason(train) if train.get("rc") != 0 else "nsys wrote no report", **figures)
        return
    figures["report_mib"] = round(rep.stat().st_size / 2**20, 1)
    figures["top_kernels"] = _nsys_kernels(rep, step)
    step.finish("ok", **figures)


RUNNERS = {"cuda_tests": step_cuda_tests, "gpt2_124m": step_gpt2_124m, "llama_1b": step_llama_1b,
           "attention": step_attention, "recompute": step_recompute, "profile": step_profile, "nsys": step_nsys}


# ---------------------------------------------------------------------------- the report
def _environment(dry: bool) -> dict:
    import importlib.util

    env = {"python": platform.python_version(), "host": platform.node(), "cpus": os.cpu_count()}
    try:
        import torch

        from ironcore.observe import metrics

        env["torch"] = torch.__version__
        env["cuda"] = torch.version.cuda
        env["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            env.update(gpu=name, gpu_count=torch.cuda.device_count(),
                       gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                       gpu_dense_bf16_peak_tflops=metrics.gpu_peak_tflops(name))
    except Exception as e:  # noqa: BLE001 - the report must still be written
        env["torch_error"] = repr(e)
    flash = importlib.util.find_spec("flash_attn")
    env["flash_attn"] = "installed" if flash else "not installed"
    env["nsys"] = shutil.which("nsys")
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        env["git_commit"] = None
    return env


def assemble(work: Path, out: Path, dry: bool, started: float | None) -> int:
    steps = {}
    for name in STEPS:
        path = work / "steps" / f"{name}.json"
        try:
            steps[name] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            steps[name] = {"step": name, "measures": STEPS[name][0], "status": "failed",
                           "reason": "no result (the step did not run or was killed before writing one)"}
        if steps[name].get("status") == "running":
            steps[name]["status"] = "failed"
            steps[name].setdefault("reason", "did not finish")
    report = {
        "gpu_check": 1, "mode": "dry-run (CPU, tiny shapes, fp32)" if dry else "gpu",
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "total_seconds": round(time.time() - started, 1) if started else None,
        "environment": _environment(dry),
        "status": {n: s["status"] for n, s in steps.items()},
        "steps": steps,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    failed = [n for n, s in steps.items() if s["status"] == "failed"]
    print(f"gpu_check: {out}: " + ", ".join(f"{n} {s['status']}" for n, s in steps.items()))
    return 1 if failed else 0


def mark(work: Path, name: str, reason: str) -> None:
    """A step the script had to kill (or that crashed): keep what it recorded, mark it failed."""
    path = work / "steps" / f"{name}.json"
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        result = {"step": name, "measures": STEPS[name][0], "runs": []}
    if result.get("status") in (None, "running"):
        result["status"], result["reason"] = "failed", reason
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("step")
    s.add_argument("name", choices=list(STEPS))
    s.add_argument("--work", required=True, type=Path)
    s.add_argument("--budget", type=float, required=True, help="seconds this step may take")
    s.add_argument("--dry-run", action="store_true")
    m = sub.add_parser("mark")
    m.add_argument("name", choices=list(STEPS))
    m.add_argument("--work", required=True, type=Path)
    m.add_argument("--reason", required=True)
    a = sub.add_parser("assemble")
    a.add_argument("--work", required=True, type=Path)
    a.add_argument("--out", required=True, type=Path)
    a.add_argument("--dry-run", action="store_true")
    a.add_argument("--started", type=float, default=None, help="the check's start (epoch seconds)")
    sub.add_parser("limits", help="print each step's name and GPU time limit, one a line")
    args = p.parse_args(argv)
    if args.cmd == "limits":
        for name, (_, limit) in STEPS.items():
            print(name, limit)
        return 0
    if args.cmd == "mark":
        mark(args.work, args.name, args.reason)
        return 0
    if args.cmd == "assemble":
        return assemble(args.work, args.out, args.dry_run, args.started)
    step = Step(args.name, args.work, args.budget, args.dry_run)
    try:
        RUNNERS[args.name](step)
    except Exception as e:  # noqa: BLE001 - recorded; the other steps go on
        step.finish("failed", f"{type(e).__name__}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
