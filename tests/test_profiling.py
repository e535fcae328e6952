"""The profiling window counts steps as the console does (start <= step < end), every step is a
``ProfilerStep#N`` range, the phases of a step are named ranges in the torch trace (and NVTX on
CUDA), and a CUDA memory snapshot brackets the window."""

import contextlib
import json
import subprocess
import sys

import pytest
import torch

from ironcore.config import Config
from ironcore.observe import profile_summary, profiling
from ironcore.observe.profiling import Profiler, phase
from ironcore.training.trainer import train
from tests.multiproc import run_distributed
from tests.train_helpers import load, write_config


def _names(trace_path) -> list[str]:
    return [e.get("name", "") for e in json.loads(trace_path.read_text())["traceEvents"]]


def _utils(start: int, end: int, **extra) -> Config:
    cfg = Config()
    cfg.utils.profile_torch = True
    cfg.utils.profile_step_start, cfg.utils.profile_step_end = start, end
    cfg.utils.stop_on_profile_end = True
    for key, value in extra.items():
        setattr(cfg.utils, key, value)
    return cfg.utils


def _run_steps(prof: Profiler, steps) -> list[bool]:
    stops = []
    for step in steps:
        prof.step_begin(step)
        with phase("forward"):
            torch.randn(16, 16) @ torch.randn(16, 16)
        stops.append(prof.step_end(step))
    return stops


def test_window_holds_console_steps_start_to_end_exclusive(tmp_path):
    utils = _utils(2, 4, tensorboard_dir=str(tmp_path / "tb"))
    prof = Profiler(utils, rank=0, output_dir=str(tmp_path))
    assert _run_steps(prof, range(1, 6)) == [False, False, True, False, False]  # stops after step 3
    names = _names(tmp_path / "profile" / "rank0_step2-3.json")
    assert [n for n in names if n.startswith("ProfilerStep#")] == ["ProfilerStep#2", "ProfilerStep#3"]
    assert names.count("forward") == 2
    assert sorted(p.name for p in (tmp_path / "profile").iterdir()) == ["rank0_step2-3.json"]
    board = tmp_path / "tb" / "profile" / "rank0_step2-3.pt.trace.json"  # the TensorBoard plugin's layout
    assert board.read_text() == (tmp_path / "profile" / "rank0_step2-3.json").read_text()


def test_resume_inside_the_window_records_and_names_the_steps_it_holds(tmp_path):
    prof = Profiler(_utils(2, 6), rank=0, output_dir=str(tmp_path))
    assert _run_steps(prof, range(4, 7)) == [False, True, False]
    names = _names(tmp_path / "profile" / "rank0_step4-5.json")
    assert [n for n in names if n.startswith("ProfilerStep#")] == ["ProfilerStep#4", "ProfilerStep#5"]


def test_other_ranks_record_nothing(tmp_path):
    prof = Profiler(_utils(1, 3), rank=3, output_dir=str(tmp_path))
    assert _run_steps(prof, range(1, 5)) == [False, True, False, False]  # every rank stops together
    assert not (tmp_path / "profile").exists()


def test_cuda_paths_nvtx_names_and_memory_snapshot(tmp_path, monkeypatch):
    """The CUDA branch's logic, on CPU: NVTX ranges carry the same names as the torch ranges, the
    allocator history starts at the window's first step and is dumped and switched off at its end."""
    calls = []

    @contextlib.contextmanager
    def nvtx(name):
        calls.append(("nvtx", name))
        yield

    class Cudart:
        def cudaProfilerStart(self):
            calls.append(("nsys", "start"))

        def cudaProfilerStop(self):
            calls.append(("nsys", "stop"))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "cudart", Cudart)
    monkeypatch.setattr(torch.cuda.nvtx, "range", nvtx)
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history",
                        lambda enabled="all", **kw: calls.append(("history", enabled)))
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", lambda path: calls.append(("dump", path)))
    utils = _utils(2, 3, profile_torch=False, profile_nsys=True, profile_memory=True)
    prof = Profiler(utils, rank=0, output_dir=str(tmp_path))
    assert _run_steps(prof, [1, 2]) == [False, True]
    assert calls == [("nvtx", "ProfilerStep#1"), ("nvtx", "forward"),
                     ("nsys", "start"), ("history", "all"), ("nvtx", "ProfilerStep#2"), ("nvtx", "forward"),
                     ("nsys", "stop"), ("dump", str(tmp_path / "profile" / "rank0_step2-2.memory.pickle")),
                     ("history", None)]


def test_training_trace_names_each_step_and_its_phases(tmp_path):
    path = write_config(tmp_path, "prof", operation={"train_steps": 10, "no_save": True},
                        utils={"log_level": "WARNING", "profile_torch": True, "profile_step_start": 2,
                               "profile_step_end": 4, "stop_on_profile_end": True})
    summary = train(load(path))
    assert summary["steps"] == 3 and summary["stopped_by"] == "utils.stop_on_profile_end"
    events = json.loads((tmp_path / "prof" / "profile" / "rank0_step2-3.json").read_text())["traceEvents"]
    steps = {e["name"]: e for e in events if e.get("name", "").startswith("ProfilerStep#")}
    assert sorted(steps) == ["ProfilerStep#2", "ProfilerStep#3"]
    for step in steps.values():  # accumulation 2: two forwards and backwards, one reduce and update
        inside = [e["name"] for e in events if e.get("ph") == "X" and e.get("cat") == "user_annotation"
                  and step["ts"] <= e["ts"] <= step["ts"] + step["dur"]]
        assert sorted(n for n in inside if n in profiling.PHASES) == [
            "backward", "backward", "forward", "forward", "grad-reduce", "optimizer"]


# --------------------------------------------------------------------------- ironcore profile-summary

def _x(name, ts, dur, cat="cpu_op", tid=1, **args):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "cat": cat, "tid": tid, "pid": 1,
            **({"args": args} if args else {})}


def _range(name, ts, dur):
    return _x(name, ts, dur, cat="user_annotation")


def _hand_built_traces(folder):
    """Two ranks of a PP=2 run with m=2, one step [0, 1000] µs each. Rank 0: CPU only. Rank 1: GPU
    kernels on two streams (its clock offset by baseTimeNanoseconds, its ts shifted to match)."""
    layout = {"pp": 2, "tp": 1, "dp": 1, "cp": 1, "schedule": "1f1b", "virtual_stages": 1, "microbatches": 2}
    rank0 = [
        _range("ProfilerStep#2", 0, 1000),
        _range("forward", 100, 200), _x("aten::mm", 100, 200), _x("aten::fill_", 150, 50),
        _range("pp-send-forward", 300, 50), _x("c10d::send", 305, 40),
        _range("pp-recv-backward", 400, 200),
        _range("backward", 600, 200), _x("aten::mm", 600, 180),
        _x("c10d::allreduce_", 780, 20),  # inside backward, outside the named ranges: DP (DDP's buckets)
        _range("optimizer", 820, 60), _x("aten::add_", 820, 50),
        _x("c10d::broadcast_", 900, 50),  # outside every range: other
    ]
    shift = -1000
    rank1 = [_range("ProfilerStep#2", 0, 1000), _range("forward", 350, 200), _range("backward", 550, 240),
             _range("tp-all-reduce", 515, 15), _x("cudaLaunchKernel", 520, 5, cat="cuda_runtime", correlation=42),
             _range("pp-send-backward", 790, 10), _x("cudaLaunchKernel", 792, 5, cat="cuda_runtime", correlation=43),
             _x("sgemm", 360, 180, cat="kernel", tid=7), _x("elementwise", 580, 70, cat="kernel", tid=7),
             _x("ncclDevKernel_AllReduce", 500, 100, cat="kernel", tid=8, correlation=42),
             _x("ncclDevKernel_SendRecv", 795, 55, cat="kernel", tid=8, correlation=43)]
    for e in rank1:
        e["ts"] += shift
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rank0_step2-2.json").write_text(json.dumps(
        {"traceEvents": rank0, "ironcore": {"rank": 0, "pp_rank": 0, **layout}}))
    (folder / "rank1_step2-2.json").write_text(json.dumps(
        {"traceEvents": rank1, "baseTimeNanoseconds": 1_000_000, "ironcore": {"rank": 1, "pp_rank": 1, **layout}}))
    (folder / "notes.json").write_text("[1, 2]")  # not a trace: skipped in a folder


def test_profile_summary_of_a_hand_built_trace_is_exact(tmp_path):
    _hand_built_traces(tmp_path / "run" / "profile")
    summary = profile_summary.summarize(profile_summary.load_traces(tmp_path / "run"))
    cpu, gpu = summary["ranks"][0][2], summary["ranks"][1][2]
    # rank 0, CPU: comm PP [300,350]+[400,600], DP [780,800], other [900,950]; compute = the operators
    # [100,300] [600,780] [820,870] (the send and the collectives are communication); idle the rest
    assert cpu["step_ms"] == pytest.approx(1.0)
    assert cpu["comm_ms"] == pytest.approx({"PP": 0.25, "DP": 0.02, "other": 0.05})
    assert cpu["comm_total_ms"] == pytest.approx(0.32)
    assert cpu["compute_ms"] == pytest.approx(0.43)
    assert cpu["exposed_comm_ms"] == pytest.approx(0.32)  # blocking collectives: nothing hides them
    assert cpu["idle_ms"] == pytest.approx(0.25)
    assert cpu["top_ops"][0] == {"name": "aten::mm", "self_ms": pytest.approx(0.33), "calls": 2}  # 150 + 180 µs
    assert {o["name"]: o["self_ms"] for o in cpu["top_ops"]}["aten::fill_"] == pytest.approx(0.05)
    # rank 1, GPU: compute kernels [360,540] [580,650]; the all-reduce [500,600] (launched in tp-all-reduce)
    # overlaps them but for [540,580]; the send/recv [795,850] (launched in pp-send-backward) overlaps nothing
    assert gpu["compute_ms"] == pytest.approx(0.25)
    assert gpu["comm_ms"] == pytest.approx({"TP": 0.1, "PP": 0.055})
    assert gpu["exposed_comm_ms"] == pytest.approx(0.04 + 0.055)
    assert gpu["idle_ms"] == pytest.approx(1.0 - 0.29 - 0.055)
    assert gpu["top_ops"][0] == {"name": "sgemm", "self_ms": pytest.approx(0.18), "calls": 1}
    # pipeline: window [100, 800] (rank 0's first forward to its last backward); busy 400 and 440 µs
    assert cpu["pipeline_busy_ms"] == pytest.approx(0.4) and gpu["pipeline_busy_ms"] == pytest.approx(0.44)
    assert cpu["pipeline_idle"] == pytest.approx(3 / 7) and gpu["pipeline_idle"] == pytest.approx(26 / 70)
    assert summary["pipeline"][2] == {"bubble": pytest.approx(26 / 70), "bubble_mean": pytest.approx(0.4),
                                      "window_ms": pytest.approx(0.7)}
    assert summary["bubble_bound"] == pytest.approx(1 / 3)  # (p-1)/(m+p-1), p = m = 2
    text = profile_summary.format_summary(summary)
    assert "rank 1 step 2: 1.0 ms = compute 0.2 | comm 0.2 (TP 0.1, PP 0.1; exposed 0.1) | idle 0.7" in text
    assert "step 2: pipeline bubble 37.1% on the busiest stage (mean over stages 40.0%" in text
    assert "bound (p-1)/(v*m+p-1) = 33.3%" in text


def test_profile_summary_bound_and_missing_stages():
    assert profile_summary.bubble_bound({"pp": 4, "microbatches": 8}) == pytest.approx(3 / 11)
    assert profile_summary.bubble_bound({"pp": 4, "microbatches": 8, "schedule": "interleaved",
                                         "virtual_stages": 2}) == pytest.approx(3 / 19)
    assert profile_summary.bubble_bound({"pp": 1, "microbatches": 8}) is None
    trace = {"traceEvents": [_range("ProfilerStep#1", 0, 100), _range("forward", 0, 50)],
             "ironcore": {"rank": 0, "pp_rank": 0, "pp": 2, "microbatches": 4}}
    summary = profile_summary.summarize([trace])  # stage 1 not traced: no bubble
    assert summary["pipeline"] == {} and "pipeline_idle" not in summary["ranks"][0][1]
    assert "not measured" in profile_summary.format_summary(summary)


def test_profile_summary_cli_json(tmp_path):
    _hand_built_traces(tmp_path / "run" / "profile")
    proc = subprocess.run([sys.executable, "-m", "ironcore", "profile-summary", str(tmp_path / "run"), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert sorted(summary["ranks"]) == ["0", "1"] and sorted(summary["ranks"]["0"]) == ["2"]
    assert summary["ranks"]["0"]["2"]["compute_ms"] == pytest.approx(0.43)
    assert summary["pipeline"]["2"]["bubble"] == pytest.approx(26 / 70)
    assert summary["layout"]["pp"] == 2 and summary["bubble_bound"] == pytest.approx(1 / 3)
    file = subprocess.run([sys.executable, "-m", "ironcore", "profile-summary",
                           str(tmp_path / "run" / "profile" / "rank0_step2-2.json")],
                          capture_output=True, text=True, timeout=120)
    assert file.returncode == 0 and file.stdout.startswith("rank 0 step 2: 1.0 ms = compute 0.4"), file.stderr


def _pp_train_worker(path: str, *overrides: str) -> None:
    train(load(path, *overrides))


# Stages of equal cost, as the bound assumes: the last stage's LM head and loss over GPT-2's 50k
# vocabulary cost about as much as 18 of these layers, so the first stage gets 20 layers, the last 2.
_BALANCED_PP2 = ("trainer.pipeline_model_parallel_size=2", "model.num_layers=22",
                 "parallel.pipeline_layer_split=[20,2]", "model.max_seq_len=64")


def test_profile_summary_of_a_pp2_1f1b_run_measures_the_bubble(tmp_path, capsys):
    m = 8
    path = write_config(tmp_path, "pp", trainer={"micro_batch_size": 1, "train_batch_size": m, "log_interval": 1,
                                                 "num_workers": 0},
                        operation={"train_steps": 10, "no_save": True},
                        parallel={"dist_backend": "gloo", "pipeline_schedule": "1f1b"},
                        utils={"log_level": "WARNING", "profile_torch": True, "profile_ranks": [0, 1],
                               "profile_step_start": 2, "profile_step_end": 4, "stop_on_profile_end": True})
    run_distributed(_pp_train_worker, 2, str(path), *_BALANCED_PP2, timeout=240)
    assert sorted(p.name for p in (tmp_path / "pp" / "profile").iterdir()) == [
        "rank0_step2-3.json", "rank1_step2-3.json"]  # step 1 (warm-up) is not profiled
    assert profile_summary.main([str(tmp_path / "pp"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["bubble_bound"] == pytest.approx(1 / 9)  # (p-1)/(m+p-1), p=2, m=8
    assert summary["layout"]["microbatches"] == m and summary["layout"]["schedule"] == "1f1b"
    assert sorted(summary["ranks"]) == ["0", "1"] and sorted(summary["pipeline"]) == ["2", "3"]
    for step, pipe in summary["pipeline"].items():
        assert abs(pipe["bubble"] - 1 / 9) < 0.10, (step, pipe)  # measured vs bound, within 10 points
        assert pipe["bubble"] == min(summary["ranks"][r][step]["pipeline_idle"] for r in ("0", "1"))
    for rank, steps in summary["ranks"].items():
        assert sorted(steps) == ["2", "3"]
        for row in steps.values():
            assert 0 < row["pipeline_idle"] < 1 and row["pipeline_busy_ms"] > 0
            assert row["comm_ms"]["PP"] > 0  # the activations / gradients exchanged
            assert row["comm_ms"]["DP"] > 0  # grad-reduce (the tied embedding's all-reduce)
            # gloo's collectives block the CPU: no compute hides them
            assert row["exposed_comm_ms"] == pytest.approx(row["comm_total_ms"], rel=1e-6)
            assert 0 < row["compute_ms"] and 0 <= row["idle_ms"] < row["step_ms"]
            assert row["compute_ms"] + row["comm_total_ms"] + row["idle_ms"] == pytest.approx(row["step_ms"])
            assert len(row["top_ops"]) == 5 and row["top_ops"][0]["self_ms"] > 0
    assert profile_summary.main([str(tmp_path / "pp")]) == 0
    text = capsys.readouterr().out
    print(text)  # the measured bubble next to its bound, in the test's output
    assert "rank 1 step 3:" in text and "step 3: pipeline bubble" in text and "= 11.1%" in text
    assert "top ops (self ms):" in text
def test_profile_summary_says_what_is_missing(tmp_path, capsys):
    assert profile_summary.main([str(tmp_path)]) == 2
    assert "no torch.profiler trace" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    assert profile_summary.main([str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert "not a readable JSON trace" in err and "{not json" not in err
