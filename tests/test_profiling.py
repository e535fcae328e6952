"""The profiling window counts steps as the console does (start <= step < end), every step is a
``ProfilerStep#N`` range, the phases of a step are named ranges in the torch trace (and NVTX on
CUDA), and a CUDA memory snapshot brackets the window."""

import contextlib
import json

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


def _pp_train_worker(path: str) -> dict:
    return train(load(path, "trainer.pipeline_model_parallel_size=2", "model.num_layers=4",
                      "model.max_seq_len=64"))


def test_profile_summary_of_a_pp2_1f1b_run_measures_the_bubble(tmp_path, capsys):
    path = write_config(tmp_path, "pp", trainer={"micro_batch_size": 1, "train_batch_size": 8, "log_interval": 1,
                                                 "num_workers": 0},
                        operation={"train_steps": 10, "no_save": True},
                        utils={"log_level": "WARNING", "profile_torch": True, "profile_ranks": [0, 1],
                               "profile_step_start": 2, "profile_step_end": 4, "stop_on_profile_end": True})
    run_distributed(_pp_train_worker, 2, str(path), timeout=240)
    assert sorted(p.name for p in (tmp_path / "pp" / "profile").iterdir()) == [
        "rank0_step2-3.json", "rank1_step2-3.json"]
    assert profile_summary.main([str(tmp_path / "pp"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["bubble_bound"] == pytest.approx(1 / 9)  # (p-1)/(m+p-1), p=2, m=8
    assert sorted(summary["ranks"]) == ["0", "1"]
    for step, bubble in summary["bubble"].items():  # the last stage (with the LM head) is the busiest
        assert abs(bubble - 1 / 9) < 0.10, (step, bubble)
        assert bubble == min(summary["ranks"][r][step]["pipeline_idle"] for r in ("0", "1"))
    for rank, steps in summary["ranks"].items():
        assert sorted(steps) == ["2", "3"]
        for row in steps.values():
            assert 0 <= row["pipeline_idle"] < 1
            assert row["comm_ms"]["PP"] > 0  # the activations / gradients exchanged
            # gloo's collectives block the CPU: no compute hides them
            assert row["exposed_comm_ms"] == pytest.approx(sum(row["comm_ms"].values()), rel=1e-6)
            assert 0 < row["compute_ms"] and 0 <= row["idle_ms"] < row["step_ms"]
    assert profile_summary.main([str(tmp_path / "pp")]) == 0
    text = capsys.readouterr().out
    assert "rank 1 step 3:" in text and "step 3: pipeline bubble" in text and "= 11.1%)" in text and "top ops:" in text


def test_profile_summary_says_what_is_missing(tmp_path, capsys):
    assert profile_summary.main([str(tmp_path)]) == 2
    assert "no torch.profiler trace" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    assert profile_summary.main([str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert "not a readable JSON trace" in err and "{not json" not in err
