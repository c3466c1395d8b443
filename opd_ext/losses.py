"""Token statistics and the vOPD / reverse-KL losses (docs/spec.md §1-2) on the fused kernels.

Forward: one ``token_stats`` (or ``student_stats``) pass over the logits gives every per-token
quantity. Backward: ``policy_gradient_backward`` / ``reverse_kl_backward`` write ∂L/∂student_logits
in one more pass, in the student's dtype; no [N, V] float32 temporaries exist besides that gradient.
Gradients flow to ``student_logits`` only: the teacher, the rewards and the baselines are detached.

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

from opd_ext import _meta  # noqa: F401  (registers the fake kernels)
from opd_ext import reference
from opd_ext._extension import ops, runs_cuda_kernels
from opd_ext.ops import CUDA_MAX_TOPK
from opd_ext._validation import (
    is_dtensor,
    check_choice,
    check_k,
    check_logit_pair,
    check_logits,
    check_mask,
    check_num_items,
    check_teacher_token_logprob,
    check_teacher_topk,
    check_temperature,
    check_tokens,
    check_weights,
)

BASELINES = ("full", "topk", "none")
SPARSE_TEACHER_BASELINES = ("topk", "none")
KL_DIRECTIONS = ("reverse", "forward")
DEFAULT_TOPK = 100  # k of the top-k baseline in the vOPD authors' code
REDUCTIONS = ("mean", "sum", "none")


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


def _loss_stats(valid: torch.Tensor, weights: torch.Tensor, *, student_logprob=None, teacher_logprob=None,
               reverse_kl=None, baseline_kl=None, policy_gradient: bool = False) -> LossStats:
    """:class:`LossStats` from a forward pass's per-position values; masked positions set to 0 (they
    may hold NaN or the statistics of a placeholder token). ``policy_gradient`` adds the advantage
    and the baseline ``b = -baseline_kl`` (0 when ``baseline_kl`` is None: no baseline)."""

    def clean(x):
        return None if x is None else torch.where(valid, x.detach().float(), 0.0)

    advantage = baseline = None
    if policy_gradient:
        baseline = torch.zeros_like(weights) if baseline_kl is None else clean(-baseline_kl)
        advantage = clean(teacher_logprob.float() - student_logprob.float() - baseline)
    return LossStats(clean(student_logprob), clean(teacher_logprob), clean(reverse_kl), advantage, baseline,
                     clean(weights), valid)


def token_stats(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tokens: torch.Tensor, *,
                temperature: float = 1.0, forward_kl: bool = False):
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
        return _vocab_parallel("vocab_parallel_token_stats", student_logits, teacher_logits, tokens,
                               temperature=temperature, forward_kl=forward_kl)
    check_logit_pair(student_logits, teacher_logits)
    check_tokens(tokens, student_logits)
    temperature = check_temperature(temperature)
    logp_s, logp_t, reverse, forward, _, _, _ = ops.token_stats(
        student_logits.detach(), teacher_logits.detach(), tokens, temperature, 0)
    if forward_kl:
        return TokenStatsWithForwardKL(logp_s, logp_t, reverse, forward)
    return TokenStats(logp_s, logp_t, reverse)


def _vocab_parallel(name, student_logits, teacher_logits, *args, **kwargs):
    """DTensor logits placed Shard(-1): the function of opd_ext.distributed that takes the shards."""
    from opd_ext import distributed

    return distributed.from_dtensors(getattr(distributed, name), student_logits, teacher_logits, *args, **kwargs)


def token_stats_op(student_logits, teacher_logits, tokens, temperature: float, topk: int):
    """``ops.token_stats`` for every ``topk``: the CUDA kernel streams at most ``CUDA_MAX_TOPK``
    candidates per row, so beyond that the top-k baseline comes from a sort
    (``reference.topk_reverse_kl``, a block of rows at a time), as ``topk_overlap`` does."""
    if topk <= CUDA_MAX_TOPK or not runs_cuda_kernels(student_logits):
        return ops.token_stats(student_logits, teacher_logits, tokens, temperature, topk)
    stats = list(ops.token_stats(student_logits, teacher_logits, tokens, temperature, 0))
    stats[4] = _sorted_topk_reverse_kl(student_logits, teacher_logits, topk, temperature)
    return tuple(stats)


# Rows per block of the sorted top-k fallback, as bytes of float32 logits: the reference holds about
# nine times that (a float32 copy, the sort's values and int64 ids, float64 copies of both sides),
# so whole [N, V] inputs would cost ~36 bytes per logit.
_TOPK_SORT_BLOCK_BYTES = 16 * 2**20


def _sorted_topk_reverse_kl(student_logits, teacher_logits, topk: int, temperature: float) -> torch.Tensor:
    """``reference.topk_reverse_kl`` as float32 ``[...]``, one block of rows at a time."""
    vocab = student_logits.shape[-1]
    flat_s, flat_t = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
    block = max(1, _TOPK_SORT_BLOCK_BYTES // (4 * vocab))
    out = torch.empty(flat_s.shape[0], dtype=torch.float32, device=student_logits.device)
    for start in range(0, flat_s.shape[0], block):
        rows = slice(start, start + block)
        out[rows] = reference.topk_reverse_kl(flat_s[rows], flat_t[rows], topk, temperature)
    return out.reshape(student_logits.shape[:-1])


# ---- autograd: the surrogate losses with fused backward kernels -----------------------------------


def _masked_terms(coef: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """coef·value per position, exactly 0 where the coefficient is 0 (masked) even if value is ±inf/NaN."""
    return torch.where(coef == 0, 0.0, coef * value)


def _masked_sum(coef: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Σ coef·value where a zero coefficient (masked position) contributes 0 even if value is ±inf/NaN."""
    return _masked_terms(coef, value).sum()


def _row_coef(coef: torch.Tensor, grad: torch.Tensor, per_row: bool) -> torch.Tensor:
    """The backward kernels' per-row factor: a scalar incoming gradient scales every row alike; a
    per-row one (reduction "none") scales its own row, and masked rows stay exactly 0 whatever the
    caller's gradient holds there."""
    return torch.where(coef == 0, 0.0, coef * grad) if per_row else coef * grad


class _PolicyGradientSurrogate(torch.autograd.Function):
    """Σ_r coef_r · log p_r(y_r) (per row with ``per_row``), coef detached; backward by
    policy_gradient_backward."""

    @staticmethod
    def forward(ctx, student_logits, tokens, student_logprob, student_lse, coef, temperature, per_row=False):
        ctx.save_for_backward(student_logits, tokens, student_lse, coef)
        ctx.temperature, ctx.per_row = temperature, per_row
        terms = _masked_terms(coef, student_logprob)
        return terms if per_row else terms.sum()

    @staticmethod
    def backward(ctx, grad_loss):
        student_logits, tokens, student_lse, coef = ctx.saved_tensors
        grad = ops.policy_gradient_backward(_row_coef(coef, grad_loss, ctx.per_row), student_logits.detach(),
                                            tokens, student_lse, ctx.temperature)
        return grad, None, None, None, None, None, None


class _ReverseKLObjective(torch.autograd.Function):
    """Σ_r coef_r · KL(p_r‖q_r) (per row with ``per_row``), coef and teacher detached; backward by
    reverse_kl_backward."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, reverse_kl, student_lse, teacher_lse, coef, temperature,
                per_row=False):
        ctx.save_for_backward(student_logits, teacher_logits, reverse_kl, student_lse, teacher_lse, coef)
        ctx.temperature, ctx.per_row = temperature, per_row
        terms = _masked_terms(coef, reverse_kl)
        return terms if per_row else terms.sum()

    @staticmethod
    def backward(ctx, grad_loss):
        student_logits, teacher_logits, reverse_kl, student_lse, teacher_lse, coef = ctx.saved_tensors
        grad = ops.reverse_kl_backward(_row_coef(coef, grad_loss, ctx.per_row), student_logits.detach(),
                                       teacher_logits, student_lse, teacher_lse, reverse_kl, ctx.temperature)
        return grad, None, None, None, None, None, None, None


# ---- shared argument handling ---------------------------------------------------------------------


def _check_reduction(reduction, num_items) -> None:
    check_choice("reduction", reduction, REDUCTIONS)
    if reduction != "mean" and num_items is not None:
        raise ValueError(f"num_items sets the normaliser of reduction='mean'; reduction={reduction!r} does not "
                         f"normalise: omit num_items, or use reduction='mean'")


def _scale_and_weights(student_logits, mask, weights, num_items, reduction: str = "mean"):
    """(per-position ``w_t / norm`` (float32, exactly 0 where masked; norm = 1 unless the reduction
    is "mean"), the validity mask, ``w_t`` itself (0 where masked))."""
    lead, device = student_logits.shape[:-1], student_logits.device
    _check_reduction(reduction, num_items)
    if mask is not None:
        check_mask(mask, student_logits)
        valid = mask.bool()
    else:
        valid = torch.ones(lead, dtype=torch.bool, device=device)
    if weights is not None:
        check_weights(weights, student_logits)
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


def _loss_scale(student_logits, mask, weights, num_items, reduction: str = "mean"):
    """Per-position ``w_t / norm`` and the validity mask (see :func:`_scale_and_weights`)."""
    scale, valid, _ = _scale_and_weights(student_logits, mask, weights, num_items, reduction)
    return scale, valid


def _sampled_tokens(tokens, student_logits, valid):
    """Checked ids with masked positions set to 0, so padding ids (-100, ...) never reach a kernel."""
    check_tokens(tokens, student_logits)
    return torch.where(valid, tokens, 0)


def _advantage_coef(scale, valid, teacher_logprob, student_logprob, baseline_value):
    """-w/norm · A with A = r - b = (log q(y) - log p(y)) + value; 0 at masked positions."""
    advantage = teacher_logprob - student_logprob + baseline_value
    return torch.where(valid, -scale * advantage, 0.0)


def _check_vopd_options(baseline: str, kl: str) -> None:
    """The baseline / KL-direction pair of every vOPD loss (dense, fused-linear, vocab-parallel)."""
    check_choice("baseline", baseline, BASELINES)
    check_choice("kl", kl, KL_DIRECTIONS)
    if kl == "forward" and baseline != "full":
        raise ValueError(f'kl="forward" selects the full-vocabulary forward-KL baseline; it needs '
                         f'baseline="full", got baseline={baseline!r}')


def _policy_gradient_loss(student_logits, tokens, student_logprob, student_lse, teacher_logprob, baseline_kl,
                          reverse_kl, scale, valid, weights, temperature, reduction, return_stats):
    """The vOPD surrogate from a forward's per-position statistics (``baseline_kl`` None: no
    baseline), and its :class:`LossStats` with ``return_stats``; shared by every vOPD loss."""
    coef = _advantage_coef(scale, valid, teacher_logprob, student_logprob,
                           0.0 if baseline_kl is None else baseline_kl)
    loss = _PolicyGradientSurrogate.apply(student_logits, tokens, student_logprob, student_lse, coef, temperature,
                                          reduction == "none")
    if not return_stats:
        return loss
    return loss, _loss_stats(valid, weights, student_logprob=student_logprob, teacher_logprob=teacher_logprob,
                             reverse_kl=reverse_kl, baseline_kl=baseline_kl, policy_gradient=True)


# ---- public losses --------------------------------------------------------------------------------


def vopd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tokens: torch.Tensor, *,
              mask=None, weights=None, temperature: float = 1.0, baseline: str = "full",
              topk: int = DEFAULT_TOPK, kl: str = "reverse", num_items=None, reduction: str = "mean",
              return_stats: bool = False):
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
        mask, weights, num_items, temperature: see the module docstring.
        baseline: ``"full"`` | ``"topk"`` | ``"none"``.
        topk: k of the top-k baseline, ``1 <= topk <= V`` (only read with ``baseline="topk"``).
        kl: ``"reverse"`` | ``"forward"`` direction of the full baseline.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` (module docstring); ``"none"`` gives the float32
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
        return _vocab_parallel("vocab_parallel_vopd_loss", student_logits, teacher_logits, tokens, mask=mask,
                               weights=weights, temperature=temperature, baseline=baseline, topk=topk, kl=kl,
                               num_items=num_items, reduction=reduction, return_stats=return_stats)
    check_logit_pair(student_logits, teacher_logits)
    _check_vopd_options(baseline, kl)
    temperature = check_temperature(temperature)
    topk = check_k(topk, student_logits.shape[-1], "topk", DEFAULT_TOPK) if baseline == "topk" else 0
    scale, valid, w = _scale_and_weights(student_logits, mask, weights, num_items, reduction)
    tokens = _sampled_tokens(tokens, student_logits, valid)

    logp_s, logp_t, reverse, forward, topk_kl, lse_s, _ = token_stats_op(
        student_logits.detach(), teacher_logits.detach(), tokens, temperature, topk)
    value = {"full": forward if kl == "forward" else reverse, "topk": topk_kl}.get(baseline)
    return _policy_gradient_loss(student_logits, tokens, logp_s, lse_s, logp_t, value, reverse, scale, valid, w,
                                 temperature, reduction, return_stats)


def reverse_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, mask=None, weights=None,
                    temperature: float = 1.0, num_items=None, reduction: str = "mean", return_stats: bool = False):
    """Dense (GKD-style) objective ``L = Σ_t w_t · KL(p_t‖q_t) / norm`` with a fused backward.

    ``∂KL/∂s_j = p_j (log p_j - log q_j - KL) / τ``. float32 scalar, differentiable w.r.t.
    ``student_logits`` only; the gradient has the student's dtype. A teacher ``-inf`` under student
    mass at a valid position makes the loss ``inf`` (its true value) and that row's gradient NaN.

    Args:
        student_logits, teacher_logits: ``[..., V]`` as in :func:`token_stats`.
        mask, weights, num_items, temperature: see the module docstring.
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
        return _vocab_parallel("vocab_parallel_reverse_kl_loss", student_logits, teacher_logits, mask=mask,
                               weights=weights, temperature=temperature, num_items=num_items, reduction=reduction,
                               return_stats=return_stats)
    check_logit_pair(student_logits, teacher_logits)
    temperature = check_temperature(temperature)
    scale, valid, w = _scale_and_weights(student_logits, mask, weights, num_items, reduction)
    any_token = torch.zeros(student_logits.shape[:-1], dtype=torch.int64, device=student_logits.device)
    _, _, reverse, _, _, lse_s, lse_t = ops.token_stats(
        student_logits.detach(), teacher_logits.detach(), any_token, temperature, 0)
    loss = _ReverseKLObjective.apply(student_logits, teacher_logits.detach(), reverse, lse_s, lse_t, scale,
                                     temperature, reduction == "none")
    return (loss, _loss_stats(valid, w, reverse_kl=reverse)) if return_stats else loss


# ---- served teachers: top-k ids + log-probs instead of full logits ----------------------------------


def teacher_support(teacher_topk_ids: torch.Tensor, teacher_topk_logprobs: torch.Tensor,
                    teacher_topk_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Which slots of a served teacher's top-k form its support: bool ``[..., k]``.

    A slot counts when ``teacher_topk_mask`` (if given) marks it valid, its log-prob is not
    ``-inf`` (servers pad ragged top-k lists with ``-inf``) and its id did not already appear in an
    earlier slot of the row: lists that append the sampled token to the top-k can name an id twice
    (with the same log-prob); the support is a set and the first slot stands for the id. A sampled
    token appended from *outside* the top-k (vLLM's (k+1)-th entry) should be masked out
    (``opd_ext.served`` does): a support that contains the sampled action makes the top-k baseline
    depend on the action, which biases the policy gradient.
    NaN log-probs stay in the support, so they surface as NaN instead of vanishing. O(k log k) per
    position; the ids of slots outside the support are never read.
    """
    keep = teacher_topk_logprobs != float("-inf")
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


def _support_reverse_kl(student_logits, teacher_topk_ids, teacher_topk_logprobs, support, temperature):
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


def _sparse_teacher_support(student_logits, teacher_topk_ids, teacher_topk_logprobs, teacher_topk_mask, valid):
    check_teacher_topk(teacher_topk_ids, teacher_topk_logprobs, student_logits, teacher_topk_mask, valid)
    return teacher_support(teacher_topk_ids, teacher_topk_logprobs.detach(), teacher_topk_mask) & valid.unsqueeze(-1)


def vopd_loss_sparse_teacher(student_logits: torch.Tensor, tokens: torch.Tensor, teacher_topk_ids: torch.Tensor,
                             teacher_topk_logprobs: torch.Tensor, teacher_token_logprob: torch.Tensor, *,
                             teacher_topk_mask=None, mask=None, weights=None, temperature: float = 1.0,
                             baseline: str = "topk", num_items=None, reduction: str = "mean",
                             return_stats: bool = False):
    """:func:`vopd_loss` for a teacher served as top-k log-probs (vLLM / SGLang prompt logprobs).

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
            :func:`vopd_loss`).
        mask, weights, num_items, temperature: see the module docstring.
        reduction, return_stats: as in :func:`vopd_loss`; the stats' ``reverse_kl`` is the KL over the
            teacher's support (None with ``baseline="none"``, which does not compute it) and
            ``teacher_logprob`` is ``teacher_token_logprob`` as given.

    Raises:
        ValueError / TypeError naming the argument: shapes, dtypes, devices, ids outside ``[0, V)``
        in a slot of the support at a valid position; a bad ``reduction`` as in :func:`vopd_loss`.
    """
    temperature = check_temperature(temperature)
    check_logits("student_logits", student_logits)
    check_choice("baseline", baseline, SPARSE_TEACHER_BASELINES)
    check_teacher_token_logprob(teacher_token_logprob, student_logits)
    scale, valid, w = _scale_and_weights(student_logits, mask, weights, num_items, reduction)
    support = _sparse_teacher_support(student_logits, teacher_topk_ids, teacher_topk_logprobs, teacher_topk_mask,
                                      valid)
    tokens = _sampled_tokens(tokens, student_logits, valid)

    logp_s, lse_s = ops.student_stats(student_logits.detach(), tokens, temperature)
    value = None
    if baseline == "topk":
        with torch.no_grad():
            value = _support_reverse_kl(student_logits, teacher_topk_ids, teacher_topk_logprobs, support, temperature)
    return _policy_gradient_loss(student_logits, tokens, logp_s, lse_s, teacher_token_logprob.detach().float(),
                                 value, value, scale, valid, w, temperature, reduction, return_stats)


def reverse_kl_loss_sparse_teacher(student_logits: torch.Tensor, teacher_topk_ids: torch.Tensor,
                                   teacher_topk_logprobs: torch.Tensor, *, teacher_topk_mask=None, mask=None,
                                   weights=None, temperature: float = 1.0, num_items=None, reduction: str = "mean",
                                   return_stats: bool = False):
    """:func:`reverse_kl_loss` for a served teacher: ``Σ_t w_t KL(p̄_t‖q̄_t) / norm`` over the teacher's
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
    scale, valid, w = _scale_and_weights(student_logits, mask, weights, num_items, reduction)
    support = _sparse_teacher_support(student_logits, teacher_topk_ids, teacher_topk_logprobs, teacher_topk_mask,
                                      valid)
    kl = _support_reverse_kl(student_logits, teacher_topk_ids, teacher_topk_logprobs.detach(), support, temperature)
    terms = torch.where(valid, scale * kl, 0.0)
    loss = terms if reduction == "none" else terms.sum()
    return (loss, _loss_stats(valid, w, reverse_kl=kl)) if return_stats else loss
