"""Prune-OPD during generation: stop drifted rollouts inside the batch, so the saved compute is real.

A :class:`~opd_ext.prune.DriftMonitor` decides, token by token, when a rollout has drifted away
from what the teacher can supervise. This module runs it over student rollouts five ways; four
return the same :class:`Rollout` record (sequences, completion mask, per-token multipliers,
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
* :func:`generate_served_with_pruning`: inside a served engine (vLLM, SGLang): the student's
  requests are decoded in chunks, the overlap comes from the two engines' top-k id lists, drifted
  requests are not continued (:mod:`opd_ext.generation.served`).
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

from opd_ext.generation.decode import generate_with_pruning, score_rollouts
from opd_ext.generation.hf import (
    DriftLogitsProcessor,
    DriftStoppingCriteria,
    PruneOPDHook,
    generate_hf_with_pruning,
)
from opd_ext.generation.rollout import Rollout, completion_mask, sample_tokens
from opd_ext.generation.served import (
    SampledChunk,
    ServedRollout,
    SGLangEngine,
    VLLMEngine,
    generate_served_with_pruning,
)

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
    "generate_served_with_pruning",
    "ServedRollout",
    "SampledChunk",
    "VLLMEngine",
    "SGLangEngine",
]
