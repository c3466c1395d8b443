// token_stats, student_stats and the fused vOPD / reverse-KL backwards on CUDA.
//
// Every kernel streams whole rows once (launch design in csrc/cuda/README.md):
// * a row belongs to a group of 32..256 threads (one warp per row for small V, one CTA per row for
//   large V; several rows per CTA in between), walking it in 16-byte vector chunks, two in flight
//   per thread; the unaligned head and the tail of a row (odd V, sliced views) run scalar;
// * the online state of opd/online_softmax.h is merged by warp shuffles, then across the group's
//   warps through shared memory;
// * chunks are folded into the state with the fast exp, re-centring only when a max rises;
// * when whole rows would leave the last wave of CTAs mostly idle (few rows, or an unlucky count),
//   rows are cut into slices on separate CTAs; their partial states go to a workspace and a second
//   kernel merges them (the backwards need no merge);
// * with the top-k baseline (topk > 0) one block per row streams both rows through
//   cuda/block_topk.cuh, which also collects the student's top-k ids in the same pass.
#include <ATen/core/Tensor.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/stack.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>

#include "cuda/block_topk.cuh"
#include "opd/online_softmax.h"
#include "torch_utils.h"

namespace opd_ext {
namespace {

constexpr int kBlockThreads = 256;
constexpr int kWarpThreads = 32;
constexpr int kWarpsPerBlock = kBlockThreads / kWarpThreads;
constexpr int kVectorBytes = 16;
// 64 registers per thread: 1024 resident threads per SM, each with two chunks (up to 128 bytes)
// in flight, well above what an SM needs to cover HBM latency.
constexpr int kMinBlocksPerSm = 4;
// A row group grows (32 -> kBlockThreads threads) until each thread has at least this many chunks.
constexpr int64_t kMinChunksPerThread = 4;
// A row slice keeps every thread busy for at least this many chunks, so slicing stays cheap.
constexpr int64_t kMinChunksPerSplitThread = 4;
constexpr int kMaxSplits = 64;
// Fraction of the last wave's CTAs that must be busy before the launch stops slicing rows further.
constexpr double kGoodWaveEfficiency = 0.92;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- vector memory access ---------------------------------------------------------------------

// Elements per vector chunk: one 16-byte access of a 2-byte dtype, two of float32. Eight elements
// per chunk also amortise the chunk's one `merge` of the online state.
constexpr int kChunk = 8;

// Elements from p to the next 16-byte boundary.
template <typename T>
__device__ __forceinline__ int elements_to_alignment(const T* p) {
  const auto address = reinterpret_cast<uintptr_t>(p);
  return static_cast<int>(((kVectorBytes - address % kVectorBytes) % kVectorBytes) / sizeof(T));
}

// Length of the scalar head after which every row pointer is 16-byte aligned at the same element
// index. Rows whose offsets cannot be aligned together (e.g. two views sliced differently) get the
// whole row as head: the scalar path, correct but slow.
template <typename... Ts>
__device__ __forceinline__ int vector_head(int vocab, const Ts*... rows) {
  constexpr size_t kNarrowest = std::min({sizeof(Ts)...});
  int head = 0;
  ([&] { if constexpr (sizeof(Ts) == kNarrowest) head = elements_to_alignment(rows); }(), ...);
  const bool compatible =
      ((head % static_cast<int>(kVectorBytes / sizeof(Ts)) == elements_to_alignment(rows)) && ...);
  return compatible ? std::min(head, vocab) : vocab;
}

// Loads W elements starting at a 16-byte aligned p, widened to float and scaled. Streaming
// (evict-first) loads: each logit is read once, so it should not displace reusable L2 lines.
template <int W, typename T>
__device__ __forceinline__ void load_chunk(const T* p, float scale, float (&out)[W]) {
  constexpr int kPerVector = kVectorBytes / sizeof(T);
  static_assert(W % kPerVector == 0);
#pragma unroll
  for (int vec = 0; vec < W / kPerVector; ++vec) {
    const uint4 raw = __ldcs(reinterpret_cast<const uint4*>(p) + vec);
    T values[kPerVector];
    memcpy(values, &raw, sizeof(raw));
#pragma unroll
    for (int i = 0; i < kPerVector; ++i) out[vec * kPerVector + i] = static_cast<float>(values[i]) * scale;
  }
}

// Rounds W floats to T and stores them at a 16-byte aligned p, streaming (the gradient is not
// read back by this kernel).
template <int W, typename T>
__device__ __forceinline__ void store_chunk(T* p, const float (&in)[W]) {
  constexpr int kPerVector = kVectorBytes / sizeof(T);
  static_assert(W % kPerVector == 0);
#pragma unroll
  for (int vec = 0; vec < W / kPerVector; ++vec) {
    T values[kPerVector];
#pragma unroll
    for (int i = 0; i < kPerVector; ++i) values[i] = static_cast<T>(in[vec * kPerVector + i]);
    uint4 raw;
    memcpy(&raw, values, sizeof(raw));
    __stcs(reinterpret_cast<uint4*>(p) + vec, raw);
  }
}

// Chunks first, first + stride, ... below last, kUnroll loads issued before any is consumed so a
// thread keeps several 16-byte requests in flight across the consumer's branches.
template <int kUnroll, typename Load, typename Consume>
__device__ __forceinline__ void for_each_chunk(int first, int last, int stride, Load&& load,
                                               Consume&& consume) {
  int c = first;
  for (; c + (kUnroll - 1) * stride < last; c += kUnroll * stride) {
    decltype(load(c)) chunks[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) chunks[u] = load(c + u * stride);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) consume(chunks[u], c + u * stride);
  }
  for (; c < last; c += stride) consume(load(c), c);
}

// ---- row partitioning -------------------------------------------------------------------------

// Which rows and which slice of a row a thread works on. Rows are walked by groups of
// `group_threads` (a multiple of 32 dividing kBlockThreads); gridDim.x covers the rows and
// gridDim.y cuts each row into `splits` slices of whole chunks.
struct RowTask {
  int64_t row;
  int lane;            // thread index inside the row group
  int group_threads;
  int split, splits;
};

__device__ __forceinline__ RowTask row_task(int group_threads) {
  const int groups_per_block = kBlockThreads / group_threads;
  return RowTask{static_cast<int64_t>(blockIdx.x) * groups_per_block + threadIdx.x / group_threads,
                 static_cast<int>(threadIdx.x % group_threads), group_threads,
                 static_cast<int>(blockIdx.y), static_cast<int>(gridDim.y)};
}

// Visits the part of a row [0, vocab) that `task` owns: its share of the vector chunks between
// `head` and the tail, and (first / last slice) the scalar head and tail elements.
template <typename OnChunk, typename OnElement>
__device__ __forceinline__ void visit_row_slice(const RowTask& task, int vocab, int head,
                                                OnChunk&& on_chunks, OnElement&& on_element) {
  const int chunks = (vocab - head) / kChunk;
  const int body_end = head + chunks * kChunk;
  const int per_split = (chunks + task.splits - 1) / task.splits;
  const int first = std::min(task.split * per_split, chunks);
  const int last = std::min(first + per_split, chunks);
  on_chunks(first + task.lane, last, task.group_threads);
  if (task.split == 0) {
    for (int v = task.lane; v < head; v += task.group_threads) on_element(v);
  }
  if (task.split == task.splits - 1) {
    for (int v = body_end + task.lane; v < vocab; v += task.group_threads) on_element(v);
  }
}

// ---- reductions of the online state -----------------------------------------------------------

template <typename State>
__device__ __forceinline__ State shuffle_xor(const State& state, int lane_mask) {
  static_assert(std::is_trivially_copyable_v<State> && sizeof(State) % sizeof(uint32_t) == 0);
  constexpr int kWords = sizeof(State) / sizeof(uint32_t);
  uint32_t words[kWords];
  memcpy(words, &state, sizeof(State));
#pragma unroll
  for (int i = 0; i < kWords; ++i) words[i] = __shfl_xor_sync(0xffffffffu, words[i], lane_mask);
  State out;
  memcpy(&out, words, sizeof(State));
  return out;
}

// Merges the states of one row group; the result is complete in the group's lane 0. Every thread
// of the block must call it (it synchronises when a group spans several warps).
template <typename State>
__device__ __forceinline__ State reduce_row_group(State state, int group_threads) {
#pragma unroll
  for (int mask = kWarpThreads / 2; mask > 0; mask /= 2) state.merge(shuffle_xor(state, mask));
  if (group_threads == kWarpThreads) return state;
  // Raw storage: the state's default member initialisers are not allowed on __shared__ objects.
  __shared__ alignas(State) unsigned char storage[kWarpsPerBlock * sizeof(State)];
  State* warp_states = reinterpret_cast<State*>(storage);
  const int warp = threadIdx.x / kWarpThreads;
  if (threadIdx.x % kWarpThreads == 0) warp_states[warp] = state;
  __syncthreads();
  if (threadIdx.x % group_threads == 0) {
    for (int w = 1; w < group_threads / kWarpThreads; ++w) state.merge(warp_states[warp + w]);
  }
  return state;
}

// ---- chunk folds ----------------------------------------------------------------------------------
// `update` of opd/online_softmax.h re-centres on every element with accurate exps (about 40
// instructions per element pair): at the ~750 G bf16 pairs/s an H100 streams, that alone would use
// most of the SM issue rate. The streaming loops fold 8-element chunks into the running state
// instead, with the state's own definitions:
// * the state is re-centred only when a chunk raises a max: a `merge` with an empty state at the
//   new maxima (after the first chunks of a row this is rare);
// * the chunk's terms, taken about the running centres, are summed with the fast exp (fast_exp:
//   ex2.approx, a few ulp on the arguments that matter, exactly 0 for -inf) and plain FMAs;
// * only when the chunk's partial sums come out NaN (0·inf from -inf entries, or a NaN input) is
//   it redone with the exact rules of SPEC §1 (`weighted`: exp(-inf)·anything = 0).

// e^x as ex2.approx.ftz(x·log2 e): two instructions, where __expf adds a denormal fix-up. Results
// below 2^-126 flush to 0 (the CPU kernels' exp flushes below e^-87.3); e^-inf = 0, NaN stays NaN.
__device__ __forceinline__ float fast_exp(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.44269504088896341f));
  return y;
}

struct PairTerms {
  float sum_s = 0.0f, sum_t = 0.0f, cross_s = 0.0f, cross_t = 0.0f;
};

// The rare paths stay out of line, so the streaming loop keeps its registers for loads in flight.
// State in and out by value: a reference would take its address and move it to local memory.
__device__ __noinline__ opd::PairSoftmaxState recentred(opd::PairSoftmaxState state, float max_s, float max_t) {
  opd::PairSoftmaxState empty_at_new_maxima;
  empty_at_new_maxima.max_s = fmaxf(state.max_s, max_s);
  empty_at_new_maxima.max_t = fmaxf(state.max_t, max_t);
  state.merge(empty_at_new_maxima);
  return state;
}

// Re-reads the chunk at s_row[v], t_row[v] (cheap: just loaded, rare) rather than taking the
// registers' address, which would move every chunk of the hot loop to local memory.
template <typename S, typename T>
__device__ __noinline__ PairTerms exact_terms(const S* s_row, const T* t_row, int v, float inv_temperature,
                                              float max_s, float max_t) {
  using namespace opd::online_softmax_detail;
  PairTerms terms;
  for (int i = v; i < v + kChunk; ++i) {
    const float s = static_cast<float>(s_row[i]) * inv_temperature, t = static_cast<float>(t_row[i]) * inv_temperature;
    const float e_s = element_weight(s, max_s), e_t = element_weight(t, max_t);
    const float log_ratio = (s - centre(max_s)) - (t - centre(max_t));
    terms.sum_s += e_s;
    terms.sum_t += e_t;
    terms.cross_s += weighted(e_s, log_ratio);
    terms.cross_t += weighted(e_t, -log_ratio);
  }
  return terms;
}

// Folds the chunk s_row[v, v + kChunk) (values in s, t, already divided by the temperature).
template <typename S, typename T>
__device__ __forceinline__ void fold_pair_chunk(opd::PairSoftmaxState& state, const float (&s)[kChunk],
                                                const float (&t)[kChunk], const S* s_row, const T* t_row, int v,
                                                float inv_temperature) {
  constexpr int W = kChunk;
  float chunk_max_s = -INFINITY, chunk_max_t = -INFINITY;
#pragma unroll
  for (int i = 0; i < W; ++i) {
    chunk_max_s = fmaxf(chunk_max_s, s[i]);  // fmaxf skips NaN; the sums below catch it
    chunk_max_t = fmaxf(chunk_max_t, t[i]);
  }
  if (chunk_max_s > state.max_s || chunk_max_t > state.max_t) state = recentred(state, chunk_max_s, chunk_max_t);
  const float centre_s = opd::online_softmax_detail::centre(state.max_s);
  const float centre_t = opd::online_softmax_detail::centre(state.max_t);
  PairTerms terms;
#pragma unroll
  for (int i = 0; i < W; ++i) {
    const float d_s = s[i] - centre_s, d_t = t[i] - centre_t;
    const float e_s = fast_exp(d_s), e_t = fast_exp(d_t);
    const float log_ratio = d_s - d_t;
    terms.sum_s += e_s;
    terms.sum_t += e_t;
    terms.cross_s = fmaf(e_s, log_ratio, terms.cross_s);
    terms.cross_t = fmaf(-e_t, log_ratio, terms.cross_t);
  }
  if (isnan(terms.sum_s + terms.sum_t + terms.cross_s + terms.cross_t)) {
    terms = exact_terms(s_row, t_row, v, inv_temperature, state.max_s, state.max_t);
  }
  state.sum_s += terms.sum_s;
  state.sum_t += terms.sum_t;
  state.cross_s += terms.cross_s;
  state.cross_t += terms.cross_t;
}

// The student-only fold has no cross terms, so no 0·inf: a NaN sum can only come from a NaN input.
template <int W>
__device__ __forceinline__ void fold_softmax_chunk(opd::SoftmaxState& state, const float (&s)[W]) {
  float chunk_max = -INFINITY;
#pragma unroll
  for (int i = 0; i < W; ++i) chunk_max = fmaxf(chunk_max, s[i]);
  if (chunk_max > state.max) {
    opd::SoftmaxState empty_at_new_max;
    empty_at_new_max.max = chunk_max;
    state.merge(empty_at_new_max);
  }
  const float centre = opd::online_softmax_detail::centre(state.max);
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < W; ++i) sum += fast_exp(s[i] - centre);
  state.sum += sum;
}

// ---- per-row statistics ---------------------------------------------------------------------------
// A problem describes one row reduction: its State, how to fold a vector chunk or a single element
// of a row into it, and how to turn the merged state into the row's outputs.

template <typename S, typename T>
struct PairStats {
  using State = opd::PairSoftmaxState;
  struct Row {
    const S* s;
    const T* t;
  };
  struct Chunk {
    float s[kChunk], t[kChunk];
  };

  const S* student;
  const T* teacher;
  int64_t student_row_stride, teacher_row_stride;
  const int64_t* tokens;
  int64_t rows;
  int vocab;  // positions inside a row are 32-bit: fewer registers in the streaming loops
  float inv_temperature;
  float *student_logprob, *teacher_logprob, *reverse_kl, *forward_kl, *student_lse, *teacher_lse;

  __device__ Row row(int64_t r) const { return {student + r * student_row_stride, teacher + r * teacher_row_stride}; }
  __device__ int head(const Row& row) const { return vector_head(vocab, row.s, row.t); }
  __device__ Chunk load(const Row& row, int v) const {
    Chunk chunk;
    load_chunk(row.s + v, inv_temperature, chunk.s);
    load_chunk(row.t + v, inv_temperature, chunk.t);
    return chunk;
  }
  __device__ void accumulate(State& state, const Row& row, const Chunk& chunk, int v) const {
    fold_pair_chunk(state, chunk.s, chunk.t, row.s, row.t, v, inv_temperature);
  }
  __device__ void accumulate_element(State& state, const Row& row, int v) const {
    state.update(static_cast<float>(row.s[v]) * inv_temperature, static_cast<float>(row.t[v]) * inv_temperature);
  }
  __device__ void finalize(const State& state, int64_t r) const {
    const Row rw = row(r);
    const int64_t token = tokens[r];
    // Out-of-range ids give NaN log-probs, never a read outside the row; check_token_range raises.
    const bool in_range = token >= 0 && token < vocab;
    const float s_y = in_range ? static_cast<float>(rw.s[token]) * inv_temperature : kNaN;
    const float t_y = in_range ? static_cast<float>(rw.t[token]) * inv_temperature : kNaN;
    using opd::online_softmax_detail::centre;
    // (x - centre) - log Z rather than x - lse: lse rounds to ulp(max), ~1e-3 at |logits| ~ 1e4.
    student_logprob[r] = (s_y - centre(state.max_s)) - logf(state.sum_s);
    teacher_logprob[r] = (t_y - centre(state.max_t)) - logf(state.sum_t);
    reverse_kl[r] = state.reverse_kl();
    forward_kl[r] = state.forward_kl();
    student_lse[r] = state.lse_s();
    teacher_lse[r] = state.lse_t();
  }
};

template <typename S>
struct StudentStats {
  using State = opd::SoftmaxState;
  struct Row {
    const S* s;
  };
  struct Chunk {
    float s[kChunk];
  };

  const S* student;
  int64_t student_row_stride;
  const int64_t* tokens;
  int64_t rows;
  int vocab;  // positions inside a row are 32-bit: fewer registers in the streaming loops
  float inv_temperature;
  float *student_logprob, *student_lse;

  __device__ Row row(int64_t r) const { return {student + r * student_row_stride}; }
  __device__ int head(const Row& row) const { return vector_head(vocab, row.s); }
  __device__ Chunk load(const Row& row, int v) const {
    Chunk chunk;
    load_chunk(row.s + v, inv_temperature, chunk.s);
    return chunk;
  }
  __device__ static void accumulate(State& state, const Row&, const Chunk& chunk, int) {
    fold_softmax_chunk(state, chunk.s);
  }
  __device__ void accumulate_element(State& state, const Row& row, int v) const {
    state.update(static_cast<float>(row.s[v]) * inv_temperature);
  }
  __device__ void finalize(const State& state, int64_t r) const {
    const int64_t token = tokens[r];
    const bool in_range = token >= 0 && token < vocab;
    const float s_y = in_range ? static_cast<float>(row(r).s[token]) * inv_temperature : kNaN;
    student_logprob[r] = (s_y - opd::online_softmax_detail::centre(state.max)) - logf(state.sum);
    student_lse[r] = state.lse();
  }
};

// One slice of one row per row group; with a single slice the group finalises the row, otherwise
// it leaves its partial state in `partials[row * splits + split]`.
template <typename Problem>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSm)
    row_stats_kernel(Problem problem, int group_threads, typename Problem::State* partials) {
  using State = typename Problem::State;
  const RowTask task = row_task(group_threads);
  State state;
  if (task.row < problem.rows) {
    const auto row = problem.row(task.row);
    const int head = problem.head(row);
    visit_row_slice(
        task, problem.vocab, head,
        [&](int first, int last, int stride) {
          for_each_chunk<2>(
              first, last, stride, [&](int c) { return problem.load(row, head + c * kChunk); },
              [&](const auto& chunk, int c) { problem.accumulate(state, row, chunk, head + c * kChunk); });
        },
        [&](int v) { problem.accumulate_element(state, row, v); });
  }
  state = reduce_row_group(state, group_threads);
  if (task.row < problem.rows && task.lane == 0) {
    if (task.splits == 1) {
      problem.finalize(state, task.row);
    } else {
      partials[task.row * task.splits + task.split] = state;
    }
  }
}

template <typename Problem>
__global__ void __launch_bounds__(kBlockThreads)
    merge_partials_kernel(Problem problem, const typename Problem::State* partials, int splits) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= problem.rows) return;
  typename Problem::State state = partials[r * splits];
  for (int i = 1; i < splits; ++i) state.merge(partials[r * splits + i]);
  problem.finalize(state, r);
}

// ---- backwards: elementwise over rows, given per-row scalars ------------------------------------

// grad[r, j] = coef[r] / tau * (1[j == y_r] - p[r, j]).
template <typename S>
struct PolicyGradientBackward {
  struct Row {
    const S* s;
    S* grad;
    float scale, lse;  // coef / tau, student lse
    int token;         // -1 when out of range: no entry gets the indicator
  };
  struct Chunk {
    float s[kChunk];
  };

  const S* student;
  int64_t student_row_stride;
  S* grad;  // contiguous [rows, vocab]
  const float* coef;
  const int64_t* tokens;
  const float* student_lse;
  int64_t rows;
  int vocab;  // positions inside a row are 32-bit: fewer registers in the streaming loops
  float inv_temperature;

  __device__ Row row(int64_t r) const {
    const int64_t token = tokens[r];
    return {student + r * student_row_stride, grad + r * vocab, coef[r] * inv_temperature, student_lse[r],
            token >= 0 && token < vocab ? static_cast<int>(token) : -1};
  }
  __device__ int head(const Row& row) const { return vector_head(vocab, row.s, static_cast<const S*>(row.grad)); }
  __device__ float grad_of(const Row& row, float s, int v) const {
    return row.scale * ((v == row.token ? 1.0f : 0.0f) - expf(s - row.lse));
  }
  __device__ Chunk load(const Row& row, int v) const {
    Chunk chunk;
    load_chunk(row.s + v, inv_temperature, chunk.s);
    return chunk;
  }
  __device__ void store(const Row& row, const Chunk& chunk, int v) const {
    float grad_chunk[kChunk];
#pragma unroll
    for (int i = 0; i < kChunk; ++i) grad_chunk[i] = grad_of(row, chunk.s[i], v + i);
    store_chunk(row.grad + v, grad_chunk);
  }
  __device__ void process_element(const Row& row, int v) const {
    row.grad[v] = static_cast<S>(grad_of(row, static_cast<float>(row.s[v]) * inv_temperature, v));
  }
};

// grad[r, j] = coef[r] / tau * p_j (log p_j - log q_j - KL_r).
template <typename S, typename T>
struct ReverseKlBackward {
  struct Row {
    const S* s;
    const T* t;
    S* grad;
    float scale, lse_s, lse_t, kl;  // coef / tau and the forward's statistics
  };
  struct Chunk {
    float s[kChunk], t[kChunk];
  };

  const S* student;
  const T* teacher;
  int64_t student_row_stride, teacher_row_stride;
  S* grad;  // contiguous [rows, vocab]
  const float *coef, *student_lse, *teacher_lse, *reverse_kl;
  int64_t rows;
  int vocab;  // positions inside a row are 32-bit: fewer registers in the streaming loops
  float inv_temperature;

  __device__ Row row(int64_t r) const {
    return {student + r * student_row_stride, teacher + r * teacher_row_stride, grad + r * vocab,
            coef[r] * inv_temperature, student_lse[r], teacher_lse[r], reverse_kl[r]};
  }
  __device__ int head(const Row& row) const {
    return vector_head(vocab, row.s, row.t, static_cast<const S*>(row.grad));
  }
  __device__ float grad_of(const Row& row, float s, float t) const {
    const float log_p = s - row.lse_s;
    // exp(-inf)·anything = 0 (SPEC §1): masked student entries get exactly 0, not 0·inf = NaN.
    return row.scale * opd::online_softmax_detail::weighted(expf(log_p), log_p - (t - row.lse_t) - row.kl);
  }
  __device__ Chunk load(const Row& row, int v) const {
    Chunk chunk;
    load_chunk(row.s + v, inv_temperature, chunk.s);
    load_chunk(row.t + v, inv_temperature, chunk.t);
    return chunk;
  }
  __device__ void store(const Row& row, const Chunk& chunk, int v) const {
    float grad_chunk[kChunk];
#pragma unroll
    for (int i = 0; i < kChunk; ++i) grad_chunk[i] = grad_of(row, chunk.s[i], chunk.t[i]);
    store_chunk(row.grad + v, grad_chunk);
  }
  __device__ void process_element(const Row& row, int v) const {
    row.grad[v] = static_cast<S>(grad_of(row, static_cast<float>(row.s[v]) * inv_temperature,
                                         static_cast<float>(row.t[v]) * inv_temperature));
  }
};

template <typename Problem>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSm) row_backward_kernel(Problem problem, int group_threads) {
  const RowTask task = row_task(group_threads);
  if (task.row >= problem.rows) return;
  const auto row = problem.row(task.row);
  const int head = problem.head(row);
  if (row.scale == 0.0f) {
    // Masked rows (coef 0) get an exact zero gradient without reading their logits, as on CPU:
    // padding costs no read and NaN / inf logits there cannot leak into the gradient.
    using Grad = std::remove_pointer_t<decltype(row.grad)>;
    const float zeros[kChunk] = {};
    visit_row_slice(
        task, problem.vocab, head,
        [&](int first, int last, int stride) {
          for (int c = first; c < last; c += stride) store_chunk(row.grad + head + c * kChunk, zeros);
        },
        [&](int v) { row.grad[v] = Grad(0.0f); });
    return;
  }
  visit_row_slice(
      task, problem.vocab, head,
      [&](int first, int last, int stride) {
        for_each_chunk<2>(
            first, last, stride, [&](int c) { return problem.load(row, head + c * kChunk); },
            [&](const auto& chunk, int c) { problem.store(row, chunk, head + c * kChunk); });
      },
      [&](int v) { problem.process_element(row, v); });
}

// ---- with the top-k baseline (topk > 0) ------------------------------------------------------------
// The statistics and the student's top-k ids come from the same read of both rows: block_pair_pass
// (cuda/block_topk.cuh) streams the rows through one block, keeps the student's top-k candidates in
// shared memory and hands every element to a visitor that folds it into the online state. The
// top-k baseline is then the pair state of the k gathered (s, t) pairs: both distributions
// renormalised over the student's top-k ids, as SPEC §1 defines it. The visitor sees one element
// at a time (a little more arithmetic per element than the chunk folds of row_stats_kernel), and
// rows are not sliced: this path serves the optional top-k baseline, one 128-thread block per row.

// The per-element counterpart of fold_pair_chunk: re-centre only when a max rises, fast exp, and
// the exact SPEC §1 products (`weighted`) since there is no chunk to redo.
struct PairStateVisitor {
  opd::PairSoftmaxState state;
  float inv_temperature;
  __device__ __forceinline__ void operator()(float raw_s, float raw_t, int32_t) {
    using namespace opd::online_softmax_detail;
    const float s = raw_s * inv_temperature, t = raw_t * inv_temperature;
    if (s > state.max_s || t > state.max_t) state = recentred(state, s, t);
    const float d_s = s - centre(state.max_s), d_t = t - centre(state.max_t);
    const float e_s = fast_exp(d_s), e_t = fast_exp(d_t);
    state.sum_s += e_s;
    state.sum_t += e_t;
    state.cross_s += weighted(e_s, d_s - d_t);
    state.cross_t += weighted(e_t, d_t - d_s);
  }
};

// The full-row state and the top-k state, reduced together.
struct FullAndTopkStates {
  opd::PairSoftmaxState full, topk;
  __device__ __forceinline__ void merge(const FullAndTopkStates& other) {
    full.merge(other.full);
    topk.merge(other.topk);
  }
};

template <typename S, typename T>
__global__ void __launch_bounds__(cuda_kernels::kPairPassThreads)
    token_stats_topk_kernel(PairStats<S, T> problem, int k, float* topk_reverse_kl) {
  using namespace cuda_kernels;
  __shared__ TopKCandidates top_s;
  const int64_t r = blockIdx.x;
  topk_reset(top_s, k);
  const auto row = problem.row(r);
  PairStateVisitor visit{{}, problem.inv_temperature};
  // Ends with a barrier, after which top_s.indices[0, min(count, k)) are the student's top-k ids.
  block_pair_pass(row.s, row.t, problem.vocab, &top_s, nullptr, visit);
  FullAndTopkStates states{visit.state, {}};
  const int kept = min(top_s.count, k);
  for (int i = threadIdx.x; i < kept; i += blockDim.x) {
    const int32_t id = top_s.indices[i];
    states.topk.update(static_cast<float>(row.s[id]) * problem.inv_temperature,
                       static_cast<float>(row.t[id]) * problem.inv_temperature);
  }
  states = reduce_row_group(states, kPairPassThreads);
  if (threadIdx.x == 0) {
    problem.finalize(states.full, r);
    // As on CPU: a NaN anywhere in either row (which the top-k itself skips) makes the baseline NaN.
    const bool row_has_nan = isnan(states.full.sum_s) || isnan(states.full.sum_t);
    topk_reverse_kl[r] = row_has_nan ? kNaN : states.topk.reverse_kl();
  }
}

template <typename S, typename T>
void launch_token_stats_topk(const PairStats<S, T>& problem, int k, float* topk_reverse_kl) {
  TORCH_CHECK(problem.rows <= std::numeric_limits<int32_t>::max(), "token_stats: too many rows (", problem.rows, ")");
  token_stats_topk_kernel<<<static_cast<unsigned>(problem.rows), cuda_kernels::kPairPassThreads, 0,
                            c10::cuda::getCurrentCUDAStream()>>>(problem, k, topk_reverse_kl);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- launch -------------------------------------------------------------------------------------

struct LaunchShape {
  int group_threads;  // threads per row
  int64_t row_blocks;
  int splits;
};

// One warp per row for short rows, up to a CTA per row for long ones. Long rows are also cut into
// slices until the (row block, slice) work items fill the resident CTAs in nearly whole waves: the
// items take equal time, so a last partial wave idles the rest of the GPU (2048 rows on 528
// resident CTAs run 4 waves for 3.9 waves of work; on 396 they would run 6 for 5.2).
template <typename Kernel>
LaunchShape launch_shape(Kernel kernel, int64_t rows, int64_t vocab) {
  const int64_t chunks = ceil_div(vocab, kChunk);
  int group_threads = kWarpThreads;
  while (group_threads < kBlockThreads && group_threads * kMinChunksPerThread < chunks) group_threads *= 2;
  const int64_t row_blocks = ceil_div(rows, kBlockThreads / group_threads);
  TORCH_CHECK(row_blocks <= std::numeric_limits<int32_t>::max(), "opd_ext: too many rows (", rows, ")");

  int device = 0, sms = 0, blocks_per_sm = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, kBlockThreads, 0));
  const double resident = std::max(1, sms * blocks_per_sm);
  const int64_t max_splits = group_threads < kBlockThreads
                                 ? 1
                                 : std::clamp<int64_t>(chunks / (kBlockThreads * kMinChunksPerSplitThread), 1, kMaxSplits);
  int splits = 1;
  double best_efficiency = 0.0;
  for (int candidate = 1; candidate <= max_splits; ++candidate) {
    const double waves = static_cast<double>(row_blocks * candidate) / resident;
    const double efficiency = waves / std::ceil(waves);
    if (efficiency > best_efficiency) {
      splits = candidate;
      best_efficiency = efficiency;
    }
    if (best_efficiency >= kGoodWaveEfficiency) break;
  }
  return {group_threads, row_blocks, splits};
}

template <typename Problem>
void launch_row_stats(const Problem& problem, const at::Tensor& like) {
  using State = typename Problem::State;
  static_assert(std::is_trivially_copyable_v<State> && alignof(State) <= alignof(float));
  const LaunchShape shape = launch_shape(row_stats_kernel<Problem>, problem.rows, problem.vocab);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(shape.row_blocks), static_cast<unsigned>(shape.splits));
  if (shape.splits == 1) {
    row_stats_kernel<<<grid, kBlockThreads, 0, stream>>>(problem, shape.group_threads, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  // Stream-ordered: the caching allocator does not hand this memory out again before the merge ran.
  const int64_t words = problem.rows * shape.splits * static_cast<int64_t>(sizeof(State) / sizeof(float));
  const at::Tensor workspace = at::empty({words}, like.options().dtype(at::kFloat));
  auto* partials = reinterpret_cast<State*>(workspace.mutable_data_ptr<float>());
  row_stats_kernel<<<grid, kBlockThreads, 0, stream>>>(problem, shape.group_threads, partials);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  merge_partials_kernel<<<static_cast<unsigned>(ceil_div(problem.rows, kBlockThreads)), kBlockThreads, 0, stream>>>(
      problem, partials, shape.splits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Problem>
void launch_row_backward(const Problem& problem) {
  const LaunchShape shape = launch_shape(row_backward_kernel<Problem>, problem.rows, problem.vocab);
  const dim3 grid(static_cast<unsigned>(shape.row_blocks), static_cast<unsigned>(shape.splits));
  row_backward_kernel<<<grid, kBlockThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(problem, shape.group_threads);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- bindings -------------------------------------------------------------------------------------

void check_student_logits(const char* op, const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() >= 1 && logits.size(-1) > 0, op, ": student_logits must be [..., V] with V > 0, got ",
              logits.sizes());
  // Positions inside a row are int32; the strided loops may step one block past V.
  TORCH_CHECK(logits.size(-1) <= std::numeric_limits<int32_t>::max() - kBlockThreads, op, ": V=", logits.size(-1),
              " is too large for the CUDA kernels (at most 2^31 - ", kBlockThreads + 1, ")");
}

// A per-row argument: shape [...] (the logits' leading dims), `dtype`, on the logits' device.
// Messages match the CPU kernels'.
at::Tensor per_row(const char* op, const char* name, const at::Tensor& t, const at::Tensor& logits,
                   at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype == at::kLong ? "int64" : "float32",
              ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == logits.device(), op, ": ", name, " on ", t.device(), " but student_logits on ",
              logits.device());
  TORCH_CHECK(t.sizes() == logits.sizes().slice(0, logits.dim() - 1), op, ": ", name, " ", t.sizes(),
              " must have the leading shape of student_logits ", logits.sizes());
  return t.contiguous();
}

// Ids outside [0, V) raise as on CPU (SPEC §3). Called after the kernels are queued: they never
// read outside a row (an out-of-range id gives NaN log-probs), so the one device->host sync this
// costs waits for work already running instead of leaving the GPU idle before the launch. Under
// CUDA-graph capture no sync is possible: there the NaN is the only signal.
void check_token_range(const char* op, const at::Tensor& ids, int64_t vocab) {
  if (ids.numel() == 0) return;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(), &capture));
  if (capture != cudaStreamCaptureStatusNone) return;
  const auto [lowest, highest] = at::aminmax(ids);
  const at::Tensor bounds = at::stack({lowest, highest}).cpu();
  const int64_t lo = bounds.const_data_ptr<int64_t>()[0], hi = bounds.const_data_ptr<int64_t>()[1];
  TORCH_CHECK(lo >= 0 && hi < vocab, op, ": tokens must be in [0, V=", vocab, "), got ", lo < 0 ? lo : hi);
}

float inverse_temperature(const char* op, double temperature) {
  TORCH_CHECK(temperature > 0.0 && std::isfinite(temperature), op,
              ": temperature must be a positive finite number, got ", temperature);
  return static_cast<float>(1.0 / temperature);
}

at::Tensor per_row_output(const at::Tensor& logits) {
  return at::empty(logits.sizes().slice(0, logits.dim() - 1), logits.options().dtype(at::kFloat));
}

// The one-dtype counterpart of dispatch_logit_pair, for ops that read the student alone.
template <typename Fn>
void dispatch_student(c10::ScalarType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case c10::ScalarType::Float: return fn.template operator()<float>();
    case c10::ScalarType::BFloat16: return fn.template operator()<c10::BFloat16>();
    case c10::ScalarType::Half: return fn.template operator()<c10::Half>();
    default: TORCH_CHECK(false, op, ": student_logits must be float32, bfloat16 or float16, got ", dtype);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_stats_cuda(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& tokens, double temperature,
    int64_t topk) {
  constexpr const char* op = "token_stats";
  check_logit_pair(op, student_logits, teacher_logits);
  check_student_logits(op, student_logits);
  const float inv_temperature = inverse_temperature(op, temperature);
  const int64_t vocab = student_logits.size(-1);
  TORCH_CHECK(topk >= 0 && topk <= vocab, op, ": topk=", topk, " must be in [0, V=", vocab, "] (0: no top-k baseline)");
  TORCH_CHECK(topk <= cuda_kernels::kMaxStreamingTopK, op, ": the CUDA kernel supports topk <= ",
              cuda_kernels::kMaxStreamingTopK, " (the vOPD baseline uses 100), got ", topk);
  const at::Tensor ids = per_row(op, "tokens", tokens, student_logits, at::kLong);
  const c10::cuda::CUDAGuard guard(student_logits.device());
  const at::Tensor s = as_rows(student_logits);
  const at::Tensor t = as_rows(teacher_logits);
  const int64_t rows = s.size(0);

  at::Tensor student_logprob = per_row_output(student_logits), teacher_logprob = per_row_output(student_logits);
  at::Tensor reverse_kl = per_row_output(student_logits), forward_kl = per_row_output(student_logits);
  at::Tensor student_lse = per_row_output(student_logits), teacher_lse = per_row_output(student_logits);
  at::Tensor topk_reverse_kl =
      topk > 0 ? per_row_output(student_logits) : at::empty({0}, student_logits.options().dtype(at::kFloat));
  if (rows == 0) return {student_logprob, teacher_logprob, reverse_kl, forward_kl, topk_reverse_kl, student_lse, teacher_lse};
  dispatch_logit_pair(s.scalar_type(), t.scalar_type(), op, [&]<typename S, typename T>() {
    const PairStats<S, T> problem{.student = s.const_data_ptr<S>(),
                                  .teacher = t.const_data_ptr<T>(),
                                  .student_row_stride = s.stride(0),
                                  .teacher_row_stride = t.stride(0),
                                  .tokens = ids.const_data_ptr<int64_t>(),
                                  .rows = rows,
                                  .vocab = static_cast<int>(vocab),
                                  .inv_temperature = inv_temperature,
                                  .student_logprob = student_logprob.mutable_data_ptr<float>(),
                                  .teacher_logprob = teacher_logprob.mutable_data_ptr<float>(),
                                  .reverse_kl = reverse_kl.mutable_data_ptr<float>(),
                                  .forward_kl = forward_kl.mutable_data_ptr<float>(),
                                  .student_lse = student_lse.mutable_data_ptr<float>(),
                                  .teacher_lse = teacher_lse.mutable_data_ptr<float>()};
    if (topk == 0) {
      launch_row_stats(problem, s);
    } else {
      launch_token_stats_topk(problem, static_cast<int>(topk), topk_reverse_kl.mutable_data_ptr<float>());
    }
  });
  check_token_range(op, ids, vocab);
  return {student_logprob, teacher_logprob, reverse_kl, forward_kl, topk_reverse_kl, student_lse, teacher_lse};
}

std::tuple<at::Tensor, at::Tensor> student_stats_cuda(const at::Tensor& student_logits, const at::Tensor& tokens,
                                                      double temperature) {
  constexpr const char* op = "student_stats";
  check_student_logits(op, student_logits);
  const float inv_temperature = inverse_temperature(op, temperature);
  const at::Tensor ids = per_row(op, "tokens", tokens, student_logits, at::kLong);
  const c10::cuda::CUDAGuard guard(student_logits.device());
  const at::Tensor s = as_rows(student_logits);
  const int64_t rows = s.size(0), vocab = s.size(1);
  at::Tensor student_logprob = per_row_output(student_logits), student_lse = per_row_output(student_logits);
  if (rows == 0) return {student_logprob, student_lse};
  dispatch_student(s.scalar_type(), op, [&]<typename S>() {
    launch_row_stats(StudentStats<S>{.student = s.const_data_ptr<S>(),
                                     .student_row_stride = s.stride(0),
                                     .tokens = ids.const_data_ptr<int64_t>(),
                                     .rows = rows,
                                     .vocab = static_cast<int>(vocab),
                                     .inv_temperature = inv_temperature,
                                     .student_logprob = student_logprob.mutable_data_ptr<float>(),
                                     .student_lse = student_lse.mutable_data_ptr<float>()},
                     s);
  });
  check_token_range(op, ids, vocab);
  return {student_logprob, student_lse};
}

at::Tensor policy_gradient_backward_cuda(const at::Tensor& coef, const at::Tensor& student_logits,
                                         const at::Tensor& tokens, const at::Tensor& student_lse, double temperature) {
  constexpr const char* op = "policy_gradient_backward";
  check_student_logits(op, student_logits);
  const float inv_temperature = inverse_temperature(op, temperature);
  const at::Tensor coef_rows = per_row(op, "coef", coef, student_logits, at::kFloat);
  const at::Tensor ids = per_row(op, "tokens", tokens, student_logits, at::kLong);
  const at::Tensor lse = per_row(op, "student_lse", student_lse, student_logits, at::kFloat);
  const c10::cuda::CUDAGuard guard(student_logits.device());
  const at::Tensor s = as_rows(student_logits);
  const int64_t rows = s.size(0), vocab = s.size(1);
  at::Tensor grad = at::empty(student_logits.sizes(), student_logits.options());
  if (rows == 0) return grad;
  dispatch_student(s.scalar_type(), op, [&]<typename S>() {
    launch_row_backward(PolicyGradientBackward<S>{.student = s.const_data_ptr<S>(),
                                                  .student_row_stride = s.stride(0),
                                                  .grad = grad.mutable_data_ptr<S>(),
                                                  .coef = coef_rows.const_data_ptr<float>(),
                                                  .tokens = ids.const_data_ptr<int64_t>(),
                                                  .student_lse = lse.const_data_ptr<float>(),
                                                  .rows = rows,
                                                  .vocab = static_cast<int>(vocab),
                                                  .inv_temperature = inv_temperature});
  });
  check_token_range(op, ids, vocab);
  return grad;
}

at::Tensor reverse_kl_backward_cuda(const at::Tensor& coef, const at::Tensor& student_logits,
                                    const at::Tensor& teacher_logits, const at::Tensor& student_lse,
                                    const at::Tensor& teacher_lse, const at::Tensor& reverse_kl, double temperature) {
  constexpr const char* op = "reverse_kl_backward";
  check_logit_pair(op, student_logits, teacher_logits);
  check_student_logits(op, student_logits);
  const float inv_temperature = inverse_temperature(op, temperature);
  const at::Tensor coef_rows = per_row(op, "coef", coef, student_logits, at::kFloat);
  const at::Tensor lse_s = per_row(op, "student_lse", student_lse, student_logits, at::kFloat);
  const at::Tensor lse_t = per_row(op, "teacher_lse", teacher_lse, student_logits, at::kFloat);
  const at::Tensor kl = per_row(op, "reverse_kl", reverse_kl, student_logits, at::kFloat);
  const c10::cuda::CUDAGuard guard(student_logits.device());
  const at::Tensor s = as_rows(student_logits);
  const at::Tensor t = as_rows(teacher_logits);
  const int64_t rows = s.size(0), vocab = s.size(1);
  at::Tensor grad = at::empty(student_logits.sizes(), student_logits.options());
  if (rows == 0) return grad;
  dispatch_logit_pair(s.scalar_type(), t.scalar_type(), op, [&]<typename S, typename T>() {
    launch_row_backward(ReverseKlBackward<S, T>{.student = s.const_data_ptr<S>(),
                                                .teacher = t.const_data_ptr<T>(),
                                                .student_row_stride = s.stride(0),
                                                .teacher_row_stride = t.stride(0),
                                                .grad = grad.mutable_data_ptr<S>(),
                                                .coef = coef_rows.const_data_ptr<float>(),
                                                .student_lse = lse_s.const_data_ptr<float>(),
                                                .teacher_lse = lse_t.const_data_ptr<float>(),
                                                .reverse_kl = kl.const_data_ptr<float>(),
                                                .rows = rows,
                                                .vocab = static_cast<int>(vocab),
                                                .inv_temperature = inv_temperature});
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(opd_ext, CUDA, m) {
  m.impl("token_stats", &token_stats_cuda);
  m.impl("student_stats", &student_stats_cuda);
  m.impl("policy_gradient_backward", &policy_gradient_backward_cuda);
  m.impl("reverse_kl_backward", &reverse_kl_backward_cuda);
}

}  // namespace opd_ext
