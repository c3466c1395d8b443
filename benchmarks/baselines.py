"""The PyTorch yardsticks the kernels are timed against: the same math in float32 tensor ops.

``opd_ext.reference`` is the tests' ground truth and widens everything to float64; timing it would
flatter the kernels by the float64 penalty (half the SIMD width, twice the bytes, and on a GPU a
fraction of the float32 throughput). These functions are what a TRL / verl user writes instead:
``log_softmax`` of the float32 logits, then gathers and sums; ``torch.compile`` of them is the
"compile" baseline. They skip the reference's ``-inf``/mask care, which costs little and does not
apply to the finite random logits of the benchmarks. ``--baselines reference`` (where a script
supports it) times the float64 reference as well.
"""

from __future__ import annotations

import torch

from opd_ext import reference

import harness  # noqa: F401  (puts the repository on the path for in-place builds)


def _log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def _reverse_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def token_stats(student_logits, teacher_logits, tokens, temperature: float = 1.0):
    log_p = _log_softmax(student_logits, temperature)
    log_q = _log_softmax(teacher_logits, temperature)
    index = tokens.unsqueeze(-1)
    return log_p.gather(-1, index).squeeze(-1), log_q.gather(-1, index).squeeze(-1), _reverse_kl(log_p, log_q)


def vopd_loss(
    student_logits, teacher_logits, tokens, *, baseline: str = "full", topk: int = 100, temperature: float = 1.0
):
    log_p = _log_softmax(student_logits, temperature)
    log_q = _log_softmax(teacher_logits.detach(), temperature)
    index = tokens.unsqueeze(-1)
    log_p_y = log_p.gather(-1, index).squeeze(-1)
    reward = log_q.gather(-1, index).squeeze(-1) - log_p_y
    if baseline == "full":
        value = -_reverse_kl(log_p, log_q)
    elif baseline == "topk":
        ids = student_logits.detach().topk(topk, dim=-1).indices
        value = -_reverse_kl(
            _log_softmax(student_logits.detach().gather(-1, ids), temperature),
            _log_softmax(teacher_logits.gather(-1, ids), temperature),
        )
    else:
        value = torch.zeros_like(reward)
    advantage = (reward - value).detach()
    return -(advantage * log_p_y).sum() / tokens.numel()


def reverse_kl_loss(student_logits, teacher_logits, *, temperature: float = 1.0):
    kl = _reverse_kl(_log_softmax(student_logits, temperature), _log_softmax(teacher_logits.detach(), temperature))
    return kl.sum() / kl.numel()


def drift_step(state, student_logits, teacher_logits, k: int, config: dict):
    """One decode step without the fused op: the reference overlap (a float32 stable sort) and the
    reference state update (``opd_ext.reference.drift_update``, in place on ``state``)."""
    overlap = reference.topk_overlap(student_logits, teacher_logits, k)
    return reference.drift_update(overlap, *state, None, **config)
