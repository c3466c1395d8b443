// topk_overlap on CPU: rows in parallel, one streaming pass per row (csrc/cpu/topk_rows.h).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu/topk_rows.h"
#include "torch_utils.h"

namespace opd_ext {
namespace {

template <typename student_t, typename teacher_t>
void topk_overlap_kernel(const student_t* student, const teacher_t* teacher, int64_t rows,
                         int64_t vocab, int k, float* out) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    cpu::RowPairTopK topk(k);
    for (int64_t r = begin; r < end; ++r) out[r] = topk.overlap(student + r * vocab, teacher + r * vocab, vocab);
  });
}

at::Tensor topk_overlap_cpu(const at::Tensor& student_logits, const at::Tensor& teacher_logits, int64_t k) {
  check_logit_pair("topk_overlap", student_logits, teacher_logits);
  const int64_t vocab = student_logits.size(-1);
  TORCH_CHECK(k >= 1 && k <= vocab, "topk_overlap: k=", k, " must be in [1, V=", vocab, "]");
  const at::Tensor s = student_logits.contiguous();
  const at::Tensor t = teacher_logits.contiguous();
  const int64_t rows = s.numel() / vocab;
  at::Tensor out = at::empty(s.sizes().slice(0, s.dim() - 1), s.options().dtype(at::kFloat));
  if (rows == 0) return out;
  dispatch_logit_pair(s.scalar_type(), t.scalar_type(), "topk_overlap", [&]<typename S, typename T>() {
    topk_overlap_kernel<S, T>(s.const_data_ptr<S>(), t.const_data_ptr<T>(), rows, vocab,
                              static_cast<int>(k), out.mutable_data_ptr<float>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(opd_ext, CPU, m) { m.impl("topk_overlap", &topk_overlap_cpu); }

}  // namespace opd_ext
