"""No loss holds a float32 [N, V] temporary, forward or backward, for any dtype pair.

Each case runs forward + backward once under tests/peak_memory.py and bounds the peak above the
inputs and the gradients (which the call leaves in ``.grad``) by a quarter of one float32 [N, V]:
that catches any [N, V] temporary of 2 bytes or more per entry, while the losses' own temporaries
are per-row vectors, [N, k] for served teachers, and a few [chunk, V] buffers for the fused-linear
losses (chunk = N / 32 here). N·V·4 = 8 MiB makes an [N, V] copy unmistakable and keeps each case
around 0.1 s on CPU.
"""

import pytest
import torch
from peak_memory import measure_peak_memory

import opd_ext
from opd_ext import ops, torch_backend
from opd_ext.ops import MAX_STREAMING_TOPK

from conftest import CUDA_READY, DTYPE_PAIRS

N, V, H, K = 512, 4096, 8, 8
CHUNK = N // 32
_SHORT = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not CUDA_READY, reason="needs a CUDA device and opd_ext's CUDA kernels"),
        ],
    ),
]


def _inputs(student_dtype, teacher_dtype, device):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(N, V, generator=gen) * 2

    def randn(*shape, dtype, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    tokens = torch.randint(0, V, (N,), generator=gen).to(device)
    teacher = (base + torch.randn(N, V, generator=gen)).to(device)
    log_q = torch.log_softmax(teacher, -1)
    ids = log_q.topk(K, -1).indices
    return dict(
        student=base.to(device=device, dtype=student_dtype).requires_grad_(),
        teacher=teacher.to(teacher_dtype),
        tokens=tokens,
        mask=(torch.rand(N, generator=gen) > 0.2).to(device),
        weights=(torch.rand(N, generator=gen) + 0.5).to(device),
        ids=ids,
        topk_logprobs=log_q.gather(-1, ids).to(teacher_dtype),
        token_logprob=log_q.gather(-1, tokens[:, None])[:, 0].to(teacher_dtype),
        hidden=randn(N, H, dtype=student_dtype).requires_grad_(),
        weight=randn(V, H, dtype=student_dtype, scale=0.5).requires_grad_(),
        teacher_hidden=randn(N, H, dtype=teacher_dtype),
        teacher_weight=randn(V, H, dtype=teacher_dtype, scale=0.5),
    )


def _row_kwargs(x):
    return dict(mask=x["mask"], weights=x["weights"], temperature=0.8)


LOSSES = {
    "vopd_full": lambda x: opd_ext.vopd_loss(x["student"], x["teacher"], x["tokens"], **_row_kwargs(x)),
    "vopd_full_forward_kl": lambda x: opd_ext.vopd_loss(
        x["student"], x["teacher"], x["tokens"], kl="forward", **_row_kwargs(x)
    ),
    "vopd_topk": lambda x: opd_ext.vopd_loss(
        x["student"], x["teacher"], x["tokens"], baseline="topk", **_row_kwargs(x)
    ),
    # Beyond the CUDA kernels' top-k, the baseline comes from a sort (the test routes CPU there too).
    "vopd_topk_sorted": lambda x: opd_ext.vopd_loss(
        x["student"], x["teacher"], x["tokens"], baseline="topk", topk=MAX_STREAMING_TOPK + 1, **_row_kwargs(x)
    ),
    "vopd_none": lambda x: opd_ext.vopd_loss(
        x["student"], x["teacher"], x["tokens"], baseline="none", **_row_kwargs(x)
    ),
    "reverse_kl": lambda x: opd_ext.reverse_kl_loss(x["student"], x["teacher"], **_row_kwargs(x)),
    "vopd_sparse_teacher": lambda x: opd_ext.vopd_loss_sparse_teacher(
        x["student"], x["tokens"], x["ids"], x["topk_logprobs"], x["token_logprob"], **_row_kwargs(x)
    ),
    "vopd_sparse_teacher_none": lambda x: opd_ext.vopd_loss_sparse_teacher(
        x["student"], x["tokens"], x["ids"], x["topk_logprobs"], x["token_logprob"], baseline="none", **_row_kwargs(x)
    ),
    "reverse_kl_sparse_teacher": lambda x: opd_ext.reverse_kl_loss_sparse_teacher(
        x["student"], x["ids"], x["topk_logprobs"], **_row_kwargs(x)
    ),
    "fused_linear_vopd_teacher_hidden": lambda x: opd_ext.fused_linear_vopd_loss(
        x["hidden"],
        x["weight"],
        x["tokens"],
        teacher_hidden=x["teacher_hidden"],
        teacher_weight=x["teacher_weight"],
        chunk_size=CHUNK,
        **_row_kwargs(x),
    ),
    "fused_linear_vopd_teacher_logits": lambda x: opd_ext.fused_linear_vopd_loss(
        x["hidden"],
        x["weight"],
        x["tokens"],
        teacher_logits=x["teacher"],
        baseline="topk",
        chunk_size=CHUNK,
        **_row_kwargs(x),
    ),
    "fused_linear_reverse_kl": lambda x: opd_ext.fused_linear_reverse_kl_loss(
        x["hidden"],
        x["weight"],
        teacher_hidden=x["teacher_hidden"],
        teacher_weight=x["teacher_weight"],
        chunk_size=CHUNK,
        **_row_kwargs(x),
    ),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "student_dtype,teacher_dtype", DTYPE_PAIRS, ids=[f"{_SHORT[s]}_{_SHORT[t]}" for s, t in DTYPE_PAIRS]
)
@pytest.mark.parametrize("loss", list(LOSSES))
def test_no_float32_vocabulary_sized_temporary(device, student_dtype, teacher_dtype, loss, monkeypatch):
    if loss == "vopd_topk_sorted":
        if device == "cpu":
            monkeypatch.setattr(ops, "runs_cuda_kernels", lambda tensor: True)
        # Blocks of N / 32 rows: the fallback's sort temporaries must scale with its block, not N.
        monkeypatch.setattr(torch_backend, "BLOCK_BYTES", CHUNK * V * 4)
    x = _inputs(student_dtype, teacher_dtype, device)
    leaves = [x[name] for name in ("student", "hidden", "weight")]

    def step():
        LOSSES[loss](x).backward()

    step()  # one-time allocations (thread pools, profiler buffers) stay out of the measurement
    for leaf in leaves:
        leaf.grad = None
    peak, retained = measure_peak_memory(step, device)
    grads = sum(leaf.grad.numel() * leaf.grad.element_size() for leaf in leaves if leaf.grad is not None)
    assert grads > 0 and retained <= grads + 4096, (retained, grads)
    float32_logits = N * V * 4
    assert peak - grads < float32_logits / 4, (
        f"{loss}: {(peak - grads) / 2**20:.2f} MiB above inputs and gradients at the peak; one float32 "
        f"[N, V] is {float32_logits / 2**20:.0f} MiB"
    )


def test_measurement_sees_allocations_inside_kernels():
    """The probe is not blind: a C++ kernel's output and an eager [N, V] float32 softmax show up."""
    student = torch.randn(N, V).bfloat16()
    tokens = torch.randint(0, V, (N,))
    coef, lse = torch.ones(N), torch.logsumexp(student.float(), -1)
    kernel = measure_peak_memory(lambda: ops.policy_gradient_backward(coef, student, tokens, lse, 1.0), "cpu")
    assert kernel.peak >= N * V * 2 and kernel.retained == 0  # the bf16 gradient, freed on return
    eager = measure_peak_memory(lambda: torch.log_softmax(student.float(), -1), "cpu")
    assert eager.peak >= 2 * N * V * 4


def test_sorted_topk_fallback_in_blocks_gives_the_kernels_values(monkeypatch):
    """The blocked fallback (5 blocks of 3 rows, the last one short) against the CPU kernel's
    streamed top-k baseline: loss and gradient."""
    x = _inputs(torch.float32, torch.float32, "cpu")
    student, teacher, tokens = x["student"][:14].detach(), x["teacher"][:14], x["tokens"][:14]

    def loss_and_grad():
        s = student.clone().requires_grad_()
        loss = opd_ext.vopd_loss(s, teacher, tokens, baseline="topk", topk=MAX_STREAMING_TOPK + 1, temperature=0.8)
        loss.backward()
        return loss, s.grad

    want = loss_and_grad()
    monkeypatch.setattr(ops, "runs_cuda_kernels", lambda tensor: True)
    monkeypatch.setattr(torch_backend, "BLOCK_BYTES", 3 * V * 4)
    got = loss_and_grad()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
