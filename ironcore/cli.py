"""The ``ironcore`` command (also ``python -m ironcore``).

    ironcore [train] CONFIG [group.key=value ...]     train (the default subcommand)
    ironcore train --config CONFIG [overrides ...]    the same, as earlier releases spelled it
    ironcore config CONFIG [overrides ...]            print the resolved config, each key with its source
    ironcore config --from-checkpoint CKPT            the same for the config a checkpoint was trained with
    ironcore eval CONFIG [overrides ...]              evaluate model_path's latest checkpoint
    ironcore preprocess ...                           tokenize text into indexed datasets
    ironcore data-stats ...                           statistics of indexed datasets
    ironcore profile-summary PATH [--json]            compute / communication / idle / bubble per step

A configuration mistake (or a missing file) prints the list of problems and exits with status 2;
a run-time failure the user must fix (NaN loss, corrupted checkpoint, bad data file) prints one
line naming the rank and exits with status 1 — never a traceback. The training, evaluation and data modules are imported only when used, so
``ironcore config`` works without loading torch.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from types import ModuleType
from typing import Callable, Optional, Sequence

from ironcore.config import Config, ConfigError, load_config_with_provenance, to_yaml
from ironcore.config.memory import check_memory
from ironcore.config.validate import inert_settings

USAGE_ERROR = 2
_RUN_COMMANDS = {
    "train": "train a model (the default when the first argument is a config file)",
    "config": "print the resolved config as YAML, each key with its source",
    "eval": "evaluate the latest checkpoint in trainer.model_path; prints JSON losses",
}
_TOOL_COMMANDS = {
    "preprocess": ("ironcore.data.preprocess", "tokenize .jsonl/.txt into .bin/.idx datasets"),
    "data-stats": ("ironcore.data.stats", "print statistics of .bin/.idx datasets"),
    "profile-summary": ("ironcore.observe.profile_summary", "per rank and step: compute, comm by group, idle, bubble"),
}


class UsageError(Exception):
    """A user mistake that is not about the config's contents (e.g. no CONFIG given)."""


RUN_ERROR = 1
# Run-time failures that are the user's to fix (a NaN loss, a corrupted checkpoint, a bad data
# file, a broken pipeline setup): one line naming the rank and exit status 1, never a traceback.
_RUN_ERRORS = (("ironcore.training.trainer", "NonFiniteLossError"), ("ironcore.checkpoint.io", "CheckpointError"),
               ("ironcore.data.indexed", "IndexedDatasetError"), ("ironcore.parallel.pipeline", "PipelineError"),
               ("ironcore.observe.loggers", "LoggerError"))


def _rank() -> str:
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))


def _is_main_rank() -> bool:
    """Under torchrun/SLURM every rank validates the same config; only one should print the errors."""
    return _rank() == "0"


def _module(name: str) -> ModuleType:
    """Import lazily, so that `ironcore config` never loads torch."""
    return importlib.import_module(name)


def _run_errors() -> tuple[type[BaseException], ...]:
    # Evaluated only when an exception is already propagating (an `except` expression is lazy).
    return tuple(getattr(importlib.import_module(module), name) for module, name in _RUN_ERRORS)


def _run_parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"ironcore {command}", description=_RUN_COMMANDS[command],
        epilog="Overrides: group.key=value (YAML scalars, e.g. optim.max_lr=3e-4, "
               "model.positional_embedding.type=rope) or group=preset (e.g. model=gpt2-small).")
    parser.add_argument("--config", dest="config_option", metavar="CONFIG", help="the YAML config file")
    if command == "config":
        parser.add_argument("--from-checkpoint", metavar="CKPT",
                            help="a trainer.model_path (its latest checkpoint) or an iter_NNNNNNN folder: print "
                                 "the config it was trained with, each key's source and where the run came from")
    parser.add_argument("args", nargs="*", metavar="CONFIG [OVERRIDES]",
                        help="the YAML config file (unless --config is given), then overrides")
    return parser


def _load(command: str, argv: Sequence[str]) -> tuple[Config, dict[str, str], str]:
    parsed = _run_parser(command).parse_args(list(argv))
    args = list(parsed.args)
    path = parsed.config_option or (args.pop(0) if args else None)
    if path is None:
        raise UsageError(f"ironcore {command}: a CONFIG file is required (ironcore {command} CONFIG [overrides])")
    cfg, provenance = load_config_with_provenance(path, args)
    if _is_main_rank():  # once per run, not once per rank
        for warning in inert_settings(cfg, provenance):
            print(f"ironcore {command}: warning: {warning}", file=sys.stderr)
    return cfg, provenance, path


def _setup_logging(cfg: Config) -> None:
    logging.basicConfig(level=cfg.utils.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cmd_train(argv: Sequence[str]) -> int:
    cfg, provenance, _ = _load("train", argv)
    _setup_logging(cfg)
    _module("ironcore.training.trainer").train(cfg, provenance)
    return 0


_RUN_INFO_HEADER = (("git_commit", "git commit"), ("git_dirty", "uncommitted changes"), ("command", "command"),
                    ("cwd", "in"), ("start_time", "started"), ("hostnames", "hosts"), ("layout", "layout"),
                    ("versions", "versions"))


def _print_from_checkpoint(folder: str) -> int:
    from ironcore.config.saved import load_saved_config

    cfg, provenance, info = load_saved_config(folder)
    print(f"# Resolved config of checkpoint {folder}; each key's comment says where its value came from.")
    for key, label in _RUN_INFO_HEADER:
        if key in info:
            value = info[key]
            print(f"# {label}: {value if isinstance(value, str) else json.dumps(value)}")
    if not info:
        print("# (this checkpoint has no run metadata: it was written before IronCore recorded it)")
    print(to_yaml(cfg, provenance), end="")
    return 0


def cmd_config(argv: Sequence[str]) -> int:
    parsed = _run_parser("config").parse_args(list(argv))
    if parsed.from_checkpoint is not None:
        if parsed.args or parsed.config_option:
            raise UsageError("ironcore config --from-checkpoint CKPT takes no CONFIG or overrides: it prints "
                             "the checkpoint's config as it was trained")
        return _print_from_checkpoint(parsed.from_checkpoint)
    cfg, provenance, path = _load("config", argv)
    estimate = check_memory(cfg, provenance)  # a config that cannot fit is an error here too
    print(f"# Resolved by `ironcore config {path}`; each key's comment says where its value came from.")
    print(f"# {estimate.summary()}")
    print(to_yaml(cfg, provenance), end="")
    return 0


def cmd_eval(argv: Sequence[str]) -> int:
    cfg, _, _ = _load("eval", argv)
    _setup_logging(cfg)
    status = _module("ironcore.training.evaluate").main(cfg)
    return status if isinstance(status, int) else 0


def _tool(module: str) -> Callable[[Sequence[str]], int]:
    def run(argv: Sequence[str]) -> int:
        status = _module(module).main(list(argv))
        return status if isinstance(status, int) else 0
    return run


def _top_help() -> str:
    lines = ["usage: ironcore [train] CONFIG [overrides ...]", "       ironcore COMMAND ...", "", "commands:"]
    lines += [f"  {name:<15} {text}" for name, text in _RUN_COMMANDS.items()]
    lines += [f"  {name:<15} {text}" for name, (_, text) in _TOOL_COMMANDS.items()]
    lines += ["", "Run `ironcore COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (2 for user mistakes)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_help(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else USAGE_ERROR
    commands: dict[str, Callable[[Sequence[str]], int]] = {
        "train": cmd_train, "config": cmd_config, "eval": cmd_eval,
        **{name: _tool(module) for name, (module, _) in _TOOL_COMMANDS.items()},
    }
    command = argv[0] if argv[0] in commands else "train"
    rest = argv[1:] if argv[0] in commands else argv
    try:
        return commands[command](rest)
    except ConfigError as e:
        if _is_main_rank():
            print(f"ironcore {command}: {e}", file=sys.stderr)
        return USAGE_ERROR
    except UsageError as e:
        print(str(e), file=sys.stderr)
        return USAGE_ERROR
    except SystemExit as e:  # argparse's own usage errors (status 2) and --help (status 0)
        return e.code if isinstance(e.code, int) else USAGE_ERROR
    except _run_errors() as e:
        print(f"ironcore {command}: rank {_rank()}: {e}", file=sys.stderr)
        return RUN_ERROR
