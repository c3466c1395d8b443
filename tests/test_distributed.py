"""opd_ext.distributed on real process groups: spawned CPU processes on gloo, as torchrun starts
them on GPUs with NCCL."""

import os
import sys
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import opd_ext
from opd_ext.distributed import global_num_items

VOCAB, HIDDEN = 40, 8


def _spawn(fn, world_size, *args):
    """Run fn(rank, world_size, *args) in world_size processes joined in a gloo group; a failure on
    any rank fails the test with that rank's traceback, named by rank.

    The ranks meet through a file store in a fresh directory, not a TCP port: picking a free port
    and binding it later races with every other process on the machine."""
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        mp.spawn(_init_and_run, args=(fn, world_size, store, args), nprocs=world_size, join=True)


def _init_and_run(rank, fn, world_size, store, args):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world_size, timeout=timedelta(seconds=120)
    )
    try:
        fn(rank, world_size, *args)
        # No rank tears the group down while another still talks to it.
        dist.barrier()
    except BaseException as error:
        dist.destroy_process_group()
        raise RuntimeError(f"rank {rank} of {world_size} failed: {type(error).__name__}: {error}") from error
    dist.destroy_process_group()
    # A rank whose work passed leaves without the interpreter's teardown: gloo's C++ threads, torn
    # down in static destructors at exit, occasionally abort a finished rank ("terminate called
    # without an active exception", seen about once in ten runs of the DTensor tests), which fails a
    # test whose every check passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _batch(micro_batches=2, rows=12, seed=0):
    """Hidden states, teacher logits, tokens and masks; rank r gets micro-batch rows [r::W]. The
    masks give the ranks very different token counts, where normalisation errors show."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(micro_batches):
        hidden = torch.randn(rows, 5, HIDDEN, generator=g)
        teacher = torch.randn(rows, 5, VOCAB, generator=g) * 2
        tokens = torch.randint(0, VOCAB, (rows, 5), generator=g)
        mask = torch.rand(rows, 5, generator=g) < torch.linspace(0.05, 0.95, rows)[:, None]
        out.append((hidden, teacher, tokens, mask))
    return out


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(HIDDEN, VOCAB)


def _loss(model, hidden, teacher, tokens, mask, num_items):
    return opd_ext.vopd_loss(model(hidden), teacher, tokens, mask=mask, num_items=num_items)


def _ddp_gradient(rank, world_size, normaliser):
    model = torch.nn.parallel.DistributedDataParallel(_model())
    shards = [tuple(t[rank::world_size] for t in micro) for micro in _batch()]
    num_items = global_num_items([mask for *_, mask in shards])
    if normaliser == "global_count":  # the normalisation a DDP user reaches for first
        num_items = num_items * world_size
    for i, shard in enumerate(shards):  # gradient accumulation: all-reduce on the last one only
        if i < len(shards) - 1:
            with model.no_sync():
                _loss(model, *shard, num_items).backward()
        else:
            _loss(model, *shard, num_items).backward()
    return [p.grad for p in model.parameters()]


def _worker(rank, world_size, out_path):
    results = {
        normaliser: _ddp_gradient(rank, world_size, normaliser) for normaliser in ("global_num_items", "global_count")
    }
    # No valid token on any rank: a count of 0, and a loss of exactly 0 everywhere.
    mask = torch.zeros(3, 4, dtype=torch.bool)
    num_items = global_num_items(mask)
    logits = torch.randn(3, 4, VOCAB, requires_grad=True)
    loss = opd_ext.reverse_kl_loss(logits, torch.randn(3, 4, VOCAB), mask=mask, num_items=num_items)
    loss.backward()
    results["all_masked"] = (num_items, loss.detach(), logits.grad)
    if rank == 0:
        torch.save(results, out_path)


def _single_process_gradient():
    model = _model()
    micro = _batch()
    total = sum(int(mask.sum()) for *_, mask in micro)
    for shard in micro:
        _loss(model, *shard, total).backward()
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize("world_size", [2, 4])
def test_global_num_items_makes_ddp_equal_one_process_on_the_whole_batch(tmp_path, world_size):
    """With gradient accumulation over two micro-batches and very uneven token counts per rank,
    DDP's averaged gradient equals one process's on the whole batch; the global count itself
    divides it by the world size."""
    path = tmp_path / "results.pt"
    _spawn(_worker, world_size, str(path))
    results = torch.load(path)
    want = _single_process_gradient()
    for normaliser, ratio in (("global_num_items", 1.0), ("global_count", 1.0 / world_size)):
        for got, expected in zip(results[normaliser], want):
            torch.testing.assert_close(got, expected * ratio, rtol=1e-5, atol=1e-7)
    num_items, loss, grad = results["all_masked"]
    assert num_items.item() == 0 and loss.item() == 0 and grad.eq(0).all()


def test_without_a_process_group_the_count_is_local():
    assert not dist.is_initialized()
    masks = [torch.tensor([[True, False, True]]), torch.tensor([1, 1, 0, 1], dtype=torch.uint8)]
    count = global_num_items(masks)
    assert count.dtype == torch.float32 and count.dim() == 0 and count.item() == 5
    assert global_num_items(masks[0]).item() == 2
    assert opd_ext.distributed.global_num_items is global_num_items
    with pytest.raises(TypeError, match="mask must be bool"):
        global_num_items(torch.ones(3))
    with pytest.raises(ValueError, match="at least one mask"):
        global_num_items([])


# ---- vocab-parallel ops ----------------------------------------------------------------------------

from opd_ext import distributed as opd_dist  # noqa: E402

# Shard widths per world size: even, uneven, and one narrower than k (the top-k candidates pad).
# The last of each: torch.chunk-style layouts with an empty shard (V = 64 over 4 ranks as 22, 22, 20,
# 0), on which every op must give the single-device result with no rank raising alone.
SHARDINGS = {2: [[32, 32], [41, 23], [64, 0]], 4: [[16, 16, 16, 16], [10, 37, 3, 14], [22, 22, 20, 0]]}
K = 5


def _vocab_parallel_inputs(dtype_pair, vocab=64, seed=0):
    """Full logits [2, 6, V] with ties across shard borders, a -inf row, a NaN row and -inf entries."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(2, 6, vocab, generator=g) * 3
    teacher = student + torch.randn(2, 6, vocab, generator=g)
    student[0, 1] = torch.randint(0, 3, (vocab,), generator=g).float()  # many exact ties
    teacher[0, 1] = torch.randint(0, 3, (vocab,), generator=g).float()
    student[0, 2, ::7] = float("-inf")
    teacher[1, 3] = float("-inf")  # a teacher without mass anywhere: KL inf, NaN gradients there
    teacher[1, 3, 5] = 0.0
    student[1, 4, 9] = float("nan")
    tokens = torch.randint(0, vocab, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4] = False  # the NaN row is masked out of the losses
    mask[1, 3] = False
    weights = torch.rand(2, 6, generator=g) + 0.5
    s_dtype, t_dtype = dtype_pair
    return student.to(s_dtype), teacher.to(t_dtype), tokens, mask, weights


def _shard(x, widths, rank):
    start = sum(widths[:rank])
    return x[..., start : start + widths[rank]], start


def _assert_close(got, want, dtype, what):
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.double(), want.double(), equal_nan=True, msg=lambda m: f"{what}: {m}", **tol)


def _vocab_parallel_worker(rank, world_size):
    for case, widths in enumerate(SHARDINGS[world_size]):
        for dtype_pair in [
            (torch.float32, torch.float32),
            (torch.bfloat16, torch.bfloat16),
            (torch.bfloat16, torch.float32),
        ]:
            student, teacher, tokens, mask, weights = _vocab_parallel_inputs(dtype_pair, vocab=sum(widths))
            s_local, start = _shard(student, widths, rank)
            t_local, _ = _shard(teacher, widths, rank)
            where = f"W={world_size} widths={widths} {dtype_pair}"
            # Both ways of finding the layout (alike on every rank: it decides the collectives):
            # given, or one all_gather of the widths.
            layout = dict(vocab_start=start, vocab=sum(widths)) if case % 2 else {}

            got = opd_dist.vocab_parallel_topk_overlap(s_local, t_local, K, **layout)
            torch.testing.assert_close(
                got,
                opd_ext.topk_overlap(student, teacher, K),
                equal_nan=True,
                rtol=0,
                atol=0,
                msg=lambda m: f"overlap {where}: {m}",
            )

            got = opd_dist.vocab_parallel_token_stats(
                s_local, t_local, tokens, temperature=0.8, forward_kl=True, **layout
            )
            want = opd_ext.token_stats(student, teacher, tokens, temperature=0.8, forward_kl=True)
            for name, g, w in zip(want._fields, got, want):
                _assert_close(g, w, dtype_pair[0], f"{name} {where}")

            for kwargs in (
                dict(baseline="full"),
                dict(baseline="full", kl="forward"),
                dict(baseline="topk", topk=K),
                dict(baseline="none"),
            ):
                x_local = s_local.clone().requires_grad_()
                loss = opd_dist.vocab_parallel_vopd_loss(
                    x_local, t_local, tokens, mask=mask, weights=weights, temperature=0.8, **kwargs, **layout
                )
                loss.backward()
                x = student.clone().requires_grad_()
                want = opd_ext.vopd_loss(x, teacher, tokens, mask=mask, weights=weights, temperature=0.8, **kwargs)
                want.backward()
                _assert_close(loss, want, dtype_pair[0], f"vopd {kwargs} {where}")
                _assert_close(
                    x_local.grad, _shard(x.grad, widths, rank)[0], dtype_pair[0], f"vopd grad {kwargs} {where}"
                )

            _check_drift_monitor(rank, widths, dtype_pair, layout, where)

            x_local = s_local.clone().requires_grad_()
            loss = opd_dist.vocab_parallel_reverse_kl_loss(x_local, t_local, mask=mask, temperature=1.3, **layout)
            loss.backward()
            x = student.clone().requires_grad_()
            want = opd_ext.reverse_kl_loss(x, teacher, mask=mask, temperature=1.3)
            want.backward()
            _assert_close(loss, want, dtype_pair[0], f"reverse_kl {where}")
            _assert_close(x_local.grad, _shard(x.grad, widths, rank)[0], dtype_pair[0], f"reverse_kl grad {where}")


def _check_drift_monitor(rank, widths, dtype_pair, layout, where):
    """A DriftMonitor over vocabulary shards decodes exactly as one over whole rows: same stops,
    multipliers and weights token by token, the token statistics within tolerance."""
    g = torch.Generator().manual_seed(7)
    batch, vocab, steps = 5, sum(widths), 12
    config = opd_ext.PruneConfig(k=K, threshold=0.6, w_drop=0.2, patience=2)
    whole = opd_ext.DriftMonitor(batch, config)
    sharded = opd_ext.DriftMonitor(
        batch, config, group=dist.group.WORLD, **{k: v for k, v in layout.items() if k in ("vocab_start", "vocab")}
    )
    active = torch.arange(batch)
    for _ in range(steps):
        if not active.numel():
            break
        student = (torch.randn(active.numel(), vocab, generator=g) * 2).to(dtype_pair[0])
        teacher = (student.float() + torch.randn(active.numel(), vocab, generator=g) * 1.5).to(dtype_pair[1])
        tokens = torch.randint(0, vocab, (active.numel(),), generator=g)
        stop = whole.step(student, teacher, tokens, rows=active)
        got = sharded.step(_shard(student, widths, rank)[0], _shard(teacher, widths, rank)[0], tokens, rows=active)
        assert torch.equal(got, stop), where
        active = active[~stop]
    for name in ("overlaps", "multipliers", "weights", "mask", "stop_reasons", "lengths"):
        assert torch.equal(getattr(sharded, name), getattr(whole, name)), f"DriftMonitor.{name} {where}"
    for name in ("student_logprobs", "teacher_logprobs", "reverse_kl"):
        _assert_close(getattr(sharded, name), getattr(whole, name), dtype_pair[0], f"DriftMonitor.{name} {where}")


@pytest.mark.parametrize("world_size", [2, 4])
def test_vocab_parallel_ops_equal_the_single_device_ops(world_size):
    """Every rank holds a contiguous vocabulary shard (even, uneven, narrower than k): the top-k
    overlap is exactly the single-device one (ties across shard borders included), statistics,
    losses and each shard's gradient agree within the dtype's tolerance, -inf and NaN rows too."""
    _spawn(_vocab_parallel_worker, world_size)


def test_vocab_parallel_ops_in_one_process_are_the_ops():
    student, teacher, tokens, mask, weights = _vocab_parallel_inputs((torch.float32, torch.float32))
    torch.testing.assert_close(
        opd_dist.vocab_parallel_topk_overlap(student, teacher, K),
        opd_ext.topk_overlap(student, teacher, K),
        equal_nan=True,
        rtol=0,
        atol=0,
    )
    with pytest.raises(ValueError, match=r"tokens must be ids in \[0, V=64\)"):
        opd_dist.vocab_parallel_vopd_loss(student, teacher, torch.full_like(tokens, 64))


def _dtensor_worker(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    student, teacher, tokens, mask, weights = _vocab_parallel_inputs((torch.float32, torch.float32), vocab=63)
    d_student = distribute_tensor(student, mesh, [Shard(-1)]).requires_grad_()
    d_teacher = distribute_tensor(teacher, mesh, [Shard(2)])
    d_mask = distribute_tensor(mask, mesh, [Replicate()])
    loss = opd_ext.vopd_loss(d_student, d_teacher, tokens, mask=d_mask, weights=weights, baseline="topk", topk=K)
    loss.backward()
    x = student.clone().requires_grad_()
    want = opd_ext.vopd_loss(x, teacher, tokens, mask=mask, weights=weights, baseline="topk", topk=K)
    want.backward()
    _assert_close(loss, want, torch.float32, "vopd_loss on DTensors")
    _assert_close(d_student.grad.full_tensor(), x.grad, torch.float32, "its gradient")
    torch.testing.assert_close(
        opd_ext.topk_overlap(d_student, d_teacher, K),
        opd_ext.topk_overlap(student, teacher, K),
        equal_nan=True,
        rtol=0,
        atol=0,
    )
    _assert_close(
        opd_ext.reverse_kl_loss(d_student, d_teacher, mask=mask),
        opd_ext.reverse_kl_loss(student, teacher, mask=mask),
        torch.float32,
        "reverse_kl_loss on DTensors",
    )
    stats = opd_ext.token_stats(d_student, d_teacher, tokens)
    for g, w in zip(stats, opd_ext.token_stats(student, teacher, tokens)):
        _assert_close(g, w, torch.float32, "token_stats on DTensors")
    replicated = distribute_tensor(student, mesh, [Replicate()])
    with pytest.raises(ValueError, match=r"sharded over the vocabulary \(Shard\(-1\)\)"):
        opd_ext.vopd_loss(replicated, d_teacher, tokens)
    with pytest.raises(TypeError, match="is a DTensor: this function takes plain tensors"):
        opd_ext.reverse_kl_loss_sparse_teacher(d_student, tokens[..., None], torch.zeros(2, 6, 1))


def test_dtensor_logits_sharded_over_the_vocabulary_take_the_vocab_parallel_path():
    _spawn(_dtensor_worker, 2)


def _topk_kl_case(vocab=61, k=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(3, 5, vocab, generator=g) * 2
    student = teacher + torch.randn(3, 5, vocab, generator=g)
    logq = torch.log_softmax(teacher, -1)
    values, ids = logq.topk(k, dim=-1)
    values[0, 1, -1] = float("-inf")  # a padded slot
    ids[0, 1, -1] = 10**6
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2, 4] = False
    weights = torch.rand(3, 5, generator=g) + 0.5
    return student, ids, values, mask, weights


def _topk_kl_worker(rank, world_size, widths):
    from opd_ext.distributed import vocab_parallel_topk_kl_loss
    from opd_ext.objective import TOPK_DIVERGENCES

    student, ids, logq, mask, weights = _topk_kl_case(vocab=sum(widths))
    for dtype in (torch.float32, torch.bfloat16):
        for divergence in TOPK_DIVERGENCES:
            full = student.to(dtype).clone().requires_grad_()
            want, want_stats = opd_ext.topk_kl_loss(
                full, ids, logq, divergence=divergence, mask=mask, weights=weights, temperature=0.8, return_stats=True
            )
            want.backward()
            local, start = _shard(student.to(dtype), widths, rank)
            local = local.clone().requires_grad_()
            got, stats = vocab_parallel_topk_kl_loss(
                local,
                ids,
                logq,
                divergence=divergence,
                mask=mask,
                weights=weights,
                temperature=0.8,
                return_stats=True,
            )
            got.backward()
            what = f"{divergence} {dtype} widths {widths}"
            _assert_close(got, want, dtype, what)
            _assert_close(stats.student_mass, want_stats.student_mass, dtype, what + " student mass")
            _assert_close(local.grad, full.grad[..., start : start + widths[rank]], dtype, what + " gradient")


@pytest.mark.parametrize("widths", [(30, 31), (20, 20, 21, 0)])
def test_vocab_parallel_topk_kl_equals_the_single_device_loss(widths):
    # (20, 20, 21, 0): torch.chunk's layout of 61 columns over 4 ranks can leave one empty.
    _spawn(_topk_kl_worker, len(widths), widths)


def test_vocab_parallel_topk_kl_in_one_process_is_the_loss():
    from opd_ext.distributed import vocab_parallel_topk_kl_loss

    student, ids, logq, mask, weights = _topk_kl_case()
    torch.testing.assert_close(
        vocab_parallel_topk_kl_loss(student, ids, logq, mask=mask), opd_ext.topk_kl_loss(student, ids, logq, mask=mask)
    )


def _topk_kl_dtensor_worker(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    student, ids, logq, mask, weights = _topk_kl_case()
    d_student = distribute_tensor(student, mesh, [Shard(-1)]).requires_grad_()
    loss = opd_ext.topk_kl_loss(d_student, ids, logq, mask=mask, weights=weights)
    loss.backward()
    x = student.clone().requires_grad_()
    want = opd_ext.topk_kl_loss(x, ids, logq, mask=mask, weights=weights)
    want.backward()
    _assert_close(loss, want, torch.float32, "topk_kl_loss on a DTensor")
    _assert_close(d_student.grad.full_tensor(), x.grad, torch.float32, "its gradient")


def test_topk_kl_loss_on_a_dtensor_takes_the_vocab_parallel_path():
    _spawn(_topk_kl_dtensor_worker, 2)


def _dtensor_empty_shard_worker(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 6, 5, generator=g) * 2
    teacher = student + torch.randn(2, 6, 5, generator=g)
    tokens = torch.randint(0, 5, (2, 6), generator=g)
    mask = torch.rand(2, 6, generator=g) > 0.2
    weights = torch.rand(2, 6, generator=g) + 0.5
    d_student = distribute_tensor(student, mesh, [Shard(-1)]).requires_grad_()
    d_teacher = distribute_tensor(teacher, mesh, [Shard(-1)])
    assert d_student.to_local().shape[-1] == [2, 2, 1, 0][rank]  # torch.chunk's layout of 5 over 4
    loss = opd_ext.vopd_loss(d_student, d_teacher, tokens, mask=mask, weights=weights)
    loss.backward()
    x = student.clone().requires_grad_()
    want = opd_ext.vopd_loss(x, teacher, tokens, mask=mask, weights=weights)
    want.backward()
    _assert_close(loss, want, torch.float32, "vopd_loss on DTensors with an empty shard")
    _assert_close(d_student.grad.full_tensor(), x.grad, torch.float32, "its gradient")
    torch.testing.assert_close(
        opd_ext.topk_overlap(d_student, d_teacher, 2), opd_ext.topk_overlap(student, teacher, 2), equal_nan=True
    )


def test_dtensor_logits_with_an_empty_shard():
    _spawn(_dtensor_empty_shard_worker, 4)
