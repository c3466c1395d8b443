"""The top-k KL family (opd_ext.topk_kl_loss) against float64 formulas written out row by row."""

import math

import pytest
import torch

import opd_ext
from opd_ext.objective import TAIL_FLOOR, TOPK_DIVERGENCES


def served_teacher(teacher_logits, k, *, pad_rows=(), duplicate_rows=()):
    """The teacher's top-k as a server returns it: ids by decreasing log-prob, log-probs normalised over
    the full vocabulary; some rows with their last slot padded (-inf), some with an id listed twice."""
    logq = torch.log_softmax(teacher_logits.double(), -1)
    values, ids = logq.topk(k, dim=-1)
    values = values.clone()
    for r in pad_rows:
        values[r, -1] = float("-inf")
        ids[r, -1] = 10**9  # never read: the slot is padded
    for r in duplicate_rows:
        ids[r, -1], values[r, -1] = ids[r, 0], values[r, 0]
    return ids, values.float()


def reference_divergence(student_logits, ids, logq, divergence, temperature):
    """float64 value per row, from the support written out as a Python set per row."""
    logp_full = torch.log_softmax(student_logits.double() / temperature, -1)
    out = []
    for r in range(student_logits.shape[0]):
        slots = {}
        for j in range(ids.shape[1]):
            if math.isinf(float(logq[r, j])) or int(ids[r, j]) in slots:
                continue
            slots[int(ids[r, j])] = logq[r, j].double()
        if not slots:
            out.append(student_logits.new_zeros((), dtype=torch.float64))
            continue
        keys = torch.tensor(list(slots))
        a = logp_full[r, keys]
        t = torch.stack(list(slots.values()))
        p, q = a.exp(), t.exp()
        tail_p, tail_q = 1 - p.sum(), 1 - q.sum()

        def tail(x, y):
            x, y = torch.clamp(x, min=0), torch.clamp(y, min=0)
            if float(x.detach()) == 0:
                return x * 0
            return x * (torch.log(torch.clamp(x, min=TAIL_FLOOR)) - torch.log(torch.clamp(y, min=TAIL_FLOOR)))

        if divergence == "forward":
            value = (q * (t - a)).sum()
        elif divergence == "generalized":
            value = (q * (t - a) - q + p).sum()
        elif divergence == "forward_tail":
            value = (q * (t - a)).sum() + tail(tail_q, tail_p)
        elif divergence == "reverse_tail":
            value = (p * (a - t)).sum() + tail(tail_p, tail_q)
        else:
            pb, qb = p / p.sum(), q / q.sum()
            if divergence == "forward_renormalized":
                value = (qb * (qb.log() - pb.log())).sum()
            else:
                value = (pb * (pb.log() - qb.log())).sum()
        out.append(value)
    return torch.stack(out)


def make_case(rows=10, vocab=257, k=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(rows, vocab, generator=g) * 2
    # Students near the teacher, so the top-k masses are those of a real pair, plus one far row.
    student = (teacher + 0.7 * torch.randn(rows, vocab, generator=g)).to(dtype)
    student[3] = (torch.randn(vocab, generator=g) * 3).to(dtype)
    ids, logq = served_teacher(teacher, k, pad_rows=(1, 4), duplicate_rows=(2,))
    return student, ids, logq


@pytest.mark.parametrize("divergence", TOPK_DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_value_and_gradient_match_float64(device, divergence, dtype, temperature):
    student, ids, logq = make_case(dtype=dtype)
    mask = torch.ones(student.shape[0], dtype=torch.bool)
    mask[5] = False
    weights = torch.linspace(0.5, 1.5, student.shape[0])

    x = student.clone().requires_grad_(True)
    loss, stats = opd_ext.topk_kl_loss(
        x,
        ids,
        logq,
        divergence=divergence,
        mask=mask,
        weights=weights,
        temperature=temperature,
        reduction="sum",
        return_stats=True,
    )
    loss.backward()

    ref_x = student.double().clone().requires_grad_(True)
    per_row = reference_divergence(ref_x, ids, logq, divergence, temperature)
    ref_loss = (per_row * weights.double() * mask.double()).sum()
    ref_loss.backward()

    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss.double(), ref_loss.detach(), **tol)
    torch.testing.assert_close(stats.divergence.double(), torch.where(mask, per_row.detach(), 0.0), **tol)
    assert x.grad.dtype == dtype
    # Gradients: rounded once to the student's dtype (docs/spec.md §4).
    grad_tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), ref_x.grad, **grad_tol)
    assert torch.all(x.grad[5] == 0)


def test_forward_is_not_clamped_and_matches_verls_formula():
    # A student that puts more mass on the teacher's top-k than the teacher does: Σ_S q log(q/p) < 0.
    teacher = torch.zeros(2, 50)
    teacher[:, :4] = 2.0
    student = torch.zeros(2, 50)
    student[:, :4] = 4.0
    ids, logq = served_teacher(teacher, 4)
    x = student.clone().requires_grad_(True)
    loss = opd_ext.topk_kl_loss(x, ids, logq, divergence="forward", reduction="none")
    logp = torch.log_softmax(student.double(), -1).gather(-1, ids)
    want = (logq.double().exp() * (logq.double() - logp)).sum(-1)
    assert torch.all(want < 0)
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-7)
    loss.sum().backward()
    assert x.grad.abs().sum() > 0  # a clamp at 0 would have zeroed it


def test_tail_divergences_are_nonnegative_and_zero_at_the_teacher(device):
    teacher = torch.randn(6, 300) * 3
    ids, logq = served_teacher(teacher, 16)
    for divergence in ("forward_tail", "reverse_tail", "generalized", "forward_renormalized", "reverse_renormalized"):
        same = opd_ext.topk_kl_loss(teacher, ids, logq, divergence=divergence, reduction="none")
        torch.testing.assert_close(same, torch.zeros(6), atol=2e-6, rtol=0)
        other = opd_ext.topk_kl_loss(torch.randn(6, 300), ids, logq, divergence=divergence, reduction="none")
        assert torch.all(other > 0), divergence


def test_stats_masses_and_entropy():
    student, ids, logq = make_case()
    _, stats = opd_ext.topk_kl_loss(student, ids, logq, return_stats=True)
    logp = torch.log_softmax(student.double(), -1)
    for r in (0, 6):  # rows without padding or repeats
        torch.testing.assert_close(stats.student_mass[r].double(), logp[r, ids[r]].exp().sum(), rtol=1e-5, atol=0)
        q = logq[r].double().exp()
        torch.testing.assert_close(stats.teacher_mass[r].double(), q.sum(), rtol=1e-6, atol=0)
        entropy = -(q * q.log()).sum() - (1 - q.sum()) * torch.log(1 - q.sum())
        torch.testing.assert_close(stats.teacher_entropy[r].double(), entropy, rtol=1e-5, atol=0)
    means = stats.means()
    assert set(means) == {"divergence", "student_mass", "teacher_mass", "teacher_entropy"}


def test_reductions_and_num_items_agree(device):
    student, ids, logq = make_case(rows=8)
    terms = opd_ext.topk_kl_loss(student, ids, logq, reduction="none")
    total = opd_ext.topk_kl_loss(student, ids, logq, reduction="sum")
    torch.testing.assert_close(terms.sum(), total)
    mean = opd_ext.topk_kl_loss(student, ids, logq, num_items=4)
    torch.testing.assert_close(mean, total / 4)
    empty = opd_ext.topk_kl_loss(student[:0], ids[:0], logq[:0])
    assert float(empty) == 0.0


def test_three_dim_logits_and_non_contiguous():
    student, ids, logq = make_case(rows=12)
    s3 = student.view(3, 4, -1).transpose(0, 1)  # non-contiguous [4, 3, V]
    i3, q3 = ids.view(3, 4, -1).transpose(0, 1), logq.view(3, 4, -1).transpose(0, 1)
    x = s3.detach().clone().requires_grad_(True)
    opd_ext.topk_kl_loss(x, i3, q3, reduction="sum").backward()
    y = student.clone().requires_grad_(True)
    opd_ext.topk_kl_loss(y, ids, logq, reduction="sum").backward()
    torch.testing.assert_close(x.grad.transpose(0, 1).reshape(12, -1), y.grad)


def test_teacher_tail_of_zero_gives_a_finite_value():
    # A served top-k that sums past 1 by rounding: the teacher's tail is 0, the student's is not.
    teacher = torch.full((1, 20), -30.0)
    teacher[0, :3] = 5.0
    ids, logq = served_teacher(teacher, 3)
    logq = logq + 1e-6  # Q slightly above 1
    x = torch.zeros(1, 20, requires_grad=True)
    for divergence in ("forward_tail", "reverse_tail"):
        value = opd_ext.topk_kl_loss(x, ids, logq, divergence=divergence, reduction="sum")
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(x.grad).all()
        x.grad = None


def test_bad_divergence_is_named():
    student, ids, logq = make_case(rows=6)
    with pytest.raises(ValueError, match="divergence"):
        opd_ext.topk_kl_loss(student, ids, logq, divergence="backward")


@pytest.mark.parametrize("divergence", ["reverse_tail", "reverse_renormalized"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_student_topk_reverse_kl_matches_float64(device, divergence, dtype):
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(7, 131, generator=g) * 2
    student = (teacher + torch.randn(7, 131, generator=g)).to(dtype)
    mask = torch.tensor([True, True, False, True, True, True, True])
    k, tau = 5, 0.9
    x = student.clone().requires_grad_(True)
    loss = opd_ext.student_topk_kl_loss(x, teacher, k=k, divergence=divergence, mask=mask, temperature=tau)
    loss.backward()

    ref = student.double().clone().requires_grad_(True)
    ids = student.double().topk(k, dim=-1).indices
    a = torch.log_softmax(ref / tau, -1).gather(-1, ids)
    t = torch.log_softmax(teacher.double() / tau, -1).gather(-1, ids)
    p, q = a.exp(), t.exp()
    if divergence == "reverse_tail":
        tail_p, tail_q = 1 - p.sum(-1), 1 - q.sum(-1)
        per_row = (p * (a - t)).sum(-1) + tail_p * (tail_p.log() - tail_q.log())
    else:
        pb = p / p.sum(-1, keepdim=True)
        qb = q / q.sum(-1, keepdim=True)
        per_row = (pb * (pb.log() - qb.log())).sum(-1)
    want = (per_row * mask).sum() / mask.sum()
    want.backward()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss.double(), want.detach(), **tol)
    grad_tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), ref.grad, **grad_tol)


def test_topk_kl_module_is_the_function():
    student, ids, logq = make_case()
    module = opd_ext.TopkKLLoss(divergence="reverse_tail", temperature=0.8)
    assert "reverse_tail" in repr(module)
    torch.testing.assert_close(
        module(student, ids, logq), opd_ext.topk_kl_loss(student, ids, logq, divergence="reverse_tail", temperature=0.8)
    )
    with pytest.raises(ValueError, match="divergence"):
        opd_ext.TopkKLLoss(divergence="nope")
