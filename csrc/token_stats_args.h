// Argument checks of token_stats, student_stats, policy_gradient_backward and reverse_kl_backward,
// shared by the CPU and CUDA bindings so both raise the same errors (the Python wrappers check
// first and more kindly; these guard direct torch.ops calls). Index values are range-checked by
// the backend: on CPU by reading them before the kernel, on CUDA after the launch.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>

#include "torch_utils.h"

namespace opd_ext {

// 1/τ, for a positive finite τ.
inline float inverse_temperature(const char* op, double temperature) {
  TORCH_CHECK(temperature > 0.0 && std::isfinite(temperature), op,
              ": temperature must be a positive finite number, got ", temperature);
  return static_cast<float>(1.0 / temperature);
}

// student_logits of the student-only ops: the guards of check_logit_pair.
inline void check_student_logits(const char* op, const at::Tensor& logits) { check_logit_pair(op, logits, logits); }

// A per-row argument: shape [...] (the logits' leading dims), `dtype`, on the logits' device.
// Returned contiguous.
inline at::Tensor per_row(const char* op, const char* name, const at::Tensor& t, const at::Tensor& logits,
                          at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype == at::kLong ? "int64" : "float32", ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == logits.device(), op, ": ", name, " on ", t.device(), " but student_logits on ",
              logits.device());
  TORCH_CHECK(t.sizes() == logits.sizes().slice(0, logits.dim() - 1), op, ": ", name, " ", t.sizes(),
              " must have the leading shape of student_logits ", logits.sizes());
  return t.contiguous();
}

// Token ids of a contiguous int64 tensor in host memory, all in [lowest, V): lowest is 0, or -1 for
// the ops that take "no sampled token in these logits" (a vocabulary shard, opd_ext.distributed).
inline void check_token_values(const char* op, const at::Tensor& ids, int64_t vocab, int64_t lowest = 0) {
  const int64_t* data = ids.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < ids.numel(); ++r) {
    // A negative id is almost always a label-style ignore_index (-100) meant as "does not count".
    TORCH_CHECK(data[r] >= lowest && data[r] < vocab, op, ": tokens must be in [", lowest, ", V=", vocab, "), got ",
                data[r], " at flat position ", r,
                data[r] < lowest ? "; positions that do not count (e.g. ignore_index -100) must be excluded with "
                                   "mask=, e.g. mask=(tokens != -100): any id is allowed where mask is False"
                                 : "");
  }
}

struct TokenStatsInputs {
  float inv_temperature;
  at::Tensor tokens;  // contiguous int64 [...]
};

inline TokenStatsInputs check_token_stats_inputs(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                                                 const at::Tensor& tokens, double temperature, int64_t topk) {
  constexpr const char* op = "token_stats";
  check_logit_pair(op, student_logits, teacher_logits);
  const float inv_temperature = inverse_temperature(op, temperature);
  const int64_t vocab = student_logits.size(-1);
  TORCH_CHECK(topk >= 0 && topk <= vocab, op, ": topk=", topk, " must be in [0, V=", vocab, "] (0: no top-k baseline)");
  return {inv_temperature, per_row(op, "tokens", tokens, student_logits, at::kLong)};
}

inline TokenStatsInputs check_student_stats_inputs(const at::Tensor& student_logits, const at::Tensor& tokens,
                                                   double temperature) {
  constexpr const char* op = "student_stats";
  check_student_logits(op, student_logits);
  const float inv_temperature = inverse_temperature(op, temperature);
  return {inv_temperature, per_row(op, "tokens", tokens, student_logits, at::kLong)};
}

// pair_softmax_state: the logit pair and the temperature; returns 1/τ.
inline float check_pair_softmax_state_inputs(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                                             double temperature) {
  constexpr const char* op = "pair_softmax_state";
  check_logit_pair(op, student_logits, teacher_logits);
  return inverse_temperature(op, temperature);
}

struct PolicyGradientBackwardInputs {
  float inv_temperature;
  at::Tensor coef, tokens, student_lse;  // contiguous [...]
};

inline PolicyGradientBackwardInputs check_policy_gradient_backward_inputs(const at::Tensor& coef,
                                                                          const at::Tensor& student_logits,
                                                                          const at::Tensor& tokens,
                                                                          const at::Tensor& student_lse,
                                                                          double temperature) {
  constexpr const char* op = "policy_gradient_backward";
  check_student_logits(op, student_logits);
  const float inv_temperature = inverse_temperature(op, temperature);
  const at::Tensor ids = per_row(op, "tokens", tokens, student_logits, at::kLong);
  return {inv_temperature, per_row(op, "coef", coef, student_logits, at::kFloat), ids,
          per_row(op, "student_lse", student_lse, student_logits, at::kFloat)};
}

struct ReverseKlBackwardInputs {
  float inv_temperature;
  at::Tensor coef, student_lse, teacher_lse, reverse_kl;  // contiguous [...]
};

inline ReverseKlBackwardInputs check_reverse_kl_backward_inputs(
    const at::Tensor& coef, const at::Tensor& student_logits, const at::Tensor& teacher_logits,
    const at::Tensor& student_lse, const at::Tensor& teacher_lse, const at::Tensor& reverse_kl, double temperature) {
  constexpr const char* op = "reverse_kl_backward";
  check_logit_pair(op, student_logits, teacher_logits);
  const float inv_temperature = inverse_temperature(op, temperature);
  return {inv_temperature, per_row(op, "coef", coef, student_logits, at::kFloat),
          per_row(op, "student_lse", student_lse, student_logits, at::kFloat),
          per_row(op, "teacher_lse", teacher_lse, student_logits, at::kFloat),
          per_row(op, "reverse_kl", reverse_kl, student_logits, at::kFloat)};
}

}  // namespace opd_ext
