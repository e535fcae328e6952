"""Settings that cannot act in the chosen layout are named in one warning each, once, at start
(issue 13, item 6); a config without them prints no warning."""

from __future__ import annotations

from pathlib import Path

import pytest

from ironcore import cli

EXAMPLE = Path(__file__).resolve().parent.parent / "example.yaml"

INERT = [
    ("parallel.sequence_parallel=true",
     "parallel.sequence_parallel = true (set by a command-line override) has no effect: "
     "trainer.tensor_model_parallel_size is 1"),
    ("parallel.pipeline_schedule=gpipe",
     "parallel.pipeline_schedule = 'gpipe' (set by a command-line override) has no effect: "
     "trainer.pipeline_model_parallel_size is 1"),
    ("parallel.fsdp_offload_params=true", "parallel.fsdp_offload_params = true (set by a command-line override) "
     "has no effect: parallel.use_fsdp is false"),
    ("parallel.fsdp_mixed_precision=bf16", "parallel.fsdp_mixed_precision = 'bf16'"),
    ("parallel.fsdp_sharding_strategy=hybrid", "parallel.fsdp_sharding_strategy = 'hybrid'"),
    ("parallel.fsdp_state_dict_type=sharded", "parallel.fsdp_state_dict_type = 'sharded'"),
    ("model.positional_embedding.base=500000", "model.positional_embedding.base = 500000 (set by a command-line "
     "override) has no effect: model.positional_embedding.type is 'absolute' and only RoPE reads it"),
    ("model.positional_embedding.type=none model.positional_embedding.offset=2", "model.positional_embedding.offset "
     "= 2 (set by a command-line override) has no effect: model.positional_embedding.type is 'none'"),
    ("model=tiny-llama model.positional_embedding.offset=2", "model.positional_embedding.offset = 2 (set by a "
     "command-line override) has no effect: RoPE is relative"),
    ("model=tiny-llama model.positional_embedding.low_freq_factor=2", "model.positional_embedding.low_freq_factor "
     "= 2.0 (set by a command-line override) has no effect: model.positional_embedding.scaling_type is 'linear'"),
]


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("override,warning", INERT, ids=[o for o, _ in INERT])
def test_each_inert_setting_is_one_warning(capsys, override, warning):
    assert cli.main(["config", str(EXAMPLE), *override.split()]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ironcore config: warning: {warning}"), lines


def test_no_warning_when_every_setting_acts(capsys, monkeypatch):
    assert cli.main(["config", str(EXAMPLE)]) == 0
    assert capsys.readouterr().err == ""
    # The same keys in a layout where they act: TP 2 for sequence parallelism, FSDP for fsdp_*.
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["config", str(EXAMPLE), "trainer.tensor_model_parallel_size=2", "trainer.train_batch_size=8",
                     "parallel.sequence_parallel=true"]) == 0
    assert cli.main(["config", str(EXAMPLE), "parallel.use_fsdp=true", "parallel.fsdp_offload_params=true",
                     "parallel.fsdp_mixed_precision=bf16", "model.precision=bfloat16"]) == 0
    assert capsys.readouterr().err == ""


def test_warnings_print_once_on_rank_0_only(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["config", str(EXAMPLE), "parallel.sequence_parallel=true"]) == 0
    assert capsys.readouterr().err == ""
