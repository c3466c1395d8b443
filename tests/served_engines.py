"""Stand-ins for vLLM's offline ``LLM`` and SGLang's ``Engine`` over a small bigram model, with the
request and response objects the real ones use (field names and meaning as in vLLM 0.8-0.11's
``SamplingParams`` / ``RequestOutput`` / ``CompletionOutput`` / ``Logprob`` and SGLang's
``Engine.generate`` meta_info), so opd_ext.generation.served's adapters run unchanged against them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

EOS = 0


class BigramLM:
    """next-token logits = table[last token]: float64 [V, V]."""

    def __init__(self, table: torch.Tensor):
        self.table = table.double()

    def logits(self, tokens):
        return self.table[tokens[-1]]

    def logits_at(self, tokens):
        """[len - 1, V]: the logits that predict tokens 1.. of the sequence."""
        return self.table[torch.as_tensor(tokens[:-1], dtype=torch.long)]


def bigram_pair(vocab=60, drift_from=40, seed=0):
    """A teacher and a student that agree on the top-k after tokens below ``drift_from`` and whose
    top-k are unrelated after a token at or above it."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(vocab, vocab, generator=g) * 2.0
    student = teacher + 0.05 * torch.randn(vocab, vocab, generator=g)
    student[drift_from:] = torch.randn(vocab - drift_from, vocab, generator=g) * 2.0
    student[:, drift_from:] -= 0.5
    # Some requests end at EOS, others drift first (seed 3 of the tests: four of each).
    teacher[:, EOS] += 1.0
    student[:, EOS] += 1.0
    return BigramLM(teacher), BigramLM(student)


# ---- vLLM ------------------------------------------------------------------------------------------


@dataclass
class Logprob:
    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    max_tokens: Optional[int] = 16
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list
    cumulative_logprob: Optional[float]
    logprobs: Optional[list]
    finish_reason: Optional[str] = None
    stop_reason: Optional[int] = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list
    prompt_logprobs: Optional[list]
    outputs: list
    finished: bool = True


def _logprob_dict(logprobs: torch.Tensor, k: int, token: Optional[int]) -> dict:
    """vLLM's per-position dict: the k best ids with ranks 1..k, plus ``token`` with its rank when
    it is not among them."""
    order = torch.argsort(logprobs, descending=True)
    out = {int(i): Logprob(float(logprobs[i]), r + 1) for r, i in enumerate(order[:k])}
    if token is not None and token not in out:
        rank = int((logprobs > logprobs[token]).sum()) + 1
        out[token] = Logprob(float(logprobs[token]), rank)
    return out


@dataclass
class FakeLLM:
    model: BigramLM
    calls: list = field(default_factory=list)

    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        results = []
        for r, (prompt, p) in enumerate(zip(prompts, params)):
            tokens = list(prompt["prompt_token_ids"])
            self.calls.append((len(tokens), p.max_tokens, p.prompt_logprobs))
            prompt_logprobs = None
            if p.prompt_logprobs is not None:
                scored = torch.log_softmax(self.model.logits_at(tokens), -1)
                prompt_logprobs = [None] + [
                    _logprob_dict(scored[j], p.prompt_logprobs, tokens[j + 1]) for j in range(len(tokens) - 1)
                ]
            g = torch.Generator().manual_seed(p.seed if p.seed is not None else 1234 + r)
            out, logprobs, reason = [], [], "length"
            for _ in range(p.max_tokens):
                logits = self.model.logits(tokens + out)
                probs = torch.softmax(logits / p.temperature, -1)
                token = int(torch.multinomial(probs, 1, generator=g))
                if p.logprobs is not None:
                    logprobs.append(_logprob_dict(torch.log_softmax(logits, -1), p.logprobs, token))
                out.append(token)
                if token == EOS:
                    reason = "stop"
                    break
            completion = CompletionOutput(0, "", out, None, logprobs if p.logprobs is not None else None, reason)
            results.append(RequestOutput(str(r), None, tokens, prompt_logprobs, [completion]))
        return results


# ---- SGLang ----------------------------------------------------------------------------------------


@dataclass
class FakeSGLang:
    model: BigramLM
    seed: int = 0
    calls: list = field(default_factory=list)

    def generate(
        self,
        input_ids=None,
        sampling_params=None,
        return_logprob=False,
        top_logprobs_num=0,
        logprob_start_len=None,
    ):
        responses = []
        starts = logprob_start_len if isinstance(logprob_start_len, list) else [logprob_start_len] * len(input_ids)
        for tokens, start_len in zip(input_ids, starts):
            tokens = list(tokens)
            self.calls.append((len(tokens), sampling_params.get("max_new_tokens"), start_len))
            meta = {}
            if return_logprob:
                start = 0 if start_len is None or start_len < 0 else start_len
                scored = torch.log_softmax(self.model.logits_at(tokens), -1)
                top = []
                for position in range(start, len(tokens)):
                    if position == start:
                        top.append(None)  # entry 0 is never scored
                        continue
                    lp = scored[position - 1]
                    order = torch.argsort(lp, descending=True)[:top_logprobs_num]
                    top.append([(float(lp[i]), int(i), None) for i in order])
                meta["input_top_logprobs"] = top
            g = torch.Generator().manual_seed(hash((self.seed, tuple(tokens))) & 0x7FFFFFFF)
            out, out_top, reason = [], [], {"type": "length", "length": sampling_params.get("max_new_tokens")}
            for _ in range(sampling_params.get("max_new_tokens", 0)):
                logits = self.model.logits(tokens + out)
                probs = torch.softmax(logits / sampling_params.get("temperature", 1.0), -1)
                token = int(torch.multinomial(probs, 1, generator=g))
                lp = torch.log_softmax(logits, -1)
                order = torch.argsort(lp, descending=True)[:top_logprobs_num]
                out_top.append([(float(lp[i]), int(i), None) for i in order])
                out.append(token)
                # SGLang's scheduler checks the length cap before EOS: an EOS on the last allowed
                # step is reported as "length".
                if len(out) == sampling_params.get("max_new_tokens"):
                    break
                if token == EOS:
                    reason = {"type": "stop", "matched": EOS}
                    break
            meta["output_top_logprobs"] = out_top
            meta["finish_reason"] = reason
            responses.append({"output_ids": out, "meta_info": meta})
        return responses
