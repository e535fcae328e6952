"""Model FLOPs formula (hand count), the GPU peak table, MFU, and TP/PP-aware global norms."""

import math

import pytest
import torch
import torch.distributed as dist

from ironcore.config.schema import ModelConfig
from ironcore.observe import metrics
from tests.multiproc import run_distributed

TINY = ModelConfig(d_model=128, d_ffn=512, num_layers=2, num_attention_heads=4, max_seq_len=128,
                   activation_type="gelu_tanh")
TINY_LLAMA = ModelConfig(d_model=128, d_ffn=352, num_layers=2, num_attention_heads=4, num_attention_groups=2,
                         max_seq_len=128, activation_type="swiglu")


def test_flops_per_token_matches_hand_count_gpt():
    # Per layer, forward, per token (d=128, f=512, 4 heads x 32, s=128):
    #   QKV 2*128*384 = 98,304; QK^T + AV 2*2*128*128 = 65,536; out proj 2*128*128 = 32,768;
    #   MLP 2*2*128*512 = 262,144  -> 458,752; two layers 917,504.
    #   LM head 2*128*50,304 = 12,877,824.  Forward 13,795,328; training x3 = 41,385,984.
    assert metrics.model_flops_per_token(TINY, vocab_size=50304, seq_len=128) == 41_385_984


def test_flops_per_token_matches_hand_count_gqa_swiglu():
    # QKV 2*128*32*(4 + 2*2) = 65,536; attention 65,536; out proj 32,768;
    # SwiGLU 3*2*128*352 = 270,336 -> 434,176 per layer; 868,352 for two; head 12,877,824;
    # forward 13,746,176; x3 = 41,238,528.
    assert metrics.model_flops_per_token(TINY_LLAMA, vocab_size=50304, seq_len=128) == 41_238_528


def test_flops_scale_with_seq_len_only_through_attention():
    delta = (metrics.model_flops_per_token(TINY, 50304, 256) - metrics.model_flops_per_token(TINY, 50304, 128))
    assert delta == 3 * 2 * (2 * 2 * 128 * 4 * 32)  # 3 x layers x (QK^T + AV) x 128 extra positions


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0),
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100-PCIE-40GB", 312.0),
    ("NVIDIA A10", 125.0),
    ("NVIDIA L4", 121.0),
    ("NVIDIA L40S", 362.0),
    ("Tesla V100-SXM2-16GB", 125.0),
])
def test_dense_bf16_peaks_of_known_gpus(name, tflops):
    assert metrics.gpu_peak_tflops(name) == tflops


@pytest.mark.parametrize("name", ["NVIDIA GeForce GTX 1080", "NVIDIA A10G", "NVIDIA L40", "Some Future GPU"])
def test_unknown_gpus_are_not_guessed(name):
    assert metrics.gpu_peak_tflops(name) is None


def test_cpu_peak_is_a_measured_and_cached_gemm_rate_per_dtype():
    first = metrics.device_peak_flops(torch.device("cpu"))
    assert 1e8 < first < 1e13
    assert metrics.device_peak_flops(torch.device("cpu"), torch.float32) == first
    bf16 = metrics.device_peak_flops(torch.device("cpu"), torch.bfloat16)
    assert 1e8 < bf16 < 1e14 and metrics.device_peak_flops(torch.device("cpu"), torch.bfloat16) == bf16
    # The ceiling is never below the fp32 rate, so a slow reduced-precision GEMM cannot push MFU past 1.
    fp16 = metrics.device_peak_flops(torch.device("cpu"), torch.float16)
    assert fp16 >= first and bf16 >= first
    assert fp16 == max(first, metrics.measured_cpu_gemm_flops(torch.float16))


def test_throughput_reports_tokens_tflops_and_mfu():
    tp = metrics.Throughput(flops_per_token=1e6, peak_flops=4e9, world_size=2)
    tp.add(3000, 0.5)
    tp.add(5000, 1.5)
    r = tp.report()
    assert r["tokens_per_s"] == 4000
    assert r["tflops_per_device"] == pytest.approx(4000 * 1e6 / 2 / 1e12, rel=1e-12)
    assert r["mfu"] == pytest.approx(0.5, rel=1e-12)
    tp.add(100, 1.0)
    assert tp.report()["tokens_per_s"] == 100  # a new window
    assert metrics.Throughput(1e6, None, 1).report()["mfu"] is None


def _norm_worker():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    split = torch.nn.Parameter(torch.zeros(3))
    split.tensor_model_parallel = True
    replicated = torch.nn.Parameter(torch.zeros(2))
    split.grad = torch.full((3,), float(rank + 1))          # rank 0: 1s, rank 1: 2s
    replicated.grad = torch.tensor([3.0, 4.0])               # identical on both TP ranks
    world = dist.group.WORLD
    as_tp = metrics.grad_norm([split, replicated], tp_group=world).item()
    # As two pipeline stages holding different layers, everything is summed over PP.
    as_pp = metrics.grad_norm([split, replicated], pp_group=world).item()
    total = metrics.clip_grad_norm_([split, replicated], 1.0, tp_group=world).item()
    clipped = metrics.grad_norm([split, replicated], tp_group=world).item()
    return as_tp, as_pp, total, clipped, replicated.grad.tolist()


def test_global_norm_counts_tp_replicated_params_once():
    results = run_distributed(_norm_worker, 2)
    tp_expected = math.sqrt(3 * 1 + 3 * 4 + 25)              # split shards summed, replicated once
    pp_expected = math.sqrt(3 * 1 + 25 + 3 * 4 + 25)         # each stage's own params, summed
    for as_tp, as_pp, total, clipped, replicated in results:
        assert as_tp == pytest.approx(tp_expected, rel=1e-6)
        assert as_pp == pytest.approx(pp_expected, rel=1e-6)
        assert total == pytest.approx(tp_expected, rel=1e-6)
        assert clipped == pytest.approx(1.0, rel=1e-5)
        assert replicated == pytest.approx([3 / tp_expected, 4 / tp_expected], rel=1e-5)


def test_shared_embedding_copy_is_not_counted_twice():
    p, copy = torch.nn.Parameter(torch.tensor([3.0, 4.0])), torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    copy.shared_embedding = True
    assert metrics.param_norm([p, copy]).item() == pytest.approx(5.0)


def test_single_process_norms_and_no_clip_below_threshold():
    p = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    p.grad = torch.tensor([0.3, 0.4])
    assert metrics.param_norm([p]).item() == pytest.approx(5.0)
    assert metrics.clip_grad_norm_([p], 1.0).item() == pytest.approx(0.5)
    assert p.grad.tolist() == pytest.approx([0.3, 0.4])  # below max_norm: untouched


def test_peak_memory_is_positive_on_cpu():
    assert metrics.peak_memory_bytes(torch.device("cpu")) > 10 * 2**20
