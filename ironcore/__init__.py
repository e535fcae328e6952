"""IronCore: Megatron-style distributed pretraining for GPT and LLaMA models."""

__version__ = "0.1.0"
