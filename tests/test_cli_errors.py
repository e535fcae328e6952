"""User mistakes: each bad input exits with status 2 and a message naming the key or file, no traceback.

Most cases call `ironcore.cli.main` in-process (fast); three run the real `python -m ironcore` to prove
the exit status and the absence of a traceback end to end.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from ironcore import cli

# (case id, config file text, overrides, extra files {name: text}, env, expected message fragments).
# "{cfg}" in a fragment stands for the config file's path.
CASES = [
    ("malformed-yaml", "trainer:\n  micro_batch_size: [1, 2\n", [], {}, {},
     ["{cfg}:3: malformed YAML"]),
    ("top-level-list", "- trainer\n- model\n", [], {}, {},
     ["{cfg}: the top level must be a mapping of groups"]),
    ("unknown-group", "optimizer:\n  max_lr: 1.0e-3\n", [], {}, {},
     ["unknown group 'optimizer' (set at {cfg}:1); did you mean 'optim'?"]),
    ("unknown-key", "trainer:\n  micro_bach_size: 4\n", [], {}, {},
     ["trainer.micro_bach_size: unknown key (set at {cfg}:2); did you mean 'micro_batch_size'?"]),
    ("key-in-wrong-group", "trainer:\n  max_lr: 1.0e-3\n", [], {}, {},
     ["trainer.max_lr: unknown key (set at {cfg}:2); did you mean 'optim.max_lr'?"]),
    ("string-for-int", "model:\n  num_layers: two\n", [], {}, {},
     ["model.num_layers = 'two' (set at {cfg}:2): expected an integer, got a string"]),
    ("bool-for-int", "trainer:\n  micro_batch_size: true\n", [], {}, {},
     ["trainer.micro_batch_size = true (set at {cfg}:2): expected an integer, got true/false"]),
    ("float-for-int", "model:\n  d_model: 512.5\n", [], {}, {},
     ["model.d_model = 512.5 (set at {cfg}:2): expected an integer, got a number"]),
    ("string-for-bool", "trainer:\n  do_eval: sometimes\n", [], {}, {},
     ["trainer.do_eval = 'sometimes' (set at {cfg}:2): expected true or false, got a string"]),
    ("int-for-bool", "operation:\n  no_save: 1\n", [], {}, {},
     ["operation.no_save = 1 (set at {cfg}:2): expected true or false, got an integer"]),
    ("string-for-float", "", ["optim.max_lr=fast"], {}, {},
     ["optim.max_lr = 'fast' (set by a command-line override): expected a number, got a string"]),
    ("bad-ln-type", "model:\n  ln_type: batchnorm\n", [], {}, {},
     ["model.ln_type = 'batchnorm' (set at {cfg}:2): must be one of 'layernorm', 'rmsnorm'"]),
    ("bad-positional-type", "", ["model.positional_embedding.type=alibi"], {}, {},
     ["model.positional_embedding.type = 'alibi' (set by a command-line override): "
      "must be one of 'absolute', 'rope', 'none'"]),
    ("bad-precision", "model:\n  precision: bf16\n", [], {}, {},
     ["model.precision = 'bf16' (set at {cfg}:2): must be one of 'bfloat16', 'float16', 'float32'"]),
    ("dp-random-init", "init:\n  data_parallel_random_init: true\n", [], {}, {},
     ["init.data_parallel_random_init = true (set at {cfg}:2): not supported: every data-parallel replica "
      "starts from the same initial weights; allowed: false"]),
    ("bad-fsdp-strategy", "parallel:\n  fsdp_sharding_strategy: zero3\n", [], {}, {},
     ["parallel.fsdp_sharding_strategy = 'zero3' (set at {cfg}:2): must be one of 'full', 'hybrid', 'no_shard'"]),
    ("bad-log-cadence", "trainer:\n  grad_norm_log_interval: always\n", [], {}, {},
     ["trainer.grad_norm_log_interval = 'always' (set at {cfg}:2): must be one of 'log', 'checkpoint' or null"]),
    ("bad-log-level", "utils:\n  log_level: verbose\n", [], {}, {},
     ["utils.log_level = 'verbose' (set at {cfg}:2): must be one of 'DEBUG', 'INFO'"]),
    ("micro-batch-zero", "trainer:\n  micro_batch_size: 0\n", [], {}, {},
     ["trainer.micro_batch_size = 0 (set at {cfg}:2): must be >= 1"]),
    ("dropout-above-one", "model:\n  dropout_attn: 1.5\n", [], {}, {},
     ["model.dropout_attn = 1.5 (set at {cfg}:2): must be >= 0 and <= 1"]),
    ("beta2-one", "optim:\n  adam_beta2: 1\n", [], {}, {},
     ["optim.adam_beta2 = 1.0 (set at {cfg}:2): must be >= 0 and < 1"]),
    ("missing-model-preset", "model: gpt2-smal\n", [], {}, {},
     ["model: preset file 'gpt2-smal' not found (set at {cfg}:1)", "did you mean 'gpt2-small'?"]),
    ("missing-data-file", "data:\n  config_path: nowhere/data.yaml\n", [], {}, {},
     ["data: preset file 'nowhere/data.yaml' not found (set at {cfg}:2)"]),
    ("preset-not-a-mapping", "model: mine\n", [], {"mine.yaml": "- 1\n- 2\n"}, {},
     ["mine.yaml: a model preset must be a mapping of model keys"]),
    ("circular-interpolation", "trainer:\n  model_name: ${trainer.model_path}\n  model_path: ${trainer.model_name}\n",
     [], {}, {}, ["circular interpolation trainer.model_name -> trainer.model_path -> trainer.model_name"]),
    ("unknown-interpolation", "trainer:\n  model_name: ${model.d_modle}\n", [], {}, {},
     ["trainer.model_name = '${model.d_modle}' (set at {cfg}:2): interpolation ${model.d_modle} names no config key",
      "did you mean 'model.d_model'?"]),
    ("interpolate-group", "trainer:\n  model_name: ${model}\n", [], {}, {},
     ["${model} names a whole group"]),
    ("inconsistent-batch",
     "trainer:\n  micro_batch_size: 4\n  train_batch_size: 30\n  gradient_accumulation_steps: 4\n", [], {}, {},
     ["trainer.train_batch_size = 30 (set at {cfg}:3) is inconsistent: micro_batch_size 4 × "
      "data-parallel size 1 × gradient_accumulation_steps 4 (set at {cfg}:4) = 16"]),
    ("batch-not-divisible", "trainer:\n  micro_batch_size: 4\n  train_batch_size: 30\n", [], {}, {"WORLD_SIZE": "2"},
     ["trainer.train_batch_size = 30 (set at {cfg}:3): must be a multiple of micro_batch_size 4 × "
      "data-parallel size 2 = 8"]),
    ("tp-not-dividing-heads",
     "model:\n  num_attention_heads: 12\n  d_model: 768\ntrainer:\n  tensor_model_parallel_size: 5\n", [], {},
     {"WORLD_SIZE": "10"},
     ["model.num_attention_heads = 12 (set at {cfg}:2): must be divisible by trainer.tensor_model_parallel_size = 5"]),
    ("world-not-divisible", "trainer:\n  tensor_model_parallel_size: 4\n", [], {}, {"WORLD_SIZE": "6"},
     ["parallel.world_size = 6 (derived (WORLD_SIZE environment variable)): must be divisible by "
      "tensor_model_parallel_size 4 (set at {cfg}:2) × pipeline_model_parallel_size 1 (default) = 4"]),
    ("gqa-not-dividing-heads", "model:\n  num_attention_heads: 8\n  num_attention_groups: 3\n", [], {}, {},
     ["model.num_attention_heads = 8 (set at {cfg}:2): must be divisible by model.num_attention_groups = 3"]),
    ("gqa-not-divisible-by-tp", "model:\n  num_attention_groups: 2\ntrainer:\n  tensor_model_parallel_size: 4\n",
     [], {}, {"WORLD_SIZE": "4"},
     ["model.num_attention_groups = 2 (set at {cfg}:2): must be divisible by trainer.tensor_model_parallel_size = 4"]),
    ("layers-not-divisible-by-pp", "model:\n  num_layers: 5\ntrainer:\n  pipeline_model_parallel_size: 2\n",
     [], {}, {"WORLD_SIZE": "2"},
     ["model.num_layers = 5 (set at {cfg}:2): must be divisible by trainer.pipeline_model_parallel_size = 2"]),
    ("head-dim-not-derivable", "model:\n  d_model: 100\n", [], {}, {},
     ["model.d_model = 100 (set at {cfg}:2): must be divisible by model.num_attention_heads"]),
    ("splits-sum", "data:\n  splits: [0.9, 0.2, 0.0]\n", [], {}, {},
     ["data.splits = [0.9, 0.2, 0.0] (set at {cfg}:2): must be 3 non-negative numbers"]),
    ("splits-length", "", ["data.splits=[0.5,0.5]"], {}, {},
     ["data.splits = [0.5, 0.5] (set by a command-line override): must be 3 non-negative numbers"]),
    ("profile-window", "utils:\n  profile_torch: true\n  profile_step_start: 20\n  profile_step_end: 20\n", [], {}, {},
     ["utils.profile_step_end = 20 (set at {cfg}:4): must be > utils.profile_step_start = 20 (set at {cfg}:3); "
      "the profiled steps are profile_step_start <= step < profile_step_end"]),
    ("min-lr-above-max", "optim:\n  max_lr: 1.0e-4\n  min_lr: 1.0e-3\n", [], {}, {},
     ["optim.min_lr = 0.001 (set at {cfg}:3): must be <= optim.max_lr = 0.0001 (set at {cfg}:2)"]),
    ("dataset-unknown-key", "data:\n  train_datasets:\n    - paht: x\n", [], {}, {},
     ["data.train_datasets[0].paht: unknown key (set at {cfg}:3); did you mean 'path'?",
      "data.train_datasets[0].path = null (set at {cfg}:3): every dataset entry needs a path"]),
    ("dataset-bad-weight", "data:\n  eval_datasets:\n    - {path: a, weight: 0}\n", [], {}, {},
     ["data.eval_datasets[0].weight = 0 (set at {cfg}:3): must be a number > 0"]),
    ("dataset-not-mapping", "data:\n  test_datasets: [just/a/path]\n", [], {}, {},
     ["data.test_datasets[0] = 'just/a/path' (set at {cfg}:2): a dataset entry must be a mapping"]),
    ("override-without-equals", "", ["trainer.micro_batch_size"], {}, {},
     ["override 'trainer.micro_batch_size': expected group.key=value or group=preset"]),
    ("override-unknown-group", "", ["optimizer.max_lr=1"], {}, {},
     ["override 'optimizer.max_lr=1': unknown group 'optimizer'; did you mean 'optim'?"]),
    ("override-bad-yaml", "", ["data.splits=[0.5,"], {}, {},
     ["override 'data.splits=[0.5,': the value is not valid YAML"]),
    ("override-group-not-name", "", ["model=3"], {}, {},
     ["override 'model=3': model=... names a preset file, got 3"]),
    ("group-is-number", "model: 5\n", [], {}, {},
     ["model = 5 (set at {cfg}:1): a group must be a mapping of its keys or the name of a preset file"]),
    ("nested-not-mapping", "model:\n  positional_embedding: rope\n", [], {}, {},
     ["model.positional_embedding = 'rope' (set at {cfg}:2): must be a mapping with keys type, base"]),
    ("duplicate-key", "trainer:\n  micro_batch_size: 2\n  micro_batch_size: 4\n", [], {}, {},
     ["trainer.micro_batch_size ({cfg}:3): key written twice in the same mapping"]),
    ("world-size-not-the-launchers", "", ["parallel.world_size=2", "trainer.train_batch_size=4"], {}, {},
     ["parallel.world_size = 2 (set by a command-line override) disagrees with the launcher: a single process "
      "(no WORLD_SIZE or SLURM_NTASKS in the environment); the world size is the launcher's: remove the key, "
      "set it to 1"]),
    ("world-size-not-torchruns", "parallel:\n  world_size: 8\n", [], {}, {"WORLD_SIZE": "4"},
     ["parallel.world_size = 8 (set at {cfg}:2) disagrees with the launcher: WORLD_SIZE=4 in the environment"]),
    ("bad-world-size-env", "", [], {}, {"WORLD_SIZE": "two"},
     ["parallel.world_size: environment variable WORLD_SIZE='two' is not a valid positive integer"]),
    ("missing-config-file", None, [], {}, {}, ["{cfg}: config file not found"]),
    ("megatron-save-interval", "trainer:\n  save_interval: 100\n", [], {}, {},
     ["trainer.save_interval: unknown key (set at {cfg}:2); did you mean 'trainer.save_checkpoint_steps'? "
      "(Megatron-LM's --save-interval)"]),
    ("megatron-lr", "", ["optim.lr=3e-4", "model.hidden_size=64", "trainer.train_iters=5"], {}, {},
     ["optim.lr: unknown key (set by a command-line override); did you mean 'optim.max_lr'?",
      "model.hidden_size: unknown key (set by a command-line override); did you mean 'model.d_model'?",
      "did you mean 'operation.train_steps'? (Megatron-LM's --train-iters)"]),
    ("infinite-float", "parallel:\n  timeout_minute: .inf\n", [], {}, {},
     ["parallel.timeout_minute = inf (set at {cfg}:2): must be a finite number"]),
    ("int-beyond-int64", "trainer:\n  micro_batch_size: 99999999999999999999999\n", [], {}, {},
     ["trainer.micro_batch_size = 99999999999999999999999 (set at {cfg}:2): must fit in a 64-bit integer"]),
    ("virtual-stages-without-pp", "", ["parallel.virtual_pipeline_stages=2"], {}, {},
     ["parallel.virtual_pipeline_stages = 2 (set by a command-line override): interleaving needs pipeline "
      "parallelism (trainer.pipeline_model_parallel_size >= 2, got 1)"]),
    ("interleaved-without-pp", "", ["parallel.pipeline_schedule=interleaved"], {}, {},
     ["parallel.pipeline_schedule = interleaved (set by a command-line override) and "
      "parallel.virtual_pipeline_stages = 1 (default): interleaving needs pipeline parallelism"]),
    ("preset-is-not-a-config", "model: secret.txt\n", [], {"secret.txt": "hunter2 is the password\n"}, {},
     ["secret.txt: a model preset must be a mapping of model keys, got a string (its contents are not shown)"]),
    ("data-file-is-not-a-config", "data:\n  config_path: secret.txt\n", [],
     {"secret.txt": "root:hunter2:0:0:\nbin:x:1:1:\n"}, {},
     ["data: 2 key(s) that are not names (set at", "(its contents are not shown)"]),
]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)


def _setup(tmp_path: Path, text, files) -> Path:
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    cfg = tmp_path / "run.yaml"
    if text is not None:
        cfg.write_text(text)
    return cfg


def test_there_are_at_least_30_distinct_cases():
    assert len({case[0] for case in CASES}) == len(CASES) >= 30


@pytest.mark.parametrize("name,text,overrides,files,env,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_naming_the_key(tmp_path, capsys, monkeypatch, name, text, overrides, files, env, expected):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = _setup(tmp_path, text, files)
    status = cli.main(["config", str(cfg), *overrides])
    out, err = capsys.readouterr()
    assert status == 2
    assert out == "" and "Traceback" not in err
    for fragment in expected:
        assert fragment.replace("{cfg}", str(cfg)) in err, err
    assert "hunter2" not in err


def _alias_bomb(levels: int = 8) -> str:
    """A few hundred bytes of YAML whose aliases expand to 9**9 values."""
    value = "[1, 1, 1, 1, 1, 1, 1, 1, 1]"
    for name in "abcdefghij"[:levels]:
        value = f"[&{name} {value}, " + ", ".join([f"*{name}"] * 8) + "]"
    return f"utils:\n  profile_ranks: {value}\n"


@pytest.mark.parametrize("text,expected", [
    (_alias_bomb(), "malformed YAML: aliases expand to more than 100,000 values"),
    ("trainer:\n  micro_batch_size: " + "[" * 100_000 + "\n", "malformed YAML: nested too deeply"),
])
def test_hostile_yaml_exits_2_fast_with_one_line(tmp_path, text, expected):
    (tmp_path / "run.yaml").write_text(text)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "ironcore", "config", str(tmp_path / "run.yaml")],
                          capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert time.monotonic() - start < 10
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == ["ironcore config: 1 configuration error:",
                                        f"  - {tmp_path / 'run.yaml'}: {expected}"[:len(proc.stderr)]] or \
        (expected in proc.stderr and len(proc.stderr) < 300), proc.stderr[:500]


@pytest.mark.parametrize("command", ["config", "train"])
@pytest.mark.parametrize("override,expected", [
    ("utils.profile_ranks=" + _alias_bomb(6).split(": ", 1)[1].strip(), "aliases expand to more than 100,000 values"),
    ("trainer.micro_batch_size=" + "[" * 100_000, "the value is not valid YAML (nested too deeply)"),
    ("parallel.timeout_minute=.inf", "parallel.timeout_minute = inf (set by a command-line override): must be a "
     "finite number"),
], ids=["alias-bomb", "deep-nesting", "infinite-float"])
def test_hostile_overrides_exit_2_fast_with_an_excerpt(tmp_path, command, override, expected):
    (tmp_path / "run.yaml").write_text("model: tiny\n")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "ironcore", command, str(tmp_path / "run.yaml"), override],
                          capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert time.monotonic() - start < 10
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-500:]
    assert expected in proc.stderr and len(proc.stderr) < 400, proc.stderr[:500]


def test_all_errors_reported_at_once(tmp_path, capsys):
    cfg = _setup(tmp_path, "model:\n  ln_type: batchnorm\n  num_layers: two\ntrainer:\n  micro_bach_size: 4\n", {})
    assert cli.main([str(cfg), "optim.max_lr=fast"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ironcore train: 4 configuration errors:")
    assert all(k in err for k in ("model.ln_type", "model.num_layers", "trainer.micro_bach_size", "optim.max_lr"))


@pytest.mark.parametrize("argv,expected", [
    (["config", "{dir}/run.yaml", "model.ln_type=batchnorm"], "must be one of 'layernorm', 'rmsnorm'"),
    (["train", "--config", "{dir}/run.yaml", "trainer.micro_bach_size=2"], "did you mean 'micro_batch_size'?"),
    (["{dir}/missing.yaml"], "missing.yaml: config file not found"),
])
def test_real_process_exit_status_2_without_traceback(tmp_path, argv, expected):
    (tmp_path / "run.yaml").write_text("model: tiny\n")
    argv = [a.replace("{dir}", str(tmp_path)) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "ironcore", *argv], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
