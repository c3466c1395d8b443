// The one place where compiling the CUDA kernels with nvcc and compiling them as host C++ for the
// SIMT emulator (csrc/simt) differ. Kernel headers in opd/cuda/ include this first and then use:
//
// * CUDA's own names for the standard intrinsics: threadIdx / blockIdx / blockDim / gridDim,
//   __syncthreads, __syncwarp, __shfl_{xor,down,up,}_sync, __ballot_sync, __any_sync, __all_sync,
//   atomicAdd / atomicMax / atomicMin / atomicExch / atomicCAS, __ldg, __ldcs, __stcs,
//   __fmul_rn, __fadd_rn, __int_as_float, __float_as_int, __uint_as_float, __float_as_uint.
//   Under the emulator they are host functions (the synchronising ones as macros that record the
//   call's file:line, so a divergent barrier names both sites);
// * OPD_SHARED(type, name) instead of `__shared__ type name` (arrays too: OPD_SHARED(float[32], x);
//   per-block storage, poisoned in the emulator), OPD_NOINLINE instead of __noinline__ (a name
//   glibc's own attributes use);
// * opd::cuda::fast_exp2, launch(), multiprocessor_count(), max_active_blocks_per_sm(),
//   stream_is_capturing(), error_string() for what CUDA has no portable spelling of.
//
// Kernel code never reinterprets memory through a pointer of another type: a vector load is a
// `__ldg`/`__ldcs` of a uint4 (or uint2/uint) followed by a memcpy into the element array.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#if defined(__CUDACC__)

#include <cuda_runtime.h>

#define OPD_SHARED(type, name) __shared__ std::type_identity_t<type> name
#define OPD_NOINLINE __noinline__
#define OPD_DEVICE __device__
#define OPD_DEVICE_INLINE __device__ __forceinline__

namespace opd::cuda {

// e^(x ln 2) in two instructions: ex2.approx.ftz (results below 2^-126 flush to 0, ex2(-inf) = 0,
// NaN stays NaN). About 2 ulp on the arguments that matter.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// kernel<<<grid, block, shared_bytes, stream>>>(args...), reporting a bad configuration the way
// the runtime does (as an error code, not an exception).
template <typename... Params, typename... Args>
inline cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
                          Args&&... args) {
  kernel<<<grid, block, shared_bytes, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
}

inline cudaError_t multiprocessor_count(int* count) {
  int device = 0;
  if (const cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
  return cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount, device);
}

template <typename... Params>
inline cudaError_t max_active_blocks_per_sm(int* blocks, void (*kernel)(Params...), int block_threads,
                                            size_t shared_bytes) {
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, kernel, block_threads, shared_bytes);
}

inline cudaError_t stream_is_capturing(cudaStream_t stream, bool* capturing) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  const cudaError_t e = cudaStreamIsCapturing(stream, &status);
  *capturing = status != cudaStreamCaptureStatusNone;
  return e;
}

inline const char* error_string(cudaError_t e) { return cudaGetErrorString(e); }

}  // namespace opd::cuda

#elif defined(OPD_SIMT_EMULATOR)

#include "simt/simt.h"  // defines the CUDA names above as host code

#define OPD_SHARED(type, name) \
  std::type_identity_t<type>& name = ::opd::simt::block_shared<std::type_identity_t<type>>(OPD_SIMT_SHARED_KEY)
#define OPD_NOINLINE __attribute__((noinline))
#define OPD_DEVICE
#define OPD_DEVICE_INLINE inline

namespace opd::cuda {

// ex2.approx.ftz modelled by the correctly rounded exp2 with the flush to zero below 2^-126.
inline float fast_exp2(float x) {
  const float y = exp2f(x);
  return y < std::numeric_limits<float>::min() ? 0.0f * y : y;  // keeps NaN
}

template <typename... Params, typename... Args>
inline cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t,
                          Args&&... args) {
  // Parameters are copied at launch, as the hardware does: the emulated threads must not see
  // later changes of the host's variables.
  return ::opd::simt::launch(
      grid, block, shared_bytes,
      [kernel, ... params = static_cast<Params>(std::forward<Args>(args))]() { kernel(params...); });
}

inline cudaError_t multiprocessor_count(int* count) {
  *count = ::opd::simt::device().sm_count;
  return cudaSuccess;
}

template <typename... Params>
inline cudaError_t max_active_blocks_per_sm(int* blocks, void (*)(Params...), int block_threads, size_t shared_bytes) {
  *blocks = ::opd::simt::device().max_active_blocks(block_threads, shared_bytes);
  return cudaSuccess;
}

inline cudaError_t stream_is_capturing(cudaStream_t, bool* capturing) {
  *capturing = false;
  return cudaSuccess;
}

inline const char* error_string(cudaError_t e) { return ::opd::simt::error_string(e); }

}  // namespace opd::cuda

#else
#error "opd/cuda/portability.cuh: compile with nvcc, or as host C++ with OPD_SIMT_EMULATOR defined"
#endif
