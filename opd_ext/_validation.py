"""Argument checks shared by every public entry point (SPEC §3).

Errors name the argument and say what was expected, so a user can fix the call without reading
our source.
"""
from __future__ import annotations

import torch

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_logits(name: str, logits) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of logits [..., V], got {type(logits).__name__}")
    if logits.dim() < 1:
        raise ValueError(f"{name} must have a vocabulary dimension [..., V], got a 0-d tensor")
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {logits.dtype}")
    if logits.shape[-1] == 0:
        raise ValueError(f"{name} has an empty vocabulary dimension ({_describe(logits)})")


def check_logit_pair(student_logits, teacher_logits) -> None:
    """Same leading shape, same vocabulary, same device, and a supported dtype pair."""
    check_logits("student_logits", student_logits)
    check_logits("teacher_logits", teacher_logits)
    s, t = student_logits, teacher_logits
    if s.device != t.device:
        raise ValueError(
            f"student_logits is on {s.device} but teacher_logits is on {t.device}; move both to one device"
        )
    if s.shape[-1] != t.shape[-1]:
        shared = min(s.shape[-1], t.shape[-1])
        raise ValueError(
            f"vocabulary mismatch: student_logits has V={s.shape[-1]}, teacher_logits has V={t.shape[-1]}. "
            f"Models of one family often pad the embedding differently (Qwen: 151936 vs 152064); if the "
            f"tokenizers agree, slice both to the shared vocabulary: "
            f"opd_ext.align_vocab(student_logits, teacher_logits), i.e. logits[..., :{shared}]"
        )
    if s.shape != t.shape:
        raise ValueError(
            f"student_logits {tuple(s.shape)} and teacher_logits {tuple(t.shape)} must have the same shape"
        )
    if s.dtype != t.dtype and not (s.dtype in _LOW_PRECISION and t.dtype == torch.float32):
        raise TypeError(
            f"unsupported dtype mix: student_logits {s.dtype}, teacher_logits {t.dtype}. Supported: one "
            f"dtype for both, or a bfloat16/float16 student with a float32 teacher; cast the other side"
        )


def check_k(k, vocab: int, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    if not 1 <= k <= vocab:
        raise ValueError(f"{name}={k} is out of range: need 1 <= {name} <= V={vocab}")
    return k


def align_vocab(student_logits: torch.Tensor, teacher_logits: torch.Tensor):
    """Slice two logit tensors to their shared vocabulary prefix (views, no copy).

    Use when student and teacher share a tokenizer but pad their embedding tables to different
    sizes (Qwen2.5: 151936 vs 152064). The extra rows are padding that no token id reaches.
    """
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    return student_logits[..., :vocab], teacher_logits[..., :vocab]
