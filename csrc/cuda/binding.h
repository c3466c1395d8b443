// What differs between the two builds of a binding in csrc/cuda: with nvcc it is the CUDA backend
// of opd_ext; compiled as host C++ with OPD_SIMT_EMULATOR (through a wrapper .cpp, csrc/simt) it is
// the CPU backend of the test library opd_ext_emu, whose kernels run on the SIMT emulator over CPU
// tensors. The bindings themselves only check, allocate, dispatch, launch and check the result.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/Device.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

#if !defined(OPD_SIMT_EMULATOR)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "opd/cuda/portability.cuh"

#if defined(OPD_SIMT_EMULATOR)
#define OPD_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(opd_ext_emu, CPU, m)
#else
#define OPD_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(opd_ext, CUDA, m)
#endif

namespace opd_ext::cuda_binding {

#if defined(OPD_SIMT_EMULATOR)
// The emulator has one (host) device.
class DeviceGuard {
 public:
  explicit DeviceGuard(const c10::Device&) {}
};
inline cudaStream_t current_stream() { return nullptr; }
#else
using DeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }
#endif

// Raises for a failed launch (or a configuration the launcher rejected), naming the op.
inline void check_cuda(cudaError_t error, const char* op) {
  TORCH_CHECK(error == cudaSuccess, op, ": CUDA error: ", opd::cuda::error_string(error));
}

// Under the emulator, memory the kernels are meant to overwrite starts as the schedule's poison
// byte, so an element nobody wrote shows up (as a schedule difference or a NaN) instead of
// silently reading the allocator's leftovers.
inline at::Tensor poisoned(at::Tensor tensor) {
#if defined(OPD_SIMT_EMULATOR)
  if (tensor.numel() > 0) std::memset(tensor.mutable_data_ptr(), opd::simt::poison_byte(), tensor.nbytes());
#endif
  return tensor;
}

// An output the kernels write in full.
inline at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return poisoned(at::empty(sizes, options));
}

// A workspace of `bytes` on the device of `like` (stream-ordered on CUDA: the caching allocator
// does not hand it out again before the kernels queued on this stream ran). A kernel layer
// launcher never relies on its contents; `zeroed` is for one that would.
inline at::Tensor workspace(size_t bytes, const at::Tensor& like, bool zeroed = false) {
  const auto options = like.options().dtype(at::kByte);
  const int64_t size = static_cast<int64_t>(bytes);
  return zeroed ? at::zeros({size}, options) : empty({size}, options);
}

inline void* workspace_ptr(at::Tensor& workspace) {
  return workspace.numel() > 0 ? workspace.mutable_data_ptr() : nullptr;
}

}  // namespace opd_ext::cuda_binding
