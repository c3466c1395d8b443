"""The reference training run (examples/train_opd.py), shortened: tiny models, a few steps.

Covers the metrics log, exact resume after Ctrl-C, the per-method wiring (plain OPD neither prunes
nor reweights), and the real-checkpoint path (--teacher/--student/--data) on locally saved models.
"""
import dataclasses
import json
import os
import signal

import pytest
import torch

from examples.opd import models, task, train

TINY = ["--preset", "tiny", "--quiet", "--threads", "1"]
PER_STEP_KEYS = {"step", "wall_time", "reward", "reverse_kl", "overlap", "multiplier", "weight", "tokens_generated",
                 "tokens_saved", "tokens_generated_total", "tokens_saved_total", "loss", "grad_norm", "rollout_accuracy"}
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


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_short_run_writes_metrics_checkpoint_and_plots(tmp_path, cache, device):
    steps = 4
    rows = run(tmp_path, cache, "--steps", str(steps), "--eval-every", "2", device=device)

    assert [r["step"] for r in rows] == list(range(steps + 1))
    assert "accuracy" in rows[0] and rows[0]["method"] == "prune+vopd"
    for r in rows[1:]:
        assert PER_STEP_KEYS <= r.keys(), PER_STEP_KEYS - r.keys()
        assert 0.0 <= r["overlap"] <= 1.0 and r["reverse_kl"] >= 0.0
        assert 0.5 <= r["multiplier"] <= 1.5           # w_base + weight with w_base = 0.5
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


def test_real_checkpoint_path(tmp_path, cache):
    preset = train.PRESETS["tiny"]
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    tokenizer = task.build_tokenizer(preset.task)
    for directory, size in ((teacher_dir, preset.teacher), (student_dir, preset.student)):
        models.new_model(size, tokenizer, preset.task, seed=0).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    data = tmp_path / "problems.jsonl"
    task.save_jsonl(data, task.make_problems(40, 5, preset.task))

    rows = run(tmp_path / "run", cache, "--teacher", str(teacher_dir), "--student", str(student_dir),
               "--data", str(data), "--eval-size", "8", "--steps", "2", "--max-new-tokens", "12")
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
        run(tmp_path / "run", cache, "--teacher", str(tmp_path / "teacher"), "--student", str(tmp_path / "student"),
            "--steps", "1")


def test_task_answers_are_verifiable():
    config = task.TaskConfig()
    tokenizer = task.build_tokenizer(config)
    assert 150 <= len(tokenizer) <= 400
    for problem in task.make_problems(200, 3, config):
        assert task.is_correct(problem.completion, problem.answer)
        ids = tokenizer.encode(problem.prompt + " " + problem.completion, add_special_tokens=False)
        assert tokenizer.pad_token_id not in ids                     # no unknown words
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
        _, _, labels = models.encode_supervised(tokenizer, [problem.__class__(problem.prompt, text, problem.answer)], [wrong])
        prompt_len = 1 + len(problem.prompt.split())
        completion_labels = labels[0, prompt_len: prompt_len + len(noisy)].tolist()
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
    assert all(a >= b for a, b in zip(factors[train.LR_WARMUP_STEPS:], factors[train.LR_WARMUP_STEPS + 1:]))
    assert factors[steps] == pytest.approx(0.1)


def test_reproduction_writes_table_plots_and_json(tmp_path, cache):
    from examples.opd import reproduce

    docs = tmp_path / "docs"
    reproduce.main(["--preset", "tiny", "--steps", "2", "--quiet", "--runs", str(tmp_path / "runs"), "--cache", str(cache),
                    "--docs", str(docs), "--variance-batches", "2", "--variance-batch-size", "2", "--drift-rollouts", "4"])
    report = (docs / "reproduction.md").read_text()
    for method in reproduce.METHOD_ORDER:
        assert f"| {method} | " in report
    assert "## Gradient variance" in report and "## Drift evidence" in report
    result = json.loads((docs / "reproduction.json").read_text())
    assert [r["method"] for r in result["rows"]] == list(reproduce.METHOD_ORDER)
    assert set(result["variance"]) >= {"none", "full", "topk"}
    for png in ("reproduction_accuracy.png", "reproduction_accuracy_tokens.png", "reproduction_drift.png"):
        assert (docs / png).stat().st_size > 0


@pytest.mark.parametrize("start, target, expected", [
    (0.2475, 0.57, [0.3, 0.4, 0.5, 0.57]),   # round levels at least half a step above the start, then the target
    (0.25, 0.42, [0.3, 0.42]),
    (0.3, 0.42, [0.42]),                      # 0.4 sits too close to the target to add anything
    (0.435, 0.435, []),                       # nothing was gained: no levels
])
def test_accuracy_levels(start, target, expected):
    from examples.opd import reproduce

    assert reproduce.accuracy_levels(start, target) == pytest.approx(expected)


def test_bad_device_is_an_argparse_error(capsys):
    for device, message in (("gpu0", "is not a device"), ("cuda", "CUDA is not available")):
        if device == "cuda" and torch.cuda.is_available():
            continue
        with pytest.raises(SystemExit) as info:
            train.parse_args(["--device", device])
        assert info.value.code == 2 and message in capsys.readouterr().err


def test_distributed_example_runs_on_two_cpu_processes():
    """examples/distributed_opd.py under torchrun (gloo): both modes train, and the vocab-parallel
    loss equals the unsharded one."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(root / "examples" / "distributed_opd.py"), "--steps", "2", "--check"],
                         capture_output=True, text=True, timeout=300, cwd=root, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("[dp] step") == 2 and run.stdout.count("[tp] step") == 2, run.stdout
    diffs = [float(d) for d in re.findall(r"\|diff\| (\S+)", run.stdout)]
    assert len(diffs) == 2 and max(diffs) < 1e-5, run.stdout
