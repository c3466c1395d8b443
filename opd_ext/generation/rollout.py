"""The :class:`Rollout` record, sampling, the argument checks of the decode modes, and how sampled
tokens reach the :class:`~opd_ext.DriftMonitor` (one at a time, or a chunk through the drift scan).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Optional, Union

import torch

from opd_ext._validation import check_temperature
from opd_ext.losses import token_stats, topk_overlap
from opd_ext.prune import DriftMonitor, PruneConfig, StopReason

TokenIds = Union[int, Sequence[int], torch.Tensor, None]


# ---- the record ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Rollout:
    """A batch of rollouts with everything a training step reuses.

    Per token, ``[B, T]`` over the completion (``T`` = the longest completion; 0 / padding where
    :attr:`completion_mask` is False): :attr:`multipliers` (``w_base + weight``: pass as
    ``weights=`` to ``opd_ext.vopd_loss``), :attr:`weights` (drift weight in ``[0, 1]``,
    non-increasing along a row), :attr:`overlaps`, :attr:`student_logprobs`,
    :attr:`teacher_logprobs` and :attr:`reverse_kl` (at the generation temperature; the teacher
    values are what the training step would otherwise recompute with a teacher forward).

    Per row: :attr:`lengths` (completion tokens kept; the row stopped after token ``lengths - 1``)
    and :attr:`stop_reason` (``opd_ext.StopReason`` codes: ``FINISHED`` = emitted EOS,
    ``WEIGHT_EXHAUSTED`` / ``PATIENCE`` / ``BUDGET`` = stopped by pruning, ``RUNNING`` = reached
    ``max_new_tokens`` or the end of the given sequence; an EOS that is also the token exhausting
    the weight reports the drift reason); :attr:`effective_lengths` (tokens with weight > 0, for
    ``DynamicWindow.update``).

    Costs: :attr:`tokens_generated` (token rows the student decoded, wasted ones included),
    :attr:`tokens_saved` (decode slots not spent on pruned rows, counted up to ``max_new_tokens``;
    post hoc: generated tokens cut off by the truncation), :attr:`teacher_forwards` (teacher calls)
    and :attr:`teacher_tokens` (token rows the teacher processed, prompts included).
    """

    sequences: torch.Tensor
    prompt_length: int
    completion_mask: torch.Tensor
    multipliers: torch.Tensor
    weights: torch.Tensor
    overlaps: torch.Tensor
    student_logprobs: torch.Tensor
    teacher_logprobs: torch.Tensor
    reverse_kl: torch.Tensor
    lengths: torch.Tensor
    stop_reason: torch.Tensor
    effective_lengths: torch.Tensor
    tokens_generated: int
    tokens_saved: int
    teacher_forwards: int
    teacher_tokens: int

    @property
    def completions(self) -> torch.Tensor:
        """``[B, T]`` generated ids (padding where :attr:`completion_mask` is False)."""
        return self.sequences[:, self.prompt_length :]

    @property
    def stop_steps(self) -> torch.Tensor:
        """int64 ``[B]``: completion index of the token after which each row stopped (EOS or
        pruning), -1 for rows that ran to the length limit (the convention of ``drift_scan``)."""
        return torch.where(self.stop_reason == StopReason.RUNNING, -1, self.lengths - 1)

    @property
    def tokens_kept(self) -> int:
        return int(self.completion_mask.sum())

    def stop_reason_names(self) -> list[str]:
        names = {**StopReason.NAMES, StopReason.RUNNING: "max_length", StopReason.FINISHED: "eos"}
        return [names[int(code)] for code in self.stop_reason]


def completion_mask(lengths: torch.Tensor, num_steps: int) -> torch.Tensor:
    """bool ``[B, num_steps]``: True on each row's first ``lengths[b]`` completion tokens.

    Hugging Face's loop keeps appending tokens to rows a ``StoppingCriteria`` stopped unless an EOS
    criterion is configured (and then appends padding); either way those positions are not part of
    the rollout. Build the mask from the monitor's per-row lengths (``DriftMonitor.lengths``).
    """
    steps = torch.arange(num_steps, device=lengths.device)
    return steps.unsqueeze(0) < lengths.unsqueeze(-1)


# ---- sampling -----------------------------------------------------------------------------------
def sample_tokens(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    do_sample: bool = True,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Next tokens ``[A]`` from logits ``[A, V]``: greedy, or sampling at ``temperature`` restricted
    to the ``top_k`` ids and/or the smallest set with probability ``>= top_p`` (HF semantics)."""
    if not do_sample:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        mass_before = sorted_scores.softmax(-1).cumsum(-1) - sorted_scores.softmax(-1)
        drop_sorted = mass_before >= top_p  # never drops the most likely id: its mass_before is 0
        scores = scores.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), -math.inf)
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(-1)


def check_sampling(temperature, top_k, top_p) -> None:
    check_temperature(temperature)  # greedy decoding: do_sample=False, not temperature 0
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")


# ---- argument checks ----------------------------------------------------------------------------
def check_count(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_prompt(input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.int64:
        got = (
            f"shape {tuple(input_ids.shape)}, dtype {input_ids.dtype}"
            if isinstance(input_ids, torch.Tensor)
            else type(input_ids).__name__
        )
        raise ValueError(f"input_ids must be an int64 tensor [B, P] of prompt ids, got {got}")
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): need B >= 1 prompts of P >= 1 tokens")
    if attention_mask is None:
        return input_ids, torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}, got {got}")
    if attention_mask.device != input_ids.device:
        raise ValueError(f"attention_mask is on {attention_mask.device} but input_ids on {input_ids.device}")
    mask = attention_mask.long()
    if not bool((mask[:, -1] == 1).all()):
        raise ValueError(
            "attention_mask: prompts must be left-padded (every row's last position is a real token); "
            "set tokenizer.padding_side = 'left'"
        )
    if bool(((mask[:, 1:] - mask[:, :-1]) < 0).any()):
        raise ValueError("attention_mask: padding must be a contiguous left block in each row (0...0 1...1)")
    return input_ids, mask


def check_token_ids(name: str, ids: TokenIds, device) -> Optional[torch.Tensor]:
    if ids is None:
        return None
    ids = torch.as_tensor(ids, device=device).reshape(-1)
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.numel() == 0 or bool((ids < 0).any()):
        raise ValueError(f"{name} must be None, a token id >= 0 or a list of them, got {ids.tolist()!r}")
    return ids.long()


def resolve_pad(pad_token_id, eos: Optional[torch.Tensor]) -> int:
    if pad_token_id is None:
        if eos is None:
            raise ValueError(
                "pad_token_id is required (stopped rows are right-padded with it); "
                "pass it, or an eos_token_id to pad with"
            )
        return int(eos[0])
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or pad_token_id < 0:
        raise ValueError(f"pad_token_id must be an int >= 0, got {pad_token_id!r}")
    return pad_token_id


def check_config(config) -> PruneConfig:
    if config is None:
        return PruneConfig()
    if not isinstance(config, PruneConfig):
        raise TypeError(f"config must be an opd_ext.PruneConfig, got {type(config).__name__}")
    return config.validate()


# ---- feeding the monitor ------------------------------------------------------------------------
def consume_token(
    monitor: DriftMonitor, student_logits, teacher_logits, tokens, rows, *, temperature, eos: Optional[torch.Tensor]
) -> torch.Tensor:
    """One sampled token per live row ``[A]`` through the fused decode-step op: top-k overlap, drift
    state and the token's log-probs / KL from one read of the ``[A, V]`` logits.

    Returns bool ``[A]``: the rows still generating (not stopped by drift, not at EOS).
    """
    stopped = monitor.step(student_logits, teacher_logits, tokens, rows=rows, temperature=temperature)
    if eos is not None:
        at_eos = torch.isin(tokens, eos)
        monitor.finish(rows[at_eos])
        stopped = stopped | at_eos
    return ~stopped


def consume_chunk(
    monitor: DriftMonitor,
    student_logits,
    teacher_logits,
    tokens,
    rows,
    *,
    temperature,
    eos: Optional[torch.Tensor],
    token_stats_out: torch.Tensor,
    valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``C`` tokens per live row ``[A, C]`` at once: overlaps and token statistics over the
    ``[A, C, V]`` logits in one op each, then the drift scan (``DriftMonitor.observe``) finds where
    each row stops. Decisions are those of ``C`` calls of :func:`consume_token`.

    ``valid`` (post hoc) marks the positions holding tokens (a prefix per row). The kept tokens'
    ``(student log-prob, teacher log-prob, reverse KL)`` go to ``token_stats_out[:, row, position]``
    (``observe`` tracks only the drift state). Returns bool ``[A]``: rows still generating after it.
    """
    mask = torch.ones_like(tokens, dtype=torch.bool) if valid is None else valid.clone()
    at_eos = torch.zeros_like(mask)
    if eos is not None:  # a row's tokens end at its first EOS, which is kept
        at_eos = torch.isin(tokens, eos) & mask
        mask &= (at_eos.long().cumsum(1) - at_eos.long()) == 0
        at_eos &= mask
    start = monitor.lengths.index_select(0, rows)
    overlaps = topk_overlap(student_logits, teacher_logits, monitor.config.k)
    stop_at = monitor.observe(overlaps, mask, rows=rows, tokens=tokens)
    ended_by_eos = at_eos.any(1) & (stop_at < 0)
    monitor.finish(rows[ended_by_eos])

    steps = torch.arange(tokens.shape[1], device=tokens.device)
    kept = mask & ((stop_at[:, None] < 0) | (steps <= stop_at[:, None]))
    stats = token_stats(student_logits, teacher_logits, tokens, temperature=temperature)
    at_row, at_step = kept.nonzero(as_tuple=True)
    token_stats_out[:, rows[at_row], start[at_row] + at_step] = torch.stack(stats)[:, at_row, at_step]
    return (stop_at < 0) & ~ended_by_eos & mask[:, -1]


def record(
    monitor: DriftMonitor,
    prompt: torch.Tensor,
    completions: torch.Tensor,
    pad: Optional[int],
    *,
    tokens_generated: int,
    tokens_saved: int,
    teacher_forwards: int,
    teacher_tokens: int,
    token_stats_out: Optional[torch.Tensor] = None,
) -> Rollout:
    """Assembles the record from the monitor's history, trimmed to the longest completion.

    ``token_stats_out`` ``[3, B, >=T]`` holds the token statistics when the monitor did not record
    them (chunks consumed through ``observe``).
    """
    steps = int(monitor.lengths.max())
    mask = monitor.mask[:, :steps]
    completions = completions[:, :steps]
    if pad is not None:
        completions = completions.masked_fill(~mask, pad)
    if token_stats_out is None:
        stats = (monitor.student_logprobs, monitor.teacher_logprobs, monitor.reverse_kl)
    else:
        stats = token_stats_out
    student_logprobs, teacher_logprobs, reverse_kl = (x[:, :steps].clone() for x in stats)
    return Rollout(
        sequences=torch.cat([prompt, completions], dim=1),
        prompt_length=prompt.shape[1],
        completion_mask=mask.clone(),
        multipliers=monitor.multipliers[:, :steps].clone(),
        weights=monitor.weights[:, :steps].clone(),
        overlaps=monitor.overlaps[:, :steps].clone(),
        student_logprobs=student_logprobs,
        teacher_logprobs=teacher_logprobs,
        reverse_kl=reverse_kl,
        lengths=monitor.lengths,
        stop_reason=monitor.stop_reasons,
        effective_lengths=monitor.effective_lengths,
        tokens_generated=tokens_generated,
        tokens_saved=tokens_saved,
        teacher_forwards=teacher_forwards,
        teacher_tokens=teacher_tokens,
    )


def tokens_saved(monitor: DriftMonitor, max_new_tokens: int) -> int:
    """Completion slots up to ``max_new_tokens`` that rows stopped by pruning did not use."""
    reasons = monitor.stop_reasons
    pruned = torch.isin(reasons, torch.tensor(StopReason.PRUNED, dtype=reasons.dtype, device=reasons.device))
    return int(((max_new_tokens - monitor.lengths) * pruned).sum())
