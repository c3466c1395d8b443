"""Run inside an environment with the pinned verl (scripts/setup_verl_env.sh); prints one JSON report.

tests/test_verl_integration.py starts it: verl's own distillation loss path (its logits processor
``distillation_ppo_loss(student_logits=...)`` and its final loss ``distillation_ppo_loss(model_output=...)``)
runs on packed (THD) CPU tensors with each opd_ext loss mode selected through verl's config, and the
values and gradients are compared with opd_ext.topk_kl_loss on the same tensors, and for
``opd_ext_forward_kl_topk`` with verl's own ``forward_kl_topk``.
"""

import json
import sys

import torch
import verl  # loads the opd_ext plugin through the verl.plugins entry point
from verl.trainer.distillation import losses as verl_losses
from verl.trainer.distillation.losses import distillation_ppo_loss
from verl.workers.config import ActorConfig, DistillationConfig, DistillationLossConfig

# The overrides of docs/verl.md's command (model paths are only names here: nothing is loaded).
OVERRIDES = [
    "actor_rollout_ref.model.path=Qwen/Qwen3-1.7B",
    "actor_rollout_ref.actor.strategy=fsdp2",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.rollout.name=vllm",
    "actor_rollout_ref.rollout.n=4",
    "distillation.enabled=True",
    "distillation.n_gpus_per_node=8",
    "distillation.nnodes=1",
    "distillation.teacher_models.teacher_model.model_path=Qwen/Qwen3-8B",
    "distillation.teacher_models.teacher_model.num_replicas=1",
    "distillation.distillation_loss.loss_mode=opd_ext_forward_kl_topk_tail",
    "distillation.distillation_loss.topk=32",
    "distillation.distillation_loss.use_policy_gradient=False",
    "distillation.distillation_loss.use_task_rewards=False",
]


def composed_configs(mode, k):
    """verl's own trainer config (ppo_trainer.yaml through Hydra) with OVERRIDES and this mode: the
    actor and distillation dataclasses verl's workers get."""
    import os

    from hydra import compose, initialize_config_dir
    from verl.utils.config import omega_conf_to_dataclass

    overrides = [
        o
        for o in OVERRIDES
        if not o.startswith(("distillation.distillation_loss.loss_mode", "distillation.distillation_loss.topk"))
    ]
    overrides += [f"distillation.distillation_loss.loss_mode={mode}", f"distillation.distillation_loss.topk={k}"]
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=overrides)
    return omega_conf_to_dataclass(cfg.actor_rollout_ref.actor), omega_conf_to_dataclass(cfg.distillation)


def packed_batch(prompt_lens, response_lens, vocab, k, seed=0):
    """A micro-batch as verl's FSDP engine holds it with remove-padding: nested prompts / responses /
    response_mask, teacher top-k per sequence position (int32 ids, as verl's teacher manager sends)."""
    from tensordict import TensorDict

    g = torch.Generator().manual_seed(seed)
    seqs = [p + r for p, r in zip(prompt_lens, response_lens)]
    total = sum(seqs)
    # A diffuse student and a peaked teacher, so verl's clamp of negative forward KLs never acts and
    # its forward_kl_topk can be compared value for value.
    teacher_logits = torch.randn(total, vocab, generator=g) * 4
    logq = torch.log_softmax(teacher_logits, -1)
    values, ids = logq.topk(k, dim=-1)
    student = (0.3 * torch.randn(1, total, vocab, generator=g)).requires_grad_(True)

    def nested(rows, lengths):
        return torch.nested.nested_tensor(list(rows.split(lengths)), layout=torch.jagged)

    prompts = nested(torch.randint(0, vocab, (sum(prompt_lens),), generator=g), prompt_lens)
    responses = nested(torch.randint(0, vocab, (sum(response_lens),), generator=g), response_lens)
    mask = nested(torch.ones(sum(response_lens), dtype=torch.int64), response_lens)
    n_tokens = sum(response_lens)
    data = TensorDict(
        {
            "prompts": prompts,
            "responses": responses,
            "response_mask": mask,
            "teacher_ids": nested(ids.to(torch.int32), seqs),
            "teacher_logprobs": nested(values, seqs),
            "dp_size": 1,
            "batch_num_tokens": n_tokens,
            "global_batch_size": len(seqs),
        },
        batch_size=[],
    )
    return data, student, ids, values


def response_positions(prompt_lens, response_lens):
    """Packed positions whose logits predict a response token (verl's no_padding_2_padding shift)."""
    out, offset = [], 0
    for p, r in zip(prompt_lens, response_lens):
        end = offset + p + r
        out += list(range(end - r - 1, end - 1))
        offset = end
    return torch.tensor(out)


def verl_loss(mode, data, student, k, *, composed=True):
    if composed:
        actor, distillation = composed_configs(mode, k)
    else:  # verl's own forward_kl_topk, its clamps off so that values compare
        actor = ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, ppo_mini_batch_size=1, rollout_n=1)
        loss_config = DistillationLossConfig(
            loss_mode=mode,
            topk=k,
            use_policy_gradient=False,
            use_task_rewards=False,
            loss_max_clamp=None,
            log_prob_min_clamp=None,
        )
        distillation = DistillationConfig(enabled=False, distillation_loss=loss_config)
    outputs = distillation_ppo_loss(config=actor, distillation_config=distillation, data=data, student_logits=student)
    model_output = {name: value.squeeze(0) for name, value in outputs.items()}
    loss, metrics = distillation_ppo_loss(
        config=actor, distillation_config=distillation, model_output=model_output, data=data
    )
    (grad,) = torch.autograd.grad(loss, student)
    plain = {name: float(m.aggregate() if hasattr(m, "aggregate") else m) for name, m in metrics.items()}
    return loss.detach(), grad, outputs, plain


def main():
    import opd_ext
    from opd_ext.integrations import verl as plugin

    report = {"verl": verl.__version__, "registered": sorted(verl_losses.DISTILLATION_LOSS_REGISTRY)}
    prompt_lens, response_lens, vocab, k = [3, 5, 2], [6, 4, 7], 97, 8
    data, student, ids, values = packed_batch(prompt_lens, response_lens, vocab, k)
    positions = response_positions(prompt_lens, response_lens)
    modes = {}
    for mode, divergence in plugin.LOSS_MODES.items():
        loss, grad, outputs, metrics = verl_loss(mode, data, student, k)
        # opd_ext on the same tensors: the per-position divergence, averaged over response tokens.
        x = student.detach().clone().requires_grad_(True)
        terms = opd_ext.topk_kl_loss(x[0], ids, values, divergence=divergence, reduction="none")
        want = terms[positions].sum() / len(positions)
        (want_grad,) = torch.autograd.grad(want, x)
        modes[mode] = {
            "loss": float(loss),
            "opd_ext_loss": float(want.detach()),
            "max_grad_diff": float((grad - want_grad).abs().max()),
            "max_grad": float(want_grad.abs().max()),
            "metrics": metrics,
            "output_shapes": {name: list(v.shape) for name, v in outputs.items()},
        }
    loss, grad, outputs, metrics = verl_loss("forward_kl_topk", data, student, k, composed=False)
    ours = modes["opd_ext_forward_kl_topk"]
    _, our_grad, our_outputs, _ = verl_loss("opd_ext_forward_kl_topk", data, student, k, composed=False)
    report["verl_forward_kl_topk"] = {
        "loss": float(loss),
        "opd_ext_loss": ours["loss"],
        "max_grad_diff": float((grad - our_grad).abs().max()),
        "max_grad": float(grad.abs().max()),
        "metrics": metrics,
        "min_per_token": float(outputs["distillation_losses"].min()),
        "max_output_diff": {
            name: float((outputs[name].double() - our_outputs[name].double()).abs().max())
            for name in (
                "distillation_losses",
                "student_mass",
                "teacher_mass",
                "overlap_count",
                "overlap_token_advantage",
            )
        },
    }
    report["modes"] = modes
    actor, distillation = composed_configs("opd_ext_reverse_kl_topk_tail", k)
    report["composed"] = {
        "actor": type(actor).__name__,
        "strategy": actor.strategy,
        "loss_mode": distillation.distillation_loss.loss_mode,
        "use_topk": distillation.distillation_loss.loss_settings.use_topk,
        "loss_agg_mode": actor.loss_agg_mode,
    }
    try:
        plugin.check_verl_version("0.8.2")
        report["old_version_refused"] = None
    except ImportError as error:
        report["old_version_refused"] = str(error)
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
