"""tools/benchmark.py: the step-peak measure sees what a step allocates, and one run reports every
implementation's tokens/s, MFU and step peak with IronCore's ratios (tiny shape; the figures
themselves are BENCHMARKS.md's, measured on a quiet machine). Both run in their own process: the
benchmark changes glibc's mmap threshold for the process it runs in."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.hf_helpers import REPO

PEAK = """
import torch
from tools import benchmark
assert benchmark._mmap_large_allocations()
resident = torch.ones(64 * 2**20 // 4)  # resident before the step: not counted
def step(batch):
    held = torch.ones({mib} * 2**20 // 4)  # freed when the step returns
    assert held.sum() > 0
print(benchmark.step_peak_bytes(step, {{}}, torch.device("cpu")) / 2**20)
"""


def _run(argv: list[str]) -> str:
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.parametrize("mib", [32, 96])
def test_step_peak_is_what_the_step_held_at_its_high_water(mib):
    measured = float(_run(["-c", PEAK.format(mib=mib)]))
    assert mib - 1 <= measured <= mib + 8, measured


def test_one_run_reports_tokens_mfu_and_step_peak_for_each_implementation():
    out = json.loads(_run(["tools/benchmark.py", "--layers", "2", "--d-model", "128", "--heads", "2", "--seq-len",
                           "128", "--batch", "4", "--steps", "1", "--rounds", "1", "--warmup", "1", "--only", "ironcore",
                           "plain", "--ce-chunk", "32"]))
    assert out["ce_chunk"] == 32 and out["recompute"] == "none" and out["step_peak_measure"].startswith("VmHWM")
    for name in ("ironcore", "plain"):
        result = out["results"][name]
        assert result["tokens_per_s"] > 0 and 0 < result["mfu"] < 1.5
        assert result["step_peak_mib"] > result["activation_mib"] > 0  # the peak also holds the gradients
    # The fused head keeps no [tokens, vocab] logits for backward (the plain GPT keeps their log-softmax:
    # 4 × 128 × 50,304 fp32 = 98 MB, most of its activations at this shape).
    assert out["results"]["ironcore"]["activation_mib"] < out["results"]["plain"]["activation_mib"] / 4
    assert out["ratios"]["ironcore_vs_plain"] == pytest.approx(
        out["results"]["ironcore"]["tokens_per_s"] / out["results"]["plain"]["tokens_per_s"], rel=1e-2)
