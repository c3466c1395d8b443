// Every operator schema of opd_ext, in one place. Kernels register themselves per backend with
// TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda; each op's Python wrapper and fake (meta) kernel live
// side by side in opd_ext/ops.py, the autograd of the losses in opd_ext/objective.py.
//
// Conventions: logits are [..., V] (float32 / bfloat16 / float16, or float32 on one side with
// bfloat16 / float16 on the other), flattened to rows internally; every per-row output is float32 with the
// leading shape [...]. A NaN anywhere in a row makes that row's outputs NaN and no other row's.
//
// The schemas are defined by a function so that the SIMT emulator's test library (opd_ext_emu,
// csrc/simt/module.cpp) registers the very same signatures; csrc/ops.cpp is the one
// TORCH_LIBRARY(opd_ext) block.
#pragma once

#include <torch/library.h>

namespace opd_ext {

inline void define_op_schemas(torch::Library& m) {
  // ---- top-k overlap (docs/spec.md §1 "Top-k overlap") ------------------------------------------------
  // |TopK(s) ∩ TopK(t)| / k, ties to the lower index.
  m.def("topk_overlap(Tensor student_logits, Tensor teacher_logits, int k) -> Tensor");

  // ---- token statistics and the vOPD / reverse-KL losses (docs/spec.md §1) ------------------------------
  // One pass over both rows (logits divided by `temperature`). `tokens` is int64 [...] with ids
  // in [0, V). topk_reverse_kl is the vOPD top-k baseline KL over the student's top-`topk` ids
  // (both distributions renormalised there); with topk == 0 it is not computed and is empty [0].
  m.def(
      "token_stats(Tensor student_logits, Tensor teacher_logits, Tensor tokens, float temperature, "
      "int topk) -> (Tensor student_logprob, Tensor teacher_logprob, Tensor reverse_kl, "
      "Tensor forward_kl, Tensor topk_reverse_kl, Tensor student_lse, Tensor teacher_lse)");
  // The raw online-softmax state of each row pair (opd/online_softmax.h, PairSoftmaxState at
  // inv_tau = 1/temperature): float32 [..., 6] = (max_s, Z_s, max_t, Z_t, D, C), maxima of the raw
  // logits. States of slices of a row merge associatively into the state of the row, so ranks that
  // each hold a vocabulary shard exchange 6 floats per row instead of V (opd_ext.distributed).
  m.def("pair_softmax_state(Tensor student_logits, Tensor teacher_logits, float temperature) -> Tensor");
  // The student half alone, for teachers served as top-k log-probs (vLLM / SGLang).
  m.def(
      "student_stats(Tensor student_logits, Tensor tokens, float temperature) "
      "-> (Tensor student_logprob, Tensor student_lse)");
  // d/ds of coef * log p(y): grad[r, j] = coef[r] * (1[j == y_r] - p[r, j]) / temperature. A token
  // of -1 means y lies outside these logits (a vocabulary shard): grad = -coef * p / temperature.
  // Returned in student_logits' dtype. Serves the vOPD surrogate (coef = -w A / norm * grad_out).
  m.def(
      "policy_gradient_backward(Tensor coef, Tensor student_logits, Tensor tokens, "
      "Tensor student_lse, float temperature) -> Tensor");
  // d/ds of coef * KL(p||q): grad[r, j] = coef[r] * p[r,j] * (log p[r,j] - log q[r,j] - KL[r]) / temperature.
  m.def(
      "reverse_kl_backward(Tensor coef, Tensor student_logits, Tensor teacher_logits, "
      "Tensor student_lse, Tensor teacher_lse, Tensor reverse_kl, float temperature) -> Tensor");

  // ---- Prune-OPD drift tracking (docs/spec.md §1 "Prune-OPD drift tracking") ----------------------------
  // One state machine (csrc/include/opd/drift.h) over per-sequence state tensors [B], updated in
  // place: ema f32, weight f32, drift_run i32, drift_events i32, length i32, stop_reason i8
  // (0 = running, see opd::DriftStopReason); budget i32 is read only. Rows that have stopped are
  // never updated. Config scalars: decay > 0 selects the exponential schedule, patience == 0
  // disables it, a sequence stops once weight <= min_weight (negative: never).
  //
  // Decode step: logits [A, V] of the active rows; `rows` (int64 [A], distinct) maps them to state
  // rows (None: A == B, in order). One pass over both rows gives the top-k overlap and, when
  // `tokens` (int64 [A]) is given, the sampled token's log-probs and KL(p||q) at `temperature`
  // (otherwise those three outputs are empty [0]). Returns per active row the overlap, the
  // token's reward multiplier (0 if the row had already stopped) and the stop mask.
  m.def(
      "drift_step(Tensor student_logits, Tensor teacher_logits, Tensor? tokens, Tensor? rows, "
      "Tensor(a!) ema, Tensor(b!) weight, Tensor(c!) drift_run, Tensor(d!) drift_events, "
      "Tensor(e!) length, Tensor(f!) stop_reason, Tensor budget, int k, float temperature, "
      "float ema_beta, float threshold, int warmup, float w_drop, float decay, float w_base, "
      "int patience, float min_weight) -> (Tensor overlap, Tensor multiplier, Tensor stopped, "
      "Tensor student_logprob, Tensor teacher_logprob, Tensor reverse_kl)");
  // Whole sequences: overlaps f32 [B, T] token by token (positions where `mask` is false are
  // skipped), exactly as T decode steps. Returns per token the multiplier and the weight after it
  // (f32 [B, T], 0 where skipped or after the stop) and the position at which each row stopped
  // (int64 [B], -1 if it did not stop in this call).
  m.def(
      "drift_scan(Tensor overlaps, Tensor? mask, Tensor(a!) ema, Tensor(b!) weight, "
      "Tensor(c!) drift_run, Tensor(d!) drift_events, Tensor(e!) length, Tensor(f!) stop_reason, "
      "Tensor budget, float ema_beta, float threshold, int warmup, float w_drop, float decay, "
      "float w_base, int patience, float min_weight) "
      "-> (Tensor multipliers, Tensor weights, Tensor stop_position)");
}

}  // namespace opd_ext
