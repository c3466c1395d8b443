"""opd_ext's top-k KL family as verl distillation loss modes (docs/verl.md).

verl (0.9.x) loads this module through its ``verl.plugins`` entry point when ``import verl`` runs,
so after ``pip install opd_ext`` a verl user switches with one config value::

    distillation.distillation_loss.loss_mode=opd_ext_forward_kl_topk_tail

The modes (``LOSS_MODES``) are top-k modes (``use_topk=True``): the teacher is asked for
``prompt_logprobs=topk`` and the student's logits go through verl's logits processor, as for verl's
own ``forward_kl_topk``. There, for these modes, :func:`opd_ext.topk_kl_loss` computes the per-token
divergence on the packed ``[1, total_nnz, V]`` logits (one pass over the vocabulary, gradients to
every top-k entry and the full softmax, no clamp, no ``[N, V]`` float32 copy) and returns what verl's
top-k path expects: ``distillation_losses``, ``student_mass``, ``teacher_mass``, ``overlap_count``
and ``overlap_token_advantage``, plus ``teacher_entropy``. The loss then reports verl's metrics
(``distillation/student_mass``, ``distillation/overlap_ratio``, ...) and ``distillation/teacher_entropy``.

Supported: verl >= 0.9, < 0.10 (tested against 0.9.1); the FSDP / FSDP2 / VeOmni strategies (with
Ulysses sequence parallelism) and the Megatron strategy, whose logits processor gets vocabulary
shards: there :func:`opd_ext.distributed.vocab_parallel_topk_kl_loss` runs over Megatron's
tensor-parallel group, after verl's own context-parallel split of the teacher's top-k.

verl's ``compute_topk_loss`` picks its forward-KL function by strategy only, so registering a loss
mode alone would still compute forward KL in the logits processor. :func:`register` therefore wraps
``verl.trainer.distillation.losses.compute_topk_loss`` once: calls for these modes come here, every
other mode reaches verl's function unchanged.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch

from opd_ext.distributed import vocab_parallel_in_topk, vocab_parallel_topk_kl_loss
from opd_ext.objective import TOPK_DIVERGENCES
from opd_ext.topk_kl import topk_kl_loss

#: verl releases this plugin is written against (the distillation API it registers into).
SUPPORTED_VERL = (">=0.9", "<0.10")

#: verl ``loss_mode`` -> :func:`opd_ext.topk_kl_loss` ``divergence`` (docs/spec.md §1.11).
LOSS_MODES = {
    "opd_ext_forward_kl_topk": "forward",
    "opd_ext_forward_kl_topk_renorm": "forward_renormalized",
    "opd_ext_forward_kl_topk_tail": "forward_tail",
    "opd_ext_reverse_kl_topk_renorm": "reverse_renormalized",
    "opd_ext_reverse_kl_topk_tail": "reverse_tail",
    "opd_ext_generalized_kl_topk": "generalized",
}
assert set(LOSS_MODES.values()) == set(TOPK_DIVERGENCES)

_FSDP_STRATEGIES = ("fsdp", "fsdp2", "veomni")


def check_verl_version(version: str) -> None:
    """Raise ImportError naming the supported range when ``version`` (verl's ``__version__``) is outside it."""
    from packaging.version import Version

    v = Version(version)
    if not (Version("0.9") <= v < Version("0.10")):
        raise ImportError(
            f"opd_ext.integrations.verl supports verl {','.join(SUPPORTED_VERL)} (tested with 0.9.1); "
            f"found verl {version}. Install a supported release (pip install 'verl>=0.9,<0.10') or use "
            f"opd_ext.topk_kl_loss directly in your own loss."
        )


def topk_outputs(
    student_logits: torch.Tensor,
    teacher_topk_ids,
    teacher_topk_logprobs,
    divergence: str,
    *,
    tensor_parallel: Optional[tuple] = None,
) -> dict:
    """What verl's top-k logits processor returns, for one divergence: per-token ``[...]`` tensors
    ``distillation_losses`` (differentiable; float32), ``student_mass``, ``teacher_mass``,
    ``teacher_entropy``, ``overlap_count`` (int64: teacher slots whose id is among the student's top-k,
    k = the teacher's; ties at the k-th logit count as inside) and ``overlap_token_advantage`` (the
    mean of ``-q (log q - log p)`` over those slots, 0 without any), as verl 0.9 defines them.

    Args:
        student_logits: ``[..., V]`` (verl: ``[1, total_nnz, V]``, already divided by the temperature),
            or this rank's vocabulary shard ``[..., V/tp]`` with ``tensor_parallel``.
        teacher_topk_ids: integer ``[..., k]`` (verl sends int32), global ids.
        teacher_topk_logprobs: ``[..., k]`` as served.
        divergence: one of ``opd_ext.objective.TOPK_DIVERGENCES``.
        tensor_parallel: ``(group, vocab_start, vocab)`` when the logits are a vocabulary shard
            (Megatron's tensor parallelism): the vocab-parallel loss runs instead.
    """
    ids = teacher_topk_ids.long()
    k = ids.shape[-1]
    if tensor_parallel is None:
        losses, stats = topk_kl_loss(
            student_logits, ids, teacher_topk_logprobs, divergence=divergence, reduction="none", return_stats=True
        )
        with torch.no_grad():
            logits = student_logits.detach()
            kth = logits.topk(k, dim=-1).values[..., -1:]
            inside = logits.gather(-1, ids) >= kth
    else:
        group, vocab_start, vocab = tensor_parallel
        where = dict(group=group, vocab_start=vocab_start, vocab=vocab)
        losses, stats = vocab_parallel_topk_kl_loss(
            student_logits,
            ids,
            teacher_topk_logprobs,
            divergence=divergence,
            reduction="none",
            return_stats=True,
            **where,
        )
        inside = vocab_parallel_in_topk(student_logits, ids, k, **where)
    with torch.no_grad():
        q = teacher_topk_logprobs.detach().float()
        token_kl = q.exp() * (q - stats.student_topk_logprob)
        count = inside.sum(-1)
        advantage = torch.where(inside, -token_kl, 0.0).sum(-1) / count.clamp(min=1)
    return {
        "distillation_losses": losses,
        "student_mass": stats.student_mass,
        "teacher_mass": stats.teacher_mass,
        "teacher_entropy": stats.teacher_entropy,
        "overlap_count": count,
        "overlap_token_advantage": torch.where(count > 0, advantage, 0.0),
    }


def _logits_processor(config, distillation_config, data, student_logits, data_format) -> dict:
    """verl's ``compute_topk_loss`` for the opd_ext modes (same arguments, same outputs)."""
    divergence = LOSS_MODES[distillation_config.distillation_loss.loss_mode]
    if config.strategy == "megatron":
        return _megatron_outputs(data, student_logits, data_format, divergence)
    if config.strategy not in _FSDP_STRATEGIES:
        raise NotImplementedError(
            f"opd_ext loss modes run under the {', '.join(_FSDP_STRATEGIES)} and megatron strategies, "
            f"not {config.strategy!r}"
        )
    from verl.utils.ulysses import get_ulysses_sequence_parallel_world_size, slice_input_tensor

    ids, logprobs = data["teacher_ids"], data["teacher_logprobs"]
    if ids.is_nested:
        ids, logprobs = ids.values().unsqueeze(0), logprobs.values().unsqueeze(0)  # (1, total_nnz, k)
    if get_ulysses_sequence_parallel_world_size() > 1:
        ids, logprobs = slice_input_tensor(ids, dim=1), slice_input_tensor(logprobs, dim=1)
    _check_aligned(ids, student_logits, data_format)
    return topk_outputs(student_logits, ids, logprobs, divergence)


def _megatron_outputs(data, student_logits, data_format, divergence) -> dict:
    """Megatron: ``student_logits`` is this rank's vocabulary shard ``(bsz, seqlen/cp, V/tp)``; the
    teacher's top-k is split over context parallelism as verl's own Megatron loss splits it."""
    from megatron.core.parallel_state import (
        get_tensor_model_parallel_group,
        get_tensor_model_parallel_rank,
        get_tensor_model_parallel_world_size,
    )
    from verl.models.mcore.util import preprocess_bshd_engine, preprocess_thd_engine

    split = preprocess_thd_engine if data_format == "thd" else preprocess_bshd_engine
    logprobs, *_ = split(data["teacher_logprobs"], pre_process=True)
    ids, *_ = split(data["teacher_ids"], pre_process=True)
    _check_aligned(ids, student_logits, data_format)
    local = student_logits.shape[-1]
    world = get_tensor_model_parallel_world_size()
    # Megatron's vocabulary-parallel layout: equal contiguous shards in rank order.
    where = (get_tensor_model_parallel_group(), get_tensor_model_parallel_rank() * local, local * world)
    return topk_outputs(student_logits, ids, logprobs, divergence, tensor_parallel=where)


def _check_aligned(ids, student_logits, data_format) -> None:
    if ids.shape[:2] != student_logits.shape[:2]:
        raise ValueError(
            f"teacher top-k {tuple(ids.shape)} does not line up with the student logits "
            f"{tuple(student_logits.shape)} (data_format={data_format!r})"
        )


def _loss(config, distillation_config, model_output: dict, data) -> tuple[torch.Tensor, dict[str, Any]]:
    """The registered loss: per-token divergences [bsz, resp_len] and verl's top-k metrics plus the
    teacher's entropy; no clamp (the tail and generalized forms are nonnegative by construction)."""
    from verl.trainer.distillation.losses import compute_forward_kl_topk
    from verl.workers.utils.padding import no_padding_2_padding

    losses = no_padding_2_padding(model_output["distillation_losses"], data)
    # verl's own function computes the mass and overlap metrics (same keys, same aggregation); its
    # returned losses are clamped at 0, so only its metrics are kept.
    _, metrics = compute_forward_kl_topk(config, distillation_config, model_output, data)
    mask = data["response_mask"]
    mask = (mask.to_padded_tensor(False) if mask.is_nested else mask).bool()
    entropy = no_padding_2_padding(model_output["teacher_entropy"], data)[mask]
    metrics["distillation/teacher_entropy"] = entropy.mean().item() if entropy.numel() else 0.0
    return losses, metrics


_registered = False


def register() -> None:
    """Register :data:`LOSS_MODES` with verl and route its top-k logits processor for them (once;
    verl's plugin entry point calls this on ``import verl``). Raises ImportError outside
    :data:`SUPPORTED_VERL`."""
    global _registered
    if _registered:
        return
    try:
        import verl
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "opd_ext.integrations.verl needs verl: pip install 'verl>=0.9,<0.10' (or pip install 'opd_ext[verl]')"
        ) from error
    from verl.trainer.distillation import losses as verl_losses

    try:
        check_verl_version(verl.__version__)
    except ImportError as error:
        # verl loads plugins inside `except Exception` and logs failures at DEBUG level only: say it
        # where a user sees it, or the first sign would be "Unsupported loss mode" much later.
        warnings.warn(str(error), stacklevel=2)
        raise
    settings = verl_losses.DistillationLossSettings(names=list(LOSS_MODES), use_topk=True)
    verl_losses.register_distillation_loss(settings)(_loss)
    verls_compute_topk_loss = verl_losses.compute_topk_loss

    def compute_topk_loss(config, distillation_config, data, student_logits, data_format):
        if distillation_config.distillation_loss.loss_mode in LOSS_MODES:
            return _logits_processor(config, distillation_config, data, student_logits, data_format)
        return verls_compute_topk_loss(config, distillation_config, data, student_logits, data_format)

    verl_losses.compute_topk_loss = compute_topk_loss
    _registered = True


register()
