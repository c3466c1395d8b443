"""vopd_loss / reverse_kl_loss and the served-teacher variants: values and gradients against the
float64 reference's autograd (the kernels take float32/bf16/fp16 only, so torch.autograd.gradcheck
in float64 is replaced by this comparison), masks / weights / num_items, torch.compile, bad input."""

import pytest
import torch

import opd_ext
from opd_ext import reference

from conftest import DTYPE_PAIRS, skip_if_emulated

VOPD_VARIANTS = [
    dict(baseline="full"),
    dict(baseline="full", kl="forward"),
    dict(baseline="topk", topk=5),
    dict(baseline="none"),
]


def _pair(shape, student_dtype, teacher_dtype, device, scale=2.0, noise=1.0):
    student = torch.randn(shape, device=device) * scale
    teacher = student + noise * torch.randn(shape, device=device)
    return student.to(student_dtype), teacher.to(teacher_dtype)


def _loss_tolerance(dtype):
    return dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-4, atol=1e-6)


def _grad_tolerance(dtype, reference_grad):
    # float32 math, one rounding to the student's dtype at the end. Entries are O(w/norm) = O(1/rows)
    # times O(1) factors, which sets the absolute floor where the true gradient is ~0 (V = 1).
    eps = {torch.float32: 1e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    rows = reference_grad[..., 0].numel()
    return dict(rtol=2 * eps, atol=2 * eps * max(reference_grad.abs().max().item(), 1 / rows))


def _compare(loss_fn, reference_fn, student, *args, **kwargs):
    """Value and ∂/∂student of loss_fn (kernels) vs reference_fn (float64 autograd)."""
    x = student.detach().clone().requires_grad_()
    loss = loss_fn(x, *args, **kwargs)
    loss.backward()
    x_ref = student.detach().double().requires_grad_()
    want = reference_fn(x_ref, *args, **kwargs)
    want.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert x.grad.dtype == student.dtype and x.grad.shape == student.shape
    torch.testing.assert_close(loss.double(), want.detach(), **_loss_tolerance(student.dtype))
    torch.testing.assert_close(x.grad.double(), x_ref.grad, **_grad_tolerance(student.dtype, x_ref.grad))
    return loss, x.grad


def _row_inputs(lead, vocab, device):
    tokens = torch.randint(0, vocab, lead, device=device)
    mask = torch.rand(lead, device=device) > 0.3
    mask.view(-1)[0] = True
    weights = torch.rand(lead, device=device) + 0.5
    return tokens, mask, weights


@pytest.mark.parametrize("student_dtype,teacher_dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("variant", VOPD_VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
@pytest.mark.parametrize("shape", [(13, 129), (2, 5, 7)], ids=["NV", "BTV"])
def test_vopd_loss_matches_reference(device, student_dtype, teacher_dtype, variant, shape):
    student, teacher = _pair(shape, student_dtype, teacher_dtype, device)
    tokens, mask, weights = _row_inputs(shape[:-1], shape[-1], device)
    _compare(
        opd_ext.vopd_loss,
        reference.vopd_loss,
        student,
        teacher,
        tokens,
        mask=mask,
        weights=weights,
        temperature=0.8,
        **variant,
    )


@pytest.mark.parametrize("student_dtype,teacher_dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("shape", [(13, 129), (2, 5, 7), (3, 1)], ids=["NV", "BTV", "V1"])
def test_reverse_kl_loss_matches_reference(device, student_dtype, teacher_dtype, shape):
    student, teacher = _pair(shape, student_dtype, teacher_dtype, device)
    _, mask, weights = _row_inputs(shape[:-1], shape[-1], device)
    _compare(
        opd_ext.reverse_kl_loss,
        reference.reverse_kl_loss,
        student,
        teacher,
        mask=mask,
        weights=weights,
        temperature=1.3,
    )


def test_large_vocabulary(device):
    student, teacher = _pair((2, 50257), torch.bfloat16, torch.float32, device)
    tokens, mask, weights = _row_inputs((2,), 50257, device)
    _compare(opd_ext.vopd_loss, reference.vopd_loss, student, teacher, tokens, baseline="topk", topk=100)
    _compare(opd_ext.reverse_kl_loss, reference.reverse_kl_loss, student, teacher, weights=weights)


def test_defaults_without_mask_or_weights(device):
    student, teacher = _pair((6, 40), torch.float32, torch.float32, device)
    tokens = torch.randint(0, 40, (6,), device=device)
    _compare(opd_ext.vopd_loss, reference.vopd_loss, student, teacher, tokens)
    _compare(opd_ext.reverse_kl_loss, reference.reverse_kl_loss, student, teacher)


def test_minus_inf_and_extreme_logits(device):
    student, teacher = _pair((5, 300), torch.float32, torch.float32, device)
    student[0, ::2] = teacher[0, ::2] = float("-inf")  # masked vocabulary
    student[1, 10] = 1e4
    teacher[2, 7] = 1e4
    teacher[3, 5] = -1e4
    student[4, ::3] = -1e4
    tokens = torch.tensor([1, 10, 3, 5, 7], device=device)
    for variant in VOPD_VARIANTS:
        _compare(opd_ext.vopd_loss, reference.vopd_loss, student, teacher, tokens, **variant)
    _compare(opd_ext.reverse_kl_loss, reference.reverse_kl_loss, student, teacher)


def test_large_common_offset(device):
    # Rows whose mass sits around ±1e4: values (log-probs, KL) stay exact (the kernels work with
    # distances to the row max), but the backward ops receive lse as a float32, which rounds to
    # ulp(1e4) ~ 1e-3; the gradient then carries that relative error. Documented limitation.
    student, teacher = _pair((3, 200), torch.float32, torch.float32, device)
    student[0] += 1e4
    teacher[1] -= 1e4
    tokens = torch.randint(0, 200, (3,), device=device)
    for loss_fn, reference_fn, args in (
        (opd_ext.vopd_loss, reference.vopd_loss, (teacher, tokens)),
        (opd_ext.reverse_kl_loss, reference.reverse_kl_loss, (teacher,)),
    ):
        x = student.clone().requires_grad_()
        loss = loss_fn(x, *args)
        loss.backward()
        x_ref = student.double().requires_grad_()
        want = reference_fn(x_ref, *args)
        want.backward()
        torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=2e-3, atol=2e-3 * x_ref.grad.abs().max().item())


def test_teacher_minus_inf_under_student_mass_gives_infinite_reverse_kl_loss(device):
    student, teacher = _pair((2, 30), torch.float32, torch.float32, device)
    teacher[1, student[1].argmax()] = float("-inf")
    assert opd_ext.reverse_kl_loss(student, teacher).item() == float("inf")
    # ... and masking that position out makes it finite again.
    mask = torch.tensor([True, False], device=device)
    _compare(opd_ext.reverse_kl_loss, reference.reverse_kl_loss, student, teacher, mask=mask)


def test_masked_positions_may_hold_anything(device):
    student, teacher = _pair((6, 50), torch.float32, torch.float32, device)
    mask = torch.tensor([True, False, True, False, True, True], device=device)
    tokens = torch.randint(0, 50, (6,), device=device)
    tokens[~mask] = -100  # the usual padding label
    student[1] = float("nan")
    teacher[3] = float("-inf")
    for loss_fn in (
        lambda x: opd_ext.vopd_loss(x, teacher, tokens, mask=mask),
        lambda x: opd_ext.vopd_loss(x, teacher, tokens, mask=mask, baseline="topk", topk=4),
        lambda x: opd_ext.reverse_kl_loss(x, teacher, mask=mask),
    ):
        x = student.clone().requires_grad_()
        loss = loss_fn(x)
        loss.backward()
        assert torch.isfinite(loss)
        assert x.grad[~mask].eq(0).all() and torch.isfinite(x.grad).all()
    clean = torch.where(mask[:, None], student, 0.0)
    clean_teacher = torch.where(mask[:, None], teacher, 0.0)
    torch.testing.assert_close(
        opd_ext.vopd_loss(student, teacher, tokens, mask=mask),
        opd_ext.vopd_loss(clean, clean_teacher, tokens.clamp(min=0), mask=mask),
    )


def _every_loss(lead, vocab, device, hidden=6):
    """(name, call) for every public loss; call(**kwargs) builds fresh leaves with leading shape
    ``lead`` and returns (loss, leaves whose gradients the loss defines)."""
    student, teacher = _pair(lead + (vocab,), torch.float32, torch.float32, device)
    tokens = torch.randint(0, vocab, lead, device=device)
    k = min(4, vocab)
    ids, topk_logprobs, token_logprob = _served_teacher(teacher, tokens, k)
    h = torch.randn(lead + (hidden,), device=device)
    w = torch.randn(vocab, hidden, device=device)

    def logits_loss(fn, *args, **fixed):
        def call(**kwargs):
            x = student.clone().requires_grad_()
            return fn(x, *args, **fixed, **kwargs), [x]

        return call

    def fused_loss(fn, *args, **fixed):
        def call(**kwargs):
            hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
            return fn(hh, ww, *args, teacher_logits=teacher, **fixed, **kwargs), [hh, ww]

        return call

    calls = {
        f"vopd_loss[{b}]": logits_loss(opd_ext.vopd_loss, teacher, tokens, baseline=b, topk=k)
        for b in ("full", "topk", "none")
    }
    calls["vopd_loss[forward]"] = logits_loss(opd_ext.vopd_loss, teacher, tokens, kl="forward")
    calls["reverse_kl_loss"] = logits_loss(opd_ext.reverse_kl_loss, teacher)
    calls["vopd_loss_sparse_teacher"] = logits_loss(
        opd_ext.vopd_loss_sparse_teacher, tokens, ids, topk_logprobs, token_logprob
    )
    calls["reverse_kl_loss_sparse_teacher"] = logits_loss(opd_ext.reverse_kl_loss_sparse_teacher, ids, topk_logprobs)
    calls["fused_linear_vopd_loss"] = fused_loss(opd_ext.fused_linear_vopd_loss, tokens)
    calls["fused_linear_reverse_kl_loss"] = fused_loss(opd_ext.fused_linear_reverse_kl_loss)
    return calls


ZERO_COUNTS = [None, 0, 0.0, "tensor(0)", "tensor(0.)", "tensor([0])"]


def _count(form, device):
    return torch.tensor(eval(form[len("tensor") :]), device=device) if isinstance(form, str) else form


@pytest.mark.parametrize("batch", ["all_masked", "empty_NV", "empty_BTV"])
def test_degenerate_normalisers_give_exactly_zero_loss_and_gradients(device, batch):
    """No valid token (all masked, or no rows at all) and any form of a zero count: every loss is
    exactly 0 and every gradient exactly 0, never NaN (0/0) and never an error."""
    lead = {"all_masked": (4,), "empty_NV": (0,), "empty_BTV": (2, 0)}[batch]
    for name, call in _every_loss(lead, 32, device).items():
        for form in ZERO_COUNTS:
            kwargs = dict(num_items=_count(form, device))
            if batch == "all_masked":
                kwargs["mask"] = torch.zeros(lead, dtype=torch.bool, device=device)
            loss, leaves = call(**kwargs)
            loss.backward()
            assert loss.dtype == torch.float32 and loss.item() == 0, (name, form, loss)
            for leaf in leaves:
                assert leaf.grad is not None and leaf.grad.shape == leaf.shape, (name, form)
                assert leaf.grad.eq(0).all(), (name, form)


def test_num_items_forms_agree_and_bad_counts_are_refused(device):
    """int, float, 0-d and one-element tensors (int or float) give one value; a negative or
    non-finite number, a bool or a multi-element tensor is refused by name."""
    for name, call in _every_loss((5,), 32, device).items():
        values = [
            call(num_items=form)[0]
            for form in (3, 3.0, torch.tensor(3, device=device), torch.tensor([3.0], device=device))
        ]
        for value in values[1:]:
            torch.testing.assert_close(value, values[0], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(call(num_items=1.5)[0], call(num_items=3)[0] * 2, msg=name)
        for bad, error, message in (
            (-1, ValueError, "non-negative finite"),
            (float("nan"), ValueError, "non-negative"),
            (float("inf"), ValueError, "finite"),
            (True, TypeError, "got bool"),
            ("3", TypeError, "got str"),
            (torch.ones(2, device=device), ValueError, "one-element"),
            (torch.tensor(True), ValueError, "real tensor"),
        ):
            with pytest.raises(error, match=message):
                call(num_items=bad)


def test_num_items_replaces_the_token_count(device):
    student, teacher = _pair((2, 4, 33), torch.float32, torch.float32, device)
    tokens, mask, weights = _row_inputs((2, 4), 33, device)
    count = mask.sum().item()
    for loss_fn, extra in ((opd_ext.vopd_loss, (tokens,)), (opd_ext.reverse_kl_loss, ())):
        by_count = loss_fn(student, teacher, *extra, mask=mask, weights=weights)
        by_global = loss_fn(student, teacher, *extra, mask=mask, weights=weights, num_items=4 * count)
        as_tensor = loss_fn(
            student, teacher, *extra, mask=mask, weights=weights, num_items=torch.tensor(4.0 * count, device=device)
        )
        torch.testing.assert_close(by_global * 4, by_count)
        torch.testing.assert_close(as_tensor, by_global)
    _compare(opd_ext.vopd_loss, reference.vopd_loss, student, teacher, tokens, mask=mask, num_items=1000)


def test_gradient_scales_with_upstream_gradient_and_skips_teacher(device):
    student, teacher = _pair((4, 25), torch.float32, torch.float32, device)
    tokens = torch.randint(0, 25, (4,), device=device)
    x = student.clone().requires_grad_()
    t = teacher.clone().requires_grad_()
    (opd_ext.vopd_loss(x, t, tokens) * 3.0).backward()
    assert t.grad is None
    x_ref = student.clone().requires_grad_()
    opd_ext.vopd_loss(x_ref, teacher, tokens).backward()
    torch.testing.assert_close(x.grad, 3.0 * x_ref.grad)


# ---- served teachers ---------------------------------------------------------------------------------


def _served_teacher(teacher, tokens, k):
    log_q = torch.log_softmax(teacher.float(), -1)
    ids = torch.topk(log_q, k).indices
    return ids, log_q.gather(-1, ids), log_q.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("baseline", ["topk", "none"])
@pytest.mark.parametrize("shape", [(9, 129), (2, 3, 50)], ids=["NV", "BTV"])
def test_vopd_loss_sparse_teacher_matches_reference(device, dtype, baseline, shape):
    student, teacher = _pair(shape, dtype, torch.float32, device)
    tokens, mask, weights = _row_inputs(shape[:-1], shape[-1], device)
    ids, topk_logprobs, token_logprob = _served_teacher(teacher, tokens, 8)
    _compare(
        opd_ext.vopd_loss_sparse_teacher,
        reference.vopd_loss_sparse_teacher,
        student,
        tokens,
        ids,
        topk_logprobs,
        token_logprob,
        mask=mask,
        weights=weights,
        temperature=0.9,
        baseline=baseline,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(9, 129), (2, 3, 50)], ids=["NV", "BTV"])
def test_reverse_kl_loss_sparse_teacher_matches_reference(device, dtype, shape):
    student, teacher = _pair(shape, dtype, torch.float32, device)
    tokens, mask, weights = _row_inputs(shape[:-1], shape[-1], device)
    ids, topk_logprobs, _ = _served_teacher(teacher, tokens, 8)
    _compare(
        opd_ext.reverse_kl_loss_sparse_teacher,
        reference.reverse_kl_loss_sparse_teacher,
        student,
        ids,
        topk_logprobs,
        mask=mask,
        weights=weights,
        temperature=0.9,
    )


def test_sparse_teacher_with_full_support_equals_dense_losses(device):
    # k = V: the teacher's "top-k" is the whole distribution, so both served-teacher losses must
    # reduce to the dense ones (top-k baseline over all ids = the full baseline).
    student, teacher = _pair((7, 31), torch.float32, torch.float32, device)
    tokens, mask, weights = _row_inputs((7,), 31, device)
    ids, topk_logprobs, token_logprob = _served_teacher(teacher, tokens, 31)
    torch.testing.assert_close(
        opd_ext.vopd_loss_sparse_teacher(
            student, tokens, ids, topk_logprobs, token_logprob, mask=mask, weights=weights
        ),
        opd_ext.vopd_loss(student, teacher, tokens, mask=mask, weights=weights),
        rtol=1e-5,
        atol=1e-6,
    )
    torch.testing.assert_close(
        opd_ext.reverse_kl_loss_sparse_teacher(student, ids, topk_logprobs, mask=mask, weights=weights),
        opd_ext.reverse_kl_loss(student, teacher, mask=mask, weights=weights),
        rtol=1e-5,
        atol=1e-6,
    )


def test_sparse_teacher_masked_positions_may_hold_anything(device):
    student, teacher = _pair((4, 40), torch.float32, torch.float32, device)
    mask = torch.tensor([True, False, True, True], device=device)
    tokens = torch.where(mask, torch.randint(0, 40, (4,), device=device), -100)
    ids, topk_logprobs, token_logprob = _served_teacher(teacher, tokens.clamp(min=0), 6)
    student[1] = float("nan")
    topk_logprobs[1] = float("nan")
    token_logprob[1] = float("nan")
    for loss_fn in (
        lambda x: opd_ext.vopd_loss_sparse_teacher(x, tokens, ids, topk_logprobs, token_logprob, mask=mask),
        lambda x: opd_ext.reverse_kl_loss_sparse_teacher(x, ids, topk_logprobs, mask=mask),
    ):
        x = student.clone().requires_grad_()
        loss = loss_fn(x)
        loss.backward()
        assert torch.isfinite(loss) and x.grad[1].eq(0).all() and torch.isfinite(x.grad).all()


def _as_served(ids, topk_logprobs, tokens, token_logprob, g):
    """The same teacher as a server sends it: vLLM's sampled token appended (k + 1 slots, its id
    possibly already among the top-k), ragged rows (some slots dropped to padding) padded with
    -inf slots holding junk ids, and the slots shuffled. Returns (ids, log-probs)."""
    junk = torch.where(torch.rand(ids.shape[:-1] + (2,), generator=g) < 0.5, -1, 10**6).to(ids.device)
    ids = torch.cat([ids, tokens.unsqueeze(-1), junk], -1)
    logprobs = torch.cat(
        [topk_logprobs, token_logprob.unsqueeze(-1), torch.full_like(topk_logprobs[..., :2], float("-inf"))], -1
    )
    dropped = (torch.rand(ids.shape, generator=g) < 0.2).to(ids.device)
    logprobs = torch.where(dropped, float("-inf"), logprobs)
    order = torch.argsort(torch.rand(ids.shape, generator=g), -1).to(ids.device)
    return ids.gather(-1, order), logprobs.gather(-1, order)


def _dedup_dense_support(ids, logprobs):
    """The reference's view of a served row set: id -> log-prob, first slot wins, padding dropped."""
    rows = []
    for row_ids, row_lp in zip(ids.reshape(-1, ids.shape[-1]).tolist(), logprobs.reshape(-1, ids.shape[-1]).tolist()):
        seen = {}
        for i, lp in zip(row_ids, row_lp):
            if lp != float("-inf") and i not in seen:
                seen[i] = lp
        rows.append(seen)
    return rows


def test_sparse_teacher_support_is_a_set(device):
    """vLLM's prompt logprobs list the sampled token beside the top-k, so an id can appear twice:
    it counts once. [[3, 3, 1, 4]] gives the loss of [[3, 1, 4]] (0.4966 here; counting the
    duplicate twice gave 0.4785)."""
    student = torch.tensor([[0.5, 1.0, -0.3, 2.0, 0.7, -1.2]], device=device)
    teacher = torch.tensor([[0.1, 1.5, 0.2, 0.4, 1.1, -0.5]], device=device)
    log_q = teacher.log_softmax(-1)
    for with_dup, without in (([[3, 3, 1, 4]], [[3, 1, 4]]), ([[1, 4, 3, 4, 4]], [[1, 4, 3]])):
        ids_dup, ids = torch.tensor(with_dup, device=device), torch.tensor(without, device=device)
        for fn in (opd_ext.reverse_kl_loss_sparse_teacher, reference.reverse_kl_loss_sparse_teacher):
            torch.testing.assert_close(
                fn(student, ids_dup, log_q.gather(-1, ids_dup)).float(), fn(student, ids, log_q.gather(-1, ids)).float()
            )
    want = reference.reverse_kl_loss_sparse_teacher(
        student.double(),
        torch.tensor([[3, 1, 4]], device=device),
        log_q.gather(-1, torch.tensor([[3, 1, 4]], device=device)),
    )
    assert abs(want.item() - 0.4966) < 1e-4, want.item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_teacher_takes_inputs_as_servers_send_them(device, dtype):
    """Duplicated sampled ids, -inf padded slots with junk ids and shuffled slots: values and
    gradients of both served-teacher losses match the float64 reference on the deduplicated set,
    and the -inf padding is the same as a slot mask."""
    g = torch.Generator().manual_seed(3)
    student, teacher = _pair((6, 5, 37), dtype, torch.float32, device)
    tokens, mask, weights = _row_inputs((6, 5), 37, device)
    ids, topk_logprobs, token_logprob = _served_teacher(teacher, tokens, 6)
    served_ids, served_lp = _as_served(ids, topk_logprobs, tokens, token_logprob, g)
    assert any(len(row) < 8 for row in _dedup_dense_support(served_ids, served_lp))  # duplicates or padding present
    common = dict(mask=mask, weights=weights, temperature=0.8)
    _compare(
        opd_ext.reverse_kl_loss_sparse_teacher,
        reference.reverse_kl_loss_sparse_teacher,
        student,
        served_ids,
        served_lp,
        **common,
    )
    for baseline in ("topk", "none"):
        _compare(
            opd_ext.vopd_loss_sparse_teacher,
            reference.vopd_loss_sparse_teacher,
            student,
            tokens,
            served_ids,
            served_lp,
            token_logprob,
            baseline=baseline,
            **common,
        )
    # The same padding given as a slot mask: the masked slots may then hold anything, NaN included.
    slot_mask = served_lp != float("-inf")
    junk_lp = torch.where(slot_mask, served_lp, float("nan"))
    for fn, args in (
        (opd_ext.reverse_kl_loss_sparse_teacher, (served_ids, served_lp)),
        (opd_ext.vopd_loss_sparse_teacher, (tokens, served_ids, served_lp, token_logprob)),
    ):
        x, y = student.clone().requires_grad_(), student.clone().requires_grad_()
        by_mask = fn(x, *(junk_lp if a is served_lp else a for a in args), teacher_topk_mask=slot_mask, **common)
        by_inf = fn(y, *args, **common)
        by_mask.backward()
        by_inf.backward()
        assert torch.isfinite(by_mask)
        torch.testing.assert_close(by_mask, by_inf, rtol=0, atol=0)
        torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=0)


def test_sparse_teacher_log_probs_may_be_unnormalised_and_empty_supports_count_zero(device):
    """Renormalised over the support: a per-position shift of the teacher's log-probs (raw logits,
    a partial top-k) changes nothing; a valid position whose slots are all padding contributes 0."""
    student, teacher = _pair((5, 30), torch.float32, torch.float32, device)
    tokens, _, _ = _row_inputs((5,), 30, device)
    ids, topk_logprobs, token_logprob = _served_teacher(teacher, tokens, 5)
    shifted = topk_logprobs + torch.randn(5, 1, device=device) * 7
    for fn, args, args_shifted in (
        (opd_ext.reverse_kl_loss_sparse_teacher, (ids, topk_logprobs), (ids, shifted)),
        (
            opd_ext.vopd_loss_sparse_teacher,
            (tokens, ids, topk_logprobs, token_logprob),
            (tokens, ids, shifted, token_logprob),
        ),
    ):
        torch.testing.assert_close(fn(student, *args), fn(student, *args_shifted))
    empty = topk_logprobs.clone()
    empty[2] = float("-inf")
    one_less = torch.tensor([True, True, False, True, True], device=device)
    kl = opd_ext.reverse_kl_loss_sparse_teacher(student, ids, empty, num_items=5)
    torch.testing.assert_close(
        kl, opd_ext.reverse_kl_loss_sparse_teacher(student, ids, topk_logprobs, mask=one_less, num_items=5)
    )
    x = student.clone().requires_grad_()
    opd_ext.vopd_loss_sparse_teacher(x, tokens, ids, empty, token_logprob).backward()
    assert torch.isfinite(x.grad).all()


# ---- torch.compile -------------------------------------------------------------------------------------


def test_torch_compile(device):
    skip_if_emulated("torch.compile traces the registered ops")
    torch._dynamo.reset()
    student, teacher = _pair((2, 3, 64), torch.float32, torch.float32, device)
    tokens, mask, weights = _row_inputs((2, 3), 64, device)

    ids, topk_logprobs, token_logprob = _served_teacher(teacher, tokens, 5)

    def step(x):
        return (
            opd_ext.vopd_loss(x, teacher, tokens, mask=mask, weights=weights, baseline="topk", topk=8)
            + opd_ext.reverse_kl_loss(x, teacher, mask=mask)
            # (the served-teacher check of id ranges is data-dependent and must stay out of the graph)
            + opd_ext.vopd_loss_sparse_teacher(x, tokens, ids, topk_logprobs, token_logprob, mask=mask)
        )

    x_eager = student.clone().requires_grad_()
    eager = step(x_eager)
    eager.backward()
    x_compiled = student.clone().requires_grad_()
    compiled = torch.compile(step, fullgraph=True)(x_compiled)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(x_compiled.grad, x_eager.grad)


# ---- bad input -----------------------------------------------------------------------------------------


def test_bad_inputs_name_the_argument(device):
    student, teacher = _pair((4, 10), torch.float32, torch.float32, device)
    tokens = torch.randint(0, 10, (4,), device=device)
    cases = [
        (dict(baseline="mean"), ValueError, "baseline must be one of 'full', 'topk', 'none'"),
        (dict(kl="jensen"), ValueError, "kl must be one of 'reverse', 'forward'"),
        (dict(kl="forward", baseline="topk"), ValueError, 'kl="forward" .* needs baseline="full"'),
        (dict(baseline="topk", topk=11), ValueError, r"topk=11 is out of range: need 1 <= topk <= V=10"),
        (dict(mask=torch.ones(3, dtype=torch.bool)), ValueError, r"mask must have shape \(4,\)"),
        (dict(mask=torch.ones(4)), TypeError, "mask must be bool"),
        (dict(weights=torch.ones(4, 1)), ValueError, r"weights must have shape \(4,\)"),
        (dict(num_items=-2), ValueError, "num_items must be a non-negative finite number"),
        (dict(temperature=-1.0), ValueError, "temperature must be a positive finite number"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            opd_ext.vopd_loss(student, teacher, tokens, **kwargs)
    with pytest.raises(RuntimeError, match=r"tokens must be in \[0, V=10\)"):
        opd_ext.vopd_loss(student, teacher, torch.tensor([0, 1, 2, 10], device=device))
    with pytest.raises(ValueError, match="vocabulary mismatch.*align_vocab"):
        opd_ext.reverse_kl_loss(student, teacher[:, :9])
    with pytest.raises(ValueError, match=r"weights must have shape \(4,\)"):
        opd_ext.reverse_kl_loss(student, teacher, weights=torch.ones(5))

    ids, topk_logprobs, token_logprob = _served_teacher(teacher, tokens, 3)
    sparse = opd_ext.vopd_loss_sparse_teacher
    with pytest.raises(ValueError, match=r"teacher_topk_ids must have shape \(4, 'k'\)"):
        sparse(student, tokens, ids[:2], topk_logprobs, token_logprob)
    with pytest.raises(ValueError, match="must have the same shape"):
        sparse(student, tokens, ids, topk_logprobs[:, :2], token_logprob)
    with pytest.raises(ValueError, match=r"teacher_topk_ids must be in \[0, V=10\)"):
        sparse(student, tokens, ids + 10, topk_logprobs, token_logprob)
    with pytest.raises(ValueError, match=r"teacher_token_logprob must have shape \(4,\)"):
        sparse(student, tokens, ids, topk_logprobs, token_logprob[:, None])
    with pytest.raises(ValueError, match="baseline must be one of 'topk', 'none'"):
        sparse(student, tokens, ids, topk_logprobs, token_logprob, baseline="full")
    with pytest.raises(TypeError, match="teacher_topk_ids must be int64"):
        opd_ext.reverse_kl_loss_sparse_teacher(student, ids.int(), topk_logprobs)
