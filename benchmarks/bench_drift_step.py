"""Benchmark one Prune-OPD decode step, ``opd_ext.DriftMonitor.step``, on [B, V] logits.

    python benchmarks/bench_drift_step.py [--quick] [--device cpu|cuda]

The step reads the student and teacher rows once (top-k overlap) and updates the per-sequence drift
state. The eager yardstick is what one writes without the fused op: the reference top-k overlap
followed by the SPEC §1 state update in PyTorch ops (and torch.compile of that function). The teacher is the student plus small noise, so
overlaps stay above the threshold and rows keep decoding, as most steps of a real rollout do; the
monitor is restarted every ``RESTART_EVERY`` steps (outside the timed region) so its history stays
rollout-sized.
"""
from __future__ import annotations

import sys

import torch

import harness
from harness import Case, Impl, Workload

from opd_ext import reference  # noqa: E402  (harness puts the repo on the path when run as a script)

RESTART_EVERY = 512


def cases(args) -> list[Case]:
    return [Case(shape, dtype) for dtype in args.dtypes for shape in harness.decode_shapes(args)]


# SPEC §1 defaults; the yardstick only needs representative work, not the caller's config.
TOPK, BETA, THRESHOLD, WARMUP, W_DROP, W_BASE = 16, 0.0, 0.7, 0, 0.01, 0.5


def eager_drift_step(ema, events, length, stopped, student_logits, teacher_logits):
    """One decode step of SPEC §1 drift tracking in PyTorch ops: returns the new state and the
    token's reward multiplier."""
    overlap = reference.topk_overlap(student_logits, teacher_logits, TOPK)
    ema = torch.where(length == 0, overlap, BETA * ema + (1 - BETA) * overlap)
    events = events + ((length >= WARMUP) & (ema < THRESHOLD) & ~stopped)
    weight = (1 - W_DROP * events).clamp(0, 1)
    length = length + ~stopped
    return ema, events, length, stopped | (weight <= 0), W_BASE + weight


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


def build(case: Case, device, baselines) -> Workload:
    import opd_ext

    batch, _ = case.shape
    student = harness.random_logits(case.shape, case.dtype, device, seed=0)
    teacher = student + harness.random_logits(case.shape, case.dtype, device, seed=1, scale=0.1)
    impls = {harness.SUBJECT: _Restarting(
        lambda: opd_ext.DriftMonitor(batch, opd_ext.PruneConfig(), device=device),
        lambda monitor: monitor.step(student, teacher)).impl()}

    def fresh_state():
        zeros = torch.zeros(batch, device=device)
        return {"tensors": (zeros, zeros, zeros.long(), zeros.bool()), "multipliers": []}

    for name in baselines:
        if name not in ("eager", "compile"):
            continue
        step_fn = eager_drift_step if name == "eager" else harness.compiled(eager_drift_step)

        def step(state, step_fn=step_fn):
            *state["tensors"], multiplier = step_fn(*state["tensors"], student, teacher)
            state["multipliers"].append(multiplier)
            return state["tensors"][-1]

        impls[name] = _Restarting(fresh_state, step).impl()
    return Workload(impls, floor_bytes=harness.logit_bytes(student, teacher))


if __name__ == "__main__":
    sys.exit(harness.main(op="drift_step", script=__file__, description=__doc__,
                          api=["DriftMonitor", "PruneConfig"], kernels=["topk_overlap"],
                          cases=cases, build=build))
