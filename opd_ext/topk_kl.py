"""The top-k KL family on a served teacher's top-k: forward KL (as verl and NeMo-RL compute it,
renormalised, or with a tail bucket), reverse KL (renormalised or with a tail bucket) and the
generalized (unnormalised) KL, with the masses and the teacher's entropy from the same pass
(docs/spec.md §1.11).

The student is read in full once (``student_stats``: its log-normaliser), then only ``[..., k]``
values are gathered; the backward is one fused pass that writes ``-G·p/τ`` (``G`` the row's summed
gradient of the gathered log-probs), then the complete value at the k ids. So every one
of the k entries and the student's full softmax get their exact gradient, without a ``[N, V]``
temporary and without a clamp. ``mask``, ``weights``, ``num_items``, ``reduction``,
``return_stats`` and ``temperature`` follow the conventions of :mod:`opd_ext.objective`.
"""

from __future__ import annotations

from typing import Optional

import torch

from opd_ext import ops
from opd_ext._validation import check_choice, check_k, check_logit_pair, check_logits, check_temperature, is_dtensor
from opd_ext.distributed import from_student_dtensor, vocab_parallel_topk_kl_loss
from opd_ext.objective import (
    STUDENT_TOPK_DIVERGENCES,
    TOPK_DIVERGENCES,
    logprob_gradient_at_ids,
    loss_scale,
    support_at_valid_positions,
    support_slots,
    topk_kl_objective,
)


class StudentLogprobsAt(torch.autograd.Function):
    """``log softmax(s / τ)`` at the support's ids ``[..., k]`` (float64), from one ``student_stats``
    pass. The backward ``(scatter(g) - G·p) / τ`` (``G = Σ_k g_k``) is written by
    ``policy_gradient_backward`` (``-G·p/τ`` over the row, one pass) and then overwritten at the k ids
    with the whole value in float64 (:func:`opd_ext.objective.logprob_gradient_at_ids`)."""

    @staticmethod
    def forward(ctx, student_logits, ids, support, temperature):
        logits = student_logits.detach()
        source, filled = support_slots(ids, support)
        no_token = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
        _, lse = ops.student_stats(logits, no_token, temperature)
        logprobs = logits.gather(-1, filled).double() / temperature - lse.double().unsqueeze(-1)
        ctx.save_for_backward(student_logits, filled, source, support, lse, logprobs)
        ctx.temperature = temperature
        return logprobs

    @staticmethod
    def backward(ctx, grad_logprobs):
        student_logits, filled, source, support, lse, logprobs = ctx.saved_tensors
        row, at_ids = logprob_gradient_at_ids(grad_logprobs, support, source, logprobs, ctx.temperature)
        outside = torch.full(lse.shape, -1, dtype=torch.int64, device=lse.device)  # no one-hot term
        grad = ops.policy_gradient_backward(row.float(), student_logits.detach(), outside, lse, ctx.temperature)
        grad.scatter_(-1, filled, at_ids.to(grad.dtype))
        return grad, None, None, None


def topk_kl_loss(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    *,
    divergence: str = "forward_tail",
    teacher_topk_mask: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    num_items=None,
    reduction: str = "mean",
    return_stats: bool = False,
):
    """A divergence of the top-k KL family between the student and a teacher served as top-k
    log-probs (vLLM ``prompt_logprobs=k``, SGLang ``top_logprobs_num``), ``Σ_t w_t D_t / norm``.

    With ``S`` the teacher's support at a position (the set of its top-k ids, :func:`teacher_support`),
    ``p_k`` the student's *full-vocabulary* softmax at ``τ`` and ``q_k`` the served probabilities,
    ``P = Σ_S p``, ``Q = Σ_S q`` (docs/spec.md §1.11):

    * ``"forward"``: ``Σ_S q (log q - log p)``, verl's and NeMo-RL's ``forward_kl_topk``; it can be
      negative (both masses are partial) and is *not* clamped here, so its gradient stays exact;
    * ``"forward_renormalized"``: KL(q̄‖p̄), both renormalised over S;
    * ``"forward_tail"`` (default): KL over the k + 1 buckets S and "the rest":
      ``Σ_S q log(q/p) + (1-Q) log((1-Q)/(1-P))``, ≥ 0 (up to float rounding);
    * ``"reverse_renormalized"``: KL(p̄‖q̄) over S (as :func:`opd_ext.reverse_kl_loss_sparse_teacher`);
    * ``"reverse_tail"``: ``Σ_S p log(p/q) + (1-P) log((1-P)/(1-Q))``, ≥ 0 (up to float rounding);
    * ``"generalized"``: ``Σ_S [q log(q/p) - q + p]``, the KL of unnormalised measures, ≥ 0 term by term.

    Tail masses enter the logs floored at ``opd_ext.objective.TAIL_FLOOR`` (1e-12), so a served top-k
    that sums to 1 up to rounding gives a finite tail term. A valid position with an empty support
    contributes 0. The ``[..., k]`` arithmetic runs in float64.

    Args:
        student_logits: ``[..., V]`` float32, bfloat16 or float16; only read in full once forward and
            once backward.
        teacher_topk_ids: int64 ``[..., k]``; ids in ``[0, V)`` in the slots that are read.
        teacher_topk_logprobs: ``[..., k]`` log-probs as served (normalised over the teacher's full
            vocabulary); ``-inf``, or any value below -744.4 (a server's finite stand-in such as
            vLLM's JSON -9999.0, docs/spec.md §1.6), marks a padded slot. ``temperature`` scales the
            student only.
        divergence: one of ``opd_ext.objective.TOPK_DIVERGENCES`` (above).
        teacher_topk_mask: optional bool ``[..., k]``, False at slots to ignore.
        mask, weights, num_items, temperature, reduction: conventions of :mod:`opd_ext.objective`.
        return_stats: also return a :class:`TopkKLStats` (divergence, masses, teacher entropy).

    A DTensor ``student_logits`` placed ``Shard(-1)`` takes
    :func:`opd_ext.distributed.vocab_parallel_topk_kl_loss` on its local shards.

    Returns:
        A float32 scalar (``"mean"``, ``"sum"``) or ``[...]`` terms ``w_t·D_t/norm`` (``"none"``);
        with ``return_stats``, ``(loss, TopkKLStats)``.

    Raises:
        ValueError / TypeError naming the argument: shapes, dtypes, devices, an unknown
        ``divergence`` or ``reduction``, ids outside ``[0, V)`` in a slot that is read.
    """
    if is_dtensor(student_logits):
        return from_student_dtensor(
            vocab_parallel_topk_kl_loss,
            student_logits,
            teacher_topk_ids,
            teacher_topk_logprobs,
            divergence=divergence,
            teacher_topk_mask=teacher_topk_mask,
            mask=mask,
            weights=weights,
            temperature=temperature,
            num_items=num_items,
            reduction=reduction,
            return_stats=return_stats,
        )
    temperature = check_temperature(temperature)
    check_logits("student_logits", student_logits)
    check_choice("divergence", divergence, TOPK_DIVERGENCES)
    scale, valid, w = loss_scale(student_logits, mask, weights, num_items, reduction)
    support = support_at_valid_positions(
        student_logits, teacher_topk_ids, teacher_topk_logprobs, teacher_topk_mask, valid
    )
    student_logprobs = StudentLogprobsAt.apply(student_logits, teacher_topk_ids, support, temperature)
    return topk_kl_objective(
        student_logprobs, teacher_topk_logprobs, support, divergence, scale, valid, w, reduction, return_stats
    )


def student_topk_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    k: int = 16,
    divergence: str = "reverse_tail",
    mask: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    num_items=None,
    reduction: str = "mean",
    return_stats: bool = False,
):
    """Reverse KL over the *student's* top-k (verl's proposal for a colocated teacher): the support
    at each position is the k ids of the largest student logits, both models' full-vocabulary
    log-probs are taken there and compared with ``"reverse_tail"`` (default: the k ids plus one tail
    bucket, ≥ 0) or ``"reverse_renormalized"`` (both renormalised over the k ids), docs/spec.md §1.11.

    The teacher's logits are read once (their log-normaliser) and gathered at the k ids; the student
    as in :func:`topk_kl_loss`. The choice of ids is not differentiated (a set), the values are, for
    every one of the k entries and the student's whole softmax. ``temperature`` divides both models'
    logits. In the statistics the roles follow the support: ``teacher_mass`` is the teacher's mass on
    the student's top-k.

    Args:
        student_logits, teacher_logits: ``[..., V]`` (a supported dtype pair, as :func:`opd_ext.vopd_loss`).
        k: ids per position, 1 <= k <= V, chosen by ``torch.topk`` (which of several ids tied at the
            k-th logit is taken is unspecified).
        divergence: ``"reverse_tail"`` or ``"reverse_renormalized"``.
        mask, weights, num_items, temperature, reduction, return_stats: as in :func:`topk_kl_loss`.

    Raises:
        ValueError / TypeError naming the argument, as :func:`topk_kl_loss`, and for ``k``.
    """
    check_logit_pair(student_logits, teacher_logits)
    temperature = check_temperature(temperature)
    k = check_k(k, student_logits.shape[-1])
    check_choice("divergence", divergence, STUDENT_TOPK_DIVERGENCES)
    scale, valid, w = loss_scale(student_logits, mask, weights, num_items, reduction)
    with torch.no_grad():
        ids = torch.topk(student_logits.detach(), k, dim=-1).indices
        no_token = torch.zeros(ids.shape[:-1], dtype=torch.int64, device=ids.device)
        _, teacher_lse = ops.student_stats(teacher_logits.detach(), no_token, temperature)
        teacher_logprobs = (
            teacher_logits.detach().gather(-1, ids).double() / temperature - teacher_lse.double()[..., None]
        )
    support = valid.unsqueeze(-1).expand(ids.shape)
    student_logprobs = StudentLogprobsAt.apply(student_logits, ids, support, temperature)
    return topk_kl_objective(
        student_logprobs, teacher_logprobs, support, divergence, scale, valid, w, reduction, return_stats
    )
