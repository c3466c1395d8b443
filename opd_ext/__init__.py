"""opd_ext: fused kernels for on-policy distillation (vOPD losses, top-k overlap, Prune-OPD)."""
from __future__ import annotations

__version__ = "0.1.0"

from opd_ext._extension import build_info, cuda_kernels_available
from opd_ext._validation import align_vocab
from opd_ext.ops import topk_overlap
from opd_ext.losses import (
    LossStats,
    TokenStats,
    TokenStatsWithForwardKL,
    reverse_kl_loss,
    reverse_kl_loss_sparse_teacher,
    teacher_support,
    token_stats,
    vopd_loss,
    vopd_loss_sparse_teacher,
)
from opd_ext.fused_linear import fused_linear_reverse_kl_loss, fused_linear_vopd_loss
from opd_ext.modules import (
    FusedLinearReverseKLLoss,
    FusedLinearVOPDLoss,
    ReverseKLLoss,
    ReverseKLLossSparseTeacher,
    VOPDLoss,
    VOPDLossSparseTeacher,
)
from opd_ext.prune import DriftMonitor, DynamicWindow, PruneConfig, StopReason, drift_scan
from opd_ext import reference

__all__ = [
    "__version__",
    "build_info",
    "cuda_kernels_available",
    "reference",
    # kernels
    "align_vocab",
    "topk_overlap",
    # token statistics and losses (opd_ext/losses.py, opd_ext/fused_linear.py)
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
    # nn.Module forms of the losses (opd_ext/modules.py)
    "FusedLinearReverseKLLoss",
    "FusedLinearVOPDLoss",
    "ReverseKLLoss",
    "ReverseKLLossSparseTeacher",
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
# not need; opd_ext.distributed is for multi-process runs only; opd_ext.served only for teachers
# behind vLLM / SGLang.
_LAZY_SUBMODULES = ("distributed", "generation", "served")


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"opd_ext.{name}")
    raise AttributeError(f"module 'opd_ext' has no attribute {name!r}")
