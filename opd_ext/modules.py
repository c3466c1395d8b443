"""``torch.nn.Module`` forms of the losses, for trainers that hold a loss object (as Liger-Kernel's
``LigerFusedLinearJSD`` / TRL's trainers do).

Each module stores the loss options (baseline, temperature, reduction, ...) at construction and
calls the function of the same name in :mod:`opd_ext.losses`, :mod:`opd_ext.sparse_teacher` or
:mod:`opd_ext.fused_linear` (or :mod:`opd_ext.topk_kl`) with
the per-batch tensors; results, gradients and errors are exactly the function's. The modules hold
no parameters or buffers: the fused-linear ones take the lm_head (module or weight) per call, so a
loss object never registers, moves or saves the model's head.
"""

from __future__ import annotations

from typing import Optional

import torch

from opd_ext import fused_linear, losses, sparse_teacher, topk_kl
from opd_ext._validation import check_choice, check_temperature
from opd_ext.objective import (
    DEFAULT_TOPK,
    SPARSE_TEACHER_BASELINES,
    TOPK_DIVERGENCES,
    check_reduction,
    check_vopd_options,
)

__all__ = [
    "FusedLinearReverseKLLoss",
    "FusedLinearVOPDLoss",
    "ReverseKLLoss",
    "ReverseKLLossSparseTeacher",
    "TopkKLLoss",
    "VOPDLoss",
    "VOPDLossSparseTeacher",
]


class _Loss(torch.nn.Module):
    """Holds the options every loss takes (temperature, reduction, return_stats) and the loss's own
    (``options``), checked once here so a misconfigured loss fails when built, not at the first
    batch; :meth:`_options` gives them back as the function's keyword arguments."""

    def __init__(self, temperature: float, reduction: str, return_stats: bool, **options):
        super().__init__()
        check_reduction(reduction)
        self.temperature = check_temperature(temperature)
        self.reduction, self.return_stats = reduction, return_stats
        self._option_names = tuple(options)
        for name, value in options.items():
            setattr(self, name, value)

    def _options(self) -> dict:
        names = (*self._option_names, "temperature", "reduction", "return_stats")
        return {name: getattr(self, name) for name in names}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._options().items())


class VOPDLoss(_Loss):
    """:func:`opd_ext.vopd_loss` as a module.

    Args:
        baseline: ``"full"`` (default) | ``"topk"`` | ``"none"``.
        topk: k of the top-k baseline (``1 <= topk <= V``, checked per call, when V is known).
        temperature: τ > 0.
        kl: ``"reverse"`` | ``"forward"`` (the full baseline's direction).
        reduction: ``"mean"`` (default) | ``"sum"`` | ``"none"``.
        return_stats: forward returns ``(loss, LossStats)``.

    ``forward(student_logits [..., V], teacher_logits [..., V], tokens int64 [...], mask=None,
    weights=None, num_items=None)`` returns the float32 loss (scalar, or ``[...]`` with
    ``reduction="none"``).

    Raises:
        ValueError: a bad option at construction (the message lists the choices); per call, as
        :func:`opd_ext.vopd_loss`.
    """

    def __init__(
        self,
        baseline: str = "full",
        topk: int = DEFAULT_TOPK,
        temperature: float = 1.0,
        kl: str = "reverse",
        reduction: str = "mean",
        return_stats: bool = False,
    ):
        check_vopd_options(baseline, kl)
        super().__init__(temperature, reduction, return_stats, baseline=baseline, topk=topk, kl=kl)

    def forward(self, student_logits, teacher_logits, tokens, mask=None, weights=None, num_items=None):
        return losses.vopd_loss(
            student_logits, teacher_logits, tokens, mask=mask, weights=weights, num_items=num_items, **self._options()
        )


class ReverseKLLoss(_Loss):
    """:func:`opd_ext.reverse_kl_loss` as a module: ``ReverseKLLoss(temperature=1.0, reduction="mean",
    return_stats=False)``; ``forward(student_logits, teacher_logits, mask=None, weights=None,
    num_items=None)``. Shapes, results and errors as the function's."""

    def __init__(self, temperature: float = 1.0, reduction: str = "mean", return_stats: bool = False):
        super().__init__(temperature, reduction, return_stats)

    def forward(self, student_logits, teacher_logits, mask=None, weights=None, num_items=None):
        return losses.reverse_kl_loss(
            student_logits, teacher_logits, mask=mask, weights=weights, num_items=num_items, **self._options()
        )


class VOPDLossSparseTeacher(_Loss):
    """:func:`opd_ext.vopd_loss_sparse_teacher` as a module: ``VOPDLossSparseTeacher(baseline="topk",
    temperature=1.0, reduction="mean", return_stats=False)``; ``forward(student_logits, tokens,
    teacher_topk_ids, teacher_topk_logprobs, teacher_token_logprob, teacher_topk_mask=None, mask=None,
    weights=None, num_items=None)``. Shapes, results and errors as the function's."""

    def __init__(
        self, baseline: str = "topk", temperature: float = 1.0, reduction: str = "mean", return_stats: bool = False
    ):
        check_choice("baseline", baseline, SPARSE_TEACHER_BASELINES)
        super().__init__(temperature, reduction, return_stats, baseline=baseline)

    def forward(
        self,
        student_logits,
        tokens,
        teacher_topk_ids,
        teacher_topk_logprobs,
        teacher_token_logprob,
        teacher_topk_mask=None,
        mask=None,
        weights=None,
        num_items=None,
    ):
        return sparse_teacher.vopd_loss_sparse_teacher(
            student_logits,
            tokens,
            teacher_topk_ids,
            teacher_topk_logprobs,
            teacher_token_logprob,
            teacher_topk_mask=teacher_topk_mask,
            mask=mask,
            weights=weights,
            num_items=num_items,
            **self._options(),
        )


class ReverseKLLossSparseTeacher(_Loss):
    """:func:`opd_ext.reverse_kl_loss_sparse_teacher` as a module: ``ReverseKLLossSparseTeacher(
    temperature=1.0, reduction="mean", return_stats=False)``; ``forward(student_logits,
    teacher_topk_ids, teacher_topk_logprobs, teacher_topk_mask=None, mask=None, weights=None,
    num_items=None)``. Shapes, results and errors as the function's."""

    def __init__(self, temperature: float = 1.0, reduction: str = "mean", return_stats: bool = False):
        super().__init__(temperature, reduction, return_stats)

    def forward(
        self,
        student_logits,
        teacher_topk_ids,
        teacher_topk_logprobs,
        teacher_topk_mask=None,
        mask=None,
        weights=None,
        num_items=None,
    ):
        return sparse_teacher.reverse_kl_loss_sparse_teacher(
            student_logits,
            teacher_topk_ids,
            teacher_topk_logprobs,
            teacher_topk_mask=teacher_topk_mask,
            mask=mask,
            weights=weights,
            num_items=num_items,
            **self._options(),
        )


class TopkKLLoss(_Loss):
    """:func:`opd_ext.topk_kl_loss` as a module: ``TopkKLLoss(divergence="forward_tail",
    temperature=1.0, reduction="mean", return_stats=False)``; ``forward(student_logits,
    teacher_topk_ids, teacher_topk_logprobs, teacher_topk_mask=None, mask=None, weights=None,
    num_items=None)``. Shapes, results and errors as the function's."""

    def __init__(
        self,
        divergence: str = "forward_tail",
        temperature: float = 1.0,
        reduction: str = "mean",
        return_stats: bool = False,
    ):
        check_choice("divergence", divergence, TOPK_DIVERGENCES)
        super().__init__(temperature, reduction, return_stats, divergence=divergence)

    def forward(
        self,
        student_logits,
        teacher_topk_ids,
        teacher_topk_logprobs,
        teacher_topk_mask=None,
        mask=None,
        weights=None,
        num_items=None,
    ):
        return topk_kl.topk_kl_loss(
            student_logits,
            teacher_topk_ids,
            teacher_topk_logprobs,
            teacher_topk_mask=teacher_topk_mask,
            mask=mask,
            weights=weights,
            num_items=num_items,
            **self._options(),
        )


class FusedLinearVOPDLoss(_Loss):
    """:func:`opd_ext.fused_linear_vopd_loss` as a module.

    ``FusedLinearVOPDLoss(baseline="full", topk=100, temperature=1.0, kl="reverse", reduction="mean",
    return_stats=False, chunk_size=None)``; ``reduction="none"`` gives per-position values and
    computes the gradients in the backward (a second pass over the logits).

    ``forward(student_hidden [..., H], student_weight, tokens [...], teacher_logits=None,
    teacher_hidden=None, teacher_weight=None, teacher_bias=None, student_bias=None, mask=None,
    weights=None, num_items=None)``: ``student_weight`` / ``teacher_weight`` are ``[V, H]`` tensors or
    the lm_head modules (``nn.Linear``, PEFT LoRA layers), passed per call so the loss holds no
    parameters. Results and errors as the function's.
    """

    def __init__(
        self,
        baseline: str = "full",
        topk: int = DEFAULT_TOPK,
        temperature: float = 1.0,
        kl: str = "reverse",
        reduction: str = "mean",
        return_stats: bool = False,
        chunk_size: Optional[int] = None,
    ):
        check_vopd_options(baseline, kl)
        super().__init__(
            temperature, reduction, return_stats, baseline=baseline, topk=topk, kl=kl, chunk_size=chunk_size
        )

    def forward(
        self,
        student_hidden,
        student_weight,
        tokens,
        teacher_logits=None,
        teacher_hidden=None,
        teacher_weight=None,
        teacher_bias=None,
        student_bias=None,
        mask=None,
        weights=None,
        num_items=None,
    ):
        return fused_linear.fused_linear_vopd_loss(
            student_hidden,
            student_weight,
            tokens,
            teacher_logits=teacher_logits,
            teacher_hidden=teacher_hidden,
            teacher_weight=teacher_weight,
            teacher_bias=teacher_bias,
            student_bias=student_bias,
            mask=mask,
            weights=weights,
            num_items=num_items,
            **self._options(),
        )


class FusedLinearReverseKLLoss(_Loss):
    """:func:`opd_ext.fused_linear_reverse_kl_loss` as a module: ``FusedLinearReverseKLLoss(
    temperature=1.0, reduction="mean", return_stats=False, chunk_size=None)``; ``forward`` as
    :class:`FusedLinearVOPDLoss`'s without ``tokens``."""

    def __init__(
        self,
        temperature: float = 1.0,
        reduction: str = "mean",
        return_stats: bool = False,
        chunk_size: Optional[int] = None,
    ):
        super().__init__(temperature, reduction, return_stats, chunk_size=chunk_size)

    def forward(
        self,
        student_hidden,
        student_weight,
        teacher_logits=None,
        teacher_hidden=None,
        teacher_weight=None,
        teacher_bias=None,
        student_bias=None,
        mask=None,
        weights=None,
        num_items=None,
    ):
        return fused_linear.fused_linear_reverse_kl_loss(
            student_hidden,
            student_weight,
            teacher_logits=teacher_logits,
            teacher_hidden=teacher_hidden,
            teacher_weight=teacher_weight,
            teacher_bias=teacher_bias,
            student_bias=student_bias,
            mask=mask,
            weights=weights,
            num_items=num_items,
            **self._options(),
        )
