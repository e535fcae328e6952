"""Data pipeline: tokenizers, indexed datasets, splits and blending, rank-aware loading.

Names are imported lazily so that the preprocessing tool and its worker processes do not import
torch (which `datasets` and `loader` need) just to tokenize text.
"""

import importlib

_EXPORTS = {
    "build_datasets": "datasets", "PretrainDataset": "datasets", "SFTDataset": "datasets", "DPODataset": "datasets",
    "build_loader": "loader",
    "build_tokenizer": "tokenizer", "resolve_vocab_size": "tokenizer",
    "IndexedDataset": "indexed", "IndexedDatasetBuilder": "indexed", "IndexedDatasetError": "indexed",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ironcore.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ironcore.data.{_EXPORTS[name]}"), name)
