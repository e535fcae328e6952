"""trainer.pretrained_checkpoint: a run starts from Hugging Face or IronCore weights at step 0, and a
crash during the fine-tune resumes the fine-tune, not the base model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ironcore.training.trainer import train
from tests.hf_helpers import preset, random_hf_model
from tests.multiproc import run_distributed
from tests.train_helpers import eval_losses, load, losses, write_config

transformers = pytest.importorskip("transformers")

VOCAB = 50257  # the GPT-2 BPE the tiny presets use
EVAL = {"trainer": {"do_eval": True, "micro_batch_size": 2, "train_batch_size": 2},
        "optim": {"warmup_steps": 0},
        "operation": {"train_steps": 1, "no_save": True, "eval_samples": 4, "eval_interval": 100}}


def _train(path: str, *overrides: str) -> dict:
    return train(load(Path(path), *overrides))


def _hf_eval_loss(hf_model, cfg) -> float:
    """HF's token-averaged loss on the samples the trainer's step-0 evaluation reads."""
    from ironcore.data import build_datasets, build_tokenizer

    dataset = build_datasets(cfg, build_tokenizer(cfg.model))["eval"]
    total, count = 0.0, 0.0
    with torch.no_grad():
        for i in range(cfg.operation.eval_samples):
            sample = dataset[i]
            logits = hf_model(torch.as_tensor(sample["input_ids"])[None],
                              position_ids=torch.as_tensor(sample["position_ids"])[None]).logits[0]
            per_token = torch.nn.functional.cross_entropy(logits.double(), torch.as_tensor(sample["labels"]),
                                                          reduction="none")
            mask = torch.as_tensor(sample["loss_mask"]).double()
            total, count = total + (per_token * mask).sum().item(), count + mask.sum().item()
    return total / count


@pytest.mark.parametrize("arch", ["tiny", "tiny-llama"])
def test_hf_weights_at_tp2_start_with_hf_loss(tmp_path, arch):
    model_cfg = preset(arch)
    model_cfg.max_seq_len = 32  # what train_helpers.load runs with
    hf = random_hf_model(model_cfg, VOCAB, seed=3)
    hf.save_pretrained(tmp_path / "hf")
    path = write_config(tmp_path, "ft", model=arch, **EVAL)
    overrides = (f"trainer.pretrained_checkpoint={tmp_path / 'hf'}", "trainer.tensor_model_parallel_size=2")
    summary = run_distributed(_train, 2, str(path), *overrides)[0]
    assert summary["steps"] == 1
    ours = eval_losses(tmp_path / "ft")[0]
    assert ours == pytest.approx(_hf_eval_loss(hf, load(path)), abs=1e-4)


def test_crash_during_fine_tune_resumes_the_fine_tune(tmp_path):
    common = dict(utils={"deterministic": True, "log_level": "WARNING"}, optim={"warmup_steps": 1},
                  trainer={"micro_batch_size": 1, "train_batch_size": 1, "do_eval": True, "save_checkpoint_steps": 2},
                  operation={"train_steps": 4, "no_save": False, "eval_samples": 2, "eval_interval": 2})
    base = write_config(tmp_path, "base", **{**common, "operation": {**common["operation"], "train_steps": 2}})
    _train(str(base))
    start = f"trainer.pretrained_checkpoint={tmp_path / 'base'}"
    straight = write_config(tmp_path, "straight", **common)
    _train(str(straight), start, "operation.no_save=true")
    crashed = write_config(tmp_path, "crashed", **common)
    assert _train(str(crashed), start, "operation.exit_interval=2")["steps"] == 2
    assert _train(str(crashed), start)["steps"] == 4  # resumed at step 2 of the fine-tune
    # The fine-tune started from the base's final weights, at step 0 ...
    assert eval_losses(tmp_path / "straight")[0] == eval_losses(tmp_path / "base")[2]
    # ... and the resumed run continued the fine-tune exactly, not the base.
    want, got = losses(tmp_path / "straight"), losses(tmp_path / "crashed")
    logged = [json.loads(line) for line in (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4]  # the second run logged steps 3-4 only
    assert [got[s] for s in (3, 4)] == [want[s] for s in (3, 4)]
