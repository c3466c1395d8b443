"""Served teachers (opd_ext.served): vLLM / SGLang prompt log-probs converted to the sparse-teacher
tensors give the losses of the dense teacher on the same support; the sparse top-k overlap, drift
tracking and statistics agree with their dense counterparts."""

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

import opd_ext
from opd_ext import reference
from opd_ext.served import (
    ServedTeacher,
    from_sglang_input_top_logprobs,
    from_vllm_prompt_logprobs,
    sparse_teacher_stats,
    topk_overlap,
)


@dataclasses.dataclass
class Logprob:
    """vLLM's ``vllm.logprobs.Logprob``."""

    logprob: float
    rank: int = None
    decoded_token: str = None


def _batch(lengths, vocab, seed=0):
    """Right-padded token ids [B, L] and full-sequence student / teacher logits [B, L, V]: the
    logits at position t predict token t + 1."""
    g = torch.Generator().manual_seed(seed)
    steps = max(lengths)
    student = torch.randn(len(lengths), steps, vocab, generator=g) * 2
    teacher = student + torch.randn(len(lengths), steps, vocab, generator=g)
    # Tokens drawn from a sharpened teacher: some inside its top-k, some outside.
    ids = torch.multinomial(torch.softmax(2 * teacher.flatten(0, 1), -1), 1, generator=g).view(len(lengths), steps)
    ids = torch.cat([torch.randint(0, vocab, (len(lengths), 1), generator=g), ids[:, :-1]], 1)
    ids = torch.where(torch.arange(steps) < torch.tensor(lengths)[:, None], ids, 0)
    return ids, student, teacher


def _vllm_positions(seq, teacher, k):
    """RequestOutput.prompt_logprobs for token ids ``seq`` [L] scored by ``teacher`` logits [L, V]:
    None first, then the top-k by rank and the token added (with its vocabulary rank) when outside."""
    log_q = torch.log_softmax(teacher.float(), -1)
    positions = [None]
    for t in range(1, len(seq)):
        row = log_q[t - 1]
        top = torch.topk(row, k)
        entry = {
            i: Logprob(lp, rank=r + 1, decoded_token=f"<{i}>")
            for r, (i, lp) in enumerate(zip(top.indices.tolist(), top.values.tolist()))
        }
        token = int(seq[t])
        if token not in entry:
            entry[token] = Logprob(row[token].item(), rank=int((row > row[token]).sum()) + 1)
        positions.append(entry)
    return positions


def _vllm_outputs(ids, teacher, lengths, k):
    return [
        SimpleNamespace(
            prompt_token_ids=ids[b, :n].tolist(), prompt_logprobs=_vllm_positions(ids[b, :n], teacher[b], k), outputs=[]
        )
        for b, n in enumerate(lengths)
    ]


def _sglang_meta(seq, teacher, k, start_len=0):
    """meta_info of an SGLang request with return_logprob=True, top_logprobs_num=k and
    logprob_start_len=start_len: entry j is token start_len + j, entry 0 unscored."""
    log_q = torch.log_softmax(teacher.float(), -1)
    tokens = [(None, int(seq[start_len]), None)]
    top = [None]
    for t in range(start_len + 1, len(seq)):
        row = log_q[t - 1]
        tokens.append((row[int(seq[t])].item(), int(seq[t]), None))
        values, indices = torch.topk(row, k)
        top.append([(lp, i, None) for lp, i in zip(values.tolist(), indices.tolist())])
    return {"input_token_logprobs": tokens, "input_top_logprobs": top, "prompt_tokens": len(seq)}


def _dense_topk(teacher, tokens, k):
    """The sparse-teacher tensors built from the dense teacher with torch.topk."""
    log_q = torch.log_softmax(teacher.float(), -1)
    top = torch.topk(log_q, k)
    return top.indices, top.values, log_q.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _losses(student, tokens, ids, lps, token_lp, mask, topk_mask=None, **kw):
    out = []
    for fn, args in (
        (opd_ext.vopd_loss_sparse_teacher, (tokens, ids, lps, token_lp)),
        (opd_ext.reverse_kl_loss_sparse_teacher, (ids, lps)),
    ):
        x = student.clone().requires_grad_()
        loss = fn(x, *args, teacher_topk_mask=topk_mask, mask=mask, **kw)
        loss.backward()
        out.append((loss, x.grad))
    return out


def _assert_same_losses(got, want, **tol):
    for (loss, grad), (loss_want, grad_want) in zip(got, want):
        torch.testing.assert_close(loss, loss_want, **tol)
        torch.testing.assert_close(grad, grad_want, **tol)


# ---- vLLM -----------------------------------------------------------------------------------------


def test_vllm_full_vocabulary_gives_the_dense_losses():
    """k = V (vLLM prompt_logprobs=-1): the served losses are the dense losses, on a ragged batch
    aligned with logits[:, :-1] by the default start=1."""
    lengths, vocab = [7, 10, 4], 13
    ids, student, teacher = _batch(lengths, vocab)
    served = from_vllm_prompt_logprobs(_vllm_outputs(ids, teacher, lengths, vocab))
    assert isinstance(served, ServedTeacher)
    assert served.topk_ids.shape == (3, 9, vocab) and served.tokens.shape == (3, 9)
    assert served.mask.tolist() == [[j < n - 1 for j in range(9)] for n in lengths]
    assert torch.equal(torch.where(served.mask, ids[:, 1:], 0), served.tokens)
    s, t = student[:, :-1], teacher[:, :-1]
    dense = []
    for fn, args in ((opd_ext.vopd_loss, (t, served.tokens)), (opd_ext.reverse_kl_loss, (t,))):
        x = s.clone().requires_grad_()
        loss = fn(x, *args, mask=served.mask)
        loss.backward()
        dense.append((loss, x.grad))
    _assert_same_losses(_losses(s, *served[:4], served.mask, served.topk_mask), dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("form", ["objects", "json", "floats", "raw_lists"])
def test_vllm_topk_gives_the_sparse_losses_of_the_dense_topk(k, form):
    """k < V: positions list k entries, or k + 1 when vLLM adds the token; the added token stays out
    of the support, so the tensors (and losses) are those of torch.topk on the dense teacher."""
    lengths, vocab = [9, 6], 23
    ids, student, teacher = _batch(lengths, vocab, seed=1)
    outputs = _vllm_outputs(ids, teacher, lengths, k)
    assert any(len(e) == k + 1 for o in outputs for e in o.prompt_logprobs[1:])
    assert any(len(e) == k for o in outputs for e in o.prompt_logprobs[1:])
    if form == "json":  # vLLM's HTTP server: string keys, Logprob as an object
        outputs = [
            SimpleNamespace(
                prompt_token_ids=o.prompt_token_ids,
                prompt_logprobs=json.loads(
                    json.dumps(
                        [
                            None if e is None else {str(i): dataclasses.asdict(v) for i, v in e.items()}
                            for e in o.prompt_logprobs
                        ]
                    )
                ),
            )
            for o in outputs
        ]
    elif form == "floats":
        outputs = [
            SimpleNamespace(
                prompt_token_ids=o.prompt_token_ids,
                prompt_logprobs=[
                    None if e is None else {i: v.logprob for i, v in e.items()} for e in o.prompt_logprobs
                ],
            )
            for o in outputs
        ]
    if form == "raw_lists":
        served = from_vllm_prompt_logprobs([o.prompt_logprobs for o in outputs], [o.prompt_token_ids for o in outputs])
    else:
        served = from_vllm_prompt_logprobs(outputs, k=k if form == "floats" else None)
    tokens = ids[:, 1:]
    want_ids, want_lps, want_token_lp = _dense_topk(teacher[:, :-1], tokens, k)
    m = served.mask
    assert served.topk_ids.shape[-1] == k and served.topk_mask[m].all()
    assert torch.equal(served.topk_ids[m], want_ids[m])
    torch.testing.assert_close(served.topk_logprobs[m], want_lps[m], rtol=0, atol=0)
    torch.testing.assert_close(served.token_logprob[m], want_token_lp[m], rtol=0, atol=0)
    assert torch.equal(served.tokens[m], tokens[m])
    got = _losses(student[:, :-1], *served[:4], m, served.topk_mask)
    _assert_same_losses(got, _losses(student[:, :-1], tokens, want_ids, want_lps, want_token_lp, m))


def test_vllm_single_sequence_and_completion_span():
    """One RequestOutput gives [T, K]; start = the prompt length scores exactly the completion,
    whose row j pairs with the student logits at prompt_len - 1 + j (per row in a batch)."""
    lengths, vocab, k = [11, 8, 9], 17, 5
    prompt_lens = [4, 6, 2]
    ids, student, teacher = _batch(lengths, vocab, seed=2)
    outputs = _vllm_outputs(ids, teacher, lengths, k)
    one = from_vllm_prompt_logprobs(outputs[0], start=prompt_lens[0])
    assert one.topk_ids.shape == (lengths[0] - prompt_lens[0], k) and one.mask.all()
    assert one.tokens.tolist() == ids[0, prompt_lens[0] : lengths[0]].tolist()

    served = from_vllm_prompt_logprobs(outputs, start=prompt_lens, pad_to=8)
    assert served.tokens.shape == (3, 8)
    assert served.mask.sum(-1).tolist() == [n - p for n, p in zip(lengths, prompt_lens)]
    for field in one._fields:
        assert torch.equal(getattr(served, field)[0, : lengths[0] - prompt_lens[0]], getattr(one, field))
    # The student's logits for the completion, gathered row by row (left-padded prompts would make
    # this one slice).
    pos = (torch.tensor(prompt_lens)[:, None] - 1 + torch.arange(8)).clamp(max=ids.shape[1] - 1)
    s = student.gather(1, pos[..., None].expand(-1, -1, vocab))
    t = teacher.gather(1, pos[..., None].expand(-1, -1, vocab))
    want = _dense_topk(t, served.tokens, k)
    _assert_same_losses(
        _losses(s, *served[:4], served.mask, served.topk_mask), _losses(s, served.tokens, *want, served.mask)
    )


def test_vllm_k_inference_and_edge_forms():
    seq, vocab = torch.tensor([3, 1, 4, 1, 5]), 8
    teacher = torch.randn(5, vocab, generator=torch.Generator().manual_seed(4))
    positions = _vllm_positions(seq, teacher, 2)
    # vLLM's FlatLogprobs reads the unscored first position as {} rather than None.
    flat = [{}] + positions[1:]
    a = from_vllm_prompt_logprobs(positions, seq)
    b = from_vllm_prompt_logprobs(flat, seq.tolist(), start=0)
    assert not b.mask[0] and torch.equal(b.mask[1:], a.mask)
    for field in a._fields:
        assert torch.equal(getattr(b, field)[1:], getattr(a, field))
    # Every position with the token added (k + 1 entries each) and no ranks: k cannot be told.
    log_q = torch.log_softmax(teacher, -1)
    worst = torch.argsort(log_q, -1)[:, 0]
    seq = torch.cat([seq[:1], worst[:-1]])
    positions = [None] + [
        {int(log_q[t - 1].argmax()): float(log_q[t - 1].max()), int(seq[t]): float(log_q[t - 1, seq[t]])}
        for t in range(1, 5)
    ]
    with pytest.raises(ValueError, match=r"cannot tell k.*pass k="):
        from_vllm_prompt_logprobs(positions, seq)
    served = from_vllm_prompt_logprobs(positions, seq, k=1)
    assert served.topk_ids[1:, 0].tolist() == log_q[:-1].argmax(-1)[1:].tolist()
    torch.testing.assert_close(served.token_logprob[1:], log_q[:-1].gather(-1, seq[1:, None]).squeeze(-1)[1:])
    # prompt_logprobs=0: only the token, so no support; the reward is intact.
    only_token = [None] + [{int(seq[t]): float(log_q[t - 1, seq[t]])} for t in range(1, 5)]
    served = from_vllm_prompt_logprobs(only_token, seq, k=0)
    assert served.topk_mask.shape == (4, 1) and not served.topk_mask.any() and served.mask.all()
    torch.testing.assert_close(served.token_logprob, log_q[:-1].gather(-1, seq[1:, None]).squeeze(-1))
    # Empty spans and empty batches keep their shapes.
    assert from_vllm_prompt_logprobs(positions, seq, start=3, end=3).topk_ids.shape == (0, 1)
    assert from_vllm_prompt_logprobs([[]], [[]], start=0).tokens.shape == (1, 0)


def test_vllm_errors_name_the_position():
    seq = [3, 1, 4, 1]
    good = [
        None,
        {1: Logprob(-0.1, 1), 2: Logprob(-2.0, 2)},
        {4: Logprob(-0.3, 1), 0: Logprob(-1.5, 2)},
        {2: Logprob(-0.2, 1), 5: Logprob(-1.9, 2), 1: Logprob(-3.0, 7)},
    ]
    from_vllm_prompt_logprobs([good, good], [seq, seq])
    cases = [
        (
            [good, good[:2] + [{0: Logprob(-1.5, 1), 2: Logprob(-2.5, 2)}] + good[3:]],
            [seq, seq],
            {},
            r"prompt_logprobs\[1\]\[2\] lacks the scored token 4",
        ),
        ([good[:2] + [None] + good[3:]], [seq], {}, r"prompt_logprobs\[0\]\[2\] is None"),
        ([good], [seq], {"k": 3}, r"prompt_logprobs\[0\]\[1\] has 2 entries; with prompt_logprobs k=3"),
        (
            [good[:3] + [{**good[3], 6: Logprob(-4.0, 3), 7: Logprob(-5.0, 4)}]],
            [seq],
            {},
            r"prompt_logprobs\[0\]\[3\] has 5 entries where others have 2",
        ),
        ([good], [seq[:3]], {}, r"prompt_logprobs\[0\] has 4 entries but its prompt_token_ids has 3"),
        ([good[:1] + [{1: "x"}] + good[2:]], [seq], {}, r"prompt_logprobs\[0\]\[1\]\[1\]: expected a log-prob"),
        ([good[:1] + [[0.1]] + good[2:]], [seq], {}, r"prompt_logprobs\[0\]\[1\] must be a dict"),
        ([good], [seq], {"start": 5}, r"prompt_logprobs\[0\] has 4 entries; the span start=5"),
        ([good, good], [seq, seq], {"start": [1]}, r"start has 1 entries but there are 2 sequences"),
        ([good], [seq], {"pad_to": 2}, r"pad_to must be an int >= the longest span \(3 positions\)"),
    ]
    for positions, ids, kw, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            from_vllm_prompt_logprobs(positions, ids, **kw)
    with pytest.raises(ValueError, match="prompt_token_ids is needed"):
        from_vllm_prompt_logprobs(good)
    with pytest.raises(ValueError, match=r"prompt_logprobs=None: request them"):
        from_vllm_prompt_logprobs(SimpleNamespace(prompt_logprobs=None, prompt_token_ids=seq))
    # One sequence: the error names the list without a batch index.
    with pytest.raises(ValueError, match=r"^prompt_logprobs\[2\] is None"):
        from_vllm_prompt_logprobs(good[:2] + [None] + good[3:], seq)


# ---- SGLang ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["responses", "meta_info", "raw_lists", "json"])
def test_sglang_gives_the_sparse_losses_of_the_dense_topk(form):
    """Requests with different top_logprobs_num (3 and 5) are padded to K = 5; every form of the
    response gives the tensors of torch.topk on the dense teacher."""
    lengths, vocab, ks = [8, 5, 7], 19, [3, 5, 3]
    ids, student, teacher = _batch(lengths, vocab, seed=5)
    metas = [_sglang_meta(ids[b, :n], teacher[b], ks[b]) for b, n in enumerate(lengths)]
    if form == "responses":
        served = from_sglang_input_top_logprobs([{"text": "", "meta_info": m} for m in metas])
    elif form == "meta_info":
        served = from_sglang_input_top_logprobs(metas)
    elif form == "raw_lists":
        served = from_sglang_input_top_logprobs(
            [m["input_top_logprobs"] for m in metas], [m["input_token_logprobs"] for m in metas]
        )
    else:  # the HTTP server's JSON: tuples become lists
        served = from_sglang_input_top_logprobs(json.loads(json.dumps([{"meta_info": m} for m in metas])))
    assert served.topk_ids.shape == (3, 7, 5)
    tokens = ids[:, 1:]
    m = served.mask
    assert torch.equal(served.tokens[m], tokens[m])
    assert served.topk_mask.sum(-1).tolist() == [
        [ks[b] if j < n - 1 else 0 for j in range(7)] for b, n in enumerate(lengths)
    ]
    slots = torch.arange(5) < torch.tensor(ks)[:, None, None]
    want = []
    for b, k in enumerate(ks):
        i, lp, tlp = _dense_topk(teacher[b, :-1], tokens[b], k)
        want.append(
            (torch.nn.functional.pad(i, (0, 5 - k)), torch.nn.functional.pad(lp, (0, 5 - k), value=float("-inf")), tlp)
        )
    want_ids, want_lps, want_token_lp = (torch.stack(x) for x in zip(*want))
    assert torch.equal(served.topk_ids[m], want_ids[m])
    torch.testing.assert_close(served.topk_logprobs[m], want_lps[m], rtol=0, atol=0)
    torch.testing.assert_close(served.token_logprob[m], want_token_lp[m], rtol=0, atol=0)
    _assert_same_losses(
        _losses(student[:, :-1], *served[:4], m, served.topk_mask),
        _losses(student[:, :-1], tokens, want_ids, want_lps, want_token_lp, m, slots & m[..., None]),
    )


def test_sglang_logprob_start_len_at_the_completion():
    """logprob_start_len = prompt_len - 1 with start=1 scores exactly the completion, the same
    rows as logprob_start_len=0 with start=prompt_len."""
    seq, vocab, prompt_len = torch.tensor([5, 2, 7, 7, 1, 0, 3]), 9, 3
    teacher = torch.randn(7, vocab, generator=torch.Generator().manual_seed(6))
    tail = from_sglang_input_top_logprobs(_sglang_meta(seq, teacher, 4, start_len=prompt_len - 1))
    full = from_sglang_input_top_logprobs(_sglang_meta(seq, teacher, 4), start=prompt_len)
    assert tail.tokens.tolist() == seq[prompt_len:].tolist() and tail.mask.all()
    for field in full._fields:
        assert torch.equal(getattr(tail, field), getattr(full, field)), field
    # The unscored first entry is kept, masked out, when the span includes it.
    with_first = from_sglang_input_top_logprobs(_sglang_meta(seq, teacher, 4), start=0)
    assert with_first.mask.tolist() == [False] + [True] * 6 and not with_first.topk_mask[0].any()
    # Without top-k lists only the reward is served.
    meta = _sglang_meta(seq, teacher, 4)
    no_top = from_sglang_input_top_logprobs(None, meta["input_token_logprobs"])
    assert no_top.topk_ids.shape == (6, 1) and not no_top.topk_mask.any()
    torch.testing.assert_close(no_top.token_logprob, full_span_token_lp(meta))


def full_span_token_lp(meta):
    return torch.tensor([e[0] for e in meta["input_token_logprobs"][1:]], dtype=torch.float32)


def test_sglang_errors_name_the_position():
    seq = torch.tensor([1, 2, 3, 4])
    teacher = torch.randn(4, 6, generator=torch.Generator().manual_seed(7))
    meta = _sglang_meta(seq, teacher, 2)
    top, tokens = meta["input_top_logprobs"], meta["input_token_logprobs"]
    cases = [
        (
            [top, top[:2] + [[(-0.5, 1, None), ("bad", 2, None)]] + top[3:]],
            [tokens, tokens],
            {},
            r"input_top_logprobs\[1\]\[2\]\[1\]: expected a log-prob",
        ),
        ([top], [tokens[:2] + [(None, 3, None)] + tokens[3:]], {}, r"input_token_logprobs\[0\]\[2\] is unscored"),
        ([top[:3] + [None]], [tokens], {}, r"input_top_logprobs\[0\]\[3\] is unscored"),
        (
            [top],
            [tokens[:1] + [(-0.2,)] + tokens[2:]],
            {},
            r"input_token_logprobs\[0\]\[1\] must be a \(logprob, token_id",
        ),
        ([top[:3]], [tokens], {}, r"input_top_logprobs\[0\] has 3 entries but input_token_logprobs\[0\] has 4"),
        ([top], [tokens], {"end": 9}, r"input_token_logprobs\[0\] has 4 entries; the span start=1, end=9"),
        ([top[:1] + [[(-0.1, 1.5, None)]] + top[2:]], [tokens], {}, r"input_top_logprobs\[0\]\[1\]\[0\] token id"),
    ]
    for top_lists, token_lists, kw, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            from_sglang_input_top_logprobs(top_lists, token_lists, **kw)
    with pytest.raises(ValueError, match=r"response 1 has no meta_info\['input_token_logprobs'\]"):
        from_sglang_input_top_logprobs([{"meta_info": meta}, {"meta_info": {}}])
    with pytest.raises(ValueError, match="input_token_logprobs .* is needed"):
        from_sglang_input_top_logprobs(top)
    with pytest.raises(ValueError, match=r"^input_token_logprobs\[2\] is unscored"):
        from_sglang_input_top_logprobs(top, tokens[:2] + [(None, 3, None)] + tokens[3:])


# ---- overlap, drift tracking, statistics ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sparse_topk_overlap_equals_the_dense_overlap(dtype):
    """With the teacher's true top-k as the served ids, the overlap is opd_ext.topk_overlap's,
    ties in the student's logits included (integers in bf16: many ties at the k-th value)."""
    g = torch.Generator().manual_seed(8)
    teacher = torch.randn(4, 6, 40, generator=g)
    for student in (
        torch.randn(4, 6, 40, generator=g).to(dtype),
        torch.randint(-2, 3, (4, 6, 40), generator=g).to(dtype),
    ):
        for k in (1, 3, 16, 39, 40):
            ids = torch.topk(teacher, k).indices
            want = opd_ext.topk_overlap(student, teacher.to(dtype) if dtype == torch.float32 else teacher, k)
            assert torch.equal(topk_overlap(student, ids), want), k
    # Sliced views (logits[:, :-1]) and a single row [V].
    assert torch.equal(topk_overlap(student[:, :-1], ids[:, :-1]), want[:, :-1])
    assert torch.equal(topk_overlap(student[1, 2], ids[1, 2]), want[1, 2])


def test_sparse_topk_overlap_counts_a_set():
    """k = the number of distinct valid ids: duplicates, masked and -inf slots do not count; a
    valid position with no id is NaN, a masked one 0; NaN logits give NaN."""
    student = torch.tensor([[0.5, 1.0, -0.3, 2.0, 0.7, -1.2]] * 4)
    ids = torch.tensor([[3, 3, 1, 4], [3, 0, 1, 0], [3, 1, 2, 2], [0, 0, 0, 0]])
    slot_mask = torch.tensor(
        [[True, True, True, True], [True, False, True, False], [True, True, True, True], [False] * 4]
    )
    lps = torch.tensor([[-1.0] * 4, [-1.0] * 4, [-1.0, -1.0, float("-inf"), float("-inf")], [-1.0] * 4])
    got = topk_overlap(student, ids, slot_mask, teacher_topk_logprobs=lps)
    # Student top-3 = {3, 1, 4}, top-2 = {3, 1}.
    assert got[:3].tolist() == [1.0, 1.0, 1.0] and got[3].isnan()
    got = topk_overlap(student, torch.tensor([[3, 3, 2, 5]] * 4), mask=torch.tensor([True, False, True, True]))
    torch.testing.assert_close(got, torch.tensor([1 / 3, 0.0, 1 / 3, 1 / 3]))
    student[2, 5] = float("nan")
    assert topk_overlap(student, ids).isnan().tolist() == [False, False, True, False]
    with pytest.raises(ValueError, match="teacher_topk_ids"):
        topk_overlap(student, ids + 10)
    with pytest.raises(ValueError, match="teacher_topk_mask"):
        topk_overlap(student, ids, slot_mask[:, :2])


def test_served_overlap_drives_prune_opd_like_the_dense_teacher():
    """A vLLM-served top-16 gives the overlaps of the dense teacher: drift_scan post hoc and
    DriftMonitor.observe chunk by chunk give the dense run's multipliers and stops."""
    lengths, vocab, k = [30, 22, 27], 48, 16
    ids, student, teacher = _batch(lengths, vocab, seed=9)
    served = from_vllm_prompt_logprobs(_vllm_outputs(ids, teacher, lengths, k))
    s, m = student[:, :-1], served.mask
    overlap = topk_overlap(s, served.topk_ids, served.topk_mask, mask=m)
    dense = opd_ext.topk_overlap(s, teacher[:, :-1], k)
    assert torch.equal(overlap[m], dense[m]) and overlap[~m].eq(0).all()
    config = opd_ext.PruneConfig(k=k, threshold=0.8, w_drop=0.2, patience=3)
    scan = opd_ext.drift_scan(overlap, config, mask=m)
    want = opd_ext.drift_scan(dense, config, mask=m)
    for field in scan._fields:
        assert torch.equal(getattr(scan, field), getattr(want, field)), field
    assert (scan.stop_positions >= 0).any()
    monitor = opd_ext.DriftMonitor(3, config)
    for first in range(0, overlap.shape[1], 8):
        monitor.observe(overlap[:, first : first + 8], m[:, first : first + 8])
    assert torch.equal(monitor.stop_reasons, scan.stop_reasons) and torch.equal(monitor.lengths, scan.lengths)


def test_sparse_teacher_stats_are_the_loss_terms():
    """reward, top-k KL and advantage: the vOPD sparse loss is -Σ sg(A)·log p(y) / n with them, and
    with k = V the top-k KL is the full KL of token_stats."""
    lengths, vocab = [9, 5], 21
    ids, student, teacher = _batch(lengths, vocab, seed=10)
    s, t = student[:, :-1], teacher[:, :-1]
    for k in (6, vocab):
        served = from_vllm_prompt_logprobs(_vllm_outputs(ids, teacher, lengths, k))
        m = served.mask
        stats = sparse_teacher_stats(s, *served[:4], teacher_topk_mask=served.topk_mask, mask=m, temperature=0.9)
        dense = opd_ext.token_stats(s, t, served.tokens, temperature=0.9)
        torch.testing.assert_close(stats.student_logprob[m], dense.student_logprob[m])
        torch.testing.assert_close(
            stats.teacher_logprob[m], torch.log_softmax(t, -1).gather(-1, served.tokens[..., None]).squeeze(-1)[m]
        )
        torch.testing.assert_close(stats.reward, stats.teacher_logprob - stats.student_logprob)
        torch.testing.assert_close(stats.advantage, stats.reward + stats.topk_kl)
        want_kl = reference.support_reverse_kl(
            s.double(), torch.where(m[..., None], served.topk_ids, 0), served.topk_logprobs, 0.9, served.topk_mask
        )
        torch.testing.assert_close(stats.topk_kl[m].double(), want_kl[m], rtol=1e-5, atol=1e-6)
        if k == vocab:  # at τ = 1: the served log-probs carry the server's temperature, token_stats scales both
            full = sparse_teacher_stats(s, *served[:4], teacher_topk_mask=served.topk_mask, mask=m)
            torch.testing.assert_close(
                full.topk_kl[m], opd_ext.token_stats(s, t, served.tokens).reverse_kl[m], rtol=1e-5, atol=1e-6
            )
        for field in stats:
            assert field.dtype == torch.float32 and field[~m].eq(0).all()
        x = s.clone().requires_grad_()
        loss = opd_ext.vopd_loss_sparse_teacher(
            x, *served[:4], teacher_topk_mask=served.topk_mask, mask=m, temperature=0.9
        )
        y = s.clone().requires_grad_()
        surrogate = (
            -(
                stats.advantage * torch.log_softmax(y / 0.9, -1).gather(-1, served.tokens[..., None]).squeeze(-1) * m
            ).sum()
            / m.sum()
        )
        surrogate.backward()
        loss.backward()
        torch.testing.assert_close(loss, surrogate)
        torch.testing.assert_close(x.grad, y.grad)
    with pytest.raises(ValueError, match="teacher_token_logprob"):
        sparse_teacher_stats(s, *served[:3], served.token_logprob[:, :2])


def test_lazy_submodule():
    assert opd_ext.served.from_vllm_prompt_logprobs is from_vllm_prompt_logprobs
