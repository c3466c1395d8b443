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


# ---- Prune-OPD drift tracking (SPEC §1) -----------------------------------------------------------
# Mirrors csrc/include/opd/drift.h operation by operation in float32 (every product and sum a
# separately rounded tensor op, constants as float32 tensors), so the kernels must match it exactly.

DRIFT_RUNNING, DRIFT_WEIGHT_EXHAUSTED, DRIFT_PATIENCE, DRIFT_BUDGET, DRIFT_FINISHED = range(5)


def drift_update(overlap, ema, weight, drift_run, drift_events, length, stop_reason, budget, rows=None,
                 *, ema_beta, threshold, warmup, w_drop, decay, w_base, patience, min_weight):
    """One token per selected sequence. Updates the state tensors in place (already-stopped rows
    are left untouched) and returns ``(multiplier, stopped)`` for the selected rows.

    ``rows`` (int64 [A], distinct) maps ``overlap[i]`` to state row ``rows[i]``; None means all rows.
    ``decay > 0`` selects the exponential schedule; ``patience == 0`` disables it; the state stops
    once ``weight <= min_weight``.
    """
    device = ema.device
    idx = torch.arange(ema.shape[0], device=device) if rows is None else rows
    f32 = lambda x: torch.tensor(x, dtype=torch.float32, device=device)  # noqa: E731
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

    for state, new in ((ema, new_ema), (weight, new_weight), (drift_run, run), (drift_events, events),
                       (length, new_length), (stop_reason, reason)):
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
        multiplier, stopped = drift_update(overlaps[rows, t], ema, weight, drift_run, drift_events, length,
                                           stop_reason, budget, rows, **config)
        multipliers[rows, t] = multiplier
        weights[rows, t] = torch.where(was_running, weight[rows], 0.0)
        stop_position[rows] = torch.where(was_running & stopped, t, stop_position[rows])
    return multipliers, weights, stop_position
