"""On-policy distillation on several processes with opd_ext: data parallel and vocab (tensor) parallel.

    torchrun --nproc_per_node=2 examples/distributed_opd.py                 # both modes, CPU (gloo)
    torchrun --nproc_per_node=8 examples/distributed_opd.py --mode dp       # GPUs (nccl), unchanged

--mode dp: every rank holds the whole student (DistributedDataParallel) and samples its own
rollouts; the teacher scores them; `opd_ext.distributed.global_num_items(mask)` is the normaliser
under which DDP's gradient averaging equals one process training on all ranks' tokens.

--mode tp: the student's lm_head is column-parallel (Megatron style): rank r holds the rows
[start_r, start_r + V_r) of the output embedding, so each rank only ever has its [N, V_r] shard of
the logits. `opd_ext.distributed.vocab_parallel_vopd_loss` exchanges a few floats per token (32
bytes, plus 12·k with the top-k baseline) instead of the V logits, and each rank gets the gradient
of its own shard. --check compares the loss with the unsharded one on rank 0.

The models are tiny and random (built from a config, nothing downloads): the point is the wiring,
which is the same at any size.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from transformers import Qwen2Config, Qwen2ForCausalLM

import opd_ext
from opd_ext.distributed import global_num_items, vocab_parallel_vopd_loss

VOCAB = 1000


def tiny_model(seed: int, hidden: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(config)


def rollouts(student, prompts: torch.Tensor, new_tokens: int, seed: int):
    """Sample completions from the student (on-policy); returns sequences and the completion mask."""
    torch.manual_seed(seed)
    with torch.no_grad():
        sequences = student.generate(
            prompts,
            do_sample=True,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
            attention_mask=torch.ones_like(prompts),
        )
    mask = torch.zeros_like(sequences, dtype=torch.bool)
    mask[:, prompts.shape[1] :] = True
    return sequences, mask


def shifted(logits, sequences, mask):
    """Logits at t predict token t + 1."""
    return logits[:, :-1], sequences[:, 1:], mask[:, 1:]


class _CopyToTensorParallel(torch.autograd.Function):
    """Identity forward; the backward sums the input gradient over the tensor-parallel group (every
    shard of the head contributes to d loss / d hidden), as Megatron's column-parallel linear does."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class ColumnParallelHead(torch.nn.Module):
    """This rank's rows of an lm_head weight [V, H]: logits [..., V_r] for ids [start, start + V_r)."""

    def __init__(self, weight: torch.Tensor, rank: int, world: int, group=None):
        super().__init__()
        widths = [len(c) for c in torch.arange(weight.shape[0]).tensor_split(world)]  # uneven allowed
        self.start, self.vocab, self.group = sum(widths[:rank]), weight.shape[0], group
        self.weight = torch.nn.Parameter(weight[self.start : self.start + widths[rank]].detach().clone())

    def forward(self, hidden):
        return torch.nn.functional.linear(_CopyToTensorParallel.apply(hidden, self.group), self.weight)


def train_dp(args, rank, world, device):
    student = tiny_model(0, args.hidden).to(device)
    teacher = tiny_model(1, 2 * args.hidden).to(device).eval().requires_grad_(False)
    ddp = torch.nn.parallel.DistributedDataParallel(
        student, device_ids=[device.index] if device.type == "cuda" else None
    )
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=args.lr)
    for step in range(args.steps):
        start = time.perf_counter()
        prompts = torch.randint(1, VOCAB, (args.batch_size, 8), device=device)
        sequences, mask = rollouts(student, prompts, args.new_tokens, seed=1000 * step + rank)
        # Rows end at different lengths in real runs: drop a few tokens per rank so counts differ.
        mask[: rank + 1, -(rank + 1) :] = False
        with torch.no_grad():
            teacher_logits = teacher(sequences).logits
        s, tokens, m = shifted(ddp(sequences).logits, sequences, mask)
        t, _, _ = shifted(teacher_logits, sequences, mask)
        num_items = global_num_items(m)  # global valid tokens / W: one all_reduce of one float
        loss = opd_ext.vopd_loss(s, t, tokens, mask=m, num_items=num_items, baseline="full")
        optimizer.zero_grad()
        loss.backward()  # DDP averages the gradient over the ranks
        optimizer.step()
        with torch.no_grad():  # the mean reverse KL over every rank's tokens: sums and counts reduced
            kl = opd_ext.token_stats(s.detach(), t, tokens).reverse_kl[m].sum()
            totals = torch.stack([kl, loss.detach()])
        dist.all_reduce(totals)
        if rank == 0:
            # Each rank's loss is W x its tokens' share: their mean is one process's loss on all.
            print(
                f"[dp] step {step}: surrogate {totals[1].item() / world:+.4f}  reverse KL "
                f"{totals[0].item() / (num_items.item() * world):.4f}  tokens {num_items.item() * world:.0f}  "
                f"{time.perf_counter() - start:.2f}s",
                flush=True,
            )


def train_tp(args, rank, world, device):
    # Every rank holds the same trunk (data parallelism over it is DDP as in --mode dp); the output
    # embedding is split over the vocabulary.
    student = tiny_model(0, args.hidden).to(device)
    teacher = tiny_model(1, 2 * args.hidden).to(device).eval().requires_grad_(False)
    head = ColumnParallelHead(student.lm_head.weight, rank, world).to(device)
    teacher_head = ColumnParallelHead(teacher.lm_head.weight, rank, world).to(device).requires_grad_(False)
    optimizer = torch.optim.AdamW([*student.model.parameters(), *head.parameters()], lr=args.lr)
    for step in range(args.steps):
        start = time.perf_counter()
        torch.manual_seed(step)  # one batch for the whole tensor-parallel group
        prompts = torch.randint(1, VOCAB, (args.batch_size, 8), device=device)
        sequences, mask = rollouts(student, prompts, args.new_tokens, seed=step)
        with torch.no_grad():
            teacher_shard = teacher_head(teacher.model(sequences).last_hidden_state)
        student_shard = head(student.model(sequences).last_hidden_state)  # [B, T, V_r]
        s, tokens, m = shifted(student_shard, sequences, mask)
        t, _, _ = shifted(teacher_shard, sequences, mask)
        loss = vocab_parallel_vopd_loss(
            s, t, tokens, mask=m, baseline="topk", topk=16, vocab_start=head.start, vocab=head.vocab
        )
        optimizer.zero_grad()
        loss.backward()  # each rank: its shard of the head; the trunk's gradient is all-reduced
        optimizer.step()
        if rank == 0:
            line = f"[tp] step {step}: surrogate {loss.item():+.4f}  shard V_r={s.shape[-1]} of V={head.vocab}"
            print(line + f"  {time.perf_counter() - start:.2f}s", flush=True)
        if args.check:
            check_against_unsharded(s.detach(), t, tokens, m, loss.detach(), rank, world)


def check_against_unsharded(s, t, tokens, mask, loss, rank, world):
    """Gather the full logits once (what vocab parallelism avoids) and compare on rank 0."""
    widths = _widths(s.shape[-1], world)
    shards = [s.new_empty((*s.shape[:-1], n)) for n in widths]
    t_shards = [t.new_empty((*t.shape[:-1], n)) for n in widths]
    dist.all_gather(shards, s.contiguous())
    dist.all_gather(t_shards, t.contiguous())
    if rank == 0:
        want = opd_ext.vopd_loss(
            torch.cat(shards, -1), torch.cat(t_shards, -1), tokens, mask=mask, baseline="topk", topk=16
        )
        print(
            f"     unsharded loss {want.item():+.6f}, vocab-parallel {loss.item():+.6f}, "
            f"|diff| {abs(want.item() - loss.item()):.1e}",
            flush=True,
        )


def _widths(local: int, world: int) -> list[int]:
    out = [None] * world
    dist.all_gather_object(out, local)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--mode", choices=["dp", "tp", "both"], default="both")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4, help="rollouts per rank (dp) or per group (tp)")
    p.add_argument("--new-tokens", type=int, default=12)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--check",
        action="store_true",
        help="tp mode: compare each loss with the unsharded one (dp needs no check: "
        "tests/test_distributed.py compares DDP with one process)",
    )
    args = p.parse_args(argv)
    if "RANK" not in os.environ:
        p.error("start it with torchrun, e.g. torchrun --nproc_per_node=2 examples/distributed_opd.py")

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    if rank == 0:
        print(f"{world} processes on {dist.get_backend()}, device {device.type}", flush=True)
    try:
        if args.mode in ("dp", "both"):
            train_dp(args, rank, world, device)
        if args.mode in ("tp", "both"):
            train_tp(args, rank, world, device)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
