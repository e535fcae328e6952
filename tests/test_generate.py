"""Generation: KV-cached decoding against full forwards and against Hugging Face's `generate`.

Weights come from randomly initialised `transformers` models (GPT2LMHeadModel, and a
LlamaForCausalLM with GQA: 4 query heads, 2 kv groups), converted with `ironcore.checkpoint.hf`.
Prompts of different lengths are decoded as one left-padded batch, while Hugging Face decodes each
prompt alone: equal token ids also show that padding does not change results.
"""

from __future__ import annotations

import logging

import pytest
import torch

from ironcore.checkpoint.hf import hf_to_ironcore
from ironcore.inference import InferenceCache, SamplingParams, full_vocab_logits, generate
from ironcore.inference.sampling import filter_top_k, filter_top_p, sample_next_token
from ironcore.model.gpt import GPTModel
from ironcore.parallel.state import ParallelState
from tests.hf_helpers import random_hf_model
from tests.hf_helpers import preset as model_preset

transformers = pytest.importorskip("transformers")
VOCAB = 1000
PROMPT_LENGTHS = (5, 13, 9)


@pytest.fixture(scope="module", params=["tiny", "tiny-llama"])
def models(request):
    cfg = model_preset(request.param)
    hf = random_hf_model(cfg, VOCAB)
    model = GPTModel(cfg, ParallelState(), VOCAB).eval()
    model.load_state_dict(hf_to_ironcore(hf.state_dict(), cfg, VOCAB))
    return hf, model


def _prompts(seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def test_greedy_batch_equals_hugging_face_generate(models):
    hf, model = models
    prompts = _prompts()
    out = generate(model, prompts, SamplingParams(max_new_tokens=32, temperature=0.0), eod_id=None)
    for prompt, ours in zip(prompts, out.tokens):
        with torch.no_grad():
            want = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32, min_new_tokens=32,
                               eos_token_id=None, pad_token_id=0)
        assert ours == want[0, len(prompt):].tolist()
    assert out.decode_tokens == 31 * len(prompts) and out.decode_tokens_per_s > 0
    assert out.stopped_at_eod == [False] * len(prompts)


def _full_logits(model: GPTModel, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return full_vocab_logits(model, model(torch.tensor([ids])))[0]


def test_cached_decoding_logits_equal_full_forward(models):
    """Prefill, a chunk of 4 tokens, then single tokens, in a left-padded batch of two: every
    real position's logits equal a full forward over that row alone (no cache, no padding)."""
    _, model = models
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (24, 19)]
    pad = len(rows[0]) - len(rows[1])
    ids = torch.tensor([rows[0], [0] * pad + rows[1]])
    valid = ids.new_ones(ids.shape, dtype=torch.bool)
    valid[1, :pad] = False
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    cache = InferenceCache(len(model.layers), 2, ids.shape[1])
    cache.mark_padding(valid)
    chunks = [(0, 10), (10, 14)] + [(i, i + 1) for i in range(14, ids.shape[1])]
    pieces = []
    with torch.no_grad():
        for start, end in chunks:
            logits = model(ids[:, start:end], position_ids=positions[:, start:end], inference_cache=cache)
            pieces.append(full_vocab_logits(model, logits))
    cached = torch.cat(pieces, dim=1)
    assert cache.length == ids.shape[1]
    assert (cached[0] - _full_logits(model, rows[0])).abs().max() < 1e-5
    assert (cached[1, pad:] - _full_logits(model, rows[1])).abs().max() < 1e-5


def test_default_positions_continue_after_the_cache(models):
    _, model = models
    ids = torch.tensor([_prompts()[1]])
    cache = InferenceCache(len(model.layers), 1, ids.shape[1])
    with torch.no_grad():
        model(ids[:, :6], inference_cache=cache)
        rest = full_vocab_logits(model, model(ids[:, 6:], inference_cache=cache))[0]
    assert (rest - _full_logits(model, ids[0].tolist())[6:]).abs().max() < 1e-5


def test_stops_at_end_of_document(models):
    _, model = models
    prompts = _prompts()
    greedy = generate(model, prompts, SamplingParams(max_new_tokens=12, temperature=0.0)).tokens
    eod = greedy[0][4]
    out = generate(model, prompts, SamplingParams(max_new_tokens=12, temperature=0.0), eod_id=eod)
    assert out.tokens[0] == greedy[0][:greedy[0].index(eod)]
    assert out.stopped_at_eod[0]
    for row, full in zip(out.tokens[1:], greedy[1:]):  # other rows run on until their own EOD
        assert row == (full[:full.index(eod)] if eod in full else full)


def test_sampling_is_reproducible_with_a_seed(models):
    _, model = models
    prompts = _prompts()
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    first = generate(model, prompts, params).tokens
    assert generate(model, prompts, params).tokens == first
    params.seed = 8
    assert generate(model, prompts, params).tokens != first
    greedy = generate(model, prompts, SamplingParams(max_new_tokens=16, temperature=0.0)).tokens
    assert generate(model, prompts, SamplingParams(max_new_tokens=16, top_k=1, seed=3)).tokens == greedy


def test_too_long_prompt_is_a_clear_error_and_generation_stops_at_max_seq_len(models, caplog):
    _, model = models
    max_len = model.cfg.max_seq_len
    with pytest.raises(ValueError, match=rf"prompt 1 has {max_len} tokens, but model.max_seq_len is {max_len}"):
        generate(model, [[1, 2], [3] * max_len], SamplingParams(temperature=0.0))
    with caplog.at_level(logging.WARNING, logger="ironcore.inference.generate"):
        out = generate(model, [[5] * (max_len - 6)], SamplingParams(max_new_tokens=32, temperature=0.0))
    assert len(out.tokens[0]) == 6
    assert "max_new_tokens 32 reduced to 6" in caplog.text


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert filter_top_k(logits, 2).isinf().tolist() == [[True, False, False, True]]
    assert torch.equal(filter_top_k(logits, 0), logits)
    probs = logits.softmax(-1)[0]  # sorted: id1 0.64, id2 0.24, id0 0.09, id3 0.03
    keep_two = (probs[1] + probs[2]).item()
    assert filter_top_p(logits, keep_two - 1e-3).isinf().tolist() == [[True, False, False, True]]
    assert filter_top_p(logits, keep_two + 1e-3).isinf().tolist() == [[False, False, False, True]]
    assert filter_top_p(logits, 0.01).isinf().tolist() == [[True, False, True, True]]  # at least one
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample_next_token(logits, SamplingParams(top_k=2), gen)) for _ in range(200)}
    assert draws == {1, 2}
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0.0)
