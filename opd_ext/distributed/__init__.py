"""opd_ext on several processes (torch.distributed: NCCL on GPUs, gloo on CPU).

Data parallelism (DDP, FSDP, DeepSpeed ZeRO, Megatron's DDP) averages gradients over the ranks of
the data-parallel group. A loss normalised by the local token count then weighs a token on a rank
with few tokens more than one on a rank with many; normalised by the global count it divides the
gradient by the world size W. :func:`global_num_items` gives the one normaliser under which the
averaged gradient equals the gradient of a single process on the whole batch.

Tensor (vocab) parallelism shards the lm_head over the vocabulary: the ``vocab_parallel_*``
functions take each rank's ``[..., V_r]`` shard of the logits and return what the single-device
functions return on the whole rows, exchanging O(rows x (6 + k)) floats instead of O(rows x V);
DTensor logits placed ``Shard(-1)`` reach them from the ordinary functions.
"""

from __future__ import annotations

from opd_ext.distributed.data_parallel import global_num_items
from opd_ext.distributed.dtensor import from_dtensors, from_student_dtensor, is_dtensor
from opd_ext.distributed.vocab_parallel import (
    VocabShard,
    vocab_parallel_in_topk,
    vocab_parallel_reverse_kl_loss,
    vocab_parallel_token_stats,
    vocab_parallel_topk_kl_loss,
    vocab_parallel_topk_overlap,
    vocab_parallel_vopd_loss,
    vocab_shard,
)

__all__ = [
    "VocabShard",
    "from_dtensors",
    "from_student_dtensor",
    "global_num_items",
    "is_dtensor",
    "vocab_parallel_in_topk",
    "vocab_parallel_reverse_kl_loss",
    "vocab_parallel_token_stats",
    "vocab_parallel_topk_kl_loss",
    "vocab_parallel_topk_overlap",
    "vocab_parallel_vopd_loss",
    "vocab_shard",
]
