// token_stats, student_stats and the fused vOPD / reverse-KL backwards (semantics of
// csrc/cpu/token_stats.cpp; launch design in csrc/cuda/README.md).
//
// Every kernel streams whole rows once:
// * a row belongs to a group of 32..256 threads (one warp per row for small V, one CTA per row for
//   large V; several rows per CTA in between), walking it in 16-byte vector chunks, two in flight
//   per thread; the unaligned head and the tail of a row (odd V, sliced views) run scalar;
// * the online state of opd/online_softmax.h is merged by warp shuffles, then across the group's
//   warps through shared memory (opd/cuda/reduce.cuh);
// * chunks are folded into the state with the fast exp, re-centring only when a max rises;
// * when whole rows would leave the last wave of CTAs mostly idle (few rows, or an unlucky count),
//   rows are cut into slices on separate CTAs; their partial states go to a workspace and a second
//   kernel merges them (the backwards need no merge);
// * with the top-k baseline (topk > 0) one block per row streams both rows through
//   opd/cuda/block_topk.cuh, which also collects the student's top-k ids in the same pass.
//
// Temperature: states are kept centred on the raw logits (opd/online_softmax.h, "Temperature"):
// maxima are raw, every distance is (x - centre(max)) / τ, as on CPU. Scaling first and centring
// on the max of the rounded products would put ~ulp(max/τ) (1e-3 at |logits| ~ 1e4) into every
// distance.
#pragma once

#include "opd/cuda/portability.cuh"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "opd/cuda/block_topk.cuh"
#include "opd/cuda/common.cuh"
#include "opd/cuda/reduce.cuh"
#include "opd/online_softmax.h"

namespace opd::cuda {

// ---- parameters -----------------------------------------------------------------------------------
// Logit rows: row r at student + r * student_row_stride (any stride, unit stride along V). Per-row
// arrays ([rows]) are contiguous; gradients are contiguous [rows, vocab] in the student's dtype.
// Token ids outside [0, vocab) give NaN log-probs (a kernel cannot raise; the caller checks).

template <typename S, typename T>
struct TokenStatsParams {
  const S* student;
  const T* teacher;
  int64_t student_row_stride, teacher_row_stride;
  const int64_t* tokens;
  int64_t rows;
  int vocab;  // at most kMaxRowVocab
  float inv_temperature;
  int topk;  // 0: no top-k baseline; else 1 <= topk <= min(vocab, kMaxStreamingTopK)
  float *student_logprob, *teacher_logprob, *reverse_kl, *forward_kl, *student_lse, *teacher_lse;
  float* topk_reverse_kl;  // only written when topk > 0
  // [rows, 6]: the raw PairSoftmaxState (max_s, Z_s, max_t, Z_t, D, C). Every output pointer may be
  // null (not written); null tokens skip the log-probs.
  float* pair_state = nullptr;
};

template <typename S>
struct StudentStatsParams {
  const S* student;
  int64_t student_row_stride;
  const int64_t* tokens;
  int64_t rows;
  int vocab;
  float inv_temperature;
  float *student_logprob, *student_lse;
};

// grad[r, j] = coef[r] / τ * (1[j == y_r] - p[r, j]).
template <typename S>
struct PolicyGradientBackwardParams {
  const S* student;
  int64_t student_row_stride;
  S* grad;
  const float* coef;
  const int64_t* tokens;
  const float* student_lse;
  int64_t rows;
  int vocab;
  float inv_temperature;
};

// grad[r, j] = coef[r] / τ * p_j (log p_j - log q_j - KL_r).
template <typename S, typename T>
struct ReverseKlBackwardParams {
  const S* student;
  const T* teacher;
  int64_t student_row_stride, teacher_row_stride;
  S* grad;
  const float *coef, *student_lse, *teacher_lse, *reverse_kl;
  int64_t rows;
  int vocab;
  float inv_temperature;
};

constexpr int kRowBlockThreads = 256;
// Positions inside a row are int32; the strided loops may step one block past V.
constexpr int64_t kMaxRowVocab = std::numeric_limits<int32_t>::max() - kRowBlockThreads;

namespace token_stats_impl {

constexpr int kBlockThreads = kRowBlockThreads;
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

// ---- vector memory access ---------------------------------------------------------------------

// Elements per vector chunk: one 16-byte access of a 2-byte dtype, two of float32. Eight elements
// per chunk also amortise the chunk's one `merge` of the online state.
constexpr int kChunk = 8;

// Elements from p to the next 16-byte boundary.
template <typename T>
__device__ __forceinline__ int elements_to_vector_boundary(const T* p) {
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
  // clang-format off: a one-line fold over the pack
  ([&] { if constexpr (sizeof(Ts) == kNarrowest) head = elements_to_vector_boundary(rows); }(), ...);
  // clang-format on
  const bool compatible =
      ((head % static_cast<int>(kVectorBytes / sizeof(Ts)) == elements_to_vector_boundary(rows)) && ...);
  return compatible ? std::min(head, vocab) : vocab;
}

// Loads W elements starting at a 16-byte aligned p, widened to float. Streaming (evict-first)
// loads: each logit is read once, so it should not displace reusable L2 lines. The 16 bytes are
// copied into the element array, never read through a T pointer.
template <int W, typename T>
__device__ __forceinline__ void load_chunk(const T* p, float (&out)[W]) {
  constexpr int kPerVector = kVectorBytes / sizeof(T);
  static_assert(W % kPerVector == 0);
#pragma unroll
  for (int vec = 0; vec < W / kPerVector; ++vec) {
    const uint4 raw = __ldcs(reinterpret_cast<const uint4*>(p) + vec);
    T values[kPerVector];
    memcpy(values, &raw, sizeof(raw));
#pragma unroll
    for (int i = 0; i < kPerVector; ++i) out[vec * kPerVector + i] = static_cast<float>(values[i]);
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
__device__ __forceinline__ void for_each_chunk(int first, int last, int stride, Load&& load, Consume&& consume) {
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
                 static_cast<int>(threadIdx.x % group_threads), group_threads, static_cast<int>(blockIdx.y),
                 static_cast<int>(gridDim.y)};
}

// Visits the part of a row [0, vocab) that `task` owns: its share of the vector chunks between
// `head` and the tail, and (first / last slice) the scalar head and tail elements.
template <typename OnChunk, typename OnElement>
__device__ __forceinline__ void visit_row_slice(const RowTask& task, int vocab, int head, OnChunk&& on_chunks,
                                                OnElement&& on_element) {
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
//   it redone with the exact rules of docs/spec.md §1 (`weighted`: exp(-inf)·anything = 0).
// Chunks hold raw logits; maxima and centres are raw, distances (x - centre) / τ.

struct PairTerms {
  float sum_s = 0.0f, sum_t = 0.0f, cross_s = 0.0f, cross_t = 0.0f;
};

// The rare paths stay out of line, so the streaming loop keeps its registers for loads in flight.
// State in and out by value: a reference would take its address and move it to local memory.
__device__ inline OPD_NOINLINE opd::PairSoftmaxState recentred(opd::PairSoftmaxState state, float max_s, float max_t,
                                                               float inv_temperature) {
  opd::PairSoftmaxState empty_at_new_maxima;
  empty_at_new_maxima.max_s = fmaxf(state.max_s, max_s);
  empty_at_new_maxima.max_t = fmaxf(state.max_t, max_t);
  state.merge(empty_at_new_maxima, inv_temperature);
  return state;
}

// Re-reads the chunk at s_row[v], t_row[v] (cheap: just loaded, rare) rather than taking the
// registers' address, which would move every chunk of the hot loop to local memory.
template <typename S, typename T>
__device__ inline OPD_NOINLINE PairTerms exact_terms(const S* s_row, const T* t_row, int v, float inv_temperature,
                                                     float max_s, float max_t) {
  using namespace opd::online_softmax_detail;
  PairTerms terms;
  for (int i = v; i < v + kChunk; ++i) {
    const float s = static_cast<float>(s_row[i]), t = static_cast<float>(t_row[i]);
    const float e_s = element_weight(s, max_s, inv_temperature), e_t = element_weight(t, max_t, inv_temperature);
    const float log_ratio = (s - centre(max_s)) * inv_temperature - (t - centre(max_t)) * inv_temperature;
    terms.sum_s += e_s;
    terms.sum_t += e_t;
    terms.cross_s += weighted(e_s, log_ratio);
    terms.cross_t += weighted(e_t, -log_ratio);
  }
  return terms;
}

// Folds the chunk s_row[v, v + kChunk) (raw values in s, t).
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
  if (chunk_max_s > state.max_s || chunk_max_t > state.max_t) {
    state = recentred(state, chunk_max_s, chunk_max_t, inv_temperature);
  }
  const float centre_s = opd::online_softmax_detail::centre(state.max_s);
  const float centre_t = opd::online_softmax_detail::centre(state.max_t);
  PairTerms terms;
#pragma unroll
  for (int i = 0; i < W; ++i) {
    const float d_s = (s[i] - centre_s) * inv_temperature, d_t = (t[i] - centre_t) * inv_temperature;
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
__device__ __forceinline__ void fold_softmax_chunk(opd::SoftmaxState& state, const float (&s)[W],
                                                   float inv_temperature) {
  float chunk_max = -INFINITY;
#pragma unroll
  for (int i = 0; i < W; ++i) chunk_max = fmaxf(chunk_max, s[i]);
  if (chunk_max > state.max) {
    opd::SoftmaxState empty_at_new_max;
    empty_at_new_max.max = chunk_max;
    state.merge(empty_at_new_max, inv_temperature);
  }
  const float centre = opd::online_softmax_detail::centre(state.max);
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < W; ++i) sum += fast_exp((s[i] - centre) * inv_temperature);
  state.sum += sum;
}

// log softmax(x / τ) at one element from the row's state: (x - centre(max)) / τ - log Z, as the CPU
// kernel writes it, rather than x / τ - lse (lse rounds to ulp(max / τ), ~1e-3 at |logits| ~ 1e4).
__device__ __forceinline__ float log_softmax_at(float x, float max, float sum, float inv_temperature) {
  return (x - opd::online_softmax_detail::centre(max)) * inv_temperature - logf(sum);
}

// ---- per-row statistics ---------------------------------------------------------------------------
// A problem describes one row reduction: its State, how to fold a vector chunk or a single element
// of a row into it, and how to turn the merged state into the row's outputs.

template <typename S, typename T>
struct PairStats {
  using State = opd::PairSoftmaxState;
  using Params = TokenStatsParams<S, T>;
  struct Row {
    const S* s;
    const T* t;
  };
  struct Chunk {
    float s[kChunk], t[kChunk];
  };

  Params p;

  __device__ Row row(int64_t r) const {
    return {p.student + r * p.student_row_stride, p.teacher + r * p.teacher_row_stride};
  }
  __device__ int head(const Row& row) const { return vector_head(p.vocab, row.s, row.t); }
  __device__ Chunk load(const Row& row, int v) const {
    Chunk chunk;
    load_chunk(row.s + v, chunk.s);
    load_chunk(row.t + v, chunk.t);
    return chunk;
  }
  __device__ void accumulate(State& state, const Row& row, const Chunk& chunk, int v) const {
    fold_pair_chunk(state, chunk.s, chunk.t, row.s, row.t, v, p.inv_temperature);
  }
  __device__ void accumulate_element(State& state, const Row& row, int v) const {
    state.update(static_cast<float>(row.s[v]), static_cast<float>(row.t[v]), p.inv_temperature);
  }
  __device__ void finalize(const State& state, int64_t r) const {
    if (p.tokens != nullptr) {
      const Row rw = row(r);
      const int64_t token = p.tokens[r];
      // Out-of-range ids give NaN log-probs, never a read outside the row; the caller raises.
      const bool in_range = token >= 0 && token < p.vocab;
      const float s_y = in_range ? static_cast<float>(rw.s[token]) : kNaN;
      const float t_y = in_range ? static_cast<float>(rw.t[token]) : kNaN;
      p.student_logprob[r] = log_softmax_at(s_y, state.max_s, state.sum_s, p.inv_temperature);
      p.teacher_logprob[r] = log_softmax_at(t_y, state.max_t, state.sum_t, p.inv_temperature);
    }
    if (p.reverse_kl != nullptr) p.reverse_kl[r] = state.reverse_kl();
    if (p.forward_kl != nullptr) p.forward_kl[r] = state.forward_kl();
    if (p.student_lse != nullptr) p.student_lse[r] = state.lse_s(p.inv_temperature);
    if (p.teacher_lse != nullptr) p.teacher_lse[r] = state.lse_t(p.inv_temperature);
    if (p.pair_state != nullptr) {
      float* o = p.pair_state + r * 6;
      o[0] = state.max_s, o[1] = state.sum_s, o[2] = state.max_t, o[3] = state.sum_t;
      o[4] = state.cross_s, o[5] = state.cross_t;
    }
  }
};

template <typename S>
struct StudentStats {
  using State = opd::SoftmaxState;
  using Params = StudentStatsParams<S>;
  struct Row {
    const S* s;
  };
  struct Chunk {
    float s[kChunk];
  };

  Params p;

  __device__ Row row(int64_t r) const { return {p.student + r * p.student_row_stride}; }
  __device__ int head(const Row& row) const { return vector_head(p.vocab, row.s); }
  __device__ Chunk load(const Row& row, int v) const {
    Chunk chunk;
    load_chunk(row.s + v, chunk.s);
    return chunk;
  }
  __device__ void accumulate(State& state, const Row&, const Chunk& chunk, int) const {
    fold_softmax_chunk(state, chunk.s, p.inv_temperature);
  }
  __device__ void accumulate_element(State& state, const Row& row, int v) const {
    state.update(static_cast<float>(row.s[v]), p.inv_temperature);
  }
  __device__ void finalize(const State& state, int64_t r) const {
    const int64_t token = p.tokens[r];
    const bool in_range = token >= 0 && token < p.vocab;
    const float s_y = in_range ? static_cast<float>(row(r).s[token]) : kNaN;
    p.student_logprob[r] = log_softmax_at(s_y, state.max, state.sum, p.inv_temperature);
    p.student_lse[r] = state.lse(p.inv_temperature);
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
  if (task.row < problem.p.rows) {
    const auto row = problem.row(task.row);
    const int head = problem.head(row);
    visit_row_slice(
        task, problem.p.vocab, head,
        [&](int first, int last, int stride) {
          for_each_chunk<2>(
              first, last, stride, [&](int c) { return problem.load(row, head + c * kChunk); },
              [&](const auto& chunk, int c) { problem.accumulate(state, row, chunk, head + c * kChunk); });
        },
        [&](int v) { problem.accumulate_element(state, row, v); });
  }
  state = reduce_row_group<kBlockThreads>(state, group_threads, problem.p.inv_temperature);
  if (task.row < problem.p.rows && task.lane == 0) {
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
  if (r >= problem.p.rows) return;
  typename Problem::State state = partials[r * splits];
  for (int i = 1; i < splits; ++i) state.merge(partials[r * splits + i], problem.p.inv_temperature);
  problem.finalize(state, r);
}

// ---- backwards: elementwise over rows, given per-row scalars ------------------------------------
// These ops get lse, not the row max, so there is no raw centre to take distances from: log p is
// fmaf(x, 1/τ, -lse), the exact product minus lse rounded once, as the CPU kernel's vectorised
// (FMA) code computes it. The float32 lse itself carries ulp(max / τ) (~1e-3 at |logits| ~ 1e4).

template <typename S>
struct PolicyGradientBackward {
  using Params = PolicyGradientBackwardParams<S>;
  struct Row {
    const S* s;
    S* grad;
    float scale, lse;  // coef / tau, student lse
    int token;         // -1 when out of range: no entry gets the indicator
  };
  struct Chunk {
    float s[kChunk];
  };

  Params p;

  __device__ Row row(int64_t r) const {
    const int64_t token = p.tokens[r];
    return {p.student + r * p.student_row_stride, p.grad + r * p.vocab, p.coef[r] * p.inv_temperature, p.student_lse[r],
            token >= 0 && token < p.vocab ? static_cast<int>(token) : -1};
  }
  __device__ int head(const Row& row) const { return vector_head(p.vocab, row.s, static_cast<const S*>(row.grad)); }
  __device__ float grad_of(const Row& row, float s, int v) const {
    return row.scale * ((v == row.token ? 1.0f : 0.0f) - expf(fmaf(s, p.inv_temperature, -row.lse)));
  }
  __device__ Chunk load(const Row& row, int v) const {
    Chunk chunk;
    load_chunk(row.s + v, chunk.s);
    return chunk;
  }
  __device__ void store(const Row& row, const Chunk& chunk, int v) const {
    float grad_chunk[kChunk];
#pragma unroll
    for (int i = 0; i < kChunk; ++i) grad_chunk[i] = grad_of(row, chunk.s[i], v + i);
    store_chunk(row.grad + v, grad_chunk);
  }
  __device__ void process_element(const Row& row, int v) const {
    row.grad[v] = static_cast<S>(grad_of(row, static_cast<float>(row.s[v]), v));
  }
};

template <typename S, typename T>
struct ReverseKlBackward {
  using Params = ReverseKlBackwardParams<S, T>;
  struct Row {
    const S* s;
    const T* t;
    S* grad;
    float scale, lse_s, lse_t, kl;  // coef / tau and the forward's statistics
  };
  struct Chunk {
    float s[kChunk], t[kChunk];
  };

  Params p;

  __device__ Row row(int64_t r) const {
    return {p.student + r * p.student_row_stride,
            p.teacher + r * p.teacher_row_stride,
            p.grad + r * p.vocab,
            p.coef[r] * p.inv_temperature,
            p.student_lse[r],
            p.teacher_lse[r],
            p.reverse_kl[r]};
  }
  __device__ int head(const Row& row) const {
    return vector_head(p.vocab, row.s, row.t, static_cast<const S*>(row.grad));
  }
  __device__ float grad_of(const Row& row, float s, float t) const {
    const float log_p = fmaf(s, p.inv_temperature, -row.lse_s);
    const float log_q = fmaf(t, p.inv_temperature, -row.lse_t);
    // exp(-inf)·anything = 0 (docs/spec.md §1): masked student entries get exactly 0, not 0·inf = NaN.
    return row.scale * opd::online_softmax_detail::weighted(expf(log_p), log_p - log_q - row.kl);
  }
  __device__ Chunk load(const Row& row, int v) const {
    Chunk chunk;
    load_chunk(row.s + v, chunk.s);
    load_chunk(row.t + v, chunk.t);
    return chunk;
  }
  __device__ void store(const Row& row, const Chunk& chunk, int v) const {
    float grad_chunk[kChunk];
#pragma unroll
    for (int i = 0; i < kChunk; ++i) grad_chunk[i] = grad_of(row, chunk.s[i], chunk.t[i]);
    store_chunk(row.grad + v, grad_chunk);
  }
  __device__ void process_element(const Row& row, int v) const {
    row.grad[v] = static_cast<S>(grad_of(row, static_cast<float>(row.s[v]), static_cast<float>(row.t[v])));
  }
};

template <typename Problem>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSm)
    row_backward_kernel(Problem problem, int group_threads) {
  const RowTask task = row_task(group_threads);
  if (task.row >= problem.p.rows) return;
  const auto row = problem.row(task.row);
  const int head = problem.head(row);
  if (row.scale == 0.0f) {
    // Masked rows (coef 0) get an exact zero gradient without reading their logits, as on CPU:
    // padding costs no read and NaN / inf logits there cannot leak into the gradient.
    using Grad = std::remove_pointer_t<decltype(row.grad)>;
    const float zeros[kChunk] = {};
    visit_row_slice(
        task, problem.p.vocab, head,
        [&](int first, int last, int stride) {
          for (int c = first; c < last; c += stride) store_chunk(row.grad + head + c * kChunk, zeros);
        },
        [&](int v) { row.grad[v] = Grad(0.0f); });
    return;
  }
  visit_row_slice(
      task, problem.p.vocab, head,
      [&](int first, int last, int stride) {
        for_each_chunk<2>(
            first, last, stride, [&](int c) { return problem.load(row, head + c * kChunk); },
            [&](const auto& chunk, int c) { problem.store(row, chunk, head + c * kChunk); });
      },
      [&](int v) { problem.process_element(row, v); });
}

// ---- with the top-k baseline (topk > 0) ------------------------------------------------------------
// The statistics and the student's top-k ids come from the same read of both rows: block_pair_pass
// (opd/cuda/block_topk.cuh) streams the rows through one block, keeps the student's top-k
// candidates in shared memory and hands every element to a visitor that folds it into the online
// state. The top-k baseline is then the pair state of the k gathered (s, t) pairs: both
// distributions renormalised over the student's top-k ids, as docs/spec.md §1 defines it. The visitor sees
// one element at a time (a little more arithmetic per element than the chunk folds of
// row_stats_kernel), and rows are not sliced: this path serves the optional top-k baseline, one
// 128-thread block per row.

// The per-element counterpart of fold_pair_chunk: re-centre only when a max rises, fast exp, and
// the exact docs/spec.md §1 products (`weighted`) since there is no chunk to redo.
struct PairStateVisitor {
  opd::PairSoftmaxState state;
  float inv_temperature;
  __device__ __forceinline__ void operator()(float s, float t, int32_t) {
    using namespace opd::online_softmax_detail;
    if (s > state.max_s || t > state.max_t) state = recentred(state, s, t, inv_temperature);
    const float d_s = (s - centre(state.max_s)) * inv_temperature;
    const float d_t = (t - centre(state.max_t)) * inv_temperature;
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
  __device__ __forceinline__ void merge(const FullAndTopkStates& other, float inv_temperature) {
    full.merge(other.full, inv_temperature);
    topk.merge(other.topk, inv_temperature);
  }
};

template <typename S, typename T>
__global__ void __launch_bounds__(kPairPassThreads) token_stats_topk_kernel(PairStats<S, T> problem) {
  OPD_SHARED(TopKCandidates, top_s);
  const TokenStatsParams<S, T>& p = problem.p;
  const int64_t r = blockIdx.x;
  topk_reset(top_s, p.topk);
  const auto row = problem.row(r);
  PairStateVisitor visit{{}, p.inv_temperature};
  // Ends with a barrier, after which top_s.indices[0, min(count, k)) are the student's top-k ids.
  block_pair_pass(row.s, row.t, p.vocab, &top_s, nullptr, visit);
  FullAndTopkStates states{visit.state, {}};
  const int kept = std::min(top_s.count, p.topk);
  for (int i = threadIdx.x; i < kept; i += blockDim.x) {
    const int32_t id = top_s.indices[i];
    states.topk.update(static_cast<float>(row.s[id]), static_cast<float>(row.t[id]), p.inv_temperature);
  }
  states = reduce_row_group<kPairPassThreads>(states, kPairPassThreads, p.inv_temperature);
  if (threadIdx.x == 0) {
    problem.finalize(states.full, r);
    // As on CPU: a NaN anywhere in either row (which the top-k itself skips) makes the baseline NaN.
    const bool row_has_nan = isnan(states.full.sum_s) || isnan(states.full.sum_t);
    p.topk_reverse_kl[r] = row_has_nan ? kNaN : states.topk.reverse_kl();
  }
}

// ---- launch shape ---------------------------------------------------------------------------------

struct LaunchShape {
  int group_threads;  // threads per row
  int64_t row_blocks;
  int splits;
};

// One warp per row for short rows, up to a CTA per row for long ones. Long rows are also cut into
// slices until the (row block, slice) work items fill the resident CTAs in nearly whole waves: the
// items take equal time, so a last partial wave idles the rest of the GPU (2048 rows on 528
// resident CTAs run 4 waves for 3.9 waves of work; on 396 they would run 6 for 5.2).
template <typename... KernelParams>
cudaError_t launch_shape(void (*kernel)(KernelParams...), int64_t rows, int64_t vocab, LaunchShape* shape) {
  const int64_t chunks = ceil_div(vocab, kChunk);
  int group_threads = kWarpThreads;
  while (group_threads < kBlockThreads && group_threads * kMinChunksPerThread < chunks) group_threads *= 2;
  const int64_t row_blocks = ceil_div(rows, kBlockThreads / group_threads);
  *shape = {group_threads, row_blocks, 1};
  if (row_blocks > std::numeric_limits<int32_t>::max()) return cudaErrorInvalidValue;

  int sms = 0, blocks_per_sm = 0;
  if (const cudaError_t e = multiprocessor_count(&sms); e != cudaSuccess) return e;
  if (const cudaError_t e = max_active_blocks_per_sm(&blocks_per_sm, kernel, kBlockThreads, 0); e != cudaSuccess) {
    return e;
  }
  const double resident = std::max(1, sms * blocks_per_sm);
  const int64_t max_splits =
      group_threads < kBlockThreads
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
  shape->splits = splits;
  return cudaSuccess;
}

// The launch decision of a row reduction and the workspace it needs (partial states of sliced
// rows), shared by the size queries and the launchers.
template <typename Problem>
cudaError_t plan_row_stats(int64_t rows, int64_t vocab, LaunchShape* shape, size_t* workspace_bytes) {
  *workspace_bytes = 0;
  if (rows < 0 || vocab < 1 || vocab > kMaxRowVocab) return cudaErrorInvalidValue;
  if (const cudaError_t e = launch_shape(row_stats_kernel<Problem>, rows, vocab, shape); e != cudaSuccess) return e;
  if (shape->splits > 1) {
    WorkspaceCarver carver;
    carver.take<typename Problem::State>(rows * shape->splits);
    *workspace_bytes = carver.bytes();
  }
  return cudaSuccess;
}

template <typename Problem>
cudaError_t launch_row_stats(const Problem& problem, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  using State = typename Problem::State;
  static_assert(std::is_trivially_copyable_v<State> && alignof(State) <= alignof(float));
  if (problem.p.rows == 0) return cudaSuccess;
  LaunchShape shape;
  size_t needed = 0;
  if (const cudaError_t e = plan_row_stats<Problem>(problem.p.rows, problem.p.vocab, &shape, &needed);
      e != cudaSuccess) {
    return e;
  }
  const dim3 grid(static_cast<unsigned>(shape.row_blocks), static_cast<unsigned>(shape.splits));
  if (shape.splits == 1) {
    return launch(row_stats_kernel<Problem>, grid, dim3(kBlockThreads), 0, stream, problem, shape.group_threads,
                  static_cast<State*>(nullptr));
  }
  if (const cudaError_t e = check_workspace(workspace, workspace_bytes, needed); e != cudaSuccess) return e;
  WorkspaceCarver carver(workspace);
  State* partials = carver.take<State>(problem.p.rows * shape.splits);
  if (const cudaError_t e = launch(row_stats_kernel<Problem>, grid, dim3(kBlockThreads), 0, stream, problem,
                                   shape.group_threads, partials);
      e != cudaSuccess) {
    return e;
  }
  return launch(merge_partials_kernel<Problem>, dim3(static_cast<unsigned>(ceil_div(problem.p.rows, kBlockThreads))),
                dim3(kBlockThreads), 0, stream, problem, static_cast<const State*>(partials), shape.splits);
}

template <typename Problem>
cudaError_t launch_row_backward(const Problem& problem, cudaStream_t stream) {
  if (problem.p.rows == 0) return cudaSuccess;
  if (problem.p.rows < 0 || problem.p.vocab < 1 || problem.p.vocab > kMaxRowVocab) return cudaErrorInvalidValue;
  LaunchShape shape;
  if (const cudaError_t e = launch_shape(row_backward_kernel<Problem>, problem.p.rows, problem.p.vocab, &shape);
      e != cudaSuccess) {
    return e;
  }
  const dim3 grid(static_cast<unsigned>(shape.row_blocks), static_cast<unsigned>(shape.splits));
  return launch(row_backward_kernel<Problem>, grid, dim3(kBlockThreads), 0, stream, problem, shape.group_threads);
}

}  // namespace token_stats_impl

// ---- host API ---------------------------------------------------------------------------------------
// Workspace sizes are for the current device and must be queried with the launch's rows / vocab /
// topk; a launcher given less returns cudaErrorInvalidValue. The contents of a workspace on entry
// do not matter. Launchers return launch errors (cudaErrorInvalidValue for shapes they cannot
// run: too many rows, V above kMaxRowVocab, topk above kMaxStreamingTopK) instead of raising.

template <typename S, typename T>
cudaError_t token_stats_workspace_size(int64_t rows, int64_t vocab, int topk, size_t* bytes) {
  *bytes = 0;
  if (topk > 0 || rows == 0) return cudaSuccess;  // the top-k path reads whole rows in one block
  token_stats_impl::LaunchShape shape;
  return token_stats_impl::plan_row_stats<token_stats_impl::PairStats<S, T>>(rows, vocab, &shape, bytes);
}

template <typename S, typename T>
cudaError_t launch_token_stats(const TokenStatsParams<S, T>& p, void* workspace, size_t workspace_bytes,
                               cudaStream_t stream) {
  using namespace token_stats_impl;
  const PairStats<S, T> problem{p};
  if (p.topk == 0) return launch_row_stats(problem, workspace, workspace_bytes, stream);
  if (p.rows == 0) return cudaSuccess;
  if (p.rows < 0 || p.rows > std::numeric_limits<int32_t>::max() || p.vocab < 1 || p.vocab > kMaxRowVocab ||
      p.topk < 0 || p.topk > p.vocab || p.topk > kMaxStreamingTopK) {
    return cudaErrorInvalidValue;
  }
  return launch(token_stats_topk_kernel<S, T>, dim3(static_cast<unsigned>(p.rows)), dim3(kPairPassThreads), 0, stream,
                problem);
}

template <typename S>
cudaError_t student_stats_workspace_size(int64_t rows, int64_t vocab, size_t* bytes) {
  *bytes = 0;
  if (rows == 0) return cudaSuccess;
  token_stats_impl::LaunchShape shape;
  return token_stats_impl::plan_row_stats<token_stats_impl::StudentStats<S>>(rows, vocab, &shape, bytes);
}

template <typename S>
cudaError_t launch_student_stats(const StudentStatsParams<S>& p, void* workspace, size_t workspace_bytes,
                                 cudaStream_t stream) {
  return token_stats_impl::launch_row_stats(token_stats_impl::StudentStats<S>{p}, workspace, workspace_bytes, stream);
}

// The backwards are elementwise (row slices need no merge): no workspace.
inline cudaError_t policy_gradient_backward_workspace_size(int64_t, int64_t, size_t* bytes) {
  *bytes = 0;
  return cudaSuccess;
}

template <typename S>
cudaError_t launch_policy_gradient_backward(const PolicyGradientBackwardParams<S>& p, void*, size_t,
                                            cudaStream_t stream) {
  return token_stats_impl::launch_row_backward(token_stats_impl::PolicyGradientBackward<S>{p}, stream);
}

inline cudaError_t reverse_kl_backward_workspace_size(int64_t, int64_t, size_t* bytes) {
  *bytes = 0;
  return cudaSuccess;
}

template <typename S, typename T>
cudaError_t launch_reverse_kl_backward(const ReverseKlBackwardParams<S, T>& p, void*, size_t, cudaStream_t stream) {
  return token_stats_impl::launch_row_backward(token_stats_impl::ReverseKlBackward<S, T>{p}, stream);
}

}  // namespace opd::cuda
