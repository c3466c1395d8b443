"""Tiny CUDA calls of every opd_ext kernel, for compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool memcheck python benchmarks/sanitize_ops.py [--ops topk_overlap,...]

Each op's driver runs a few small shapes chosen to reach the edge paths of a kernel: odd V (rows
that start unaligned for vector loads, tails shorter than a tile), V smaller than a block, a
vocabulary just above a power of two, k at both ends, -inf entries, a bf16 student with an fp32
teacher and the reverse, and the backward kernels. It prints "== <op>" before and "ok <op>" after each driver, so a
sanitizer report in the log can be attributed; ops missing from the build print "SKIP <op>: ...".
Run it with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so each tensor is its own allocation and memcheck sees
out-of-bounds accesses that the caching allocator would otherwise hide inside a larger block.
"""

from __future__ import annotations

import argparse
import sys

import torch

import harness  # noqa: F401  (puts the repository on the path for in-place builds)

VOCABS = (7, 129, 1000, 4099)
ROWS = 3
PAIRS = (
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
    (torch.float32, torch.bfloat16),
)


def _pairs(vocab, device, requires_grad=False):
    """(student, teacher) per dtype pair, with a -inf entry per row and one tied pair of values."""
    for s_dtype, t_dtype in PAIRS:
        gen = torch.Generator(device=device).manual_seed(vocab)
        student = torch.randn(ROWS, vocab, device=device, generator=gen) * 3
        teacher = torch.randn(ROWS, vocab, device=device, generator=gen) * 3
        if vocab > 2:
            student[:, 1] = float("-inf")
            teacher[:, 2] = float("-inf")
            student[0, -1] = student[0, 0]
        yield (student.to(s_dtype).requires_grad_(requires_grad), teacher.to(t_dtype))


def _tokens(vocab, device):
    return torch.randint(0, vocab, (ROWS,), device=device, generator=torch.Generator(device=device).manual_seed(1))


def drive_topk_overlap(opd_ext, device):
    for vocab in VOCABS:
        for student, teacher in _pairs(vocab, device):
            for k in sorted({1, min(16, vocab), min(64, vocab), vocab}):
                opd_ext.topk_overlap(student, teacher, k)


def drive_token_stats(opd_ext, device):
    for vocab in VOCABS:
        tokens = _tokens(vocab, device)
        for student, teacher in _pairs(vocab, device):
            opd_ext.token_stats(student, teacher, tokens)
            for topk in sorted({1, min(100, vocab)}):
                torch.ops.opd_ext.token_stats(student, teacher, tokens, 1.0, topk)
            torch.ops.opd_ext.student_stats(student, tokens, 0.7)


def drive_vopd_loss(opd_ext, device):
    for vocab in VOCABS:
        tokens = _tokens(vocab, device)
        for student, teacher in _pairs(vocab, device, requires_grad=True):
            for baseline in ("full", "topk", "none"):
                opd_ext.vopd_loss(student, teacher, tokens, baseline=baseline, topk=min(100, vocab)).backward()


def drive_reverse_kl_loss(opd_ext, device):
    for vocab in VOCABS:
        for student, teacher in _pairs(vocab, device, requires_grad=True):
            opd_ext.reverse_kl_loss(student, teacher, temperature=0.9).backward()


def drive_drift_step(opd_ext, device):
    """The decode step with and without the sampled tokens' statistics, a shrinking active batch,
    and the whole-sequence scan (a teacher far from the student, so rows drift and stop)."""
    for vocab in VOCABS:
        tokens = _tokens(vocab, device)
        for student, teacher in _pairs(vocab, device):
            config = opd_ext.PruneConfig(k=min(16, vocab), w_drop=0.4)
            monitor = opd_ext.DriftMonitor(ROWS, config, device=device)
            monitor.step(student, teacher)
            monitor.step(student, -teacher, tokens)
            rows = torch.tensor([0, ROWS - 1], device=device)
            monitor.step(student[rows], teacher[rows], tokens[rows], rows=rows)
    gen = torch.Generator(device=device).manual_seed(2)
    overlaps = torch.rand(ROWS, 37, device=device, generator=gen)
    opd_ext.drift_scan(overlaps, opd_ext.PruneConfig(w_drop=0.1), mask=overlaps > 0.1)


DRIVERS = {
    "topk_overlap": (drive_topk_overlap, ["topk_overlap"]),
    "token_stats": (drive_token_stats, ["token_stats"]),
    "vopd_loss": (drive_vopd_loss, ["vopd_loss"]),
    "reverse_kl_loss": (drive_reverse_kl_loss, ["reverse_kl_loss"]),
    "drift_step": (drive_drift_step, ["DriftMonitor", "PruneConfig", "drift_scan"]),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default=",".join(DRIVERS), help="comma list of " + ", ".join(DRIVERS))
    p.add_argument("--device", default="cuda", help="cuda (default); cpu only checks the drivers themselves")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("SKIP sanitizer drivers: no CUDA device is visible")
        return 0
    import opd_ext

    device = torch.device(args.device)
    failures = 0
    for name in args.ops.split(","):
        drive, api = DRIVERS[name]
        missing = [a for a in api if not hasattr(opd_ext, a)]
        if missing:
            print(f"SKIP {name}: opd_ext.{missing[0]} is not in this build", flush=True)
            continue
        print(f"== {name}", flush=True)
        try:
            drive(opd_ext, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            print(f"ok {name}", flush=True)
        except Exception as exc:  # noqa: BLE001  (report every op, then fail)
            failures += 1
            print(f"FAIL {name}: {type(exc).__name__}: {exc}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
