"""The reference task: multi-step arithmetic word problems with a written-out chain of thought.

A problem is a small story ("mia has 37 coins , gets 8 , loses 5 . how many ?") and the expected
completion works through it one step at a time ("37 + 8 = 45 then 45 - 5 = 40 . so 40"). The
answer is verifiable: the last number of the completion must equal the true count.

The tokenizer is word level with every number 0..max_value as a single token, plus names, objects
and verbs, so the vocabulary has a few hundred entries: enough for a top-16 overlap between student
and teacher to carry information (with a 20-token vocabulary half of it would always overlap). The
connectives between steps are drawn at random, so even a perfect model has some entropy to sample.
It is a real Hugging Face tokenizer (`PreTrainedTokenizerFast`), so the synthetic models save and
load exactly like real checkpoints.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"

NAMES = (
    "mia noah emma liam ava lucas zoe leo ella max ivy sam nora finn ruby jack lily owen rosa kai "
    "luna theo maya hugo iris ezra june milo cleo jude nina otis vera axel tess rhys fern omar "
    "gwen ravi hana yuki sara ali dana tom ada ben cora dev eli faye gus hal isla joel kate lars "
    "mina ned opal pia quin rex sol tara uma vic wren xena yara zane"
).split()
OBJECTS = (
    "coins apples books cards shells stamps marbles pens stickers cookies beads rocks keys plums "
    "eggs cups bells kites boats coats hats socks rings bricks seeds nuts pears grapes buttons "
    "leaves feathers candles ribbons tickets tokens gems bolts pins nails corks jars forks spoons "
    "plates bowls mugs lamps clips dice balls flags maps notes cans pots bags boxes tiles cubes"
).split()
GAIN_VERBS = "gets finds buys wins earns".split()
LOSS_VERBS = "loses gives spends drops sells".split()
# Connectives between two worked steps and before the conclusion: several equally valid choices.
STEP_JOINERS = (",", "then", "next", "and")
CONCLUDERS = ("so", "thus", "hence")
WORDS = ("has", "how", "many", "?", ".", ",", "+", "-", "=") + STEP_JOINERS[1:] + CONCLUDERS


@dataclass(frozen=True)
class TaskConfig:
    """Difficulty knobs. The defaults make a task that a 0.5M-parameter model learns in a minute."""

    max_value: int = 59  # every intermediate count stays in [0, max_value]
    min_steps: int = 2
    max_steps: int = 3
    max_delta: int = 9  # each step adds or removes 1..max_delta objects

    @property
    def max_prompt_tokens(self) -> int:
        return 1 + 4 + 3 * self.max_steps + 3

    @property
    def max_completion_tokens(self) -> int:
        return 6 * self.max_steps + 2 + 1

    name = "arithmetic"
    longest_answer = max_completion_tokens

    # The interface train.py and models.py use for any built-in task (examples/opd/counting.py too).
    def vocabulary(self) -> list[str]:
        return vocabulary(self)

    def make_problem(self, rng: random.Random) -> Problem:
        return make_problem(rng, self)

    def is_correct(self, completion_text: str, problem: Problem) -> bool:
        return is_correct(completion_text, problem.answer)

    def first_error(self, problem: Problem, completion_words: list[str]) -> int | None:
        return first_error(problem.prompt, completion_words)

    def looping_completion(self, rng: random.Random, problem: Problem, rate: float) -> str | None:
        raise ValueError("the arithmetic task has no looping failure mode (SupervisedSchedule.loop_rate must be 0)")


@dataclass(frozen=True)
class Problem:
    prompt: str
    completion: str  # a reference chain of thought (one of several valid phrasings)
    answer: str

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "completion": self.completion, "answer": self.answer}


def vocabulary(config: TaskConfig) -> list[str]:
    numbers = [str(n) for n in range(config.max_value + 1)]
    words = list(dict.fromkeys(WORDS))  # ordered, deduplicated
    return [PAD, BOS, EOS] + numbers + words + GAIN_VERBS + LOSS_VERBS + NAMES + OBJECTS


def build_tokenizer(config: TaskConfig):
    """A word-level `PreTrainedTokenizerFast`: whitespace split, one id per word, no unknowns.

    Like a Llama tokenizer, `tokenizer(text)` starts with BOS, as every training sequence does, so the
    saved models see their training layout from a plain call too (the example's own encoders pass
    `add_special_tokens=False` and add BOS themselves).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(config.vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, padding_side="left"
    )
    return tokenizer


def make_problem(rng: random.Random, config: TaskConfig) -> Problem:
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    count = rng.randint(0, config.max_value)
    story, work = [f"{name} has {count} {obj}"], []
    for step in range(rng.randint(config.min_steps, config.max_steps)):
        can_gain = count + 1 <= config.max_value
        can_lose = count >= 1
        gain = can_gain and (not can_lose or rng.random() < 0.5)
        room = (config.max_value - count) if gain else count
        delta = rng.randint(1, min(config.max_delta, room))
        new = count + delta if gain else count - delta
        story.append(f"{rng.choice(GAIN_VERBS if gain else LOSS_VERBS)} {delta}")
        joiner = "" if step == 0 else rng.choice(STEP_JOINERS) + " "
        work.append(f"{joiner}{count} {'+' if gain else '-'} {delta} = {new}")
        count = new
    prompt = " , ".join(story) + " . how many ?"
    completion = " ".join(work) + f" . {rng.choice(CONCLUDERS)} {count}"
    return Problem(prompt=prompt, completion=completion, answer=str(count))


def inject_mistakes(
    rng: random.Random, completion: str, config: TaskConfig, max_mistakes: int = 2
) -> tuple[str, list[int]]:
    """The completion with 1..max_mistakes of its numbers replaced by wrong ones; returns (text, word indices).

    The rest of the chain stays the correct one: trained on such chains (with no loss on the wrong
    words themselves), a teacher is taught to recover from a mistake in the text it is reading, as a
    large teacher does with a student's wrong step, instead of copying the error forward.
    Most replacements are near misses (off by a few), like a small model's arithmetic slips.
    """
    words = completion.split()
    numbers = [i for i, w in enumerate(words) if w.isdigit()]
    picked = sorted(rng.sample(numbers, min(len(numbers), rng.randint(1, max_mistakes))))
    for i in picked:
        true = int(words[i])
        while True:
            wrong = (
                true + rng.choice((-1, 1)) * rng.randint(1, 5)
                if rng.random() < 0.7
                else rng.randint(0, config.max_value)
            )
            if wrong != true and 0 <= wrong <= config.max_value:
                break
        words[i] = str(wrong)
    return " ".join(words), picked


def make_problems(n: int, seed: int, config) -> list[Problem]:
    """n problems of a task (TaskConfig or counting.CountingTask) from a seeded stream."""
    rng = random.Random(seed)
    return [config.make_problem(rng) for _ in range(n)]


def first_error(prompt: str, completion_words: list[str]) -> int | None:
    """Index of the first word where a completion leaves every correct solution of `prompt`, or None.

    Walks the completion grammar (steps "x op d = y" separated by any joiner, then ". <concluder>
    <count>"), so the random phrasing choices never count as errors. Used to
    measure drift: how the student/teacher overlap behaves before and after the first mistake.
    """
    story = prompt.split()
    count = int(story[2])
    expected: list[set[str]] = []
    events = story[4 : story.index(".")]  # ", gets 8 , loses 5"
    for verb, delta in zip(events[1::3], events[2::3]):
        gain = verb in GAIN_VERBS
        new = count + int(delta) if gain else count - int(delta)
        if expected:
            expected.append(set(STEP_JOINERS))
        expected += [{str(count)}, {"+" if gain else "-"}, {delta}, {"="}, {str(new)}]
        count = new
    expected += [{"."}, set(CONCLUDERS), {str(count)}]
    for i, allowed in enumerate(expected):
        if i >= len(completion_words) or completion_words[i] not in allowed:
            return i
    return None if len(completion_words) == len(expected) else len(expected)


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def extract_answer(completion_text: str) -> str | None:
    """The last number in the text: our completions end with the count, GSM8K-style data too."""
    numbers = _NUMBER.findall(completion_text.replace(",", " "))
    return numbers[-1] if numbers else None


def is_correct(completion_text: str, answer: str) -> bool:
    found = extract_answer(completion_text)
    return found is not None and found == answer.strip()


# ---- JSONL data (the --data path for real checkpoints, and the default run's held-out set) ------


def save_jsonl(path: Path, problems: list[Problem]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for p in problems:
            f.write(json.dumps(p.to_json()) + "\n")


def load_jsonl(path: str | Path) -> list[Problem]:
    """One JSON object per line with "prompt" and "answer" (a "completion" is optional)."""
    problems = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = {"prompt", "answer"} - row.keys()
            if missing:
                raise ValueError(f"{path}:{line_no}: each line needs 'prompt' and 'answer'; missing {sorted(missing)}")
            problems.append(Problem(row["prompt"], row.get("completion", ""), str(row["answer"]).strip()))
    if not problems:
        raise ValueError(f"{path} holds no problems")
    return problems
