"""Run inside the verl environment with megatron-core (scripts/setup_verl_env.sh): verl's Megatron
top-k path on two gloo processes with tensor parallelism 2 (each rank holds half of the vocabulary),
for verl's own forward_kl_topk and for opd_ext's modes, against opd_ext on the unsharded logits.
Prints one JSON report from rank 0."""

import json
import os
import socket
import sys
import types

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

VOCAB, K = 96, 8
SEQS = [5, 7, 4]


def _inputs():
    g = torch.Generator().manual_seed(0)
    total = sum(SEQS)
    teacher = torch.randn(total, VOCAB, generator=g) * 4
    values, ids = torch.log_softmax(teacher, -1).topk(K, dim=-1)
    return values, ids.to(torch.int32), g


def _worker(rank, world, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import megatron.core.parallel_state as ps

        ps.initialize_model_parallel(tensor_model_parallel_size=world)
        import verl  # noqa: F401  (loads the opd_ext plugin)
        from tensordict import TensorDict
        from verl.models.mcore.util import preprocess_thd_engine
        from verl.trainer.distillation import losses as verl_losses
        from verl.workers.config import DistillationConfig, DistillationLossConfig

        import opd_ext
        from opd_ext.integrations import verl as plugin

        values, ids, g = _inputs()

        def nested(x):
            return torch.nested.nested_tensor(list(x.split(SEQS)), layout=torch.jagged)

        data = TensorDict({"teacher_logprobs": nested(values), "teacher_ids": nested(ids)}, batch_size=[])
        padded_ids, *_ = preprocess_thd_engine(data["teacher_ids"], pre_process=True)
        padded_logprobs, *_ = preprocess_thd_engine(data["teacher_logprobs"], pre_process=True)
        n = padded_ids.shape[1]
        # Context-parallel alignment pads sequences with rows of K copies of id 0 at log-prob 0;
        # they lie outside every response mask (verl counts that id K times, opd_ext once).
        real = padded_logprobs.abs().sum(-1) > 0
        # A diffuse student, so that verl's clamp of negative forward KLs never acts.
        full = 0.3 * torch.randn(1, n, VOCAB, generator=g)
        width = VOCAB // world
        local_slice = slice(rank * width, (rank + 1) * width)
        report = {}
        modes = ["forward_kl_topk"] + list(plugin.LOSS_MODES)
        for mode in modes:
            loss_config = DistillationLossConfig(
                loss_mode=mode, topk=K, use_policy_gradient=False, loss_max_clamp=None, log_prob_min_clamp=None
            )
            config = DistillationConfig(enabled=False, distillation_loss=loss_config)
            local = full[..., local_slice].clone().requires_grad_(True)
            out = verl_losses.compute_topk_loss(types.SimpleNamespace(strategy="megatron"), config, data, local, "thd")
            (out["distillation_losses"] * real).sum().backward()
            divergence = plugin.LOSS_MODES.get(mode, "forward")
            x = full.clone().requires_grad_(True)
            want = opd_ext.topk_kl_loss(x, padded_ids.long(), padded_logprobs, divergence=divergence, reduction="none")
            (want * real).sum().backward()
            entry = {
                "max_loss_diff": float((out["distillation_losses"].detach() - want.detach())[real].abs().max()),
                "max_loss": float(want.detach().abs().max()),
                "max_grad_diff": float((local.grad - x.grad[..., local_slice]).abs().max()),
                "max_grad": float(x.grad.abs().max()),
            }
            entry["outputs"] = {name: out[name].detach().double()[real] for name in out}
            report[mode] = entry
        # opd_ext's forward mode against verl's own, output by output.
        ours, theirs = report["opd_ext_forward_kl_topk"]["outputs"], report["forward_kl_topk"]["outputs"]
        compare = {name: float((ours[name] - theirs[name]).abs().max()) for name in theirs}
        for entry in report.values():
            entry.pop("outputs")
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(
                    {"modes": report, "opd_ext_vs_verl_forward": compare, "rows": n, "real_rows": int(real.sum())}, f
                )
    finally:
        dist.destroy_process_group()


def main():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out_path = sys.argv[1]
    mp.spawn(_worker, args=(2, port, out_path), nprocs=2, join=True)
    with open(out_path) as f:
        sys.stdout.write(f.read())


if __name__ == "__main__":
    main()
