"""Benchmark one Prune-OPD decode step, ``opd_ext.DriftMonitor.step``, on [B, V] logits.

    python benchmarks/bench_drift_step.py [--quick] [--device cpu|cuda]

The step reads the student and teacher rows once (top-k overlap) and updates the per-sequence drift
state. The eager yardstick is the monitor's own path without the fused op (baselines.drift_step:
reference top-k overlap + reference state update); "compile" is torch.compile of it. The teacher
is the student plus small noise, so overlaps stay above the threshold and rows keep decoding, as
most steps of a real rollout do; every ``RESTART_EVERY`` steps a fresh monitor / state is made
outside the timed region, so the history stays rollout-sized.
"""

from __future__ import annotations

import sys

import baselines
import harness
from harness import Case, Impl, Workload

RESTART_EVERY = 512


def cases(args) -> list[Case]:
    return [Case(shape, dtype) for dtype in args.dtypes for shape in harness.decode_shapes(args)]


class _Restarting:
    """Drives ``step(state)``; a fresh state from ``make`` every RESTART_EVERY calls, in the untimed
    setup, keeps the history rollout-sized."""

    def __init__(self, make, step):
        self.make, self.step, self.state, self.steps = make, step, None, RESTART_EVERY

    def setup(self):
        if self.steps >= RESTART_EVERY:
            self.state, self.steps = self.make(), 0
        self.steps += 1

    def impl(self) -> Impl:
        return Impl(lambda: self.step(self.state), self.setup)


def build(case: Case, device, requested) -> Workload:
    import opd_ext
    from opd_ext.prune import DriftState

    batch, _ = case.shape
    config = opd_ext.PruneConfig()
    student = harness.random_logits(case.shape, case.dtype, device, seed=0)
    teacher = student + harness.random_logits(case.shape, case.dtype, device, seed=1, scale=0.1)
    impls = {
        harness.SUBJECT: _Restarting(
            lambda: opd_ext.DriftMonitor(batch, config, device=device), lambda monitor: monitor.step(student, teacher)
        ).impl()
    }
    fresh_state = lambda: DriftState.fresh(batch, device, None)  # noqa: E731
    for name in requested:
        step = (
            {"eager": baselines.drift_step}.get(name) if name != "compile" else harness.compiled(baselines.drift_step)
        )
        if step is not None:
            impls[name] = _Restarting(
                fresh_state, lambda state, step=step: step(state, student, teacher, config.k, config.kernel_args())
            ).impl()
    return Workload(impls, floor_bytes=harness.logit_bytes(student, teacher))


if __name__ == "__main__":
    sys.exit(
        harness.main(
            op="drift_step",
            script=__file__,
            description=__doc__,
            api=["DriftMonitor", "PruneConfig"],
            kernels=["drift_step"],
            cases=cases,
            build=build,
        )
    )
