"""Plain PyTorch definitions of every op (SPEC §1): the ground truth the kernels are tested against.

Readable and memory-hungry by design: these materialise full ``[N, V]`` intermediates.
"""
from __future__ import annotations

import torch


def topk_ids(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Ids of the k largest logits; ties go to the lower index (a stable descending sort)."""
    # +0.0 folds -0.0 into +0.0, which a bitwise radix sort would otherwise rank below it.
    values = logits.float() + 0.0
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :k]


def topk_overlap(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int) -> torch.Tensor:
    ids_s = topk_ids(student_logits, k)
    ids_t = topk_ids(teacher_logits, k)
    in_student_topk = torch.zeros(student_logits.shape, dtype=torch.bool, device=student_logits.device)
    in_student_topk.scatter_(-1, ids_s, True)
    overlap = in_student_topk.gather(-1, ids_t).sum(-1).float() / k
    has_nan = student_logits.isnan().any(-1) | teacher_logits.isnan().any(-1)
    return overlap.masked_fill(has_nan, float("nan"))
