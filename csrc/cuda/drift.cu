// Prune-OPD drift ops on CUDA.
//
// drift_step: one pass over both logit rows (block_pair_pass) feeds the two streaming top-k
// buffers and, when the sampled tokens are given, each thread's online softmax state
// (opd/online_softmax.h); then the overlap, a block merge of the softmax states and thread 0
// advancing the sequence's state with opd::drift_step, the rule the CPU kernel and the reference
// share. With many rows a block owns a row; decode batches are small, so there each row is cut
// into slices (as topk_overlap does) whose partial top-k lists and softmax states a second kernel
// merges before the update. drift_scan: one thread per sequence running opd::drift_scan_row (the state
// machine is sequential in T; B is small).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cuda/block_topk.cuh"
#include "drift_args.h"
#include "opd/drift.h"
#include "opd/online_softmax.h"
#include "torch_utils.h"

namespace opd_ext {
namespace cuda_kernels {
namespace {

constexpr int kWarpThreads = 32;
constexpr int kScanThreads = 128;
// Partial softmax states of the split path live in a float32 workspace, one struct per slice.
constexpr int kSoftmaxStateFloats = 6;
static_assert(sizeof(opd::PairSoftmaxState) == kSoftmaxStateFloats * sizeof(float));

struct StepOutputPtrs {
  float* overlap;
  float* multiplier;
  bool* stopped;
  float* student_logprob;  // the three token statistics: null when no tokens were given
  float* teacher_logprob;
  float* reverse_kl;
};

__device__ __forceinline__ opd::PairSoftmaxState shuffle_down(const opd::PairSoftmaxState& s, int offset) {
  opd::PairSoftmaxState o;
  o.max_s = __shfl_down_sync(0xffffffffu, s.max_s, offset);
  o.sum_s = __shfl_down_sync(0xffffffffu, s.sum_s, offset);
  o.max_t = __shfl_down_sync(0xffffffffu, s.max_t, offset);
  o.sum_t = __shfl_down_sync(0xffffffffu, s.sum_t, offset);
  o.cross_s = __shfl_down_sync(0xffffffffu, s.cross_s, offset);
  o.cross_t = __shfl_down_sync(0xffffffffu, s.cross_t, offset);
  return o;
}

// Merges every thread's state; the result is valid in thread 0.
__device__ opd::PairSoftmaxState block_merge(opd::PairSoftmaxState state) {
  __shared__ opd::PairSoftmaxState warp_states[kPairPassThreads / kWarpThreads];
  for (int offset = kWarpThreads / 2; offset > 0; offset >>= 1) state.merge(shuffle_down(state, offset));
  const int warp = threadIdx.x / kWarpThreads;
  if (threadIdx.x % kWarpThreads == 0) warp_states[warp] = state;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < static_cast<int>(blockDim.x / kWarpThreads); ++w) state.merge(warp_states[w]);
  }
  return state;
}

struct SoftmaxVisitor {
  opd::PairSoftmaxState state;
  float inv_temperature;
  __device__ __forceinline__ void operator()(float s, float t, int32_t) {
    state.update(s * inv_temperature, t * inv_temperature);
  }
};

// Everything the step needs besides the logits, passed by value to every kernel.
struct StepArgs {
  const int64_t* tokens;  // null: no token statistics
  float inv_temperature;
  const int64_t* rows;  // null: logits row i is state row i
  int64_t batch;
  int k;
  opd::DriftConfig config;
  opd::DriftStateArrays state;
  StepOutputPtrs out;
};

// Thread 0, once a row's overlap (and softmax state, with tokens) is known: the sampled token's
// statistics and the drift update of its sequence.
template <typename S, typename T>
__device__ void finish_row(int64_t i, const S* s_row, const T* t_row, int32_t vocab, bool saw_nan, int common,
                           const opd::PairSoftmaxState& softmax, const StepArgs& a) {
  const float nan = __int_as_float(0x7fc00000);
  const float overlap = saw_nan ? nan : static_cast<float>(common) / static_cast<float>(a.k);
  a.out.overlap[i] = overlap;
  if (a.tokens != nullptr) {
    const int64_t y = a.tokens[i];
    const bool valid = y >= 0 && y < vocab;  // the Python wrapper rejects the others first
    a.out.student_logprob[i] = valid ? static_cast<float>(s_row[y]) * a.inv_temperature - softmax.lse_s() : nan;
    a.out.teacher_logprob[i] = valid ? static_cast<float>(t_row[y]) * a.inv_temperature - softmax.lse_t() : nan;
    a.out.reverse_kl[i] = softmax.reverse_kl();
  }
  const int64_t row = a.rows != nullptr ? a.rows[i] : i;
  if (row < 0 || row >= a.batch) {  // rejected by the Python wrapper; never write out of bounds
    a.out.multiplier[i] = nan;
    a.out.stopped[i] = true;
    return;
  }
  opd::DriftState state = a.state.load(row);
  const opd::DriftTokenResult r = opd::drift_step(a.config, state, overlap);
  a.state.store(row, state);
  a.out.multiplier[i] = r.multiplier;
  a.out.stopped[i] = r.stopped;
}

// One pass of the block over (a slice of) both rows; with tokens, returns the block's merged
// softmax state in thread 0.
template <typename S, typename T>
__device__ opd::PairSoftmaxState read_rows(const S* s_row, const T* t_row, int32_t len, int32_t index_base,
                                           TopKCandidates& top_s, TopKCandidates& top_t, const StepArgs& a) {
  topk_reset(top_s, a.k);
  topk_reset(top_t, a.k);
  if (a.tokens == nullptr) {
    NoVisitor no_visit;
    block_pair_pass(s_row, t_row, len, &top_s, &top_t, no_visit, index_base);
    return {};
  }
  SoftmaxVisitor visit{{}, a.inv_temperature};
  block_pair_pass(s_row, t_row, len, &top_s, &top_t, visit, index_base);
  return block_merge(visit.state);
}

// One block per row: the whole row pair in one pass.
template <typename S, typename T>
__global__ void __launch_bounds__(kPairPassThreads)
    drift_step_kernel(const S* student, const T* teacher, int64_t row_stride_s, int64_t row_stride_t,
                      int32_t vocab, StepArgs a) {
  __shared__ TopKCandidates top_s;
  __shared__ TopKCandidates top_t;
  __shared__ int common_counter;
  const int64_t i = blockIdx.x;
  const S* s_row = student + i * row_stride_s;
  const T* t_row = teacher + i * row_stride_t;
  const opd::PairSoftmaxState softmax = read_rows(s_row, t_row, vocab, 0, top_s, top_t, a);
  const int common = block_count_common(top_s.indices, top_t.indices, a.k, &common_counter);
  if (threadIdx.x == 0) finish_row(i, s_row, t_row, vocab, top_s.saw_nan || top_t.saw_nan, common, softmax, a);
}

// Few rows (decode batches): block (slice, row) reads one slice of the row pair and leaves its
// partial top-k lists ([row][student|teacher][slice][k], the layout topk_merge_partials reads) and
// its softmax state ([row][slice]) for drift_step_merge_kernel.
template <typename S, typename T>
__global__ void __launch_bounds__(kPairPassThreads)
    drift_step_slices_kernel(const S* student, const T* teacher, int64_t row_stride_s, int64_t row_stride_t,
                             int32_t vocab, int32_t slice_len, StepArgs a, float* partial_values,
                             int32_t* partial_indices, int* row_saw_nan, opd::PairSoftmaxState* partial_softmax) {
  __shared__ TopKCandidates top_s;
  __shared__ TopKCandidates top_t;
  const int slice = blockIdx.x;
  const int slices = gridDim.x;
  const int64_t row = blockIdx.y;
  const int32_t begin = slice * slice_len;
  const int32_t len = max(0, min(slice_len, vocab - begin));
  const opd::PairSoftmaxState softmax = read_rows(student + row * row_stride_s + begin,
                                                  teacher + row * row_stride_t + begin, len, begin, top_s, top_t, a);
  const int64_t s_offset = ((row * 2 + 0) * slices + slice) * a.k;
  const int64_t t_offset = ((row * 2 + 1) * slices + slice) * a.k;
  topk_store_partial(top_s, partial_values + s_offset, partial_indices + s_offset, row_saw_nan + row);
  topk_store_partial(top_t, partial_values + t_offset, partial_indices + t_offset, row_saw_nan + row);
  if (a.tokens != nullptr && threadIdx.x == 0) partial_softmax[row * slices + slice] = softmax;
}

template <typename S, typename T>
__global__ void __launch_bounds__(kPairPassThreads)
    drift_step_merge_kernel(const S* student, const T* teacher, int64_t row_stride_s, int64_t row_stride_t,
                            int32_t vocab, int slices, StepArgs a, const float* partial_values,
                            const int32_t* partial_indices, const int* row_saw_nan,
                            const opd::PairSoftmaxState* partial_softmax) {
  __shared__ TopKCandidates top_s;
  __shared__ TopKCandidates top_t;
  __shared__ int common_counter;
  const int64_t i = blockIdx.x;
  topk_reset(top_s, a.k);
  topk_reset(top_t, a.k);
  const int64_t s_offset = (i * 2 + 0) * slices * a.k;
  const int64_t t_offset = (i * 2 + 1) * slices * a.k;
  topk_merge_partials(top_s, partial_values + s_offset, partial_indices + s_offset, slices);
  topk_merge_partials(top_t, partial_values + t_offset, partial_indices + t_offset, slices);
  const int common = block_count_common(top_s.indices, top_t.indices, a.k, &common_counter);
  if (threadIdx.x != 0) return;
  opd::PairSoftmaxState softmax;
  if (a.tokens != nullptr) {
    for (int slice = 0; slice < slices; ++slice) softmax.merge(partial_softmax[i * slices + slice]);
  }
  finish_row(i, student + i * row_stride_s, teacher + i * row_stride_t, vocab, row_saw_nan[i] != 0, common,
             softmax, a);
}

__global__ void drift_scan_kernel(const float* overlaps, const bool* valid, int64_t batch, int64_t steps,
                                  opd::DriftConfig config, opd::DriftStateArrays state, float* multipliers,
                                  float* weights, int64_t* stop_position) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  opd::DriftState s = state.load(b);
  stop_position[b] = opd::drift_scan_row(config, s, overlaps + b * steps, valid != nullptr ? valid + b * steps : nullptr,
                                         steps, multipliers + b * steps, weights + b * steps);
  state.store(b, s);
}

DriftStepOutputs drift_step_cuda(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                            const std::optional<at::Tensor>& tokens, const std::optional<at::Tensor>& rows,
                            at::Tensor& ema, at::Tensor& weight, at::Tensor& drift_run, at::Tensor& drift_events,
                            at::Tensor& length, at::Tensor& stop_reason, const at::Tensor& budget, int64_t k,
                            double temperature, double ema_beta, double threshold, int64_t warmup, double w_drop,
                            double decay, double w_base, int64_t patience, double min_weight) {
  constexpr const char* op = "drift_step";
  const DriftStepInputs in =
      check_drift_step_inputs(student_logits, teacher_logits, tokens, rows, ema, weight, drift_run, drift_events,
                              length, stop_reason, budget, k, temperature, ema_beta, threshold, warmup, w_drop,
                              decay, w_base, patience, min_weight);
  const int64_t active = in.active, vocab = in.vocab, batch = in.batch;
  const opd::DriftConfig& config = in.config;
  const at::Tensor& row_index = in.row_index;
  const at::Tensor& token_ids = in.token_ids;
  TORCH_CHECK(k <= kMaxStreamingTopK, op, ": the CUDA kernel supports k <= ", kMaxStreamingTopK, " (got ", k,
              "); DriftMonitor falls back to the reference for larger k");

  const c10::cuda::CUDAGuard device_guard(student_logits.device());
  const at::Tensor s = as_rows(student_logits);
  const at::Tensor t = as_rows(teacher_logits);
  DriftStepOutputs outputs = allocate_drift_step_outputs(s.options(), active, tokens.has_value());
  at::Tensor& overlap = std::get<0>(outputs);
  at::Tensor& multiplier = std::get<1>(outputs);
  at::Tensor& stopped = std::get<2>(outputs);
  at::Tensor& student_logprob = std::get<3>(outputs);
  at::Tensor& teacher_logprob = std::get<4>(outputs);
  at::Tensor& reverse_kl = std::get<5>(outputs);
  if (active == 0) return outputs;
  TORCH_CHECK(active <= INT32_MAX, op, ": too many rows (", active, ")");

  const bool with_stats = tokens.has_value();
  const StepOutputPtrs out{overlap.mutable_data_ptr<float>(), multiplier.mutable_data_ptr<float>(),
                           stopped.mutable_data_ptr<bool>(),
                           with_stats ? student_logprob.mutable_data_ptr<float>() : nullptr,
                           with_stats ? teacher_logprob.mutable_data_ptr<float>() : nullptr,
                           with_stats ? reverse_kl.mutable_data_ptr<float>() : nullptr};
  const StepArgs args{with_stats ? token_ids.const_data_ptr<int64_t>() : nullptr,
                      static_cast<float>(1.0 / temperature),
                      rows.has_value() ? row_index.const_data_ptr<int64_t>() : nullptr,
                      batch,
                      static_cast<int>(k),
                      config,
                      drift_arrays(ema, weight, drift_run, drift_events, length, stop_reason, budget),
                      out};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int slices = pair_pass_slices_per_row(active, vocab, k);
  dispatch_logit_pair(s.scalar_type(), t.scalar_type(), op, [&]<typename S, typename T>() {
    const S* s_data = s.const_data_ptr<S>();
    const T* t_data = t.const_data_ptr<T>();
    if (slices == 1) {
      drift_step_kernel<S, T><<<static_cast<unsigned>(active), kPairPassThreads, 0, stream>>>(
          s_data, t_data, s.stride(0), t.stride(0), static_cast<int32_t>(vocab), args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const int64_t slice_len = pair_pass_slice_length(vocab, slices);
    const at::Tensor partial_values = at::empty({active, 2, slices, k}, s.options().dtype(at::kFloat));
    const at::Tensor partial_indices = at::empty({active, 2, slices, k}, s.options().dtype(at::kInt));
    const at::Tensor row_saw_nan = at::zeros({active}, s.options().dtype(at::kInt));
    const at::Tensor partial_softmax =
        at::empty({with_stats ? active * slices : 0, kSoftmaxStateFloats}, s.options().dtype(at::kFloat));
    auto* softmax_ptr = reinterpret_cast<opd::PairSoftmaxState*>(partial_softmax.mutable_data_ptr<float>());
    drift_step_slices_kernel<S, T><<<dim3(slices, static_cast<unsigned>(active)), kPairPassThreads, 0, stream>>>(
        s_data, t_data, s.stride(0), t.stride(0), static_cast<int32_t>(vocab), static_cast<int32_t>(slice_len), args,
        partial_values.mutable_data_ptr<float>(), partial_indices.mutable_data_ptr<int32_t>(),
        row_saw_nan.mutable_data_ptr<int>(), softmax_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    drift_step_merge_kernel<S, T><<<static_cast<unsigned>(active), kPairPassThreads, 0, stream>>>(
        s_data, t_data, s.stride(0), t.stride(0), static_cast<int32_t>(vocab), slices, args,
        partial_values.const_data_ptr<float>(), partial_indices.const_data_ptr<int32_t>(),
        row_saw_nan.const_data_ptr<int>(), softmax_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return outputs;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> drift_scan_cuda(
    const at::Tensor& overlaps, const std::optional<at::Tensor>& mask, at::Tensor& ema, at::Tensor& weight,
    at::Tensor& drift_run, at::Tensor& drift_events, at::Tensor& length, at::Tensor& stop_reason,
    const at::Tensor& budget, double ema_beta, double threshold, int64_t warmup, double w_drop, double decay,
    double w_base, int64_t patience, double min_weight) {
  const c10::cuda::CUDAGuard device_guard(overlaps.device());
  const DriftScanInputs in = check_drift_scan_inputs(overlaps, mask, ema, weight, drift_run, drift_events, length,
                                                     stop_reason, budget, ema_beta, threshold, warmup, w_drop,
                                                     decay, w_base, patience, min_weight);
  const int64_t batch = in.batch, steps = in.steps;
  const opd::DriftConfig& config = in.config;
  const at::Tensor& o = in.overlaps;
  const at::Tensor& valid = in.valid;
  at::Tensor multipliers = at::empty({batch, steps}, o.options());
  at::Tensor weights = at::empty({batch, steps}, o.options());
  at::Tensor stop_position = at::empty({batch}, o.options().dtype(at::kLong));
  if (batch == 0) return {multipliers, weights, stop_position};
  const opd::DriftStateArrays state = drift_arrays(ema, weight, drift_run, drift_events, length, stop_reason, budget);
  const auto blocks = static_cast<unsigned>((batch + kScanThreads - 1) / kScanThreads);
  drift_scan_kernel<<<blocks, kScanThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      o.const_data_ptr<float>(), mask.has_value() ? valid.const_data_ptr<bool>() : nullptr, batch, steps, config,
      state, multipliers.mutable_data_ptr<float>(), weights.mutable_data_ptr<float>(),
      stop_position.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {multipliers, weights, stop_position};
}

}  // namespace
}  // namespace cuda_kernels

TORCH_LIBRARY_IMPL(opd_ext, CUDA, m) {
  m.impl("drift_step", &cuda_kernels::drift_step_cuda);
  m.impl("drift_scan", &cuda_kernels::drift_scan_cuda);
}

}  // namespace opd_ext
