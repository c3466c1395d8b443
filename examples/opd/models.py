"""Tiny Hugging Face causal LMs for the reference task: configs, supervised training, the disk cache,
loading real checkpoints, and greedy held-out evaluation.

Teacher and student are ordinary `LlamaForCausalLM`s built from local configs (no downloads) and are
saved with `save_pretrained` next to their tokenizer, so the synthetic run and `--teacher/--student
PATH` (or a Hugging Face model id) go through the same loading code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from examples.opd.task import Problem, build_tokenizer, inject_mistakes, make_problems


@dataclass(frozen=True)
class ModelSize:
    hidden: int
    layers: int
    heads: int
    ffn: int

    def llama_config(self, vocab_size: int, max_positions: int, tokenizer):
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden,
            intermediate_size=self.ffn,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            max_position_embeddings=max_positions,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=True,
        )


@dataclass(frozen=True)
class SupervisedSchedule:
    steps: int
    batch_size: int
    lr: float
    warmup: int = 20
    # Fraction of training chains with injected mistakes followed by the correct continuation
    # (task.inject_mistakes), to train a teacher that corrects a student's wrong step instead of
    # continuing it. Off in the presets: at these sizes it cost the teacher more accuracy than it
    # gave OPD (docs/reproduction_notes.md).
    mistake_fraction: float = 0.0
    # False: the rate stays at `lr` after the warm-up. A student cut off mid-way through such a run is
    # still on the steep part of its learning curve; one trained to the end of the cosine lost accuracy
    # to any fresh optimizer at a rate that could teach it anything (docs/reproduction_notes.md).
    decay: bool = True
    # Per decade carry, the probability that a training completion fails to carry and loops until
    # the length cap (counting.CountingTask.looping_completion): the student's failure mode on the
    # counting task, which the teacher, trained at 0, never shows.
    loop_rate: float = 0.0


# ---- batching ---------------------------------------------------------------------------------


def encode_prompts(tokenizer, prompts: list[str], device="cpu"):
    """Left-padded prompt ids (generation appends on the right), each starting with BOS.

    No BOS is added where the tokenizer has none (Qwen) or the text already opens with it (a chat
    template that writes its own): a doubled BOS is a prefix the model never saw in training.
    """
    bos, bos_text = tokenizer.bos_token_id, tokenizer.bos_token
    ids = [
        ([bos] if bos is not None and not (bos_text and p.startswith(bos_text)) else [])
        + tokenizer.encode(p, add_special_tokens=False)
        for p in prompts
    ]
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, width - len(seq) :] = torch.tensor(seq)
        attention_mask[row, width - len(seq) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def encode_supervised(
    tokenizer, problems: list[Problem], unlabeled: list[list[int]] | None = None, unfinished: set[int] = frozenset()
):
    """Right-padded BOS + prompt + completion + EOS; labels only on the completion (and EOS).

    `unlabeled[i]` lists completion word indices of problem i that get no loss (injected mistakes:
    the model reads them but is never taught to write them). The tokenizer is word level, so word i
    of a completion is its token i. Problems whose index is in `unfinished` get no EOS (a loop cut
    at the length cap has not ended).
    """
    rows, label_rows = [], []
    for i, p in enumerate(problems):
        prompt = [tokenizer.bos_token_id] + tokenizer.encode(p.prompt, add_special_tokens=False)
        completion = tokenizer.encode(p.completion, add_special_tokens=False)
        completion += [] if i in unfinished else [tokenizer.eos_token_id]
        labels = list(completion)
        for j in unlabeled[i] if unlabeled else ():
            labels[j] = -100
        rows.append(prompt + completion)
        label_rows.append([-100] * len(prompt) + labels)
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (seq, lab) in enumerate(zip(rows, label_rows)):
        input_ids[r, : len(seq)] = torch.tensor(seq)
        labels[r, : len(lab)] = torch.tensor(lab)
        attention_mask[r, : len(seq)] = 1
    return input_ids, attention_mask, labels


def warmup_cosine(step: int, schedule: SupervisedSchedule) -> float:
    if step < schedule.warmup:
        return (step + 1) / schedule.warmup
    if not schedule.decay:
        return 1.0
    progress = (step - schedule.warmup) / max(1, schedule.steps - schedule.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_supervised(model, tokenizer, task, schedule: SupervisedSchedule, seed: int, desc: str, progress: bool = True):
    """Next-token cross-entropy on freshly drawn problems of `task` (an endless stream: no overfitting)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=schedule.lr, weight_decay=0.01, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, schedule))
    model.train()
    device = next(model.parameters()).device
    bar = tqdm(range(schedule.steps), desc=desc, unit="step", dynamic_ncols=True, disable=not progress)
    for _ in bar:
        batch, unlabeled, unfinished = [], [], set()
        for row in range(schedule.batch_size):
            problem, wrong = task.make_problem(rng), []
            # (no draw at fraction 0: the clean schedule's problem stream, and so its cached models, stay as they were)
            if schedule.mistake_fraction > 0 and rng.random() < schedule.mistake_fraction:
                text, wrong = inject_mistakes(rng, problem.completion, task)
                problem = dataclasses.replace(problem, completion=text)
            if schedule.loop_rate > 0:
                looping = task.looping_completion(rng, problem, schedule.loop_rate)
                if looping is not None:
                    problem = dataclasses.replace(problem, completion=looping)
                    unfinished.add(row)
            batch.append(problem)
            unlabeled.append(wrong)
        input_ids, attention_mask, labels = (
            t.to(device) for t in encode_supervised(tokenizer, batch, unlabeled, unfinished)
        )
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return model


def new_model(size: ModelSize, tokenizer, task, seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    max_positions = task.max_prompt_tokens + task.max_completion_tokens + 8
    return LlamaForCausalLM(size.llama_config(len(tokenizer), max_positions, tokenizer))


# Schedule fields added after models were first cached: left out of the key at their default, so
# those caches stay valid.
_KEYED_ONLY_WHEN_SET = {"mistake_fraction": 0.0, "decay": True, "loop_rate": 0.0}


def cache_key(*parts) -> str:
    def describe(part):
        if not hasattr(part, "__dataclass_fields__"):
            return part
        return {k: v for k, v in asdict(part).items() if _KEYED_ONLY_WHEN_SET.get(k, object()) != v}

    blob = json.dumps([describe(p) for p in parts], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def load_or_train(
    cache_dir: Path,
    role: str,
    size: ModelSize,
    schedule: SupervisedSchedule,
    task,
    seed: int,
    device="cpu",
    progress: bool = True,
):
    """A model trained by `train_supervised`, cached under cache_dir/<role>-<hash of everything>.

    The hash covers the sizes, schedule, task (with its vocabulary and phrasing) and seed, so
    changing any of them retrains instead of silently reusing a stale model; the directory is
    written atomically (rename) so an interrupted training leaves no half-saved cache behind.
    """
    from transformers import AutoModelForCausalLM

    # The vocabulary and a few sample problems stand in for the task's code: editing the grammar
    # or the word lists changes the key even when TaskConfig does not.
    fingerprint = [task.vocabulary(), [p.to_json() for p in make_problems(4, 0, task)]]
    path = Path(cache_dir) / f"{role}-{cache_key(size, schedule, task, seed, fingerprint)}"
    if (path / "config.json").exists():
        return AutoModelForCausalLM.from_pretrained(path).eval(), build_tokenizer(task), path, 0.0
    tokenizer = build_tokenizer(task)
    start = time.perf_counter()
    model = new_model(size, tokenizer, task, seed).to(device)
    train_supervised(model, tokenizer, task, schedule, seed, desc=f"{role} (supervised)", progress=progress)
    seconds = time.perf_counter() - start
    partial = path.with_name(path.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(path)
    return model, tokenizer, path, seconds


# ---- real checkpoints --------------------------------------------------------------------------

# A Hugging Face Hub id: "name" or "owner/name" (letters, digits, '-', '_', '.').
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def checkpoint_name_problem(name: str | Path) -> str | None:
    """Why `name` can name no checkpoint (neither an existing path nor a hub id), or None if it can."""
    if Path(name).expanduser().exists() or _HUB_ID.match(str(name)):
        return None
    return f"{name} is neither a local checkpoint directory nor a Hugging Face model id"


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE as the hub reads it, but looked up now: huggingface_hub freezes it at import."""
    import huggingface_hub.constants

    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None:
        return value.strip().upper() in {"1", "ON", "YES", "TRUE"}
    return bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def load_checkpoint(name: str | Path, dtype: torch.dtype = torch.float32):
    """A causal LM and its tokenizer from a local directory or a Hugging Face Hub model id.

    A hub id is downloaded into (or read from) the Hugging Face cache. Failing to get one ends the
    run with a one-line SystemExit naming the id, instead of the hub client's chain of tracebacks.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint directory (no config.json)")
        source, offline = str(path), False
    elif (problem := checkpoint_name_problem(name)) is None:
        source, offline = str(name), _hub_offline()
    else:
        raise FileNotFoundError(problem)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=offline).eval()
    except OSError as error:
        if path.exists():
            raise
        why = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if offline:
            raise SystemExit(
                f"{name}: not a local folder and not in the Hugging Face cache, and the hub is offline "
                f"(HF_HUB_OFFLINE). This machine needs network access to download it, or pass a local "
                f"checkpoint folder instead"
            ) from None
        raise SystemExit(
            f"{name}: not a local folder, and it could not be loaded from the Hugging Face Hub ({why}). "
            f"Check the id (and access to gated models); the machine needs network access to download it, "
            f"or pass a local checkpoint folder instead"
        ) from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def format_prompts(tokenizer, prompts: list[str]) -> list[str]:
    """Each prompt as a single user turn in the tokenizer's chat template, ready for the reply.

    Instruction-tuned checkpoints were trained on this layout; a bare prompt is off their
    distribution, so their rollouts (and the teacher's scores of them) would not be the model's own.
    """
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]


def check_same_tokenizer(student_tok, teacher_tok, student_path, teacher_path) -> None:
    """OPD compares the two models token by token: their vocabularies must be identical."""
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s_vocab == t_vocab:
        return
    only_s = sorted(set(s_vocab) - set(t_vocab))[:5]
    only_t = sorted(set(t_vocab) - set(s_vocab))[:5]
    moved = [w for w in s_vocab if w in t_vocab and s_vocab[w] != t_vocab[w]][:5]
    raise ValueError(
        f"student ({student_path}) and teacher ({teacher_path}) use different tokenizers "
        f"({len(s_vocab)} vs {len(t_vocab)} tokens; only in student: {only_s}, only in teacher: {only_t}, "
        f"different ids: {moved}). On-policy distillation scores the student's tokens with the teacher, "
        f"so both must share one tokenizer; pick a teacher from the student's model family"
    )


# ---- evaluation --------------------------------------------------------------------------------


@torch.no_grad()
def generate_completions(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 128,
    temperature: float | None = None,
    seed: int = 0,
) -> list[str]:
    """Greedy completions, or sampled ones at `temperature` from a fixed seed (the same draws at every
    evaluation, so two evaluations differ by the model, not by the dice)."""
    texts = []
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            input_ids, attention_mask = encode_prompts(tokenizer, prompts[start : start + batch_size], device=device)
            sampling = (
                dict(do_sample=True, temperature=temperature, top_k=None, top_p=None)
                if temperature
                else dict(do_sample=False)
            )
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **sampling,
            )
            texts += tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)
    return texts


def accuracy(
    model, tokenizer, problems: list[Problem], max_new_tokens: int, task, temperature: float | None = None
) -> float:
    """Fraction of problems solved (`task.is_correct` decides): greedy, or one sample each at
    `temperature` (pass@1 as reasoning models are evaluated)."""
    was_training = model.training
    model.eval()
    texts = generate_completions(
        model, tokenizer, [p.prompt for p in problems], max_new_tokens, temperature=temperature
    )
    model.train(was_training)
    return sum(task.is_correct(t, p) for t, p in zip(texts, problems)) / len(problems)
