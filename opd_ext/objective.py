"""The objective core every loss plugs into: options, normalisation, the vOPD baseline choice, the
surrogate and KL autograd functions, and the statistics types (docs/spec.md §1-2).

The dense (:mod:`opd_ext.losses`), sparse-teacher (:mod:`opd_ext.sparse_teacher`), fused-linear
(:mod:`opd_ext.fused_linear`) and vocab-parallel (:mod:`opd_ext.distributed`) losses differ only in
how they obtain the per-token statistics; from those on, each goes through the functions here, so
the objective is assembled once.

Conventions shared by every loss:

* ``mask`` [...] (bool or 0/1 ints): positions that count. Masked positions may hold any token id
  (padding, -100) and any logits, NaN included: they contribute exactly 0 to the loss and gradient.
* ``weights`` [...]: per-token factors ``w_t`` (Prune-OPD multipliers; 1 when omitted), detached.
* ``norm`` = the number of valid tokens (at least 1), or ``num_items`` when given (int, float or a
  one-element tensor). Data parallelism (DDP, FSDP, ZeRO) *averages* gradients over the W ranks, so
  the gradient of one process on the whole batch needs ``num_items = global valid tokens / W`` on
  every rank; the global count itself would divide the gradient by W.
  :func:`opd_ext.distributed.global_num_items` computes it, over every micro-batch of an optimiser
  step when gradients accumulate. A zero ``num_items`` (no valid token anywhere) makes the loss
  exactly 0 with zero gradients, as an all-masked or empty batch does without it.
* ``reduction``: ``"mean"`` (default) divides the sum by ``norm``; ``"sum"`` does not (``num_items``
  is then an error: it only sets the normaliser of the mean); ``"none"`` returns the per-position
  terms ``[...]`` (0 where masked) whose ``.sum()`` is the ``"sum"`` loss, with the same fused backward.
* ``return_stats=True`` returns ``(loss, LossStats)``: detached float32 per-position statistics read
  from the forward pass (no extra pass over the logits), for logging.
* ``temperature`` τ divides the student and teacher logits before any softmax.
* A NaN in a row's logits makes that row's statistics NaN and leaves other rows untouched; a
  valid NaN row therefore makes the loss NaN (masking it out does not).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from opd_ext import ops
from opd_ext._validation import (
    check_choice,
    check_mask,
    check_num_items,
    check_teacher_topk,
    check_tokens,
    check_weights,
    has_mass,
)

#: Baselines of the vOPD loss on full teacher logits (docs/spec.md §1).
BASELINES = ("full", "topk", "none")
#: Baselines of the vOPD loss on a served (top-k) teacher: no full-vocabulary KL there.
SPARSE_TEACHER_BASELINES = ("topk", "none")
#: Directions of the full baseline's KL (``"forward"`` for comparison only).
KL_DIRECTIONS = ("reverse", "forward")
#: k of the top-k baseline in the vOPD authors' code.
DEFAULT_TOPK = 100
REDUCTIONS = ("mean", "sum", "none")


# ---- statistics types ----------------------------------------------------------------------------


class TokenStats(NamedTuple):
    """Per-position statistics, each float32 with the leading shape [...] of the logits."""

    student_logprob: torch.Tensor  # log p(y) = log softmax(s / τ)[y]
    teacher_logprob: torch.Tensor  # log q(y)
    reverse_kl: torch.Tensor  # KL(p‖q), the vOPD value (negated)


class TokenStatsWithForwardKL(NamedTuple):
    """:class:`TokenStats` plus the forward KL(q‖p) (``token_stats(..., forward_kl=True)``)."""

    student_logprob: torch.Tensor
    teacher_logprob: torch.Tensor
    reverse_kl: torch.Tensor
    forward_kl: torch.Tensor


class LossStats(NamedTuple):
    """What a loss computed per position (``return_stats=True``), for logging.

    Every field is a detached float32 ``[...]`` tensor (``mask`` is bool) with the leading shape of
    the logits, exactly 0 at masked positions, or None where that loss does not compute the quantity.
    The ``*_mean`` properties and :meth:`means` average over valid positions (unweighted; 0 when none
    is valid) as 0-d tensors, so logging them costs no device synchronisation until read.
    """

    student_logprob: Optional[torch.Tensor]  # log p(y_t); None for the dense KL losses (no tokens)
    teacher_logprob: Optional[torch.Tensor]  # log q(y_t) (as given, for a served teacher)
    reverse_kl: Optional[torch.Tensor]  # KL(p‖q); over the teacher's support for a served teacher
    advantage: Optional[torch.Tensor]  # A_t = r_t - b_t, the detached factor of the vOPD surrogate
    baseline: Optional[torch.Tensor]  # b_t (-KL for "full" / "topk", 0 for "none"); vOPD only
    weights: torch.Tensor  # w_t (1 when omitted), before any normalisation
    mask: torch.Tensor  # bool, the positions that count

    @property
    def reward(self) -> Optional[torch.Tensor]:
        """r_t = log q(y_t) - log p(y_t), or None without token log-probs."""
        if self.student_logprob is None or self.teacher_logprob is None:
            return None
        return torch.where(self.mask, self.teacher_logprob - self.student_logprob, 0.0)

    @property
    def num_tokens(self) -> torch.Tensor:
        """The number of valid positions, a 0-d int64 tensor."""
        return self.mask.sum()

    def mean(self, name: str) -> Optional[torch.Tensor]:
        """The mean of field (or ``"reward"``) ``name`` over valid positions, a float32 0-d tensor;
        None where the field is None. Raises AttributeError for an unknown name."""
        value = getattr(self, name)
        if value is None:
            return None
        return torch.where(self.mask, value, 0.0).sum() / self.mask.sum().clamp(min=1)

    def means(self) -> dict:
        """``{name: mean}`` for every computed field and the reward (``weights`` and ``mask``
        excluded), the keys a trainer logs, e.g. ``{"reverse_kl": tensor(0.31), ...}``."""
        names = ("student_logprob", "teacher_logprob", "reward", "reverse_kl", "advantage", "baseline")
        return {name: m for name in names if (m := self.mean(name)) is not None}

    student_logprob_mean = property(lambda self: self.mean("student_logprob"))
    teacher_logprob_mean = property(lambda self: self.mean("teacher_logprob"))
    reward_mean = property(lambda self: self.mean("reward"))
    reverse_kl_mean = property(lambda self: self.mean("reverse_kl"))
    advantage_mean = property(lambda self: self.mean("advantage"))
    baseline_mean = property(lambda self: self.mean("baseline"))


def loss_stats(
    valid: torch.Tensor,
    weights: torch.Tensor,
    *,
    student_logprob=None,
    teacher_logprob=None,
    reverse_kl=None,
    baseline_kl=None,
    policy_gradient: bool = False,
) -> LossStats:
    """:class:`LossStats` from a forward pass's per-position values; masked positions set to 0 (they
    may hold NaN or the statistics of a placeholder token). ``policy_gradient`` adds the advantage
    and the baseline ``b = -baseline_kl`` (0 when ``baseline_kl`` is None: no baseline)."""

    def clean(x):
        return None if x is None else torch.where(valid, x.detach().float(), 0.0)

    advantage = baseline = None
    if policy_gradient:
        baseline = torch.zeros_like(weights) if baseline_kl is None else clean(-baseline_kl)
        advantage = clean(teacher_logprob.float() - student_logprob.float() - baseline)
    return LossStats(
        clean(student_logprob), clean(teacher_logprob), clean(reverse_kl), advantage, baseline, clean(weights), valid
    )


# ---- options -------------------------------------------------------------------------------------


def check_vopd_options(baseline: str, kl: str) -> None:
    """The baseline / KL-direction pair of every vOPD loss and module."""
    check_choice("baseline", baseline, BASELINES)
    check_choice("kl", kl, KL_DIRECTIONS)
    if kl == "forward" and baseline != "full":
        raise ValueError(
            f'kl="forward" selects the full-vocabulary forward-KL baseline; it needs '
            f'baseline="full", got baseline={baseline!r}'
        )


def check_reduction(reduction, num_items=None) -> None:
    check_choice("reduction", reduction, REDUCTIONS)
    if reduction != "mean" and num_items is not None:
        raise ValueError(
            f"num_items sets the normaliser of reduction='mean'; reduction={reduction!r} does not "
            f"normalise: omit num_items, or use reduction='mean'"
        )


def vopd_baseline_kl(baseline: str, kl: str, *, reverse_kl=None, forward_kl=None, topk_reverse_kl=None):
    """The KL whose negation is the vOPD baseline ``b_t`` (docs/spec.md §1): KL(p‖q) or KL(q‖p) for
    ``"full"``, the top-k KL for ``"topk"``, None (no baseline) for ``"none"``."""
    if baseline == "full":
        return forward_kl if kl == "forward" else reverse_kl
    if baseline == "topk":
        return topk_reverse_kl
    return None


# ---- a served teacher's support (docs/spec.md §1.9) ---------------------------------------------------


def teacher_support(
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Which slots of a served teacher's top-k form its support: bool ``[..., k]``.

    A slot counts when ``teacher_topk_mask`` (if given) marks it valid, its log-prob carries
    probability (neither ``-inf``, with which servers pad ragged top-k lists, nor a finite stand-in
    below ``MASSLESS_LOGPROB`` ≈ -744.4 whose probability is 0 even in float64: vLLM's JSON
    -9999.0, SGLang's -3.4e38, -1e9) and its id did not already appear in an
    earlier slot of the row: lists that append the sampled token to the top-k can name an id twice
    (with the same log-prob); the support is a set and the first slot stands for the id. A sampled
    token appended from *outside* the top-k (vLLM's (k+1)-th entry) should be masked out
    (``opd_ext.served`` does): a support that contains the sampled action makes the top-k baseline
    depend on the action, which biases the policy gradient.
    NaN log-probs stay in the support, so they surface as NaN instead of vanishing. O(k log k) per
    position; the ids of slots outside the support are never read.
    """
    keep = has_mass(teacher_topk_logprobs)
    if teacher_topk_mask is not None:
        keep = keep & teacher_topk_mask.bool()
    if teacher_topk_ids.shape[-1] > 1:
        # A stable sort keeps equal ids in slot order, so each run of equal ids starts at its
        # first slot; slots outside the support sort last under a key no id reaches (-1 < 0).
        key = torch.where(keep, teacher_topk_ids, -1)
        sorted_key, order = torch.sort(key, dim=-1, stable=True, descending=True)
        repeat = torch.zeros_like(keep)
        repeat[..., 1:] = (sorted_key[..., 1:] == sorted_key[..., :-1]) & (sorted_key[..., 1:] >= 0)
        keep = keep & ~torch.zeros_like(keep).scatter(-1, order, repeat)
    return keep


def support_at_valid_positions(student_logits, teacher_topk_ids, teacher_topk_logprobs, teacher_topk_mask, valid):
    check_teacher_topk(teacher_topk_ids, teacher_topk_logprobs, student_logits, teacher_topk_mask, valid)
    return teacher_support(teacher_topk_ids, teacher_topk_logprobs.detach(), teacher_topk_mask) & valid.unsqueeze(-1)


# ---- the top-k KL family on a served teacher's top-k (docs/spec.md §1.11) ---------------------------

#: Divergences of :func:`opd_ext.topk_kl_loss` over the teacher's top-k support S (docs/spec.md §1.11).
TOPK_DIVERGENCES = (
    "forward",
    "forward_renormalized",
    "forward_tail",
    "reverse_renormalized",
    "reverse_tail",
    "generalized",
)

#: Divergences of :func:`opd_ext.student_topk_kl_loss`, over the student's own top-k.
STUDENT_TOPK_DIVERGENCES = ("reverse_tail", "reverse_renormalized")

#: The floor of a tail mass inside a log (float64): a teacher whose served top-k sums to 1 up to
#: rounding leaves no tail, and without a floor any student tail mass would make the tail term
#: infinite. At the floor the term is finite; above it the divergence is exact.
TAIL_FLOOR = 1e-12


def _tail_term(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x·(log x - log y) for tail masses, 0 where x = 0, logs of masses floored at TAIL_FLOOR."""
    return torch.where(x > 0, x * (x.clamp_min(TAIL_FLOOR).log() - y.clamp_min(TAIL_FLOOR).log()), 0.0)


class TopkDivergence(NamedTuple):
    """Per-position values of :func:`topk_divergence`, float64 ``[...]``."""

    divergence: torch.Tensor  # the chosen divergence; 0 where the support is empty
    student_mass: torch.Tensor  # P = Σ_S p_k, the student's full-softmax mass on the support
    teacher_mass: torch.Tensor  # Q = Σ_S q_k, as served
    teacher_entropy: torch.Tensor  # -Σ_S q_k log q_k - (1-Q) log(1-Q): the teacher's top-k + tail bucket


def topk_divergence(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, support: torch.Tensor, divergence: str
) -> TopkDivergence:
    """One divergence of the top-k KL family (docs/spec.md §1.11) from ``[..., k]`` log-probs: the
    student's full-softmax ``log p`` at the teacher's ids and the teacher's served ``log q``, over the
    slots where ``support`` is True. Plain differentiable torch on ``[..., k]``: no clamp of the
    result, so a divergence that can be negative (``"forward"`` on unnormalised masses) stays so.
    Slots outside the support may hold anything (-inf, NaN): they never reach a value or gradient.
    """
    any_slot = support.any(-1)
    a = torch.where(support, student_logprobs, 0.0)
    t = torch.where(support, teacher_logprobs, 0.0)
    p = torch.where(support, a.exp(), 0.0)
    q = torch.where(support, t.exp(), 0.0)
    neg_inf = torch.tensor(float("-inf"), dtype=a.dtype, device=a.device)
    lse_a = torch.where(any_slot, torch.where(support, a, neg_inf).logsumexp(-1), 0.0)
    lse_t = torch.where(any_slot, torch.where(support, t, neg_inf).logsumexp(-1), 0.0)
    # Tail masses 1 - P and 1 - Q computed as -expm1(log P): exact to relative rounding even when the
    # top-k holds nearly all the mass; a served top-k summing past 1 by rounding leaves a tail of 0.
    tail_p = torch.where(any_slot, -torch.expm1(lse_a), 1.0).clamp_min(0.0)
    tail_q = torch.where(any_slot, -torch.expm1(lse_t), 1.0).clamp_min(0.0)
    forward_terms = (q * (t - a)).sum(-1)
    if divergence == "forward":
        value = forward_terms
    elif divergence == "generalized":
        value = forward_terms - q.sum(-1) + p.sum(-1)
    elif divergence == "forward_tail":
        value = forward_terms + _tail_term(tail_q, tail_p)
    elif divergence == "reverse_tail":
        value = (p * (a - t)).sum(-1) + _tail_term(tail_p, tail_q)
    else:
        log_p_bar = torch.where(support, a - lse_a.unsqueeze(-1), 0.0)
        log_q_bar = torch.where(support, t - lse_t.unsqueeze(-1), 0.0)
        if divergence == "forward_renormalized":
            value = (torch.where(support, log_q_bar.exp(), 0.0) * (log_q_bar - log_p_bar)).sum(-1)
        else:
            value = (torch.where(support, log_p_bar.exp(), 0.0) * (log_p_bar - log_q_bar)).sum(-1)
    value = torch.where(any_slot, value, 0.0)
    with torch.no_grad():
        entropy = -(q * t).sum(-1) - _tail_term(tail_q, torch.ones_like(tail_q))
    return TopkDivergence(value, p.sum(-1).detach(), q.sum(-1), entropy)


def support_slots(ids: torch.Tensor, support: torch.Tensor):
    """``(source, filled)`` for reading a student row at a support's ids ``[..., k]``: ``source`` the
    slot each slot takes its id from (itself inside the support, the row's first support slot
    outside it) and ``filled`` those ids (0 in a row without support). Every id a backward writes is
    then written with one value: slots outside the support repeat a support slot's."""
    k = ids.shape[-1]
    first = support.to(torch.uint8).argmax(-1, keepdim=True)
    source = torch.where(support, torch.arange(k, device=ids.device), first)
    filled = torch.where(support.any(-1, keepdim=True), ids.gather(-1, source), 0)
    return source, filled


def logprob_gradient_at_ids(grad_logprobs, support, source, logprobs, temperature: float):
    """The backward of ``log softmax(s / τ)`` gathered at ``filled`` ids (:func:`support_slots`):
    ``(G [...], at_ids [..., k])`` with ``G = Σ_k g_k`` over the support, the factor of the
    ``-G·p/τ`` written over the whole row, and ``at_ids = (g_k - G·p_k) / τ`` the complete value at
    the ids, in float64 (adding ``g`` to an already rounded ``-G·p`` would round twice where the two
    nearly cancel)."""
    g = torch.where(support, grad_logprobs, 0.0)
    row = g.sum(-1, keepdim=True)
    return row.squeeze(-1), (g.gather(-1, source) - row * logprobs.exp()) / temperature


class TopkKLStats(NamedTuple):
    """Per-position statistics of :func:`topk_kl_loss` (``return_stats=True``): detached float32
    ``[...]`` (``student_topk_logprob`` ``[..., k]``), exactly 0 at masked positions (``mask`` is bool)."""

    divergence: torch.Tensor  # the chosen divergence, unweighted
    student_mass: torch.Tensor  # P = Σ_S p_k, the student's full-softmax mass on the teacher's support
    teacher_mass: torch.Tensor  # Q = Σ_S q_k, as served
    teacher_entropy: torch.Tensor  # -Σ_S q_k log q_k - (1 - Q) log(1 - Q) (top-k plus a tail bucket)
    student_topk_logprob: torch.Tensor  # [..., k]: log p at the teacher's ids; 0 (not a log-prob) at padded slots
    weights: torch.Tensor  # w_t (1 when omitted)
    mask: torch.Tensor

    def means(self) -> dict:
        """``{name: mean over valid positions}`` of the four statistics (0-d tensors)."""
        n = self.mask.sum().clamp(min=1)
        return {
            name: getattr(self, name).sum() / n
            for name in ("divergence", "student_mass", "teacher_mass", "teacher_entropy")
        }


def topk_kl_objective(
    student_logprobs, teacher_topk_logprobs, support, divergence, scale, valid, w, reduction, return_stats
):
    """The loss of the top-k KL family from the student's log-probs at the teacher's ids (float64
    ``[..., k]``, differentiable: single-device or vocab-parallel gather) and the support: the
    reduction and the :class:`TopkKLStats` (docs/spec.md §1.11)."""
    values = topk_divergence(student_logprobs, teacher_topk_logprobs.detach().double(), support, divergence)
    terms = torch.where(valid, scale.double() * values.divergence, 0.0)
    loss = (terms if reduction == "none" else terms.sum()).float()
    if not return_stats:
        return loss

    def clean(x):
        return torch.where(valid, x.detach().float(), 0.0)

    stats = TopkKLStats(
        clean(values.divergence),
        clean(values.student_mass),
        clean(values.teacher_mass),
        clean(values.teacher_entropy),
        torch.where(support, student_logprobs.detach().float(), 0.0),
        w,
        valid,
    )
    return loss, stats


# ---- normalisation --------------------------------------------------------------------------------


def loss_scale(leading: torch.Tensor, mask, weights, num_items, reduction: str = "mean"):
    """``(scale, valid, w)`` for positions of the leading shape of ``leading`` [..., X]: the
    per-position factor ``w_t / norm`` (float32, exactly 0 where masked; norm = 1 unless the
    reduction is "mean"), the validity mask, and ``w_t`` itself (0 where masked). Checks ``mask``,
    ``weights``, ``num_items`` and ``reduction``."""
    lead, device = leading.shape[:-1], leading.device
    check_reduction(reduction, num_items)
    if mask is not None:
        check_mask(mask, leading)
        valid = mask.bool()
    else:
        valid = torch.ones(lead, dtype=torch.bool, device=device)
    if weights is not None:
        check_weights(weights, leading)
    num_items = check_num_items(num_items)
    w = torch.ones(lead, dtype=torch.float32, device=device) if weights is None else weights.detach().float()
    w = torch.where(valid, w, 0.0)
    if reduction != "mean":
        return w, valid, w
    if num_items is None:
        return w / valid.sum().clamp(min=1).float(), valid, w
    if isinstance(num_items, torch.Tensor):
        # A zero count (no valid token on any rank) scales every term to exactly 0: 0/0 would make
        # the loss and every gradient NaN. Decided on the device, without reading the count.
        norm = num_items.to(device=device, dtype=torch.float32)
        return torch.where(norm == 0, 0.0, w / torch.where(norm == 0, 1.0, norm)), valid, w
    return (w / float(num_items) if num_items else torch.zeros_like(w)), valid, w


def sampled_tokens(tokens, logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Checked ids with masked positions set to 0, so padding ids (-100, ...) never reach a kernel."""
    check_tokens(tokens, logits)
    return torch.where(valid, tokens, 0)


def masked_terms(coef: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """coef·value per position, exactly 0 where the coefficient is 0 (masked) even if value is ±inf/NaN."""
    return torch.where(coef == 0, 0.0, coef * value)


def advantage_coef(scale, valid, teacher_logprob, student_logprob, baseline_kl) -> torch.Tensor:
    """``∂L/∂log p(y)`` of the vOPD surrogate: ``-w/norm · A`` with ``A = r - b = log q(y) - log p(y)
    + baseline_kl`` (the baseline is ``b = -baseline_kl``; 0 for no baseline); 0 at masked positions."""
    advantage = teacher_logprob - student_logprob + baseline_kl
    return torch.where(valid, -scale * advantage, 0.0)


def _row_coef(coef: torch.Tensor, grad: torch.Tensor, per_row: bool) -> torch.Tensor:
    """The backward kernels' per-row factor: a scalar incoming gradient scales every row alike; a
    per-row one (reduction "none") scales its own row, and masked rows stay exactly 0 whatever the
    caller's gradient holds there."""
    return torch.where(coef == 0, 0.0, coef * grad) if per_row else coef * grad


# ---- autograd: the surrogate losses with fused backward kernels ------------------------------------


class PolicyGradientSurrogate(torch.autograd.Function):
    """Σ_r coef_r · log p_r(y_r) (per row with ``per_row``), coef detached; backward by
    ``policy_gradient_backward``."""

    @staticmethod
    def forward(ctx, student_logits, tokens, student_logprob, student_lse, coef, temperature, per_row=False):
        ctx.save_for_backward(student_logits, tokens, student_lse, coef)
        ctx.temperature, ctx.per_row = temperature, per_row
        terms = masked_terms(coef, student_logprob)
        return terms if per_row else terms.sum()

    @staticmethod
    def backward(ctx, grad_loss):
        student_logits, tokens, student_lse, coef = ctx.saved_tensors
        grad = ops.policy_gradient_backward(
            _row_coef(coef, grad_loss, ctx.per_row), student_logits.detach(), tokens, student_lse, ctx.temperature
        )
        return grad, None, None, None, None, None, None


class ReverseKLObjective(torch.autograd.Function):
    """Σ_r coef_r · KL(p_r‖q_r) (per row with ``per_row``), coef and teacher detached; backward by
    ``reverse_kl_backward``."""

    @staticmethod
    def forward(
        ctx, student_logits, teacher_logits, reverse_kl, student_lse, teacher_lse, coef, temperature, per_row=False
    ):
        ctx.save_for_backward(student_logits, teacher_logits, reverse_kl, student_lse, teacher_lse, coef)
        ctx.temperature, ctx.per_row = temperature, per_row
        terms = masked_terms(coef, reverse_kl)
        return terms if per_row else terms.sum()

    @staticmethod
    def backward(ctx, grad_loss):
        student_logits, teacher_logits, reverse_kl, student_lse, teacher_lse, coef = ctx.saved_tensors
        grad = ops.reverse_kl_backward(
            _row_coef(coef, grad_loss, ctx.per_row),
            student_logits.detach(),
            teacher_logits,
            student_lse,
            teacher_lse,
            reverse_kl,
            ctx.temperature,
        )
        return grad, None, None, None, None, None, None, None


# ---- the two objectives from a forward's statistics -------------------------------------------------


def policy_gradient_loss(
    student_logits,
    tokens,
    student_logprob,
    student_lse,
    teacher_logprob,
    baseline_kl,
    reverse_kl,
    scale,
    valid,
    weights,
    temperature,
    reduction,
    return_stats,
):
    """The vOPD surrogate ``-Σ w·sg(A)·log p(y) / norm`` from a forward's per-position statistics
    (``baseline_kl`` None: no baseline), and its :class:`LossStats` with ``return_stats``.
    ``tokens`` are the ids the backward kernel reads (-1: outside a vocabulary shard)."""
    coef = advantage_coef(scale, valid, teacher_logprob, student_logprob, 0.0 if baseline_kl is None else baseline_kl)
    loss = PolicyGradientSurrogate.apply(
        student_logits, tokens, student_logprob, student_lse, coef, temperature, reduction == "none"
    )
    if not return_stats:
        return loss
    return loss, loss_stats(
        valid,
        weights,
        student_logprob=student_logprob,
        teacher_logprob=teacher_logprob,
        reverse_kl=reverse_kl,
        baseline_kl=baseline_kl,
        policy_gradient=True,
    )


def reverse_kl_objective(
    student_logits,
    teacher_logits,
    reverse_kl,
    student_lse,
    teacher_lse,
    scale,
    valid,
    weights,
    temperature,
    reduction,
    return_stats,
):
    """``Σ w·KL(p‖q) / norm`` from a forward's per-position statistics, and its :class:`LossStats`
    with ``return_stats``."""
    loss = ReverseKLObjective.apply(
        student_logits,
        teacher_logits.detach(),
        reverse_kl,
        student_lse,
        teacher_lse,
        scale,
        temperature,
        reduction == "none",
    )
    return (loss, loss_stats(valid, weights, reverse_kl=reverse_kl)) if return_stats else loss
