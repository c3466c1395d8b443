"""Argument checks shared by every public entry point (docs/spec.md §3).

Errors name the argument and say what was expected, so a user can fix the call without reading
our source.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from opd_ext import ops

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_device(device, name: str = "device") -> torch.device:
    """A device argument as a torch.device; a CUDA device without CUDA is one clear error here, not
    a driver traceback from the first allocation."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{name}={device!r} is not a device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        why = (
            "this torch build has no CUDA"
            if torch.version.cuda is None
            else f"torch {torch.__version__} finds no usable NVIDIA GPU or driver"
        )
        raise RuntimeError(f'{name}={str(device)!r}, but CUDA is not available here ({why}); use device="cpu"')
    return device


def check_kernels_for(name: str, tensor: torch.Tensor) -> None:
    """CUDA tensors need a build with the CUDA kernels; say so instead of the dispatcher's
    "Could not run 'opd_ext::...' with arguments from the 'CUDA' backend" traceback."""
    if tensor.is_cuda:
        if not ops.cuda_kernels_available():
            raise RuntimeError(
                f"{name} is on {tensor.device}, but this opd_ext build has no CUDA kernels (nvcc was not found "
                f"when it was built); rebuild with the CUDA toolkit on PATH (pip install --no-build-isolation "
                f"-e .), or move the tensors to the CPU"
            )


def is_dtensor(*tensors) -> bool:
    """Any of ``tensors`` a torch.distributed DTensor (checked by type name: importing
    torch.distributed.tensor is not free)."""
    return any(type(t).__name__ == "DTensor" and hasattr(t, "device_mesh") for t in tensors)


def check_logits(name: str, logits, *, shard: bool = False) -> None:
    """Logits [..., V] the kernels take; ``shard=True``: a vocabulary shard, which may be empty
    (V_r = 0 on some ranks of torch.chunk-style layouts)."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of logits [..., V], got {type(logits).__name__}")
    if is_dtensor(logits):
        raise TypeError(
            f"{name} is a DTensor: this function takes plain tensors. Logits sharded over the vocabulary "
            f"(Shard(-1)) go to opd_ext.topk_overlap / token_stats / vopd_loss / reverse_kl_loss as DTensors, "
            f"or to opd_ext.distributed.vocab_parallel_* with x.to_local() and the mesh dimension's group; "
            f"otherwise pass x.full_tensor()"
        )
    check_kernels_for(name, logits)
    if logits.dim() < 1:
        raise ValueError(f"{name} must have a vocabulary dimension [..., V], got a 0-d tensor")
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {logits.dtype}")
    if logits.shape[-1] == 0 and not shard:
        raise ValueError(f"{name} has an empty vocabulary dimension ({_describe(logits)})")


def is_supported_dtype_pair(student: torch.dtype, teacher: torch.dtype) -> bool:
    """The (student, teacher) logit dtypes the kernels dispatch on (csrc/torch_utils.h): one dtype
    for both, or float32 on one side with bfloat16/float16 on the other."""
    if student == teacher:
        return True
    return (student in _LOW_PRECISION and teacher == torch.float32) or (
        student == torch.float32 and teacher in _LOW_PRECISION
    )


# How errors describe the pairs is_supported_dtype_pair accepts.
SUPPORTED_DTYPE_PAIRS = (
    "one dtype for both, or float32 on one side with bfloat16/float16 on the other "
    "(e.g. a bf16 student with an fp32 teacher, or an fp32 student with a bf16 teacher)"
)


def check_logit_pair(student_logits, teacher_logits, *, shard: bool = False) -> None:
    """Same leading shape, same vocabulary, same device, and a supported dtype pair; ``shard``: the
    pair is a vocabulary shard, which may be empty."""
    check_logits("student_logits", student_logits, shard=shard)
    check_logits("teacher_logits", teacher_logits, shard=shard)
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
    if not is_supported_dtype_pair(s.dtype, t.dtype):
        raise TypeError(
            f"unsupported dtype mix: student_logits {s.dtype}, teacher_logits {t.dtype}. Supported: "
            f"{SUPPORTED_DTYPE_PAIRS}; cast one side"
        )


def check_k(k, vocab: int, name: str = "k", default: Optional[int] = None) -> int:
    """1 <= k <= V. ``default``: the caller's default for ``name``, which a user may not know they
    passed (``topk=100`` beside a small test vocabulary)."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    if not 1 <= k <= vocab:
        note = f" ({name}={default} is the default; pass {name}= at most {vocab})" if k == default else ""
        raise ValueError(f"{name}={k} is out of range: need 1 <= {name} <= V={vocab}{note}")
    return k


# ---- token statistics and losses -----------------------------------------------------------------

_INTEGER_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a positive float, got {type(temperature).__name__}")
    # Comparisons rather than math.isfinite: under torch.compile(dynamic=True) a float argument is
    # traced as a SymFloat, which math.isfinite cannot take. NaN fails both comparisons.
    if not (0 < temperature < math.inf):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    return float(temperature)


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_row_tensor(
    name: str, tensor, logits: torch.Tensor, dtypes, what: str, reference: str = "student_logits"
) -> None:
    """``tensor`` holds one value per position of ``student_logits`` [..., V] (or of another
    ``reference`` [..., X], e.g. student_hidden): shape [...], same device."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor ({what}), got {type(tensor).__name__}")
    lead = tuple(logits.shape[:-1])
    if tuple(tensor.shape) != lead:
        raise ValueError(
            f"{name} must have shape {lead} ({reference} {tuple(logits.shape)} without its last "
            f"dimension), got {_describe(tensor)}"
        )
    if tensor.device != logits.device:
        raise ValueError(f"{name} is on {tensor.device} but {reference} is on {logits.device}; use one device")
    if tensor.dtype not in dtypes:
        raise TypeError(f"{name} must be {what}, got {tensor.dtype}")


# Said with every out-of-range negative token id (csrc/token_stats_args.h says the same).
IGNORE_INDEX_HINT = (
    "positions that do not count (e.g. ignore_index -100) must be excluded with mask=, e.g. "
    "mask=(tokens != -100): any id is allowed where mask is False"
)


def token_range_error(vocab: int, low: int, high: int, where: str = "") -> ValueError:
    """The error for token ids outside [0, V) (values in [low, high])."""
    hint = f"; {IGNORE_INDEX_HINT}" if low < 0 else ""
    return ValueError(f"tokens must be ids in [0, V={vocab}){where}, got values in [{low}, {high}]{hint}")


def check_tokens(tokens, logits: torch.Tensor, reference: str = "student_logits") -> None:
    """Shape, dtype and device of the sampled ids; the kernels check the range [0, V) themselves."""
    check_row_tensor("tokens", tokens, logits, (torch.int64,), "int64 token ids in [0, V)", reference)


def check_mask(mask, logits: torch.Tensor, reference: str = "student_logits") -> None:
    check_row_tensor(
        "mask",
        mask,
        logits,
        _INTEGER_DTYPES,
        "bool (or 0/1 integers), True at positions that count; per-token float factors go in weights",
        reference,
    )


def check_weights(weights, logits: torch.Tensor, reference: str = "student_logits") -> None:
    check_row_tensor(
        "weights", weights, logits, LOGIT_DTYPES + (torch.float64,), "a floating per-token weight", reference
    )


def check_num_items(num_items):
    """The loss normaliser: a non-negative number of tokens (int or float), or a one-element real
    tensor (e.g. all-reduced). Zero is the count of a batch without valid tokens (the losses are then
    exactly 0); a tensor's value is not read here, since that would synchronise with its device."""
    if num_items is None:
        return None
    if isinstance(num_items, torch.Tensor):
        if num_items.numel() != 1 or num_items.is_complex() or num_items.dtype == torch.bool:
            raise ValueError(
                f"num_items must be a non-negative number or a one-element real tensor, got {_describe(num_items)}"
            )
        return num_items.reshape(())
    if isinstance(num_items, bool) or not isinstance(num_items, (int, float)):
        raise TypeError(
            f"num_items must be a non-negative number of tokens or a one-element tensor, got {type(num_items).__name__}"
        )
    if not 0 <= num_items < math.inf:  # comparisons, not math.isfinite: symbolic under torch.compile
        raise ValueError(f"num_items must be a non-negative finite number of tokens, got {num_items!r}")
    return num_items


#: A log-prob below this has probability exactly 0 even in float64 (the log of the smallest positive
#: float64, about -744.44). Servers send such finite values for "no mass": vLLM's JSON -9999.0,
#: SGLang's -FLT_MAX, -1e9, a dtype's min. A served top-k slot holding one is padding, like -inf
#: (docs/spec.md §1.9).
MASSLESS_LOGPROB = math.log(math.ulp(0.0))


def has_mass(logprobs: torch.Tensor) -> torch.Tensor:
    """bool: False where a served log-prob carries no probability (-inf or a finite stand-in below
    MASSLESS_LOGPROB); NaN stays True, so it surfaces instead of vanishing."""
    return ~(logprobs < MASSLESS_LOGPROB)


def check_teacher_topk(
    teacher_topk_ids,
    teacher_topk_logprobs,
    student_logits: torch.Tensor,
    teacher_topk_mask=None,
    valid=None,
    vocab: Optional[int] = None,
) -> int:
    """A served teacher's top-k: ids int64 [..., k] and log-probs [..., k] (and an optional bool
    slot mask [..., k]); ids in [0, V) wherever they are read: slots not masked out and not padded
    with a massless log-prob (``has_mass``), at valid positions (``valid`` [...]). ``vocab`` is V when the logits are
    a vocabulary shard (default: their last dimension). Returns k."""
    lead = tuple(student_logits.shape[:-1])
    vocab = student_logits.shape[-1] if vocab is None else vocab
    for name, tensor, dtypes, what in (
        ("teacher_topk_ids", teacher_topk_ids, (torch.int64,), "int64 token ids"),
        ("teacher_topk_logprobs", teacher_topk_logprobs, LOGIT_DTYPES + (torch.float64,), "floating log-probs"),
        ("teacher_topk_mask", teacher_topk_mask, _INTEGER_DTYPES, "bool (True at slots of the support)"),
    ):
        if tensor is None and name == "teacher_topk_mask":
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [..., k] of {what}, got {type(tensor).__name__}")
        if tensor.dim() != len(lead) + 1 or tuple(tensor.shape[:-1]) != lead:
            raise ValueError(
                f"{name} must have shape {lead + ('k',)} (the leading shape of student_logits "
                f"{tuple(student_logits.shape)}, then the teacher's top-k), got {_describe(tensor)}"
            )
        if tensor.device != student_logits.device:
            raise ValueError(f"{name} is on {tensor.device} but student_logits is on {student_logits.device}")
        if tensor.dtype not in dtypes:
            raise TypeError(f"{name} must be {what}, got {tensor.dtype}")
    for name, tensor in (("teacher_topk_logprobs", teacher_topk_logprobs), ("teacher_topk_mask", teacher_topk_mask)):
        if tensor is not None and tensor.shape != teacher_topk_ids.shape:
            raise ValueError(
                f"teacher_topk_ids {tuple(teacher_topk_ids.shape)} and {name} {tuple(tensor.shape)} must have "
                f"the same shape"
            )
    k = teacher_topk_ids.shape[-1]
    if not 1 <= k:
        raise ValueError(f"the teacher's top-k size k={k} (last dim of teacher_topk_ids) must be at least 1")
    # A data-dependent check: skipped while torch.compile traces (gather still bounds-checks on CPU).
    if not torch.compiler.is_compiling() and teacher_topk_ids.numel() > 0:
        read = has_mass(teacher_topk_logprobs)
        if teacher_topk_mask is not None:
            read = read & teacher_topk_mask.bool()
        if valid is not None:
            read = read & valid.unsqueeze(-1)
        bad = read & ((teacher_topk_ids < 0) | (teacher_topk_ids >= vocab))
        if bool(bad.any()):
            values = teacher_topk_ids[bad]
            raise ValueError(
                f"teacher_topk_ids must be in [0, V={vocab}) at the slots that are read, got values in "
                f"[{values.min().item()}, {values.max().item()}]; mark padded slots with teacher_topk_mask=False "
                f"or a -inf log-prob (or any below {MASSLESS_LOGPROB:.1f})"
            )
    return k


def check_teacher_token_logprob(teacher_token_logprob, logits: torch.Tensor) -> None:
    check_row_tensor(
        "teacher_token_logprob",
        teacher_token_logprob,
        logits,
        LOGIT_DTYPES + (torch.float64,),
        "the teacher's floating log-prob of each sampled token",
    )


# ---- fused-linear losses: hidden states + lm_head weight -------------------------------------------


def check_linear_head(side: str, hidden, weight, bias) -> None:
    """``{side}_hidden`` [..., H], ``{side}_weight`` [V, H] and an optional ``{side}_bias`` [V] share
    one floating dtype and one device (the chunk matmul runs in that dtype)."""
    names = (f"{side}_hidden", f"{side}_weight", f"{side}_bias")
    for name, tensor in zip(names, (hidden, weight, bias)):
        if tensor is None and name.endswith("_bias"):
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        check_kernels_for(name, tensor)
        if tensor.dtype not in LOGIT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {tensor.dtype}")
    if hidden.dim() < 2:
        raise ValueError(f"{names[0]} must be [N, H] or [B, T, H], got {_describe(hidden)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(
            f"{names[1]} must be the lm_head weight [V, H={hidden.shape[-1]}] (nn.Linear layout), "
            f"got {_describe(weight)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{names[2]} must be [V={weight.shape[0]}], got {_describe(bias)}")
    for name, tensor in zip(names[1:], (weight, bias)):
        if tensor is None:
            continue
        if tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device} but {names[0]} is on {hidden.device}; use one device")
        if tensor.dtype != hidden.dtype:
            raise TypeError(
                f"{name} is {tensor.dtype} but {names[0]} is {hidden.dtype}; the logits matmul runs in one "
                f"dtype, cast one side (e.g. the hidden states to the weight's dtype)"
            )


def check_head_vocab(student_vocab: int, teacher_name: str, teacher_vocab: int) -> None:
    """Student lm_head rows vs the teacher's vocabulary (``teacher_weight`` rows or ``teacher_logits``
    columns). A mismatch is usually embedding padding (Qwen2.5: 151936 vs 152064): slice the longer
    side to the shared prefix, a view, not a copy."""
    if student_vocab == teacher_vocab:
        return
    shared = min(student_vocab, teacher_vocab)
    if teacher_vocab > student_vocab:
        fix = (
            f"teacher_weight[:{shared}] (and teacher_bias[:{shared}])"
            if teacher_name == "teacher_weight"
            else f"teacher_logits[..., :{shared}]"
        )
    else:
        fix = f"student_weight[:{shared}] (and student_bias[:{shared}])"
    raise ValueError(
        f"vocabulary mismatch: student_weight has V={student_vocab} rows, {teacher_name} has V={teacher_vocab}. "
        f"Models of one family often pad the embedding differently (Qwen: 151936 vs 152064); if the "
        f"tokenizers agree, the extra entries are padding no token id reaches: pass {fix}"
    )
