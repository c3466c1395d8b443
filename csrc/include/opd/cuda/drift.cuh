// Prune-OPD drift ops.
//
// drift_step: one pass over both logit rows (block_pair_pass) feeds the two streaming top-k
// buffers and, when the sampled tokens are given, each thread's online softmax state
// (opd/online_softmax.h, centred on the raw logits); then the overlap, a block merge of the softmax
// states and thread 0 advancing the sequence's state with opd::drift_step, the rule the CPU kernel
// and the reference share. With many rows a block owns a row; decode batches are small, so there
// each row is cut into slices (as topk_overlap does) whose partial top-k lists and softmax states a
// second kernel merges before the update. drift_scan: one thread per sequence running
// opd::drift_scan_row (the state machine is sequential in T; B is small).
#pragma once

#include "opd/cuda/portability.cuh"

#include <cstdint>

#include "opd/cuda/block_topk.cuh"
#include "opd/cuda/common.cuh"
#include "opd/cuda/reduce.cuh"
#include "opd/drift.h"
#include "opd/online_softmax.h"

namespace opd::cuda {

template <typename S, typename T>
struct DriftStepParams {
  const S* student;  // [active, vocab] rows at student + i * student_row_stride
  const T* teacher;
  int64_t student_row_stride, teacher_row_stride;
  int64_t active;
  int32_t vocab;
  int k;                  // 1 <= k <= min(vocab, kMaxStreamingTopK)
  const int64_t* tokens;  // [active]; null: no token statistics
  float inv_temperature;
  const int64_t* rows;    // [active] state rows; null: logits row i is state row i
  int64_t batch;          // rows of the state
  opd::DriftConfig config;
  opd::DriftStateArrays state;
  // [active] each; the three token statistics only with tokens.
  float* overlap;
  float* multiplier;
  bool* stopped;
  float* student_logprob;
  float* teacher_logprob;
  float* reverse_kl;
};

struct DriftScanParams {
  const float* overlaps;  // [batch, steps]
  const bool* valid;      // [batch, steps]; null: every position counts
  int64_t batch, steps;
  opd::DriftConfig config;
  opd::DriftStateArrays state;
  float* multipliers;      // [batch, steps]
  float* weights;          // [batch, steps]
  int64_t* stop_position;  // [batch]
};

namespace drift_impl {

constexpr int kScanThreads = 128;

// Thread 0, once a row's overlap (and softmax state, with tokens) is known: the sampled token's
// statistics and the drift update of its sequence.
template <typename S, typename T>
__device__ void finish_row(int64_t i, const S* s_row, const T* t_row, bool saw_nan, int common,
                           const opd::PairSoftmaxState& softmax, const DriftStepParams<S, T>& p) {
  const float overlap = saw_nan ? kNaN : static_cast<float>(common) / static_cast<float>(p.k);
  p.overlap[i] = overlap;
  if (p.tokens != nullptr) {
    using opd::online_softmax_detail::centre;
    const int64_t y = p.tokens[i];
    const bool valid = y >= 0 && y < p.vocab;  // the Python wrapper rejects the others first
    // (x - centre) / τ - log Z, not x / τ - lse: lse rounds to ulp(max / τ), ~1e-3 at |logits| ~ 1e4.
    p.student_logprob[i] =
        valid ? (static_cast<float>(s_row[y]) - centre(softmax.max_s)) * p.inv_temperature - logf(softmax.sum_s) : kNaN;
    p.teacher_logprob[i] =
        valid ? (static_cast<float>(t_row[y]) - centre(softmax.max_t)) * p.inv_temperature - logf(softmax.sum_t) : kNaN;
    p.reverse_kl[i] = softmax.reverse_kl();
  }
  const int64_t row = p.rows != nullptr ? p.rows[i] : i;
  if (row < 0 || row >= p.batch) {  // rejected by the Python wrapper; never write out of bounds
    p.multiplier[i] = kNaN;
    p.stopped[i] = true;
    return;
  }
  opd::DriftState state = p.state.load(row);
  const opd::DriftTokenResult r = opd::drift_step(p.config, state, overlap);
  p.state.store(row, state);
  p.multiplier[i] = r.multiplier;
  p.stopped[i] = r.stopped;
}

// Raw logits in; the state keeps raw maxima and distances (x - centre) / τ.
struct SoftmaxVisitor {
  opd::PairSoftmaxState state;
  float inv_temperature;
  __device__ __forceinline__ void operator()(float s, float t, int32_t) { state.update(s, t, inv_temperature); }
};

// One pass of the block over (a slice of) both rows; with tokens, returns the block's merged
// softmax state in thread 0.
template <typename S, typename T>
__device__ opd::PairSoftmaxState read_rows(const S* s_row, const T* t_row, int32_t len, int32_t index_base,
                                           TopKCandidates& top_s, TopKCandidates& top_t,
                                           const DriftStepParams<S, T>& p) {
  topk_reset(top_s, p.k);
  topk_reset(top_t, p.k);
  if (p.tokens == nullptr) {
    NoVisitor no_visit;
    block_pair_pass(s_row, t_row, len, &top_s, &top_t, no_visit, index_base);
    return {};
  }
  SoftmaxVisitor visit{{}, p.inv_temperature};
  block_pair_pass(s_row, t_row, len, &top_s, &top_t, visit, index_base);
  return reduce_row_group<kPairPassThreads>(visit.state, kPairPassThreads, p.inv_temperature);
}

// One block per row: the whole row pair in one pass.
template <typename S, typename T>
__global__ void __launch_bounds__(kPairPassThreads) step_kernel(DriftStepParams<S, T> p) {
  OPD_SHARED(TopKCandidates, top_s);
  OPD_SHARED(TopKCandidates, top_t);
  OPD_SHARED(int, common_counter);
  const int64_t i = blockIdx.x;
  const S* s_row = p.student + i * p.student_row_stride;
  const T* t_row = p.teacher + i * p.teacher_row_stride;
  const opd::PairSoftmaxState softmax = read_rows(s_row, t_row, p.vocab, 0, top_s, top_t, p);
  const int common = block_count_common(top_s.indices, top_t.indices, p.k, &common_counter);
  if (threadIdx.x == 0) finish_row(i, s_row, t_row, top_s.saw_nan || top_t.saw_nan, common, softmax, p);
}

// Few rows (decode batches): block (slice, row) reads one slice of the row pair and leaves its
// partial top-k lists (PairPassPartials, the layout topk_merge_partials reads) and its softmax
// state ([row][slice]) for merge_kernel.
template <typename S, typename T>
__global__ void __launch_bounds__(kPairPassThreads)
    slices_kernel(DriftStepParams<S, T> p, int32_t slice_len, PairPassPartials partials,
                  opd::PairSoftmaxState* partial_softmax) {
  OPD_SHARED(TopKCandidates, top_s);
  OPD_SHARED(TopKCandidates, top_t);
  const RowSlice rs = this_row_slice(p.vocab, slice_len);
  const opd::PairSoftmaxState softmax =
      read_rows(p.student + rs.row * p.student_row_stride + rs.begin,
                p.teacher + rs.row * p.teacher_row_stride + rs.begin, rs.len, rs.begin, top_s, top_t, p);
  store_pair_partials(top_s, top_t, partials, rs, p.k);
  if (p.tokens != nullptr && threadIdx.x == 0) partial_softmax[rs.row * rs.slices + rs.slice] = softmax;
}

template <typename S, typename T>
__global__ void __launch_bounds__(kPairPassThreads)
    merge_kernel(DriftStepParams<S, T> p, int slices, PairPassPartials partials,
                 const opd::PairSoftmaxState* partial_softmax) {
  OPD_SHARED(TopKCandidates, top_s);
  OPD_SHARED(TopKCandidates, top_t);
  OPD_SHARED(int, common_counter);
  const int64_t i = blockIdx.x;
  bool saw_nan = false;
  const int common = merge_pair_partials(top_s, top_t, &common_counter, partials, i, slices, p.k, &saw_nan);
  if (threadIdx.x != 0) return;
  opd::PairSoftmaxState softmax;
  if (p.tokens != nullptr) {
    for (int slice = 0; slice < slices; ++slice) softmax.merge(partial_softmax[i * slices + slice], p.inv_temperature);
  }
  finish_row(i, p.student + i * p.student_row_stride, p.teacher + i * p.teacher_row_stride, saw_nan, common, softmax,
             p);
}

// A template (of the block size) so that this header defines no non-inline function.
template <int kThreads>
__global__ void __launch_bounds__(kThreads) scan_kernel(DriftScanParams p) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= p.batch) return;
  opd::DriftState s = p.state.load(b);
  p.stop_position[b] =
      opd::drift_scan_row(p.config, s, p.overlaps + b * p.steps, p.valid != nullptr ? p.valid + b * p.steps : nullptr,
                          p.steps, p.multipliers + b * p.steps, p.weights + b * p.steps);
  p.state.store(b, s);
}

// The launch decision and the workspace carve, shared by the size query and the launcher.
struct StepWorkspace {
  PairPassPartials partials;
  opd::PairSoftmaxState* softmax;  // [active][slice]; only with tokens

  template <typename Carver>
  static StepWorkspace carve(Carver& carver, int64_t active, int slices, int k, bool with_tokens) {
    StepWorkspace w;
    w.partials = PairPassPartials::carve(carver, active, slices, k);
    w.softmax = carver.template take<opd::PairSoftmaxState>(with_tokens ? active * slices : 0);
    return w;
  }
};

inline cudaError_t plan_step(int64_t active, int64_t vocab, int k, bool with_tokens, int* slices,
                             size_t* workspace_bytes) {
  *slices = 1;
  *workspace_bytes = 0;
  if (active < 0 || active > INT32_MAX || vocab < 1 || vocab > INT32_MAX || k < 1 || k > vocab ||
      k > kMaxStreamingTopK) {
    return cudaErrorInvalidValue;
  }
  if (active == 0) return cudaSuccess;
  if (const cudaError_t e = pair_pass_slices_per_row(active, vocab, k, slices); e != cudaSuccess) return e;
  if (*slices > 1) {
    WorkspaceCarver carver;
    StepWorkspace::carve(carver, active, *slices, k, with_tokens);
    *workspace_bytes = carver.bytes();
  }
  return cudaSuccess;
}

}  // namespace drift_impl

// ---- host API ---------------------------------------------------------------------------------------

// Bytes of workspace launch_drift_step needs on the current device (0 when rows are not sliced).
inline cudaError_t drift_step_workspace_size(int64_t active, int64_t vocab, int k, bool with_tokens, size_t* bytes) {
  int slices = 1;
  return drift_impl::plan_step(active, vocab, k, with_tokens, &slices, bytes);
}

template <typename S, typename T>
cudaError_t launch_drift_step(const DriftStepParams<S, T>& p, void* workspace, size_t workspace_bytes,
                              cudaStream_t stream) {
  using namespace drift_impl;
  int slices = 1;
  size_t needed = 0;
  if (const cudaError_t e = plan_step(p.active, p.vocab, p.k, p.tokens != nullptr, &slices, &needed);
      e != cudaSuccess) {
    return e;
  }
  if (p.active == 0) return cudaSuccess;
  if (slices == 1) {
    return launch(step_kernel<S, T>, dim3(static_cast<unsigned>(p.active)), dim3(kPairPassThreads), 0, stream, p);
  }
  if (const cudaError_t e = check_workspace(workspace, workspace_bytes, needed); e != cudaSuccess) return e;
  WorkspaceCarver carver(workspace);
  const StepWorkspace w = StepWorkspace::carve(carver, p.active, slices, p.k, p.tokens != nullptr);
  const auto slice_len = static_cast<int32_t>(pair_pass_slice_length(p.vocab, slices));
  if (const cudaError_t e = launch(slices_kernel<S, T>, dim3(slices, static_cast<unsigned>(p.active)),
                                   dim3(kPairPassThreads), 0, stream, p, slice_len, w.partials, w.softmax);
      e != cudaSuccess) {
    return e;
  }
  return launch(merge_kernel<S, T>, dim3(static_cast<unsigned>(p.active)), dim3(kPairPassThreads), 0, stream, p, slices,
                w.partials, static_cast<const opd::PairSoftmaxState*>(w.softmax));
}

// drift_scan keeps everything in registers: no workspace.
inline cudaError_t drift_scan_workspace_size(int64_t, int64_t, size_t* bytes) {
  *bytes = 0;
  return cudaSuccess;
}

inline cudaError_t launch_drift_scan(const DriftScanParams& p, void*, size_t, cudaStream_t stream) {
  using namespace drift_impl;
  if (p.batch == 0) return cudaSuccess;
  if (p.batch < 0 || p.steps < 0) return cudaErrorInvalidValue;
  const auto blocks = static_cast<unsigned>(ceil_div(p.batch, kScanThreads));
  return launch(scan_kernel<kScanThreads>, dim3(blocks), dim3(kScanThreads), 0, stream, p);
}

}  // namespace opd::cuda
