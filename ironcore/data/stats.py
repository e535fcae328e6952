"""`ironcore data-stats PATH`: documents, tokens, document lengths and the most frequent tokens."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

import numpy as np

from ironcore.data.indexed import IndexedDataset, IndexedDatasetError
from ironcore.data.tokenizer import make_tokenizer

CHUNK = 1 << 24  # tokens counted per pass, so the histogram never loads a whole corpus


def token_histogram(data: IndexedDataset) -> np.ndarray:
    counts = np.zeros(max(data.vocab_size, 1), dtype=np.int64)
    for start in range(0, data.num_tokens, CHUNK):
        counts += np.bincount(data.tokens[start: start + CHUNK], minlength=counts.size)[: counts.size]
    return counts


def describe(data: IndexedDataset, top: int = 20, tokenizer=None) -> str:
    lengths = data.doc_lengths
    lines = [f"dataset    {data.prefix}",
             f"task       {data.task}   dtype {data.dtype.name}   vocabulary {data.vocab_size:,}",
             f"documents  {data.num_documents:,}",
             f"tokens     {data.num_tokens:,}"]
    if data.num_documents:
        lines.append(f"doc length min {lengths.min():,}  mean {lengths.mean():,.1f}  "
                     f"median {int(np.median(lengths)):,}  max {lengths.max():,}")
    if data.mask is not None:
        trained = int(sum(int(data.mask[s: s + CHUNK].sum()) for s in range(0, data.num_tokens, CHUNK)))
        lines.append(f"loss mask  {trained:,} response tokens ({trained / max(data.num_tokens, 1):.1%})")
    counts = token_histogram(data)
    used = int(np.count_nonzero(counts))
    lines.append(f"distinct token ids {used:,} of {data.vocab_size:,}")
    lines.append(f"top {top} tokens:")
    for t in np.argsort(-counts, kind="stable")[:top]:
        if counts[t] == 0:
            break
        text = repr(tokenizer.decode([int(t)])) if tokenizer is not None else ""
        lines.append(f"  {int(t):>7}  {counts[t]:>12,}  {counts[t] / data.num_tokens:6.2%}  {text}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="ironcore data-stats", description=__doc__)
    p.add_argument("path", help="indexed dataset prefix (or its .bin / .idx)")
    p.add_argument("--top", type=int, default=20, help="how many of the most frequent tokens to list")
    p.add_argument("--tokenizer-type", choices=["gpt2", "hf"], default="gpt2", help="to decode the top tokens")
    p.add_argument("--vocab-name-or-path", default="gpt2")
    args = p.parse_args(argv)
    try:
        data = IndexedDataset(args.path)
    except IndexedDatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tok = make_tokenizer(args.tokenizer_type, args.vocab_name_or_path)
    if tok.vocab_size != data.vocab_size:
        print(f"note: the dataset's vocabulary ({data.vocab_size}) is not {tok.name}'s ({tok.vocab_size}); "
              "tokens are not decoded", file=sys.stderr)
        tok = None
    print(describe(data, args.top, tok))
    return 0


if __name__ == "__main__":
    sys.exit(main())
