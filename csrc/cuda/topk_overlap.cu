// topk_overlap on CUDA. Each row pair is read once (block_pair_pass). With many rows, one block
// owns a row; with few rows (decode batches of 1-64) a block per row would leave most SMs idle, so
// each row is split into slices whose partial top-k lists a second kernel merges.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/block_topk.cuh"
#include "torch_utils.h"

namespace opd_ext {
namespace cuda_kernels {
namespace {

constexpr float kNaN = __builtin_nanf("");

template <typename S, typename T>
__global__ void __launch_bounds__(kPairPassThreads)
    topk_overlap_kernel(const S* student, const T* teacher, int64_t row_stride_s, int64_t row_stride_t,
                        int32_t vocab, int k, float* out) {
  __shared__ TopKCandidates top_s;
  __shared__ TopKCandidates top_t;
  __shared__ int common;
  const int64_t row = blockIdx.x;
  topk_reset(top_s, k);
  topk_reset(top_t, k);
  NoVisitor no_visit;
  block_pair_pass(student + row * row_stride_s, teacher + row * row_stride_t, vocab, &top_s, &top_t, no_visit);
  const int shared_ids = block_count_common(top_s.indices, top_t.indices, k, &common);
  if (threadIdx.x == 0) {
    out[row] = (top_s.saw_nan || top_t.saw_nan) ? kNaN : static_cast<float>(shared_ids) / static_cast<float>(k);
  }
}

// Partial pass: block (slice, row) finds the top-k of its slice of both rows. Partials are laid
// out [row][student|teacher][slice][k] so the merge reads one contiguous list per row and side.
template <typename S, typename T>
__global__ void __launch_bounds__(kPairPassThreads)
    topk_overlap_slices_kernel(const S* student, const T* teacher, int64_t row_stride_s, int64_t row_stride_t,
                               int32_t vocab, int32_t slice_len, int k, float* partial_values,
                               int32_t* partial_indices, int* row_saw_nan) {
  __shared__ TopKCandidates top_s;
  __shared__ TopKCandidates top_t;
  const int slice = blockIdx.x;
  const int slices = gridDim.x;
  const int64_t row = blockIdx.y;
  const int32_t begin = slice * slice_len;
  const int32_t len = max(0, min(slice_len, vocab - begin));
  topk_reset(top_s, k);
  topk_reset(top_t, k);
  NoVisitor no_visit;
  block_pair_pass(student + row * row_stride_s + begin, teacher + row * row_stride_t + begin, len, &top_s,
                  &top_t, no_visit, begin);
  const int64_t s_offset = ((row * 2 + 0) * slices + slice) * k;
  const int64_t t_offset = ((row * 2 + 1) * slices + slice) * k;
  topk_store_partial(top_s, partial_values + s_offset, partial_indices + s_offset, row_saw_nan + row);
  topk_store_partial(top_t, partial_values + t_offset, partial_indices + t_offset, row_saw_nan + row);
}

__global__ void __launch_bounds__(kPairPassThreads)
    topk_overlap_merge_kernel(const float* partial_values, const int32_t* partial_indices, const int* row_saw_nan,
                              int slices, int k, float* out) {
  __shared__ TopKCandidates top_s;
  __shared__ TopKCandidates top_t;
  __shared__ int common;
  const int64_t row = blockIdx.x;
  topk_reset(top_s, k);
  topk_reset(top_t, k);
  const int64_t s_offset = (row * 2 + 0) * slices * k;
  const int64_t t_offset = (row * 2 + 1) * slices * k;
  topk_merge_partials(top_s, partial_values + s_offset, partial_indices + s_offset, slices);
  topk_merge_partials(top_t, partial_values + t_offset, partial_indices + t_offset, slices);
  const int shared_ids = block_count_common(top_s.indices, top_t.indices, k, &common);
  if (threadIdx.x == 0) {
    out[row] = row_saw_nan[row] ? kNaN : static_cast<float>(shared_ids) / static_cast<float>(k);
  }
}

at::Tensor topk_overlap_cuda(const at::Tensor& student_logits, const at::Tensor& teacher_logits, int64_t k) {
  check_logit_pair("topk_overlap", student_logits, teacher_logits);
  const int64_t vocab = student_logits.size(-1);
  TORCH_CHECK(k >= 1 && k <= vocab, "topk_overlap: k=", k, " must be in [1, V=", vocab, "]");
  TORCH_CHECK(k <= kMaxStreamingTopK, "topk_overlap: the CUDA kernel supports k <= ", kMaxStreamingTopK,
              " (got ", k, "); opd_ext.topk_overlap falls back to a sort for larger k");
  const c10::cuda::CUDAGuard device_guard(student_logits.device());
  const at::Tensor s = as_rows(student_logits);
  const at::Tensor t = as_rows(teacher_logits);
  const int64_t rows = s.size(0);
  at::Tensor out = at::empty(student_logits.sizes().slice(0, student_logits.dim() - 1),
                             student_logits.options().dtype(at::kFloat));
  if (rows == 0) return out;
  TORCH_CHECK(rows <= INT32_MAX, "topk_overlap: too many rows (", rows, ")");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int slices = pair_pass_slices_per_row(rows, vocab, k);
  dispatch_logit_pair(s.scalar_type(), t.scalar_type(), "topk_overlap", [&]<typename S, typename T>() {
    if (slices == 1) {
      topk_overlap_kernel<S, T><<<static_cast<unsigned>(rows), kPairPassThreads, 0, stream>>>(
          s.const_data_ptr<S>(), t.const_data_ptr<T>(), s.stride(0), t.stride(0), static_cast<int32_t>(vocab),
          static_cast<int>(k), out.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const int64_t slice_len = pair_pass_slice_length(vocab, slices);
    const at::Tensor partial_values = at::empty({rows, 2, slices, k}, s.options().dtype(at::kFloat));
    const at::Tensor partial_indices = at::empty({rows, 2, slices, k}, s.options().dtype(at::kInt));
    const at::Tensor row_saw_nan = at::zeros({rows}, s.options().dtype(at::kInt));
    topk_overlap_slices_kernel<S, T><<<dim3(slices, static_cast<unsigned>(rows)), kPairPassThreads, 0, stream>>>(
        s.const_data_ptr<S>(), t.const_data_ptr<T>(), s.stride(0), t.stride(0), static_cast<int32_t>(vocab),
        static_cast<int32_t>(slice_len), static_cast<int>(k), partial_values.mutable_data_ptr<float>(),
        partial_indices.mutable_data_ptr<int32_t>(), row_saw_nan.mutable_data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    topk_overlap_merge_kernel<<<static_cast<unsigned>(rows), kPairPassThreads, 0, stream>>>(
        partial_values.const_data_ptr<float>(), partial_indices.const_data_ptr<int32_t>(),
        row_saw_nan.const_data_ptr<int>(), slices, static_cast<int>(k), out.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace cuda_kernels

TORCH_LIBRARY_IMPL(opd_ext, CUDA, m) { m.impl("topk_overlap", &cuda_kernels::topk_overlap_cuda); }

}  // namespace opd_ext
