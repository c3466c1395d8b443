"""The test oracle: plain PyTorch definitions of every op (docs/spec.md §1), the ground truth the
kernels, the torch backend and the losses are tested against.

Readable and memory-hungry by design: these materialise full ``[N, V]`` intermediates, and nothing
in the library calls them (the production fallback is :mod:`opd_ext.torch_backend`). The losses'
math is computed in float64; the Prune-OPD drift state machine is defined by its float32
arithmetic (csrc/include/opd/drift.h), so :func:`drift_update` mirrors it operation by operation
and the kernels must match it bit for bit.
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


# ---- token statistics and the vOPD / reverse-KL losses (docs/spec.md §1) ---------------------------------
# Computed in float64 (inputs are widened), differentiable w.r.t. the student logits through plain
# autograd: the tests take the gradient of these losses as the ground truth for the fused backward.


def _scaled_log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.log_softmax(logits.double() / temperature, dim=-1)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Σ a (log a - log b) over the last dim, with terms where a = 0 contributing 0 (not 0·inf)."""
    a = log_a.exp()
    return (a * torch.where(a > 0, log_a - log_b, 0.0)).sum(-1)


def token_stats(student_logits, teacher_logits, tokens, temperature: float = 1.0, topk: int = 0) -> dict:
    """student/teacher log-prob of ``tokens``, KL(p‖q), KL(q‖p), and with ``topk > 0`` the top-k
    baseline KL over the student's top-k ids (both distributions renormalised there)."""
    log_p = _scaled_log_softmax(student_logits, temperature)
    log_q = _scaled_log_softmax(teacher_logits, temperature)
    index = tokens.unsqueeze(-1)
    stats = {
        "student_logprob": log_p.gather(-1, index).squeeze(-1),
        "teacher_logprob": log_q.gather(-1, index).squeeze(-1),
        "reverse_kl": _kl(log_p, log_q),
        "forward_kl": _kl(log_q, log_p),
        "student_lse": torch.logsumexp(student_logits.double() / temperature, -1),
        "teacher_lse": torch.logsumexp(teacher_logits.double() / temperature, -1),
    }
    if topk > 0:
        stats["topk_reverse_kl"] = topk_reverse_kl(student_logits, teacher_logits, topk, temperature)
    return stats


def topk_reverse_kl(student_logits, teacher_logits, k: int, temperature: float = 1.0) -> torch.Tensor:
    """vOPD top-k baseline KL: KL(p̄‖q̄) over the student's top-k ids, both renormalised there."""
    ids = topk_ids(student_logits, k)
    s = student_logits.double().gather(-1, ids) / temperature
    t = teacher_logits.double().gather(-1, ids) / temperature
    kl = _kl(torch.log_softmax(s, -1), torch.log_softmax(t, -1))
    has_nan = student_logits.isnan().any(-1) | teacher_logits.isnan().any(-1)
    return kl.masked_fill(has_nan, float("nan"))


def support_reverse_kl(
    student_logits, teacher_topk_ids, teacher_topk_logprobs, temperature: float = 1.0, teacher_topk_mask=None
):
    """KL(p̄‖q̄) over the teacher's support, both renormalised there (served teachers); 0 where the
    support is empty. The support is the set of listed ids: slots with a -inf log-prob or a False
    ``teacher_topk_mask`` leave it, and an id listed twice takes its first slot's log-prob.

    Built over the whole vocabulary (a dense [..., V] teacher, -inf outside the support), not from
    the slots as the library does, so the two share no code."""
    slot_ok = teacher_topk_logprobs != float("-inf")
    if teacher_topk_mask is not None:
        slot_ok = slot_ok & teacher_topk_mask.bool()
    ids = torch.where(slot_ok, teacher_topk_ids, 0)
    lead = student_logits.shape[:-1]
    dense = torch.full(
        lead + student_logits.shape[-1:], float("-inf"), dtype=torch.float64, device=student_logits.device
    )
    for slot in reversed(range(ids.shape[-1])):  # earlier slots overwrite later ones: the first wins
        current = dense.gather(-1, ids[..., slot : slot + 1])
        value = torch.where(
            slot_ok[..., slot : slot + 1], teacher_topk_logprobs[..., slot : slot + 1].double(), current
        )
        dense = dense.scatter(-1, ids[..., slot : slot + 1], value)
    in_support = dense != float("-inf")
    has_support = in_support.any(-1, keepdim=True)
    s = torch.where(in_support, student_logits.double() / temperature, float("-inf"))
    log_p = torch.log_softmax(torch.where(has_support, s, 0.0), -1)
    log_q = torch.log_softmax(torch.where(has_support, dense, 0.0), -1)
    p = log_p.exp()
    kl = (p * torch.where(p > 0, log_p - log_q, 0.0)).sum(-1)
    return torch.where(has_support.squeeze(-1), kl, 0.0)


def _drop_masked(logits, mask):
    """Zero the logits of masked positions, which may hold anything (NaN, -inf rows) and must not
    reach the loss or its gradient through a 0·inf product."""
    return logits if mask is None else torch.where(mask.bool().unsqueeze(-1), logits, 0.0)


def _loss_scale(leading_shape, mask, weights, num_items, device) -> torch.Tensor:
    """w_t / norm per position (0 where masked); norm = valid-token count, or num_items; a zero
    num_items scales every term to 0."""
    valid = torch.ones(leading_shape, dtype=torch.bool, device=device) if mask is None else mask.bool()
    w = torch.ones(leading_shape, dtype=torch.float64, device=device) if weights is None else weights.double()
    norm = valid.sum().clamp(min=1).double() if num_items is None else float(num_items)
    return (torch.where(valid, w, 0.0) / norm if norm else torch.zeros_like(w)), valid


def _policy_gradient_surrogate(log_p_y, reward, baseline, scale, valid):
    """-Σ w sg(A) log p(y) / norm with A = r - b; masked positions contribute exactly 0."""
    advantage = (reward - baseline).detach()
    return torch.where(valid, -scale * advantage * log_p_y, 0.0).sum()


def vopd_loss(
    student_logits,
    teacher_logits,
    tokens,
    *,
    mask=None,
    weights=None,
    temperature=1.0,
    baseline="full",
    topk=100,
    kl="reverse",
    num_items=None,
) -> torch.Tensor:
    """vOPD surrogate (float64), differentiable w.r.t. student_logits."""
    tokens = tokens if mask is None else torch.where(mask.bool(), tokens, 0)
    student_logits, teacher_logits = _drop_masked(student_logits, mask), _drop_masked(teacher_logits, mask)
    log_p = _scaled_log_softmax(student_logits, temperature)
    log_q = _scaled_log_softmax(teacher_logits.detach(), temperature)
    index = tokens.unsqueeze(-1)
    log_p_y = log_p.gather(-1, index).squeeze(-1)
    reward = log_q.gather(-1, index).squeeze(-1) - log_p_y
    if baseline == "full":
        value = _kl(log_p, log_q) if kl == "reverse" else _kl(log_q, log_p)
        b = -value
    elif baseline == "topk":
        b = -topk_reverse_kl(student_logits.detach(), teacher_logits, topk, temperature)
    else:
        b = torch.zeros_like(reward)
    scale, valid = _loss_scale(tokens.shape, mask, weights, num_items, tokens.device)
    return _policy_gradient_surrogate(log_p_y, reward, b, scale, valid)


def reverse_kl_loss(
    student_logits, teacher_logits, *, mask=None, weights=None, temperature=1.0, num_items=None
) -> torch.Tensor:
    """Σ w KL(p‖q) / norm (float64), differentiable w.r.t. student_logits."""
    kl = _kl(
        _scaled_log_softmax(_drop_masked(student_logits, mask), temperature),
        _scaled_log_softmax(_drop_masked(teacher_logits.detach(), mask), temperature),
    )
    scale, valid = _loss_scale(kl.shape, mask, weights, num_items, kl.device)
    return torch.where(valid, scale * kl, 0.0).sum()


def vopd_loss_sparse_teacher(
    student_logits,
    tokens,
    teacher_topk_ids,
    teacher_topk_logprobs,
    teacher_token_logprob,
    *,
    teacher_topk_mask=None,
    mask=None,
    weights=None,
    temperature=1.0,
    baseline="topk",
    num_items=None,
) -> torch.Tensor:
    """vOPD surrogate with a served teacher (top-k ids + log-probs + log-prob of the sampled token);
    the top-k baseline runs over the teacher's support."""
    tokens = tokens if mask is None else torch.where(mask.bool(), tokens, 0)
    student_logits = _drop_masked(student_logits, mask)
    teacher_topk_logprobs = _drop_masked(teacher_topk_logprobs, mask)
    if mask is not None:  # masked positions may list any id
        teacher_topk_ids = torch.where(mask.bool().unsqueeze(-1), teacher_topk_ids, 0)
    if mask is not None:
        teacher_token_logprob = torch.where(mask.bool(), teacher_token_logprob, 0.0)
    log_p_y = _scaled_log_softmax(student_logits, temperature).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    reward = teacher_token_logprob.double() - log_p_y
    if baseline == "topk":
        b = -support_reverse_kl(
            student_logits.detach(), teacher_topk_ids, teacher_topk_logprobs, temperature, teacher_topk_mask
        )
    else:
        b = torch.zeros_like(reward)
    scale, valid = _loss_scale(tokens.shape, mask, weights, num_items, tokens.device)
    return _policy_gradient_surrogate(log_p_y, reward, b, scale, valid)


def reverse_kl_loss_sparse_teacher(
    student_logits,
    teacher_topk_ids,
    teacher_topk_logprobs,
    *,
    teacher_topk_mask=None,
    mask=None,
    weights=None,
    temperature=1.0,
    num_items=None,
) -> torch.Tensor:
    """Σ w KL(p̄‖q̄) / norm over the teacher's top-k support, differentiable w.r.t. student_logits."""
    student_logits = _drop_masked(student_logits, mask)
    teacher_topk_logprobs = _drop_masked(teacher_topk_logprobs, mask)
    if mask is not None:  # masked positions may list any id
        teacher_topk_ids = torch.where(mask.bool().unsqueeze(-1), teacher_topk_ids, 0)
    kl = support_reverse_kl(
        student_logits, teacher_topk_ids, teacher_topk_logprobs.detach(), temperature, teacher_topk_mask
    )
    scale, valid = _loss_scale(kl.shape, mask, weights, num_items, kl.device)
    return torch.where(valid, scale * kl, 0.0).sum()


# ---- Prune-OPD drift tracking (docs/spec.md §1) -----------------------------------------------------------
# Mirrors csrc/include/opd/drift.h operation by operation in float32 (every product and sum a
# separately rounded tensor op, constants as float32 tensors), so the kernels must match it exactly.

DRIFT_RUNNING, DRIFT_WEIGHT_EXHAUSTED, DRIFT_PATIENCE, DRIFT_BUDGET, DRIFT_FINISHED = range(5)


def drift_update(
    overlap,
    ema,
    weight,
    drift_run,
    drift_events,
    length,
    stop_reason,
    budget,
    rows=None,
    *,
    ema_beta,
    threshold,
    warmup,
    w_drop,
    decay,
    w_base,
    patience,
    min_weight,
):
    """One token per selected sequence. Updates the state tensors in place (already-stopped rows
    are left untouched) and returns ``(multiplier, stopped)`` for the selected rows.

    ``rows`` (int64 [A], distinct) maps ``overlap[i]`` to state row ``rows[i]``; None means all rows.
    ``decay > 0`` selects the exponential schedule; ``patience == 0`` disables it; the state stops
    once ``weight <= min_weight``.
    """
    device = ema.device
    idx = torch.arange(ema.shape[0], device=device) if rows is None else rows

    def f32(x):  # constants as float32 tensors: products and sums then round like the kernels' float math
        return torch.tensor(x, dtype=torch.float32, device=device)

    o = overlap.float()
    running = stop_reason[idx] == DRIFT_RUNNING
    old_ema, old_weight = ema[idx], weight[idx]
    old_run, old_events, old_length = drift_run[idx], drift_events[idx], length[idx]

    if ema_beta == 0.0:
        new_ema = o
    else:
        beta = f32(ema_beta)
        smoothed = beta * old_ema + (f32(1.0) - beta) * o
        new_ema = torch.where(old_length == 0, o, smoothed)
    drift = (old_length >= warmup) & ~(new_ema >= f32(threshold))
    events = old_events + drift.to(old_events.dtype)
    run = torch.where(drift, old_run + 1, torch.zeros_like(old_run))
    if decay > 0.0:
        decayed = old_weight * f32(decay)
    else:
        decayed = (f32(1.0) - f32(w_drop) * events.float()).clamp(0.0, 1.0)
    new_weight = torch.where(drift, decayed, old_weight)
    new_length = old_length + 1

    reason = torch.full_like(stop_reason[idx], DRIFT_RUNNING)
    reason = torch.where(new_length >= budget[idx], DRIFT_BUDGET, reason).to(reason.dtype)
    if patience > 0:
        reason = torch.where(run >= patience, DRIFT_PATIENCE, reason).to(reason.dtype)
    reason = torch.where(new_weight <= f32(min_weight), DRIFT_WEIGHT_EXHAUSTED, reason).to(reason.dtype)

    for state, new in (
        (ema, new_ema),
        (weight, new_weight),
        (drift_run, run),
        (drift_events, events),
        (length, new_length),
        (stop_reason, reason),
    ):
        state[idx] = torch.where(running, new.to(state.dtype), state[idx])
    multiplier = torch.where(running, f32(w_base) + new_weight, f32(0.0))
    return multiplier, stop_reason[idx] != DRIFT_RUNNING


def drift_scan(overlaps, mask, ema, weight, drift_run, drift_events, length, stop_reason, budget, **config):
    """``overlaps`` [B, T] token by token through :func:`drift_update` (positions where ``mask`` is
    False are skipped). Returns per-token ``(multipliers, weights)`` [B, T] float32 (0 where masked or
    after the stop) and ``stop_position`` [B] int64: the token at which the row stopped, else -1."""
    batch, steps = overlaps.shape
    multipliers = torch.zeros(batch, steps, dtype=torch.float32, device=overlaps.device)
    weights = torch.zeros_like(multipliers)
    stop_position = torch.full((batch,), -1, dtype=torch.int64, device=overlaps.device)
    valid = torch.ones_like(overlaps, dtype=torch.bool) if mask is None else mask
    for t in range(steps):
        rows = valid[:, t].nonzero().squeeze(-1)
        was_running = stop_reason[rows] == DRIFT_RUNNING
        multiplier, stopped = drift_update(
            overlaps[rows, t], ema, weight, drift_run, drift_events, length, stop_reason, budget, rows, **config
        )
        multipliers[rows, t] = multiplier
        weights[rows, t] = torch.where(was_running, weight[rows], 0.0)
        stop_position[rows] = torch.where(was_running & stopped, t, stop_position[rows])
    return multipliers, weights, stop_position
