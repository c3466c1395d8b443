"""Full teacher logits (the dense path): token statistics, the top-k overlap, and the vOPD /
reverse-KL losses on the fused kernels (docs/spec.md §1-2).

Forward: one ``token_stats`` pass over the logits gives every per-token quantity. Backward:
``policy_gradient_backward`` / ``reverse_kl_backward`` write ∂L/∂student_logits in one more pass, in
the student's dtype; no [N, V] float32 temporaries exist besides that gradient. Gradients flow to
``student_logits`` only: the teacher, the rewards and the baselines are detached. ``mask``,
``weights``, ``num_items``, ``reduction``, ``return_stats`` and ``temperature`` follow the
conventions of :mod:`opd_ext.objective`. DTensor logits placed ``Shard(-1)`` take the
vocab-parallel path (:mod:`opd_ext.distributed`).
"""

from __future__ import annotations

import torch

from opd_ext import ops
from opd_ext._validation import check_k, check_logit_pair, check_temperature, check_tokens, is_dtensor
from opd_ext.distributed import (
    from_dtensors,
    vocab_parallel_reverse_kl_loss,
    vocab_parallel_token_stats,
    vocab_parallel_topk_overlap,
    vocab_parallel_vopd_loss,
)
from opd_ext.objective import (
    DEFAULT_TOPK,
    TokenStats,
    TokenStatsWithForwardKL,
    check_vopd_options,
    loss_scale,
    policy_gradient_loss,
    reverse_kl_objective,
    sampled_tokens,
    vopd_baseline_kl,
)


def topk_overlap(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int = 16) -> torch.Tensor:
    """Fraction of shared ids between the student's and the teacher's top-k next tokens.

    ``overlap = |TopK(student) ∩ TopK(teacher)| / k`` per position, computed from the logits in one
    pass per row without materialising ``torch.topk`` outputs (docs/spec.md §1). Ties at the k-th
    value go to the lower vocabulary index, so CPU and CUDA agree exactly. Softmax and temperature
    do not change the ranking, so raw logits are the right input.

    Args:
        student_logits: ``[..., V]`` float32, bfloat16 or float16.
        teacher_logits: same shape and device; same dtype, or float32 beside a bfloat16/float16 row
            on either side.
        k: ``1 <= k <= V`` (Prune-OPD uses 16).

    Returns:
        ``[...]`` float32 in ``[0, 1]``; NaN in rows whose logits contain NaN (other rows unaffected).

    Raises:
        TypeError / ValueError naming the argument: dtypes, shapes, devices, ``k`` out of range.
    """
    if is_dtensor(student_logits, teacher_logits):
        return from_dtensors(vocab_parallel_topk_overlap, student_logits, teacher_logits, k)
    check_logit_pair(student_logits, teacher_logits)
    check_k(k, student_logits.shape[-1])
    return ops.topk_overlap(student_logits, teacher_logits, k)


def token_stats(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    forward_kl: bool = False,
):
    """Log-probs of the sampled tokens under student and teacher and KL(p‖q), in one pass.

    ``p = softmax(student_logits / τ)``, ``q = softmax(teacher_logits / τ)``. The reward of OPD is
    ``teacher_logprob - student_logprob``; its expectation under p is ``-reverse_kl``. The fused
    pass yields the forward KL(q‖p) at no extra cost: ``forward_kl=True`` returns it as a fourth
    field (a separate tuple type, so ``a, b, c = token_stats(...)`` keeps working).

    Args:
        student_logits: ``[..., V]`` float32 / bfloat16 / float16.
        teacher_logits: same shape and device; same dtype, or float32 beside a bfloat16/float16
            student, or bfloat16/float16 beside a float32 student.
        tokens: int64 ``[...]`` sampled ids in ``[0, V)``.
        temperature: τ > 0.

    Returns:
        :class:`TokenStats` (or :class:`TokenStatsWithForwardKL`) of float32 ``[...]`` tensors, not
        differentiable (use :func:`vopd_loss` / :func:`reverse_kl_loss` to train). A teacher ``-inf``
        where the student has mass gives ``reverse_kl = inf``; NaN logits give NaN in that row only.
    """
    if is_dtensor(student_logits, teacher_logits):
        return from_dtensors(
            vocab_parallel_token_stats,
            student_logits,
            teacher_logits,
            tokens,
            temperature=temperature,
            forward_kl=forward_kl,
        )
    check_logit_pair(student_logits, teacher_logits)
    check_tokens(tokens, student_logits)
    temperature = check_temperature(temperature)
    stats = ops.token_stats(student_logits.detach(), teacher_logits.detach(), tokens, temperature)
    if forward_kl:
        return TokenStatsWithForwardKL(stats.student_logprob, stats.teacher_logprob, stats.reverse_kl, stats.forward_kl)
    return TokenStats(stats.student_logprob, stats.teacher_logprob, stats.reverse_kl)


def vopd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    mask=None,
    weights=None,
    temperature: float = 1.0,
    baseline: str = "full",
    topk: int = DEFAULT_TOPK,
    kl: str = "reverse",
    num_items=None,
    reduction: str = "mean",
    return_stats: bool = False,
):
    """vOPD policy-gradient surrogate ``L = -Σ_t w_t · sg(A_t) · log p(y_t) / norm``.

    ``A_t = log q(y_t) - log p(y_t) - b_t`` with the detached baseline ``b_t``:

    * ``baseline="full"`` (default): ``b = -KL(p‖q)``, the closed-form value function of OPD.
      ``kl="forward"`` uses ``-KL(q‖p)`` instead, for comparison only (docs/spec.md §1).
    * ``baseline="topk"``: ``b = -KL(p̄‖q̄)`` over the student's ``topk`` most likely ids, both
      distributions renormalised there (the vOPD authors' code, k = 100).
    * ``baseline="none"``: plain OPD, ``A = r``.

    Every baseline leaves the gradient unbiased and lowers its variance (tests/test_vopd_estimator.py
    checks both). The returned value is the surrogate (its gradient is the estimator), float32,
    differentiable w.r.t. ``student_logits`` only; the gradient has the student's dtype.

    Args:
        student_logits, teacher_logits: ``[..., V]`` as in :func:`token_stats`.
        tokens: int64 ``[...]`` sampled ids (any value at masked positions).
        mask, weights, num_items, temperature: conventions of :mod:`opd_ext.objective`.
        baseline: ``"full"`` | ``"topk"`` | ``"none"``.
        topk: k of the top-k baseline, ``1 <= topk <= V`` (only read with ``baseline="topk"``).
        kl: ``"reverse"`` | ``"forward"`` direction of the full baseline.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` (:mod:`opd_ext.objective`); ``"none"`` gives the float32
            ``[...]`` terms ``-w_t · sg(A_t) · log p(y_t)``.
        return_stats: also return a :class:`LossStats` (log-probs, reverse KL, advantage, baseline).

    Returns:
        The loss, or ``(loss, LossStats)`` with ``return_stats``.

    Raises:
        ValueError: an unknown ``baseline`` / ``kl`` / ``reduction`` (the message lists the choices),
        ``num_items`` with a reduction other than ``"mean"``, and the argument checks.

    Precision: values follow docs/spec.md §4. The backward receives the row log-sum-exp as float32, which
    rounds to ulp(lse): rows whose logits sit around ±1e4 get gradients with ~1e-3 relative error.
    """
    if is_dtensor(student_logits, teacher_logits):
        return from_dtensors(
            vocab_parallel_vopd_loss,
            student_logits,
            teacher_logits,
            tokens,
            mask=mask,
            weights=weights,
            temperature=temperature,
            baseline=baseline,
            topk=topk,
            kl=kl,
            num_items=num_items,
            reduction=reduction,
            return_stats=return_stats,
        )
    check_logit_pair(student_logits, teacher_logits)
    check_vopd_options(baseline, kl)
    temperature = check_temperature(temperature)
    topk = check_k(topk, student_logits.shape[-1], "topk", DEFAULT_TOPK) if baseline == "topk" else 0
    scale, valid, w = loss_scale(student_logits, mask, weights, num_items, reduction)
    tokens = sampled_tokens(tokens, student_logits, valid)

    stats = ops.token_stats(student_logits.detach(), teacher_logits.detach(), tokens, temperature, topk)
    value = vopd_baseline_kl(
        baseline, kl, reverse_kl=stats.reverse_kl, forward_kl=stats.forward_kl, topk_reverse_kl=stats.topk_reverse_kl
    )
    return policy_gradient_loss(
        student_logits,
        tokens,
        stats.student_logprob,
        stats.student_lse,
        stats.teacher_logprob,
        value,
        stats.reverse_kl,
        scale,
        valid,
        w,
        temperature,
        reduction,
        return_stats,
    )


def reverse_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    mask=None,
    weights=None,
    temperature: float = 1.0,
    num_items=None,
    reduction: str = "mean",
    return_stats: bool = False,
):
    """Dense (GKD-style) objective ``L = Σ_t w_t · KL(p_t‖q_t) / norm`` with a fused backward.

    ``∂KL/∂s_j = p_j (log p_j - log q_j - KL) / τ``. float32 scalar, differentiable w.r.t.
    ``student_logits`` only; the gradient has the student's dtype. A teacher ``-inf`` under student
    mass at a valid position makes the loss ``inf`` (its true value) and that row's gradient NaN.

    Args:
        student_logits, teacher_logits: ``[..., V]`` as in :func:`token_stats`.
        mask, weights, num_items, temperature: conventions of :mod:`opd_ext.objective`.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` (``[...]`` terms ``w_t · KL(p_t‖q_t)``).
        return_stats: also return a :class:`LossStats` (``reverse_kl``, ``weights``, ``mask``; no
            token log-probs: the loss takes no tokens).

    Returns / Raises: as :func:`vopd_loss`.

    Precision: values follow docs/spec.md §4. The backward receives both rows' log-sum-exps as float32,
    which round to ulp(lse): rows whose logits sit around ±1e4 get gradients with ~1e-3 relative
    error (up to ~2e-3·w/(norm·τ) absolute where the true gradient is tiny), as for
    :func:`vopd_loss`.
    """
    if is_dtensor(student_logits, teacher_logits):
        return from_dtensors(
            vocab_parallel_reverse_kl_loss,
            student_logits,
            teacher_logits,
            mask=mask,
            weights=weights,
            temperature=temperature,
            num_items=num_items,
            reduction=reduction,
            return_stats=return_stats,
        )
    check_logit_pair(student_logits, teacher_logits)
    temperature = check_temperature(temperature)
    scale, valid, w = loss_scale(student_logits, mask, weights, num_items, reduction)
    any_token = torch.zeros(student_logits.shape[:-1], dtype=torch.int64, device=student_logits.device)
    stats = ops.token_stats(student_logits.detach(), teacher_logits.detach(), any_token, temperature)
    return reverse_kl_objective(
        student_logits,
        teacher_logits,
        stats.reverse_kl,
        stats.student_lse,
        stats.teacher_lse,
        scale,
        valid,
        w,
        temperature,
        reduction,
        return_stats,
    )


def align_vocab(student_logits: torch.Tensor, teacher_logits: torch.Tensor):
    """Slice two logit tensors to their shared vocabulary prefix (views, no copy).

    Use when student and teacher share a tokenizer but pad their embedding tables to different
    sizes (Qwen2.5: 151936 vs 152064). The extra rows are padding that no token id reaches.
    """
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    return student_logits[..., :vocab], teacher_logits[..., :vocab]
