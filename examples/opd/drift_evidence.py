"""Drift evidence on a real student/teacher pair: before training with Prune-OPD, see what the top-k
overlap says on *your* pair and prompts, and what each stop rule would do.

    python -m examples.opd.drift_evidence --out runs/drift_smollm2          # SmolLM2-135M, 3 layers removed
    python -m examples.opd.drift_evidence --drop 1 --prompts 64 --max-new-tokens 192

It samples rollouts from the student (on-policy) and from the teacher (its own samples, which no
rule should stop), scores every token with both models, and reports

* the top-k overlap for k in {1, 4, 16, 64}: along the rollout and by outcome, where a rollout is
  *degenerate* when at least half of its 4-grams repeat earlier ones (seq-rep-4 >= 0.5, Welleck
  et al. 2020), *wrong* when it answers a word problem with the wrong number, *fluent* otherwise;
  and how well each k's mean overlap separates degenerate from fluent rollouts (ROC AUC);
* for each candidate PruneConfig (the authors' k=16 / 0.7, thresholds calibrated on the teacher's
  own rollouts, the repetition rule, and combinations): the fraction of rollouts it stops in each
  class, false stops on the teacher's own rollouts, decode steps saved, and for degenerate rollouts
  how many tokens after the loop began it stops them.

Outputs in --out: evidence.json (everything above; a rerun with the same settings reuses the
rollouts in rollouts.pt) and overlap.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import opd_ext
from examples.opd import models, real
from examples.opd.task import is_correct
from examples.opd.train import sequence_logits
from opd_ext.generation import generate_with_pruning

KS = (1, 4, 16, 64)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--checkpoint", choices=sorted(real.CHECKPOINTS), default="smollm2", help="the teacher (default smollm2)"
    )
    p.add_argument("--drop", type=int, default=3, help="decoder layers removed to make the student (default 3)")
    p.add_argument(
        "--layers",
        type=lambda text: [int(i) for i in text.split(",")],
        default=None,
        help="remove these decoder layers (e.g. 4,5,17) instead of the --drop least important ones",
    )
    p.add_argument(
        "--student",
        type=Path,
        default=None,
        help="a trained student checkpoint (e.g. a run's student/ folder) instead of the pruned teacher",
    )
    p.add_argument("--prompts", type=int, default=32, help="rollouts per model (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="rollout length cap (default 128)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    p.add_argument("--batch", type=int, default=16, help="rollouts generated at once (default 16)")
    p.add_argument("--seed", type=int, default=0, help="prompts and sampling (default 0)")
    p.add_argument(
        "--cache", type=Path, default=Path("runs/cache"), help="dequantized checkpoints (default runs/cache)"
    )
    p.add_argument(
        "--out", type=Path, default=Path("runs/drift_evidence"), help="evidence.json, overlap.png, rollouts.pt"
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


# ---- the pair ----------------------------------------------------------------------------------------


def make_pair(args, log):
    teacher, tokenizer = real.load_teacher(args.checkpoint, args.cache)
    if args.student is not None:
        from transformers import AutoModelForCausalLM

        student = AutoModelForCausalLM.from_pretrained(args.student).eval()
        log(f"student: {args.student} ({student.config.num_hidden_layers} layers)")
        return teacher, student, tokenizer, {"student": str(args.student)}
    student, pair = real.pruned_student(
        teacher, tokenizer, args.drop, args.cache / args.checkpoint, seed=args.seed, layers=args.layers
    )
    why = "as given" if args.layers is not None else "lowest removal KL"
    log(f"student: the teacher without layers {pair['dropped']} of {len(real.decoder_layers(teacher))} ({why})")

    return teacher, student, tokenizer, pair


# ---- rollouts ---------------------------------------------------------------------------------------


@torch.no_grad()
def sample(policy, other, tokenizer, problems, args, seed, desc="rollouts"):
    """Rollouts of ``policy`` (scored by ``other`` as it samples; nothing stops them), then both
    models' logits over them for the overlaps at every k. Returns a dict of [N, T] tensors."""
    rows = {"tokens": [], "mask": [], **{f"overlap_{k}": [] for k in KS}, "teacher_logprob": [], "reverse_kl": []}
    generator = torch.Generator().manual_seed(seed)
    texts = []
    starts = range(0, len(problems), args.batch)
    for start in tqdm(starts, desc=desc, unit="batch", dynamic_ncols=True, disable=args.quiet):
        batch = problems[start : start + args.batch]
        ids, mask = models.encode_prompts(tokenizer, [p.prompt for p in batch])
        rollout = generate_with_pruning(
            policy,
            other,
            ids,
            mask,
            max_new_tokens=args.max_new_tokens,
            config=opd_ext.PruneConfig.disabled(),
            temperature=args.temperature,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            generator=generator,
        )
        keep = rollout.completion_mask
        attention = torch.cat([mask, keep.long()], 1)
        logits = [sequence_logits(m, rollout.sequences, attention, ids.shape[1]).float() for m in (policy, other)]
        for k in KS:
            rows[f"overlap_{k}"].append(_pad(opd_ext.topk_overlap(*logits, k), args.max_new_tokens))
        rows["tokens"].append(_pad(rollout.completions.masked_fill(~keep, -1), args.max_new_tokens, -1))
        rows["mask"].append(_pad(keep, args.max_new_tokens, False))
        rows["teacher_logprob"].append(_pad(rollout.teacher_logprobs, args.max_new_tokens))
        rows["reverse_kl"].append(_pad(rollout.reverse_kl, args.max_new_tokens))
        texts += tokenizer.batch_decode(
            rollout.completions.masked_fill(~keep, tokenizer.pad_token_id), skip_special_tokens=True
        )
    out = {name: torch.cat(parts) for name, parts in rows.items()}
    out["texts"] = texts
    return out


def _pad(x, width, value=0.0):
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)


# ---- outcomes ---------------------------------------------------------------------------------------


def repetition(tokens: list[int], n: int = 4) -> tuple[float, int]:
    """(seq-rep-n: the fraction of n-grams that repeat an earlier one, the position where the first
    repeated n-gram starts, -1 if none)."""
    seen, repeats, onset = set(), 0, -1
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    for i, gram in enumerate(grams):
        if gram in seen:
            repeats += 1
            onset = i if onset < 0 else onset
        seen.add(gram)
    return (repeats / len(grams) if grams else 0.0), onset


def outcomes(data, problems) -> tuple[list[str], list[int]]:
    labels, onsets = [], []
    for row, (text, problem) in enumerate(zip(data["texts"], problems)):
        tokens = data["tokens"][row][data["mask"][row]].tolist()
        rep, onset = repetition(tokens)
        if rep >= 0.5:
            labels.append("degenerate")
        elif problem.answer and not is_correct(text, problem.answer):
            labels.append("wrong")
        else:
            labels.append("fluent")
        onsets.append(onset)
    return labels, onsets


def roc_auc(positive: list[float], negative: list[float]) -> float | None:
    """P(a positive scores lower than a negative) + half the ties: how well a low overlap marks the
    positives (degenerate rollouts). None without both classes."""
    if not positive or not negative:
        return None
    wins = sum((p < q) + 0.5 * (p == q) for p in positive for q in negative)
    return wins / (len(positive) * len(negative))


# ---- the stop rules ------------------------------------------------------------------------------------


def candidate_rules(teacher_data) -> dict:
    """The rules to compare: the authors' one, thresholds calibrated on the teacher's own rollouts
    (scored by the student: on-track text by construction), the repetition rule, and both."""
    authors = opd_ext.PruneConfig()
    mask = teacher_data["mask"]
    rules = {"authors (k=16, 0.7, w_drop 0.01)": authors}
    for k, q in ((16, 0.05), (4, 0.05), (1, 0.05)):
        base = opd_ext.PruneConfig(k=k, ema_beta=0.9, w_drop=0.05)
        calibrated = base.with_calibrated_threshold(teacher_data[f"overlap_{k}"], mask, quantile=q)
        rules[f"calibrated k={k} q={q} (ema 0.9, w_drop 0.05)"] = calibrated
    for window, match in ((32, 0.5), (48, 0.5), (32, 0.75)):
        rules[f"repetition window={window} match={match}"] = opd_ext.PruneConfig(
            w_drop=0.0, min_weight=None, loop_window=window, loop_match=match
        )
    rules["calibrated k=16 + repetition window=48"] = dataclasses.replace(
        rules["calibrated k=16 q=0.05 (ema 0.9, w_drop 0.05)"], loop_window=48, loop_match=0.5
    )
    return rules


def apply_rule(config, data) -> dict:
    scan = opd_ext.drift_scan(
        data[f"overlap_{config.k}"], config, mask=data["mask"], tokens=data["tokens"].clamp(min=0)
    )
    lengths = data["mask"].sum(1)
    stopped = scan.stop_positions >= 0
    saved = torch.where(stopped, lengths - scan.stop_positions - 1, 0)
    return {
        "stopped": stopped.tolist(),
        "stop_position": scan.stop_positions.tolist(),
        "saved": saved.tolist(),
        "reasons": [opd_ext.StopReason.NAMES[int(r)] for r in scan.stop_reasons],
    }


def summarize(rule_out, labels, onsets, lengths) -> dict:
    summary = {}
    for label in ("fluent", "wrong", "degenerate"):
        rows = [i for i, lab in enumerate(labels) if lab == label]
        if not rows:
            continue
        entry = {"rollouts": len(rows), "stopped": sum(rule_out["stopped"][i] for i in rows) / len(rows)}
        entry["tokens_saved"] = sum(rule_out["saved"][i] for i in rows) / max(1, sum(lengths[i] for i in rows))
        if label == "degenerate":
            delays = [
                rule_out["stop_position"][i] - onsets[i] for i in rows if rule_out["stopped"][i] and onsets[i] >= 0
            ]
            entry["median_tokens_after_loop_onset"] = sorted(delays)[len(delays) // 2] if delays else None
        summary[label] = entry
    summary["all"] = {
        "stopped": sum(rule_out["stopped"]) / len(labels),
        "tokens_saved": sum(rule_out["saved"]) / max(1, sum(lengths)),
    }
    return summary


# ---- the run ---------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - start:6.0f} s] {message}", flush=True)

    teacher, student, tokenizer, pair = make_pair(args, log)
    problems = real.chat_prompts(tokenizer, real.make_prompts(args.prompts, seed=args.seed))
    cache = args.out / "rollouts.pt"
    settings = {k: str(v) for k, v in vars(args).items() if k not in ("out", "threads", "cache", "quiet")}
    saved = torch.load(cache, weights_only=False) if cache.exists() else None
    if saved is not None and saved["settings"] == settings:
        student_data, teacher_data = saved["student"], saved["teacher"]
        log(f"reusing the rollouts in {cache}")
    else:
        log(f"sampling {args.prompts} student rollouts (up to {args.max_new_tokens} tokens each)")
        student_data = sample(student, teacher, tokenizer, problems, args, seed=args.seed, desc="student rollouts")
        log(f"sampling {args.prompts} teacher rollouts")
        teacher_data = sample(teacher, student, tokenizer, problems, args, seed=args.seed + 1, desc="teacher rollouts")
        torch.save({"settings": settings, "student": student_data, "teacher": teacher_data}, cache)
    log("scoring the rules")

    report = {"settings": settings, "pair": pair, "by_policy": {}}
    rules = candidate_rules(teacher_data)
    report["rules"] = {
        name: {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)} for name, cfg in rules.items()
    }
    for policy, data in (("student", student_data), ("teacher", teacher_data)):
        labels, onsets = outcomes(data, problems)
        lengths = data["mask"].sum(1).tolist()
        mask = data["mask"]
        entry = {
            "outcomes": {lab: labels.count(lab) for lab in sorted(set(labels))},
            "mean_length": sum(lengths) / len(lengths),
            "reached_cap": sum(n >= args.max_new_tokens for n in lengths) / len(lengths),
            "overlap": {},
        }
        for k in KS:
            o = data[f"overlap_{k}"]
            per_row = [(o[i][mask[i]].mean().item() if mask[i].any() else float("nan")) for i in range(len(labels))]
            by = {lab: [v for v, l2 in zip(per_row, labels) if l2 == lab] for lab in ("fluent", "wrong", "degenerate")}
            entry["overlap"][k] = {
                "token_mean": float(o[mask].mean()),
                "by_outcome": {lab: (sum(v) / len(v) if v else None) for lab, v in by.items()},
                "auc_degenerate_vs_fluent": roc_auc(by["degenerate"], by["fluent"]),
                "along_rollout": [
                    float(o[:, t][mask[:, t]].mean()) if mask[:, t].any() else None for t in range(0, o.shape[1], 8)
                ],
            }
        entry["rules"] = {
            name: summarize(apply_rule(cfg, data), labels, onsets, lengths) for name, cfg in rules.items()
        }
        report["by_policy"][policy] = entry
    report["seconds"] = time.perf_counter() - start
    (args.out / "evidence.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, args.out / "overlap.png")
    log(f"done: {args.out / 'evidence.json'}, {args.out / 'overlap.png'}")
    print_summary(report)


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(KS), figsize=(4 * len(KS), 3.2), sharey=True)
    for ax, k in zip(axes, KS):
        for policy, style in (("student", "-"), ("teacher", "--")):
            series = report["by_policy"][policy]["overlap"][k]["along_rollout"]
            xs = [8 * i for i, v in enumerate(series) if v is not None]
            ax.plot(xs, [v for v in series if v is not None], style, label=f"{policy}'s rollouts")
        ax.set_title(f"top-{k} overlap")
        ax.set_xlabel("completion position")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("mean overlap (rollouts alive)")
    axes[0].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(report):
    for policy, entry in report["by_policy"].items():
        print(f"{policy} rollouts: {entry['outcomes']}, mean length {entry['mean_length']:.0f}")
        for k, o in entry["overlap"].items():
            auc = o["auc_degenerate_vs_fluent"]
            print(
                f"  top-{k}: mean {o['token_mean']:.2f}, by outcome {_fmt(o['by_outcome'])}, "
                f"AUC degenerate vs fluent {'-' if auc is None else f'{auc:.2f}'}"
            )
        for name, summary in entry["rules"].items():
            parts = ", ".join(f"{lab} {v['stopped']:.0%}" for lab, v in summary.items() if lab != "all")
            print(
                f"  {name}: stops {summary['all']['stopped']:.0%} ({parts}), "
                f"saves {summary['all']['tokens_saved']:.0%} of tokens"
            )


def _fmt(values):
    return "{" + ", ".join(f"{k}: {'-' if v is None else f'{v:.2f}'}" for k, v in values.items()) + "}"


if __name__ == "__main__":
    main()
