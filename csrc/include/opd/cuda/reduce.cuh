// Merging mergeable states (opd/online_softmax.h, or aggregates of them) across the threads that
// walked one row: a warp butterfly over shuffles, then the row group's warps through shared memory.
// Fixed order, so results are deterministic run to run.
#pragma once

#include "opd/cuda/portability.cuh"

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "opd/cuda/common.cuh"

namespace opd::cuda {

// The state of the lane `lane_mask` away in the butterfly, shuffled word by word.
template <typename State>
__device__ __forceinline__ State shuffle_xor(const State& state, int lane_mask) {
  static_assert(std::is_trivially_copyable_v<State> && sizeof(State) % sizeof(uint32_t) == 0);
  constexpr int kWords = sizeof(State) / sizeof(uint32_t);
  uint32_t words[kWords];
  memcpy(words, &state, sizeof(State));
#pragma unroll
  for (int i = 0; i < kWords; ++i) words[i] = __shfl_xor_sync(0xffffffffu, words[i], lane_mask);
  State out;
  memcpy(static_cast<void*>(&out), words, sizeof(State));
  return out;
}

// Merges the states of one row group of `group_threads` threads (a multiple of 32 dividing
// kBlockThreads, the same for the whole block) with state.merge(other, merge_args...); the result
// is complete in the group's first thread. Every thread of the block must call it: it synchronises
// when a group spans several warps.
template <int kBlockThreads, typename State, typename... MergeArgs>
__device__ __forceinline__ State reduce_row_group(State state, int group_threads, MergeArgs... merge_args) {
  static_assert(kBlockThreads % kWarpThreads == 0);
  constexpr int kWarps = kBlockThreads / kWarpThreads;
  constexpr int kWords = sizeof(State) / sizeof(uint32_t);
#pragma unroll
  for (int mask = kWarpThreads / 2; mask > 0; mask /= 2) state.merge(shuffle_xor(state, mask), merge_args...);
  if (group_threads == kWarpThreads) return state;
  // Plain words rather than State objects: no constructor or default member initialiser may run
  // on shared memory, and the words are copied in and out, never reinterpreted.
  OPD_SHARED(uint32_t[kWarps * kWords], warp_words);
  const int warp = threadIdx.x / kWarpThreads;
  if (threadIdx.x % kWarpThreads == 0) memcpy(&warp_words[warp * kWords], &state, sizeof(State));
  __syncthreads();
  if (threadIdx.x % group_threads == 0) {
    for (int w = 1; w < group_threads / kWarpThreads; ++w) {
      State other;
      memcpy(static_cast<void*>(&other), &warp_words[(warp + w) * kWords], sizeof(State));
      state.merge(other, merge_args...);
    }
  }
  return state;
}

}  // namespace opd::cuda
