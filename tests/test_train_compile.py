"""`trainer.compile_model`: the torch.compile'd model trains like the eager one, and its checkpoint
keys are unchanged (compiling in place keeps parameter names)."""

from __future__ import annotations

import pytest
import torch

from ironcore.training.trainer import train
from tests.train_helpers import load, losses, write_config


def test_compiled_model_matches_eager(tmp_path):
    runs = {}
    for compiled in (False, True):
        name = f"compiled{int(compiled)}"
        path = write_config(tmp_path, name, operation={"train_steps": 3, "no_save": False})
        train(load(path, f"trainer.compile_model={str(compiled).lower()}"))
        runs[compiled] = losses(tmp_path / name)
    assert sorted(runs[True]) == [1, 2, 3]
    for step, loss in runs[False].items():
        assert runs[True][step] == pytest.approx(loss, abs=1e-5), step
    eager = torch.load(tmp_path / "compiled0" / "iter_0000003" / "model_tp00_pp00.pt", weights_only=True)
    compiled = torch.load(tmp_path / "compiled1" / "iter_0000003" / "model_tp00_pp00.pt", weights_only=True)
    assert eager.keys() == compiled.keys()
