"""Prune-OPD inside a served rollout engine (vLLM, SGLang): drifted requests stop between chunks.

Engines decode a request to its end before anyone sees it; a teacher is asked to score it after.
Here the student's requests are decoded in chunks of ``chunk_tokens``: after each chunk the engine's
own top-k log-probs of the sampled positions (``logprobs=k`` in vLLM, ``top_logprobs_num=k`` in
SGLang) and the teacher's prompt top-k over the same positions (one prefill of the sequence so far,
``prompt_logprobs=k``) give the top-k overlap per token (:func:`opd_ext.served.topk_overlap_between`);
a :class:`~opd_ext.prune.DriftMonitor` consumes the chunk (``observe``, the same scan as every other
mode) and requests it stops are not continued. The engine spends at most ``chunk_tokens - 1`` decode
steps past a stop; everything after it is saved (docs/generation.md, "Served engines").

Engines plug in through two small protocols, :class:`StudentEngine` and :class:`TeacherEngine`;
:class:`VLLMEngine` and :class:`SGLangEngine` adapt vLLM's offline ``LLM.generate`` and SGLang's
``Engine.generate`` (the same request and response fields their HTTP servers use).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional, Protocol

import torch

from opd_ext.prune import DriftMonitor, PruneConfig, StopReason
from opd_ext.served import topk_overlap_between


class SampledChunk(NamedTuple):
    """One request's chunk from the student engine."""

    token_ids: list[int]  # the sampled ids, in order
    topk_ids: list[list[int]]  # per sampled token: the ids of the engine's top-k at that position
    finished: bool  # the request ended by itself (EOS, a stop string): no further chunk


class StudentEngine(Protocol):
    def sample_chunk(self, sequences: Sequence[Sequence[int]], max_tokens: int, k: int) -> list[SampledChunk]:
        """Continue each sequence by up to ``max_tokens`` sampled tokens, with each position's top-k ids."""


class TeacherEngine(Protocol):
    def prompt_topk_ids(
        self, sequences: Sequence[Sequence[int]], starts: Sequence[int], k: int
    ) -> list[list[list[int]]]:
        """For each sequence, the teacher's top-k ids at the positions that predict tokens
        ``starts[i]:`` of it (one list of ids per such token)."""


@dataclass
class ServedRollout:
    """Requests decoded by :func:`generate_served_with_pruning`.

    ``completions[i]`` holds request i's kept tokens (cut at its stop); ``overlaps[i]`` and
    ``multipliers[i]`` the per-token top-k overlap and Prune-OPD loss multiplier of those tokens.
    ``decode_steps[i]`` counts every token the student engine generated for it, the ones after a
    stop within its last chunk included; ``teacher_calls`` the teacher prefills (one per active
    request per chunk).
    """

    completions: list[list[int]]
    overlaps: list[list[float]]
    multipliers: list[list[float]]
    stop_reasons: list[str]
    decode_steps: list[int]
    teacher_calls: int
    chunks: int
    config: PruneConfig = field(repr=False)

    @property
    def tokens_generated(self) -> int:
        return sum(self.decode_steps)

    @property
    def tokens_kept(self) -> int:
        return sum(len(c) for c in self.completions)

    def pruned(self) -> list[bool]:
        """Whether each request was stopped by Prune-OPD (drift, budget or repetition)."""
        return [r not in ("eos", "max_length") for r in self.stop_reasons]


def generate_served_with_pruning(
    student: StudentEngine,
    teacher: TeacherEngine,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    chunk_tokens: int = 32,
    config: Optional[PruneConfig] = None,
    on_chunk: Optional[Callable[[int, int], Any]] = None,
) -> ServedRollout:
    """Decode ``prompts`` on a served student in chunks, stopping drifted requests between chunks.

    Args:
        student: a :class:`StudentEngine` (e.g. :class:`VLLMEngine` over ``vllm.LLM``).
        teacher: a :class:`TeacherEngine` over the teacher's server, same tokenizer.
        prompts: token ids per request.
        max_new_tokens: completion cap per request.
        chunk_tokens: decode steps between drift checks; 1 checks every token (most teacher calls,
            no wasted steps), larger values trade up to ``chunk_tokens - 1`` wasted steps per stopped
            request for fewer teacher prefills.
        config: the :class:`~opd_ext.PruneConfig`; its ``k`` sets the top-k both engines return.
            ``None``: ``PruneConfig()`` (the authors' settings).
        on_chunk: called as ``on_chunk(chunk_index, active_requests)`` after each chunk (progress).

    Returns:
        A :class:`ServedRollout`.

    Raises:
        ValueError: empty prompts, ``max_new_tokens`` or ``chunk_tokens`` below 1, an engine returning
        a different number of requests or top-k lists than asked.
    """
    config = PruneConfig() if config is None else config
    config.validate()
    if max_new_tokens < 1 or chunk_tokens < 1:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) and chunk_tokens ({chunk_tokens}) must be at least 1")
    if len(prompts) == 0 or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    n, k = len(prompts), config.k
    monitor = DriftMonitor(n, config)
    completions: list[list[int]] = [[] for _ in range(n)]
    overlaps: list[list[float]] = [[] for _ in range(n)]
    multipliers: list[list[float]] = [[] for _ in range(n)]
    decode_steps = [0] * n
    ended_by = ["max_length"] * n  # how a request that Prune-OPD did not stop ended
    active = list(range(n))
    teacher_calls = chunks = 0
    while active:
        remaining = [max_new_tokens - len(completions[i]) for i in active]
        size = min(chunk_tokens, max(remaining))
        sequences = [list(prompts[i]) + completions[i] for i in active]
        sampled = student.sample_chunk(sequences, size, k)
        _check_count("the student engine", sampled, len(active))
        # A request may get fewer tokens than asked (EOS, its own cap): pad the chunk to one width.
        lengths = [min(len(c.token_ids), r) for c, r in zip(sampled, remaining)]
        width = max(lengths, default=0)
        finished = [
            c.finished or len(completions[i]) + length >= max_new_tokens
            for c, i, length in zip(sampled, active, lengths)
        ]
        for c, i, length in zip(sampled, active, lengths):
            ended_by[i] = "eos" if c.finished and length == len(c.token_ids) else "max_length"
        if width == 0:
            monitor.finish(torch.tensor(active))
            break
        scored = [seq + c.token_ids[:length] for seq, c, length in zip(sequences, sampled, lengths)]
        teacher_ids = teacher.prompt_topk_ids(scored, [len(s) for s in sequences], k)
        _check_count("the teacher engine", teacher_ids, len(active))
        teacher_calls += len(active)
        chunks += 1
        student_topk = torch.zeros(len(active), width, k, dtype=torch.int64)
        teacher_topk = torch.zeros(len(active), width, k, dtype=torch.int64)
        slot_mask_s = torch.zeros(len(active), width, k, dtype=torch.bool)
        slot_mask_t = torch.zeros(len(active), width, k, dtype=torch.bool)
        tokens = torch.zeros(len(active), width, dtype=torch.int64)
        mask = torch.zeros(len(active), width, dtype=torch.bool)
        for a, (c, t, length) in enumerate(zip(sampled, teacher_ids, lengths)):
            if len(c.topk_ids) < length or len(t) < length:
                raise ValueError(
                    f"request {active[a]}: {length} sampled tokens but {len(c.topk_ids)} student and {len(t)} "
                    f"teacher top-k lists; both engines must return one per sampled position"
                )
            tokens[a, :length] = torch.tensor(c.token_ids[:length])
            mask[a, :length] = True
            for j in range(length):
                _fill(student_topk[a, j], slot_mask_s[a, j], c.topk_ids[j], k)
                _fill(teacher_topk[a, j], slot_mask_t[a, j], t[j], k)
        overlap = topk_overlap_between(student_topk, teacher_topk, slot_mask_s, slot_mask_t, mask=mask)
        overlap = torch.where(mask, overlap.nan_to_num(0.0), 0.0)
        rows = torch.tensor(active)
        stops = monitor.observe(overlap, mask, rows=rows, tokens=tokens)
        for a, i in enumerate(active):
            # What the engine decoded, including tokens past the request's own cap (a chunk asks every
            # request for the longest remaining length) and past a stop within the chunk.
            decode_steps[i] += len(sampled[a].token_ids)
            keep = lengths[a] if stops[a] < 0 else int(stops[a]) + 1
            completions[i] += tokens[a, :keep].tolist()
        done = {i for a, i in enumerate(active) if stops[a] >= 0 or finished[a]}
        ended = [i for a, i in enumerate(active) if finished[a] and stops[a] < 0]
        if ended:
            monitor.finish(torch.tensor(ended))
        active = [i for i in active if i not in done]
        if on_chunk is not None:
            on_chunk(chunks, len(active))
    # The monitor's per-token history holds exactly the kept tokens of each request, in order.
    if monitor.num_steps:
        kept = monitor.mask
        for i in range(n):
            overlaps[i] = monitor.overlaps[i][kept[i]].tolist()
            multipliers[i] = monitor.multipliers[i][kept[i]].tolist()
    reasons = [
        StopReason.NAMES[code] if code in StopReason.PRUNED else ended_by[i]
        for i, code in enumerate(monitor.stop_reasons.tolist())
    ]
    return ServedRollout(completions, overlaps, multipliers, reasons, decode_steps, teacher_calls, chunks, config)


def _fill(ids_out: torch.Tensor, mask_out: torch.Tensor, ids: Sequence[int], k: int) -> None:
    m = min(len(ids), k)
    if m:
        ids_out[:m] = torch.tensor(list(ids[:m]))
        mask_out[:m] = True


def _check_count(who: str, got, want: int) -> None:
    if len(got) != want:
        raise ValueError(f"{who} returned {len(got)} results for {want} requests")


# ---- adapters --------------------------------------------------------------------------------------


def _prefix_seed(seed: int, sequence: Sequence[int]) -> int:
    """A seed from ``seed`` and the token ids so far (FNV-1a over them), stable across processes."""
    h = 0xCBF29CE484222325 ^ (seed & 0xFFFFFFFFFFFFFFFF)
    for token in sequence:
        h = ((h ^ (int(token) & 0xFFFFFFFF)) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFF


def _stop_ids(eos_token_id) -> frozenset:
    if eos_token_id is None:
        return frozenset()
    return frozenset([int(eos_token_id)] if isinstance(eos_token_id, int) else (int(i) for i in eos_token_id))


def _finished(token_ids: Sequence[int], reported_stop: bool, stop_ids: frozenset) -> bool:
    """Whether a chunk ended its request: the engine says so, or its last token is a stop id. The
    second matters when the EOS is the chunk's last token: engines that check the length cap before
    EOS (SGLang, older vLLM V1) then report "length", and the request would be continued past it."""
    return reported_stop or (len(token_ids) > 0 and int(token_ids[-1]) in stop_ids)


def _ranked_ids(entry: dict, k: int) -> list[int]:
    """The k best ids of one vLLM logprobs dict (``{id: Logprob(logprob, rank, decoded_token)}``,
    k entries plus the sampled token when it ranks below k), by rank."""
    ranked = sorted(entry.items(), key=lambda item: item[1].rank)
    return [int(i) for i, lp in ranked if lp.rank is not None and lp.rank <= k][:k]


class VLLMEngine:
    """vLLM's offline engine (``vllm.LLM``) as a student and/or teacher engine.

    The student side calls ``llm.generate(prompts=[{"prompt_token_ids": ...}], SamplingParams(
    max_tokens=chunk, logprobs=k, temperature=..., seed=...))`` and reads each
    ``CompletionOutput``'s ``token_ids``, ``logprobs`` and ``finish_reason``; the teacher side asks
    ``SamplingParams(max_tokens=1, prompt_logprobs=k)`` and reads ``RequestOutput.prompt_logprobs``.

    Args:
        llm: a ``vllm.LLM`` (or anything with its ``generate``).
        temperature, top_p, seed: sampling settings of the student's chunks. With a ``seed``, each
            chunk's seed is derived from it and the sequence so far, so a request's tokens do not
            depend on which other requests share the batch (a pruned and an unpruned run decode the
            same tokens until the stop).
        eos_token_id: the id (or ids) that end a request; a chunk whose last token is one ends it
            even when the engine reports ``"length"`` (the EOS fell on the chunk's last step, and
            some engine versions check the length cap first).
        sampling_params: the ``SamplingParams`` class (default ``vllm.SamplingParams``).
    """

    def __init__(
        self,
        llm,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: Optional[int] = None,
        eos_token_id=None,
        sampling_params=None,
    ):
        if sampling_params is None:
            from vllm import SamplingParams as sampling_params  # noqa: N813
        self.llm, self.params = llm, sampling_params
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.stop_ids = _stop_ids(eos_token_id)

    def _prompts(self, sequences):
        return [{"prompt_token_ids": list(s)} for s in sequences]

    def sample_chunk(self, sequences, max_tokens, k):
        params = [
            self.params(
                max_tokens=max_tokens,
                logprobs=k,
                temperature=self.temperature,
                top_p=self.top_p,
                seed=None if self.seed is None else _prefix_seed(self.seed, s),
            )
            for s in sequences
        ]
        outputs = self.llm.generate(self._prompts(sequences), params, use_tqdm=False)
        chunks = []
        for out in outputs:
            completion = out.outputs[0]
            topk = [_ranked_ids(entry, k) for entry in (completion.logprobs or [])]
            tokens = list(completion.token_ids)
            chunks.append(
                SampledChunk(tokens, topk, _finished(tokens, completion.finish_reason == "stop", self.stop_ids))
            )
        return chunks

    def prompt_topk_ids(self, sequences, starts, k):
        params = self.params(max_tokens=1, prompt_logprobs=k, temperature=1.0)
        outputs = self.llm.generate(self._prompts(sequences), params, use_tqdm=False)
        # prompt_logprobs[p] scores token p (None for p = 0): the positions that predict tokens
        # start: are entries start: of it.
        return [[_ranked_ids(entry, k) for entry in out.prompt_logprobs[start:]] for out, start in zip(outputs, starts)]


class SGLangEngine:
    """SGLang's engine (``sglang.Engine``, or its HTTP ``/generate`` through a callable with the same
    arguments) as a student and/or teacher engine.

    The student side calls ``engine.generate(input_ids=[...], sampling_params={"max_new_tokens": chunk,
    "temperature": ...}, return_logprob=True, top_logprobs_num=k)`` and reads ``output_ids`` and
    ``meta_info["output_top_logprobs"]`` (per token, ``(logprob, token_id, text)`` best first) and
    ``meta_info["finish_reason"]``; the teacher side asks, in one call for all sequences,
    ``max_new_tokens=0`` with a per-request ``logprob_start_len`` and reads
    ``meta_info["input_top_logprobs"]``. ``eos_token_id`` as in :class:`VLLMEngine`.
    """

    def __init__(self, engine, *, temperature: float = 1.0, top_p: float = 1.0, eos_token_id=None):
        self.engine, self.temperature, self.top_p = engine, temperature, top_p
        self.stop_ids = _stop_ids(eos_token_id)

    def sample_chunk(self, sequences, max_tokens, k):
        params = {"max_new_tokens": max_tokens, "temperature": self.temperature, "top_p": self.top_p}
        responses = self.engine.generate(
            input_ids=[list(s) for s in sequences], sampling_params=params, return_logprob=True, top_logprobs_num=k
        )
        chunks = []
        for r in responses:
            meta = r["meta_info"]
            topk = [[int(e[1]) for e in entries[:k]] for entries in meta["output_top_logprobs"]]
            reason = meta.get("finish_reason") or {}
            tokens = list(r["output_ids"])
            chunks.append(SampledChunk(tokens, topk, _finished(tokens, reason.get("type") == "stop", self.stop_ids)))
        return chunks

    def prompt_topk_ids(self, sequences, starts, k):
        responses = self.engine.generate(
            input_ids=[list(s) for s in sequences],
            sampling_params={"max_new_tokens": 0},
            return_logprob=True,
            top_logprobs_num=k,
            logprob_start_len=[start - 1 for start in starts],
        )
        # input_top_logprobs[j] (from logprob_start_len) scores token start - 1 + j; the entry of the
        # first listed token is None. Position p predicts token p + 1: tokens start: are scored by
        # entries 1: here.
        return [
            [[int(e[1]) for e in (row or [])[:k]] for row in r["meta_info"]["input_top_logprobs"][1:]]
            for r in responses
        ]
