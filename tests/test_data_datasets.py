"""Datasets: document-level splits, packing, blending by weight, SFT masks/segments, DPO pairs,
and build_datasets from the config (including the embedded Shakespeare default)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ironcore.config.schema import Config
from ironcore.data import build_datasets, build_loader, build_tokenizer
from ironcore.data import preprocess
from ironcore.data.blend import blend_schedule, split_documents
from ironcore.data.datasets import PretrainDataset
from ironcore.data.indexed import IndexedDataset, IndexedDatasetBuilder
from ironcore.data.tokenizer import GPT2Tokenizer

ROOT = Path(__file__).resolve().parent.parent
SHAKESPEARE = ROOT / "ironcore" / "assets" / "tinyshakespeare.txt"
EOD = 50256


@pytest.fixture(scope="module")
def tok():
    return GPT2Tokenizer()


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("shk") / "shakespeare")
    assert preprocess.main(["--input", str(SHAKESPEARE), "--output-prefix", prefix, "--no-progress"]) == 0
    return prefix


def _cfg(paths, task="pretrain", seq=16, splits=(1.0, 0.0, 0.0), **data):
    cfg = Config()
    cfg.model.max_seq_len = seq
    cfg.data.task_type = task
    cfg.data.splits = list(splits)
    cfg.data.train_datasets = [{"path": str(p), "weight": w} for p, w in paths]
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def _synthetic(prefix, first_token, n_docs, doc_len=9):
    """Documents of consecutive ids starting at first_token (identifiable), each ending with EOD."""
    b = IndexedDatasetBuilder(str(prefix), 50257, "pretrain")
    for d in range(n_docs):
        b.add_document(list(range(first_token + d * 10, first_token + d * 10 + doc_len - 1)) + [EOD])
    b.finalize()
    return str(prefix)


def test_splits_match_ratios_and_are_disjoint(shakespeare):
    n = IndexedDataset(shakespeare).num_documents
    for ratios in ([0.97, 0.029, 0.001], [0.9, 0.09, 0.01], [2, 1, 1]):
        parts = split_documents(n, ratios, seed=1337)
        share = np.asarray(ratios) / sum(ratios)
        for part, r in zip(parts, share):
            assert abs(len(part) - r * n) <= 1, (ratios, len(part), r * n)
        union = np.concatenate(parts)
        assert len(union) == n and len(np.unique(union)) == n  # disjoint and complete
    again = split_documents(n, [0.9, 0.09, 0.01], seed=1337)
    other = split_documents(n, [0.9, 0.09, 0.01], seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, split_documents(n, [2, 1, 1], 1337)))
    assert np.array_equal(again[1], split_documents(n, [0.9, 0.09, 0.01], 1337)[1])
    assert not np.array_equal(again[1], other[1])


def test_pretrain_samples_tile_the_split_stream(shakespeare):
    data = IndexedDataset(shakespeare)
    docs = split_documents(data.num_documents, [0.9, 0.09, 0.01], 7)[1]
    stream = np.concatenate([data.document(d) for d in docs]).astype(np.int64)
    ds = PretrainDataset(data, docs, seq_len=128)
    assert len(ds) == (len(stream) - 1) // 128
    for i in (0, 1, len(ds) // 2, len(ds) - 1):
        s = ds[i]
        assert np.array_equal(s["input_ids"], stream[i * 128: i * 128 + 128])
        assert np.array_equal(s["labels"], stream[i * 128 + 1: i * 128 + 129])
        assert s["loss_mask"].tolist() == [1.0] * 128 and s["position_ids"].tolist() == list(range(128))


def test_blend_schedule_holds_the_weights_in_every_prefix():
    owner, rank = blend_schedule([0.7, 0.2, 0.1], 5000)
    for n in (10, 333, 5000):
        counts = np.bincount(owner[:n], minlength=3)
        assert np.all(np.abs(counts - np.array([0.7, 0.2, 0.1]) * n) <= 1), counts
    for j in range(3):  # each dataset's samples are taken in order 0, 1, 2, ...
        assert np.array_equal(rank[owner == j], np.arange((owner == j).sum()))


def test_blending_07_03_over_10000_samples(tmp_path):
    a = _synthetic(tmp_path / "a", 1000, 300)    # tokens 1000..3999
    b = _synthetic(tmp_path / "b", 20000, 300)   # tokens 20000..22999
    cfg = _cfg([(a, 0.7), (b, 0.3)], seq=8)
    tok = GPT2Tokenizer()
    train = build_datasets(cfg, tok)["train"]
    loader = build_loader(train, micro_batch_size=8, dp_rank=0, dp_size=1, seed=1337)
    ids = torch.cat([next(loader)["input_ids"] for _ in range(1250)])  # 10,000 samples
    first = torch.where(ids == EOD, 10**6, ids).min(dim=1).values  # a sample's smallest non-EOD id
    from_a = ((first >= 1000) & (first < 4000)).sum().item()
    from_b = ((first >= 20000) & (first < 23000)).sum().item()
    assert from_a + from_b == 10000
    assert abs(from_a / 10000 - 0.7) < 0.01 and abs(from_b / 10000 - 0.3) < 0.01
    # Equal-sized datasets: the weights change what is drawn (A repeats), not only the order.
    assert len(train.datasets[0]) == len(train.datasets[1])
    assert abs(from_a / from_b - 7 / 3) < 0.05


def _sft_jsonl(path: Path) -> list[dict]:
    rows = [{"prompt": f"Question {i}: what is {i} plus {i}?", "response": f" The answer is {2 * i}."}
            for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_sft_packed_mask_segments_and_positions(tmp_path, tok):
    rows = _sft_jsonl(tmp_path / "sft.jsonl")
    prefix = str(tmp_path / "sft")
    assert preprocess.main(["--task", "sft", "--input", str(tmp_path / "sft.jsonl"),
                            "--output-prefix", prefix, "--no-progress"]) == 0
    cfg = _cfg([(prefix, 1.0)], task="sft", seq=64)
    ds = build_datasets(cfg, tok)["train"]
    seen = []
    for i in range(len(ds)):
        s = ds[i]
        assert all(len(v) == 64 for v in s.values())
        seg = s["segment_ids"]
        for k in range(1, seg.max() + 1):
            where = np.flatnonzero(seg == k)
            assert np.array_equal(where, np.arange(where[0], where[-1] + 1))  # contiguous
            assert s["position_ids"][where].tolist() == list(range(len(where)))  # restart per example
            tokens = np.append(s["input_ids"][where], s["labels"][where][-1]).tolist()
            r = rows[len(seen)]
            p, a = tok.encode(r["prompt"]), tok.encode(r["response"])
            assert tokens == p + a + [EOD]
            # label j is tokens[j + 1]: masked (0) while it is a prompt token, 1 on response + EOD
            assert s["loss_mask"][where].tolist() == [0.0] * (len(p) - 1) + [1.0] * (len(a) + 1)
            seen.append(k)
        pad = seg == 0
        assert np.all(s["loss_mask"][pad] == 0) and np.all(s["input_ids"][pad] == EOD)
        assert pad.sum() == 0 or np.flatnonzero(pad)[0] == np.flatnonzero(~pad)[-1] + 1
    assert len(seen) == len(rows) and len(ds) < len(rows)  # every example once, packed several per row


def test_sft_mask_zeroes_the_prompt_loss_and_gradient(tmp_path, tok):
    _sft_jsonl(tmp_path / "sft.jsonl")
    prefix = str(tmp_path / "sft")
    preprocess.main(["--task", "sft", "--input", str(tmp_path / "sft.jsonl"), "--output-prefix", prefix,
                     "--no-progress"])
    cfg = _cfg([(prefix, 1.0)], task="sft", seq=32, pad_to_max_length=True, pad_token_id=0)
    ds = build_datasets(cfg, tok)["train"]
    assert len(ds) == 40
    batch = next(build_loader(ds, 4, 0, 1, seed=3))
    assert "segment_ids" not in batch and batch["input_ids"].shape == (4, 32)
    logits = torch.randn(4, 32, 50257, requires_grad=True)
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none")
    loss = (per_token * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    loss.backward()
    masked = batch["loss_mask"] == 0
    assert masked.any() and (~masked).any()
    assert torch.all(logits.grad[masked] == 0)  # prompt and padding positions get no gradient
    assert torch.all(logits.grad[~masked].abs().sum(-1) > 0)
    pad_rows = batch["input_ids"] == 0
    assert torch.all(batch["loss_mask"][pad_rows & (batch["labels"] == 0)] == 0)


def test_dpo_pairs_line_up(tmp_path, tok):
    rows = [{"prompt": f"Say {i}:", "chosen": f" {i}" * (1 + i % 3), "rejected": f" no {i} never"} for i in range(12)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prefix = str(tmp_path / "p")
    preprocess.main(["--task", "dpo", "--input", str(tmp_path / "p.jsonl"), "--output-prefix", prefix, "--no-progress"])
    cfg = _cfg([(prefix, 1.0)], task="dpo", seq=32)
    ds = build_datasets(cfg, tok)["train"]
    assert len(ds) == 12
    loader = build_loader(ds, 4, 0, 1, seed=5, shuffle=False)
    batch = next(loader)
    assert set(batch) == {f"{n}_{k}" for n in ("chosen", "rejected") for k in ("input_ids", "labels", "loss_mask")}
    width = batch["chosen_input_ids"].shape[1]
    assert all(v.shape == (4, width) for v in batch.values())
    for i in range(4):
        p = tok.encode(rows[i]["prompt"])
        for name in ("chosen", "rejected"):
            a = tok.encode(rows[i][name])
            n = len(p) + len(a)  # label positions: tokens minus one
            assert batch[f"{name}_input_ids"][i, :n].tolist() == p + a
            assert batch[f"{name}_labels"][i, :n].tolist() == p[1:] + a + [EOD]
            assert batch[f"{name}_loss_mask"][i].tolist() == [0.0] * (len(p) - 1) + [1.0] * (len(a) + 1) + [0.0] * (width - n)


def test_build_datasets_errors(tmp_path, tok):
    a = _synthetic(tmp_path / "a", 1000, 20)
    with pytest.raises(ValueError, match=r"a was prepared for task 'pretrain' but data.task_type is 'sft'"):
        build_datasets(_cfg([(a, 1.0)], task="sft"), tok)
    cfg = _cfg([(a, 1.0)])
    cfg.data.train_datasets = ["a/path"]
    with pytest.raises(ValueError, match=r"data.train_datasets\[0\]: expected a mapping with a string `path`"):
        build_datasets(cfg, tok)
    cfg.data.train_datasets = [{"path": a, "wieght": 2}]
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['wieght'\]"):
        build_datasets(cfg, tok)
    cfg.data.train_datasets = [{"path": a, "weight": -1}]
    with pytest.raises(ValueError, match=r"data.train_datasets\[0\].weight: must be a positive number"):
        build_datasets(cfg, tok)
    b = IndexedDatasetBuilder(str(tmp_path / "v"), 1000, "pretrain")
    b.add_document([1, 2, 3])
    b.finalize()
    with pytest.raises(ValueError, match="tokenized with a vocabulary of 1000, but the model's tokenizer"):
        build_datasets(_cfg([(tmp_path / "v", 1.0)]), tok)
    cfg = _cfg([(a, 1.0)])
    cfg.data.vocab_size = 50000
    with pytest.raises(ValueError, match="data.vocab_size: 50000 is smaller than the tokenizer's"):
        build_datasets(cfg, tok)


def test_embedded_shakespeare_default_from_any_folder(tmp_path, monkeypatch, tok):
    from ironcore.config import load_config

    monkeypatch.setenv("IRONCORE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text("model: {max_seq_len: 128}\ndata: {config_path: configs/data/shakespeare.yaml}\n")
    cfg = load_config(tmp_path / "run.yaml")
    ds = build_datasets(cfg, build_tokenizer(cfg.model))
    sizes = {k: len(v) for k, v in ds.items()}
    assert sizes["eval"] >= 64 and sizes["test"] >= 8 and sizes["train"] > 2000
    assert sum(sizes.values()) <= 338028 // 128
    cached = sorted((tmp_path / "cache").glob("*.bin"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    again = build_datasets(cfg, build_tokenizer(cfg.model))  # reuses the cache
    assert cached[0].stat().st_mtime_ns == mtime and len(again["train"]) == sizes["train"]
    assert np.array_equal(again["eval"][3]["input_ids"], ds["eval"][3]["input_ids"])
