// Torch-side helpers shared by the CPU and CUDA bindings: dtype dispatch over the supported
// (student, teacher) logit pairs and the argument guards every kernel entry repeats.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <utility>

namespace opd_ext {

namespace detail {

// The dispatch itself; kMixedFloatStudent = false leaves out the (float32, low-precision) pairs for
// callers that never pass them, so their kernels are not compiled.
template <bool kMixedFloatStudent, typename Fn>
decltype(auto) dispatch_logit_pair(c10::ScalarType student, c10::ScalarType teacher, const char* op, Fn&& fn) {
  using c10::ScalarType;
  if (student == teacher) {
    switch (student) {
      case ScalarType::Float: return fn.template operator()<float, float>();
      case ScalarType::BFloat16: return fn.template operator()<c10::BFloat16, c10::BFloat16>();
      case ScalarType::Half: return fn.template operator()<c10::Half, c10::Half>();
      default: break;
    }
  } else if (teacher == ScalarType::Float) {
    if (student == ScalarType::BFloat16) return fn.template operator()<c10::BFloat16, float>();
    if (student == ScalarType::Half) return fn.template operator()<c10::Half, float>();
  } else if (student == ScalarType::Float) {
    if constexpr (kMixedFloatStudent) {
      if (teacher == ScalarType::BFloat16) return fn.template operator()<float, c10::BFloat16>();
      if (teacher == ScalarType::Half) return fn.template operator()<float, c10::Half>();
    }
  }
  TORCH_CHECK(false, op, ": unsupported dtypes student_logits=", student, ", teacher_logits=", teacher,
              "; supported: float32/bfloat16/float16 pairs of one dtype, or float32 on one "
              "side with bfloat16/float16 on the other. Cast one side to match.");
}

}  // namespace detail

// Supported pairs: both the same floating dtype, or float32 beside a bfloat16/float16 row on either
// side (a bf16 policy scored by an fp32 teacher, or an fp32 student beside a bf16 teacher: upcasting
// either would materialise a float32 copy of a [N, V] tensor). bf16 beside fp16 asks for a cast.
template <typename Fn>
decltype(auto) dispatch_logit_pair(c10::ScalarType student, c10::ScalarType teacher, const char* op, Fn&& fn) {
  return detail::dispatch_logit_pair<true>(student, teacher, op, std::forward<Fn>(fn));
}

// For ops symmetric in their two rows (top-k overlap): a float32 student beside a low-precision
// teacher runs the (low-precision, float32) kernels with the rows exchanged, which gives the same
// result bit for bit and compiles no kernels for the mirrored pairs. `fn.template operator()<A,
// B>(first, second)` receives the rows in the order the kernels take them (A first).
template <typename Fn>
decltype(auto) dispatch_symmetric_logit_pair(const at::Tensor& student, const at::Tensor& teacher, const char* op,
                                             Fn&& fn) {
  const bool exchange =
      student.scalar_type() == c10::ScalarType::Float &&
      (teacher.scalar_type() == c10::ScalarType::BFloat16 || teacher.scalar_type() == c10::ScalarType::Half);
  const at::Tensor& first = exchange ? teacher : student;
  const at::Tensor& second = exchange ? student : teacher;
  // Exchanged dtypes are always a supported pair, so an error names the caller's own order.
  return detail::dispatch_logit_pair<false>(
      first.scalar_type(), second.scalar_type(), op,
      [&]<typename A, typename B>() { return fn.template operator()<A, B>(first, second); });
}

// The one-dtype counterpart of dispatch_logit_pair, for ops that read the student alone.
template <typename Fn>
decltype(auto) dispatch_student_logits(c10::ScalarType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case c10::ScalarType::Float: return fn.template operator()<float>();
    case c10::ScalarType::BFloat16: return fn.template operator()<c10::BFloat16>();
    case c10::ScalarType::Half: return fn.template operator()<c10::Half>();
    default: break;
  }
  TORCH_CHECK(false, op, ": student_logits must be float32, bfloat16 or float16, got ", dtype);
}

// Guards for a [rows, V] view of two logit tensors; the Python wrappers give friendlier errors
// first, these protect direct torch.ops calls.
inline void check_logit_pair(const char* op, const at::Tensor& student, const at::Tensor& teacher) {
  TORCH_CHECK(student.dim() >= 1, op, ": student_logits must have a vocabulary dimension");
  TORCH_CHECK(student.sizes() == teacher.sizes(), op, ": student_logits ", student.sizes(), " and teacher_logits ",
              teacher.sizes(), " must have the same shape");
  TORCH_CHECK(student.device() == teacher.device(), op, ": student_logits on ", student.device(),
              " but teacher_logits on ", teacher.device());
  TORCH_CHECK(student.size(-1) > 0, op, ": the vocabulary dimension is empty");
  TORCH_CHECK(student.size(-1) <= INT32_MAX, op, ": vocabulary larger than 2^31 is not supported");
}

// [..., V] -> [rows, V] with a unit stride along V and any row stride, without copying when the
// rows are evenly spaced (e.g. logits[..., :V'] sliced to a shared vocabulary). Kernels index
// row r at data + r * stride(0).
inline at::Tensor as_rows(const at::Tensor& logits) {
  at::Tensor rows = logits.reshape({-1, logits.size(-1)});
  if (rows.stride(1) != 1 || (rows.size(0) > 1 && rows.stride(0) < rows.size(1))) rows = rows.contiguous();
  return rows;
}

// at::parallel_for grain (in rows) for CPU kernels that cost ~`row_length` element operations per
// row: a task gets at least ~2^18 elements (~0.1 ms), so decode-sized batches run on the calling
// thread instead of paying the wake-up of the OpenMP pool, which is larger than their whole cost.
inline int64_t cpu_rows_per_task(int64_t row_length) {
  constexpr int64_t kMinElementsPerTask = int64_t{1} << 18;
  return std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(1, row_length));
}

}  // namespace opd_ext
