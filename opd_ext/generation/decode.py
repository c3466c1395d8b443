"""Our own decode loop (lockstep or chunked) and post-hoc scoring of rollouts generated elsewhere."""

from __future__ import annotations

from typing import Optional

import torch

from opd_ext.generation.models import CachedDecoder, completion_logits, shared_vocab_logits
from opd_ext.generation.rollout import (
    Rollout,
    TokenIds,
    check_config,
    check_count,
    check_prompt,
    check_sampling,
    check_token_ids,
    consume_chunk,
    consume_token,
    record,
    resolve_pad,
    sample_tokens,
    tokens_saved,
)
from opd_ext.prune import DriftMonitor, PruneConfig


# ---- 1 + 3: our decode loop, lockstep or chunked ------------------------------------------------
@torch.no_grad()  # not inference_mode: the recorded tensors must stay usable as constants in a backward
def generate_with_pruning(
    student,
    teacher,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    *,
    max_new_tokens: int,
    config: Optional[PruneConfig] = None,
    chunk_size: int = 1,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    do_sample: bool = True,
    eos_token_id: TokenIds = None,
    pad_token_id: Optional[int] = None,
    budget=None,
    generator: Optional[torch.Generator] = None,
) -> Rollout:
    """Samples rollouts from ``student`` while ``teacher`` scores them and Prune-OPD stops drifted rows.

    Every ``chunk_size`` tokens the teacher scores the new tokens of the live rows in one forward
    and the monitor consumes them (the drift scan finds the first stop in the chunk); rows that
    stopped (drift, EOS) are then removed from both models' batch. ``chunk_size=1`` is the lockstep
    loop: one teacher token per student token, and a row leaves the batch right after the token
    that stopped it.

    Args:
        student, teacher: causal LMs (Hugging Face convention) on ``input_ids``' device, possibly
            wrapped (PEFT, DDP, FSDP). Their vocabularies may differ: tokens are sampled from the
            ids both have (the prefix of the shorter one).
        input_ids: int64 ``[B, P]`` left-padded prompts; ``attention_mask`` ``[B, P]`` (1 = token).
        max_new_tokens: completion length limit ``T``.
        config: :class:`~opd_ext.PruneConfig` (default ``PruneConfig()``; ``PruneConfig.disabled()``
            for plain OPD rollouts with the same record).
        chunk_size: student tokens per teacher forward (1 = lockstep).
        temperature, top_k, top_p, do_sample, generator: sampling, as in ``generate()``. The recorded
            log-probs and KL use the same ``temperature``; overlaps do not depend on it.
        eos_token_id: id or ids ending a completion (kept, multiplier included); None: never.
        pad_token_id: fills completions after their end (default: the first EOS id).
        budget: per-row length caps for the monitor (``DynamicWindow.length``), see ``DriftMonitor``.

    Returns:
        :class:`Rollout`; ``sequences`` is ``[B, P + T']`` with ``T'`` the longest completion.

    Raises:
        TypeError: a model's KV cache cannot drop rows exactly (the message names the cache layer
            type); raised after the prompts' forward, before any token is sampled.
        ValueError: bad arguments, an encoder-decoder model, or prompt ids beyond a model's vocabulary.
    """
    prompt, prompt_mask = check_prompt(input_ids, attention_mask)
    max_new_tokens = check_count("max_new_tokens", max_new_tokens)
    chunk_size = check_count("chunk_size", chunk_size)
    check_sampling(temperature, top_k, top_p)
    config = check_config(config)
    device = prompt.device
    eos = check_token_ids("eos_token_id", eos_token_id, device)
    pad = resolve_pad(pad_token_id, eos)

    batch = prompt.shape[0]
    monitor = DriftMonitor(batch, config, device=device, budget=budget)
    student_lm, teacher_lm = CachedDecoder(student, "student"), CachedDecoder(teacher, "teacher")
    student_next = student_lm.prefill(prompt, prompt_mask)
    teacher_next = teacher_lm.prefill(prompt, prompt_mask)
    shared_vocab = min(student_next.shape[-1], teacher_next.shape[-1])
    completions = torch.full((batch, max_new_tokens), pad, dtype=torch.int64, device=device)
    chunk_stats = None if chunk_size == 1 else torch.zeros(3, batch, max_new_tokens, device=device)

    active = torch.arange(batch, device=device)  # batch index of each live row of the models
    pending = None  # each live row's last token, not yet fed to either model
    position = tokens_generated = 0
    while position < max_new_tokens and active.numel():
        width = min(chunk_size, max_new_tokens - position)
        chunk = torch.empty(active.numel(), width, dtype=torch.int64, device=device)
        student_logits = []
        for j in range(width):
            previous = chunk[:, j - 1] if j else pending
            logits = student_next if previous is None else student_lm.extend(previous[:, None])[:, -1]
            student_next = None
            chunk[:, j] = sample_tokens(
                logits[:, :shared_vocab],
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                do_sample=do_sample,
                generator=generator,
            )
            student_logits.append(logits)
        tokens_generated += chunk.numel()

        # Teacher logits at the chunk's positions come from the token before each: the pending
        # token and the chunk minus its last token (whose logits belong to the next chunk).
        if pending is None:
            head, feed = [teacher_next.unsqueeze(1)], chunk[:, :-1]
            teacher_next = None
        else:
            head, feed = [], torch.cat([pending[:, None], chunk[:, :-1]], dim=1)
        teacher_logits = torch.cat(head + ([teacher_lm.extend(feed)] if feed.shape[1] else []), dim=1)
        s, t = shared_vocab_logits(torch.stack(student_logits, dim=1), teacher_logits)
        if chunk_size == 1:
            alive = consume_token(monitor, s[:, 0], t[:, 0], chunk[:, 0], active, temperature=temperature, eos=eos)
        else:
            alive = consume_chunk(
                monitor, s, t, chunk, active, temperature=temperature, eos=eos, token_stats_out=chunk_stats
            )

        completions[active, position : position + width] = chunk
        position += width
        if position >= max_new_tokens:
            break
        keep = alive.nonzero().squeeze(-1)
        if keep.numel() < active.numel():
            student_lm.keep_rows(keep)
            teacher_lm.keep_rows(keep)
            active, chunk = active[keep], chunk[keep]
        pending = chunk[:, -1]

    return record(
        monitor,
        prompt,
        completions,
        pad,
        tokens_generated=tokens_generated,
        tokens_saved=tokens_saved(monitor, max_new_tokens),
        teacher_forwards=teacher_lm.forwards,
        teacher_tokens=teacher_lm.token_rows,
        token_stats_out=chunk_stats,
    )


# ---- 4: post hoc, for rollouts generated elsewhere ----------------------------------------------
@torch.no_grad()
def score_rollouts(
    student,
    teacher,
    sequences: torch.Tensor,
    prompt_length: int,
    *,
    attention_mask: Optional[torch.Tensor] = None,
    completion_mask: Optional[torch.Tensor] = None,
    student_logits: Optional[torch.Tensor] = None,
    config: Optional[PruneConfig] = None,
    temperature: float = 1.0,
    eos_token_id: TokenIds = None,
    pad_token_id: Optional[int] = None,
    budget=None,
) -> Rollout:
    """Prune-OPD over finished rollouts (e.g. from vLLM / SGLang): weights and truncation points.

    One teacher forward over the sequences (and one student forward unless ``student_logits`` is
    given), then the drift scan over the completions, which decides exactly as the decode step did
    during generation: ``completion_mask`` of the result ends where the row would have been stopped.

    Args:
        student: the student model, or None when ``student_logits`` is given.
        teacher: the teacher model.
        sequences: int64 ``[B, P + T]``: left-padded prompts, then right-padded completions.
        prompt_length: ``P``.
        attention_mask: ``[B, P]`` (prompt) or ``[B, P + T]`` (its completion part is ignored);
            default: no prompt padding.
        completion_mask: bool ``[B, T]``, which completion positions hold generated tokens (a
            prefix per row). Default: up to and including the first EOS, else all ``T``.
        student_logits: ``[B, T, V]`` student logits at the completion positions (the logits
            that sampled each token), e.g. from the training step's forward.
        config, temperature, eos_token_id, budget: as :func:`generate_with_pruning`.
        pad_token_id: if given, completion tokens past the truncation are replaced by it.

    Returns:
        :class:`Rollout` (``tokens_saved``: generated tokens cut off by the truncation).

    Raises:
        ValueError: bad arguments, an encoder-decoder model, or sequence ids beyond a model's
            vocabulary (completions must use ids student and teacher share, as generation does).
    """
    if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2 or sequences.dtype != torch.int64:
        raise ValueError("sequences must be an int64 tensor [B, P + T] (prompts, then completions)")
    if (
        isinstance(prompt_length, bool)
        or not isinstance(prompt_length, int)
        or not (1 <= prompt_length < sequences.shape[1])
    ):
        raise ValueError(
            f"prompt_length must be an int in [1, {sequences.shape[1] - 1}] for sequences of "
            f"shape {tuple(sequences.shape)} (at least one prompt and one completion token), "
            f"got {prompt_length!r}"
        )
    if student is None and student_logits is None:
        raise ValueError("pass the student model or its student_logits [B, T, V] at the completion positions")
    check_sampling(temperature, None, None)
    config = check_config(config)
    device = sequences.device
    eos = check_token_ids("eos_token_id", eos_token_id, device)
    pad = None if pad_token_id is None else resolve_pad(pad_token_id, eos)

    batch, prompt_len = sequences.shape[0], prompt_length
    prompt, completions = sequences[:, :prompt_len], sequences[:, prompt_len:]
    if attention_mask is not None and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        attention_mask = attention_mask[:, :prompt_len]
    prompt, prompt_mask = check_prompt(prompt, attention_mask)
    steps = completions.shape[1]
    if completion_mask is None:
        if eos is None:
            completion_mask = torch.ones_like(completions, dtype=torch.bool)
        else:  # through the first EOS: count EOS ids strictly before each position
            completion_mask = (
                torch.isin(completions, eos).long().cumsum(-1) - torch.isin(completions, eos).long()
            ) == 0
    elif not isinstance(completion_mask, torch.Tensor) or completion_mask.shape != completions.shape:
        raise ValueError(f"completion_mask must be a bool tensor [B, T] = {tuple(completions.shape)}")
    completion_mask = completion_mask.to(device=device, dtype=torch.bool)
    if bool((completion_mask[:, 1:] & ~completion_mask[:, :-1]).any()):
        raise ValueError("completion_mask must be a prefix per row (1...1 0...0): completions are right-padded")

    full_mask = torch.cat([prompt_mask, completion_mask.long()], dim=1)
    teacher_logits = completion_logits(teacher, "teacher", sequences, full_mask, steps)
    if student_logits is None:
        student_logits = completion_logits(student, "student", sequences, full_mask, steps)
    elif not isinstance(student_logits, torch.Tensor) or student_logits.shape[:2] != completions.shape:
        got = tuple(student_logits.shape) if isinstance(student_logits, torch.Tensor) else type(student_logits).__name__
        raise ValueError(f"student_logits must be [B, T, V] with [B, T] = {tuple(completions.shape)}, got {got}")
    s, t = shared_vocab_logits(student_logits, teacher_logits)
    beyond = (completions >= s.shape[-1]) & completion_mask
    if bool(beyond.any()):
        row, step = (int(i) for i in beyond.nonzero()[0])
        raise ValueError(
            f"completion token {int(completions[row, step])} (row {row}, step {step}) is beyond the "
            f"vocabulary student and teacher share ({s.shape[-1]} ids): it cannot be scored, and the "
            f"other generation modes never sample it"
        )

    monitor = DriftMonitor(batch, config, device=device, budget=budget)
    stats = torch.zeros(3, batch, steps, device=device)
    consume_chunk(
        monitor,
        s,
        t,
        completions,
        torch.arange(batch, device=device),
        temperature=temperature,
        eos=eos,
        token_stats_out=stats,
        valid=completion_mask,
    )
    generated = int(completion_mask.sum())
    return record(
        monitor,
        prompt,
        completions,
        pad,
        tokens_generated=generated,
        tokens_saved=generated - int(monitor.mask.sum()),
        teacher_forwards=1,
        teacher_tokens=sequences.numel(),
        token_stats_out=stats,
    )
