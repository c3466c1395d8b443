"""Peak memory and time of one training step of the vOPD loss from the student's last hidden states:
eager (materialised logits) vs opd_ext.fused_linear_vopd_loss (row chunks, logits never whole).

One step = student logits from hidden @ weight.T, teacher logits from its own hidden states and
lm_head (no grad), the loss, and backward to the student's hidden states and weight.

Methods:
  eager         what a PyTorch user writes: full logits, float32 log-softmax of both sides, the vOPD
                surrogate with the full reverse-KL baseline, autograd backward.
  materialised  full logits, but the loss is opd_ext.vopd_loss (fused single-pass kernels).
  fused         opd_ext.fused_linear_vopd_loss: logits formed and consumed one row chunk at a time.

Memory is the honest OS view: every (method, size) runs in a fresh subprocess; after the inputs
exist and a tiny warm-up step has run, the peak-RSS counter is reset (/proc/self/clear_refs) and
VmHWM is read after the step. "step peak" = VmHWM - RSS with inputs, i.e. everything the step
allocated (logits, temporaries, gradients); "total peak" adds the inputs and the torch runtime.
Sizes run from small to large and a size is skipped, not run, when the linear trend of the smaller
ones predicts a peak above --max-gb or above the memory this shared machine has available.

    python benchmarks/bench_fused_linear.py --rows 512 1024 2048 4096
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
RESULTS = Path(__file__).resolve().parent / "results"


# ---- small self-contained memory/timing helper (swap for benchmarks/harness.py once it exists) ----


def _status_mib(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) / 1024


def measure_step(step) -> dict:
    """Run ``step()`` once: wall seconds and the RSS high-water mark it reached (Linux only)."""
    rss_before = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    start = time.perf_counter()
    result = step()
    seconds = time.perf_counter() - start
    return dict(
        seconds=seconds,
        rss_inputs_mib=rss_before,
        peak_total_mib=_status_mib("VmHWM"),
        step_peak_mib=_status_mib("VmHWM") - rss_before,
        result=result,
    )


def available_mib() -> float:
    return int(re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text()).group(1)) / 1024


# ---- the three methods ---------------------------------------------------------------------------


def eager_vopd_loss(student_logits, teacher_logits, tokens):
    import torch.nn.functional as F

    logp = F.log_softmax(student_logits.float(), dim=-1)
    logq = F.log_softmax(teacher_logits.float(), dim=-1)
    logp_y = logp.gather(-1, tokens[:, None]).squeeze(-1)
    logq_y = logq.gather(-1, tokens[:, None]).squeeze(-1)
    reverse_kl = (logp.exp() * (logp - logq)).sum(-1)
    advantage = (logq_y - logp_y + reverse_kl).detach()
    return -(advantage * logp_y).mean()


def run_worker(args) -> dict:
    import torch
    import torch.nn.functional as F

    import opd_ext

    torch.manual_seed(0)
    dtype = getattr(torch, DTYPES[args.dtype])
    n, h, v = args.n, args.hidden, args.vocab
    # lm_head-like scales: logits with a std of about 1.
    hidden = torch.randn(n, h, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h) * h**-0.5).to(dtype).requires_grad_()
    teacher_hidden = torch.randn(n, h, dtype=dtype)
    teacher_weight = (torch.randn(v, h) * h**-0.5).to(dtype)
    tokens = torch.randint(0, v, (n,))

    def step(rows):
        hid, tok, t_hid = hidden[rows], tokens[rows], teacher_hidden[rows]
        if args.method.startswith("fused"):
            loss = opd_ext.fused_linear_vopd_loss(
                hid, weight, tok, teacher_hidden=t_hid, teacher_weight=teacher_weight, chunk_size=args.chunk_size
            )
        else:
            with torch.no_grad():
                teacher_logits = F.linear(t_hid, teacher_weight)
            student_logits = F.linear(hid, weight)
            if args.method == "eager":
                loss = eager_vopd_loss(student_logits, teacher_logits, tok)
            else:
                loss = opd_ext.vopd_loss(student_logits, teacher_logits, tok)
        loss.backward()
        return loss.item()

    step(slice(0, 8))  # warm-up: oneDNN primitive creation, lazy inits
    hidden.grad = weight.grad = None
    out = measure_step(lambda: step(slice(None)))
    out["loss"] = out.pop("result")
    return out


# ---- driver --------------------------------------------------------------------------------------


def predict_mib(history: list[tuple[int, float]], n: int) -> float | None:
    """Linear extrapolation in N from the two largest smaller sizes (every [N, V] buffer is linear in N)."""
    if len(history) < 2:
        return None
    (n0, m0), (n1, m1) = history[-2:]
    return m1 + (m1 - m0) / (n1 - n0) * (n - n1)


def summary_lines(rows: list[dict]) -> list[str]:
    """fused vs eager per N: step peak, total peak and time; '~' marks an extrapolated eager value."""
    by_key = {(r["method"], r["n"]): r for r in rows}
    lines = [
        "| fused method | N | eager step peak (MiB) | fused step peak (MiB) | fused / eager step | "
        "fused / eager total | eager s | fused s | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    fused_methods = sorted({r["method"] for r in rows if r["method"].startswith("fused")})
    for n, method in ((n, m) for m in fused_methods for n in sorted({r["n"] for r in rows})):
        eager, fused = by_key.get(("eager", n)), by_key.get((method, n))
        if not eager or not fused or fused["status"] != "measured":
            continue
        measured = eager["status"] == "measured"
        eager_step = eager["step_peak_mib"] if measured else eager["predicted_step_mib"]
        if eager_step in ("", None) or eager_step <= 0:
            continue
        eager_total = eager_step + (eager["rss_inputs_mib"] if measured else fused["rss_inputs_mib"])
        mark = "" if measured else "~"
        speed = f"{eager['seconds'] / fused['seconds']:.2f}x" if measured else ""
        lines.append(
            f"| {method} | {n} | {mark}{eager_step:.0f} | {fused['step_peak_mib']:.0f} | "
            f"{mark}{fused['step_peak_mib'] / eager_step:.1%} | {mark}{fused['peak_total_mib'] / eager_total:.1%} | "
            f"{eager['seconds']} | {fused['seconds']} | {speed} |"
        )
    return lines


def parse_method(text: str) -> str:
    name, _, rows = text.partition(":")
    if name not in ("eager", "materialised", "fused") or (rows and (name != "fused" or not rows.isdigit())):
        raise argparse.ArgumentTypeError(f"expected eager, materialised, fused or fused:ROWS, got {text!r}")
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["eager", "materialised", "fused"],
        type=parse_method,
        help="eager, materialised, fused (default chunk rule) or fused:ROWS (ROWS per chunk)",
    )
    parser.add_argument("--chunk-size", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--max-gb", type=float, default=14.0, help="skip a run predicted to peak above this")
    parser.add_argument("--out", default=str(RESULTS / "fused_linear_cpu"), help="writes OUT.csv and OUT.md")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(run_worker(args)))
        return 0

    import torch

    command = "python benchmarks/bench_fused_linear.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows = []
    for method in args.methods:
        history: list[tuple[int, float]] = []  # (N, step peak MiB)
        inputs_mib = 0.0
        for n in sorted(args.rows):
            row = dict(
                method=method,
                n=n,
                hidden=args.hidden,
                vocab=args.vocab,
                dtype=args.dtype,
                chunk_size=method.partition(":")[2],
                seconds="",
                rss_inputs_mib="",
                step_peak_mib="",
                peak_total_mib="",
                predicted_step_mib="",
                loss="",
                status="measured",
            )
            predicted = predict_mib(history, n)
            limit = min(args.max_gb * 1024, available_mib() - 3 * 1024)  # leave the others 3 GiB
            if predicted is not None:
                row["predicted_step_mib"] = round(predicted, 1)
            if predicted is not None and predicted + inputs_mib > limit:
                row["status"] = (
                    f"skipped: predicted total peak {(predicted + inputs_mib) / 1024:.1f} GiB "
                    f"> limit {limit / 1024:.1f} GiB"
                )
            else:
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    "--method",
                    method,
                    "--n",
                    str(n),
                    "--hidden",
                    str(args.hidden),
                    "--vocab",
                    str(args.vocab),
                    "--dtype",
                    args.dtype,
                ]
                if method.startswith("fused:"):
                    cmd += ["--chunk-size", method.partition(":")[2]]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    row["status"] = f"failed (rc {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"
                else:
                    result = json.loads(proc.stdout.strip().splitlines()[-1])
                    for key in ("seconds", "rss_inputs_mib", "step_peak_mib", "peak_total_mib", "loss"):
                        row[key] = round(result[key], 4 if key == "loss" else 1)
                    history.append((n, result["step_peak_mib"]))
                    inputs_mib = result["rss_inputs_mib"]
            print(json.dumps(row), flush=True)
            rows.append(row)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads visible, "
        f"torch {torch.__version__} ({torch.get_num_threads()} intra-op threads)"
    )
    lines = [
        "# Fused-linear vOPD loss: peak memory and time on CPU",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine}  ",
        f"Shapes: N rows, H={args.hidden}, V={args.vocab}, {args.dtype} hidden states and weights, teacher "
        f"as hidden states + lm_head of the same shapes. One step = logits, loss, backward to hidden and weight.",
        "",
        "| method | N | seconds | RSS with inputs (MiB) | step peak (MiB) | total peak (MiB) | loss | status |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['n']} | {r['seconds']} | {r['rss_inputs_mib']} | {r['step_peak_mib']} "
            f"| {r['peak_total_mib']} | {r['loss']} | {r['status']} |"
        )
    lines += [
        "",
        "Fused vs eager ('~': eager too large for this machine, its step peak extrapolated "
        "linearly in N from the two largest measured sizes):",
        "",
    ] + summary_lines(rows)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
