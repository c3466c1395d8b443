// The CUDA kernel layer (csrc/include/opd/cuda) through its launchers, without torch, on the SIMT
// emulator: every kernel and launch path against host computations from the shared math of opd/.
// ctest builds this twice, the second time with AddressSanitizer + UBSan, so out-of-bounds or
// uninitialised accesses of any kernel fail here.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "opd/cuda/drift.cuh"
#include "opd/cuda/token_stats.cuh"
#include "opd/cuda/topk_overlap.cuh"
#include "opd/drift.h"
#include "opd/topk.h"

namespace {

using opd::simt::Schedule;

class Kernels : public ::testing::Test {
 protected:
  void SetUp() override { saved_ = opd::simt::config(); }
  void TearDown() override { opd::simt::config() = saved_; }
  static void use(const std::string& device, Schedule schedule = Schedule::forward, uint64_t seed = 0) {
    opd::simt::config().device = opd::simt::device_profile(device);
    opd::simt::config().schedule = schedule;
    opd::simt::config().seed = seed;
  }
  static uint64_t launches() { return opd::simt::counters().launches; }
  opd::simt::Config saved_;
};

// Workspaces as the bindings hand them out: uninitialised (poisoned).
std::vector<unsigned char> workspace(size_t bytes) {
  return std::vector<unsigned char>(bytes, opd::simt::poison_byte());
}

struct Rows {
  int64_t rows, vocab;
  std::vector<float> student, teacher;
};

Rows random_rows(int64_t rows, int64_t vocab, uint32_t seed, float noise = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal;
  Rows r{rows, vocab, std::vector<float>(rows * vocab), std::vector<float>(rows * vocab)};
  for (size_t i = 0; i < r.student.size(); ++i) {
    r.student[i] = 3.0f * normal(gen);
    r.teacher[i] = r.student[i] + noise * normal(gen);
  }
  return r;
}

std::vector<int32_t> host_topk(const float* row, int64_t vocab, int k) {
  std::vector<int32_t> ids(vocab);
  std::iota(ids.begin(), ids.end(), 0);
  std::partial_sort(ids.begin(), ids.begin() + k, ids.end(),
                    [&](int32_t a, int32_t b) { return opd::ranks_before(row[a], a, row[b], b); });
  ids.resize(k);
  std::sort(ids.begin(), ids.end());
  return ids;
}

float host_overlap(const float* s, const float* t, int64_t vocab, int k) {
  const std::vector<int32_t> a = host_topk(s, vocab, k), b = host_topk(t, vocab, k);
  std::vector<int32_t> common;
  std::set_intersection(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(common));
  return static_cast<float>(common.size()) / static_cast<float>(k);
}

std::vector<float> run_topk_overlap(const Rows& r, int k) {
  std::vector<float> out(r.rows, -1.0f);
  size_t bytes = 0;
  EXPECT_EQ(opd::cuda::topk_overlap_workspace_size(r.rows, r.vocab, k, &bytes), cudaSuccess);
  std::vector<unsigned char> ws = workspace(bytes);
  const opd::cuda::TopKOverlapParams<float, float> p{
      r.student.data(), r.teacher.data(), r.vocab, r.vocab, r.rows, static_cast<int32_t>(r.vocab), k, out.data()};
  EXPECT_EQ(opd::cuda::launch_topk_overlap(p, ws.data(), bytes, nullptr), cudaSuccess);
  return out;
}

TEST_F(Kernels, TopKOverlapEveryPathMatchesTheHostTopK) {
  struct Case {
    const char* device;
    int64_t rows, vocab;
    int k;
    uint64_t launches;
  };
  for (const Case c : {Case{"tiny", 6, 9000, 16, 1}, Case{"h100", 2, 20000, 16, 2}, Case{"l4", 3, 4099, 1024, 1},
                       Case{"a100", 1, 17000, 100, 2}, Case{"h100", 5, 33, 1, 1}}) {
    for (Schedule s : {Schedule::forward, Schedule::reverse, Schedule::random}) {
      use(c.device, s, 3);
      const Rows r = random_rows(c.rows, c.vocab, static_cast<uint32_t>(c.vocab));
      const uint64_t before = launches();
      const std::vector<float> got = run_topk_overlap(r, c.k);
      EXPECT_EQ(launches() - before, c.launches) << c.device << " " << c.rows << "x" << c.vocab;
      for (int64_t i = 0; i < r.rows; ++i) {
        EXPECT_EQ(got[i], host_overlap(&r.student[i * r.vocab], &r.teacher[i * r.vocab], r.vocab, c.k))
            << c.device << " row " << i << " k " << c.k;
      }
    }
  }
}

TEST_F(Kernels, TopKOverlapRejectsWhatItCannotRun) {
  const Rows r = random_rows(1, 3000, 1);
  std::vector<float> out(1);
  const opd::cuda::TopKOverlapParams<float, float> p{r.student.data(), r.teacher.data(), 3000, 3000, 1, 3000, 2000,
                                                     out.data()};
  size_t bytes = 0;
  EXPECT_EQ(opd::cuda::topk_overlap_workspace_size(1, 3000, 2000, &bytes), cudaErrorInvalidValue);
  EXPECT_EQ(opd::cuda::launch_topk_overlap(p, nullptr, 0, nullptr), cudaErrorInvalidValue);
}

// Float64 statistics of one row pair at temperature tau (the definitions of docs/spec.md §1).
struct HostStats {
  double student_logprob, teacher_logprob, reverse_kl, forward_kl, student_lse, teacher_lse;
};

HostStats host_stats(const float* s, const float* t, int64_t vocab, int64_t token, double tau) {
  double ms = -INFINITY, mt = -INFINITY;
  for (int64_t j = 0; j < vocab; ++j) {
    ms = std::max(ms, static_cast<double>(s[j]) / tau);
    mt = std::max(mt, static_cast<double>(t[j]) / tau);
  }
  double zs = 0, zt = 0;
  for (int64_t j = 0; j < vocab; ++j) {
    zs += std::exp(s[j] / tau - ms);
    zt += std::exp(t[j] / tau - mt);
  }
  const double lse_s = ms + std::log(zs), lse_t = mt + std::log(zt);
  double rkl = 0, fkl = 0;
  for (int64_t j = 0; j < vocab; ++j) {
    const double lp = s[j] / tau - lse_s, lq = t[j] / tau - lse_t;
    rkl += std::exp(lp) * (lp - lq);
    fkl += std::exp(lq) * (lq - lp);
  }
  return {s[token] / tau - lse_s, t[token] / tau - lse_t, rkl, fkl, lse_s, lse_t};
}

void expect_close(double got, double want, const std::string& what) {
  EXPECT_NEAR(got, want, 1e-5 * std::abs(want) + 2e-6) << what;
}

TEST_F(Kernels, TokenStatsEveryPathMatchesFloat64) {
  struct Case {
    const char* device;
    int64_t rows, vocab;
    int topk;
    uint64_t launches;
  };
  const float tau = 0.8f;
  for (const Case c : {Case{"h100", 11, 100, 0, 1}, Case{"h100", 5, 4096, 0, 1}, Case{"h100", 3, 40000, 0, 2},
                       Case{"tiny", 3, 40000, 0, 2}, Case{"h100", 3, 5000, 100, 1}}) {
    use(c.device);
    const Rows r = random_rows(c.rows, c.vocab, 7);
    std::vector<int64_t> tokens(c.rows);
    for (int64_t i = 0; i < c.rows; ++i) tokens[i] = (i * 7919) % c.vocab;
    std::vector<float> out(8 * c.rows, -1.0f);
    float* o = out.data();
    const opd::cuda::TokenStatsParams<float, float> p{r.student.data(),
                                                      r.teacher.data(),
                                                      c.vocab,
                                                      c.vocab,
                                                      tokens.data(),
                                                      c.rows,
                                                      static_cast<int>(c.vocab),
                                                      1.0f / tau,
                                                      c.topk,
                                                      o,
                                                      o + c.rows,
                                                      o + 2 * c.rows,
                                                      o + 3 * c.rows,
                                                      o + 4 * c.rows,
                                                      o + 5 * c.rows,
                                                      o + 6 * c.rows};
    size_t bytes = 0;
    ASSERT_EQ((opd::cuda::token_stats_workspace_size<float, float>(c.rows, c.vocab, c.topk, &bytes)), cudaSuccess);
    std::vector<unsigned char> ws = workspace(bytes);
    const uint64_t before = launches();
    ASSERT_EQ(opd::cuda::launch_token_stats(p, ws.data(), bytes, nullptr), cudaSuccess);
    EXPECT_EQ(launches() - before, c.launches) << c.device << " " << c.rows << "x" << c.vocab;
    for (int64_t i = 0; i < c.rows; ++i) {
      const HostStats h = host_stats(&r.student[i * c.vocab], &r.teacher[i * c.vocab], c.vocab, tokens[i], tau);
      const std::string where = std::string(c.device) + " V=" + std::to_string(c.vocab) + " row " + std::to_string(i);
      expect_close(o[i], h.student_logprob, "student_logprob " + where);
      expect_close(o[c.rows + i], h.teacher_logprob, "teacher_logprob " + where);
      expect_close(o[2 * c.rows + i], h.reverse_kl, "reverse_kl " + where);
      expect_close(o[3 * c.rows + i], h.forward_kl, "forward_kl " + where);
      expect_close(o[4 * c.rows + i], h.student_lse, "student_lse " + where);
      expect_close(o[5 * c.rows + i], h.teacher_lse, "teacher_lse " + where);
      if (c.topk > 0) {
        EXPECT_TRUE(std::isfinite(o[6 * c.rows + i]) && o[6 * c.rows + i] >= 0) << where;
      }
    }
  }
}

TEST_F(Kernels, StudentStatsAndBackwardsMatchFloat64) {
  const float tau = 1.3f;
  for (const char* device : {"h100", "tiny"}) {
    use(device);
    for (int64_t vocab : {100, 3001, 40000}) {
      const int64_t rows = 3;
      const Rows r = random_rows(rows, vocab, 11);
      std::vector<int64_t> tokens = {0, vocab / 2, vocab - 1};
      std::vector<float> logprob(rows), lse(rows);
      const opd::cuda::StudentStatsParams<float> sp{r.student.data(),        vocab,      tokens.data(),  rows,
                                                    static_cast<int>(vocab), 1.0f / tau, logprob.data(), lse.data()};
      size_t bytes = 0;
      ASSERT_EQ(opd::cuda::student_stats_workspace_size<float>(rows, vocab, &bytes), cudaSuccess);
      std::vector<unsigned char> ws = workspace(bytes);
      ASSERT_EQ(opd::cuda::launch_student_stats(sp, ws.data(), bytes, nullptr), cudaSuccess);

      std::vector<float> coef = {0.0f, 0.5f, -2.0f};  // row 0 masked: exact zeros
      std::vector<float> grad(rows * vocab, -7.0f), kl(rows), lse_t(rows);
      for (int64_t i = 0; i < rows; ++i) {
        const HostStats h = host_stats(&r.student[i * vocab], &r.teacher[i * vocab], vocab, tokens[i], tau);
        expect_close(logprob[i], h.student_logprob, "student_stats logprob");
        expect_close(lse[i], h.student_lse, "student_stats lse");
        kl[i] = static_cast<float>(h.reverse_kl);
        lse_t[i] = static_cast<float>(h.teacher_lse);
      }
      const opd::cuda::PolicyGradientBackwardParams<float> pg{
          r.student.data(),        vocab,     grad.data(), coef.data(), tokens.data(), lse.data(), rows,
          static_cast<int>(vocab), 1.0f / tau};
      ASSERT_EQ(opd::cuda::launch_policy_gradient_backward(pg, nullptr, 0, nullptr), cudaSuccess);
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t j = 0; j < vocab; j += 97) {
          const double p = std::exp(r.student[i * vocab + j] / tau - lse[i]);
          const double want = coef[i] / tau * ((j == tokens[i] ? 1.0 : 0.0) - p);
          EXPECT_NEAR(grad[i * vocab + j], want, 1e-6 + 1e-5 * std::abs(want)) << "policy gradient " << i << "," << j;
        }
      }
      const opd::cuda::ReverseKlBackwardParams<float, float> rk{r.student.data(),
                                                                r.teacher.data(),
                                                                vocab,
                                                                vocab,
                                                                grad.data(),
                                                                coef.data(),
                                                                lse.data(),
                                                                lse_t.data(),
                                                                kl.data(),
                                                                rows,
                                                                static_cast<int>(vocab),
                                                                1.0f / tau};
      ASSERT_EQ(opd::cuda::launch_reverse_kl_backward(rk, nullptr, 0, nullptr), cudaSuccess);
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t j = 0; j < vocab; j += 89) {
          const double lp = r.student[i * vocab + j] / tau - lse[i], lq = r.teacher[i * vocab + j] / tau - lse_t[i];
          const double want = coef[i] / tau * std::exp(lp) * (lp - lq - kl[i]);
          EXPECT_NEAR(grad[i * vocab + j], want, 1e-6 + 1e-4 * std::abs(want)) << "reverse KL " << i << "," << j;
        }
      }
    }
  }
}

struct HostState {
  std::vector<float> ema, weight;
  std::vector<int32_t> drift_run, drift_events, length, budget;
  std::vector<int8_t> stop_reason;
  explicit HostState(int64_t b)
      : ema(b, 1.0f), weight(b, 1.0f), drift_run(b), drift_events(b), length(b), budget(b, 1 << 20), stop_reason(b) {}
  opd::DriftStateArrays arrays() {
    return {ema.data(),    weight.data(),      drift_run.data(), drift_events.data(),
            length.data(), stop_reason.data(), budget.data()};
  }
};

TEST_F(Kernels, DriftStepFollowsTheSharedStateMachine) {
  opd::DriftConfig config;
  config.ema_beta = 0.5f;
  config.threshold = 0.6f;
  config.warmup = 1;
  config.w_drop = 0.5f;
  config.decay = 0.0f;
  config.w_base = 0.0f;
  config.patience = 1;
  config.min_weight = 0.05f;
  // A block per row (tiny: 4 rows fill 2 SMs) and row slices + merge (h100).
  for (const auto& [device, vocab] : {std::pair<const char*, int64_t>{"tiny", 3000}, {"h100", 20000}}) {
    use(device);
    {
      const int64_t batch = 4;
      const int k = 16;
      HostState dev(batch), host(batch);
      std::vector<int64_t> tokens = {1, 2, 3, 4};
      for (int step = 0; step < 5; ++step) {
        const Rows r = random_rows(batch, vocab, 100 + step, step < 2 ? 0.1f : 5.0f);  // drifts after step 2
        std::vector<float> overlap(batch), multiplier(batch), lp_s(batch), lp_t(batch), rkl(batch);
        std::vector<uint8_t> stopped_bytes(batch);
        bool* stopped = reinterpret_cast<bool*>(stopped_bytes.data());
        const opd::cuda::DriftStepParams<float, float> p{r.student.data(),
                                                         r.teacher.data(),
                                                         vocab,
                                                         vocab,
                                                         batch,
                                                         static_cast<int32_t>(vocab),
                                                         k,
                                                         tokens.data(),
                                                         1.0f,
                                                         nullptr,
                                                         batch,
                                                         config,
                                                         dev.arrays(),
                                                         overlap.data(),
                                                         multiplier.data(),
                                                         stopped,
                                                         lp_s.data(),
                                                         lp_t.data(),
                                                         rkl.data()};
        size_t bytes = 0;
        ASSERT_EQ(opd::cuda::drift_step_workspace_size(batch, vocab, k, true, &bytes), cudaSuccess);
        std::vector<unsigned char> ws = workspace(bytes);
        ASSERT_EQ(opd::cuda::launch_drift_step(p, ws.data(), bytes, nullptr), cudaSuccess);
        opd::DriftStateArrays h = host.arrays();
        for (int64_t i = 0; i < batch; ++i) {
          const float want_overlap = host_overlap(&r.student[i * vocab], &r.teacher[i * vocab], vocab, k);
          EXPECT_EQ(overlap[i], want_overlap) << device << " step " << step << " row " << i;
          opd::DriftState s = h.load(i);
          const opd::DriftTokenResult res = opd::drift_step(config, s, want_overlap);
          h.store(i, s);
          EXPECT_EQ(multiplier[i], res.multiplier);
          EXPECT_EQ(stopped[i], res.stopped);
          const HostStats hs = host_stats(&r.student[i * vocab], &r.teacher[i * vocab], vocab, tokens[i], 1.0);
          expect_close(lp_s[i], hs.student_logprob, "drift student_logprob");
          expect_close(rkl[i], hs.reverse_kl, "drift reverse_kl");
        }
        EXPECT_EQ(dev.ema, host.ema);
        EXPECT_EQ(dev.weight, host.weight);
        EXPECT_EQ(dev.stop_reason, host.stop_reason);
      }
    }
  }
}

TEST_F(Kernels, DriftScanMatchesTheHostScan) {
  opd::DriftConfig config;
  config.ema_beta = 0.3f;
  config.threshold = 0.5f;
  config.warmup = 2;
  config.w_drop = 0.7f;
  config.decay = 0.0f;
  config.w_base = 0.1f;
  config.patience = 2;
  config.min_weight = 0.1f;
  const int64_t batch = 37, steps = 40;
  std::mt19937 gen(5);
  std::uniform_real_distribution<float> u;
  std::vector<float> overlaps(batch * steps);
  std::vector<uint8_t> valid_bytes(batch * steps);
  for (size_t i = 0; i < overlaps.size(); ++i) {
    overlaps[i] = u(gen);
    valid_bytes[i] = u(gen) > 0.2f;
  }
  const bool* valid = reinterpret_cast<const bool*>(valid_bytes.data());
  HostState dev(batch), host(batch);
  std::vector<float> mult(batch * steps, -1), weights(batch * steps, -1), host_mult(batch * steps),
      host_weights(batch * steps);
  std::vector<int64_t> stop(batch, -5);
  const opd::cuda::DriftScanParams p{overlaps.data(), valid,       batch,          steps,      config,
                                     dev.arrays(),    mult.data(), weights.data(), stop.data()};
  ASSERT_EQ(opd::cuda::launch_drift_scan(p, nullptr, 0, nullptr), cudaSuccess);
  const opd::DriftStateArrays h = host.arrays();
  for (int64_t b = 0; b < batch; ++b) {
    opd::DriftState s = h.load(b);
    const int64_t want_stop = opd::drift_scan_row(config, s, &overlaps[b * steps], &valid[b * steps], steps,
                                                  &host_mult[b * steps], &host_weights[b * steps]);
    h.store(b, s);
    EXPECT_EQ(stop[b], want_stop) << b;
  }
  EXPECT_EQ(mult, host_mult);
  EXPECT_EQ(weights, host_weights);
  EXPECT_EQ(dev.ema, host.ema);
  EXPECT_EQ(dev.length, host.length);
}

// A bfloat16 stand-in: the kernel layer takes any element type convertible to and from float, so
// mixed-width pairs (a 4-byte row beside a 2-byte one, whose vector loads reach alignment at
// different elements) run here without torch. Rounds to nearest even, as c10::BFloat16 does.
struct Bf16 {
  uint16_t bits;
  Bf16() = default;
  explicit Bf16(float x) {
    const uint32_t u = std::bit_cast<uint32_t>(x);
    bits = x != x ? uint16_t{0x7FC0} : static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
  operator float() const { return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16); }
};

// `rows` x `vocab` values stored as E from element `offset` of a buffer (contiguous rows), and the
// same rounded values as float for the host computations.
template <typename E>
struct Placed {
  std::vector<E> storage;
  std::vector<float> values;
  int64_t offset;
  const E* data() const { return storage.data() + offset; }
};

template <typename E>
Placed<E> place(const std::vector<float>& rows, int64_t offset) {
  Placed<E> p{std::vector<E>(rows.size() + offset + 8, E(0.0f)), std::vector<float>(rows.size()), offset};
  for (size_t i = 0; i < rows.size(); ++i) {
    p.storage[offset + i] = E(rows[i]);
    p.values[i] = static_cast<float>(p.storage[offset + i]);
  }
  return p;
}

// Every op that reads a teacher, for one (S, T) pair, against float64 on the rounded values.
// Offsets: both rows aligned, both reaching alignment at the same element after a scalar head,
// and never together (the scalar path); odd V gives rows of every phase besides.
template <typename S, typename T>
void expect_pair_matches_float64(const char* pair) {
  struct Case {
    const char* device;
    int64_t rows, vocab;
    int topk;
    int64_t offset_s, offset_t;
  };
  const float tau = 0.9f;
  for (const Case c : {Case{"h100", 5, 4099, 0, 0, 0}, Case{"h100", 3, 40000, 0, 1, 5}, Case{"tiny", 7, 1001, 0, 1, 2},
                       Case{"h100", 3, 5000, 100, 1, 5}}) {
    opd::simt::config().device = opd::simt::device_profile(c.device);
    const std::string where_case = std::string(pair) + " " + c.device + " V=" + std::to_string(c.vocab) + " offsets " +
                                   std::to_string(c.offset_s) + "," + std::to_string(c.offset_t);
    const Rows r = random_rows(c.rows, c.vocab, 21);
    const Placed<S> s = place<S>(r.student, c.offset_s);
    const Placed<T> t = place<T>(r.teacher, c.offset_t);
    std::vector<int64_t> tokens(c.rows);
    for (int64_t i = 0; i < c.rows; ++i) tokens[i] = (i * 7919) % c.vocab;

    std::vector<float> out(8 * c.rows, -1.0f);
    float* o = out.data();
    const opd::cuda::TokenStatsParams<S, T> p{
        s.data(),       t.data(),      c.vocab, c.vocab,    tokens.data(),  c.rows,         static_cast<int>(c.vocab),
        1.0f / tau,     c.topk,        o,       o + c.rows, o + 2 * c.rows, o + 3 * c.rows, o + 4 * c.rows,
        o + 5 * c.rows, o + 6 * c.rows};
    size_t bytes = 0;
    ASSERT_EQ((opd::cuda::token_stats_workspace_size<S, T>(c.rows, c.vocab, c.topk, &bytes)), cudaSuccess);
    std::vector<unsigned char> ws = workspace(bytes);
    ASSERT_EQ(opd::cuda::launch_token_stats(p, ws.data(), bytes, nullptr), cudaSuccess);
    std::vector<HostStats> host(c.rows);
    for (int64_t i = 0; i < c.rows; ++i) {
      host[i] = host_stats(&s.values[i * c.vocab], &t.values[i * c.vocab], c.vocab, tokens[i], tau);
      const std::string where = where_case + " row " + std::to_string(i);
      expect_close(o[i], host[i].student_logprob, "student_logprob " + where);
      expect_close(o[c.rows + i], host[i].teacher_logprob, "teacher_logprob " + where);
      expect_close(o[2 * c.rows + i], host[i].reverse_kl, "reverse_kl " + where);
      expect_close(o[3 * c.rows + i], host[i].forward_kl, "forward_kl " + where);
      expect_close(o[4 * c.rows + i], host[i].student_lse, "student_lse " + where);
      expect_close(o[5 * c.rows + i], host[i].teacher_lse, "teacher_lse " + where);
      if (c.topk > 0) {
        EXPECT_TRUE(std::isfinite(o[6 * c.rows + i]) && o[6 * c.rows + i] >= 0) << where;
      }
    }

    // The gradient comes back in the student's dtype: one rounding to S of the float64 value.
    const double grad_rtol = sizeof(S) == 4 ? 1e-4 : 8e-3;
    std::vector<float> coef(c.rows), lse_s(c.rows), lse_t(c.rows), kl(c.rows);
    for (int64_t i = 0; i < c.rows; ++i) {
      coef[i] = i == 0 ? 0.0f : 0.7f - static_cast<float>(i);  // row 0 masked: exact zeros
      lse_s[i] = static_cast<float>(host[i].student_lse);
      lse_t[i] = static_cast<float>(host[i].teacher_lse);
      kl[i] = static_cast<float>(host[i].reverse_kl);
    }
    std::vector<S> grad(c.rows * c.vocab, S(-7.0f));
    const opd::cuda::ReverseKlBackwardParams<S, T> rk{s.data(),
                                                      t.data(),
                                                      c.vocab,
                                                      c.vocab,
                                                      grad.data(),
                                                      coef.data(),
                                                      lse_s.data(),
                                                      lse_t.data(),
                                                      kl.data(),
                                                      c.rows,
                                                      static_cast<int>(c.vocab),
                                                      1.0f / tau};
    ASSERT_EQ(opd::cuda::launch_reverse_kl_backward(rk, nullptr, 0, nullptr), cudaSuccess);
    for (int64_t i = 0; i < c.rows; ++i) {
      for (int64_t j = 0; j < c.vocab; ++j) {
        const double lp = s.values[i * c.vocab + j] / tau - host[i].student_lse;
        const double lq = t.values[i * c.vocab + j] / tau - host[i].teacher_lse;
        const double want = coef[i] / tau * std::exp(lp) * (lp - lq - host[i].reverse_kl);
        const float got = static_cast<float>(grad[i * c.vocab + j]);
        ASSERT_NEAR(got, want, 1e-6 + grad_rtol * std::abs(want))
            << "reverse KL grad " << where_case << " " << i << "," << j;
      }
    }

    const int k = 16;
    std::vector<float> overlap(c.rows, -1.0f);
    ASSERT_EQ(opd::cuda::topk_overlap_workspace_size(c.rows, c.vocab, k, &bytes), cudaSuccess);
    ws = workspace(bytes);
    const opd::cuda::TopKOverlapParams<S, T> tp{
        s.data(), t.data(), c.vocab, c.vocab, c.rows, static_cast<int32_t>(c.vocab), k, overlap.data()};
    ASSERT_EQ(opd::cuda::launch_topk_overlap(tp, ws.data(), bytes, nullptr), cudaSuccess);

    opd::DriftConfig config;
    HostState state(c.rows);
    std::vector<float> drift_overlap(c.rows), multiplier(c.rows), lp_s(c.rows), lp_t(c.rows), rkl(c.rows);
    std::vector<uint8_t> stopped_bytes(c.rows);
    const opd::cuda::DriftStepParams<S, T> dp{s.data(),
                                              t.data(),
                                              c.vocab,
                                              c.vocab,
                                              c.rows,
                                              static_cast<int32_t>(c.vocab),
                                              k,
                                              tokens.data(),
                                              1.0f / tau,
                                              nullptr,
                                              c.rows,
                                              config,
                                              state.arrays(),
                                              drift_overlap.data(),
                                              multiplier.data(),
                                              reinterpret_cast<bool*>(stopped_bytes.data()),
                                              lp_s.data(),
                                              lp_t.data(),
                                              rkl.data()};
    ASSERT_EQ(opd::cuda::drift_step_workspace_size(c.rows, c.vocab, k, true, &bytes), cudaSuccess);
    ws = workspace(bytes);
    ASSERT_EQ(opd::cuda::launch_drift_step(dp, ws.data(), bytes, nullptr), cudaSuccess);
    for (int64_t i = 0; i < c.rows; ++i) {
      const std::string where = where_case + " row " + std::to_string(i);
      const float want = host_overlap(&s.values[i * c.vocab], &t.values[i * c.vocab], c.vocab, k);
      EXPECT_EQ(overlap[i], want) << "topk_overlap " << where;
      EXPECT_EQ(drift_overlap[i], want) << "drift overlap " << where;
      expect_close(lp_s[i], host[i].student_logprob, "drift student_logprob " + where);
      expect_close(lp_t[i], host[i].teacher_logprob, "drift teacher_logprob " + where);
      expect_close(rkl[i], host[i].reverse_kl, "drift reverse_kl " + where);
    }
  }
}

TEST_F(Kernels, FloatStudentBesideBf16TeacherMatchesFloat64) { expect_pair_matches_float64<float, Bf16>("f32/bf16"); }

TEST_F(Kernels, Bf16StudentBesideFloatTeacherMatchesFloat64) { expect_pair_matches_float64<Bf16, float>("bf16/f32"); }

}  // namespace
