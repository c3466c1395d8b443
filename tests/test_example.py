"""The reference training run (examples/train_opd.py), shortened: tiny models, a few steps.

Covers the metrics log, exact resume after Ctrl-C, the per-method wiring (plain OPD neither prunes
nor reweights), and the real-checkpoint path (--teacher/--student/--data) on locally saved models.
"""

import dataclasses
import json
import math
import os
import signal

import pytest
import torch

from examples.opd import models, task, train

TINY = ["--preset", "tiny", "--quiet", "--threads", "1"]
PER_STEP_KEYS = {
    "step",
    "wall_time",
    "reward",
    "reverse_kl",
    "overlap",
    "multiplier",
    "weight",
    "tokens_generated",
    "tokens_saved",
    "tokens_generated_total",
    "tokens_saved_total",
    "loss",
    "grad_norm",
    "rollout_accuracy",
}
# Everything but timings must be reproducible from the seed.
TIMING_KEYS = {"wall_time", "step_time", "eval_time"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def run(tmp_out, cache, *extra, device="cpu"):
    train.train(train.parse_args(TINY + ["--out", str(tmp_out), "--cache", str(cache), "--device", device, *extra]))
    return read(tmp_out / "metrics.jsonl")


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_timings(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
        ),
    ],
)
def test_short_run_writes_metrics_checkpoint_and_plots(tmp_path, cache, device):
    steps = 4
    rows = run(tmp_path, cache, "--steps", str(steps), "--eval-every", "2", device=device)

    assert [r["step"] for r in rows] == list(range(steps + 1))
    assert "accuracy" in rows[0] and rows[0]["method"] == "prune+vopd"
    for r in rows[1:]:
        assert PER_STEP_KEYS <= r.keys(), PER_STEP_KEYS - r.keys()
        assert 0.0 <= r["overlap"] <= 1.0 and r["reverse_kl"] >= 0.0
        assert 0.5 <= r["multiplier"] <= 1.5  # w_base + weight with w_base = 0.5
        assert r["tokens_generated"] > 0
    assert [("accuracy" in r) for r in rows[1:]] == [False, True, False, True]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows if "accuracy" in r)
    assert all(b["wall_time"] > a["wall_time"] for a, b in zip(rows, rows[1:]))
    assert rows[-1]["tokens_generated_total"] == sum(r["tokens_generated"] for r in rows[1:])
    assert rows[-1]["tokens_saved_total"] == sum(r["tokens_saved"] for r in rows[1:])

    profiles = read(tmp_path / "rollouts.jsonl")
    assert [p["step"] for p in profiles] == [2, 4]
    assert all(len(p["overlap"]) == len(p["multiplier"]) == len(p["alive"]) for p in profiles)
    for name in ("accuracy.png", "drift.png", "checkpoint.pt", "student/config.json"):
        assert (tmp_path / name).exists(), name


def test_plain_opd_neither_prunes_nor_reweights(tmp_path, cache):
    rows = run(tmp_path, cache, "--method", "opd", "--steps", "2")
    assert rows[0]["baseline"] == "none"
    for r in rows[1:]:
        assert r["multiplier"] == 1.0 and r["weight"] == 1.0
        assert r["tokens_saved"] == 0 and r["pruned_fraction"] == 0.0


def test_interrupted_run_resumes_exactly(tmp_path, cache, monkeypatch):
    steps = 4
    reference = run(tmp_path / "straight", cache, "--steps", str(steps), "--eval-every", "1")

    # Ctrl-C arrives during step 2: the step finishes, a checkpoint is written, the run exits 130.
    real_step = train.rollout_and_loss
    calls = {"n": 0}

    def interrupted_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "rollout_and_loss", interrupted_step)
    with pytest.raises(SystemExit) as stop:
        run(tmp_path / "resumed", cache, "--steps", str(steps), "--eval-every", "1")
    assert stop.value.code == 130
    assert [r["step"] for r in read(tmp_path / "resumed" / "metrics.jsonl")] == [0, 1, 2]
    monkeypatch.setattr(train, "rollout_and_loss", real_step)

    resumed = run(tmp_path / "resumed", cache, "--steps", str(steps), "--eval-every", "1")
    assert without_timings(resumed) == without_timings(reference)


def test_resume_refuses_a_different_run(tmp_path, cache):
    run(tmp_path, cache, "--steps", "1")
    with pytest.raises(SystemExit, match="different run"):
        run(tmp_path, cache, "--steps", "2", "--method", "opd")


def test_saved_tokenizer_starts_plain_calls_with_bos_as_training_did(tmp_path):
    from transformers import AutoTokenizer

    config = train.PRESETS["default"].task
    tokenizer = task.build_tokenizer(config)
    tokenizer.save_pretrained(tmp_path)
    problem = task.make_problems(1, 0, config)[0]
    trained_on = models.encode_supervised(tokenizer, [problem])[0][0].tolist()
    plain = AutoTokenizer.from_pretrained(tmp_path)(problem.prompt).input_ids
    assert plain[0] == tokenizer.bos_token_id and trained_on[: len(plain)] == plain
    assert tokenizer.encode(problem.prompt, add_special_tokens=False) == plain[1:]


def test_real_checkpoint_path(tmp_path, cache):
    preset = train.PRESETS["tiny"]
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    tokenizer = task.build_tokenizer(preset.task)
    for directory, size in ((teacher_dir, preset.teacher), (student_dir, preset.student)):
        models.new_model(size, tokenizer, preset.task, seed=0).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    data = tmp_path / "problems.jsonl"
    task.save_jsonl(data, task.make_problems(40, 5, preset.task))

    rows = run(
        tmp_path / "run",
        cache,
        "--teacher",
        str(teacher_dir),
        "--student",
        str(student_dir),
        "--data",
        str(data),
        "--eval-size",
        "8",
        "--steps",
        "2",
        "--max-new-tokens",
        "12",
    )
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(r["tokens_generated"] <= 4 * 12 for r in rows[1:])


def test_real_checkpoints_with_different_tokenizers_are_rejected(tmp_path, cache):
    preset = train.PRESETS["tiny"]
    bigger = task.TaskConfig(max_value=preset.task.max_value + 10)
    for directory, task_config in ((tmp_path / "teacher", preset.task), (tmp_path / "student", bigger)):
        tokenizer = task.build_tokenizer(task_config)
        models.new_model(preset.student, tokenizer, task_config, seed=0).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    with pytest.raises(ValueError, match="different tokenizers"):
        run(
            tmp_path / "run",
            cache,
            "--teacher",
            str(tmp_path / "teacher"),
            "--student",
            str(tmp_path / "student"),
            "--steps",
            "1",
        )


CHAT_TEMPLATE = (
    "{% for m in messages %}<|user|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def chat_checkpoints(tmp_path):
    """Teacher and student folders sharing a tokenizer whose chat template wraps prompts in markers."""
    preset = train.PRESETS["tiny"]
    tokenizer = task.build_tokenizer(preset.task)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    for name, size in (("teacher", preset.teacher), ("student", preset.student)):
        models.new_model(size, tokenizer, preset.task, seed=0).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    data = tmp_path / "problems.jsonl"
    task.save_jsonl(data, task.make_problems(40, 5, preset.task))
    return [
        "--teacher",
        str(tmp_path / "teacher"),
        "--student",
        str(tmp_path / "student"),
        "--data",
        str(data),
        "--eval-size",
        "8",
        "--max-new-tokens",
        "8",
    ]


def test_real_checkpoints_in_bfloat16_with_the_chat_template(tmp_path, cache):
    checkpoints = chat_checkpoints(tmp_path)
    rows = run(tmp_path / "run", cache, *checkpoints, "--steps", "2", "--dtype", "bf16")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[0]["dtype"] == "bfloat16" and rows[0]["chat_template"] is True
    assert all(math.isfinite(r["loss"]) for r in rows[1:])

    args = train.parse_args(TINY + ["--cache", str(cache), "--device", "cpu", "--dtype", "bfloat16", *checkpoints])
    setup = train.build_setup(args, train.PRESETS["tiny"])
    assert setup.student.dtype == setup.teacher.dtype == torch.bfloat16
    prompt = setup.eval_problems[0].prompt
    assert prompt.startswith("<|user|> ") and prompt.endswith(" <|assistant|>"), prompt
    ids, _ = models.encode_prompts(setup.tokenizer, [prompt])
    assert setup.tokenizer.convert_tokens_to_ids("<|assistant|>") == ids[0, -1]

    args = train.parse_args(TINY + ["--cache", str(cache), "--device", "cpu", "--no-chat-template", *checkpoints])
    plain = train.build_setup(args, train.PRESETS["tiny"])
    assert "<|user|>" not in plain.eval_problems[0].prompt
    assert plain.student.dtype == torch.float32  # the CPU default


def test_unknown_model_id_offline_is_a_clear_error(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "problems.jsonl"
    task.save_jsonl(data, task.make_problems(20, 5, train.PRESETS["tiny"].task))
    with pytest.raises(
        SystemExit, match=r"no-such-owner/no-such-model: .*needs network access.*local checkpoint folder"
    ):
        run(
            tmp_path / "run",
            cache,
            "--teacher",
            "no-such-owner/no-such-model",
            "--student",
            "no-such-owner/no-such-model",
            "--data",
            str(data),
            "--eval-size",
            "4",
            "--steps",
            "1",
        )


def test_paper_prune_preset_uses_the_authors_settings_and_flags_override(tmp_path, cache):
    rows = run(tmp_path, cache, "--prune-preset", "paper", "--steps", "1")
    saved = rows[0]["prune_config"]
    assert (saved["k"], saved["threshold"], saved["w_drop"], saved["w_base"]) == (16, 0.7, 0.01, 0.5)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["signature"]["prune_k"] == "16"

    args = train.parse_args(["--prune-preset", "paper", "--prune-threshold", "0.5"])
    assert (args.prune_k, args.prune_threshold) == (16, 0.5)
    args = train.parse_args([])
    assert (args.prune_k, args.prune_threshold, args.prune_w_drop) == (2, 0.25, 1.0)


def test_task_answers_are_verifiable():
    config = task.TaskConfig()
    tokenizer = task.build_tokenizer(config)
    assert 150 <= len(tokenizer) <= 400
    for problem in task.make_problems(200, 3, config):
        assert task.is_correct(problem.completion, problem.answer)
        ids = tokenizer.encode(problem.prompt + " " + problem.completion, add_special_tokens=False)
        assert tokenizer.pad_token_id not in ids  # no unknown words
        numbers = [int(w) for w in problem.completion.split() if w.isdigit()]
        assert all(0 <= n <= config.max_value for n in numbers)
    assert not task.is_correct("3 + 4 = 7 . so mia has 8 coins", "7")


def test_injected_mistakes_are_read_but_never_taught():
    import random

    config = task.TaskConfig()
    tokenizer = task.build_tokenizer(config)
    rng = random.Random(0)
    problems = task.make_problems(50, 4, config)
    for problem in problems:
        text, wrong = task.inject_mistakes(rng, problem.completion, config)
        clean, noisy = problem.completion.split(), text.split()
        assert len(noisy) == len(clean) and 1 <= len(wrong) <= 2
        assert [i for i, (a, b) in enumerate(zip(clean, noisy)) if a != b] == wrong
        assert task.first_error(problem.prompt, noisy) == wrong[0]
        _, _, labels = models.encode_supervised(
            tokenizer, [problem.__class__(problem.prompt, text, problem.answer)], [wrong]
        )
        prompt_len = 1 + len(problem.prompt.split())
        completion_labels = labels[0, prompt_len : prompt_len + len(noisy)].tolist()
        assert [i for i, label in enumerate(completion_labels) if label == -100] == wrong


def test_clean_schedule_keeps_its_cache_key():
    # mistake_fraction was added after teachers were cached: at 0 it must not change their key.
    schedule = models.SupervisedSchedule(steps=700, batch_size=64, lr=4e-3)
    assert models.cache_key(schedule) == models.cache_key({"steps": 700, "batch_size": 64, "lr": 4e-3, "warmup": 20})
    assert models.cache_key(dataclasses.replace(schedule, mistake_fraction=0.3)) != models.cache_key(schedule)
    assert models.cache_key(dataclasses.replace(schedule, decay=False)) != models.cache_key(schedule)


def test_supervised_schedule_without_decay_stays_at_its_rate():
    constant = models.SupervisedSchedule(steps=100, batch_size=8, lr=1e-3, warmup=10, decay=False)
    annealed = dataclasses.replace(constant, decay=True)
    assert [models.warmup_cosine(s, constant) for s in (0, 9, 10, 99)] == pytest.approx([0.1, 1.0, 1.0, 1.0])
    assert [models.warmup_cosine(s, annealed) for s in (0, 9, 10)] == pytest.approx([0.1, 1.0, 1.0])
    assert models.warmup_cosine(100, annealed) == pytest.approx(0.1)


def test_opd_learning_rate_warms_up_then_decays_to_a_tenth():
    steps = 250
    factors = [train.learning_rate_factor(s, steps) for s in range(steps + 1)]
    assert factors[0] == pytest.approx(1 / train.LR_WARMUP_STEPS)
    assert factors[train.LR_WARMUP_STEPS] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[train.LR_WARMUP_STEPS :], factors[train.LR_WARMUP_STEPS + 1 :]))
    assert factors[steps] == pytest.approx(0.1)


def test_reproduction_writes_table_plots_and_json(tmp_path, cache):
    from examples.opd import reproduce

    docs = tmp_path / "docs"
    reproduce.main(
        [
            "--preset",
            "counting-tiny",
            "--steps",
            "2",
            "--seeds",
            "0",
            "1",
            "--quiet",
            "--runs",
            str(tmp_path / "runs"),
            "--cache",
            str(cache),
            "--docs",
            str(docs),
            "--variance-batches",
            "2",
            "--variance-batch-size",
            "2",
            "--drift-rollouts",
            "8",
        ]
    )
    assert (
        reproduce.report_name("counting") == "reproduction"
        and reproduce.report_name("arithmetic") == "reproduction_arithmetic"
    )
    report = (docs / "reproduction_counting-tiny.md").read_text()
    for method in reproduce.METHOD_ORDER:
        assert f"| {method} | " in report
    assert "## The PruneConfig sweep" in report and "## Gradient variance" in report and "## Drift evidence" in report
    result = json.loads((docs / "reproduction_counting-tiny.json").read_text())
    assert [r["method"] for r in result["methods"]] == list(reproduce.METHOD_ORDER)
    assert all([s["seed"] for s in r["seeds"]] == [0, 1] for r in result["methods"])
    assert len(result["sweep"]) == len({r["k"] for r in result["sweep"]}) * len(reproduce.SWEEP_THRESHOLDS) * len(
        reproduce.SWEEP_W_DROPS
    )
    if result["chosen"] is not None:  # the runs used the chosen config
        assert result["prune_config"]["k"] == result["chosen"]["k"]
        assert result["prune_config"]["w_drop"] == result["chosen"]["w_drop"]
    assert set(result["variance"]) >= {"none", "full", "topk"}
    for png in ("accuracy.png", "accuracy_tokens.png", "drift.png"):
        assert (docs / f"reproduction_counting-tiny_{png}").stat().st_size > 0
    assert "Teacher accuracy on the same evaluation" in report


def test_prune_sweep_picks_the_config_that_stops_loops_after_their_mistake():
    from examples.opd import reproduce

    # 4 rows of 40 tokens. Rows 0-1 are correct: top-1 agreement everywhere but one isolated token of
    # row 0. Rows 2-3 make a mistake at token 10, then disagree every 5th token (a loop closing).
    T = 40
    top1 = torch.ones(4, T)
    top1[0, 20] = 0.0
    for row in (2, 3):
        top1[row, 14::5] = 0.0
    batches = [
        {
            "overlaps": {1: top1, 16: torch.full((4, T), 0.2)},
            "mask": torch.ones(4, T, dtype=torch.bool),
            "lengths": torch.tensor([T, T, T, T]),
            "first_error": torch.tensor([T, T, 10, 10]),
        }
    ]
    sweep = reproduce.prune_sweep(batches, group=4)
    by_key = {(r["k"], r["threshold"], r["w_drop"]): r for r in sweep}
    assert by_key[(1, 0.5, 1.0)]["false_stops"] == 0.5  # one event stops the correct row 0
    assert by_key[(16, 0.25, 1.0)]["early_stops"] == 1.0  # top-16 tails flag every token
    chosen = reproduce.choose_prune_config(sweep)
    assert (chosen["k"], chosen["w_drop"]) == (1, 0.5)  # the second disagreement stops a loop
    assert chosen["false_stops"] == 0 and chosen["early_stops"] == 0
    # Rows 2-3 stop at their 2nd event (token 19): 20 of 40 tokens each; the batch still decodes to 40.
    assert chosen["tokens_saved"] == pytest.approx(2 * 20 / (4 * T))
    assert chosen["decode_steps_saved"] == 0.0


def test_counting_task_problems_loops_and_mistakes():
    import random

    from examples.opd.counting import CountingTask

    config = CountingTask()
    tokenizer = task.build_tokenizer(config)
    assert 1000 <= len(tokenizer) <= 1010
    rng = random.Random(0)
    loops = 0
    for problem in task.make_problems(300, 1, config):
        words = problem.completion.split()
        assert config.is_correct(problem.completion, problem) and config.first_error(problem, words) is None
        assert config.min_span + 1 <= len(words) <= config.max_span + 1 and int(words[-1]) % 100 == 0
        assert tokenizer.pad_token_id not in tokenizer.encode(
            problem.prompt + " " + problem.completion, add_special_tokens=False
        )
        looping = config.looping_completion(rng, problem, 0.2)
        if looping is None:
            continue
        loops += 1
        looped = looping.split()
        assert len(looped) == config.max_new_tokens and not config.is_correct(looping, problem)
        error = config.first_error(problem, looped)
        assert looped[:error] == words[:error] and looped[error - 1].endswith("9")
        assert int(looped[error]) == int(looped[error - 1]) - 9  # the failed carry
        assert looped[error : error + 10] == looped[error + 10 : error + 20]  # then the same decade again
    assert 0.5 * 300 < loops < 300
    assert config.first_error(problem, words[:-1]) == len(words) - 1  # stopping early is a mistake

    # Loops are trained without EOS: they end at the length cap, not on their own.
    _, _, labels = models.encode_supervised(tokenizer, [problem, problem], unfinished={1})
    assert (labels[0] == tokenizer.eos_token_id).sum() == 1 and (labels[1] == tokenizer.eos_token_id).sum() == 0


def test_bad_device_is_an_argparse_error(capsys):
    for device, message in (("gpu0", "is not a device"), ("cuda", "CUDA is not available")):
        if device == "cuda" and torch.cuda.is_available():
            continue
        with pytest.raises(SystemExit) as info:
            train.parse_args(["--device", device])
        assert info.value.code == 2 and message in capsys.readouterr().err


def test_missing_data_and_checkpoints_are_argparse_errors(tmp_path, capsys):
    for argv, message in (
        (["--data", str(tmp_path / "missing.jsonl")], "--data"),
        (["--teacher", str(tmp_path / "no_teacher"), "--student", str(tmp_path)], "--teacher"),
        (["--teacher", str(tmp_path), "--student", "./no/such/student"], "--student"),
    ):
        with pytest.raises(SystemExit) as info:
            train.parse_args(argv)
        err = capsys.readouterr().err
        assert info.value.code == 2 and message in err and "Traceback" not in err, err
    # A hub id is left to the hub client (and its one-line error when it cannot be fetched).
    assert train.parse_args(["--teacher", "Qwen/Qwen2.5-0.5B", "--student", "Qwen/Qwen2.5-0.5B"]).teacher


def test_prune_k_above_the_vocabulary_is_a_one_line_error(tmp_path, cache):
    with pytest.raises(SystemExit, match=r"--prune-k 5000: larger than the models' vocabulary"):
        run(tmp_path, cache, "--steps", "1", "--prune-k", "5000")


def test_distributed_example_runs_on_two_cpu_processes():
    """examples/distributed_opd.py under torchrun (gloo): both modes train, and the vocab-parallel
    loss equals the unsharded one."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(root / "examples" / "distributed_opd.py"),
            "--steps",
            "2",
            "--check",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
        env=env,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("[dp] step") == 2 and run.stdout.count("[tp] step") == 2, run.stdout
    diffs = [float(d) for d in re.findall(r"\|diff\| (\S+)", run.stdout)]
    assert len(diffs) == 2 and max(diffs) < 1e-5, run.stdout


# ---- a newcomer's first runs: --fresh, --help, argument errors, --quiet, plots, TensorBoard --------


def test_finished_run_says_so_and_fresh_starts_over(tmp_path, cache, capsys):
    first = run(tmp_path, cache, "--steps", "1")
    (tmp_path / "notes.txt").write_text("not a run output")
    capsys.readouterr()

    again = run(tmp_path, cache, "--steps", "1")
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and "already" in lines[0] and "--fresh" in lines[0], lines
    assert lines[1].startswith("prune+vopd: held-out accuracy") and "in 1 steps" in lines[1], lines
    assert again == first  # nothing retrained, nothing appended

    calls = {"n": 0}
    real_step = train.rollout_and_loss

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real_step(*args, **kwargs)

    train.rollout_and_loss = counted
    try:
        fresh = run(tmp_path, cache, "--steps", "1", "--fresh")
    finally:
        train.rollout_and_loss = real_step
    assert calls["n"] == 1 and [r["step"] for r in fresh] == [0, 1]
    assert (tmp_path / "notes.txt").read_text() == "not a run output"  # only the run's own files go


def test_fresh_replaces_a_different_run(tmp_path, cache):
    run(tmp_path, cache, "--steps", "1")
    rows = run(tmp_path, cache, "--steps", "2", "--method", "opd", "--fresh")
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[0]["method"] == "opd"


def test_help_lists_every_option_with_its_default_and_the_methods(capsys):
    import re

    with pytest.raises(SystemExit) as info:
        train.parse_args(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    parser_options = [
        a
        for a in (
            "--method",
            "--preset",
            "--out",
            "--fresh",
            "--cache",
            "--steps",
            "--batch-size",
            "--lr",
            "--temperature",
            "--max-new-tokens",
            "--eval-every",
            "--eval-size",
            "--target",
            "--save-every",
            "--seed",
            "--device",
            "--threads",
            "--prune-k",
            "--prune-threshold",
            "--prune-w-drop",
            "--prune-w-base",
            "--prune-warmup",
            "--prune-preset",
            "--teacher",
            "--student",
            "--dtype",
            "--no-chat-template",
            "--data",
            "--tensorboard",
            "--no-plots",
            "--quiet",
        )
    ]
    # One entry per option: argparse starts each at two spaces of indent.
    entries = {
        " ".join(e.split()).split(" ")[0]: " ".join(e.split())
        for e in re.split(r"\n  (?=-)", text.split("options:")[1].split("--method values:")[0])
    }
    for option in parser_options:
        assert option in entries, option
        assert "(default: " in entries[option], entries[option]
    assert "(default: from --preset: 120 for default, 250 for arithmetic" in entries["--steps"]
    methods = " ".join(text.split("--method values:")[1].split())
    for name, meaning in (
        ("opd", "OPD: plain on-policy distillation"),
        ("vopd", "vOPD:"),
        ("prune", "Prune-OPD:"),
        ("prune+vopd", "Prune-OPD + vOPD:"),
    ):
        assert f"{name} {meaning}" in methods, (name, methods)


@pytest.mark.parametrize(
    "option, value",
    [
        ("--eval-size", "0"),
        ("--eval-size", "-3"),
        ("--steps", "0"),
        ("--batch-size", "-1"),
        ("--eval-every", "0"),
        ("--save-every", "0"),
        ("--threads", "0"),
        ("--max-new-tokens", "0"),
        ("--lr", "0"),
        ("--lr", "nan"),
        ("--temperature", "-1"),
        ("--prune-k", "0"),
        ("--prune-threshold", "1.5"),
        ("--prune-w-drop", "-0.1"),
        ("--prune-w-base", "-1"),
        ("--prune-warmup", "-1"),
        ("--target", "2"),
        ("--steps", "many"),
    ],
)
def test_bad_numbers_are_argparse_errors(option, value, capsys):
    with pytest.raises(SystemExit) as info:
        train.parse_args([option, value])
    assert info.value.code == 2
    assert f"argument {option}: expected" in capsys.readouterr().err


def test_quiet_prints_only_the_final_line(tmp_path, capfd):
    # A cold cache too: the teacher and student pre-training and their saving must be silent as well.
    run(tmp_path / "run", tmp_path / "cache", "--steps", "2")
    captured = capfd.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if line.strip()]
    assert len(lines) == 1 and "held-out accuracy" in lines[0], lines


def test_plots_show_teacher_target_k_and_pruned_rows(tmp_path, cache):
    from examples.opd import plots

    rows = run(tmp_path, cache, "--steps", "2", "--eval-every", "1", "--prune-threshold", "1.0", "--target", "0.3")
    teacher = rows[0]["teacher_accuracy"]
    assert 0.0 <= teacher <= 1.0
    profiles = read(tmp_path / "rollouts.jsonl")
    for p in profiles:
        for key in ("overlap_finished", "overlap_pruned", "multiplier_finished", "multiplier_pruned"):
            assert len(p[key]) == len(p["alive"]), key
        assert p["rows_finished"] + p["rows_pruned"] == 4
    assert any(p["rows_pruned"] for p in profiles)  # threshold 1.0 flags any overlap below 1

    fig = plots.accuracy_vs_time({"prune+vopd": rows}, tmp_path / "a.png", target=0.3, teacher=teacher)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert f"teacher {teacher:.2f}" in labels and "target 0.30" in labels

    # Both kinds of rows at once, which a tiny run does not guarantee: profiles as train.py writes them.
    both = [
        {
            "step": step,
            "alive": [1.0, 0.75, 0.5],
            "overlap": [0.6, 0.5, 0.5],
            "multiplier": [1.5, 1.2, 1.5],
            "overlap_finished": [0.7, 0.7, 0.5],
            "overlap_pruned": [0.5, 0.0, None],
            "multiplier_finished": [1.5, 1.5, 1.5],
            "multiplier_pruned": [1.5, 0.5, None],
            "rows_finished": 2,
            "rows_pruned": 2,
        }
        for step in (1, 2)
    ]
    fig = plots.drift_profiles(both, tmp_path / "d.png", k=2)
    assert all(ax.get_ylabel() for ax in fig.axes)
    assert "top-2" in fig.axes[0].get_ylabel() and "top-2" in fig.axes[0].get_title()
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any("ended normally" in t for t in legend) and any("Prune-OPD" in t for t in legend), legend
    styles = {line.get_linestyle() for line in fig.axes[0].get_lines() if line.get_xdata().size}
    assert {"-", "--"} <= styles


class _RecordingWriter:
    def __init__(self, log_dir, start_step):
        self.log_dir, self.start_step, self.scalars, self.closed = log_dir, start_step, [], False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_tensorboard_logs_every_step_beside_the_jsonl(tmp_path, cache, monkeypatch):
    writers = []
    monkeypatch.setattr(train, "tensorboard_available", lambda: True)
    monkeypatch.setattr(train, "open_tensorboard", lambda d, s: writers.append(_RecordingWriter(d, s)) or writers[-1])
    rows = run(tmp_path / "run", cache, "--steps", "2", "--tensorboard", str(tmp_path / "tb"))
    (writer,) = writers
    assert writer.closed and writer.start_step == 0 and writer.log_dir == tmp_path / "tb"
    logged = {(tag, step): value for tag, value, step in writer.scalars}
    for r in rows:
        assert logged[("opd/accuracy", 0)] == rows[0]["accuracy"]
        assert ("opd/wall_time", r["step"]) in logged
    assert logged[("opd/reward", 2)] == rows[2]["reward"]


def test_tensorboard_without_the_package_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(train, "tensorboard_available", lambda: False)
    with pytest.raises(SystemExit) as info:
        train.parse_args(["--tensorboard", "tb"])
    assert info.value.code == 2 and "pip install tensorboard" in capsys.readouterr().err


def test_tensorboard_writes_event_files(tmp_path, cache):
    pytest.importorskip("tensorboard")
    run(tmp_path / "run", cache, "--steps", "1", "--tensorboard", str(tmp_path / "tb"))
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


# ---- the documentation -----------------------------------------------------------------------------

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_readme_api_snippet_runs_as_written():
    """The README's API block, run verbatim on tiny untrained models built from configs."""
    import re
    from types import SimpleNamespace

    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"## API\n\n```python\n(.*?)```", readme, re.S).group(1)

    preset = train.PRESETS["tiny"]
    tokenizer = task.build_tokenizer(preset.task)
    torch.manual_seed(0)
    student = models.new_model(preset.student, tokenizer, preset.task, seed=0)
    teacher = models.new_model(preset.teacher, tokenizer, preset.task, seed=1).requires_grad_(False)
    prompts = [p.prompt for p in task.make_problems(3, 0, preset.task)]
    prompts[1] = " ".join(prompts[1].split()[2:])  # a shorter prompt: left padding in the batch
    input_ids, attention_mask = models.encode_prompts(tokenizer, prompts)

    class Names(dict):
        # The served teacher's answers only exist once the snippet has sampled its rollouts: built
        # on first use from them, as a vLLM server scoring the rollouts as prompts would return them.
        def __missing__(self, name):
            if name != "request_outputs":
                raise KeyError(name)
            logprobs = self["teacher_logits"].log_softmax(-1)
            outputs = []
            for b, sequence in enumerate(self["rollout"].sequences.tolist()):
                # The server gets the sequence without its left padding.
                prompt_length = int(self["attention_mask"][b].sum())
                sequence = sequence[self["P"] - prompt_length :]
                entries = [None] * prompt_length
                for j, token in enumerate(sequence[prompt_length:]):
                    top = logprobs[b, j].topk(20)  # the k the snippet passes
                    entry = {
                        int(i): SimpleNamespace(logprob=float(v), rank=r + 1)
                        for r, (v, i) in enumerate(zip(top.values, top.indices))
                    }
                    entry.setdefault(token, SimpleNamespace(logprob=float(logprobs[b, j, token]), rank=21))
                    entries.append(entry)
                outputs.append(SimpleNamespace(prompt_token_ids=sequence, prompt_logprobs=entries))
            return outputs

    names = Names(
        student=student, teacher=teacher, tokenizer=tokenizer, input_ids=input_ids, attention_mask=attention_mask
    )
    exec(compile(snippet, "README.md#API", "exec"), {}, names)
    assert torch.isfinite(names["loss"]) and names["stop"].shape == (3,)
    assert names["student_logits"].shape[:2] == names["tokens"].shape
    # The served rows line up with the completions, also for the left-padded (shorter) prompts.
    assert len(set(names["prompt_lengths"])) > 1, "the prompts should differ in length"
    served = names["served"]
    assert torch.equal(served.tokens[served.mask], names["tokens"][served.mask])
    assert served.mask.sum() >= names["mask"].sum() * 0.5


def _measured_ranges(text, pattern):
    import re

    match = re.search(pattern, text)
    assert match, pattern
    return [(float(a), float(b)) for a, b in zip(match.groups()[::2], match.groups()[1::2])]


def test_quickstart_numbers_are_ranges_covering_the_measured_runs():
    # The default preset's runs measured so far: --seed 0 (also from a fresh clone), 1 and 2, and
    # --seed 0 from a fresh clone on another machine.
    measured = [(0.303, 0.407), (0.243, 0.423), (0.277, 0.510), (0.257, 0.393)]
    for path in ("README.md", "examples/README.md"):
        text = " ".join((ROOT / path).read_text().split())
        assert "numbers exactly" not in text, path
        (start, final) = _measured_ranges(text, r"from (0\.\d+)–(0\.\d+) to (0\.\d+)–(0\.\d+)")
        for s, f in measured:
            assert start[0] <= round(s, 2) <= start[1] and final[0] <= round(f, 2) <= final[1], (path, start, final)
