"""Fake (meta) kernels: output shapes/dtypes without computing, so torch.compile can trace the ops."""
from __future__ import annotations

import torch


@torch.library.register_fake("opd_ext::topk_overlap")
def _topk_overlap_fake(student_logits, teacher_logits, k):
    torch._check(student_logits.shape == teacher_logits.shape)
    torch._check(1 <= k)
    torch._check(k <= student_logits.shape[-1])
    return student_logits.new_empty(student_logits.shape[:-1], dtype=torch.float32)


# ---- token statistics and the fused backward ops (csrc/cpu/token_stats.cpp) ----------------------


def _row_output(logits):
    return logits.new_empty(logits.shape[:-1], dtype=torch.float32)


@torch.library.register_fake("opd_ext::token_stats")
def _token_stats_fake(student_logits, teacher_logits, tokens, temperature, topk):
    torch._check(student_logits.shape == teacher_logits.shape)
    torch._check(tokens.shape == student_logits.shape[:-1])
    torch._check(0 <= topk)
    torch._check(topk <= student_logits.shape[-1])
    rows = [_row_output(student_logits) for _ in range(4)]
    topk_kl = _row_output(student_logits) if topk > 0 else student_logits.new_empty((0,), dtype=torch.float32)
    return (*rows, topk_kl, _row_output(student_logits), _row_output(student_logits))


@torch.library.register_fake("opd_ext::pair_softmax_state")
def _pair_softmax_state_fake(student_logits, teacher_logits, temperature):
    torch._check(student_logits.shape == teacher_logits.shape)
    return student_logits.new_empty((*student_logits.shape[:-1], 6), dtype=torch.float32)


@torch.library.register_fake("opd_ext::student_stats")
def _student_stats_fake(student_logits, tokens, temperature):
    torch._check(tokens.shape == student_logits.shape[:-1])
    return _row_output(student_logits), _row_output(student_logits)


@torch.library.register_fake("opd_ext::policy_gradient_backward")
def _policy_gradient_backward_fake(coef, student_logits, tokens, student_lse, temperature):
    torch._check(coef.shape == student_logits.shape[:-1])
    return torch.empty_like(student_logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("opd_ext::reverse_kl_backward")
def _reverse_kl_backward_fake(coef, student_logits, teacher_logits, student_lse, teacher_lse, reverse_kl,
                              temperature):
    torch._check(student_logits.shape == teacher_logits.shape)
    torch._check(coef.shape == student_logits.shape[:-1])
    return torch.empty_like(student_logits, memory_format=torch.contiguous_format)

# ---- Prune-OPD drift tracking ---------------------------------------------------------------------
# The state tensors are mutated in place (Tensor(a!) in the schema); the fakes only shape the outputs.


@torch.library.register_fake("opd_ext::drift_step")
def _drift_step_fake(student_logits, teacher_logits, tokens, rows, ema, weight, drift_run, drift_events, length,
                     stop_reason, budget, k, temperature, ema_beta, threshold, warmup, w_drop, decay, w_base,
                     patience, min_weight):
    torch._check(student_logits.shape == teacher_logits.shape)
    torch._check(student_logits.dim() == 2)
    torch._check(1 <= k)
    torch._check(k <= student_logits.shape[-1])
    active = student_logits.shape[0]
    per_row = student_logits.new_empty((active,), dtype=torch.float32)
    stats_size = active if tokens is not None else 0
    return (per_row, torch.empty_like(per_row), student_logits.new_empty((active,), dtype=torch.bool),
            *(student_logits.new_empty((stats_size,), dtype=torch.float32) for _ in range(3)))


@torch.library.register_fake("opd_ext::drift_scan")
def _drift_scan_fake(overlaps, mask, ema, weight, drift_run, drift_events, length, stop_reason, budget, ema_beta,
                     threshold, warmup, w_drop, decay, w_base, patience, min_weight):
    torch._check(overlaps.dim() == 2)
    return (torch.empty_like(overlaps), torch.empty_like(overlaps),
            overlaps.new_empty(overlaps.shape[:1], dtype=torch.int64))
