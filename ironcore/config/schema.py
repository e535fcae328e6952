"""Typed configuration groups.

One dataclass per YAML group, with the names and defaults of the configuration document users
already know (``shared/seeds/ironcore-configuration.md``). Each field's metadata carries its
``help`` text (the README's config reference is generated from it) and, where the value is one of
a fixed set, its ``choices``; numeric bounds are ``minimum``/``maximum``/``exclusive_minimum``/
``exclusive_maximum``. Keys that IronCore adds beyond the seed are marked ``added=True``; keys computed
when left unset (``validate.py``) are marked ``derived=True``.

Two seed defaults are replaced by "derived" (``None``) as SPEC §3 asks: ``model.head_dim``
(``d_model / num_attention_heads``) and ``data.vocab_size`` (the tokenizer's vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional


def _f(default: Any, help: str, choices: Optional[list] = None, added: bool = False, **extra):
    """A dataclass field with documentation metadata; mutable defaults are copied per instance."""
    meta = {"help": help, "choices": choices, "added": added, **extra}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainerConfig:
    model_name: str = _f("model", "Model name")
    model_path: str = _f("", "Model save/load directory")
    micro_batch_size: int = _f(2, "Micro batch size per GPU", minimum=1)
    train_batch_size: Optional[int] = _f(
        None, "Global training batch size (derived when omitted)", minimum=1, derived=True)
    gradient_accumulation_steps: Optional[int] = _f(
        None, "Gradient accumulation steps (derived when omitted)", minimum=1, derived=True)
    tensor_model_parallel_size: int = _f(1, "Tensor parallelism size", minimum=1)
    pipeline_model_parallel_size: int = _f(1, "Pipeline parallelism size", minimum=1)
    context_parallel_size: int = _f(
        1, "Context parallelism size: the sequence split over this many ranks (ring attention); the world size "
        "is divisible by TP × PP × CP and data parallelism is what remains", added=True, minimum=1)
    save_checkpoint_steps: int = _f(1000, "Checkpoint save interval", minimum=1)
    log_interval: int = _f(20, "Progress print interval", minimum=1)
    grad_norm_log_interval: Optional[str] = _f(
        None, "Gradient norm logging cadence (`log`, `checkpoint`, or `None`)", choices=["log", "checkpoint"])
    param_norm_log_interval: Optional[str] = _f(
        None, "Parameter norm logging cadence (`log`, `checkpoint`, or `None`)", choices=["log", "checkpoint"])
    use_flash_attn: bool = _f(True, "Use Flash Attention (when installed and on GPU; else SDPA)")
    vocab_padding_unit: int = _f(128, "Vocab padding for tensor core optimization", minimum=1)
    num_workers: int = _f(8, "DataLoader workers (no effect: samples are read from memory-mapped files in the "
                             "training process; no worker pool is needed)", minimum=0)
    do_eval: bool = _f(False, "Enable evaluation")
    eval_batch_size: Optional[int] = _f(None, "Evaluation batch size (micro_batch_size when omitted)", minimum=1)
    # Added by IronCore (SPEC §1).
    compile_model: bool = _f(False, "torch.compile the model", added=True)
    do_test: bool = _f(False, "Evaluate on the test split at the end of training", added=True)
    keep_last_checkpoints: Optional[int] = _f(
        None, "Keep only the newest K checkpoints (`None` keeps all)", added=True, minimum=1)
    load_iteration: Optional[int] = _f(
        None, "Checkpoint iteration to resume from (`None`: the one `latest` in model_path names; "
        "`0`: start fresh even when model_path holds checkpoints)", added=True, minimum=0)
    skip_nonfinite_steps: bool = _f(
        False, "Skip the update of a step whose loss is NaN/inf on any rank (logged with the step and rank) "
        "instead of stopping the run", added=True)
    max_skipped_steps: int = _f(
        10, "With `skip_nonfinite_steps`: stop the run (exit status 1) after this many consecutive skipped "
        "steps, as the model is then broken rather than unlucky", added=True, minimum=1)
    pretrained_checkpoint: Optional[str] = _f(
        None, "Initial weights when model_path holds no checkpoint yet: an IronCore checkpoint (a model_path or one "
        "iter_* folder, any TP/PP layout) or a Hugging Face folder; the run starts at step 0 with a fresh optimizer, "
        "schedule and data position (once model_path has a checkpoint, resuming from it wins)", added=True)
    # DPO (data.task_type: dpo): the names of TRL's DPOConfig, prefixed.
    dpo_beta: float = _f(0.1, "DPO: β, how far the policy may move from the reference (the implicit reward's "
                         "scale)", added=True, exclusive_minimum=0)
    dpo_loss_type: str = _f("sigmoid", "DPO loss: `sigmoid` (the paper's), `ipo` or `hinge`", added=True,
                            choices=["sigmoid", "ipo", "hinge"])
    dpo_label_smoothing: float = _f(0.0, "DPO (sigmoid loss): the assumed fraction of pairs whose preference "
                                    "is flipped (conservative DPO)", added=True, minimum=0, exclusive_maximum=0.5)
    dpo_reference_checkpoint: Optional[str] = _f(
        None, "DPO: the frozen reference model's weights (an IronCore or Hugging Face checkpoint, any TP/PP "
        "layout); `None`: the policy's initial weights (trainer.pretrained_checkpoint when set, else the "
        "initialization)", added=True)


@dataclass
class OperationConfig:
    train_steps: int = _f(1000, "Total training steps", minimum=1)
    eval_interval: int = _f(100, "Evaluation interval", minimum=1)
    eval_samples: int = _f(100, "Number of evaluation samples", minimum=0)
    test_samples: int = _f(100, "Number of test samples", minimum=0)
    activation_recompute: bool = _f(False, "Enable activation checkpointing")
    recompute_strategy: str = _f("default", "Recompute strategy (`default`, `optimized`)",
                                 choices=["default", "optimized"])
    no_save: bool = _f(False, "Disable checkpoint saving")
    save_dist_ckpt: bool = _f(False, "Use distributed checkpoint saving")
    exit_interval: Optional[int] = _f(None, "Exit after N steps (for debugging)", minimum=1)


@dataclass
class PositionalEmbeddingConfig:
    type: str = _f("absolute", "PE type (`absolute`, `rope`, `none`)", choices=["absolute", "rope", "none"])
    base: int = _f(10000, "RoPE base frequency", minimum=1)
    scaling_factor: float = _f(1.0, "RoPE scaling factor", exclusive_minimum=0)
    offset: int = _f(0, "Position index of the first token (positions run offset, offset + 1, ...): the learned "
                     "absolute table gets `offset` more rows (OPT's convention); RoPE is relative, so a shift "
                     "changes no attention score", minimum=0)
    scaling_type: str = _f(
        "linear", "How `scaling_factor` stretches RoPE (`linear`: positions / factor; `llama3`: Llama 3.1's "
        "per-frequency scaling)", choices=["linear", "llama3"], added=True)
    low_freq_factor: float = _f(1.0, "llama3 scaling: wavelengths above original_max_seq_len / this are divided "
                                "by scaling_factor", added=True, exclusive_minimum=0)
    high_freq_factor: float = _f(4.0, "llama3 scaling: wavelengths below original_max_seq_len / this are kept",
                                 added=True, exclusive_minimum=0)
    original_max_seq_len: int = _f(8192, "llama3 scaling: the context length the model was pretrained with",
                                   added=True, minimum=1)


@dataclass
class ModelConfig:
    d_model: int = _f(512, "Hidden dimension size", minimum=1)
    d_ffn: int = _f(2048, "Feed-forward dimension size", minimum=1)
    num_layers: int = _f(2, "Number of transformer layers", minimum=1)
    num_attention_heads: int = _f(8, "Number of attention heads", minimum=1)
    num_attention_groups: Optional[int] = _f(None, "KV groups for GQA (None = MHA)", minimum=1)
    head_dim: Optional[int] = _f(
        None, "Attention head dimension (derived as d_model / num_attention_heads when omitted)", minimum=1,
        derived=True)
    max_seq_len: int = _f(512, "Maximum sequence length", minimum=1)
    precision: str = _f("bfloat16", "Model precision (`bfloat16`, `float16`, `float32`)",
                        choices=["bfloat16", "float16", "float32"])
    ln_type: str = _f("layernorm", "Layer norm type (`layernorm`, `rmsnorm`)", choices=["layernorm", "rmsnorm"])
    ln_eps: float = _f(1e-5, "Layer norm epsilon", exclusive_minimum=0)
    post_ln: bool = _f(False, "Use post-LN (vs pre-LN)")
    activation_type: str = _f(
        "gelu", "Activation function (`gelu`, `gelu_tanh` as GPT-2, `relu`, `swiglu` as LLaMA)",
        choices=["gelu", "gelu_tanh", "relu", "swiglu"])
    dropout_embd: float = _f(0.1, "Embedding dropout", minimum=0, maximum=1)
    dropout_attn: float = _f(0.1, "Attention dropout", minimum=0, maximum=1)
    dropout_mlp: float = _f(0.1, "MLP dropout", minimum=0, maximum=1)
    no_bias: bool = _f(False, "Disable bias in layers")
    untie_embed: bool = _f(False, "Untie input/output embeddings")
    cross_entropy_chunk_size: int = _f(
        0, "Tokens per chunk of the LM head fused with the cross-entropy (forward and backward), so only one "
        "chunk's logits exist at a time; `0`: the unfused head (all logits at once). Same loss and gradients; "
        "generation and anything that needs logits use the unfused head", added=True, minimum=0)
    tokenizer_type: str = _f("gpt2", "Tokenizer type (`gpt2`: shipped tiktoken BPE; `hf`: a local HF tokenizer)",
                             choices=["gpt2", "hf"])
    vocab_name_or_path: str = _f("gpt2", "Vocab name or path")
    positional_embedding: PositionalEmbeddingConfig = field(
        default_factory=PositionalEmbeddingConfig, metadata={"help": "Positional embedding", "added": False})


@dataclass
class DataConfig:
    config_path: Optional[str] = _f(None, "Path to data config YAML")
    task_type: Optional[str] = _f(None, "Task type (`pretrain`, `sft`, `dpo`)", choices=["pretrain", "sft", "dpo"])
    splits: list = _f([0.97, 0.029, 0.001], "Train/eval/test split ratios")
    train_datasets: Optional[list] = _f(None, "Training dataset configs (`[{path, weight}, ...]`)")
    eval_datasets: Optional[list] = _f(None, "Evaluation dataset configs")
    test_datasets: Optional[list] = _f(None, "Test dataset configs")
    vocab_size: Optional[int] = _f(
        None, "Vocabulary size (derived: the tokenizer's when omitted)", minimum=1, derived=True)
    pad_to_max_length: bool = _f(False, "Pad sequences to max length")
    pad_token_id: int = _f(-1, "Pad token ID (default: EOS)", minimum=-1)


@dataclass
class OptimConfig:
    optimizer: str = _f("adamw", "`adamw`: Adam with decoupled weight decay; `adam`: Adam with coupled L2 "
                        "weight decay (torch.optim.Adam)", choices=["adam", "adamw"])
    lr_scheduler: str = _f("cosine", "LR scheduler type (`cosine`, `linear`, `constant`, `wsd`)",
                           choices=["cosine", "linear", "constant", "wsd"])
    max_lr: float = _f(5e-4, "Maximum learning rate", minimum=0)
    min_lr: float = _f(0.0, "Minimum learning rate", minimum=0)
    warmup_steps: int = _f(0, "LR warmup steps", minimum=0)
    annealing_steps: int = _f(0, "LR annealing steps", minimum=0)
    weight_decay: float = _f(0.01, "Weight decay", minimum=0)
    no_decay_on_embedding: bool = _f(True, "Skip weight decay on embeddings")
    adam_beta1: float = _f(0.9, "Adam beta1", minimum=0, exclusive_maximum=1)
    adam_beta2: float = _f(0.95, "Adam beta2", minimum=0, exclusive_maximum=1)
    adam_eps: float = _f(1e-8, "Adam epsilon", exclusive_minimum=0)
    clip_grad: float = _f(1.0, "Gradient clipping value", minimum=0)
    load_checkpoint_optim_state: bool = _f(True, "Load optimizer state from checkpoint")
    load_checkpoint_lr_scheduler: bool = _f(
        True, "Resume the checkpoint's LR schedule (settings and position); `false`: the config's schedule at the "
        "resumed step")


@dataclass
class InitConfig:
    seed: int = _f(1337, "Random seed", minimum=0)
    init_std: float = _f(0.006, "Initialization std dev", minimum=0)
    xavier_init: bool = _f(False, "Use Xavier initialization")
    data_parallel_random_init: bool = _f(False, "Enable DP random init (not supported: `true` is a config error)")


@dataclass
class ParallelConfig:
    rank: int = _f(-1, "Global rank (auto)", minimum=-1)
    local_rank: int = _f(0, "Local rank (auto)", minimum=0)
    world_size: int = _f(1, "World size (auto)", minimum=1)
    dist_backend: str = _f("nccl", "Distributed backend (falls back to `gloo` without CUDA)",
                           choices=["nccl", "gloo"])
    timeout_minute: float = _f(10.0, "Distributed timeout", exclusive_minimum=0)
    use_fsdp: bool = _f(False, "Enable FSDP (FSDP2 over the data-parallel ranks; composes with TP and PP)")
    use_distributed_optimizer: bool = _f(
        False, "Shard the optimizer state over the data-parallel group (Megatron's distributed optimizer, ZeRO-1): "
        "gradients are reduce-scattered, each rank updates its shard, parameters are all-gathered; without FSDP, "
        "composes with TP and PP", added=True)
    fsdp_offload_params: bool = _f(False, "FSDP CPU offload")
    fsdp_mixed_precision: str = _f("mixed", "FSDP precision (`mixed`, `fp16`, `bf16`, `fp32`)",
                                   choices=["mixed", "fp16", "bf16", "fp32"])
    fsdp_sharding_strategy: str = _f("full", "Sharding strategy (`full`, `hybrid`, `no_shard`)",
                                     choices=["full", "hybrid", "no_shard"])
    fsdp_state_dict_type: str = _f("full", "FSDP checkpoint format: `full` gathers each parameter into the "
                                   "single-file checkpoint (operation.save_dist_ckpt: false), `sharded` writes each "
                                   "rank's shards with DCP (save_dist_ckpt: true); both load at any layout (the seed's "
                                   "`local`, shards without a global plan, is not built)", choices=["full", "sharded"])
    # Added by IronCore: the model's sequence parallelism needs a switch (the seed has none).
    sequence_parallel: bool = _f(
        False, "Sequence parallelism: split norms/dropout activations along the sequence across the "
        "tensor-parallel group (saves activation memory; needs TP > 1 and seq length divisible by TP)",
        added=True)
    # Added by IronCore: pipeline parallelism needs a schedule and, optionally, a layer layout.
    pipeline_schedule: str = _f(
        "1f1b", "Pipeline schedule when trainer.pipeline_model_parallel_size > 1 (`1f1b`, `gpipe`, `interleaved`; "
        "interleaved needs virtual_pipeline_stages >= 2)", choices=["1f1b", "gpipe", "interleaved"], added=True)
    virtual_pipeline_stages: int = _f(
        1, "Model chunks per pipeline rank for the interleaved schedule (smaller bubble, more transfers)",
        added=True, minimum=1)
    pipeline_layer_split: Optional[list] = _f(
        None, "Layers per pipeline stage, e.g. `[5, 7]` (`None`: num_layers split evenly; one entry per "
        "pipeline_model_parallel_size × virtual_pipeline_stages stage, summing to num_layers)", added=True)


@dataclass
class UtilsConfig:
    log_level: str = _f("INFO", "Log level", choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])
    tensorboard_dir: Optional[str] = _f(None, "TensorBoard log directory")
    mlflow_tracking_uri: Optional[str] = _f(None, "MLflow tracking URI")
    mlflow_experiment_name: Optional[str] = _f(None, "MLflow experiment name")
    profile_nsys: bool = _f(False, "Enable Nsight Systems profiling")
    profile_torch: bool = _f(False, "Enable PyTorch profiler")
    profile_step_start: int = _f(10, "First profiled step (numbered as the console shows them, from 1)",
                                 minimum=1)
    profile_step_end: int = _f(12, "Step after the last profiled one: the window is start <= step < end",
                               minimum=1)
    profile_ranks: list = _f([0], "Ranks to profile")
    deterministic: bool = _f(False, "Enable deterministic mode")
    report_memory_usage: bool = _f(True, "Report memory usage")
    # Added by IronCore (SPEC §1).
    stop_on_profile_end: bool = _f(False, "Exit the run right after the last profiled step (profile_step_end - 1)",
                                   added=True)
    profile_memory: bool = _f(False, "Record a CUDA memory snapshot over the profiling window", added=True)


@dataclass
class Config:
    """The resolved configuration: one attribute per YAML group."""

    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    operation: OperationConfig = field(default_factory=OperationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    init: InitConfig = field(default_factory=InitConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    utils: UtilsConfig = field(default_factory=UtilsConfig)


GROUPS: dict[str, type] = {f.name: f.default_factory for f in fields(Config)}  # type: ignore[misc]
