// opd/online_softmax.h against a two-pass double-precision computation.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "opd/online_softmax.h"

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

struct ExactStats {
  double lse_s, lse_t, reverse_kl, forward_kl;
};

double exact_lse(const std::vector<float>& x) {
  double max = -INFINITY;
  for (float v : x) max = std::max(max, static_cast<double>(v));
  if (max == -INFINITY) return -INFINITY;
  double sum = 0;
  for (float v : x) sum += std::exp(v - max);
  return max + std::log(sum);
}

// Σ_v a_v (log a_v - log b_v) with a = softmax(x), b = softmax(y); terms with a_v = 0 vanish.
double exact_kl(const std::vector<float>& x, const std::vector<float>& y) {
  const double lse_x = exact_lse(x), lse_y = exact_lse(y);
  double kl = 0;
  for (size_t v = 0; v < x.size(); ++v) {
    const double log_a = x[v] - lse_x;
    if (log_a == -INFINITY) continue;
    kl += std::exp(log_a) * (log_a - (y[v] - lse_y));
  }
  return kl;
}

ExactStats exact(const std::vector<float>& s, const std::vector<float>& t) {
  return {exact_lse(s), exact_lse(t), exact_kl(s, t), exact_kl(t, s)};
}

opd::PairSoftmaxState sequential(const std::vector<float>& s, const std::vector<float>& t, size_t begin = 0,
                                 size_t end = SIZE_MAX) {
  opd::PairSoftmaxState state;
  for (size_t v = begin; v < std::min(end, s.size()); ++v) state.update(s[v], t[v]);
  return state;
}

// Relative error with an absolute floor for values near 0 (docs/spec.md §4: KL near 0 to 1e-6 absolute).
void expect_close(double expected, float actual, double rel, double abs_floor, const char* what) {
  if (std::isinf(expected)) {
    EXPECT_EQ(actual, static_cast<float>(expected)) << what;
    return;
  }
  EXPECT_LE(std::abs(actual - expected), std::max(rel * std::abs(expected), abs_floor))
      << what << ": expected " << expected << ", got " << actual;
}

void expect_matches_exact(const opd::PairSoftmaxState& state, const std::vector<float>& s, const std::vector<float>& t,
                          double rel = 1e-5) {
  const ExactStats ref = exact(s, t);
  expect_close(ref.lse_s, state.lse_s(), rel, 1e-6, "lse_s");
  expect_close(ref.lse_t, state.lse_t(), rel, 1e-6, "lse_t");
  expect_close(ref.reverse_kl, state.reverse_kl(), rel, 1e-6, "reverse_kl");
  expect_close(ref.forward_kl, state.forward_kl(), rel, 1e-6, "forward_kl");
}

std::vector<float> normal_row(std::mt19937& gen, size_t n, float scale, float offset = 0) {
  std::normal_distribution<float> dist(offset, scale);
  std::vector<float> row(n);
  for (float& x : row) x = dist(gen);
  return row;
}

TEST(OnlineSoftmax, StudentStateMatchesTwoPassLse) {
  std::mt19937 gen(0);
  for (size_t n : {1u, 7u, 129u, 5000u}) {
    const std::vector<float> x = normal_row(gen, n, 3.0f);
    opd::SoftmaxState state;
    for (float v : x) state.update(v);
    expect_close(exact_lse(x), state.lse(), 1e-6, 1e-6, "lse");
  }
}

TEST(OnlineSoftmax, PairStateMatchesTwoPassDouble) {
  std::mt19937 gen(1);
  for (size_t n : {1u, 2u, 7u, 129u, 1000u}) {
    for (float scale : {0.1f, 1.0f, 4.0f}) {
      SCOPED_TRACE(testing::Message() << "n=" << n << " scale=" << scale);
      const std::vector<float> s = normal_row(gen, n, scale);
      const std::vector<float> t = normal_row(gen, n, scale);
      expect_matches_exact(sequential(s, t), s, t);
    }
  }
}

// One long float32 running sum loses ~sqrt(n) ulps; kernels reduce a row as a tree of short
// slices (vector lanes, threads, warps), which keeps vocabulary-sized rows within docs/spec.md §4.
TEST(OnlineSoftmax, TreeOfSlicesMatchesTwoPassDoubleOnVocabularySizedRows) {
  std::mt19937 gen(7);
  for (size_t n : {50257u, 151936u}) {
    for (float scale : {0.1f, 1.0f, 4.0f}) {
      SCOPED_TRACE(testing::Message() << "n=" << n << " scale=" << scale);
      const std::vector<float> s = normal_row(gen, n, scale), t = normal_row(gen, n, scale);
      const size_t slice = 256;
      std::vector<opd::PairSoftmaxState> level;
      for (size_t begin = 0; begin < n; begin += slice) level.push_back(sequential(s, t, begin, begin + slice));
      while (level.size() > 1) {
        std::vector<opd::PairSoftmaxState> next;
        for (size_t i = 0; i + 1 < level.size(); i += 2) {
          next.push_back(level[i]);
          next.back().merge(level[i + 1]);
        }
        if (level.size() % 2) next.push_back(level.back());
        level = next;
      }
      expect_matches_exact(level[0], s, t);
    }
  }
}

TEST(OnlineSoftmax, IdenticalRowsHaveZeroKl) {
  std::mt19937 gen(2);
  const std::vector<float> s = normal_row(gen, 4096, 2.0f);
  const opd::PairSoftmaxState state = sequential(s, s);
  EXPECT_EQ(state.reverse_kl(), 0.0f);
  EXPECT_EQ(state.forward_kl(), 0.0f);
}

TEST(OnlineSoftmax, KlIsShiftInvariantAtExtremeOffsets) {
  // Student around +1e4, teacher the same shape around -1e4: the logits differ by 2e4 everywhere
  // but the distributions only slightly, so KL is small and must not drown in the offsets.
  std::mt19937 gen(3);
  std::vector<float> s = normal_row(gen, 1000, 1.0f);
  std::vector<float> t = s;
  std::normal_distribution<float> noise(0.0f, 0.05f);
  for (size_t v = 0; v < s.size(); ++v) {
    t[v] = (t[v] + noise(gen)) - 1e4f;
    s[v] = s[v] + 1e4f;
  }
  expect_matches_exact(sequential(s, t), s, t);
}

TEST(OnlineSoftmax, ExtremeLogitsDoNotOverflow) {
  std::vector<float> s = {1e4f, -1e4f, 0.0f, 1e4f, -1e4f};
  std::vector<float> t = {-1e4f, 1e4f, 1e4f, 0.0f, 5.0f};
  const opd::PairSoftmaxState state = sequential(s, t);
  expect_matches_exact(state, s, t);
  EXPECT_TRUE(std::isfinite(state.reverse_kl()));
  EXPECT_GT(state.reverse_kl(), 1e4f);  // the student's mass sits where the teacher has ~e^-2e4
}

TEST(OnlineSoftmax, MaskedEntriesContributeNothing) {
  // -inf in both rows at the same ids is a masked vocabulary entry: same stats as dropping it.
  std::mt19937 gen(4);
  std::vector<float> s = normal_row(gen, 300, 2.0f), t = normal_row(gen, 300, 2.0f);
  std::vector<float> s_kept, t_kept;
  for (size_t v = 0; v < s.size(); ++v) {
    if (v % 3 == 0 || v == 1) {
      s[v] = t[v] = -kInf;
    } else {
      s_kept.push_back(s[v]);
      t_kept.push_back(t[v]);
    }
  }
  const opd::PairSoftmaxState masked = sequential(s, t);
  const opd::PairSoftmaxState kept = sequential(s_kept, t_kept);
  EXPECT_FLOAT_EQ(masked.lse_s(), kept.lse_s());
  EXPECT_FLOAT_EQ(masked.lse_t(), kept.lse_t());
  EXPECT_NEAR(masked.reverse_kl(), kept.reverse_kl(), 1e-6);
  EXPECT_NEAR(masked.forward_kl(), kept.forward_kl(), 1e-6);
  EXPECT_TRUE(std::isfinite(masked.reverse_kl()));
}

TEST(OnlineSoftmax, TeacherMinusInfUnderStudentMassGivesInfiniteKl) {
  for (size_t where : {0u, 3u, 6u}) {  // first element, middle, last: every re-centring path
    std::vector<float> s = {0.5f, 1.0f, -2.0f, 0.0f, 3.0f, 1.5f, -1.0f};
    std::vector<float> t = {1.0f, 0.0f, 2.0f, -1.0f, 0.5f, 0.0f, 4.0f};
    t[where] = -kInf;
    const opd::PairSoftmaxState state = sequential(s, t);
    EXPECT_EQ(state.reverse_kl(), kInf) << where;
    EXPECT_TRUE(std::isfinite(state.forward_kl())) << where;
    expect_close(exact(s, t).forward_kl, state.forward_kl(), 1e-5, 1e-6, "forward_kl");
  }
}

TEST(OnlineSoftmax, StudentMinusInfUnderTeacherMassGivesInfiniteForwardKl) {
  std::vector<float> s = {-kInf, 1.0f, -2.0f, 0.0f};
  std::vector<float> t = {3.0f, 0.0f, 2.0f, -1.0f};
  const opd::PairSoftmaxState state = sequential(s, t);
  EXPECT_EQ(state.forward_kl(), kInf);
  expect_close(exact(s, t).reverse_kl, state.reverse_kl(), 1e-5, 1e-6, "reverse_kl");
}

TEST(OnlineSoftmax, LeadingMinusInfRun) {
  // A side that starts all -inf is centred at 0 until its first finite value.
  std::vector<float> s = {-kInf, -kInf, -kInf, 2.0f, -300.0f, 1.0f};
  std::vector<float> t = {-kInf, 5.0f, -kInf, 1.0f, -250.0f, 3.0f};
  expect_matches_exact(sequential(s, t), s, t);
}

TEST(OnlineSoftmax, AllMinusInfRows) {
  const std::vector<float> none(5, -kInf);
  opd::SoftmaxState student;
  for (float x : none) student.update(x);
  EXPECT_EQ(student.lse(), -kInf);

  const std::vector<float> t = {0.0f, 1.0f, 2.0f, 3.0f, 4.0f};
  const opd::PairSoftmaxState state = sequential(none, t);
  EXPECT_EQ(state.lse_s(), -kInf);
  EXPECT_TRUE(std::isnan(state.reverse_kl()));  // p is undefined, as torch.log_softmax says
}

TEST(OnlineSoftmax, NanPoisonsEveryStatistic) {
  for (size_t where : {0u, 2u, 4u}) {
    std::vector<float> s = {0.5f, 1.0f, -2.0f, 0.0f, 3.0f};
    std::vector<float> t = {1.0f, 0.0f, 2.0f, -1.0f, 0.5f};
    s[where] = std::numeric_limits<float>::quiet_NaN();
    const opd::PairSoftmaxState state = sequential(s, t);
    EXPECT_TRUE(std::isnan(state.lse_s())) << where;
    EXPECT_TRUE(std::isnan(state.reverse_kl())) << where;
    EXPECT_TRUE(std::isnan(state.forward_kl())) << where;
    EXPECT_FALSE(std::isnan(state.lse_t())) << where;  // the teacher side is a separate row
  }
}

TEST(OnlineSoftmax, MergeOfSlicesMatchesSequential) {
  std::mt19937 gen(5);
  const size_t n = 10007;
  std::vector<float> s = normal_row(gen, n, 3.0f), t = normal_row(gen, n, 3.0f);
  s[17] = -kInf;
  t[4000] = -kInf;
  s[4000] = -kInf;
  const opd::PairSoftmaxState whole = sequential(s, t);
  for (size_t parts : {2u, 3u, 16u, 97u}) {
    SCOPED_TRACE(testing::Message() << "parts=" << parts);
    std::vector<opd::PairSoftmaxState> slices;
    for (size_t p = 0; p < parts; ++p) slices.push_back(sequential(s, t, p * n / parts, (p + 1) * n / parts));
    // Left fold, right fold and a pairwise tree: three association orders.
    opd::PairSoftmaxState left;
    for (const auto& slice : slices) left.merge(slice);
    opd::PairSoftmaxState right;
    for (size_t p = parts; p-- > 0;) {
      opd::PairSoftmaxState acc = slices[p];
      acc.merge(right);
      right = acc;
    }
    std::vector<opd::PairSoftmaxState> level = slices;
    while (level.size() > 1) {
      std::vector<opd::PairSoftmaxState> next;
      for (size_t i = 0; i + 1 < level.size(); i += 2) {
        next.push_back(level[i]);
        next.back().merge(level[i + 1]);
      }
      if (level.size() % 2) next.push_back(level.back());
      level = next;
    }
    for (const opd::PairSoftmaxState* merged : {&left, &right, &level[0]}) {
      EXPECT_NEAR(merged->lse_s(), whole.lse_s(), 1e-5f);
      EXPECT_NEAR(merged->lse_t(), whole.lse_t(), 1e-5f);
      EXPECT_NEAR(merged->reverse_kl(), whole.reverse_kl(), 1e-4f * whole.reverse_kl());
      EXPECT_EQ(merged->forward_kl(), kInf);  // s[17] = -inf under teacher mass
      expect_matches_exact(*merged, s, t, 1e-4);
    }
  }
}

TEST(OnlineSoftmax, MergeWithEmptyStateIsIdentity) {
  std::mt19937 gen(6);
  const std::vector<float> s = normal_row(gen, 50, 2.0f), t = normal_row(gen, 50, 2.0f);
  const opd::PairSoftmaxState state = sequential(s, t);
  opd::PairSoftmaxState left;  // empty ⊕ state
  left.merge(state);
  opd::PairSoftmaxState right = state;  // state ⊕ empty
  right.merge(opd::PairSoftmaxState{});
  for (const auto& merged : {left, right}) {
    EXPECT_EQ(merged.lse_s(), state.lse_s());
    EXPECT_EQ(merged.lse_t(), state.lse_t());
    EXPECT_EQ(merged.reverse_kl(), state.reverse_kl());
    EXPECT_EQ(merged.forward_kl(), state.forward_kl());
  }
}

TEST(OnlineSoftmax, MergeAcrossInfiniteKlSlices) {
  // The infinite contribution must survive merging into slices with larger maxima.
  std::vector<float> s = {0.0f, 1.0f, 50.0f, 2.0f};
  std::vector<float> t = {-kInf, 1.0f, 3.0f, 60.0f};
  opd::PairSoftmaxState a = sequential(s, t, 0, 2), b = sequential(s, t, 2, 4);
  a.merge(b);
  EXPECT_EQ(a.reverse_kl(), kInf);
  // Student mass e^-50 relative is still mass: KL stays infinite, as in exact arithmetic.
  expect_close(exact(s, t).forward_kl, a.forward_kl(), 1e-5, 1e-6, "forward_kl");
}

// A state of x/τ kept on raw maxima (inv_tau passed to update / merge / lse): at |logits| ~ 1e4
// every distance stays exact, where scaling first would round each scaled logit to ulp(1e4/τ).
TEST(OnlineSoftmax, TemperatureStateCentresOnRawLogits) {
  std::mt19937 gen(8);
  for (float tau : {0.7f, 1.3f}) {
    for (float offset : {1e4f, -1e4f}) {
      SCOPED_TRACE(testing::Message() << "tau=" << tau << " offset=" << offset);
      const float inv_tau = 1.0f / tau;
      const size_t n = 3001;
      const std::vector<float> s = normal_row(gen, n, 3.0f, offset);
      std::vector<float> t = s;
      std::normal_distribution<float> noise(0.0f, 1.0f);
      for (float& x : t) x += noise(gen);
      // The exact statistics of x/τ, from the float inputs scaled in double.
      std::vector<double> s_scaled(n), t_scaled(n);
      for (size_t v = 0; v < n; ++v) {
        s_scaled[v] = static_cast<double>(s[v]) / tau;
        t_scaled[v] = static_cast<double>(t[v]) / tau;
      }
      const double max_s = *std::max_element(s_scaled.begin(), s_scaled.end());
      const double max_t = *std::max_element(t_scaled.begin(), t_scaled.end());
      double z_s = 0, z_t = 0;
      for (size_t v = 0; v < n; ++v) {
        z_s += std::exp(s_scaled[v] - max_s);
        z_t += std::exp(t_scaled[v] - max_t);
      }
      double kl = 0;
      for (size_t v = 0; v < n; ++v) {
        const double log_p = s_scaled[v] - max_s - std::log(z_s), log_q = t_scaled[v] - max_t - std::log(z_t);
        kl += std::exp(log_p) * (log_p - log_q);
      }
      // Sequential updates, and slices merged as a left fold.
      opd::PairSoftmaxState whole, merged;
      for (size_t v = 0; v < n; ++v) whole.update(s[v], t[v], inv_tau);
      for (size_t begin = 0; begin < n; begin += 97) {
        opd::PairSoftmaxState slice;
        for (size_t v = begin; v < std::min(n, begin + 97); ++v) slice.update(s[v], t[v], inv_tau);
        merged.merge(slice, inv_tau);
      }
      for (const opd::PairSoftmaxState* state : {&whole, &merged}) {
        expect_close(max_s + std::log(z_s), state->lse_s(inv_tau), 1e-7, 1e-6, "lse_s");
        expect_close(max_t + std::log(z_t), state->lse_t(inv_tau), 1e-7, 1e-6, "lse_t");
        expect_close(kl, state->reverse_kl(), 1e-5, 1e-6, "reverse_kl");
        // log p at the row's first element, written (x - max)/τ - log Z as the kernels do.
        const float log_p0 = (s[0] - state->max_s) * inv_tau - logf(state->sum_s);
        expect_close(s_scaled[0] - max_s - std::log(z_s), log_p0, 1e-6, 1e-6, "log p");
      }
      opd::SoftmaxState student;
      for (size_t v = 0; v < n; ++v) student.update(s[v], inv_tau);
      expect_close(max_s + std::log(z_s), student.lse(inv_tau), 1e-7, 1e-6, "student lse");
    }
  }
}

}  // namespace
