"""opd_ext: fused kernels for on-policy distillation (vOPD losses, top-k overlap, Prune-OPD)."""

from __future__ import annotations

from opd_ext import reference
from opd_ext._extension import build_info
from opd_ext._version import __version__
from opd_ext.fused_linear import fused_linear_reverse_kl_loss, fused_linear_vopd_loss
from opd_ext.losses import align_vocab, reverse_kl_loss, token_stats, topk_overlap, vopd_loss
from opd_ext.modules import (
    FusedLinearReverseKLLoss,
    FusedLinearVOPDLoss,
    ReverseKLLoss,
    ReverseKLLossSparseTeacher,
    TopkKLLoss,
    VOPDLoss,
    VOPDLossSparseTeacher,
)
from opd_ext.objective import LossStats, TokenStats, TokenStatsWithForwardKL, TopkKLStats, teacher_support

# opd_ext.ops, which every module above imports, registers each op's fake kernel once, at import.
from opd_ext.ops import cuda_kernels_available
from opd_ext.prune import DriftMonitor, DynamicWindow, PruneConfig, StopReason, drift_scan
from opd_ext.sparse_teacher import reverse_kl_loss_sparse_teacher, vopd_loss_sparse_teacher
from opd_ext.topk_kl import student_topk_kl_loss, topk_kl_loss

__all__ = [
    "__version__",
    "build_info",
    "cuda_kernels_available",
    "reference",
    # kernels
    "align_vocab",
    "topk_overlap",
    # token statistics and losses (opd_ext/losses.py, sparse_teacher.py, fused_linear.py; shared core
    # in opd_ext/objective.py)
    "LossStats",
    "TokenStats",
    "TokenStatsWithForwardKL",
    "fused_linear_reverse_kl_loss",
    "fused_linear_vopd_loss",
    "reverse_kl_loss",
    "reverse_kl_loss_sparse_teacher",
    "teacher_support",
    "token_stats",
    "vopd_loss",
    "vopd_loss_sparse_teacher",
    # the top-k KL family on a served teacher's top-k (opd_ext/topk_kl.py)
    "TopkKLStats",
    "student_topk_kl_loss",
    "topk_kl_loss",
    # nn.Module forms of the losses (opd_ext/modules.py)
    "FusedLinearReverseKLLoss",
    "FusedLinearVOPDLoss",
    "ReverseKLLoss",
    "ReverseKLLossSparseTeacher",
    "TopkKLLoss",
    "VOPDLoss",
    "VOPDLossSparseTeacher",
    # Prune-OPD (opd_ext/prune.py; generation hooks in opd_ext.generation)
    "DriftMonitor",
    "DynamicWindow",
    "PruneConfig",
    "StopReason",
    "drift_scan",
]


# Imported on first use: opd_ext.generation pulls in transformers, which the kernels and losses do
# not need; opd_ext.served is only for teachers behind vLLM / SGLang. (opd_ext.distributed is
# imported with the losses: DTensor logits take its path.)
_LAZY_SUBMODULES = ("generation", "served")


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"opd_ext.{name}")
    raise AttributeError(f"module 'opd_ext' has no attribute {name!r}")
