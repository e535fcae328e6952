"""Pipeline parallelism is exact: PP=2 and PP=4 (real gloo processes) reproduce one process.

Two spawns (start-up dominates on 2 cores), each running every check for its world size:

- 2 ranks: GPT (tied embeddings) and LLaMA (untied) with GPipe, 1F1B and interleaved 1F1B give the
  single-process loss trajectory over 5 Adam steps to 1e-5; 1F1B's first stage holds at most p
  micro-batches of activations, GPipe's all m (counter); an explicit layer split gives the same
  losses; fewer micro-batches than stages and a stage that raises end every rank with a clear
  message within a short ``timeout_minute``.
- 4 ranks: PP=4 (the three schedules, both models), TP=2 × PP=2 (with sequence parallelism) and
  PP=2 × DP=2 against the same single-process runs.

The reference is a plain loop in this process (no ``torch.distributed``): forward, masked mean loss,
``backward(loss / m)`` per micro-batch, clip to 1.0, Adam.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from ironcore.config.schema import Config, ModelConfig, PositionalEmbeddingConfig
from ironcore.model import batch_inputs
from ironcore.model.gpt import build_model, model_stages
from ironcore.training.tied_embedding import build_embedding_group, sync_tied_embedding_grads
from ironcore.observe.metrics import clip_grad_norm_
from ironcore.parallel import pipeline
from ironcore.parallel.mesh import MeshShape
from ironcore.parallel.state import ParallelState, build_parallel_state
from tests.multiproc import run_distributed

EXAMPLE = str(Path(__file__).resolve().parents[1] / "example.yaml")
VOCAB, BATCH, SEQ, STEPS, LR = 300, 2, 8, 5, 3e-3
LAYERS = 8  # divisible by 4 stages × 2 virtual stages


def _gpt() -> ModelConfig:
    return ModelConfig(d_model=32, d_ffn=64, num_layers=LAYERS, num_attention_heads=4, max_seq_len=16,
                       precision="float32", activation_type="gelu_tanh", dropout_embd=0.0, dropout_attn=0.0,
                       dropout_mlp=0.0)


def _llama() -> ModelConfig:
    return ModelConfig(d_model=32, d_ffn=48, num_layers=LAYERS, num_attention_heads=4, num_attention_groups=2,
                       max_seq_len=16, precision="float32", ln_type="rmsnorm", ln_eps=1e-6,
                       activation_type="swiglu", no_bias=True, untie_embed=True, dropout_embd=0.0,
                       dropout_attn=0.0, dropout_mlp=0.0,
                       positional_embedding=PositionalEmbeddingConfig(type="rope"))


MODELS = {"gpt": _gpt, "llama": _llama}


def _config(model: str, tp: int = 1, pp: int = 1, sequence_parallel: bool = False) -> Config:
    cfg = Config(model=MODELS[model]())
    cfg.trainer.tensor_model_parallel_size, cfg.trainer.pipeline_model_parallel_size = tp, pp
    cfg.parallel.sequence_parallel = sequence_parallel
    cfg.parallel.dist_backend = "gloo"
    return cfg


def _batch(step: int, index: int) -> dict[str, torch.Tensor]:
    """Micro-batch `index` (the same at every step, so the loss falls): two packed documents in
    row 0 (positions restart), a partial loss mask, so position_ids/segment_ids must reach every
    stage."""
    gen = torch.Generator().manual_seed(index)
    return dict(input_ids=torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen),
                labels=torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen),
                loss_mask=(torch.rand(BATCH, SEQ, generator=gen) > 0.2).float(),
                position_ids=torch.tensor([list(range(5)) + list(range(3)), list(range(SEQ))]),
                segment_ids=torch.tensor([[0] * 5 + [1] * 3, [0] * SEQ]))


def _masked_mean(per_token: torch.Tensor, batch: dict) -> torch.Tensor:
    mask = batch["loss_mask"]
    return (per_token.float() * mask).sum() / mask.sum()


def _reference(model: str, microbatches: int) -> list[float]:
    """Single process, no torch.distributed: the loss of each of STEPS steps."""
    net = build_model(_config(model), ParallelState(), VOCAB)
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        total = 0.0
        for i in range(microbatches):
            batch = _batch(step, i)
            loss = _masked_mean(net(batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"],
                                    segment_ids=batch["segment_ids"]), batch)
            (loss / microbatches).backward()
            total += loss.item() / microbatches
        clip_grad_norm_(list(net.parameters()), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses


# --------------------------------------------------------------------------------------------- ranks


def _chunks(cfg: Config, pstate: ParallelState, virtual: int, layer_split=None) -> list:
    """This rank's model chunks."""
    cfg.parallel.virtual_pipeline_stages, cfg.parallel.pipeline_layer_split = virtual, layer_split
    return [build_model(cfg, pstate, VOCAB, stage) for stage in model_stages(cfg, pstate)]


def _train(model: str, pstate: ParallelState, schedule: str, microbatches: int, virtual: int = 1,
           sequence_parallel: bool = False, layer_split=None, stats: dict | None = None) -> list[float]:
    """STEPS steps at this layout; returns the DP-averaged loss per step (on every rank)."""
    cfg = _config(model, pstate.tp_size, pstate.pp_size, sequence_parallel)
    chunks = _chunks(cfg, pstate, virtual, layer_split)
    params = [p for c in chunks for p in c.parameters()]
    opt = torch.optim.Adam(params, lr=LR)
    embedding_group = build_embedding_group(pstate, not cfg.model.untie_embed)
    losses = []
    for step in range(STEPS):
        data = (_batch(step, pstate.dp_rank * microbatches + i) for i in range(microbatches))
        step_stats: dict = {}
        per_mb = pipeline.forward_backward(schedule, chunks, data, microbatches, pstate, _masked_mean,
                                           hidden_size=cfg.model.d_model, sequence_parallel=sequence_parallel,
                                           forward_step=_forward_step, stats=step_stats)
        assert len(per_mb) == (microbatches if pstate.is_last_stage else 0)
        if stats is not None:
            stats["max_in_flight"] = max(stats.get("max_in_flight", 0), step_stats["max_in_flight"])
        for c in chunks:
            c.sync_sequence_parallel_grads()
        pipeline.finalize_model_grads(chunks, pstate)
        sync_tied_embedding_grads(chunks, pstate, embedding_group)
        clip_grad_norm_(params, 1.0, pstate.tp_group, pstate.pp_group)
        opt.step()
        opt.zero_grad()
        loss = pipeline.last_stage_mean(per_mb, pstate, pstate.device)
        if pstate.dp_group is not None:
            torch.distributed.all_reduce(loss, group=pstate.dp_group)
        losses.append(loss.item() / pstate.dp_size)
    return losses


def _grid(tp: int, pp: int) -> ParallelState:
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    shape = MeshShape(pp=pp, dp_replicate=world // (tp * pp), tp=tp)
    return build_parallel_state(shape, rank, rank, torch.device("cpu"), "gloo")


def _init() -> None:
    torch.distributed.init_process_group("gloo")


def _errors_within(fn, seconds: float) -> str:
    """Run `fn`, which must raise; return its message (and check it came quickly)."""
    start = time.monotonic()
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the message is what the test checks
        assert time.monotonic() - start < seconds, f"took {time.monotonic() - start:.1f}s: {e}"
        return f"{type(e).__name__}: {e}"
    raise AssertionError("expected an error")


def _raising_step(model, batch, hidden_states):
    if hidden_states is not None:  # the second stage fails on its first micro-batch
        raise RuntimeError("boom in a stage")
    return _forward_step(model, batch, hidden_states)


def _forward_step(model, batch, hidden_states):
    return model(**batch_inputs(batch, torch.device("cpu")), hidden_states=hidden_states)


def _two_ranks(microbatches: int) -> dict:
    _init()
    pstate = _grid(1, 2)
    out: dict = {}
    for model in MODELS:
        for schedule, virtual in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2)):
            stats: dict = {}
            out[model, schedule] = _train(model, pstate, schedule, microbatches, virtual, stats=stats)
            out["in_flight", model, schedule] = stats["max_in_flight"]
    out["gpt", "split"] = _train("gpt", pstate, "1f1b", microbatches, layer_split=[3, 5])

    # Evaluation (forward only) of the initial weights: any micro-batch count, any schedule.
    for schedule, virtual, count in (("interleaved", 2, microbatches), ("1f1b", 1, 1)):
        cfg = _config("gpt", pp=2)
        with torch.no_grad():
            losses = pipeline.forward_backward(schedule, _chunks(cfg, pstate, virtual),
                                               (_batch(0, i) for i in range(count)), count, pstate, _masked_mean,
                                               hidden_size=32, forward_step=_forward_step, forward_only=True)
        assert len(losses) == (count if pstate.is_last_stage else 0)
        out["eval", schedule] = pipeline.last_stage_mean(losses, pstate, pstate.device).item()

    # Fewer micro-batches than stages: every rank refuses before any transfer.
    cfg = _config("gpt", pp=2)
    chunks = _chunks(cfg, pstate, 1)
    too_few = lambda: pipeline.forward_backward(  # noqa: E731
        "1f1b", chunks, iter([_batch(0, 0)]), 1, pstate, _masked_mean, hidden_size=32, forward_step=_forward_step)
    out["too_few"] = _errors_within(too_few, 1.0)
    # A stage that raises: it reports itself, its neighbour gives up after the (short) timeout.
    timeout_minute = 0.05  # 3 seconds
    raising = lambda: pipeline.forward_backward(  # noqa: E731
        "1f1b", chunks, (_batch(0, i) for i in range(4)), 4, pstate, _masked_mean, hidden_size=32,
        forward_step=_raising_step, timeout_minute=timeout_minute)
    out["raising"] = _errors_within(raising, 60 * timeout_minute + 10)
    return out


def _four_ranks(microbatches: int) -> dict:
    _init()
    out: dict = {}
    pstate = _grid(1, 4)
    for model in MODELS:
        for schedule, virtual in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2)):
            out["pp4", model, schedule] = _train(model, pstate, schedule, microbatches, virtual)
    pstate = _grid(2, 2)
    out["tp2pp2", "gpt"] = _train("gpt", pstate, "1f1b", microbatches, sequence_parallel=True)
    out["tp2pp2", "llama"] = _train("llama", pstate, "interleaved", microbatches, virtual=2)
    pstate = _grid(1, 2)  # DP = 2
    out["pp2dp2", "gpt"] = _train("gpt", pstate, "1f1b", microbatches // 2)
    return out


M = 4  # micro-batches per step (per DP rank: 2 at PP=2 × DP=2)


@pytest.fixture(scope="module")
def reference() -> dict:
    return {model: _reference(model, M) for model in MODELS}


def _close(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want) == STEPS
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-5, (got, want)


def test_two_stages_match_one_process(reference):
    results = run_distributed(_two_ranks, 2, M, timeout=240)
    for rank_out in results:  # every rank reports the same (last stage's) loss
        for model in MODELS:
            for schedule in ("gpipe", "1f1b", "interleaved"):
                _close(rank_out[model, schedule], reference[model])
        _close(rank_out["gpt", "split"], reference["gpt"])
        assert abs(rank_out["eval", "interleaved"] - reference["gpt"][0]) < 1e-5  # the loss before any update
        assert rank_out["eval", "1f1b"] > 0
        assert "at least as many micro-batches as stages" in rank_out["too_few"]
        assert "gradient_accumulation_steps is 1" in rank_out["too_few"]
    # The losses fall, so matching them checks every update.
    assert all(ref[0] - ref[-1] > 0.05 for ref in reference.values()), reference
    first, last = results
    for model in MODELS:
        # 1F1B: the first of p stages holds at most p micro-batches; GPipe holds all m.
        assert first["in_flight", model, "1f1b"] == 2 and last["in_flight", model, "1f1b"] == 1
        assert first["in_flight", model, "gpipe"] == last["in_flight", model, "gpipe"] == M
    assert "pipeline stage 1 (rank 1) failed in the forward of micro-batch 0" in last["raising"]
    assert "boom in a stage" in last["raising"]
    assert "pipeline stage 0 (rank 0): transfer with rank(s) [1]" in first["raising"]
    assert "a neighbouring stage probably failed" in first["raising"]


def test_four_ranks_match_one_process(reference):
    out = run_distributed(_four_ranks, 4, M, timeout=300)[0]
    for model in MODELS:
        for schedule in ("gpipe", "1f1b", "interleaved"):
            _close(out["pp4", model, schedule], reference[model])
        _close(out["tp2pp2", model], reference[model])
    _close(out["pp2dp2", "gpt"], reference["gpt"])


def test_stage_partitioning():
    stages = pipeline.pipeline_stages(8, 2, 1, virtual_stages=2)
    assert [(s.index, s.layer_start, s.layer_end) for s in stages] == [(1, 2, 4), (3, 6, 8)]
    assert stages[1].is_last and not stages[0].is_first
    split = pipeline.pipeline_stages(8, 2, 0, layer_split=[3, 5])
    assert [(s.layer_start, s.layer_end, s.is_first) for s in split] == [(0, 3, True)]
    with pytest.raises(ValueError, match=r"model.num_layers \(6\) is not divisible .* \(4 = "):
        pipeline.pipeline_stages(6, 2, 0, virtual_stages=2)
    with pytest.raises(ValueError, match=r"sums to 7, but model.num_layers is 8"):
        pipeline.pipeline_stages(8, 2, 0, layer_split=[3, 4])
    with pytest.raises(ValueError, match=r"must list 2 non-negative layer counts"):
        pipeline.pipeline_stages(8, 2, 0, layer_split=[8])
    with pytest.raises(ValueError, match=r"only the first and last stages"):
        pipeline.pipeline_stages(8, 3, 0, layer_split=[4, 0, 4])
    with pytest.raises(ValueError, match=r"interleaved needs .* multiple of"):
        pipeline.check_schedule("interleaved", 2, 2, 3)
    with pytest.raises(ValueError, match=r"virtual_pipeline_stages > 1 .* needs parallel.pipeline_schedule"):
        pipeline.check_schedule("1f1b", 2, 2, 4)
    with pytest.raises(ValueError, match=r"allowed: 1f1b, gpipe, interleaved"):
        pipeline.check_schedule("zero-bubble", 2, 1, 4)


def test_config_keys_are_validated(monkeypatch):
    from ironcore.config import ConfigError, load_config

    monkeypatch.setenv("WORLD_SIZE", "2")
    base = ["trainer.pipeline_model_parallel_size=2", "model.num_layers=4"]
    cfg = load_config(EXAMPLE, base + ["parallel.pipeline_layer_split=[1,3]"])
    assert cfg.parallel.pipeline_layer_split == [1, 3] and cfg.parallel.pipeline_schedule == "1f1b"
    cases = {
        "model.num_layers=3": "or list the layers per stage in parallel.pipeline_layer_split",
        "parallel.pipeline_layer_split=[1,2]": "summing to model.num_layers = 4",
        "parallel.pipeline_schedule=interleaved": "the interleaved schedule needs virtual_pipeline_stages >= 2",
        "parallel.pipeline_schedule=zb": "parallel.pipeline_schedule",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError) as err:
            load_config(EXAMPLE, base + [override])
        assert any(message in e for e in err.value.errors), err.value.errors
