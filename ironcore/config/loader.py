"""Load a YAML training config into a validated :class:`Config`, remembering where every key came from.

Resolution, lowest to highest priority (SPEC §2):

1. the defaults of each group (``schema.py``);
2. a preset the group refers to: ``model: gpt2-small`` (a string group value),
   ``data: {config_path: configs/data/x.yaml}``, or ``group=NAME`` on the command line. A name is
   looked up relative to the YAML file that refers to it, then in the project's ``configs/<group>/``,
   then in the project folder, then as written (relative to the working folder);
3. inline keys of the files a config extends through a top-level ``base:`` (a file or a list, relative
   to the referring file; deepest base first), then the user's own inline keys (beside a
   ``config_path`` they override the preset);
4. command-line overrides ``group.key=value`` (values are YAML scalars). ``group=NAME`` swaps the
   whole group: its inline keys are dropped and NAME becomes its preset.

Then ``${group.key}`` references and ``${env:NAME[,default]}`` (or ``${oc.env:...}``) values are interpolated, relative dataset paths are resolved against the
folder of the YAML file that wrote them, and ``validate.py`` checks types, choices, ranges and the
cross-field rules and fills in derived values. Every problem found is reported in one ConfigError.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

import yaml

from ironcore.config import validate
from ironcore.config.errors import ConfigError
from ironcore.config.schema import GROUPS, Config

PROJECT_DIR = Path(__file__).resolve().parents[2]
PROJECT_CONFIGS = PROJECT_DIR / "configs"
_DATASET_KEYS = ("train_datasets", "eval_datasets", "test_datasets")
_REF = re.compile(r"\$\{([^${}]*)\}")


# ---------------------------------------------------------------------------------------------
# YAML reading with line numbers
# ---------------------------------------------------------------------------------------------

class _LineMapping(dict):
    """A YAML mapping that remembers the line of each key, and keys written more than once."""

    lines: dict
    duplicates: list


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that records key lines, reads ``1e-5`` as a float (YAML 1.2, as users
    write learning rates) and a bare ``None`` as null (as the seed's tables spell it)."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode):
    mapping = _LineMapping()
    mapping.lines, mapping.duplicates = {}, []
    yield mapping
    mapping.update(loader.construct_mapping(node, deep=True))  # also flattens `<<` merge keys
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in mapping.lines:
            mapping.duplicates.append((key, line))
        mapping.lines[key] = line


# Plain scalars read beyond YAML 1.1 (the dumper quotes strings that look like these).
EXTRA_RESOLVERS = [
    ("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
     list("-+0123456789.")),
    ("tag:yaml.org,2002:null", re.compile(r"^None$"), ["N"]),
]
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
for _tag, _regexp, _first in EXTRA_RESOLVERS:
    _Loader.add_implicit_resolver(_tag, _regexp, _first)


def parse_yaml(text: str) -> Any:
    """Parse YAML text the way config files are parsed (used for command-line override values)."""
    return yaml.load(text, Loader=_Loader)


def display_path(path: Path) -> str:
    """A path as users see it in messages: relative to the working folder when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


def _read_yaml(path: Path, errors: list[str]) -> Any:
    """The parsed file, or None (with an error recorded) when it cannot be read or parsed."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        errors.append(f"{display_path(path)}: cannot read the file ({e})")
        return None
    try:
        data = parse_yaml(text)
    except RecursionError:
        errors.append(f"{display_path(path)}: malformed YAML: nested too deeply")
        return None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{display_path(path)}:{mark.line + 1}" if mark else display_path(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        errors.append(f"{where}: malformed YAML: {problem}")
        return None
    if _expanded_size(data) > MAX_EXPANDED_VALUES:
        errors.append(f"{display_path(path)}: malformed YAML: aliases expand to more than "
                      f"{MAX_EXPANDED_VALUES:,} values (an alias bomb?)")
        return None
    return data


MAX_EXPANDED_VALUES = 100_000  # a config is a few hundred values; aliases must not multiply them


def _expanded_size(value: Any) -> int:
    """How many values ``value`` holds once every alias is expanded, counted without expanding:
    an alias is the same Python object, so each object's size is computed once."""
    sizes: dict[int, int] = {}

    def size(v: Any) -> int:
        if not isinstance(v, (list, dict)):
            return 1
        if id(v) not in sizes:
            children = v.values() if isinstance(v, dict) else v
            sizes[id(v)] = min(1 + sum(size(c) for c in children), MAX_EXPANDED_VALUES + 1)
        return sizes[id(v)]

    return size(value)


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------

class _Layer(NamedTuple):
    values: dict            # the group's keys (a _LineMapping when read from a file)
    file: Optional[str]     # display path of the YAML file; None for command-line overrides
    base_dir: Path          # folder that relative dataset paths are resolved against
    path: Optional[Path] = None  # the preset file itself


class _Ref(NamedTuple):
    name: str               # preset name or path, as written
    base_dir: Path          # folder of the file that refers to it (working folder for overrides)
    where: str              # provenance of the reference itself


class _GroupPlan:
    def __init__(self) -> None:
        self.preset: Optional[_Ref] = None
        self.inline: list[_Layer] = []  # bases' inline keys first (deepest first), the user file's last
        self.override: dict = {}


def _source(mapping: dict, key: Any, file: Optional[str]) -> str:
    if file is None:
        return "override"
    line = getattr(mapping, "lines", {}).get(key)
    return f"{file}:{line}" if line else file


def _did_you_mean(word: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), list(candidates), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _suggest(word: Any, candidates: list[str], what: str) -> str:
    """A did-you-mean when a candidate is close, else the full list of what is allowed."""
    return _did_you_mean(word, candidates) or f"; {what}: {', '.join(candidates)}"


# Megatron-LM flag names (dashes as underscores) users arrive with, and the IronCore key for each.
MEGATRON_NAMES = {
    "save_interval": "trainer.save_checkpoint_steps", "train_iters": "operation.train_steps",
    "global_batch_size": "trainer.train_batch_size", "micro_batch_size": "trainer.micro_batch_size",
    "lr": "optim.max_lr", "min_lr": "optim.min_lr", "lr_warmup_iters": "optim.warmup_steps",
    "lr_decay_style": "optim.lr_scheduler", "lr_decay_iters": "optim.annealing_steps",
    "seq_length": "model.max_seq_len", "hidden_size": "model.d_model",
    "ffn_hidden_size": "model.d_ffn", "num_layers": "model.num_layers",
    "num_attention_heads": "model.num_attention_heads", "init_method_std": "init.init_std",
    "use_distributed_optimizer": "parallel.use_distributed_optimizer",
    "recompute_granularity": "operation.recompute_strategy", "bf16": "model.precision",
    "fp16": "model.precision", "tensor_model_parallel_size": "trainer.tensor_model_parallel_size",
    "pipeline_model_parallel_size": "trainer.pipeline_model_parallel_size",
    "clip_grad": "optim.clip_grad", "adam_beta1": "optim.adam_beta1", "adam_beta2": "optim.adam_beta2",
    "weight_decay": "optim.weight_decay", "seed": "init.seed", "save": "trainer.model_path", "load": "trainer.model_path",
}


def _megatron_hint(key: str) -> str:
    """The IronCore key for a Megatron-LM flag name, when it names an existing key."""
    target = MEGATRON_NAMES.get(key.replace("-", "_").lstrip("_"))
    if target is None or target not in validate.leaf_keys(Config):
        return ""
    return f"; did you mean '{target}'? (Megatron-LM's --{key.replace('_', '-')})"


def _other_group_hint(key: str, group: str) -> str:
    owners = [g for g, cls in GROUPS.items() if g != group and key in {f.name for f in fields(cls)}]
    return f"; did you mean '{owners[0]}.{key}'? ('{key}' belongs to group {owners[0]})" if owners else ""


def _plan_file(path: Path, top: Any, plans: dict[str, _GroupPlan], errors: list[str]) -> None:
    file = display_path(path)
    if top is None:
        return
    if not isinstance(top, dict):
        errors.append(f"{file}: the top level must be a mapping of groups ({', '.join(GROUPS)}), "
                      f"got {validate.kind(top)}")
        return
    if _not_a_config(top, "the top level", _Layer(top, file, path.parent), errors):
        return
    for key, line in top.duplicates:
        errors.append(f"{file}:{line}: group '{key}' is written twice")
    for group, value in top.items():
        where = _source(top, group, file)
        if group not in GROUPS:
            errors.append(f"unknown group '{group}' ({validate.origin(where)})"
                          f"{_suggest(group, list(GROUPS), 'groups')}")
        elif isinstance(value, str):
            # A file naming a preset replaces what its bases said of the group, as `group=NAME` does.
            plans[group].preset, plans[group].inline = _Ref(value, path.parent, where), []
        elif isinstance(value, dict):
            plans[group].inline.append(_Layer(value, file, path.parent))
        elif value is not None:
            errors.append(f"{group} = {validate.describe(value)} ({validate.origin(where)}): a group must be "
                          f"a mapping of its keys or the name of a preset file")


def _plan_overrides(overrides: Sequence[str], plans: dict[str, _GroupPlan], errors: list[str]) -> None:
    for text in overrides:
        shown = validate.describe(text)  # an excerpt: a hostile override may be megabytes long
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key:
            errors.append(f"override {shown}: expected group.key=value or group=preset")
            continue
        parts = key.split(".")
        group = parts[0]
        if group not in GROUPS:
            errors.append(f"override {shown}: unknown group '{group}'{_suggest(group, list(GROUPS), 'groups')}")
            continue
        try:
            value = parse_yaml(raw) if raw.strip() else None
        except RecursionError:
            errors.append(f"override {shown}: the value is not valid YAML (nested too deeply)")
            continue
        except yaml.YAMLError as e:
            errors.append(f"override {shown}: the value is not valid YAML ({getattr(e, 'problem', e)})")
            continue
        if _expanded_size(value) > MAX_EXPANDED_VALUES:
            errors.append(f"override {shown}: the value's aliases expand to more than {MAX_EXPANDED_VALUES:,} "
                          "values (an alias bomb?)")
            continue
        if len(parts) == 1:
            if not isinstance(value, str):
                errors.append(f"override {shown}: {group}=... names a preset file, "
                              f"got {validate.describe(value)}")
                continue
            # A whole-group swap: the named preset replaces the group's preset and inline keys.
            plans[group].preset, plans[group].inline = _Ref(value, Path.cwd(), "override"), []
            continue
        node = plans[group].override
        for part in parts[1:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[parts[-1]] = value
            continue
        errors.append(f"override {shown}: conflicts with another override of {'.'.join(parts[:-1])}")


def find_preset(group: str, name: str, base_dir: Path) -> Optional[Path]:
    """The file a preset reference names, or None. See the module docstring for the lookup order."""
    names = [name] if name.endswith((".yaml", ".yml")) else [f"{name}.yaml", f"{name}.yml", name]
    roots = [base_dir, PROJECT_CONFIGS / group, Path.cwd(), PROJECT_DIR]
    for root in roots:
        for candidate in names:
            path = root / Path(candidate).expanduser()
            if path.is_file():
                return path
    return None


def available_presets(group: str) -> list[str]:
    folder = PROJECT_CONFIGS / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _load_preset(group: str, ref: _Ref, errors: list[str]) -> Optional[_Layer]:
    path = find_preset(group, ref.name, ref.base_dir)
    if path is None:
        names = available_presets(group)
        listing = f"; available {group} presets: {', '.join(names)}" if names else ""
        places = ", ".join(dict.fromkeys(display_path(p) for p in (ref.base_dir, PROJECT_CONFIGS / group, Path.cwd())))
        errors.append(f"{group}: preset file '{ref.name}' not found ({validate.origin(ref.where)}); looked in "
                      f"{places}{listing}{_did_you_mean(Path(ref.name).stem, names)}")
        return None
    content = _read_yaml(path, errors)
    file = display_path(path)
    if content is None:
        return _Layer({}, file, path.parent, path)
    if not isinstance(content, dict):
        errors.append(f"{file}: a {group} preset must be a mapping of {group} keys, "
                      f"got {validate.kind(content)} (its contents are not shown)")
        return None
    return _Layer(content, file, path.parent, path)


# ---------------------------------------------------------------------------------------------
# Bases: a top-level `base:` names the files a config extends
# ---------------------------------------------------------------------------------------------

MAX_BASE_FILES = 32  # a real chain is two or three files; this bounds cycles' cousins (diamonds, long chains)


def _base_refs(top: dict, file: str, errors: list[str]) -> list[str]:
    """The file names a config's ``base:`` lists (a name or a list of names)."""
    refs = top.get("base")
    refs = [refs] if isinstance(refs, str) else refs
    if refs is None:
        return []
    if not isinstance(refs, list) or not all(isinstance(r, str) and r for r in refs):
        errors.append(f"base ({_source(top, 'base', file)}): must be a file name or a list of file names, "
                      f"got {validate.kind(top['base'])}")
        return []
    return refs


def _read_with_bases(path: Path, errors: list[str]) -> list[tuple[Path, Any]]:
    """Every file of the config, each with its parsed contents minus ``base:``, in merge order: a
    file's bases (deepest first, then in the order listed) before the file itself."""
    out: list[tuple[Path, Any]] = []

    def visit(file_path: Path, chain: list[Path]) -> None:
        if len(out) + len(chain) >= MAX_BASE_FILES:
            errors.append(f"{display_path(chain[0])}: more than {MAX_BASE_FILES} files in its base chain")
            return
        top = _read_yaml(file_path, errors)
        if isinstance(top, dict) and "base" in top:
            file = display_path(file_path)
            for ref in _base_refs(top, file, errors):
                base = (file_path.parent / Path(ref).expanduser()).resolve()
                where = _source(top, "base", file)
                if base in chain or base == file_path.resolve():
                    names = " -> ".join(display_path(p) for p in [*chain, file_path.resolve(), base])
                    errors.append(f"base ({where}): circular base chain {names}")
                elif base.is_dir():
                    errors.append(f"base ({where}): {display_path(base)} is a directory, not a config file")
                elif not base.is_file():
                    errors.append(f"base ({where}): base file {display_path(base)} not found")
                else:
                    visit(base, [*chain, file_path.resolve()])
            top = copy.copy(top)  # a _LineMapping keeps its line numbers
            del top["base"]
        out.append((file_path, top))

    visit(path, [])
    return out


# ---------------------------------------------------------------------------------------------
# Merging
# ---------------------------------------------------------------------------------------------

def _not_a_config(layer_values: dict, prefix: str, layer: _Layer, errors: list[str]) -> bool:
    """Whether a layer's keys are not names (e.g. ``data.config_path: /etc/shadow``): then the file is
    named, never what is in it."""
    odd = [k for k in layer_values if not (isinstance(k, str) and k.isidentifier())]
    if not odd:
        return False
    where = validate.origin(_source(layer_values, odd[0], layer.file))
    errors.append(f"{prefix}: {len(odd)} key(s) that are not names ({where}); is this a config file? "
                  f"(its contents are not shown)")
    return True


def _apply(layer_values: dict, target: dict, cls: type, prefix: str, layer: _Layer,
           prov: dict[str, str], dataset_dirs: dict[str, Path], errors: list[str]) -> None:
    """Write one layer's keys for the dataclass ``cls`` into ``target``, recording provenance."""
    schema = {f.name: f for f in fields(cls)}
    for key, line in getattr(layer_values, "duplicates", []):
        errors.append(f"{prefix}.{key} ({layer.file}:{line}): key written twice in the same mapping")
    if _not_a_config(layer_values, prefix, layer, errors):
        return
    for key, value in layer_values.items():
        dotted = f"{prefix}.{key}"
        where = _source(layer_values, key, layer.file)
        if key not in schema:
            group = prefix.split(".")[0]
            hint = (_other_group_hint(str(key), group) or _megatron_hint(str(key))
                    or _suggest(key, list(schema), f"keys of {prefix}"))
            errors.append(f"{dotted}: unknown key ({validate.origin(where)}){hint}")
            continue
        kind = schema[key].default_factory if is_dataclass(schema[key].default_factory) else None
        if kind is not None:
            if isinstance(value, dict):
                _apply(value, target[key], kind, dotted, layer, prov, dataset_dirs, errors)
            else:
                errors.append(f"{dotted} = {validate.describe(value)} ({validate.origin(where)}): must be a "
                              f"mapping with keys {', '.join(f.name for f in fields(kind))}")
            continue
        target[key] = value
        prov[dotted] = where
        if prefix == "data" and key in _DATASET_KEYS:
            dataset_dirs[dotted] = layer.base_dir


# ---------------------------------------------------------------------------------------------
# Interpolation
# ---------------------------------------------------------------------------------------------

class _InterpolationError(Exception):
    pass


def _lookup(merged: dict, dotted: str) -> Any:
    node: Any = merged
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


_ENV_PREFIXES = ("env:", "oc.env:")
MAX_ENV_VALUE = 4096  # a config value read from the environment is a path or a number, not a document


def _env_value(ref: str) -> tuple[str, str]:
    """``env:NAME`` or ``env:NAME,default`` (OmegaConf's ``oc.env:`` too): the variable's name and
    text. Rank and world size are never read here: the launcher's variables are their only source."""
    name, sep, default = ref.split(":", 1)[1].partition(",")
    name = name.strip()
    value = os.environ.get(name)
    if value is None:
        if not sep:
            raise _InterpolationError(("env", name))
        value = default.strip()
    if len(value) > MAX_ENV_VALUE:
        raise _InterpolationError(("env-size", name))
    return name, value


def _typed_env(text: str) -> Any:
    """A whole value taken from the environment, read as a YAML scalar (as command-line override values
    are), so the schema types it: ``4`` is an int, ``1e-4`` a float. Anything else stays the text."""
    try:
        value = parse_yaml(text) if text else None
    except (yaml.YAMLError, RecursionError):
        return text
    return text if isinstance(value, (dict, list)) else value


def _interpolate(merged: dict, prov: dict[str, str], bad: set[str], errors: list[str]) -> None:
    """Replace ``${group.key}`` references in place, after all layers are merged."""
    reported_cycles: set[frozenset] = set()

    env_used: list[str] = []  # variables read while resolving the current key

    def ref_value(ref: str, stack: list[str]) -> Any:
        ref = ref.strip()
        if ref.startswith(_ENV_PREFIXES):
            name, value = _env_value(ref)
            env_used.append(name)
            return value
        if ref in stack:
            cycle = stack[stack.index(ref):] + [ref]
            raise _InterpolationError(("cycle", cycle))
        try:
            target = _lookup(merged, ref)
        except KeyError:
            raise _InterpolationError(("unknown", ref)) from None
        if isinstance(target, dict):
            raise _InterpolationError(("group", ref))
        return resolve(target, stack + [ref])

    def resolve(value: Any, stack: list[str]) -> Any:
        if isinstance(value, list):
            return [resolve(v, stack) for v in value]
        if isinstance(value, dict):
            resolved = copy.copy(value)  # a _LineMapping keeps its line numbers for messages
            resolved.update((k, resolve(v, stack)) for k, v in value.items())
            return resolved
        if not isinstance(value, str) or "${" not in value:
            return value
        whole = _REF.fullmatch(value)
        if whole:  # keep the referenced value's type: `${model.d_model}` stays an int
            resolved = ref_value(whole.group(1), stack)
            return _typed_env(resolved) if whole.group(1).strip().startswith(_ENV_PREFIXES) else resolved
        return _REF.sub(lambda m: str(ref_value(m.group(1), stack)), value)

    for dotted in [k for k in prov]:
        group_node = _lookup(merged, dotted.rsplit(".", 1)[0])
        key = dotted.rsplit(".", 1)[1]
        original = group_node[key]
        env_used.clear()
        try:
            group_node[key] = resolve(original, [dotted])
            if env_used:
                prov[dotted] = f"env {', '.join(dict.fromkeys(env_used))} ({prov[dotted]})"
        except _InterpolationError as e:
            kind, detail = e.args[0]
            bad.add(dotted)
            head = f"{dotted} = {original!r} ({validate.origin(prov[dotted])})"
            if kind == "cycle":
                if frozenset(detail) in reported_cycles:
                    continue
                reported_cycles.add(frozenset(detail))
                errors.append(f"{head}: circular interpolation {' -> '.join(detail)}")
            elif kind == "env":
                errors.append(f"{head}: environment variable {detail} is not set and the reference "
                              f"has no default (write ${{env:{detail},DEFAULT}})")
            elif kind == "env-size":
                errors.append(f"{head}: environment variable {detail} is longer than "
                              f"{MAX_ENV_VALUE:,} characters")
            elif kind == "group":
                errors.append(f"{head}: ${{{detail}}} names a whole group; interpolate a single key")
            else:
                errors.append(f"{head}: interpolation ${{{detail}}} names no config key"
                              f"{_did_you_mean(detail, list(prov))}")


def _resolve_dataset_paths(merged: dict, dataset_dirs: dict[str, Path]) -> None:
    """Make relative dataset paths relative to the YAML file that wrote them (the working folder for
    overrides), so a data preset works whatever folder the run is started from."""
    for dotted, base in dataset_dirs.items():
        entries = _lookup(merged, dotted)
        if not isinstance(entries, list):
            continue
        for entry in entries:
            if isinstance(entry, dict) and isinstance(entry.get("path"), str) and entry["path"]:
                path = Path(entry["path"]).expanduser()
                if not path.is_absolute():
                    entry["path"] = os.path.normpath(base.resolve() / path)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def load_config_with_provenance(path: str | os.PathLike,
                                overrides: Sequence[str] = ()) -> tuple[Config, dict[str, str]]:
    """Load, merge, interpolate and validate a config file.

    Returns the Config and, for every key ``"group.key"`` (``"model.positional_embedding.type"``
    for nested keys), where its value came from: ``"file:line"``, ``"override"``, ``"default"`` or
    ``"derived (...)"``. Raises ConfigError with every problem found.
    """
    errors: list[str] = []
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError([f"{path}: config file not found"])
    plans = {group: _GroupPlan() for group in GROUPS}
    files = _read_with_bases(path, errors)
    files_ok = not errors  # cross-field rules on a half-read config would only add noise
    for file_path, top in files:
        _plan_file(file_path, top, plans, errors)
    _plan_overrides(overrides, plans, errors)

    merged = asdict(Config())
    prov = {key: "default" for key in validate.leaf_keys(Config)}
    dataset_dirs: dict[str, Path] = {}
    for group, cls in GROUPS.items():
        plan = plans[group]
        layers = [*plan.inline, _Layer(plan.override, None, Path.cwd()) if plan.override else None]
        # A `config_path` key (data) names the group's preset too; the highest layer setting it wins,
        # and `config_path: null` there means no file.
        for layer in layers:
            if layer is None or "config_path" not in layer.values or "config_path" not in merged[group]:
                continue
            ref = layer.values["config_path"]
            where = _source(layer.values, "config_path", layer.file)
            plan.preset = _Ref(ref, layer.base_dir, where) if isinstance(ref, str) else None
        if plan.preset is not None:
            n_errors = len(errors)
            layers.insert(0, _load_preset(group, plan.preset, errors))
            files_ok = files_ok and len(errors) == n_errors
        for layer in layers:
            if layer is not None:
                _apply(layer.values, merged[group], cls, group, layer, prov, dataset_dirs, errors)
        if layers[0] is not None and layers[0].path and "config_path" in merged[group]:
            # The file actually read, so a saved resolved config reloads from any folder.
            merged[group]["config_path"] = str(layers[0].path.resolve())

    bad: set[str] = set()
    _interpolate(merged, prov, bad, errors)
    _resolve_dataset_paths(merged, dataset_dirs)
    cfg = validate.build_config(merged, prov, bad, errors)
    if files_ok:
        validate.check_rules(cfg, prov, bad, errors)
    if errors:
        raise ConfigError(errors)
    return cfg, prov


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Config:
    """Load, merge, interpolate and validate a config file; raises ConfigError listing every problem."""
    return load_config_with_provenance(path, overrides)[0]
