"""DDP / FSDP2 wrapping (`ironcore.parallel.data_parallel`) with the real GPT model on 2 gloo ranks.

FSDP over DP = 2 with gradient accumulation 2 must take exactly the steps DP = 1 takes with
accumulation 4 (fp32, every sharding strategy), skip the gradient reduction on all but the last
micro-batch, and save checkpoints (full: single-file; sharded: DCP) that FSDP on another mesh and a
plain (non-FSDP) TP = 1 run load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy

from ironcore import cli
from ironcore.config import Config, ConfigError
from ironcore.config.validate import validate_config
from ironcore.parallel import data_parallel
from ironcore.parallel.data_parallel import gather_full_tensors, mixed_precision_policy, no_sync, wrap_data_parallel
from ironcore.parallel.mesh import mesh_shape
from ironcore.parallel.state import ParallelState, destroy_distributed, init_distributed
from tests.multiproc import run_distributed

VOCAB, SEQ, MICRO, ACCUM, STEPS = 512, 16, 2, 2, 2


def _config(strategy: str = "full", use_fsdp: bool = True) -> Config:
    cfg = Config()
    m = cfg.model
    m.d_model, m.d_ffn, m.num_layers, m.num_attention_heads, m.max_seq_len = 64, 128, 2, 4, SEQ
    m.precision, m.dropout_embd, m.dropout_attn, m.dropout_mlp = "float32", 0.0, 0.0, 0.0
    cfg.trainer.vocab_padding_unit = 64
    cfg.optim.max_lr = 1e-2
    cfg.parallel.use_fsdp, cfg.parallel.fsdp_sharding_strategy = use_fsdp, strategy
    cfg.parallel.fsdp_mixed_precision = "fp32"
    return cfg


def _micro_batches(total: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=g) for _ in range(total)]


def _loss(model, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens[:, :-1], labels=tokens[:, 1:]).mean()


def _train(model, optimizer, batches: list[torch.Tensor], accumulation: int, params,
           grads_seen: Optional[list] = None) -> list[float]:
    """`len(batches) / accumulation` optimizer steps; clips by the (DTensor-aware) global norm.
    `grads_seen` receives, after each backward, whether any parameter holds a (reduced) gradient."""
    from ironcore.observe import metrics

    losses = []
    for start in range(0, len(batches), accumulation):
        total = 0.0
        for i in range(accumulation):
            with no_sync(model) if i < accumulation - 1 else torch.enable_grad():
                loss = _loss(model, batches[start + i]) / accumulation
                loss.backward()
            if grads_seen is not None:
                grads_seen.append(any(p.grad is not None for p in model.parameters()))
            total += loss.item()
        metrics.clip_grad_norm_(params, 0.05)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


def _numpy(tree):
    """Tensors as numpy arrays: results cross the process boundary by value (a tensor would be
    shared memory that dies with the worker)."""
    if isinstance(tree, dict):
        return {k: _numpy(v) for k, v in tree.items()}
    return tree.numpy() if isinstance(tree, torch.Tensor) else tree


def _build(cfg: Config, pstate: ParallelState):
    from ironcore.model import build_model
    from ironcore.training.optimizer import build_optimizer

    model = wrap_data_parallel([build_model(cfg, pstate, VOCAB)], cfg, pstate)[0]
    return model, build_optimizer(model, cfg.optim, pstate.device)


def _reference() -> tuple[list[float], dict]:
    """DP = 1, accumulation 4: the steps DP = 2 with accumulation 2 must reproduce."""
    cfg = _config(use_fsdp=False)
    model, optimizer = _build(cfg, ParallelState())
    losses = _train(model, optimizer, _micro_batches(2 * ACCUM * STEPS), 2 * ACCUM, list(model.parameters()))
    return losses, {k: v.clone() for k, v in model.state_dict().items()}


def _fsdp_worker(variants: list[str]) -> dict:

    out = {}
    for variant in variants:
        strategy, _, offload = variant.partition("+")
        cfg = _config(strategy)
        cfg.parallel.fsdp_offload_params = offload == "offload"
        pstate = init_distributed(cfg)
        model, optimizer = _build(cfg, pstate)
        assert data_parallel.is_fsdp(model) and data_parallel.reduces_gradients(model)
        # DP rank r takes the r-th micro-batch of each pair, as the loader splits a global draw.
        batches = _micro_batches(2 * ACCUM * STEPS)[pstate.dp_rank::2]
        seen: list[bool] = []
        local = _train(model, optimizer, batches, ACCUM, list(model.parameters()), seen)
        losses = torch.tensor(local)
        torch.distributed.all_reduce(losses)
        shards = {n: type(p).__name__ for n, p in model.named_parameters()}
        full = gather_full_tensors(get_model_state_dict(model), keep=pstate.rank == 0)
        out[variant] = {"losses": (losses / 2).tolist(), "state": _numpy(full), "param_types": shards, "seen": seen,
                         "mesh": tuple(model.layers[0].parameters().__next__().device_mesh.shape)}
    return out


def test_fsdp_dp2_equals_dp1_with_twice_the_accumulation_and_syncs_only_the_last_micro_batch():
    # hybrid: one node of 2 ranks; full+offload: CPU offload (a no-op move on CPU, still its code path)
    meshes = {"full": (2,), "no_shard": (2, 1), "hybrid": (1, 2), "full+offload": (2,)}
    results = run_distributed(_fsdp_worker, 2, list(meshes))
    ref_losses, ref_state = _reference()
    for strategy, mesh in meshes.items():
        rank0 = results[0][strategy]
        assert rank0["mesh"] == mesh
        assert set(rank0["param_types"].values()) == {"DTensor"}
        assert results[1][strategy]["state"] == {}  # full state dict gathered on rank 0 only
        # No gradient reduction (so no sharded .grad) until the last micro-batch of each step.
        assert rank0["seen"] == [False, True] * STEPS
        assert rank0["losses"] == pytest.approx(ref_losses, abs=1e-5)
        assert rank0["state"].keys() == ref_state.keys()
        for name, ref in ref_state.items():
            torch.testing.assert_close(torch.from_numpy(rank0["state"][name]), ref, atol=1e-5, rtol=0,
                                       msg=f"{strategy}: {name}")
    assert ref_losses[0] != pytest.approx(ref_losses[1], abs=1e-3)  # the model did move


def _full_state(model, optimizer) -> dict:
    keep = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    weights = gather_full_tensors(get_model_state_dict(model), keep)
    optim = gather_full_tensors(get_optimizer_state_dict(model, optimizer), keep)
    return {"weights": _numpy(weights), "optim": _numpy(optim.get("state", {}))}


def _checkpoint_worker(path: str, state_dict_type: str) -> dict:
    """Train a step with FSDP, save, and load the checkpoint into FSDP on another mesh (no_shard)."""
    from ironcore.checkpoint.io import load_checkpoint, save_checkpoint

    cfg = _config("full")
    cfg.trainer.model_path = path
    cfg.parallel.fsdp_state_dict_type = state_dict_type
    cfg.operation.save_dist_ckpt = state_dict_type == "sharded"
    pstate = init_distributed(cfg)
    model, optimizer = _build(cfg, pstate)
    _train(model, optimizer, _micro_batches(2 * ACCUM)[pstate.dp_rank::2], ACCUM, list(model.parameters()))
    save_checkpoint(cfg, pstate, 1, model, optimizer, None, None, {"consumed_samples": 8})
    saved = {**_full_state(model, optimizer), "loss": _loss(model, _micro_batches(5)[-1]).item()}
    cfg.parallel.fsdp_sharding_strategy = "no_shard"
    other, other_optimizer = _build(cfg, pstate)
    load_checkpoint(cfg, pstate, other, other_optimizer, None, None)
    saved["reloaded"] = _full_state(other, other_optimizer)
    return saved


def _assert_same_state(state: dict, saved: dict) -> None:
    assert state["weights"].keys() == saved["weights"].keys() and state["optim"].keys() == saved["optim"].keys()
    for name, value in saved["weights"].items():
        torch.testing.assert_close(torch.as_tensor(state["weights"][name]), torch.as_tensor(value), atol=0, rtol=0,
                                   msg=name)
    for name, moments in saved["optim"].items():
        for key, value in moments.items():
            torch.testing.assert_close(torch.as_tensor(state["optim"][name][key]), torch.as_tensor(value),
                                       atol=0, rtol=0, msg=f"{name}.{key}")


@pytest.mark.parametrize("state_dict_type", ["full", "sharded"])
def test_fsdp_checkpoint_loads_into_fsdp_and_into_a_plain_tp1_run(tmp_path, state_dict_type):
    from ironcore.checkpoint.io import load_checkpoint

    saved = run_distributed(_checkpoint_worker, 2, str(tmp_path), state_dict_type)[0]
    assert (tmp_path / "iter_0000001" / "dist" / ".metadata").is_file() == (state_dict_type == "sharded")
    _assert_same_state(saved["reloaded"], saved)  # FSDP -> FSDP on a (2, 1) mesh
    cfg = _config(use_fsdp=False)
    cfg.trainer.model_path = str(tmp_path)
    pstate = init_distributed(cfg)  # one process (the distributed format loads through a process group)
    try:
        model, optimizer = _build(cfg, pstate)
        resumed = load_checkpoint(cfg, pstate, model, optimizer, None, None)
        assert (resumed["iteration"], resumed["data_state"]) == (1, {"consumed_samples": 8})
        _assert_same_state(_full_state(model, optimizer), saved)
        assert _loss(model, _micro_batches(5)[-1]).item() == pytest.approx(saved["loss"], abs=1e-6)
    finally:
        destroy_distributed()


# --------------------------------------------------------------------------------------------
# Without processes: policies, mesh shapes, config rules


def test_mixed_precision_policies():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert mixed_precision_policy("fp32", "bfloat16", cpu) == MixedPrecisionPolicy()
    assert mixed_precision_policy("bf16", "float32", cpu) == MixedPrecisionPolicy(torch.bfloat16, torch.bfloat16)
    assert mixed_precision_policy("fp16", "float16", cuda) == MixedPrecisionPolicy(torch.float16, torch.float16)
    assert mixed_precision_policy("mixed", "bfloat16", cpu) == MixedPrecisionPolicy(torch.bfloat16, torch.float32)
    assert mixed_precision_policy("mixed", "float32", cuda) == MixedPrecisionPolicy(torch.bfloat16, torch.float32)
    assert mixed_precision_policy("mixed", "float32", cpu) == MixedPrecisionPolicy(None, torch.float32)


def test_hybrid_mesh_shards_within_a_node_and_refuses_uneven_nodes(monkeypatch):
    cfg = _config("hybrid")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert mesh_shape(cfg, 16).sizes == (1, 2, 8, 1, 1)  # (pp, dp_replicate, dp_shard, cp, tp)
    cfg.trainer.tensor_model_parallel_size = 2  # a node holds 4 data-parallel ranks of TP pairs
    assert mesh_shape(cfg, 16).sizes == (1, 2, 4, 1, 2)
    cfg.trainer.tensor_model_parallel_size = 1
    cfg.parallel.fsdp_sharding_strategy = "full"
    assert mesh_shape(cfg, 16).sizes == (1, 1, 16, 1, 1)
    cfg.parallel.use_fsdp = False  # DDP replicates
    assert mesh_shape(cfg, 16).sizes == (1, 16, 1, 1, 1)
    cfg.parallel.use_fsdp, cfg.parallel.fsdp_sharding_strategy = True, "hybrid"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="data-parallel size 6 and the 4 data-parallel ranks per node"):
        mesh_shape(cfg, 6)


def test_wrap_without_data_parallelism_returns_the_model_unchanged():
    cfg = _config(use_fsdp=False)
    model, _ = _build(cfg, ParallelState())
    assert type(model).__name__ == "GPTModel" and not data_parallel.reduces_gradients(model)


@pytest.mark.parametrize("overrides, message", [
    ({"parallel.use_distributed_optimizer": True}, "FSDP already shards the optimizer state"),
    ({"parallel.fsdp_state_dict_type": "sharded"}, "operation.save_dist_ckpt = false"),
    ({"operation.save_dist_ckpt": True}, "operation.save_dist_ckpt = true"),
    ({"parallel.fsdp_mixed_precision": "fp16"}, "model.precision"),
])
def test_unsupported_fsdp_combinations_are_rejected_naming_the_keys(overrides, message, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = Config()
    cfg.parallel.use_fsdp, cfg.parallel.world_size = True, 4
    for key, value in overrides.items():
        group, name = key.split(".")
        setattr(getattr(cfg, group), name, value)
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    assert any(message in e and "parallel.use_fsdp" in e for e in info.value.errors), info.value.errors


def test_the_seeds_local_state_dict_type_is_not_offered(capsys):
    example = Path(__file__).resolve().parent.parent / "example.yaml"
    assert cli.main(["config", str(example), "parallel.use_fsdp=true", "parallel.fsdp_state_dict_type=local"]) == 2
    assert ("parallel.fsdp_state_dict_type = 'local' (set by a command-line override): must be one of 'full', "
            "'sharded'") in capsys.readouterr().err
