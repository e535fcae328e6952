"""Pipeline parallelism: stage partitioning, point-to-point transfers and the schedules.

The model's layers are split over the ``pp_size`` ranks of a pipeline group (and, with interleaving,
into ``virtual_stages`` chunks per rank). Global stage ``k·pp_size + r`` is chunk ``k`` of pipeline
rank ``r`` (Megatron's interleaved layout), so activations always flow to the next rank, wrapping
from the last rank back to the first between chunks. The first stage owns the embedding, the last
the final norm, the head and the loss.

Activations ``[b, s, d]`` (``[b, s/tp, d]`` under sequence parallelism) and their gradients cross
stages with batched ``isend``/``irecv`` (`torch.distributed.batch_isend_irecv`) between the same TP
rank of neighbouring stages. Every stage reads the same micro-batches from its own data iterator
(the ranks of a pipeline group share a data-parallel rank), so the shape of each transfer is
computed on both sides from the micro-batch itself: nothing about shapes is communicated, and
micro-batches of different lengths (unpadded SFT) still work.

Schedules over ``m`` micro-batches on ``p`` stages (``forward_backward``):

* ``gpipe``: all forwards, then all backwards; holds activations of all ``m`` micro-batches;
* ``1f1b``: ``p − rank − 1`` warm-up forwards, then one forward / one backward alternately, then the
  cool-down backwards; holds at most ``p − rank`` micro-batches (PipeDream-Flush / Megatron);
* ``interleaved``: 1F1B over ``v`` model chunks per rank (Megatron's virtual pipeline); the bubble
  shrinks by ``v`` at the cost of ``v``× more point-to-point traffic.

The bubble of the non-interleaved schedules is ``(p − 1) / (m + p − 1)`` of the step.

After the schedule, `finalize_model_grads` all-reduces gradients over the data-parallel group for
stages that do not reduce their own (several stages are never wrapped in DDP: its hooks assume
forward and backward alternate; FSDP stages reduce-scatter in backward). What a micro-batch is and
what a stage computes from it is the caller's ``forward_step``: this module knows tensors and
ranks, not the model (the tied embedding's sync is ``ironcore.training.tied_embedding``'s).

Failures: a stage that raises reports the stage, rank and micro-batch; its neighbours, blocked in a
transfer, give up after ``timeout_minute`` with a message naming the peer they waited for. No rank
waits forever.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.parallel import DistributedDataParallel

from ironcore.observe.profiling import phase
from ironcore.parallel import data_parallel
from ironcore.parallel.state import ParallelState

SCHEDULES = ("1f1b", "gpipe", "interleaved")
_FORWARD_TAG, _BACKWARD_TAG = 1, 2  # keep activations and gradients apart when both go to one peer


class PipelineError(RuntimeError):
    """A pipeline stage failed, or a transfer with a neighbouring stage did not complete."""


# ---------------------------------------------------------------------------------------------------
# Stage partitioning


@dataclass(frozen=True)
class PipelineStage:
    """One model chunk's place in the pipeline: global stage ``index`` of ``num_stages`` holding
    the layers ``[layer_start, layer_end)`` of the whole model."""

    index: int
    num_stages: int
    layer_start: int
    layer_end: int

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_start


def stage_layer_counts(num_layers: int, num_stages: int, layer_split: Optional[Sequence[int]] = None) -> list[int]:
    """Layers per global stage: ``layer_split`` when given (checked), else an even split.

    Raises ValueError naming the config keys when the layers cannot be split as asked.
    """
    if layer_split is None:
        if num_layers % num_stages:
            raise ValueError(
                f"model.num_layers ({num_layers}) is not divisible by the number of pipeline stages "
                f"({num_stages} = trainer.pipeline_model_parallel_size × parallel.virtual_pipeline_stages); "
                f"change one of them or give the layers per stage in parallel.pipeline_layer_split")
        return [num_layers // num_stages] * num_stages
    counts = list(layer_split)
    if len(counts) != num_stages or not all(isinstance(c, int) and c >= 0 for c in counts):
        raise ValueError(
            f"parallel.pipeline_layer_split ({counts}) must list {num_stages} non-negative layer counts, one per "
            f"pipeline stage (trainer.pipeline_model_parallel_size × parallel.virtual_pipeline_stages)")
    if sum(counts) != num_layers:
        raise ValueError(f"parallel.pipeline_layer_split ({counts}) sums to {sum(counts)}, but model.num_layers "
                         f"is {num_layers}")
    if any(c == 0 for c in counts[1:-1]):
        raise ValueError(f"parallel.pipeline_layer_split ({counts}): only the first and last stages (which hold "
                         f"the embedding and the head) may have 0 layers")
    return counts


def pipeline_stages(num_layers: int, pp_size: int, pp_rank: int, virtual_stages: int = 1,
                    layer_split: Optional[Sequence[int]] = None) -> list[PipelineStage]:
    """The model chunks of pipeline rank ``pp_rank``, in order: chunk ``k`` is global stage
    ``k × pp_size + pp_rank`` of ``pp_size × virtual_stages``."""
    if virtual_stages < 1:
        raise ValueError(f"parallel.virtual_pipeline_stages must be >= 1, got {virtual_stages}")
    if virtual_stages > 1 and pp_size == 1:
        raise ValueError("parallel.virtual_pipeline_stages > 1 needs trainer.pipeline_model_parallel_size > 1")
    num_stages = pp_size * virtual_stages
    counts = stage_layer_counts(num_layers, num_stages, layer_split)
    starts = [sum(counts[:i]) for i in range(num_stages + 1)]
    return [PipelineStage(k * pp_size + pp_rank, num_stages, starts[k * pp_size + pp_rank],
                          starts[k * pp_size + pp_rank + 1]) for k in range(virtual_stages)]


# ---------------------------------------------------------------------------------------------------
# Point-to-point transfers


def activation_shape(batch: dict, hidden_size: int, tp_size: int = 1, sequence_parallel: bool = False) -> tuple:
    """Shape of the hidden states crossing stages for this micro-batch: ``[b, s, d]``, or
    ``[b, s/tp, d]`` under sequence parallelism (each TP rank sends its own sequence chunk)."""
    b, s = batch["input_ids"].shape[:2]
    if sequence_parallel and tp_size > 1:
        if s % tp_size:
            raise ValueError(f"sequence length {s} is not divisible by trainer.tensor_model_parallel_size "
                             f"({tp_size}), which parallel.sequence_parallel needs")
        s //= tp_size
    return (b, s, hidden_size)


class _P2P:
    """Batched isend/irecv with the previous and next rank of the pipeline group (wrapping around,
    which only the interleaved schedule uses). Every wait is bounded by the timeout."""

    def __init__(self, pstate: ParallelState, dtype: torch.dtype, timeout: timedelta):
        ranks = dist.get_process_group_ranks(pstate.pp_group)
        self.group, self.rank, self.stage = pstate.pp_group, pstate.rank, pstate.pp_rank
        self.prev = ranks[(pstate.pp_rank - 1) % pstate.pp_size]
        self.next = ranks[(pstate.pp_rank + 1) % pstate.pp_size]
        self.device, self.dtype, self.timeout = pstate.device, dtype, timeout

    def exchange(self, send_next: Optional[torch.Tensor] = None, send_prev: Optional[torch.Tensor] = None,
                 recv_prev: Optional[tuple] = None, recv_next: Optional[tuple] = None,
                 ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Send activations forward / gradients backward and receive tensors of the given shapes
        from the previous (activations) / next (gradients) rank, all in one batch. Returns
        ``(from_prev, from_next)``."""
        ops, from_prev, from_next = [], None, None
        if send_next is not None:
            ops.append(dist.P2POp(dist.isend, send_next, self.next, self.group, _FORWARD_TAG))
        if recv_prev is not None:
            from_prev = torch.empty(recv_prev, dtype=self.dtype, device=self.device)
            ops.append(dist.P2POp(dist.irecv, from_prev, self.prev, self.group, _FORWARD_TAG))
        if send_prev is not None:
            ops.append(dist.P2POp(dist.isend, send_prev, self.prev, self.group, _BACKWARD_TAG))
        if recv_next is not None:
            from_next = torch.empty(recv_next, dtype=self.dtype, device=self.device)
            ops.append(dist.P2POp(dist.irecv, from_next, self.next, self.group, _BACKWARD_TAG))
        if not ops:
            return None, None
        names = [name for name, wanted in zip(("pp-send-forward", "pp-recv-forward", "pp-send-backward", "pp-recv-backward"),
                                              (send_next, recv_prev, send_prev, recv_next)) if wanted is not None]
        try:
            with phase("+".join(names)):
                for work in dist.batch_isend_irecv(ops):
                    work.wait(self.timeout)
        except RuntimeError as e:
            peers = sorted({op.peer for op in ops})
            raise PipelineError(
                f"pipeline stage {self.stage} (rank {self.rank}): transfer with rank(s) {peers} did not complete "
                f"within parallel.timeout_minute ({self.timeout.total_seconds() / 60:g} min) or the peer went away; "
                f"a neighbouring stage probably failed (see its error): {e}") from e
        return from_prev, from_next


# ---------------------------------------------------------------------------------------------------
# Forward and backward of one micro-batch on one chunk


class _MicroBatches:
    """Draws micro-batches from the iterator on first use, so every chunk of this rank (and the
    shapes of transfers) see the same batch for the same index."""

    def __init__(self, data_iterator: Iterator[dict]):
        self.iterator, self.cache, self.drawn = data_iterator, {}, 0

    def __getitem__(self, index: int) -> dict:
        while self.drawn <= index:
            self.cache[self.drawn] = next(self.iterator)
            self.drawn += 1
        return self.cache[index]


class _Runner:
    """State shared by the schedules: the chunks, the transfers and the per-micro-batch steps."""

    def __init__(self, model_chunks, batches: _MicroBatches, pstate, loss_fn, forward_step, p2p: Optional[_P2P],
                 shape_fn, dtype, scale_loss, forward_only: bool, num_microbatches: int):
        self.chunks, self.batches, self.pstate, self.p2p = model_chunks, batches, pstate, p2p
        self.loss_fn, self.forward_step, self.shape_fn, self.dtype = loss_fn, forward_step, shape_fn, dtype
        self.scale_loss, self.forward_only, self.m = scale_loss, forward_only, num_microbatches
        self.num_chunks = len(model_chunks)
        self.losses: list[torch.Tensor] = []
        self.in_flight = self.max_in_flight = 0

    def shape(self, microbatch: int) -> tuple:
        return self.shape_fn(self.batches[microbatch])

    def is_first(self, chunk: int) -> bool:
        return self.pstate.is_first_stage and chunk == 0

    def is_last(self, chunk: int) -> bool:
        return self.pstate.is_last_stage and chunk == self.num_chunks - 1

    def forward(self, chunk: int, microbatch: int, input_tensor: Optional[torch.Tensor]) -> torch.Tensor:
        """Forward of one micro-batch on one chunk. Returns the tensor to send on (non-last chunk)
        or the loss to back-propagate (last chunk: ``loss / m``, scaled by ``scale_loss``)."""
        batch = self.batches[microbatch]
        if input_tensor is not None and not self.forward_only:
            input_tensor.requires_grad_(True)
        try:
            # one "forward" range per micro-batch and chunk, the loss included (profile_summary's compute)
            with torch.set_grad_enabled(not self.forward_only), phase("forward"):
                output = self.forward_step(self.chunks[chunk], batch, input_tensor)
                if self.is_last(chunk):
                    loss = self.loss_fn(output, batch)
                    self.losses.append(loss.detach())
                    output = loss / self.m
                    if self.scale_loss is not None:
                        output = self.scale_loss(output)
        except Exception as e:
            self.fail("forward", chunk, microbatch, e)
        if not self.forward_only:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if not self.is_last(chunk):
            expected = self.shape(microbatch)
            if tuple(output.shape) != tuple(expected):
                raise PipelineError(
                    f"pipeline stage {self.stage_index(chunk)} (rank {self.pstate.rank}) produced hidden states of "
                    f"shape {tuple(output.shape)} for micro-batch {microbatch}, but the next stage expects "
                    f"{tuple(expected)}")
        return output

    def backward(self, chunk: int, microbatch: int, input_tensor: Optional[torch.Tensor], output: torch.Tensor,
                 output_grad: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Back-propagate one micro-batch through one chunk; returns the gradient for the previous
        stage (None on the first stage)."""
        try:
            with phase("backward"):
                if output_grad is None:
                    torch.autograd.backward(output)
                else:
                    torch.autograd.backward(output, grad_tensors=output_grad.to(output.dtype))
        except Exception as e:
            self.fail("backward", chunk, microbatch, e)
        self.in_flight -= 1
        return None if input_tensor is None else input_tensor.grad

    def stage_index(self, chunk: int) -> int:
        return chunk * self.pstate.pp_size + self.pstate.pp_rank

    def fail(self, phase: str, chunk: int, microbatch: int, error: Exception) -> None:
        """Re-raise `error`: with several stages as a PipelineError naming the stage, the rank and
        the micro-batch (the other ranks only see a transfer time out); unchanged with one stage."""
        if self.pstate.pp_size == 1:
            raise error
        raise PipelineError(f"pipeline stage {self.stage_index(chunk)} (rank {self.pstate.rank}) failed in the "
                            f"{phase} of micro-batch {microbatch}: {type(error).__name__}: {error}") from error

    def sendable(self, output: torch.Tensor) -> torch.Tensor:
        return output.detach().to(self.dtype).contiguous()


# ---------------------------------------------------------------------------------------------------
# Schedules


def _no_pipelining(run: _Runner) -> None:
    """One stage: forward and backward of each micro-batch in turn. A DDP- or FSDP-wrapped model
    reduces gradients only in the last micro-batch's backward (``data_parallel.no_sync`` on the others)."""
    model = run.chunks[0]
    for i in range(run.m):
        with data_parallel.no_sync(model) if i < run.m - 1 else contextlib.nullcontext():
            run.backward(0, i, None, run.forward(0, i, None), None)


def _forward_only(run: _Runner) -> None:
    """Evaluation, any schedule and any number of micro-batches: each micro-batch passes through
    the chunks in stage order (one chain of transfers, so no schedule is needed)."""
    for i in range(run.m):
        for c in range(run.num_chunks):
            x = None if run.is_first(c) else run.p2p.exchange(recv_prev=run.shape(i))[0]
            y = run.forward(c, i, x)
            if not run.is_last(c):
                run.p2p.exchange(send_next=run.sendable(y))


def _gpipe(run: _Runner) -> None:
    """All forwards, then all backwards (in the same micro-batch order)."""
    p2p, first, last = run.p2p, run.is_first(0), run.is_last(0)
    inputs, outputs = [], []
    for i in range(run.m):
        x, _ = p2p.exchange(recv_prev=None if first else run.shape(i))
        y = run.forward(0, i, x)
        p2p.exchange(send_next=None if last else run.sendable(y))
        inputs.append(x)
        outputs.append(y)
    for i in range(run.m):
        _, g = p2p.exchange(recv_next=None if last else run.shape(i))
        dx = run.backward(0, i, inputs[i], outputs[i], g)
        inputs[i] = outputs[i] = None
        p2p.exchange(send_prev=None if first else dx)


def _one_f_one_b(run: _Runner) -> None:
    """Warm-up forwards, steady one-forward-one-backward, cool-down backwards (Megatron's
    non-interleaved schedule): stage ``r`` holds at most ``p − r`` micro-batches' activations."""
    p2p, first, last = run.p2p, run.is_first(0), run.is_last(0)
    p, m = run.pstate.pp_size, run.m
    warmup = min(p - run.pstate.pp_rank - 1, m)
    inputs, outputs = [], []
    next_backward = 0  # the oldest micro-batch still waiting for its backward

    def recv_forward(i):
        return p2p.exchange(recv_prev=None if first else run.shape(i))[0]

    for i in range(warmup):
        x = recv_forward(i)
        y = run.forward(0, i, x)
        p2p.exchange(send_next=None if last else run.sendable(y))
        inputs.append(x)
        outputs.append(y)
    x = recv_forward(warmup) if warmup < m else None
    for i in range(warmup, m):
        y = run.forward(0, i, x)
        inputs.append(x)
        outputs.append(y)
        _, g = p2p.exchange(send_next=None if last else run.sendable(y),
                            recv_next=None if last else run.shape(next_backward))
        dx = run.backward(0, next_backward, inputs.pop(0), outputs.pop(0), g)
        next_backward += 1
        more = i + 1 < m
        x, _ = p2p.exchange(send_prev=None if first else dx,
                            recv_prev=run.shape(i + 1) if more and not first else None)
    while next_backward < m:
        _, g = p2p.exchange(recv_next=None if last else run.shape(next_backward))
        dx = run.backward(0, next_backward, inputs.pop(0), outputs.pop(0), g)
        next_backward += 1
        p2p.exchange(send_prev=None if first else dx)


def _interleaved(run: _Runner) -> None:
    """Interleaved 1F1B over ``v`` chunks per rank (Megatron-LM's
    ``forward_backward_pipelining_with_interleaving``). Virtual micro-batch ``k`` runs chunk
    ``(k mod p·v) // p`` (in reverse order for backwards) on micro-batch
    ``(k // p·v)·p + k mod p``; ``m`` must be a multiple of ``p``."""
    p2p, p, v, m = run.p2p, run.pstate.pp_size, run.num_chunks, run.m
    rank, first_rank, last_rank = run.pstate.pp_rank, run.pstate.is_first_stage, run.pstate.is_last_stage
    total = m * v
    if m == p:
        warmup = total
    else:
        warmup = min((p - rank - 1) * 2 + (v - 1) * p, total)
    remaining = total - warmup

    def chunk_of(k: int, forward: bool) -> int:
        c = (k % (p * v)) // p
        return c if forward else v - 1 - c

    def microbatch_of(k: int) -> int:
        return (k // (p * v)) * p + k % p

    inputs = [[] for _ in range(v)]        # per chunk: received activations, FIFO by micro-batch
    outputs = [[] for _ in range(v)]
    grads = [[] for _ in range(v)]         # per chunk: received output gradients
    seen_inputs, seen_grads = [0] * v, [0] * v  # micro-batch index of the next tensor per chunk

    def add_input(chunk: int, tensor) -> None:
        inputs[chunk].append(tensor)
        seen_inputs[chunk] += 1

    def add_grad(chunk: int, tensor) -> None:
        grads[chunk].append(tensor)
        seen_grads[chunk] += 1

    def forward_k(k: int) -> Optional[torch.Tensor]:
        c = chunk_of(k, True)
        if run.is_first(c) and len(inputs[c]) == len(outputs[c]):
            add_input(c, None)
        y = run.forward(c, microbatch_of(k), inputs[c][-1])
        outputs[c].append(y)
        return None if run.is_last(c) else run.sendable(y)

    def backward_k(k: int) -> Optional[torch.Tensor]:
        c = chunk_of(k, False)
        if run.is_last(c) and not grads[c]:
            add_grad(c, None)
        dx = run.backward(c, microbatch_of(k), inputs[c].pop(0), outputs[c].pop(0), grads[c].pop(0))
        return None if run.is_first(c) else dx

    def recv_shape_input(chunk: int, wanted: bool) -> Optional[tuple]:
        return run.shape(seen_inputs[chunk]) if wanted else None

    def recv_shape_grad(chunk: int, wanted: bool) -> Optional[tuple]:
        return run.shape(seen_grads[chunk]) if wanted else None

    if not first_rank:
        add_input(0, p2p.exchange(recv_prev=run.shape(0))[0])

    for k in range(warmup):
        y = forward_k(k)
        next_c = chunk_of(k + 1, True)
        recv_prev = not (first_rank and next_c == 0) and k != total - 1
        if k == warmup - 1 and remaining > 0:
            recv_next = not last_rank
            x, g = p2p.exchange(send_next=y, recv_prev=recv_shape_input(next_c, recv_prev),
                                recv_next=recv_shape_grad(v - 1, recv_next))
            if recv_next:
                add_grad(v - 1, g)
        else:
            x, _ = p2p.exchange(send_next=y, recv_prev=recv_shape_input(next_c, recv_prev))
        if recv_prev:
            add_input(next_c, x)

    for k in range(remaining):
        fk = k + warmup
        y = forward_k(fk)
        dx = backward_k(k)
        recv_prev = True
        if first_rank:
            next_fc = chunk_of(fk - (p - 1), True)  # the first rank runs p − 1 virtual steps ahead
            recv_prev = next_fc != v - 1
            next_fc += 1
        else:
            next_fc = chunk_of(fk + 1, True)
        recv_next = True
        if last_rank:
            next_bc = chunk_of(k - (p - 1), False)  # the last rank runs p − 1 virtual steps ahead
            recv_next = next_bc != 0
            next_bc -= 1
        else:
            next_bc = chunk_of(k + 1, False)
        if k == remaining - 1:
            recv_prev = False
        x, g = p2p.exchange(send_next=y, send_prev=dx, recv_prev=recv_shape_input(next_fc, recv_prev),
                            recv_next=recv_shape_grad(next_bc, recv_next))
        if recv_prev:
            add_input(next_fc, x)
        if recv_next:
            add_grad(next_bc, g)

    if remaining == 0:  # every forward ran in the warm-up: the first gradient is still to come
        _, g = p2p.exchange(recv_next=recv_shape_grad(v - 1, not last_rank))
        if not last_rank:
            add_grad(v - 1, g)
    for k in range(remaining, total):
        dx = backward_k(k)
        next_bc = chunk_of(k + 1, False)
        recv_next = not (last_rank and next_bc == v - 1) and k != total - 1
        _, g = p2p.exchange(send_prev=dx, recv_next=recv_shape_grad(next_bc, recv_next))
        if recv_next:
            add_grad(next_bc, g)


_SCHEDULE_FNS = {"gpipe": _gpipe, "1f1b": _one_f_one_b, "interleaved": _interleaved}


def check_schedule(schedule: str, pp_size: int, num_chunks: int, num_microbatches: int,
                   forward_only: bool = False) -> None:
    """Raise ValueError (naming the config keys) when the schedule cannot run this layout
    (evaluation, ``forward_only``, runs any number of micro-batches)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"parallel.pipeline_schedule is {schedule!r}; allowed: {', '.join(SCHEDULES)}")
    if pp_size > 1 and num_microbatches < pp_size and not forward_only:
        raise ValueError(
            f"pipeline parallelism needs at least as many micro-batches as stages: "
            f"trainer.gradient_accumulation_steps is {num_microbatches} but trainer.pipeline_model_parallel_size "
            f"is {pp_size}; raise trainer.train_batch_size or gradient_accumulation_steps")
    if schedule == "interleaved":
        if pp_size == 1 or num_chunks < 2:
            raise ValueError("parallel.pipeline_schedule: interleaved needs trainer.pipeline_model_parallel_size > 1 "
                             f"and parallel.virtual_pipeline_stages >= 2 (got {pp_size} and {num_chunks})")
        if num_microbatches % pp_size and not forward_only:
            raise ValueError(
                f"parallel.pipeline_schedule: interleaved needs trainer.gradient_accumulation_steps "
                f"({num_microbatches}) to be a multiple of trainer.pipeline_model_parallel_size ({pp_size})")
    elif num_chunks != 1:
        raise ValueError(f"parallel.virtual_pipeline_stages > 1 ({num_chunks} model chunks) needs "
                         f"parallel.pipeline_schedule: interleaved (got {schedule})")


def forward_backward(schedule: str, model_chunks: Sequence[nn.Module], data_iterator: Iterator[dict],
                     num_microbatches: int, pstate: ParallelState,
                     loss_fn: Callable[[torch.Tensor, dict], torch.Tensor], *, hidden_size: int,
                     sequence_parallel: bool = False,
                     forward_step: Callable[[nn.Module, dict, Optional[torch.Tensor]], torch.Tensor],
                     dtype: torch.dtype = torch.float32,
                     scale_loss: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                     forward_only: bool = False, timeout_minute: float = 10.0,
                     stats: Optional[dict] = None) -> list[torch.Tensor]:
    """Run forward and backward of ``num_microbatches`` micro-batches through this rank's chunks.

    Args:
        schedule: ``1f1b``, ``gpipe`` or ``interleaved`` (one chunk per rank for the first two).
        model_chunks: this rank's chunks in order (`pipeline_stages`); not DDP-wrapped when the
            pipeline has more than one stage (FSDP-sharded ones are fine; `finalize_model_grads`
            reduces the others over DP).
        data_iterator: yields micro-batch dicts (``input_ids``, ``labels``, ``loss_mask``,
            ``position_ids``, optional ``segment_ids``); every stage draws the same micro-batches.
        loss_fn: ``loss_fn(last_stage_output, batch) -> scalar`` (e.g. the masked mean loss).
        hidden_size: ``d_model``, the last dim of the hidden states crossing stages.
        sequence_parallel: hidden states are split along the sequence over TP (``[b, s/tp, d]``).
        forward_step: ``forward_step(chunk, batch, hidden_states_or_None) -> output``: the
            model call for one micro-batch (the first stage gets ``None``; a last stage returns
            what ``loss_fn`` consumes). Wrap it in autocast for mixed precision.
        dtype: dtype of the hidden states on the wire (outputs are cast to it).
        scale_loss: applied to ``loss / num_microbatches`` before backward (fp16 loss scaling).
        forward_only: no backward (evaluation; any number of micro-batches, any schedule).
        timeout_minute: how long a transfer may wait for a neighbouring stage.
        stats: when given, filled with ``max_in_flight``: the most micro-batches whose activations
            this rank held at once.

    Returns:
        The unscaled per-micro-batch losses (detached) on the last stage, in micro-batch order;
        an empty list on the other stages (see `last_stage_mean`). Gradients accumulate in
        ``.grad`` as the sum over micro-batches of ``loss / num_microbatches``.
    """
    chunks = list(model_chunks)
    check_schedule(schedule, pstate.pp_size, len(chunks), num_microbatches, forward_only)
    batches = _MicroBatches(data_iterator)
    shape_fn = lambda batch: activation_shape(batch, hidden_size, pstate.tp_size, sequence_parallel)  # noqa: E731
    p2p = None
    if pstate.pp_size > 1:
        if any(isinstance(c, DistributedDataParallel) for c in chunks):
            raise ValueError("pipeline stages must not be wrapped in DistributedDataParallel: call "
                             "finalize_model_grads after forward_backward to reduce gradients over data parallelism")
        p2p = _P2P(pstate, dtype, timedelta(minutes=timeout_minute))
    run = _Runner(chunks, batches, pstate, loss_fn, forward_step, p2p, shape_fn, dtype, scale_loss, forward_only,
                  num_microbatches)
    if forward_only:
        _forward_only(run)
    elif pstate.pp_size == 1:
        _no_pipelining(run)
    else:
        _SCHEDULE_FNS[schedule](run)
    if stats is not None:
        stats["max_in_flight"] = run.max_in_flight
    return run.losses


# ---------------------------------------------------------------------------------------------------
# After the schedule: gradients and the reported loss


def finalize_model_grads(model_chunks: Sequence[nn.Module], pstate: ParallelState) -> None:
    """Average the gradients of plain pipeline stages over the data- and context-parallel group
    (``dp_cp``; one flat all-reduce per dtype), after `forward_backward` and before clipping. A no-op for one stage
    (its DP wrapper reduced in backward) and for FSDP stages (they reduce-scatter in backward);
    the distributed optimizer passes no chunks here (it reduce-scatters itself)."""
    chunks = [c for c in model_chunks if not data_parallel.is_fsdp(c)]
    if pstate.pp_size == 1 or pstate.dp_cp_group is None or not chunks:
        return
    grads = [p.grad for c in chunks for p in c.parameters() if p.grad is not None]
    for dtype in {g.dtype for g in grads}:
        group = [g for g in grads if g.dtype == dtype]
        flat = _flatten_dense_tensors(group)
        dist.all_reduce(flat, group=pstate.dp_cp_group)
        flat /= pstate.dp_cp_size
        for grad, reduced in zip(group, _unflatten_dense_tensors(flat, group)):
            grad.copy_(reduced)


def broadcast_from_last_stage(value: torch.Tensor, pstate: ParallelState) -> torch.Tensor:
    """The last stage's `value` on every rank of the pipeline group (other stages pass a tensor
    of the same shape and dtype). Collective over the pipeline group; identity with one stage."""
    if pstate.pp_size == 1:
        return value
    value = value.to(pstate.device).clone()
    dist.broadcast(value, dist.get_process_group_ranks(pstate.pp_group)[-1], group=pstate.pp_group)
    return value


def last_stage_mean(losses: list[torch.Tensor], pstate: ParallelState, device: torch.device,
                    shape: tuple[int, ...] = ()) -> torch.Tensor:
    """The mean over micro-batches of the last stage's per-micro-batch values (the losses from
    `forward_backward`, or vectors of ``shape`` such as ``[loss, *metrics]``), on every rank of the
    pipeline group, so rank 0 can log it and every rank sees a NaN. Collective over the pipeline
    group."""
    value = torch.stack(losses).float().mean(0) if losses else torch.zeros(shape, device=device)
    return broadcast_from_last_stage(value, pstate)
