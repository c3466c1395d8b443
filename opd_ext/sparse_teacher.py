"""A teacher given as top-k ids and log-probs (served by vLLM / SGLang) instead of full logits: its
support, the vOPD and reverse-KL losses over it, the top-k overlap against it and the per-token
statistics for trainers that own their loss (docs/spec.md §1-2).

Only the student is read in full (one ``student_stats`` pass); everything about the teacher is
``[..., k]``. :mod:`opd_ext.served` turns server responses into these tensors. ``mask``,
``weights``, ``num_items``, ``reduction``, ``return_stats`` and ``temperature`` follow the
conventions of :mod:`opd_ext.objective`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from opd_ext import ops
from opd_ext._validation import (
    check_choice,
    check_logits,
    check_mask,
    check_teacher_token_logprob,
    check_teacher_topk,
    check_temperature,
)
from opd_ext.objective import (
    SPARSE_TEACHER_BASELINES,
    loss_scale,
    loss_stats,
    policy_gradient_loss,
    sampled_tokens,
    support_at_valid_positions,
    teacher_support,
)


class SparseTeacherStats(NamedTuple):
    """Per-token statistics of :func:`sparse_teacher_stats`, each float32 ``[...]``, 0 where masked."""

    student_logprob: torch.Tensor  # log p(y) = log softmax(s / τ)[y]
    teacher_logprob: torch.Tensor  # log q(y), as served
    reward: torch.Tensor  # r = log q(y) - log p(y)
    topk_kl: torch.Tensor  # KL(p̄‖q̄) over the teacher's support; the baseline is b = -topk_kl
    advantage: torch.Tensor  # A = r - b = r + topk_kl


class _GatherLogits(torch.autograd.Function):
    """``logits.gather(-1, ids)`` whose backward adds ``[..., k]`` gradients into a zero ``[..., V]``
    gradient in the logits' dtype with ``index_add_``: autograd's gather backward (scatter_add) on
    CPU widens a bfloat16/float16 [N, V] result into a float32 buffer of the same size. Repeated
    ids in a row add up, as with gather."""

    @staticmethod
    def forward(ctx, logits, ids):
        ctx.save_for_backward(logits, ids)  # the logits for their shape only (no copy)
        return logits.gather(-1, ids)

    @staticmethod
    def backward(ctx, grad):
        logits, ids = ctx.saved_tensors
        vocab = logits.shape[-1]
        grad_logits = torch.zeros_like(logits, memory_format=torch.contiguous_format)
        row_ids = ids.reshape(-1, ids.shape[-1])
        flat_ids = row_ids + torch.arange(0, row_ids.shape[0] * vocab, vocab, device=ids.device).unsqueeze(1)
        grad_logits.view(-1).index_add_(0, flat_ids.reshape(-1), grad.reshape(-1))
        return grad_logits, None


def support_reverse_kl(student_logits, teacher_topk_ids, teacher_topk_logprobs, support, temperature):
    """KL(p̄‖q̄) over the teacher's support (``support`` [..., k], from :func:`teacher_support` and
    the position mask), both renormalised there; [N, k] work only. 0 where the support is empty.

    Slots outside the support are set to -inf before the softmax and positions without support to
    0, so whatever they hold (NaN, ids out of range) never reaches the loss or, through a 0·NaN
    product, the gradient.
    """
    any_slot = support.any(-1, keepdim=True)
    ids = torch.where(support, teacher_topk_ids, 0)
    s = _GatherLogits.apply(student_logits, ids).float()
    s = torch.where(support, s, float("-inf"))
    # Centre on the raw max before dividing by τ, as the kernels do: s / τ first would round every
    # logit to ulp(|s| / τ), ~1e-3 at |logits| ~ 1e4. The shift is a constant, so no gradient.
    centre = s.detach().amax(-1, keepdim=True)
    s = torch.where(any_slot, s - torch.where(torch.isfinite(centre), centre, 0.0), 0.0)
    log_p = torch.log_softmax(s / temperature, dim=-1)
    t = torch.where(support, teacher_topk_logprobs.float(), float("-inf"))
    log_q = torch.log_softmax(torch.where(any_slot, t, 0.0), dim=-1)
    p = log_p.exp()
    kl = (p * torch.where(p > 0, log_p - log_q, 0.0)).sum(-1)
    return torch.where(any_slot.squeeze(-1), kl, 0.0)


def vopd_loss_sparse_teacher(
    student_logits: torch.Tensor,
    tokens: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_token_logprob: torch.Tensor,
    *,
    teacher_topk_mask=None,
    mask=None,
    weights=None,
    temperature: float = 1.0,
    baseline: str = "topk",
    num_items=None,
    reduction: str = "mean",
    return_stats: bool = False,
):
    """:func:`opd_ext.vopd_loss` for a teacher served as top-k log-probs (vLLM / SGLang prompt logprobs).

    The teacher's support at a position is the *set* of ids its top-k lists (:func:`teacher_support`):
    an id listed twice counts once, padded slots (log-prob ``-inf``, or ``teacher_topk_mask`` False)
    leave it. Both distributions are renormalised over the support, so the teacher's log-probs may
    be unnormalised (raw logits, a server's temperature applied, a top-k covering part of the
    mass): only differences within a position matter, and neither the teacher's mass outside its
    top-k nor the student's is compared. A valid position with an empty support has baseline 0.

    Args:
        student_logits: ``[..., V]``; only the student is read in full (one ``student_stats`` pass).
        tokens: int64 ``[...]`` sampled ids.
        teacher_topk_ids: int64 ``[..., k]``, the teacher's k most likely ids per position (any value
            in slots outside the support).
        teacher_topk_logprobs: ``[..., k]`` their log-probs; ``-inf`` marks a padded slot. The
            server's temperature is taken as is, ``temperature`` scales the student only.
        teacher_token_logprob: ``[...]`` the teacher's log-prob of ``tokens`` (the reward's log q(y)),
            taken as given (not renormalised).
        teacher_topk_mask: optional bool ``[..., k]``, False at slots to ignore (ragged top-k).
        baseline: ``"topk"`` (default): ``b = -KL(p̄‖q̄)`` over the teacher's support; ``"none"``:
            plain OPD. The full-vocabulary baseline needs the teacher's full logits (use
            :func:`opd_ext.vopd_loss`).
        mask, weights, num_items, temperature: conventions of :mod:`opd_ext.objective`.
        reduction, return_stats: as in :func:`opd_ext.vopd_loss`; the stats' ``reverse_kl`` is the KL over the
            teacher's support (None with ``baseline="none"``, which does not compute it) and
            ``teacher_logprob`` is ``teacher_token_logprob`` as given.

    Raises:
        ValueError / TypeError naming the argument: shapes, dtypes, devices, ids outside ``[0, V)``
        in a slot of the support at a valid position; a bad ``reduction`` as in :func:`opd_ext.vopd_loss`.
    """
    temperature = check_temperature(temperature)
    check_logits("student_logits", student_logits)
    check_choice("baseline", baseline, SPARSE_TEACHER_BASELINES)
    check_teacher_token_logprob(teacher_token_logprob, student_logits)
    scale, valid, w = loss_scale(student_logits, mask, weights, num_items, reduction)
    support = support_at_valid_positions(
        student_logits, teacher_topk_ids, teacher_topk_logprobs, teacher_topk_mask, valid
    )
    tokens = sampled_tokens(tokens, student_logits, valid)

    logp_s, lse_s = ops.student_stats(student_logits.detach(), tokens, temperature)
    value = None
    if baseline == "topk":
        with torch.no_grad():
            value = support_reverse_kl(student_logits, teacher_topk_ids, teacher_topk_logprobs, support, temperature)
    return policy_gradient_loss(
        student_logits,
        tokens,
        logp_s,
        lse_s,
        teacher_token_logprob.detach().float(),
        value,
        value,
        scale,
        valid,
        w,
        temperature,
        reduction,
        return_stats,
    )


def reverse_kl_loss_sparse_teacher(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    *,
    teacher_topk_mask=None,
    mask=None,
    weights=None,
    temperature: float = 1.0,
    num_items=None,
    reduction: str = "mean",
    return_stats: bool = False,
):
    """:func:`opd_ext.reverse_kl_loss` for a served teacher: ``Σ_t w_t KL(p̄_t‖q̄_t) / norm`` over the teacher's
    support (the set of its top-k ids, :func:`teacher_support`), student and teacher both
    renormalised there; positions with an empty support contribute 0.

    Only ``[..., k]`` values of the student are gathered, so forward and backward cost O(N·k) plus
    the (sparse) gradient write; the student mass outside the teacher's support is not penalised.
    Arguments and errors as in :func:`vopd_loss_sparse_teacher`; ``reduction="none"`` gives the
    ``[...]`` terms ``w_t · KL(p̄_t‖q̄_t)``, ``return_stats`` a :class:`LossStats` with that KL as
    ``reverse_kl``.
    """
    temperature = check_temperature(temperature)
    check_logits("student_logits", student_logits)
    scale, valid, w = loss_scale(student_logits, mask, weights, num_items, reduction)
    support = support_at_valid_positions(
        student_logits, teacher_topk_ids, teacher_topk_logprobs, teacher_topk_mask, valid
    )
    kl = support_reverse_kl(student_logits, teacher_topk_ids, teacher_topk_logprobs.detach(), support, temperature)
    terms = torch.where(valid, scale * kl, 0.0)
    loss = terms if reduction == "none" else terms.sum()
    return (loss, loss_stats(valid, w, reverse_kl=kl)) if return_stats else loss


# Rows per block when ties at the k-th student logit need each tied id's vocabulary position (an
# int64 [rows, V] cumulative count): 8 MiB at V = 128k.
_TIE_BLOCK_ROWS = 8


def topk_overlap_sparse_teacher(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_mask: Optional[torch.Tensor] = None,
    *,
    teacher_topk_logprobs: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Top-k overlap against a served teacher: ``|TopK(student) ∩ S| / k`` with ``S`` the teacher's
    support at the position and ``k = |S|``.

    ``S`` is the *set* of teacher ids in valid slots (``teacher_topk_mask``, and a log-prob other
    than ``-inf`` when ``teacher_topk_logprobs`` is given): an id listed twice counts once, as in
    :func:`teacher_support`. So ``k`` is the number of distinct valid ids, which
    may differ between positions, and the student's top-k is taken at that size. With ``S`` the
    teacher's true top-k this equals :func:`opd_ext.topk_overlap` on the teacher's logits,
    including its tie rule (ties at the student's k-th logit go to the lower vocabulary index).
    To match ``PruneConfig.k``, request that many log-probs from the server or pass
    ``served.topk_ids[..., :k]`` (the converters order slots by decreasing log-prob).

    Pass the result to :func:`opd_ext.drift_scan` (post hoc) or :meth:`opd_ext.DriftMonitor.observe`
    (chunked decoding), with the same ``mask``.

    Args:
        student_logits: ``[..., V]`` float32, bfloat16 or float16 (raw: ranks ignore temperature).
        teacher_topk_ids: int64 ``[..., k]``; ids in ``[0, V)`` in valid slots.
        teacher_topk_mask: optional bool ``[..., k]``, False at padded slots.
        teacher_topk_logprobs: optional ``[..., k]``; ``-inf`` marks a padded slot.
        mask: optional bool ``[...]``, positions that count; the overlap is 0 elsewhere.

    Returns:
        float32 ``[...]`` in ``[0, 1]``; NaN at a valid position whose support is empty or whose
        student logits hold NaN. Runs one ``torch.topk`` of size ``max k + 1`` over the student's
        rows (no fused kernel).

    Raises:
        ValueError / TypeError naming the argument: shapes, dtypes, devices, ids outside ``[0, V)``.
    """
    check_logits("student_logits", student_logits)
    if not isinstance(teacher_topk_ids, torch.Tensor):
        raise TypeError(
            f"teacher_topk_ids must be a torch.Tensor [..., k] of int64 token ids, got "
            f"{type(teacher_topk_ids).__name__}"
        )
    valid = None
    if mask is not None:
        check_mask(mask, student_logits)
        valid = mask.bool()
    logprobs = teacher_topk_logprobs
    if logprobs is None:
        logprobs = torch.zeros((), dtype=torch.float32, device=teacher_topk_ids.device).expand(teacher_topk_ids.shape)
    check_teacher_topk(teacher_topk_ids, logprobs, student_logits, teacher_topk_mask, valid)
    support = teacher_support(teacher_topk_ids, logprobs.detach(), teacher_topk_mask)
    if valid is not None:
        support = support & valid.unsqueeze(-1)

    if student_logits.dim() == 1:  # one row [V]: row indexing below needs a leading dimension
        student_logits, support = student_logits.unsqueeze(0), support.unsqueeze(0)
        teacher_topk_ids = teacher_topk_ids.unsqueeze(0)
        valid = None if valid is None else valid.unsqueeze(0)
        squeeze = True
    else:
        squeeze = False
    # The leading dimensions stay as they are: flattening a sliced view (logits[:, :-1]) would copy it.
    s = student_logits.detach()
    vocab = s.shape[-1]
    ids = torch.where(support, teacher_topk_ids, 0)
    k = support.sum(-1, keepdim=True)
    k_max = int(k.max()) if k.numel() else 0
    hits = torch.zeros_like(k)
    nan_rows = torch.zeros_like(k, dtype=torch.bool)
    if k_max > 0:
        # The k-th largest student logit per row (k varies by row) and the (k+1)-th, which says
        # whether ties at the k-th value reach past the top-k.
        values = torch.topk(s, min(k_max + 1, vocab), dim=-1, sorted=True).values
        kth = values.gather(-1, (k - 1).clamp(min=0))
        after = values.gather(-1, k.clamp(max=values.shape[-1] - 1))
        spills = (k < vocab) & (after == kth)
        seats_at_kth = k - (values > kth).sum(-1, keepdim=True)
        picked = s.gather(-1, ids)
        tied = support & (picked == kth)
        inside = (support & (picked > kth)) | (tied & ~spills)
        # Ties straddling the k-th place go to the lower vocabulary index, as in the fused kernel:
        # only rows where a teacher id is among such ties need the tied ids' vocabulary positions.
        rows = (tied & spills).any(-1).nonzero(as_tuple=True)
        for first in range(0, rows[0].numel(), _TIE_BLOCK_ROWS):
            at = tuple(r[first : first + _TIE_BLOCK_ROWS] for r in rows)
            equal = s[at] == kth[at]
            lower_ties = equal.cumsum(-1) - equal.long()
            rank = lower_ties.gather(-1, ids[at])
            inside[at] = inside[at] | (tied[at] & (rank < seats_at_kth[at]))
        hits = inside.sum(-1, keepdim=True)
        # torch.topk ranks NaN above every number, so a row holding NaN shows it first.
        nan_rows = values[..., :1].isnan()
    overlap = hits.float() / k.float()  # 0 / 0 = NaN where the support is empty
    overlap = torch.where(nan_rows, float("nan"), overlap).squeeze(-1)
    if valid is not None:
        overlap = torch.where(valid, overlap, 0.0)
    return overlap.squeeze(0) if squeeze else overlap


def topk_overlap_between(
    student_topk_ids: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    student_topk_mask: Optional[torch.Tensor] = None,
    teacher_topk_mask: Optional[torch.Tensor] = None,
    *,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Top-k overlap of two served id lists: ``|A ∩ B| / min(|A|, |B|)`` per position, ``A`` the set
    of the student's valid top-k ids (an engine's sampled-token ``logprobs=k``) and ``B`` the
    teacher's (its ``prompt_logprobs=k``), so neither model's logits are needed.

    An id listed twice counts once; slots where a mask is False are ignored (ragged lists). With both
    lists the true top-k of the two models (k distinct ids each) this is §1.7's overlap ``|A ∩ B| / k``;
    ties at the k-th place follow whatever order each engine reported.

    Args:
        student_topk_ids, teacher_topk_ids: int64 ``[..., k_s]`` and ``[..., k_t]`` (k may differ).
        student_topk_mask, teacher_topk_mask: optional bool of the same shapes, False at padded slots.
        mask: optional bool ``[...]``: the overlap is 0 at positions where it is False.

    Returns:
        float32 ``[...]`` in ``[0, 1]``; NaN at a valid position where either list is empty. Cost
        O(k log k) per position (a sort and a binary search, no ``k_s × k_t`` comparison).

    Raises:
        TypeError / ValueError naming the argument: non-int64 ids, shapes that differ before the
        last dimension, masks of the wrong shape.
    """
    for name, ids in (("student_topk_ids", student_topk_ids), ("teacher_topk_ids", teacher_topk_ids)):
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or ids.dim() < 1:
            raise TypeError(f"{name} must be an int64 tensor [..., k], got {getattr(ids, 'dtype', type(ids).__name__)}")
    if student_topk_ids.shape[:-1] != teacher_topk_ids.shape[:-1]:
        raise ValueError(
            f"student_topk_ids {tuple(student_topk_ids.shape)} and teacher_topk_ids {tuple(teacher_topk_ids.shape)} "
            f"must agree before the last dimension"
        )
    for name, m, ids in (
        ("student_topk_mask", student_topk_mask, student_topk_ids),
        ("teacher_topk_mask", teacher_topk_mask, teacher_topk_ids),
    ):
        if m is not None and m.shape != ids.shape:
            raise ValueError(f"{name} {tuple(m.shape)} must have the shape of its ids {tuple(ids.shape)}")
    if mask is not None and mask.shape != student_topk_ids.shape[:-1]:
        raise ValueError(f"mask {tuple(mask.shape)} must have shape {tuple(student_topk_ids.shape[:-1])}")
    no_logprobs_s = torch.zeros((), device=student_topk_ids.device).expand(student_topk_ids.shape)
    no_logprobs_t = torch.zeros((), device=teacher_topk_ids.device).expand(teacher_topk_ids.shape)
    a_valid = teacher_support(student_topk_ids, no_logprobs_s, student_topk_mask)  # distinct valid ids
    b_valid = teacher_support(teacher_topk_ids, no_logprobs_t, teacher_topk_mask)
    # Invalid slots get sentinels that match nothing: -1 in the sorted list, -2 in the queries.
    b = torch.where(b_valid, teacher_topk_ids, -1).sort(-1).values
    a = torch.where(a_valid, student_topk_ids, -2)
    at = torch.searchsorted(b.contiguous(), a.contiguous()).clamp(max=b.shape[-1] - 1)
    hits = (b.gather(-1, at) == a).sum(-1)
    size = torch.minimum(a_valid.sum(-1), b_valid.sum(-1))
    overlap = hits.float() / size.float()  # 0 / 0 = NaN where either list is empty
    if mask is not None:
        overlap = torch.where(mask.bool(), overlap, 0.0)
    return overlap


def sparse_teacher_stats(
    student_logits: torch.Tensor,
    tokens: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_token_logprob: torch.Tensor,
    *,
    teacher_topk_mask: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
) -> SparseTeacherStats:
    """The per-token quantities of :func:`opd_ext.vopd_loss_sparse_teacher`, for trainers that own
    their policy-gradient loss (verl, NeMo-RL): reward ``r = log q(y) - log p(y)``, the top-k
    baseline ``b = -KL(p̄‖q̄)`` over the teacher's support (both renormalised there, the same
    computation as the loss's ``baseline="topk"``) and the advantage ``A = r - b``.

    ``-A`` times ``∇ log p(y)``, weighted and normalised, is the loss's gradient: the loss with
    ``baseline="topk"`` equals ``-Σ w·sg(A)·log p(y) / norm``. Everything is detached.

    Args:
        student_logits: ``[..., V]`` float32, bfloat16 or float16.
        tokens: int64 ``[...]`` sampled ids (any value where ``mask`` is False).
        teacher_topk_ids, teacher_topk_logprobs, teacher_token_logprob, teacher_topk_mask: the
            served teacher, as for :func:`opd_ext.vopd_loss_sparse_teacher` (a
            :class:`ServedTeacher`'s fields).
        mask: optional bool ``[...]``, positions that count; every statistic is 0 elsewhere.
        temperature: τ, divides the student's logits (the teacher's log-probs are taken as served).

    Returns:
        :class:`SparseTeacherStats`, float32 ``[...]`` each. A valid position with an empty support
        has ``topk_kl`` 0.

    Raises:
        ValueError / TypeError naming the argument, as :func:`opd_ext.vopd_loss_sparse_teacher`.
    """
    temperature = check_temperature(temperature)
    check_logits("student_logits", student_logits)
    check_teacher_token_logprob(teacher_token_logprob, student_logits)
    if mask is not None:
        check_mask(mask, student_logits)
        valid = mask.bool()
    else:
        valid = torch.ones(student_logits.shape[:-1], dtype=torch.bool, device=student_logits.device)
    support = support_at_valid_positions(
        student_logits, teacher_topk_ids, teacher_topk_logprobs, teacher_topk_mask, valid
    )
    tokens = sampled_tokens(tokens, student_logits, valid)
    with torch.no_grad():
        logits = student_logits.detach()
        student_logprob, _ = ops.student_stats(logits, tokens, temperature)
        kl = support_reverse_kl(logits, teacher_topk_ids, teacher_topk_logprobs.detach(), support, temperature)
        teacher_logprob = teacher_token_logprob.detach().float()
        reward = teacher_logprob - student_logprob
        fields = (student_logprob, teacher_logprob, reward, kl, reward + kl)
        return SparseTeacherStats(*(torch.where(valid, x.float(), 0.0) for x in fields))
