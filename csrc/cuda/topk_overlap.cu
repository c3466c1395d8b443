// topk_overlap: the binding of the kernel layer opd/cuda/topk_overlap.cuh (checks, allocation,
// dtype dispatch, launch).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>

#include "cuda/binding.h"
#include "opd/cuda/topk_overlap.cuh"
#include "topk_overlap_args.h"
#include "torch_utils.h"

namespace opd_ext {
namespace {

at::Tensor topk_overlap_cuda(const at::Tensor& student_logits, const at::Tensor& teacher_logits, int64_t k) {
  constexpr const char* op = "topk_overlap";
  check_topk_overlap_inputs(student_logits, teacher_logits, k);
  TORCH_CHECK(k <= opd::cuda::kMaxStreamingTopK, op, ": the CUDA kernel supports k <= ", opd::cuda::kMaxStreamingTopK,
              " (got ", k, "); opd_ext.topk_overlap falls back to a sort for larger k");
  const cuda_binding::DeviceGuard device_guard(student_logits.device());
  const at::Tensor s = as_rows(student_logits);
  const at::Tensor t = as_rows(teacher_logits);
  const int64_t rows = s.size(0), vocab = s.size(1);
  at::Tensor out = cuda_binding::empty(student_logits.sizes().slice(0, student_logits.dim() - 1),
                                       student_logits.options().dtype(at::kFloat));
  if (rows == 0) return out;
  TORCH_CHECK(rows <= INT32_MAX, op, ": too many rows (", rows, ")");
  // The overlap is symmetric, so a float32 student beside a bf16/fp16 teacher reuses the mirrored kernels.
  dispatch_symmetric_logit_pair(s, t, op, [&]<typename A, typename B>(const at::Tensor& a, const at::Tensor& b) {
    const opd::cuda::TopKOverlapParams<A, B> params{.student = a.const_data_ptr<A>(),
                                                    .teacher = b.const_data_ptr<B>(),
                                                    .student_row_stride = a.stride(0),
                                                    .teacher_row_stride = b.stride(0),
                                                    .rows = rows,
                                                    .vocab = static_cast<int32_t>(vocab),
                                                    .k = static_cast<int>(k),
                                                    .out = out.mutable_data_ptr<float>()};
    size_t bytes = 0;
    cuda_binding::check_cuda(opd::cuda::topk_overlap_workspace_size(rows, vocab, params.k, &bytes), op);
    at::Tensor workspace = cuda_binding::workspace(bytes, s);
    cuda_binding::check_cuda(opd::cuda::launch_topk_overlap(params, cuda_binding::workspace_ptr(workspace), bytes,
                                                            cuda_binding::current_stream()),
                             op);
  });
  return out;
}

}  // namespace

OPD_CUDA_LIBRARY_IMPL(m) { m.impl("topk_overlap", &topk_overlap_cuda); }

}  // namespace opd_ext
