"""Finite stand-ins for -inf in a served top-k (vLLM's JSON -9999.0, SGLang's -FLT_MAX, -1e9, a
dtype's min) are padding, everywhere a served top-k is read (docs/spec.md §1.9)."""

import pytest
import torch

import opd_ext
from opd_ext import served

STAND_INS = [-9999.0, -3.4028234663852886e38, -1e9, float(torch.finfo(torch.bfloat16).min), float("-inf")]


def _case(stand_in):
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(4, 50, generator=g) * 2
    student = teacher + torch.randn(4, 50, generator=g)
    logq = torch.log_softmax(teacher, -1)
    values, ids = logq.topk(6, dim=-1)
    padded_values = values.clone()
    padded_values[:, -1] = stand_in  # the last slot is a server's empty slot
    padded_ids = ids.clone()
    padded_ids[:, -1] = 7  # whatever id the server put there (a real id: it must still not count)
    return student, ids[:, :-1], values[:, :-1], padded_ids, padded_values


@pytest.mark.parametrize("stand_in", STAND_INS)
def test_losses_treat_stand_ins_as_padding(stand_in):
    student, ids, values, padded_ids, padded_values = _case(stand_in)
    tokens = ids[:, 0]
    torch.testing.assert_close(
        opd_ext.reverse_kl_loss_sparse_teacher(student, padded_ids, padded_values),
        opd_ext.reverse_kl_loss_sparse_teacher(student, ids, values),
    )
    torch.testing.assert_close(
        opd_ext.vopd_loss_sparse_teacher(student, tokens, padded_ids, padded_values, values[:, 0]),
        opd_ext.vopd_loss_sparse_teacher(student, tokens, ids, values, values[:, 0]),
    )
    for divergence in ("forward_tail", "reverse_tail", "generalized"):
        torch.testing.assert_close(
            opd_ext.topk_kl_loss(student, padded_ids, padded_values, divergence=divergence),
            opd_ext.topk_kl_loss(student, ids, values, divergence=divergence),
        )
    torch.testing.assert_close(
        served.topk_overlap(student, padded_ids, teacher_topk_logprobs=padded_values),
        served.topk_overlap(student, ids, teacher_topk_logprobs=values),
    )
    support = opd_ext.teacher_support(padded_ids, padded_values)
    assert not support[:, -1].any()


def test_vllm_json_stand_in_is_padding():
    # vLLM's OpenAI server serialises -inf log-probs as -9999.0.
    student, ids, values, _, _ = _case(-9999.0)
    rows = [None]
    for r in range(4):
        entry = {str(int(i)): {"logprob": float(v), "rank": k + 1} for k, (i, v) in enumerate(zip(ids[r], values[r]))}
        entry["7"] = {"logprob": -9999.0, "rank": 6}
        rows.append(entry)
    prompt_token_ids = [1] + ids[:, 0].tolist()  # each position's token: the teacher's top-1 here
    got = served.from_vllm_prompt_logprobs(rows, prompt_token_ids, start=1)
    assert not got.topk_mask[:, -1].any()
    torch.testing.assert_close(
        opd_ext.reverse_kl_loss_sparse_teacher(
            student, got.topk_ids, got.topk_logprobs, teacher_topk_mask=got.topk_mask
        ),
        opd_ext.reverse_kl_loss_sparse_teacher(student, ids, values),
    )


def test_real_log_probs_near_the_rule_stay():
    # A genuinely tiny probability is kept: the rule only drops values whose probability is exactly 0
    # in float64 (below log of the smallest positive float64, about -744.4).
    ids = torch.tensor([[0, 1]])
    logprobs = torch.tensor([[-0.1, -700.0]])
    assert opd_ext.teacher_support(ids, logprobs).all()
    assert not opd_ext.teacher_support(ids, torch.tensor([[-0.1, -746.0]]))[0, 1]
