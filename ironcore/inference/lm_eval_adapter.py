"""lm-evaluation-harness model type ``ironcore``: score an IronCore checkpoint without exporting it.

The checkpoint is a ``trainer.model_path`` (its latest checkpoint) or one ``iter_*`` folder, saved
with any TP/PP layout; it is loaded as generation loads it (`ironcore.inference.loading`), split
over TP = the number of processes (1 without a launcher), PP = 1.

    python -m ironcore.inference.lm_eval_adapter --model ironcore \\
        --model_args checkpoint=runs/tiny,batch_size=8 --tasks hellaswag

or, from Python, ``register()`` then ``lm_eval.simple_evaluate(model="ironcore", ...)``.

Scoring follows lm-eval's own ``hf`` model type, so the numbers are comparable with an HF export of
the same checkpoint: ``(context + continuation)`` is cut to the last ``max_length + 1`` tokens, the
continuation's log-probabilities are summed (fp32 log-softmax over the real vocabulary) and
``is_greedy`` says whether argmax reproduces it; ``loglikelihood_rolling`` uses lm-eval's disjoint
windows with the end-of-document id as prefix; ``generate_until`` left-truncates the context to
``max_length - max_gen_toks`` and cuts the text at the first stop string.

lm-eval is an optional extra (``pip install -e .[eval]``): this module imports without it, and
`register` imports it. Under TP > 1 every process computes every request (the ranks are one model,
not data-parallel replicas), so lm-eval's world size is 1 on each.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from ironcore.inference.generate import full_vocab_logits, generate
from ironcore.inference.loading import GenerationModel, load_for_generation
from ironcore.inference.sampling import SamplingParams
from ironcore.training.precision import autocast

MODEL_TYPE = "ironcore"
TokenPair = tuple[list[int], list[int]]


class CheckpointScorer:
    """Log-likelihoods and continuations from a loaded IronCore model (lm-eval's arithmetic,
    no lm-eval objects), so the numerics can be tested and reused without the harness."""

    def __init__(self, loaded: GenerationModel, batch_size: int = 1, max_length: Optional[int] = None):
        self.loaded = loaded
        self.batch_size = batch_size
        self.max_length = max_length or loaded.cfg.model.max_seq_len
        if self.max_length > loaded.cfg.model.max_seq_len:
            raise ValueError(f"max_length {self.max_length} exceeds the model's model.max_seq_len "
                             f"{loaded.cfg.model.max_seq_len}")

    @property
    def device(self) -> torch.device:
        return next(self.loaded.model.parameters()).device

    @torch.no_grad()
    def loglikelihood_tokens(self, pairs: Sequence[TokenPair]) -> list[tuple[float, bool]]:
        """``(sum of log p(continuation | context), is_greedy)`` per ``(context, continuation)``."""
        results: list[tuple[float, bool]] = []
        for start in range(0, len(pairs), self.batch_size):
            results.extend(self._score_batch(pairs[start:start + self.batch_size]))
        return results

    def _score_batch(self, pairs: Sequence[TokenPair]) -> list[tuple[float, bool]]:
        # The last token is only predicted, never fed; the left end is dropped when too long.
        inputs = [(context + continuation)[-(self.max_length + 1):][:-1] for context, continuation in pairs]
        # Right padding is invisible to causal attention over the real tokens before it.
        ids = torch.full((len(inputs), max(map(len, inputs))), self.loaded.eod_id, dtype=torch.long)
        for row, tokens in enumerate(inputs):
            ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        model = self.loaded.model
        with autocast(model.cfg.precision, self.device):
            logits = model(ids.to(self.device))
        logprobs = F.log_softmax(full_vocab_logits(model, logits), dim=-1).cpu()
        results = []
        for row, (tokens, (_, continuation)) in enumerate(zip(inputs, pairs)):
            scored = logprobs[row, len(tokens) - len(continuation):len(tokens)]
            target = torch.tensor(continuation, dtype=torch.long)
            results.append((float(scored.gather(-1, target[:, None]).sum()), bool(torch.equal(scored.argmax(-1), target))))
        return results

    def generate_text(self, context: list[int], until: Sequence[str], max_gen_toks: int,
                      params: SamplingParams) -> str:
        """The continuation of `context` as text, cut before the first of the `until` strings."""
        context = context[-max(1, self.max_length - max_gen_toks):]
        out = generate(self.loaded.model, [context], params, eod_id=self.loaded.eod_id)
        text = self.loaded.tokenizer.decode(out.tokens[0])
        for stop in until:
            if stop:
                text = text.split(stop)[0]
        return text


def load_scorer(checkpoint: str, batch_size: int = 1, max_length: Optional[int] = None) -> CheckpointScorer:
    """A scorer over an IronCore checkpoint folder, TP over the launcher's processes (1 without one)."""
    from ironcore.config.schema import Config
    from ironcore.parallel.state import init_distributed

    cfg = Config()
    cfg.trainer.tensor_model_parallel_size = int(os.environ.get("WORLD_SIZE", "1"))
    cfg.trainer.pipeline_model_parallel_size = 1
    return CheckpointScorer(load_for_generation(init_distributed(cfg), checkpoint=checkpoint), batch_size,
                            max_length)


_GEN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p", "seed"}


def sampling_from_gen_kwargs(gen_kwargs: dict[str, Any], default_max_gen_toks: int = 256
                             ) -> tuple[list[str], int, SamplingParams]:
    """``(until, max_gen_toks, SamplingParams)`` from a task's ``generation_kwargs``: greedy unless
    ``do_sample`` is true (as lm-eval's ``hf``); ValueError naming keys IronCore does not implement."""
    unknown = sorted(set(gen_kwargs) - _GEN_KWARGS)
    if unknown:
        raise ValueError(f"generation_kwargs not supported by the ironcore model type: {', '.join(unknown)} "
                         f"(supported: {', '.join(sorted(_GEN_KWARGS))})")
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    max_gen_toks = int(gen_kwargs.get("max_gen_toks", default_max_gen_toks))
    do_sample = bool(gen_kwargs.get("do_sample", False))
    params = SamplingParams(max_new_tokens=max_gen_toks,
                            temperature=float(gen_kwargs.get("temperature", 1.0)) if do_sample else 0.0,
                            top_k=int(gen_kwargs.get("top_k", 0)), top_p=float(gen_kwargs.get("top_p", 1.0)),
                            seed=int(gen_kwargs.get("seed", 1234)))
    return until, max_gen_toks, params


def _batch_size(value: int | str) -> int:
    if str(value).startswith("auto"):
        raise ValueError("batch_size auto is not supported by the ironcore model type: give a number")
    return int(value)


@functools.lru_cache(maxsize=None)
def register() -> type:
    """Register the ``ironcore`` model type with lm-eval (imported here: ``pip install -e .[eval]``)
    and return its class. Calling it again returns the same class (lm-eval refuses a second one)."""
    try:
        from lm_eval import utils
        from lm_eval.api.model import TemplateLM
        from lm_eval.api.registry import register_model
    except ImportError as e:
        raise ImportError("the ironcore lm-eval model type needs lm-evaluation-harness: "
                          "pip install -e .[eval] (or pip install lm-eval)") from e

    @register_model(MODEL_TYPE)
    class IronCoreLM(TemplateLM):
        """lm-eval model type over an IronCore checkpoint folder (``--model_args checkpoint=PATH``)."""

        def __init__(self, checkpoint: str, batch_size: int | str = 1, max_length: Optional[int] = None,
                     max_batch_size: Optional[int] = None, device: Optional[str] = None):
            # max_batch_size and device are what lm-eval passes every model type; IronCore batches
            # by batch_size only and places the model on the launcher's device (cuda:LOCAL_RANK or CPU).
            super().__init__()
            self.scorer = load_scorer(checkpoint, _batch_size(batch_size),
                                      int(max_length) if max_length is not None else None)

        @property
        def eot_token_id(self) -> int:
            return self.scorer.loaded.eod_id

        @property
        def max_length(self) -> int:
            return self.scorer.max_length

        def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
            # IronCore's tokenizers add no special tokens: the flag has nothing to switch.
            return self.scorer.loaded.tokenizer.encode(string)

        def tok_decode(self, tokens: list[int]) -> str:
            return self.scorer.loaded.tokenizer.decode(tokens)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
            results = self.scorer.loglikelihood_tokens([(context, continuation) for _, context, continuation in requests])
            for (request, _, _), result in zip(requests, results):
                if request is not None:
                    self.cache_hook.add_partial("loglikelihood", request, result)
            return results

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            totals = []
            for (text,) in [request.args for request in requests]:
                windows = [utils.make_disjoint_window(window) for window in utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)]
                totals.append(sum(logprob for logprob, _ in self.scorer.loglikelihood_tokens(windows)))
                self.cache_hook.add_partial("loglikelihood_rolling", (text,), totals[-1])
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            texts = []
            for context, gen_kwargs in [request.args for request in requests]:
                until, max_gen_toks, params = sampling_from_gen_kwargs(dict(gen_kwargs))
                texts.append(self.scorer.generate_text(self.tok_encode(context), until, max_gen_toks, params))
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), texts[-1])
            return texts

    return IronCoreLM


def main() -> None:
    """lm-eval's own command line with the ``ironcore`` model type registered."""
    register()
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
