"""Tokenize a JSON-lines or plain-text corpus into an indexed dataset (`PREFIX.bin` / `PREFIX.idx`).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/owt/owt_text_document \\
        [--json-keys text] [--tokenizer-type gpt2] [--workers N] [--task pretrain|sft|dpo]

Inputs
- `.jsonl` / `.json` (one object per line). pretrain reads one text key (`text` by default); sft reads
  `prompt response`; dpo reads `prompt chosen rejected` (`--json-keys` renames them, in that order).
- `.txt` (pretrain only): a document is a block of lines up to and including the blank line that
  ends it, so the documents concatenated are exactly the file.

Every document gets the end-of-document id appended. sft/dpo also store the loss mask (0 on prompt
tokens, 1 on response tokens and the end-of-document), see `indexed.py`.

The corpus is streamed: the main process reads lines and hands chunks of them to the worker pool
with a bounded number of chunks in flight, so memory stays flat whatever the corpus size. Lines that
are not valid JSON, lack a key, or hold a non-string are counted and reported with their line
numbers. Output goes to temporary files renamed into place at the end; a complete existing output
is skipped, an incomplete one rebuilt.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from ironcore.data.indexed import IndexedDatasetBuilder, dataset_paths, is_complete, strip_suffix
from ironcore.data.tokenizer import make_tokenizer

DEFAULT_KEYS = {"pretrain": ["text"], "sft": ["prompt", "response"], "dpo": ["prompt", "chosen", "rejected"]}
TEXT_SUFFIXES = (".txt",)
JSON_SUFFIXES = (".jsonl", ".json")
MAX_REPORTED_BAD = 100

Chunk = list[tuple[int, bytes]]  # (line number, raw line or text block)


@dataclass
class Summary:
    documents: int = 0
    tokens: int = 0
    input_bytes: int = 0
    empty: int = 0
    bad_lines: int = 0
    bad_examples: list = field(default_factory=list)  # (line number, reason), the first MAX_REPORTED_BAD
    seconds: float = 0.0

    def add_bad(self, lineno: int, reason: str) -> None:
        self.bad_lines += 1
        if len(self.bad_examples) < MAX_REPORTED_BAD:
            self.bad_examples.append((lineno, reason))


# ---- reading (main process) ------------------------------------------------------------------

def input_format(path: Path) -> str:
    if path.suffix in JSON_SUFFIXES:
        return "jsonl"
    if path.suffix in TEXT_SUFFIXES:
        return "text"
    raise ValueError(f"{path}: unsupported input suffix {path.suffix!r} (allowed: "
                     f"{list(JSON_SUFFIXES + TEXT_SUFFIXES)})")


def _read_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            yield lineno, line


def _text_blocks(path: Path) -> Iterator[tuple[int, bytes]]:
    """Blocks of lines, each ending with (and including) the blank line that closes it."""
    start, block, has_text = 1, [], False
    for lineno, line in _read_lines(path):
        if not block:
            start = lineno
        block.append(line)
        if line.strip():
            has_text = True
        elif has_text:
            yield start, b"".join(block)
            block, has_text = [], False
    if block:
        yield start, b"".join(block)


def _chunks(items: Iterator[tuple[int, bytes]], chunk_size: int) -> Iterator[tuple[list, int]]:
    chunk, nbytes = [], 0
    for lineno, raw in items:
        chunk.append((lineno, raw))
        nbytes += len(raw)
        if len(chunk) == chunk_size:
            yield chunk, nbytes
            chunk, nbytes = [], 0
    if chunk:
        yield chunk, nbytes


# ---- encoding (worker processes) -------------------------------------------------------------

_STATE: dict = {}


def _init_worker(tokenizer_type: str, vocab_name_or_path: str, task: str, keys: list[str], fmt: str) -> None:
    tok = make_tokenizer(tokenizer_type, vocab_name_or_path)
    _STATE.update(tok=tok, task=task, keys=keys, fmt=fmt)


def _fields(raw: bytes) -> list[str]:
    """The task's string fields of one input item; raises ValueError with a short reason."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"invalid UTF-8 ({e.reason} at byte {e.start})") from None
    if _STATE["fmt"] == "text":
        return [text]
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    values = []
    for key in _STATE["keys"]:
        if key not in obj:
            raise ValueError(f"missing key {key!r}")
        if not isinstance(obj[key], str):
            raise ValueError(f"key {key!r} holds {type(obj[key]).__name__}, not a string")
        values.append(obj[key])
    return values


def _encode_item(values: list[str]) -> list[tuple[np.ndarray, Optional[np.ndarray]]]:
    """Documents (tokens with EOD appended, loss mask or None) of one input item."""
    tok, task = _STATE["tok"], _STATE["task"]
    eod = [tok.eod_id]
    if task == "pretrain":
        return [(np.array(tok.encode(values[0]) + eod, dtype=np.int32), None)]
    prompt = tok.encode(values[0])
    docs = []
    for response in values[1:]:  # sft: the response; dpo: chosen, then rejected
        answer = tok.encode(response) + eod
        mask = np.concatenate([np.zeros(len(prompt), np.uint8), np.ones(len(answer), np.uint8)])
        docs.append((np.array(prompt + answer, dtype=np.int32), mask))
    return docs


@dataclass
class EncodedChunk:
    """A chunk's documents as one token array (plus lengths and mask) so results cross process
    boundaries and reach the file in a few large pieces, not one small array per document."""
    tokens: np.ndarray
    lengths: np.ndarray
    mask: Optional[np.ndarray]
    empty: int
    bad: list  # (line number, reason)


def _encode_chunk(chunk: Chunk) -> EncodedChunk:
    docs, empty, bad = [], 0, []
    for lineno, raw in chunk:
        if _STATE["fmt"] == "jsonl" and not raw.strip():
            empty += 1
            continue
        try:
            values = _fields(raw)
        except ValueError as e:
            bad.append((lineno, str(e)))
            continue
        if not any(v.strip() for v in values):
            empty += 1
            continue
        docs.extend(_encode_item(values))
    if not docs:
        return EncodedChunk(np.zeros(0, np.int32), np.zeros(0, np.int64), None, empty, bad)
    tokens = np.concatenate([t for t, _ in docs])
    lengths = np.array([len(t) for t, _ in docs], dtype=np.int64)
    mask = np.concatenate([m for _, m in docs]) if docs[0][1] is not None else None
    return EncodedChunk(tokens, lengths, mask, empty, bad)


def _encoded_chunks(chunks: Iterator[tuple[list, int]], workers: int,
                    init_args: tuple) -> Iterator[tuple[EncodedChunk, int]]:
    """Encoded chunks in input order. With a pool, at most 4 chunks per worker are in flight
    (plain `Pool.imap` would read the whole input ahead of the workers)."""
    if workers <= 1:
        _init_worker(*init_args)
        for chunk, nbytes in chunks:
            yield _encode_chunk(chunk), nbytes
        return
    with mp.get_context("spawn").Pool(workers, _init_worker, init_args) as pool:
        pending: deque = deque()
        for chunk, nbytes in chunks:
            pending.append((pool.apply_async(_encode_chunk, (chunk,)), nbytes))
            if len(pending) >= 4 * workers:
                res, n = pending.popleft()
                yield res.get(), n
        while pending:
            res, n = pending.popleft()
            yield res.get(), n


# ---- driver ----------------------------------------------------------------------------------

def preprocess_file(input_path: str | Path, output_prefix: str, *, tokenizer_type: str = "gpt2",
                    vocab_name_or_path: str = "gpt2", task: str = "pretrain",
                    json_keys: Optional[list[str]] = None, workers: int = 1, chunk_size: int = 256,
                    progress: bool = False) -> Summary:
    """Tokenize `input_path` into `output_prefix`.bin/.idx(/.mask); returns the counts."""
    path = Path(input_path)
    fmt = input_format(path)
    if fmt == "text" and task != "pretrain":
        raise ValueError(f"{path}: --task {task} needs a JSON-lines input with keys {DEFAULT_KEYS[task]}")
    keys = list(json_keys or DEFAULT_KEYS[task])
    if len(keys) != len(DEFAULT_KEYS[task]):
        raise ValueError(f"--json-keys: task {task} reads {len(DEFAULT_KEYS[task])} key(s) "
                         f"(like {DEFAULT_KEYS[task]}), got {keys}")
    vocab_size = make_tokenizer(tokenizer_type, vocab_name_or_path).vocab_size
    items = _text_blocks(path) if fmt == "text" else _read_lines(path)
    summary = Summary()
    builder = IndexedDatasetBuilder(output_prefix, vocab_size, task)
    bar = _progress_bar(path, progress)
    start = time.perf_counter()
    try:
        init_args = (tokenizer_type, vocab_name_or_path, task, keys, fmt)
        for results, nbytes in _encoded_chunks(_chunks(items, chunk_size), workers, init_args):
            builder.add_documents(results.tokens, results.lengths, results.mask)
            summary.empty += results.empty
            for lineno, reason in results.bad:
                summary.add_bad(lineno, reason)
            summary.input_bytes += nbytes
            if bar is not None:
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.update(nbytes)
                bar.set_postfix_str(f"{builder.num_documents / elapsed:,.0f} docs/s, "
                                    f"{builder.num_tokens / elapsed:,.0f} tok/s", refresh=False)
        builder.finalize()
    except BaseException:
        builder.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    summary.documents, summary.tokens = builder.num_documents, builder.num_tokens
    summary.seconds = time.perf_counter() - start
    return summary


def _progress_bar(path: Path, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=path.name, file=sys.stderr)


def format_summary(s: Summary, prefix: str, task: str) -> str:
    t = max(s.seconds, 1e-9)
    files = ", ".join(str(p) for k, p in dataset_paths(prefix).items() if k != "mask" or task != "pretrain")
    lines = [f"wrote {files}",
             f"  documents {s.documents:,}  tokens {s.tokens:,}  input {s.input_bytes / 1e6:,.1f} MB  "
             f"in {s.seconds:.1f} s",
             f"  {s.documents / t:,.0f} docs/s  {s.tokens / t:,.0f} tokens/s  {s.input_bytes / 1e6 / t:,.2f} MB/s",
             f"  empty items skipped {s.empty:,}  bad lines {s.bad_lines:,}"]
    for lineno, reason in s.bad_examples[:20]:
        lines.append(f"    line {lineno}: {reason}")
    if s.bad_lines > 20:
        lines.append(f"    ... and {s.bad_lines - 20:,} more")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="preprocess_data", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="corpus file: .jsonl/.json (one object per line) or .txt")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx (and PREFIX.mask)")
    p.add_argument("--task", choices=sorted(DEFAULT_KEYS), default="pretrain")
    p.add_argument("--json-keys", nargs="+", default=None,
                   help="keys to read: pretrain `text`; sft `prompt response`; dpo `prompt chosen rejected`")
    p.add_argument("--tokenizer-type", choices=["gpt2", "hf"], default="gpt2")
    p.add_argument("--vocab-name-or-path", default="gpt2", help="`gpt2`, or a local Hugging Face tokenizer folder")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--chunk-size", type=int, default=256, help="input items per task sent to a worker")
    p.add_argument("--overwrite", action="store_true", help="rebuild even if a complete output exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    prefix = strip_suffix(args.output_prefix)
    if args.workers < 1 or args.chunk_size < 1:
        print("error: --workers and --chunk-size must be at least 1", file=sys.stderr)
        return 2
    if not Path(args.input).is_file():
        print(f"error: --input {args.input}: file not found", file=sys.stderr)
        return 2
    paths = dataset_paths(prefix)
    if not args.overwrite and is_complete(prefix):
        print(f"{paths['bin']} and {paths['idx']} are already complete; skipping (--overwrite rebuilds)")
        return 0
    if paths["idx"].exists() or paths["bin"].exists():
        print(f"{prefix}: an incomplete or replaced output exists; rebuilding it")
    try:
        summary = preprocess_file(args.input, prefix, tokenizer_type=args.tokenizer_type,
                                  vocab_name_or_path=args.vocab_name_or_path, task=args.task,
                                  json_keys=args.json_keys, workers=args.workers, chunk_size=args.chunk_size,
                                  progress=not args.no_progress)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary, prefix, args.task))
    return 0


if __name__ == "__main__":
    sys.exit(main())
