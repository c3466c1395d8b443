"""The papers' claims at small scale: all four methods on several seeds, one table and plots.

    python examples/reproduce_opd.py --jobs 2          # the counting task, seeds 0 1 2: docs/reproduction.md + PNGs
    python examples/reproduce_opd.py --preset arithmetic --seeds 0   # the short arithmetic task

First a sweep picks the PruneConfig: every (k, threshold, w_drop) of a grid is applied post hoc to
the same unpruned rollouts of the warm-started student, whose mistakes the task's checker locates.
Then, per seed, opd / vopd / prune / prune+vopd run the reference training (examples/opd/train.py)
with that seed's teacher, warm-started student, prompt stream and number of steps; the report gives
the OPD wall time and student tokens each needed to reach the accuracy all four reached, the final
accuracy, and, apart, the variance of the policy gradient with and without the vOPD baseline on
identical rollouts.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

import opd_ext
from examples.opd import models, plots, train
from opd_ext.generation import generate_with_pruning

METHOD_ORDER = ("opd", "vopd", "prune", "prune+vopd")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--preset",
        choices=sorted(train.PRESETS),
        default="counting",
        help="the task: 'counting' (long rollouts, a student that loops), 'arithmetic' (the short "
        "arithmetic task), 'default' (the Quickstart's smaller arithmetic run); 'tiny' and "
        "'counting-tiny' are smoke tests (seconds, results meaningless)",
    )
    p.add_argument("--steps", type=int, default=None, help="OPD steps per method (default: the preset's)")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="one teacher, warm-started student and prompt stream per seed",
    )
    p.add_argument(
        "--jobs",
        type=int,
        choices=(1, 2),
        default=1,
        help="training runs at a time (2: the compared pairs side by side, one per core)",
    )
    p.add_argument("--no-sweep", action="store_true", help="use the preset's PruneConfig instead of the sweep's choice")
    p.add_argument(
        "--runs",
        type=Path,
        default=None,
        help="where the runs go, one folder per seed (default: runs/reproduction/<preset>)",
    )
    p.add_argument(
        "--cache", type=Path, default=Path("runs/cache"), help="pre-trained teachers and warm-started students"
    )
    p.add_argument(
        "--docs",
        type=Path,
        default=Path("docs"),
        help="where the report (<name>.md, .json) and plots go, <name> = "
        + ", ".join(f"{v} for {k}" for k, v in REPORT_NAMES.items())
        + ", reproduction_<preset> otherwise; "
        "the default overwrites the repository's own",
    )
    p.add_argument(
        "--variance-batches", type=int, default=16, help="independent rollout batches for the gradient variance"
    )
    p.add_argument("--variance-batch-size", type=int, default=16, help="prompts per batch for the gradient variance")
    p.add_argument("--drift-rollouts", type=int, default=256, help="rollouts for the drift evidence and the sweep")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.runs is None:
        args.runs = Path("runs/reproduction") / args.preset
    return args


# The report's file name per preset (plots: <name>_accuracy.png, ...): the drift task's is the main one.
REPORT_NAMES = {"counting": "reproduction", "arithmetic": "reproduction_arithmetic"}


def report_name(preset: str) -> str:
    return REPORT_NAMES.get(preset, f"reproduction_{preset}")


# ---- gradient variance -------------------------------------------------------------------------


def gradient_variance(
    setup: train.Setup,
    prompts_per_batch: list[list[str]],
    *,
    max_new_tokens: int,
    baselines=("none", "full", "topk"),
    seed: int = 0,
) -> dict:
    """Total variance of the student's parameter gradient across independent rollout batches.

    Every baseline is evaluated on the *same* rollouts (plain OPD sampling, no pruning), so the
    differences come from the baseline alone. Returns, per baseline, ``E||g - mean g||^2`` and the
    squared norm of the mean gradient (the estimator is unbiased: the means should agree up to noise).
    """
    student, teacher, tokenizer = setup.student, setup.teacher, setup.tokenizer
    params = [p for p in student.parameters() if p.requires_grad]
    device = next(student.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    grads = {b: [] for b in baselines}
    config = opd_ext.PruneConfig.disabled()
    for prompts in prompts_per_batch:
        input_ids, prompt_mask = models.encode_prompts(tokenizer, prompts, device=device)
        with torch.no_grad():
            rollout = generate_with_pruning(
                student,
                teacher,
                input_ids,
                prompt_mask,
                max_new_tokens=max_new_tokens,
                config=config,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                generator=generator,
            )
        mask = rollout.completion_mask
        attention = torch.cat([prompt_mask, mask.long()], dim=1)
        with torch.no_grad():
            teacher_logits = train.sequence_logits(teacher, rollout.sequences, attention, rollout.prompt_length)
        for baseline in baselines:
            student_logits = train.sequence_logits(student, rollout.sequences, attention, rollout.prompt_length)
            loss = opd_ext.vopd_loss(student_logits, teacher_logits, rollout.completions, mask=mask, baseline=baseline)
            flat = torch.autograd.grad(loss, params)
            grads[baseline].append(torch.cat([g.reshape(-1) for g in flat]))
    result = {}
    for baseline, gs in grads.items():
        g = torch.stack(gs).double()
        mean = g.mean(0)
        result[baseline] = {
            "total_variance": float(((g - mean) ** 2).sum(1).mean()),
            "mean_grad_sq_norm": float(mean.square().sum()),
        }
    return result


# ---- drift evidence and the PruneConfig sweep -------------------------------------------------------


def analyse_rollouts(
    setup: train.Setup, problems, *, max_new_tokens: int, ks=(1, 2, 4, 16), batch_size: int = 64, seed: int = 0
) -> list[dict]:
    """Unpruned rollouts of the warm-started student, with the top-k overlap at every token for each k
    and the position of each row's first mistake (`task.first_error`; the row's length when it has none).

    The task's checker says exactly where a rollout first leaves every correct solution, so each
    sampled token is either on track or after a mistake: the ground truth a drift signal is judged on.
    """
    student, teacher, tokenizer = setup.student, setup.teacher, setup.tokenizer
    device = next(student.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    batches = []
    for start in range(0, len(problems), batch_size):
        batch = problems[start : start + batch_size]
        input_ids, prompt_mask = models.encode_prompts(tokenizer, [p.prompt for p in batch], device=device)
        with torch.no_grad():
            rollout = generate_with_pruning(
                student,
                teacher,
                input_ids,
                prompt_mask,
                max_new_tokens=max_new_tokens,
                config=opd_ext.PruneConfig.disabled(),
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                generator=generator,
            )
            attention = torch.cat([prompt_mask, rollout.completion_mask.long()], dim=1)
            student_logits = train.sequence_logits(student, rollout.sequences, attention, rollout.prompt_length)
            teacher_logits = train.sequence_logits(teacher, rollout.sequences, attention, rollout.prompt_length)
            overlaps = {k: opd_ext.topk_overlap(*opd_ext.align_vocab(student_logits, teacher_logits), k) for k in ks}
        lengths = rollout.completion_mask.sum(1)
        errors = []
        for row, problem in enumerate(batch):
            length = int(lengths[row])
            words = tokenizer.convert_ids_to_tokens(rollout.completions[row, :length].tolist())
            if words and words[-1] == tokenizer.eos_token:
                words = words[:-1]
            error = setup.task.first_error(problem, words)
            errors.append(length if error is None else min(error, length))
        batches.append(
            {
                "overlaps": overlaps,
                "mask": rollout.completion_mask,
                "lengths": lengths,
                "first_error": torch.tensor(errors),
            }
        )
    return batches


def drift_evidence(batches: list[dict], thresholds=(0.25, 0.5, 0.7)) -> dict:
    """Top-k overlap of on-track tokens vs tokens at or after the first mistake, per k."""
    ks = list(batches[0]["overlaps"])
    on_track = {k: [] for k in ks}
    after_error = {k: [] for k in ks}
    rows_with_error = rows = 0
    for b in batches:
        for row in range(len(b["lengths"])):
            length, error = int(b["lengths"][row]), int(b["first_error"][row])
            rows += 1
            rows_with_error += error < length
            for k in ks:
                values = b["overlaps"][k][row, :length].tolist()
                on_track[k] += values[:error]
                after_error[k] += values[error:]

    def mean(values):
        return sum(values) / max(1, len(values))

    def below(values, threshold):
        return sum(v < threshold for v in values) / max(1, len(values))

    return {
        "rollouts": rows,
        "rollouts_with_error": rows_with_error,
        "tokens_on_track": len(on_track[ks[0]]),
        "tokens_after_error": len(after_error[ks[0]]),
        "by_k": [
            {
                "k": k,
                "mean_on_track": mean(on_track[k]),
                "mean_after_error": mean(after_error[k]),
                "flagged": [
                    {"threshold": t, "on_track": below(on_track[k], t), "after_error": below(after_error[k], t)}
                    for t in thresholds
                ],
            }
            for k in ks
        ],
    }


SWEEP_THRESHOLDS = (0.25, 0.5, 0.7)
SWEEP_W_DROPS = (1.0, 0.5, 0.34, 0.25)
# What a PruneConfig may cost to be chosen: stopped rows that were correct (their tokens and their
# positive signal are lost), and rows stopped before their first mistake (the mistake, the one token
# whose negative reward teaches the student not to make it, would not be trained on).
MAX_FALSE_STOPS = 0.01
MAX_EARLY_STOPS = 0.02


def prune_sweep(batches: list[dict], *, group: int, w_base: float = 0.5) -> list[dict]:
    """Every (k, threshold, w_drop) of the grid applied post hoc (`opd_ext.drift_scan`) to the same
    unpruned rollouts. Per config: the fraction of correct rows it stops, of mistaken rows it stops
    before their mistake, of tokens it saves, and of decode steps it saves when rollouts are generated
    `group` at a time (a batch decodes until its longest live row ends: what wall time follows)."""
    results = []
    for k in batches[0]["overlaps"]:
        for threshold in SWEEP_THRESHOLDS:
            for w_drop in SWEEP_W_DROPS:
                config = opd_ext.PruneConfig(k=k, threshold=threshold, w_drop=w_drop, w_base=w_base, warmup=0)
                correct = stopped_correct = mistaken = early = 0
                tokens = kept = steps = kept_steps = 0
                for b in batches:
                    scan = opd_ext.drift_scan(b["overlaps"][k], config, mask=b["mask"])
                    stopped = scan.stop_positions >= 0
                    is_correct = b["first_error"] >= b["lengths"]
                    correct += int(is_correct.sum())
                    stopped_correct += int((stopped & is_correct).sum())
                    mistaken += int((~is_correct).sum())
                    early += int((stopped & ~is_correct & (scan.stop_positions < b["first_error"])).sum())
                    new_lengths = torch.where(stopped, scan.lengths, b["lengths"])
                    tokens += int(b["lengths"].sum())
                    kept += int(new_lengths.sum())
                    for start in range(0, len(new_lengths), group):
                        steps += int(b["lengths"][start : start + group].max())
                        kept_steps += int(new_lengths[start : start + group].max())
                results.append(
                    {
                        "k": k,
                        "threshold": threshold,
                        "w_drop": w_drop,
                        "false_stops": stopped_correct / max(1, correct),
                        "early_stops": early / max(1, mistaken),
                        "tokens_saved": 1 - kept / max(1, tokens),
                        "decode_steps_saved": 1 - kept_steps / max(1, steps),
                    }
                )
    return results


def choose_prune_config(sweep: list[dict]) -> dict | None:
    """The config saving the most decode steps (then tokens) among those within both error budgets;
    of equals, the one that stops latest (largest threshold margin: smallest w_drop, then k)."""
    eligible = [r for r in sweep if r["false_stops"] <= MAX_FALSE_STOPS and r["early_stops"] <= MAX_EARLY_STOPS]
    if not eligible:
        return None
    return max(
        eligible, key=lambda r: (round(r["decode_steps_saved"], 3), round(r["tokens_saved"], 3), -r["w_drop"], -r["k"])
    )


# ---- summaries ---------------------------------------------------------------------------------


def first_reaching(metrics: list[dict], target: float, key: str):
    """`key` of the first evaluation at or above `target` (within float noise), or None."""
    row = train.first_reaching(metrics, target - 1e-9)
    return None if row is None else row.get(key, 0.0)


def summarize(runs: dict[str, list[dict]], target: float) -> list[dict]:
    rows = []
    for method, metrics in runs.items():
        evals = [m for m in metrics if "accuracy" in m]
        last = metrics[-1]
        steps = [m for m in metrics if m["step"] > 0]
        rows.append(
            {
                "method": method,
                "start_accuracy": evals[0]["accuracy"],
                "final_accuracy": evals[-1]["accuracy"],
                "best_accuracy": max(m["accuracy"] for m in evals),
                "time_to_target_s": first_reaching(metrics, target, "wall_time"),
                "tokens_to_target": first_reaching(metrics, target, "tokens_generated_total"),
                "opd_time_s": last["wall_time"],
                "tokens_generated": last["tokens_generated_total"],
                "tokens_saved": last["tokens_saved_total"],
                "mean_overlap": sum(m["overlap"] for m in steps) / len(steps),
                "mean_step_s": sum(m["step_time"] for m in steps) / len(steps),
            }
        )
    return rows


def fmt(x, spec):
    return "not reached" if x is None else format(x, spec)


def final_accuracy(metrics: list[dict], last: int = 2) -> float:
    """Mean of the last `last` evaluations: one evaluation moves by the sampling noise of the eval set."""
    evals = [m["accuracy"] for m in metrics if "accuracy" in m]
    return sum(evals[-last:]) / len(evals[-last:])


def seed_target(runs: dict[str, list[dict]]) -> float:
    """The accuracy every method of one seed reached: the lowest of the methods' best evaluations."""
    return min(max(m["accuracy"] for m in metrics if "accuracy" in m) for metrics in runs.values())


def aggregate(per_seed: dict[int, dict[str, list[dict]]]) -> list[dict]:
    """Per method, over seeds: time and tokens to each seed's common target, final accuracy, and the
    relative saving against plain OPD of the same seed (whose models, prompts and dice it shares)."""
    by_method = {method: [] for method in METHOD_ORDER}
    for seed, runs in per_seed.items():
        target = seed_target(runs)
        summaries = {row["method"]: row for row in summarize(runs, target)}
        for method, row in summaries.items():
            row.update(seed=seed, target=target, final_accuracy=final_accuracy(runs[method]))
        base = summaries.get("opd")
        for method, row in summaries.items():
            for key, name in (("time_to_target_s", "time_saving"), ("tokens_to_target", "tokens_saving")):
                row[name] = None if base is None or row[key] is None or not base[key] else 1 - row[key] / base[key]
            row["accuracy_vs_opd"] = None if base is None else row["final_accuracy"] - base["final_accuracy"]
            by_method[method].append(row)
    return [{"method": method, "seeds": seeds} for method, seeds in by_method.items()]


def _spread(values, spec, scale=1.0, suffix=""):
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean = sum(values) / len(values)
    lo, hi = min(values), max(values)
    return f"{format(mean * scale, spec)}{suffix} ({format(lo * scale, spec)} to {format(hi * scale, spec)})"


def markdown_report(
    rows,
    variance,
    drift,
    sweep,
    chosen,
    command,
    preset_name,
    preset,
    steps,
    prune_config,
    machine,
    per_seed,
    name: str,
) -> str:
    seeds = sorted(per_seed)
    eval_kind = (
        "greedy"
        if preset.eval_temperature is None
        else f"one sample per problem at temperature {preset.eval_temperature:g} (pass@1)"
    )
    lines = [
        f"# Reproduction: OPD vs vOPD vs Prune-OPD on the `{preset_name}` task",
        "",
        f"Produced by `{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {machine}).",
        "",
        f"Setup: preset `{preset_name}`, {steps} OPD steps per method and seed, seeds {', '.join(map(str, seeds))}. Each seed "
        f"has its own teacher, warm-started student, prompt stream and sampling; within a seed the four methods share all "
        f"of them. Held-out accuracy: {eval_kind}, on {preset.eval_size} problems, the same draws at every evaluation. "
        f"Wall time is OPD time only (rollouts + update; evaluation and pre-training excluded), measured with the "
        f"methods of a seed running side by side, so they share the machine's load.",
        "Teacher accuracy on the same evaluation: "
        + ", ".join(
            f"{per_seed[seed]['opd'][0].get('teacher_accuracy', float('nan')):.3f} (seed {seed})" for seed in seeds
        )
        + ".",
        f"Prune-OPD config (from the sweep below): `{prune_config}`"
        + (
            " (k = 1: the overlap is 0 or 1, so every threshold in (0, 1] is this rule)."
            if prune_config["k"] == 1
            else "."
        ),
        "",
        "Each seed's target is the accuracy every method of that seed reached (the lowest of the four best "
        "evaluations). Savings are against plain OPD of the same seed; final accuracy is the mean of the last two "
        "evaluations. Cells: mean over seeds (min to max).",
        "",
        "| method | final accuracy | vs OPD (points) | time to target (s) | wall-time saving vs OPD | tokens to target | token saving vs OPD | OPD time (s) | tokens generated |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["seeds"]
        lines.append(
            f"| {r['method']} | {_spread([x['final_accuracy'] for x in s], '.3f')} | "
            f"{_spread([x['accuracy_vs_opd'] for x in s], '+.1f', 100)} | "
            f"{_spread([x['time_to_target_s'] for x in s], '.0f')} | {_spread([x['time_saving'] for x in s], '.0f', 100, ' %')} | "
            f"{_spread([x['tokens_to_target'] for x in s], ',.0f')} | {_spread([x['tokens_saving'] for x in s], '.0f', 100, ' %')} | "
            f"{_spread([x['opd_time_s'] for x in s], '.0f')} | {_spread([x['tokens_generated'] for x in s], ',.0f')} |"
        )
    lines += [
        "",
        "Per seed:",
        "",
        "| seed | method | start | final | target | time to target (s) | tokens to target | OPD time (s) | s/step | tokens saved by pruning |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for seed in seeds:
        for r in rows:
            for x in r["seeds"]:
                if x["seed"] == seed:
                    lines.append(
                        f"| {seed} | {r['method']} | {x['start_accuracy']:.3f} | {x['final_accuracy']:.3f} | {x['target']:.3f} | "
                        f"{fmt(x['time_to_target_s'], '.0f')} | {fmt(x['tokens_to_target'], ',')} | {x['opd_time_s']:.0f} | "
                        f"{x['mean_step_s']:.2f} | {x['tokens_saved']:,} |"
                    )
    if sweep:
        lines += [
            "",
            "## The PruneConfig sweep",
            "",
            f"Every (k, threshold, w_drop) of the grid applied post hoc (`opd_ext.drift_scan`) to the same "
            f"{drift['rollouts']} unpruned rollouts of seed {seeds[0]}'s warm-started student (w_base 0.5, warmup 0). "
            f"A config may stop at most {100 * MAX_FALSE_STOPS:g} % of the correct rollouts and stop at most "
            f"{100 * MAX_EARLY_STOPS:g} % of the mistaken ones before their mistake (the mistake is the token "
            f"whose negative reward teaches the student not to make it); of those, the one saving the most decode "
            f"steps (batches of {preset.batch_size} decode until their longest live row ends) is chosen: "
            + (
                f"**k={chosen['k']}, threshold {chosen['threshold']:g}, w_drop {chosen['w_drop']:g}**."
                if chosen
                else "**none qualified**; the preset's config was used."
            ),
            "",
            "| k | threshold | w_drop | correct rows stopped | mistaken rows stopped before the mistake | tokens saved | decode steps saved |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in sorted(sweep, key=lambda r: -r["decode_steps_saved"]):
            mark = "**" if r is chosen else ""
            lines.append(
                f"| {mark}{r['k']}{mark} | {r['threshold']:g} | {r['w_drop']:g} | {100 * r['false_stops']:.1f} % | "
                f"{100 * r['early_stops']:.1f} % | {100 * r['tokens_saved']:.1f} % | {100 * r['decode_steps_saved']:.1f} % |"
            )
    none = variance["none"]
    lines += [
        "",
        "## Gradient variance (vOPD baseline vs none)",
        "",
        f"Student parameter gradient of the surrogate over {variance['batches']} independent rollout batches of "
        f"{variance['batch_size']} prompts from seed {seeds[0]}'s warm-started student; every baseline scored on the same rollouts.",
        "",
        "| baseline | total variance E‖g − ḡ‖² | ratio to none | ‖ḡ‖² |",
        "|---|---|---|---|",
    ]
    for baseline in ("none", "full", "topk"):
        v = variance[baseline]
        lines.append(
            f"| {baseline} | {v['total_variance']:.4g} | {v['total_variance'] / none['total_variance']:.3f} | "
            f"{v['mean_grad_sq_norm']:.4g} |"
        )
    if drift is not None:
        lines += [
            "",
            "## Drift evidence: overlap before and after the student's first mistake",
            "",
            f"{drift['rollouts']} rollouts sampled from seed {seeds[0]}'s warm-started student (no pruning); "
            f"{drift['rollouts_with_error']} contain a mistake; {drift['tokens_on_track']} tokens are on track, "
            f"{drift['tokens_after_error']} at or after the first mistake. A token counts as a drift event when its "
            f"top-k overlap is below the threshold.",
            "",
            "| k | mean overlap on track | mean overlap after a mistake | "
            + " | ".join(f"flagged at < {t['threshold']:g}: on track / after" for t in drift["by_k"][0]["flagged"])
            + " |",
            "|---|---|---|" + "---|" * len(drift["by_k"][0]["flagged"]),
        ]
        for row in drift["by_k"]:
            lines.append(
                f"| {row['k']} | {row['mean_on_track']:.3f} | {row['mean_after_error']:.3f} | "
                + " | ".join(f"{100 * f['on_track']:.1f}% / {100 * f['after_error']:.1f}%" for f in row["flagged"])
                + " |"
            )
    lines += [
        "",
        f"Seed {seeds[0]}:",
        "",
        f"![accuracy vs wall time]({name}_accuracy.png)",
        "",
        f"![accuracy vs tokens generated]({name}_accuracy_tokens.png)",
        "",
        f"![drift along rollouts]({name}_drift.png)",
        "",
    ]
    return "\n".join(lines)


def _train_one(run_args: list[str]) -> str:
    """One training run (in a worker process when --jobs > 1)."""
    return str(train.train(train.parse_args(run_args)))


def run_methods(args, seed: int, steps: int, prune_flags: list[str]) -> dict[str, list[dict]]:
    """The four methods of one seed; with --jobs 2, plain and pruned variants run side by side (opd
    beside prune, vopd beside prune+vopd) so each compared pair shares the machine's load."""
    jobs = []
    for method in METHOD_ORDER:
        out = args.runs / f"seed{seed}" / method.replace("+", "_")
        jobs.append(
            (
                method,
                [
                    "--method",
                    method,
                    "--preset",
                    args.preset,
                    "--steps",
                    str(steps),
                    "--seed",
                    str(seed),
                    "--out",
                    str(out),
                    "--cache",
                    str(args.cache),
                    "--threads",
                    str(args.threads),
                    "--no-plots",
                    *prune_flags,
                ]
                + (["--quiet"] if args.quiet else []),
            )
        )
    outs = {}
    if args.jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # The pairs that are compared run together; models are trained (and cached) before, by one process.
        train.build_setup(
            train.parse_args(
                ["--preset", args.preset, "--seed", str(seed), "--cache", str(args.cache)]
                + (["--quiet"] if args.quiet else [])
            ),
            train.PRESETS[args.preset],
        )
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for pair in (("opd", "prune"), ("vopd", "prune+vopd")):
                futures = {m: pool.submit(_train_one, a) for m, a in jobs if m in pair}
                outs.update({m: Path(f.result()) for m, f in futures.items()})
    else:
        outs = {m: Path(_train_one(a)) for m, a in jobs}
    return {m: train.read_metrics(outs[m] / "metrics.jsonl", steps) for m in METHOD_ORDER}


def main(argv=None) -> None:
    args = parse_args(argv)
    command = "python examples/reproduce_opd.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    torch.set_num_threads(args.threads)
    preset = train.PRESETS[args.preset]
    steps = args.steps or preset.steps
    seeds = args.seeds

    # The sweep and the drift evidence on the first seed's warm-started student (loaded from the cache,
    # or trained and cached here; the training runs reuse it).
    setup = train.build_setup(
        train.parse_args(
            ["--preset", args.preset, "--seed", str(seeds[0]), "--cache", str(args.cache)]
            + (["--quiet"] if args.quiet else [])
        ),
        preset,
    )
    stream = train.PromptStream(setup, preset.task, seed=seeds[0] + 777)
    drift = sweep = chosen = None
    prune_flags = []
    if setup.train_problems is None:  # the synthetic tasks: the checker locates each rollout's first mistake
        batches = analyse_rollouts(
            setup, stream.next_batch(args.drift_rollouts), max_new_tokens=setup.max_new_tokens, seed=seeds[0]
        )
        drift = drift_evidence(batches)
        if not args.no_sweep:
            sweep = prune_sweep(batches, group=preset.batch_size, w_base=preset.prune["w_base"])
            chosen = choose_prune_config(sweep)
            if chosen is not None:
                prune_flags = [
                    "--prune-k",
                    str(chosen["k"]),
                    "--prune-threshold",
                    str(chosen["threshold"]),
                    "--prune-w-drop",
                    str(chosen["w_drop"]),
                ]
    batches_for_variance = [
        [p.prompt for p in stream.next_batch(args.variance_batch_size)] for _ in range(args.variance_batches)
    ]
    variance = gradient_variance(setup, batches_for_variance, max_new_tokens=setup.max_new_tokens, seed=seeds[0])
    variance.update(batches=args.variance_batches, batch_size=args.variance_batch_size)
    del setup

    per_seed = {seed: run_methods(args, seed, steps, prune_flags) for seed in seeds}
    rows = aggregate(per_seed)
    first = per_seed[seeds[0]]
    args.docs.mkdir(parents=True, exist_ok=True)
    teacher = first["prune+vopd"][0].get("teacher_accuracy")  # the same teacher and problems for every method
    target = seed_target(first)
    ylabel = train.accuracy_label(preset.eval_temperature)
    name = report_name(args.preset)
    plots.accuracy_vs_time(first, args.docs / f"{name}_accuracy.png", target=target, teacher=teacher, ylabel=ylabel)
    plots.accuracy_vs_time(
        first,
        args.docs / f"{name}_accuracy_tokens.png",
        target=target,
        teacher=teacher,
        x="tokens_generated_total",
        ylabel=ylabel,
    )
    profiles = train.read_metrics(args.runs / f"seed{seeds[0]}" / "prune_vopd" / "rollouts.jsonl", steps)
    prune_config = json.loads(json.dumps(first["prune"][0]["prune_config"]))
    plots.drift_profiles(
        profiles,
        args.docs / f"{name}_drift.png",
        k=prune_config["k"],
        title=f"prune+vopd: top-{prune_config['k']} overlap, multiplier and live rollouts by position",
    )
    machine = (
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s) per run, {args.jobs} run(s) at a time"
    )
    report = markdown_report(
        rows, variance, drift, sweep, chosen, command, args.preset, preset, steps, prune_config, machine, per_seed, name
    )
    (args.docs / f"{name}.md").write_text(report)
    (args.docs / f"{name}.json").write_text(
        json.dumps(
            {
                "preset": args.preset,
                "steps": steps,
                "seeds": seeds,
                "prune_config": prune_config,
                "methods": rows,
                "sweep": sweep,
                "chosen": chosen,
                "variance": variance,
                "drift": drift,
            },
            indent=1,
        )
    )
    print(report)


if __name__ == "__main__":
    main()
