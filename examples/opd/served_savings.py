"""Decode steps a served engine saves with Prune-OPD between chunks, measured on recorded rollouts.

    python -m examples.opd.served_savings runs/drift_smollm2_drop6/rollouts.pt --out runs/served_savings.json

The rollouts of ``examples.opd.drift_evidence`` (the real pair's student samples with each token's
top-k overlap against the teacher, k in {1, 4, 16, 64}) are replayed through
``opd_ext.generation.generate_served_with_pruning``, unchanged: a replay student engine returns the
recorded tokens chunk by chunk, with top-k id lists that share exactly the recorded fraction of ids
with the replay teacher's (a top-k overlap is a multiple of 1/k, so this is lossless), and ends a
request where its recording ended (EOS or the cap). For each stop rule and chunk size it reports the
student decode steps the engine spends, against the same rollouts decoded without Prune-OPD, and the
teacher prefills.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import opd_ext
from opd_ext.generation import SampledChunk, generate_served_with_pruning

RULES = {
    "authors (k 16, 0.7, w_drop 0.01)": opd_ext.PruneConfig(),
    "repetition (window 48)": opd_ext.PruneConfig(
        k=16, threshold=0.7, w_drop=0.0, w_base=0.0, min_weight=None, loop_window=48
    ),
}
CHUNKS = (1, 8, 32)


class Replay:
    """A student and a teacher engine that replay one side of a rollouts.pt recording."""

    def __init__(self, tokens: torch.Tensor, mask: torch.Tensor, overlaps: torch.Tensor, k: int, prompts):
        self.k = k
        self.by_prompt = {}
        for b, prompt in enumerate(prompts):
            n = int(mask[b].sum())
            self.by_prompt[tuple(prompt)] = (tokens[b, :n].tolist(), overlaps[b, :n].tolist(), n < mask.shape[1])

    def sample_chunk(self, sequences, max_tokens, k):
        out = []
        for seq in sequences:
            start, (tokens, _, ended) = self._lookup_sequence(seq)
            new = tokens[start : start + max_tokens]
            finished = ended and start + len(new) == len(tokens)
            out.append(SampledChunk(new, [list(range(k))] * len(new), finished))
        return out

    def prompt_topk_ids(self, sequences, starts, k):
        out = []
        for seq, start in zip(sequences, starts):
            first, (_, overlaps, _) = self._lookup_sequence(seq[:start])
            rows = []
            for p in range(first, first + len(seq) - start):
                shared = round(overlaps[p] * k)
                rows.append(list(range(shared)) + list(range(k, 2 * k - shared)))
            out.append(rows)
        return out

    def _lookup_sequence(self, seq):
        """(completion tokens already in seq, the recording) for a prompt + partial completion."""
        for prompt, recording in self.by_prompt.items():
            if tuple(seq[: len(prompt)]) == prompt:
                return len(seq) - len(prompt), recording
        raise KeyError("not a recorded prompt")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rollouts", type=Path, help="rollouts.pt written by examples.opd.drift_evidence")
    p.add_argument("--side", choices=("student", "teacher"), default="student", help="whose samples to replay")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    data = torch.load(args.rollouts, weights_only=False)
    side = data[args.side]
    tokens, mask = side["tokens"], side["mask"]
    # Distinct stand-in prompts (the recording keeps completions only): the replay keys on them.
    prompts = [[-1 - b] for b in range(tokens.shape[0])]
    max_new = tokens.shape[1]
    report = {"rollouts": str(args.rollouts), "side": args.side, "settings": data["settings"], "rules": {}}
    for name, config in RULES.items():
        replay = Replay(tokens, mask, side[f"overlap_{config.k}"], config.k, prompts)
        full = generate_served_with_pruning(
            replay,
            replay,
            prompts,
            max_new_tokens=max_new,
            chunk_tokens=32,
            config=opd_ext.PruneConfig.disabled(config.k),
        )
        rows = {"unpruned": {"decode_steps": full.tokens_generated, "teacher_prefills": full.teacher_calls}}
        for chunk in CHUNKS:
            out = generate_served_with_pruning(
                replay, replay, prompts, max_new_tokens=max_new, chunk_tokens=chunk, config=config
            )
            rows[f"chunk {chunk}"] = {
                "decode_steps": out.tokens_generated,
                "tokens_kept": out.tokens_kept,
                "saved": 1 - out.tokens_generated / full.tokens_generated,
                "stopped": sum(out.pruned()),
                "teacher_prefills": out.teacher_calls,
            }
        report["rules"][name] = rows
    text = json.dumps(report, indent=1)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
