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
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from opd_ext._extension import ops
from opd_ext._validation import (
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
)
from opd_ext.losses import BASELINES, KL_DIRECTIONS, _advantage_coef, _loss_scale, _masked_sum, token_stats_op

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
    topk: int = 100,
    kl: str = "reverse",
    num_items=None,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """``opd_ext.vopd_loss(F.linear(student_hidden, student_weight, student_bias), teacher_logits, ...)``
    without the ``[N, V]`` student logits.

    Args:
        student_hidden: ``[N, H]`` or ``[B, T, H]``, the states fed to the lm_head.
        student_weight: ``[V, H]`` lm_head weight (``nn.Linear`` layout), same dtype and device.
        tokens: int64 ``[N]`` / ``[B, T]``, the sampled ids (any value where ``mask`` is False).
        teacher_logits: ``[N, V]`` / ``[B, T, V]``; or instead give ``teacher_hidden`` ``[..., H_t]`` and
            ``teacher_weight`` ``[V, H_t]`` (+ ``teacher_bias``), whose logits are formed per chunk.
            The teacher dtype is the student's, or float32 beside a bf16/fp16 student.
        student_bias: optional ``[V]``.
        mask, weights, temperature, baseline, topk, kl, num_items: as in ``opd_ext.vopd_loss``.
        chunk_size: rows per chunk; default :func:`default_chunk_size`.

    Returns:
        A float32 scalar, differentiable w.r.t. ``student_hidden``, ``student_weight`` and
        ``student_bias``. The gradients are computed during the forward pass, so a forward under
        ``torch.no_grad()`` skips them.

    Student and teacher must share the vocabulary. Models of one family often pad the embedding
    differently (Qwen2.5: 151936 vs 152064 rows); slice the longer side to the shared prefix, a
    view that costs nothing: ``teacher_weight[:V]`` (and ``teacher_bias[:V]``), or
    ``teacher_logits[..., :V]`` (read chunk by chunk, never copied whole).
    """
    check_choice("baseline", baseline, BASELINES)
    check_choice("kl", kl, KL_DIRECTIONS)
    if kl == "forward" and baseline != "full":
        raise ValueError(f'kl="forward" selects the full-vocabulary forward-KL baseline; it needs '
                         f'baseline="full", got baseline={baseline!r}')
    problem = _Problem(student_hidden, student_weight, student_bias, teacher_logits, teacher_hidden,
                       teacher_weight, teacher_bias, tokens, mask, weights, temperature, num_items,
                       chunk_size)
    topk = check_k(topk, problem.vocab, "topk") if baseline == "topk" else 0

    def chunk_loss(student_logits, teacher_logits, tokens, scale, valid, need_grad):
        logp_s, logp_t, reverse_kl, forward_kl, topk_kl, lse_s, _ = token_stats_op(
            student_logits, teacher_logits, tokens, problem.temperature, topk)
        value = {"full": forward_kl if kl == "forward" else reverse_kl, "topk": topk_kl}.get(baseline)
        # d loss / d log p(y): the surrogate is linear in log p(y), as in opd_ext.vopd_loss.
        coef = _advantage_coef(scale, valid, logp_t, logp_s, 0.0 if value is None else value)
        loss = _masked_sum(coef, logp_s)
        if not need_grad:
            return loss, None
        return loss, ops.policy_gradient_backward(coef, student_logits, tokens, lse_s, problem.temperature)

    return problem.run(chunk_loss)


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
) -> torch.Tensor:
    """``opd_ext.reverse_kl_loss(F.linear(student_hidden, student_weight, student_bias), teacher_logits,
    ...)`` without the ``[N, V]`` student logits: ``Σ_t w_t KL(p_t‖q_t) / norm``.

    Arguments as in :func:`fused_linear_vopd_loss` (no tokens: the loss is dense over the vocabulary).
    """
    problem = _Problem(student_hidden, student_weight, student_bias, teacher_logits, teacher_hidden,
                       teacher_weight, teacher_bias, None, mask, weights, temperature, num_items,
                       chunk_size)

    def chunk_loss(student_logits, teacher_logits, tokens, scale, valid, need_grad):
        _, _, reverse_kl, _, _, lse_s, lse_t = ops.token_stats(
            student_logits, teacher_logits, tokens, problem.temperature, 0)
        loss = _masked_sum(scale, reverse_kl)
        if not need_grad:
            return loss, None
        return loss, ops.reverse_kl_backward(scale, student_logits, teacher_logits, lse_s, lse_t,
                                             reverse_kl, problem.temperature)

    return problem.run(chunk_loss)


# A chunk's loss: (student_logits [c, V], teacher_logits [c, V], tokens [c], scale [c] = w / norm,
# valid [c] (all True: masked rows are never chunked), need_grad)
# -> (float32 scalar, d loss / d student_logits [c, V] in the logits' dtype, or None).
ChunkLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool],
                     tuple[torch.Tensor, Optional[torch.Tensor]]]


class _Problem:
    """Validated, row-flattened inputs of one fused-linear loss call."""

    def __init__(self, student_hidden, student_weight, student_bias, teacher_logits, teacher_hidden,
                 teacher_weight, teacher_bias, tokens, mask, weights, temperature, num_items, chunk_size):
        check_linear_head("student", student_hidden, student_weight, student_bias)
        lead = tuple(student_hidden.shape[:-1])
        device, dtype = student_hidden.device, student_hidden.dtype
        self.hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
        self.weight, self.bias = student_weight, student_bias
        self.vocab = student_weight.shape[0]
        self.rows = self.hidden.shape[0]

        if (teacher_logits is None) == (teacher_weight is None and teacher_hidden is None):
            raise ValueError("give the teacher either as teacher_logits [..., V] or as teacher_hidden "
                             "[..., H_t] + teacher_weight [V, H_t], exactly one of the two")
        if teacher_logits is not None:
            check_logits("teacher_logits", teacher_logits)
            _check_lead("teacher_logits", teacher_logits.shape[:-1], lead)
            check_head_vocab(self.vocab, "teacher_logits", teacher_logits.shape[-1])
            teacher_device, teacher_dtype = teacher_logits.device, teacher_logits.dtype
            flat_teacher = teacher_logits.detach().reshape(-1, self.vocab)
            self.teacher_logits = lambda rows: flat_teacher[rows]
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
            self.teacher_logits = lambda rows: F.linear(t_hidden[rows], t_weight, t_bias)
        if teacher_device != device:
            raise ValueError(f"the teacher is on {teacher_device} but student_hidden is on {device}; use one device")
        if not is_supported_dtype_pair(dtype, teacher_dtype):
            raise TypeError(
                f"unsupported dtype mix: student {dtype}, teacher {teacher_dtype}. Supported: one dtype for "
                f"both, or a bfloat16/float16 student with a float32 teacher; cast the teacher")

        self.temperature = check_temperature(temperature)
        if mask is not None:
            check_mask(mask, student_hidden, "student_hidden")
        if weights is not None:
            check_weights(weights, student_hidden, "student_hidden")
        # The losses' own normalisation (w / norm, 0 where masked); it reads only the leading
        # shape and device of its first argument.
        scale, valid = _loss_scale(student_hidden, mask, None if weights is None else weights.detach(), num_items)
        self.scale, self.valid = scale.reshape(-1), valid.reshape(-1)
        # Only valid rows are computed: masked rows cost nothing and their tokens (often -100)
        # and states (possibly NaN) never reach the kernels.
        self.selected = None if mask is None else self.valid.nonzero().squeeze(1)
        if tokens is None:  # dense losses: any valid id, the kernels' log p(y) is unused
            self.tokens = torch.zeros(self.rows, dtype=torch.long, device=device)
        else:
            check_tokens(tokens, student_hidden, "student_hidden")
            self.tokens = tokens.reshape(-1)
            # Checked here, not by the kernels: they would report a position inside a chunk.
            chosen = self.tokens if self.selected is None else self.tokens[self.selected]
            if chosen.numel() and bool(((chosen < 0) | (chosen >= self.vocab)).any()):
                bad = chosen[(chosen < 0) | (chosen >= self.vocab)][0].item()
                raise ValueError(f"tokens must be in [0, V={self.vocab}) at unmasked positions, got {bad}")

        num_selected = self.rows if self.selected is None else self.selected.numel()
        if chunk_size is None:
            chunk_size = default_chunk_size(num_selected, self.vocab)
        elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int (rows per chunk), got {chunk_size!r}")
        self.chunk_size = chunk_size
        self.num_selected = num_selected

    def row_chunks(self):
        """Row selectors: slices (views, no copy) without a mask, index tensors with one."""
        for start in range(0, self.num_selected, self.chunk_size):
            stop = min(start + self.chunk_size, self.num_selected)
            yield slice(start, stop) if self.selected is None else self.selected[start:stop]

    def run(self, chunk_loss: ChunkLoss) -> torch.Tensor:
        grad_enabled = torch.is_grad_enabled()
        needs = tuple(grad_enabled and t is not None and t.requires_grad
                      for t in (self.hidden, self.weight, self.bias))
        return _FusedLinearLoss.apply(self.hidden, self.weight, self.bias, self, chunk_loss, needs)


class _FusedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, problem: _Problem, chunk_loss: ChunkLoss, needs):
        need_hidden, need_weight, need_bias = needs
        # Rows outside the mask are never visited and keep a zero gradient.
        new_grad_hidden = torch.empty_like if problem.selected is None else torch.zeros_like
        grad_hidden = new_grad_hidden(hidden) if need_hidden else None
        grad_weight = _WeightGradSum(weight) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for rows in problem.row_chunks():
            chunk_hidden = hidden[rows]
            chunk_loss_value, grad_logits = chunk_loss(
                F.linear(chunk_hidden, weight, bias), problem.teacher_logits(rows),
                problem.tokens[rows], problem.scale[rows], problem.valid[rows], any(needs))
            loss += chunk_loss_value
            if grad_logits is None:
                continue
            if need_hidden:
                grad_hidden[rows] = grad_logits @ weight
            if need_weight:
                grad_weight.add_matmul_(grad_logits.t(), chunk_hidden)
            if need_bias:
                grad_bias += grad_logits.sum(0, dtype=torch.float32)
            del grad_logits
        # Held in the parameters' dtype until backward; the float32 sums are freed here.
        grad_weight = grad_weight.result() if need_weight else None
        grad_bias = grad_bias.to(bias.dtype) if need_bias else None
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scaled = [None if g is None else g * grad_output.to(g.dtype) for g in (grad_hidden, grad_weight, grad_bias)]
        return *scaled, None, None, None


# Rows of the weight gradient per float32 accumulator block (see _WeightGradSum).
_ACCUMULATOR_BLOCK_BYTES = 128 * 2**20


class _WeightGradSum:
    """The lm_head weight gradient [V, H], summed over row chunks in float32 (bf16/fp16 gradients
    are never summed in low precision, SPEC §2; each chunk's product is rounded at most once, as
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
            a_rows = a[start:start + block.shape[0]]
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

