"""Fused-linear losses (opd_ext/fused_linear.py) against the unfused loss on materialised logits.

Ground truth: ``opd_ext.reference.{vopd_loss, reverse_kl_loss}`` (float64 math) applied to
``F.linear(hidden, weight, bias)`` computed in the input dtype, with autograd through the matmul.
The fused path forms the same logits per row chunk, so the comparison isolates the chunking, the
fused kernels and the gradient accumulation.

Tolerances (norm-wise relative error ``‖x - ref‖ / ‖ref‖``):
* float32: 1e-5 for the loss and every gradient (docs/spec.md §4; the chunked f32 matmul may block
  differently from the full one, ~1e-7 relative on the logits).
* bfloat16: loss 1e-4 (docs/spec.md §4: the logits are bitwise the same rounded inputs), gradients 8e-3:
  the logit-gradient and each gradient matmul round to bf16 once (2^-8 = 3.9e-3 relative), in
  both paths, but not necessarily on the same side.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import opd_ext
from opd_ext import fused_linear, reference
from opd_ext.fused_linear import (
    default_chunk_size,
    fused_linear_reverse_kl_loss,
    fused_linear_vopd_loss,
)

DTYPES = [torch.float32, torch.bfloat16]
LOSS_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4}
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3}

N_ROWS, HIDDEN, TEACHER_HIDDEN, VOCAB = 37, 24, 40, 129


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def make_inputs(dtype, device, *, lead=(N_ROWS,), teacher_dtype=None, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dt)

    teacher_dtype = teacher_dtype or dtype
    # Hidden/weight scales give logits of std ~2: peaked but not one-hot distributions.
    data = dict(
        student_hidden=randn(*lead, HIDDEN).requires_grad_(),
        student_weight=randn(VOCAB, HIDDEN, scale=0.4).requires_grad_(),
        student_bias=randn(VOCAB, scale=0.5).requires_grad_() if bias else None,
        teacher_hidden=randn(*lead, TEACHER_HIDDEN, dt=teacher_dtype),
        teacher_weight=randn(VOCAB, TEACHER_HIDDEN, scale=0.35, dt=teacher_dtype),
        teacher_bias=randn(VOCAB, scale=0.5, dt=teacher_dtype),
        tokens=torch.randint(0, VOCAB, lead, generator=gen).to(device),
        mask=(torch.rand(lead, generator=gen) > 0.25).to(device),
        weights=torch.rand(lead, generator=gen).to(device) + 0.5,
    )
    return data


def teacher_kwargs(data, form):
    if form == "logits":
        logits = F.linear(data["teacher_hidden"], data["teacher_weight"], data["teacher_bias"])
        return dict(teacher_logits=logits)
    return {k: data[k] for k in ("teacher_hidden", "teacher_weight", "teacher_bias")}


def student_params(data):
    return [t for t in (data["student_hidden"], data["student_weight"], data["student_bias"]) if t is not None]


def unfused(loss_fn, data, **loss_kwargs):
    """Materialised logits in the input dtype + the reference loss; returns (loss, grads)."""
    student_logits = F.linear(data["student_hidden"], data["student_weight"], data["student_bias"])
    teacher_logits = F.linear(data["teacher_hidden"], data["teacher_weight"], data["teacher_bias"])
    loss = loss_fn(student_logits, teacher_logits, **loss_kwargs)
    return loss, torch.autograd.grad(loss, student_params(data))


def fused(loss_fn, data, form, **loss_kwargs):
    loss = loss_fn(
        data["student_hidden"],
        data["student_weight"],
        student_bias=data["student_bias"],
        **teacher_kwargs(data, form),
        **loss_kwargs,
    )
    return loss, torch.autograd.grad(loss, student_params(data))


def assert_matches(actual, expected, dtype):
    (loss, grads), (ref_loss, ref_grads) = actual, expected
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert rel_err(loss, ref_loss) <= LOSS_TOL[dtype], (loss.item(), ref_loss.item())
    for name, grad, ref in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert grad.dtype == ref.dtype and grad.shape == ref.shape, name
        assert torch.isfinite(grad).all(), name
        assert rel_err(grad, ref) <= GRAD_TOL[dtype], (name, rel_err(grad, ref))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["logits", "hidden"])
@pytest.mark.parametrize("baseline", ["full", "topk", "none"])
@pytest.mark.parametrize("chunk_size", [5, None])  # 5 does not divide the 28 unmasked rows
def test_vopd_matches_unfused(device, dtype, form, baseline, chunk_size):
    data = make_inputs(dtype, device)
    kwargs = dict(tokens=data["tokens"], mask=data["mask"], weights=data["weights"], baseline=baseline, topk=10)
    expected = unfused(reference.vopd_loss, data, **kwargs)
    actual = fused(fused_linear_vopd_loss, data, form, chunk_size=chunk_size, **kwargs)
    assert_matches(actual, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["logits", "hidden"])
@pytest.mark.parametrize("chunk_size", [4, None])
def test_reverse_kl_matches_unfused(device, dtype, form, chunk_size):
    data = make_inputs(dtype, device)
    kwargs = dict(mask=data["mask"], weights=data["weights"])
    expected = unfused(reference.reverse_kl_loss, data, **kwargs)
    actual = fused(fused_linear_reverse_kl_loss, data, form, chunk_size=chunk_size, **kwargs)
    assert_matches(actual, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_shape_temperature_forward_kl_num_items(device, dtype, monkeypatch):
    """[B, T, H] input, no mask, no bias, T != 1, the forward-KL baseline and a global token count;
    the weight gradient summed in blocks of 16 vocabulary rows (views of one tensor for float32)."""
    monkeypatch.setattr(fused_linear, "_ACCUMULATOR_BLOCK_BYTES", 16 * HIDDEN * 4)
    data = make_inputs(dtype, device, lead=(3, 11), bias=False)
    kwargs = dict(tokens=data["tokens"], weights=data["weights"], temperature=1.7, kl="forward", num_items=50)
    expected = unfused(reference.vopd_loss, data, **kwargs)
    actual = fused(fused_linear_vopd_loss, data, "hidden", chunk_size=4, **kwargs)
    assert_matches(actual, expected, dtype)
    assert actual[1][0].shape == (3, 11, HIDDEN)


def test_low_precision_student_with_float32_teacher(device, monkeypatch):
    # Sum the weight gradient in float32 blocks of 10 vocabulary rows (129 = 12·10 + 9): the
    # blocked accumulation and the block-by-block cast run with a ragged last block.
    monkeypatch.setattr(fused_linear, "_ACCUMULATOR_BLOCK_BYTES", 10 * HIDDEN * 4)
    _assert_both_losses_match_unfused(make_inputs(torch.bfloat16, device, teacher_dtype=torch.float32))


@pytest.mark.parametrize("teacher_dtype", [torch.bfloat16, torch.float16])
def test_float32_student_with_low_precision_teacher(device, teacher_dtype):
    # The teacher's logits stay in its dtype (no float32 copy of them); the student's are float32.
    _assert_both_losses_match_unfused(make_inputs(torch.float32, device, teacher_dtype=teacher_dtype))


def _assert_both_losses_match_unfused(data):
    """Both fused-linear losses, teacher as logits and as hidden states, in chunks of 6 rows, against
    the float64 reference on the unfused logits, at the student's dtype tolerance."""
    for loss_fn, ref_fn, kwargs in (
        (fused_linear_vopd_loss, reference.vopd_loss, dict(tokens=data["tokens"], mask=data["mask"])),
        (fused_linear_reverse_kl_loss, reference.reverse_kl_loss, dict(mask=data["mask"])),
    ):
        for form in ("logits", "hidden"):
            expected = unfused(ref_fn, data, **kwargs)
            actual = fused(loss_fn, data, form, chunk_size=6, **kwargs)
            assert_matches(actual, expected, data["student_hidden"].dtype)


def test_matches_opd_ext_losses_on_materialised_logits(device):
    """Same kernels, same logits: the fused path equals the public unfused losses to fp32 rounding."""
    data = make_inputs(torch.float32, device)
    kwargs = dict(tokens=data["tokens"], mask=data["mask"], weights=data["weights"], baseline="topk", topk=7)
    assert_matches(
        fused(fused_linear_vopd_loss, data, "logits", chunk_size=9, **kwargs),
        unfused(opd_ext.vopd_loss, data, **kwargs),
        torch.float32,
    )
    kwargs = dict(mask=data["mask"], weights=data["weights"], temperature=0.6)
    assert_matches(
        fused(fused_linear_reverse_kl_loss, data, "hidden", chunk_size=9, **kwargs),
        unfused(opd_ext.reverse_kl_loss, data, **kwargs),
        torch.float32,
    )


def test_masked_rows_are_never_computed():
    """Masked positions may hold ignore-index tokens and garbage states: no error, no NaN, zero grad."""
    data = make_inputs(torch.float32, "cpu")
    mask = data["mask"]
    with torch.no_grad():
        data["student_hidden"][~mask] = float("nan")
    data["tokens"][~mask] = -100
    teacher = teacher_kwargs(data, "hidden")
    teacher["teacher_hidden"] = teacher["teacher_hidden"].masked_fill(~mask[:, None], float("nan"))
    loss = fused_linear_vopd_loss(
        data["student_hidden"], data["student_weight"], data["tokens"], mask=mask, chunk_size=4, **teacher
    )
    grad_hidden, grad_weight = torch.autograd.grad(loss, (data["student_hidden"], data["student_weight"]))
    assert torch.isfinite(loss) and torch.isfinite(grad_weight).all()
    assert torch.isfinite(grad_hidden[mask]).all() and (grad_hidden[~mask] == 0).all()


def test_chunks_never_exceed_chunk_size(monkeypatch):
    """The kernels only ever see [chunk, V] logits, never the [N, V] ones."""
    seen_rows = []

    class RecordingOps:
        def __getattr__(self, name):
            op = getattr(opd_ext.ops, name)

            def recorded(student_logits, *args):
                seen_rows.append(student_logits.shape[0])
                return op(student_logits, *args)

            return recorded

    monkeypatch.setattr(fused_linear, "ops", RecordingOps())
    data = make_inputs(torch.float32, "cpu")
    fused(fused_linear_vopd_loss, data, "hidden", tokens=data["tokens"], chunk_size=6)
    # 37 rows in chunks of 6: six full chunks and one of 1; two kernels (stats, backward) per chunk.
    assert sorted(seen_rows) == sorted([6] * 12 + [1] * 2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_peak_memory_is_a_few_chunks_not_the_full_logits():
    rows, hidden, vocab, chunk = 4096, 64, 8192, 256
    gen = torch.Generator(device="cuda").manual_seed(0)
    student_hidden = torch.randn(rows, hidden, device="cuda", generator=gen).requires_grad_()
    weight = torch.randn(vocab, hidden, device="cuda", generator=gen).requires_grad_()
    teacher_weight = torch.randn(vocab, hidden, device="cuda", generator=gen)
    tokens = torch.randint(0, vocab, (rows,), device="cuda", generator=gen)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = fused_linear_vopd_loss(
        student_hidden,
        weight,
        tokens,
        teacher_hidden=student_hidden.detach(),
        teacher_weight=teacher_weight,
        chunk_size=chunk,
    )
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    full_logits = rows * vocab * 4  # one float32 [N, V] tensor: 128 MiB
    # gradients (N·H + 2·V·H floats, ~4 MiB) + a handful of [chunk, V] buffers (8 MiB each)
    assert extra < full_logits / 2, extra


def test_grad_output_scales_gradients_and_no_grad_skips_them():
    data = make_inputs(torch.float32, "cpu")
    kwargs = dict(tokens=data["tokens"], mask=data["mask"], chunk_size=8)
    loss, grads = fused(fused_linear_vopd_loss, data, "logits", **kwargs)
    scaled = -2.5 * fused_linear_vopd_loss(
        data["student_hidden"],
        data["student_weight"],
        student_bias=data["student_bias"],
        **teacher_kwargs(data, "logits"),
        **kwargs,
    )
    scaled_grads = torch.autograd.grad(scaled, student_params(data))
    for grad, scaled_grad in zip(grads, scaled_grads):
        torch.testing.assert_close(scaled_grad, -2.5 * grad)
    with torch.no_grad():
        no_grad_loss = fused_linear_vopd_loss(
            data["student_hidden"],
            data["student_weight"],
            student_bias=data["student_bias"],
            **teacher_kwargs(data, "logits"),
            **kwargs,
        )
    assert not no_grad_loss.requires_grad
    torch.testing.assert_close(no_grad_loss, loss.detach())


def test_frozen_weight_gets_no_gradient():
    data = make_inputs(torch.float32, "cpu", bias=False)
    weight = data["student_weight"].detach()
    loss = fused_linear_reverse_kl_loss(data["student_hidden"], weight, **teacher_kwargs(data, "hidden"))
    loss.backward()
    assert data["student_hidden"].grad is not None and weight.grad is None


def test_default_chunk_size_rule():
    # 256 MiB of float32 logits: 441 rows at Qwen's vocabulary, rounded down to a multiple of 16.
    assert default_chunk_size(4096, 151936) == 432
    assert default_chunk_size(100, 151936) == 100
    assert default_chunk_size(10**6, 32000) == 2096
    assert default_chunk_size(10, 2**40) == 1


# ---- bad input (docs/spec.md §3) -------------------------------------------------------------------------


def call_vopd(data, **overrides):
    args = dict(
        student_hidden=data["student_hidden"],
        student_weight=data["student_weight"],
        tokens=data["tokens"],
        **teacher_kwargs(data, "hidden"),
    )
    args.update(overrides)
    return fused_linear_vopd_loss(args.pop("student_hidden"), args.pop("student_weight"), args.pop("tokens"), **args)


def test_vocabulary_mismatch_says_how_to_slice():
    data = make_inputs(torch.float32, "cpu")
    padded_weight = torch.cat([data["teacher_weight"], torch.zeros(8, TEACHER_HIDDEN)])
    with pytest.raises(ValueError, match=rf"teacher_weight has V={VOCAB + 8}.*teacher_weight\[:{VOCAB}\]"):
        call_vopd(data, teacher_weight=padded_weight, teacher_bias=None)
    # The suggested slice is the fix: padding rows never change the shared-vocabulary loss.
    torch.testing.assert_close(call_vopd(data, teacher_weight=padded_weight[:VOCAB]), call_vopd(data))
    logits_teacher = dict(teacher_hidden=None, teacher_weight=None, teacher_bias=None)
    padded_logits = torch.cat([teacher_kwargs(data, "logits")["teacher_logits"], torch.zeros(N_ROWS, 8)], -1)
    with pytest.raises(ValueError, match=rf"teacher_logits\[\.\.\., :{VOCAB}\]"):
        call_vopd(data, teacher_logits=padded_logits, **logits_teacher)
    # The sliced logits are a strided view; chunks read them without a full copy.
    torch.testing.assert_close(
        call_vopd(data, teacher_logits=padded_logits[..., :VOCAB], chunk_size=5, **logits_teacher), call_vopd(data)
    )
    with pytest.raises(ValueError, match=rf"student_weight\[:{VOCAB - 1}\]"):
        call_vopd(data, teacher_weight=data["teacher_weight"][:-1], teacher_bias=None)


@pytest.mark.parametrize(
    "overrides, error, pattern",
    [
        (dict(teacher_hidden=None, teacher_weight=None, teacher_bias=None), ValueError, "exactly one"),
        (dict(teacher_logits=torch.zeros(N_ROWS, VOCAB)), ValueError, "exactly one"),
        (dict(teacher_weight=None), ValueError, "teacher_hidden and teacher_weight"),
        (dict(student_weight=torch.zeros(VOCAB, HIDDEN + 1)), ValueError, r"student_weight must be .*\[V, H=24\]"),
        (
            dict(student_weight=torch.zeros(VOCAB, HIDDEN, dtype=torch.bfloat16)),
            TypeError,
            "student_weight is torch.bfloat16",
        ),
        (dict(student_bias=torch.zeros(VOCAB + 1)), ValueError, r"student_bias must be \[V=129\]"),
        (
            dict(
                student_hidden=torch.zeros(N_ROWS, HIDDEN, dtype=torch.float16),
                student_weight=torch.zeros(VOCAB, HIDDEN, dtype=torch.float16),
                student_bias=None,
                teacher_hidden=torch.zeros(N_ROWS, TEACHER_HIDDEN, dtype=torch.bfloat16),
                teacher_weight=torch.zeros(VOCAB, TEACHER_HIDDEN, dtype=torch.bfloat16),
                teacher_bias=None,
            ),
            TypeError,
            "unsupported dtype mix.*float32 on one side",
        ),
        (
            dict(teacher_hidden=torch.zeros(N_ROWS + 1, TEACHER_HIDDEN)),
            ValueError,
            "teacher_hidden must have the leading shape",
        ),
        (dict(tokens=torch.zeros(N_ROWS, dtype=torch.int32)), TypeError, "tokens must be int64"),
        (dict(tokens=torch.full((N_ROWS,), VOCAB)), ValueError, r"tokens must be ids in \[0, V=129\) at unmasked"),
        (
            dict(mask=torch.ones(N_ROWS + 1, dtype=torch.bool)),
            ValueError,
            r"mask must have shape \(37,\) \(student_hidden \(37, 24\)",
        ),
        (dict(weights=torch.ones(N_ROWS, dtype=torch.int64)), TypeError, "weights must be a floating"),
        (dict(num_items=-1), ValueError, "num_items must be a non-negative"),
        (dict(kl="forward", baseline="topk"), ValueError, 'needs baseline="full"'),
        (dict(temperature=0.0), ValueError, "temperature must be a positive"),
        (dict(chunk_size=0), ValueError, "chunk_size must be a positive int"),
        (dict(baseline="mean"), ValueError, "baseline must be one of"),
        (dict(baseline="topk", topk=VOCAB + 1), ValueError, "topk=130 is out of range"),
    ],
)
def test_bad_inputs_name_the_argument(overrides, error, pattern):
    data = make_inputs(torch.float32, "cpu")
    with pytest.raises(error, match=pattern):
        call_vopd(data, **overrides)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mismatch():
    data = make_inputs(torch.float32, "cpu")
    with pytest.raises(ValueError, match="teacher is on cuda"):
        call_vopd(
            data,
            teacher_hidden=data["teacher_hidden"].cuda(),
            teacher_weight=data["teacher_weight"].cuda(),
            teacher_bias=None,
        )


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("teacher_form", ["logits", "hidden"])
def test_autocast_runs_with_every_teacher_dtype(autocast_dtype, teacher_dtype, teacher_form):
    # Under autocast the chunks' logits take the autocast dtype, which need not pair with the
    # teacher's (bfloat16 beside float16 logits): that used to fail inside a kernel after validation.
    g = torch.Generator().manual_seed(0)
    n, h, v = 6, 8, 50
    hidden, weight = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g)
    tokens = torch.randint(0, v, (n,), generator=g)
    t_hidden, t_weight = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g)
    teacher = (
        dict(teacher_logits=(t_hidden @ t_weight.T).to(teacher_dtype))
        if teacher_form == "logits"
        else dict(teacher_hidden=t_hidden.to(teacher_dtype), teacher_weight=t_weight.to(teacher_dtype))
    )
    x = hidden.clone().requires_grad_()
    with torch.autocast("cpu", dtype=autocast_dtype):
        loss = opd_ext.fused_linear_vopd_loss(x, weight, tokens, **teacher)
        student_logits = torch.nn.functional.linear(hidden, weight)
        teacher_logits = (
            teacher["teacher_logits"]
            if teacher_form == "logits"
            else torch.nn.functional.linear(teacher["teacher_hidden"], teacher["teacher_weight"])
        )
    loss.backward()
    want = opd_ext.vopd_loss(student_logits.float(), teacher_logits.float(), tokens)
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(loss, want, rtol=2e-2, atol=2e-2)
