"""Supervised fine-tuning end to end: `--task sft` data → packed samples → the trainer.

The trainer's first loss must be exactly the loss-masked mean over response tokens with attention
kept inside each packed example (computed here by hand from the same model and batches), and a
fixed response must be learned.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from ironcore.data import build_datasets, build_loader, build_tokenizer, resolve_vocab_size
from ironcore.data.preprocess import main as preprocess
from ironcore.model import build_model
from ironcore.parallel.state import ParallelState
from ironcore.training.trainer import train
from tests.train_helpers import ROOT, load, losses, write_config

RESPONSE = " The answer is always forty two."


@pytest.fixture(scope="module")
def sft_prefix(tmp_path_factory) -> Path:
    """64 prompt/response pairs: prompts are two words of Shakespeare, the response is always the same."""
    folder = tmp_path_factory.mktemp("sft")
    lines = [ln for ln in (ROOT / "ironcore" / "assets" / "tinyshakespeare.txt").read_text().splitlines() if ln]
    rng = random.Random(0)
    with open(folder / "pairs.jsonl", "w") as f:
        for _ in range(64):
            prompt = " ".join(rng.choice(lines).split()[:2])  # short: several examples pack into a row
            f.write(json.dumps({"prompt": prompt, "response": RESPONSE}) + "\n")
    assert preprocess(["--input", str(folder / "pairs.jsonl"), "--output-prefix", str(folder / "pairs"),
                       "--task", "sft", "--workers", "1"]) == 0
    return folder / "pairs"


def _config(tmp_path: Path, prefix: Path, steps: int):
    path = write_config(tmp_path, f"sft{steps}", operation={"train_steps": steps, "no_save": True},
                        optim={"max_lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 0},
                        data={"task_type": "sft", "train_datasets": [{"path": str(prefix)}],
                              "splits": [1.0, 0.0, 0.0]})
    return load(path)


def test_first_loss_is_the_masked_mean_over_packed_examples(tmp_path, sft_prefix):
    cfg = _config(tmp_path, sft_prefix, steps=1)
    train(cfg)
    logged = losses(cfg.trainer.model_path)[1]

    tokenizer = build_tokenizer(cfg.model)
    vocab = resolve_vocab_size(cfg, tokenizer)
    loader = build_loader(build_datasets(cfg, tokenizer)["train"], cfg.trainer.micro_batch_size, 0, 1, cfg.init.seed)
    model = build_model(cfg, ParallelState(), vocab)  # seeded from init.seed: the trainer's initial weights
    per_micro_batch = []
    with torch.no_grad():
        for _ in range(cfg.trainer.gradient_accumulation_steps):
            batch = next(loader)
            assert batch["segment_ids"].max() > 1  # examples are really packed
            assert 0 < batch["loss_mask"].sum() < batch["loss_mask"].numel()  # prompts are masked out
            per_token = model(batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"],
                              segment_ids=batch["segment_ids"])
            mask = batch["loss_mask"]
            per_micro_batch.append(((per_token * mask).sum() / mask.sum()).item())
    assert logged == pytest.approx(sum(per_micro_batch) / len(per_micro_batch), abs=1e-5)


def test_a_fixed_response_is_learned(tmp_path, sft_prefix):
    cfg = _config(tmp_path, sft_prefix, steps=40)
    summary = train(cfg)
    assert summary["steps"] == 40
    assert summary["first_loss"] - summary["final_loss"] > 3.0

