"""Benchmark opd_ext.vopd_loss, forward and forward+backward, against the PyTorch yardsticks.

    python benchmarks/bench_vopd_loss.py [--quick] [--device cpu|cuda] [--baseline full,topk,none]

"fwd" is the training forward (student requires grad, so whatever the backward needs is saved);
"fwd+bwd" adds ``loss.backward()``, whose floor also counts writing the logit gradient once.
docs/spec.md §5 goal on GPU: the forward at >= 80% of the copy bandwidth.

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
    return [
        case
        for baseline in args.baseline.split(",")
        for case in harness.training_cases(args, passes=["fwd", "fwd+bwd"], params={"baseline": baseline})
    ]


def build(case: Case, device, requested) -> Workload:
    import opd_ext

    vocab = case.shape[-1]
    student = harness.random_logits(case.shape, case.dtype, device, seed=0).requires_grad_()
    teacher = harness.random_logits(case.shape, case.dtype, device, seed=1)
    tokens = harness.random_tokens(case.shape[:-1], vocab, device)
    kwargs = {"baseline": case.params["baseline"]}
    backward = case.pass_ == "fwd+bwd"
    after = (lambda loss: loss.backward()) if backward else None
    clear_grad = (lambda: setattr(student, "grad", None)) if backward else None

    def subject():
        loss = opd_ext.vopd_loss(student, teacher, tokens, **kwargs)
        return after(loss) if after else loss

    impls = {harness.SUBJECT: Impl(subject, clear_grad)}
    impls.update(
        harness.baseline_impls(
            requested,
            baselines.vopd_loss,
            student,
            teacher,
            tokens,
            reference_fn=reference.vopd_loss,
            setup=clear_grad,
            after=after,
            **kwargs,
        )
    )
    floor = harness.logit_bytes(student, teacher) + (harness.logit_bytes(student) if backward else 0)
    return Workload(impls, floor_bytes=floor)


def extra_args(parser):
    parser.add_argument("--baseline", default="full", help="vOPD baseline(s) to time: full,topk,none")


if __name__ == "__main__":
    sys.exit(
        harness.main(
            op="vopd_loss",
            script=__file__,
            description=__doc__,
            api=["vopd_loss"],
            kernels=["token_stats", "policy_gradient_backward"],
            cases=cases,
            build=build,
            extra_args=extra_args,
        )
    )
