// token_stats, student_stats and the two fused backward ops on CPU.
//
// Rows run in parallel; each row is read once, in blocks that fit L1: a block is widened to float
// (bf16/fp16 are never summed in low precision), reduced to an opd::PairSoftmaxState with fixed
// block maxima (two vectorised sweeps over L1-resident data), and merged into the row's state. The
// backward ops re-read the student (and teacher) row once and write only the gradient.
//
// The block sweeps are compiled for AVX-512, AVX2+FMA and baseline x86-64 (GCC target_clones,
// picked at load time) and use `#pragma omp simd` reductions, so the float sums vectorise without
// -ffast-math (which would also break the -inf / NaN semantics this file relies on).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "cpu/softmax_blocks.h"
#include "opd/online_softmax.h"
#include "opd/topk.h"
#include "token_stats_args.h"
#include "torch_utils.h"

namespace opd_ext {
namespace {

using namespace cpu::softmax_blocks;

// Above this k the O(k) insertions of StreamingTopK dominate; the top-k baseline then selects with
// one nth_element over the student row (a second, O(V) pass) instead.
constexpr int kStreamingMaxK = 256;

// Centred on the raw max (opd/online_softmax.h, "Temperature"): merge it with inv_tau.
struct Block {
  opd::SoftmaxState state;
};

OPD_CPU_MULTIVERSION
Block reduce_block(const float* x, int64_t n, float inv_tau) {
  float raw_max = -kInf;
  int has_nan = 0;
#pragma omp simd reduction(max : raw_max) reduction(| : has_nan)
  for (int64_t j = 0; j < n; ++j) {
    raw_max = x[j] > raw_max ? x[j] : raw_max;
    has_nan |= x[j] != x[j];
  }
  const float centre = opd::online_softmax_detail::centre(raw_max);
  float sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += exp_nonpositive((x[j] - centre) * inv_tau);
  return {{raw_max, has_nan ? kNaN : sum}};
}

// grad = -scale * p over one block, p = exp(s / τ - lse); the caller adds `scale` at the token.
OPD_CPU_MULTIVERSION
void policy_gradient_block(const float* s, int64_t n, float inv_tau, float lse, float scale, float* grad) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) grad[j] = -scale * exp_nonpositive(s[j] * inv_tau - lse);
}

// grad = scale * p * (log p - log q - kl) over one block; 0 where p = 0 (whatever q is there).
OPD_CPU_MULTIVERSION
void reverse_kl_block(const float* s, const float* t, int64_t n, float inv_tau, float lse_s, float lse_t, float kl,
                      float scale, float* grad) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float log_p = s[j] * inv_tau - lse_s;
    const float log_q = t[j] * inv_tau - lse_t;
    const float p = exp_nonpositive(log_p);
    grad[j] = p > 0.0f ? scale * p * (log_p - log_q - kl) : (p == 0.0f ? 0.0f : p);
  }
}

// ---- dtype plumbing --------------------------------------------------------------------------------

// bf16 <-> float by bit manipulation (round to nearest even, NaN kept quiet), and fp16 through
// c10's branch-free conversions, compiled per ISA so the loops vectorise (F16C on v3/v4).
OPD_CPU_MULTIVERSION
void widen(const c10::BFloat16* x, int64_t n, float* out) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = std::bit_cast<float>(static_cast<uint32_t>(x[j].x) << 16);
}

OPD_CPU_MULTIVERSION
void widen(const c10::Half* x, int64_t n, float* out) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = c10::detail::fp16_ieee_to_fp32_value(x[j].x);
}

OPD_CPU_MULTIVERSION
void narrow(const float* x, int64_t n, c10::BFloat16* out) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t bits = std::bit_cast<uint32_t>(x[j]);
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    out[j].x = static_cast<uint16_t>(x[j] != x[j] ? 0x7FC0u : rounded);
  }
}

OPD_CPU_MULTIVERSION
void narrow(const float* x, int64_t n, c10::Half* out) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j].x = c10::detail::fp16_ieee_from_fp32_value(x[j]);
}

// A float view of x[0, n): the data itself for float32, else widened into `buffer`.
template <typename scalar_t>
const float* as_float(const scalar_t* x, int64_t n, float* buffer) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return x;
  } else {
    widen(x, n, buffer);
    return buffer;
  }
}

// Where a block's float gradient goes: straight into a float32 output, else a buffer narrowed after.
template <typename scalar_t>
float* float_output(scalar_t* out, float* buffer) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return out;
  } else {
    return buffer;
  }
}

template <typename scalar_t>
void store_block(const float* values, int64_t n, scalar_t* out) {
  if constexpr (!std::is_same_v<scalar_t, float>) narrow(values, n, out);
}

// ---- outputs ------------------------------------------------------------------------------------------

at::Tensor row_output(const at::Tensor& logits) {
  return at::empty(logits.sizes().slice(0, logits.dim() - 1), logits.options().dtype(at::kFloat));
}

// log softmax(x / τ) at one element, from the row's raw max and Z = Σ exp((x - max) / τ). Written as
// (x - max)/τ - log Z rather than x/τ - lse: a float lse rounds to ulp(max/τ), ~1e-3 at |logits| ~ 1e4.
float log_softmax_at(float x, float raw_max, float sum, float inv_tau) {
  return (x - opd::online_softmax_detail::centre(raw_max)) * inv_tau - logf(sum);
}

// ---- token_stats -------------------------------------------------------------------------------------

// The k best ids of a NaN-free row in the order of opd::ranks_before (unsorted within the k).
template <typename S>
void select_topk(const S* row, int64_t vocab, int k, std::vector<float>& values, std::vector<int32_t>& ids) {
  values.resize(vocab);
  for (int64_t v = 0; v < vocab; ++v) values[v] = static_cast<float>(row[v]);
  ids.resize(vocab);
  std::iota(ids.begin(), ids.end(), 0);
  std::nth_element(ids.begin(), ids.begin() + (k - 1), ids.end(),
                   [&](int32_t a, int32_t b) { return opd::ranks_before(values[a], a, values[b], b); });
}

// Renormalised reverse KL over the student's top-k ids (the vOPD top-k baseline, docs/spec.md §1): the k
// gathered pairs go through the same blocked reduction as a row.
template <typename S, typename T>
float topk_reverse_kl(const S* s_row, const T* t_row, const int32_t* ids, int k, float inv_tau, float* buffer_s,
                      float* buffer_t) {
  opd::PairSoftmaxState state;
  for (int start = 0; start < k; start += kBlock) {
    const int n = std::min<int>(kBlock, k - start);
    for (int i = 0; i < n; ++i) {
      buffer_s[i] = static_cast<float>(s_row[ids[start + i]]);
      buffer_t[i] = static_cast<float>(t_row[ids[start + i]]);
    }
    PairBlock block;
    reduce_pair_block(buffer_s, buffer_t, n, inv_tau, block);
    state.merge(block.state, inv_tau);
  }
  return state.reverse_kl();
}

// Null outputs are not written; without tokens the log-probs are not computed.
struct TokenStatsOutputs {
  float *student_logprob, *teacher_logprob, *reverse_kl, *forward_kl, *topk_reverse_kl, *student_lse, *teacher_lse;
  float* pair_state = nullptr;  // [rows, 6]: the raw PairSoftmaxState (pair_softmax_state)
};

template <typename S, typename T>
void token_stats_kernel(const S* student, const T* teacher, int64_t stride_s, int64_t stride_t, const int64_t* tokens,
                        int64_t rows, int64_t vocab, float inv_tau, int topk, TokenStatsOutputs out) {
  at::parallel_for(0, rows, cpu_rows_per_task(vocab), [&](int64_t begin, int64_t end) {
    std::vector<float> buffer_s(kBlock), buffer_t(kBlock);
    std::vector<float> topk_values(topk);
    std::vector<int32_t> topk_ids(topk);
    const bool streaming_topk = topk > 0 && topk <= kStreamingMaxK;
    for (int64_t r = begin; r < end; ++r) {
      const S* s_row = student + r * stride_s;
      const T* t_row = teacher + r * stride_t;
      opd::PairSoftmaxState state;
      opd::StreamingTopK top(topk_values.data(), topk_ids.data(), topk);
      bool has_nan = false;
      for (int64_t start = 0; start < vocab; start += kBlock) {
        const int64_t n = std::min(kBlock, vocab - start);
        const float* s = as_float(s_row + start, n, buffer_s.data());
        const float* t = as_float(t_row + start, n, buffer_t.data());
        PairBlock block;
        reduce_pair_block(s, t, n, inv_tau, block);
        state.merge(block.state, inv_tau);
        has_nan |= block.nan_s || block.nan_t;
        if (!streaming_topk || (top.size() == topk && !(block.raw_max_s > topk_values[topk - 1]))) continue;
        for (int64_t chunk = 0; chunk < n; chunk += kScreenChunk) {
          if (top.size() == topk && !(block.chunk_max_s[chunk / kScreenChunk] > topk_values[topk - 1])) continue;
          const int64_t end = std::min(chunk + kScreenChunk, n);
          for (int64_t j = chunk; j < end; ++j) top.push(s[j], static_cast<int32_t>(start + j));
        }
      }
      if (tokens != nullptr) {
        const int64_t y = tokens[r];
        out.student_logprob[r] = log_softmax_at(static_cast<float>(s_row[y]), state.max_s, state.sum_s, inv_tau);
        out.teacher_logprob[r] = log_softmax_at(static_cast<float>(t_row[y]), state.max_t, state.sum_t, inv_tau);
      }
      if (out.reverse_kl != nullptr) out.reverse_kl[r] = state.reverse_kl();
      if (out.forward_kl != nullptr) out.forward_kl[r] = state.forward_kl();
      if (out.student_lse != nullptr) out.student_lse[r] = state.lse_s(inv_tau);
      if (out.teacher_lse != nullptr) out.teacher_lse[r] = state.lse_t(inv_tau);
      if (out.pair_state != nullptr) {
        float* o = out.pair_state + r * 6;
        o[0] = state.max_s, o[1] = state.sum_s, o[2] = state.max_t, o[3] = state.sum_t;
        o[4] = state.cross_s, o[5] = state.cross_t;
      }
      if (topk > 0 && has_nan) {
        out.topk_reverse_kl[r] = kNaN;
      } else if (topk > 0) {
        if (!streaming_topk) select_topk(s_row, vocab, topk, topk_values, topk_ids);
        out.topk_reverse_kl[r] =
            topk_reverse_kl(s_row, t_row, topk_ids.data(), topk, inv_tau, buffer_s.data(), buffer_t.data());
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_stats_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& tokens, double temperature,
    int64_t topk) {
  constexpr const char* op = "token_stats";
  const TokenStatsInputs in = check_token_stats_inputs(student_logits, teacher_logits, tokens, temperature, topk);
  const int64_t vocab = student_logits.size(-1);
  const at::Tensor s = as_rows(student_logits), t = as_rows(teacher_logits);
  const int64_t rows = s.size(0);
  const at::Tensor& ids = in.tokens;
  check_token_values(op, ids, vocab);

  at::Tensor student_logprob = row_output(student_logits), teacher_logprob = row_output(student_logits),
             reverse_kl = row_output(student_logits), forward_kl = row_output(student_logits),
             student_lse = row_output(student_logits), teacher_lse = row_output(student_logits);
  at::Tensor topk_kl =
      topk > 0 ? row_output(student_logits) : at::empty({0}, student_logits.options().dtype(at::kFloat));
  if (rows > 0) {
    const TokenStatsOutputs out{student_logprob.mutable_data_ptr<float>(),
                                teacher_logprob.mutable_data_ptr<float>(),
                                reverse_kl.mutable_data_ptr<float>(),
                                forward_kl.mutable_data_ptr<float>(),
                                topk > 0 ? topk_kl.mutable_data_ptr<float>() : nullptr,
                                student_lse.mutable_data_ptr<float>(),
                                teacher_lse.mutable_data_ptr<float>()};
    dispatch_logit_pair(s.scalar_type(), t.scalar_type(), op, [&]<typename S, typename T>() {
      token_stats_kernel<S, T>(s.const_data_ptr<S>(), t.const_data_ptr<T>(), s.stride(0), t.stride(0),
                               ids.const_data_ptr<int64_t>(), rows, vocab, in.inv_temperature, static_cast<int>(topk),
                               out);
    });
  }
  return {student_logprob, teacher_logprob, reverse_kl, forward_kl, topk_kl, student_lse, teacher_lse};
}

// ---- pair_softmax_state -------------------------------------------------------------------------------

at::Tensor pair_softmax_state_cpu(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                                  double temperature) {
  constexpr const char* op = "pair_softmax_state";
  const float inv_tau = check_pair_softmax_state_inputs(student_logits, teacher_logits, temperature);
  const at::Tensor s = as_rows(student_logits), t = as_rows(teacher_logits);
  const int64_t rows = s.size(0), vocab = s.size(1);
  std::vector<int64_t> sizes(student_logits.sizes().begin(), student_logits.sizes().end());
  sizes.back() = 6;
  at::Tensor state = at::empty(sizes, student_logits.options().dtype(at::kFloat));
  if (rows == 0) return state;
  TokenStatsOutputs out{};
  out.pair_state = state.mutable_data_ptr<float>();
  dispatch_logit_pair(s.scalar_type(), t.scalar_type(), op, [&]<typename S, typename T>() {
    token_stats_kernel<S, T>(s.const_data_ptr<S>(), t.const_data_ptr<T>(), s.stride(0), t.stride(0), nullptr, rows,
                             vocab, inv_tau, 0, out);
  });
  return state;
}

// ---- student_stats -----------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> student_stats_cpu(const at::Tensor& student_logits, const at::Tensor& tokens,
                                                     double temperature) {
  constexpr const char* op = "student_stats";
  const TokenStatsInputs in = check_student_stats_inputs(student_logits, tokens, temperature);
  const at::Tensor s = as_rows(student_logits);
  const int64_t rows = s.size(0), vocab = s.size(1);
  const at::Tensor& ids = in.tokens;
  check_token_values(op, ids, vocab);
  at::Tensor logprob = row_output(student_logits), lse = row_output(student_logits);
  if (rows == 0) return {logprob, lse};
  const float inv_tau = in.inv_temperature;
  dispatch_student_logits(s.scalar_type(), op, [&]<typename S>() {
    const S* student = s.const_data_ptr<S>();
    const int64_t* y = ids.const_data_ptr<int64_t>();
    float* logprob_out = logprob.mutable_data_ptr<float>();
    float* lse_out = lse.mutable_data_ptr<float>();
    at::parallel_for(0, rows, cpu_rows_per_task(vocab), [&](int64_t begin, int64_t end) {
      std::vector<float> buffer(kBlock);
      for (int64_t r = begin; r < end; ++r) {
        const S* row = student + r * s.stride(0);
        opd::SoftmaxState state;
        for (int64_t start = 0; start < vocab; start += kBlock) {
          const int64_t n = std::min(kBlock, vocab - start);
          const Block block = reduce_block(as_float(row + start, n, buffer.data()), n, inv_tau);
          state.merge(block.state, inv_tau);
        }
        logprob_out[r] = log_softmax_at(static_cast<float>(row[y[r]]), state.max, state.sum, inv_tau);
        lse_out[r] = state.lse(inv_tau);
      }
    });
  });
  return {logprob, lse};
}

// ---- backward ops --------------------------------------------------------------------------------------

// Rows whose coefficient is 0 (masked positions) get a zero gradient without reading the logits, so
// padding never costs a pass and never turns NaN/inf logits there into NaN gradients.
at::Tensor policy_gradient_backward_cpu(const at::Tensor& coef, const at::Tensor& student_logits,
                                        const at::Tensor& tokens, const at::Tensor& student_lse, double temperature) {
  constexpr const char* op = "policy_gradient_backward";
  const PolicyGradientBackwardInputs in =
      check_policy_gradient_backward_inputs(coef, student_logits, tokens, student_lse, temperature);
  const at::Tensor s = as_rows(student_logits);
  const int64_t rows = s.size(0), vocab = s.size(1);
  check_token_values(op, in.tokens, vocab, /*lowest=*/-1);
  const at::Tensor &ids = in.tokens, &c = in.coef, &lse = in.student_lse;
  at::Tensor grad = at::empty(student_logits.sizes(), student_logits.options());  // contiguous
  if (rows == 0) return grad;
  const float inv_tau = in.inv_temperature;
  dispatch_student_logits(s.scalar_type(), op, [&]<typename S>() {
    const S* student = s.const_data_ptr<S>();
    S* grad_data = grad.mutable_data_ptr<S>();
    const int64_t* y = ids.const_data_ptr<int64_t>();
    const float* coef_data = c.const_data_ptr<float>();
    const float* lse_data = lse.const_data_ptr<float>();
    at::parallel_for(0, rows, cpu_rows_per_task(vocab), [&](int64_t begin, int64_t end) {
      std::vector<float> buffer_in(kBlock), buffer_out(kBlock);
      for (int64_t r = begin; r < end; ++r) {
        const S* row = student + r * s.stride(0);
        S* grad_row = grad_data + r * vocab;
        const float scale = coef_data[r] * inv_tau;
        if (scale == 0.0f) {
          std::fill(grad_row, grad_row + vocab, S(0.0f));
          continue;
        }
        for (int64_t start = 0; start < vocab; start += kBlock) {
          const int64_t n = std::min(kBlock, vocab - start);
          float* g = float_output(grad_row + start, buffer_out.data());
          policy_gradient_block(as_float(row + start, n, buffer_in.data()), n, inv_tau, lse_data[r], scale, g);
          if (y[r] >= start && y[r] < start + n) g[y[r] - start] += scale;
          store_block(g, n, grad_row + start);
        }
      }
    });
  });
  return grad;
}

at::Tensor reverse_kl_backward_cpu(const at::Tensor& coef, const at::Tensor& student_logits,
                                   const at::Tensor& teacher_logits, const at::Tensor& student_lse,
                                   const at::Tensor& teacher_lse, const at::Tensor& reverse_kl, double temperature) {
  constexpr const char* op = "reverse_kl_backward";
  const ReverseKlBackwardInputs in = check_reverse_kl_backward_inputs(coef, student_logits, teacher_logits, student_lse,
                                                                      teacher_lse, reverse_kl, temperature);
  const at::Tensor s = as_rows(student_logits), t = as_rows(teacher_logits);
  const int64_t rows = s.size(0), vocab = s.size(1);
  const at::Tensor &c = in.coef, &lse_s = in.student_lse, &lse_t = in.teacher_lse, &kl = in.reverse_kl;
  at::Tensor grad = at::empty(student_logits.sizes(), student_logits.options());  // contiguous
  if (rows == 0) return grad;
  const float inv_tau = in.inv_temperature;
  dispatch_logit_pair(s.scalar_type(), t.scalar_type(), op, [&]<typename S, typename T>() {
    const S* student = s.const_data_ptr<S>();
    const T* teacher = t.const_data_ptr<T>();
    S* grad_data = grad.mutable_data_ptr<S>();
    const float* coef_data = c.const_data_ptr<float>();
    const float *lse_s_data = lse_s.const_data_ptr<float>(), *lse_t_data = lse_t.const_data_ptr<float>(),
                *kl_data = kl.const_data_ptr<float>();
    at::parallel_for(0, rows, cpu_rows_per_task(vocab), [&](int64_t begin, int64_t end) {
      std::vector<float> buffer_s(kBlock), buffer_t(kBlock), buffer_out(kBlock);
      for (int64_t r = begin; r < end; ++r) {
        S* grad_row = grad_data + r * vocab;
        const float scale = coef_data[r] * inv_tau;
        if (scale == 0.0f) {
          std::fill(grad_row, grad_row + vocab, S(0.0f));
          continue;
        }
        const S* s_row = student + r * s.stride(0);
        const T* t_row = teacher + r * t.stride(0);
        for (int64_t start = 0; start < vocab; start += kBlock) {
          const int64_t n = std::min(kBlock, vocab - start);
          float* g = float_output(grad_row + start, buffer_out.data());
          reverse_kl_block(as_float(s_row + start, n, buffer_s.data()), as_float(t_row + start, n, buffer_t.data()), n,
                           inv_tau, lse_s_data[r], lse_t_data[r], kl_data[r], scale, g);
          store_block(g, n, grad_row + start);
        }
      }
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(opd_ext, CPU, m) {
  m.impl("token_stats", &token_stats_cpu);
  m.impl("pair_softmax_state", &pair_softmax_state_cpu);
  m.impl("student_stats", &student_stats_cpu);
  m.impl("policy_gradient_backward", &policy_gradient_backward_cpu);
  m.impl("reverse_kl_backward", &reverse_kl_backward_cpu);
}

}  // namespace opd_ext
