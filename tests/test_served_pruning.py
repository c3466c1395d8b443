"""Prune-OPD inside a served engine (opd_ext.generation.served) with stand-ins for vLLM and SGLang."""

import pytest
import torch
from served_engines import EOS, FakeLLM, FakeSGLang, SamplingParams, bigram_pair

import opd_ext
from opd_ext.generation import SGLangEngine, VLLMEngine, generate_served_with_pruning
from opd_ext.served import topk_overlap_between

CONFIG = opd_ext.PruneConfig(k=4, threshold=0.5, w_drop=0.25, w_base=0.5, min_weight=0.0)
PROMPTS = [[5, 7, 9], [11], [3, 4], [20, 21, 22, 23], [8], [30, 2], [17], [25, 26]]


def vllm_pair(seed=3):
    teacher, student = bigram_pair()
    return (
        VLLMEngine(FakeLLM(student), seed=seed, sampling_params=SamplingParams),
        VLLMEngine(FakeLLM(teacher), sampling_params=SamplingParams),
        student,
        teacher,
    )


def dense_overlaps(student, teacher, prompt, completion, k):
    """opd_ext.topk_overlap of the two models' full logits at the completion's positions."""
    seq = list(prompt) + list(completion)
    s = student.logits_at(seq)[len(prompt) - 1 :].float()
    t = teacher.logits_at(seq)[len(prompt) - 1 :].float()
    return opd_ext.topk_overlap(s, t, k)


def test_overlap_between_id_lists():
    a = torch.tensor([[1, 2, 3, 4], [1, 1, 2, 3], [5, 6, 7, 8]])
    b = torch.tensor([[4, 3, 9, 8], [1, 2, 3, 4], [1, 2, 3, 4]])
    got = topk_overlap_between(a, b)
    # 2 shared of 4; the repeated 1 counts once: {1,2,3} vs {1,2,3,4} -> 3 / min(3, 4); none shared.
    torch.testing.assert_close(got, torch.tensor([0.5, 1.0, 0.0]))
    mask_a = torch.tensor([[True, True, False, False], [True] * 4, [True] * 4])
    got = topk_overlap_between(a, b, mask_a, mask=torch.tensor([True, True, False]))
    torch.testing.assert_close(got, torch.tensor([0.0, 1.0, 0.0]))  # {1, 2} vs {4, 3, 9, 8}
    empty = topk_overlap_between(a[:1], b[:1], torch.zeros(1, 4, dtype=torch.bool))
    assert torch.isnan(empty).all()
    with pytest.raises(TypeError, match="student_topk_ids"):
        topk_overlap_between(a.int(), b)


def test_overlap_between_equals_the_dense_overlap():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(64, 500, generator=g), torch.randn(64, 500, generator=g)
    for k in (1, 4, 16):
        got = topk_overlap_between(s.topk(k).indices, t.topk(k).indices)
        torch.testing.assert_close(got, opd_ext.topk_overlap(s, t, k))


@pytest.mark.parametrize("chunk_tokens", [1, 5, 16])
def test_vllm_engine_stops_drifted_requests_between_chunks(chunk_tokens):
    student_engine, teacher_engine, student, teacher = vllm_pair()
    out = generate_served_with_pruning(
        student_engine, teacher_engine, PROMPTS, max_new_tokens=40, chunk_tokens=chunk_tokens, config=CONFIG
    )
    assert any(out.pruned()), "the stand-in student must drift in some requests"
    for i, prompt in enumerate(PROMPTS):
        completion = out.completions[i]
        # The overlaps come from the engines' top-k id lists and equal the dense models' overlap.
        torch.testing.assert_close(
            torch.tensor(out.overlaps[i]), dense_overlaps(student, teacher, prompt, completion, CONFIG.k)
        )
        # Same decisions as the post-hoc scan of the kept tokens: a stop is at the last kept token.
        scan = opd_ext.drift_scan(torch.tensor([out.overlaps[i]]), CONFIG)
        torch.testing.assert_close(scan.multipliers[0], torch.tensor(out.multipliers[i]))
        if out.pruned()[i]:
            assert int(scan.stop_positions[0]) == len(completion) - 1
            # At most chunk_tokens - 1 decode steps past the stop.
            assert len(completion) <= out.decode_steps[i] <= len(completion) + chunk_tokens - 1
        else:
            assert out.stop_reasons[i] in ("eos", "max_length")
            assert completion[-1] == EOS or len(completion) == 40
            assert out.decode_steps[i] == len(completion)
    assert out.teacher_calls >= out.chunks


def test_pruning_saves_decode_steps_against_the_unpruned_run():
    student_engine, teacher_engine, _, _ = vllm_pair()
    full = generate_served_with_pruning(
        student_engine,
        teacher_engine,
        PROMPTS,
        max_new_tokens=40,
        chunk_tokens=4,
        config=opd_ext.PruneConfig.disabled(4),
    )
    assert not any(full.pruned())
    pruned = generate_served_with_pruning(
        student_engine, teacher_engine, PROMPTS, max_new_tokens=40, chunk_tokens=4, config=CONFIG
    )
    # Sampling is seeded by the sequence so far, so each request decodes the same tokens in both runs
    # up to its stop; the stopped ones spend fewer engine decode steps.
    for i in range(len(PROMPTS)):
        kept = pruned.completions[i]
        assert full.completions[i][: len(kept)] == kept
    assert pruned.tokens_generated < full.tokens_generated
    stopped = [i for i, p in enumerate(pruned.pruned()) if p]
    assert sum(full.decode_steps[i] - pruned.decode_steps[i] for i in stopped) == (
        full.tokens_generated - pruned.tokens_generated
    )


@pytest.mark.parametrize("chunk_tokens", [1, 6])
def test_sglang_engine_gives_the_same_decisions(chunk_tokens):
    teacher, student = bigram_pair()
    out = generate_served_with_pruning(
        SGLangEngine(FakeSGLang(student), eos_token_id=EOS),
        SGLangEngine(FakeSGLang(teacher)),
        PROMPTS,
        max_new_tokens=30,
        chunk_tokens=chunk_tokens,
        config=CONFIG,
    )
    assert any(out.pruned())
    for i, prompt in enumerate(PROMPTS):
        # The stand-in reports an EOS on a chunk's last step as "length", as SGLang does: the request
        # must still end there (with chunk_tokens=1 every EOS is such a one).
        assert EOS not in out.completions[i][:-1]
        if out.completions[i][-1:] == [EOS] and not out.pruned()[i]:
            assert out.stop_reasons[i] == "eos"
        torch.testing.assert_close(
            torch.tensor(out.overlaps[i]), dense_overlaps(student, teacher, prompt, out.completions[i], CONFIG.k)
        )
        scan = opd_ext.drift_scan(torch.tensor([out.overlaps[i]]), CONFIG)
        torch.testing.assert_close(scan.multipliers[0], torch.tensor(out.multipliers[i]))


def test_repetition_rule_stops_a_looping_request():
    # A student that loops 1 -> 2 -> 1 -> ...: the teacher agrees (same table), so only the
    # repetition rule can stop it.
    table = torch.full((10, 10), -20.0)
    table[1, 2] = table[2, 1] = 10.0
    table[3, 4] = table[4, 5] = table[5, 6] = table[6, 0] = 10.0  # a short fluent path to EOS
    from served_engines import BigramLM

    model = BigramLM(table)
    engine = VLLMEngine(FakeLLM(model), seed=0, sampling_params=SamplingParams)
    config = opd_ext.PruneConfig(k=2, w_drop=0.0, w_base=0.0, min_weight=None, loop_window=8, loop_match=0.5)
    out = generate_served_with_pruning(engine, engine, [[1], [3]], max_new_tokens=64, chunk_tokens=4, config=config)
    assert out.stop_reasons == ["repetition", "eos"]
    assert len(out.completions[0]) < 16 and out.decode_steps[0] < 20
    assert out.completions[1] == [4, 5, 6, 0]


def test_without_its_eos_id_a_length_report_would_continue_past_eos():
    # Why the adapters take eos_token_id: the engine alone cannot tell an EOS on the last step.
    teacher, student = bigram_pair()
    engines = (SGLangEngine(FakeSGLang(student)), SGLangEngine(FakeSGLang(teacher)))
    out = generate_served_with_pruning(*engines, PROMPTS, max_new_tokens=30, chunk_tokens=1, config=CONFIG)
    assert any(EOS in c[:-1] for c in out.completions)


def test_engine_requests_follow_the_apis():
    student_engine, teacher_engine, _, _ = vllm_pair()
    generate_served_with_pruning(
        student_engine, teacher_engine, PROMPTS[:2], max_new_tokens=8, chunk_tokens=4, config=CONFIG
    )
    # The teacher is asked to prefill with prompt_logprobs=k and decode one token; the student for
    # chunks of at most chunk_tokens with logprobs=k.
    assert all(call[1] == 1 and call[2] == CONFIG.k for call in teacher_engine.llm.calls)
    assert all(call[1] <= 4 and call[2] is None for call in student_engine.llm.calls)


def test_bad_arguments_are_named():
    student_engine, teacher_engine, _, _ = vllm_pair()
    with pytest.raises(ValueError, match="chunk_tokens"):
        generate_served_with_pruning(student_engine, teacher_engine, PROMPTS, max_new_tokens=8, chunk_tokens=0)
    with pytest.raises(ValueError, match="prompt"):
        generate_served_with_pruning(student_engine, teacher_engine, [[]], max_new_tokens=8)
