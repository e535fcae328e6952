"""Text generation from trained models: a KV cache, sampling, and loading checkpoints for it.

Generation is its own wing, beside training: it reads checkpoints (``ironcore.checkpoint``) and
runs the same model (``ironcore.model``) with an inference cache, but shares no loop, optimizer or
data pipeline with training. ``tools/generate.py`` is the command line over it.

    from ironcore.inference import SamplingParams, generate, load_for_generation
    loaded = load_for_generation(ParallelState(), checkpoint="runs/tiny")
    out = generate(loaded.model, [loaded.tokenizer.encode("Hello")], SamplingParams(temperature=0),
                   eod_id=loaded.eod_id)
"""

from ironcore.inference.generate import GenerationOutput, full_vocab_logits, generate
from ironcore.inference.kv_cache import InferenceCache
from ironcore.inference.loading import GenerationModel, load_checkpoint_model, load_for_generation, load_hf_model
from ironcore.inference.sampling import SamplingParams, sample_next_token

__all__ = [
    "GenerationOutput", "GenerationModel", "InferenceCache", "SamplingParams", "full_vocab_logits", "generate",
    "load_checkpoint_model", "load_for_generation", "load_hf_model", "sample_next_token",
]
