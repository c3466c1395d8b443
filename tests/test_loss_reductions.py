"""reduction="mean" | "sum" | "none", return_stats=True and the nn.Module forms of every loss.

"mean" is the long-standing behaviour checked against the float64 reference in test_losses.py and
test_fused_linear.py; here "sum" and "none" are checked against it (sum = mean · norm, none.sum() =
sum, same gradients), and the statistics against token_stats and the reference's quantities.
"""

import pytest
import torch

import opd_ext
from opd_ext import reference

TOL = dict(rtol=1e-5, atol=1e-6)
VOPD_VARIANTS = [
    dict(baseline="full"),
    dict(baseline="full", kl="forward"),
    dict(baseline="topk", topk=4),
    dict(baseline="none"),
]
LEAD, VOCAB, HIDDEN = (3, 5), 17, 8


def _inputs(seed=0, lead=LEAD, vocab=VOCAB):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(*lead, vocab, generator=gen) * 2
    teacher = student + torch.randn(*lead, vocab, generator=gen)
    tokens = torch.randint(0, vocab, lead, generator=gen)
    mask = torch.rand(lead, generator=gen) > 0.3
    mask.view(-1)[0] = True
    mask.view(-1)[-1] = False
    weights = torch.rand(lead, generator=gen) + 0.5
    return student, teacher, tokens, mask, weights


def _served(teacher, tokens, k=6):
    log_q = torch.log_softmax(teacher, -1)
    ids = torch.topk(log_q, k).indices
    return ids, log_q.gather(-1, ids), log_q.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _logits_losses():
    """name -> loss(student_logits, **kwargs) over every logits-based loss and variant."""
    student, teacher, tokens, mask, weights = _inputs()
    ids, topk_lp, token_lp = _served(teacher, tokens)
    cases = {
        f"vopd-{'-'.join(map(str, v.values()))}": (
            lambda x, v=v, **kw: opd_ext.vopd_loss(x, teacher, tokens, temperature=0.9, **v, **kw)
        )
        for v in VOPD_VARIANTS
    }
    cases["reverse_kl"] = lambda x, **kw: opd_ext.reverse_kl_loss(x, teacher, temperature=1.2, **kw)
    for baseline in ("topk", "none"):
        cases[f"vopd_sparse-{baseline}"] = lambda x, b=baseline, **kw: opd_ext.vopd_loss_sparse_teacher(
            x, tokens, ids, topk_lp, token_lp, baseline=b, **kw
        )
    cases["reverse_kl_sparse"] = lambda x, **kw: opd_ext.reverse_kl_loss_sparse_teacher(x, ids, topk_lp, **kw)
    return student, mask, weights, cases


STUDENT, MASK, WEIGHTS, LOGIT_LOSSES = _logits_losses()


def _value_and_grad(fn, student, reduce=lambda loss: loss):
    x = student.detach().clone().requires_grad_()
    loss = fn(x)
    reduce(loss).backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("name", LOGIT_LOSSES)
def test_sum_is_mean_times_norm_and_none_sums_to_sum(name):
    fn, norm = LOGIT_LOSSES[name], MASK.sum().item()
    kw = dict(mask=MASK, weights=WEIGHTS)
    mean, grad_mean = _value_and_grad(lambda x: fn(x, **kw), STUDENT)
    total, grad_sum = _value_and_grad(lambda x: fn(x, reduction="sum", **kw), STUDENT)
    terms, grad_none = _value_and_grad(lambda x: fn(x, reduction="none", **kw), STUDENT, lambda t: t.sum())
    assert total.dim() == 0 and terms.shape == LEAD and terms.dtype == torch.float32
    torch.testing.assert_close(total, mean * norm, **TOL)
    torch.testing.assert_close(grad_sum, grad_mean * norm, **TOL)
    torch.testing.assert_close(terms.sum(), total, **TOL)
    torch.testing.assert_close(grad_none, grad_sum, **TOL)
    assert (terms[~MASK] == 0).all()


@pytest.mark.parametrize("name", LOGIT_LOSSES)
def test_none_takes_a_per_position_gradient(name):
    # Every term is linear in its w_t, so backpropagating g_t through term t is the "sum" loss with
    # weights w_t · g_t.
    fn = LOGIT_LOSSES[name]
    g = torch.rand(LEAD, generator=torch.Generator().manual_seed(1)) + 0.25
    _, got = _value_and_grad(
        lambda x: fn(x, reduction="none", mask=MASK, weights=WEIGHTS), STUDENT, lambda t: (t * g).sum()
    )
    _, want = _value_and_grad(lambda x: fn(x, reduction="sum", mask=MASK, weights=WEIGHTS * g), STUDENT)
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("name", LOGIT_LOSSES)
def test_none_is_zero_with_zero_gradient_at_masked_nan_positions(name):
    student = STUDENT.clone()
    student[~MASK] = float("nan")
    terms, grad = _value_and_grad(
        lambda x: LOGIT_LOSSES[name](x, reduction="none", mask=MASK),
        student,
        lambda t: (t * torch.full_like(t, float("nan")).where(~MASK, 1.0)).sum(),
    )
    assert torch.isfinite(terms).all() and (terms[~MASK] == 0).all()
    assert torch.isfinite(grad).all() and (grad[~MASK] == 0).all()


@pytest.mark.parametrize("variant", VOPD_VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_vopd_stats_are_the_forward_quantities(variant):
    student, teacher, tokens, mask, weights = _inputs(2)
    student[~mask] = float("nan")  # masked rows: stats exactly 0, never NaN
    loss, stats = opd_ext.vopd_loss(
        student, teacher, tokens, mask=mask, weights=weights, temperature=0.9, return_stats=True, **variant
    )
    torch.testing.assert_close(
        loss, opd_ext.vopd_loss(student, teacher, tokens, mask=mask, weights=weights, temperature=0.9, **variant)
    )
    want = opd_ext.token_stats(student, teacher, torch.where(mask, tokens, 0), temperature=0.9, forward_kl=True)
    for name in ("student_logprob", "teacher_logprob", "reverse_kl"):
        got = getattr(stats, name)
        assert got.dtype == torch.float32 and got.shape == tokens.shape and not got.requires_grad
        torch.testing.assert_close(got[mask], getattr(want, name)[mask])
        assert (got[~mask] == 0).all()
    baseline = variant["baseline"]
    if baseline == "full":
        want_b = -(want.forward_kl if variant.get("kl") == "forward" else want.reverse_kl)
    elif baseline == "topk":
        want_b = -reference.topk_reverse_kl(student, teacher, variant["topk"], 0.9).float()
    else:
        want_b = torch.zeros_like(want.reverse_kl)
    torch.testing.assert_close(stats.baseline[mask], want_b[mask], **TOL)
    reward = want.teacher_logprob - want.student_logprob
    torch.testing.assert_close(stats.reward[mask], reward[mask])
    torch.testing.assert_close(stats.advantage[mask], (reward - want_b)[mask], **TOL)
    torch.testing.assert_close(stats.weights, torch.where(mask, weights, 0.0))
    assert torch.equal(stats.mask, mask) and stats.num_tokens == mask.sum()
    torch.testing.assert_close(stats.reverse_kl_mean, want.reverse_kl[mask].mean())
    means = stats.means()
    assert set(means) == {"student_logprob", "teacher_logprob", "reward", "reverse_kl", "advantage", "baseline"}
    torch.testing.assert_close(means["advantage"], stats.advantage[mask].mean())


def test_reverse_kl_and_sparse_teacher_stats():
    student, teacher, tokens, mask, weights = _inputs(3)
    kw = dict(mask=mask, weights=weights, return_stats=True)
    _, stats = opd_ext.reverse_kl_loss(student, teacher, **kw)
    want = opd_ext.token_stats(student, teacher, tokens)
    torch.testing.assert_close(stats.reverse_kl[mask], want.reverse_kl[mask])
    assert stats.student_logprob is None and stats.advantage is None and stats.reward is None
    assert stats.student_logprob_mean is None and set(stats.means()) == {"reverse_kl"}

    ids, topk_lp, token_lp = _served(teacher, tokens)
    support_kl = reference.support_reverse_kl(student.double(), ids, topk_lp, 1.0).float()
    _, stats = opd_ext.reverse_kl_loss_sparse_teacher(student, ids, topk_lp, **kw)
    torch.testing.assert_close(stats.reverse_kl[mask], support_kl[mask], **TOL)
    _, stats = opd_ext.vopd_loss_sparse_teacher(student, tokens, ids, topk_lp, token_lp, **kw)
    torch.testing.assert_close(stats.student_logprob[mask], want.student_logprob[mask])
    torch.testing.assert_close(stats.teacher_logprob[mask], token_lp[mask])
    torch.testing.assert_close(stats.reverse_kl[mask], support_kl[mask], **TOL)
    torch.testing.assert_close(stats.baseline, -stats.reverse_kl)
    _, stats = opd_ext.vopd_loss_sparse_teacher(student, tokens, ids, topk_lp, token_lp, baseline="none", **kw)
    assert stats.reverse_kl is None and (stats.baseline == 0).all()
    torch.testing.assert_close(stats.advantage, stats.reward)


def test_bad_reduction_and_num_items_with_sum_raise():
    student, teacher, tokens, mask, _ = _inputs()
    with pytest.raises(ValueError, match="reduction must be one of 'mean', 'sum', 'none'; got 'avg'"):
        opd_ext.vopd_loss(student, teacher, tokens, reduction="avg")
    with pytest.raises(ValueError, match="reduction must be one of"):
        opd_ext.ReverseKLLoss(reduction="batchmean")
    for reduction in ("sum", "none"):
        with pytest.raises(ValueError, match="num_items sets the normaliser of reduction='mean'"):
            opd_ext.reverse_kl_loss(student, teacher, mask=mask, num_items=4, reduction=reduction)


# ---- fused linear ---------------------------------------------------------------------------------


def _fused_inputs():
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(*LEAD, HIDDEN, generator=gen)
    head = torch.nn.Linear(HIDDEN, VOCAB)
    with torch.no_grad():
        head.weight.copy_(torch.randn(VOCAB, HIDDEN, generator=gen) * 0.5)
        head.bias.copy_(torch.randn(VOCAB, generator=gen) * 0.5)
    teacher = torch.randn(*LEAD, VOCAB, generator=gen) * 2
    return hidden, head, teacher


@pytest.mark.parametrize(
    "variant",
    [dict(baseline="full"), dict(baseline="topk", topk=4), dict(baseline="none"), None],
    ids=["full", "topk", "none", "reverse_kl"],
)
def test_fused_linear_sum_and_stats_match_the_logits_path(variant):
    hidden, head, teacher = _fused_inputs()
    _, _, tokens, mask, weights = _inputs()
    kw = dict(mask=mask, weights=weights, temperature=0.8)
    results = {}
    for reduction in ("mean", "sum"):
        for path in ("fused", "logits"):
            head.zero_grad()
            h = hidden.clone().requires_grad_()
            if path == "fused":
                fn = opd_ext.fused_linear_reverse_kl_loss if variant is None else opd_ext.fused_linear_vopd_loss
                args = (h, head) if variant is None else (h, head, tokens)
                out = fn(
                    *args,
                    teacher_logits=teacher,
                    reduction=reduction,
                    return_stats=True,
                    chunk_size=4,
                    **kw,
                    **(variant or {}),
                )
            else:
                logits = head(h)
                out = (
                    opd_ext.reverse_kl_loss(logits, teacher, reduction=reduction, return_stats=True, **kw)
                    if variant is None
                    else opd_ext.vopd_loss(
                        logits, teacher, tokens, reduction=reduction, return_stats=True, **kw, **variant
                    )
                )
            out[0].backward()
            results[reduction, path] = out, h.grad, head.weight.grad.clone(), head.bias.grad.clone()
    for reduction in ("mean", "sum"):
        (loss, stats), *grads = results[reduction, "fused"]
        (want_loss, want_stats), *want_grads = results[reduction, "logits"]
        torch.testing.assert_close(loss, want_loss, **TOL)
        for got, want in zip(grads, want_grads):
            torch.testing.assert_close(got, want, **TOL)
        for name in stats._fields:
            got, want = getattr(stats, name), getattr(want_stats, name)
            assert (got is None) == (want is None), name
            if got is not None:
                assert got.shape == LEAD
                torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"{name}: {m}")
    norm = mask.sum().item()
    torch.testing.assert_close(results["sum", "fused"][0][0], results["mean", "fused"][0][0] * norm, **TOL)


@pytest.mark.parametrize(
    "variant",
    [dict(baseline="full"), dict(baseline="topk", topk=4), dict(baseline="none"), None],
    ids=["full", "topk", "none", "reverse_kl"],
)
def test_fused_linear_reduction_none_matches_the_logits_path(variant):
    # Per-position values, and gradients under a per-position incoming gradient (of either sign:
    # the backward weighs each row by its own), equal the logits path's; masked rows hold 0.
    hidden, head, teacher = _fused_inputs()
    _, _, tokens, mask, weights = _inputs()
    upstream = torch.randn(LEAD, generator=torch.Generator().manual_seed(5))
    kw = dict(mask=mask, weights=weights, temperature=0.8, reduction="none", return_stats=True)
    results = {}
    for path in ("fused", "logits"):
        head.zero_grad()
        h = hidden.clone().requires_grad_()
        if path == "fused":
            out = (
                opd_ext.fused_linear_reverse_kl_loss(h, head, teacher_logits=teacher, chunk_size=4, **kw)
                if variant is None
                else opd_ext.fused_linear_vopd_loss(
                    h, head, tokens, teacher_logits=teacher, chunk_size=4, **kw, **variant
                )
            )
        else:
            out = (
                opd_ext.reverse_kl_loss(head(h), teacher, **kw)
                if variant is None
                else opd_ext.vopd_loss(head(h), teacher, tokens, **kw, **variant)
            )
        (out[0] * upstream).sum().backward()
        results[path] = out[0].detach(), h.grad, head.weight.grad.clone(), head.bias.grad.clone()
    assert results["fused"][0].shape == LEAD and (results["fused"][0][~mask] == 0).all()
    for got, want in zip(results["fused"], results["logits"]):
        torch.testing.assert_close(got, want, **TOL)
    module = (
        opd_ext.FusedLinearReverseKLLoss(reduction="none")
        if variant is None
        else opd_ext.FusedLinearVOPDLoss(reduction="none", **variant)
    )
    args = (hidden, head) if variant is None else (hidden, head, tokens)
    function = opd_ext.fused_linear_reverse_kl_loss if variant is None else opd_ext.fused_linear_vopd_loss
    torch.testing.assert_close(
        module(*args, teacher_logits=teacher, mask=mask, weights=weights),
        function(*args, teacher_logits=teacher, mask=mask, weights=weights, reduction="none", **(variant or {})),
        **TOL,
    )


def test_fused_linear_reduction_none_recomputes_lora_dropout_masks():
    # The backward forms the logits again: a LoRA head in training mode must draw the same dropout
    # masks, so "none" with an all-ones incoming gradient gives exactly "sum"'s gradients.
    peft = pytest.importorskip("peft")
    head = torch.nn.Linear(HIDDEN, VOCAB)
    model = torch.nn.Sequential()
    model.add_module("lm_head", head)
    model = peft.get_peft_model(model, peft.LoraConfig(target_modules=["lm_head"], r=2, lora_alpha=4, lora_dropout=0.5))
    lora = model.base_model.model.lm_head
    for b in lora.lora_B.values():
        torch.nn.init.normal_(b.weight, 0.0, 0.5)
    lora.train()
    hidden, _, teacher = _fused_inputs()
    _, _, tokens, mask, _ = _inputs()
    params = [p for p in lora.parameters() if p.requires_grad]
    grads = {}
    for reduction in ("sum", "none"):
        torch.manual_seed(11)
        loss = opd_ext.fused_linear_vopd_loss(
            hidden, lora, tokens, teacher_logits=teacher, mask=mask, reduction=reduction, chunk_size=4
        )
        grads[reduction] = loss.sum(), torch.autograd.grad(loss.sum(), params)
    torch.testing.assert_close(grads["none"][0], grads["sum"][0], **TOL)
    for got, want in zip(grads["none"][1], grads["sum"][1]):
        torch.testing.assert_close(got, want, **TOL)


def test_fused_linear_bad_reduction_is_named():
    hidden, head, teacher = _fused_inputs()
    with pytest.raises(ValueError, match="reduction must be one of 'mean', 'sum', 'none'; got 'avg'"):
        opd_ext.fused_linear_reverse_kl_loss(hidden, head, teacher_logits=teacher, reduction="avg")


# ---- modules --------------------------------------------------------------------------------------


def test_modules_equal_the_functions():
    student, teacher, tokens, mask, weights = _inputs(5)
    ids, topk_lp, token_lp = _served(teacher, tokens)
    hidden, head, fused_teacher = _fused_inputs()
    kw = dict(mask=mask, weights=weights)
    pairs = [
        (
            opd_ext.VOPDLoss(baseline="topk", topk=4, temperature=0.7, reduction="none")(
                student, teacher, tokens, **kw
            ),
            opd_ext.vopd_loss(
                student, teacher, tokens, baseline="topk", topk=4, temperature=0.7, reduction="none", **kw
            ),
        ),
        (
            opd_ext.ReverseKLLoss(reduction="sum")(student, teacher, **kw),
            opd_ext.reverse_kl_loss(student, teacher, reduction="sum", **kw),
        ),
        (
            opd_ext.VOPDLossSparseTeacher(baseline="none")(student, tokens, ids, topk_lp, token_lp, **kw),
            opd_ext.vopd_loss_sparse_teacher(student, tokens, ids, topk_lp, token_lp, baseline="none", **kw),
        ),
        (
            opd_ext.ReverseKLLossSparseTeacher(temperature=1.5)(student, ids, topk_lp, num_items=7, **kw),
            opd_ext.reverse_kl_loss_sparse_teacher(student, ids, topk_lp, temperature=1.5, num_items=7, **kw),
        ),
        (
            opd_ext.FusedLinearVOPDLoss(kl="forward", chunk_size=4)(
                hidden, head, tokens, teacher_logits=fused_teacher, **kw
            ),
            opd_ext.fused_linear_vopd_loss(hidden, head, tokens, teacher_logits=fused_teacher, kl="forward", **kw),
        ),
        (
            opd_ext.FusedLinearReverseKLLoss(reduction="sum")(
                hidden, head.weight, teacher_logits=fused_teacher, student_bias=head.bias, **kw
            ),
            opd_ext.fused_linear_reverse_kl_loss(hidden, head, teacher_logits=fused_teacher, reduction="sum", **kw),
        ),
    ]
    for got, want in pairs:
        torch.testing.assert_close(got, want, **TOL)
    loss, stats = opd_ext.VOPDLoss(return_stats=True)(student, teacher, tokens, **kw)
    assert isinstance(stats, opd_ext.LossStats)
    module = opd_ext.VOPDLoss(baseline="none")
    assert list(module.parameters()) == [] and "baseline='none'" in repr(module)
    with pytest.raises(ValueError, match="baseline must be one of"):
        opd_ext.VOPDLossSparseTeacher(baseline="full")


def test_compiled_reduction_none_and_stats_match_eager():
    student, teacher, tokens, mask, weights = _inputs(6)

    def fn(x):
        terms, stats = opd_ext.vopd_loss(
            x, teacher, tokens, mask=mask, weights=weights, reduction="none", return_stats=True
        )
        return terms, stats.advantage, stats.reverse_kl

    eager = _value_and_grad(lambda x: fn(x)[0], student, lambda t: t.sum())
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = _value_and_grad(lambda x: compiled(x)[0], student, lambda t: t.sum())
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b)
    for a, b in zip(compiled(student), fn(student)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_vocab_parallel_losses_take_reduction_and_stats(reduction):
    # One process (no process group): the vocab-parallel path on the whole vocabulary, which must
    # agree with the single-device losses field by field.
    from opd_ext.distributed import vocab_parallel_reverse_kl_loss, vocab_parallel_vopd_loss

    student, teacher, tokens, mask, weights = _inputs(7)
    kw = dict(mask=mask, weights=weights, reduction=reduction, return_stats=True)
    for got, want in (
        (
            vocab_parallel_vopd_loss(student, teacher, tokens, baseline="topk", topk=4, **kw),
            opd_ext.vopd_loss(student, teacher, tokens, baseline="topk", topk=4, **kw),
        ),
        (vocab_parallel_reverse_kl_loss(student, teacher, **kw), opd_ext.reverse_kl_loss(student, teacher, **kw)),
    ):
        torch.testing.assert_close(got[0], want[0], **TOL)
        for name in want[1]._fields:
            a, b = getattr(got[1], name), getattr(want[1], name)
            assert (a is None) == (b is None), name
            if a is not None:
                torch.testing.assert_close(a, b, **TOL)
