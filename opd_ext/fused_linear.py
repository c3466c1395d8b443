"""vOPD and reverse-KL losses straight from the student's last hidden states and lm_head weight.

The eager path ``logits = hidden @ weight.T`` holds ``[N, V]`` logits, their softmax temporaries and
their gradient at once: at N=4096 and Qwen's V=151936 that is 2.5 GB per float32 copy. Here the rows
go through in chunks. Per chunk the logits are computed (matmul in the input dtype, as
Liger-Kernel's fused-linear losses do), the fused ``token_stats`` op reads them once, and since the
loss is a sum over rows, the chunk's logit-gradient is final already in the forward pass: the fused
backward op writes it, it is multiplied into ``grad_hidden`` (chunk rows) and ``grad_weight`` (sum
over chunks), and the chunk's logits are dropped. Backward is then one multiply by ``grad_output``.
Peak memory is O(chunk·V + N·H + V·H), never O(N·V): about three [chunk, V] logit buffers, the
gradients, and for a bf16/fp16 weight its float32 gradient sum (V·H·4 bytes). At N=4096, H=2048,
V=151936 in bf16 that is ~1.6 GiB against ~14 GiB for eager PyTorch
(benchmarks/results/fused_linear_cpu.md).

The teacher is detached: given as logits ``[..., V]``, or as ``teacher_hidden`` + ``teacher_weight``,
whose logits are then also formed one chunk at a time.

LoRA on the lm_head: pass the module, not its weight. ``student_weight`` (and ``teacher_weight``) may be
the lm_head module itself: an ``nn.Linear``, a PEFT LoRA layer or a PEFT ``modules_to_save`` wrapper
(:mod:`opd_ext.lm_head` says what is accepted and what it resolves to). The memory then stays
O(chunk·V + N·H + V·H) with O(V·r + r·H) for the adapters::

    loss = opd_ext.fused_linear_vopd_loss(hidden, peft_model.get_output_embeddings(), tokens,
                                          teacher_hidden=t_hidden, teacher_weight=teacher.lm_head.weight)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F

from opd_ext import ops
from opd_ext._validation import (
    SUPPORTED_DTYPE_PAIRS,
    check_choice,
    check_head_vocab,
    check_k,
    check_linear_head,
    check_logits,
    check_mask,
    check_temperature,
    check_tokens,
    check_weights,
    is_supported_dtype_pair,
    token_range_error,
)
from opd_ext.lm_head import AdapterTerms, LinearHead, LoraAdapter, linear_head, resolve_head
from opd_ext.objective import (
    DEFAULT_TOPK,
    REDUCTIONS,
    advantage_coef,
    check_vopd_options,
    loss_scale,
    loss_stats,
    masked_terms,
    vopd_baseline_kl,
)

__all__ = [
    "LinearHead",
    "LoraAdapter",
    "default_chunk_size",
    "fused_linear_reverse_kl_loss",
    "fused_linear_vopd_loss",
    "linear_head",
]

# Default chunk: as many rows as keep one chunk of float32-sized logits within this budget. A chunk
# holds about three [rows, V] buffers at once (student logits, teacher logits, logit gradient), so at
# most ~0.75 GiB of temporaries (half that in bf16) at any vocabulary, while a chunk stays tall enough
# (432 rows at V=151936) that its matmuls are compute-bound rather than re-reading the weight. Pass a
# smaller chunk_size to trade speed for memory.
DEFAULT_CHUNK_BYTES = 256 * 2**20


def default_chunk_size(num_rows: int, vocab: int, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk: ``budget_bytes // (4 · V)``, rounded down to a multiple of 16 (GEMM tiles)
    when that large, and at most ``num_rows``."""
    rows = max(1, budget_bytes // (4 * vocab))
    if rows > 16:
        rows -= rows % 16
    return max(1, min(rows, num_rows))


def fused_linear_vopd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    tokens: torch.Tensor,
    *,
    teacher_logits: Optional[torch.Tensor] = None,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_weight: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    student_bias: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    baseline: str = "full",
    topk: int = DEFAULT_TOPK,
    kl: str = "reverse",
    num_items=None,
    chunk_size: Optional[int] = None,
    reduction: str = "mean",
    return_stats: bool = False,
):
    """``opd_ext.vopd_loss(F.linear(student_hidden, student_weight, student_bias), teacher_logits, ...)``
    without the ``[N, V]`` student logits.

    Args:
        student_hidden: ``[N, H]`` or ``[B, T, H]``, the states fed to the lm_head.
        student_weight: ``[V, H]`` lm_head weight (``nn.Linear`` layout), same dtype and device; or the
            lm_head module (``nn.Linear``, PEFT LoRA layer: see :func:`linear_head`), whose bias and
            LoRA adapters are then part of the logits and receive gradients. Pass the module whenever
            the head may carry adapters: its ``.weight`` / ``.base_layer.weight`` alone ignores them.
        tokens: int64 ``[N]`` / ``[B, T]``, the sampled ids (any value where ``mask`` is False).
        teacher_logits: ``[N, V]`` / ``[B, T, V]``; or instead give ``teacher_hidden`` ``[..., H_t]`` and
            ``teacher_weight`` ``[V, H_t]`` (+ ``teacher_bias``; or the teacher's lm_head module), whose
            logits are formed per chunk.
            The teacher dtype is the student's, or float32 beside a bf16/fp16 student, or bf16/fp16
            beside a float32 student.
        student_bias: optional ``[V]`` (not with a module as ``student_weight``: it has its own).
        mask, weights, temperature, baseline, topk, kl, num_items: as in ``opd_ext.vopd_loss``.
        chunk_size: rows per chunk; default :func:`default_chunk_size`.
        reduction: ``"mean"`` (default) | ``"sum"`` | ``"none"`` (float32 ``[N]`` / ``[B, T]`` per-position
            values, 0 where masked). With ``"mean"`` / ``"sum"`` the gradients are computed during the
            forward pass; with ``"none"`` the backward computes them from its per-position incoming
            gradient, which costs a second pass over the chunks' logits.
        return_stats: also return an ``opd_ext.LossStats`` of ``[N]`` / ``[B, T]`` tensors, gathered
            from the chunks (masked rows, never computed, hold 0).

    Returns:
        The loss, or ``(loss, LossStats)`` with ``return_stats``. The loss is float32 (a scalar unless
        ``reduction="none"``), differentiable w.r.t. ``student_hidden``, ``student_weight`` and
        ``student_bias`` (with a module: its weight, bias and LoRA ``lora_A`` / ``lora_B`` weights).
        With ``"mean"`` / ``"sum"`` the gradients are computed during the forward pass, so a forward
        under ``torch.no_grad()`` skips them.

    Raises:
        TypeError / ValueError: as :func:`linear_head` for a module that is not an lm_head the loss
        can compute (DoRA and other adapter kinds it does not model), and for the argument checks.

    Student and teacher must share the vocabulary. Models of one family often pad the embedding
    differently (Qwen2.5: 151936 vs 152064 rows); slice the longer side to the shared prefix, a
    view that costs nothing: ``teacher_weight[:V]`` (and ``teacher_bias[:V]``), or
    ``teacher_logits[..., :V]`` (read chunk by chunk, never copied whole).
    """
    check_vopd_options(baseline, kl)
    problem = _Problem(
        student_hidden,
        student_weight,
        student_bias,
        teacher_logits,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        tokens,
        mask,
        weights,
        temperature,
        num_items,
        chunk_size,
        reduction,
    )
    topk = check_k(topk, problem.vocab, "topk", DEFAULT_TOPK) if baseline == "topk" else 0

    def chunk_loss(student_logits, teacher_logits, tokens, scale, valid, need_grad):
        stats = ops.token_stats(student_logits, teacher_logits, tokens, problem.temperature, topk)
        value = vopd_baseline_kl(
            baseline,
            kl,
            reverse_kl=stats.reverse_kl,
            forward_kl=stats.forward_kl,
            topk_reverse_kl=stats.topk_reverse_kl,
        )
        logp_s, logp_t, lse_s = stats.student_logprob, stats.teacher_logprob, stats.student_lse
        row_stats = (logp_s, logp_t, stats.reverse_kl) + (() if value is None else (value,))
        # d loss / d log p(y): the surrogate is linear in log p(y), as in opd_ext.vopd_loss.
        coef = advantage_coef(scale, valid, logp_t, logp_s, 0.0 if value is None else value)
        terms = masked_terms(coef, logp_s)
        if not need_grad:
            return terms, None, row_stats
        grad = ops.policy_gradient_backward(coef, student_logits, tokens, lse_s, problem.temperature)
        return terms, grad, row_stats

    if not return_stats:
        return problem.run(chunk_loss)
    loss, logp_s, logp_t, reverse_kl, *value = problem.run(chunk_loss, 4 if baseline != "none" else 3)
    return loss, problem.stats(
        student_logprob=logp_s,
        teacher_logprob=logp_t,
        reverse_kl=reverse_kl,
        baseline_kl=value[0] if value else None,
        policy_gradient=True,
    )


def fused_linear_reverse_kl_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    *,
    teacher_logits: Optional[torch.Tensor] = None,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_weight: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    student_bias: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    num_items=None,
    chunk_size: Optional[int] = None,
    reduction: str = "mean",
    return_stats: bool = False,
):
    """``opd_ext.reverse_kl_loss(F.linear(student_hidden, student_weight, student_bias), teacher_logits,
    ...)`` without the ``[N, V]`` student logits: ``Σ_t w_t KL(p_t‖q_t) / norm``.

    Arguments, ``reduction`` and ``return_stats`` (``reverse_kl`` only) as in
    :func:`fused_linear_vopd_loss` (no tokens: the loss is dense over the vocabulary).
    """
    problem = _Problem(
        student_hidden,
        student_weight,
        student_bias,
        teacher_logits,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        None,
        mask,
        weights,
        temperature,
        num_items,
        chunk_size,
        reduction,
    )

    def chunk_loss(student_logits, teacher_logits, tokens, scale, valid, need_grad):
        stats = ops.token_stats(student_logits, teacher_logits, tokens, problem.temperature)
        reverse_kl, lse_s, lse_t = stats.reverse_kl, stats.student_lse, stats.teacher_lse
        terms = masked_terms(scale, reverse_kl)
        if not need_grad:
            return terms, None, (reverse_kl,)
        return (
            terms,
            ops.reverse_kl_backward(
                scale, student_logits, teacher_logits, lse_s, lse_t, reverse_kl, problem.temperature
            ),
            (reverse_kl,),
        )

    if not return_stats:
        return problem.run(chunk_loss)
    loss, reverse_kl = problem.run(chunk_loss, 1)
    return loss, problem.stats(reverse_kl=reverse_kl)


# A chunk's loss: (student_logits [c, V], teacher_logits [c, V], tokens [c], scale [c] = w / norm,
# valid [c] (all True: masked rows are never chunked), need_grad)
# -> (float32 [c] per-row loss terms (the loss is their sum), d Σ terms / d student_logits [c, V] in
#     the logits' dtype, or None,
#     per-row float32 statistics [c] (a fixed number per loss, gathered only when asked for)).
ChunkLoss = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool],
    tuple[torch.Tensor, Optional[torch.Tensor], tuple[torch.Tensor, ...]],
]


class _Problem:
    """Validated, row-flattened inputs of one fused-linear loss call."""

    def __init__(
        self,
        student_hidden,
        student_weight,
        student_bias,
        teacher_logits,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        tokens,
        mask,
        weights,
        temperature,
        num_items,
        chunk_size,
        reduction="mean",
    ):
        check_choice("reduction", reduction, REDUCTIONS)
        self.per_position = reduction == "none"
        student_weight, student_bias, self.adapters = resolve_head("student", student_weight, student_bias)
        teacher_weight, teacher_bias, teacher_adapters = resolve_head("teacher", teacher_weight, teacher_bias)
        check_linear_head("student", student_hidden, student_weight, student_bias)
        lead = tuple(student_hidden.shape[:-1])
        self.lead = lead
        device, dtype = student_hidden.device, student_hidden.dtype
        self.hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
        self.weight, self.bias = student_weight, student_bias
        self.vocab = student_weight.shape[0]
        self.rows = self.hidden.shape[0]

        if (teacher_logits is None) == (teacher_weight is None and teacher_hidden is None):
            raise ValueError(
                "give the teacher either as teacher_logits [..., V] or as teacher_hidden "
                "[..., H_t] + teacher_weight [V, H_t], exactly one of the two"
            )
        if teacher_logits is not None:
            check_logits("teacher_logits", teacher_logits)
            _check_lead("teacher_logits", teacher_logits.shape[:-1], lead)
            check_head_vocab(self.vocab, "teacher_logits", teacher_logits.shape[-1])
            teacher_device, teacher_dtype = teacher_logits.device, teacher_logits.dtype
            flat_teacher = teacher_logits.detach().reshape(-1, self.vocab)
            self.teacher_logits = lambda rows: flat_teacher[rows]
            # Under torch.autocast the student's chunk logits come out in the autocast dtype, which
            # may not pair with the teacher's (bfloat16 beside float16): read the teacher's chunks
            # as float32 then (exact), instead of failing inside a kernel.
            autocast = torch.is_autocast_enabled(device.type)
            chunk_dtype = torch.get_autocast_dtype(device.type) if autocast else dtype
            if not is_supported_dtype_pair(chunk_dtype, teacher_dtype) and is_supported_dtype_pair(
                dtype, teacher_dtype
            ):
                self.teacher_logits = lambda rows: flat_teacher[rows].float()
        else:
            if teacher_hidden is None or teacher_weight is None:
                raise ValueError("the teacher as hidden states needs both teacher_hidden and teacher_weight")
            check_linear_head("teacher", teacher_hidden, teacher_weight, teacher_bias)
            _check_lead("teacher_hidden", teacher_hidden.shape[:-1], lead)
            check_head_vocab(self.vocab, "teacher_weight", teacher_weight.shape[0])
            teacher_device, teacher_dtype = teacher_hidden.device, teacher_hidden.dtype
            t_hidden = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
            t_weight = teacher_weight.detach()
            t_bias = None if teacher_bias is None else teacher_bias.detach()
            t_adapters = AdapterTerms(
                tuple(LoraAdapter(ad.a.detach(), ad.b.detach(), ad.scale, ad.dropout) for ad in teacher_adapters)
            )
            self.teacher_logits = lambda rows: t_adapters.add_to_logits(
                t_hidden[rows], F.linear(t_hidden[rows], t_weight, t_bias), save=False
            )
        if teacher_device != device:
            raise ValueError(f"the teacher is on {teacher_device} but student_hidden is on {device}; use one device")
        if not is_supported_dtype_pair(dtype, teacher_dtype):
            raise TypeError(
                f"unsupported dtype mix: student {dtype}, teacher {teacher_dtype}. Supported: "
                f"{SUPPORTED_DTYPE_PAIRS}; cast the teacher"
            )

        self.temperature = check_temperature(temperature)
        if mask is not None:
            check_mask(mask, student_hidden, "student_hidden")
        if weights is not None:
            check_weights(weights, student_hidden, "student_hidden")
        # The losses' own normalisation (w / norm, 0 where masked); it reads only the leading
        # shape and device of its first argument.
        scale, valid, w = loss_scale(
            student_hidden, mask, None if weights is None else weights.detach(), num_items, reduction
        )
        self.scale, self.valid, self.weights = scale.reshape(-1), valid.reshape(-1), w
        # Only valid rows are computed: masked rows cost nothing and their tokens (often -100)
        # and states (possibly NaN) never reach the kernels. Under torch.compile the number of
        # valid rows is data-dependent and cannot size the chunk loop, so every row is computed
        # there, the masked ones zeroed (states, tokens) and weighted 0.
        self.zero_masked_rows = mask is not None and torch.compiler.is_compiling()
        self.selected = None if mask is None or self.zero_masked_rows else self.valid.nonzero().squeeze(1)
        if tokens is None:  # dense losses: any valid id, the kernels' log p(y) is unused
            self.tokens = torch.zeros(self.rows, dtype=torch.long, device=device)
        else:
            check_tokens(tokens, student_hidden, "student_hidden")
            self.tokens = tokens.reshape(-1)
            if self.zero_masked_rows:
                self.tokens = torch.where(self.valid, self.tokens, 0)
            # Checked here, not by the kernels: they would report a position inside a chunk. A
            # compiled graph cannot branch on the data; there the kernels' own check raises.
            chosen = self.tokens if self.selected is None else self.tokens[self.selected]
            if (
                not torch.compiler.is_compiling()
                and chosen.numel()
                and bool(((chosen < 0) | (chosen >= self.vocab)).any())
            ):
                bad = chosen[(chosen < 0) | (chosen >= self.vocab)]
                raise token_range_error(self.vocab, bad.min().item(), bad.max().item(), " at unmasked positions")

        num_selected = self.rows if self.selected is None else self.selected.numel()
        if chunk_size is None:
            chunk_size = default_chunk_size(num_selected, self.vocab)
        elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int (rows per chunk), got {chunk_size!r}")
        self.chunk_size = chunk_size
        self.num_selected = num_selected

    def row_chunks(self):
        """Row selectors: slices (views, no copy) without a mask, index tensors with one."""
        # Counting chunks (rather than range(0, rows, chunk)) and sym_min keep a symbolic row count
        # symbolic under torch.compile(dynamic=True): the graph is specialised on the number of
        # chunks only, not on every row count.
        num_chunks = (self.num_selected + self.chunk_size - 1) // self.chunk_size
        for i in range(num_chunks):
            start = i * self.chunk_size
            stop = torch.sym_min(start + self.chunk_size, self.num_selected)
            yield slice(start, stop) if self.selected is None else self.selected[start:stop]

    def run(self, chunk_loss: ChunkLoss, num_stats: int = 0):
        """The loss; with ``num_stats``, ``(loss, *the chunks' first num_stats statistics as [rows])``."""
        grad_enabled = torch.is_grad_enabled()
        adapter_tensors = [t for ad in self.adapters for t in (ad.a, ad.b)]
        needs = tuple(
            grad_enabled and t is not None and t.requires_grad
            for t in (self.hidden, self.weight, self.bias, *adapter_tensors)
        )
        # The adapters' tensors are inputs too, so that autograd hands their gradients back.
        return _FusedLinearLoss.apply(
            self.hidden, self.weight, self.bias, self, chunk_loss, needs, num_stats, *adapter_tensors
        )

    def stats(self, policy_gradient: bool = False, **rows):
        """``LossStats`` from [rows] statistics, in the leading shape of ``student_hidden``."""
        rows = {name: None if x is None else x.reshape(self.lead) for name, x in rows.items()}
        return loss_stats(self.valid.reshape(self.lead), self.weights, policy_gradient=policy_gradient, **rows)


def _chunk_pass(
    hidden,
    weight,
    bias,
    adapter_tensors,
    problem: _Problem,
    chunk_loss: ChunkLoss,
    needs,
    num_stats: int,
    scale: torch.Tensor,
    per_row: bool,
):
    """One pass over the row chunks: the loss (a float32 scalar, or per-row terms [rows] with
    ``per_row``), ``num_stats`` per-row statistics, and the gradients ``needs`` asks for (hidden,
    weight, bias, then each adapter's A and B; None where not needed) of Σ scale-weighted terms."""
    need_hidden, need_weight, need_bias = needs[:3]
    adapters = AdapterTerms(problem.adapters, list(zip(needs[3::2], needs[4::2])))
    # Rows outside the mask are never visited and keep a zero gradient.
    new_grad_hidden = torch.empty_like if problem.selected is None else torch.zeros_like
    grad_hidden = new_grad_hidden(hidden) if need_hidden else None
    grad_weight = _WeightGradSum(weight) if need_weight else None
    grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
    device = hidden.device
    loss = (
        torch.zeros(problem.rows, dtype=torch.float32, device=device)
        if per_row
        else torch.zeros((), dtype=torch.float32, device=device)
    )
    # Masked rows are never visited: their statistics (and per-row terms) stay 0.
    stats = [torch.zeros(problem.rows, dtype=torch.float32, device=device) for _ in range(num_stats)]
    for rows in problem.row_chunks():
        chunk_hidden = hidden[rows]
        if problem.zero_masked_rows:  # a NaN state would reach grad_weight as 0 * NaN
            chunk_hidden = torch.where(problem.valid[rows, None], chunk_hidden, 0)
        # The logits stay a temporary: a name would keep them alive into the next chunk.
        terms, grad_logits, chunk_stats = chunk_loss(
            adapters.add_to_logits(chunk_hidden, F.linear(chunk_hidden, weight, bias)),
            problem.teacher_logits(rows),
            problem.tokens[rows],
            scale[rows],
            problem.valid[rows],
            any(needs),
        )
        if per_row:
            loss[rows] = terms
        else:
            loss += terms.sum()
        for out, value in zip(stats, chunk_stats):
            out[rows] = value
        if grad_logits is None:
            continue
        adapter_grad_hidden = adapters.backward(grad_logits, need_hidden) if adapters.adapters else None
        if need_hidden:
            chunk_grad_hidden = grad_logits @ weight
            if adapter_grad_hidden is not None:
                chunk_grad_hidden = (chunk_grad_hidden + adapter_grad_hidden).to(hidden.dtype)
            grad_hidden[rows] = chunk_grad_hidden
        if need_weight:
            grad_weight.add_matmul_(grad_logits.t(), chunk_hidden)
        if need_bias:
            grad_bias += grad_logits.sum(0, dtype=torch.float32)
        del grad_logits
    # Held in the parameters' dtype until backward; the float32 sums are freed here.
    grad_weight = grad_weight.result() if need_weight else None
    grad_bias = grad_bias.to(bias.dtype) if need_bias else None
    return loss, stats, [grad_hidden, grad_weight, grad_bias, *adapters.results()]


class _FusedLinearLoss(torch.autograd.Function):
    """Reductions "mean" / "sum": the gradients are formed in the forward pass and scaled by the
    incoming (scalar) gradient in the backward. "none" cannot do that: each row's gradient must be
    scaled by its own incoming gradient, and the lm_head gradients are sums over rows. So its forward
    computes per-row values only and its backward runs the chunks again, each row weighted by its own
    incoming gradient (one more pass over the logits, no [N, V] buffer)."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, problem: _Problem, chunk_loss: ChunkLoss, needs, num_stats, *adapter_tensors
    ):
        ctx.problem, ctx.chunk_loss, ctx.needs = problem, chunk_loss, needs
        grads_now = needs if not problem.per_position else (False,) * len(needs)
        if problem.per_position:
            # The backward recomputes the logits: LoRA dropout must draw the same masks again.
            ctx.rng_devices = [hidden.device] if hidden.device.type == "cuda" else []
            ctx.rng_state = torch.get_rng_state()
            ctx.device_rng_state = [torch.cuda.get_rng_state(d) for d in ctx.rng_devices]
        loss, stats, grads = _chunk_pass(
            hidden,
            weight,
            bias,
            adapter_tensors,
            problem,
            chunk_loss,
            grads_now,
            num_stats,
            problem.scale,
            problem.per_position,
        )
        if problem.per_position:
            ctx.save_for_backward(hidden, weight, bias, *adapter_tensors)
            loss = loss.reshape(problem.lead)
        else:
            ctx.save_for_backward(*grads)
        if not stats:
            return loss
        ctx.mark_non_differentiable(*stats)
        return loss, *stats

    @staticmethod
    def backward(ctx, grad_output, *grad_stats):
        problem = ctx.problem
        if problem.per_position:
            hidden, weight, bias, *adapter_tensors = ctx.saved_tensors
            scale = problem.scale * grad_output.reshape(-1).float()
            with torch.random.fork_rng(devices=ctx.rng_devices):
                torch.set_rng_state(ctx.rng_state)
                for device, state in zip(ctx.rng_devices, ctx.device_rng_state):
                    torch.cuda.set_rng_state(state, device)
                _, _, grads = _chunk_pass(
                    hidden, weight, bias, adapter_tensors, problem, ctx.chunk_loss, ctx.needs, 0, scale, False
                )
            return *grads[:3], None, None, None, None, *grads[3:]
        grads = ctx.saved_tensors
        scaled = [None if g is None else g * grad_output.to(g.dtype) for g in grads]
        return *scaled[:3], None, None, None, None, *scaled[3:]


# Rows of the weight gradient per float32 accumulator block (see _WeightGradSum).
_ACCUMULATOR_BLOCK_BYTES = 128 * 2**20


class _WeightGradSum:
    """The lm_head weight gradient [V, H], summed over row chunks in float32 (bf16/fp16 gradients
    are never summed in low precision, docs/spec.md §2; each chunk's product is rounded at most once, as
    eager's single product is).

    For a low-precision weight the float32 sum lives in separate row blocks, so the final cast
    frees each block as it goes: the peak is V·H·4 bytes plus a block, not the V·H·(4 + 2) of a
    float32 tensor and its cast side by side (1.16 vs 1.74 GiB at V=151936, H=2048).
    """

    def __init__(self, weight: torch.Tensor):
        self.dtype = weight.dtype
        block_rows = max(1, _ACCUMULATOR_BLOCK_BYTES // (4 * weight.shape[1]))
        if weight.dtype == torch.float32:  # one tensor; the blocks are views of it
            self.whole = torch.zeros_like(weight)
            self.blocks = list(self.whole.split(block_rows))
        else:
            self.whole = None
            self.blocks = [torch.zeros_like(rows, dtype=torch.float32) for rows in weight.split(block_rows)]

    def add_matmul_(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """``self += a @ b`` for ``a`` [V, c] and ``b`` [c, H] in the weight's dtype."""
        start = 0
        for block in self.blocks:
            a_rows = a[start : start + block.shape[0]]
            start += block.shape[0]
            if block.dtype == a.dtype:
                block.addmm_(a_rows, b)
            elif block.is_cuda:  # cuBLAS widens the product itself
                torch.addmm(block, a_rows, b, out_dtype=block.dtype, out=block)
            else:
                # CPU has no mixed-dtype addmm, and upcasting the factors would run the GEMM in
                # float32 (2x slower than bf16 on AVX512-BF16 CPUs): multiply in the input dtype,
                # rounding the product once, and widen it into the block.
                block += a_rows @ b

    def result(self) -> torch.Tensor:
        """The sum in the weight's dtype; consumes the accumulator."""
        if self.whole is not None:
            return self.whole
        parts = []
        while self.blocks:
            parts.append(self.blocks.pop(0).to(self.dtype))  # the float32 block dies here
        return torch.cat(parts)


def _check_lead(name: str, shape, lead: tuple) -> None:
    if tuple(shape) != lead:
        raise ValueError(f"{name} must have the leading shape of student_hidden {lead}, got {tuple(shape)}")
