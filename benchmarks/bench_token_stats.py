"""Benchmark opd_ext.token_stats (training shapes [N, V]) against the PyTorch yardsticks.

    python benchmarks/bench_token_stats.py [--quick] [--device cpu|cuda]

docs/spec.md §5 goal on GPU: >= 80% of the copy bandwidth over the floor (one read of both logit rows).

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
    return harness.training_cases(args, passes=["fwd"])


def build(case: Case, device, requested) -> Workload:
    import opd_ext

    vocab = case.shape[-1]
    student = harness.random_logits(case.shape, case.dtype, device, seed=0)
    teacher = harness.random_logits(case.shape, case.dtype, device, seed=1)
    tokens = harness.random_tokens(case.shape[:-1], vocab, device)
    impls = {harness.SUBJECT: Impl(lambda: opd_ext.token_stats(student, teacher, tokens))}
    impls.update(
        harness.baseline_impls(
            requested, baselines.token_stats, student, teacher, tokens, reference_fn=reference.token_stats
        )
    )
    return Workload(impls, floor_bytes=harness.logit_bytes(student, teacher))


if __name__ == "__main__":
    sys.exit(
        harness.main(
            op="token_stats",
            script=__file__,
            description=__doc__,
            api=["token_stats"],
            kernels=["token_stats"],
            cases=cases,
            build=build,
        )
    )
