"""The objectives: DPO's loss, rewards and gradients against the formulas computed by hand, the
response-only sequence log-probs, the language-modeling loss, and the trainer.dpo_* config rules."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ironcore import cli
from ironcore.config.schema import Config
from ironcore.data import build_datasets, build_loader, build_tokenizer, preprocess
from ironcore.model import build_model
from ironcore.parallel.state import ParallelState
from ironcore.training.objectives import DPO, LanguageModeling, build_objective, dpo_loss, reward_metrics
from tests.train_helpers import write_config

# Hand-made sequence log-probs of three pairs (policy and reference, chosen and rejected).
PC, PR = [-5.0, -7.5, -3.0], [-6.0, -6.5, -9.0]
RC, RR = [-5.5, -6.8, -4.0], [-5.8, -6.0, -8.0]
NC, NR = [4, 7, 2], [5, 3, 6]  # response token counts (IPO averages over them)
BETA = 0.3


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# Per pair: (loss, d loss / d policy_chosen, d loss / d policy_rejected), from the formulas by hand.
def _by_hand(loss_type: str, ls: float) -> list[tuple[float, float, float]]:
    rows = []
    for pc, pr, rc, rr, nc, nr in zip(PC, PR, RC, RR, NC, NR):
        h = (pc - pr) - (rc - rr)
        if loss_type == "sigmoid":
            dh = -(1 - ls) * BETA * _sigmoid(-BETA * h) + ls * BETA * _sigmoid(BETA * h)
            rows.append((-(1 - ls) * _log_sigmoid(BETA * h) - ls * _log_sigmoid(-BETA * h), dh, -dh))
        elif loss_type == "ipo":  # the log-ratios per response token: (pc - rc) / nc - (pr - rr) / nr
            h = (pc - rc) / nc - (pr - rr) / nr
            dh = 2 * (h - 1 / (2 * BETA))
            rows.append(((h - 1 / (2 * BETA)) ** 2, dh / nc, -dh / nr))
        else:
            dh = -BETA if 1 - BETA * h > 0 else 0.0
            rows.append((max(0.0, 1 - BETA * h), dh, -dh))
    return rows


@pytest.mark.parametrize("loss_type,ls", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)])
def test_dpo_loss_rewards_and_gradients_equal_the_formulas(loss_type, ls):
    pc, pr = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (PC, PR))
    rc, rr = (torch.tensor(v, dtype=torch.float64) for v in (RC, RR))
    out = dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type=loss_type, label_smoothing=ls,
                   chosen_tokens=torch.tensor(NC, dtype=torch.float64), rejected_tokens=torch.tensor(NR, dtype=torch.float64))
    out.losses.sum().backward()
    expected = _by_hand(loss_type, ls)
    assert out.losses.tolist() == pytest.approx([loss for loss, _, _ in expected], abs=1e-12)
    assert pc.grad.tolist() == pytest.approx([g for _, g, _ in expected], abs=1e-12)
    assert pr.grad.tolist() == pytest.approx([g for _, _, g in expected], abs=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([BETA * (a - b) for a, b in zip(PC, RC)], abs=1e-12)
    assert out.rejected_rewards.tolist() == pytest.approx([BETA * (a - b) for a, b in zip(PR, RR)], abs=1e-12)


def test_reward_metrics_use_trls_names_and_count_the_pairs():
    out = dpo_loss(*(torch.tensor(v, dtype=torch.float64) for v in (PC, PR, RC, RR)), beta=BETA)
    metrics = reward_metrics(out)
    chosen = [BETA * (a - b) for a, b in zip(PC, RC)]
    rejected = [BETA * (a - b) for a, b in zip(PR, RR)]
    assert metrics["rewards/chosen"].item() == pytest.approx(sum(chosen) / 3, abs=1e-12)
    assert metrics["rewards/rejected"].item() == pytest.approx(sum(rejected) / 3, abs=1e-12)
    assert metrics["rewards/margins"].item() == pytest.approx((sum(chosen) - sum(rejected)) / 3, abs=1e-12)
    assert metrics["rewards/accuracy"].item() == pytest.approx(2 / 3)  # pair 1: reward -0.21 (chosen) < -0.15 (rejected)


def test_sequence_logps_count_response_tokens_only():
    batch = {f"{n}_{k}": v for n in ("chosen", "rejected") for k, v in (
        ("input_ids", torch.zeros(2, 4, dtype=torch.long)), ("labels", torch.zeros(2, 4, dtype=torch.long)),
        ("loss_mask", torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0]])))}
    per_token = torch.tensor([[9.0, 1.0, 2.0, 9.0], [9.0, 9.0, 3.0, 4.0],  # chosen rows: -log p
                              [9.0, 0.5, 0.5, 9.0], [9.0, 9.0, 1.0, 1.0]])  # rejected rows
    mb = DPO().model_batch(batch)
    assert set(mb) == {"input_ids", "labels", "loss_mask"} and mb["loss_mask"].shape == (4, 4)
    assert DPO().sequence_logps(per_token, mb).tolist() == [-3.0, -7.0, -1.0, -2.0]
    mb["reference_logps"] = torch.tensor([-3.0, -7.0, -1.0, -2.0])
    loss, metrics = DPO(beta=1.0).loss(per_token, mb)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7) and metrics["rewards/margins"].item() == 0.0
    # Evaluation's sums give the same loss and metrics once divided by the pair count.
    eval_loss, eval_metrics = DPO(beta=1.0).eval_metrics(DPO(beta=1.0).eval_sums(per_token, mb))
    assert eval_loss == pytest.approx(math.log(2), abs=1e-7) and eval_metrics["rewards/accuracy"] == 0.0


def _trl_dpo_loss(log_probs: torch.Tensor, completion_mask: torch.Tensor, reference: torch.Tensor,
                  loss_type: str, beta: float) -> tuple[torch.Tensor, dict]:
    """TRL's DPOTrainer loss (TRL 1.x keeps it inside `_compute_loss`, no free function) on given
    per-token log-probs: a stand-in trainer whose model returns them, with precomputed reference logps."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl import DPOTrainer

    rows = log_probs.shape[0]
    outputs = SimpleNamespace(log_probs=log_probs, entropy=torch.zeros_like(log_probs),
                              mean_logits=torch.zeros_like(log_probs), is_top1=torch.zeros_like(log_probs).bool())
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=SimpleNamespace(device="cpu", gather=lambda t: t,
                                                                           gather_for_metrics=lambda t: t),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(rows, completion_mask.shape[1], dtype=torch.long),
              "attention_mask": torch.ones_like(completion_mask), "completion_mask": completion_mask,
              "ref_chosen_logps": reference[: rows // 2], "ref_rejected_logps": reference[rows // 2:]}
    loss = DPOTrainer._compute_loss(trainer, lambda **_: outputs, inputs, return_outputs=False)
    return loss, {k: v[0] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_loss_rewards_and_gradients_equal_trls(loss_type):
    pytest.importorskip("trl")
    torch.manual_seed(0)
    pairs, seq = 3, 9
    # Prompts of 2-4 tokens, then responses of different lengths, then padding: TRL's completion_mask
    # covers the inputs, its log-probs (and our loss_mask) the shifted labels.
    completion = torch.zeros(2 * pairs, seq)
    for row, (start, end) in enumerate([(2, 6), (3, 9), (4, 5), (2, 8), (3, 4), (4, 9)]):
        completion[row, start:end] = 1.0
    mask = completion[:, 1:]
    logps = (-torch.rand(2 * pairs, seq - 1) * 3 * mask).requires_grad_()  # fp32, as our loss computes
    reference = -(torch.rand(2 * pairs, seq - 1) * 3 * mask).sum(-1)
    trl_loss, trl_metrics = _trl_dpo_loss(logps, completion, reference, loss_type, BETA)
    (trl_grad,) = torch.autograd.grad(trl_loss, logps)

    ours = DPO(beta=BETA, loss_type=loss_type)
    loss, metrics = ours.loss(-logps, {"loss_mask": mask, "reference_logps": reference})
    (grad,) = torch.autograd.grad(loss, logps)
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-6)
    # TRL sums every position (its model's log-probs are 0 off the completion): compare on the mask
    assert torch.allclose(grad, trl_grad * mask, atol=1e-7) and grad.abs().sum() > 0
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert metrics[name].item() == pytest.approx(trl_metrics[name], abs=1e-6), name
    # TRL says "accuracies"; the issue asks for "rewards/accuracy"
    assert metrics["rewards/accuracy"].item() == pytest.approx(trl_metrics["rewards/accuracies"], abs=1e-6)


def test_language_modeling_is_the_masked_token_mean():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    loss, metrics = LanguageModeling().loss(per_token, {"loss_mask": torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])})
    assert loss.item() == pytest.approx((1 + 2 + 6) / 3) and metrics == {}


def test_a_policy_equal_to_its_reference_costs_ln2_with_zero_rewards(tmp_path):
    rows = [{"prompt": f"Q{i}: what follows?", "chosen": f" line {i} is true", "rejected": f" not {i}"} for i in range(4)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    preprocess.main(["--task", "dpo", "--input", str(tmp_path / "p.jsonl"), "--output-prefix", str(tmp_path / "p"),
                     "--no-progress"])
    cfg = Config()
    cfg.model.d_model, cfg.model.d_ffn, cfg.model.num_layers, cfg.model.num_attention_heads = 32, 64, 2, 4
    cfg.model.max_seq_len, cfg.model.precision = 32, "float32"
    cfg.model.dropout_embd = cfg.model.dropout_attn = cfg.model.dropout_mlp = 0.0
    cfg.data.task_type, cfg.data.splits = "dpo", [1.0, 0.0, 0.0]
    cfg.data.train_datasets = [{"path": str(tmp_path / "p"), "weight": 1.0}]
    tokenizer = build_tokenizer(cfg.model)
    batch = next(build_loader(build_datasets(cfg, tokenizer)["train"], 4, 0, 1, seed=0, shuffle=False))
    objective = build_objective(cfg)
    policy = build_model(cfg, ParallelState(), tokenizer.vocab_size)
    reference = build_model(cfg, ParallelState(), tokenizer.vocab_size).requires_grad_(False).eval()

    mb = objective.model_batch(batch)

    def per_token(model):
        return model(mb["input_ids"], labels=mb["labels"])

    with torch.no_grad():
        mb["reference_logps"] = objective.sequence_logps(per_token(reference), mb)
    loss, metrics = objective.loss(per_token(policy), mb)
    assert abs(loss.item() - math.log(2)) < 1e-6
    assert all(metrics[k].item() == 0.0 for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"))
    loss.backward()  # the policy learns from the pairs: its gradient is not zero
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())


def test_dpo_keys_are_refused_outside_a_dpo_run_and_smoothing_outside_sigmoid(tmp_path, capsys):
    path = write_config(tmp_path)
    assert cli.main(["config", str(path), "trainer.dpo_beta=0.5"]) == 2
    err = capsys.readouterr().err
    assert "trainer.dpo_beta = 0.5 (set by a command-line override): only a DPO run uses it" in err and "data.task_type" in err
    dpo = ["data.task_type=dpo", "trainer.dpo_loss_type=ipo", "trainer.dpo_label_smoothing=0.1"]
    assert cli.main(["config", str(path), *dpo]) == 2
    assert "trainer.dpo_label_smoothing = 0.1 (set by a command-line override): only the sigmoid loss is smoothed" in capsys.readouterr().err
    assert cli.main(["config", str(path), "data.task_type=dpo", "trainer.dpo_beta=0"]) == 2
    assert "trainer.dpo_beta" in capsys.readouterr().err
    assert cli.main(["config", str(path), "data.task_type=dpo", "trainer.dpo_loss_type=robust"]) == 2
    assert "must be one of 'sigmoid', 'ipo', 'hinge'" in capsys.readouterr().err
