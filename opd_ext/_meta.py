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
