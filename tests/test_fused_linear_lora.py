"""The fused-linear losses given the lm_head module: its bias and PEFT LoRA adapters are part of the
logits, and the adapters get their gradients.

Ground truth: the reference losses on the logits the module itself computes, with autograd through
the module (PEFT's own forward). Tolerances as in tests/test_fused_linear.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from opd_ext import reference
from opd_ext.fused_linear import (
    LinearHead,
    fused_linear_reverse_kl_loss,
    fused_linear_vopd_loss,
    linear_head,
)

N_ROWS, HIDDEN, VOCAB, RANK = 37, 24, 129, 4
LOSS_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4}
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


class TinyLM(nn.Module):
    def __init__(self, dtype=torch.float32, bias=True):
        super().__init__()
        self.body = nn.Linear(HIDDEN, HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=bias)
        with torch.no_grad():
            self.lm_head.weight.mul_(2.0)  # logits of std ~1-2: peaked, not one-hot
        self.to(dtype)

    def forward(self, x):
        return self.lm_head(self.body(x))


def lora_model(dtype=torch.float32, seed=0, **config):
    """A PEFT model with LoRA on lm_head; lora_B is drawn at random (PEFT starts it at 0, which would
    make the adapters a no-op, as before any training step)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    config = dict(dict(target_modules=["lm_head"], r=RANK, lora_alpha=8), **config)
    model = peft.get_peft_model(TinyLM(dtype), peft.LoraConfig(**config))
    head = model.base_model.model.lm_head
    with torch.no_grad():
        for lora_b in head.lora_B.values():
            lora_b.weight.normal_(0.0, 0.5)
    return model, head


def adapter_params(head):
    return [p for name in head.active_adapters for p in (head.lora_A[name].weight, head.lora_B[name].weight)]


def inputs(dtype, device, seed=1):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N_ROWS, HIDDEN, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    teacher = (torch.randn(N_ROWS, VOCAB, generator=gen) * 2).to(device=device, dtype=dtype)
    tokens = torch.randint(0, VOCAB, (N_ROWS,), generator=gen).to(device)
    mask = (torch.rand(N_ROWS, generator=gen) > 0.25).to(device)
    return hidden, teacher, tokens, mask


def losses(kind, tokens, mask):
    """(fused loss taking (hidden, head, teacher_logits), reference loss on logits) of one kind."""
    if kind == "vopd":
        return (
            lambda h, head, t, **kw: fused_linear_vopd_loss(h, head, tokens, teacher_logits=t, mask=mask, **kw),
            lambda logits, t: reference.vopd_loss(logits, t, tokens, mask=mask),
        )
    return (
        lambda h, head, t, **kw: fused_linear_reverse_kl_loss(h, head, teacher_logits=t, mask=mask, **kw),
        lambda logits, t: reference.reverse_kl_loss(logits, t, mask=mask),
    )


def assert_close_with_grads(actual, expected, params, dtype):
    loss, ref_loss = actual, expected
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert rel_err(loss, ref_loss) <= LOSS_TOL[dtype], (loss.item(), ref_loss.item())
    grads = torch.autograd.grad(loss, params)
    ref_grads = torch.autograd.grad(ref_loss, params)
    for i, (grad, ref) in enumerate(zip(grads, ref_grads)):
        assert grad.dtype == ref.dtype and grad.shape == ref.shape, i
        assert rel_err(grad, ref) <= GRAD_TOL[dtype], (i, rel_err(grad, ref))


# ---- LoRA adapters (PEFT) ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16 base: PEFT keeps fp32 adapters
@pytest.mark.parametrize("kind", ["vopd", "reverse_kl"])
@pytest.mark.parametrize("chunk_size", [5, None])
def test_lora_head_matches_the_module(device, dtype, kind, chunk_size):
    model, head = lora_model(dtype)
    model.to(device)
    hidden, teacher, tokens, mask = inputs(dtype, device)
    fused, ref = losses(kind, tokens, mask)
    params = [hidden, head.base_layer.bias, *adapter_params(head)]
    head.base_layer.bias.requires_grad_()
    assert not head.base_layer.weight.requires_grad  # frozen by PEFT: no [V, H] gradient is formed
    assert_close_with_grads(
        fused(hidden, head, teacher, chunk_size=chunk_size), ref(head(hidden), teacher), params, dtype
    )


def test_base_weight_alone_would_score_other_logits():
    # What the module route prevents: the base weight ignores the adapters' logit term.
    model, head = lora_model()
    hidden, teacher, tokens, mask = inputs(torch.float32, "cpu")
    fused, ref = losses("vopd", tokens, mask)
    with_module = fused(hidden, head, teacher)
    base_only = fused_linear_vopd_loss(
        hidden, head.base_layer.weight, tokens, student_bias=head.base_layer.bias, teacher_logits=teacher, mask=mask
    )
    assert rel_err(with_module, ref(head(hidden), teacher)) <= 1e-5
    assert rel_err(base_only, with_module) > 1e-2


def test_two_active_adapters_and_a_lora_teacher():
    peft = pytest.importorskip("peft")
    model, head = lora_model()
    model.add_adapter("second", peft.LoraConfig(target_modules=["lm_head"], r=2, lora_alpha=3))
    model.base_model.set_adapter(["default", "second"])
    with torch.no_grad():
        head.lora_B["second"].weight.normal_(0.0, 0.5)
    assert len(linear_head(head).adapters) == 2
    # The teacher: its own LoRA head, detached (its adapters get no gradient).
    gen = torch.Generator().manual_seed(5)
    _, t_head = lora_model(seed=3)
    t_hidden = torch.randn(N_ROWS, HIDDEN, generator=gen)
    hidden, _, tokens, mask = inputs(torch.float32, "cpu")
    params = [hidden, *adapter_params(head)]
    loss = fused_linear_vopd_loss(
        hidden, head, tokens, teacher_hidden=t_hidden, teacher_weight=t_head, mask=mask, chunk_size=7
    )
    expected = reference.vopd_loss(head(hidden), t_head(t_hidden).detach(), tokens, mask=mask)
    assert_close_with_grads(loss, expected, params, torch.float32)


def test_lora_dropout_in_training_mode():
    model, head = lora_model(lora_dropout=0.3)
    hidden, teacher, tokens, _ = inputs(torch.float32, "cpu")
    fused, ref = losses("reverse_kl", tokens, None)
    params = [hidden, *adapter_params(head)]
    head.eval()  # dropout off: the module's logits exactly
    assert linear_head(head).adapters[0].dropout == 0.0
    assert_close_with_grads(fused(hidden, head, teacher), ref(head(hidden), teacher), params, torch.float32)

    # In training mode one chunk draws one inverted-dropout mask over the adapter's input [N, H]
    # from the global generator; the same draw gives the module's logits under that mask.
    head.train()
    torch.manual_seed(11)
    loss = fused(hidden, head, teacher)
    torch.manual_seed(11)
    keep = torch.empty(N_ROWS, HIDDEN).bernoulli_(0.7).div_(0.7)
    name = "default"
    a, b = head.lora_A[name].weight, head.lora_B[name].weight
    logits = head.base_layer(hidden) + F.linear(F.linear(hidden * keep, a), b) * head.scaling[name]
    assert_close_with_grads(loss, ref(logits, teacher), params, torch.float32)
    # A different draw gives a different loss: the dropout is really applied.
    assert rel_err(fused(hidden, head, teacher), loss) > 1e-6


def test_disabled_and_merged_adapters_follow_the_module():
    model, head = lora_model()
    hidden, teacher, tokens, mask = inputs(torch.float32, "cpu")
    fused, ref = losses("vopd", tokens, mask)
    with model.disable_adapter():
        assert linear_head(head).adapters == ()
        assert rel_err(fused(hidden, head, teacher), ref(head(hidden), teacher)) <= 1e-5
    head.merge()
    assert linear_head(head).adapters == () and linear_head(head).weight is head.base_layer.weight
    assert rel_err(fused(hidden, head, teacher), ref(head(hidden), teacher)) <= 1e-5


def test_modules_to_save_wrapper_trains_its_copy():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(TinyLM(), peft.LoraConfig(target_modules=["body"], r=RANK, modules_to_save=["lm_head"]))
    wrapper = model.base_model.model.lm_head
    copy = wrapper.modules_to_save["default"]
    with torch.no_grad():
        copy.weight.add_(torch.randn_like(copy.weight))  # trained away from the frozen original
    hidden, teacher, tokens, mask = inputs(torch.float32, "cpu")
    fused, ref = losses("vopd", tokens, mask)
    assert linear_head(wrapper).weight is copy.weight
    assert_close_with_grads(
        fused(hidden, wrapper, teacher), ref(wrapper(hidden), teacher), [hidden, copy.weight, copy.bias], torch.float32
    )


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(use_dora=True), "LoRA variant such as DoRA"),
        (dict(lora_bias=True), "lora_bias"),
    ],
)
def test_unsupported_lora_kinds_raise(config, match):
    model, head = lora_model(**config)
    hidden, teacher, tokens, _ = inputs(torch.float32, "cpu")
    with pytest.raises(TypeError, match=rf"merge_and_unload\(\).*{match}"):
        fused_linear_vopd_loss(hidden, head, tokens, teacher_logits=teacher)


def test_other_peft_tuners_raise():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(TinyLM(), peft.IA3Config(target_modules=["lm_head"], feedforward_modules=[]))
    with pytest.raises(TypeError, match="only LoRA adapters"):
        linear_head(model.base_model.model.lm_head)


# ---- plain modules (no peft needed) -----------------------------------------------------------------
def test_linear_module_equals_its_tensors(device):
    head = TinyLM().lm_head.to(device)
    hidden, teacher, tokens, mask = inputs(torch.float32, device)
    from_module = fused_linear_vopd_loss(hidden, head, tokens, teacher_logits=teacher, mask=mask, chunk_size=6)
    from_tensors = fused_linear_vopd_loss(
        hidden, head.weight, tokens, student_bias=head.bias, teacher_logits=teacher, mask=mask, chunk_size=6
    )
    assert torch.equal(from_module, from_tensors)
    params = [hidden, head.weight, head.bias]
    for got, want in zip(torch.autograd.grad(from_module, params), torch.autograd.grad(from_tensors, params)):
        assert torch.equal(got, want)
    head_as_value = LinearHead(head.weight, head.bias)
    assert linear_head(head_as_value) is head_as_value


def test_module_arguments_are_checked():
    head = TinyLM().lm_head
    hidden, teacher, tokens, _ = inputs(torch.float32, "cpu")
    with pytest.raises(ValueError, match="student_bias was given but student_weight is a module"):
        fused_linear_vopd_loss(hidden, head, tokens, student_bias=head.bias, teacher_logits=teacher)
    with pytest.raises(TypeError, match="takes the lm_head module"):
        linear_head(head.weight)
    with pytest.raises(TypeError, match="expected the lm_head as a torch.nn.Linear"):
        fused_linear_vopd_loss(hidden, nn.Conv1d(HIDDEN, VOCAB, 1), tokens, teacher_logits=teacher)
