// Online (single-pass, mergeable) softmax statistics of a student row s and a teacher row t
// (docs/spec.md §1 "Single pass over both rows"), shared by every backend.
//
// Each side keeps a running max m and Z = Σ exp(x - m). The cross terms are kept *centred*:
//   D = Σ exp(s - m_s) · ((s - m_s) - (t - m_t))      (reverse KL)
//   C = Σ exp(t - m_t) · ((t - m_t) - (s - m_s))      (forward KL)
// rather than the B = Σ exp(s - m_s)(s - t) that section starts from. They carry the same information
// (B = D + Z_s·(m_s - m_t)), but with B the finaliser has to cancel B/Z_s against lse_s - lse_t,
// two numbers of the size of the logits: at |logits| ~ 1e4 that cancellation alone costs ~1e-3
// absolute in float32. With D every term is a distance to the row max and
//   KL(p‖q) = D/Z_s - log Z_s + log Z_t
// has no large cancellation left.
//
// Infinities follow docs/spec.md §1: exp(-inf)·anything = 0, so masked (-inf) entries contribute nothing
// and never produce 0·inf = NaN; a teacher -inf where the student has mass makes D = +inf and so
// KL(p‖q) = +inf (the true value); likewise a student -inf under teacher mass makes the forward KL
// +inf. An all -inf side centres at 0 instead of -inf, which keeps every shift finite. A NaN input
// makes Z NaN and every derived statistic of that state NaN. +inf logits are not supported (the
// results are NaN, as with torch.log_softmax).
//
// Both states are plain aggregates: `update` folds in one element, `merge` folds in another state
// (associative and commutative up to rounding), so threads, warps, blocks and vocab-parallel
// ranks can each reduce a slice and combine the results in any tree shape.
//
// Temperature. The statistics of x/τ can be kept centred on the *raw* logits: pass inv_tau = 1/τ
// to every update / merge / lse of the state, feed it raw x, and its max fields hold raw maxima
// while Z, D and C are those of x/τ, every distance taken as (x - centre(max))·inv_tau. Scaling
// first and centring on the max of the rounded products instead costs ~ulp(max/τ) per distance:
// ~1e-3 absolute at |logits| ~ 1e4, where the raw difference is exact. inv_tau = 1 (the default)
// is the plain state, bit for bit.
#pragma once

#include <cmath>

#include "opd/common.h"

namespace opd {

// The element-level rules of both states. Kernels that fold a whole chunk at known maxima (the CPU
// and CUDA token_stats) build states from these directly, so the centring convention here is part
// of the states' definition, not an implementation detail of update/merge.
namespace online_softmax_detail {

// exp((old_max - new_max)·inv_tau) for new_max >= old_max; 1 when equal, which covers two -inf
// maxima.
OPD_HOST_DEVICE float rescale(float old_max, float new_max, float inv_tau = 1.0f) {
  return old_max == new_max ? 1.0f : expf((old_max - new_max) * inv_tau);
}

// The point a side is centred at: its max, or 0 while the side is all -inf (so shifts stay finite).
OPD_HOST_DEVICE float centre(float max) { return max == -INFINITY ? 0.0f : max; }

// exp((x - max)·inv_tau) for one element x <= max; exactly 0 for x = -inf, also when max is -inf.
OPD_HOST_DEVICE float element_weight(float x, float max, float inv_tau = 1.0f) {
  return expf((x - centre(max)) * inv_tau);
}

// weight·value with exp(-inf)·anything = 0: a zero weight wins over an infinite (or NaN from
// -inf - -inf) value.
OPD_HOST_DEVICE float weighted(float weight, float value) { return weight == 0.0f ? 0.0f : weight * value; }

// KL is non-negative; rounding can leave it a few ulp below 0. Keeps NaN.
OPD_HOST_DEVICE float clamp_nonnegative(float kl) { return kl < 0.0f ? 0.0f : kl; }

}  // namespace online_softmax_detail

// Running (m, Z) of one row: log-sum-exp in one pass.
struct SoftmaxState {
  float max = -INFINITY;
  float sum = 0.0f;  // Σ exp(x - max)

  // inv_tau: see "Temperature" in the file comment.
  OPD_HOST_DEVICE void update(float x, float inv_tau = 1.0f) {
    using namespace online_softmax_detail;
    const float new_max = fmaxf(max, x);  // fmaxf ignores NaN; exp(NaN - m) still poisons sum
    sum = rescale(max, new_max, inv_tau) * sum + element_weight(x, new_max, inv_tau);
    max = new_max;
  }

  OPD_HOST_DEVICE void merge(const SoftmaxState& other, float inv_tau = 1.0f) {
    using namespace online_softmax_detail;
    const float new_max = fmaxf(max, other.max);
    sum = rescale(max, new_max, inv_tau) * sum + rescale(other.max, new_max, inv_tau) * other.sum;
    max = new_max;
  }

  OPD_HOST_DEVICE float lse(float inv_tau = 1.0f) const { return max * inv_tau + logf(sum); }
};

// Running statistics of a (student, teacher) row pair; see the file comment for the definitions.
struct PairSoftmaxState {
  float max_s = -INFINITY;
  float sum_s = 0.0f;      // Z_s
  float max_t = -INFINITY;
  float sum_t = 0.0f;      // Z_t
  float cross_s = 0.0f;    // D: student-weighted centred log-ratio
  float cross_t = 0.0f;    // C: teacher-weighted centred log-ratio

  // inv_tau: see "Temperature" in the file comment.
  OPD_HOST_DEVICE void update(float s, float t, float inv_tau = 1.0f) {
    using namespace online_softmax_detail;
    const float new_max_s = fmaxf(max_s, s);
    const float new_max_t = fmaxf(max_t, t);
    const float keep_s = rescale(max_s, new_max_s, inv_tau);
    const float keep_t = rescale(max_t, new_max_t, inv_tau);
    const float e_s = element_weight(s, new_max_s, inv_tau);
    const float e_t = element_weight(t, new_max_t, inv_tau);
    // Re-centring the old terms at the new maxima changes each centred log-ratio by -shift.
    const float shift = ((centre(new_max_s) - centre(max_s)) - (centre(new_max_t) - centre(max_t))) * inv_tau;
    const float log_ratio = (s - centre(new_max_s)) * inv_tau - (t - centre(new_max_t)) * inv_tau;
    cross_s = weighted(keep_s, cross_s - shift * sum_s) + weighted(e_s, log_ratio);
    cross_t = weighted(keep_t, cross_t + shift * sum_t) + weighted(e_t, -log_ratio);
    sum_s = keep_s * sum_s + e_s;
    sum_t = keep_t * sum_t + e_t;
    max_s = new_max_s;
    max_t = new_max_t;
  }

  OPD_HOST_DEVICE void merge(const PairSoftmaxState& other, float inv_tau = 1.0f) {
    using namespace online_softmax_detail;
    const float new_max_s = fmaxf(max_s, other.max_s);
    const float new_max_t = fmaxf(max_t, other.max_t);
    const float keep_s = rescale(max_s, new_max_s, inv_tau), keep_t = rescale(max_t, new_max_t, inv_tau);
    const float other_keep_s = rescale(other.max_s, new_max_s, inv_tau);
    const float other_keep_t = rescale(other.max_t, new_max_t, inv_tau);
    const float centre_s = centre(new_max_s), centre_t = centre(new_max_t);
    const float shift = ((centre_s - centre(max_s)) - (centre_t - centre(max_t))) * inv_tau;
    const float other_shift = ((centre_s - centre(other.max_s)) - (centre_t - centre(other.max_t))) * inv_tau;
    cross_s =
        weighted(keep_s, cross_s - shift * sum_s) + weighted(other_keep_s, other.cross_s - other_shift * other.sum_s);
    cross_t =
        weighted(keep_t, cross_t + shift * sum_t) + weighted(other_keep_t, other.cross_t + other_shift * other.sum_t);
    sum_s = keep_s * sum_s + other_keep_s * other.sum_s;
    sum_t = keep_t * sum_t + other_keep_t * other.sum_t;
    max_s = new_max_s;
    max_t = new_max_t;
  }

  OPD_HOST_DEVICE float lse_s(float inv_tau = 1.0f) const { return max_s * inv_tau + logf(sum_s); }
  OPD_HOST_DEVICE float lse_t(float inv_tau = 1.0f) const { return max_t * inv_tau + logf(sum_t); }

  // KL(p‖q) = Σ p (log p - log q), p = softmax(s), q = softmax(t).
  OPD_HOST_DEVICE float reverse_kl() const {
    return online_softmax_detail::clamp_nonnegative(cross_s / sum_s - logf(sum_s) + logf(sum_t));
  }

  // KL(q‖p) = Σ q (log q - log p).
  OPD_HOST_DEVICE float forward_kl() const {
    return online_softmax_detail::clamp_nonnegative(cross_t / sum_t - logf(sum_t) + logf(sum_s));
  }
};

}  // namespace opd
