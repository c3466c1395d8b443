// Vectorisable block reductions of logit rows into opd::PairSoftmaxState, shared by the CPU
// token-statistics kernels and the fused Prune-OPD decode step.
//
// Functions have internal linkage: each includer gets its own GCC target_clones (AVX-512, AVX2+FMA,
// baseline x86-64) picked at load time.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

#include "opd/online_softmax.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define OPD_CPU_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define OPD_CPU_MULTIVERSION
#endif
#define OPD_ALWAYS_INLINE inline __attribute__((always_inline))

namespace opd_ext::cpu::softmax_blocks {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
// Two float blocks of this size (student + teacher) stay in a 32 KiB L1 data cache.
constexpr int64_t kBlock = 2048;
// Top-k candidates are screened per chunk: one max per chunk decides whether any element of it can
// enter the current top-k, so most of the row never reaches the insertion code.
constexpr int64_t kScreenChunk = 32;
// Elements summed in float before the partial sums are added in double (reduce_pair_block).
constexpr int64_t kSumRun = 64;

// ---- vectorisable float math ---------------------------------------------------------------------

// exp(x) for x <= ~0 (every argument here is a logit minus its row max or lse), written so that a
// loop over it vectorises: Cody-Waite range reduction and a degree-6 polynomial (Cephes expf);
// under 1 ulp on [-87, 0] (checked against double exp over every float there, without FMA).
// Below -87.3 the result is 0 (flush instead of subnormals): exactly 0 for -inf, which is
// what `exp(-inf) * anything = 0` needs. NaN stays NaN.
OPD_ALWAYS_INLINE float exp_nonpositive(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float clamped = x < -87.3f ? -87.3f : (x > 88.0f ? 88.0f : x);
  const float n = (clamped * kLog2e + kRoundMagic) - kRoundMagic;
  const float r = (clamped - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const float two_to_n = std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  const float result = p * two_to_n;
  return x < -87.3f ? 0.0f : (x != x ? x : result);
}

// Fixed-max reduction of one block of a (student, teacher) pair of rows, in the centred form of
// opd::PairSoftmaxState. NaN flags are kept separately because vectorised max ignores NaN.
struct PairBlock {
  // Centred on the raw maxima (opd/online_softmax.h, "Temperature"): merge it with inv_tau.
  opd::PairSoftmaxState state;
  float raw_max_s, raw_max_t;  // maxima of the unscaled logits
  bool nan_s, nan_t;
  // Student max of every kScreenChunk elements: the top-k screen reads these, not the block.
  float chunk_max_s[kBlock / kScreenChunk];
};

OPD_CPU_MULTIVERSION
void reduce_pair_block(const float* s, const float* t, int64_t n, float inv_tau, PairBlock& out) {
  float raw_max_s = -kInf, raw_max_t = -kInf;
  for (int64_t chunk = 0; chunk < n; chunk += kScreenChunk) {
    const int64_t end = std::min(chunk + kScreenChunk, n);
    float chunk_max = -kInf;
#pragma omp simd reduction(max : chunk_max)
    for (int64_t j = chunk; j < end; ++j) chunk_max = s[j] > chunk_max ? s[j] : chunk_max;
    out.chunk_max_s[chunk / kScreenChunk] = chunk_max;
    raw_max_s = std::max(raw_max_s, chunk_max);
  }
  int nan_s = 0, nan_t = 0;
#pragma omp simd reduction(max : raw_max_t) reduction(| : nan_s, nan_t)
  for (int64_t j = 0; j < n; ++j) {
    raw_max_t = t[j] > raw_max_t ? t[j] : raw_max_t;
    nan_s |= s[j] != s[j];
    nan_t |= t[j] != t[j];
  }
  // Distances are taken before scaling, (x - max) / τ: exactly 0 at the max, and no cancellation
  // between two rounded products (or a fused multiply-add) at large |logits|. The state keeps the
  // raw maxima, so merging blocks (with inv_tau) rescales by exact raw differences too.
  const float centre_s = opd::online_softmax_detail::centre(raw_max_s);
  const float centre_t = opd::online_softmax_detail::centre(raw_max_t);
  // Sums of short runs in float (vectorised), runs added in double: the cross terms mix signs and
  // magnitudes up to ~30, and one float accumulator per SIMD lane over a whole block loses up to
  // ~1e-5 of the KL depending on the order of the elements (e.g. a permuted top-k selection).
  double sum_s = 0, sum_t = 0, cross_s = 0, cross_t = 0;
  for (int64_t run = 0; run < n; run += kSumRun) {
    const int64_t end = std::min(run + kSumRun, n);
    float run_sum_s = 0, run_sum_t = 0, run_cross_s = 0, run_cross_t = 0;
#pragma omp simd reduction(+ : run_sum_s, run_sum_t, run_cross_s, run_cross_t)
    for (int64_t j = run; j < end; ++j) {
      const float ls = (s[j] - centre_s) * inv_tau, lt = (t[j] - centre_t) * inv_tau;
      const float es = exp_nonpositive(ls), et = exp_nonpositive(lt);
      const float log_ratio = ls - lt;
      run_sum_s += es;
      run_sum_t += et;
      run_cross_s += es > 0.0f ? es * log_ratio : 0.0f;
      run_cross_t += et > 0.0f ? -et * log_ratio : 0.0f;
    }
    sum_s += run_sum_s;
    sum_t += run_sum_t;
    cross_s += run_cross_s;
    cross_t += run_cross_t;
  }
  out.state = {raw_max_s,
               nan_s ? kNaN : static_cast<float>(sum_s),
               raw_max_t,
               nan_t ? kNaN : static_cast<float>(sum_t),
               static_cast<float>(cross_s),
               static_cast<float>(cross_t)};
  out.raw_max_s = raw_max_s;
  out.raw_max_t = raw_max_t;
  out.nan_s = nan_s;
  out.nan_t = nan_t;
}

}  // namespace
}  // namespace opd_ext::cpu::softmax_blocks
