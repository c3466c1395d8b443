"""opd_ext.distributed on real process groups: spawned CPU processes on gloo, as torchrun starts
them on GPUs with NCCL."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import opd_ext
from opd_ext.distributed import global_num_items

VOCAB, HIDDEN = 40, 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world_size, *args):
    """Run fn(rank, world_size, *args) in world_size processes joined in a gloo group."""
    mp.spawn(_init_and_run, args=(fn, world_size, _free_port(), args), nprocs=world_size, join=True)


def _init_and_run(rank, fn, world_size, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def _batch(micro_batches=2, rows=12, seed=0):
    """Hidden states, teacher logits, tokens and masks; rank r gets micro-batch rows [r::W]. The
    masks give the ranks very different token counts, where normalisation errors show."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for m in range(micro_batches):
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
    results = {normaliser: _ddp_gradient(rank, world_size, normaliser)
               for normaliser in ("global_num_items", "global_count")}
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
