// Torch-side plumbing of the drift ops shared by the CPU and CUDA bindings: the schema's scalars
// as an opd::DriftConfig, and the state tensors checked and viewed as opd::DriftStateArrays.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <optional>
#include <tuple>

#include "opd/drift.h"
#include "torch_utils.h"

namespace opd_ext {

inline opd::DriftConfig drift_config(const char* op, double ema_beta, double threshold, int64_t warmup, double w_drop,
                                     double decay, double w_base, int64_t patience, double min_weight) {
  TORCH_CHECK(ema_beta >= 0.0 && ema_beta < 1.0, op, ": ema_beta=", ema_beta, " must be in [0, 1)");
  TORCH_CHECK(warmup >= 0 && warmup <= INT32_MAX, op, ": warmup=", warmup, " must be in [0, 2^31)");
  TORCH_CHECK(patience >= 0 && patience <= INT32_MAX, op, ": patience=", patience, " must be in [0, 2^31)");
  TORCH_CHECK(w_drop >= 0.0, op, ": w_drop=", w_drop, " must be >= 0");
  TORCH_CHECK(decay >= 0.0 && decay <= 1.0, op, ": decay=", decay, " must be in [0, 1] (0 = linear schedule)");
  opd::DriftConfig config;
  config.ema_beta = static_cast<float>(ema_beta);
  config.threshold = static_cast<float>(threshold);
  config.warmup = static_cast<int32_t>(warmup);
  config.w_drop = static_cast<float>(w_drop);
  config.decay = static_cast<float>(decay);
  config.w_base = static_cast<float>(w_base);
  config.patience = static_cast<int32_t>(patience);
  config.min_weight = static_cast<float>(min_weight);
  return config;
}

// Checks the state tensors ([B] each, contiguous, one device, the dtypes of the schema comment in
// csrc/ops.cpp) and returns raw views. Returns B.
inline int64_t check_drift_state(const char* op, const at::Device& device, const at::Tensor& ema,
                                 const at::Tensor& weight, const at::Tensor& drift_run, const at::Tensor& drift_events,
                                 const at::Tensor& length, const at::Tensor& stop_reason, const at::Tensor& budget) {
  const int64_t batch = ema.numel();
  const struct {
    const char* name;
    const at::Tensor& tensor;
    at::ScalarType dtype;
  } fields[] = {{"ema", ema, at::kFloat},           {"weight", weight, at::kFloat},
                {"drift_run", drift_run, at::kInt}, {"drift_events", drift_events, at::kInt},
                {"length", length, at::kInt},       {"stop_reason", stop_reason, at::kChar},
                {"budget", budget, at::kInt}};
  for (const auto& f : fields) {
    TORCH_CHECK(f.tensor.dim() == 1 && f.tensor.size(0) == batch, op, ": state tensor ", f.name,
                " must have shape [B=", batch, "], got ", f.tensor.sizes());
    TORCH_CHECK(f.tensor.scalar_type() == f.dtype, op, ": state tensor ", f.name, " must be ", f.dtype, ", got ",
                f.tensor.scalar_type());
    TORCH_CHECK(f.tensor.device() == device, op, ": state tensor ", f.name, " is on ", f.tensor.device(),
                " but the inputs are on ", device);
    TORCH_CHECK(f.tensor.is_contiguous(), op, ": state tensor ", f.name,
                " must be contiguous (it is updated in place)");
  }
  return batch;
}

inline opd::DriftStateArrays drift_arrays(at::Tensor& ema, at::Tensor& weight, at::Tensor& drift_run,
                                          at::Tensor& drift_events, at::Tensor& length, at::Tensor& stop_reason,
                                          const at::Tensor& budget) {
  return {ema.mutable_data_ptr<float>(),         weight.mutable_data_ptr<float>(),
          drift_run.mutable_data_ptr<int32_t>(), drift_events.mutable_data_ptr<int32_t>(),
          length.mutable_data_ptr<int32_t>(),    stop_reason.mutable_data_ptr<int8_t>(),
          budget.const_data_ptr<int32_t>()};
}

// drift_scan's inputs, checked the same way for every backend.
struct DriftScanInputs {
  int64_t batch;
  int64_t steps;
  at::Tensor overlaps;  // contiguous float32 [B, T]
  at::Tensor valid;     // contiguous bool [B, T]; undefined without a mask
  opd::DriftConfig config;
};

inline DriftScanInputs check_drift_scan_inputs(const at::Tensor& overlaps, const std::optional<at::Tensor>& mask,
                                               const at::Tensor& ema, const at::Tensor& weight,
                                               const at::Tensor& drift_run, const at::Tensor& drift_events,
                                               const at::Tensor& length, const at::Tensor& stop_reason,
                                               const at::Tensor& budget, double ema_beta, double threshold,
                                               int64_t warmup, double w_drop, double decay, double w_base,
                                               int64_t patience, double min_weight) {
  constexpr const char* op = "drift_scan";
  TORCH_CHECK(overlaps.dim() == 2 && overlaps.scalar_type() == at::kFloat, op,
              ": overlaps must be float32 [B, T], got ", overlaps.scalar_type(), " ", overlaps.sizes());
  const int64_t batch =
      check_drift_state(op, overlaps.device(), ema, weight, drift_run, drift_events, length, stop_reason, budget);
  TORCH_CHECK(overlaps.size(0) == batch, op, ": overlaps has ", overlaps.size(0), " rows but the state has B=", batch);
  at::Tensor valid;
  if (mask.has_value()) {
    TORCH_CHECK(mask->sizes() == overlaps.sizes() && mask->scalar_type() == at::kBool, op,
                ": mask must be bool with the shape of overlaps ", overlaps.sizes(), ", got ", mask->scalar_type(), " ",
                mask->sizes());
    TORCH_CHECK(mask->device() == overlaps.device(), op, ": mask is on ", mask->device(), " but overlaps on ",
                overlaps.device());
    valid = mask->contiguous();
  }
  return {batch, overlaps.size(1), overlaps.contiguous(), valid,
          drift_config(op, ema_beta, threshold, warmup, w_drop, decay, w_base, patience, min_weight)};
}

// drift_step's inputs, checked the same way for every backend. Index values (rows, tokens) are
// range-checked by the backend: on CPU by reading them, on CUDA inside the kernels.
struct DriftStepInputs {
  int64_t active;  // rows of logits in this step
  int64_t vocab;
  int64_t batch;   // rows of the state
  opd::DriftConfig config;
  at::Tensor row_index;  // contiguous int64 [A]; undefined without rows
  at::Tensor token_ids;  // contiguous int64 [A]; undefined without tokens
};

inline DriftStepInputs check_drift_step_inputs(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const std::optional<at::Tensor>& tokens,
    const std::optional<at::Tensor>& rows, const at::Tensor& ema, const at::Tensor& weight, const at::Tensor& drift_run,
    const at::Tensor& drift_events, const at::Tensor& length, const at::Tensor& stop_reason, const at::Tensor& budget,
    int64_t k, double temperature, double ema_beta, double threshold, int64_t warmup, double w_drop, double decay,
    double w_base, int64_t patience, double min_weight) {
  constexpr const char* op = "drift_step";
  check_logit_pair(op, student_logits, teacher_logits);
  TORCH_CHECK(student_logits.dim() == 2, op, ": student_logits must be [A, V], got ", student_logits.sizes());
  DriftStepInputs in;
  in.active = student_logits.size(0);
  in.vocab = student_logits.size(1);
  TORCH_CHECK(k >= 1 && k <= in.vocab, op, ": k=", k, " must be in [1, V=", in.vocab, "]");
  TORCH_CHECK(temperature > 0.0, op, ": temperature=", temperature, " must be > 0");
  in.config = drift_config(op, ema_beta, threshold, warmup, w_drop, decay, w_base, patience, min_weight);
  in.batch =
      check_drift_state(op, student_logits.device(), ema, weight, drift_run, drift_events, length, stop_reason, budget);
  if (rows.has_value()) {
    TORCH_CHECK(rows->dim() == 1 && rows->size(0) == in.active && rows->scalar_type() == at::kLong, op,
                ": rows must be int64 [A=", in.active, "], got ", rows->scalar_type(), " ", rows->sizes());
    TORCH_CHECK(rows->device() == student_logits.device(), op, ": rows is on ", rows->device(),
                " but the logits are on ", student_logits.device());
    in.row_index = rows->contiguous();
  } else {
    TORCH_CHECK(in.active == in.batch, op, ": logits have ", in.active, " rows but the state has B=", in.batch,
                "; pass rows= to update a subset");
  }
  if (tokens.has_value()) {
    TORCH_CHECK(tokens->dim() == 1 && tokens->size(0) == in.active && tokens->scalar_type() == at::kLong, op,
                ": tokens must be int64 [A=", in.active, "], got ", tokens->scalar_type(), " ", tokens->sizes());
    TORCH_CHECK(tokens->device() == student_logits.device(), op, ": tokens is on ", tokens->device(),
                " but the logits are on ", student_logits.device());
    in.token_ids = tokens->contiguous();
  }
  return in;
}

// drift_step's outputs (overlap, multiplier, stopped, student_logprob, teacher_logprob, reverse_kl);
// the token statistics are empty [0] when no tokens were given.
using DriftStepOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline DriftStepOutputs allocate_drift_step_outputs(const at::TensorOptions& logits_options, int64_t active,
                                                    bool with_tokens) {
  const auto f32 = logits_options.dtype(at::kFloat);
  const int64_t stats_size = with_tokens ? active : 0;
  return {
      at::empty({active}, f32),     at::empty({active}, f32),     at::empty({active}, logits_options.dtype(at::kBool)),
      at::empty({stats_size}, f32), at::empty({stats_size}, f32), at::empty({stats_size}, f32)};
}

}  // namespace opd_ext
