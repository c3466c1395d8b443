// Small pieces every kernel header of opd/cuda shares: constants, the fast exp, and the carving of
// a caller-provided workspace.
#pragma once

#include "opd/cuda/portability.cuh"

#include <cstddef>
#include <cstdint>
#include <limits>

namespace opd::cuda {

constexpr int kWarpThreads = 32;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// e^x as ex2.approx.ftz(x·log2 e): two instructions, where __expf adds a denormal fix-up. Results
// below 2^-126 flush to 0 (the CPU kernels' exp flushes below e^-87.3); e^-inf = 0, NaN stays NaN.
OPD_DEVICE_INLINE float fast_exp(float x) { return fast_exp2(x * 1.44269504088896341f); }

// Hands out typed arrays from one workspace, each at a multiple of kWorkspaceAlignment bytes from
// its start (vector and atomic accesses stay aligned). With a null base it only adds up the bytes,
// so a size query and its launcher run the very same carve and cannot disagree.
constexpr size_t kWorkspaceAlignment = 256;

class WorkspaceCarver {
 public:
  explicit WorkspaceCarver(void* base = nullptr) : base_(static_cast<unsigned char*>(base)) {}

  template <typename T>
  T* take(int64_t count) {
    offset_ = (offset_ + kWorkspaceAlignment - 1) / kWorkspaceAlignment * kWorkspaceAlignment;
    T* out = base_ == nullptr ? nullptr : reinterpret_cast<T*>(base_ + offset_);
    offset_ += static_cast<size_t>(count) * sizeof(T);
    return out;
  }

  size_t bytes() const { return offset_; }

 private:
  unsigned char* base_;
  size_t offset_ = 0;
};

// A launcher's check of the workspace it was given against what its own carve needs.
inline cudaError_t check_workspace(const void* workspace, size_t workspace_bytes, size_t needed) {
  if (needed == 0) return cudaSuccess;
  if (workspace == nullptr || workspace_bytes < needed) return cudaErrorInvalidValue;
  if (reinterpret_cast<uintptr_t>(workspace) % 16 != 0) return cudaErrorInvalidValue;
  return cudaSuccess;
}

}  // namespace opd::cuda
