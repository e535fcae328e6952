"""Type, choice and range checks, and the cross-field rules of SPEC §3.

``build_config`` turns the merged plain values into the typed dataclasses, checking each field against
its annotation and its metadata (``choices``, ``minimum``, ``maximum``, ``exclusive_minimum``,
``exclusive_maximum``). ``check_rules`` then applies the rules that involve several keys and fills in
the derived values (batch arithmetic, head_dim, vocab_size, world size from the launcher's env).
Problems are appended to ``errors``; each message names the key, where it was set, the value and what
is allowed. ``bad`` holds keys already reported, so a rule never piles a second error onto them.
"""

from __future__ import annotations

import difflib
import functools
import math
import os
import reprlib
import typing
from dataclasses import Field, asdict, fields, is_dataclass
from typing import Any, Optional, Union

from ironcore.config.errors import ConfigError
from ironcore.config.launcher import launcher_vars
from ironcore.config.schema import GROUPS, Config, OptimConfig, ParallelConfig, PositionalEmbeddingConfig

GPT2_VOCAB_SIZE = 50257
# Values quoted in messages are cut short (lazily: an alias-expanded list is never printed whole).
_EXCERPT = reprlib.Repr()
_EXCERPT.maxlevel, _EXCERPT.maxlist, _EXCERPT.maxstring, _EXCERPT.maxother, _EXCERPT.maxlong = 2, 8, 80, 80, 40
DATASET_ENTRY_KEYS = {"path": "required, a string", "weight": "a number > 0, default 1.0"}


# ---------------------------------------------------------------------------------------------
# Message helpers
# ---------------------------------------------------------------------------------------------

def origin(source: str) -> str:
    """Where a value came from, for messages."""
    if source == "default":
        return "default"
    if source == "override":
        return "set by a command-line override"
    if source == "code":
        return "set in code"
    if source.startswith("derived"):
        return source
    return f"set at {source}"


def kind(value: Any) -> str:
    """A value's YAML type in words, e.g. ``a string``."""
    if isinstance(value, dict):
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list",
            type(None): "null"}.get(type(value), type(value).__name__)


def describe(value: Any) -> str:
    """A value as written in YAML (``'abc'``, ``3``, ``[1, 2]``, ``null``); mappings are just named."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return _EXCERPT.repr(value)  # a short excerpt, never the whole (possibly alias-expanded) value


def _field_error(errors: list[str], bad: set[str], key: str, value: Any, prov: dict[str, str],
                 problem: str) -> None:
    bad.add(key)
    errors.append(f"{key} = {describe(value)} ({origin(prov.get(key, 'default'))}): {problem}")


# ---------------------------------------------------------------------------------------------
# Field types and metadata
# ---------------------------------------------------------------------------------------------

def field_hints(cls: type) -> dict[str, Any]:
    """Resolved type annotations of a config dataclass."""
    return typing.get_type_hints(cls)


def split_optional(hint: Any) -> tuple[Any, bool]:
    """``Optional[int]`` -> ``(int, True)``; ``int`` -> ``(int, False)``."""
    if typing.get_origin(hint) is Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list"}


def type_name(hint: Any) -> str:
    base, optional = split_optional(hint)
    name = _TYPE_NAMES.get(base, getattr(base, "__name__", str(base)))
    return f"{name} or null" if optional else name


def _coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    """(ok, value converted to the field's type). Integers are accepted where numbers are expected;
    true/false is never taken for a number."""
    base, optional = split_optional(hint)
    if value is None:
        return optional, None
    if base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    return isinstance(value, base), value


def range_text(meta: dict) -> Optional[str]:
    """The allowed range from a field's metadata, e.g. ``>= 1`` or ``>= 0 and < 1``."""
    parts = [f"{op} {meta[k]}" for k, op in (("minimum", ">="), ("exclusive_minimum", ">"),
                                             ("maximum", "<="), ("exclusive_maximum", "<"))
             if meta.get(k) is not None]
    return " and ".join(parts) or None


def _closest(word: str, candidates: list[str]) -> Optional[str]:
    """The candidate closest to ``word`` ignoring case (``RMSNorm`` -> ``rmsnorm``), or None."""
    lowered = {c.lower(): c for c in candidates}
    close = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[close[0]] if close else None


def _in_range(value: float, meta: dict) -> bool:
    checks = (("minimum", lambda v, b: v >= b), ("exclusive_minimum", lambda v, b: v > b),
              ("maximum", lambda v, b: v <= b), ("exclusive_maximum", lambda v, b: v < b))
    return all(meta.get(k) is None or test(value, meta[k]) for k, test in checks)


def _unbounded(value: Any) -> Optional[str]:
    """Why a number cannot be used (infinite, NaN, or beyond int64, where later arithmetic overflows
    or loops without bound), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**63:
        return "must fit in a 64-bit integer"
    return None


def _check_field(f: Field, hint: Any, value: Any, key: str, prov: dict[str, str], bad: set[str],
                 errors: list[str]) -> tuple[bool, Any]:
    ok, value = _coerce(value, hint)
    if not ok:
        _field_error(errors, bad, key, value, prov, f"expected {type_name(hint)}, got {kind(value)}")
        return False, value
    meta = f.metadata
    if value is None:
        return True, value
    unbounded = _unbounded(value)
    if unbounded:
        _field_error(errors, bad, key, value, prov, unbounded)
        return False, value
    choices = meta.get("choices")
    if choices and value not in choices:
        allowed = ", ".join(repr(c) for c in choices) + (" or null" if split_optional(hint)[1] else "")
        close = _closest(str(value), [str(c) for c in choices])
        hint_text = f"; did you mean {close!r}?" if close else ""
        _field_error(errors, bad, key, value, prov, f"must be one of {allowed}{hint_text}")
        return False, value
    if isinstance(value, (int, float)) and not _in_range(value, meta):
        _field_error(errors, bad, key, value, prov, f"must be {range_text(meta)}")
        return False, value
    return True, value


# ---------------------------------------------------------------------------------------------
# Lists with structure: dataset entries, splits, profile ranks
# ---------------------------------------------------------------------------------------------

def _entry_source(source: str, entry: Any) -> str:
    """The line of a dataset entry itself when the loader recorded it, else where the list was set."""
    file, _, line = source.rpartition(":")
    lines = getattr(entry, "lines", None)
    if file and line.isdigit() and lines:
        return f"{file}:{min(lines.values())}"
    return source


def _check_datasets(value: list, key: str, prov: dict[str, str], bad: set[str],
                    errors: list[str]) -> list[dict]:
    """Each entry is ``{path: str, weight: number > 0}``; weight defaults to 1.0."""
    entries = []
    source = prov.get(key, "default")
    for i, entry in enumerate(value):
        item = f"{key}[{i}]"
        where = origin(_entry_source(source, entry))
        if not isinstance(entry, dict):
            bad.add(key)
            errors.append(f"{item} = {describe(entry)} ({where}): a dataset entry must be a mapping "
                          f"{{path: ..., weight: ...}}")
            continue
        for name in entry:
            if name not in DATASET_ENTRY_KEYS:
                bad.add(key)
                close = _closest(str(name), list(DATASET_ENTRY_KEYS))
                hint = f"did you mean '{close}'?" if close else f"allowed keys: {', '.join(DATASET_ENTRY_KEYS)}"
                errors.append(f"{item}.{name}: unknown key ({where}); {hint}")
        path, weight = entry.get("path"), entry.get("weight", 1.0)
        if not isinstance(path, str) or not path:
            bad.add(key)
            errors.append(f"{item}.path = {describe(path)} ({where}): every dataset entry needs a path "
                          f"(a non-empty string)")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            bad.add(key)
            errors.append(f"{item}.weight = {describe(weight)} ({where}): must be a number > 0")
        else:
            entries.append({"path": path, "weight": float(weight)})
    return entries


def _check_list_items(value: list, key: str, prov: dict[str, str], bad: set[str], errors: list[str]) -> Any:
    if key in ("data.train_datasets", "data.eval_datasets", "data.test_datasets"):
        return _check_datasets(value, key, prov, bad, errors)
    if key == "data.splits":
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        if len(value) != 3 or not numbers or min(value) < 0 or not math.isclose(sum(value), 1.0, abs_tol=1e-6):
            _field_error(errors, bad, key, value, prov,
                         "must be 3 non-negative numbers (train, eval, test) that sum to 1")
            return value
        return [float(v) for v in value]
    if key == "utils.profile_ranks":
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
            _field_error(errors, bad, key, value, prov, "must be a list of ranks (integers >= 0)")
    return value


# ---------------------------------------------------------------------------------------------
# Building the typed config
# ---------------------------------------------------------------------------------------------

def _build(cls: type, values: dict, prefix: str, prov: dict[str, str], bad: set[str], errors: list[str]):
    hints = field_hints(cls)
    kwargs = {}
    for f in fields(cls):
        key = f"{prefix}.{f.name}"
        value = values[f.name]
        if is_dataclass(f.default_factory):
            kwargs[f.name] = _build(f.default_factory, value, key, prov, bad, errors)
            continue
        if key in bad:  # already reported (e.g. a broken interpolation): keep the default
            continue
        ok, value = _check_field(f, hints[f.name], value, key, prov, bad, errors)
        if ok and isinstance(value, list):
            value = _check_list_items(value, key, prov, bad, errors)
        if ok:
            kwargs[f.name] = value
    return cls(**kwargs)


def build_config(merged: dict, prov: dict[str, str], bad: set[str], errors: list[str]) -> Config:
    """The typed Config from merged plain values; fields with errors keep their defaults."""
    return Config(**{group: _build(cls, merged[group], group, prov, bad, errors)
                     for group, cls in GROUPS.items()})


# ---------------------------------------------------------------------------------------------
# Cross-field rules (SPEC §3)
# ---------------------------------------------------------------------------------------------

def _launcher_env(cfg: Config, prov: dict[str, str], errors: list[str]) -> None:
    """Rank, local rank and world size are the launcher's (torchrun, SLURM, else one process). A
    ``parallel.world_size`` that a file, an override or code sets must agree with it: validation and
    the run then use one world size, and the saved config.yaml states the one that trained."""
    found = launcher_vars()
    for key, (name, raw) in found.items():
        if not raw.strip().isdigit() or (key == "world_size" and int(raw) < 1):
            errors.append(f"parallel.{key}: environment variable {name}={raw!r} is not a valid "
                          f"{'positive ' if key == 'world_size' else ''}integer")
            return
    key, source = "parallel.world_size", prov["parallel.world_size"]
    name, launched = found.get("world_size", (None, "1"))
    launched = int(launched)
    # A code-built Config carries the schema default 1 whether or not its author meant it.
    explicit = source != "default" and not (source == "code" and cfg.parallel.world_size == 1)
    if explicit and cfg.parallel.world_size != launched:
        launcher = f"{name}={launched} in the environment" if name else \
            "a single process (no WORLD_SIZE or SLURM_NTASKS in the environment)"
        errors.append(f"{key} = {cfg.parallel.world_size} ({origin(source)}) disagrees with the launcher: "
                      f"{launcher}; the world size is the launcher's: remove the key, set it to {launched}, "
                      f"or start {cfg.parallel.world_size} processes (torchrun --nproc_per_node, srun)")
        cfg.parallel.world_size = launched  # the other rules then speak of the world that would run
        prov[key] = f"derived ({name or 'a single process'})"
    for field, (name, raw) in found.items():
        setattr(cfg.parallel, field, int(raw))
        prov[f"parallel.{field}"] = f"derived ({name} environment variable)"


def _batch_arithmetic(cfg: Config, dp: int, prov: dict[str, str], bad: set[str], errors: list[str]) -> None:
    t = cfg.trainer
    keys = ("trainer.micro_batch_size", "trainer.train_batch_size", "trainer.gradient_accumulation_steps")
    if any(k in bad for k in keys):
        return
    per_step = t.micro_batch_size * dp
    product = f"micro_batch_size {t.micro_batch_size} × data-parallel size {dp}"
    if t.train_batch_size is None:
        if t.gradient_accumulation_steps is None:
            t.gradient_accumulation_steps = 1
            prov[keys[2]] = "derived (1: neither train_batch_size nor gradient_accumulation_steps is set)"
        t.train_batch_size = per_step * t.gradient_accumulation_steps
        prov[keys[1]] = "derived (micro_batch_size × gradient_accumulation_steps × data-parallel size)"
    elif t.gradient_accumulation_steps is None:
        if t.train_batch_size % per_step:
            bad.add(keys[1])
            errors.append(f"{keys[1]} = {t.train_batch_size} ({origin(prov[keys[1]])}): must be a multiple of "
                          f"{product} = {per_step} to derive gradient_accumulation_steps")
            return
        t.gradient_accumulation_steps = t.train_batch_size // per_step
        prov[keys[2]] = "derived (train_batch_size / (micro_batch_size × data-parallel size))"
    elif t.train_batch_size != per_step * t.gradient_accumulation_steps:
        bad.add(keys[1])
        errors.append(
            f"{keys[1]} = {t.train_batch_size} ({origin(prov[keys[1]])}) is inconsistent: {product} × "
            f"gradient_accumulation_steps {t.gradient_accumulation_steps} ({origin(prov[keys[2]])}) = "
            f"{per_step * t.gradient_accumulation_steps}; omit one of the two to have it derived")


def _divides(errors: list[str], bad: set[str], prov: dict[str, str], key: str, value: int,
             divisor: int, divisor_text: str, why: str = "") -> bool:
    """Whether ``value`` (the value of ``key``) divides evenly; records an error when not."""
    if key in bad or value % divisor == 0:
        return key not in bad
    bad.add(key)
    errors.append(f"{key} = {value} ({origin(prov[key])}): must be divisible by {divisor_text} = {divisor}{why}")
    return False


def _pipeline_layout(cfg: Config, prov: dict[str, str], bad: set[str], errors: list[str]) -> None:
    """Layers split evenly over pipeline_model_parallel_size × virtual_pipeline_stages stages, or
    as ``parallel.pipeline_layer_split`` lists them; interleaving needs virtual stages."""
    m, p = cfg.model, cfg.parallel
    pp, virtual = cfg.trainer.pipeline_model_parallel_size, p.virtual_pipeline_stages
    if pp == 1 and (p.pipeline_schedule == "interleaved" or virtual > 1):
        errors.append(f"parallel.pipeline_schedule = {p.pipeline_schedule} ({origin(prov['parallel.pipeline_schedule'])})"
                      f" and parallel.virtual_pipeline_stages = {virtual} "
                      f"({origin(prov['parallel.virtual_pipeline_stages'])}): interleaving needs pipeline "
                      f"parallelism (trainer.pipeline_model_parallel_size >= 2, got 1); allowed at 1: "
                      f"virtual_pipeline_stages 1 and a non-interleaved schedule")
        return
    if (p.pipeline_schedule == "interleaved") != (virtual > 1) and pp > 1:
        errors.append(f"parallel.pipeline_schedule = {p.pipeline_schedule} ({origin(prov['parallel.pipeline_schedule'])})"
                      f" and parallel.virtual_pipeline_stages = {virtual} "
                      f"({origin(prov['parallel.virtual_pipeline_stages'])}): the interleaved schedule needs "
                      f"virtual_pipeline_stages >= 2, and only it uses them")
    accumulation = cfg.trainer.gradient_accumulation_steps
    if pp > 1 and isinstance(accumulation, int) and (accumulation < pp or (virtual > 1 and accumulation % pp)):
        key = "trainer.gradient_accumulation_steps"
        errors.append(f"{key} = {accumulation} ({origin(prov.get(key, 'default'))}): pipeline parallelism runs "
                      f"at least pipeline_model_parallel_size = {pp} micro-batches per step"
                      f"{' (a multiple of it when interleaved)' if virtual > 1 else ''}; raise "
                      f"trainer.train_batch_size or gradient_accumulation_steps")
    split = p.pipeline_layer_split
    if split is None:
        stages = "trainer.pipeline_model_parallel_size" + (" × parallel.virtual_pipeline_stages" if virtual > 1 else "")
        _divides(errors, bad, prov, "model.num_layers", m.num_layers, pp * virtual, stages,
                 " (or list the layers per stage in parallel.pipeline_layer_split)")
    elif (len(split) != pp * virtual or not all(isinstance(n, int) and n >= 0 for n in split)
          or sum(split) != m.num_layers):
        errors.append(f"parallel.pipeline_layer_split = {split} ({origin(prov['parallel.pipeline_layer_split'])}): "
                      f"must list {pp * virtual} non-negative layer counts (pipeline_model_parallel_size × "
                      f"virtual_pipeline_stages) summing to model.num_layers = {m.num_layers}")


def _fsdp_rules(cfg: Config, prov: dict[str, str], errors: list[str]) -> None:
    """What ``parallel.use_fsdp`` (FSDP2 over the data-parallel ranks) supports."""
    p = cfg.parallel
    fsdp = f"parallel.use_fsdp = true ({origin(prov['parallel.use_fsdp'])})"
    if p.use_distributed_optimizer:
        errors.append(f"parallel.use_distributed_optimizer = true ({origin(prov['parallel.use_distributed_optimizer'])})"
                      f" with {fsdp}: FSDP already shards the optimizer state (and the parameters); "
                      "choose one of the two")
    state_dict = (f"parallel.fsdp_state_dict_type = {p.fsdp_state_dict_type} "
                  f"({origin(prov['parallel.fsdp_state_dict_type'])})")
    if (p.fsdp_state_dict_type == "sharded") != cfg.operation.save_dist_ckpt:
        errors.append(f"{state_dict} and operation.save_dist_ckpt = {describe(cfg.operation.save_dist_ckpt)} "
                      f"({origin(prov['operation.save_dist_ckpt'])}) disagree: with {fsdp} the checkpoint is "
                      f"single-file for full (save_dist_ckpt: false), distributed for sharded (save_dist_ckpt: true)")
    if p.fsdp_mixed_precision == "fp16" and cfg.model.precision != "float16":
        errors.append(f"parallel.fsdp_mixed_precision = fp16 ({origin(prov['parallel.fsdp_mixed_precision'])}) with "
                      f"{fsdp} needs model.precision = float16 (got {cfg.model.precision}, "
                      f"{origin(prov['model.precision'])}) so the loss is scaled against fp16 underflow")


def _dpo_rules(cfg: Config, prov: dict[str, str], errors: list[str]) -> None:
    """The ``trainer.dpo_*`` keys act only on a DPO run, label smoothing only on the sigmoid loss,
    and DPO does not run under context parallelism."""
    t, defaults = cfg.trainer, type(cfg.trainer)()
    task = f"data.task_type = {describe(cfg.data.task_type)} ({origin(prov['data.task_type'])})"
    if cfg.data.task_type == "dpo" and t.context_parallel_size > 1:
        # A DPO loss needs each row's whole-sequence log-prob on one rank; CP would shard the rows.
        errors.append(f"trainer.context_parallel_size = {t.context_parallel_size} "
                      f"({origin(prov['trainer.context_parallel_size'])}) with {task}: DPO sums each response's "
                      "log-probs over the whole sequence and does not run with context parallelism yet; allowed: 1")
    if cfg.data.task_type != "dpo":
        for name in ("dpo_beta", "dpo_loss_type", "dpo_label_smoothing", "dpo_reference_checkpoint"):
            if getattr(t, name) != getattr(defaults, name):
                errors.append(f"trainer.{name} = {describe(getattr(t, name))} ({origin(prov[f'trainer.{name}'])}): "
                              f"only a DPO run uses it, and {task}; set data.task_type: dpo or remove the key")
    elif t.dpo_label_smoothing > 0 and t.dpo_loss_type != "sigmoid":
        errors.append(f"trainer.dpo_label_smoothing = {t.dpo_label_smoothing} "
                      f"({origin(prov['trainer.dpo_label_smoothing'])}): only the sigmoid loss is smoothed, and "
                      f"trainer.dpo_loss_type = {t.dpo_loss_type} ({origin(prov['trainer.dpo_loss_type'])}); "
                      "allowed with it: 0")


WSD_DEFAULT_DECAY_FRACTION = 0.2  # wsd decays over the last 20% of training unless annealing_steps says


def schedule_problem(optim: OptimConfig, train_steps: int) -> Optional[str]:
    """Why the lr schedule cannot be built over ``train_steps`` steps, or None (the scheduler asks
    this too, so ``ironcore config`` refuses exactly what training would)."""
    name, warmup = optim.lr_scheduler, optim.warmup_steps
    if name in ("cosine", "linear"):
        horizon = optim.annealing_steps or train_steps
        if horizon <= warmup:
            return (f"optim.warmup_steps = {warmup} must be smaller than the decay horizon of the {name} schedule "
                    f"({horizon}: optim.annealing_steps, or operation.train_steps when that is 0); lower "
                    f"warmup_steps or raise operation.train_steps / optim.annealing_steps")
    if name == "wsd":
        decay = optim.annealing_steps or max(1, round(WSD_DEFAULT_DECAY_FRACTION * train_steps))
        if train_steps - decay < warmup:
            return (f"optim.warmup_steps = {warmup} + wsd decay steps {decay} (optim.annealing_steps, or 20% of "
                    f"operation.train_steps when 0) exceed operation.train_steps = {train_steps}")
    return None


def _run_rules(cfg: Config, prov: dict[str, str], bad: set[str], errors: list[str]) -> None:
    """Rules the trainer would otherwise only find at start, after the process groups exist."""
    t, m, p = cfg.trainer, cfg.model, cfg.parallel
    tp = t.tensor_model_parallel_size
    if not {"optim.warmup_steps", "optim.annealing_steps", "operation.train_steps", "optim.lr_scheduler"} & bad:
        problem = schedule_problem(cfg.optim, cfg.operation.train_steps)
        if problem:
            errors.append(problem)
    if "trainer.tensor_model_parallel_size" not in bad:
        _divides(errors, bad, prov, "model.d_ffn", m.d_ffn, tp, "trainer.tensor_model_parallel_size")
        if p.sequence_parallel and tp > 1:
            _divides(errors, bad, prov, "model.max_seq_len", m.max_seq_len, tp, "trainer.tensor_model_parallel_size",
                     " (parallel.sequence_parallel splits the sequence over the tensor-parallel ranks)")
    head_dim = m.head_dim
    if m.positional_embedding.type == "rope" and isinstance(head_dim, int) and head_dim % 2:
        errors.append(f"model.head_dim = {head_dim} ({origin(prov['model.head_dim'])}): RoPE rotates pairs of "
                      f"channels and needs an even head_dim (model.positional_embedding.type = rope)")
    _llama3_rope_rule(m.positional_embedding, prov, bad, errors)


def _llama3_rope_rule(pe: PositionalEmbeddingConfig, prov: dict[str, str], bad: set[str],
                      errors: list[str]) -> None:
    """llama3 RoPE scaling interpolates between low_freq_factor and high_freq_factor: the band must
    not be empty (HF's formula would divide by zero or invert the band)."""
    key = "model.positional_embedding.high_freq_factor"
    if {key, "model.positional_embedding.low_freq_factor", "model.positional_embedding.scaling_type"} & bad:
        return
    if pe.scaling_type == "llama3" and pe.high_freq_factor <= pe.low_freq_factor:
        errors.append(f"{key} = {pe.high_freq_factor} ({origin(prov[key])}): llama3 RoPE scaling needs it above "
                      f"model.positional_embedding.low_freq_factor = {pe.low_freq_factor}")


def _why_inert(cfg: Config) -> dict[str, str]:
    """``{key: why}`` for settings that the current layout leaves without effect."""
    t, p = cfg.trainer, cfg.parallel
    defaults = ParallelConfig()
    inert = {}
    if p.sequence_parallel and t.tensor_model_parallel_size == 1:
        inert["parallel.sequence_parallel"] = ("trainer.tensor_model_parallel_size is 1 and sequence parallelism "
                                               "splits activations over the tensor-parallel ranks")
    if p.pipeline_schedule != defaults.pipeline_schedule and t.pipeline_model_parallel_size == 1:
        inert["parallel.pipeline_schedule"] = "trainer.pipeline_model_parallel_size is 1: there is no pipeline"
    if not p.use_fsdp:
        for name in ("fsdp_offload_params", "fsdp_mixed_precision", "fsdp_sharding_strategy", "fsdp_state_dict_type"):
            if getattr(p, name) != getattr(defaults, name):
                inert[f"parallel.{name}"] = "parallel.use_fsdp is false (DDP does not read it)"
    return {**inert, **_inert_positions(cfg.model.positional_embedding)}


def _inert_positions(pe: PositionalEmbeddingConfig) -> dict[str, str]:
    """The ``model.positional_embedding`` keys its ``type`` (and ``scaling_type``) do not read."""
    defaults, key = PositionalEmbeddingConfig(), "model.positional_embedding"
    rope_only = ["base", "scaling_factor", "scaling_type", "low_freq_factor", "high_freq_factor", "original_max_seq_len"]
    if pe.type != "rope":
        why = {name: f"{key}.type is {pe.type!r} and only RoPE reads it" for name in rope_only}
        if pe.type == "none":
            why["offset"] = f"{key}.type is 'none': the model has no positions to shift"
    else:
        why = {"offset": "RoPE is relative: a shift of every position cancels in q·k, so no attention score changes "
                         "(offset acts on absolute positions)"}
        if pe.scaling_type != "llama3":
            why.update({name: f"{key}.scaling_type is {pe.scaling_type!r}: only llama3 scaling reads it"
                        for name in rope_only[3:]})
    return {f"{key}.{name}": text for name, text in why.items() if getattr(pe, name) != getattr(defaults, name)}


def inert_settings(cfg: Config, prov: dict[str, str]) -> list[str]:
    """Warnings, one per setting that is accepted but cannot act in this layout (printed once at start)."""
    return [f"{key} = {describe(_get(cfg, key))} ({origin(prov.get(key, 'default'))}) has no effect: {why}"
            for key, why in _why_inert(cfg).items()]


def _get(cfg: Config, key: str) -> Any:
    return functools.reduce(getattr, key.split("."), cfg)


def _context_parallel_rules(cfg: Config, prov: dict[str, str], bad: set[str], errors: list[str]) -> None:
    """What a sequence split over ``trainer.context_parallel_size`` ranks needs (parallel/context.py)."""
    cp, tp = cfg.trainer.context_parallel_size, cfg.trainer.tensor_model_parallel_size
    cp_text = f"context_parallel_size {cp} ({origin(prov['trainer.context_parallel_size'])})"
    split, why = 2 * cp, " (each CP rank holds two of 2 × context_parallel_size equal chunks)"
    if cfg.parallel.sequence_parallel and tp > 1:
        split, why = split * tp, why[:-1] + ", split again over TP by parallel.sequence_parallel)"
    _divides(errors, bad, prov, "model.max_seq_len", cfg.model.max_seq_len, split,
             f"2 × trainer.context_parallel_size" + (" × tensor_model_parallel_size" if split > 2 * cp else ""), why)
    if cfg.data.task_type == "sft" and not cfg.data.pad_to_max_length:
        errors.append(f"data.pad_to_max_length = false ({origin(prov['data.pad_to_max_length'])}) with data.task_type "
                      f"= sft and {cp_text}: packed SFT rows need segment masks, which ring attention does not "
                      "take; set data.pad_to_max_length: true (rows of max_seq_len tokens) or context_parallel_size: 1")


def check_rules(cfg: Config, prov: dict[str, str], bad: set[str], errors: list[str]) -> None:
    """Apply the cross-field rules and fill in derived values (see the module docstring)."""
    _launcher_env(cfg, prov, errors)
    t, m, p = cfg.trainer, cfg.model, cfg.parallel
    tp, pp, cp = t.tensor_model_parallel_size, t.pipeline_model_parallel_size, t.context_parallel_size
    tp_ok = "trainer.tensor_model_parallel_size" not in bad
    pp_ok = "trainer.pipeline_model_parallel_size" not in bad
    if tp_ok and pp_ok and "trainer.context_parallel_size" not in bad:
        if p.world_size % (tp * pp * cp):
            bad.add("parallel.world_size")
            errors.append(
                f"parallel.world_size = {p.world_size} ({origin(prov['parallel.world_size'])}): must be "
                f"divisible by tensor_model_parallel_size {tp} ({origin(prov['trainer.tensor_model_parallel_size'])})"
                f" × pipeline_model_parallel_size {pp} ({origin(prov['trainer.pipeline_model_parallel_size'])})"
                + (f" × context_parallel_size {cp} ({origin(prov['trainer.context_parallel_size'])})" if cp > 1 else "")
                + f" = {tp * pp * cp}")
        else:
            _batch_arithmetic(cfg, p.world_size // (tp * pp * cp), prov, bad, errors)
    if cp > 1 and "trainer.context_parallel_size" not in bad:
        _context_parallel_rules(cfg, prov, bad, errors)
    if p.use_distributed_optimizer and cfg.model.precision == "float16":
        errors.append(f"parallel.use_distributed_optimizer = true ({origin(prov['parallel.use_distributed_optimizer'])})"
                      f" with model.precision = float16 ({origin(prov['model.precision'])}): the fp16 loss scaler "
                      "is not sharded yet; use bfloat16 or float32")
    if tp_ok:
        heads_ok = _divides(errors, bad, prov, "model.num_attention_heads", m.num_attention_heads, tp,
                            "trainer.tensor_model_parallel_size")
        if m.num_attention_groups is not None and heads_ok:
            if _divides(errors, bad, prov, "model.num_attention_heads", m.num_attention_heads,
                        m.num_attention_groups, "model.num_attention_groups"):
                _divides(errors, bad, prov, "model.num_attention_groups", m.num_attention_groups, tp,
                         "trainer.tensor_model_parallel_size")
    if pp_ok:
        _pipeline_layout(cfg, prov, bad, errors)
    if p.use_fsdp:
        _fsdp_rules(cfg, prov, errors)
    _dpo_rules(cfg, prov, errors)
    if m.head_dim is None and "model.head_dim" not in bad:
        if _divides(errors, bad, prov, "model.d_model", m.d_model, m.num_attention_heads,
                    "model.num_attention_heads", " to derive model.head_dim (or set head_dim)"):
            m.head_dim = m.d_model // m.num_attention_heads
            prov["model.head_dim"] = "derived (d_model / num_attention_heads)"
    if cfg.data.vocab_size is None and m.tokenizer_type == "gpt2":
        cfg.data.vocab_size = GPT2_VOCAB_SIZE
        prov["data.vocab_size"] = "derived (the gpt2 tokenizer's vocabulary)"
    u = cfg.utils
    # The window profile_step_start <= step < profile_step_end must hold a step when something profiles it.
    if ((u.profile_nsys or u.profile_torch or u.profile_memory) and u.profile_step_end <= u.profile_step_start
            and not {"utils.profile_step_end", "utils.profile_step_start"} & bad):
        errors.append(f"utils.profile_step_end = {u.profile_step_end} ({origin(prov['utils.profile_step_end'])}): "
                      f"must be > utils.profile_step_start = {u.profile_step_start} "
                      f"({origin(prov['utils.profile_step_start'])}); the profiled steps are "
                      "profile_step_start <= step < profile_step_end")
    if cfg.init.data_parallel_random_init:
        # DDP and FSDP start every replica from rank 0's weights; per-rank init would be silently undone.
        errors.append(f"init.data_parallel_random_init = true ({origin(prov['init.data_parallel_random_init'])}): "
                      "not supported: every data-parallel replica starts from the same initial weights; "
                      "allowed: false")
    o = cfg.optim
    if o.min_lr > o.max_lr and not {"optim.min_lr", "optim.max_lr"} & bad:
        errors.append(f"optim.min_lr = {o.min_lr} ({origin(prov['optim.min_lr'])}): must be <= "
                      f"optim.max_lr = {o.max_lr} ({origin(prov['optim.max_lr'])})")
    _run_rules(cfg, prov, bad, errors)


def validate_config(cfg: Config) -> Config:
    """Check a Config built in code exactly as ``load_config`` checks a file, and return a copy with
    the derived values filled in (head_dim, vocab_size, batch arithmetic). Raises ConfigError."""
    errors: list[str] = []
    bad: set[str] = set()
    prov = {key: "code" for key in leaf_keys(Config)}
    checked = build_config(asdict(cfg), prov, bad, errors)
    check_rules(checked, prov, bad, errors)
    if errors:
        raise ConfigError(errors)
    return checked


def leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """Every ``group.key`` (and ``group.sub.key``) under a config dataclass."""
    keys = []
    for f in fields(cls):
        name = f"{prefix}.{f.name}" if prefix else f.name
        keys += leaf_keys(f.default_factory, name) if is_dataclass(f.default_factory) else [name]
    return keys
