"""The GPT/LLaMA decoder built from `ironcore.parallel` layers."""

from ironcore.model.gpt import GPTModel, batch_inputs, build_model, model_stages, padded_vocab_size

__all__ = ["GPTModel", "batch_inputs", "build_model", "model_stages", "padded_vocab_size"]
