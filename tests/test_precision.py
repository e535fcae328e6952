"""fp16 loss scaling across ranks: every rank skips together when any rank overflowed, and the
scaler works with the fused AdamW the trainer uses."""

import torch
import torch.distributed as dist

from ironcore.training.precision import DistributedGradScaler, build_grad_scaler
from tests.multiproc import run_distributed


def _one_rank_overflows() -> list[tuple[float, float, float]]:
    """Two steps on a replicated weight; on step 1 only rank 1's gradient is inf."""
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)
    scaler = build_grad_scaler("float16", torch.device("cpu"))
    assert isinstance(scaler, DistributedGradScaler)
    history = []
    for step in range(2):
        optimizer.zero_grad()
        scaler.scale(weight.sum()).backward()
        if step == 1 and dist.get_rank() == 1:
            weight.grad[0] = float("inf")
        scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
        history.append((weight[0].item(), weight[1].item(), scaler.get_scale()))
    return history


def test_overflow_on_one_rank_skips_the_step_on_every_rank():
    rank0, rank1 = run_distributed(_one_rank_overflows, 2)
    assert rank0 == rank1  # same weights and same scale on both ranks after every step
    (w_after_first, _, scale_first), (w_after_second, _, scale_second) = rank0
    assert w_after_first < 1.0  # the first step was taken (fused AdamW accepted the scaler's flags)
    assert w_after_second == w_after_first  # the overflow step was skipped everywhere
    assert scale_second == scale_first / 2  # and the scale halved everywhere
