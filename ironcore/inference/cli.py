"""``tools/generate.py``: sample continuations of prompts from a checkpoint or a Hugging Face folder.

    python tools/generate.py --checkpoint MODEL_PATH --prompt "Once upon a time" [--prompt "..."]
        [--max-new-tokens 64 --temperature 0.8 --top-k 50 --top-p 0.95 --seed 1234]
    python tools/generate.py --hf HF_DIR --prompt "..." --temperature 0           # greedy
    torchrun --nproc_per_node 2 tools/generate.py --checkpoint MODEL_PATH --prompt "..."   # TP=2

Every process is one tensor-parallel rank (TP = the number of processes, PP = 1); any checkpoint
layout loads. Rank 0 prints each prompt's continuation, then the decoding speed in tokens/s; with
``--json``, one JSON object: ``{"results": [{"prompt", "prompt_ids", "ids", "text", "stopped_at_eod"}, ...],
"decode_tokens_per_s"}`` (``ids``/``text``: the generated continuation).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Optional

from ironcore.checkpoint.io import CheckpointError
from ironcore.config.schema import Config
from ironcore.inference.generate import generate
from ironcore.inference.loading import load_for_generation
from ironcore.inference.sampling import SamplingParams
from ironcore.parallel.state import destroy_distributed, init_distributed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a trainer.model_path (its latest checkpoint) or an iter_* folder")
    source.add_argument("--hf", help="a Hugging Face GPT-2 / LLaMA folder (save_pretrained output)")
    parser.add_argument("--prompt", action="append", required=True,
                        help="text to continue; repeat for a batch of prompts")
    defaults = SamplingParams()
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="0 = off")
    parser.add_argument("--top-p", type=float, default=defaults.top_p, help="1.0 = off")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object instead: per prompt its token ids, the generated ids and text")
    return parser


def _json_report(texts: list[str], prompts: list[list[int]], out, tokenizer) -> dict:
    results = [{"prompt": text, "prompt_ids": ids, "ids": tokens, "text": tokenizer.decode(tokens),
                "stopped_at_eod": stopped}
               for text, ids, tokens, stopped in zip(texts, prompts, out.tokens, out.stopped_at_eod)]
    return {"results": results, "decode_tokens_per_s": out.decode_tokens_per_s}


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ValueError as e:
        parser.error(str(e))

    cfg = Config()
    cfg.trainer.tensor_model_parallel_size = int(os.environ.get("WORLD_SIZE", "1"))
    cfg.trainer.pipeline_model_parallel_size = 1
    pstate = init_distributed(cfg)
    try:
        loaded = load_for_generation(pstate, checkpoint=args.checkpoint, hf_dir=args.hf)
        prompts = [loaded.tokenizer.encode(text) for text in args.prompt]
        out = generate(loaded.model, prompts, params, eod_id=loaded.eod_id)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error (rank {pstate.rank}): {e}", file=sys.stderr)
        return 1
    finally:
        destroy_distributed()

    if pstate.rank == 0 and args.json:
        print(json.dumps(_json_report(args.prompt, prompts, out, loaded.tokenizer)))
    elif pstate.rank == 0:
        for text, tokens, stopped in zip(args.prompt, out.tokens, out.stopped_at_eod):
            end = " [end of document]" if stopped else ""
            print(f"=== prompt: {text!r}\n{text}{loaded.tokenizer.decode(tokens)}{end}\n")
        print(f"prefill {sum(out.prompt_lengths)} tokens in {out.prefill_seconds:.3f}s; "
              f"decoding: {out.decode_tokens} tokens in {out.decode_seconds:.3f}s = "
              f"{out.decode_tokens_per_s:.1f} tokens/s (batch {len(prompts)}, TP {pstate.tp_size})")
    return 0
