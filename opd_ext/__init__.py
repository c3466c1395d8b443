"""opd_ext: fused kernels for on-policy distillation (vOPD losses, top-k overlap, Prune-OPD)."""
from __future__ import annotations

__version__ = "0.1.0"

from opd_ext._extension import build_info, cuda_kernels_available
from opd_ext._validation import align_vocab
from opd_ext.ops import topk_overlap
from opd_ext.losses import (
    TokenStats,
    TokenStatsWithForwardKL,
    reverse_kl_loss,
    reverse_kl_loss_sparse_teacher,
    token_stats,
    vopd_loss,
    vopd_loss_sparse_teacher,
)
from opd_ext import reference
from opd_ext.prune import DriftMonitor, DynamicWindow, PruneConfig, StopReason, drift_scan  # Prune-OPD

__all__ = [
    "__version__",
    "align_vocab",
    "build_info",
    "DriftMonitor",
    "DynamicWindow",
    "PruneConfig",
    "StopReason",
    "cuda_kernels_available",
    "drift_scan",
    "reference",
    "topk_overlap",
    # token statistics and losses (opd_ext/losses.py)
    "TokenStats",
    "TokenStatsWithForwardKL",
    "reverse_kl_loss",
    "reverse_kl_loss_sparse_teacher",
    "token_stats",
    "vopd_loss",
    "vopd_loss_sparse_teacher",
]
