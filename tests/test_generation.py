"""Prune-OPD generation helpers (opd_ext.generation) on tiny Hugging Face causal LMs.

The teacher is the student with slightly perturbed weights, so their top-k sets mostly agree but
drift apart along some rollouts: rows stop at different lengths. The agreement tests use float64
models (logits rounded to float32 before the kernels), so that a cached incremental forward and a
full-sequence forward give the kernels bit-identical inputs and every mode must take identical
decisions; the invariant tests also run float32 / bfloat16 models.
"""

import copy
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

from opd_ext import PruneConfig, StopReason, reference  # noqa: E402
from opd_ext.generation import (  # noqa: E402
    PruneOPDHook,
    completion_mask,
    generate_hf_with_pruning,
    generate_with_pruning,
    sample_tokens,
    score_rollouts,
)

from conftest import CUDA_READY  # noqa: E402

VOCAB = 300
PAD = 0
PROMPT_LEN = 5
BATCH = 6
MAX_NEW = 24
# k = 8 of 300 ids; a row stops after its 4th drift event (weight 1 -> 0.75 -> ... -> 0).
CONFIG = PruneConfig(k=8, w_drop=0.25)


def _perturbed(model, seed, perturb):
    """``model`` with seeded noise of scale ``perturb`` added to every parameter (0: unchanged), so
    a student and its teacher differ by a controlled amount."""
    if perturb:
        generator = torch.Generator().manual_seed(seed + 1000)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * perturb)
    return model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matmuls: a second thread only adds synchronisation (and this machine is shared).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ARCHITECTURES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}


def tiny_lm(
    seed: int, *, vocab: int = VOCAB, dtype=torch.float64, perturb: float = 0.0, device="cpu", arch: str = "llama"
):
    config_class, model_class = (getattr(transformers, name) for name in ARCHITECTURES[arch])
    torch.manual_seed(seed)
    config = config_class(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.1,
        bos_token_id=2,
        eos_token_id=None,
        pad_token_id=PAD,
    )
    return _perturbed(model_class(config).eval(), seed, perturb).to(device=device, dtype=dtype)


def model_pair(dtype=torch.float64, device="cpu", teacher_vocab: int = VOCAB, teacher_dtype=None, arch="llama"):
    """The student, and a teacher of perturbed student weights (another init if its vocab differs)."""
    student = tiny_lm(0, dtype=dtype, device=device, arch=arch)
    teacher = tiny_lm(0, vocab=teacher_vocab, dtype=teacher_dtype or dtype, perturb=0.01, device=device, arch=arch)
    return student, teacher


@pytest.fixture(scope="module")
def models():
    return model_pair()


def prompts(device="cpu"):
    ids = torch.randint(3, VOCAB, (BATCH, PROMPT_LEN), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    mask[4, :4] = 0
    ids = ids.masked_fill(mask == 0, PAD)
    return ids.to(device), mask.to(device)


def seeded(seed=0, device="cpu"):
    return torch.Generator(device=device).manual_seed(seed)


def check_record(rollout, prompt_ids, max_new_tokens):
    """Invariants every Rollout satisfies."""
    batch, steps = rollout.completion_mask.shape
    assert rollout.sequences.shape == (batch, PROMPT_LEN + steps)
    assert torch.equal(rollout.sequences[:, :PROMPT_LEN], prompt_ids)
    assert steps == int(rollout.lengths.max()) <= max_new_tokens
    assert torch.equal(rollout.completion_mask, completion_mask(rollout.lengths, steps))
    outside = ~rollout.completion_mask
    assert bool((rollout.completions[outside] == PAD).all())
    for per_token in (rollout.multipliers, rollout.weights, rollout.overlaps, rollout.teacher_logprobs):
        assert per_token.shape == (batch, steps)
        assert bool((per_token[outside] == 0).all())
    weights = rollout.weights.masked_fill(outside, float("-inf"))
    assert bool((weights[:, 1:] <= weights[:, :-1]).all()), "weights must never increase along a row"
    pruned = torch.isin(rollout.stop_reason.long(), torch.tensor([StopReason.WEIGHT_EXHAUSTED]))
    last = rollout.weights.gather(1, (rollout.lengths - 1).clamp(min=0)[:, None]).squeeze(1)
    assert bool((last[pruned] == 0).all()), "a row stopped on its weight ends with weight 0"
    running = rollout.stop_reason == StopReason.RUNNING
    assert bool((rollout.lengths[running] == max_new_tokens).all())


# ---- our decode loop ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype, teacher_dtype",
    [
        (torch.float64, torch.float64),
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),  # the common mix: kernels take it as is
        (torch.float16, torch.bfloat16),  # no kernel for the pair: both widened to float32
    ],
)
def test_rows_stop_individually_and_leave_the_batch(device, dtype, teacher_dtype):
    student, teacher = model_pair(dtype, device, teacher_dtype=teacher_dtype)
    ids, mask = prompts(device)
    rollout = generate_with_pruning(
        student,
        teacher,
        ids,
        mask,
        max_new_tokens=MAX_NEW,
        config=CONFIG,
        pad_token_id=PAD,
        generator=seeded(0, device),
    )
    check_record(rollout, ids, MAX_NEW)
    lengths = rollout.lengths.cpu()
    assert len(set(lengths.tolist())) >= 3, f"rows should stop at different lengths, got {lengths.tolist()}"
    assert bool((rollout.stop_reason != StopReason.RUNNING).any())
    # Stopped rows left both models' batch: the student decoded exactly the kept tokens, and the
    # teacher saw the prompts plus every kept token but each row's last (whose logits nobody needs).
    assert rollout.tokens_generated == int(lengths.sum())
    assert rollout.teacher_forwards == int(lengths.max())
    assert rollout.teacher_tokens == BATCH * PROMPT_LEN + int((lengths - 1).sum())
    pruned = rollout.stop_reason != StopReason.RUNNING
    assert rollout.tokens_saved == int((MAX_NEW - lengths)[pruned.cpu()].sum())
    assert rollout.multipliers[rollout.completion_mask].min() >= CONFIG.w_base


def test_disabled_config_is_plain_opd(models):
    student, teacher = models
    ids, mask = prompts()
    rollout = generate_with_pruning(
        student,
        teacher,
        ids,
        mask,
        max_new_tokens=MAX_NEW,
        config=PruneConfig.disabled(k=8),
        pad_token_id=PAD,
        generator=seeded(),
    )
    check_record(rollout, ids, MAX_NEW)
    assert bool((rollout.lengths == MAX_NEW).all())
    assert bool((rollout.multipliers == 1).all())
    assert rollout.tokens_saved == 0
    assert rollout.teacher_forwards == MAX_NEW


def test_cached_statistics_match_reference(models):
    """Teacher log-probs / reverse KL of the sampled tokens, vs a float64 full-sequence recompute."""
    student, teacher = models
    ids, mask = prompts()
    temperature = 0.8
    rollout = generate_with_pruning(
        student,
        teacher,
        ids,
        mask,
        max_new_tokens=MAX_NEW,
        config=CONFIG,
        temperature=temperature,
        pad_token_id=PAD,
        generator=seeded(),
    )
    full_mask = torch.cat([mask, rollout.completion_mask.long()], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        s = student(rollout.sequences, attention_mask=full_mask, position_ids=positions).logits
        t = teacher(rollout.sequences, attention_mask=full_mask, position_ids=positions).logits
    at = slice(PROMPT_LEN - 1, -1)
    log_p = torch.log_softmax(s[:, at].float().double() / temperature, -1)
    log_q = torch.log_softmax(t[:, at].float().double() / temperature, -1)
    tokens = rollout.completions.unsqueeze(-1)
    valid = rollout.completion_mask
    expect_teacher = log_q.gather(-1, tokens).squeeze(-1)[valid]
    expect_student = log_p.gather(-1, tokens).squeeze(-1)[valid]
    expect_kl = (log_p.exp() * (log_p - log_q)).sum(-1)[valid]
    torch.testing.assert_close(rollout.teacher_logprobs[valid].double(), expect_teacher, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rollout.student_logprobs[valid].double(), expect_student, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rollout.reverse_kl[valid].double(), expect_kl, rtol=1e-5, atol=1e-6)
    expect_overlap = reference.topk_overlap(s[:, at].float(), t[:, at].float(), CONFIG.k)[valid]
    assert torch.equal(rollout.overlaps[valid], expect_overlap)


def test_length_budget_stops_rows(models):
    """A DynamicWindow budget caps every row; those stops count as pruning savings."""
    student, teacher = models
    ids, mask = prompts()
    budget = torch.tensor([3, 5, 8, 100, 100, 2])
    rollout = generate_with_pruning(
        student,
        teacher,
        ids,
        mask,
        max_new_tokens=MAX_NEW,
        config=CONFIG,
        budget=budget,
        pad_token_id=PAD,
        generator=seeded(),
    )
    check_record(rollout, ids, MAX_NEW)
    assert bool((rollout.lengths <= budget).all())
    at_budget = rollout.stop_reason == StopReason.BUDGET
    assert bool(at_budget.any())
    assert torch.equal(rollout.lengths[at_budget], budget[at_budget])
    assert torch.equal(rollout.stop_steps[at_budget], budget[at_budget] - 1)
    assert rollout.tokens_saved == int((MAX_NEW - rollout.lengths)[rollout.stop_reason != StopReason.RUNNING].sum())


def test_deterministic_with_a_seed(models):
    student, teacher = models
    ids, mask = prompts()

    def run(seed, chunk_size):
        return generate_with_pruning(
            student,
            teacher,
            ids,
            mask,
            max_new_tokens=MAX_NEW,
            config=CONFIG,
            chunk_size=chunk_size,
            temperature=0.9,
            top_k=50,
            top_p=0.95,
            pad_token_id=PAD,
            generator=seeded(seed),
        )

    for chunk_size in (1, 4):
        first, again = run(0, chunk_size), run(0, chunk_size)
        for field in ("sequences", "multipliers", "overlaps", "teacher_logprobs", "lengths", "stop_reason"):
            assert torch.equal(getattr(first, field), getattr(again, field)), field
    assert not torch.equal(run(0, 1).sequences, run(1, 1).sequences)


def test_eos_ends_a_row(models):
    student, teacher = models
    ids, mask = prompts()
    no_eos = generate_with_pruning(
        student, teacher, ids, mask, max_new_tokens=MAX_NEW, config=CONFIG, do_sample=False, pad_token_id=PAD
    )
    row = int(no_eos.lengths.argmax())
    eos = int(no_eos.completions[row, 2])  # the token this row emits third becomes its EOS
    first_eos = (no_eos.completions == eos).long().argmax(1)
    rollout = generate_with_pruning(
        student,
        teacher,
        ids,
        mask,
        max_new_tokens=MAX_NEW,
        config=CONFIG,
        do_sample=False,
        eos_token_id=[eos, VOCAB - 1],
        pad_token_id=PAD,
    )
    check_record(rollout, ids, MAX_NEW)
    assert int(rollout.lengths[row]) == int(first_eos[row]) + 1 <= 3  # the EOS token is kept
    assert int(rollout.stop_reason[row]) == StopReason.FINISHED
    assert rollout.stop_reason_names()[row] == "eos"
    assert int(rollout.completions[row, rollout.lengths[row] - 1]) == eos
    pruned = (rollout.stop_reason != StopReason.RUNNING) & (rollout.stop_reason != StopReason.FINISHED)
    assert rollout.tokens_saved == int((MAX_NEW - rollout.lengths)[pruned].sum())  # EOS saves nothing


# ---- the modes agree on the same tokens ---------------------------------------------------------
@pytest.mark.parametrize("with_eos", [False, True])
def test_lockstep_chunked_post_hoc_and_hf_agree(models, with_eos):
    """Greedy decoding fixes the tokens: every mode must stop the same rows at the same tokens."""
    student, teacher = models
    ids, mask = prompts()
    common = dict(max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=PAD)
    if with_eos:  # a token some rollouts emit early becomes EOS: those rows end there
        probe = generate_with_pruning(student, teacher, ids, mask, config=CONFIG, **common)
        common["eos_token_id"] = int(probe.completions[int(probe.lengths.argmax()), 2])
    full = generate_with_pruning(student, teacher, ids, mask, config=PruneConfig.disabled(k=8), **common)
    lockstep = generate_with_pruning(student, teacher, ids, mask, config=CONFIG, **common)
    assert bool((lockstep.lengths < MAX_NEW).any()), "the setting must prune something"
    finished = lockstep.stop_reason == StopReason.FINISHED
    assert bool(finished.any()) == with_eos
    assert bool(((lockstep.stop_reason != StopReason.RUNNING) & ~finished).any()), "and stop some by drift"
    others = {
        f"chunked C={c}": generate_with_pruning(student, teacher, ids, mask, config=CONFIG, chunk_size=c, **common)
        for c in (3, 8)
    }
    # Post hoc: the completions run to EOS or MAX_NEW (no completion_mask given: derived from EOS).
    others["post hoc"] = score_rollouts(
        student,
        teacher,
        full.sequences,
        PROMPT_LEN,
        attention_mask=mask,
        config=CONFIG,
        eos_token_id=common.get("eos_token_id"),
        pad_token_id=PAD,
    )
    others["hf generate"] = generate_hf_with_pruning(student, teacher, ids, mask, config=CONFIG, **common)

    kept = lockstep.completion_mask
    assert torch.equal(lockstep.completions, full.completions[:, : kept.shape[1]].masked_fill(~kept, PAD))
    for name, other in others.items():
        assert torch.equal(other.completion_mask, kept), name
        assert torch.equal(other.sequences, lockstep.sequences), name
        assert torch.equal(other.stop_reason, lockstep.stop_reason), name
        for field in ("multipliers", "weights", "overlaps"):
            assert torch.equal(getattr(other, field), getattr(lockstep, field)), (name, field)
        for field in ("teacher_logprobs", "student_logprobs", "reverse_kl"):
            torch.testing.assert_close(
                getattr(other, field), getattr(lockstep, field), rtol=1e-5, atol=1e-6, msg=f"{name}: {field}"
            )
    # Costs: the HF hook drops stopped rows from the teacher as the lockstep loop does (the
    # student's rows stay in HF's batch); chunking trades teacher calls for wasted student tokens.
    hf = others["hf generate"]
    assert (hf.teacher_forwards, hf.teacher_tokens) == (lockstep.teacher_forwards, lockstep.teacher_tokens)
    assert hf.tokens_generated == BATCH * kept.shape[1] > lockstep.tokens_generated
    assert others["chunked C=8"].teacher_forwards < others["chunked C=3"].teacher_forwards < lockstep.teacher_forwards
    assert others["chunked C=8"].tokens_generated >= lockstep.tokens_generated
    assert others["post hoc"].teacher_forwards == 1
    assert others["post hoc"].tokens_saved == int(full.completion_mask.sum() - kept.sum())


def test_repetition_stops_agree_in_every_mode(models):
    """The repetition check (PruneConfig.loop_window) stops the same rows at the same tokens in the
    lockstep loop, in chunks, post hoc and in HF generate(): greedy decoding of these small models
    falls into loops."""
    student, teacher = models
    ids, mask = prompts()
    config = PruneConfig(k=8, w_drop=0.0, min_weight=None, loop_window=6, loop_match=1.0, loop_max_period=4)
    common = dict(max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=PAD)
    full = generate_with_pruning(student, teacher, ids, mask, config=PruneConfig.disabled(k=8), **common)
    lockstep = generate_with_pruning(student, teacher, ids, mask, config=config, **common)
    repeating = lockstep.stop_reason == StopReason.REPETITION
    assert bool(repeating.any()) and not bool(repeating.all()), lockstep.stop_reason
    runs = {
        "chunked C=5": generate_with_pruning(student, teacher, ids, mask, config=config, chunk_size=5, **common),
        "post hoc": score_rollouts(student, teacher, full.sequences, PROMPT_LEN, attention_mask=mask, config=config),
        "hf generate": generate_hf_with_pruning(student, teacher, ids, mask, config=config, **common),
    }
    for name, run in runs.items():
        assert torch.equal(run.completion_mask, lockstep.completion_mask), name
        assert torch.equal(run.stop_reason, lockstep.stop_reason), name
    # With loop_match 1 a stopped row's last 6 kept tokens each equal the one p back, some p <= 4.
    for row in repeating.nonzero().squeeze(-1).tolist():
        kept = lockstep.completions[row, : int(lockstep.lengths[row])]
        assert any(torch.equal(kept[-6:], kept[-6 - p : -p]) for p in range(1, 5)), kept
    assert lockstep.tokens_saved == int((MAX_NEW - lockstep.lengths)[repeating].sum())


@pytest.mark.parametrize("arch, chunk_size", [("llama", 1), ("llama", 4), ("qwen2", 1), ("qwen2", 4)])
def test_sampled_rollouts_rescored_post_hoc(models, arch, chunk_size):
    student, teacher = models if arch == "llama" else model_pair(arch=arch)
    ids, mask = prompts()
    rollout = generate_with_pruning(
        student,
        teacher,
        ids,
        mask,
        max_new_tokens=MAX_NEW,
        config=CONFIG,
        chunk_size=chunk_size,
        temperature=0.7,
        pad_token_id=PAD,
        generator=seeded(3),
    )
    check_record(rollout, ids, MAX_NEW)
    again = score_rollouts(
        student,
        teacher,
        rollout.sequences,
        PROMPT_LEN,
        attention_mask=mask,
        completion_mask=rollout.completion_mask,
        config=CONFIG,
        temperature=0.7,
    )
    assert torch.equal(again.completion_mask, rollout.completion_mask)
    assert torch.equal(again.multipliers, rollout.multipliers)
    assert torch.equal(again.stop_reason, rollout.stop_reason)
    torch.testing.assert_close(again.teacher_logprobs, rollout.teacher_logprobs, rtol=1e-5, atol=1e-6)


def test_post_hoc_with_student_logits_and_padded_teacher_vocab():
    student, teacher = model_pair(teacher_vocab=VOCAB + 13)  # Qwen-style padded head
    ids, mask = prompts()
    rollout = generate_with_pruning(
        student, teacher, ids, mask, max_new_tokens=MAX_NEW, config=CONFIG, pad_token_id=PAD, generator=seeded()
    )
    assert int(rollout.completions.max()) < VOCAB
    full_mask = torch.cat([mask, rollout.completion_mask.long()], 1)
    with torch.no_grad():
        logits = student(
            rollout.sequences, attention_mask=full_mask, position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)
        ).logits[:, PROMPT_LEN - 1 : -1]
    again = score_rollouts(
        None,
        teacher,
        rollout.sequences,
        PROMPT_LEN,
        attention_mask=mask,
        completion_mask=rollout.completion_mask,
        student_logits=logits,
        config=CONFIG,
    )
    assert torch.equal(again.multipliers, rollout.multipliers)


# ---- Hugging Face generate() --------------------------------------------------------------------
def test_hf_hook_uses_raw_logits_under_other_processors(models):
    """Temperature, top-k and a repetition penalty (a processor HF runs before ours) change the
    scores; the hook's decisions must still be those of the raw logits (recomputed post hoc)."""
    student, teacher = models
    ids, mask = prompts()
    torch.manual_seed(11)  # HF samples from the global generator
    rollout = generate_hf_with_pruning(
        student,
        teacher,
        ids,
        mask,
        config=CONFIG,
        max_new_tokens=MAX_NEW,
        do_sample=True,
        temperature=0.7,
        top_k=20,
        repetition_penalty=1.5,
        pad_token_id=PAD,
    )
    check_record(rollout, ids, MAX_NEW)
    again = score_rollouts(
        student,
        teacher,
        rollout.sequences,
        PROMPT_LEN,
        attention_mask=mask,
        completion_mask=rollout.completion_mask,
        config=CONFIG,
        temperature=0.7,
    )
    assert torch.equal(again.overlaps, rollout.overlaps)
    assert torch.equal(again.multipliers, rollout.multipliers)
    torch.testing.assert_close(again.teacher_logprobs, rollout.teacher_logprobs, rtol=1e-5, atol=1e-6)


def test_hf_rows_stopped_without_eos_are_masked(models):
    """Without an EOS criterion HF keeps appending real tokens to stopped rows."""
    student, teacher = models
    ids, mask = prompts()
    with PruneOPDHook(student, teacher, ids, mask, config=CONFIG, eos_token_id=None, pad_token_id=PAD) as hook:
        raw = student.generate(
            ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=MAX_NEW,
            pad_token_id=PAD,
            **hook.generate_kwargs(),
        )
    rollout = hook.rollout(raw, max_new_tokens=MAX_NEW)
    check_record(rollout, ids, MAX_NEW)
    stopped_early = rollout.lengths < rollout.completion_mask.shape[1]
    assert bool(stopped_early.any())
    generated_after_stop = raw[:, PROMPT_LEN:][~rollout.completion_mask]
    assert bool((generated_after_stop != PAD).any()), "HF should have kept decoding the stopped rows"
    assert torch.equal(rollout.completion_mask, completion_mask(hook.monitor.lengths, raw.shape[1] - PROMPT_LEN))
    # The forward hook is gone: later forwards of the student are not captured.
    assert not student._forward_hooks


def test_hf_hook_misuse_is_reported(models):
    student, teacher = models
    ids, mask = prompts()
    with PruneOPDHook(student, teacher, ids, mask, config=CONFIG, pad_token_id=PAD) as hook:
        with pytest.raises(RuntimeError, match="DriftStoppingCriteria"):
            student.generate(
                ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=3,
                pad_token_id=PAD,
                logits_processor=hook.generate_kwargs()["logits_processor"],
            )
    with PruneOPDHook(student, teacher, ids, mask, config=CONFIG, pad_token_id=PAD) as hook:
        with pytest.raises(ValueError, match="one hook per"):
            student.generate(
                ids[:2],
                attention_mask=mask[:2],
                do_sample=False,
                max_new_tokens=3,
                pad_token_id=PAD,
                **hook.generate_kwargs(),
            )
    with pytest.raises(ValueError, match="num_return_sequences"):
        generate_hf_with_pruning(
            student,
            teacher,
            ids,
            mask,
            config=CONFIG,
            num_return_sequences=2,
            do_sample=True,
            max_new_tokens=3,
            pad_token_id=PAD,
        )
    # A hook used with num_beams directly, and the setting in the student's generation config: the
    # error names the option, not only the shape.
    with PruneOPDHook(student, teacher, ids, mask, config=CONFIG, pad_token_id=PAD) as hook:
        with pytest.raises(ValueError, match=r"num_beams or num_return_sequences is 2"):
            student.generate(
                ids,
                attention_mask=mask,
                num_beams=2,
                do_sample=False,
                max_new_tokens=3,
                pad_token_id=PAD,
                **hook.generate_kwargs(),
            )
    original = student.generation_config.num_return_sequences
    student.generation_config.num_return_sequences = 2
    try:
        with pytest.raises(ValueError, match=r"generation_config.num_return_sequences=2"):
            generate_hf_with_pruning(
                student, teacher, ids, mask, config=CONFIG, do_sample=True, max_new_tokens=3, pad_token_id=PAD
            )
    finally:
        student.generation_config.num_return_sequences = original


# ---- every cache the models bring, wrapped models, vocabularies ---------------------------------
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    initializer_range=0.1,
    bos_token_id=2,
    eos_token_id=None,
    pad_token_id=PAD,
)
LINEAR_ATTENTION = dict(
    head_dim=8, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4
)


class WithCache(torch.nn.Module):
    """Wraps a causal LM as ``.module`` (as DistributedDataParallel does) and gives its forward
    ``make_cache(config)`` when called without a cache, as a custom model may."""

    def __init__(self, module, make_cache):
        super().__init__()
        self.module, self.make_cache = module, make_cache
        self.cache_key = "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"

    def forward(self, **kwargs):
        if kwargs.get(self.cache_key) is None and kwargs.get("use_cache"):
            kwargs[self.cache_key] = self.make_cache(self.module.config)
        return self.module(**kwargs)


def _quantized(config):
    return transformers.cache_utils.QuantizedCache(backend="fp8", config=config)


def _static(config):
    return transformers.cache_utils.StaticCache(config=config, max_cache_len=PROMPT_LEN + MAX_NEW)


# name: (model class, config kwargs, dtype, cache factory or None for the model's own, its layer types
# in transformers >= 5, whose cache_utils also has those of the factories)
CACHE_FAMILIES = {
    "full attention": ("LlamaForCausalLM", {}, torch.float64, None, {"DynamicLayer"}),
    # Layer 1 slides over 4 tokens, fewer than a prompt: its cache drops positions as it goes.
    "sliding window": (
        "Qwen2ForCausalLM",
        dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
        torch.float64,
        None,
        {"DynamicLayer", "DynamicSlidingWindowLayer"},
    ),
    # Gated delta-net layers (conv + recurrent state) beside attention; dense MLPs keep float64 possible.
    "qwen3-next linear attention": (
        "Qwen3NextForCausalLM",
        dict(LINEAR_ATTENTION, layer_types=["linear_attention", "full_attention"], mlp_only_layers=[0, 1]),
        torch.float64,
        None,
        {"LinearAttentionLayer", "DynamicLayer"},
    ),
    "lfm2 short conv": (
        "Lfm2ForCausalLM",
        dict(layer_types=["conv", "full_attention"], block_auto_adjust_ff_dim=False),
        torch.float64,
        None,
        {"LinearAttentionLayer", "DynamicLayer"},
    ),
    # Linear and full attention state in one layer; its MoE runs in float32 only.
    "zaya hybrid": (
        "ZayaForCausalLM",
        dict(head_dim=8, moe_intermediate_size=16, num_experts=2, num_experts_per_tok=1, router_hidden_size=16),
        torch.float32,
        None,
        {"LinearAttentionAndFullAttentionLayer"},
    ),
    "fp8 quantized": ("LlamaForCausalLM", {}, torch.float64, _quantized, {"Fp8QuantizedLayer"}),
    "static": ("LlamaForCausalLM", {}, torch.float64, _static, {"StaticLayer"}),
}


def family_lm(family: str, seed: int, perturb: float = 0.0):
    model_class, extra, dtype, make_cache, layer_types = CACHE_FAMILIES[family]
    if not hasattr(transformers, model_class):
        pytest.skip(f"transformers {transformers.__version__} has no {model_class}")
    if make_cache and not all(hasattr(transformers.cache_utils, name) for name in layer_types):
        pytest.skip(f"transformers {transformers.__version__} has no {' / '.join(layer_types)}")
    model_class = getattr(transformers, model_class)
    config = model_class.config_class(**{**TINY, **extra})
    torch.manual_seed(seed)
    model = _perturbed(model_class(config).eval(), seed, perturb).to(dtype)
    return WithCache(model, make_cache) if make_cache else model


def cache_of(output):
    return output.get("cache", None) or output.get("past_key_values", None)


@pytest.mark.parametrize("family", list(CACHE_FAMILIES))
def test_every_cache_layer_type_drops_rows_exactly(family):
    student, teacher = family_lm(family, 0), family_lm(family, 0, perturb=0.01)
    ids, mask = prompts()
    with torch.no_grad():
        cache = cache_of(teacher(input_ids=ids, attention_mask=mask, use_cache=True))
    if not isinstance(cache, transformers.cache_utils.Cache):  # hybrid models' own caches before transformers 5
        with pytest.raises(TypeError, match=f"student's KV cache \\({type(cache).__name__}\\) is not a transformers"):
            generate_with_pruning(student, teacher, ids, mask, max_new_tokens=MAX_NEW, config=CONFIG, pad_token_id=PAD)
        return
    if hasattr(cache, "layers"):  # transformers >= 4.56
        assert {type(layer).__name__ for layer in cache.layers} == CACHE_FAMILIES[family][-1]
    assert_pruned_rows_match_unpruned(student, teacher, ids, mask)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_READY, reason="offloading needs a CUDA device (and opd_ext's CUDA kernels)")
def test_offloaded_cache_drops_rows_exactly():
    def offloaded(config):
        return transformers.DynamicCache(config=config, offloading=True)

    student, teacher = (
        WithCache(tiny_lm(0, perturb=p, device="cuda", dtype=torch.float32), offloaded) for p in (0.0, 0.01)
    )
    ids, mask = prompts("cuda")
    assert_pruned_rows_match_unpruned(student, teacher, ids, mask)


def assert_pruned_rows_match_unpruned(student, teacher, ids, mask):
    """Rows leave both models' caches while others go on; the surviving rows must get exactly the
    tokens (and teacher scores) they get in an unpruned run (greedy decoding fixes the tokens)."""
    common = dict(max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=PAD)
    full = generate_with_pruning(student, teacher, ids, mask, config=PruneConfig.disabled(k=8), **common)
    runs = {
        f"chunk_size={c}": generate_with_pruning(student, teacher, ids, mask, config=CONFIG, chunk_size=c, **common)
        for c in (1, 3)
    }
    if hasattr(student, "generate"):  # the hook's teacher drops rows; HF keeps the student's batch
        runs["hf generate"] = generate_hf_with_pruning(student, teacher, ids, mask, config=CONFIG, **common)
    for name, rollout in runs.items():
        assert int(rollout.lengths.min()) < int(rollout.lengths.max()), f"{name}: rows must stop while others go on"
        kept = rollout.completion_mask
        unpruned = full.completions[:, : kept.shape[1]]
        assert torch.equal(rollout.completions[kept], unpruned[kept]), name
        torch.testing.assert_close(
            rollout.teacher_logprobs[kept],
            full.teacher_logprobs[:, : kept.shape[1]][kept],
            rtol=1e-5,
            atol=1e-6,
            msg=lambda m: f"{name}: {m}",
        )


def requantizing_layer_class():
    """Stands in for the quanto / HQQ layers (optional libraries): identity "quantization"."""
    base = getattr(transformers.cache_utils, "QuantizedLayer", None)
    if base is None:
        pytest.skip(f"transformers {transformers.__version__} has no QuantizedLayer")

    class RequantizingLayer(base):
        def _quantize(self, tensor, axis):
            return tensor.clone()

        def _dequantize(self, tensor):
            return tensor

    return RequantizingLayer


def test_caches_that_cannot_drop_rows_are_refused_before_decoding(models):
    student, _ = models
    layer_class = requantizing_layer_class()
    teacher = WithCache(
        tiny_lm(0, perturb=0.01),
        lambda config: transformers.cache_utils.Cache(layers=[layer_class() for _ in range(2)]),
    )
    ids, mask = prompts()
    student_forwards = []
    handle = student.register_forward_hook(lambda *_: student_forwards.append(1))
    try:
        with pytest.raises(TypeError, match="teacher's KV cache layer 0 is a RequantizingLayer, which re-quantizes"):
            generate_with_pruning(student, teacher, ids, mask, max_new_tokens=MAX_NEW, config=CONFIG, pad_token_id=PAD)
    finally:
        handle.remove()
    assert len(student_forwards) == 1, "refused after the prefill, before any token is decoded"
    with pytest.raises(TypeError, match="re-quantizes"):  # before generate() is called
        PruneOPDHook(student, teacher, ids, mask, config=CONFIG, pad_token_id=PAD)

    torch.manual_seed(0)
    seq2seq = transformers.T5ForConditionalGeneration(
        transformers.T5Config(
            vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=PAD
        )
    ).eval()
    for call in (
        lambda: generate_with_pruning(student, seq2seq, ids, mask, max_new_tokens=2, pad_token_id=PAD),
        lambda: PruneOPDHook(seq2seq, student, ids, mask, pad_token_id=PAD),
        lambda: score_rollouts(student, seq2seq, torch.cat([ids, ids], 1), PROMPT_LEN),
    ):
        with pytest.raises(ValueError, match="encoder-decoder model .*T5ForConditionalGeneration.* decoder-only"):
            call()


@pytest.fixture(scope="module")
def process_group():
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def wrapped_pair(wrapper: str, request):
    """(wrapped student, wrapped teacher, plain student, plain teacher) computing the same functions."""
    student, teacher = model_pair()
    if wrapper == "ddp":
        request.getfixturevalue("process_group")
        ddp = torch.nn.parallel.DistributedDataParallel
        return ddp(student), ddp(teacher), student, teacher
    peft = pytest.importorskip("peft")
    # init_lora_weights=False: random adapters that change the function, merged into plain copies.
    wrapped = [
        peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        for model in (student, teacher)
    ]
    plain = [copy.deepcopy(model).merge_and_unload() for model in wrapped]
    return (*wrapped, *plain)


@pytest.mark.parametrize("wrapper", ["peft", "ddp"])
def test_wrapped_models_in_every_mode(wrapper, request):
    student, teacher, plain_student, plain_teacher = wrapped_pair(wrapper, request)
    ids, mask = prompts()
    common = dict(max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=PAD)

    def every_mode(s, t):
        runs = {
            f"chunk_size={c}": generate_with_pruning(s, t, ids, mask, config=CONFIG, chunk_size=c, **common)
            for c in (1, 3)
        }
        runs["hf generate"] = generate_hf_with_pruning(s, t, ids, mask, config=CONFIG, **common)
        # What users call: the PEFT model's own generate(), DDP's module's.
        with PruneOPDHook(s, t, ids, mask, config=CONFIG, eos_token_id=None, pad_token_id=PAD) as hook:
            out = getattr(s, "module", s).generate(ids, attention_mask=mask, **common, **hook.generate_kwargs())
        runs["hook"] = hook.rollout(out, max_new_tokens=MAX_NEW)
        runs["post hoc"] = score_rollouts(
            s,
            t,
            runs["chunk_size=1"].sequences,
            PROMPT_LEN,
            attention_mask=mask,
            completion_mask=runs["chunk_size=1"].completion_mask,
            config=CONFIG,
        )
        return runs

    want, got = every_mode(plain_student, plain_teacher), every_mode(student, teacher)
    assert bool((want["chunk_size=1"].stop_reason != StopReason.RUNNING).any()), "the setting must prune something"
    for name in want:
        assert torch.equal(got[name].sequences, want[name].sequences), name
        assert torch.equal(got[name].multipliers, want[name].multipliers), name
        torch.testing.assert_close(got[name].teacher_logprobs, want[name].teacher_logprobs, rtol=1e-5, atol=1e-6)
    assert not any(module._forward_hooks for module in student.modules()), "the hooks removed their taps"


def test_student_vocabulary_beyond_the_teachers_is_masked_in_every_mode():
    """Ids only the student has are never sampled (the teacher cannot score them): the same
    tokens and decisions in every mode, and a clear error post hoc."""
    student, teacher = tiny_lm(0, vocab=VOCAB + 40), tiny_lm(0, perturb=0.01)
    with torch.no_grad():
        student.lm_head.weight[VOCAB:] *= 4  # the student's favourite ids are ones the teacher lacks
    ids, mask = prompts()
    common = dict(max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=PAD)
    lockstep = generate_with_pruning(student, teacher, ids, mask, config=CONFIG, **common)
    kept = lockstep.completion_mask
    full_mask = torch.cat([mask, kept.long()], 1)
    with torch.no_grad():
        logits = student(
            lockstep.sequences, attention_mask=full_mask, position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)
        ).logits[:, PROMPT_LEN - 1 : -1]
    assert bool((logits.argmax(-1)[kept] >= VOCAB).any()), "unmasked, the student would pick ids beyond the teacher's"
    assert int(lockstep.completions.max()) < VOCAB
    others = {
        "chunked": generate_with_pruning(student, teacher, ids, mask, config=CONFIG, chunk_size=4, **common),
        "hf generate": generate_hf_with_pruning(student, teacher, ids, mask, config=CONFIG, **common),
        "post hoc": score_rollouts(
            student, teacher, lockstep.sequences, PROMPT_LEN, attention_mask=mask, completion_mask=kept, config=CONFIG
        ),
    }
    for name, other in others.items():
        assert torch.equal(other.sequences, lockstep.sequences), name
        assert torch.equal(other.multipliers, lockstep.multipliers), name
    torch.manual_seed(0)
    sampled = generate_hf_with_pruning(
        student, teacher, ids, mask, config=CONFIG, max_new_tokens=MAX_NEW, do_sample=True, pad_token_id=PAD
    )
    assert int(sampled.completions.max()) < VOCAB

    beyond = lockstep.sequences.clone()
    beyond[0, PROMPT_LEN] = VOCAB + 5
    with pytest.raises(ValueError, match=f"token id {VOCAB + 5}, beyond the teacher's vocabulary of {VOCAB} ids"):
        score_rollouts(student, teacher, beyond, PROMPT_LEN, attention_mask=mask, completion_mask=kept, config=CONFIG)
    with pytest.raises(ValueError, match=f"completion token {VOCAB + 5} .*row 0, step 0.* share \\({VOCAB} ids\\)"):
        score_rollouts(
            None,
            student,
            beyond,
            PROMPT_LEN,
            attention_mask=mask,
            completion_mask=kept,
            config=CONFIG,
            student_logits=torch.zeros(*kept.shape, VOCAB),
        )


# ---- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(top_k=0), ValueError, "top_k"),
        (dict(top_p=1.5), ValueError, "top_p"),
        (dict(config={"k": 8}), TypeError, "PruneConfig"),
        (dict(pad_token_id=None), ValueError, "pad_token_id"),
        (dict(eos_token_id=-1), ValueError, "eos_token_id"),
        (dict(budget=0), ValueError, "budget"),
    ],
)
def test_bad_arguments_are_rejected(models, kwargs, error, match):
    student, teacher = models
    ids, mask = prompts()
    call = {**dict(max_new_tokens=4, config=CONFIG, pad_token_id=PAD), **kwargs}
    with pytest.raises(error, match=match):
        generate_with_pruning(student, teacher, ids, mask, **call)


@pytest.mark.parametrize("field, value", [("threshold", 1.5), ("k", 0), ("w_drop", -0.1), ("patience", 0)])
def test_bad_configs_are_rejected(field, value):
    with pytest.raises((ValueError, TypeError), match=field):
        PruneConfig(**{field: value})


def test_bad_prompts_are_rejected(models):
    student, teacher = models
    ids, mask = prompts()
    right_padded = mask.flip(1)
    with pytest.raises(ValueError, match="left-padded"):
        generate_with_pruning(student, teacher, ids, right_padded, max_new_tokens=2, pad_token_id=PAD)
    with pytest.raises(ValueError, match="int64"):
        generate_with_pruning(student, teacher, ids.int(), mask, max_new_tokens=2, pad_token_id=PAD)
    with pytest.raises(ValueError, match="shape"):
        generate_with_pruning(student, teacher, ids, mask[:, 1:], max_new_tokens=2, pad_token_id=PAD)
    with pytest.raises(ValueError, match="k=301"):  # PruneConfig.k beyond the vocabulary
        generate_with_pruning(
            student, teacher, ids, mask, max_new_tokens=2, pad_token_id=PAD, config=PruneConfig(k=VOCAB + 1)
        )
    full = torch.cat([ids, ids], 1)
    with pytest.raises(ValueError, match="prefix"):
        score_rollouts(student, teacher, full, PROMPT_LEN, completion_mask=torch.tensor([[0, 1, 1, 1, 1]] * BATCH))
    with pytest.raises(ValueError, match="prompt_length"):
        score_rollouts(student, teacher, full, 2 * PROMPT_LEN)


def test_sample_tokens_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(2000, 1)
    picks = sample_tokens(logits, top_k=2, generator=seeded())
    assert set(picks.tolist()) == {0, 1}
    picks = sample_tokens(logits, top_p=0.5, generator=seeded())  # p(0) = 0.64 covers 0.5 alone
    assert set(picks.tolist()) == {0}
    assert torch.equal(sample_tokens(logits[:3], do_sample=False), torch.zeros(3, dtype=torch.int64))
