"""Prune-OPD inside Hugging Face ``model.generate()``: a ``LogitsProcessor`` that runs the teacher
and a ``StoppingCriteria`` that steps the monitor."""

from __future__ import annotations

import math
from typing import Optional

import torch

from opd_ext.generation.models import (
    CachedDecoder,
    check_decoder_only,
    shared_vocab_logits,
    wrapped_attribute,
    wrapper_chain,
)
from opd_ext.generation.rollout import (
    Rollout,
    check_config,
    check_prompt,
    check_sampling,
    check_token_ids,
    consume_token,
    record,
    resolve_pad,
    tokens_saved,
)
from opd_ext.prune import DriftMonitor, PruneConfig

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
            raise RuntimeError(
                "DriftLogitsProcessor ran before any forward of the student it was built for: "
                "call generate() on the same student model that was given to PruneOPDHook"
            )
        return logits

    def remove(self) -> None:
        self._handle.remove()


class DriftLogitsProcessor(LogitsProcessor):
    """Runs the teacher one token ahead with its own KV cache and captures the student's raw logits.

    Returns ``scores`` ``[B, V]`` unchanged (the same tensor), except when the student's vocabulary is
    larger than the teacher's: then a copy with the ids beyond the teacher's at ``-inf``, so that
    only ids both models have are sampled. Built by :class:`PruneOPDHook`.
    """

    def __init__(self, hook: PruneOPDHook):
        self._hook = hook

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._hook._before_sampling(input_ids)
        return self._hook._within_shared_vocab(scores)


class DriftStoppingCriteria(StoppingCriteria):
    """Steps the monitor with the token just sampled; returns the per-row stop mask ``[B]`` (bool).

    Built by :class:`PruneOPDHook`.
    """

    def __init__(self, hook: PruneOPDHook):
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

    def __init__(
        self,
        student,
        teacher,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        *,
        config: Optional[PruneConfig] = None,
        temperature: float = 1.0,
        eos_token_id=_UNSET,
        pad_token_id: Optional[int] = None,
        budget=None,
    ):
        if LogitsProcessorList is None:  # pragma: no cover
            raise ImportError("PruneOPDHook needs transformers (pip install transformers)")
        self._prompt, self._prompt_mask = check_prompt(input_ids, attention_mask)
        check_sampling(temperature, None, None)
        check_decoder_only(student, "student")
        if eos_token_id is self._UNSET:
            eos_token_id = getattr(wrapped_attribute(student, "generation_config"), "eos_token_id", None)
        self._eos = check_token_ids("eos_token_id", eos_token_id, self._prompt.device)
        self._pad = resolve_pad(pad_token_id, self._eos)
        self._temperature = float(temperature)
        self.monitor = DriftMonitor(
            self._prompt.shape[0], check_config(config), device=self._prompt.device, budget=budget
        )
        self._teacher = CachedDecoder(teacher, "teacher")
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
        self._tap = _LogitsTap(wrapper_chain(student)[-1])

    def generate_kwargs(self, logits_processor=None, stopping_criteria=None) -> dict:
        """``logits_processor`` / ``stopping_criteria`` for ``generate()``, after any of your own."""
        return {
            "logits_processor": LogitsProcessorList([*(logits_processor or []), self.logits_processor]),
            "stopping_criteria": StoppingCriteriaList([*(stopping_criteria or []), self.stopping_criteria]),
        }

    def close(self) -> None:
        """Removes the forward hook from the student."""
        self._tap.remove()

    def __enter__(self) -> PruneOPDHook:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @torch.no_grad()
    def _before_sampling(self, input_ids: torch.Tensor) -> None:
        if self._step_logits is not None:
            raise RuntimeError(
                "DriftStoppingCriteria did not run after DriftLogitsProcessor: pass both to "
                "generate() (**hook.generate_kwargs())"
            )
        student = self._tap.take()
        if not self._started:
            if input_ids.shape != self._prompt.shape or not torch.equal(input_ids, self._prompt):
                rows, prompts = input_ids.shape[0], self._prompt.shape[0]
                if rows != prompts and rows % prompts == 0:
                    raise ValueError(
                        f"generate() expanded the {prompts} prompts to {rows} rows: num_beams or "
                        f"num_return_sequences is {rows // prompts} (in the generate() call or the model's "
                        f"generation_config); Prune-OPD needs num_beams=1 and num_return_sequences=1: repeat "
                        f"the prompts (input_ids.repeat_interleave(n, 0)) for several samples per prompt"
                    )
                raise ValueError(
                    f"generate() started from input_ids of shape {tuple(input_ids.shape)}, not the "
                    f"{tuple(self._prompt.shape)} prompts this hook was built for: build one hook per "
                    f"generate() call"
                )
            teacher, self._teacher_next = self._teacher_next, None
            self._started = True
        elif self._active.numel():
            teacher = self._teacher.extend(input_ids[self._active, -1:])[:, -1]
        else:  # every row has stopped; HF may still run one more step
            return
        if student.shape[0] != self._prompt.shape[0]:
            raise RuntimeError(
                f"the student's forward returned {student.shape[0]} rows for a batch of "
                f"{self._prompt.shape[0]}: beams / num_return_sequences > 1 are not supported"
            )
        self._step_logits = shared_vocab_logits(student[self._active], teacher)

    def _within_shared_vocab(self, scores: torch.Tensor) -> torch.Tensor:
        # A token the teacher has no logit for cannot be scored: sample from the shared vocabulary,
        # as generate_with_pruning does.
        if scores.shape[-1] <= self._shared_vocab:
            return scores
        scores = scores.clone()
        scores[:, self._shared_vocab :] = -math.inf
        return scores

    @torch.no_grad()
    def _after_sampling(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self._step_logits is not None:
            student, teacher = self._step_logits
            self._step_logits = None
            tokens = input_ids[self._active, -1]
            alive = consume_token(
                self.monitor, student, teacher, tokens, self._active, temperature=self._temperature, eos=self._eos
            )
            keep = alive.nonzero().squeeze(-1)
            if keep.numel() < self._active.numel():
                self._teacher.keep_rows(keep)
                self._active = self._active[keep]
        elif self._active.numel():
            raise RuntimeError(
                "DriftStoppingCriteria ran without DriftLogitsProcessor: pass both to generate() "
                "(**hook.generate_kwargs())"
            )
        return self.monitor.stopped.to(input_ids.device)

    def rollout(self, sequences, max_new_tokens: Optional[int] = None) -> Rollout:
        """The :class:`Rollout` of the ``generate()`` output (a tensor or an output with ``.sequences``).

        ``max_new_tokens`` (default: the generated width) is the reference for ``tokens_saved``.
        """
        sequences = getattr(sequences, "sequences", sequences)
        prompt_len = self._prompt.shape[1]
        steps = sequences.shape[1] - prompt_len
        if steps != self.monitor.num_steps or not torch.equal(sequences[:, :prompt_len], self._prompt):
            raise ValueError(
                f"sequences {tuple(sequences.shape)} are not the output of the generate() call this "
                f"hook ran in ({self.monitor.num_steps} steps after {tuple(self._prompt.shape)} prompts)"
            )
        return record(
            self.monitor,
            self._prompt,
            sequences[:, prompt_len:],
            self._pad,
            tokens_generated=sequences.shape[0] * steps,
            tokens_saved=tokens_saved(self.monitor, max_new_tokens or steps),
            teacher_forwards=self._teacher.forwards,
            teacher_tokens=self._teacher.token_rows,
        )


def generate_hf_with_pruning(
    student,
    teacher,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    *,
    config: Optional[PruneConfig] = None,
    budget=None,
    **generate_kwargs,
) -> Rollout:
    """``student.generate(input_ids, attention_mask=..., **generate_kwargs)`` with a :class:`PruneOPDHook`.

    EOS / padding / temperature come from ``generate_kwargs``, else the ``generation_config`` given in
    them or the student's, as ``generate()`` itself resolves them; ``logits_processor`` /
    ``stopping_criteria`` you pass run alongside the hook's.
    """
    for name in ("num_beams", "num_return_sequences"):
        if generate_kwargs.get(name, 1) != 1:
            raise ValueError(
                f"{name}={generate_kwargs[name]} is not supported with Prune-OPD: repeat the prompts "
                f"(input_ids.repeat_interleave(n, 0)) for several samples per prompt"
            )
    for name in ("guidance_scale", "assistant_model", "prompt_lookup_num_tokens"):
        if generate_kwargs.get(name) is not None:
            raise ValueError(f"{name} is not supported with Prune-OPD (it runs extra student forwards per step)")
    generate = wrapped_attribute(student, "generate")  # a PEFT model's own; DDP and FSDP have none
    if generate is None:
        raise TypeError(f"the student ({type(student).__name__}) has no generate() method")
    defaults = generate_kwargs.get("generation_config") or wrapped_attribute(student, "generation_config")
    # generate() takes these from the generation config too: refuse them there by name as well.
    for name in ("num_beams", "num_return_sequences"):
        value = getattr(defaults, name, 1) if name not in generate_kwargs else 1
        if value not in (None, 1):
            where = "generation_config" if "generation_config" in generate_kwargs else "the student's generation_config"
            raise ValueError(
                f"{where}.{name}={value} is not supported with Prune-OPD: pass {name}=1 (or set it in the "
                f"generation config) and repeat the prompts for several samples per prompt"
            )
    eos = generate_kwargs.pop("eos_token_id", defaults.eos_token_id)
    eos_ids = check_token_ids("eos_token_id", eos, input_ids.device)
    pad = generate_kwargs.pop("pad_token_id", defaults.pad_token_id)
    pad = resolve_pad(pad, eos_ids)
    do_sample = generate_kwargs.get("do_sample", defaults.do_sample)
    temperature = generate_kwargs.get("temperature", defaults.temperature) if do_sample else 1.0
    user_processors = generate_kwargs.pop("logits_processor", None)
    user_criteria = generate_kwargs.pop("stopping_criteria", None)
    if eos is not None:
        generate_kwargs["eos_token_id"] = eos
    with PruneOPDHook(
        student,
        teacher,
        input_ids,
        attention_mask,
        config=config,
        temperature=temperature or 1.0,
        eos_token_id=eos,
        pad_token_id=pad,
        budget=budget,
    ) as hook:
        out = generate(
            input_ids,
            attention_mask=attention_mask,
            pad_token_id=pad,
            **hook.generate_kwargs(user_processors, user_criteria),
            **generate_kwargs,
        )
    return hook.rollout(out, max_new_tokens=generate_kwargs.get("max_new_tokens"))
