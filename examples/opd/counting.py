"""The drift task: long counting rollouts, and a student that falls into repetition loops.

A problem asks the model to count, one number per token, from `a` up to a multiple of 100:
prompt `count from 137 to 200 .`, completion `137 138 139 ... 199 200` then EOS (31..101 tokens).
Every number 0..999 is one token, so the vocabulary has about a thousand entries and a top-k set
is a small part of it, as in an LLM.

The teacher is trained on clean counts. The student is warm-started on counts in which, at a
decade carry (`139 -> 140`), the text sometimes fails to carry and goes back to the start of the
decade (`139 130 131 ... 139 130 ...`), repeating that stretch until the length cap. This is the
failure mode of small reasoning models that the Prune-OPD paper targets: a wrong step, then a
loop that copies itself (the student's own earlier repetition makes the next one more likely)
and runs on, unsupervisable, to `max_new_tokens`. The teacher never writes it. Correct
completions are at most 102 tokens; the cap (`max_new_tokens`, default 256) is 2.5x that, as a
reasoning model's cap sits above its typical answer length, so a batch with one looping row
decodes to the cap unless that row is stopped.

The check is exact: a completion is correct when it is the whole count and nothing else.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from examples.opd.task import BOS, EOS, PAD, Problem

WORDS = ("count", "from", "to", ".")


@dataclass(frozen=True)
class CountingTask:
    """Problem sizes and the length cap. `min_span`..`max_span` numbers are counted past `a`."""

    min_span: int = 30
    max_span: int = 100
    max_new_tokens: int = 256  # the rollout length cap, where loops end
    largest: int = 999

    name = "counting"

    @property
    def max_prompt_tokens(self) -> int:
        return 1 + 6

    @property
    def max_completion_tokens(self) -> int:
        return self.max_new_tokens

    @property
    def longest_answer(self) -> int:
        return self.max_span + 2  # the numbers and EOS

    def vocabulary(self) -> list[str]:
        return [PAD, BOS, EOS] + [str(n) for n in range(self.largest + 1)] + list(WORDS)

    def make_problem(self, rng: random.Random) -> Problem:
        end = 100 * rng.randint(self.max_span // 100 + 1, self.largest // 100)
        start = end - rng.randint(self.min_span, self.max_span)
        return Problem(
            prompt=f"count from {start} to {end} .",
            completion=" ".join(str(n) for n in range(start, end + 1)),
            answer=str(end),
        )

    def looping_completion(self, rng: random.Random, problem: Problem, rate: float) -> str | None:
        """The completion with, at each decade carry, probability `rate` of a loop to the length cap.

        Returns the looping text (which must not be followed by EOS: it ends at the cap), or None
        when the draw left the completion clean.
        """
        words = problem.completion.split()
        for i, word in enumerate(words[:-1]):
            number = int(word)
            if number % 10 == 9 and rng.random() < rate:
                cycle = [str(n) for n in range(number - 9, number + 1)]
                out = words[: i + 1]
                while len(out) < self.max_new_tokens:
                    out += cycle
                return " ".join(out[: self.max_new_tokens])
        return None

    @staticmethod
    def expected(problem: Problem) -> list[str]:
        _, _, start, _, end, _ = problem.prompt.split()
        return [str(n) for n in range(int(start), int(end) + 1)]

    def is_correct(self, completion_text: str, problem: Problem) -> bool:
        return completion_text.split() == self.expected(problem)

    def first_error(self, problem: Problem, completion_words: list[str]) -> int | None:
        """Index of the first word that leaves the count (a missing EOS counts at the end), or None."""
        expected = self.expected(problem)
        for i, word in enumerate(completion_words):
            if i >= len(expected) or word != expected[i]:
                return i
        return None if len(completion_words) == len(expected) else len(completion_words)
