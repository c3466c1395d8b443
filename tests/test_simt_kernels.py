"""Every CUDA kernel and launch path, run by the SIMT emulator (opd_ext.testing) on the host.

Each case picks a shape and a device profile that make the launcher take one path (a block per
row, row slices + merge kernel, warp-per-row groups, the top-k kernel, the scalar path of rows
that cannot be vector-aligned, ...), checks from the emulator's counters that it did, compares
with the CPU kernels (exactly for top-k overlap and drift, within the docs/spec.md §4 tolerances for the
softmax statistics) and requires bit-identical outputs under the forward, reverse and random
thread schedules. The device-parametrised tests elsewhere run the whole API on the emulated
device too (the "emu" device of conftest.py).
"""

import pytest
import torch

import opd_ext
import opd_ext.testing as simt
from opd_ext import reference

from conftest import DTYPE_PAIRS, STAT_FIELDS, assert_stats_match_reference, stat_tolerance

ops = torch.ops.opd_ext

pytestmark = [
    pytest.mark.emu,
    pytest.mark.skipif(not simt.simt_available(), reason="opd_ext was built without the SIMT emulator"),
]


def _pair(rows, vocab, student_dtype=torch.float32, teacher_dtype=torch.float32, layout="contiguous", seed=0):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, vocab, generator=gen) * 3
    teacher = student + torch.randn(rows, vocab, generator=gen)
    return _place(student.to(student_dtype), layout), _place(teacher.to(teacher_dtype), layout)


def _place(values, layout):
    """Same values at other addresses: row offsets that misalign odd V, column slices whose
    offsets no common head can align (the all-scalar path)."""
    rows, vocab = values.shape
    if layout == "contiguous":
        return values
    if layout == "row_offset":
        base = torch.empty(rows + 1, vocab, dtype=values.dtype)
        base[1:] = values
        return base[1:]
    base = torch.zeros(rows, vocab + 8, dtype=values.dtype)
    offset = int(layout.removeprefix("column_"))
    base[:, offset : offset + vocab] = values
    return base[:, offset : offset + vocab]


def _launches(fn, device):
    """Runs fn on the emulated device; returns (result, number of kernel launches)."""
    with simt.emulated_cuda(device=device):
        before = simt.emulator_counters()["launches"]
        result = fn()
        return result, simt.emulator_counters()["launches"] - before


# ---- top-k overlap ----------------------------------------------------------------------------------

TOPK_PATHS = [
    # (id, rows, vocab, k, device profile, launches): a block per row (enough rows to fill the
    # GPU, or rows too short to slice) or row slices + merge kernel (decode-sized batches).
    ("block_per_row", 6, 9000, 16, "tiny", 1),  # 6 rows fill 2 SMs
    ("block_per_row_h100", 280, 600, 16, "h100", 1),
    ("short_rows", 5, 3000, 16, "h100", 1),
    ("slices_h100", 2, 20000, 16, "h100", 2),
    ("slices_l4", 3, 33000, 64, "l4", 2),
    ("slices_tiny", 1, 9000, 16, "tiny", 2),
    ("k_at_the_streaming_limit", 2, 4099, 1024, "h100", 1),
    ("k_1", 7, 4099, 1, "a100", 1),
]


@pytest.mark.parametrize("case", TOPK_PATHS, ids=lambda c: c[0])
def test_topk_overlap_paths(case):
    _, rows, vocab, k, device, launches = case
    student, teacher = _pair(rows, vocab)
    want = ops.topk_overlap(student, teacher, k)
    got, n = _launches(lambda: ops.topk_overlap(student, teacher, k), device)
    assert n == launches
    assert torch.equal(got, want)
    simt.run_all_schedules(lambda: ops.topk_overlap(student, teacher, k), device=device)


def test_topk_overlap_from_a_noisy_teacher_with_many_compactions():
    # A buffer within one tile of its capacity before most tiles: the streaming top-k compacts
    # often, and every thread must take the same decision each time.
    student = torch.randn(1, 4099)
    teacher = student + torch.randn(1, 4099)
    for k in (100, 1024):
        want = ops.topk_overlap(student, teacher, k)
        got = simt.run_all_schedules(lambda: ops.topk_overlap(student, teacher, k))["output"]
        assert torch.equal(got, want), (k, got, want)


@pytest.mark.parametrize("student_dtype,teacher_dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("layout", ["contiguous", "row_offset", "column_3"])
def test_topk_overlap_dtypes_and_layouts(student_dtype, teacher_dtype, layout):
    student, teacher = _pair(3, 1001, student_dtype, teacher_dtype, layout)
    student[1, :500] = 0.5  # ties around the k-th value: lower index first
    teacher[2, 7] = float("nan")
    want = ops.topk_overlap(student, teacher, 16)
    got = simt.run_all_schedules(lambda: ops.topk_overlap(student, teacher, 16), sm_count=1)["output"]
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


# ---- token statistics ---------------------------------------------------------------------------------

STAT_PATHS = [
    # (id, rows, vocab, topk, device profile, launches)
    ("warp_per_row", 11, 100, 0, "h100", 1),
    ("two_warps_per_row", 9, 2000, 0, "h100", 1),
    ("four_warps_per_row", 5, 4096, 0, "h100", 1),
    ("block_per_row", 40, 10000, 0, "h100", 1),
    ("slices_and_merge_h100", 3, 40000, 0, "h100", 2),
    ("slices_and_merge_tiny", 3, 40000, 0, "tiny", 2),
    ("slices_and_merge_l4", 1, 70000, 0, "l4", 2),
    ("topk_baseline", 3, 5000, 100, "h100", 1),
    ("topk_baseline_k_1024", 2, 4099, 1024, "h100", 1),
]


def _stats(student, teacher, tokens, temperature, topk):
    return dict(zip(STAT_FIELDS, ops.token_stats(student, teacher, tokens, temperature, topk)))


@pytest.mark.parametrize("case", STAT_PATHS, ids=lambda c: c[0])
def test_token_stats_paths(case):
    _, rows, vocab, topk, device, launches = case
    student, teacher = _pair(rows, vocab)
    tokens = torch.randint(0, vocab, (rows,))
    got, n = _launches(lambda: _stats(student, teacher, tokens, 0.8, topk), device)
    assert n == launches
    assert_stats_match_reference(got, student, teacher, tokens, 0.8, topk)
    simt.run_all_schedules(lambda: _stats(student, teacher, tokens, 0.8, topk), device=device)


@pytest.mark.parametrize("student_dtype,teacher_dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("layout", ["contiguous", "row_offset", "column_3", "mixed"])
def test_token_stats_dtypes_and_layouts(student_dtype, teacher_dtype, layout):
    if layout == "mixed":  # offsets no common head aligns: the whole row runs scalar
        student, _ = _pair(4, 3001, student_dtype, teacher_dtype, "column_1")
        _, teacher = _pair(4, 3001, student_dtype, teacher_dtype, "column_2")
    else:
        student, teacher = _pair(4, 3001, student_dtype, teacher_dtype, layout)
    student[3, 5] = float("-inf")
    teacher[2, 9] = float("nan")
    tokens = torch.randint(0, 3001, (4,))
    flat = simt.run_all_schedules(lambda: _stats(student, teacher, tokens, 1.0, 5), sm_count=1)
    got = {name: flat[f"output[{name}]"] for name in STAT_FIELDS}
    assert_stats_match_reference(got, student, teacher, tokens, 1.0, 5)


@pytest.mark.parametrize(
    "case",
    [
        ("warp_per_row", 11, 100, "h100", 1),
        ("block_per_row", 5, 9000, "h100", 1),
        ("slices_and_merge", 2, 40000, "a100", 2),
    ],
    ids=lambda c: c[0],
)
def test_student_stats_paths(case):
    _, rows, vocab, device, launches = case
    student, _ = _pair(rows, vocab, torch.bfloat16)
    tokens = torch.randint(0, vocab, (rows,))
    got, n = _launches(lambda: ops.student_stats(student, tokens, 1.3), device)
    assert n == launches
    want = reference.token_stats(student, student, tokens, 1.3)
    torch.testing.assert_close(got[0].double(), want["student_logprob"], **stat_tolerance(torch.bfloat16))
    torch.testing.assert_close(got[1].double(), want["student_lse"], **stat_tolerance(torch.bfloat16))
    simt.run_all_schedules(lambda: ops.student_stats(student, tokens, 1.3), device=device)


# ---- fused backwards ------------------------------------------------------------------------------------


@pytest.mark.parametrize("student_dtype,teacher_dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("rows,vocab,profile", [(11, 100, "h100"), (3, 40000, "h100"), (4, 3001, "tiny")])
def test_backwards(student_dtype, teacher_dtype, rows, vocab, profile):
    student, teacher = _pair(rows, vocab, student_dtype, teacher_dtype)
    tokens = torch.randint(0, vocab, (rows,))
    coef = torch.randn(rows)
    coef[0] = 0.0  # a masked row: zeros without reading its logits
    s_lp, t_lp, kl, _, _, s_lse, t_lse = ops.token_stats(student, teacher, tokens, 0.7, 0)
    want_pg = ops.policy_gradient_backward(coef, student, tokens, s_lse, 0.7)
    want_kl = ops.reverse_kl_backward(coef, student, teacher, s_lse, t_lse, kl, 0.7)
    grads = simt.run_all_schedules(
        lambda: (
            ops.policy_gradient_backward(coef, student, tokens, s_lse, 0.7),
            ops.reverse_kl_backward(coef, student, teacher, s_lse, t_lse, kl, 0.7),
        ),
        device=profile,
    )
    # CPU and emulated CUDA kernels round differently (their exps differ by a few ulp).
    eps = {torch.float32: 5e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11}[student_dtype]
    for got, want in ((grads["output[0]"], want_pg), (grads["output[1]"], want_kl)):
        assert got.dtype == student_dtype and got.shape == student.shape
        assert torch.equal(got[0], torch.zeros_like(got[0]))
        torch.testing.assert_close(
            got.float(), want.float(), rtol=4 * eps, atol=4 * eps * want.float().abs().max().item()
        )


# ---- Prune-OPD drift -----------------------------------------------------------------------------------------


def _drift_inputs(batch, vocab, seed=0):
    student, teacher = _pair(batch, vocab, seed=seed)
    teacher[: batch // 2] = torch.randn(batch // 2, vocab) * 3  # drifted rows: low overlap
    return student, teacher


def _drift_run(student, teacher, tokens, rows, steps=4):
    """A few decode steps of DriftMonitor's op on fresh state; returns every output and the state."""
    config = opd_ext.PruneConfig(k=16, warmup=1, patience=1, threshold=0.5)
    monitor = opd_ext.DriftMonitor(student.shape[0] if rows is None else int(rows.max()) + 1, config)
    outputs = []
    for step in range(steps):
        out = ops.drift_step(
            student.roll(step, -1),
            teacher.roll(step, -1),
            tokens,
            rows,
            *monitor.state,
            config.k,
            1.0,
            **config.kernel_args(),
        )
        outputs.append(out)
    return outputs, tuple(t.clone() for t in monitor.state)


@pytest.mark.parametrize(
    "batch,vocab,profile,launches", [(6, 9000, "tiny", 1), (4, 20000, "h100", 2), (2, 9000, "tiny", 2)]
)
@pytest.mark.parametrize("with_tokens", [False, True])
@pytest.mark.parametrize("with_rows", [False, True])
def test_drift_step_paths(batch, vocab, profile, launches, with_tokens, with_rows):
    student, teacher = _drift_inputs(batch, vocab)
    tokens = torch.randint(0, vocab, (batch,)) if with_tokens else None
    rows = torch.randperm(batch + 3)[:batch] if with_rows else None
    want_out, want_state = _drift_run(student, teacher, tokens, rows)
    (got_out, got_state), n = _launches(lambda: _drift_run(student, teacher, tokens, rows), profile)
    assert n == 4 * launches
    for got, want in zip(got_out, want_out):
        for name, g, w in zip(("overlap", "multiplier", "stopped"), got[:3], want[:3]):
            assert torch.equal(g, w), name
        for g, w in zip(got[3:], want[3:]):  # token statistics: two float32 approximations
            torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-6)
    for g, w in zip(got_state, want_state):
        assert torch.equal(g, w)
    simt.run_all_schedules(lambda: _drift_run(student, teacher, tokens, rows), device=profile)


def test_drift_scan():
    overlaps = torch.rand(37, 50)
    mask = torch.rand(37, 50) > 0.2
    config = opd_ext.PruneConfig(k=16, warmup=2, patience=2, threshold=0.6)

    def run():
        state = opd_ext.DriftMonitor(37, config).state
        out = ops.drift_scan(overlaps, mask, *state, **config.kernel_args())
        return out, tuple(t.clone() for t in state)

    want_out, want_state = run()
    got = list(simt.run_all_schedules(run).values())  # forward run, after every schedule agreed
    want = list(want_out) + list(want_state)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


# ---- the emulator as a backend -------------------------------------------------------------------------------


def test_losses_forward_and_backward_run_the_cuda_kernels():
    student, teacher = _pair(6, 5000)
    tokens = torch.randint(0, 5000, (6,))
    x_cpu = student.clone().requires_grad_()
    opd_ext.vopd_loss(x_cpu, teacher, tokens).backward()
    with simt.emulated_cuda():
        before = simt.emulator_counters()["launches"]
        x = student.clone().requires_grad_()
        opd_ext.vopd_loss(x, teacher, tokens).backward()
        assert simt.emulator_counters()["launches"] - before >= 2  # forward statistics + backward
    torch.testing.assert_close(x.grad, x_cpu.grad, rtol=1e-5, atol=1e-7)


def test_emulator_settings_are_restored_and_validated():
    before = simt.emulator_config()
    with simt.emulated_cuda(device="l4", schedule="random", seed=5, sm_count=7):
        cfg = simt.emulator_config()
        assert (cfg["device"], cfg["schedule"], cfg["seed"], cfg["sm_count"]) == ("l4", "random", 5, 7)
    assert simt.emulator_config() == before
    with pytest.raises(ValueError, match="unknown device profile"):
        with simt.emulated_cuda(device="v99"):
            pass
    with pytest.raises(ValueError, match="schedule"):
        with simt.emulated_cuda(schedule="sideways"):
            pass


def test_cuda_only_limits_apply_under_emulation():
    student, teacher = _pair(2, 3000)
    with simt.emulated_cuda():
        # The CUDA top-k keeps at most 1024 candidates: the wrapper falls back to the reference.
        assert torch.equal(
            opd_ext.topk_overlap(student, teacher, 2000), opd_ext.reference.topk_overlap(student, teacher, 2000).float()
        )
        with pytest.raises(RuntimeError, match="supports k <= 1024"):
            ops.topk_overlap(student, teacher, 2000)


def test_vopd_topk_baseline_beyond_the_streaming_limit_falls_back_to_a_sort():
    student, teacher = _pair(3, 3000)
    tokens = torch.randint(0, 3000, (3,))
    want = opd_ext.vopd_loss(student, teacher, tokens, baseline="topk", topk=2000)
    with simt.emulated_cuda():
        got = opd_ext.vopd_loss(student, teacher, tokens, baseline="topk", topk=2000)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_drift_step_beyond_the_streaming_limit_decides_as_the_cpu_kernels():
    """k above the CUDA top-k limit: the op layer takes the overlap from the torch backend and the
    state machine and token statistics from the kernels; every decision equals the CPU kernels'."""
    config = opd_ext.PruneConfig(k=1100, threshold=0.95, w_drop=0.3)
    batch, vocab = 4, 3000
    cpu = opd_ext.DriftMonitor(batch, config)
    emulated = opd_ext.DriftMonitor(batch, config)
    active = torch.arange(batch)
    for step in range(5):
        student, teacher = _pair(active.numel(), vocab, seed=step)
        tokens = torch.randint(0, vocab, (active.numel(),))
        want = cpu.step(student, teacher, tokens, rows=active, temperature=0.7)
        with simt.emulated_cuda():
            got = emulated.step(student, teacher, tokens, rows=active, temperature=0.7)
        assert torch.equal(got, want)
        active = active[~want]
        if not active.numel():
            break
    assert cpu.stopped.any()  # the drift path was exercised, not only the running rows
    for name in ("overlaps", "weights", "multipliers", "mask", "stop_reasons", "lengths"):
        assert torch.equal(getattr(emulated, name), getattr(cpu, name)), name
    for name in ("student_logprobs", "teacher_logprobs", "reverse_kl"):
        torch.testing.assert_close(getattr(emulated, name), getattr(cpu, name), rtol=1e-5, atol=1e-5)


def test_innermost_context_wins_and_other_threads_are_not_routed():
    import threading

    student, teacher = _pair(2, 600)

    def launches(fn):
        before = simt.emulator_counters()["launches"]
        fn()
        return simt.emulator_counters()["launches"] - before

    run = lambda: opd_ext.topk_overlap(student, teacher, 4)  # noqa: E731
    with simt.emulated_cuda():
        assert launches(run) == 1
        with simt.cpu_kernels():
            assert not simt.emulating() and launches(run) == 0
            with simt.emulated_cuda(device="l4"):
                assert simt.emulating() and launches(run) == 1
            assert not simt.emulating()
        seen = {}
        worker = threading.Thread(target=lambda: seen.update(emulating=simt.emulating(), launches=launches(run)))
        worker.start()
        worker.join()
        assert seen == {"emulating": False, "launches": 0}
    assert not simt.emulating()


def test_run_all_schedules_refuses_to_check_nothing():
    student, teacher = _pair(2, 600)
    with pytest.raises(AssertionError, match="launched no emulated kernel"):
        simt.run_all_schedules(lambda: student + 1)
    with pytest.raises(AssertionError, match="returned no tensor"):
        simt.run_all_schedules(lambda: ops.topk_overlap(student, teacher, 4).sum().item())
    flips = iter(range(100))
    with pytest.raises(
        AssertionError, match=r"differs between the forward and reverse schedules, first at flat index 1"
    ):
        simt.run_all_schedules(lambda: ops.topk_overlap(student, teacher, 4) + torch.tensor([0.0, next(flips)]))


@pytest.mark.parametrize("registers,blocks", [(64, 1502), (48, 602)])
def test_occupancy_assumption_changes_the_launch_shape(registers, blocks):
    # 300 rows x 65536: a block per row, cut into slices until the last wave is nearly full; with
    # fewer registers per thread more blocks are resident, so the launcher cuts differently.
    student, _ = _pair(300, 65536, torch.bfloat16)
    tokens = torch.randint(0, 65536, (300,))
    want = ops.student_stats(student, tokens, 1.0)
    with simt.emulated_cuda(registers_per_thread=registers):
        before = simt.emulator_counters()["blocks"]
        got = ops.student_stats(student, tokens, 1.0)
        assert simt.emulator_counters()["blocks"] - before == blocks
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-6)
