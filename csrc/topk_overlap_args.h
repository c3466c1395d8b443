// Argument checks of topk_overlap, shared by the CPU and CUDA bindings so both raise the same
// errors (the Python wrapper checks first and more kindly; these guard direct torch.ops calls).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "torch_utils.h"

namespace opd_ext {

inline void check_topk_overlap_inputs(const at::Tensor& student_logits, const at::Tensor& teacher_logits, int64_t k) {
  check_logit_pair("topk_overlap", student_logits, teacher_logits);
  const int64_t vocab = student_logits.size(-1);
  TORCH_CHECK(k >= 1 && k <= vocab, "topk_overlap: k=", k, " must be in [1, V=", vocab, "]");
}

}  // namespace opd_ext
