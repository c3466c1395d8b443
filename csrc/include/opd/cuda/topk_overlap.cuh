// topk_overlap: |TopK(s) ∩ TopK(t)| / k per row pair. Each row pair is read once (block_pair_pass).
// With many rows, one block owns a row; with few rows (decode batches of 1-64) a block per row
// would leave most SMs idle, so each row is split into slices whose partial top-k lists a second
// kernel merges.
#pragma once

#include "opd/cuda/portability.cuh"

#include <cstdint>

#include "opd/cuda/block_topk.cuh"
#include "opd/cuda/common.cuh"

namespace opd::cuda {

template <typename S, typename T>
struct TopKOverlapParams {
  const S* student;  // row r at student + r * student_row_stride, unit stride along V
  const T* teacher;
  int64_t student_row_stride, teacher_row_stride;
  int64_t rows;
  int32_t vocab;
  int k;       // 1 <= k <= min(vocab, kMaxStreamingTopK)
  float* out;  // [rows]; NaN for a row with a NaN in either side
};

namespace topk_overlap_impl {

template <typename S, typename T>
__global__ void __launch_bounds__(kPairPassThreads) whole_rows_kernel(TopKOverlapParams<S, T> p) {
  OPD_SHARED(TopKCandidates, top_s);
  OPD_SHARED(TopKCandidates, top_t);
  OPD_SHARED(int, common);
  const int64_t row = blockIdx.x;
  topk_reset(top_s, p.k);
  topk_reset(top_t, p.k);
  NoVisitor no_visit;
  block_pair_pass(p.student + row * p.student_row_stride, p.teacher + row * p.teacher_row_stride, p.vocab, &top_s,
                  &top_t, no_visit);
  const int shared_ids = block_count_common(top_s.indices, top_t.indices, p.k, &common);
  if (threadIdx.x == 0) {
    p.out[row] = (top_s.saw_nan || top_t.saw_nan) ? kNaN : static_cast<float>(shared_ids) / static_cast<float>(p.k);
  }
}

// Partial pass: block (slice, row) finds the top-k of its slice of both rows.
template <typename S, typename T>
__global__ void __launch_bounds__(kPairPassThreads)
    slices_kernel(TopKOverlapParams<S, T> p, int32_t slice_len, PairPassPartials partials) {
  OPD_SHARED(TopKCandidates, top_s);
  OPD_SHARED(TopKCandidates, top_t);
  const RowSlice rs = this_row_slice(p.vocab, slice_len);
  topk_reset(top_s, p.k);
  topk_reset(top_t, p.k);
  NoVisitor no_visit;
  block_pair_pass(p.student + rs.row * p.student_row_stride + rs.begin,
                  p.teacher + rs.row * p.teacher_row_stride + rs.begin, rs.len, &top_s, &top_t, no_visit, rs.begin);
  store_pair_partials(top_s, top_t, partials, rs, p.k);
}

// A template (of the block size) so that this header defines no non-inline function.
template <int kThreads>
__global__ void __launch_bounds__(kThreads) merge_kernel(PairPassPartials partials, int slices, int k, float* out) {
  OPD_SHARED(TopKCandidates, top_s);
  OPD_SHARED(TopKCandidates, top_t);
  OPD_SHARED(int, common);
  const int64_t row = blockIdx.x;
  bool saw_nan = false;
  const int shared_ids = merge_pair_partials(top_s, top_t, &common, partials, row, slices, k, &saw_nan);
  if (threadIdx.x == 0) out[row] = saw_nan ? kNaN : static_cast<float>(shared_ids) / static_cast<float>(k);
}

// The launch decision, shared by the size query and the launcher.
struct Plan {
  int slices;
  size_t workspace_bytes;
};

inline cudaError_t plan(int64_t rows, int64_t vocab, int k, Plan* out) {
  *out = {1, 0};
  if (rows < 0 || rows > INT32_MAX || vocab < 1 || vocab > INT32_MAX || k < 1 || k > vocab || k > kMaxStreamingTopK) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) return cudaSuccess;
  if (const cudaError_t e = pair_pass_slices_per_row(rows, vocab, k, &out->slices); e != cudaSuccess) return e;
  if (out->slices > 1) {
    WorkspaceCarver carver;
    PairPassPartials::carve(carver, rows, out->slices, k);
    out->workspace_bytes = carver.bytes();
  }
  return cudaSuccess;
}

}  // namespace topk_overlap_impl

// Bytes of workspace launch_topk_overlap needs for this problem on the current device (0 when
// rows are not sliced).
inline cudaError_t topk_overlap_workspace_size(int64_t rows, int64_t vocab, int k, size_t* bytes) {
  topk_overlap_impl::Plan plan;
  const cudaError_t e = topk_overlap_impl::plan(rows, vocab, k, &plan);
  *bytes = plan.workspace_bytes;
  return e;
}

template <typename S, typename T>
cudaError_t launch_topk_overlap(const TopKOverlapParams<S, T>& p, void* workspace, size_t workspace_bytes,
                                cudaStream_t stream) {
  using namespace topk_overlap_impl;
  Plan pl;
  if (const cudaError_t e = plan(p.rows, p.vocab, p.k, &pl); e != cudaSuccess) return e;
  if (p.rows == 0) return cudaSuccess;
  if (pl.slices == 1) {
    return launch(whole_rows_kernel<S, T>, dim3(static_cast<unsigned>(p.rows)), dim3(kPairPassThreads), 0, stream, p);
  }
  if (const cudaError_t e = check_workspace(workspace, workspace_bytes, pl.workspace_bytes); e != cudaSuccess) {
    return e;
  }
  WorkspaceCarver carver(workspace);
  const PairPassPartials partials = PairPassPartials::carve(carver, p.rows, pl.slices, p.k);
  const auto slice_len = static_cast<int32_t>(pair_pass_slice_length(p.vocab, pl.slices));
  if (const cudaError_t e = launch(slices_kernel<S, T>, dim3(pl.slices, static_cast<unsigned>(p.rows)),
                                   dim3(kPairPassThreads), 0, stream, p, slice_len, partials);
      e != cudaSuccess) {
    return e;
  }
  return launch(merge_kernel<kPairPassThreads>, dim3(static_cast<unsigned>(p.rows)), dim3(kPairPassThreads), 0, stream,
                partials, pl.slices, p.k, p.out);
}

}  // namespace opd::cuda
