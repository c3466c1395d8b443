// Prune-OPD drift ops: the bindings of the kernel layer opd/cuda/drift.cuh (checks, allocation,
// dtype dispatch, launch). Argument checks are shared with the CPU kernels (drift_args.h).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "cuda/binding.h"
#include "drift_args.h"
#include "opd/cuda/drift.cuh"
#include "opd/drift.h"
#include "torch_utils.h"

namespace opd_ext {
namespace {

DriftStepOutputs drift_step_cuda(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                                 const std::optional<at::Tensor>& tokens, const std::optional<at::Tensor>& rows,
                                 at::Tensor& ema, at::Tensor& weight, at::Tensor& drift_run, at::Tensor& drift_events,
                                 at::Tensor& length, at::Tensor& stop_reason, const at::Tensor& budget, int64_t k,
                                 double temperature, double ema_beta, double threshold, int64_t warmup, double w_drop,
                                 double decay, double w_base, int64_t patience, double min_weight) {
  constexpr const char* op = "drift_step";
  const DriftStepInputs in = check_drift_step_inputs(
      student_logits, teacher_logits, tokens, rows, ema, weight, drift_run, drift_events, length, stop_reason, budget,
      k, temperature, ema_beta, threshold, warmup, w_drop, decay, w_base, patience, min_weight);
  const int64_t active = in.active, vocab = in.vocab;
  TORCH_CHECK(k <= opd::cuda::kMaxStreamingTopK, op, ": the CUDA kernel supports k <= ", opd::cuda::kMaxStreamingTopK,
              " (got ", k, "); DriftMonitor falls back to the reference for larger k");

  const cuda_binding::DeviceGuard device_guard(student_logits.device());
  const at::Tensor s = as_rows(student_logits);
  const at::Tensor t = as_rows(teacher_logits);
  DriftStepOutputs outputs = allocate_drift_step_outputs(s.options(), active, tokens.has_value());
  std::apply([](auto&... out) { ((out = cuda_binding::poisoned(out)), ...); }, outputs);
  if (active == 0) return outputs;
  TORCH_CHECK(active <= INT32_MAX, op, ": too many rows (", active, ")");
  auto& [overlap, multiplier, stopped, student_logprob, teacher_logprob, reverse_kl] = outputs;

  const bool with_stats = tokens.has_value();
  dispatch_logit_pair(s.scalar_type(), t.scalar_type(), op, [&]<typename S, typename T>() {
    const opd::cuda::DriftStepParams<S, T> params{
        .student = s.const_data_ptr<S>(),
        .teacher = t.const_data_ptr<T>(),
        .student_row_stride = s.stride(0),
        .teacher_row_stride = t.stride(0),
        .active = active,
        .vocab = static_cast<int32_t>(vocab),
        .k = static_cast<int>(k),
        .tokens = with_stats ? in.token_ids.const_data_ptr<int64_t>() : nullptr,
        .inv_temperature = static_cast<float>(1.0 / temperature),
        .rows = rows.has_value() ? in.row_index.const_data_ptr<int64_t>() : nullptr,
        .batch = in.batch,
        .config = in.config,
        .state = drift_arrays(ema, weight, drift_run, drift_events, length, stop_reason, budget),
        .overlap = overlap.mutable_data_ptr<float>(),
        .multiplier = multiplier.mutable_data_ptr<float>(),
        .stopped = stopped.mutable_data_ptr<bool>(),
        .student_logprob = with_stats ? student_logprob.mutable_data_ptr<float>() : nullptr,
        .teacher_logprob = with_stats ? teacher_logprob.mutable_data_ptr<float>() : nullptr,
        .reverse_kl = with_stats ? reverse_kl.mutable_data_ptr<float>() : nullptr};
    size_t bytes = 0;
    cuda_binding::check_cuda(opd::cuda::drift_step_workspace_size(active, vocab, params.k, with_stats, &bytes), op);
    at::Tensor workspace = cuda_binding::workspace(bytes, s);
    cuda_binding::check_cuda(opd::cuda::launch_drift_step(params, cuda_binding::workspace_ptr(workspace), bytes,
                                                          cuda_binding::current_stream()),
                             op);
  });
  return outputs;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> drift_scan_cuda(
    const at::Tensor& overlaps, const std::optional<at::Tensor>& mask, at::Tensor& ema, at::Tensor& weight,
    at::Tensor& drift_run, at::Tensor& drift_events, at::Tensor& length, at::Tensor& stop_reason,
    const at::Tensor& budget, double ema_beta, double threshold, int64_t warmup, double w_drop, double decay,
    double w_base, int64_t patience, double min_weight) {
  constexpr const char* op = "drift_scan";
  const cuda_binding::DeviceGuard device_guard(overlaps.device());
  const DriftScanInputs in =
      check_drift_scan_inputs(overlaps, mask, ema, weight, drift_run, drift_events, length, stop_reason, budget,
                              ema_beta, threshold, warmup, w_drop, decay, w_base, patience, min_weight);
  const int64_t batch = in.batch, steps = in.steps;
  const at::Tensor& o = in.overlaps;
  at::Tensor multipliers = cuda_binding::empty({batch, steps}, o.options());
  at::Tensor weights = cuda_binding::empty({batch, steps}, o.options());
  at::Tensor stop_position = cuda_binding::empty({batch}, o.options().dtype(at::kLong));
  if (batch == 0) return {multipliers, weights, stop_position};
  const opd::cuda::DriftScanParams params{
      .overlaps = o.const_data_ptr<float>(),
      .valid = mask.has_value() ? in.valid.const_data_ptr<bool>() : nullptr,
      .batch = batch,
      .steps = steps,
      .config = in.config,
      .state = drift_arrays(ema, weight, drift_run, drift_events, length, stop_reason, budget),
      .multipliers = multipliers.mutable_data_ptr<float>(),
      .weights = weights.mutable_data_ptr<float>(),
      .stop_position = stop_position.mutable_data_ptr<int64_t>()};
  size_t bytes = 0;
  cuda_binding::check_cuda(opd::cuda::drift_scan_workspace_size(batch, steps, &bytes), op);
  at::Tensor workspace = cuda_binding::workspace(bytes, o);
  cuda_binding::check_cuda(opd::cuda::launch_drift_scan(params, cuda_binding::workspace_ptr(workspace), bytes,
                                                        cuda_binding::current_stream()),
                           op);
  return {multipliers, weights, stop_position};
}

}  // namespace

OPD_CUDA_LIBRARY_IMPL(m) {
  m.impl("drift_step", &drift_step_cuda);
  m.impl("drift_scan", &drift_scan_cuda);
}

}  // namespace opd_ext
