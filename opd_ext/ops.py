"""Public tensor operations (docs/spec.md §2)."""
from __future__ import annotations

import torch

from opd_ext import _meta  # noqa: F401  (registers the fake kernels)
from opd_ext import reference
from opd_ext._extension import ops, runs_cuda_kernels
from opd_ext._validation import check_k, check_logit_pair, is_dtensor

# The CUDA top-k keeps k + one tile of candidates in shared memory; beyond this a sort is cheaper.
CUDA_MAX_TOPK = 1024


def topk_overlap(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int = 16) -> torch.Tensor:
    """Fraction of shared ids between the student's and the teacher's top-k next tokens.

    ``overlap = |TopK(student) ∩ TopK(teacher)| / k`` per position, computed from the logits in one
    pass per row without materialising ``torch.topk`` outputs. Ties at the k-th value go to the lower
    vocabulary index, so CPU and CUDA agree exactly. Softmax and temperature do not change the
    ranking, so raw logits are the right input.

    Args:
        student_logits: ``[..., V]`` float32, bfloat16 or float16.
        teacher_logits: same shape and device; same dtype, or float32 beside a bfloat16/float16 row
            on either side.
        k: ``1 <= k <= V`` (Prune-OPD uses 16).

    Returns:
        ``[...]`` float32 in ``[0, 1]``; NaN in rows whose logits contain NaN (other rows unaffected).
    """
    if is_dtensor(student_logits, teacher_logits):
        from opd_ext import distributed

        return distributed.from_dtensors(distributed.vocab_parallel_topk_overlap, student_logits, teacher_logits, k)
    check_logit_pair(student_logits, teacher_logits)
    check_k(k, student_logits.shape[-1])
    if runs_cuda_kernels(student_logits) and k > CUDA_MAX_TOPK:
        return reference.topk_overlap(student_logits, teacher_logits, k)
    return ops.topk_overlap(student_logits, teacher_logits, k)
