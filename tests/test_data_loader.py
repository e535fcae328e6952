"""Loader: data-parallel ranks disjoint and consistent with DP=1, exact resume, per-epoch shuffling;
the token cache built once when ranks start together."""

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ironcore.data import build_loader
from ironcore.data.datasets import PretrainDataset
from ironcore.data.indexed import IndexedDataset, IndexedDatasetBuilder
from tests.multiproc import run_distributed

EOD = 50256


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """101 samples of 9 tokens whose first input id is the sample index (ids 0..908)."""
    prefix = str(tmp_path_factory.mktemp("ld") / "ld")
    b = IndexedDatasetBuilder(prefix, 50257, "pretrain")
    b.add_document(list(range(101 * 8)) + [EOD])
    b.finalize()
    data = IndexedDataset(prefix)
    return PretrainDataset(data, np.arange(1), seq_len=8)


def _ids(batch):
    return (batch["input_ids"][:, 0] // 8).tolist()


def test_dp2_disjoint_and_union_is_dp1_in_order(dataset):
    assert len(dataset) == 101
    steps = 30  # 30 x 4 x 2 = 240 samples: crosses two epoch boundaries
    dp1 = build_loader(dataset, 4, 0, 1, seed=11)
    dp1_seq = [_ids(next(dp1)) for _ in range(2 * steps)]
    ranks = [build_loader(dataset, 4, r, 2, seed=11) for r in range(2)]
    rank_seq = [[_ids(next(loader)) for _ in range(steps)] for loader in ranks]
    for step in range(steps):
        # DP=1 with two micro-batches sees exactly what the two DP ranks see in one step
        assert rank_seq[0][step] == dp1_seq[2 * step] and rank_seq[1][step] == dp1_seq[2 * step + 1]
    epoch0 = [i for s in range(13) for r in range(2) for i in rank_seq[r][s]][:101]
    assert sorted(epoch0) == list(range(101))  # within an epoch no sample is seen twice or by two ranks
    r0 = {i for s in rank_seq[0][:12] for i in s}
    r1 = {i for s in rank_seq[1][:12] for i in s}
    assert len(r0) == 48 and len(r1) == 48 and not r0 & r1
    assert ranks[0].state_dict() == ranks[1].state_dict() == dp1.state_dict() == {"consumed_samples": 240}


def test_resume_gives_the_identical_next_batch(dataset):
    for stop in (3, 25):  # mid-epoch, and just after an epoch boundary (25 x 4 = 100, 26 x 4 > 101)
        full = build_loader(dataset, 4, 1, 2, seed=3)
        for _ in range(stop):
            next(full)
        state = full.state_dict()
        expected = [next(full) for _ in range(3)]
        resumed = build_loader(dataset, 4, 1, 2, seed=3, consumed_samples=state["consumed_samples"])
        other = build_loader(dataset, 4, 1, 2, seed=3)
        other.load_state_dict(state)
        for want in expected:
            for got in (next(resumed), next(other)):
                assert want.keys() == got.keys()
                assert all(torch.equal(want[k], got[k]) for k in want)


def test_each_epoch_is_a_fresh_permutation(dataset):
    loader = build_loader(dataset, 1, 0, 1, seed=0)
    e0 = [_ids(next(loader))[0] for _ in range(101)]
    e1 = [_ids(next(loader))[0] for _ in range(101)]
    assert sorted(e0) == sorted(e1) == list(range(101)) and e0 != e1
    plain = build_loader(dataset, 1, 0, 1, seed=0, shuffle=False)
    assert [_ids(next(plain))[0] for _ in range(5)] == [0, 1, 2, 3, 4]
    seed1 = build_loader(dataset, 1, 0, 1, seed=1)
    assert [_ids(next(seed1))[0] for _ in range(101)] != e0


def _rank_builds_cache(text_path: str, cache: str) -> tuple:
    """Both ranks reach the cache at the same moment (barrier); report whether this one tokenized."""
    import torch.distributed as dist

    from ironcore.data.cache import cached_dataset
    from ironcore.data.tokenizer import GPT2Tokenizer

    os.environ["IRONCORE_CACHE_DIR"] = cache
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("ironcore.data.cache").addHandler(handler)
    logging.getLogger("ironcore.data.cache").setLevel(logging.INFO)
    dist.init_process_group("gloo")
    tok = GPT2Tokenizer()
    dist.barrier()
    prefix = cached_dataset(Path(text_path), "gpt2", "gpt2", tok, "pretrain")
    data = IndexedDataset(prefix)
    built = any("tokenizing" in r.getMessage() for r in records)
    return built, prefix, data.num_tokens, int(np.asarray(data.tokens, dtype=np.int64).sum())


def test_cache_is_built_once_when_ranks_start_together(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"Paragraph {i} says something about item {i * 7}.\nAnd more.\n\n" for i in range(20000)))
    results = run_distributed(_rank_builds_cache, 2, str(text), str(tmp_path / "cache"), timeout=120)
    assert sorted(r[0] for r in results) == [False, True]  # exactly one rank tokenized
    assert results[0][1:] == results[1][1:]  # both read the same complete dataset
    assert results[0][2] > 20000
    assert not list((tmp_path / "cache").glob("*.tmp*"))
