"""Checks of the CUDA token statistics (opd/cuda/token_stats.cuh): the launch paths the
device-parametrised tests in test_token_stats.py do not reach on purpose (docs/spec.md §4 tolerances against
the float64 reference, and agreement with the CPU kernels). They run on a GPU ("cuda") and on the
SIMT emulator ("emu": CPU tensors, the same CUDA kernels).

Paths: rows whose start is not 16-byte aligned (odd V, storage offsets, column slices) run a scalar
head/tail around the vector body; rows that cannot be aligned together run fully scalar; short
rows share a block (one warp per row); a few long rows are cut into slices merged by a second
kernel; topk > 0 runs the single-pass top-k kernel.
"""

import pytest
import torch

import opd_ext.testing as simt
from opd_ext import reference

from conftest import CUDA_READY, DTYPE_PAIRS, SIMT_READY, STAT_FIELDS, assert_stats_match_reference, stat_tolerance

ops = torch.ops.opd_ext

DEVICE = "cuda"  # where the tensors of the current test live ("cpu" under the emulator)


@pytest.fixture(
    autouse=True,
    params=[
        pytest.param(
            "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA_READY, reason="needs a CUDA device")]
        ),
        pytest.param(
            "emu", marks=[pytest.mark.emu, pytest.mark.skipif(not SIMT_READY, reason="needs the SIMT emulator")]
        ),
    ],
)
def gpu(request):
    global DEVICE
    if request.param == "cuda":
        DEVICE = "cuda"
        yield
        torch.cuda.synchronize()  # a read out of bounds would surface here as an illegal address
        return
    DEVICE = "cpu"
    with simt.emulated_cuda(device="h100"):
        yield


# (layout of the student, layout of the teacher); see _place.
LAYOUTS = [
    ("contiguous", "contiguous"),
    ("row_offset", "row_offset"),  # rows at storage offset r * V + V: odd V misaligns every row
    ("column_3", "column_3"),  # rows of a wider tensor, 3 elements in (align_vocab-like slices)
    ("column_1", "column_2"),  # offsets no common head can align: the all-scalar path
]


def _place(values: torch.Tensor, layout: str) -> torch.Tensor:
    """`values` [R, V] copied to CUDA in the given memory layout (same values, different addresses)."""
    rows, vocab = values.shape
    if layout == "contiguous":
        return values.to(DEVICE)
    if layout == "row_offset":
        base = torch.empty(rows + 1, vocab, dtype=values.dtype, device=DEVICE)
        base[1:] = values.to(DEVICE)
        return base[1:]
    offset = int(layout.removeprefix("column_"))
    base = torch.zeros(rows, vocab + 8, dtype=values.dtype, device=DEVICE)
    base[:, offset : offset + vocab] = values.to(DEVICE)
    return base[:, offset : offset + vocab]


def _pair(rows, vocab, student_dtype, teacher_dtype, layouts=("contiguous", "contiguous")):
    student = torch.randn(rows, vocab) * 3
    teacher = student + torch.randn(rows, vocab)
    return _place(student.to(student_dtype), layouts[0]), _place(teacher.to(teacher_dtype), layouts[1])


def _assert_matches_reference(student, teacher, tokens, temperature=1.0, topk=0):
    got = dict(zip(STAT_FIELDS, ops.token_stats(student, teacher, tokens, temperature, topk)))
    assert_stats_match_reference(got, student, teacher, tokens, temperature, topk)
    return got


@pytest.mark.parametrize("layouts", LAYOUTS, ids="-".join)
@pytest.mark.parametrize("student_dtype,teacher_dtype", DTYPE_PAIRS)
# 7 / 129: several rows per block; 2001: a few rows per block; 50257: a block per row.
@pytest.mark.parametrize("vocab,rows", [(7, 37), (129, 13), (2001, 11), (50257, 3)])
def test_layouts_and_row_groups(layouts, student_dtype, teacher_dtype, vocab, rows):
    student, teacher = _pair(rows, vocab, student_dtype, teacher_dtype, layouts)
    tokens = torch.randint(0, vocab, (rows,), device=DEVICE)
    _assert_matches_reference(student, teacher, tokens, temperature=0.7)
    logprob, lse = ops.student_stats(student, tokens, 0.7)
    want = reference.token_stats(student, student, tokens, 0.7)
    torch.testing.assert_close(logprob.double(), want["student_logprob"], **stat_tolerance(student_dtype))
    torch.testing.assert_close(lse.double(), want["student_lse"], **stat_tolerance(student_dtype))


@pytest.mark.parametrize("student_dtype,teacher_dtype", [DTYPE_PAIRS[0], DTYPE_PAIRS[1], DTYPE_PAIRS[3]])
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_few_long_rows_are_sliced_and_merged(student_dtype, teacher_dtype, rows):
    vocab = 151936
    student, teacher = _pair(rows, vocab, student_dtype, teacher_dtype, ("row_offset", "row_offset"))
    student[0, 5] = float("-inf")  # masked entries and a spike land in different slices
    teacher[-1, vocab - 3] = 30.0
    tokens = torch.randint(0, vocab, (rows,), device=DEVICE)
    _assert_matches_reference(student, teacher, tokens)
    logprob, lse = ops.student_stats(student, tokens, 1.0)
    want = reference.token_stats(student, student, tokens)
    torch.testing.assert_close(lse.double(), want["student_lse"], **stat_tolerance(student_dtype))


@pytest.mark.parametrize("layouts", LAYOUTS[:3], ids="-".join)
@pytest.mark.parametrize("student_dtype,teacher_dtype", [DTYPE_PAIRS[0], DTYPE_PAIRS[1], DTYPE_PAIRS[4]])
@pytest.mark.parametrize("topk", [1, 100, 1024])
def test_topk_path(layouts, student_dtype, teacher_dtype, topk):
    student, teacher = _pair(5, 4099, student_dtype, teacher_dtype, layouts)
    tokens = torch.randint(0, 4099, (5,), device=DEVICE)
    _assert_matches_reference(student, teacher, tokens, temperature=1.3, topk=topk)


def test_topk_path_agrees_with_the_full_pass():
    student, teacher = _pair(9, 3001, torch.float32, torch.float32)
    tokens = torch.randint(0, 3001, (9,), device=DEVICE)
    full = ops.token_stats(student, teacher, tokens, 1.0, 0)
    with_topk = ops.token_stats(student, teacher, tokens, 1.0, 16)
    for name, a, b in zip(STAT_FIELDS, full, with_topk):
        if name != "topk_reverse_kl":
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_topk_above_the_streaming_limit_is_rejected():
    student, teacher = _pair(2, 3000, torch.float32, torch.float32)
    tokens = torch.zeros(2, dtype=torch.long, device=DEVICE)
    with pytest.raises(RuntimeError, match="supports topk <= 1024"):
        ops.token_stats(student, teacher, tokens, 1.0, 1025)


@pytest.mark.parametrize("layouts", LAYOUTS, ids="-".join)
@pytest.mark.parametrize("student_dtype,teacher_dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("vocab,rows", [(129, 13), (50257, 3), (151936, 1)])
def test_backwards_agree_with_cpu(layouts, student_dtype, teacher_dtype, vocab, rows):
    student, teacher = _pair(rows, vocab, student_dtype, teacher_dtype, layouts)
    student[0, 1] = float("-inf")
    tokens = torch.randint(0, vocab, (rows,), device=DEVICE)
    coef = torch.randn(rows, device=DEVICE)
    if rows > 1:
        coef[1] = 0.0
    temperature = 0.8
    _, _, kl, _, _, lse_s, lse_t = ops.token_stats(student, teacher, tokens, temperature, 0)
    eps = {torch.float32: 1e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11}[student_dtype]
    tol = dict(rtol=2 * eps, atol=2 * eps * coef.abs().max().item() / temperature)
    cpu = [x.cpu() for x in (coef, student, teacher, tokens, lse_s, lse_t, kl)]
    c_coef, c_student, c_teacher, c_tokens, c_lse_s, c_lse_t, c_kl = cpu

    got = ops.policy_gradient_backward(coef, student, tokens, lse_s, temperature)
    with simt.cpu_kernels():
        want = ops.policy_gradient_backward(c_coef, c_student, c_tokens, c_lse_s, temperature)
    assert got.dtype == student_dtype and got.is_contiguous()
    torch.testing.assert_close(got.cpu(), want, **tol)

    got = ops.reverse_kl_backward(coef, student, teacher, lse_s, lse_t, kl, temperature)
    with simt.cpu_kernels():
        want = ops.reverse_kl_backward(c_coef, c_student, c_teacher, c_lse_s, c_lse_t, c_kl, temperature)
    torch.testing.assert_close(got.cpu(), want, **tol)
    if rows > 1:
        assert got[1].eq(0).all()


@pytest.mark.parametrize("student_dtype,teacher_dtype", [DTYPE_PAIRS[0], DTYPE_PAIRS[3]])
def test_stats_agree_with_cpu(student_dtype, teacher_dtype):
    student, teacher = _pair(64, 32000, student_dtype, teacher_dtype)
    student[3, ::5] = float("-inf")
    teacher[4, 17] = float("-inf")
    student[5, 9] = float("nan")
    tokens = torch.randint(0, 32000, (64,), device=DEVICE)
    got = ops.token_stats(student, teacher, tokens, 1.0, 0)
    with simt.cpu_kernels():
        want = ops.token_stats(student.cpu(), teacher.cpu(), tokens.cpu(), 1.0, 0)
    for name, a, b in zip(STAT_FIELDS, got, want):
        torch.testing.assert_close(
            a.cpu(), b, **stat_tolerance(student_dtype), equal_nan=True, msg=lambda m: f"{name}: {m}"
        )


def test_results_are_deterministic():
    student, teacher = _pair(3, 151936, torch.bfloat16, torch.bfloat16)
    tokens = torch.randint(0, 151936, (3,), device=DEVICE)
    first = ops.token_stats(student, teacher, tokens, 1.0, 0)
    second = ops.token_stats(student, teacher, tokens, 1.0, 0)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_out_of_range_tokens_raise_and_never_read_outside_the_row():
    student, teacher = _pair(4, 100, torch.float32, torch.float32)
    for bad in (100, -1, 2**40):
        tokens = torch.tensor([0, bad, 1, 2], device=DEVICE)
        with pytest.raises(RuntimeError, match=r"tokens must be in \[0, V=100\)"):
            ops.token_stats(student, teacher, tokens, 1.0, 0)
        with pytest.raises(RuntimeError, match=r"tokens must be in \[0, V=100\)"):
            ops.student_stats(student, tokens, 1.0)
