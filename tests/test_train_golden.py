"""Golden numerics: the first 20 training losses of a fixed tiny run (deterministic, CPU, fp32, one
thread) must stay what they were, to 1e-6, so any change that silently alters the numerics of the
model, data pipeline, optimizer or schedule is caught.

After an intended numerics change, regenerate and commit the file (and say why in the commit):
    python -m tests.test_train_golden
"""

import json
import sys
from pathlib import Path

import pytest
import torch

from ironcore.training.trainer import train
from tests.train_helpers import load, losses, write_config

GOLDEN = Path(__file__).parent / "golden" / "tiny_gpt_first20_losses.json"


def golden_run(tmp_path: Path) -> dict[int, float]:
    path = write_config(tmp_path, "golden", operation={"train_steps": 20, "no_save": True},
                        optim={"max_lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 5, "lr_scheduler": "cosine",
                               "weight_decay": 0.1},
                        utils={"log_level": "WARNING", "deterministic": True}, init={"seed": 1234})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matmul reduction order depends on the thread count
    try:
        train(load(path))
    finally:
        torch.set_num_threads(threads)
    return losses(tmp_path / "golden")


def test_first_20_losses_match_golden(tmp_path):
    expected = {int(k): v for k, v in json.loads(GOLDEN.read_text())["losses"].items()}
    got = golden_run(tmp_path)
    assert not torch.are_deterministic_algorithms_enabled()  # train() restored the process state
    assert sorted(got) == sorted(expected) == list(range(1, 21))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-6), f"step {step}: {got[step]} != {expected[step]}"


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        values = golden_run(Path(tmp))
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({
        "what": "first 20 training losses of tests/test_train_golden.py::golden_run (tiny GPT, seq 32, "
                "micro 2 x accumulation 2, Shakespeare, fp32, deterministic, 1 thread)",
        "torch": torch.__version__,
        "losses": {str(k): v for k, v in sorted(values.items())},
    }, indent=1) + "\n")
    print(f"wrote {GOLDEN}", file=sys.stderr)
