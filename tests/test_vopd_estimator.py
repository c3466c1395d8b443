"""The vOPD estimator is unbiased for every baseline, and the baselines lower its variance (docs/spec.md §1.2).

One position, a fixed student/teacher pair over a small vocabulary, M sampled tokens y_i ~ p. With
num_items=1, row i of ∂L/∂student_logits of one vopd_loss call over M copies of the position is
the per-sample gradient g_i = -A_i (e_{y_i} - p), so a single fused forward/backward yields all M
Monte-Carlo samples. In expectation, E[g] = ∇_s KL(p‖q) (the negated gradient of the OPD objective
-KL(p‖q)) whatever the baseline, because E_y[∇ log p(y)] = 0.

The check is component-wise, |mean_j - ∇_j KL| ≤ Z standard errors, with fixed seeds; the negative
control below shows it rejects a biased estimator of the same size, so it can fail.
"""

import pytest
import torch

import opd_ext

# 40k rows: on the emulated device only with --simt-full (the kernels it runs are covered elsewhere).
pytestmark = pytest.mark.emu_heavy

VOCAB, SAMPLES, Z = 16, 40_000, 5.0


def _fixed_pair(device):
    generator = torch.Generator().manual_seed(1234)
    student = 1.5 * torch.randn(VOCAB, generator=generator)
    teacher = student + 3.0 * torch.randn(VOCAB, generator=generator)  # KL(p‖q) ≈ 2.1
    return student.to(device), teacher.to(device)


def _analytic_gradient(student, teacher):
    """∇_s KL(p‖q) = p (log p - log q - KL), in float64 by autograd."""
    s = student.double().requires_grad_()
    log_p, log_q = torch.log_softmax(s, -1), torch.log_softmax(teacher.double(), -1)
    (log_p.exp() * (log_p - log_q)).sum().backward()
    return s.grad


def _per_sample_gradients(student, teacher, baseline, topk=4):
    generator = torch.Generator().manual_seed(42)
    p = torch.softmax(student.double().cpu(), -1)
    tokens = torch.multinomial(p, SAMPLES, replacement=True, generator=generator).to(student.device)
    x = student.expand(SAMPLES, VOCAB).clone().requires_grad_()
    opd_ext.vopd_loss(x, teacher.expand(SAMPLES, VOCAB), tokens, baseline=baseline, topk=topk, num_items=1).backward()
    return x.grad.double()


def _within_standard_errors(samples, expected):
    mean = samples.mean(0)
    standard_error = samples.std(0) / SAMPLES**0.5
    return bool(((mean - expected).abs() <= Z * standard_error + 1e-12).all())


@pytest.mark.parametrize("baseline", ["full", "topk", "none"])
def test_mean_gradient_matches_the_kl_gradient(device, baseline):
    student, teacher = _fixed_pair(device)
    expected = _analytic_gradient(student, teacher).to(device)
    samples = _per_sample_gradients(student, teacher, baseline)
    assert _within_standard_errors(samples, expected), (samples.mean(0), expected)


def test_baselines_lower_the_variance(device):
    student, teacher = _fixed_pair(device)
    total_variance = {
        b: _per_sample_gradients(student, teacher, b).var(0).sum().item() for b in ("full", "topk", "none")
    }
    # Measured on this pair: full ≈ 0.57x and top-4 ≈ 0.58x of the unbaselined variance; the
    # thresholds leave room for sampling noise (a few %) but not for a baseline that does nothing
    # or has the wrong sign (which raises the variance).
    assert total_variance["full"] < 0.7 * total_variance["none"], total_variance
    assert total_variance["topk"] < 0.75 * total_variance["none"], total_variance


def test_the_check_rejects_a_biased_estimator(device):
    # Negative control: a baseline that depends on the sampled token, b(y) = r(y) / 2, halves the
    # gradient on average. The same check must flag it.
    student, teacher = _fixed_pair(device)
    expected = _analytic_gradient(student, teacher).to(device)
    biased = _per_sample_gradients(student, teacher, "none") / 2
    assert not _within_standard_errors(biased, expected)
