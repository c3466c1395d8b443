// token_stats, student_stats and the fused vOPD / reverse-KL backwards: the bindings of the kernel
// layer opd/cuda/token_stats.cuh (checks, allocation, dtype dispatch, launch).
#include <ATen/core/Tensor.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/stack.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "cuda/binding.h"
#include "opd/cuda/token_stats.cuh"
#include "token_stats_args.h"
#include "torch_utils.h"

namespace opd_ext {
namespace {

using cuda_binding::check_cuda;

// The CUDA kernels' own limits, beyond the shared argument checks.
void check_cuda_vocab(const char* op, const at::Tensor& logits) {
  TORCH_CHECK(logits.size(-1) <= opd::cuda::kMaxRowVocab, op, ": V=", logits.size(-1),
              " is too large for the CUDA kernels (at most 2^31 - ", opd::cuda::kRowBlockThreads + 1, ")");
}

// Ids outside [0, V) raise as on CPU (docs/spec.md §3). Called after the kernels are queued: they never
// read outside a row (an out-of-range id gives NaN log-probs), so the one device->host sync this
// costs waits for work already running instead of leaving the GPU idle before the launch. Under
// CUDA-graph capture no sync is possible: there the NaN is the only signal.
void check_token_range(const char* op, const at::Tensor& ids, int64_t vocab, int64_t lowest_allowed = 0) {
  if (ids.numel() == 0) return;
  bool capturing = false;
  check_cuda(opd::cuda::stream_is_capturing(cuda_binding::current_stream(), &capturing), op);
  if (capturing) return;
  const auto [lowest, highest] = at::aminmax(ids);
  const at::Tensor bounds = at::stack({lowest, highest}).cpu();
  const int64_t lo = bounds.const_data_ptr<int64_t>()[0], hi = bounds.const_data_ptr<int64_t>()[1];
  // Only on failure: the ids come to the host so the message names the position, as on CPU.
  if (lo < lowest_allowed || hi >= vocab) check_token_values(op, ids.cpu(), vocab, lowest_allowed);
}

// One token_stats pass (the outputs params names; token_stats and pair_softmax_state) with the
// workspace its plan needs, allocated beside the student rows `s`.
template <typename S, typename T>
void launch_token_stats_pass(const char* op, const opd::cuda::TokenStatsParams<S, T>& params, const at::Tensor& s) {
  size_t bytes = 0;
  check_cuda(opd::cuda::token_stats_workspace_size<S, T>(params.rows, params.vocab, params.topk, &bytes), op);
  at::Tensor workspace = cuda_binding::workspace(bytes, s);
  check_cuda(opd::cuda::launch_token_stats(params, cuda_binding::workspace_ptr(workspace), bytes,
                                           cuda_binding::current_stream()),
             op);
}

at::Tensor per_row_output(const at::Tensor& logits) {
  return cuda_binding::empty(logits.sizes().slice(0, logits.dim() - 1), logits.options().dtype(at::kFloat));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_stats_cuda(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& tokens, double temperature,
    int64_t topk) {
  constexpr const char* op = "token_stats";
  const TokenStatsInputs in = check_token_stats_inputs(student_logits, teacher_logits, tokens, temperature, topk);
  check_cuda_vocab(op, student_logits);
  TORCH_CHECK(topk <= opd::cuda::kMaxStreamingTopK, op,
              ": the CUDA kernel supports topk <= ", opd::cuda::kMaxStreamingTopK,
              " (the vOPD baseline uses 100), got ", topk);
  const cuda_binding::DeviceGuard guard(student_logits.device());
  const at::Tensor s = as_rows(student_logits);
  const at::Tensor t = as_rows(teacher_logits);
  const int64_t rows = s.size(0), vocab = s.size(1);

  at::Tensor student_logprob = per_row_output(student_logits), teacher_logprob = per_row_output(student_logits);
  at::Tensor reverse_kl = per_row_output(student_logits), forward_kl = per_row_output(student_logits);
  at::Tensor student_lse = per_row_output(student_logits), teacher_lse = per_row_output(student_logits);
  at::Tensor topk_reverse_kl =
      topk > 0 ? per_row_output(student_logits) : at::empty({0}, student_logits.options().dtype(at::kFloat));
  if (rows == 0)
    return {student_logprob, teacher_logprob, reverse_kl, forward_kl, topk_reverse_kl, student_lse, teacher_lse};
  dispatch_logit_pair(s.scalar_type(), t.scalar_type(), op, [&]<typename S, typename T>() {
    const opd::cuda::TokenStatsParams<S, T> params{
        .student = s.const_data_ptr<S>(),
        .teacher = t.const_data_ptr<T>(),
        .student_row_stride = s.stride(0),
        .teacher_row_stride = t.stride(0),
        .tokens = in.tokens.const_data_ptr<int64_t>(),
        .rows = rows,
        .vocab = static_cast<int>(vocab),
        .inv_temperature = in.inv_temperature,
        .topk = static_cast<int>(topk),
        .student_logprob = student_logprob.mutable_data_ptr<float>(),
        .teacher_logprob = teacher_logprob.mutable_data_ptr<float>(),
        .reverse_kl = reverse_kl.mutable_data_ptr<float>(),
        .forward_kl = forward_kl.mutable_data_ptr<float>(),
        .student_lse = student_lse.mutable_data_ptr<float>(),
        .teacher_lse = teacher_lse.mutable_data_ptr<float>(),
        .topk_reverse_kl = topk > 0 ? topk_reverse_kl.mutable_data_ptr<float>() : nullptr};
    launch_token_stats_pass(op, params, s);
  });
  check_token_range(op, in.tokens, vocab);
  return {student_logprob, teacher_logprob, reverse_kl, forward_kl, topk_reverse_kl, student_lse, teacher_lse};
}

at::Tensor pair_softmax_state_cuda(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                                   double temperature) {
  constexpr const char* op = "pair_softmax_state";
  const float inv_temperature = check_pair_softmax_state_inputs(student_logits, teacher_logits, temperature);
  check_cuda_vocab(op, student_logits);
  const cuda_binding::DeviceGuard guard(student_logits.device());
  const at::Tensor s = as_rows(student_logits);
  const at::Tensor t = as_rows(teacher_logits);
  const int64_t rows = s.size(0), vocab = s.size(1);
  std::vector<int64_t> sizes(student_logits.sizes().begin(), student_logits.sizes().end());
  sizes.back() = 6;
  at::Tensor state = cuda_binding::empty(sizes, student_logits.options().dtype(at::kFloat));
  if (rows == 0) return state;
  dispatch_logit_pair(s.scalar_type(), t.scalar_type(), op, [&]<typename S, typename T>() {
    const opd::cuda::TokenStatsParams<S, T> params{.student = s.const_data_ptr<S>(),
                                                   .teacher = t.const_data_ptr<T>(),
                                                   .student_row_stride = s.stride(0),
                                                   .teacher_row_stride = t.stride(0),
                                                   .tokens = nullptr,
                                                   .rows = rows,
                                                   .vocab = static_cast<int>(vocab),
                                                   .inv_temperature = inv_temperature,
                                                   .topk = 0,
                                                   .student_logprob = nullptr,
                                                   .teacher_logprob = nullptr,
                                                   .reverse_kl = nullptr,
                                                   .forward_kl = nullptr,
                                                   .student_lse = nullptr,
                                                   .teacher_lse = nullptr,
                                                   .topk_reverse_kl = nullptr,
                                                   .pair_state = state.mutable_data_ptr<float>()};
    launch_token_stats_pass(op, params, s);
  });
  return state;
}

std::tuple<at::Tensor, at::Tensor> student_stats_cuda(const at::Tensor& student_logits, const at::Tensor& tokens,
                                                      double temperature) {
  constexpr const char* op = "student_stats";
  const TokenStatsInputs in = check_student_stats_inputs(student_logits, tokens, temperature);
  check_cuda_vocab(op, student_logits);
  const cuda_binding::DeviceGuard guard(student_logits.device());
  const at::Tensor s = as_rows(student_logits);
  const int64_t rows = s.size(0), vocab = s.size(1);
  at::Tensor student_logprob = per_row_output(student_logits), student_lse = per_row_output(student_logits);
  if (rows == 0) return {student_logprob, student_lse};
  dispatch_student_logits(s.scalar_type(), op, [&]<typename S>() {
    const opd::cuda::StudentStatsParams<S> params{.student = s.const_data_ptr<S>(),
                                                  .student_row_stride = s.stride(0),
                                                  .tokens = in.tokens.const_data_ptr<int64_t>(),
                                                  .rows = rows,
                                                  .vocab = static_cast<int>(vocab),
                                                  .inv_temperature = in.inv_temperature,
                                                  .student_logprob = student_logprob.mutable_data_ptr<float>(),
                                                  .student_lse = student_lse.mutable_data_ptr<float>()};
    size_t bytes = 0;
    check_cuda(opd::cuda::student_stats_workspace_size<S>(rows, vocab, &bytes), op);
    at::Tensor workspace = cuda_binding::workspace(bytes, s);
    check_cuda(opd::cuda::launch_student_stats(params, cuda_binding::workspace_ptr(workspace), bytes,
                                               cuda_binding::current_stream()),
               op);
  });
  check_token_range(op, in.tokens, vocab);
  return {student_logprob, student_lse};
}

at::Tensor policy_gradient_backward_cuda(const at::Tensor& coef, const at::Tensor& student_logits,
                                         const at::Tensor& tokens, const at::Tensor& student_lse, double temperature) {
  constexpr const char* op = "policy_gradient_backward";
  const PolicyGradientBackwardInputs in =
      check_policy_gradient_backward_inputs(coef, student_logits, tokens, student_lse, temperature);
  check_cuda_vocab(op, student_logits);
  const cuda_binding::DeviceGuard guard(student_logits.device());
  const at::Tensor s = as_rows(student_logits);
  const int64_t rows = s.size(0), vocab = s.size(1);
  at::Tensor grad = cuda_binding::empty(student_logits.sizes(), student_logits.options());
  if (rows == 0) return grad;
  dispatch_student_logits(s.scalar_type(), op, [&]<typename S>() {
    const opd::cuda::PolicyGradientBackwardParams<S> params{.student = s.const_data_ptr<S>(),
                                                            .student_row_stride = s.stride(0),
                                                            .grad = grad.mutable_data_ptr<S>(),
                                                            .coef = in.coef.const_data_ptr<float>(),
                                                            .tokens = in.tokens.const_data_ptr<int64_t>(),
                                                            .student_lse = in.student_lse.const_data_ptr<float>(),
                                                            .rows = rows,
                                                            .vocab = static_cast<int>(vocab),
                                                            .inv_temperature = in.inv_temperature};
    size_t bytes = 0;
    check_cuda(opd::cuda::policy_gradient_backward_workspace_size(rows, vocab, &bytes), op);
    at::Tensor workspace = cuda_binding::workspace(bytes, s);
    check_cuda(opd::cuda::launch_policy_gradient_backward(params, cuda_binding::workspace_ptr(workspace), bytes,
                                                          cuda_binding::current_stream()),
               op);
  });
  check_token_range(op, in.tokens, vocab, /*lowest=*/-1);
  return grad;
}

at::Tensor reverse_kl_backward_cuda(const at::Tensor& coef, const at::Tensor& student_logits,
                                    const at::Tensor& teacher_logits, const at::Tensor& student_lse,
                                    const at::Tensor& teacher_lse, const at::Tensor& reverse_kl, double temperature) {
  constexpr const char* op = "reverse_kl_backward";
  const ReverseKlBackwardInputs in = check_reverse_kl_backward_inputs(coef, student_logits, teacher_logits, student_lse,
                                                                      teacher_lse, reverse_kl, temperature);
  check_cuda_vocab(op, student_logits);
  const cuda_binding::DeviceGuard guard(student_logits.device());
  const at::Tensor s = as_rows(student_logits);
  const at::Tensor t = as_rows(teacher_logits);
  const int64_t rows = s.size(0), vocab = s.size(1);
  at::Tensor grad = cuda_binding::empty(student_logits.sizes(), student_logits.options());
  if (rows == 0) return grad;
  dispatch_logit_pair(s.scalar_type(), t.scalar_type(), op, [&]<typename S, typename T>() {
    const opd::cuda::ReverseKlBackwardParams<S, T> params{.student = s.const_data_ptr<S>(),
                                                          .teacher = t.const_data_ptr<T>(),
                                                          .student_row_stride = s.stride(0),
                                                          .teacher_row_stride = t.stride(0),
                                                          .grad = grad.mutable_data_ptr<S>(),
                                                          .coef = in.coef.const_data_ptr<float>(),
                                                          .student_lse = in.student_lse.const_data_ptr<float>(),
                                                          .teacher_lse = in.teacher_lse.const_data_ptr<float>(),
                                                          .reverse_kl = in.reverse_kl.const_data_ptr<float>(),
                                                          .rows = rows,
                                                          .vocab = static_cast<int>(vocab),
                                                          .inv_temperature = in.inv_temperature};
    size_t bytes = 0;
    check_cuda(opd::cuda::reverse_kl_backward_workspace_size(rows, vocab, &bytes), op);
    at::Tensor workspace = cuda_binding::workspace(bytes, s);
    check_cuda(opd::cuda::launch_reverse_kl_backward(params, cuda_binding::workspace_ptr(workspace), bytes,
                                                     cuda_binding::current_stream()),
               op);
  });
  return grad;
}

}  // namespace

OPD_CUDA_LIBRARY_IMPL(m) {
  m.impl("token_stats", &token_stats_cuda);
  m.impl("pair_softmax_state", &pair_softmax_state_cuda);
  m.impl("student_stats", &student_stats_cuda);
  m.impl("policy_gradient_backward", &policy_gradient_backward_cuda);
  m.impl("reverse_kl_backward", &reverse_kl_backward_cuda);
}

}  // namespace opd_ext
