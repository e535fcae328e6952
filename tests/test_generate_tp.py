"""Generation from checkpoints: TP=2 equals TP=1 (real gloo ranks), any checkpoint layout loads,
and the `tools/generate.py` command line.

A random LLaMA-style model with GQA (4 query heads, 2 kv groups: one per TP rank) is converted
from a Hugging Face folder into a TP=1 single-file checkpoint. Two ranks load it resharded to TP=2,
generate (greedy and sampled), save it as a distributed checkpoint and generate again from that;
one process loads both checkpoints at TP=1. Every run must produce the same token ids.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ironcore.checkpoint.hf import convert_hf_folder
from ironcore.checkpoint.io import save_checkpoint
from ironcore.config.schema import Config
from ironcore.inference import SamplingParams, generate, load_checkpoint_model, load_for_generation
from ironcore.parallel.state import ParallelState, init_distributed
from tests.hf_helpers import REPO, preset, random_hf_model
from tests.multiproc import run_distributed

transformers = pytest.importorskip("transformers")
PROMPTS = [[11, 42, 7, 300, 5], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 250], [77, 78]]
RUNS = {"greedy": SamplingParams(max_new_tokens=16, temperature=0.0),
        "sampled": SamplingParams(max_new_tokens=16, temperature=0.8, top_k=40, top_p=0.95, seed=11)}


def _hf_folder(path: Path, preset_name: str, vocab: int) -> Path:
    """A random HF model saved with `save_pretrained` (weights scaled up for clear logit gaps)."""
    random_hf_model(preset(preset_name), vocab, seed=0, attn_implementation=None).save_pretrained(path)
    return path


def _generate_all(model) -> dict[str, list[list[int]]]:
    return {name: generate(model, PROMPTS, params).tokens for name, params in RUNS.items()}


def _tp_worker(ckpt: Path, dist_root: Path, tp: int) -> dict:
    cfg = Config()
    cfg.trainer.tensor_model_parallel_size = tp
    cfg.parallel.dist_backend = "gloo"
    pstate = init_distributed(cfg)
    model, model_cfg = load_checkpoint_model(ckpt, pstate)  # TP=1 single file, resharded
    results = {"single": _generate_all(model)}
    if tp > 1:  # save this layout as a distributed checkpoint for the TP=1 run to reshard
        model_cfg.trainer.model_path = str(dist_root)
        model_cfg.operation.save_dist_ckpt = True
        save_checkpoint(model_cfg, pstate, 3, model, None, None, None, {})
    model, _ = load_checkpoint_model(dist_root, pstate)
    results["dist"] = _generate_all(model)
    return results


@pytest.mark.timeout(300)
def test_tp2_generation_equals_tp1_from_single_and_distributed_checkpoints(tmp_path):
    hf_dir = _hf_folder(tmp_path / "hf", "tiny-llama", vocab=1000)
    ckpt = convert_hf_folder(str(hf_dir), Config(model=preset("tiny-llama")), str(tmp_path / "ckpt"), tp_size=1)
    tp2 = run_distributed(_tp_worker, 2, ckpt, tmp_path / "dist", 2)
    tp1 = run_distributed(_tp_worker, 1, ckpt, tmp_path / "dist", 1)[0]
    reference = tp1["single"]
    assert reference["greedy"] != reference["sampled"]
    assert all(len(row) == 16 for run in reference.values() for row in run)
    for result in (*tp2, tp1):
        assert result == {"single": reference, "dist": reference}


def test_generate_tool(tmp_path, capsys):
    """`--checkpoint` in-process (greedy output = the library's), `--hf` as a real subprocess, and a
    too-long prompt failing with a message that names max_seq_len."""
    from ironcore.inference.cli import main

    hf_dir = _hf_folder(tmp_path / "hf", "tiny", vocab=50257)  # the shipped GPT-2 tokenizer's vocabulary
    convert_hf_folder(str(hf_dir), Config(model=preset("tiny")), str(tmp_path / "ckpt"))
    loaded = load_for_generation(ParallelState(), hf_dir=hf_dir)
    prompts = ["The quick brown fox", "Once upon a time"]
    out = generate(loaded.model, [loaded.tokenizer.encode(p) for p in prompts],
                   SamplingParams(max_new_tokens=8, temperature=0.0), eod_id=loaded.eod_id)
    expected = [p + loaded.tokenizer.decode(t) for p, t in zip(prompts, out.tokens)]

    args = ["--prompt", prompts[0], "--prompt", prompts[1], "--max-new-tokens", "8", "--temperature", "0"]
    assert main(["--checkpoint", str(tmp_path / "ckpt"), *args]) == 0
    printed = capsys.readouterr().out
    assert all(text in printed for text in expected)
    assert "tokens/s" in printed

    proc = subprocess.run([sys.executable, str(REPO / "tools" / "generate.py"), "--hf", str(hf_dir), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert all(text in proc.stdout for text in expected) and "tokens/s" in proc.stdout

    assert main(["--checkpoint", str(tmp_path / "ckpt"), "--prompt", "word " * 200]) == 1
    assert "model.max_seq_len is 128" in capsys.readouterr().err



class _NotTensors:
    """An object a ``weights_only`` load refuses (stands in for a pickle that runs code)."""


def _load_error_worker(ckpt: Path) -> str:
    from ironcore.checkpoint.errors import CheckpointError
    cfg = Config()
    cfg.parallel.dist_backend = "gloo"
    try:
        load_checkpoint_model(ckpt, init_distributed(cfg))
    except CheckpointError as e:
        return str(e)
    return "loaded"


def test_unsafe_model_file_with_matching_manifest_is_a_one_line_checkpoint_error(tmp_path):
    """A model file the manifest's checksum vouches for but that holds arbitrary objects is refused by
    the loader (never unpickled), with a one-line error naming the file rather than a traceback."""
    import hashlib
    import json

    import torch

    from ironcore.checkpoint import io as ckpt_io
    from ironcore.inference.loading import checkpoint_folder

    ckpt = Path(convert_hf_folder(str(_hf_folder(tmp_path / "hf", "tiny-llama", vocab=1000)),
                                  Config(model=preset("tiny-llama")), str(tmp_path / "ckpt"), tp_size=1))
    folder = checkpoint_folder(ckpt)
    name = ckpt_io.model_file(0, 0)
    torch.save({"weights": _NotTensors()}, folder / name)
    data = (folder / name).read_bytes()
    manifest = json.loads((folder / ckpt_io.MANIFEST).read_text())
    manifest["files"][name] = {**manifest["files"][name], "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / ckpt_io.MANIFEST).write_text(json.dumps(manifest))
    message = run_distributed(_load_error_worker, 1, ckpt)[0]
    assert str(folder / name) in message and "weights_only=True refused it" in message and "\n" not in message
