"""Data pipeline throughput: preprocessing (tokens/s, MB/s) per worker count, and loader samples/s.

    python tools/benchmark_data.py [--size-mb 20] [--workers 1 2] [--seq-len 1024] [--micro-batch-size 8]

The corpus is the shipped Tiny Shakespeare text repeated to --size-mb, one JSON line per paragraph
(what real corpora look like). Prints one line per measurement and a JSON summary at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from ironcore.data.indexed import IndexedDataset
from ironcore.data.preprocess import preprocess_file
from ironcore.data.tokenizer import ASSETS


def make_corpus(folder: Path, size_mb: float) -> Path:
    paragraphs = (ASSETS / "tinyshakespeare.txt").read_text(encoding="utf-8").split("\n\n")
    lines = "".join(json.dumps({"text": p}) + "\n" for p in paragraphs)
    path = folder / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(max(1, round(size_mb * 1e6 / len(lines.encode())))):
            f.write(lines)
    return path


def bench_preprocess(corpus: Path, folder: Path, workers: int) -> dict:
    s = preprocess_file(corpus, str(folder / f"w{workers}"), workers=workers, chunk_size=256)
    return {"workers": workers, "documents": s.documents, "tokens": s.tokens, "seconds": round(s.seconds, 2),
            "tokens_per_s": round(s.tokens / s.seconds), "mb_per_s": round(s.input_bytes / 1e6 / s.seconds, 2),
            "docs_per_s": round(s.documents / s.seconds)}


def bench_loader(prefix: str, seq_len: int, micro_batch_size: int, batches: int) -> dict:
    # Imported here: spawned preprocessing workers re-import this script, and should not load torch.
    from ironcore.data.datasets import PretrainDataset
    from ironcore.data.loader import build_loader

    data = IndexedDataset(prefix)
    ds = PretrainDataset(data, np.arange(data.num_documents), seq_len)
    loader = build_loader(ds, micro_batch_size, dp_rank=0, dp_size=1, seed=1234)
    next(loader)  # the first epoch's permutation
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    seconds = time.perf_counter() - start
    n = batches * micro_batch_size
    return {"seq_len": seq_len, "micro_batch_size": micro_batch_size, "samples_per_s": round(n / seconds),
            "tokens_per_s": round(n * seq_len / seconds)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=float, default=20.0)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seq-len", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=500)
    args = p.parse_args(argv)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
              "preprocess": [], "loader": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        corpus = make_corpus(folder, args.size_mb)
        result["corpus_mb"] = round(corpus.stat().st_size / 1e6, 1)
        for w in args.workers:
            r = bench_preprocess(corpus, folder, w)
            result["preprocess"].append(r)
            print(f"preprocess workers={w}: {r['tokens_per_s']:,} tokens/s  {r['mb_per_s']} MB/s  "
                  f"{r['docs_per_s']:,} docs/s  ({r['tokens']:,} tokens in {r['seconds']} s)", flush=True)
        for s in args.seq_len:
            r = bench_loader(str(folder / f"w{args.workers[0]}"), s, args.micro_batch_size, args.batches)
            result["loader"].append(r)
            print(f"loader seq_len={s} mbs={args.micro_batch_size}: {r['samples_per_s']:,} samples/s  "
                  f"{r['tokens_per_s']:,} tokens/s", flush=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
