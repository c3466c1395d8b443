"""Fake (meta) kernels: output shapes/dtypes without computing, so torch.compile can trace the ops."""
from __future__ import annotations

import torch


@torch.library.register_fake("opd_ext::topk_overlap")
def _topk_overlap_fake(student_logits, teacher_logits, k):
    torch._check(student_logits.shape == teacher_logits.shape)
    torch._check(1 <= k)
    torch._check(k <= student_logits.shape[-1])
    return student_logits.new_empty(student_logits.shape[:-1], dtype=torch.float32)
