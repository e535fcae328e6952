#!/usr/bin/env python
"""Convert checkpoints between Hugging Face and IronCore.

    python tools/convert_checkpoint.py --from hf --input HF_DIR --output CKPT_DIR --model CONFIG_OR_PRESET [--tp N] [--pp M]
    python tools/convert_checkpoint.py --from ironcore --input CKPT_DIR --output HF_DIR [--to hf]
    python tools/convert_checkpoint.py --from ironcore --to single --input DIST_ITER_DIR --output CKPT_DIR

HF_DIR is what ``save_pretrained`` writes (GPT2LMHeadModel or LlamaForCausalLM). CKPT_DIR is a
``trainer.model_path``: the converted weights become its iteration 0, which a run with that
model_path resumes from. ``--to single`` turns a distributed checkpoint folder (``iter_*`` saved
with ``operation.save_dist_ckpt``) into a single-file TP=1/PP=1 ``model_path``. ``--model`` is a full config file or a model preset (``gpt2-small``,
``configs/model/llama.yaml``); its model section must match the HF architecture.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import yaml

from ironcore.checkpoint.distributed import to_single_file
from ironcore.checkpoint.hf import convert_hf_folder, export_hf_folder
from ironcore.checkpoint.io import CheckpointError
from ironcore.config import GROUPS, ConfigError, load_config


def resolve_config(spec: str):
    """A full config file as it is, or a model preset (name or model-group file) with defaults."""
    path = Path(spec)
    if path.is_file():
        top = yaml.safe_load(path.read_text()) or {}
        if isinstance(top, dict) and top and set(top) <= set(GROUPS):
            return load_config(path)
        spec = str(path.resolve())
    with tempfile.TemporaryDirectory() as tmp:
        wrapper = Path(tmp) / "convert.yaml"
        wrapper.write_text(yaml.safe_dump({"model": spec}))
        return load_config(wrapper)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", choices=["hf", "ironcore"], required=True)
    parser.add_argument("--to", dest="target", choices=["hf", "ironcore", "single"], default=None,
                        help="defaults to the other format; `single`: distributed -> single-file IronCore")
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--model", help="config file or model preset (required with --from hf)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the written checkpoint")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the written checkpoint")
    args = parser.parse_args(argv)
    target = args.target or ("ironcore" if args.source == "hf" else "hf")
    if args.source == target:
        parser.error(f"--from {args.source} --to {target}: nothing to convert")
    try:
        if args.source == "hf":
            if not args.model:
                parser.error("--from hf needs --model CONFIG_OR_PRESET")
            folder = convert_hf_folder(args.input, resolve_config(args.model), args.output, args.tp, args.pp)
            print(f"wrote {folder} (TP {args.tp}, PP {args.pp})")
        elif target == "single":
            folder = to_single_file(args.input, args.output)
            print(f"wrote {folder} (single-file, TP 1, PP 1)")
        else:
            export_hf_folder(args.input, args.output)
            print(f"wrote Hugging Face model to {args.output}")
    except (ConfigError, CheckpointError, ValueError, KeyError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
