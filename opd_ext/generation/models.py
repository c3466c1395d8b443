"""Model plumbing for decoding with Prune-OPD: wrapped models (PEFT, DDP, FSDP, ``torch.compile``),
their forward signatures and positions, transformers KV caches that drop batch rows exactly, and
a causal LM decoding a shrinking batch. Nothing here knows about drift.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch

from opd_ext._validation import LOGIT_DTYPES, is_supported_dtype_pair
from opd_ext.losses import align_vocab


def shared_vocab_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor):
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


def wrapper_chain(model) -> list:
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
        inner = (
            get_base_model()
            if callable(get_base_model)
            else (getattr(current, "module", None) or getattr(current, "_orig_mod", None))
        )
        if not isinstance(inner, torch.nn.Module) or any(inner is seen for seen in chain):
            return chain
        chain.append(inner)


def wrapped_attribute(model, name: str):
    """``name`` of the outermost module in ``model``'s wrapper chain that has it, else None."""
    return next((getattr(m, name) for m in wrapper_chain(model) if getattr(m, name, None) is not None), None)


def forward_parameters(model):
    return inspect.signature(wrapper_chain(model)[-1].forward).parameters


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """int64 positions counting only real tokens: left padding must not shift a row's positions (as
    ``generate()`` numbers them)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def check_decoder_only(model, name: str) -> None:
    config = getattr(wrapper_chain(model)[-1], "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{name} is an encoder-decoder model ({type(wrapper_chain(model)[-1]).__name__}); "
            f"generation with Prune-OPD needs decoder-only causal LMs"
        )


def vocab_rows(model) -> Optional[int]:
    """Rows of the model's input embedding (the ids it can read), or None if it does not say."""
    try:
        embedding = wrapper_chain(model)[-1].get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    rows = getattr(embedding, "num_embeddings", None)
    return rows if isinstance(rows, int) else None


def check_ids_fit(model, name: str, ids: torch.Tensor, what: str) -> None:
    rows = vocab_rows(model)
    if rows is not None and ids.numel() and int(ids.max()) >= rows:
        raise ValueError(f"{what} hold token id {int(ids.max())}, beyond the {name}'s vocabulary of {rows} ids")


try:  # the cache classes differ between transformers versions: each is looked up on its own
    from transformers import cache_utils as _cache_utils
except ImportError:  # pragma: no cover
    _cache_utils = None
_Cache = getattr(_cache_utils, "Cache", None)
_EncoderDecoderCache = getattr(_cache_utils, "EncoderDecoderCache", None)
_RequantizingLayer = getattr(_cache_utils, "QuantizedLayer", None)  # quanto / HQQ, transformers >= 4.56


def row_method(obj):
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


def row_selection(cache, name: str) -> list:
    """Callables that together keep the given rows (int64 indices) of every state in ``cache``.

    Raises TypeError, naming the layer type, for a cache that cannot drop rows exactly.
    """
    if _EncoderDecoderCache is not None and isinstance(cache, _EncoderDecoderCache):
        return row_selection(cache.self_attention_cache, name) + row_selection(cache.cross_attention_cache, name)
    if _Cache is None or not isinstance(cache, _Cache):
        # Legacy tuples, and the hybrid models' own caches before transformers 5 (LFM2's cannot
        # reorder its empty per-layer placeholders).
        raise TypeError(
            f"{name}'s KV cache ({type(cache).__name__}) is not a transformers Cache, so its rows cannot "
            f"be dropped: generation needs a Cache (DynamicCache, the default of transformers >= 4.50; "
            f"hybrid linear-attention models use it from transformers 5 on)"
        )
    method, owner = row_method(cache)
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
                f"(DynamicCache) or QuantizedCache(backend='fp8')"
            )
        method, _ = row_method(layer)
        if method is None:
            raise TypeError(
                f"{name}'s KV cache layer {index} ({type(layer).__name__}) has no way to drop batch rows "
                f"(neither reorder_cache nor batch_select_indices); use a DynamicCache"
            )
        selection.append(method)
    return selection


class CachedDecoder:
    """One causal LM decoding a shrinking batch incrementally: its KV cache, 2-D attention mask and
    next position per row, with rows removable between calls. Counts calls and token rows."""

    def __init__(self, model, name: str):
        check_decoder_only(model, name)
        self.model = model
        self.name = name
        params = forward_parameters(model)
        # transformers 5.x renamed the cache argument (and output) from past_key_values to cache.
        self._cache_key = "cache" if "cache" in params else "past_key_values"
        self._keep_last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.cache = None
        self.attention_mask = None
        self.next_position = None
        self.forwards = 0
        self.token_rows = 0

    def _run(self, input_ids, position_ids, **extra):
        out = self.model(
            input_ids=input_ids,
            attention_mask=self.attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self._cache_key: self.cache},
            **extra,
        )
        self.cache = out[self._cache_key] if self._cache_key in out.keys() else None
        if self.cache is None:
            raise RuntimeError(
                f"{self.name} returned no KV cache (as {self._cache_key!r}); "
                f"generation needs a decoder that supports use_cache=True"
            )
        self.forwards += 1
        self.token_rows += input_ids.numel()
        return out.logits

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Runs the (left-padded) prompts; returns the logits of each row's next token ``[B, V]``."""
        check_ids_fit(self.model, self.name, input_ids, "input_ids")
        self.cache = None
        self.attention_mask = attention_mask
        positions = position_ids(attention_mask)
        logits = self._run(input_ids, positions, **self._keep_last)
        self.next_position = positions[:, -1] + 1
        row_selection(self.cache, self.name)  # a cache that cannot drop rows fails before any token is sampled
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
        for keep in row_selection(self.cache, self.name):
            keep(rows)
        self.attention_mask = self.attention_mask[rows]
        self.next_position = self.next_position[rows]


def completion_logits(
    model, name: str, sequences: torch.Tensor, attention_mask: torch.Tensor, steps: int
) -> torch.Tensor:
    """``[B, steps, V]``: the logits that predicted the last ``steps`` tokens (one forward, no cache)."""
    check_decoder_only(model, name)
    check_ids_fit(model, name, sequences, "sequences")
    positions = position_ids(attention_mask)
    # Only the completion needs logits; prompts are often much longer than completions.
    keep = {"logits_to_keep": steps + 1} if "logits_to_keep" in forward_parameters(model) else {}
    logits = model(
        input_ids=sequences, attention_mask=attention_mask, position_ids=positions, use_cache=False, **keep
    ).logits
    return logits[:, -steps - 1 : -1]
