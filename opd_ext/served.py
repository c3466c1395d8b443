"""Teachers behind an inference server (vLLM, SGLang): their prompt log-probs as the tensors the
sparse-teacher functions take (:mod:`opd_ext.sparse_teacher`: the losses, the top-k overlap against a
served top-k for Prune-OPD drift tracking, and the per-token statistics for trainers that own their
policy-gradient loss; the last two are also exported here as :func:`topk_overlap` and
:func:`sparse_teacher_stats`, with :func:`topk_overlap_between` for two served id lists).

A served teacher scores a rollout as a prompt: send prompt + completion, ask for the top-k
log-probs of every prompt position and generate one token.

* vLLM: ``SamplingParams(max_tokens=1, prompt_logprobs=k)``; pass the ``RequestOutput`` (or a list
  of them) to :func:`from_vllm_prompt_logprobs`.
* SGLang: ``return_logprob=True, top_logprobs_num=k, logprob_start_len=0``, ``max_new_tokens=1``;
  pass the response (or its ``meta_info``, or a list of them) to
  :func:`from_sglang_input_top_logprobs`.

Alignment. Entry ``t`` of a server's list scores token ``t`` of the sequence it was sent, from the
teacher's distribution given the tokens before it: the distribution the student's logits at
position ``t - 1`` predict. The converters take the entries ``start <= t < end`` and return row
``j`` = entry ``start + j``:

* ``start=1`` (default): row ``j`` scores token ``j + 1``; the student logits are
  ``model(input_ids).logits[:, :-1]`` and ``served.tokens`` is ``input_ids[:, 1:]`` (ragged rows
  padded, ``served.mask`` False there).
* ``start=prompt_lens`` (one per row): row ``j`` scores completion token ``j``. With prompts
  left-padded to ``P`` columns and completions right-padded to ``R`` (verl's layout), the student
  logits are ``logits[:, P - 1 : P - 1 + R]``; ``pad_to=R`` gives the served tensors that length.

Then::

    served = opd_ext.served.from_vllm_prompt_logprobs(outputs, start=prompt_lens, pad_to=R)
    loss = opd_ext.vopd_loss_sparse_teacher(student_logits, *served[:4], teacher_topk_mask=served.topk_mask,
                                            mask=served.mask & response_mask)
    overlap = opd_ext.served.topk_overlap(student_logits, served.topk_ids, served.topk_mask, mask=served.mask)
    scan = opd_ext.drift_scan(overlap, config, mask=served.mask)        # post-hoc Prune-OPD
    stop_at = monitor.observe(overlap, served.mask, rows=active)        # or chunk by chunk while decoding

Nothing here imports vllm or sglang: the converters read plain Python objects (dicts, lists,
tuples, objects with a ``.logprob`` attribute) and their JSON forms.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import NamedTuple, Optional

import torch

from opd_ext._validation import check_device, has_mass
from opd_ext.sparse_teacher import (
    SparseTeacherStats,
    sparse_teacher_stats,
    topk_overlap_between,
    topk_overlap_sparse_teacher,
)

__all__ = [
    "ServedTeacher",
    "SparseTeacherStats",
    "from_sglang_input_top_logprobs",
    "from_vllm_prompt_logprobs",
    "sparse_teacher_stats",
    "topk_overlap",
    "topk_overlap_between",
]

# The statistics of a served teacher live with its losses (opd_ext.sparse_teacher); this module's
# own names for them are kept, so `opd_ext.served` stays one import for a served teacher.
topk_overlap = topk_overlap_sparse_teacher

_NEG_INF = float("-inf")


class ServedTeacher(NamedTuple):
    """A served teacher's scores of ``T`` tokens per sequence: ``[T, ...]`` for one sequence,
    ``[B, T, ...]`` for a batch (ragged sequences padded at the end).

    The first four fields are the positional arguments of
    :func:`opd_ext.vopd_loss_sparse_teacher` after ``student_logits``, in order.
    """

    tokens: torch.Tensor  # int64 [..., T]: the scored token ids (0 where mask is False)
    topk_ids: torch.Tensor  # int64 [..., T, K]: the teacher's top-k ids (0 in padded slots)
    topk_logprobs: (
        torch.Tensor
    )  # float32 [..., T, K]: their log-probs, by slot in decreasing order; -inf in padded slots
    token_logprob: torch.Tensor  # float32 [..., T]: the teacher's log-prob of `tokens` (0 where mask is False)
    topk_mask: torch.Tensor  # bool [..., T, K]: slots of the teacher's support
    mask: torch.Tensor  # bool [..., T]: positions the server scored (False at padding and unscored entries)


# ---- parsing server outputs -----------------------------------------------------------------------


def _is_sequence(x) -> bool:
    return isinstance(x, Sequence) and not isinstance(x, (str, bytes))


def _as_list(x):
    return x.tolist() if isinstance(x, torch.Tensor) else x


def _token_id(value, where: str) -> int:
    # JSON objects (vLLM's HTTP server) carry ids as string keys.
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    if isinstance(value, bool):
        raise TypeError(f"{where}: a token id must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{where}: a token id must be an int, got {type(value).__name__} {value!r}") from None


def _logprob(value, where: str) -> float:
    """vLLM's ``Logprob`` (``.logprob``), its JSON form ``{"logprob": ...}``, or a plain number."""
    lp = getattr(value, "logprob", value)
    if isinstance(lp, Mapping):
        lp = lp.get("logprob")
    if lp is None or isinstance(lp, (bool, str, bytes)):
        raise TypeError(
            f"{where}: expected a log-prob (a number, or an object with .logprob), got {type(value).__name__} {value!r}"
        )
    try:
        return float(lp)
    except (TypeError, ValueError):
        raise TypeError(
            f"{where}: expected a log-prob (a number, or an object with .logprob), got {type(value).__name__} {value!r}"
        ) from None


def _rank(value) -> Optional[int]:
    rank = value.get("rank") if isinstance(value, Mapping) else getattr(value, "rank", None)
    return rank if isinstance(rank, int) and not isinstance(rank, bool) else None


def _spans(start, end, lengths, names):
    """Per-row ``[start, end)`` from an int / None or one value per row, checked against each row's
    list length."""
    rows = len(lengths)

    def per_row(value, name):
        value = _as_list(value)
        if _is_sequence(value):
            if len(value) != rows:
                raise ValueError(f"{name} has {len(value)} entries but there are {rows} sequences")
            return list(value)
        return [value] * rows

    spans = []
    for b, (s, e, n) in enumerate(zip(per_row(start, "start"), per_row(end, "end"), lengths)):
        e = n if e is None else e
        for name, v in (("start", s), ("end", e)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int (or one per sequence), got {type(v).__name__} {v!r}")
        if not 0 <= s <= e <= n:
            raise ValueError(
                f"{names(b)} has {n} entries; the span start={s}, end={e} must satisfy 0 <= start <= end <= {n}"
            )
        spans.append((s, e))
    return spans


class _Rows:
    """Parsed positions, row by row: the scored token, its log-prob, whether the server scored it,
    and the support (ids, log-probs)."""

    def __init__(self):
        self.tokens, self.token_lp, self.valid, self.ids, self.lps = [], [], [], [], []

    def new_row(self):
        for field in (self.tokens, self.token_lp, self.valid, self.ids, self.lps):
            field.append([])

    def add(self, token, token_lp, ids, lps):
        self.tokens[-1].append(token)
        self.token_lp[-1].append(token_lp)
        self.valid[-1].append(True)
        self.ids[-1].append(ids)
        self.lps[-1].append(lps)

    def add_unscored(self):
        self.tokens[-1].append(0)
        self.token_lp[-1].append(0.0)
        self.valid[-1].append(False)
        self.ids[-1].append(())
        self.lps[-1].append(())

    def pack(self, batched: bool, pad_to, device) -> ServedTeacher:
        rows = len(self.tokens)
        steps = max((len(r) for r in self.tokens), default=0)
        if pad_to is not None:
            if isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to < steps:
                raise ValueError(f"pad_to must be an int >= the longest span ({steps} positions), got {pad_to!r}")
            steps = pad_to
        width = max([1] + [len(ids) for row in self.ids for ids in row])
        flat_ids, flat_lps, flat_slots = [], [], []
        for row_ids, row_lps in zip(self.ids, self.lps):
            for ids, lps in zip(row_ids, row_lps):
                pad = width - len(ids)
                flat_ids += ids
                flat_ids += [0] * pad
                flat_lps += lps
                flat_lps += [_NEG_INF] * pad
                flat_slots += [True] * len(ids)
                flat_slots += [False] * pad
            missing = (steps - len(row_ids)) * width
            flat_ids += [0] * missing
            flat_lps += [_NEG_INF] * missing
            flat_slots += [False] * missing

        def positions(field, fill, dtype):
            return torch.tensor([list(r) + [fill] * (steps - len(r)) for r in field], dtype=dtype).reshape(rows, steps)

        tokens = positions(self.tokens, 0, torch.int64)
        token_lp = positions(self.token_lp, 0.0, torch.float32)
        mask = positions(self.valid, False, torch.bool)
        ids = torch.tensor(flat_ids, dtype=torch.int64).reshape(rows, steps, width)
        lps = torch.tensor(flat_lps, dtype=torch.float32).reshape(rows, steps, width)
        # A slot without mass (-inf, or a server's finite stand-in such as vLLM's JSON -9999.0) is
        # padding: not part of the support the losses see (teacher_support), -inf in the output.
        slots = torch.tensor(flat_slots, dtype=torch.bool).reshape(rows, steps, width) & has_mass(lps)
        # Slots by decreasing log-prob, padding last: `[..., :k]` is then the teacher's top-k.
        order = torch.sort(torch.where(slots, lps, _NEG_INF), dim=-1, descending=True, stable=True).indices
        ids, lps, slots = (x.gather(-1, order) for x in (ids, lps, slots))
        ids = torch.where(slots, ids, 0)
        lps = torch.where(slots, lps, _NEG_INF)
        out = ServedTeacher(tokens, ids, lps, token_lp, slots, mask)
        if not batched:
            out = ServedTeacher(*(x.squeeze(0) for x in out))
        return ServedTeacher(*(x.to(device) for x in out))


# ---- vLLM -----------------------------------------------------------------------------------------


def _vllm_inputs(prompt_logprobs, prompt_token_ids):
    """(batched, [(positions, token ids)]) from a RequestOutput, a list of them, or raw lists."""

    def from_output(output, ids):
        positions = output.prompt_logprobs
        if positions is None:
            raise ValueError(
                "the RequestOutput has prompt_logprobs=None: request them with SamplingParams(prompt_logprobs=k)"
            )
        ids = getattr(output, "prompt_token_ids", None) if ids is None else ids
        if ids is None:
            raise ValueError("the RequestOutput has no prompt_token_ids; pass prompt_token_ids=")
        return positions, _as_list(ids)

    if hasattr(prompt_logprobs, "prompt_logprobs"):
        return False, [from_output(prompt_logprobs, prompt_token_ids)]
    if not _is_sequence(prompt_logprobs):
        raise TypeError(
            f"prompt_logprobs must be a vLLM RequestOutput, a list of them, or RequestOutput."
            f"prompt_logprobs (a list with one None or dict per prompt position), got "
            f"{type(prompt_logprobs).__name__}"
        )
    if len(prompt_logprobs) and all(hasattr(o, "prompt_logprobs") for o in prompt_logprobs):
        ids = _as_list(prompt_token_ids)
        if ids is not None and (not _is_sequence(ids) or len(ids) != len(prompt_logprobs)):
            raise ValueError(f"prompt_token_ids must hold one list per RequestOutput ({len(prompt_logprobs)})")
        return True, [from_output(o, None if ids is None else ids[b]) for b, o in enumerate(prompt_logprobs)]
    if prompt_token_ids is None:
        raise ValueError(
            "prompt_token_ids is needed with raw prompt_logprobs lists (RequestOutput.prompt_token_ids): "
            "entry t of prompt_logprobs scores prompt_token_ids[t]"
        )
    ids = _as_list(prompt_token_ids)
    if not _is_sequence(ids):
        raise TypeError(f"prompt_token_ids must be a list of ids (or one list per sequence), got {type(ids).__name__}")
    if len(ids) and _is_sequence(_as_list(ids[0])):
        if len(ids) != len(prompt_logprobs):
            raise ValueError(
                f"prompt_logprobs has {len(prompt_logprobs)} sequences but prompt_token_ids has {len(ids)}"
            )
        return True, [(p, _as_list(i)) for p, i in zip(prompt_logprobs, ids)]
    return False, [(prompt_logprobs, ids)]


def from_vllm_prompt_logprobs(
    prompt_logprobs,
    prompt_token_ids=None,
    *,
    start=1,
    end=None,
    k: Optional[int] = None,
    pad_to: Optional[int] = None,
    device="cpu",
) -> ServedTeacher:
    """vLLM's prompt log-probs as a :class:`ServedTeacher`.

    vLLM (``SamplingParams(prompt_logprobs=k)``) returns ``RequestOutput.prompt_logprobs``: one entry
    per prompt position, ``None`` for the first (nothing predicts it) and otherwise a dict
    ``{token_id: Logprob(logprob, rank, decoded_token)}`` of the position's top-k, plus the prompt
    token itself when it is not among them (k or k + 1 entries). The added token is *not* put in
    the support: the losses' top-k baseline must not depend on the sampled token, or the
    policy gradient is biased; its log-prob goes to ``token_logprob``.

    Args:
        prompt_logprobs: a ``RequestOutput``, a list of them (a batch), one ``prompt_logprobs``
            list, or a list of such lists (a batch; then ``prompt_token_ids`` holds one list per
            sequence). Dict values may be ``Logprob`` objects (anything with ``.logprob``), their
            JSON form ``{"logprob": ...}`` (string keys accepted) or floats; vLLM's
            ``FlatLogprobs`` works as a list.
        prompt_token_ids: the token ids the teacher scored (``RequestOutput.prompt_token_ids``);
            taken from the ``RequestOutput`` when omitted. Entry ``t`` of ``prompt_logprobs``
            scores ``prompt_token_ids[t]``.
        start, end: the entries to convert, ``start <= t < end`` (an int or one per sequence; end
            None = the whole list). Row ``j`` of the result is entry ``start + j``: it scores token
            ``start + j``, which the student's logits at position ``start + j - 1`` predict (see the
            module docstring). Entries that are None (or empty) are kept as unscored positions
            (``mask`` False) when they are the first entry, and rejected elsewhere.
        k: the ``prompt_logprobs`` value of the request. None: inferred from the entry sizes (a
            position with one entry more than the others holds the added token); when every
            position has the same size and the ranks cannot tell, a ValueError asks for ``k``.
        pad_to: pad the time dimension to this length (at least the longest span).
        device: where the tensors go.

    Returns:
        :class:`ServedTeacher`, ``[T, K]`` for one sequence or ``[B, T, K]`` for a batch, with
        ``K = max(k, 1)``.

    Raises:
        ValueError / TypeError naming the entry (``prompt_logprobs[b][t]``): lengths that differ
        from the token ids, a position without the scored token, a size other than k or k + 1,
        values that are not log-probs, a span outside the list.
    """
    device = check_device(device)
    batched, seqs = _vllm_inputs(prompt_logprobs, prompt_token_ids)

    def name(b):
        return f"prompt_logprobs[{b}]" if batched else "prompt_logprobs"

    for b, (positions, ids) in enumerate(seqs):
        if not _is_sequence(ids):
            raise TypeError(f"prompt_token_ids for {name(b)} must be a list of ids, got {type(ids).__name__}")
        if len(positions) != len(ids):
            raise ValueError(
                f"{name(b)} has {len(positions)} entries but its prompt_token_ids has {len(ids)}: "
                f"entry t scores prompt_token_ids[t]"
            )
    spans = _spans(start, end, [len(ids) for _, ids in seqs], name)
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
        raise ValueError(f"k must be None or the prompt_logprobs value of the request (an int >= 0), got {k!r}")

    parsed = []  # per row: per position None or (where, token, token_lp, token_rank, {id: lp})
    for b, ((positions, ids), (s, e)) in enumerate(zip(seqs, spans)):
        row = []
        for t in range(s, e):
            where = f"{name(b)}[{t}]"
            entry = positions[t]
            if entry is None or (t == 0 and isinstance(entry, Mapping) and not entry):
                if t != 0:
                    raise ValueError(f"{where} is {entry!r}: vLLM leaves only the first prompt position unscored")
                row.append(None)
                continue
            if not isinstance(entry, Mapping):
                raise TypeError(f"{where} must be a dict {{token_id: Logprob}} (or None), got {type(entry).__name__}")
            token = _token_id(ids[t], f"prompt_token_ids for {where}")
            scores, token_rank = {}, None
            for key, value in entry.items():
                # Fast path for vLLM's own objects (int keys, float .logprob): millions of entries.
                tid = key if type(key) is int else _token_id(key, f"{where} key {key!r}")
                lp = getattr(value, "logprob", None)
                scores[tid] = lp if type(lp) is float else _logprob(value, f"{where}[{tid}]")
                if tid == token:
                    token_rank = _rank(value)
            if token not in scores:
                raise ValueError(
                    f"{where} lacks the scored token {token} (prompt_token_ids[{t}]); vLLM always lists "
                    f"it: are prompt_logprobs and prompt_token_ids from the same request?"
                )
            row.append((where, token, scores[token], token_rank, scores))
        parsed.append(row)

    scored = [p for row in parsed for p in row if p is not None]
    if k is None:
        k = _infer_vllm_k(scored)
    rows = _Rows()
    for row in parsed:
        rows.new_row()
        for p in row:
            if p is None:
                rows.add_unscored()
                continue
            where, token, token_lp, _, scores = p
            if len(scores) == k + 1:
                scores = {i: lp for i, lp in scores.items() if i != token}
            elif len(scores) != k:
                raise ValueError(
                    f"{where} has {len(scores)} entries; with prompt_logprobs k={k} vLLM lists k (the "
                    f"token among the top-k) or k + 1 (the token added)"
                )
            rows.add(token, token_lp, list(scores), list(scores.values()))
    return rows.pack(batched, pad_to, device)


def _infer_vllm_k(scored) -> int:
    sizes = {len(p[4]) for p in scored}
    if not sizes:
        return 0
    low, high = min(sizes), max(sizes)
    if high - low > 1:
        where = next(p[0] for p in scored if len(p[4]) == high)
        raise ValueError(
            f"{where} has {high} entries where others have {low}: vLLM lists k or k + 1 per position; "
            f"pass k= (the prompt_logprobs value of the request)"
        )
    if high == low + 1:
        return low
    # Every position lists `low` entries: either k = low with the token always among them, or
    # k = low - 1 with the token always added. An added token ranks below the top-k (rank > k), so a
    # token ranked above `low` settles it.
    if any(p[3] is not None and p[3] < low for p in scored):
        return low
    raise ValueError(
        f"cannot tell k from prompt_logprobs: every position lists {low} entries, which is k (the "
        f"token among the top-k) or k + 1 (the token added); pass k= (the prompt_logprobs value of "
        f"the request)"
    )


# ---- SGLang ---------------------------------------------------------------------------------------


def _sglang_inputs(input_top_logprobs, input_token_logprobs):
    """(batched, [(top lists or None, token list)]) from responses / meta_info dicts or raw lists."""

    def from_response(response, b):
        meta = response.get("meta_info", response)
        label = "the response" if b is None else f"response {b}"
        if not isinstance(meta, Mapping) or "input_token_logprobs" not in meta:
            raise ValueError(
                f"{label} has no meta_info['input_token_logprobs']: request return_logprob=True, "
                f"top_logprobs_num=k and logprob_start_len=0"
            )
        return meta.get("input_top_logprobs"), meta["input_token_logprobs"]

    if isinstance(input_top_logprobs, Mapping):
        return False, [from_response(input_top_logprobs, None)]
    if (
        _is_sequence(input_top_logprobs)
        and len(input_top_logprobs)
        and input_token_logprobs is None
        and all(isinstance(r, Mapping) for r in input_top_logprobs)
    ):
        return True, [from_response(r, b) for b, r in enumerate(input_top_logprobs)]
    if input_token_logprobs is None:
        raise ValueError(
            "input_token_logprobs (meta_info['input_token_logprobs']) is needed with raw "
            "input_top_logprobs lists: it holds each position's token and its log-prob"
        )
    tokens = input_token_logprobs
    if not _is_sequence(tokens):
        raise TypeError(
            f"input_token_logprobs must be a list of (logprob, token_id, text) (or one list per "
            f"sequence), got {type(tokens).__name__}"
        )
    # A sequence's entries are (logprob, token_id, text) tuples; a batch's are lists of them.
    batched = len(tokens) > 0 and _is_sequence(tokens[0]) and (len(tokens[0]) == 0 or _is_sequence(tokens[0][0]))
    if not batched:
        return False, [(input_top_logprobs, tokens)]
    if input_top_logprobs is not None and (
        not _is_sequence(input_top_logprobs) or len(input_top_logprobs) != len(tokens)
    ):
        raise ValueError(f"input_top_logprobs must hold one list per sequence of input_token_logprobs ({len(tokens)})")
    return True, [(None if input_top_logprobs is None else input_top_logprobs[b], t) for b, t in enumerate(tokens)]


def _sglang_entry(entry, where: str):
    """(logprob or None, token_id) of one ``(logprob, token_id, text)`` tuple (a JSON list works)."""
    if not _is_sequence(entry) or len(entry) < 2:
        raise TypeError(f"{where} must be a (logprob, token_id, text) tuple, got {type(entry).__name__} {entry!r}")
    return (None if entry[0] is None else _logprob(entry[0], where)), _token_id(entry[1], f"{where} token id")


def from_sglang_input_top_logprobs(
    input_top_logprobs, input_token_logprobs=None, *, start=1, end=None, pad_to: Optional[int] = None, device="cpu"
) -> ServedTeacher:
    """SGLang's input (prompt) log-probs as a :class:`ServedTeacher`.

    SGLang (``return_logprob=True, top_logprobs_num=k``) returns in ``meta_info``:

    * ``input_token_logprobs``: per input position ``(logprob, token_id, text)`` (``text`` None
      unless ``return_text_in_logprobs``), the first one's logprob None;
    * ``input_top_logprobs``: per input position None (the first) or a list of k
      ``(logprob, token_id, text)``: the top-k, which holds the position's token only when it is
      among them.

    The lists start at the request's ``logprob_start_len``: entry ``j`` is input token
    ``logprob_start_len + j``, and entry 0 is never scored. ``logprob_start_len=0`` aligns the lists
    with the sequence (as vLLM's); ``logprob_start_len = prompt_len - 1`` with ``start=1`` scores
    exactly the completion (``logprob_start_len = prompt_len`` would leave its first token unscored).

    Args:
        input_top_logprobs: a response dict (``{"meta_info": ...}``), its ``meta_info``, a list of
            either (a batch; leave ``input_token_logprobs`` None), or ``meta_info["input_top_logprobs"]``
            itself (a list per position, or a list of such lists for a batch). None: no top-k (only
            ``baseline="none"`` is then meaningful). Tuples may be JSON lists.
        input_token_logprobs: ``meta_info["input_token_logprobs"]`` (one list per sequence for a
            batch) when ``input_top_logprobs`` is a raw list.
        start, end: the entries to convert, ``start <= j < end`` (an int or one per sequence; end None
            = the whole list). Row ``j`` of the result is entry ``start + j`` (see the module
            docstring for the student logits it pairs with); an unscored first entry is kept with
            ``mask`` False.
        pad_to: pad the time dimension to this length (at least the longest span).
        device: where the tensors go.

    Returns:
        :class:`ServedTeacher`, ``[T, K]`` for one sequence or ``[B, T, K]`` for a batch, ``K`` the
        largest top-k listed (at least 1; requests with different ``top_logprobs_num`` are padded).

    Raises:
        ValueError / TypeError naming the entry (``input_top_logprobs[b][j]`` /
        ``input_token_logprobs[b][j]``): lists of different lengths, a None after the first entry,
        malformed tuples, a span outside the lists.
    """
    device = check_device(device)
    batched, seqs = _sglang_inputs(input_top_logprobs, input_token_logprobs)

    def name(b, field="input_token_logprobs"):
        return f"{field}[{b}]" if batched else field

    for b, (top, tokens) in enumerate(seqs):
        if not _is_sequence(tokens):
            raise TypeError(f"{name(b)} must be a list of (logprob, token_id, text), got {type(tokens).__name__}")
        if top is not None and not _is_sequence(top):
            raise TypeError(
                f"{name(b, 'input_top_logprobs')} must be a list (one entry per position), got {type(top).__name__}"
            )
        if top is not None and len(top) and len(top) != len(tokens):
            raise ValueError(
                f"{name(b, 'input_top_logprobs')} has {len(top)} entries but {name(b)} has "
                f"{len(tokens)}: both list the same input positions"
            )
    spans = _spans(start, end, [len(tokens) for _, tokens in seqs], name)

    rows = _Rows()
    for b, ((top, tokens), (s, e)) in enumerate(zip(seqs, spans)):
        rows.new_row()
        has_top = top is not None and len(top) > 0
        for j in range(s, e):
            where = f"{name(b)}[{j}]"
            token_lp, token = _sglang_entry(tokens[j], where)
            listed = top[j] if has_top else ()
            if token_lp is None or listed is None:
                if j != 0:
                    bad = where if token_lp is None else f"{name(b, 'input_top_logprobs')}[{j}]"
                    raise ValueError(f"{bad} is unscored (None): SGLang leaves only the first entry unscored")
                rows.add_unscored()
                continue
            top_where = f"{name(b, 'input_top_logprobs')}[{j}]"
            if not _is_sequence(listed):
                raise TypeError(f"{top_where} must be a list of (logprob, token_id, text), got {type(listed).__name__}")
            ids, lps = [], []
            for i, item in enumerate(listed):
                lp, tid = _sglang_entry(item, f"{top_where}[{i}]")
                if lp is None:
                    raise ValueError(f"{top_where}[{i}] has no log-prob (None)")
                ids.append(tid)
                lps.append(lp)
            rows.add(token, token_lp, ids, lps)
    return rows.pack(batched, pad_to, device)
