"""The lm_head as the fused-linear losses compute it: a weight, an optional bias and LoRA adapters,
resolved from ``nn.Linear`` and PEFT modules, and the adapters' part of each row chunk.

A LoRA layer's base weight alone would silently drop its adapters: the loss would score different
logits and the adapters would get no gradient. Given the module, each chunk adds the adapters'
low-rank term to its logits (``scale · (dropout(x) @ A.T) @ B.T``, as PEFT's forward does) and the
adapters' gradients are summed per chunk, so no merged ``[V, H]`` weight or its gradient is formed.
Adapter kinds whose forward is not that sum (DoRA, lora_bias, other PEFT tuners) are refused with a
TypeError that says how to proceed. peft is never imported: layers are recognised by attributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["LinearHead", "LoraAdapter", "linear_head"]


@dataclass(frozen=True)
class LoraAdapter:
    """One LoRA adapter of an lm_head: ``logits += scale · (dropout(x) @ a.T) @ b.T``.

    ``a`` is ``lora_A.weight`` ``[r, H]``, ``b`` is ``lora_B.weight`` ``[V, r]``, both of one floating
    dtype (PEFT keeps them in float32 beside a bf16 base by default; the hidden states are cast to
    it, as PEFT's forward does). ``dropout`` is the probability applied to the adapter's input, 0 in
    eval mode.
    """

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    dropout: float = 0.0


@dataclass(frozen=True)
class LinearHead:
    """An lm_head as the fused-linear losses compute it:
    ``logits = x @ weight.T + bias + Σ_adapters scale · (dropout(x) @ a.T) @ b.T``."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None
    adapters: tuple[LoraAdapter, ...] = ()


def linear_head(module) -> LinearHead:
    """The weight, bias and active LoRA adapters of an lm_head module.

    The fused-linear losses call this themselves when ``student_weight`` / ``teacher_weight`` is a
    module; call it to inspect what they will compute. Accepted:

    * ``torch.nn.Linear`` (``weight`` ``[V, H]``, optional ``bias`` ``[V]``);
    * a PEFT LoRA layer wrapping one (``peft.tuners.lora.Linear``, found by its ``base_layer`` and
      ``lora_A`` attributes; peft is not imported): every active, unmerged adapter becomes a
      :class:`LoraAdapter` with the layer's scaling and, in training mode, its dropout. Disabled
      adapters are left out; merged ones are already part of the base weight, as in PEFT's forward;
    * a PEFT ``modules_to_save`` wrapper: the copy the active adapter trains (the original when
      adapters are disabled);
    * a :class:`LinearHead`, returned as is.

    Raises:
        TypeError: any other module, or a PEFT layer whose forward is not the sum above: DoRA and
            the other LoRA variants, ``lora_bias=True``, ``fan_in_fan_out``, other PEFT tuners and
            wrappers (e.g. trainable tokens). Merge such adapters first
            (``model.merge_and_unload()``, or ``merge_adapter()`` and a frozen head), or compute the
            logits with the module and use ``opd_ext.vopd_loss`` / ``opd_ext.reverse_kl_loss``.
        ValueError: adapter shapes that do not match the base weight.
    """
    if isinstance(module, LinearHead):
        return module
    if isinstance(module, torch.Tensor):
        raise TypeError("linear_head takes the lm_head module (e.g. model.lm_head), not its weight tensor")
    name = type(module).__name__
    unsupported = (
        f"the fused-linear losses cannot compute the lm_head {name}: merge its adapters into the "
        f"weight first (peft: model.merge_and_unload()), or compute the logits with the module and "
        f"use opd_ext.vopd_loss / opd_ext.reverse_kl_loss"
    )
    if hasattr(module, "original_module"):  # PEFT's auxiliary training wrappers
        copies = getattr(module, "modules_to_save", None)
        if not isinstance(copies, torch.nn.ModuleDict):
            raise TypeError(f"{unsupported} ({name} changes the head's weight in a way they do not model)")
        active = list(module.active_adapters)
        if module.disable_adapters or not active or active[0] not in copies:
            return linear_head(module.original_module)
        return linear_head(copies[active[0]])
    if hasattr(module, "base_layer"):  # a PEFT tuner layer
        if not hasattr(module, "lora_A"):
            raise TypeError(f"{unsupported} (only LoRA adapters are computed in the fused losses)")
        return _lora_head(module, unsupported)
    if isinstance(module, torch.nn.Linear):
        return LinearHead(module.weight, module.bias)
    raise TypeError(
        f"expected the lm_head as a torch.nn.Linear, a PEFT LoRA layer or an opd_ext.lm_head.LinearHead, got {name}"
    )


def _lora_head(layer, unsupported: str) -> LinearHead:
    base = linear_head(layer.base_layer)
    if layer.merged:
        if layer.disable_adapters:
            # PEFT's forward would unmerge (changing the weights) before running the base layer.
            raise TypeError(f"{unsupported} (its adapters are merged but disabled: call unmerge_adapter() first)")
        return base
    if layer.disable_adapters:
        return base
    if getattr(layer, "fan_in_fan_out", False):
        raise TypeError(f"{unsupported} (fan_in_fan_out: the base weight is stored [H, V])")
    variants = getattr(layer, "lora_variant", {}) or {}
    adapters = []
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A:
            continue
        if adapter in variants or getattr(layer, "use_dora", {}).get(adapter, False):
            raise TypeError(f"{unsupported} (adapter {adapter!r} is a LoRA variant such as DoRA)")
        lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
        dropout = layer.lora_dropout[adapter]
        if not (isinstance(lora_a, torch.nn.Linear) and isinstance(lora_b, torch.nn.Linear)) or lora_a.bias is not None:
            raise TypeError(f"{unsupported} (adapter {adapter!r} is not a pair of bias-free linear maps)")
        if lora_b.bias is not None:
            raise TypeError(f"{unsupported} (adapter {adapter!r} has lora_bias)")
        if not isinstance(dropout, (torch.nn.Dropout, torch.nn.Identity)):
            raise TypeError(f"{unsupported} (adapter {adapter!r} has a {type(dropout).__name__} on its input)")
        p = float(dropout.p) if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
        a, b = lora_a.weight, lora_b.weight
        vocab, hidden = base.weight.shape
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != hidden or b.shape != (vocab, a.shape[0]):
            raise ValueError(
                f"LoRA adapter {adapter!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do "
                f"not fit the base weight [V={vocab}, H={hidden}] (need [r, H] and [V, r])"
            )
        adapters.append(LoraAdapter(a, b, float(layer.scaling[adapter]), p))
    return LinearHead(base.weight, base.bias, base.adapters + tuple(adapters))


def resolve_head(side: str, weight, bias):
    """``{side}_weight`` as a tensor or an lm_head module -> (weight, bias, adapters)."""
    if weight is None or isinstance(weight, torch.Tensor):
        return weight, bias, ()
    head = linear_head(weight)
    if bias is not None:
        raise ValueError(
            f"{side}_bias was given but {side}_weight is a module ({type(weight).__name__}), "
            f"which carries its own bias; pass one or the other"
        )
    for adapter in head.adapters:
        for name, tensor in (("lora_A", adapter.a), ("lora_B", adapter.b)):
            if tensor.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise TypeError(f"{side} LoRA {name} must be float32, bfloat16 or float16, got {tensor.dtype}")
            if tensor.device != head.weight.device:
                raise ValueError(
                    f"{side} LoRA {name} is on {tensor.device} but the lm_head weight is on "
                    f"{head.weight.device}; use one device"
                )
    return head.weight, head.bias, head.adapters


class AdapterTerms:
    """The LoRA adapters' part of one chunk: their logit terms, and from the chunk's logit-gradient
    their share of grad_hidden and the sums of their own gradients. Memory: up to two more [c, V]
    buffers in the adapters' dtype while a chunk's logits and logit-gradient pass through them, the
    [c, r] and [c, H] inputs each adapter keeps for the chunk's backward, and float32 sums of A
    [r, H] and B [V, r]."""

    def __init__(self, adapters: tuple[LoraAdapter, ...], needs=None):
        self.adapters = adapters
        needs = needs or [(False, False)] * len(adapters)
        self.grad_a = [
            torch.zeros_like(ad.a, dtype=torch.float32) if need_a else None for ad, (need_a, _) in zip(adapters, needs)
        ]
        self.grad_b = [
            torch.zeros_like(ad.b, dtype=torch.float32) if need_b else None for ad, (_, need_b) in zip(adapters, needs)
        ]
        self.saved = []

    def add_to_logits(self, x: torch.Tensor, logits: torch.Tensor, save: bool = True) -> torch.Tensor:
        """``logits`` [c, V] plus every adapter's term for the rows ``x`` [c, H], rounded once to the
        logits' dtype (PEFT adds float32 adapter terms to the base output, then casts back). With
        ``save``, keeps what :meth:`backward` needs for this chunk."""
        if not self.adapters:  # no side effect to trace under torch.compile
            return logits
        self.saved = []
        out = logits
        for ad in self.adapters:
            x_in, keep = x.to(ad.a.dtype), None
            if ad.dropout > 0:
                # Inverted dropout, kept as a scaled mask: the chunk's backward needs it.
                keep = torch.empty_like(x_in).bernoulli_(1.0 - ad.dropout).div_(1.0 - ad.dropout)
                x_in = x_in * keep
            # F.linear, as PEFT's lora_A / lora_B modules run: the same products, bit for bit.
            u = F.linear(x_in, ad.a)  # [c, r]
            delta = F.linear(u, ad.b).mul_(ad.scale)
            # In place into whichever of the two [c, V] buffers has the promoted dtype.
            out = delta.add_(out) if torch.promote_types(out.dtype, delta.dtype) == delta.dtype else out.add_(delta)
            if save:
                self.saved.append((x_in, u, keep))
        return out.to(logits.dtype)

    def backward(self, grad_logits: torch.Tensor, need_hidden: bool) -> Optional[torch.Tensor]:
        """Adds the chunk's A and B gradients to the sums; returns the adapters' part of the rows'
        grad_hidden (float32 or the adapters' dtype) when ``need_hidden``."""
        grad_x = None
        for i, (ad, (x_in, u, keep)) in enumerate(zip(self.adapters, self.saved)):
            g = grad_logits.to(ad.b.dtype)
            g_u = (g @ ad.b) * ad.scale  # d loss / d u [c, r]
            if self.grad_b[i] is not None:
                self.grad_b[i] += (g.t() @ u).float() * ad.scale
            if self.grad_a[i] is not None:
                self.grad_a[i] += (g_u.t() @ x_in).float()
            if need_hidden:
                term = g_u @ ad.a
                if keep is not None:
                    term = term * keep
                grad_x = term if grad_x is None else grad_x + term
        if self.adapters:
            self.saved = []
        return grad_x

    def results(self) -> list[Optional[torch.Tensor]]:
        """[grad A_0, grad B_0, grad A_1, ...] in the adapters' dtypes (None where not needed)."""
        out = []
        for ad, ga, gb in zip(self.adapters, self.grad_a, self.grad_b):
            out += [None if ga is None else ga.to(ad.a.dtype), None if gb is None else gb.to(ad.b.dtype)]
        return out
