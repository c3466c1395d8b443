// topk_overlap on CPU: rows in parallel, one streaming pass per row, O(k) scratch per thread.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <vector>

#include "opd/topk.h"
#include "torch_utils.h"

namespace opd_ext {
namespace {

// Above this k the O(k) insertion of StreamingTopK and the O(k^2) intersection stop being cheap;
// a per-row nth_element + sort is O(V + k log k) regardless of k.
constexpr int kStreamingMaxK = 256;
// Elements are screened in blocks: one vectorisable max per block decides whether any of them can
// enter the top-k, so most of the row never touches the insertion code.
constexpr int64_t kScreenBlock = 32;

struct RowScratch {
  std::vector<float> values_s, values_t;
  std::vector<int32_t> ids_s, ids_t, order;
};

// Returns false when the row holds a NaN.
template <typename scalar_t>
bool streaming_topk_row(const scalar_t* row, int64_t vocab, opd::StreamingTopK& topk, int k,
                        const float* kth_value) {
  float block[kScreenBlock];
  bool has_nan = false;
  for (int64_t start = 0; start < vocab; start += kScreenBlock) {
    const int64_t n = std::min(kScreenBlock, vocab - start);
    float block_max = -std::numeric_limits<float>::infinity();
    bool block_nan = false;
    for (int64_t j = 0; j < n; ++j) {
      const float x = static_cast<float>(row[start + j]);
      block[j] = x;
      block_max = std::max(block_max, x);
      block_nan |= (x != x);
    }
    has_nan |= block_nan;
    if (topk.size() == k && !(block_max > *kth_value)) continue;
    for (int64_t j = 0; j < n; ++j) topk.push(block[j], static_cast<int32_t>(start + j));
  }
  return !has_nan;
}

template <typename scalar_t>
bool sorted_topk_row(const scalar_t* row, int64_t vocab, int k, std::vector<int32_t>& order,
                     std::vector<float>& values, std::vector<int32_t>& ids) {
  values.resize(vocab);
  bool has_nan = false;
  for (int64_t v = 0; v < vocab; ++v) {
    values[v] = static_cast<float>(row[v]);
    has_nan |= (values[v] != values[v]);
  }
  if (has_nan) return false;
  order.resize(vocab);
  std::iota(order.begin(), order.end(), 0);
  auto before = [&](int32_t a, int32_t b) { return opd::ranks_before(values[a], a, values[b], b); };
  std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), before);
  ids.assign(order.begin(), order.begin() + k);
  std::sort(ids.begin(), ids.end());
  return true;
}

template <typename student_t, typename teacher_t>
void topk_overlap_kernel(const student_t* student, const teacher_t* teacher, int64_t row_stride_s,
                         int64_t row_stride_t, int64_t rows, int64_t vocab, int k, float* out) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    RowScratch scratch;
    if (k <= kStreamingMaxK) {
      scratch.values_s.resize(k);
      scratch.values_t.resize(k);
      scratch.ids_s.resize(k);
      scratch.ids_t.resize(k);
    }
    std::vector<int32_t> sorted_s;
    for (int64_t r = begin; r < end; ++r) {
      const student_t* s_row = student + r * row_stride_s;
      const teacher_t* t_row = teacher + r * row_stride_t;
      if (k <= kStreamingMaxK) {
        opd::StreamingTopK top_s(scratch.values_s.data(), scratch.ids_s.data(), k);
        opd::StreamingTopK top_t(scratch.values_t.data(), scratch.ids_t.data(), k);
        const bool ok_s = streaming_topk_row(s_row, vocab, top_s, k, &scratch.values_s[k - 1]);
        const bool ok_t = streaming_topk_row(t_row, vocab, top_t, k, &scratch.values_t[k - 1]);
        out[r] = (ok_s && ok_t)
                     ? static_cast<float>(opd::count_common(scratch.ids_s.data(), scratch.ids_t.data(), k)) / k
                     : nan;
      } else {
        const bool ok_s = sorted_topk_row(s_row, vocab, k, scratch.order, scratch.values_s, sorted_s);
        const bool ok_t = ok_s && sorted_topk_row(t_row, vocab, k, scratch.order, scratch.values_t, scratch.ids_t);
        if (!ok_t) {
          out[r] = nan;
          continue;
        }
        std::vector<int32_t> common;
        std::set_intersection(sorted_s.begin(), sorted_s.end(), scratch.ids_t.begin(),
                              scratch.ids_t.end(), std::back_inserter(common));
        out[r] = static_cast<float>(common.size()) / k;
      }
    }
  });
}

at::Tensor topk_overlap_cpu(const at::Tensor& student_logits, const at::Tensor& teacher_logits, int64_t k) {
  check_logit_pair("topk_overlap", student_logits, teacher_logits);
  const int64_t vocab = student_logits.size(-1);
  TORCH_CHECK(k >= 1 && k <= vocab, "topk_overlap: k=", k, " must be in [1, V=", vocab, "]");
  const at::Tensor s = as_rows(student_logits);
  const at::Tensor t = as_rows(teacher_logits);
  const int64_t rows = s.size(0);
  at::Tensor out = at::empty(student_logits.sizes().slice(0, student_logits.dim() - 1),
                             student_logits.options().dtype(at::kFloat));
  if (rows == 0) return out;
  dispatch_logit_pair(s.scalar_type(), t.scalar_type(), "topk_overlap", [&]<typename S, typename T>() {
    topk_overlap_kernel<S, T>(s.const_data_ptr<S>(), t.const_data_ptr<T>(), s.stride(0), t.stride(0), rows, vocab,
                              static_cast<int>(k), out.mutable_data_ptr<float>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(opd_ext, CPU, m) { m.impl("topk_overlap", &topk_overlap_cpu); }

}  // namespace opd_ext
