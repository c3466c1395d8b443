"""Every public op and loss under ``torch.compile(fullgraph=True)``, with ``dynamic=True`` and
``dynamic=False``: values and gradients against eager, and what a new shape recompiles.

The matrix uses the "aot_eager" backend: Dynamo's capture, the fake kernels and AOTAutograd's
functionalization and backward graph are what decide whether a function compiles, and that
backend runs them without Inductor's code generation (seconds per graph on a small CPU); one test
per ``dynamic`` setting takes every loss through Inductor as well.

Under ``dynamic=True`` shapes stay symbolic; float arguments of the registered ops (temperature)
are specialised, so a new temperature compiles a new graph. The fused-linear losses unroll their
row-chunk loop, so their graph is specialised on the number of chunks (not on the row count), and
with a mask they compute the masked rows too (zeroed and weighted 0), since the number of valid
rows is data-dependent. ``DriftMonitor.step`` / ``observe`` keep Python state per step and run
eagerly (an error with ``fullgraph=True``); the drift ops themselves trace.
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import opd_ext

from conftest import skip_if_emulated

ops = torch.ops.opd_ext

H, K = 5, 4
TEMPERATURE = 0.7
# Two problem sizes (lead shape, V) a dynamic graph must serve without recompiling. Both give the
# fused-linear losses two chunks of CHUNK rows.
SIZES = [((2, 3), 40), ((2, 4), 48)]
CHUNK = 4


def _inputs(lead, vocab, device):
    gen = torch.Generator().manual_seed(vocab)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    student = randn(*lead, vocab, scale=2.0)
    teacher = student + randn(*lead, vocab)
    tokens = torch.randint(0, vocab, lead, generator=gen).to(device)
    mask = torch.ones(lead, dtype=torch.bool)
    mask.view(-1)[1::3] = False
    mask = mask.to(device)
    log_q = torch.log_softmax(teacher, -1)
    ids = log_q.topk(K, -1).indices
    hidden = randn(*lead, H)
    # Masked positions hold what padding holds in practice: id -100 and, here, NaN states.
    hidden[~mask] = float("nan")
    return dict(
        student=student,
        teacher=teacher,
        tokens=tokens,
        mask=mask,
        weights=randn(*lead).abs() + 0.5,
        masked_tokens=torch.where(mask, tokens, -100),
        ids=ids,
        topk_logprobs=log_q.gather(-1, ids),
        token_logprob=log_q.gather(-1, tokens[..., None])[..., 0],
        hidden=hidden,
        weight=randn(vocab, H, scale=0.5),
        bias=randn(vocab, scale=0.5),
        teacher_hidden=randn(*lead, H),
        teacher_weight=randn(vocab, H, scale=0.5),
        overlaps=torch.rand(lead[0] * lead[1], 9, generator=gen).to(device),
        scan_mask=(torch.rand(lead[0] * lead[1], 9, generator=gen) > 0.2).to(device),
        budget=torch.randint(3, 9, (lead[0] * lead[1],), generator=gen).to(device),
        # As servers send a top-k: the sampled id appended (sometimes a duplicate), -inf padding.
        served_ids=torch.cat([ids, ids[..., :1], tokens[..., None]], -1),
        served_logprobs=torch.cat(
            [
                log_q.gather(-1, ids),
                log_q.gather(-1, ids[..., :1]),
                torch.full_like(tokens[..., None], float("-inf"), dtype=torch.float32),
            ],
            -1,
        ),
        slot_mask=torch.rand(*lead, K + 2, generator=gen).to(device) > 0.3,
    )


# name -> (function of the inputs and a temperature, names of the inputs it differentiates)
CASES = {
    "topk_overlap": (lambda x, tau: opd_ext.topk_overlap(x["student"], x["teacher"], K), ()),
    "token_stats": (
        lambda x, tau: tuple(
            opd_ext.token_stats(x["student"], x["teacher"], x["tokens"], temperature=tau, forward_kl=True)
        ),
        (),
    ),
    "vopd_full": (
        lambda x, tau: opd_ext.vopd_loss(
            x["student"], x["teacher"], x["masked_tokens"], mask=x["mask"], weights=x["weights"], temperature=tau
        ),
        ("student",),
    ),
    "vopd_full_forward_kl": (
        lambda x, tau: opd_ext.vopd_loss(
            x["student"], x["teacher"], x["tokens"], kl="forward", temperature=tau, num_items=7
        ),
        ("student",),
    ),
    "vopd_topk": (
        lambda x, tau: opd_ext.vopd_loss(
            x["student"], x["teacher"], x["tokens"], baseline="topk", topk=5, mask=x["mask"], temperature=tau
        ),
        ("student",),
    ),
    "vopd_none": (
        lambda x, tau: opd_ext.vopd_loss(
            x["student"], x["teacher"], x["tokens"], baseline="none", weights=x["weights"], temperature=tau
        ),
        ("student",),
    ),
    "reverse_kl": (
        lambda x, tau: opd_ext.reverse_kl_loss(
            x["student"], x["teacher"], mask=x["mask"], weights=x["weights"], temperature=tau
        ),
        ("student",),
    ),
    "vopd_sparse_teacher": (
        lambda x, tau: opd_ext.vopd_loss_sparse_teacher(
            x["student"],
            x["masked_tokens"],
            x["ids"],
            x["topk_logprobs"],
            x["token_logprob"],
            mask=x["mask"],
            temperature=tau,
        ),
        ("student",),
    ),
    "vopd_sparse_teacher_none": (
        lambda x, tau: opd_ext.vopd_loss_sparse_teacher(
            x["student"],
            x["tokens"],
            x["ids"],
            x["topk_logprobs"],
            x["token_logprob"],
            baseline="none",
            weights=x["weights"],
            temperature=tau,
        ),
        ("student",),
    ),
    "reverse_kl_sparse_teacher": (
        lambda x, tau: opd_ext.reverse_kl_loss_sparse_teacher(
            x["student"], x["ids"], x["topk_logprobs"], mask=x["mask"], weights=x["weights"], temperature=tau
        ),
        ("student",),
    ),
    "teacher_support": (
        lambda x, tau: opd_ext.teacher_support(x["served_ids"], x["served_logprobs"], x["slot_mask"]),
        (),
    ),
    "reverse_kl_sparse_teacher_served": (
        lambda x, tau: opd_ext.reverse_kl_loss_sparse_teacher(
            x["student"],
            x["served_ids"],
            x["served_logprobs"],
            teacher_topk_mask=x["slot_mask"],
            mask=x["mask"],
            temperature=tau,
        ),
        ("student",),
    ),
    "topk_kl_forward_tail_served": (
        lambda x, tau: opd_ext.topk_kl_loss(
            x["student"],
            x["served_ids"],
            x["served_logprobs"],
            teacher_topk_mask=x["slot_mask"],
            mask=x["mask"],
            weights=x["weights"],
            temperature=tau,
        ),
        ("student",),
    ),
    "topk_kl_forward_stats": (
        # The loss plus its (detached) statistics, summed: one tensor, as the other cases return.
        lambda x, tau: (lambda loss, stats: loss + sum(s.sum() for s in stats[:4]))(
            *opd_ext.topk_kl_loss(
                x["student"], x["ids"], x["topk_logprobs"], divergence="forward", mask=x["mask"], return_stats=True
            )
        ),
        ("student",),
    ),
    "student_topk_kl": (
        lambda x, tau: opd_ext.student_topk_kl_loss(
            x["student"], x["teacher"], k=K, mask=x["mask"], weights=x["weights"], temperature=tau
        ),
        ("student",),
    ),
    "fused_linear_vopd_masked": (
        lambda x, tau: opd_ext.fused_linear_vopd_loss(
            x["hidden"],
            x["weight"],
            x["masked_tokens"],
            student_bias=x["bias"],
            teacher_hidden=x["teacher_hidden"],
            teacher_weight=x["teacher_weight"],
            mask=x["mask"],
            weights=x["weights"],
            temperature=tau,
            chunk_size=CHUNK,
        ),
        ("hidden", "weight", "bias"),
    ),
    "fused_linear_vopd_topk": (
        lambda x, tau: opd_ext.fused_linear_vopd_loss(
            x["hidden"].nan_to_num(),
            x["weight"],
            x["tokens"],
            teacher_logits=x["teacher"],
            baseline="topk",
            topk=5,
            temperature=tau,
        ),
        ("hidden", "weight"),
    ),
    "fused_linear_reverse_kl": (
        lambda x, tau: opd_ext.fused_linear_reverse_kl_loss(
            x["hidden"], x["weight"], teacher_logits=x["teacher"], mask=x["mask"], temperature=tau, chunk_size=CHUNK
        ),
        ("hidden", "weight"),
    ),
    "drift_scan": (
        lambda x, tau: tuple(
            opd_ext.drift_scan(x["overlaps"], opd_ext.PruneConfig(warmup=1), mask=x["scan_mask"], budget=x["budget"])
        ),
        (),
    ),
    "drift_step_op": (
        lambda x, tau: _drift_step(x["student"].flatten(0, 1), x["teacher"].flatten(0, 1), x["tokens"].flatten(), tau),
        (),
    ),
}


def _drift_step(student, teacher, tokens, temperature):
    """One decode step of the drift op on a fresh state; returns its outputs and the updated state."""
    batch = student.shape[0]
    state = [
        torch.zeros(batch, device=student.device),
        torch.ones(batch, device=student.device),
        *(torch.zeros(batch, dtype=torch.int32, device=student.device) for _ in range(3)),
        torch.zeros(batch, dtype=torch.int8, device=student.device),
        torch.full((batch,), 2**31 - 1, dtype=torch.int32, device=student.device),
    ]
    args = opd_ext.PruneConfig().kernel_args()
    out = ops.drift_step(student, teacher, tokens, None, *state, K, temperature, **args)
    return (*out, *state)


def _run(fn, inputs, grad_names):
    """fn's outputs and the gradients of their sum w.r.t. the named inputs, on fresh leaves."""
    x = dict(inputs)
    for name in grad_names:
        x[name] = inputs[name].clone().requires_grad_()
    out = fn(x)
    outputs = out if isinstance(out, tuple) else (out,)
    grads = ()
    if grad_names:
        sum(o for o in outputs).backward()
        grads = tuple(x[name].grad for name in grad_names)
    return outputs, grads


def _assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, equal_nan=True)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("case", list(CASES))
def test_fullgraph_matches_eager(device, case, dynamic):
    skip_if_emulated("torch.compile traces the registered ops")
    torch._dynamo.reset()
    fn, grad_names = CASES[case]
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda x, tau: fn(x, tau), fullgraph=True, dynamic=dynamic, backend=counter)
    frames = []
    for lead, vocab in SIZES:
        inputs = _inputs(lead, vocab, device)
        got_out, got_grads = _run(lambda x: compiled(x, TEMPERATURE), inputs, grad_names)
        frames.append(counter.frame_count)
        want_out, want_grads = _run(lambda x: fn(x, TEMPERATURE), inputs, grad_names)
        _assert_same(got_out, want_out)
        _assert_same(got_grads, want_grads)
        for grad in got_grads:
            assert torch.isfinite(grad).all()  # NaN states at masked rows stay out of every gradient
    # A dynamic graph serves the second size too; a static one is specialised on each.
    assert (frames[1] == frames[0]) == dynamic, frames


def test_every_public_op_and_loss_is_covered():
    public = {
        name
        for name in opd_ext.__all__
        if callable(getattr(opd_ext, name))
        and name[0].islower()
        and name not in ("build_info", "cuda_kernels_available", "align_vocab")
    }
    covered = {
        "topk_overlap",
        "token_stats",
        "vopd_loss",
        "reverse_kl_loss",
        "vopd_loss_sparse_teacher",
        "teacher_support",
        "reverse_kl_loss_sparse_teacher",
        "topk_kl_loss",
        "student_topk_kl_loss",
        "fused_linear_vopd_loss",
        "fused_linear_reverse_kl_loss",
        "drift_scan",
    }
    assert public == covered


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_inductor_compiles_every_loss(dynamic):
    torch._dynamo.reset()
    names = [name for name, (_, grads) in CASES.items() if grads == ("student",)]

    def step(x, tau):
        return sum(CASES[name][0](x, tau) for name in names) + CASES["fused_linear_vopd_masked"][0](x, tau)

    inputs = _inputs(*SIZES[0], "cpu")
    grad_names = ("student", "hidden", "weight", "bias")
    got_out, got_grads = _run(
        lambda x: torch.compile(step, fullgraph=True, dynamic=dynamic)(x, TEMPERATURE), inputs, grad_names
    )
    want_out, want_grads = _run(lambda x: step(x, TEMPERATURE), inputs, grad_names)
    _assert_same(got_out, want_out)
    _assert_same(got_grads, want_grads)


def test_dynamic_fused_linear_recompiles_only_for_a_new_chunk_count():
    torch._dynamo.reset()
    fn, _ = CASES["fused_linear_reverse_kl"]
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=counter)
    frames = {}
    # ceil(rows / 4) chunks: 2, 2, 2, 3, 3. (A last chunk of one row would be specialised too, as
    # any size-1 dimension is.)
    for rows in (6, 8, 7, 10, 12):
        x = _inputs((rows, 1), 40, "cpu")
        torch.testing.assert_close(compiled(x, TEMPERATURE), fn(x, TEMPERATURE))
        frames[rows] = counter.frame_count
    assert frames[6] == frames[8] == frames[7] < frames[10] == frames[12], frames


def test_a_new_temperature_recompiles_and_bad_values_are_still_rejected():
    torch._dynamo.reset()
    fn, _ = CASES["vopd_full"]
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=counter)
    x = _inputs(*SIZES[0], "cpu")
    frames = []
    for tau in (0.7, 1.3):
        torch.testing.assert_close(compiled(x, tau), fn(x, tau))
        frames.append(counter.frame_count)
    assert frames[1] == frames[0] + 1
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(Exception, match="temperature must be a positive finite number"):
            compiled(x, bad)


def test_compiled_fused_linear_still_rejects_out_of_range_tokens():
    torch._dynamo.reset()
    x = _inputs(*SIZES[0], "cpu")
    x["tokens"] = x["tokens"].clone()
    x["tokens"][0, 1] = 40
    fn, _ = CASES["fused_linear_vopd_topk"]
    with pytest.raises(RuntimeError, match=r"tokens must be in \[0, V=40\)"):
        torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")(x, TEMPERATURE)


def test_compiled_drift_scan_still_rejects_a_zero_budget():
    torch._dynamo.reset()
    x = _inputs(*SIZES[0], "cpu")
    x["budget"][2] = 0
    fn, _ = CASES["drift_scan"]
    with pytest.raises(RuntimeError, match="budget must be >= 1 token for every row"):
        torch.compile(fn, fullgraph=True, backend="aot_eager")(x, TEMPERATURE)


def test_drift_monitor_runs_eagerly_under_compile():
    torch._dynamo.reset()
    batch, vocab = 3, 40
    logits = [(torch.randn(batch, vocab), torch.randn(batch, vocab)) for _ in range(12)]

    def decode(monitor, student, teacher):
        return monitor.step(student, teacher, tokens=student.argmax(-1)) | (student.sum(-1) > 0)

    monitor = opd_ext.DriftMonitor(batch, opd_ext.PruneConfig(warmup=1))
    with pytest.raises(Exception, match="DriftMonitor keeps per-step Python state"):
        torch.compile(decode, fullgraph=True, backend="aot_eager")(monitor, *logits[0])

    # Without fullgraph the step is a graph break: every token gives eager's result, and the
    # surrounding graph is not recompiled per step.
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(decode, backend=counter)
    compiled_monitor = opd_ext.DriftMonitor(batch, opd_ext.PruneConfig(warmup=1))
    eager_monitor = opd_ext.DriftMonitor(batch, opd_ext.PruneConfig(warmup=1))
    for student, teacher in logits:
        torch.testing.assert_close(
            compiled(compiled_monitor, student, teacher), decode(eager_monitor, student, teacher)
        )
    torch.testing.assert_close(compiled_monitor.weights, eager_monitor.weights)
    torch.testing.assert_close(compiled_monitor.reverse_kl, eager_monitor.reverse_kl)
    assert counter.frame_count <= 2
