"""tools/gpu_check.sh: the dry run (every step at tiny shapes on CPU) writes one JSON file with every
step ok or skipped and real figures; a step that fails, hangs or finds the budget spent is recorded
as failed while the others are kept; usage errors exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from tests.hf_helpers import REPO
from tools import gpu_check

SCRIPT = ["bash", "tools/gpu_check.sh"]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHON": sys.executable}


def _script(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([*SCRIPT, *args], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run's skips are those of a CPU machine")
def test_dry_run_records_every_step_with_figures_or_skip_reasons(tmp_path):
    out = tmp_path / "x.json"
    proc = _script("--dry-run", "--out", str(out), timeout=170)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    steps = report["steps"]
    assert list(steps) == list(gpu_check.STEPS) and report["mode"].startswith("dry-run")
    assert report["status"] == {"cuda_tests": "skipped", "gpt2_124m": "ok", "llama_1b": "ok", "attention": "ok",
                                "recompute": "ok", "profile": "ok", "nsys": "skipped"}, report["status"]
    for name, step in steps.items():  # every run says what it ran
        assert all(run["command"] and run["rc"] == 0 for run in step["runs"]), (name, step["runs"])

    tests = steps["cuda_tests"]  # CUDA-only: skipped, with pytest's reasons
    assert tests["counts"]["passed"] == 0 and tests["counts"]["skipped"] >= 3
    assert "needs a CUDA GPU" in tests["reason"] and "tests/test_gpu.py" in tests["runs"][0]["command"]
    assert steps["nsys"]["reason"].startswith("dry run on CPU")
    assert steps["attention"]["kernels"]["flash"] == {
        "status": "skipped", "reason": "dry run on CPU: flash-attn runs only on CUDA in fp16/bf16"}

    gpt2 = steps["gpt2_124m"]
    assert set(gpt2["results"]) == {"ironcore", "hf", "plain"} and gpt2["precision"] == "float32"
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1.5 for r in gpt2["results"].values())
    assert {"ironcore_vs_hf", "ironcore_vs_plain"} <= set(gpt2["ratios"])
    llama = steps["llama_1b"]
    assert llama["shape"]["arch"] == "llama" and llama["shape"]["groups"] < llama["shape"]["heads"]
    assert llama["results"]["ironcore"]["mfu"] > 0 and llama["results"]["hf"]["tokens_per_s"] > 0
    assert steps["attention"]["kernels"]["sdpa"]["tokens_per_s"] > 0

    rec = steps["recompute"]["settings"]
    assert all(rec[s]["status"] == "ok" and rec[s]["tokens_per_s"] > 0 for s in ("none", "selective", "full"))
    assert rec["full"]["step_peak_mib"] < rec["none"]["step_peak_mib"]
    assert rec["full"]["activation_mib"] < rec["selective"]["activation_mib"] < rec["none"]["activation_mib"]
    assert [run["label"] for run in steps["recompute"]["runs"]] == ["none", "selective", "full"]

    profile = steps["profile"]
    assert [run["label"] for run in profile["runs"]] == ["train", "summary"]
    assert "utils.profile_torch=true" in profile["runs"][0]["command"]
    ranks = profile["profile_summary"]["ranks"]
    assert list(ranks) == ["0"] and ranks["0"], ranks  # rank 0, the profiled steps
    for row in ranks["0"].values():
        assert row["step_ms"] > 0 and row["compute_ms"] > 0 and row["top_ops"]
    assert profile["last_logged_step"]["tokens_per_s"] > 0


def test_usage_errors_exit_2():
    proc = _script("--bogus", timeout=30)
    assert proc.returncode == 2 and "unknown argument: --bogus" in proc.stderr
    assert _script("--budget", "soon", timeout=30).returncode == 2


def test_a_spent_budget_fails_every_step_and_still_writes_the_file(tmp_path):
    out = tmp_path / "x.json"
    t0 = time.monotonic()
    proc = _script("--dry-run", "--budget", "0", "--out", str(out), "--work", str(tmp_path / "work"), timeout=60)
    assert proc.returncode == 1 and time.monotonic() - t0 < 45
    steps = json.loads(out.read_text())["steps"]
    assert list(steps) == list(gpu_check.STEPS)
    assert all(s["status"] == "failed" and "budget was spent" in s["reason"] for s in steps.values())


def test_a_command_past_the_steps_limit_is_killed_and_recorded(tmp_path):
    step = gpu_check.Step("profile", tmp_path, budget=5, dry=True)
    t0 = time.monotonic()
    run = step.run([sys.executable, "-c", "import time; time.sleep(60)"])
    assert time.monotonic() - t0 < 15
    assert "timed out" in run["error"] and run["rc"] != 0
    late = step.run([sys.executable, "-c", "print(1)"])  # nothing left of the step's time: not started
    assert late["rc"] is None and "not run" in late["error"]
    saved = json.loads((tmp_path / "steps" / "profile.json").read_text())
    assert saved["status"] == "running" and len(saved["runs"]) == 2  # written after every command


def test_a_killed_step_keeps_its_runs_and_missing_steps_fail(tmp_path):
    step = gpu_check.Step("recompute", tmp_path, budget=30, dry=True)
    step.run([sys.executable, "-c", "print(1)"], label="none")
    gpu_check.mark(tmp_path, "recompute", "killed at its 75 s limit")
    ok = gpu_check.Step("gpt2_124m", tmp_path, budget=30, dry=True)
    ok.finish("ok", results={})
    out = tmp_path / "report.json"
    assert gpu_check.assemble(tmp_path, out, dry=True, started=None) == 1
    steps = json.loads(out.read_text())["steps"]
    assert steps["gpt2_124m"]["status"] == "ok"
    assert steps["recompute"]["status"] == "failed" and steps["recompute"]["reason"] == "killed at its 75 s limit"
    assert steps["recompute"]["runs"][0]["label"] == "none"
    assert steps["nsys"]["status"] == "failed" and "no result" in steps["nsys"]["reason"]


def test_nsys_kernel_table_is_read_past_the_notices():
    text = ('Generating SQLite file r.sqlite from r.nsys-rep\nProcessing [r.sqlite] with [cuda_gpu_kern_sum.py]...\n'
            '\n"Time (%)","Total Time (ns)","Instances","Avg (ns)","Name"\n'
            '"61.5","2000","8","250","sm90_xmma_gemm_bf16"\n"38.5","1250","4","312","flash_fwd_kernel<a, b>"\n')
    assert gpu_check.nsys_kernel_table(text) == [
        {"Time (%)": "61.5", "Total Time (ns)": "2000", "Instances": "8", "Name": "sm90_xmma_gemm_bf16"},
        {"Time (%)": "38.5", "Total Time (ns)": "1250", "Instances": "4", "Name": "flash_fwd_kernel<a, b>"}]
    assert gpu_check.nsys_kernel_table("no report") == "no kernel table in nsys stats' output"


FAKE_NSYS = """#!/usr/bin/env bash
case "$1" in
  --version) echo "NVIDIA Nsight Systems version 2099.1";;
  profile) while [[ "$1" != "-o" ]]; do shift; done; echo report > "$2.nsys-rep"; echo "$@" > "$2.args";;
  stats) printf 'Processing...\\n"Time (%%)","Total Time (ns)","Instances","Name"\\n"90.0","9","3","gemm"\\n';;
esac
"""


def test_nsys_step_profiles_the_run_and_reads_its_top_kernels(tmp_path, monkeypatch):
    """The GPU-only nsys step's plumbing, against a stand-in ``nsys`` on PATH (it runs no training)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nsys").write_text(FAKE_NSYS)
    (bin_dir / "nsys").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    step = gpu_check.Step("nsys", tmp_path / "work", budget=30, dry=False)
    gpu_check.step_nsys(step)
    result = json.loads((tmp_path / "work" / "steps" / "nsys.json").read_text())
    assert result["status"] == "ok", result
    assert result["nsys_version"] == "NVIDIA Nsight Systems version 2099.1" and result["report_mib"] == 0.0
    assert result["top_kernels"] == [{"Time (%)": "90.0", "Total Time (ns)": "9", "Instances": "3", "Name": "gemm"}]
    train = next(run for run in result["runs"] if run.get("label") == "train")
    assert "--capture-range=cudaProfilerApi" in train["command"] and "utils.profile_nsys=true" in train["command"]
