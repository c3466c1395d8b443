// topk_overlap on CPU: rows in parallel, one streaming pass per row (csrc/cpu/topk_rows.h).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu/topk_rows.h"
#include "topk_overlap_args.h"
#include "torch_utils.h"

namespace opd_ext {
namespace {

template <typename student_t, typename teacher_t>
void topk_overlap_kernel(const student_t* student, const teacher_t* teacher, int64_t row_stride_s, int64_t row_stride_t,
                         int64_t rows, int64_t vocab, int k, float* out) {
  at::parallel_for(0, rows, cpu_rows_per_task(vocab), [&](int64_t begin, int64_t end) {
    cpu::RowPairTopK topk(k);
    for (int64_t r = begin; r < end; ++r) {
      out[r] = topk.overlap(student + r * row_stride_s, teacher + r * row_stride_t, vocab);
    }
  });
}

at::Tensor topk_overlap_cpu(const at::Tensor& student_logits, const at::Tensor& teacher_logits, int64_t k) {
  check_topk_overlap_inputs(student_logits, teacher_logits, k);
  const int64_t vocab = student_logits.size(-1);
  const at::Tensor s = as_rows(student_logits);
  const at::Tensor t = as_rows(teacher_logits);
  const int64_t rows = s.size(0);
  at::Tensor out =
      at::empty(student_logits.sizes().slice(0, student_logits.dim() - 1), student_logits.options().dtype(at::kFloat));
  if (rows == 0) return out;
  // The overlap is symmetric, so a float32 student beside a bf16/fp16 teacher reuses the mirrored kernels.
  dispatch_symmetric_logit_pair(
      s, t, "topk_overlap", [&]<typename A, typename B>(const at::Tensor& a, const at::Tensor& b) {
        topk_overlap_kernel<A, B>(a.const_data_ptr<A>(), b.const_data_ptr<B>(), a.stride(0), b.stride(0), rows, vocab,
                                  static_cast<int>(k), out.mutable_data_ptr<float>());
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(opd_ext, CPU, m) { m.impl("topk_overlap", &topk_overlap_cpu); }

}  // namespace opd_ext
