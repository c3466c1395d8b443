"""Data parallelism: the loss normaliser under which gradients averaged over ranks equal the
gradient of one process on the whole batch (docs/spec.md §2)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.distributed as dist

from opd_ext._validation import check_mask

Masks = Union[torch.Tensor, Sequence[torch.Tensor]]


def global_num_items(mask: Masks, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """``num_items`` for the opd_ext losses under data parallelism: ``global valid tokens / W``.

    Every rank of ``group`` must call it (it runs one ``all_reduce`` of a single float). With
    gradients averaged over the W ranks (the default of DDP, FSDP and ZeRO), passing the result as
    ``num_items`` on every rank makes the averaged gradient exactly the gradient of one process
    that sees all ranks' tokens: ``(1/W) Σ_r ∇ Σ_{t∈r} ℓ_t / (N/W) = ∇ Σ_t ℓ_t / N``.

    Args:
        mask: the loss mask ``[...]`` (bool or 0/1 integers, True where a token counts), or a
            sequence of them: the micro-batches of one optimiser step when gradients accumulate
            (every micro-batch's loss then takes the same ``num_items``).
        group: the data-parallel process group (default: the world). Without an initialised
            process group the count is local (W = 1).

    Returns:
        A float32 0-d tensor on the masks' device; not read on the host, so no device sync. Zero
        when no rank has a valid token, which the losses turn into a loss of exactly 0.

    If your framework *sums* gradients over ranks instead of averaging them, pass the global count
    itself, ``global_num_items(mask) * W``.
    """
    if not isinstance(mask, (torch.Tensor, list, tuple)):
        raise TypeError(
            f"mask must be a bool tensor [...] or a list of them (the micro-batches of one "
            f"step), got {type(mask).__name__}"
        )
    masks = [mask] if isinstance(mask, torch.Tensor) else list(mask)
    if not masks:
        raise ValueError("global_num_items needs at least one mask")
    for m in masks:
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"mask must be a tensor or a sequence of tensors, got {type(m).__name__}")
        check_mask(m, m.unsqueeze(-1), "the mask itself")
    device = masks[0].device
    if any(m.device != device for m in masks):
        raise ValueError(f"the masks are on different devices: {sorted({str(m.device) for m in masks})}")
    count = torch.stack([m.bool().sum() for m in masks]).sum().to(torch.float32)
    if not (dist.is_available() and dist.is_initialized()):
        return count
    dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    return count / dist.get_world_size(group)
