// Prune-OPD drift ops on CPU: the fused decode step (one pass over both logit rows for the top-k
// overlap and, optionally, the sampled token's statistics) and the scan over whole sequences. Both
// advance the state through opd::drift_step, the one definition of the rule.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

#include "cpu/softmax_blocks.h"
#include "cpu/topk_rows.h"
#include "drift_args.h"
#include "opd/drift.h"
#include "opd/online_softmax.h"
#include "torch_utils.h"

namespace opd_ext {
namespace {

// The sampled token's statistics ride along the top-k pass: its 32-element blocks are gathered
// into L1-sized blocks and reduced by the same vectorised code as token_stats, then merged into
// the row state (float32 round-off grows with the block size plus the number of blocks, not V).
class BlockedPairSoftmax {
 public:
  explicit BlockedPairSoftmax(float inv_temperature) : inv_temperature_(inv_temperature) {}

  void add(const float* s, const float* t, int64_t n) {
    for (int64_t done = 0; done < n;) {
      const int64_t take = std::min(n - done, cpu::softmax_blocks::kBlock - filled_);
      std::copy_n(s + done, take, s_ + filled_);
      std::copy_n(t + done, take, t_ + filled_);
      filled_ += take;
      done += take;
      if (filled_ == cpu::softmax_blocks::kBlock) flush();
    }
  }

  const opd::PairSoftmaxState& finish() {
    if (filled_ > 0) flush();
    return row_;
  }

 private:
  void flush() {
    cpu::softmax_blocks::PairBlock block;
    cpu::softmax_blocks::reduce_pair_block(s_, t_, filled_, inv_temperature_, block);
    row_.merge(block.state, inv_temperature_);
    filled_ = 0;
  }

  float inv_temperature_;
  opd::PairSoftmaxState row_;
  int64_t filled_ = 0;
  float s_[cpu::softmax_blocks::kBlock];
  float t_[cpu::softmax_blocks::kBlock];
};

struct TokenStatsOut {
  const int64_t* tokens;  // null: not requested
  float inv_temperature;
  float* student_logprob;
  float* teacher_logprob;
  float* reverse_kl;
};

template <typename student_t, typename teacher_t>
void drift_step_kernel(const student_t* student, const teacher_t* teacher, int64_t row_stride_s, int64_t row_stride_t,
                       int64_t active, int64_t vocab, int k, const int64_t* rows, const opd::DriftConfig& config,
                       const opd::DriftStateArrays& state, const TokenStatsOut& stats, float* overlap,
                       float* multiplier, bool* stopped) {
  at::parallel_for(0, active, cpu_rows_per_task(vocab), [&](int64_t begin, int64_t end) {
    cpu::RowPairTopK topk(k);
    for (int64_t i = begin; i < end; ++i) {
      const student_t* s_row = student + i * row_stride_s;
      const teacher_t* t_row = teacher + i * row_stride_t;
      if (stats.tokens != nullptr) {
        BlockedPairSoftmax accumulate(stats.inv_temperature);
        const float inv_t = stats.inv_temperature;
        overlap[i] = topk.overlap(s_row, t_row, vocab,
                                  [&](const float* s, const float* t, int64_t, int64_t n) { accumulate.add(s, t, n); });
        // The state keeps raw maxima: log p = (x - centre) / τ - log Z, not x / τ - lse, which
        // rounds to ulp(max / τ) (~1e-3 at |logits| ~ 1e4).
        const opd::PairSoftmaxState& softmax = accumulate.finish();
        const int64_t y = stats.tokens[i];
        using opd::online_softmax_detail::centre;
        stats.student_logprob[i] = (static_cast<float>(s_row[y]) - centre(softmax.max_s)) * inv_t - logf(softmax.sum_s);
        stats.teacher_logprob[i] = (static_cast<float>(t_row[y]) - centre(softmax.max_t)) * inv_t - logf(softmax.sum_t);
        stats.reverse_kl[i] = softmax.reverse_kl();
      } else {
        overlap[i] = topk.overlap(s_row, t_row, vocab);
      }
      const int64_t row = rows != nullptr ? rows[i] : i;
      opd::DriftState s = state.load(row);
      const opd::DriftTokenResult r = opd::drift_step(config, s, overlap[i]);
      state.store(row, s);
      multiplier[i] = r.multiplier;
      stopped[i] = r.stopped;
    }
  });
}

// Host-side range check of an int64 index tensor (CPU only: it reads the values).
void check_index_range(const char* op, const char* name, const at::Tensor& index, int64_t upper) {
  const int64_t* data = index.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < index.numel(); ++i) {
    TORCH_CHECK(data[i] >= 0 && data[i] < upper, op, ": ", name, "[", i, "]=", data[i], " is out of range [0, ", upper,
                ")");
  }
}

DriftStepOutputs drift_step_cpu(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                                const std::optional<at::Tensor>& tokens, const std::optional<at::Tensor>& rows,
                                at::Tensor& ema, at::Tensor& weight, at::Tensor& drift_run, at::Tensor& drift_events,
                                at::Tensor& length, at::Tensor& stop_reason, const at::Tensor& budget, int64_t k,
                                double temperature, double ema_beta, double threshold, int64_t warmup, double w_drop,
                                double decay, double w_base, int64_t patience, double min_weight) {
  constexpr const char* op = "drift_step";
  const DriftStepInputs in = check_drift_step_inputs(
      student_logits, teacher_logits, tokens, rows, ema, weight, drift_run, drift_events, length, stop_reason, budget,
      k, temperature, ema_beta, threshold, warmup, w_drop, decay, w_base, patience, min_weight);
  const int64_t active = in.active, vocab = in.vocab, batch = in.batch;
  const opd::DriftConfig& config = in.config;
  const at::Tensor& row_index = in.row_index;
  const at::Tensor& token_ids = in.token_ids;
  if (rows.has_value()) check_index_range(op, "rows", row_index, batch);
  if (tokens.has_value()) check_index_range(op, "tokens", token_ids, vocab);
  const at::Tensor s = as_rows(student_logits);
  const at::Tensor t = as_rows(teacher_logits);
  DriftStepOutputs outputs = allocate_drift_step_outputs(s.options(), active, tokens.has_value());
  at::Tensor& overlap = std::get<0>(outputs);
  at::Tensor& multiplier = std::get<1>(outputs);
  at::Tensor& stopped = std::get<2>(outputs);
  at::Tensor& student_logprob = std::get<3>(outputs);
  at::Tensor& teacher_logprob = std::get<4>(outputs);
  at::Tensor& reverse_kl = std::get<5>(outputs);
  if (active == 0) return outputs;

  const opd::DriftStateArrays state = drift_arrays(ema, weight, drift_run, drift_events, length, stop_reason, budget);
  const TokenStatsOut stats{tokens.has_value() ? token_ids.const_data_ptr<int64_t>() : nullptr,
                            static_cast<float>(1.0 / temperature), student_logprob.mutable_data_ptr<float>(),
                            teacher_logprob.mutable_data_ptr<float>(), reverse_kl.mutable_data_ptr<float>()};
  dispatch_logit_pair(s.scalar_type(), t.scalar_type(), op, [&]<typename S, typename T>() {
    drift_step_kernel<S, T>(s.const_data_ptr<S>(), t.const_data_ptr<T>(), s.stride(0), t.stride(0), active, vocab,
                            static_cast<int>(k), rows.has_value() ? row_index.const_data_ptr<int64_t>() : nullptr,
                            config, state, stats, overlap.mutable_data_ptr<float>(),
                            multiplier.mutable_data_ptr<float>(), stopped.mutable_data_ptr<bool>());
  });
  return outputs;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> drift_scan_cpu(
    const at::Tensor& overlaps, const std::optional<at::Tensor>& mask, at::Tensor& ema, at::Tensor& weight,
    at::Tensor& drift_run, at::Tensor& drift_events, at::Tensor& length, at::Tensor& stop_reason,
    const at::Tensor& budget, double ema_beta, double threshold, int64_t warmup, double w_drop, double decay,
    double w_base, int64_t patience, double min_weight) {
  const DriftScanInputs in =
      check_drift_scan_inputs(overlaps, mask, ema, weight, drift_run, drift_events, length, stop_reason, budget,
                              ema_beta, threshold, warmup, w_drop, decay, w_base, patience, min_weight);
  const int64_t batch = in.batch, steps = in.steps;
  const opd::DriftConfig& config = in.config;
  const at::Tensor& o = in.overlaps;
  const at::Tensor& valid = in.valid;
  at::Tensor multipliers = at::empty({batch, steps}, o.options());
  at::Tensor weights = at::empty({batch, steps}, o.options());
  at::Tensor stop_position = at::empty({batch}, o.options().dtype(at::kLong));
  const opd::DriftStateArrays state = drift_arrays(ema, weight, drift_run, drift_events, length, stop_reason, budget);
  const float* o_data = o.const_data_ptr<float>();
  const bool* valid_data = mask.has_value() ? valid.const_data_ptr<bool>() : nullptr;
  float* m_data = multipliers.mutable_data_ptr<float>();
  float* w_data = weights.mutable_data_ptr<float>();
  int64_t* stop_data = stop_position.mutable_data_ptr<int64_t>();
  at::parallel_for(0, batch, cpu_rows_per_task(steps), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      opd::DriftState s = state.load(b);
      stop_data[b] =
          opd::drift_scan_row(config, s, o_data + b * steps, valid_data != nullptr ? valid_data + b * steps : nullptr,
                              steps, m_data + b * steps, w_data + b * steps);
      state.store(b, s);
    }
  });
  return {multipliers, weights, stop_position};
}

}  // namespace

TORCH_LIBRARY_IMPL(opd_ext, CPU, m) {
  m.impl("drift_step", &drift_step_cpu);
  m.impl("drift_scan", &drift_scan_cpu);
}

}  // namespace opd_ext
