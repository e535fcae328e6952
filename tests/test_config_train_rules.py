"""`ironcore config` refuses every config that `ironcore train` would refuse at start (issue 13, item 9).

Each case below passed `ironcore config` before and failed only once training had built its process
groups, model or scheduler; now both commands run the same rules and stop with exit 2.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ironcore import cli
from ironcore.config import ConfigError, load_config

EXAMPLE = Path(__file__).resolve().parent.parent / "example.yaml"

CASES = [
    ("warmup-beyond-train-steps", ["operation.train_steps=2", "optim.warmup_steps=20", "optim.annealing_steps=0"], {},
     "optim.warmup_steps = 20 must be smaller than the decay horizon of the cosine schedule (2: "),
    ("wsd-warmup-and-decay-beyond-train-steps",
     ["optim.lr_scheduler=wsd", "operation.train_steps=10", "optim.warmup_steps=9", "optim.annealing_steps=0"], {},
     "optim.warmup_steps = 9 + wsd decay steps 2 (optim.annealing_steps, or 20% of operation.train_steps when 0) "
     "exceed operation.train_steps = 10"),
    ("ffn-not-split-by-tp", ["trainer.tensor_model_parallel_size=2", "model.d_ffn=101"], {"WORLD_SIZE": "2"},
     "model.d_ffn = 101 (set by a command-line override): must be divisible by trainer.tensor_model_parallel_size = 2"),
    ("rope-odd-head-dim", ["model.positional_embedding.type=rope", "model.head_dim=63"], {},
     "model.head_dim = 63 (set by a command-line override): RoPE rotates pairs of channels and needs an even head_dim"),
    ("llama3-rope-empty-band", ["model.positional_embedding.type=rope", "model.positional_embedding.scaling_type=llama3",
                                "model.positional_embedding.high_freq_factor=0.5"], {},
     "model.positional_embedding.high_freq_factor = 0.5 (set by a command-line override): llama3 RoPE scaling needs "
     "it above model.positional_embedding.low_freq_factor = 1.0"),
    ("sequence-parallel-uneven-sequence",
     ["trainer.tensor_model_parallel_size=2", "parallel.sequence_parallel=true", "model.max_seq_len=255"],
     {"WORLD_SIZE": "2"},
     "model.max_seq_len = 255 (set by a command-line override): must be divisible by "
     "trainer.tensor_model_parallel_size = 2 (parallel.sequence_parallel splits the sequence"),
]


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("name,overrides,env,message", CASES, ids=[c[0] for c in CASES])
def test_config_refuses_what_train_would(capsys, monkeypatch, name, overrides, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for command in ("config", "train"):
        assert cli.main([command, str(EXAMPLE), *overrides]) == 2
        out, err = capsys.readouterr()
        assert out == "" and "Traceback" not in err
        assert err.startswith(f"ironcore {command}: 1 configuration error:") and message in err, err


def test_the_scheduler_asks_the_same_rule_as_validation():
    """One rule, two callers: the message training would print is the one `ironcore config` prints."""
    from ironcore.training.scheduler import lr_schedule

    with pytest.raises(ConfigError) as at_config:
        load_config(EXAMPLE, ["operation.train_steps=2", "optim.warmup_steps=20", "optim.annealing_steps=0"])
    cfg = load_config(EXAMPLE, ["operation.train_steps=50", "optim.warmup_steps=20", "optim.annealing_steps=0"])
    with pytest.raises(ConfigError) as at_train:
        lr_schedule(cfg.optim, 2)
    assert at_train.value.errors == at_config.value.errors
    assert lr_schedule(cfg.optim, 50)(19) == pytest.approx(cfg.optim.max_lr)  # 21 steps is a valid horizon
