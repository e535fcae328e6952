"""GPU paths: skipped on CPU machines (CI), exercised wherever CUDA is present.

The CPU suite tests the logic of each of these paths; here the CUDA-only pieces run for real:
bf16 autocast on the GPU, flash-attn against SDPA (when flash-attn is installed), the MFU peak of
the detected GPU, and NCCL tensor parallelism (with two or more GPUs).
"""

from __future__ import annotations

import pytest
import torch

from ironcore.config.schema import Config
from ironcore.model.gpt import build_model
from ironcore.observe import metrics
from ironcore.parallel.state import ParallelState
from tests.multiproc import run_distributed

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
VOCAB = 1000


def _config(**model) -> Config:
    cfg = Config()
    m = cfg.model
    m.d_model, m.d_ffn, m.num_layers, m.num_attention_heads, m.max_seq_len = 256, 1024, 2, 4, 256
    m.dropout_embd = m.dropout_attn = m.dropout_mlp = 0.0
    for key, value in model.items():
        setattr(m, key, value)
    return cfg


def _batch(device: str, seq: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, seq + 1), generator=gen)
    return ids[:, :-1].to(device), ids[:, 1:].to(device)


def test_bf16_autocast_on_gpu_tracks_fp32():
    cfg = _config()
    model = build_model(cfg, ParallelState(device=torch.device("cuda")), VOCAB)
    inputs, labels = _batch("cuda")
    with torch.no_grad():
        fp32 = model(inputs, labels=labels).mean().item()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model(inputs, labels=labels)
    assert bf16.dtype == torch.float32  # the loss is computed in fp32 even under autocast
    assert bf16.mean().item() == pytest.approx(fp32, abs=2e-2)


def test_flash_attn_matches_sdpa():
    pytest.importorskip("flash_attn")
    inputs, labels = _batch("cuda")
    losses = {}
    for flash in (True, False):
        cfg = _config(num_attention_groups=2)
        cfg.trainer.use_flash_attn = flash
        model = build_model(cfg, ParallelState(device=torch.device("cuda")), VOCAB)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            losses[flash] = model(inputs, labels=labels).mean().item()
    assert losses[True] == pytest.approx(losses[False], abs=1e-2)


def test_detected_gpu_has_a_dense_bf16_peak_or_says_unknown():
    name = torch.cuda.get_device_name(0)
    peak = metrics.device_peak_flops(torch.device("cuda"))
    expected = metrics.gpu_peak_tflops(name)
    assert peak == (None if expected is None else expected * 1e12)


def _tp2_loss_over_nccl() -> float:
    from ironcore.parallel.state import init_distributed

    cfg = _config()
    cfg.parallel.dist_backend = "nccl"
    cfg.trainer.tensor_model_parallel_size = 2
    pstate = init_distributed(cfg)
    assert pstate.backend == "nccl" and pstate.device.type == "cuda"
    model = build_model(cfg, pstate, VOCAB)
    inputs, labels = _batch(str(pstate.device))
    with torch.no_grad():
        return model(inputs, labels=labels).mean().item()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tp2_over_nccl_matches_one_gpu():
    reference = build_model(_config(), ParallelState(device=torch.device("cuda")), VOCAB)
    inputs, labels = _batch("cuda")
    with torch.no_grad():
        want = reference(inputs, labels=labels).mean().item()
    assert run_distributed(_tp2_loss_over_nccl, 2) == pytest.approx([want, want], abs=1e-4)
