"""token_stats / student_stats and the fused backward ops against the float64 reference (docs/spec.md §4)."""

import pytest
import torch

import opd_ext
from opd_ext import reference
from opd_ext.ops import MAX_STREAMING_TOPK, runs_cuda_kernels

from conftest import DTYPE_PAIRS, STAT_FIELDS, assert_stats_match_reference, skip_if_emulated, stat_tolerance

ops = torch.ops.opd_ext


def _pair(shape, student_dtype, teacher_dtype, device, scale=3.0, noise=1.0):
    student = torch.randn(shape, device=device) * scale
    teacher = student + noise * torch.randn(shape, device=device)
    return student.to(student_dtype), teacher.to(teacher_dtype)


def _run_stats(student, teacher, tokens, temperature=1.0, topk=0):
    return dict(zip(STAT_FIELDS, ops.token_stats(student, teacher, tokens, temperature, topk)))


def _assert_stats_match(student, teacher, tokens, temperature=1.0, topk=0, fields=STAT_FIELDS):
    got = _run_stats(student, teacher, tokens, temperature, topk)
    assert_stats_match_reference(got, student, teacher, tokens, temperature, topk, fields)


@pytest.mark.parametrize("student_dtype,teacher_dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("vocab", [1, 7, 129, 50257])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_reference(device, student_dtype, teacher_dtype, vocab, temperature):
    rows = 2 if vocab > 1000 else 11
    student, teacher = _pair((rows, vocab), student_dtype, teacher_dtype, device)
    tokens = torch.randint(0, vocab, (rows,), device=device)
    _assert_stats_match(student, teacher, tokens, temperature, topk=min(vocab, 5))


def test_full_vocabulary_size(device):
    student, teacher = _pair((2, 151936), torch.bfloat16, torch.bfloat16, device)
    tokens = torch.randint(0, 151936, (2,), device=device)
    _assert_stats_match(student, teacher, tokens, topk=100)


@pytest.mark.parametrize(
    "vocab,topk", [(129, 1), (129, 16), (129, 100), (129, 129), (3001, 256), (3001, 257), (3001, 3001)]
)
def test_topk_baseline_sizes(device, vocab, topk):
    # k <= 256 streams the top-k in the statistics pass; larger k selects with nth_element.
    student, teacher = _pair((7, vocab), torch.float32, torch.float32, device)
    student[0, : vocab // 2] = student[0, 0]  # a long run of ties around the k-th value
    tokens = torch.randint(0, vocab, (7,), device=device)
    if runs_cuda_kernels(student) and topk > MAX_STREAMING_TOPK:
        with pytest.raises(RuntimeError, match=f"supports topk <= {MAX_STREAMING_TOPK}"):
            ops.token_stats(student, teacher, tokens, 1.0, topk)
        return
    _assert_stats_match(student, teacher, tokens, topk=topk, fields=("topk_reverse_kl",))


@pytest.mark.parametrize("student_dtype,teacher_dtype", DTYPE_PAIRS[:3])
def test_topk_baseline_ties_break_toward_lower_index(device, student_dtype, teacher_dtype):
    # Quantised student logits: many exact ties at the k-th value decide which ids enter K.
    student = torch.randint(-3, 3, (16, 301), device=device).to(student_dtype)
    teacher = torch.randn(16, 301, device=device).to(teacher_dtype)
    tokens = torch.randint(0, 301, (16,), device=device)
    for topk in (1, 5, 40, 280):
        _assert_stats_match(student, teacher, tokens, topk=topk, fields=("topk_reverse_kl",))


def test_batched_shape_and_strided_rows(device):
    student, teacher = _pair((2, 5, 300), torch.float32, torch.float32, device)
    tokens = torch.randint(0, 257, (2, 5), device=device)
    batched = opd_ext.token_stats(student, teacher, tokens)
    assert all(x.shape == (2, 5) for x in batched)
    flat = opd_ext.token_stats(student.view(10, 300), teacher.view(10, 300), tokens.view(10))
    for a, b in zip(batched, flat):
        torch.testing.assert_close(a.view(10), b, rtol=0, atol=0)
    # A shared-vocabulary slice is a strided view; the kernels read it in place.
    s_view, t_view = opd_ext.align_vocab(student, teacher[..., :290])
    _assert_stats_match(s_view, t_view, tokens, topk=7)


def test_forward_kl_field(device):
    student, teacher = _pair((4, 50), torch.float32, torch.float32, device)
    tokens = torch.randint(0, 50, (4,), device=device)
    stats = opd_ext.token_stats(student, teacher, tokens, forward_kl=True)
    assert isinstance(stats, opd_ext.TokenStatsWithForwardKL)
    want = reference.token_stats(student, teacher, tokens)
    torch.testing.assert_close(stats.forward_kl.double(), want["forward_kl"], rtol=1e-5, atol=1e-6)
    student_logprob, teacher_logprob, reverse_kl = opd_ext.token_stats(student, teacher, tokens)
    torch.testing.assert_close(reverse_kl.double(), want["reverse_kl"], rtol=1e-5, atol=1e-6)


def test_identical_rows_have_zero_kl(device):
    student = torch.randn(5, 1000, device=device) * 4
    stats = opd_ext.token_stats(
        student, student.clone(), torch.zeros(5, dtype=torch.long, device=device), forward_kl=True
    )
    assert stats.reverse_kl.abs().max() <= 1e-6 and stats.forward_kl.abs().max() <= 1e-6
    torch.testing.assert_close(stats.student_logprob, stats.teacher_logprob, rtol=0, atol=0)


@pytest.mark.parametrize("student_dtype,teacher_dtype", DTYPE_PAIRS)
def test_minus_inf_entries(device, student_dtype, teacher_dtype):
    inf = float("inf")
    student, teacher = _pair((6, 513), torch.float32, torch.float32, device)
    student[0, ::3] = teacher[0, ::3] = -inf  # masked vocabulary entries: contribute nothing
    teacher[1, 7] = -inf  # teacher forbids a token the student likes
    student[2, 100:] = -inf  # student mass on a prefix only
    teacher[3, :256] = -inf  # teacher mass on a suffix only
    student[3, 256:] = -inf  # ... and the student's too: disjoint supports
    student, teacher = student.to(student_dtype), teacher.to(teacher_dtype)
    tokens = torch.tensor([1, 7, 3, 300, 5, 6], device=device)
    got = _run_stats(student, teacher, tokens, topk=16)
    assert got["reverse_kl"][1] == inf and got["reverse_kl"][3] == inf
    assert got["forward_kl"][2] == inf and got["forward_kl"][3] == inf
    assert torch.isfinite(got["reverse_kl"][[0, 2]]).all() and got["teacher_logprob"][1] == -inf
    _assert_stats_match(student, teacher, tokens, topk=16)


@pytest.mark.parametrize("student_dtype,teacher_dtype", DTYPE_PAIRS[:2])
def test_extreme_logits(device, student_dtype, teacher_dtype):
    student, teacher = _pair((5, 1031), torch.float32, torch.float32, device)
    student[0, 3], teacher[0, 900] = 1e4, 1e4  # spikes at different ids: KL ~ 2e4
    student[1, :] = student[1, :] + 1e4  # huge common offsets (shift invariance)
    teacher[1, :] = teacher[1, :] - 1e4
    student[2, ::2] = -1e4
    teacher[3, :] = 1e4 * torch.sign(teacher[3, :])
    student, teacher = student.to(student_dtype), teacher.to(teacher_dtype)
    tokens = torch.tensor([3, 0, 1, 2, 900], device=device)
    _assert_stats_match(student, teacher, tokens, topk=10)


def test_nan_stays_in_its_row(device):
    student, teacher = _pair((5, 400), torch.float32, torch.float32, device)
    student[1, 17] = float("nan")
    teacher[3, 399] = float("nan")
    tokens = torch.randint(0, 400, (5,), device=device)
    got = _run_stats(student, teacher, tokens, topk=8)
    for name in ("reverse_kl", "forward_kl", "topk_reverse_kl"):
        assert got[name].isnan().tolist() == [False, True, False, True, False], name
    assert got["student_logprob"].isnan().tolist() == [False, True, False, False, False]
    assert got["teacher_logprob"].isnan().tolist() == [False, False, False, True, False]
    _assert_stats_match(student, teacher, tokens, topk=8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [1, 129, 50257])
def test_student_stats(device, dtype, vocab):
    student = (torch.randn(3, vocab, device=device) * 3).to(dtype)
    student[0, 0] = float("-inf") if vocab > 1 else student[0, 0]
    tokens = torch.randint(1 if vocab > 1 else 0, vocab, (3,), device=device)
    logprob, lse = ops.student_stats(student, tokens, 0.9)
    want = reference.token_stats(student, student, tokens, 0.9)
    torch.testing.assert_close(logprob.double(), want["student_logprob"], **stat_tolerance(dtype))
    torch.testing.assert_close(lse.double(), want["student_lse"], **stat_tolerance(dtype))


def test_empty_rows(device):
    student, teacher = _pair((0, 33), torch.float32, torch.float32, device)
    tokens = torch.zeros(0, dtype=torch.long, device=device)
    assert all(x.shape == (0,) for x in opd_ext.token_stats(student, teacher, tokens))


# ---- fused backward ops -------------------------------------------------------------------------


def _grad_tolerance(dtype, coef, temperature):
    # Each entry is coef/τ times an O(1) float32 expression, rounded once to the student's dtype.
    eps = {torch.float32: 1e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    return dict(rtol=2 * eps, atol=2 * eps * coef.abs().max().item() / temperature)


@pytest.mark.parametrize("student_dtype,teacher_dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("vocab", [1, 7, 129, 50257])
def test_backward_ops_match_reference_autograd(device, student_dtype, teacher_dtype, vocab):
    rows, temperature = (2 if vocab > 1000 else 9), 0.8
    student, teacher = _pair((rows, vocab), student_dtype, teacher_dtype, device)
    if vocab > 1:
        student[0, 0] = teacher[0, 0] = float("-inf")
    tokens = torch.randint(vocab - 1 if vocab > 1 else 0, vocab, (rows,), device=device)
    coef = torch.randn(rows, device=device)
    coef[1] = 0.0
    stats = _run_stats(student, teacher, tokens, temperature)

    x = student.double().requires_grad_()
    log_p = torch.log_softmax(x / temperature, -1)
    (coef.double() * log_p.gather(-1, tokens[:, None]).squeeze(-1)).sum().backward()
    got = ops.policy_gradient_backward(coef, student, tokens, stats["student_lse"], temperature)
    assert got.dtype == student_dtype and got.shape == student.shape
    torch.testing.assert_close(got.double(), x.grad, **_grad_tolerance(student_dtype, coef, temperature))

    x = student.double().requires_grad_()
    kl = reference._kl(torch.log_softmax(x / temperature, -1), torch.log_softmax(teacher.double() / temperature, -1))
    (coef.double() * kl).sum().backward()
    got = ops.reverse_kl_backward(
        coef, student, teacher, stats["student_lse"], stats["teacher_lse"], stats["reverse_kl"], temperature
    )
    assert got.dtype == student_dtype and got.shape == student.shape
    torch.testing.assert_close(got.double(), x.grad, **_grad_tolerance(student_dtype, coef, temperature))


def test_zero_coefficient_rows_get_zero_gradient_whatever_the_logits(device):
    student, teacher = _pair((3, 64), torch.float32, torch.float32, device)
    student[1] = float("nan")
    teacher[1] = float("-inf")
    tokens = torch.zeros(3, dtype=torch.long, device=device)
    stats = _run_stats(student, teacher, tokens)
    coef = torch.tensor([1.0, 0.0, 1.0], device=device)
    for grad in (
        ops.policy_gradient_backward(coef, student, tokens, stats["student_lse"], 1.0),
        ops.reverse_kl_backward(
            coef, student, teacher, stats["student_lse"], stats["teacher_lse"], stats["reverse_kl"], 1.0
        ),
    ):
        assert grad[1].eq(0).all() and torch.isfinite(grad[[0, 2]]).all()


# ---- dispatcher integration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "student_dtype,teacher_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)]
)
def test_opcheck(device, student_dtype, teacher_dtype):
    skip_if_emulated("opcheck checks the registration on the dispatcher")
    student, teacher = _pair((2, 3, 37), student_dtype, teacher_dtype, device)
    tokens = torch.randint(0, 37, (2, 3), device=device)
    coef = torch.randn(2, 3, device=device)
    for topk in (0, 5):
        torch.library.opcheck(ops.token_stats, (student, teacher, tokens, 0.5, topk))
    torch.library.opcheck(ops.student_stats, (student, tokens, 0.5))
    _, _, kl, _, _, lse_s, lse_t = ops.token_stats(student, teacher, tokens, 0.5, 0)
    torch.library.opcheck(ops.policy_gradient_backward, (coef, student, tokens, lse_s, 0.5))
    torch.library.opcheck(ops.reverse_kl_backward, (coef, student, teacher, lse_s, lse_t, kl, 0.5))
    torch.library.opcheck(ops.pair_softmax_state, (student, teacher, 0.5))
    outside = torch.where(tokens % 2 == 0, tokens, -1)  # -1: the token lies in another vocabulary shard
    torch.library.opcheck(ops.policy_gradient_backward, (coef, student, outside, lse_s, 0.5))


# ---- vocabulary shards (opd_ext.distributed) ------------------------------------------------------


@pytest.mark.parametrize("student_dtype,teacher_dtype", DTYPE_PAIRS)
def test_pair_softmax_states_of_slices_merge_into_the_row(device, student_dtype, teacher_dtype):
    """The raw state of column slices, merged, gives token_stats' lse and both KLs of the row, at
    ordinary and at |logits| ~ 1e4 (the raw maxima keep the large parts exact), with -inf entries."""
    from opd_ext.distributed.vocab_parallel import merge_states

    for offset in (0.0, 1e4):
        student, teacher = _pair((5, 301), student_dtype, teacher_dtype, device)
        student, teacher = (student.float() + offset).to(student_dtype), (teacher.float() - offset).to(teacher_dtype)
        student[1, ::3] = float("-inf")
        tau = 0.7
        whole = ops.pair_softmax_state(student, teacher, tau)
        assert whole.shape == (5, 6) and whole.dtype == torch.float32
        parts = [
            ops.pair_softmax_state(student[:, a:b], teacher[:, a:b], tau) for a, b in ((0, 100), (100, 290), (290, 301))
        ]
        tokens = torch.zeros(5, dtype=torch.long, device=device)
        want = ops.token_stats(student, teacher, tokens, tau, 0)
        for states in (whole[None], torch.stack(parts)):
            max_s, log_z_s, max_t, log_z_t, reverse, forward = merge_states(states, 1 / tau)
            tol = stat_tolerance(student_dtype)
            torch.testing.assert_close(reverse.float(), want[2], **tol)
            torch.testing.assert_close(forward.float(), want[3], **tol)
            torch.testing.assert_close((max_s / tau + log_z_s).float(), want[5], rtol=1e-6, atol=1e-5)
            torch.testing.assert_close((max_t / tau + log_z_t).float(), want[6], rtol=1e-6, atol=1e-5)


def test_policy_gradient_backward_without_the_token_in_the_shard(device):
    student, _ = _pair((4, 50), torch.float32, torch.float32, device)
    coef = torch.randn(4, device=device)
    lse = torch.logsumexp(student / 0.8, -1)
    got = ops.policy_gradient_backward(coef, student, torch.full((4,), -1, device=device), lse, 0.8)
    want = -coef[:, None] * torch.softmax(student / 0.8, -1) / 0.8
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    with pytest.raises(RuntimeError, match=r"tokens must be in \[-1, V=50\), got -2"):
        ops.policy_gradient_backward(coef, student, torch.full((4,), -2, device=device), lse, 0.8)


# ---- bad input ---------------------------------------------------------------------------------------


def test_bad_inputs_name_the_argument(device):
    student, teacher = _pair((4, 10), torch.float32, torch.float32, device)
    tokens = torch.randint(0, 10, (4,), device=device)
    with pytest.raises(RuntimeError, match=r"tokens must be in \[0, V=10\)"):
        opd_ext.token_stats(student, teacher, torch.tensor([0, 1, 10, 2], device=device))
    with pytest.raises(RuntimeError, match=r"tokens must be in \[0, V=10\)"):
        ops.student_stats(student, torch.tensor([0, -1, 1, 2], device=device), 1.0)
    with pytest.raises(TypeError, match="tokens must be int64"):
        opd_ext.token_stats(student, teacher, tokens.int())
    with pytest.raises(ValueError, match=r"tokens must have shape \(4,\)"):
        opd_ext.token_stats(student, teacher, tokens[:3])
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        opd_ext.token_stats(student, teacher, tokens, temperature=0.0)
    with pytest.raises(ValueError, match=r"align_vocab.*logits\[\.\.\., :10\]"):
        opd_ext.token_stats(student, torch.randn(4, 12, device=device), tokens)
    with pytest.raises(TypeError, match="unsupported dtype mix"):
        opd_ext.token_stats(student.half(), teacher.bfloat16(), tokens)
    with pytest.raises(ValueError, match="empty vocabulary"):
        opd_ext.token_stats(student[:, :0], teacher[:, :0], tokens)
    # Direct op calls are guarded too.
    with pytest.raises(RuntimeError, match=r"topk=11 must be in \[0, V=10\]"):
        ops.token_stats(student, teacher, tokens, 1.0, 11)
    with pytest.raises(RuntimeError, match="temperature must be a positive"):
        ops.token_stats(student, teacher, tokens, -1.0, 0)
    with pytest.raises(RuntimeError, match="coef .* must have the leading shape"):
        ops.policy_gradient_backward(torch.ones(3, device=device), student, tokens, torch.zeros(4, device=device), 1.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mismatch_is_rejected():
    student, teacher = _pair((2, 10), torch.float32, torch.float32, "cpu")
    with pytest.raises(ValueError, match="teacher_logits is on cuda"):
        opd_ext.token_stats(student, teacher.cuda(), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens is on cuda"):
        opd_ext.token_stats(student, teacher, torch.zeros(2, dtype=torch.long, device="cuda"))
