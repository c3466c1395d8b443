"""Prune-OPD drift tracking: kernels vs opd_ext.reference (exact), scan vs steps, DriftMonitor,
PruneConfig, DynamicWindow (docs/spec.md §1 "Prune-OPD drift tracking")."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import opd_ext
from opd_ext import reference
from opd_ext.prune import DriftMonitor, DriftState, DynamicWindow, PruneConfig, StopReason

from conftest import DTYPE_PAIRS

ops = torch.ops.opd_ext

CONFIGS = {
    "default": PruneConfig(k=4),
    "ema_warmup_patience": PruneConfig(k=4, ema_beta=0.3, warmup=2, w_drop=0.1, patience=3),
    "exponential": PruneConfig(k=4, decay=0.7, min_weight=0.2, threshold=0.6),
    "no_stop": PruneConfig(k=4, w_drop=0.3, w_base=0.0, min_weight=None),
}


def drifting_logits(batch, vocab, steps, dtype_pair, device, generator):
    """Student/teacher logits [B, T, V] whose agreement decays over the steps (so overlaps cross the
    threshold), with duplicated values (ties) and -inf entries, rounded to the test dtypes."""
    s_dtype, t_dtype = dtype_pair
    student = torch.randn(batch, steps, vocab, generator=generator)
    noise = torch.randn(batch, steps, vocab, generator=generator)
    mix = torch.linspace(0.0, 2.5, steps)[None, :, None] * torch.rand(batch, 1, 1, generator=generator)
    teacher = student + mix * noise
    student = (student * 4).round() / 4  # ties
    student[..., 3] = float("-inf")
    teacher[:, ::3, 5] = float("-inf")
    return student.to(device, s_dtype), teacher.to(device, t_dtype)


def assert_states_equal(a: DriftState, b: DriftState):
    for name, x, y in zip(DriftState._fields, a, b):
        assert torch.equal(x, y), f"state field {name} differs:\n{x}\n{y}"


def fresh_state(batch, device, budget=None):
    return DriftState.fresh(batch, torch.device(device), budget)


def reference_token_stats(student, teacher, tokens, temperature):
    stats = reference.token_stats(student, teacher, tokens, temperature)
    return stats["student_logprob"], stats["teacher_logprob"], stats["reverse_kl"]


# ---- kernels vs the reference -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype_pair", DTYPE_PAIRS, ids=lambda p: f"{p[0]}-{p[1]}".replace("torch.", ""))
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_step_op_matches_reference_exactly(device, dtype_pair, config_name):
    config = CONFIGS[config_name]
    gen = torch.Generator().manual_seed(list(CONFIGS).index(config_name))
    batch, vocab, steps = 6, 129, 24
    student, teacher = drifting_logits(batch, vocab, steps, dtype_pair, device, gen)
    kernel_state = fresh_state(batch, device, budget=torch.tensor([steps + 5, 9, 1000, 7, 50, 20]))
    reference_state = DriftState(*(x.clone() for x in kernel_state))
    for t in range(steps):
        # A shrinking, reordered subset of rows, as a generation loop that drops stopped rows passes.
        running = (kernel_state.stop_reason == 0).nonzero().squeeze(-1).cpu()
        rows = running[torch.randperm(running.numel(), generator=gen)].to(device)
        if t % 5 == 4:  # sometimes include a stopped row: it must not be updated
            rows = torch.arange(batch, device=device)
        s, te = student[rows, t], teacher[rows, t]
        overlap, multiplier, stopped, *stats = ops.drift_step(
            s, te, None, rows, *kernel_state, config.k, 1.0, **config.kernel_args()
        )
        assert all(x.numel() == 0 for x in stats)
        expected_overlap = reference.topk_overlap(s, te, config.k)
        expected_multiplier, expected_stopped = reference.drift_update(
            expected_overlap, *reference_state, rows, **config.kernel_args()
        )
        assert torch.equal(overlap, expected_overlap)
        assert torch.equal(multiplier, expected_multiplier)
        assert torch.equal(stopped, expected_stopped)
        assert_states_equal(kernel_state, reference_state)
    assert bool(kernel_state.stop_reason.ne(0).any()), "the inputs should make some rows stop"


@pytest.mark.parametrize("dtype_pair", DTYPE_PAIRS, ids=lambda p: f"{p[0]}-{p[1]}".replace("torch.", ""))
@pytest.mark.parametrize("vocab", [1, 7, 129, 50257])
def test_step_op_token_stats(device, dtype_pair, vocab):
    gen = torch.Generator().manual_seed(vocab)
    batch, temperature = 3, 0.7
    student, teacher = drifting_logits(batch, max(vocab, 8), 2, dtype_pair, device, gen)
    student, teacher = student[:, 1, :vocab].contiguous(), teacher[:, 1, :vocab].contiguous()
    if vocab > 100:
        student[0, 17] = 1e4  # extreme logits
        teacher[0, 18] = -1e4
    tokens = torch.randint(0, vocab, (batch,), generator=gen).to(device)
    k = min(4, vocab)
    state = fresh_state(batch, device)
    overlap, _, _, logp_s, logp_t, kl = ops.drift_step(
        student, teacher, tokens, None, *state, k, temperature, **PruneConfig(k=k).kernel_args()
    )
    assert torch.equal(overlap, reference.topk_overlap(student, teacher, k))
    want_s, want_t, want_kl = reference_token_stats(student, teacher, tokens, temperature)
    rtol = 1e-5 if dtype_pair == (torch.float32, torch.float32) else 1e-4
    torch.testing.assert_close(logp_s.double(), want_s, rtol=rtol, atol=1e-6)
    torch.testing.assert_close(logp_t.double(), want_t, rtol=rtol, atol=1e-6)
    torch.testing.assert_close(kl.double(), want_kl, rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_scan_op_matches_reference_exactly(device, config_name):
    config = CONFIGS[config_name]
    gen = torch.Generator().manual_seed(7)
    batch, steps = 9, 40
    overlaps = torch.randint(0, config.k + 1, (batch, steps), generator=gen).float().div(config.k).to(device)
    mask = (torch.rand(batch, steps, generator=gen) > 0.2).to(device)
    budget = torch.tensor([40, 10, 3, 1000, 25, 40, 1, 40, 33])
    kernel_state, reference_state = fresh_state(batch, device, budget), fresh_state(batch, device, budget)
    # Two calls: the second continues from the state the first left (chunked generation).
    for chunk in (slice(0, 13), slice(13, steps)):
        got = ops.drift_scan(
            overlaps[:, chunk].contiguous(), mask[:, chunk].contiguous(), *kernel_state, **config.kernel_args()
        )
        want = reference.drift_scan(overlaps[:, chunk], mask[:, chunk], *reference_state, **config.kernel_args())
        for name, x, y in zip(("multipliers", "weights", "stop_position"), got, want):
            assert torch.equal(x, y), name
        assert_states_equal(kernel_state, reference_state)


@pytest.mark.parametrize("dtype_pair", DTYPE_PAIRS[:2], ids=lambda p: f"{p[0]}-{p[1]}".replace("torch.", ""))
def test_scan_equals_stepping(device, dtype_pair):
    """drift_scan over topk_overlap([B, T, V]) == DriftMonitor.step T times on the same tokens."""
    config = CONFIGS["ema_warmup_patience"]
    gen = torch.Generator().manual_seed(3)
    batch, vocab, steps = 5, 64, 30
    student, teacher = drifting_logits(batch, vocab, steps, dtype_pair, device, gen)
    monitor = DriftMonitor(batch, config, device=device)
    active = torch.arange(batch, device=device)
    for t in range(steps):
        if active.numel() == 0:
            break
        stop = monitor.step(student[active, t], teacher[active, t], rows=active)
        active = active[~stop]
    scan = opd_ext.drift_scan(opd_ext.topk_overlap(student, teacher, config.k), config)
    width = monitor.num_steps
    assert torch.equal(scan.multipliers[:, :width], monitor.multipliers)
    assert torch.equal(scan.weights[:, :width], monitor.weights)
    assert torch.equal(scan.lengths, monitor.lengths)
    assert torch.equal(scan.stop_reasons, monitor.stop_reasons)
    assert torch.equal(scan.stop_positions, torch.where(monitor.stopped, monitor.lengths - 1, -1))


# ---- the rules --------------------------------------------------------------------------------------
def scan_one(overlaps, config, budget=None):
    result = opd_ext.drift_scan(torch.tensor([overlaps], dtype=torch.float32), config, budget=budget)
    return result.multipliers[0].tolist(), result.weights[0].tolist(), result.stop_reasons[0].item()


def test_weights_are_monotone_non_increasing():
    gen = torch.Generator().manual_seed(0)
    overlaps = torch.randint(0, 17, (32, 300), generator=gen).float() / 16
    for config in (PruneConfig(min_weight=None), PruneConfig(decay=0.9, min_weight=None), PruneConfig(ema_beta=0.5)):
        scan = opd_ext.drift_scan(overlaps, config)
        consumed = scan.multipliers > 0  # w_base 0.5 > 0: every consumed token has a multiplier
        diffs = scan.weights[:, 1:] - scan.weights[:, :-1]
        assert bool((diffs[consumed[:, 1:]] <= 0).all()), config
        assert bool(((scan.weights >= 0) & (scan.weights <= 1)).all())
        assert bool((scan.multipliers[consumed] == 0.5 + scan.weights[consumed]).all())


def test_weight_reaching_zero_stops():
    multipliers, weights, reason = scan_one([0.0] * 6, PruneConfig(w_drop=0.25))
    assert weights == [0.75, 0.5, 0.25, 0.0, 0.0, 0.0]
    assert multipliers == [1.25, 1.0, 0.75, 0.5, 0.0, 0.0]  # the stopping token keeps w_base
    assert reason == StopReason.WEIGHT_EXHAUSTED


def test_patience_stops_after_consecutive_events():
    _, weights, reason = scan_one([0.5, 0.5, 0.9, 0.5, 0.5, 0.5, 0.5], PruneConfig(patience=3))
    assert weights[:6] == pytest.approx([0.99, 0.98, 0.98, 0.97, 0.96, 0.95])
    assert weights[6] == 0.0
    assert reason == StopReason.PATIENCE


def test_warmup_exempts_the_first_tokens():
    _, weights, _ = scan_one([0.0] * 5, PruneConfig(warmup=3, w_drop=0.1))
    assert weights == pytest.approx([1.0, 1.0, 1.0, 0.9, 0.8])


def test_ema_smooths_overlaps():
    # beta 0.5: ema 1.0, 0.75 (>= 0.7, no event), 0.625 (event), 0.8125 (no event)
    _, weights, _ = scan_one([1.0, 0.5, 0.5, 1.0], PruneConfig(ema_beta=0.5, w_drop=0.1))
    assert weights == pytest.approx([1.0, 1.0, 0.9, 0.9])


def test_budget_caps_length():
    multipliers, _, reason = scan_one([1.0] * 10, PruneConfig(), budget=4)
    assert multipliers == [1.5] * 4 + [0.0] * 6
    assert reason == StopReason.BUDGET


def test_disabled_is_plain_opd():
    overlaps = torch.zeros(3, 500)
    scan = opd_ext.drift_scan(overlaps, PruneConfig.disabled())
    assert bool((scan.multipliers == 1).all())
    assert bool((scan.stop_positions == -1).all())
    assert PruneConfig.disabled().is_disabled and not PruneConfig().is_disabled


def test_nan_row_is_isolated():
    student = torch.randn(3, 50)
    teacher = student.clone()
    student[1, 7] = float("nan")
    monitor = DriftMonitor(3, PruneConfig(k=4), device="cpu")
    monitor.step(student, teacher)
    assert monitor.overlaps[:, 0].isnan().tolist() == [False, True, False]
    assert monitor.weights[:, 0].tolist() == pytest.approx([1.0, 0.99, 1.0])  # a NaN overlap counts as drift


# ---- DriftMonitor -----------------------------------------------------------------------------------
def test_monitor_active_subsets_match_independent_rows(device):
    """Rows decoded in a shrinking, arbitrarily ordered active batch behave like each row alone."""
    config = PruneConfig(k=4, w_drop=0.2)
    gen = torch.Generator().manual_seed(11)
    batch, vocab, steps = 6, 40, 20
    student, teacher = drifting_logits(batch, vocab, steps, (torch.float32, torch.float32), device, gen)
    monitor = DriftMonitor(batch, config, device=device)
    tokens_fed = [0] * batch
    for _ in range(steps):
        active = monitor.active_rows().cpu()
        active = active[torch.rand(active.numel(), generator=gen) < 0.7]  # some rows skip a step
        active = active[torch.randperm(active.numel(), generator=gen)]
        if active.numel() == 0:
            continue
        positions = torch.tensor([tokens_fed[b] for b in active.tolist()])
        stop = monitor.step(student[active, positions], teacher[active, positions], rows=active.to(device))
        assert stop.shape == active.shape
        for b in active.tolist():
            tokens_fed[b] += 1
    for b in range(batch):
        alone = DriftMonitor(1, config, device=device)
        for t in range(tokens_fed[b]):
            alone.step(student[b, t][None], teacher[b, t][None])
        n = tokens_fed[b]
        assert monitor.lengths[b].item() == n
        assert torch.equal(monitor.weights[b, :n], alone.weights[0, :n])
        assert torch.equal(monitor.overlaps[b, :n], alone.overlaps[0, :n])
        assert bool(monitor.mask[b, :n].all()) and not bool(monitor.mask[b, n:].any())


def test_monitor_records_token_stats(device):
    gen = torch.Generator().manual_seed(5)
    student, teacher = drifting_logits(4, 30, 3, (torch.float32, torch.float32), device, gen)
    tokens = torch.randint(0, 30, (4, 3), generator=gen).to(device)
    monitor = DriftMonitor(4, PruneConfig(k=4), device=device)
    assert monitor.student_logprobs is None
    for t in range(3):
        monitor.step(student[:, t], teacher[:, t], tokens[:, t], temperature=0.5)
    for t in range(3):
        want_s, want_t, want_kl = reference_token_stats(student[:, t], teacher[:, t], tokens[:, t], 0.5)
        torch.testing.assert_close(monitor.student_logprobs[:, t].double(), want_s, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(monitor.teacher_logprobs[:, t].double(), want_t, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(monitor.reverse_kl[:, t].double(), want_kl, rtol=1e-5, atol=1e-6)


def test_monitor_observe_chunks_equals_steps():
    config = CONFIGS["ema_warmup_patience"]
    gen = torch.Generator().manual_seed(2)
    batch, steps = 5, 24
    overlaps = torch.randint(0, 5, (batch, steps), generator=gen).float() / 4
    mask = torch.rand(batch, steps, generator=gen) > 0.2
    chunked = DriftMonitor(batch, config)
    chunked.observe(overlaps[:, :10], mask[:, :10])
    chunked.observe(overlaps[1:, 10:], mask[1:, 10:], rows=torch.tensor([1, 2, 3, 4]))  # row 0 left
    mask[0, 10:] = False

    stepped = fresh_state(batch, "cpu")
    for t in range(steps):
        rows = mask[:, t].nonzero().squeeze(-1)
        reference.drift_update(overlaps[rows, t], *stepped, rows, **config.kernel_args())
    assert_states_equal(chunked.state, stepped)

    scan = opd_ext.drift_scan(overlaps, config, mask=mask)
    positions = torch.arange(steps)
    for b in range(batch):
        stop = scan.stop_positions[b].item()
        consumed = mask[b] & ((positions <= stop) | (stop < 0))
        n = int(consumed.sum())
        assert chunked.lengths[b].item() == n
        assert torch.equal(chunked.weights[b, :n], scan.weights[b, consumed])
        assert torch.equal(chunked.multipliers[b, :n], scan.multipliers[b, consumed])
        assert torch.equal(chunked.overlaps[b, :n], overlaps[b, consumed])
        assert bool(chunked.mask[b, :n].all()) and not bool(chunked.mask[b, n:].any())


def test_monitor_finish_and_reset():
    monitor = DriftMonitor(3, PruneConfig(k=2))
    logits = torch.randn(3, 10)
    monitor.step(logits, logits)
    monitor.finish(torch.tensor([False, True, False]))
    assert monitor.stopped.tolist() == [False, True, False]
    assert monitor.stop_reasons[1].item() == StopReason.FINISHED
    stop = monitor.step(logits, logits)
    assert stop.tolist() == [False, True, False]
    assert monitor.lengths.tolist() == [2, 1, 2]
    assert monitor.mask.tolist() == [[True, True], [True, False], [True, True]]
    monitor.reset(2, budget=5)
    assert monitor.lengths.tolist() == [0, 0] and monitor.weights.shape == (2, 0)


def test_monitor_history_grows():
    monitor = DriftMonitor(2, PruneConfig(k=2, min_weight=None))
    logits = torch.randn(2, 10)
    for _ in range(40):
        monitor.step(logits, -logits)
    assert monitor.weights.shape == (2, 40)
    assert monitor.effective_lengths.tolist() == [40, 40]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m, s: m.step(s, s[:, :9]), "vocabulary mismatch"),
        (lambda m, s: m.step(s[:2], s[:2]), "pass rows="),
        (lambda m, s: m.step(s[:2], s[:2], rows=torch.tensor([0, 0])), "distinct"),
        (lambda m, s: m.step(s[:2], s[:2], rows=torch.tensor([0, 3])), r"\[0, 3\)"),
        (lambda m, s: m.step(s, s, torch.tensor([0, 1, 10])), r"ids in \[0, V=10\)"),
        (lambda m, s: m.step(s, s, torch.tensor([0, 1])), r"shape \[A=3\]"),
        (lambda m, s: m.step(s, s, temperature=0.0), "temperature"),
        (lambda m, s: m.step(s[:, :1], s[:, :1]), "PruneConfig.k"),
        (lambda m, s: m.step(s[None], s[None]), r"\[A, V\]"),
        (lambda m, s: m.observe(torch.zeros(3, 4, dtype=torch.float64)), "float32"),
    ],
)
def test_monitor_rejects_bad_input(call, match):
    monitor = DriftMonitor(3, PruneConfig(k=2))
    with pytest.raises((ValueError, TypeError), match=match):
        call(monitor, torch.randn(3, 10))


# ---- PruneConfig and DynamicWindow ------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(k=0), "k"),
        (dict(k=2.0), "k"),
        (dict(ema_beta=1.0), "ema_beta"),
        (dict(threshold=1.5), "threshold"),
        (dict(warmup=-1), "warmup"),
        (dict(w_drop=-0.1), "w_drop"),
        (dict(w_drop=float("nan")), "w_drop"),
        (dict(decay=0.0), "decay"),
        (dict(w_base=-1.0), "w_base"),
        (dict(min_weight=1.0), "min_weight"),
        (dict(patience=0), "patience"),
        (dict(window=10, window_min=128), "window"),
        (dict(window_max=64, window_min=128), "window_max"),
        (dict(window_step=0), "window_step"),
        (dict(window_hit_ratio=0.0), "window_hit_ratio"),
        (dict(window_shrink_patience=0), "window_shrink_patience"),
    ],
)
def test_bad_configs_are_rejected(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=f"PruneConfig.{name}"):
        PruneConfig(**kwargs)


def test_config_replace_is_validated():
    with pytest.raises(ValueError, match="threshold"):
        dataclasses.replace(PruneConfig(), threshold=-0.1)


def test_dynamic_window():
    config = PruneConfig(
        window=300,
        window_min=200,
        window_max=500,
        window_step=100,
        window_margin=50,
        window_hit_ratio=0.25,
        window_shrink_patience=2,
    )
    window = DynamicWindow(config)
    assert window.hit_length == 250
    assert window.update(torch.tensor([250, 10, 10, 10])) == 400  # 1 of 4 hits: grow
    assert window.update(torch.tensor([349, 10, 10, 10])) == 400  # 349 < 350: no hit
    assert window.update(torch.tensor([10, 10, 10, 10])) == 300  # second batch without hits: shrink
    assert window.update(torch.tensor([10, 10, 10, 10])) == 300
    assert window.update(torch.tensor([10, 10, 10, 10])) == 200
    for _ in range(4):
        window.update(torch.tensor([10]))
    assert window.length == 200  # floor
    for _ in range(5):
        window.update(torch.tensor([10_000]))
    assert window.length == 500  # ceiling
    with pytest.raises(ValueError, match="window"):
        DynamicWindow(PruneConfig())


def test_dynamic_window_counts_a_batch_below_the_hit_ratio_as_without_hits():
    """The authors' trainer: one threshold decides growth and the shrink counter. A batch where 1
    rollout of 20 reaches the cap (5% < hit_ratio 10%) is a batch without hits."""
    config = PruneConfig(
        window=2048,
        window_min=1024,
        window_max=12288,
        window_step=100,
        window_margin=100,
        window_hit_ratio=0.1,
        window_shrink_patience=3,
    )
    window = DynamicWindow(config)
    lengths = torch.tensor([2048] + [500] * 19)
    assert [window.update(lengths) for _ in range(3)] == [2048, 2048, 1948]
    # Two hits of 20 reach the ratio: the window grows and the shrink counter starts over.
    window.update(lengths)
    window.update(lengths)
    assert window.update(torch.tensor([2048, 2048] + [500] * 18)) == 2048
    assert [window.update(lengths) for _ in range(3)] == [2048, 2048, 1948]


def test_budget_from_window_reaches_the_kernels():
    monitor = DriftMonitor(2, PruneConfig(k=2), budget=torch.tensor([1, 3]))
    logits = torch.randn(2, 8)
    assert monitor.step(logits, logits).tolist() == [True, False]
    monitor.step(logits, logits)
    assert monitor.step(logits, logits).tolist() == [True, True]
    assert monitor.stop_reasons.tolist() == [StopReason.BUDGET] * 2


# ---- dispatcher integration -------------------------------------------------------------------------
def test_opcheck():
    config = PruneConfig(k=3)
    student, teacher = torch.randn(4, 20), torch.randn(4, 20)
    state = fresh_state(6, "cpu")
    args = (student, teacher, torch.tensor([1, 2, 3, 4]), torch.tensor([5, 0, 2, 3]), *state, 3, 1.0)
    torch.library.opcheck(ops.drift_step.default, args, config.kernel_args())
    overlaps = torch.rand(6, 5)
    torch.library.opcheck(ops.drift_scan.default, (overlaps, None, *fresh_state(6, "cpu")), config.kernel_args())


@pytest.mark.parametrize("k", [1, 16, 300])
def test_topk_overlap_unchanged_by_the_shared_row_helper(k):
    gen = torch.Generator().manual_seed(k)
    student = (torch.randn(5, 1000, generator=gen) * 2).round()  # many ties
    teacher = student + torch.randn(5, 1000, generator=gen)
    assert torch.equal(opd_ext.topk_overlap(student, teacher, k), reference.topk_overlap(student, teacher, k))


# ---- the repetition check (PruneConfig.loop_window) ------------------------------------------------

LOOP = PruneConfig(k=4, w_drop=0.0, w_base=0.5, min_weight=None, loop_window=6, loop_match=1.0, loop_max_period=4)


def _looping_rows():
    """Token rows: a period-3 loop from position 2 (1 2 3 1 2 3 ...: from position 5 on each token
    equals the one 3 back, six of them by position 10), a period-1 run of 5 (four matches, fewer
    than the window), a period-5 loop (beyond loop_max_period) and a period-2 loop from position 0
    (six matches by position 7)."""
    return torch.tensor(
        [
            [5, 9, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1],
            [7, 7, 7, 7, 7, 8, 9, 10, 11, 12, 13, 14],
            [1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2],
            [4, 6, 4, 6, 4, 6, 4, 6, 4, 6, 4, 6],
        ]
    )


def test_repetition_stops_at_the_token_completing_the_loop():
    tokens = _looping_rows()
    batch, steps = tokens.shape
    monitor = DriftMonitor(batch, LOOP)
    active = torch.arange(batch)
    stopped_at = torch.full((batch,), -1)
    for t in range(steps):
        if not active.numel():
            break
        s = torch.randn(active.numel(), 20)
        stop = monitor.step(s, s.clone(), tokens[active, t], rows=active)  # identical logits: no drift
        stopped_at[active[stop]] = t
        active = active[~stop]
    assert stopped_at.tolist() == [10, -1, -1, 7]
    assert monitor.stop_reasons.tolist() == [StopReason.REPETITION, 0, 0, StopReason.REPETITION]
    assert monitor.lengths.tolist() == [11, steps, steps, 8]
    assert StopReason.REPETITION in StopReason.PRUNED


@pytest.mark.parametrize("chunk", [1, 3, 12])
def test_repetition_in_chunks_and_post_hoc_equals_steps(chunk):
    """observe() over chunks and drift_scan(tokens=) decide as step() does, also where drift and
    repetition compete (drift stops row 2 first; masked positions are skipped)."""
    tokens = _looping_rows()
    batch, steps = tokens.shape
    config = dataclasses.replace(LOOP, threshold=0.5, w_drop=0.5, min_weight=0.0)
    gen = torch.Generator().manual_seed(3)
    overlaps = torch.ones(batch, steps)
    overlaps[2, 3:] = 0.0  # row 2 drifts: two events exhaust its weight at position 4
    mask = torch.ones(batch, steps, dtype=torch.bool)
    mask[1, 9:] = False
    stepped = DriftMonitor(batch, config)
    for t in range(steps):
        rows = mask[:, t].nonzero().squeeze(-1)
        rows = rows[~stepped.stopped[rows]]
        # logits whose top-4 overlap is the wanted value: identical rows (1) or disjoint top-4 (0)
        s = torch.randn(rows.numel(), 20, generator=gen)
        t_logits = torch.where(overlaps[rows, t, None] > 0, s, -s)
        stepped.step(s, t_logits, tokens[rows, t], rows=rows)
    chunked = DriftMonitor(batch, config)
    for start in range(0, steps, chunk):
        cols = slice(start, start + chunk)
        chunked.observe(overlaps[:, cols], mask[:, cols], tokens=tokens[:, cols])
    scan = opd_ext.drift_scan(overlaps, config, mask=mask, tokens=tokens)
    assert stepped.stop_reasons.tolist() == [StopReason.REPETITION, 0, StopReason.WEIGHT_EXHAUSTED, 5]
    for name in ("stop_reasons", "lengths", "multipliers", "weights", "mask"):
        assert torch.equal(getattr(chunked, name), getattr(stepped, name)), name
    assert torch.equal(scan.stop_reasons, stepped.stop_reasons)
    assert torch.equal(scan.lengths, stepped.lengths)
    assert scan.stop_positions.tolist() == [10, -1, 4, 7]


def test_repetition_needs_the_tokens():
    monitor = DriftMonitor(2, LOOP)
    s = torch.randn(2, 20)
    with pytest.raises(ValueError, match="loop_window is set: the repetition check needs the sampled tokens"):
        monitor.step(s, s)
    with pytest.raises(ValueError, match="needs the sampled tokens"):
        monitor.observe(torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"tokens must be int64 of shape \(2, 3\)"):
        opd_ext.drift_scan(torch.ones(2, 3), LOOP, tokens=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="loop_window"):
        PruneConfig(loop_window=1)
    with pytest.raises(ValueError, match="loop_match"):
        PruneConfig(loop_window=8, loop_match=0.0)
    assert not LOOP.is_disabled


def test_repetition_with_loop_match_below_one_catches_varying_copies():
    """A sentence repeated with one token that changes each time: no exact loop, but 5 of every 6
    tokens equal the one 6 back. loop_match 0.75 stops it, 1.0 does not; text without repeats is
    never stopped."""
    varying = torch.tensor([[10, 11, 12, 13, 14, 20 + i] for i in range(6)]).reshape(1, -1)
    plain = torch.arange(36).reshape(1, -1)
    tokens = torch.cat([varying, plain])
    overlaps = torch.ones(tokens.shape)
    loose = dataclasses.replace(LOOP, loop_window=12, loop_match=0.75, loop_max_period=8)
    scan = opd_ext.drift_scan(overlaps, loose, tokens=tokens)
    # From position 6 on, five of every six tokens equal the one 6 back (6-10, 12-16, ...): the
    # ninth match inside a 12-token window is position 15.
    assert scan.stop_positions.tolist() == [15, -1]
    assert opd_ext.drift_scan(
        overlaps, dataclasses.replace(loose, loop_match=1.0), tokens=tokens
    ).stop_positions.tolist() == [-1, -1]


@pytest.mark.parametrize("ema_beta", [0.0, 0.5])
def test_calibrated_threshold_flags_at_most_the_quantile_of_reference_tokens(ema_beta):
    gen = torch.Generator().manual_seed(0)
    overlaps = (torch.rand(64, 40, generator=gen) * 16).floor() / 16  # top-16 overlaps: 17 values
    mask = torch.rand(64, 40, generator=gen) > 0.1
    config = PruneConfig(k=16, ema_beta=ema_beta, warmup=2).with_calibrated_threshold(overlaps, mask, quantile=0.1)
    assert 0.0 < config.threshold < 1.0 and config.k == 16 and config.warmup == 2
    scan = opd_ext.drift_scan(overlaps, dataclasses.replace(config, w_drop=0.0, min_weight=None), mask=mask)
    assert bool((scan.stop_positions < 0).all())
    # The monitor's own EMA and warmup decide what is an event: count them as it does.
    fraction = _event_fraction(overlaps, mask, ema_beta, warmup=2, threshold=config.threshold)
    assert 0.05 < fraction <= 0.1 + 0.002  # float32 EMA vs this float64 count: a token or two either side
    with pytest.raises(ValueError, match="quantile"):
        config.with_calibrated_threshold(overlaps, mask, quantile=1.0)


def _event_fraction(overlaps, mask, ema_beta, warmup, threshold):
    """The fraction of tokens past the warmup that the monitor counts as drift events, in plain
    Python (each row's own tokens, its EMA from its first one)."""
    events = counted = 0
    for row, valid in zip(overlaps.tolist(), mask.tolist()):
        ema, seen = None, 0
        for o, v in zip(row, valid):
            if not v:
                continue
            ema = o if ema is None else ema_beta * ema + (1 - ema_beta) * o
            if seen >= warmup:
                counted += 1
                events += ema < threshold
            seen += 1
    return events / counted


def test_budgets_beyond_int32_mean_no_cap_and_never_wrap():
    # An int64 tensor budget of 2**40 used to wrap to 0 in the int32 state and stop the row at once.
    config = opd_ext.PruneConfig(k=2, threshold=0.5)
    overlaps = torch.ones(2, 6)
    for budget in (torch.tensor([2**40, 4]), torch.tensor([2**31, 4]), torch.tensor([2**32 + 3, 4])):
        scan = opd_ext.drift_scan(overlaps, config, budget=budget)
        assert scan.stop_positions.tolist() == [-1, 3]
        monitor = opd_ext.DriftMonitor(2, config, budget=budget)
        monitor.observe(overlaps)
        assert monitor.stop_reasons.tolist() == [opd_ext.StopReason.RUNNING, opd_ext.StopReason.BUDGET]
    assert opd_ext.DriftMonitor(1, config, budget=2**40).state.budget.tolist() == [2**31 - 1]
