"""Token cache for raw `.txt` / `.jsonl` dataset entries (the embedded Shakespeare default uses it).

A raw file named in `data.*_datasets` is tokenized on first use into
`$IRONCORE_CACHE_DIR` (default `~/.cache/ironcore`) under a name keyed by the file's real path,
size and modification time, the tokenizer and the task, and reused after. When several ranks
start together, one builds under an exclusive file lock while the others wait on the lock and
then find the complete pair; a dataset counts as present only when its header and sizes check out.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from contextlib import contextmanager
from pathlib import Path

from ironcore.data.indexed import VERSION, is_complete
from ironcore.data.preprocess import JSON_SUFFIXES, TEXT_SUFFIXES, format_summary, preprocess_file
from ironcore.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)
RAW_SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES


def cache_dir() -> Path:
    return Path(os.environ.get("IRONCORE_CACHE_DIR") or Path.home() / ".cache" / "ironcore")


def cache_prefix(path: Path, tokenizer: Tokenizer, task: str) -> str:
    real = path.resolve()
    st = real.stat()
    key = f"{real}|{st.st_size}|{st.st_mtime_ns}|{tokenizer.name}|{tokenizer.vocab_size}|{task}|v{VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return str(cache_dir() / f"{real.stem}-{task}-{digest}")


@contextmanager
def _exclusive(lock_path: str):
    with open(lock_path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def cached_dataset(path: Path, tokenizer_type: str, vocab_name_or_path: str, tokenizer: Tokenizer,
                   task: str) -> str:
    """The indexed-dataset prefix holding `path` tokenized; builds it once if missing."""
    prefix = cache_prefix(path, tokenizer, task)
    if is_complete(prefix):
        return prefix
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(prefix + ".lock"):
        if not is_complete(prefix):  # another rank may have built it while we waited
            logger.info("tokenizing %s into the cache %s (once)", path, prefix)
            summary = preprocess_file(path, prefix, tokenizer_type=tokenizer_type,
                                      vocab_name_or_path=vocab_name_or_path, task=task)
            logger.info("%s", format_summary(summary, prefix, task))
            if summary.bad_lines:
                logger.warning("%s: %d bad line(s) skipped, first at line %d", path, summary.bad_lines,
                               summary.bad_examples[0][0])
    return prefix
