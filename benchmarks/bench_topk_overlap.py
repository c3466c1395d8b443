"""Benchmark opd_ext.topk_overlap (decode-step shapes [B, V], k=16) against the PyTorch reference.

    python benchmarks/bench_topk_overlap.py            # GPU if visible, else the reduced CPU set
    python benchmarks/bench_topk_overlap.py --quick    # CPU smoke run

Besides the reference (a stable full sort, exact on ties) it times ``torch.topk`` + compare, what
verl's ``overlap_ratio`` metric does: faster than the reference but not tie-exact, so it is a
speed yardstick only.
"""

from __future__ import annotations

import sys

from opd_ext import reference  # noqa: E402  (harness puts the repo on the path when run as a script)

import harness
from harness import Case, Impl, Workload


def cases(args) -> list[Case]:
    return [Case(shape, dtype, {"k": args.k}) for dtype in args.dtypes for shape in harness.decode_shapes(args)]


def torch_topk_overlap(student_logits, teacher_logits, k):
    ids_s = student_logits.topk(k).indices
    ids_t = teacher_logits.topk(k).indices
    return (ids_s.unsqueeze(-1) == ids_t.unsqueeze(-2)).any(-1).sum(-1).float() / k


def build(case: Case, device, requested) -> Workload:
    import opd_ext

    k = case.params["k"]
    student = harness.random_logits(case.shape, case.dtype, device, seed=0)
    teacher = harness.random_logits(case.shape, case.dtype, device, seed=1)
    impls = {harness.SUBJECT: Impl(lambda: opd_ext.topk_overlap(student, teacher, k))}
    # The reference is already float32 (a stable sort): it is the eager baseline as it is.
    impls.update(harness.baseline_impls(requested, reference.topk_overlap, student, teacher, k))
    if "torch_topk" in requested or "eager" in requested:
        impls["torch_topk"] = Impl(lambda: torch_topk_overlap(student, teacher, k))
    return Workload(impls, floor_bytes=harness.logit_bytes(student, teacher))


def extra_args(parser):
    parser.add_argument("--k", type=int, default=16, help="top-k size (Prune-OPD: 16)")


if __name__ == "__main__":
    sys.exit(
        harness.main(
            op="topk_overlap",
            script=__file__,
            description=__doc__,
            api=["topk_overlap"],
            kernels=["topk_overlap"],
            cases=cases,
            build=build,
            extra_args=extra_args,
        )
    )
