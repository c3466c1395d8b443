"""The op layer: one Python wrapper per ``torch.ops.opd_ext`` op, its fake beside it, and the one
fallback rule (docs/architecture.md).

Every call from the Python package into the compiled kernels goes through this module. The
wrappers take the op's arguments as the schema names them (csrc/op_schemas.h) and do no argument
checking: the public functions check their arguments (the shared checks are in
``opd_ext._validation``), and the C++ bindings check again with the same words (csrc/*_args.h).
The fakes give output shapes and dtypes without computing, so ``torch.compile`` traces the ops;
they are registered once, when this module is imported, which ``import opd_ext`` does.

Fallback rule. An op runs its compiled kernel on every device it was built for. The one exception
is a top-k wider than the CUDA kernels' streaming top-k keeps (:data:`MAX_STREAMING_TOPK`,
read from the extension): there the op runs :mod:`opd_ext.torch_backend`, which sorts the rows (for
k that large a sort is also the faster algorithm). A CUDA tensor in a build without CUDA kernels
is no fallback case: the public entry points refuse it with a message saying how to rebuild.
"""

from __future__ import annotations

import threading
from typing import NamedTuple, Optional

import torch

from opd_ext import torch_backend
from opd_ext._extension import build_config, kernel_limits

_ops = torch.ops.opd_ext

#: The largest k the CUDA kernels' streaming top-k keeps (csrc/include/opd/cuda/limits.h); the CPU
#: kernels take any k.
MAX_STREAMING_TOPK: int = kernel_limits()["max_streaming_topk"]
# opd::kRunning (csrc/include/opd/drift.h): the stop reason of a sequence still generating.
_STOP_RUNNING: int = kernel_limits()["drift_stop_reasons"]["running"]


# ---- which kernels run where ----------------------------------------------------------------------

# Set inside opd_ext.testing.emulated_cuda() (per thread, like the dispatch mode that routes the
# ops): CPU tensors then run the CUDA kernels (emulated), so the Python layer takes the same code
# paths as for CUDA tensors.
_emulation = threading.local()


def set_emulating_cuda(active: bool) -> bool:
    """Sets this thread's flag and returns its previous value (opd_ext.testing's context managers)."""
    previous = getattr(_emulation, "active", False)
    _emulation.active = active
    return previous


def runs_cuda_kernels(tensor: torch.Tensor) -> bool:
    """True when opd_ext's ops on `tensor` run the CUDA kernels (on a GPU, or emulated)."""
    return tensor.is_cuda or getattr(_emulation, "active", False)


def cuda_kernels_available() -> bool:
    """True when this build compiled the CUDA kernels (a GPU may still be absent)."""
    return bool(build_config()["with_cuda"])


def exceeds_streaming_topk(logits: torch.Tensor, k: int) -> bool:
    """The fallback rule: True when an op on ``logits`` with top-k size ``k`` runs the torch
    backend (CUDA kernels, on a GPU or emulated, and ``k > MAX_STREAMING_TOPK``)."""
    return k > MAX_STREAMING_TOPK and runs_cuda_kernels(logits)


def _row_output(logits: torch.Tensor) -> torch.Tensor:
    return logits.new_empty(logits.shape[:-1], dtype=torch.float32)


# ---- top-k overlap (docs/spec.md §1) --------------------------------------------------------------


def topk_overlap(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int) -> torch.Tensor:
    """float32 ``[...]``: ``|TopK(s) ∩ TopK(t)| / k`` per row of ``[..., V]`` logits."""
    if exceeds_streaming_topk(student_logits, k):
        return torch_backend.topk_overlap(student_logits, teacher_logits, k)
    return _ops.topk_overlap(student_logits, teacher_logits, k)


@torch.library.register_fake("opd_ext::topk_overlap")
def _topk_overlap_fake(student_logits, teacher_logits, k):
    torch._check(student_logits.shape == teacher_logits.shape)
    torch._check(1 <= k)
    torch._check(k <= student_logits.shape[-1])
    return _row_output(student_logits)


# ---- token statistics and the fused backward ops (docs/spec.md §1-2) ------------------------------


class TokenStatsOutput(NamedTuple):
    """The outputs of ``token_stats``, float32 ``[...]`` each (``topk_reverse_kl`` empty ``[0]``
    when ``topk == 0``)."""

    student_logprob: torch.Tensor
    teacher_logprob: torch.Tensor
    reverse_kl: torch.Tensor
    forward_kl: torch.Tensor
    topk_reverse_kl: torch.Tensor
    student_lse: torch.Tensor
    teacher_lse: torch.Tensor


def token_stats(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, tokens: torch.Tensor, temperature: float, topk: int = 0
) -> TokenStatsOutput:
    """One pass over both rows: log-probs of ``tokens``, KL(p‖q), KL(q‖p), the row log-sum-exps of
    the logits over ``temperature`` and, with ``topk > 0``, the vOPD top-k baseline KL."""
    if not exceeds_streaming_topk(student_logits, topk):
        return TokenStatsOutput(*_ops.token_stats(student_logits, teacher_logits, tokens, temperature, topk))
    stats = TokenStatsOutput(*_ops.token_stats(student_logits, teacher_logits, tokens, temperature, 0))
    return stats._replace(
        topk_reverse_kl=torch_backend.topk_reverse_kl(student_logits, teacher_logits, topk, temperature)
    )


@torch.library.register_fake("opd_ext::token_stats")
def _token_stats_fake(student_logits, teacher_logits, tokens, temperature, topk):
    torch._check(student_logits.shape == teacher_logits.shape)
    torch._check(tokens.shape == student_logits.shape[:-1])
    torch._check(0 <= topk)
    torch._check(topk <= student_logits.shape[-1])
    rows = [_row_output(student_logits) for _ in range(4)]
    topk_kl = _row_output(student_logits) if topk > 0 else student_logits.new_empty((0,), dtype=torch.float32)
    return (*rows, topk_kl, _row_output(student_logits), _row_output(student_logits))


def pair_softmax_state(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """float32 ``[..., 6]``: the raw online-softmax state of each row pair (opd/online_softmax.h),
    which merges associatively over vocabulary slices (opd_ext.distributed). An empty slice (a
    vocabulary shard with no columns) gives the empty state, (-inf, 0, -inf, 0, 0, 0): it adds
    nothing to a merge."""
    if student_logits.shape[-1] == 0 and teacher_logits.shape[-1] == 0:
        state = torch.tensor([float("-inf"), 0.0, float("-inf"), 0.0, 0.0, 0.0], device=student_logits.device)
        return state.expand(*student_logits.shape[:-1], 6).contiguous()
    return _ops.pair_softmax_state(student_logits, teacher_logits, temperature)


@torch.library.register_fake("opd_ext::pair_softmax_state")
def _pair_softmax_state_fake(student_logits, teacher_logits, temperature):
    torch._check(student_logits.shape == teacher_logits.shape)
    return student_logits.new_empty((*student_logits.shape[:-1], 6), dtype=torch.float32)


def student_stats(student_logits: torch.Tensor, tokens: torch.Tensor, temperature: float):
    """``(log p(y), lse)`` float32 ``[...]``: the student half of ``token_stats``."""
    return _ops.student_stats(student_logits, tokens, temperature)


@torch.library.register_fake("opd_ext::student_stats")
def _student_stats_fake(student_logits, tokens, temperature):
    torch._check(tokens.shape == student_logits.shape[:-1])
    return _row_output(student_logits), _row_output(student_logits)


def policy_gradient_backward(
    coef: torch.Tensor,
    student_logits: torch.Tensor,
    tokens: torch.Tensor,
    student_lse: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """``∂(coef · log p(y))/∂s`` ``[..., V]`` in the student's dtype; token -1: y is outside these
    logits (a vocabulary shard). An empty shard gets its empty gradient."""
    if student_logits.shape[-1] == 0:
        return torch.empty_like(student_logits, memory_format=torch.contiguous_format)
    return _ops.policy_gradient_backward(coef, student_logits, tokens, student_lse, temperature)


@torch.library.register_fake("opd_ext::policy_gradient_backward")
def _policy_gradient_backward_fake(coef, student_logits, tokens, student_lse, temperature):
    torch._check(coef.shape == student_logits.shape[:-1])
    return torch.empty_like(student_logits, memory_format=torch.contiguous_format)


def reverse_kl_backward(
    coef: torch.Tensor,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_lse: torch.Tensor,
    teacher_lse: torch.Tensor,
    reverse_kl: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """``∂(coef · KL(p‖q))/∂s`` ``[..., V]`` in the student's dtype (empty for an empty shard)."""
    if student_logits.shape[-1] == 0:
        return torch.empty_like(student_logits, memory_format=torch.contiguous_format)
    return _ops.reverse_kl_backward(
        coef, student_logits, teacher_logits, student_lse, teacher_lse, reverse_kl, temperature
    )


@torch.library.register_fake("opd_ext::reverse_kl_backward")
def _reverse_kl_backward_fake(coef, student_logits, teacher_logits, student_lse, teacher_lse, reverse_kl, temperature):
    torch._check(student_logits.shape == teacher_logits.shape)
    torch._check(coef.shape == student_logits.shape[:-1])
    return torch.empty_like(student_logits, memory_format=torch.contiguous_format)


# ---- Prune-OPD drift tracking (docs/spec.md §1) ---------------------------------------------------
# The state tensors are mutated in place (Tensor(a!) in the schema); the fakes only shape the outputs.


class DriftStepOutput(NamedTuple):
    """The outputs of ``drift_step``, per active row ``[A]``; the token statistics are empty ``[0]``
    without ``tokens``."""

    overlap: torch.Tensor  # float32 top-k overlap
    multiplier: torch.Tensor  # float32 reward multiplier (0 if the row had already stopped)
    stopped: torch.Tensor  # bool
    student_logprob: torch.Tensor
    teacher_logprob: torch.Tensor
    reverse_kl: torch.Tensor


def drift_step(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tokens: Optional[torch.Tensor],
    rows: Optional[torch.Tensor],
    ema,
    weight,
    drift_run,
    drift_events,
    length,
    stop_reason,
    budget,
    k: int,
    temperature: float,
    **config,
) -> DriftStepOutput:
    """One decode step of the drift state machine over ``[A, V]`` logits (state updated in place).
    ``config``: ``PruneConfig.kernel_args()``."""
    state = (ema, weight, drift_run, drift_events, length, stop_reason, budget)
    if not exceeds_streaming_topk(student_logits, k):
        return DriftStepOutput(
            *_ops.drift_step(student_logits, teacher_logits, tokens, rows, *state, k, temperature, **config)
        )
    # The overlap from the torch backend; the state machine is then one step of the drift scan over
    # the selected rows, and the token statistics the token_stats kernel's (no top-k there).
    overlap = torch_backend.topk_overlap(student_logits, teacher_logits, k)
    selected = torch.arange(ema.shape[0], device=ema.device) if rows is None else rows
    part = [x.index_select(0, selected) for x in state]
    multiplier, _, _ = _ops.drift_scan(overlap[:, None], None, *part, **config)
    for whole, new in zip(state[:6], part[:6]):
        whole[selected] = new
    stopped = part[5] != _STOP_RUNNING
    if tokens is None:
        empty = overlap.new_empty(0)
        return DriftStepOutput(overlap, multiplier[:, 0], stopped, empty, empty, empty)
    stats = token_stats(student_logits, teacher_logits, tokens, temperature)
    return DriftStepOutput(
        overlap, multiplier[:, 0], stopped, stats.student_logprob, stats.teacher_logprob, stats.reverse_kl
    )


@torch.library.register_fake("opd_ext::drift_step")
def _drift_step_fake(
    student_logits,
    teacher_logits,
    tokens,
    rows,
    ema,
    weight,
    drift_run,
    drift_events,
    length,
    stop_reason,
    budget,
    k,
    temperature,
    ema_beta,
    threshold,
    warmup,
    w_drop,
    decay,
    w_base,
    patience,
    min_weight,
):
    torch._check(student_logits.shape == teacher_logits.shape)
    torch._check(student_logits.dim() == 2)
    torch._check(1 <= k)
    torch._check(k <= student_logits.shape[-1])
    active = student_logits.shape[0]
    per_row = student_logits.new_empty((active,), dtype=torch.float32)
    stats_size = active if tokens is not None else 0
    return (
        per_row,
        torch.empty_like(per_row),
        student_logits.new_empty((active,), dtype=torch.bool),
        *(student_logits.new_empty((stats_size,), dtype=torch.float32) for _ in range(3)),
    )


def drift_scan(
    overlaps: torch.Tensor,
    mask: Optional[torch.Tensor],
    ema,
    weight,
    drift_run,
    drift_events,
    length,
    stop_reason,
    budget,
    **config,
):
    """Whole sequences ``[B, T]`` through the drift state machine (state updated in place):
    (multipliers [B, T], weights [B, T], stop position [B] int64, -1 where the row did not stop)."""
    return _ops.drift_scan(overlaps, mask, ema, weight, drift_run, drift_events, length, stop_reason, budget, **config)


@torch.library.register_fake("opd_ext::drift_scan")
def _drift_scan_fake(
    overlaps,
    mask,
    ema,
    weight,
    drift_run,
    drift_events,
    length,
    stop_reason,
    budget,
    ema_beta,
    threshold,
    warmup,
    w_drop,
    decay,
    w_base,
    patience,
    min_weight,
):
    torch._check(overlaps.dim() == 2)
    return (
        torch.empty_like(overlaps),
        torch.empty_like(overlaps),
        overlaps.new_empty(overlaps.shape[:1], dtype=torch.int64),
    )
