"""The plain-PyTorch backend: what the op layer (:mod:`opd_ext.ops`) runs where a compiled kernel
cannot (docs/architecture.md, "Fallback policy").

Today that is one case: a top-k wider than the CUDA kernels' streaming top-k keeps
(``opd_ext.ops.MAX_STREAMING_TOPK``), where sorting the row is also the cheaper algorithm. So this
backend holds the two top-k reductions; the op layer computes everything else around them with
the kernels. Each function has the kernels' tie rule (higher value first, ties to the lower
vocabulary index) and NaN convention, and works on blocks of rows so that its ``[rows, V]``
temporaries stay bounded whatever the batch.

This is production code, not the test oracle: :mod:`opd_ext.reference` holds the float64
definitions the kernels *and* this backend are checked against.
"""

from __future__ import annotations

import torch

# Rows per block, as bytes of float32 logits: a block holds a float32 copy of both rows, the
# sort's values and int64 ids, i.e. about five times this.
BLOCK_BYTES = 16 * 2**20


def _row_blocks(vocab: int, rows: int):
    block = max(1, BLOCK_BYTES // (4 * vocab))
    for start in range(0, rows, block):
        yield slice(start, min(start + block, rows))


def _topk_ids(rows: torch.Tensor, k: int) -> torch.Tensor:
    """Ids of the k largest values of each row [n, V], ties to the lower index (a stable sort;
    +0.0 folds -0.0 into +0.0, which a radix sort would otherwise rank below it)."""
    return torch.sort(rows.float() + 0.0, dim=-1, descending=True, stable=True).indices[:, :k]


def topk_overlap(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int) -> torch.Tensor:
    """``|TopK(student) ∩ TopK(teacher)| / k`` per row as float32 ``[...]``; NaN rows NaN."""
    vocab = student_logits.shape[-1]
    s, t = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
    out = torch.empty(s.shape[0], dtype=torch.float32, device=s.device)
    for rows in _row_blocks(vocab, s.shape[0]):
        ids_s, ids_t = _topk_ids(s[rows], k), _topk_ids(t[rows], k)
        shared = (ids_s.unsqueeze(-1) == ids_t.unsqueeze(-2)).any(-1).sum(-1)
        nan = s[rows].isnan().any(-1) | t[rows].isnan().any(-1)
        out[rows] = torch.where(nan, float("nan"), shared.float() / k)
    return out.reshape(student_logits.shape[:-1])


def topk_reverse_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int, temperature: float
) -> torch.Tensor:
    """The vOPD top-k baseline KL(p̄‖q̄) over the student's k best ids, both renormalised there
    (docs/spec.md §1), as float32 ``[...]``; the k gathered values are reduced in float64."""
    vocab = student_logits.shape[-1]
    s, t = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
    out = torch.empty(s.shape[0], dtype=torch.float32, device=s.device)
    for rows in _row_blocks(vocab, s.shape[0]):
        ids = _topk_ids(s[rows], k)
        log_p = torch.log_softmax(s[rows].gather(-1, ids).double() / temperature, -1)
        log_q = torch.log_softmax(t[rows].gather(-1, ids).double() / temperature, -1)
        p = log_p.exp()
        kl = (p * torch.where(p > 0, log_p - log_q, 0.0)).sum(-1).clamp(min=0)
        nan = s[rows].isnan().any(-1) | t[rows].isnan().any(-1)
        out[rows] = torch.where(nan, float("nan"), kl).float()
    return out.reshape(student_logits.shape[:-1])
