"""Benchmark opd_ext.reverse_kl_loss, forward and forward+backward, against the PyTorch yardsticks.

    python benchmarks/bench_reverse_kl_loss.py [--quick] [--device cpu|cuda]

"fwd" is the training forward (student requires grad); "fwd+bwd" adds ``loss.backward()``, whose
floor also counts writing the logit gradient once.

Yardsticks (benchmarks/baselines.py): "eager" = the same math in float32 PyTorch ops, "compile" =
torch.compile of it; "reference" (opt-in) = the float64 opd_ext.reference.
"""

from __future__ import annotations

import sys

from opd_ext import reference  # noqa: E402  (harness puts the repo on the path when run as a script)

import baselines
import harness
from harness import Case, Impl, Workload


def cases(args) -> list[Case]:
    return harness.training_cases(args, passes=["fwd", "fwd+bwd"])


def build(case: Case, device, requested) -> Workload:
    import opd_ext

    student = harness.random_logits(case.shape, case.dtype, device, seed=0).requires_grad_()
    teacher = harness.random_logits(case.shape, case.dtype, device, seed=1)
    backward = case.pass_ == "fwd+bwd"
    after = (lambda loss: loss.backward()) if backward else None
    clear_grad = (lambda: setattr(student, "grad", None)) if backward else None

    def subject():
        loss = opd_ext.reverse_kl_loss(student, teacher)
        return after(loss) if after else loss

    impls = {harness.SUBJECT: Impl(subject, clear_grad)}
    impls.update(
        harness.baseline_impls(
            requested,
            baselines.reverse_kl_loss,
            student,
            teacher,
            reference_fn=reference.reverse_kl_loss,
            setup=clear_grad,
            after=after,
        )
    )
    floor = harness.logit_bytes(student, teacher) + (harness.logit_bytes(student) if backward else 0)
    return Workload(impls, floor_bytes=floor)


if __name__ == "__main__":
    sys.exit(
        harness.main(
            op="reverse_kl_loss",
            script=__file__,
            description=__doc__,
            api=["reverse_kl_loss"],
            kernels=["token_stats", "reverse_kl_backward"],
            cases=cases,
            build=build,
        )
    )
