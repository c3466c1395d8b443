"""DTensor logits placed ``Shard(-1)`` reach the vocab-parallel ops from the ordinary functions."""

from __future__ import annotations

from opd_ext._validation import is_dtensor


def _vocab_sharded(name: str, x):
    """(local shard, process group) of a DTensor sharded over its last dim on one mesh dimension
    (replicated on any other)."""
    from torch.distributed.tensor import Replicate, Shard

    sharded = [d for d, p in enumerate(x.placements) if isinstance(p, Shard) and p.dim in (-1, x.dim() - 1)]
    others_replicated = all(isinstance(p, Replicate) for d, p in enumerate(x.placements) if d not in sharded)
    if len(sharded) != 1 or not others_replicated:
        raise ValueError(
            f"{name} is a DTensor placed {x.placements}; opd_ext takes logits sharded over the "
            f"vocabulary (Shard(-1)) on one mesh dimension and replicated on the others: "
            f"redistribute it, or pass x.full_tensor()"
        )
    return x.to_local(), x.device_mesh.get_group(sharded[0])


def _plain(x):
    return x.full_tensor() if is_dtensor(x) else x


def from_dtensors(fn, student_logits, teacher_logits, *args, **kwargs):
    """Call the vocab-parallel ``fn`` on the local shards of DTensor logits; other DTensor
    arguments (tokens, mask, weights: replicated) become plain tensors."""
    student, group = _vocab_sharded("student_logits", student_logits)
    teacher, teacher_group = _vocab_sharded("teacher_logits", teacher_logits)
    if teacher_group is not group or student_logits.device_mesh != teacher_logits.device_mesh:
        raise ValueError("student_logits and teacher_logits must be sharded alike over one device mesh")
    args = [_plain(a) for a in args]
    kwargs = {k: _plain(v) for k, v in kwargs.items()}
    return fn(student, teacher, *args, group=group, **kwargs)


def from_student_dtensor(fn, student_logits, *args, **kwargs):
    """Call the vocab-parallel ``fn`` on the local shard of DTensor student logits (a served teacher
    has no logits to shard); other DTensor arguments become plain tensors."""
    student, group = _vocab_sharded("student_logits", student_logits)
    args = [_plain(a) for a in args]
    kwargs = {k: _plain(v) for k, v in kwargs.items()}
    return fn(student, *args, group=group, **kwargs)
