"""The multi-process harness itself: results come back in rank order, failures and hangs surface."""

import pytest
import torch
import torch.distributed as dist

from tests.multiproc import run_distributed


def _all_reduce_rank() -> float:
    dist.init_process_group("gloo")
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return t.item()


def _fail_on_rank_one() -> None:
    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        raise ValueError("planted failure")
    dist.barrier()


def test_all_reduce_sums_over_ranks():
    assert run_distributed(_all_reduce_rank, 3) == [6.0, 6.0, 6.0]


def test_failure_on_one_rank_is_reported_not_hung():
    with pytest.raises(AssertionError, match=r"(?s)rank 1 failed.*planted failure"):
        run_distributed(_fail_on_rank_one, 2, timeout=60)
