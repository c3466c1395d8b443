"""Vocab-parallel ops: logits sharded contiguously over the vocabulary across a process group
(Megatron's column-parallel lm_head, a DTensor placed ``Shard(-1)``), docs/spec.md §2."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from opd_ext import ops
from opd_ext._validation import (
    check_choice,
    check_k,
    check_logit_pair,
    check_logits,
    check_teacher_topk,
    check_temperature,
    check_tokens,
    token_range_error,
)
from opd_ext.objective import (
    DEFAULT_TOPK,
    TOPK_DIVERGENCES,
    TokenStats,
    TokenStatsWithForwardKL,
    check_vopd_options,
    logprob_gradient_at_ids,
    loss_scale,
    policy_gradient_loss,
    reverse_kl_objective,
    support_slots,
    teacher_support,
    topk_kl_objective,
    vopd_baseline_kl,
)

# ---- vocab-parallel ops: logits sharded contiguously over V -------------------------------------------
#
# Rank r of the group holds the logit columns [start_r, start_r + V_r) of every row (Megatron's
# column-parallel lm_head, a DTensor placed Shard(-1)); tokens are global ids. Each rank reduces its
# shard with the fused kernels to the raw online-softmax state of every row (opd_ext's
# pair_softmax_state op: 6 floats) plus, where needed, its local top-k candidates; one all_gather
# of those O(rows x (state + k)) floats gives every rank the same merged statistics, never O(V). The
# sampled token's logits come from the rank that owns it. The backward is local: each rank writes
# the gradient of its own columns from the merged lse / KL with the existing fused backward ops.

# Ids travel as float32 beside the values: exact below 2^24.
_MAX_EXACT_ID = 2**24
_STATE = 6  # (max_s, Z_s, max_t, Z_t, D, C): opd::PairSoftmaxState


class VocabShard(NamedTuple):
    """Where this rank's logit columns sit in the full vocabulary."""

    start: int  # first global id of the shard
    size: int  # V_r
    vocab: int  # V, the full vocabulary
    world_size: int


def vocab_shard(
    local_vocab: int, group=None, vocab_start: Optional[int] = None, vocab: Optional[int] = None, device=None
) -> VocabShard:
    """The contiguous layout of the shards: from ``vocab_start`` and ``vocab`` if given, else from one
    all_gather of every rank's ``V_r`` (shards in rank order, uneven sizes allowed)."""
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    if vocab_start is not None and vocab is not None:
        return VocabShard(int(vocab_start), local_vocab, int(vocab), world)
    if world == 1:
        return VocabShard(0, local_vocab, local_vocab, 1)
    sizes = torch.zeros(world, dtype=torch.int64, device=device)
    _all_gather_single(sizes, torch.tensor([local_vocab], dtype=torch.int64, device=device), group)
    sizes = sizes.tolist()
    rank = dist.get_rank(group)
    return VocabShard(sum(sizes[:rank]), local_vocab, sum(sizes), world)


def _all_gather_rows(packed: torch.Tensor, group, world: int) -> torch.Tensor:
    """[N, F] on every rank -> [W, N, F] (one collective)."""
    if world == 1:
        return packed.unsqueeze(0)
    out = packed.new_empty((world * packed.shape[0], *packed.shape[1:]))
    _all_gather_single(out, packed.contiguous(), group)
    return out.view(world, *packed.shape)


def _all_gather_single(out: torch.Tensor, tensor: torch.Tensor, group) -> None:
    """Concatenate every rank's ``tensor`` along dim 0 into ``out`` (all_gather_single where torch
    has it; all_gather_into_tensor, its older name, before)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, tensor, group=group)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., V_r] -> [N, V_r]; also for an empty shard (V_r = 0), where reshape(-1, 0) is ambiguous."""
    return x.reshape(x.shape[:-1].numel(), x.shape[-1])


def _centre(m: torch.Tensor) -> torch.Tensor:
    return torch.where(m == float("-inf"), 0.0, m)


def merge_states(states: torch.Tensor, inv_tau: float):
    """Merge [W, N, 6] float32 pair states (opd/online_softmax.h, PairSoftmaxState::merge, here in
    float64 on the exact float32 parts). Returns per row (max_s, log Z_s, max_t, log Z_t, KL(p‖q),
    KL(q‖p)), float64: the large parts (raw maxima) never mix with the small ones before the end."""
    st = states.double()
    max_s, sum_s, max_t, sum_t, cross_s, cross_t = st.unbind(-1)
    new_s, new_t = max_s.amax(0), max_t.amax(0)

    def keep(m, new):
        return torch.where(m == new, 1.0, torch.exp((m - new) * inv_tau))

    def weighted(w, v):
        return torch.where(w == 0, 0.0, w * v)

    keep_s, keep_t = keep(max_s, new_s), keep(max_t, new_t)
    shift = ((_centre(new_s) - _centre(max_s)) - (_centre(new_t) - _centre(max_t))) * inv_tau
    z_s, z_t = (keep_s * sum_s).sum(0), (keep_t * sum_t).sum(0)
    d = weighted(keep_s, cross_s - shift * sum_s).sum(0)
    c = weighted(keep_t, cross_t + shift * sum_t).sum(0)
    log_z_s, log_z_t = torch.log(z_s), torch.log(z_t)
    reverse = (d / z_s - log_z_s + log_z_t).clamp(min=0)
    forward = (c / z_t - log_z_t + log_z_s).clamp(min=0)
    return new_s, log_z_s, new_t, log_z_t, reverse, forward


def _local_ids(tokens: torch.Tensor, shard: VocabShard) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids relative to this shard and whether this rank owns them (-1 where it does not)."""
    local = tokens - shard.start
    owned = (local >= 0) & (local < shard.size)
    return torch.where(owned, local, -1), owned


def _topk_candidates(rows: torch.Tensor, k: int, shard: VocabShard):
    """The k best columns of each row of a shard [N, V_r] (float32) under opd_ext's ranking (higher
    value first, ties to the lower id), as (values [N, k], global ids [N, k] float32, local ids
    [N, min(k, V_r)], has_nan [N]). Shards narrower than k are padded with -inf at ids past V: they
    lose every tie, and since V >= k real columns exist, no padding slot reaches a global top-k."""
    n, width = rows.shape
    has_nan = rows.isnan().any(-1)
    x = torch.where(has_nan[:, None], 0.0, rows)
    take = min(k, width)
    threshold = x.topk(take, dim=-1).values[:, -1:]
    above = x > threshold
    tied = x == threshold
    # torch.topk breaks ties arbitrarily: the lowest-id tied columns fill what the strictly larger
    # ones leave of the k, so every rank ranks as the single-device kernels do.
    need = take - above.sum(-1, keepdim=True)
    chosen = above | (tied & (tied.cumsum(-1) <= need))
    ids = chosen.nonzero()[:, 1].view(n, take)
    values = rows.gather(-1, ids)
    global_ids = (ids + shard.start).float()
    if take < k:
        pad = torch.arange(k - take, device=rows.device, dtype=torch.float32) + shard.vocab + shard.start
        values = torch.cat([values, values.new_full((n, k - take), float("-inf"))], -1)
        global_ids = torch.cat([global_ids, pad.expand(n, -1)], -1)
    return values, global_ids, ids, has_nan


def _global_topk(values: torch.Tensor, ids: torch.Tensor, k: int):
    """Merge [W, N, k] candidates into the k best per row (value desc, id asc): (values, ids, slot
    order [N, k] into the W·k candidates)."""
    w, n, _ = values.shape
    values = values.permute(1, 0, 2).reshape(n, w * k)
    ids = ids.permute(1, 0, 2).reshape(n, w * k)
    by_id = ids.argsort(-1)  # ids are distinct per row
    by_value = values.gather(-1, by_id).argsort(dim=-1, descending=True, stable=True)
    order = by_id.gather(-1, by_value)[:, :k]
    return values.gather(-1, order), ids.gather(-1, order), order


def _check_member(group) -> None:
    if dist.is_initialized() and group is not None and dist.get_rank(group) < 0:
        raise ValueError("this rank is not a member of `group`")


def _check_vocab_parallel(student_logits, teacher_logits, group):
    # A shard may be empty (torch.chunk-style layouts): every rank takes the same path through the
    # collectives, so no rank raises alone and leaves the others waiting.
    check_logit_pair(student_logits, teacher_logits, shard=True)
    _check_member(group)


class _Merged(NamedTuple):
    logp_s: torch.Tensor
    logp_t: torch.Tensor
    reverse: torch.Tensor
    forward: torch.Tensor
    lse_s: torch.Tensor
    lse_t: torch.Tensor
    topk_kl: Optional[torch.Tensor]


def _merged_stats(student_logits, teacher_logits, tokens, temperature, topk, group, shard) -> _Merged:
    """Every rank: the full-vocabulary statistics of the rows, as ``token_stats`` computes them on
    unsharded logits. ``tokens`` are global ids (any value where not needed: pass zeros)."""
    inv_tau = 1.0 / temperature
    lead = student_logits.shape[:-1]
    s, t = _rows(student_logits.detach()), _rows(teacher_logits.detach())
    n = s.shape[0]
    state = ops.pair_softmax_state(s, t, temperature)
    local, owned = _local_ids(tokens.reshape(-1), shard)
    safe = local.clamp(min=0).unsqueeze(-1)
    neg_inf = torch.tensor(float("-inf"), device=s.device)
    # NaN stays NaN through the max over ranks: amax propagates it. An empty shard owns no token.
    s_y = torch.where(owned, s.gather(-1, safe).squeeze(-1).float(), neg_inf) if shard.size else neg_inf.expand(n)
    t_y = torch.where(owned, t.gather(-1, safe).squeeze(-1).float(), neg_inf) if shard.size else neg_inf.expand(n)
    parts = [state, s_y[:, None], t_y[:, None]]
    if topk:
        values, global_ids, local_cand, has_nan = _topk_candidates(s.float(), topk, shard)
        t_cand = t.float().gather(-1, local_cand)
        if t_cand.shape[-1] < topk:  # a shard narrower than k: its padding slots
            t_cand = torch.cat([t_cand, t_cand.new_full((n, topk - t_cand.shape[-1]), float("-inf"))], -1)
        parts += [values, global_ids, t_cand, has_nan.float()[:, None]]
    gathered = _all_gather_rows(torch.cat(parts, -1), group, shard.world_size)
    max_s, log_z_s, max_t, log_z_t, reverse, forward = merge_states(gathered[..., :_STATE], inv_tau)
    s_y, t_y = gathered[..., _STATE].double().amax(0), gathered[..., _STATE + 1].double().amax(0)
    logp_s = (s_y - _centre(max_s)) * inv_tau - log_z_s
    logp_t = (t_y - _centre(max_t)) * inv_tau - log_z_t
    topk_kl = None
    if topk:
        base = _STATE + 2
        values, ids = gathered[..., base : base + topk], gathered[..., base + topk : base + 2 * topk]
        t_values = gathered[..., base + 2 * topk : base + 3 * topk]
        nan_rows = gathered[..., base + 3 * topk].amax(0) > 0
        best_s, _, order = _global_topk(values, ids, topk)
        best_t = t_values.permute(1, 0, 2).reshape(n, -1).gather(-1, order)
        topk_kl = _support_kl(best_s.double(), best_t.double(), inv_tau)
        topk_kl = torch.where(nan_rows, float("nan"), topk_kl)

    def out(x):
        return x.float().reshape(lead)

    return _Merged(
        out(logp_s),
        out(logp_t),
        out(reverse),
        out(forward),
        out(max_s * inv_tau + log_z_s),
        out(max_t * inv_tau + log_z_t),
        None if topk_kl is None else out(topk_kl),
    )


def _support_kl(s: torch.Tensor, t: torch.Tensor, inv_tau: float) -> torch.Tensor:
    """KL(p̄‖q̄) over k slots, both renormalised there (the vOPD top-k baseline)."""
    log_p = torch.log_softmax((s - _centre(s.amax(-1, keepdim=True))) * inv_tau, -1)
    log_q = torch.log_softmax((t - _centre(t.amax(-1, keepdim=True))) * inv_tau, -1)
    p = log_p.exp()
    return (p * torch.where(p > 0, log_p - log_q, 0.0)).sum(-1).clamp(min=0)


def _check_global_tokens(tokens, student_logits, shard: VocabShard, valid=None):
    check_tokens(tokens, student_logits)
    if torch.compiler.is_compiling() or tokens.numel() == 0:
        return
    bad = (tokens < 0) | (tokens >= shard.vocab)
    if valid is not None:
        bad = bad & valid
    if bool(bad.any()):
        values = tokens[bad]
        raise token_range_error(shard.vocab, int(values.min()), int(values.max()))


def _setup(student_logits, teacher_logits, group, vocab_start, vocab):
    _check_vocab_parallel(student_logits, teacher_logits, group)
    shard = vocab_shard(student_logits.shape[-1], group, vocab_start, vocab, student_logits.device)
    if 2 * shard.vocab >= _MAX_EXACT_ID:  # ids and the padding ids past V travel as float32
        raise ValueError(f"vocab-parallel ops support V < {_MAX_EXACT_ID // 2}, got V={shard.vocab}")
    return shard


def vocab_parallel_token_stats(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    forward_kl: bool = False,
    group=None,
    vocab_start: Optional[int] = None,
    vocab: Optional[int] = None,
):
    """:func:`opd_ext.token_stats` on logits sharded over the vocabulary across ``group``.

    Args:
        student_logits, teacher_logits: this rank's shard ``[..., V_r]`` of the ``[..., V]`` logits
            (columns ``[vocab_start, vocab_start + V_r)``); dtypes as in ``token_stats``.
        tokens: int64 ``[...]`` *global* ids in ``[0, V)``, identical on every rank.
        group: the tensor-parallel process group (default: the world).
        vocab_start, vocab: this shard's first id and the full V; when omitted, one all_gather of
            every rank's ``V_r`` finds them (shards in rank order).

    Returns the same :class:`~opd_ext.TokenStats` on every rank. Communication: one all_gather of
    8 float32 per row (32 bytes per token per rank), plus the layout's W int64 without
    ``vocab_start``/``vocab``. Every rank of ``group`` must call it.
    """
    shard = _setup(student_logits, teacher_logits, group, vocab_start, vocab)
    temperature = check_temperature(temperature)
    _check_global_tokens(tokens, student_logits, shard)
    m = _merged_stats(student_logits, teacher_logits, tokens, temperature, 0, group, shard)
    if forward_kl:
        return TokenStatsWithForwardKL(m.logp_s, m.logp_t, m.reverse, m.forward)
    return TokenStats(m.logp_s, m.logp_t, m.reverse)


def vocab_parallel_vopd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    mask=None,
    weights=None,
    temperature: float = 1.0,
    baseline: str = "full",
    topk: int = DEFAULT_TOPK,
    kl: str = "reverse",
    num_items=None,
    group=None,
    vocab_start: Optional[int] = None,
    vocab: Optional[int] = None,
    reduction: str = "mean",
    return_stats: bool = False,
):
    """:func:`opd_ext.vopd_loss` on logits sharded over the vocabulary across ``group``.

    Arguments as in ``vopd_loss`` (``tokens`` are global ids; ``mask``, ``weights`` and
    ``num_items`` identical on every rank; ``reduction`` and ``return_stats`` too, the stats the
    same on every rank) plus ``group`` / ``vocab_start`` / ``vocab`` as in
    :func:`vocab_parallel_token_stats`. The returned loss is the same on every rank; its gradient
    w.r.t. this rank's ``student_logits`` shard is that shard's columns of the single-device
    gradient. Communication: one all_gather of 8 float32 per row, plus ``3·topk + 1`` with
    ``baseline="topk"`` (1.2 kB per token at the default k = 100).
    """
    shard = _setup(student_logits, teacher_logits, group, vocab_start, vocab)
    check_vopd_options(baseline, kl)
    temperature = check_temperature(temperature)
    topk = check_k(topk, shard.vocab, "topk", DEFAULT_TOPK) if baseline == "topk" else 0
    scale, valid, w = loss_scale(student_logits, mask, weights, num_items, reduction)
    _check_global_tokens(tokens, student_logits, shard, valid)
    tokens = torch.where(valid, tokens, 0)
    m = _merged_stats(student_logits, teacher_logits, tokens, temperature, topk, group, shard)
    value = vopd_baseline_kl(baseline, kl, reverse_kl=m.reverse, forward_kl=m.forward, topk_reverse_kl=m.topk_kl)
    local, _ = _local_ids(tokens, shard)
    return policy_gradient_loss(
        student_logits,
        local,
        m.logp_s,
        m.lse_s,
        m.logp_t,
        value,
        m.reverse,
        scale,
        valid,
        w,
        temperature,
        reduction,
        return_stats,
    )


def vocab_parallel_reverse_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    mask=None,
    weights=None,
    temperature: float = 1.0,
    num_items=None,
    group=None,
    vocab_start: Optional[int] = None,
    vocab: Optional[int] = None,
    reduction: str = "mean",
    return_stats: bool = False,
):
    """:func:`opd_ext.reverse_kl_loss` on logits sharded over the vocabulary across ``group``;
    arguments, result and gradient as in :func:`vocab_parallel_vopd_loss`. Communication: one
    all_gather of 8 float32 per row."""
    shard = _setup(student_logits, teacher_logits, group, vocab_start, vocab)
    temperature = check_temperature(temperature)
    scale, valid, w = loss_scale(student_logits, mask, weights, num_items, reduction)
    zeros = torch.zeros(student_logits.shape[:-1], dtype=torch.int64, device=student_logits.device)
    m = _merged_stats(student_logits, teacher_logits, zeros, temperature, 0, group, shard)
    return reverse_kl_objective(
        student_logits,
        teacher_logits,
        m.reverse,
        m.lse_s,
        m.lse_t,
        scale,
        valid,
        w,
        temperature,
        reduction,
        return_stats,
    )


def vocab_parallel_topk_overlap(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    k: int = 16,
    *,
    group=None,
    vocab_start: Optional[int] = None,
    vocab: Optional[int] = None,
) -> torch.Tensor:
    """:func:`opd_ext.topk_overlap` on logits sharded over the vocabulary across ``group``: exactly
    the single-device result (same ranking: higher logit first, ties to the lower global id; NaN
    rows NaN). Each rank sends its shard's k best (value, id) per side: one all_gather of
    ``4k + 1`` float32 per row (260 bytes per token at k = 16)."""
    shard = _setup(student_logits, teacher_logits, group, vocab_start, vocab)
    check_k(k, shard.vocab)
    lead = student_logits.shape[:-1]
    s, t = _rows(student_logits.detach()).float(), _rows(teacher_logits.detach()).float()
    s_values, s_ids, _, s_nan = _topk_candidates(s, k, shard)
    t_values, t_ids, _, t_nan = _topk_candidates(t, k, shard)
    packed = torch.cat([s_values, s_ids, t_values, t_ids, (s_nan | t_nan).float()[:, None]], -1)
    gathered = _all_gather_rows(packed, group, shard.world_size)
    _, best_s, _ = _global_topk(gathered[..., :k], gathered[..., k : 2 * k], k)
    _, best_t, _ = _global_topk(gathered[..., 2 * k : 3 * k], gathered[..., 3 * k : 4 * k], k)
    shared = (best_s.unsqueeze(-1) == best_t.unsqueeze(-2)).any(-1).sum(-1)
    overlap = shared.float() / k
    overlap = torch.where(gathered[..., 4 * k].amax(0) > 0, float("nan"), overlap)
    return overlap.reshape(lead)


class _VocabParallelLogprobsAt(torch.autograd.Function):
    """``opd_ext.topk_kl.StudentLogprobsAt`` on a vocabulary shard: the full rows' log-probs at the
    support's (global) ids, replicated on every rank, from one all_gather of ``1 + k`` floats per row
    (each rank's log-normaliser and its own columns' logits at the ids). The backward is local: each
    rank writes ``-G·p/τ`` over its columns (``policy_gradient_backward`` with the merged
    log-normaliser) and the exact value at the ids it owns; no communication."""

    @staticmethod
    def forward(ctx, student_logits, ids, support, temperature, group, shard):
        logits = student_logits.detach()
        lead, k = logits.shape[:-1], ids.shape[-1]
        source, filled = support_slots(ids, support)
        local, owned = _local_ids(filled, shard)
        neg_inf = torch.tensor(float("-inf"), device=logits.device)
        if shard.size > 0:
            no_token = torch.zeros(lead, dtype=torch.int64, device=logits.device)
            _, lse_local = ops.student_stats(logits, no_token, temperature)
            at = torch.where(owned, logits.gather(-1, local.clamp(min=0)).float(), neg_inf)
        else:  # an empty shard (torch.chunk layouts): it owns no id and adds no mass
            lse_local = torch.full(lead, float("-inf"), device=logits.device)
            at = torch.full(ids.shape, float("-inf"), device=logits.device)
        packed = torch.cat([lse_local.reshape(-1, 1).float(), at.reshape(-1, k)], -1)
        gathered = _all_gather_rows(packed, group, shard.world_size).double()
        lse = torch.logsumexp(gathered[..., 0], 0).reshape(lead)
        logprobs = gathered[..., 1:].amax(0).reshape(ids.shape) / temperature - lse.unsqueeze(-1)
        ctx.save_for_backward(student_logits, local, owned, source, support, lse.float(), logprobs)
        ctx.temperature, ctx.shard = temperature, shard
        return logprobs

    @staticmethod
    def backward(ctx, grad_logprobs):
        student_logits, local, owned, source, support, lse, logprobs = ctx.saved_tensors
        if ctx.shard.size == 0:
            return torch.zeros_like(student_logits), None, None, None, None, None
        row, at_ids = logprob_gradient_at_ids(grad_logprobs, support, source, logprobs, ctx.temperature)
        outside = torch.full(lse.shape, -1, dtype=torch.int64, device=lse.device)
        grad = ops.policy_gradient_backward(row.float(), student_logits.detach(), outside, lse, ctx.temperature)
        at_ids = at_ids.to(grad.dtype)
        flat = grad.view(-1, grad.shape[-1])
        k = local.shape[-1]
        rows = torch.arange(flat.shape[0], device=grad.device).unsqueeze(-1).expand(-1, k)
        own = owned.reshape(-1, k)
        flat[rows[own], local.reshape(-1, k)[own]] = at_ids.reshape(-1, k)[own]
        return grad, None, None, None, None, None


def vocab_parallel_topk_kl_loss(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    *,
    divergence: str = "forward_tail",
    teacher_topk_mask=None,
    mask=None,
    weights=None,
    temperature: float = 1.0,
    num_items=None,
    group=None,
    vocab_start: Optional[int] = None,
    vocab: Optional[int] = None,
    reduction: str = "mean",
    return_stats: bool = False,
):
    """:func:`opd_ext.topk_kl_loss` on student logits sharded over the vocabulary across ``group``
    (Megatron's column-parallel lm_head; verl's Megatron strategy): every rank passes its shard
    ``[..., V_r]`` and the same (global-id) teacher top-k, and gets the single-device loss and its
    own columns of the single-device gradient. Shards may be empty (``V_r = 0``).

    Communication: one all_gather of ``1 + k`` float32 per row in the forward, none in the backward.
    ``vocab_start`` / ``vocab`` give the shard's place (else one all_gather of the shard sizes).
    Other arguments, result and errors as in :func:`opd_ext.topk_kl_loss`.
    """
    check_logits("student_logits", student_logits, shard=True)
    _check_member(group)
    shard = vocab_shard(student_logits.shape[-1], group, vocab_start, vocab, student_logits.device)
    temperature = check_temperature(temperature)
    check_choice("divergence", divergence, TOPK_DIVERGENCES)
    scale, valid, w = loss_scale(student_logits, mask, weights, num_items, reduction)
    if shard.vocab == 0:  # the same on every rank, so every rank raises
        raise ValueError("student_logits: every shard is empty (V = 0)")
    check_teacher_topk(teacher_topk_ids, teacher_topk_logprobs, student_logits, teacher_topk_mask, valid, shard.vocab)
    support = teacher_support(teacher_topk_ids, teacher_topk_logprobs.detach(), teacher_topk_mask) & valid.unsqueeze(-1)
    logprobs = _VocabParallelLogprobsAt.apply(student_logits, teacher_topk_ids, support, temperature, group, shard)
    return topk_kl_objective(
        logprobs, teacher_topk_logprobs, support, divergence, scale, valid, w, reduction, return_stats
    )


def vocab_parallel_in_topk(
    student_logits: torch.Tensor,
    ids: torch.Tensor,
    k: int,
    *,
    group=None,
    vocab_start: Optional[int] = None,
    vocab: Optional[int] = None,
) -> torch.Tensor:
    """Whether each (global) id of ``ids`` ``[..., m]`` is among the ``k`` largest logits of its row,
    the rows sharded over the vocabulary across ``group``: bool ``[..., m]``, replicated. An id tied
    with the k-th largest logit counts as inside (verl's overlap diagnostics). Communication: one
    all_gather of ``k + m`` float32 per row."""
    check_logits("student_logits", student_logits, shard=True)
    shard = vocab_shard(student_logits.shape[-1], group, vocab_start, vocab, student_logits.device)
    lead, m = student_logits.shape[:-1], ids.shape[-1]
    logits = _rows(student_logits.detach()).float()
    take = min(k, shard.size)
    best = logits.topk(take, dim=-1).values if take else logits.new_empty(logits.shape[0], 0)
    if take < k:
        best = torch.cat([best, best.new_full((best.shape[0], k - take), float("-inf"))], -1)
    local, owned = _local_ids(ids.reshape(-1, m), shard)
    at = torch.where(
        owned, logits.gather(-1, local.clamp(min=0)) if shard.size else logits.new_zeros(owned.shape), float("-inf")
    )
    gathered = _all_gather_rows(torch.cat([best, at], -1), group, shard.world_size)
    kth = gathered[..., :k].permute(1, 0, 2).reshape(logits.shape[0], -1).topk(k, dim=-1).values[:, -1:]
    return (gathered[..., k:].amax(0) >= kth).reshape(*lead, m)
