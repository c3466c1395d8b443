// Block-wide single pass over a (student, teacher) pair of logit rows, with an optional streaming
// top-k of each row and a per-element visitor, so one read of the two rows can feed top-k overlap,
// the online-softmax statistics and the drift update together.
//
// Top-k without sorting the row: elements that could still enter the top-k (they rank before the
// current k-th candidate, order of opd/topk.h) are appended to a shared-memory buffer; when the
// next tile might overflow it, the block bitonic-sorts the buffer and keeps the best k, which also
// raises the admission threshold. On typical logits only O(k log(V/k)) elements are ever appended,
// so the cost is the memory read plus a handful of small sorts.
#pragma once

#include "opd/cuda/portability.cuh"

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "opd/cuda/limits.h"
#include "opd/topk.h"

namespace opd::cuda {

struct TopKCandidates {
  float values[kTopKCapacity];
  int32_t indices[kTopKCapacity];
  int count;
  int k;
  int full;  // the best k so far define the admission threshold below
  float kth_value;
  int32_t kth_index;
  int saw_nan;
};

// Called by the whole block: thread 0 clears the buffer, the barrier publishes it.
__device__ __forceinline__ void topk_reset(TopKCandidates& c, int k) {
  if (threadIdx.x == 0) {
    c.count = 0;
    c.k = k;
    c.full = 0;
    c.kth_value = 0.f;
    c.kth_index = 0;
    c.saw_nan = 0;
  }
  __syncthreads();
}

struct AdmissionThreshold {
  bool active;  // false: nothing is tracked for this row
  bool full;
  float value;
  int32_t index;

  __device__ __forceinline__ static AdmissionThreshold read(const TopKCandidates* c) {
    if (c == nullptr) return {false, false, 0.f, 0};
    return {true, c->full != 0, c->kth_value, c->kth_index};
  }
};

__device__ __forceinline__ void topk_offer(TopKCandidates* c, const AdmissionThreshold& thr, float x, int32_t index) {
  if (!thr.active) return;
  if (x != x) {
    c->saw_nan = 1;
    return;
  }
  if (thr.full && !opd::ranks_before(x, index, thr.value, thr.index)) return;
  const int slot = atomicAdd(&c->count, 1);
  c->values[slot] = x;
  c->indices[slot] = index;
}

// Keeps the best k candidates (in rank order when more than k were present). All threads call it,
// after a barrier that made every append visible.
__device__ inline void topk_compact(TopKCandidates& c) {
  const int count = c.count;
  if (count <= c.k) return;  // nothing to drop: no threshold can be derived yet
  int n = 1;
  while (n < count) n <<= 1;
  for (int i = count + threadIdx.x; i < n; i += blockDim.x) {
    c.values[i] = -INFINITY;  // ranks after every real entry, -inf included, via the index
    c.indices[i] = INT32_MAX;
  }
  __syncthreads();
  for (int size = 2; size <= n; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < (n >> 1); i += blockDim.x) {
        const int a = 2 * i - (i & (stride - 1));
        const int b = a + stride;
        const bool best_first = (a & size) == 0;
        const bool b_before_a = opd::ranks_before(c.values[b], c.indices[b], c.values[a], c.indices[a]);
        if (b_before_a == best_first) {
          const float v = c.values[a];
          const int32_t id = c.indices[a];
          c.values[a] = c.values[b];
          c.indices[a] = c.indices[b];
          c.values[b] = v;
          c.indices[b] = id;
        }
      }
      __syncthreads();
    }
  }
  if (threadIdx.x == 0) {
    c.count = c.k;
    c.full = 1;
    c.kth_value = c.values[c.k - 1];
    c.kth_index = c.indices[c.k - 1];
  }
  __syncthreads();
}

template <int kBytes>
struct RawVector;
template <>
struct RawVector<16> {
  using type = uint4;
};
template <>
struct RawVector<8> {
  using type = uint2;
};
template <>
struct RawVector<4> {
  using type = uint32_t;
};

// kVec elements at a (kVec * sizeof(scalar_t))-byte aligned ptr in one load. The raw word is
// copied into the element array, never read through a scalar_t pointer (which strict aliasing
// lets a host compiler miscompile).
template <typename scalar_t, int kVec>
__device__ __forceinline__ void load_vector(const scalar_t* ptr, float (&out)[kVec]) {
  using Raw = typename RawVector<kVec * sizeof(scalar_t)>::type;
  static_assert(sizeof(Raw) == kVec * sizeof(scalar_t));
  const Raw raw = __ldg(reinterpret_cast<const Raw*>(ptr));
  scalar_t elems[kVec];
  memcpy(elems, &raw, sizeof(raw));
#pragma unroll
  for (int j = 0; j < kVec; ++j) out[j] = static_cast<float>(elems[j]);
}

// Elements before `ptr` reaches `bytes` alignment, or -1 when it never can.
template <typename scalar_t>
__device__ __forceinline__ int elements_to_alignment(const scalar_t* ptr, int bytes) {
  const uintptr_t misalign = reinterpret_cast<uintptr_t>(ptr) % bytes;
  if (misalign % sizeof(scalar_t) != 0) return -1;
  return static_cast<int>(((bytes - misalign) % bytes) / sizeof(scalar_t));
}

struct NoVisitor {
  __device__ __forceinline__ void operator()(float, float, int32_t) const {}
};

// Before every tile: make the previous tile's appends visible and compact a buffer the coming tile
// could overflow. Compacting is block-wide (it has barriers), so every thread must take the same
// decision: the counts are read between two barriers. With one barrier, threads that decided
// first would already be appending to the counts of the next tile while late threads read them,
// and a late thread would enter topk_compact alone.
__device__ __forceinline__ void prepare_tile(TopKCandidates* top_s, TopKCandidates* top_t, int tile) {
  __syncthreads();
  const bool compact_s = top_s != nullptr && top_s->count + tile > kTopKCapacity;
  const bool compact_t = top_t != nullptr && top_t->count + tile > kTopKCapacity;
  __syncthreads();
  if (compact_s) topk_compact(*top_s);
  if (compact_t) topk_compact(*top_t);
}

// One pass over s_row[0, V) and t_row[0, V) by the whole block: visit(s, t, index) for every
// element, candidates offered to top_s / top_t (either may be nullptr). On return (after a
// barrier) each non-null buffer holds the top min(k, V) ids in indices[0, count) unless saw_nan is
// set. When the rows are slices of longer rows, `index_base` is the slice's offset: visited and
// stored indices are positions in the full row.
// Loads are 16 bytes wide where both rows can be aligned together (the usual case: rows of one
// contiguous tensor share their phase), scalar otherwise.
template <typename S, typename T, typename Visitor>
__device__ void block_pair_pass(const S* s_row, const T* t_row, int32_t vocab, TopKCandidates* top_s,
                                TopKCandidates* top_t, Visitor& visit, int32_t index_base = 0) {
  constexpr int kVec = 16 / (sizeof(S) > sizeof(T) ? sizeof(S) : sizeof(T));
  static_assert(kVec <= kMaxVectorElems);
  const int head_s = elements_to_alignment(s_row, kVec * sizeof(S));
  const int head_t = elements_to_alignment(t_row, kVec * sizeof(T));
  const bool vectorised = head_s >= 0 && head_s == head_t;
  const int32_t head = vectorised ? std::min(head_s, vocab) : vocab;
  const int32_t num_vectors = (vocab - head) / kVec;
  const int32_t tail = head + num_vectors * kVec;

  auto scalar_range = [&](int32_t begin, int32_t end) {
    for (int32_t base = begin; base < end; base += blockDim.x) {
      prepare_tile(top_s, top_t, blockDim.x);
      const AdmissionThreshold thr_s = AdmissionThreshold::read(top_s);
      const AdmissionThreshold thr_t = AdmissionThreshold::read(top_t);
      const int32_t i = base + threadIdx.x;
      if (i < end) {
        const float s = static_cast<float>(s_row[i]);
        const float t = static_cast<float>(t_row[i]);
        visit(s, t, index_base + i);
        topk_offer(top_s, thr_s, s, index_base + i);
        topk_offer(top_t, thr_t, t, index_base + i);
      }
    }
  };

  scalar_range(0, head);
  for (int32_t base = 0; base < num_vectors; base += blockDim.x) {
    prepare_tile(top_s, top_t, blockDim.x * kVec);
    const AdmissionThreshold thr_s = AdmissionThreshold::read(top_s);
    const AdmissionThreshold thr_t = AdmissionThreshold::read(top_t);
    const int32_t v = base + threadIdx.x;
    if (v < num_vectors) {
      const int32_t first = head + v * kVec;
      float s[kVec], t[kVec];
      load_vector<S, kVec>(s_row + first, s);
      load_vector<T, kVec>(t_row + first, t);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const int32_t index = index_base + first + j;
        visit(s[j], t[j], index);
        topk_offer(top_s, thr_s, s[j], index);
        topk_offer(top_t, thr_t, t[j], index);
      }
    }
  }
  scalar_range(tail, vocab);

  __syncthreads();
  if (top_s != nullptr) topk_compact(*top_s);
  if (top_t != nullptr) topk_compact(*top_t);
  __syncthreads();
}

// |ids_s ∩ ids_t| for two id sets of size k in shared memory; every thread gets the count.
__device__ __forceinline__ int block_count_common(const int32_t* ids_s, const int32_t* ids_t, int k,
                                                  int* shared_counter) {
  if (threadIdx.x == 0) *shared_counter = 0;
  __syncthreads();
  int local = 0;
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    for (int i = 0; i < k; ++i) {
      if (ids_s[i] == ids_t[j]) {
        ++local;
        break;
      }
    }
  }
  if (local != 0) atomicAdd(shared_counter, local);
  __syncthreads();
  return *shared_counter;
}

// Splitting long rows across blocks: a block's partial top-k (at most k candidates, padded with
// entries that rank last) is written to global memory and merged by topk_merge_partials. Every
// slot is written, the NaN flag too, so the workspace needs no clearing beforehand.
__device__ __forceinline__ void topk_store_partial(const TopKCandidates& c, float* values, int32_t* indices,
                                                   int* saw_nan) {
  for (int i = threadIdx.x; i < c.k; i += blockDim.x) {
    const bool real = i < c.count;
    values[i] = real ? c.values[i] : -INFINITY;
    indices[i] = real ? c.indices[i] : INT32_MAX;
  }
  if (threadIdx.x == 0) *saw_nan = c.saw_nan;
}

// Loads `parts` partial top-k lists (each k long, contiguous) and keeps the best k. parts * k must
// not exceed kTopKCapacity.
__device__ __forceinline__ void topk_merge_partials(TopKCandidates& c, const float* values, const int32_t* indices,
                                                    int parts) {
  const int total = parts * c.k;
  for (int i = threadIdx.x; i < total; i += blockDim.x) {
    c.values[i] = values[i];
    c.indices[i] = indices[i];
  }
  if (threadIdx.x == 0) c.count = total;
  __syncthreads();
  topk_compact(c);
}

// Slices per row for the split pass (rows cut into slices whose partial top-k lists a second
// kernel merges): enough blocks for two waves over the GPU, slices of at least 4096 elements (so
// the partial/merge overhead stays small next to the read), and all partial lists of a row must
// fit one merge buffer. 1 means one block per row.
inline cudaError_t pair_pass_slices_per_row(int64_t rows, int64_t vocab, int64_t k, int* slices) {
  *slices = 1;
  if (rows > 65535) return cudaSuccess;  // gridDim.y limit; plenty of rows to fill the GPU anyway
  int sm_count = 0;
  if (const cudaError_t e = multiprocessor_count(&sm_count); e != cudaSuccess) return e;
  const int64_t wanted = (2 * sm_count + rows - 1) / rows;
  const int64_t by_length = vocab / 4096;
  const int64_t by_merge = kTopKCapacity / k;
  *slices = static_cast<int>(std::max<int64_t>(1, std::min({wanted, by_length, by_merge})));
  return cudaSuccess;
}

// Slice starts on a multiple of 8 elements keep 16-byte loads possible inside every slice.
inline int64_t pair_pass_slice_length(int64_t vocab, int slices) { return ((vocab + slices - 1) / slices + 7) / 8 * 8; }

// The split pass's workspace: per row, side (student, teacher) and slice, a partial top-k list of
// k (value, index) pairs and a NaN flag, laid out [row][side][slice] so the merge reads one
// contiguous list per row and side.
struct PairPassPartials {
  float* values;
  int32_t* indices;
  int* saw_nan;

  template <typename Carver>
  static PairPassPartials carve(Carver& carver, int64_t rows, int slices, int k) {
    const int64_t lists = rows * 2 * slices;
    PairPassPartials p;
    p.values = carver.template take<float>(lists * k);
    p.indices = carver.template take<int32_t>(lists * k);
    p.saw_nan = carver.template take<int>(lists);
    return p;
  }
};

// The part of a row that block (slice, row) of a sliced pair pass reads: grid (slices, rows),
// slices of slice_len elements (the last one shorter or empty).
struct RowSlice {
  int64_t row;
  int slice, slices;
  int32_t begin, len;
};

__device__ __forceinline__ RowSlice this_row_slice(int32_t vocab, int32_t slice_len) {
  const int slice = blockIdx.x;
  const int32_t begin = slice * slice_len;
  return {static_cast<int64_t>(blockIdx.y), slice, static_cast<int>(gridDim.x), begin,
          std::max(0, std::min(slice_len, vocab - begin))};
}

// Both sides' partial top-k of this slice into the lists [row][student|teacher][slice][k].
__device__ __forceinline__ void store_pair_partials(const TopKCandidates& top_s, const TopKCandidates& top_t,
                                                    const PairPassPartials& partials, const RowSlice& rs, int k) {
  const int64_t s_list = (rs.row * 2 + 0) * rs.slices + rs.slice;
  const int64_t t_list = (rs.row * 2 + 1) * rs.slices + rs.slice;
  topk_store_partial(top_s, partials.values + s_list * k, partials.indices + s_list * k, partials.saw_nan + s_list);
  topk_store_partial(top_t, partials.values + t_list * k, partials.indices + t_list * k, partials.saw_nan + t_list);
}

// Merges a row's partial lists of both sides (a block per row). Returns the number of common ids
// (in every thread); *saw_nan, set in thread 0 only, tells whether any slice of either side held
// a NaN.
__device__ __forceinline__ int merge_pair_partials(TopKCandidates& top_s, TopKCandidates& top_t, int* counter,
                                                   const PairPassPartials& partials, int64_t row, int slices, int k,
                                                   bool* saw_nan) {
  topk_reset(top_s, k);
  topk_reset(top_t, k);
  const int64_t s_offset = (row * 2 + 0) * slices * k;
  const int64_t t_offset = (row * 2 + 1) * slices * k;
  topk_merge_partials(top_s, partials.values + s_offset, partials.indices + s_offset, slices);
  topk_merge_partials(top_t, partials.values + t_offset, partials.indices + t_offset, slices);
  const int common = block_count_common(top_s.indices, top_t.indices, k, counter);
  if (threadIdx.x == 0) {
    bool any = false;
    for (int list = 0; list < 2 * slices; ++list) any |= partials.saw_nan[row * 2 * slices + list] != 0;
    *saw_nan = any;
  }
  return common;
}

}  // namespace opd::cuda
