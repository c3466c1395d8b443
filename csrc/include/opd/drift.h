// Prune-OPD drift tracking (docs/spec.md §1): the per-sequence state machine, one token at a time.
//
// This is the only definition of the rule. The CPU and CUDA decode-step kernels, the scan over
// whole sequences and the C++ tests all call drift_step(), and opd_ext/reference.py mirrors it
// operation by operation in float32, so every backend produces bit-identical states.
//
// Bit-exactness across compilers: every float operation below is a single rounded multiply or
// add through mul_rn / add_rn. On the device those are the non-contractible intrinsics (nvcc
// would otherwise fuse `a * b + c` into an FMA and round once instead of twice); the host
// targets (x86-64 without -mfma) do not contract either.
#pragma once

#include <cstdint>

#include "opd/common.h"

namespace opd {

OPD_HOST_DEVICE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

OPD_HOST_DEVICE float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// Why a sequence stopped. Stored per sequence (int8); 0 while it is still generating.
enum DriftStopReason : int8_t {
  kRunning = 0,
  kWeightExhausted = 1,  // weight fell to min_weight: nothing drift-free left to supervise
  kPatience = 2,         // `patience` consecutive drift events
  kBudget = 3,           // length reached the sequence's budget (the dynamic window L)
  kFinished = 4,         // stopped from outside (EOS, max_new_tokens); never set here
  kRepetition = 5,       // the rollout repeats itself (a degenerate loop); set by the caller's check, never here
};

// Plain values so the struct can be passed by value to a CUDA kernel.
struct DriftConfig {
  float ema_beta = 0.0f;     // ema <- beta * ema + (1 - beta) * overlap; 0 = the raw overlap
  float threshold = 0.7f;    // drift event when ema < threshold (NaN overlap counts as drift)
  int32_t warmup = 0;        // the first `warmup` tokens of a sequence never count as drift
  float w_drop = 0.01f;      // linear schedule: weight = clamp(1 - w_drop * drift_events, 0, 1)
  float decay = 0.0f;        // > 0 selects the exponential schedule: weight *= decay per event
  float w_base = 0.5f;       // reward multiplier = w_base + weight
  int32_t patience = 0;      // stop after this many consecutive drift events; 0 = never
  float min_weight = 0.0f;   // stop once weight <= min_weight; negative = never
};

// One sequence's state. The first token of a sequence sees length == 0 and ema is ignored there
// (the ema starts at the first overlap rather than at an arbitrary prior).
struct DriftState {
  float ema = 0.0f;
  float weight = 1.0f;
  int32_t drift_run = 0;     // consecutive drift events up to and including the last token
  int32_t drift_events = 0;  // all drift events so far
  int32_t length = 0;        // tokens seen so far
  int32_t budget = INT32_MAX;
  int8_t stop_reason = kRunning;
};

struct DriftTokenResult {
  float multiplier;  // this token's reward multiplier; 0 when the sequence had already stopped
  bool drift;        // this token was a drift event
  bool stopped;      // the sequence generates nothing after this token
};

// Consumes one generated token whose student/teacher top-k overlap is `overlap`. A sequence that
// has already stopped is left untouched and its token (padding) gets multiplier 0.
OPD_HOST_DEVICE DriftTokenResult drift_step(const DriftConfig& config, DriftState& state, float overlap) {
  if (state.stop_reason != kRunning) return {0.0f, false, true};

  if (state.length == 0 || config.ema_beta == 0.0f) {
    state.ema = overlap;
  } else {
    const float one_minus_beta = add_rn(1.0f, -config.ema_beta);
    state.ema = add_rn(mul_rn(config.ema_beta, state.ema), mul_rn(one_minus_beta, overlap));
  }

  // `!(ema >= threshold)` rather than `ema < threshold`: a NaN overlap (NaN logits) is treated as
  // drift, so a broken row gets down-weighted and stopped instead of supervised forever.
  const bool drift = state.length >= config.warmup && !(state.ema >= config.threshold);
  if (drift) {
    ++state.drift_events;
    ++state.drift_run;
    if (config.decay > 0.0f) {
      state.weight = mul_rn(state.weight, config.decay);
    } else {
      // Recomputed from the event count instead of subtracting w_drop repeatedly, so the weight
      // is the closed form of docs/spec.md §1 with a single rounding, not an accumulated sum.
      const float w = add_rn(1.0f, -mul_rn(config.w_drop, static_cast<float>(state.drift_events)));
      state.weight = w < 0.0f ? 0.0f : (w > 1.0f ? 1.0f : w);
    }
  } else {
    state.drift_run = 0;
  }
  ++state.length;

  if (state.weight <= config.min_weight) {
    state.stop_reason = kWeightExhausted;
  } else if (config.patience > 0 && state.drift_run >= config.patience) {
    state.stop_reason = kPatience;
  } else if (state.length >= state.budget) {
    state.stop_reason = kBudget;
  }
  return {add_rn(config.w_base, state.weight), drift, state.stop_reason != kRunning};
}

// The state of a batch as one array per field (structure of arrays, the layout of the torch
// tensors), so kernels load a sequence, step it and store it back.
struct DriftStateArrays {
  float* ema;
  float* weight;
  int32_t* drift_run;
  int32_t* drift_events;
  int32_t* length;
  int8_t* stop_reason;
  const int32_t* budget;

  OPD_HOST_DEVICE DriftState load(int64_t row) const {
    DriftState s;
    s.ema = ema[row];
    s.weight = weight[row];
    s.drift_run = drift_run[row];
    s.drift_events = drift_events[row];
    s.length = length[row];
    s.budget = budget[row];
    s.stop_reason = stop_reason[row];
    return s;
  }

  OPD_HOST_DEVICE void store(int64_t row, const DriftState& s) const {
    ema[row] = s.ema;
    weight[row] = s.weight;
    drift_run[row] = s.drift_run;
    drift_events[row] = s.drift_events;
    length[row] = s.length;
    stop_reason[row] = s.stop_reason;
  }
};

// One row of the scan over whole sequences: `overlaps[t]` token by token, skipping positions
// where `valid[t]` is false (null = all valid). Per token it writes the multiplier and the weight
// after the token (both 0 where skipped or after the stop) and returns the position at which the
// sequence stopped, or -1. Running drift_step T times with the same tokens gives the same state.
OPD_HOST_DEVICE int64_t drift_scan_row(const DriftConfig& config, DriftState& state, const float* overlaps,
                                       const bool* valid, int64_t steps, float* multipliers, float* weights) {
  int64_t stop_position = -1;
  for (int64_t t = 0; t < steps; ++t) {
    if ((valid != nullptr && !valid[t]) || state.stop_reason != kRunning) {
      multipliers[t] = 0.0f;
      weights[t] = 0.0f;
      continue;
    }
    const DriftTokenResult r = drift_step(config, state, overlaps[t]);
    multipliers[t] = r.multiplier;
    weights[t] = state.weight;
    if (r.stopped) stop_position = t;
  }
  return stop_position;
}

}  // namespace opd
