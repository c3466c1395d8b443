// Portability macros for the torch-free math headers: the same code compiles for host (CPU
// kernels, GoogleTest) and device (CUDA kernels).
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define OPD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define OPD_HOST_DEVICE inline
#endif
