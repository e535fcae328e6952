"""The .bin/.idx format: round trip, dtype choice, and clear errors for damaged files."""

import struct
from pathlib import Path

import numpy as np
import pytest

from ironcore.data.indexed import IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError, is_complete

DOCS = [[5, 6, 7, 1], [9, 1], [3, 3, 3, 3, 3, 1]]


def _build(prefix, vocab=100, task="pretrain", docs=DOCS):
    b = IndexedDatasetBuilder(str(prefix), vocab, task)
    for d in docs:
        b.add_document(d, None if task == "pretrain" else [0] * (len(d) - 1) + [1])
    b.finalize()
    return str(prefix)


def test_round_trip_and_dtypes(tmp_path):
    small = IndexedDataset(_build(tmp_path / "s"))
    assert small.dtype == np.uint16 and Path(tmp_path / "s.bin").stat().st_size == 12 * 2
    assert [small.document(i).tolist() for i in range(3)] == DOCS
    assert small.doc_lengths.tolist() == [4, 2, 6] and small.num_tokens == 12
    big = IndexedDataset(_build(tmp_path / "b", vocab=70000, docs=[[69999, 0]]))
    assert big.dtype == np.int32 and big.document(0).tolist() == [69999, 0]
    sft = IndexedDataset(_build(tmp_path / "f", task="sft"))
    assert sft.task == "sft" and sft.document_mask(2).tolist() == [0, 0, 0, 0, 0, 1]
    assert not list(tmp_path.glob("*.tmp*"))


def test_out_of_range_token_is_rejected(tmp_path):
    b = IndexedDatasetBuilder(str(tmp_path / "x"), 10, "pretrain")
    with pytest.raises(ValueError, match="out of range"):
        b.add_document([3, 10])
    b.abort()
    assert not list(tmp_path.iterdir())


def test_truncated_bin(tmp_path):
    prefix = _build(tmp_path / "d")
    bin_path = Path(prefix + ".bin")
    bin_path.write_bytes(bin_path.read_bytes()[:-4])
    with pytest.raises(IndexedDatasetError, match=r"d\.bin: size 20 bytes does not match d\.idx .*truncated"):
        IndexedDataset(prefix)
    assert not is_complete(prefix)


def test_truncated_idx(tmp_path):
    prefix = _build(tmp_path / "d")
    idx = Path(prefix + ".idx")
    idx.write_bytes(idx.read_bytes()[:-8])
    with pytest.raises(IndexedDatasetError, match=r"d\.idx: size 64 bytes, .* need 72 \(truncated or corrupt index"):
        IndexedDataset(prefix)
    idx.write_bytes(b"IRN")
    with pytest.raises(IndexedDatasetError, match=r"d\.idx: truncated header"):
        IndexedDataset(prefix)


def test_wrong_magic(tmp_path):
    prefix = _build(tmp_path / "d")
    idx = Path(prefix + ".idx")
    idx.write_bytes(b"MMIDIDX\x00" + idx.read_bytes()[8:])
    with pytest.raises(IndexedDatasetError, match=r"d\.idx: wrong magic b'MMIDIDX\\x00'"):
        IndexedDataset(prefix)


def _patch_header_u32(idx: Path, field: int, value: int) -> None:
    raw = bytearray(idx.read_bytes())
    struct.pack_into("<I", raw, 8 + 4 * field, value)  # fields after the magic: version, dtype, task, vocab
    idx.write_bytes(bytes(raw))


def test_dtype_mismatch_and_unknown_dtype(tmp_path):
    prefix = _build(tmp_path / "d")
    _patch_header_u32(Path(prefix + ".idx"), 1, 2)  # claims int32, the .bin holds uint16
    with pytest.raises(IndexedDatasetError, match=r"d\.bin: .*12 tokens x 4 bytes as int32 = 48.*different dtype"):
        IndexedDataset(prefix)
    _patch_header_u32(Path(prefix + ".idx"), 1, 7)
    with pytest.raises(IndexedDatasetError, match=r"d\.idx: unknown dtype code 7"):
        IndexedDataset(prefix)


def test_vocab_too_big_for_uint16_and_bad_version(tmp_path):
    prefix = _build(tmp_path / "d")
    _patch_header_u32(Path(prefix + ".idx"), 3, 70000)
    with pytest.raises(IndexedDatasetError, match="uint16 cannot hold ids of vocabulary 70000"):
        IndexedDataset(prefix)
    _patch_header_u32(Path(prefix + ".idx"), 0, 9)
    with pytest.raises(IndexedDatasetError, match="format version 9 is not supported"):
        IndexedDataset(prefix)


def test_missing_files_and_mask(tmp_path):
    with pytest.raises(IndexedDatasetError, match=r"nothing\.idx: file not found"):
        IndexedDataset(tmp_path / "nothing")
    prefix = _build(tmp_path / "f", task="sft")
    Path(prefix + ".mask").unlink()
    with pytest.raises(IndexedDatasetError, match=r"f\.mask: missing \(expected 12 bytes of loss mask"):
        IndexedDataset(prefix)
