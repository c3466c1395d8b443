"""The errors a new user meets first, at every public entry point that can raise them: a label-style
ignore index (-100) in tokens, the default top-k above a small vocabulary, CUDA asked for where
there is none."""

import pytest
import torch

import opd_ext
from opd_ext._validation import check_kernels_for

VOCAB = 50


def _inputs(device):
    student, teacher = torch.randn(4, VOCAB, device=device), torch.randn(4, VOCAB, device=device)
    tokens = torch.tensor([3, -100, 7, -100], device=device)  # labels with ignore_index, no mask
    return student, teacher, tokens


def _token_entry_points(student, teacher, tokens):
    """Every public function that takes sampled ids, called with `tokens`."""
    ids = teacher.topk(4, -1).indices
    topk_logprobs = teacher.log_softmax(-1).gather(-1, ids)
    hidden, weight = torch.randn(4, 8, device=student.device), torch.randn(VOCAB, 8, device=student.device)
    return {
        "token_stats": lambda: opd_ext.token_stats(student, teacher, tokens),
        "vopd_loss": lambda: opd_ext.vopd_loss(student, teacher, tokens),
        "vopd_loss_sparse_teacher": lambda: opd_ext.vopd_loss_sparse_teacher(
            student, tokens, ids, topk_logprobs, torch.zeros(4, device=student.device)
        ),
        "fused_linear_vopd_loss": lambda: opd_ext.fused_linear_vopd_loss(
            hidden, weight, tokens, teacher_logits=teacher
        ),
        "DriftMonitor.step": lambda: opd_ext.DriftMonitor(4, device=student.device).step(student, teacher, tokens),
    }


def test_ignore_index_in_tokens_says_to_pass_mask(device):
    student, teacher, tokens = _inputs(device)
    for name, call in _token_entry_points(student, teacher, tokens).items():
        with pytest.raises((ValueError, RuntimeError)) as info:
            call()
        message = str(info.value).splitlines()[0]
        assert "[0, V=50)" in message and "mask=(tokens != -100)" in message, (name, message)
    # With the mask the same call works, whatever the ids at masked positions.
    mask = tokens != -100
    opd_ext.vopd_loss(student, teacher, tokens, mask=mask)
    # An id above V is not an ignore index: no mask hint there.
    with pytest.raises(RuntimeError) as info:
        opd_ext.vopd_loss(student, teacher, torch.tensor([3, 50, 7, 1], device=device))
    assert "mask=" not in str(info.value)


def test_default_topk_above_a_small_vocabulary_says_it_is_the_default(device):
    student, teacher, tokens = _inputs(device)
    tokens = tokens.clamp(min=0)
    hidden, weight = torch.randn(4, 8, device=device), torch.randn(VOCAB, 8, device=device)
    for call in (
        lambda: opd_ext.vopd_loss(student, teacher, tokens, baseline="topk"),
        lambda: opd_ext.fused_linear_vopd_loss(hidden, weight, tokens, teacher_logits=teacher, baseline="topk"),
    ):
        with pytest.raises(
            ValueError,
            match=r"topk=100 is out of range: need 1 <= topk <= V=50 \(topk=100 is the "
            r"default; pass topk= at most 50\)",
        ):
            call()
    with pytest.raises(ValueError, match=r"topk=120 is out of range: need 1 <= topk <= V=50$"):
        opd_ext.vopd_loss(student, teacher, tokens, baseline="topk", topk=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda_is_one_clear_line():
    with pytest.raises(
        RuntimeError,
        match=r"^device='cuda', but CUDA is not available here \(.*\); use "
        r"device=\"cpu\"$",
    ):
        opd_ext.DriftMonitor(2, device="cuda")
    with pytest.raises(ValueError, match="device='gpu' is not a device"):
        opd_ext.DriftMonitor(2, device="gpu")


class _LooksLikeCuda(torch.Tensor):
    """A CPU tensor that reports itself as CUDA: the check under test reads only is_cuda / device."""

    @property
    def is_cuda(self):
        return True

    @property
    def device(self):
        return torch.device("cuda", 0)


def test_cuda_tensors_on_a_build_without_cuda_kernels(monkeypatch):
    import opd_ext._extension

    monkeypatch.setattr(opd_ext.ops, "cuda_kernels_available", lambda: False)
    fake = torch.zeros(2, 3).as_subclass(_LooksLikeCuda)
    with pytest.raises(RuntimeError, match=r"^student_logits is on cuda:0, but this opd_ext build has no CUDA kernels"):
        check_kernels_for("student_logits", fake)
    check_kernels_for("student_logits", torch.zeros(2, 3))  # CPU tensors are always served
    monkeypatch.setattr(opd_ext.ops, "cuda_kernels_available", lambda: True)
    check_kernels_for("student_logits", fake)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_cuda_tensors_on_a_build_without_cuda_kernels(monkeypatch):
    import opd_ext._extension

    monkeypatch.setattr(opd_ext.ops, "cuda_kernels_available", lambda: False)
    logits = torch.randn(2, 8, device="cuda")
    for call in (
        lambda: opd_ext.topk_overlap(logits, logits, 2),
        lambda: opd_ext.reverse_kl_loss(logits, logits),
        lambda: opd_ext.fused_linear_reverse_kl_loss(
            logits, torch.randn(5, 8, device="cuda"), teacher_logits=torch.randn(2, 5, device="cuda")
        ),
    ):
        with pytest.raises(RuntimeError, match="this opd_ext build has no CUDA kernels"):
            call()
