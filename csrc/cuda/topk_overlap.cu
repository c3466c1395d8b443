// topk_overlap on CUDA: one block per row pair, one pass over both rows (block_pair_pass), then an
// O(k^2 / threads) intersection of the two id sets in shared memory.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/block_topk.cuh"
#include "torch_utils.h"

namespace opd_ext {
namespace cuda_kernels {
namespace {

template <typename S, typename T>
__global__ void __launch_bounds__(kPairPassThreads)
    topk_overlap_kernel(const S* student, const T* teacher, int64_t row_stride_s, int64_t row_stride_t,
                        int32_t vocab, int k, float* out) {
  __shared__ TopKCandidates top_s;
  __shared__ TopKCandidates top_t;
  __shared__ int common;
  const int64_t row = blockIdx.x;
  if (threadIdx.x == 0) {
    topk_reset(top_s, k);
    topk_reset(top_t, k);
    common = 0;
  }
  __syncthreads();
  NoVisitor no_visit;
  block_pair_pass(student + row * row_stride_s, teacher + row * row_stride_t, vocab, &top_s, &top_t, no_visit);

  int local = 0;
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    const int32_t id = top_t.indices[j];
    for (int i = 0; i < k; ++i) {
      if (top_s.indices[i] == id) {
        ++local;
        break;
      }
    }
  }
  if (local != 0) atomicAdd(&common, local);
  __syncthreads();
  if (threadIdx.x == 0) {
    out[row] = (top_s.saw_nan || top_t.saw_nan) ? __int_as_float(0x7fc00000)
                                                 : static_cast<float>(common) / static_cast<float>(k);
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
  dispatch_logit_pair(s.scalar_type(), t.scalar_type(), "topk_overlap", [&]<typename S, typename T>() {
    topk_overlap_kernel<S, T><<<static_cast<unsigned>(rows), kPairPassThreads, 0, stream>>>(
        s.const_data_ptr<S>(), t.const_data_ptr<T>(), s.stride(0), t.stride(0),
        static_cast<int32_t>(vocab), static_cast<int>(k), out.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace cuda_kernels

TORCH_LIBRARY_IMPL(opd_ext, CUDA, m) { m.impl("topk_overlap", &cuda_kernels::topk_overlap_cuda); }

}  // namespace opd_ext
