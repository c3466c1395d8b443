// Top-k selection order and overlap counting shared by every backend.
//
// The order is total and deterministic: a larger value ranks first; equal values (including two
// -inf) rank the lower vocabulary index first. NaN is never ranked: callers detect it separately
// and report the row as NaN, so CPU and GPU agree bit for bit on everything else.
#pragma once

#include <cstdint>

#include "opd/common.h"

namespace opd {

OPD_HOST_DEVICE bool ranks_before(float value_a, int32_t index_a, float value_b, int32_t index_b) {
  return value_a > value_b || (value_a == value_b && index_a < index_b);
}

// Keeps the k best (value, index) pairs of a stream whose indices arrive in increasing order, in
// rank order. With increasing indices an incoming tie always loses, so a strict `>` against the
// current k-th value is the whole admission test; on typical rows only O(k log(V/k)) elements
// pass it, which makes a single pass over the row cheap even though insertion is O(k).
class StreamingTopK {
 public:
  OPD_HOST_DEVICE StreamingTopK(float* values, int32_t* indices, int k) : values_(values), indices_(indices), k_(k) {}

  OPD_HOST_DEVICE void push(float value, int32_t index) {
    if (size_ == k_) {
      if (!(value > values_[k_ - 1])) return;  // also rejects NaN
    } else if (value != value) {
      return;
    }
    int pos = size_ < k_ ? size_++ : k_ - 1;
    while (pos > 0 && value > values_[pos - 1]) {
      values_[pos] = values_[pos - 1];
      indices_[pos] = indices_[pos - 1];
      --pos;
    }
    values_[pos] = value;
    indices_[pos] = index;
  }

  OPD_HOST_DEVICE int size() const { return size_; }

 private:
  float* values_;
  int32_t* indices_;
  int k_;
  int size_ = 0;
};

// |A ∩ B| for two index sets of size k without duplicates. Quadratic, meant for k up to a few
// hundred; larger k should sort the sets first.
OPD_HOST_DEVICE int count_common(const int32_t* a, const int32_t* b, int k) {
  int common = 0;
  for (int i = 0; i < k; ++i) {
    for (int j = 0; j < k; ++j) {
      if (a[i] == b[j]) {
        ++common;
        break;
      }
    }
  }
  return common;
}

}  // namespace opd
