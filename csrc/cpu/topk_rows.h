// Top-k overlap of one (student, teacher) row pair on CPU, in a single pass over both rows.
// Shared by topk_overlap and the fused Prune-OPD decode step, which hooks its online-softmax
// statistics into the same pass through `on_block` instead of reading the rows a second time.
#pragma once

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <limits>
#include <numeric>
#include <vector>

#include "opd/topk.h"

namespace opd_ext::cpu {

// Above this k the O(k) insertion of StreamingTopK and the O(k^2) intersection stop being cheap;
// a per-row nth_element + sort is O(V + k log k) regardless of k.
constexpr int kStreamingMaxK = 256;
// Elements are screened in blocks: one vectorisable max per block decides whether any of them can
// enter the top-k, so most of the row never touches the insertion code.
constexpr int64_t kScreenBlock = 32;

struct NoBlockHook {
  void operator()(const float*, const float*, int64_t, int64_t) const {}
};

// Per-thread scratch: O(k) for the streaming path, O(V) beyond kStreamingMaxK. Reuse one per
// thread across rows.
class RowPairTopK {
 public:
  explicit RowPairTopK(int k) : k_(k) {
    if (k_ <= kStreamingMaxK) {
      values_s_.resize(k_);
      values_t_.resize(k_);
      ids_s_.resize(k_);
      ids_t_.resize(k_);
    }
  }

  // |TopK(s) ∩ TopK(t)| / k, or NaN when either row holds a NaN. `on_block(s, t, start, n)` is
  // called on consecutive chunks covering both rows exactly once, widened to float.
  template <typename S, typename T, typename OnBlock = NoBlockHook>
  float overlap(const S* s_row, const T* t_row, int64_t vocab, OnBlock&& on_block = {}) {
    return k_ <= kStreamingMaxK ? streaming_overlap(s_row, t_row, vocab, on_block)
                                : sorted_overlap(s_row, t_row, vocab, on_block);
  }

 private:
  template <typename S, typename T, typename OnBlock>
  float streaming_overlap(const S* s_row, const T* t_row, int64_t vocab, OnBlock& on_block) {
    opd::StreamingTopK top_s(values_s_.data(), ids_s_.data(), k_);
    opd::StreamingTopK top_t(values_t_.data(), ids_t_.data(), k_);
    float block_s[kScreenBlock], block_t[kScreenBlock];
    bool has_nan = false;
    for (int64_t start = 0; start < vocab; start += kScreenBlock) {
      const int64_t n = std::min(kScreenBlock, vocab - start);
      has_nan |= load_block(s_row, start, n, block_s, top_s, values_s_[k_ - 1]);
      has_nan |= load_block(t_row, start, n, block_t, top_t, values_t_[k_ - 1]);
      on_block(block_s, block_t, start, n);
    }
    if (has_nan) return std::numeric_limits<float>::quiet_NaN();
    return static_cast<float>(opd::count_common(ids_s_.data(), ids_t_.data(), k_)) / k_;
  }

  // Widens row[start, start + n) into `block` and offers it to `topk` unless its max cannot
  // enter. Returns whether the block holds a NaN.
  template <typename scalar_t>
  bool load_block(const scalar_t* row, int64_t start, int64_t n, float* block, opd::StreamingTopK& topk,
                  const float& kth_value) {
    float block_max = -std::numeric_limits<float>::infinity();
    bool block_nan = false;
    for (int64_t j = 0; j < n; ++j) {
      const float x = static_cast<float>(row[start + j]);
      block[j] = x;
      block_max = std::max(block_max, x);
      block_nan |= (x != x);
    }
    if (topk.size() < k_ || block_max > kth_value) {
      for (int64_t j = 0; j < n; ++j) topk.push(block[j], static_cast<int32_t>(start + j));
    }
    return block_nan;
  }

  template <typename S, typename T, typename OnBlock>
  float sorted_overlap(const S* s_row, const T* t_row, int64_t vocab, OnBlock& on_block) {
    const bool ok_s = widen_row(s_row, vocab, values_s_);
    const bool ok_t = widen_row(t_row, vocab, values_t_);
    on_block(values_s_.data(), values_t_.data(), 0, vocab);
    if (!ok_s || !ok_t) return std::numeric_limits<float>::quiet_NaN();
    sorted_topk_ids(values_s_, ids_s_);
    sorted_topk_ids(values_t_, ids_t_);
    common_.clear();
    std::set_intersection(ids_s_.begin(), ids_s_.end(), ids_t_.begin(), ids_t_.end(), std::back_inserter(common_));
    return static_cast<float>(common_.size()) / k_;
  }

  // Returns false when the row holds a NaN.
  template <typename scalar_t>
  static bool widen_row(const scalar_t* row, int64_t vocab, std::vector<float>& values) {
    values.resize(vocab);
    bool has_nan = false;
    for (int64_t v = 0; v < vocab; ++v) {
      values[v] = static_cast<float>(row[v]);
      has_nan |= (values[v] != values[v]);
    }
    return !has_nan;
  }

  // The top-k ids of a NaN-free row, sorted by id.
  void sorted_topk_ids(const std::vector<float>& values, std::vector<int32_t>& ids) {
    order_.resize(values.size());
    std::iota(order_.begin(), order_.end(), 0);
    auto before = [&](int32_t a, int32_t b) { return opd::ranks_before(values[a], a, values[b], b); };
    std::nth_element(order_.begin(), order_.begin() + (k_ - 1), order_.end(), before);
    ids.assign(order_.begin(), order_.begin() + k_);
    std::sort(ids.begin(), ids.end());
  }

  int k_;
  std::vector<float> values_s_, values_t_;
  std::vector<int32_t> ids_s_, ids_t_, order_, common_;
};

}  // namespace opd_ext::cpu
