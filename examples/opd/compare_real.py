"""The methods compared on the real pair, five runs: OPD, vOPD, Prune-OPD with the authors' rule and with
the repetition rule, and Prune-OPD + vOPD, trained from the same layer-pruned SmolLM2-135M student
towards the same teacher.

    python -m examples.opd.compare_real                      # ~60-80 min on 2 CPU cores, resumable
    python -m examples.opd.compare_real --report-only        # the report from whatever has finished

Disk: every run keeps a checkpoint of the student and its optimiser (about 1.5 GB; 7.5 GB for the
five). The settings of a runs folder are recorded in <runs>/settings.json: rerunning with other
settings is refused (use another --runs) instead of mixing runs of different settings.

Every run is `examples/train_opd.py --preset smollm2` with the same seed (so the same prompts and the
same first rollouts), checkpointed after every step: interrupt at any time and rerun the same command
to continue. The report compares, at the held-out evaluations, the teacher-scored reverse KL of the
student's greedy replies (the quality measure; the accuracy of a 135M model on these word problems is
near zero), how many of those replies degenerate into loops, and what each method spent to get
there: student decode tokens (what Prune-OPD saves) and OPD wall time. The quality level compared at
is the worst of the methods' best held-out reverse KLs, so every method reached it.

Outputs: <runs>/<method>/ (each run's metrics.jsonl, student), <out>.json (the figures) and
<out>.png (held-out reverse KL against decode tokens and wall time, and the degeneration rate).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[2]

# Run name -> train_opd.py options. The repetition rule is the smollm2 preset's own PruneConfig
# (docs/reproduction_real.md, section 2); the authors' rule is --prune-preset paper.
METHODS = {
    "opd": ["--method", "opd"],
    "vopd": ["--method", "vopd"],
    "prune_authors": ["--method", "prune", "--prune-preset", "paper"],
    "prune_repetition": ["--method", "prune"],
    "prune_vopd_repetition": ["--method", "prune+vopd"],
}
LABELS = {
    "opd": "OPD",
    "vopd": "vOPD",
    "prune_authors": "Prune-OPD, authors' rule (k 16, 0.7, w_drop 0.01)",
    "prune_repetition": "Prune-OPD, repetition rule (window 48)",
    "prune_vopd_repetition": "Prune-OPD + vOPD, repetition rule",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="runs to include")
    p.add_argument("--steps", type=int, default=10, help="OPD steps per run (default 10)")
    p.add_argument("--batch-size", type=int, default=8, help="rollouts per step (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="rollout and held-out reply cap (default 128)")
    p.add_argument("--eval-every", type=int, default=5, help="steps between held-out evaluations (default 5)")
    p.add_argument("--eval-size", type=int, default=16, help="held-out word problems (default 16)")
    p.add_argument("--seed", type=int, default=0, help="prompts and sampling (default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (default 1)")
    p.add_argument("--jobs", type=int, choices=(1, 2), default=1, help="runs at a time (default 1)")
    p.add_argument("--runs", type=Path, default=Path("runs/compare_smollm2"), help="one folder per run")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("runs/compare_smollm2/report"),
        help="<out>.json and <out>.png (default runs/compare_smollm2/report)",
    )
    p.add_argument("--report-only", action="store_true", help="write the report from the runs as they are")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def train_command(args, name: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "examples" / "train_opd.py"),
        "--preset",
        "smollm2",
        *METHODS[name],
        "--out",
        str(args.runs / name),
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--eval-every",
        str(args.eval_every),
        "--eval-size",
        str(args.eval_size),
        "--seed",
        str(args.seed),
        "--threads",
        str(args.threads),
        "--save-every",
        "1",
        "--no-plots",
        "--quiet",
    ]


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def steps_done(args, name: str) -> int:
    rows = read_rows(args.runs / name / "metrics.jsonl")
    return max((r["step"] for r in rows), default=0)


SETTINGS = ("steps", "batch_size", "max_new_tokens", "eval_every", "eval_size", "seed")


def check_settings(args) -> None:
    """Record the settings of the runs folder on first use; refuse others later, so a report never
    labels runs with settings they were not trained with."""
    path = args.runs / "settings.json"
    settings = {name: getattr(args, name) for name in SETTINGS}
    if path.exists():
        recorded = json.loads(path.read_text())
        changed = {k: (recorded.get(k), v) for k, v in settings.items() if recorded.get(k) != v}
        if changed:
            raise SystemExit(
                f"{args.runs} holds runs with other settings (recorded, given: {changed}); pass --runs "
                f"<another folder>, or the recorded values"
            )
    elif not args.report_only:
        args.runs.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=1) + "\n")


def run_all(args) -> None:
    """The runs not finished yet, --jobs at a time, with one progress bar over all their steps (ETA
    from the steps done in this invocation). A run's output goes to <runs>/<name>/train.log."""
    pending = [n for n in args.methods if not (args.runs / n / "student" / "config.json").exists()]
    total = len(args.methods) * args.steps
    start_done = sum(min(steps_done(args, n), args.steps) for n in args.methods)
    bar = tqdm(total=total, initial=start_done, desc="OPD steps, all runs", unit="step", disable=args.quiet)
    running: dict[str, subprocess.Popen] = {}
    failed = []
    while pending or running:
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
            (args.runs / name).mkdir(parents=True, exist_ok=True)
            log = open(args.runs / name / "train.log", "a")
            running[name] = subprocess.Popen(train_command(args, name), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        time.sleep(5)
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                if proc.returncode != 0:
                    failed.append(name)
        done = sum(min(steps_done(args, n), args.steps) for n in args.methods)
        bar.update(done - bar.n)
        bar.set_postfix(running=",".join(running) or "-")
    bar.close()
    if failed:
        logs = ", ".join(str(args.runs / n / "train.log") for n in failed)
        raise SystemExit(f"these runs failed: {', '.join(failed)} (see {logs}); rerun to resume them")


def first_at_or_below(evals: list[dict], level: float) -> dict | None:
    return next((r for r in evals if r["heldout_reverse_kl"] <= level), None)


def summarize(args) -> dict:
    runs = {}
    for name in args.methods:
        rows = read_rows(args.runs / name / "metrics.jsonl")
        if not rows:
            continue
        evals = [r for r in rows if "heldout_reverse_kl" in r]
        train_rows = [r for r in rows if r["step"] > 0]
        runs[name] = {
            "label": LABELS[name],
            "steps": max(r["step"] for r in rows),
            "prune_config": rows[0].get("prune_config"),
            "baseline": rows[0].get("baseline"),
            "evals": [
                {
                    k: r.get(k)
                    for k in (
                        "step",
                        "wall_time",
                        "tokens_generated_total",
                        "tokens_saved_total",
                        "heldout_reverse_kl",
                        "heldout_degenerate",
                        "heldout_reached_cap",
                        "accuracy",
                    )
                }
                for r in evals
            ],
            "tokens_generated": sum(r.get("tokens_generated", 0) for r in train_rows),
            "tokens_saved": sum(r.get("tokens_saved", 0) for r in train_rows),
            "rollouts_stopped": sum(round(r.get("pruned_fraction", 0.0) * args.batch_size) for r in train_rows),
            "rollouts": len(train_rows) * args.batch_size,
            "mean_step_seconds": (sum(r["step_time"] for r in train_rows) / len(train_rows)) if train_rows else None,
            "mean_multiplier": (sum(r.get("multiplier", 1.0) for r in train_rows) / len(train_rows))
            if train_rows
            else None,
        }
    finished = {n: r for n, r in runs.items() if r["steps"] >= args.steps}
    level = None
    if finished:
        level = max(min(e["heldout_reverse_kl"] for e in r["evals"]) for r in finished.values())
        for r in finished.values():
            hit = first_at_or_below(r["evals"], level)
            r["to_level"] = {k: hit[k] for k in ("step", "wall_time", "tokens_generated_total")}
    return {
        "command": "python -m examples.opd.compare_real "
        + " ".join(
            f"--{k.replace('_', '-')} {getattr(args, k)}"
            for k in ("steps", "batch_size", "max_new_tokens", "eval_every", "eval_size", "seed", "threads", "jobs")
        ),
        "cpu": cpu_model(),
        "seed": args.seed,
        "level_heldout_reverse_kl": level,
        "runs": runs,
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    # Runs that make the same updates draw the same line: distinct dashes and markers keep both visible.
    styles = [("-", "o"), ("-", "s"), ("--", "^"), (":", "x"), ("-.", "+")]
    for (linestyle, marker), run in zip(styles, report["runs"].values()):
        ev = run["evals"]
        kw = dict(marker=marker, markersize=5, linestyle=linestyle, label=run["label"])
        axes[0].plot([e["tokens_generated_total"] for e in ev], [e["heldout_reverse_kl"] for e in ev], **kw)
        axes[1].plot([e["wall_time"] for e in ev], [e["heldout_reverse_kl"] for e in ev], **kw)
        axes[2].plot([e["step"] for e in ev], [e["heldout_degenerate"] for e in ev], **kw)
    if report["level_heldout_reverse_kl"] is not None:
        for ax in axes[:2]:
            ax.axhline(
                report["level_heldout_reverse_kl"], color="grey", linestyle=":", linewidth=1, label="level all reached"
            )
    axes[0].set_xlabel("student decode tokens (training rollouts)")
    axes[1].set_xlabel("OPD wall time (s, evaluation excluded)")
    axes[1].set_title("wall times compare only runs that had the machine alone", fontsize=8)
    axes[2].set_xlabel("OPD step")
    for ax in axes[:2]:
        ax.set_ylabel("held-out reverse KL, teacher-scored (nats/token)")
    axes[2].set_ylabel("held-out greedy replies that loop (fraction)")
    axes[0].legend(fontsize=7)
    axes[0].set_title("overlapping lines: runs that made identical updates", fontsize=8)
    fig.suptitle(f"SmolLM2-135M-Instruct, student without 3 decoder layers (seed {report['seed']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_table(report: dict) -> str:
    """The report as a Markdown table: one row per run, held-out figures at each evaluation."""
    lines = [
        "| run | held-out reverse KL by step | loops / at the cap, last eval | decode tokens | rollouts stopped | "
        "mean step (s) | to the common level: step, tokens, s |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"].values():
        kl = " → ".join(f"{e['heldout_reverse_kl']:.3f} ({e['step']})" for e in run["evals"])
        last = run["evals"][-1]
        reach = run.get("to_level")
        reached = f"{reach['step']}, {reach['tokens_generated_total']}, {reach['wall_time']:.0f}" if reach else "-"
        lines.append(
            f"| {run['label']} | {kl} | {last['heldout_degenerate']:.2f} / {last['heldout_reached_cap']:.2f} | "
            f"{run['tokens_generated']} | {run['rollouts_stopped']} / {run['rollouts']} | "
            f"{run['mean_step_seconds']:.0f} | {reached} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    check_settings(args)
    if not args.report_only:
        run_all(args)
    report = summarize(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, args.out.with_suffix(".png"))
    level = report["level_heldout_reverse_kl"]
    print(f"held-out reverse KL level all finished runs reached: {level}")
    for name, run in report["runs"].items():
        reach = run.get("to_level")
        print(
            f"{name:>22}: steps {run['steps']}, decode tokens {run['tokens_generated']}, "
            f"saved {run['tokens_saved']}, stopped {run['rollouts_stopped']}/{run['rollouts']}"
            + (
                f"; to the level: step {reach['step']}, {reach['tokens_generated_total']} tokens, "
                f"{reach['wall_time']:.0f} s"
                if reach
                else ""
            )
        )
    print(markdown_table(report))
    print(f"report: {args.out.with_suffix('.json')}, {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
