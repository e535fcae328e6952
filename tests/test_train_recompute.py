"""Activation recompute (full and selective) changes memory, never numerics: with dropout on
(attention dropout draws from the TP RNG tracker) the loss and every gradient equal the run
without recompute, and parameter names are unchanged."""

import pytest
import torch

from ironcore.config import Config
from ironcore.model import build_model
from ironcore.parallel.random import get_rng_tracker
from ironcore.parallel.state import ParallelState
from ironcore.training.recompute import apply_activation_recompute


def _loss_and_grads(recompute: bool, strategy: str = "default"):
    cfg = Config()
    m = cfg.model
    m.d_model, m.d_ffn, m.num_layers, m.num_attention_heads, m.max_seq_len = 64, 128, 2, 4, 16
    m.dropout_embd = m.dropout_attn = m.dropout_mlp = 0.2
    m.precision = "float32"
    cfg.operation.activation_recompute, cfg.operation.recompute_strategy = recompute, strategy
    model = build_model(cfg, ParallelState(), vocab_size=300)  # seeds torch and the TP tracker
    wrapped = apply_activation_recompute(model, cfg.operation)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    tracker_before = get_rng_tracker().get_states()["model-parallel-rng"].clone()
    loss = model(ids, labels=ids.roll(-1, dims=1)).mean()
    loss.backward()
    tracker_after = get_rng_tracker().get_states()["model-parallel-rng"]
    assert not torch.equal(tracker_before, tracker_after)  # attention dropout did use the tracker
    return wrapped, loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, tracker_after


@pytest.mark.parametrize("strategy", ["default", "optimized"])
def test_recompute_matches_no_recompute_with_dropout(strategy):
    _, ref_loss, ref_grads, ref_tracker = _loss_and_grads(False)
    wrapped, loss, grads, tracker = _loss_and_grads(True, strategy)
    assert wrapped == 2
    assert loss == ref_loss
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=1e-6, msg=name)
    # After backward the tracker is where a run without recompute leaves it: the replay did not
    # advance the stream a second time.
    assert torch.equal(tracker, ref_tracker)


def test_recompute_off_wraps_nothing():
    cfg = Config()
    model = torch.nn.Module()
    assert apply_activation_recompute(model, cfg.operation) == 0
    cfg.operation.activation_recompute = True
    with pytest.raises(TypeError, match="model.layers"):
        apply_activation_recompute(model, cfg.operation)
