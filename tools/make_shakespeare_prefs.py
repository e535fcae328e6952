"""Build the shipped DPO example set from the shipped Tiny Shakespeare text (deterministic).

    python tools/make_shakespeare_prefs.py [--pairs 800] [--eval-pairs 100] [--seed 0]

Each pair is one line of a speech as the prompt, the line that truly follows it as ``chosen``, and
a line drawn from elsewhere in the play as ``rejected``. The speaker lines ("First Citizen:") are
left out, and only prompts whose next line is in the same speech are used. The pairs are drawn at
random (seeded); the first ``--pairs`` go to ``shakespeare_prefs_train.jsonl``, the next
``--eval-pairs`` to ``shakespeare_prefs_eval.jsonl``, both in ``ironcore/assets/`` (what
``configs/data/dpo_example.yaml`` reads; they are tokenized into the cache on first use).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "ironcore" / "assets"


def speeches(text: str) -> list[list[str]]:
    """The play's speeches (blank-line-separated blocks) as their lines, less the speaker's name."""
    blocks = [block.splitlines() for block in text.split("\n\n")]
    return [[line.strip() for line in block[1:] if line.strip()] for block in blocks if len(block) > 2]


def make_pairs(text: str, count: int, seed: int) -> list[dict[str, str]]:
    """`count` (prompt, true next line, line from elsewhere) triples, drawn with `seed`."""
    rng = random.Random(seed)
    lines = [line for speech in speeches(text) for line in speech]
    candidates = [(speech[i], speech[i + 1]) for speech in speeches(text) for i in range(len(speech) - 1)]
    pairs = []
    for prompt, chosen in rng.sample(candidates, count):
        rejected = rng.choice(lines)
        while rejected in (prompt, chosen):  # a line from elsewhere, never the true one
            rejected = rng.choice(lines)
        pairs.append({"prompt": prompt + "\n", "chosen": chosen + "\n", "rejected": rejected + "\n"})
    return pairs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=800)
    parser.add_argument("--eval-pairs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pairs = make_pairs((ASSETS / "tinyshakespeare.txt").read_text(encoding="utf-8"),
                       args.pairs + args.eval_pairs, args.seed)
    for name, part in (("train", pairs[:args.pairs]), ("eval", pairs[args.pairs:])):
        path = ASSETS / f"shakespeare_prefs_{name}.jsonl"
        path.write_text("".join(json.dumps(p) + "\n" for p in part), encoding="utf-8")
        print(f"{path}: {len(part)} pairs")


if __name__ == "__main__":
    main()
