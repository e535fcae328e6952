"""How much memory one rank needs, estimated from the config before anything is allocated.

`estimate_memory(cfg)` is arithmetic on the config (no torch), in the spirit of Megatron-LM's
``--report-theoretical-memory``, but counted from what IronCore's own code keeps. `check_memory`
compares it with the device's memory (`device_memory`) and raises a ConfigError naming the keys
that dominate, so a config that cannot fit (``model.d_model=1048576``, ``trainer.eval_batch_size=
1000000``) is refused in seconds by ``ironcore config`` and by ``ironcore train`` before the data or
the model is built, instead of failing minutes later in an allocation.

The estimate is for the busiest rank: every pipeline rank is estimated and the largest is reported
(the first holds the embedding and the most micro-batches in flight, the last the LM head and its
logits). Notation: ``P`` parameters of the rank's pipeline stage (its TP shard: matrices split
over ``t = tensor_model_parallel_size``, the vocabulary-parallel embedding/head ``V/t`` rows, norms
and biases of the row-parallel layers replicated), ``c`` bytes of the compute dtype
(``model.precision``: 4 for float32, 2 for bfloat16/float16), ``T = micro_batch_size × max_seq_len /
context_parallel_size`` tokens of one micro-batch (DPO: twice the rows, chosen and rejected).

Terms (bytes), and why each is what it is:

* **params** ``4 P``: parameters are always fp32 (they are the master weights; autocast computes
  in bf16/fp16, `ironcore.training.precision`). FSDP divides by the data-parallel shard count
  (``fsdp_sharding_strategy``: full = DP, hybrid = the DP ranks of a node, no_shard = 1); with
  ``fsdp_offload_params`` they live in host memory and count 0 on the device. A tied embedding on
  a separate last stage is a second copy there. DPO adds the frozen reference model (another 4 P).
* **grads** ``4 P`` (fp32, like the parameters; FSDP: sharded like them). DDP (DP > 1 on one
  pipeline stage, no FSDP or distributed optimizer) keeps its own gradient buckets: ``+4 P``. The
  distributed optimizer holds whole gradients until it reduce-scatters them, plus its ``1/DP`` slice.
* **optimizer** ``8 P``: Adam's two fp32 moments (the fp32 master copy *is* the parameter, so no
  third copy as in Megatron's bf16-parameter layout). ``parallel.use_distributed_optimizer``
  divides by DP × CP, FSDP by its shard count.
* **weight copies** ``c P_mm`` when ``c = 2``: autocast casts each matmul weight (every linear
  layer, and the LM head) to bf16/fp16 once per forward and keeps the copy, which backward saves,
  until the step ends. Not under FSDP's mixed precision (it all-gathers bf16 shards instead; see
  workspace).
* **activations**: the tensors saved for backward, counted per token from the code (pre-LN
  block, the same count for post-LN), per layer:
  - ``2 × (4d + 8)``: the fp32 residual stream into each norm and its mean/rstd (RMSNorm: ``+4d``
    each for its fp32 normalised copy); divided by ``t`` under sequence parallelism;
  - the matmul inputs: ``4d`` once in fp32 (the norm output, shared), else each linear casts it
    itself: ``3 c d`` for q/k/v, ``c d`` (SwiGLU: ``2 c d``) for the MLP — replicated over TP (or
    gathered, under SP), so not divided;
  - attention: q, k, v ``c (a + 2g) h / t``, the output ``c a h / t`` and logsumexp ``4 a / t``
    (flash / memory-efficient kernels: no ``s × s`` matrix). On CPU with ``dropout_attn > 0``
    torch's SDPA takes its math path instead: fp32 q/k/v and three fp32 ``a × s`` rows per token
    (probabilities, dropout mask, dropped probabilities) — quadratic in the sequence;
  - MLP: ``2 c f / t`` (the up projection and the activation's output), SwiGLU ``4 c f / t``;
  - dropout masks: 1 byte per element on GPU (bool), 4 on CPU, ``d`` per dropout (``/t`` under SP);
  plus, on the first stage, the token and position ids (16) and the embedding dropout mask, and on
  the last stage the final norm, the head's input (``4d``, or ``c d`` cast) and the loss: unfused
  (``model.cross_entropy_chunk_size: 0``) the fp32 softmax ``4 V/t`` kept for backward, fused only
  the logsumexp and the target (12). With ``operation.activation_recompute`` (full,
  ``recompute_strategy: default``) a layer keeps only its fp32 input ``4d`` (``/t`` under SP);
  selective (``optimized``) keeps the matmul and attention-kernel outputs (q/k/v, attention output
  and logsumexp, the o/down projections' ``c d`` each, the MLP's up/gate ``c f/t`` each) besides the
  input. The first pipeline stage holds this for every micro-batch in flight: 1F1B
  ``min(PP - rank, gradient_accumulation_steps)``, GPipe all of them, interleaved Megatron's
  ``× (1 + (PP-1)/(PP·v))`` on top of 1F1B's count.
* **workspace**: the largest temporary that exists beside the above, not saved for backward: the
  LM head's logits while the loss is computed (unfused: the matmul output ``c``, its fp32 copy when
  ``c = 2``, the copy with padded ids masked, each ``V/t`` per token, for one micro-batch; fused:
  the same for ``cross_entropy_chunk_size`` tokens, plus the head weight's cast copy and the fp32
  accumulator of its gradient ``4 V d / t``), or, under recompute, one layer's activations being
  recomputed in backward; FSDP adds the unsharded parameters of the root unit (embedding, head)
  and of two blocks (the one computing and the one prefetched). The training peak is the persistent
  state (params, optimizer, weight copies) plus the larger of the forward's peak (activations and
  the head's forward temporaries; gradients only when they already exist: accumulation, DDP
  buckets, pipelines) and the backward's (activations plus the larger of the head's backward
  temporaries and the gradients; an upper bound, as layers free their activations while their
  gradients appear). With ``set_to_none`` gradients (the trainer's) a single micro-batch's forward
  holds no gradients.
* **eval**: evaluation (``trainer.do_eval``/``do_test``) runs forward only over
  ``eval_batch_size`` sequences (micro_batch_size when unset): nothing is saved, but its logits must
  fit (unfused: the matmul output, fp32 copy, masked and shifted copies, ``eval_batch × s × V/t``),
  beside params, optimizer state and one layer's live intermediates. The rank's total is the larger
  of the training step and the evaluation.

What is approximate: the activation count follows IronCore's kernels as of writing (it matches
the bytes saved for backward within a few percent in ``tests/test_memory_estimate.py``); the
allocator's fragmentation and caching (CUDA's caching allocator, glibc's arenas), communication
buffers (NCCL, DDP's and FSDP's collectives), the CUDA context (several hundred MB per GPU),
torch.compile's workspaces, activation gradients in flight during backward and the data loader are
not counted; ring attention (CP > 1) is counted like local attention over ``s/CP`` tokens;
selective recompute's saved outputs and the interleaved schedule's in-flight count are modelled,
not measured. Treat the estimate as a lower bound on what the device must hold: a config it
refuses cannot run; one it accepts may still need headroom.
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

from ironcore.config.errors import ConfigError
from ironcore.config.schema import Config

GiB = 1024 ** 3
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def padded_vocab_size(vocab_size: int, padding_unit: int, tp_size: int) -> int:
    """`vocab_size` rounded up to a multiple of ``padding_unit × tp_size`` (even TP split, tensor
    core friendly shapes): the model's vocabulary. Padded ids never receive probability mass in the loss."""
    return _ceil_div(vocab_size, padding_unit * tp_size) * padding_unit * tp_size


def format_bytes(n: float) -> str:
    """``1.23 GiB``, ``456.7 MiB``, or for absurd values ``2.1e+15 B``."""
    if n >= 1024 ** 5:
        return f"{n:.2e} B"
    for unit, size in (("TiB", 1024 ** 4), ("GiB", GiB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclass
class MemoryEstimate:
    """Bytes one rank needs (the module docstring explains each term)."""

    params: int
    grads: int
    optimizer: int
    weight_copies: int
    activations: int
    forward_workspace: int           # temporaries at the forward's peak (the LM head's logits)
    backward_workspace: int          # temporaries at the backward's peak (head gradient, a recomputed layer)
    eval_activations: int            # evaluation's forward-only working set (0 without evaluation)
    micro_batch: int
    in_flight: int                   # micro-batches whose activations the rank holds at once
    recompute: str                   # "off", "full" or "selective"
    pipeline_rank: int               # the rank estimated (the busiest pipeline rank)
    eval_batch: int = 0
    vocab_known: bool = True
    device_memory: Optional[int] = None
    device: str = ""
    parts: dict[str, int] = field(default_factory=dict)  # activation pieces per micro-batch, for messages

    grads_in_forward: bool = False   # gradients already allocated during forward (accumulation, DDP, PP)

    @property
    def workspace(self) -> int:
        return max(self.forward_workspace, self.backward_workspace)

    @property
    def train_total(self) -> int:
        """The training step's peak: the persistent state, plus the larger of the forward's peak
        (activations, head logits; gradients only when they already exist) and the backward's
        (gradients allocated while activations are still held: an upper bound, as each layer's
        activations are freed once its gradients exist)."""
        forward = self.activations + self.forward_workspace + (self.grads if self.grads_in_forward else 0)
        backward = self.activations + max(self.backward_workspace, self.grads)
        return self.params + self.optimizer + self.weight_copies + max(forward, backward)

    @property
    def eval_total(self) -> int:
        if not self.eval_activations:
            return 0
        return self.params + self.optimizer + self.weight_copies + self.eval_activations

    @property
    def total(self) -> int:
        return max(self.train_total, self.eval_total)

    def summary(self) -> str:
        """One line: ``memory estimate per rank: params X, grads Y, ... total T of device D``."""
        f = format_bytes
        text = (f"memory estimate per rank: params {f(self.params)}, grads {f(self.grads)}, optimizer "
                f"{f(self.optimizer)}")
        if self.weight_copies:
            text += f", autocast weight copies {f(self.weight_copies)}"
        text += (f", activations {f(self.activations)} (micro-batch {self.micro_batch}, {self.in_flight} in flight, "
                 f"recompute {self.recompute}), workspace {f(self.workspace)}")
        if self.eval_activations:
            text += f", evaluation {f(self.eval_total)} (eval batch {self.eval_batch})"
        text += f", total {f(self.total)}"
        if self.pipeline_rank:
            text += f" (pipeline rank {self.pipeline_rank})"
        if self.device_memory is not None:
            text += f" of {self.device} {f(self.device_memory)}"
        if not self.vocab_known:
            text += " (vocabulary unknown until the tokenizer loads: embedding and head not counted)"
        return text


# ---------------------------------------------------------------------------------------------
# Parameter counts
# ---------------------------------------------------------------------------------------------

def _layer_params(cfg: Config, tp: int) -> tuple[int, int]:
    """(parameters of one block on a TP rank, of which in matmul weights)."""
    m = cfg.model
    d, f, a = m.d_model, m.d_ffn, m.num_attention_heads
    h = m.head_dim or d // a
    g = m.num_attention_groups or a
    bias = not m.no_bias
    qkv = d * (a + 2 * g) * h // tp
    out = a * h * d // tp
    mlp = (3 if m.activation_type == "swiglu" else 2) * d * f // tp
    matmul = qkv + out + mlp
    biases = ((a + 2 * g) * h // tp + d + f // tp * (2 if m.activation_type == "swiglu" else 1) + d) if bias else 0
    norms = 2 * d * (2 if m.ln_type == "layernorm" and bias else 1)
    return matmul + biases + norms, matmul


def _stage_layers(cfg: Config, pp: int, rank: int) -> int:
    """Layers pipeline rank ``rank`` holds (all its virtual chunks)."""
    v = cfg.parallel.virtual_pipeline_stages if pp > 1 else 1
    stages = pp * v
    split = cfg.parallel.pipeline_layer_split
    if split and len(split) == stages and all(isinstance(c, int) for c in split):
        counts = list(split)
    else:
        counts = [cfg.model.num_layers // stages + (1 if i < cfg.model.num_layers % stages else 0)
                  for i in range(stages)]
    return sum(counts[k * pp + rank] for k in range(v))


# ---------------------------------------------------------------------------------------------
# Activations per token
# ---------------------------------------------------------------------------------------------

def _layer_activation_parts(cfg: Config, c: int, tp: int, sp: bool, seq: int, cpu: bool) -> dict[str, float]:
    """Bytes saved for backward by one block, per token (module docstring)."""
    m = cfg.model
    d, f, a = m.d_model, m.d_ffn, m.num_attention_heads
    h = m.head_dim or d // a
    g = m.num_attention_groups or a
    swiglu = m.activation_type == "swiglu"
    spd = tp if sp else 1
    mask = 4 if cpu else 1
    norms = 2 * (4 * d + 8) + (2 * 4 * d if m.ln_type == "rmsnorm" else 0)
    dropout = sum(mask * d for p in (m.dropout_attn, m.dropout_mlp) if p > 0)
    inputs = 8 * d if c == 4 else (3 + (2 if swiglu else 1)) * c * d
    if cpu and m.dropout_attn > 0:   # SDPA's math path: fp32 q/k/v, three fp32 a × s rows
        attention = (4 * (a + 2 * g) * h + 12 * a * seq + c * a * h) / tp
    else:
        attention = (c * (a + 2 * g) * h + c * a * h + 4 * a) / tp
    return {"norms": (norms + dropout) / spd, "matmul inputs": inputs, "attention": attention,
            "mlp": (4 if swiglu else 2) * c * f / tp}


def _selective_layer_bytes(cfg: Config, c: int, tp: int, sp: bool) -> float:
    """Per token, what selective recompute keeps of a block: its input and the matmul/attention outputs."""
    m = cfg.model
    d, f, a = m.d_model, m.d_ffn, m.num_attention_heads
    h = m.head_dim or d // a
    g = m.num_attention_groups or a
    up = (2 if m.activation_type == "swiglu" else 1) * c * f / tp
    return 4 * d / (tp if sp else 1) + (c * (a + 2 * g) * h + c * a * h + 4 * a) / tp + 2 * c * d + up


def _logits_bytes(c: int, padded: bool, shifted: bool) -> int:
    """Bytes per logit of the head's temporaries: the matmul output, its fp32 copy (c = 2), the
    copy with padded ids masked, and (for evaluation) the shifted copy that becomes the softmax."""
    return c + (4 if c != 4 else 0) + (4 if padded else 0) + (4 if shifted else 0)


# ---------------------------------------------------------------------------------------------
# The estimate
# ---------------------------------------------------------------------------------------------

def _in_flight(cfg: Config, pp: int, rank: int, m: int) -> int:
    schedule = cfg.parallel.pipeline_schedule if pp > 1 else "1f1b"
    if pp == 1:
        return 1
    if schedule == "gpipe":
        return m
    count = min(pp - rank, m)
    if schedule == "interleaved":
        v = cfg.parallel.virtual_pipeline_stages
        count = math.ceil(count * (1 + (pp - 1) / (pp * v)))
    return count


def _fsdp_shards(cfg: Config, dp: int) -> int:
    p = cfg.parallel
    if not p.use_fsdp or p.fsdp_sharding_strategy == "no_shard":
        return 1
    if p.fsdp_sharding_strategy == "hybrid":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
        per_node = local // (cfg.trainer.tensor_model_parallel_size * cfg.trainer.context_parallel_size)
        return max(1, math.gcd(dp, per_node)) if per_node else dp
    return dp


def estimate_memory(cfg: Config, vocab_size: Optional[int] = None, device_type: str = "cuda") -> MemoryEstimate:
    """The busiest rank's memory (module docstring) for a validated ``cfg``; ``vocab_size``: the real
    vocabulary (default ``data.vocab_size``; unknown: embedding and head are left out);
    ``device_type``: ``cuda`` or ``cpu`` (dropout masks and CPU attention differ)."""
    per_rank = [_estimate_rank(cfg, vocab_size, device_type, rank)
                for rank in range(cfg.trainer.pipeline_model_parallel_size)]
    return max(per_rank, key=lambda e: (e.total, -e.pipeline_rank))


def _estimate_rank(cfg: Config, vocab_size: Optional[int], device_type: str, rank: int) -> MemoryEstimate:
    t, m, p, op = cfg.trainer, cfg.model, cfg.parallel, cfg.operation
    tp, pp, cp = t.tensor_model_parallel_size, t.pipeline_model_parallel_size, t.context_parallel_size
    dp = max(1, p.world_size // (tp * pp * cp))
    c = _DTYPE_BYTES[m.precision]
    cpu = device_type == "cpu"
    sp = p.sequence_parallel and tp > 1
    spd = tp if sp else 1
    d = m.d_model
    first, last = rank == 0, rank == pp - 1
    vocab = vocab_size if vocab_size is not None else cfg.data.vocab_size
    known = vocab is not None
    V = padded_vocab_size(vocab, t.vocab_padding_unit, tp) if known else 0
    padded = known and V != vocab
    Vt = V // tp
    dpo = cfg.data.task_type == "dpo"
    seq = _ceil_div(m.max_seq_len, cp)
    rows = t.micro_batch_size * (2 if dpo else 1)
    tokens = rows * seq
    fused = m.cross_entropy_chunk_size > 0

    # Parameters of this rank's stage.
    layers = _stage_layers(cfg, pp, rank)
    layer_params, layer_matmul = _layer_params(cfg, tp)
    norm_params = d * (2 if m.ln_type == "layernorm" and not m.no_bias else 1)
    embedding = Vt * d if first else 0
    positions = (m.max_seq_len + m.positional_embedding.offset) * d if first and m.positional_embedding.type == "absolute" else 0
    head = Vt * d if last and (m.untie_embed or not first) else 0
    final_norm = norm_params if last and not m.post_ln else 0
    n_params = layers * layer_params + embedding + positions + head + final_norm
    n_matmul = layers * layer_matmul + (Vt * d if last else 0)   # the head (tied: the embedding's weight)

    shards = _fsdp_shards(cfg, dp)
    offload = p.use_fsdp and p.fsdp_offload_params
    params = 0 if offload else 4 * _ceil_div(n_params, shards)
    grads = 0 if offload else 4 * _ceil_div(n_params, shards)
    if p.use_distributed_optimizer and not p.use_fsdp:
        grads += 4 * _ceil_div(n_params, dp * cp)
        optimizer = 8 * _ceil_div(n_params, dp * cp)
    else:
        optimizer = 0 if offload else 8 * _ceil_div(n_params, shards)
        if dp * cp > 1 and pp == 1 and not p.use_fsdp:
            grads += 4 * n_params  # DDP's gradient buckets
    if dpo:
        params += 0 if offload else 4 * _ceil_div(n_params, shards)   # the frozen reference
    weight_copies = c * n_matmul if c != 4 and not p.use_fsdp else 0

    # Activations of one micro-batch, per token.
    parts = _layer_activation_parts(cfg, c, tp, sp, seq, cpu)
    full_layer = sum(parts.values())
    recompute = "off"
    if op.activation_recompute:
        recompute = "full" if op.recompute_strategy == "default" else "selective"
    kept_layer = {"off": full_layer, "full": 4 * d / spd,
                  "selective": _selective_layer_bytes(cfg, c, tp, sp)}[recompute]
    per_token = layers * kept_layer
    if first:
        per_token += 16 + ((4 if cpu else 1) * d / spd if m.dropout_embd > 0 else 0)
    if last and known:
        per_token += (4 * d + 8) / spd + (4 * d if m.ln_type == "rmsnorm" else 0)  # final norm
        per_token += 4 * d if (c == 4 or fused) else c * d                          # head input
        per_token += 12 if fused else 4 * Vt + 17                                   # loss
    in_flight = _in_flight(cfg, pp, rank, t.gradient_accumulation_steps or 1)
    activations = int(per_token * tokens * in_flight)

    # Workspace: the largest temporaries beside the saved activations, in forward and in backward.
    forward_ws, backward_ws = 0, 0
    if last and known:
        if fused:
            chunk = min(m.cross_entropy_chunk_size, tokens)
            cast = c * Vt * d if c != 4 else 0
            forward_ws = chunk * Vt * _logits_bytes(c, padded, True) + cast
            backward_ws = forward_ws + 4 * Vt * d          # + the fp32 accumulator of the head's gradient
        else:
            forward_ws = tokens * Vt * _logits_bytes(c, padded, False)
            backward_ws = tokens * Vt * c if c != 4 else 0  # the logits' gradient cast for the head's matmul
    if recompute != "off":
        backward_ws = max(backward_ws, int(full_layer * tokens))
    if p.use_fsdp:
        root = embedding + positions + head + final_norm
        unsharded = (c if c != 4 else 4) * (root + 2 * layer_params)
        forward_ws, backward_ws = forward_ws + unsharded, backward_ws + unsharded
    # Gradients exist in forward when micro-batches accumulate into them or DDP keeps buckets.
    grads_in_forward = (t.gradient_accumulation_steps or 1) > 1 or pp > 1 or (dp * cp > 1 and not p.use_fsdp)

    # Evaluation: forward only, eval_batch_size sequences, nothing saved.
    eval_activations, eval_batch = 0, 0
    if t.do_eval or t.do_test:
        eval_batch = t.eval_batch_size or t.micro_batch_size
        eval_tokens = eval_batch * (2 if dpo else 1) * seq
        live = full_layer + 8 * d   # one layer's intermediates and the residual stream
        head_live = 0
        if last and known:
            head_live = (min(m.cross_entropy_chunk_size, eval_tokens) * Vt * _logits_bytes(c, padded, True)
                         / eval_tokens if fused else Vt * _logits_bytes(c, padded, True))
        eval_activations = int(eval_tokens * (live + head_live))

    return MemoryEstimate(
        params=params, grads=grads, optimizer=optimizer, weight_copies=weight_copies, activations=activations,
        forward_workspace=int(forward_ws), backward_workspace=int(backward_ws),
        grads_in_forward=grads_in_forward, eval_activations=eval_activations, micro_batch=t.micro_batch_size,
        in_flight=in_flight, recompute=recompute, pipeline_rank=rank, eval_batch=eval_batch, vocab_known=known,
        parts={"layers": int(layers * kept_layer * tokens * in_flight),
               "logits": int(tokens * 4 * Vt) if last and known and not fused else 0})


# ---------------------------------------------------------------------------------------------
# Device memory and the check
# ---------------------------------------------------------------------------------------------

def host_memory() -> int:
    """Physical RAM of this machine in bytes (0 when it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _nvidia_gpu_visible() -> bool:
    """Whether this host has an NVIDIA driver with GPUs (without importing torch)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    try:
        return bool(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return False


MEMORY_ENV = "IRONCORE_DEVICE_MEMORY"
_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
          "g": GiB, "gb": 1000**3, "gib": GiB, "t": 1024**4, "tb": 1000**4, "tib": 1024**4}


def parse_bytes(text: str) -> int:
    """``80GiB``, ``141 GB``, ``1e9`` -> bytes; raises ConfigError naming the variable otherwise."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    try:
        value = float(match.group(1)) * _UNITS[match.group(2).lower()]
        if not math.isfinite(value) or value < 0:
            raise ValueError
    except (AttributeError, KeyError, ValueError):
        raise ConfigError([f"environment variable {MEMORY_ENV}={text!r}: expected a size such as 80GiB or "
                           "141GB (0 disables the memory check)"]) from None
    return int(value)


def device_memory(device: Any = None, local_rank: int = 0) -> tuple[int, str]:
    """(bytes, description) of the memory one rank may use.

    ``IRONCORE_DEVICE_MEMORY`` (e.g. ``80GiB``; ``0`` turns the check off) overrides the detection,
    e.g. to check a GPU config with ``ironcore config`` on a login node without GPUs.

    ``device``: a ``torch.device`` (the run's); None: guess as the run would pick it (CUDA when a
    GPU is visible, else the CPU) — torch is imported only when a GPU may be there, so ``ironcore
    config`` stays light on a CPU host. CUDA: the local device's total memory. CPU: the physical RAM,
    shared by this node's ranks (``LOCAL_WORLD_SIZE``)."""
    kind = getattr(device, "type", None)
    override = os.environ.get(MEMORY_ENV, "").strip()
    if override:
        return parse_bytes(override), f"{MEMORY_ENV}={override}"
    if kind is None:
        torch = sys.modules.get("torch")
        if torch is None and _nvidia_gpu_visible():
            import torch  # noqa: F811 - only on a GPU host
        if torch is not None and torch.cuda.is_available():
            kind, device = "cuda", torch.device("cuda", local_rank % torch.cuda.device_count())
        else:
            kind = "cpu"
    if kind == "cuda":
        import torch
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return props.total_memory, f"device cuda:{index} ({props.name})"
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    ram = host_memory()
    if local > 1:
        return ram // local, f"host RAM / {local} local ranks"
    return ram, "host RAM (CPU)"


_KEYS = {
    "params": ["model.d_model", "model.num_layers", "model.d_ffn", "data.vocab_size",
               "trainer.tensor_model_parallel_size", "trainer.pipeline_model_parallel_size"],
    "activations": ["trainer.micro_batch_size", "model.max_seq_len", "model.d_model", "model.d_ffn",
                    "model.num_layers", "operation.activation_recompute", "model.cross_entropy_chunk_size"],
    "workspace": ["trainer.micro_batch_size", "model.max_seq_len", "model.cross_entropy_chunk_size",
                  "data.vocab_size"],
    "eval": ["trainer.eval_batch_size", "model.max_seq_len", "model.cross_entropy_chunk_size", "data.vocab_size"],
}


def _dominant_keys(cfg: Config, est: MemoryEstimate, prov: dict[str, str]) -> tuple[str, list[str]]:
    if est.eval_total > est.train_total:
        term = "eval"
    else:
        sizes = {"params": est.params + est.grads + est.optimizer + est.weight_copies,
                 "activations": est.activations, "workspace": est.workspace}
        term = max(sizes, key=sizes.get)
    keys = _KEYS[term]
    if term == "eval" and cfg.trainer.eval_batch_size is None:
        keys = ["trainer.micro_batch_size", *keys[1:]]
    # Keys set by the user first; defaults after (they matter too, but are not what changed).
    ranked = sorted(keys, key=lambda k: prov.get(k, "default") == "default")
    return term, ranked[:4]


def check_memory(cfg: Config, prov: Optional[dict[str, str]] = None, vocab_size: Optional[int] = None,
                 device: Any = None) -> MemoryEstimate:
    """The estimate with the device's memory filled in; raises ConfigError (naming the dominant keys,
    the estimate and the device's memory) when the estimate exceeds it."""
    from ironcore.config.validate import describe, origin, _get

    prov = prov or {}
    available, name = device_memory(device, cfg.parallel.local_rank)
    device_type = getattr(device, "type", None) or ("cpu" if "RAM" in name else "cuda")
    est = estimate_memory(cfg, vocab_size, device_type)
    est.device_memory, est.device = available, name
    if available and est.total > available:
        term, keys = _dominant_keys(cfg, est, prov)
        what = {"params": "parameters, gradients and optimizer state", "activations": "activations",
                "workspace": "the LM head's logits", "eval": "evaluation's logits and activations"}[term]
        settings = ", ".join(f"{k} = {describe(_get(cfg, k))} ({origin(prov.get(k, 'default'))})" for k in keys)
        advice = {"params": "use a smaller model, or shard it: tensor/pipeline parallelism, "
                            "parallel.use_distributed_optimizer or parallel.use_fsdp",
                  "activations": "lower trainer.micro_batch_size or model.max_seq_len, or set "
                                 "operation.activation_recompute / model.cross_entropy_chunk_size",
                  "workspace": "set model.cross_entropy_chunk_size (e.g. 1024) or lower trainer.micro_batch_size",
                  "eval": "lower trainer.eval_batch_size or set model.cross_entropy_chunk_size"}[term]
        raise ConfigError([f"the run needs about {format_bytes(est.total)} per rank, more than the "
                           f"{format_bytes(available)} of {name}; mostly {what}, from {settings}; {advice} "
                           f"({est.summary()})"])
    return est
