"""Tokenizers behind one small interface.

`gpt2` is tiktoken's GPT-2 byte-level BPE built from the ranks shipped in `ironcore/assets`, so it
works with no network (air-gapped clusters too). A local Hugging Face tokenizer folder (what
`save_pretrained` writes, e.g. a LLaMA tokenizer) is loaded with `transformers.AutoTokenizer`.

Both encode data text as ordinary text: special-token strings inside a document are never turned
into special ids, and the end-of-document id is appended by the data pipeline, never taken from data.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Protocol

from ironcore.config import ConfigError
from ironcore.config.schema import Config, ModelConfig

ASSETS = Path(__file__).resolve().parent.parent / "assets"
GPT2_RANKS = ASSETS / "r50k_base.tiktoken"
# tiktoken's own r50k/gpt2 pre-tokenisation pattern.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_EOD = "<|endoftext|>"
GPT2_NAMES = ("gpt2", "r50k_base")


class Tokenizer(Protocol):
    name: str          # identifies the vocabulary (part of the cache key of tokenized data)
    vocab_size: int    # real (unpadded) vocabulary size, special tokens included
    eod_id: int        # end-of-document id appended after every document

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@functools.lru_cache(maxsize=1)
def _gpt2_encoding():
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(GPT2_RANKS))
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={GPT2_EOD: len(ranks)}, explicit_n_vocab=len(ranks) + 1)


class GPT2Tokenizer:
    """tiktoken GPT-2 BPE: 50,257 ids, `<|endoftext|>` = 50256."""

    name = "gpt2"

    def __init__(self) -> None:
        self._enc = _gpt2_encoding()
        self.vocab_size = self._enc.n_vocab
        self.eod_id = self._enc.eot_token

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids])


class HFTokenizer:
    """A Hugging Face tokenizer saved in a local folder; its EOS token ends documents."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        folder = Path(path)
        if not folder.is_dir():
            raise ConfigError([f"model.vocab_name_or_path: {path!r} is not a folder; tokenizer_type 'hf' loads "
                               "a local Hugging Face tokenizer folder (nothing is downloaded)"])
        self._tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        if self._tok.eos_token_id is None:
            raise ConfigError([f"model.vocab_name_or_path: the tokenizer in {path} has no EOS token; "
                               "it is needed as the end-of-document token"])
        self.name = f"hf:{folder.resolve()}"
        self.vocab_size = len(self._tok)
        self.eod_id = int(self._tok.eos_token_id)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


def make_tokenizer(tokenizer_type: str, vocab_name_or_path: str) -> Tokenizer:
    """The tokenizer for a type and vocabulary (also used by the preprocessing tool's workers)."""
    if tokenizer_type == "hf" or os.path.isdir(vocab_name_or_path):
        return HFTokenizer(vocab_name_or_path)
    if tokenizer_type == "gpt2":
        if vocab_name_or_path not in GPT2_NAMES:
            raise ConfigError([f"model.vocab_name_or_path: {vocab_name_or_path!r} is not a folder; with "
                               f"tokenizer_type 'gpt2' it must be one of {list(GPT2_NAMES)}"])
        return GPT2Tokenizer()
    raise ConfigError([f"model.tokenizer_type: {tokenizer_type!r} is not one of ['gpt2', 'hf']"])


def build_tokenizer(model_cfg: ModelConfig) -> Tokenizer:
    """The tokenizer named by `model.tokenizer_type` / `model.vocab_name_or_path`."""
    return make_tokenizer(model_cfg.tokenizer_type, model_cfg.vocab_name_or_path)


def resolve_vocab_size(cfg: Config, tokenizer: Tokenizer) -> int:
    """`data.vocab_size` when set (it may reserve extra ids), else the tokenizer's vocabulary."""
    if cfg.data.vocab_size is None:
        return tokenizer.vocab_size
    if cfg.data.vocab_size < tokenizer.vocab_size:
        raise ConfigError([f"data.vocab_size: {cfg.data.vocab_size} is smaller than the tokenizer's vocabulary "
                           f"({tokenizer.vocab_size} for {tokenizer.name}); leave it unset or raise it"])
    return cfg.data.vocab_size
