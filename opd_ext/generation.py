"""Prune-OPD during generation: stop drifted rollouts inside the batch, so the saved compute is real.

A :class:`~opd_ext.prune.DriftMonitor` decides, token by token, when a rollout has drifted away
from what the teacher can supervise. This module runs it over student rollouts four ways, all
returning the same :class:`Rollout` record (sequences, completion mask, per-token multipliers,
overlaps, the sampled tokens' student / teacher log-probs and reverse KL, stop reasons, costs):

* :func:`generate_with_pruning` (``chunk_size=1``): our own decode loop. Student and teacher run
  in lockstep with KV caches; every step the monitor consumes the sampled token, and stopped rows
  are dropped from both models' batch (caches, attention masks, positions), so later steps cost
  less.
* :func:`generate_with_pruning` (``chunk_size=C``): the student decodes ``C`` tokens, the teacher
  scores the whole chunk in one forward, the drift scan (``DriftMonitor.observe``) finds where each
  row stops within it. About ``C`` times fewer teacher calls, for at most ``C - 1`` wasted student
  tokens per stopped row.
* :class:`PruneOPDHook`: the same decisions inside Hugging Face ``model.generate()`` through a
  ``LogitsProcessor`` (runs the teacher incrementally) and a ``StoppingCriteria`` (steps the monitor,
  returns the per-row stop mask); :func:`generate_hf_with_pruning` wraps the three calls.
* :func:`score_rollouts`: post hoc, for rollouts from another engine (vLLM, SGLang): one teacher
  forward over the finished sequences, then weights and truncation points.

Given the same tokens, all four make identical decisions: the monitor sees the same
``(student logits, teacher logits, token)`` triples in the same order (the scan over a chunk is
the decode step applied position by position).

Models are any decoder-only causal LM with the Hugging Face calling convention (``input_ids``,
``attention_mask``, ``position_ids``, a KV cache, ``.logits``), transformers 4.5x (``past_key_values``)
or 5.x (``cache``), also wrapped (PEFT, DistributedDataParallel, FSDP, ``torch.compile``). Their KV
caches must be able to drop batch rows exactly; those that cannot are refused before any token is
sampled. Prompts are left-padded (``tokenizer.padding_side = "left"``). Put the models in ``eval()``
mode yourself, as for ``generate()``. Which caches and wrappers work, and how differing vocabularies
are handled (the same in every mode): ``docs/generation.md``.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Optional, Sequence, Union

import torch

from opd_ext._validation import LOGIT_DTYPES, align_vocab, check_temperature, is_supported_dtype_pair
from opd_ext.losses import token_stats
from opd_ext.ops import topk_overlap
from opd_ext.prune import DriftMonitor, PruneConfig, StopReason

__all__ = [
    "Rollout",
    "generate_with_pruning",
    "score_rollouts",
    "PruneOPDHook",
    "DriftLogitsProcessor",
    "DriftStoppingCriteria",
    "generate_hf_with_pruning",
    "completion_mask",
    "sample_tokens",
]

TokenIds = Union[int, Sequence[int], torch.Tensor, None]

# Reasons a drift-free run would not have had: the rows behind `Rollout.tokens_saved`.
_PRUNED = (StopReason.WEIGHT_EXHAUSTED, StopReason.PATIENCE, StopReason.BUDGET)


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
        return self.sequences[:, self.prompt_length:]

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
def sample_tokens(logits: torch.Tensor, *, temperature: float = 1.0, top_k: Optional[int] = None,
                  top_p: Optional[float] = None, do_sample: bool = True,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
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


def _check_sampling(temperature, top_k, top_p) -> None:
    check_temperature(temperature)  # greedy decoding: do_sample=False, not temperature 0
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")


# ---- argument checks ----------------------------------------------------------------------------
def _check_count(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_prompt(input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.int64:
        got = f"shape {tuple(input_ids.shape)}, dtype {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) \
            else type(input_ids).__name__
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
        raise ValueError("attention_mask: prompts must be left-padded (every row's last position is a real token); "
                         "set tokenizer.padding_side = 'left'")
    if bool(((mask[:, 1:] - mask[:, :-1]) < 0).any()):
        raise ValueError("attention_mask: padding must be a contiguous left block in each row (0...0 1...1)")
    return input_ids, mask


def _check_token_ids(name: str, ids: TokenIds, device) -> Optional[torch.Tensor]:
    if ids is None:
        return None
    ids = torch.as_tensor(ids, device=device).reshape(-1)
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.numel() == 0 or bool((ids < 0).any()):
        raise ValueError(f"{name} must be None, a token id >= 0 or a list of them, got {ids.tolist()!r}")
    return ids.long()


def _resolve_pad(pad_token_id, eos: Optional[torch.Tensor]) -> int:
    if pad_token_id is None:
        if eos is None:
            raise ValueError("pad_token_id is required (stopped rows are right-padded with it); "
                             "pass it, or an eos_token_id to pad with")
        return int(eos[0])
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or pad_token_id < 0:
        raise ValueError(f"pad_token_id must be an int >= 0, got {pad_token_id!r}")
    return pad_token_id


def _check_config(config) -> PruneConfig:
    if config is None:
        return PruneConfig()
    if not isinstance(config, PruneConfig):
        raise TypeError(f"config must be an opd_ext.PruneConfig, got {type(config).__name__}")
    return config.validate()


# ---- model plumbing -----------------------------------------------------------------------------
def _comparable(student_logits: torch.Tensor, teacher_logits: torch.Tensor):
    """The two models' logits over their shared vocabulary, in a dtype pair the kernels take.

    The shared vocabulary is the prefix both heads cover (Qwen pads 151936 vs 152064 rows); the
    ids beyond it are embedding padding that no real token uses.
    """
    s, t = align_vocab(student_logits, teacher_logits)
    if s.dtype not in LOGIT_DTYPES or t.dtype not in LOGIT_DTYPES:
        s, t = s.float(), t.float()  # float64 models: the kernels accumulate in float32 anyway
    if not is_supported_dtype_pair(s.dtype, t.dtype):
        s, t = s.float(), t.float()  # bf16 vs fp16: no kernel for the pair, widen both
    return s, t


def _wrapper_chain(model) -> list:
    """``model`` and the modules it wraps, outermost first: ``.module`` (DistributedDataParallel,
    DataParallel, FSDP), ``get_base_model()`` (PEFT), ``._orig_mod`` (``torch.compile``).

    Forwards go through the outermost, which may do work of its own (FSDP gathers the parameters,
    PEFT prompt tuning adds virtual tokens). The innermost is the Hugging Face model: its forward
    names the arguments it takes (wrappers take ``**kwargs``), and its ``generate()`` calls it.
    """
    chain = [model]
    while True:
        current = chain[-1]
        get_base_model = getattr(current, "get_base_model", None)
        inner = get_base_model() if callable(get_base_model) else (
            getattr(current, "module", None) or getattr(current, "_orig_mod", None))
        if not isinstance(inner, torch.nn.Module) or any(inner is seen for seen in chain):
            return chain
        chain.append(inner)


def _wrapped_attribute(model, name: str):
    """``name`` of the outermost module in ``model``'s wrapper chain that has it, else None."""
    return next((getattr(m, name) for m in _wrapper_chain(model) if getattr(m, name, None) is not None), None)


def _forward_parameters(model):
    return inspect.signature(_wrapper_chain(model)[-1].forward).parameters


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """int64 positions counting only real tokens: left padding must not shift a row's positions (as
    ``generate()`` numbers them)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def _check_decoder_only(model, name: str) -> None:
    config = getattr(_wrapper_chain(model)[-1], "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{name} is an encoder-decoder model ({type(_wrapper_chain(model)[-1]).__name__}); "
                         f"generation with Prune-OPD needs decoder-only causal LMs")


def _vocab_rows(model) -> Optional[int]:
    """Rows of the model's input embedding (the ids it can read), or None if it does not say."""
    try:
        embedding = _wrapper_chain(model)[-1].get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    rows = getattr(embedding, "num_embeddings", None)
    return rows if isinstance(rows, int) else None


def _check_ids_fit(model, name: str, ids: torch.Tensor, what: str) -> None:
    rows = _vocab_rows(model)
    if rows is not None and ids.numel() and int(ids.max()) >= rows:
        raise ValueError(f"{what} hold token id {int(ids.max())}, beyond the {name}'s vocabulary of {rows} ids")


try:  # the cache classes differ between transformers versions: each is looked up on its own
    from transformers import cache_utils as _cache_utils
except ImportError:  # pragma: no cover
    _cache_utils = None
_Cache = getattr(_cache_utils, "Cache", None)
_EncoderDecoderCache = getattr(_cache_utils, "EncoderDecoderCache", None)
_RequantizingLayer = getattr(_cache_utils, "QuantizedLayer", None)  # quanto / HQQ, transformers >= 4.56


def _row_method(obj):
    """The method of a transformers cache or cache layer that keeps only some batch rows, and the
    class defining it; ``(None, None)`` if it has none.

    Two exist. ``reorder_cache`` (beam search) covers every state of every layer type, because beam
    search breaks otherwise; ``batch_select_indices`` is not always overridden by classes that add
    state (the hybrid linear-attention layers and DeepSeek-V4's compressed layers inherit the one
    that only selects keys and values). So the method defined by the more derived class is taken,
    ``reorder_cache`` on a tie; with fewer indices than rows, either keeps exactly those rows.
    """
    mro = type(obj).__mro__

    def defined_at(name):
        return next((depth for depth, cls in enumerate(mro) if name in vars(cls)), len(mro))

    select, reorder = defined_at("batch_select_indices"), defined_at("reorder_cache")
    if select < reorder:
        # Plain indexing; CPU indices index tensors on any device (offloaded layers live on the CPU).
        return (lambda rows: obj.batch_select_indices(rows.cpu())), mro[select]
    if reorder < len(mro):
        return obj.reorder_cache, mro[reorder]  # moves the indices to each state's device itself
    return None, None


def _row_selection(cache, name: str) -> list:
    """Callables that together keep the given rows (int64 indices) of every state in ``cache``.

    Raises TypeError, naming the layer type, for a cache that cannot drop rows exactly.
    """
    if _EncoderDecoderCache is not None and isinstance(cache, _EncoderDecoderCache):
        return (_row_selection(cache.self_attention_cache, name)
                + _row_selection(cache.cross_attention_cache, name))
    if _Cache is None or not isinstance(cache, _Cache):
        # Legacy tuples, and the hybrid models' own caches before transformers 5 (LFM2's cannot
        # reorder its empty per-layer placeholders).
        raise TypeError(f"{name}'s KV cache ({type(cache).__name__}) is not a transformers Cache, so its rows cannot "
                        f"be dropped: generation needs a Cache (DynamicCache, the default of transformers >= 4.50; "
                        f"hybrid linear-attention models use it from transformers 5 on)")
    method, owner = _row_method(cache)
    layers = getattr(cache, "layers", None)  # transformers < 4.56 keeps per-layer lists in the cache itself
    if owner is not _Cache or layers is None:
        return [method]  # a cache class that selects state of its own (MiniMax's linear-attention cache)
    selection = []
    for index, layer in enumerate(layers):
        if _RequantizingLayer is not None and isinstance(layer, _RequantizingLayer):
            raise TypeError(
                f"{name}'s KV cache layer {index} is a {type(layer).__name__}, which re-quantizes the cached keys and "
                f"values of the whole batch together (its quantization groups can span rows): the rows kept after "
                f"stopped ones are dropped would not be those of the full batch. Use an unquantized cache "
                f"(DynamicCache) or QuantizedCache(backend='fp8')")
        method, _ = _row_method(layer)
        if method is None:
            raise TypeError(f"{name}'s KV cache layer {index} ({type(layer).__name__}) has no way to drop batch rows "
                            f"(neither reorder_cache nor batch_select_indices); use a DynamicCache")
        selection.append(method)
    return selection


class _CachedDecoder:
    """One causal LM decoding a shrinking batch incrementally: its KV cache, 2-D attention mask and
    next position per row, with rows removable between calls. Counts calls and token rows."""

    def __init__(self, model, name: str):
        _check_decoder_only(model, name)
        self.model = model
        self.name = name
        params = _forward_parameters(model)
        # transformers 5.x renamed the cache argument (and output) from past_key_values to cache.
        self._cache_key = "cache" if "cache" in params else "past_key_values"
        self._keep_last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.cache = None
        self.attention_mask = None
        self.next_position = None
        self.forwards = 0
        self.token_rows = 0

    def _run(self, input_ids, position_ids, **extra):
        out = self.model(input_ids=input_ids, attention_mask=self.attention_mask, position_ids=position_ids,
                         use_cache=True, **{self._cache_key: self.cache}, **extra)
        self.cache = out[self._cache_key] if self._cache_key in out.keys() else None
        if self.cache is None:
            raise RuntimeError(f"{self.name} returned no KV cache (as {self._cache_key!r}); "
                               f"generation needs a decoder that supports use_cache=True")
        self.forwards += 1
        self.token_rows += input_ids.numel()
        return out.logits

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Runs the (left-padded) prompts; returns the logits of each row's next token ``[B, V]``."""
        _check_ids_fit(self.model, self.name, input_ids, "input_ids")
        self.cache = None
        self.attention_mask = attention_mask
        positions = _position_ids(attention_mask)
        logits = self._run(input_ids, positions, **self._keep_last)
        self.next_position = positions[:, -1] + 1
        _row_selection(self.cache, self.name)  # a cache that cannot drop rows fails before any token is sampled
        return logits[:, -1]

    def extend(self, tokens: torch.Tensor) -> torch.Tensor:
        """Appends ``tokens`` ``[A, n]`` to every live row; returns their logits ``[A, n, V]``."""
        rows, n = tokens.shape
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones(rows, n)], dim=1)
        positions = self.next_position.unsqueeze(-1) + torch.arange(n, device=tokens.device)
        logits = self._run(tokens, positions)
        self.next_position = self.next_position + n
        return logits

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drops every row not in ``rows`` (int64 indices into the current batch) from the cache."""
        prefetch = getattr(self.cache, "prefetch_stream", None) if getattr(self.cache, "offloading", False) else None
        if prefetch is not None:
            prefetch.synchronize()  # an offloaded layer may still be arriving on its side stream
        for keep in _row_selection(self.cache, self.name):
            keep(rows)
        self.attention_mask = self.attention_mask[rows]
        self.next_position = self.next_position[rows]


def _consume_token(monitor: DriftMonitor, student_logits, teacher_logits, tokens, rows, *, temperature,
                   eos: Optional[torch.Tensor]) -> torch.Tensor:
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


def _consume_chunk(monitor: DriftMonitor, student_logits, teacher_logits, tokens, rows, *, temperature,
                   eos: Optional[torch.Tensor], token_stats_out: torch.Tensor,
                   valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``C`` tokens per live row ``[A, C]`` at once: overlaps and token statistics over the
    ``[A, C, V]`` logits in one op each, then the drift scan (``DriftMonitor.observe``) finds where
    each row stops. Decisions are those of ``C`` calls of :func:`_consume_token`.

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
    stop_at = monitor.observe(overlaps, mask, rows=rows)
    ended_by_eos = at_eos.any(1) & (stop_at < 0)
    monitor.finish(rows[ended_by_eos])

    steps = torch.arange(tokens.shape[1], device=tokens.device)
    kept = mask & ((stop_at[:, None] < 0) | (steps <= stop_at[:, None]))
    stats = token_stats(student_logits, teacher_logits, tokens, temperature=temperature)
    at_row, at_step = kept.nonzero(as_tuple=True)
    token_stats_out[:, rows[at_row], start[at_row] + at_step] = torch.stack(stats)[:, at_row, at_step]
    return (stop_at < 0) & ~ended_by_eos & mask[:, -1]


def _record(monitor: DriftMonitor, prompt: torch.Tensor, completions: torch.Tensor, pad: Optional[int], *,
            tokens_generated: int, tokens_saved: int, teacher_forwards: int, teacher_tokens: int,
            token_stats_out: Optional[torch.Tensor] = None) -> Rollout:
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


def _tokens_saved(monitor: DriftMonitor, max_new_tokens: int) -> int:
    """Completion slots up to ``max_new_tokens`` that rows stopped by pruning did not use."""
    reasons = monitor.stop_reasons
    pruned = torch.isin(reasons, torch.tensor(_PRUNED, dtype=reasons.dtype, device=reasons.device))
    return int(((max_new_tokens - monitor.lengths) * pruned).sum())


# ---- 1 + 3: our decode loop, lockstep or chunked ------------------------------------------------
@torch.no_grad()  # not inference_mode: the recorded tensors must stay usable as constants in a backward
def generate_with_pruning(student, teacher, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                          *, max_new_tokens: int, config: Optional[PruneConfig] = None, chunk_size: int = 1,
                          temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                          do_sample: bool = True, eos_token_id: TokenIds = None, pad_token_id: Optional[int] = None,
                          budget=None, generator: Optional[torch.Generator] = None) -> Rollout:
    """Samples rollouts from ``student`` while ``teacher`` scores them and Prune-OPD stops drifted rows.

    Every ``chunk_size`` tokens the teacher scores the new tokens of the live rows in one forward
    and the monitor consumes them (the drift scan finds the first stop in the chunk); rows that
    stopped (drift, EOS) are then removed from both models' batch. ``chunk_size=1`` is the lockstep loop: one teacher token per
    student token, and a row leaves the batch right after the token that stopped it.

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
    prompt, prompt_mask = _check_prompt(input_ids, attention_mask)
    max_new_tokens = _check_count("max_new_tokens", max_new_tokens)
    chunk_size = _check_count("chunk_size", chunk_size)
    _check_sampling(temperature, top_k, top_p)
    config = _check_config(config)
    device = prompt.device
    eos = _check_token_ids("eos_token_id", eos_token_id, device)
    pad = _resolve_pad(pad_token_id, eos)

    batch = prompt.shape[0]
    monitor = DriftMonitor(batch, config, device=device, budget=budget)
    student_lm, teacher_lm = _CachedDecoder(student, "student"), _CachedDecoder(teacher, "teacher")
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
            chunk[:, j] = sample_tokens(logits[:, :shared_vocab], temperature=temperature, top_k=top_k, top_p=top_p,
                                        do_sample=do_sample, generator=generator)
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
        s, t = _comparable(torch.stack(student_logits, dim=1), teacher_logits)
        if chunk_size == 1:
            alive = _consume_token(monitor, s[:, 0], t[:, 0], chunk[:, 0], active, temperature=temperature, eos=eos)
        else:
            alive = _consume_chunk(monitor, s, t, chunk, active, temperature=temperature, eos=eos,
                                   token_stats_out=chunk_stats)

        completions[active, position:position + width] = chunk
        position += width
        if position >= max_new_tokens:
            break
        keep = alive.nonzero().squeeze(-1)
        if keep.numel() < active.numel():
            student_lm.keep_rows(keep)
            teacher_lm.keep_rows(keep)
            active, chunk = active[keep], chunk[keep]
        pending = chunk[:, -1]

    return _record(monitor, prompt, completions, pad, tokens_generated=tokens_generated,
                   tokens_saved=_tokens_saved(monitor, max_new_tokens), teacher_forwards=teacher_lm.forwards,
                   teacher_tokens=teacher_lm.token_rows, token_stats_out=chunk_stats)



# ---- 4: post hoc, for rollouts generated elsewhere ----------------------------------------------
def _completion_logits(model, name: str, sequences: torch.Tensor, attention_mask: torch.Tensor,
                       steps: int) -> torch.Tensor:
    """``[B, steps, V]``: the logits that predicted the last ``steps`` tokens (one forward, no cache)."""
    _check_decoder_only(model, name)
    _check_ids_fit(model, name, sequences, "sequences")
    positions = _position_ids(attention_mask)
    # Only the completion needs logits; prompts are often much longer than completions.
    keep = {"logits_to_keep": steps + 1} if "logits_to_keep" in _forward_parameters(model) else {}
    logits = model(input_ids=sequences, attention_mask=attention_mask, position_ids=positions, use_cache=False,
                   **keep).logits
    return logits[:, -steps - 1:-1]


@torch.no_grad()
def score_rollouts(student, teacher, sequences: torch.Tensor, prompt_length: int, *,
                   attention_mask: Optional[torch.Tensor] = None, completion_mask: Optional[torch.Tensor] = None,
                   student_logits: Optional[torch.Tensor] = None, config: Optional[PruneConfig] = None,
                   temperature: float = 1.0, eos_token_id: TokenIds = None, pad_token_id: Optional[int] = None,
                   budget=None) -> Rollout:
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
    if isinstance(prompt_length, bool) or not isinstance(prompt_length, int) or not (
            1 <= prompt_length < sequences.shape[1]):
        raise ValueError(f"prompt_length must be an int in [1, {sequences.shape[1] - 1}] for sequences of "
                         f"shape {tuple(sequences.shape)} (at least one prompt and one completion token), "
                         f"got {prompt_length!r}")
    if student is None and student_logits is None:
        raise ValueError("pass the student model or its student_logits [B, T, V] at the completion positions")
    _check_sampling(temperature, None, None)
    config = _check_config(config)
    device = sequences.device
    eos = _check_token_ids("eos_token_id", eos_token_id, device)
    pad = None if pad_token_id is None else _resolve_pad(pad_token_id, eos)

    batch, prompt_len = sequences.shape[0], prompt_length
    prompt, completions = sequences[:, :prompt_len], sequences[:, prompt_len:]
    if attention_mask is not None and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        attention_mask = attention_mask[:, :prompt_len]
    prompt, prompt_mask = _check_prompt(prompt, attention_mask)
    steps = completions.shape[1]
    if completion_mask is None:
        if eos is None:
            completion_mask = torch.ones_like(completions, dtype=torch.bool)
        else:  # through the first EOS: count EOS ids strictly before each position
            completion_mask = (torch.isin(completions, eos).long().cumsum(-1)
                               - torch.isin(completions, eos).long()) == 0
    elif not isinstance(completion_mask, torch.Tensor) or completion_mask.shape != completions.shape:
        raise ValueError(f"completion_mask must be a bool tensor [B, T] = {tuple(completions.shape)}")
    completion_mask = completion_mask.to(device=device, dtype=torch.bool)
    if bool((completion_mask[:, 1:] & ~completion_mask[:, :-1]).any()):
        raise ValueError("completion_mask must be a prefix per row (1...1 0...0): completions are right-padded")

    full_mask = torch.cat([prompt_mask, completion_mask.long()], dim=1)
    teacher_logits = _completion_logits(teacher, "teacher", sequences, full_mask, steps)
    if student_logits is None:
        student_logits = _completion_logits(student, "student", sequences, full_mask, steps)
    elif not isinstance(student_logits, torch.Tensor) or student_logits.shape[:2] != completions.shape:
        got = tuple(student_logits.shape) if isinstance(student_logits, torch.Tensor) else type(student_logits).__name__
        raise ValueError(f"student_logits must be [B, T, V] with [B, T] = {tuple(completions.shape)}, got {got}")
    s, t = _comparable(student_logits, teacher_logits)
    beyond = (completions >= s.shape[-1]) & completion_mask
    if bool(beyond.any()):
        row, step = (int(i) for i in beyond.nonzero()[0])
        raise ValueError(f"completion token {int(completions[row, step])} (row {row}, step {step}) is beyond the "
                         f"vocabulary student and teacher share ({s.shape[-1]} ids): it cannot be scored, and the "
                         f"other generation modes never sample it")

    monitor = DriftMonitor(batch, config, device=device, budget=budget)
    stats = torch.zeros(3, batch, steps, device=device)
    _consume_chunk(monitor, s, t, completions, torch.arange(batch, device=device), temperature=temperature,
                   eos=eos, token_stats_out=stats, valid=completion_mask)
    generated = int(completion_mask.sum())
    return _record(monitor, prompt, completions, pad, tokens_generated=generated,
                   tokens_saved=generated - int(monitor.mask.sum()), teacher_forwards=1,
                   teacher_tokens=sequences.numel(), token_stats_out=stats)


# ---- 2: Hugging Face generate() -----------------------------------------------------------------
try:  # the hook is optional: everything above works without transformers installed
    from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
except ImportError:  # pragma: no cover
    LogitsProcessor = StoppingCriteria = object
    LogitsProcessorList = StoppingCriteriaList = None


class _LogitsTap:
    """Keeps the last-position logits of a model's latest forward (a forward hook)."""

    def __init__(self, model):
        self._logits = None
        self._handle = model.register_forward_hook(self._capture)

    def _capture(self, module, args, output):
        logits = output["logits"] if isinstance(output, dict) else output[0]
        self._logits = logits[:, -1]

    def take(self) -> torch.Tensor:
        logits, self._logits = self._logits, None
        if logits is None:
            raise RuntimeError("DriftLogitsProcessor ran before any forward of the student it was built for: "
                               "call generate() on the same student model that was given to PruneOPDHook")
        return logits

    def remove(self) -> None:
        self._handle.remove()


class DriftLogitsProcessor(LogitsProcessor):
    """Runs the teacher one token ahead with its own KV cache and captures the student's raw logits.

    Returns ``scores`` ``[B, V]`` unchanged (the same tensor), except when the student's vocabulary is
    larger than the teacher's: then a copy with the ids beyond the teacher's at ``-inf``, so that
    only ids both models have are sampled. Built by :class:`PruneOPDHook`.
    """

    def __init__(self, hook: "PruneOPDHook"):
        self._hook = hook

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._hook._before_sampling(input_ids)
        return self._hook._within_shared_vocab(scores)


class DriftStoppingCriteria(StoppingCriteria):
    """Steps the monitor with the token just sampled; returns the per-row stop mask ``[B]`` (bool).

    Built by :class:`PruneOPDHook`.
    """

    def __init__(self, hook: "PruneOPDHook"):
        self._hook = hook

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return self._hook._after_sampling(input_ids)


class PruneOPDHook:
    """Prune-OPD inside Hugging Face ``model.generate()``: one hook per ``generate()`` call.

    ::

        with PruneOPDHook(student, teacher, input_ids, attention_mask, config=PruneConfig(),
                          eos_token_id=eos, pad_token_id=pad, temperature=0.8) as hook:
            out = student.generate(input_ids, attention_mask=attention_mask, do_sample=True,
                                   temperature=0.8, max_new_tokens=256, eos_token_id=eos,
                                   pad_token_id=pad, **hook.generate_kwargs())
        rollout = hook.rollout(out, max_new_tokens=256)

    Each step, :class:`DriftLogitsProcessor` feeds the teacher the previous token of the rows still
    running (its own KV cache; stopped rows are dropped from it) and captures the student's logits;
    after sampling, :class:`DriftStoppingCriteria` gives the monitor the sampled token (so the fused
    step also records its log-probs and KL) and returns which rows stopped. The decisions are those
    of :func:`generate_with_pruning` with ``chunk_size=1`` on the same tokens.

    **Raw logits, whatever processors generate() configures.** ``generate()`` runs its own processors
    (repetition penalty, min-length EOS masking, bad words, ...) before a user processor, and the
    temperature / top-k / top-p warpers after it (4.45+; earlier they were a second list applied
    afterwards), so the ``scores`` a processor receives are not guaranteed raw. The processor
    therefore never reads ``scores``: a forward hook on the student keeps the logits its forward
    returned, and the step's logits are taken from there. Installed on construction, removed by
    :meth:`close` (or leaving the ``with`` block). Not supported: beam search,
    ``num_return_sequences > 1`` (repeat the prompts instead), classifier-free guidance and assisted
    decoding (they run extra student forwards within a step).

    **Stopped rows keep being decoded by HF's loop** (padding when an EOS criterion exists, real
    tokens otherwise) until every row has stopped: :meth:`rollout` masks them out
    (``Rollout.completion_mask``, see :func:`completion_mask`). The teacher is never run on them.

    The teacher's prompt forward runs on construction, so a teacher whose KV cache cannot drop rows
    is refused (TypeError naming the layer type) before ``generate()`` starts. A student with a
    larger vocabulary than the teacher's samples only ids both have (:class:`DriftLogitsProcessor`).
    For a wrapped student call ``generate()`` of the PEFT model, or of DDP's ``.module``.

    Args:
        student, teacher, input_ids, attention_mask, config, budget: as :func:`generate_with_pruning`.
        temperature: temperature of the recorded log-probs / KL (use the sampling temperature).
        eos_token_id: the ids that end a completion in ``generate()`` (default: the student's
            ``generation_config.eos_token_id``).
        pad_token_id: fills positions after each row's end in :meth:`rollout` (default: first EOS).
    """

    _UNSET = object()

    def __init__(self, student, teacher, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                 config: Optional[PruneConfig] = None, temperature: float = 1.0, eos_token_id=_UNSET,
                 pad_token_id: Optional[int] = None, budget=None):
        if LogitsProcessorList is None:  # pragma: no cover
            raise ImportError("PruneOPDHook needs transformers (pip install transformers)")
        self._prompt, self._prompt_mask = _check_prompt(input_ids, attention_mask)
        _check_sampling(temperature, None, None)
        _check_decoder_only(student, "student")
        if eos_token_id is self._UNSET:
            eos_token_id = getattr(_wrapped_attribute(student, "generation_config"), "eos_token_id", None)
        self._eos = _check_token_ids("eos_token_id", eos_token_id, self._prompt.device)
        self._pad = _resolve_pad(pad_token_id, self._eos)
        self._temperature = float(temperature)
        self.monitor = DriftMonitor(self._prompt.shape[0], _check_config(config), device=self._prompt.device,
                                    budget=budget)
        self._teacher = _CachedDecoder(teacher, "teacher")
        # The prompts are known: prefilling now refuses a teacher cache that cannot drop rows before
        # generate() starts, and gives the teacher's vocabulary for the first step's masking.
        with torch.no_grad():
            self._teacher_next = self._teacher.prefill(self._prompt, self._prompt_mask)
        self._shared_vocab = self._teacher_next.shape[-1]
        self._active = torch.arange(self._prompt.shape[0], device=self._prompt.device)
        self._step_logits = None  # (student, teacher) logits of the step being sampled, live rows only
        self._started = False
        self.logits_processor = DriftLogitsProcessor(self)
        self.stopping_criteria = DriftStoppingCriteria(self)
        # generate() of a wrapped model (PEFT, DDP's .module) runs the innermost model's forward.
        self._tap = _LogitsTap(_wrapper_chain(student)[-1])

    def generate_kwargs(self, logits_processor=None, stopping_criteria=None) -> dict:
        """``logits_processor`` / ``stopping_criteria`` for ``generate()``, after any of your own."""
        return {
            "logits_processor": LogitsProcessorList([*(logits_processor or []), self.logits_processor]),
            "stopping_criteria": StoppingCriteriaList([*(stopping_criteria or []), self.stopping_criteria]),
        }

    def close(self) -> None:
        """Removes the forward hook from the student."""
        self._tap.remove()

    def __enter__(self) -> "PruneOPDHook":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @torch.no_grad()
    def _before_sampling(self, input_ids: torch.Tensor) -> None:
        if self._step_logits is not None:
            raise RuntimeError("DriftStoppingCriteria did not run after DriftLogitsProcessor: pass both to "
                               "generate() (**hook.generate_kwargs())")
        student = self._tap.take()
        if not self._started:
            if input_ids.shape != self._prompt.shape or not torch.equal(input_ids, self._prompt):
                raise ValueError(f"generate() started from input_ids of shape {tuple(input_ids.shape)}, not the "
                                 f"{tuple(self._prompt.shape)} prompts this hook was built for: build one hook per "
                                 f"generate() call (beams / num_return_sequences > 1 are not supported)")
            teacher, self._teacher_next = self._teacher_next, None
            self._started = True
        elif self._active.numel():
            teacher = self._teacher.extend(input_ids[self._active, -1:])[:, -1]
        else:  # every row has stopped; HF may still run one more step
            return
        if student.shape[0] != self._prompt.shape[0]:
            raise RuntimeError(f"the student's forward returned {student.shape[0]} rows for a batch of "
                               f"{self._prompt.shape[0]}: beams / num_return_sequences > 1 are not supported")
        self._step_logits = _comparable(student[self._active], teacher)

    def _within_shared_vocab(self, scores: torch.Tensor) -> torch.Tensor:
        # A token the teacher has no logit for cannot be scored: sample from the shared vocabulary,
        # as generate_with_pruning does.
        if scores.shape[-1] <= self._shared_vocab:
            return scores
        scores = scores.clone()
        scores[:, self._shared_vocab:] = -math.inf
        return scores

    @torch.no_grad()
    def _after_sampling(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self._step_logits is not None:
            student, teacher = self._step_logits
            self._step_logits = None
            tokens = input_ids[self._active, -1]
            alive = _consume_token(self.monitor, student, teacher, tokens, self._active,
                                   temperature=self._temperature, eos=self._eos)
            keep = alive.nonzero().squeeze(-1)
            if keep.numel() < self._active.numel():
                self._teacher.keep_rows(keep)
                self._active = self._active[keep]
        elif self._active.numel():
            raise RuntimeError("DriftStoppingCriteria ran without DriftLogitsProcessor: pass both to generate() "
                               "(**hook.generate_kwargs())")
        return self.monitor.stopped.to(input_ids.device)

    def rollout(self, sequences, max_new_tokens: Optional[int] = None) -> Rollout:
        """The :class:`Rollout` of the ``generate()`` output (a tensor or an output with ``.sequences``).

        ``max_new_tokens`` (default: the generated width) is the reference for ``tokens_saved``.
        """
        sequences = getattr(sequences, "sequences", sequences)
        prompt_len = self._prompt.shape[1]
        steps = sequences.shape[1] - prompt_len
        if steps != self.monitor.num_steps or not torch.equal(sequences[:, :prompt_len], self._prompt):
            raise ValueError(f"sequences {tuple(sequences.shape)} are not the output of the generate() call this "
                             f"hook ran in ({self.monitor.num_steps} steps after {tuple(self._prompt.shape)} prompts)")
        return _record(self.monitor, self._prompt, sequences[:, prompt_len:], self._pad,
                       tokens_generated=sequences.shape[0] * steps,
                       tokens_saved=_tokens_saved(self.monitor, max_new_tokens or steps),
                       teacher_forwards=self._teacher.forwards, teacher_tokens=self._teacher.token_rows)


def generate_hf_with_pruning(student, teacher, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                             *, config: Optional[PruneConfig] = None, budget=None, **generate_kwargs) -> Rollout:
    """``student.generate(input_ids, attention_mask=..., **generate_kwargs)`` with a :class:`PruneOPDHook`.

    EOS / padding / temperature come from ``generate_kwargs``, else the ``generation_config`` given in
    them or the student's, as ``generate()`` itself resolves them; ``logits_processor`` / ``stopping_criteria`` you pass run
    alongside the hook's.
    """
    for name in ("num_beams", "num_return_sequences"):
        if generate_kwargs.get(name, 1) != 1:
            raise ValueError(f"{name}={generate_kwargs[name]} is not supported with Prune-OPD: repeat the prompts "
                             f"(input_ids.repeat_interleave(n, 0)) for several samples per prompt")
    for name in ("guidance_scale", "assistant_model", "prompt_lookup_num_tokens"):
        if generate_kwargs.get(name) is not None:
            raise ValueError(f"{name} is not supported with Prune-OPD (it runs extra student forwards per step)")
    generate = _wrapped_attribute(student, "generate")  # a PEFT model's own; DDP and FSDP have none
    if generate is None:
        raise TypeError(f"the student ({type(student).__name__}) has no generate() method")
    defaults = generate_kwargs.get("generation_config") or _wrapped_attribute(student, "generation_config")
    eos = generate_kwargs.pop("eos_token_id", defaults.eos_token_id)
    eos_ids = _check_token_ids("eos_token_id", eos, input_ids.device)
    pad = generate_kwargs.pop("pad_token_id", defaults.pad_token_id)
    pad = _resolve_pad(pad, eos_ids)
    do_sample = generate_kwargs.get("do_sample", defaults.do_sample)
    temperature = generate_kwargs.get("temperature", defaults.temperature) if do_sample else 1.0
    user_processors = generate_kwargs.pop("logits_processor", None)
    user_criteria = generate_kwargs.pop("stopping_criteria", None)
    if eos is not None:
        generate_kwargs["eos_token_id"] = eos
    with PruneOPDHook(student, teacher, input_ids, attention_mask, config=config, temperature=temperature or 1.0,
                      eos_token_id=eos, pad_token_id=pad, budget=budget) as hook:
        out = generate(input_ids, attention_mask=attention_mask, pad_token_id=pad,
                       **hook.generate_kwargs(user_processors, user_criteria), **generate_kwargs)
    return hook.rollout(out, max_new_tokens=generate_kwargs.get("max_new_tokens"))
