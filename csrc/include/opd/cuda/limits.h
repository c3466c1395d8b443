// Sizes of the CUDA block top-k that callers outside the kernels must respect. Plain constants,
// free of CUDA and torch headers, so the host-only module (csrc/module.cpp) can report them to
// Python, where the op layer decides when a top-k needs the sorting fallback (docs/spec.md §2).
#pragma once

namespace opd::cuda {

constexpr int kPairPassThreads = 128;
constexpr int kMaxVectorElems = 8;   // 16-byte loads of 2-byte dtypes
constexpr int kTopKCapacity = 2048;  // power of two for the bitonic sort
// A tile appends at most kPairPassThreads * kMaxVectorElems candidates after a compaction left k.
constexpr int kMaxStreamingTopK = kTopKCapacity - kPairPassThreads * kMaxVectorElems;

}  // namespace opd::cuda
