// The Prune-OPD state machine of csrc/include/opd/drift.h, token by token.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "opd/drift.h"

namespace {

using opd::DriftConfig;
using opd::DriftState;

// Runs `overlaps` through one sequence; returns the multipliers of the tokens consumed before the
// sequence stopped (the stopping token included).
std::vector<float> run(const DriftConfig& config, DriftState& state, const std::vector<float>& overlaps) {
  std::vector<float> multipliers;
  for (float o : overlaps) {
    if (state.stop_reason != opd::kRunning) break;
    multipliers.push_back(opd::drift_step(config, state, o).multiplier);
  }
  return multipliers;
}

TEST(DriftStep, AgreeingTokensKeepFullWeight) {
  DriftConfig config;
  DriftState state;
  for (int i = 0; i < 1000; ++i) {
    const auto r = opd::drift_step(config, state, 0.75f);
    EXPECT_FALSE(r.drift);
    EXPECT_FALSE(r.stopped);
    EXPECT_EQ(r.multiplier, 1.5f);
  }
  EXPECT_EQ(state.length, 1000);
  EXPECT_EQ(state.drift_events, 0);
}

TEST(DriftStep, ThresholdIsStrict) {
  DriftConfig config;
  config.threshold = 0.75f;
  DriftState state;
  EXPECT_FALSE(opd::drift_step(config, state, 0.75f).drift);
  EXPECT_TRUE(opd::drift_step(config, state, 0.6875f).drift);
}

TEST(DriftStep, LinearScheduleIsClosedFormAndStopsAtZero) {
  DriftConfig config;  // w_drop 0.01, w_base 0.5, min_weight 0
  DriftState state;
  for (int event = 1; event <= 100; ++event) {
    const auto r = opd::drift_step(config, state, 0.0f);
    EXPECT_TRUE(r.drift);
    const float expected = 1.0f - 0.01f * static_cast<float>(event);
    EXPECT_EQ(state.weight, expected < 0.0f ? 0.0f : expected) << "event " << event;
    EXPECT_EQ(r.multiplier, 0.5f + state.weight);
    EXPECT_EQ(r.stopped, event == 100) << "event " << event;
  }
  EXPECT_EQ(state.weight, 0.0f);
  EXPECT_EQ(state.stop_reason, opd::kWeightExhausted);
}

TEST(DriftStep, WeightsNeverIncrease) {
  DriftConfig config;
  config.w_drop = 0.05f;
  config.min_weight = -1.0f;  // never stop, keep feeding
  DriftState state;
  float previous = state.weight;
  for (int i = 0; i < 200; ++i) {
    opd::drift_step(config, state, (i * 37 % 11) / 10.0f);
    EXPECT_LE(state.weight, previous);
    EXPECT_GE(state.weight, 0.0f);
    previous = state.weight;
  }
  EXPECT_EQ(state.stop_reason, opd::kRunning);
}

TEST(DriftStep, StoppedSequenceIsNotUpdated) {
  DriftConfig config;
  config.w_drop = 1.0f;
  DriftState state;
  EXPECT_TRUE(opd::drift_step(config, state, 0.0f).stopped);
  const DriftState frozen = state;
  const auto r = opd::drift_step(config, state, 0.0f);
  EXPECT_TRUE(r.stopped);
  EXPECT_FALSE(r.drift);
  EXPECT_EQ(r.multiplier, 0.0f);
  EXPECT_EQ(state.length, frozen.length);
  EXPECT_EQ(state.drift_events, frozen.drift_events);
  EXPECT_EQ(state.weight, frozen.weight);
}

TEST(DriftStep, WarmupTokensAreNeverDrift) {
  DriftConfig config;
  config.warmup = 3;
  DriftState state;
  for (int i = 0; i < 3; ++i) EXPECT_FALSE(opd::drift_step(config, state, 0.0f).drift);
  EXPECT_TRUE(opd::drift_step(config, state, 0.0f).drift);
  EXPECT_EQ(state.drift_events, 1);
}

TEST(DriftStep, PatienceCountsConsecutiveEvents) {
  DriftConfig config;
  config.patience = 3;
  DriftState state;
  const auto multipliers = run(config, state, {0.0f, 0.0f, 1.0f, 0.0f, 0.0f, 0.0f, 0.0f});
  EXPECT_EQ(multipliers.size(), 6u);  // the run resets at the third token, then 3 in a row
  EXPECT_EQ(state.stop_reason, opd::kPatience);
  EXPECT_EQ(state.drift_events, 5);
  EXPECT_EQ(state.drift_run, 3);
}

TEST(DriftStep, EmaSmoothsAndStartsAtFirstOverlap) {
  DriftConfig config;
  config.ema_beta = 0.5f;
  DriftState state;
  EXPECT_FALSE(opd::drift_step(config, state, 1.0f).drift);
  EXPECT_EQ(state.ema, 1.0f);
  EXPECT_FALSE(opd::drift_step(config, state, 0.5f).drift);  // ema 0.75
  EXPECT_EQ(state.ema, 0.75f);
  EXPECT_TRUE(opd::drift_step(config, state, 0.5f).drift);  // ema 0.625
  EXPECT_EQ(state.ema, 0.625f);
}

TEST(DriftStep, ExponentialSchedule) {
  DriftConfig config;
  config.decay = 0.5f;
  config.min_weight = 0.1f;
  DriftState state;
  const auto multipliers = run(config, state, std::vector<float>(10, 0.0f));
  EXPECT_EQ(multipliers, (std::vector<float>{1.0f, 0.75f, 0.625f, 0.5625f}));  // 0.0625 <= 0.1 stops
  EXPECT_EQ(state.stop_reason, opd::kWeightExhausted);
}

TEST(DriftStep, BudgetCapsLength) {
  DriftConfig config;
  DriftState state;
  state.budget = 4;
  EXPECT_EQ(run(config, state, std::vector<float>(10, 1.0f)).size(), 4u);
  EXPECT_EQ(state.stop_reason, opd::kBudget);
}

TEST(DriftStep, WeightReasonWinsOverPatienceAndBudget) {
  DriftConfig config;
  config.w_drop = 0.5f;
  config.patience = 2;
  DriftState state;
  state.budget = 2;
  run(config, state, {0.0f, 0.0f});
  EXPECT_EQ(state.stop_reason, opd::kWeightExhausted);
}

TEST(DriftStep, DisabledIsPlainOpd) {
  DriftConfig config;
  config.w_drop = 0.0f;
  config.w_base = 0.0f;
  config.min_weight = -1.0f;
  DriftState state;
  for (int i = 0; i < 500; ++i) {
    const auto r = opd::drift_step(config, state, 0.0f);
    EXPECT_EQ(r.multiplier, 1.0f);
    EXPECT_FALSE(r.stopped);
  }
}

TEST(DriftStep, NanOverlapCountsAsDrift) {
  DriftConfig config;
  DriftState state;
  EXPECT_TRUE(opd::drift_step(config, state, std::numeric_limits<float>::quiet_NaN()).drift);
  EXPECT_EQ(state.drift_events, 1);
}

TEST(DriftScanRow, EqualsSteppingAndSkipsInvalidPositions) {
  DriftConfig config;
  config.ema_beta = 0.25f;
  config.w_drop = 0.125f;
  config.patience = 4;
  const std::vector<float> overlaps = {1.0f, 0.5f, 0.25f, 0.75f, 0.0f, 0.5f, 0.25f, 0.0f, 0.0f, 1.0f, 0.0f, 0.0f};
  const bool valid[] = {true, true, false, true, true, true, false, true, true, true, true, true};
  const int64_t steps = static_cast<int64_t>(overlaps.size());

  DriftState scanned;
  std::vector<float> multipliers(steps), weights(steps);
  const int64_t stop =
      opd::drift_scan_row(config, scanned, overlaps.data(), valid, steps, multipliers.data(), weights.data());

  DriftState stepped;
  int64_t expected_stop = -1;
  for (int64_t t = 0; t < steps; ++t) {
    if (!valid[t] || stepped.stop_reason != opd::kRunning) {
      EXPECT_EQ(multipliers[t], 0.0f);
      EXPECT_EQ(weights[t], 0.0f);
      continue;
    }
    const auto r = opd::drift_step(config, stepped, overlaps[t]);
    EXPECT_EQ(multipliers[t], r.multiplier) << t;
    EXPECT_EQ(weights[t], stepped.weight) << t;
    if (r.stopped) expected_stop = t;
  }
  EXPECT_EQ(stop, expected_stop);
  EXPECT_GE(stop, 0);
  EXPECT_EQ(scanned.length, stepped.length);
  EXPECT_EQ(scanned.ema, stepped.ema);
  EXPECT_EQ(scanned.weight, stepped.weight);
  EXPECT_EQ(scanned.drift_events, stepped.drift_events);
  EXPECT_EQ(scanned.stop_reason, stepped.stop_reason);
}

}  // namespace
