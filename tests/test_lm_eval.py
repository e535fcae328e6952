"""The ``ironcore`` lm-eval model type scores an IronCore checkpoint (saved at TP=2, PP=2) exactly as
lm-eval's own ``hf`` model type scores the HF export of the same checkpoint: accuracy and
per-example log-likelihoods on a local multiple-choice task, rolling log-likelihoods over several
windows, and greedy ``generate_until``. Offline: the task is a YAML over a JSON-lines file in
tests/lm_eval_task/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ironcore.checkpoint.hf import convert_hf_folder
from tests.hf_helpers import REPO, preset, random_hf_model
from tests.train_helpers import load, write_config

TASK_DIR = Path(__file__).resolve().parent / "lm_eval_task"
TASK = "ironcore_tiny_mc"
VOCAB = 50257  # the GPT-2 BPE: the task's text tokenizes for real


def test_adapter_imports_without_lm_eval():
    """lm-eval is optional: the module imports without it and `register` says what to install."""
    code = ("import sys; sys.modules['lm_eval'] = None\n"
            "import ironcore.inference.lm_eval_adapter as adapter\n"
            "try:\n    adapter.register()\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install -e .[eval]" in out.stdout


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(ironcore LM over the TP=2 PP=2 checkpoint, hf LM over its `--to hf` export)."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install -e .[eval])")
    from lm_eval.api.registry import get_model
    from lm_eval.models.huggingface import HFLM

    from ironcore.inference.lm_eval_adapter import register
    from ironcore.parallel.state import destroy_distributed
    from tools.convert_checkpoint import main as convert

    tmp = tmp_path_factory.mktemp("lm_eval")
    random_hf_model(preset("tiny-llama"), VOCAB, seed=3).save_pretrained(tmp / "hf")
    convert_hf_folder(str(tmp / "hf"), load(write_config(tmp, "run", model="tiny-llama"), "model.max_seq_len=128"),
                      str(tmp / "ckpt"), tp_size=2, pp_size=2)
    assert convert(["--from", "ironcore", "--to", "hf", "--input", str(tmp / "ckpt"), "--output", str(tmp / "out")]) == 0
    register()
    ours = get_model("ironcore").create_from_arg_string(f"checkpoint={tmp / 'ckpt'}", {"batch_size": 3})
    theirs = HFLM(pretrained=str(tmp / "out"), device="cpu", batch_size=3, dtype="float32")
    yield ours, theirs
    destroy_distributed()


def _evaluate(lm, monkeypatch) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(TASK_DIR)  # the task's data_files path is relative to it
    return lm_eval.simple_evaluate(model=lm, tasks=[TASK], log_samples=True, bootstrap_iters=0,
                                   task_manager=TaskManager(include_path=str(TASK_DIR), include_defaults=False))


def test_multiple_choice_matches_the_hf_model_type_on_the_export(models, monkeypatch):
    ours, theirs = (_evaluate(lm, monkeypatch) for lm in models)
    assert ours["results"][TASK]["acc,none"] == theirs["results"][TASK]["acc,none"]
    by_doc = {sample["doc_id"]: sample for sample in theirs["samples"][TASK]}
    assert len(ours["samples"][TASK]) == len(by_doc) == 6
    for sample in ours["samples"][TASK]:
        want = by_doc[sample["doc_id"]]
        got_ll = [resp[0][0] for resp in sample["resps"]]
        want_ll = [resp[0][0] for resp in want["resps"]]
        assert got_ll == pytest.approx(want_ll, abs=1e-5), sample["doc_id"]
        assert [resp[0][1] for resp in sample["resps"]] == [resp[0][1] for resp in want["resps"]]


def test_rolling_loglikelihood_and_generate_until_match(models):
    from lm_eval.api.instance import Instance

    ours, theirs = models
    text = "First Citizen: Before we proceed any further, hear me speak. " * 6  # ~80 tokens
    ours.scorer.max_length = theirs._max_length = 32  # several rolling windows
    try:
        rolling = [Instance("loglikelihood_rolling", {}, (text,), 0)]
        assert ours.loglikelihood_rolling(rolling)[0] == pytest.approx(theirs.loglikelihood_rolling(rolling)[0],
                                                                       abs=1e-4)
    finally:
        ours.scorer.max_length, theirs._max_length = 128, None
    requests = [Instance("generate_until", {}, (prompt, {"until": [stop], "max_gen_toks": 12, "do_sample": False}), i)
                for i, (prompt, stop) in enumerate([("Question: What do bees make?\nAnswer:", "\n"),
                                                    ("First Citizen:", ".")])]
    assert ours.generate_until(requests) == theirs.generate_until(requests)
