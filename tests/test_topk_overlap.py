"""topk_overlap against the reference: exact agreement (docs/spec.md §4), every dtype and odd size."""

import pytest
import torch

import opd_ext
from opd_ext import reference

from conftest import skip_if_emulated

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _pair(rows, vocab, dtype, device, noise=0.5):
    student = torch.randn(rows, vocab, device=device) * 3
    teacher = student + noise * torch.randn(rows, vocab, device=device)
    return student.to(dtype), teacher.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab,k", [(1, 1), (7, 1), (7, 3), (7, 7), (129, 16), (50257, 16), (50257, 64)])
def test_matches_reference(device, dtype, vocab, k):
    rows = 2 if vocab > 1000 else 9
    student, teacher = _pair(rows, vocab, dtype, device)
    got = opd_ext.topk_overlap(student, teacher, k)
    assert got.dtype == torch.float32 and got.shape == (rows,)
    torch.testing.assert_close(got, reference.topk_overlap(student, teacher, k), rtol=0, atol=0)


def test_full_vocabulary_size(device):
    student, teacher = _pair(2, 151936, torch.bfloat16, device)
    for k in (16, 100):
        torch.testing.assert_close(
            opd_ext.topk_overlap(student, teacher, k), reference.topk_overlap(student, teacher, k), rtol=0, atol=0
        )


@pytest.mark.parametrize("k", [300, 1500])
def test_large_k(device, k):
    student, teacher = _pair(3, 4099, torch.float32, device)
    torch.testing.assert_close(
        opd_ext.topk_overlap(student, teacher, k), reference.topk_overlap(student, teacher, k), rtol=0, atol=0
    )


def test_batched_shape(device):
    student, teacher = _pair(2 * 5, 257, torch.float32, device)
    got = opd_ext.topk_overlap(student.view(2, 5, 257), teacher.view(2, 5, 257), 8)
    assert got.shape == (2, 5)
    torch.testing.assert_close(got.view(-1), opd_ext.topk_overlap(student, teacher, 8), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_break_toward_lower_index(device, dtype):
    # Quantised logits: many exact ties at the k-th value.
    student = torch.randint(-3, 3, (16, 301), device=device).to(dtype)
    teacher = torch.randint(-3, 3, (16, 301), device=device).to(dtype)
    for k in (1, 5, 40):
        torch.testing.assert_close(
            opd_ext.topk_overlap(student, teacher, k), reference.topk_overlap(student, teacher, k), rtol=0, atol=0
        )
    # All-equal rows: both top-k are the first k ids, so the overlap is exactly 1.
    flat = torch.zeros(3, 50, device=device, dtype=dtype)
    assert opd_ext.topk_overlap(flat, flat.clone(), 10).eq(1).all()
    # Signed zeros tie as well.
    zeros = torch.zeros(1, 8, device=device)
    zeros[0, ::2] = -0.0
    assert opd_ext.topk_overlap(zeros, torch.zeros_like(zeros), 4).item() == 1.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_inf_and_extreme_logits(device, dtype):
    student, teacher = _pair(6, 513, torch.float32, device)
    student[0, 10:] = float("-inf")  # only 10 finite entries, k > 10 ranks -inf by index
    teacher[1, :] = float("-inf")  # a fully masked row: top-k = first k ids
    student[2, 7] = 1e4
    teacher[2, 300] = -1e4
    teacher[3, 5] = float("inf")
    student, teacher = student.to(dtype), teacher.to(dtype)
    torch.testing.assert_close(
        opd_ext.topk_overlap(student, teacher, 16), reference.topk_overlap(student, teacher, 16), rtol=0, atol=0
    )


def test_nan_poisons_only_its_row(device):
    student, teacher = _pair(4, 97, torch.float32, device)
    student[1, 50] = float("nan")
    teacher[3, 0] = float("nan")
    got = opd_ext.topk_overlap(student, teacher, 8)
    assert got.isnan().tolist() == [False, True, False, True]
    expected = reference.topk_overlap(student, teacher, 8)
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


def test_bf16_student_fp32_teacher(device):
    student, teacher = _pair(5, 1031, torch.float32, device)
    student = student.bfloat16()
    torch.testing.assert_close(
        opd_ext.topk_overlap(student, teacher, 16), reference.topk_overlap(student, teacher, 16), rtol=0, atol=0
    )


@pytest.mark.parametrize("teacher_dtype", [torch.bfloat16, torch.float16])
def test_fp32_student_low_precision_teacher(device, teacher_dtype):
    # Runs as the mirrored (low-precision, fp32) pair; the overlap must still be the caller's, NaN
    # rows included, for aligned, unaligned and strided rows alike.
    student, teacher = _pair(6, 1031, torch.float32, device)
    teacher = teacher.to(teacher_dtype)
    student[2, 7] = float("nan")
    teacher[4, 0] = float("nan")
    for s, t, k in [
        (student, teacher, 16),
        (student[:, 1:998], teacher[:, 5:1002], 16),
        (student[:, 1:1000], teacher[:, 2:1001], 1),
        (student[:1, :], teacher[:1, :], 700),
    ]:
        got = opd_ext.topk_overlap(s, t, k)
        torch.testing.assert_close(got, reference.topk_overlap(s, t, k), rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(got, opd_ext.topk_overlap(t, s, k), rtol=0, atol=0, equal_nan=True)


def test_strided_and_unaligned_rows(device):
    # Slicing to a shared vocabulary gives evenly spaced rows with unaligned starts; different
    # offsets for the two tensors give rows whose alignments never agree (the scalar CUDA path).
    student, teacher = _pair(6, 1000, torch.float32, device)
    for s, t in [opd_ext.align_vocab(student[:, :997], teacher), (student[:, 1:998], teacher[:, 3:1000])]:
        torch.testing.assert_close(opd_ext.topk_overlap(s, t, 16), reference.topk_overlap(s, t, 16), rtol=0, atol=0)


def test_empty_batch(device):
    out = opd_ext.topk_overlap(torch.empty(0, 11, device=device), torch.empty(0, 11, device=device), 3)
    assert out.shape == (0,)


@pytest.mark.parametrize(
    "student_shape,teacher_shape,kwargs,error,match",
    [
        ((4, 10), (4, 12), {"k": 2}, ValueError, r"vocabulary mismatch.*align_vocab"),
        ((4, 10), (3, 10), {"k": 2}, ValueError, r"student_logits \(4, 10\) and teacher_logits \(3, 10\)"),
        ((4, 10), (4, 10), {"k": 0}, ValueError, r"k=0 is out of range"),
        ((4, 10), (4, 10), {"k": 11}, ValueError, r"k=11 is out of range: need 1 <= k <= V=10"),
        ((4, 0), (4, 0), {"k": 1}, ValueError, r"student_logits has an empty vocabulary"),
    ],
)
def test_bad_inputs_name_the_argument(student_shape, teacher_shape, kwargs, error, match):
    with pytest.raises(error, match=match):
        opd_ext.topk_overlap(torch.randn(student_shape), torch.randn(teacher_shape), **kwargs)


def test_bad_dtypes_and_devices():
    with pytest.raises(TypeError, match="student_logits must be float32, bfloat16 or float16"):
        opd_ext.topk_overlap(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3), 1)
    with pytest.raises(TypeError, match="unsupported dtype mix.*float32 on one side"):
        opd_ext.topk_overlap(torch.zeros(2, 3, dtype=torch.float16), torch.zeros(2, 3, dtype=torch.bfloat16), 1)
    with pytest.raises(RuntimeError, match="unsupported dtypes student_logits=Half, teacher_logits=BFloat16"):
        torch.ops.opd_ext.topk_overlap(
            torch.zeros(2, 3, dtype=torch.float16), torch.zeros(2, 3, dtype=torch.bfloat16), 1
        )
    with pytest.raises(TypeError, match="k must be an int"):
        opd_ext.topk_overlap(torch.zeros(2, 3), torch.zeros(2, 3), 1.5)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="on cuda"):
            opd_ext.topk_overlap(torch.zeros(2, 3), torch.zeros(2, 3, device="cuda"), 1)


def test_direct_op_call_checks_arguments():
    with pytest.raises(RuntimeError, match="k=5 must be in"):
        torch.ops.opd_ext.topk_overlap(torch.zeros(2, 3), torch.zeros(2, 3), 5)


def test_opcheck(device):
    skip_if_emulated("opcheck checks the registration on the dispatcher")
    student, teacher = _pair(3, 40, torch.float32, device)
    torch.library.opcheck(torch.ops.opd_ext.topk_overlap.default, (student, teacher, 5))


def test_torch_compile_traces_the_op():
    student, teacher = _pair(4, 64, torch.float32, "cpu")
    compiled = torch.compile(lambda s, t: opd_ext.topk_overlap(s, t, 8) * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(student, teacher), 2 * reference.topk_overlap(student, teacher, 8))
