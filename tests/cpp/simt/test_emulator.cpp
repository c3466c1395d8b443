// The SIMT emulator itself: correct kernels run and agree across schedules; deliberately faulty
// kernels (each a fault kind real CUDA code has) must be flagged, naming their source lines.
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "opd/cuda/portability.cuh"

namespace {

using opd::simt::Fault;

// Runs `body`, which must throw a Fault whose message contains every string of `expected`.
template <typename Body>
void expect_fault(Body&& body, const std::vector<std::string>& expected) {
  try {
    body();
  } catch (const Fault& fault) {
    const std::string message = fault.what();
    for (const std::string& part : expected) {
      EXPECT_NE(message.find(part), std::string::npos) << "message lacks '" << part << "': " << message;
    }
    return;
  }
  ADD_FAILURE() << "expected a SIMT emulator fault";
}

template <typename T>
std::string bytes_of(const std::vector<T>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

class Emulator : public ::testing::Test {
 protected:
  void SetUp() override { saved_ = opd::simt::config(); }
  void TearDown() override { opd::simt::config() = saved_; }
  static void use(opd::simt::Schedule s, uint64_t seed = 0) {
    opd::simt::config().schedule = s;
    opd::simt::config().seed = seed;
  }
  opd::simt::Config saved_;
};

// ---- correct kernels -----------------------------------------------------------------------------

__global__ void write_ids(int* out) {
  const int i = blockIdx.y * gridDim.x * blockDim.x + blockIdx.x * blockDim.x + threadIdx.x;
  out[i] = i * 10 + static_cast<int>(threadIdx.y);
}

TEST_F(Emulator, EveryThreadOfEveryBlockRuns) {
  for (auto s : {opd::simt::Schedule::forward, opd::simt::Schedule::reverse, opd::simt::Schedule::random}) {
    use(s, 3);
    std::vector<int> out(3 * 2 * 64, -1);
    ASSERT_EQ(opd::cuda::launch(write_ids, dim3(3, 2), dim3(64), 0, nullptr, out.data()), cudaSuccess);
    for (int i = 0; i < static_cast<int>(out.size()); ++i) EXPECT_EQ(out[i], i * 10);
  }
}

// Block sum: shared partials, a barrier, a tree with a barrier per level, a warp shuffle finish.
__global__ void block_sum(const float* in, float* out) {
  OPD_SHARED(float[256], partial);
  const int t = threadIdx.x;
  partial[t] = in[blockIdx.x * blockDim.x + t];
  __syncthreads();
  for (int half = blockDim.x / 2; half >= 32; half /= 2) {
    if (t < half) partial[t] += partial[t + half];
    __syncthreads();
  }
  if (t < 32) {
    float v = partial[t];
    for (int mask = 16; mask > 0; mask /= 2) v += __shfl_xor_sync(0xffffffffu, v, mask);
    if (t == 0) out[blockIdx.x] = v;
  }
}

TEST_F(Emulator, CorrectReductionAgreesAcrossSchedules) {
  std::vector<float> in(4 * 256);
  for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<float>(i % 7) - 3.0f;
  opd::simt::check_schedules_agree([&] {
    std::vector<float> out(4, 0.0f);
    EXPECT_EQ(opd::cuda::launch(block_sum, dim3(4), dim3(256), 0, nullptr, in.data(), out.data()), cudaSuccess);
    return bytes_of(out);
  });
  std::vector<float> out(4);
  ASSERT_EQ(opd::cuda::launch(block_sum, dim3(4), dim3(256), 0, nullptr, in.data(), out.data()), cudaSuccess);
  for (int b = 0; b < 4; ++b) {
    float expected = 0;
    for (int i = 0; i < 256; ++i) expected += in[b * 256 + i];
    EXPECT_EQ(out[b], expected);
  }
}

__global__ void warp_intrinsics(int* out) {
  const int lane = threadIdx.x % 32;
  out[threadIdx.x * 4 + 0] = __shfl_down_sync(0xffffffffu, lane, 3);
  out[threadIdx.x * 4 + 1] = __shfl_up_sync(0xffffffffu, lane, 1, 8);
  out[threadIdx.x * 4 + 2] = __shfl_sync(0xffffffffu, lane, 5);
  out[threadIdx.x * 4 + 3] = static_cast<int>(__ballot_sync(0xffffffffu, lane % 3 == 0));
}

TEST_F(Emulator, WarpIntrinsicsFollowCudaSemantics) {
  std::vector<int> out(64 * 4);
  ASSERT_EQ(opd::cuda::launch(warp_intrinsics, dim3(1), dim3(64), 0, nullptr, out.data()), cudaSuccess);
  unsigned ballot = 0;
  for (int l = 0; l < 32; l += 3) ballot |= 1u << l;
  for (int t = 0; t < 64; ++t) {
    const int lane = t % 32;
    EXPECT_EQ(out[t * 4 + 0], lane + 3 < 32 ? lane + 3 : lane);
    EXPECT_EQ(out[t * 4 + 1], lane % 8 >= 1 ? lane - 1 : lane);
    EXPECT_EQ(out[t * 4 + 2], 5);
    EXPECT_EQ(static_cast<unsigned>(out[t * 4 + 3]), ballot);
  }
}

__global__ void atomic_count(int* counter) { atomicAdd(counter, 1); }

TEST_F(Emulator, AtomicsAreExact) {
  use(opd::simt::Schedule::random, 7);
  int counter = 0;
  ASSERT_EQ(opd::cuda::launch(atomic_count, dim3(5), dim3(96), 0, nullptr, &counter), cudaSuccess);
  EXPECT_EQ(counter, 5 * 96);
}

__global__ void read_fresh_shared(unsigned char* out) {
  OPD_SHARED(unsigned char[8], fresh);
  out[threadIdx.x] = fresh[threadIdx.x];
}

TEST_F(Emulator, SharedMemoryStartsPoisoned) {
  for (auto s : {opd::simt::Schedule::forward, opd::simt::Schedule::reverse}) {
    use(s);
    std::vector<unsigned char> out(8, 0);
    ASSERT_EQ(opd::cuda::launch(read_fresh_shared, dim3(1), dim3(8), 0, nullptr, out.data()), cudaSuccess);
    for (unsigned char b : out) EXPECT_EQ(b, opd::simt::poison_byte());
  }
}

TEST_F(Emulator, InvalidConfigurationsAreErrorsNotFaults) {
  int counter = 0;
  EXPECT_EQ(opd::cuda::launch(atomic_count, dim3(1), dim3(2048), 0, nullptr, &counter), cudaErrorInvalidConfiguration);
  EXPECT_EQ(opd::cuda::launch(atomic_count, dim3(1, 70000), dim3(32), 0, nullptr, &counter),
            cudaErrorInvalidConfiguration);
  EXPECT_EQ(counter, 0);
}

TEST_F(Emulator, DeviceProfilesGiveOccupancy) {
  EXPECT_EQ(opd::simt::device_profile("h100").sm_count, 132);
  EXPECT_EQ(opd::simt::device_profile("a100").sm_count, 108);
  EXPECT_EQ(opd::simt::device_profile("l4").sm_count, 58);
  // 64 registers per thread: 65536 / (64 * 256) = 4 blocks of 256 threads, 8 of 128.
  EXPECT_EQ(opd::simt::device_profile("h100").max_active_blocks(256, 0), 4);
  EXPECT_EQ(opd::simt::device_profile("h200").max_active_blocks(128, 0), 8);
  EXPECT_THROW(opd::simt::device_profile("v100x"), std::invalid_argument);
  opd::simt::config().device = opd::simt::device_profile("l4");
  int sms = 0, blocks = 0;
  ASSERT_EQ(opd::cuda::multiprocessor_count(&sms), cudaSuccess);
  ASSERT_EQ(opd::cuda::max_active_blocks_per_sm(&blocks, block_sum, 256, 0), cudaSuccess);
  EXPECT_EQ(sms, 58);
  EXPECT_EQ(blocks, 4);
}

__global__ void throws_from_kernel(int*) {
  if (threadIdx.x == 5) throw std::runtime_error("kernel-side error");
  __syncthreads();
}

TEST_F(Emulator, ExceptionsInKernelCodeReachTheCaller) {
  EXPECT_THROW(opd::cuda::launch(throws_from_kernel, dim3(2), dim3(32), 0, nullptr, nullptr), std::runtime_error);
  // The emulator is usable afterwards.
  int counter = 0;
  EXPECT_EQ(opd::cuda::launch(atomic_count, dim3(1), dim3(32), 0, nullptr, &counter), cudaSuccess);
  EXPECT_EQ(counter, 32);
}

// ---- faulty kernels: each must be flagged ---------------------------------------------------------

// Reads the neighbour's shared write without a barrier in between.
__global__ void neighbour_without_barrier(int* out) {
  OPD_SHARED(int[128], values);
  values[threadIdx.x] = static_cast<int>(threadIdx.x) * 3;
  out[threadIdx.x] = values[(threadIdx.x + 1) % blockDim.x];  // missing __syncthreads()
}

TEST_F(Emulator, FlagsASharedReadWithoutBarrier) {
  expect_fault(
      [] {
        opd::simt::check_schedules_agree([] {
          std::vector<int> out(128);
          EXPECT_EQ(opd::cuda::launch(neighbour_without_barrier, dim3(1), dim3(128), 0, nullptr, out.data()),
                    cudaSuccess);
          return bytes_of(out);
        });
      },
      {"outputs differ between", "schedules"});
}

// The kind of fault of a streaming top-k: after a barrier every thread reads a shared count to
// decide whether to compact, but threads that decided first already append (atomicAdd) to it, so
// a late thread decides differently and reaches a different barrier.
constexpr int kCapacity = 64;
__global__ void decision_after_atomics(int* out) {
  OPD_SHARED(int, count);
  if (threadIdx.x == 0) count = 0;
  __syncthreads();
  for (int tile = 0; tile < 4; ++tile) {
    __syncthreads();
    if (count + static_cast<int>(blockDim.x) > kCapacity) {  // read while others may be adding
      __syncthreads();
      if (threadIdx.x == 0) count = 0;
      __syncthreads();
    }
    atomicAdd(&count, 1);
  }
  out[threadIdx.x] = count;
}

TEST_F(Emulator, FlagsADecisionReadAfterOthersAtomics) {
  for (auto s : {opd::simt::Schedule::forward, opd::simt::Schedule::reverse, opd::simt::Schedule::random}) {
    use(s, 11);
    std::vector<int> out(48);
    expect_fault([&] { opd::cuda::launch(decision_after_atomics, dim3(1), dim3(48), 0, nullptr, out.data()); },
                 {"divergent __syncthreads", "test_emulator.cpp:"});
  }
}

// Thread 0 publishes a block result that the others read without waiting for it.
__global__ void block_result_without_barrier(const int* in, int* out) {
  OPD_SHARED(int, total);
  if (threadIdx.x == 0) {
    int sum = 0;
    for (unsigned i = 0; i < blockDim.x; ++i) sum += in[i];
    total = sum;
  }
  // missing __syncthreads()
  out[threadIdx.x] = in[threadIdx.x] * 100 / (total == 0 ? 1 : total);
}

TEST_F(Emulator, FlagsAMissingBarrierBeforeABlockResult) {
  std::vector<int> in(64);
  for (int i = 0; i < 64; ++i) in[i] = i + 1;
  expect_fault(
      [&] {
        opd::simt::check_schedules_agree([&] {
          std::vector<int> out(64);
          EXPECT_EQ(
              opd::cuda::launch(block_result_without_barrier, dim3(1), dim3(64), 0, nullptr, in.data(), out.data()),
              cudaSuccess);
          return bytes_of(out);
        });
      },
      {"outputs differ"});
}

__global__ void barrier_in_divergent_branch(int*) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

TEST_F(Emulator, FlagsDivergentBarriersWithBothSites) {
  expect_fault([] { opd::cuda::launch(barrier_in_divergent_branch, dim3(1), dim3(64), 0, nullptr, nullptr); },
               {"divergent __syncthreads", "16 thread(s) [0-15]", "48 thread(s) [16-63]", "test_emulator.cpp:"});
}

__global__ void early_exit_then_barrier(int*) {
  if (threadIdx.x == 3) return;
  __syncthreads();
}

TEST_F(Emulator, FlagsABarrierAfterSomeThreadsExited) {
  expect_fault([] { opd::cuda::launch(early_exit_then_barrier, dim3(1), dim3(32), 0, nullptr, nullptr); },
               {"waits for threads that have exited", "[3] exited"});
}

__global__ void shuffle_mask_without_self(int* out) {
  out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, static_cast<int>(threadIdx.x), 1);
}

TEST_F(Emulator, FlagsAWarpMaskThatExcludesTheCaller) {
  std::vector<int> out(32);
  expect_fault([&] { opd::cuda::launch(shuffle_mask_without_self, dim3(1), dim3(32), 0, nullptr, out.data()); },
               {"__shfl_xor_sync", "excludes the calling lane"});
}

__global__ void shuffle_after_partner_exited(int* out) {
  if (threadIdx.x % 2 == 1) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

TEST_F(Emulator, FlagsAShuffleWhoseLanesExited) {
  std::vector<int> out(32);
  expect_fault([&] { opd::cuda::launch(shuffle_after_partner_exited, dim3(1), dim3(32), 0, nullptr, out.data()); },
               {"__shfl_xor_sync"});
}

__global__ void shuffle_names_absent_lanes(int* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

TEST_F(Emulator, FlagsAWarpMaskNamingLanesBeyondThePartialWarp) {
  std::vector<int> out(48);  // warp 1 has 16 threads: a full mask names 16 lanes that do not exist
  expect_fault([&] { opd::cuda::launch(shuffle_names_absent_lanes, dim3(1), dim3(48), 0, nullptr, out.data()); },
               {"names lanes beyond the 16 threads of warp 1"});
}

__global__ void shuffle_outside_mask(int* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_down_sync(0x0000ffffu, static_cast<int>(threadIdx.x), 8);
}

TEST_F(Emulator, FlagsAShuffleReadingALaneOutsideTheMask) {
  std::vector<int> out(32);
  expect_fault([&] { opd::cuda::launch(shuffle_outside_mask, dim3(1), dim3(32), 0, nullptr, out.data()); },
               {"which is not in the mask"});
}

__global__ void warp_ops_at_different_sites(int* out) {
  int v = static_cast<int>(threadIdx.x);
  if (threadIdx.x < 16) {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  } else {
    v = __shfl_xor_sync(0xffffffffu, v, 2);
  }
  out[threadIdx.x] = v;
}

TEST_F(Emulator, FlagsDivergentWarpIntrinsics) {
  std::vector<int> out(32);
  expect_fault([&] { opd::cuda::launch(warp_ops_at_different_sites, dim3(1), dim3(32), 0, nullptr, out.data()); },
               {"divergent warp intrinsics"});
}

__global__ void warp_waits_for_block(int* out) {
  if (threadIdx.x < 32) {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
  } else {
    __syncthreads();
  }
}

TEST_F(Emulator, FlagsADeadlockNamingEverySite) {
  std::vector<int> out(64);
  // Warp 0 completes its shuffle and exits; warp 1 then waits at a barrier for exited threads.
  expect_fault([&] { opd::cuda::launch(warp_waits_for_block, dim3(1), dim3(64), 0, nullptr, out.data()); },
               {"__syncthreads", "exited"});
}

__global__ void half_warp_at_barrier(int* out) {
  if (threadIdx.x % 32 < 16) {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 16);
  }
  __syncthreads();
}

TEST_F(Emulator, FlagsAShuffleWaitingForLanesAtABarrier) {
  std::vector<int> out(32);
  expect_fault([&] { opd::cuda::launch(half_warp_at_barrier, dim3(1), dim3(32), 0, nullptr, out.data()); },
               {"deadlock", "__shfl_xor_sync", "__syncthreads"});
}

__global__ void misaligned_vector_load(const float* in, float* out) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(in + 1));
  float v[4];
  memcpy(v, &raw, sizeof(raw));
  out[threadIdx.x] = v[0];
}

TEST_F(Emulator, FlagsAMisalignedVectorLoad) {
  alignas(16) float in[8] = {};
  float out[1];
  expect_fault([&] { opd::cuda::launch(misaligned_vector_load, dim3(1), dim3(1), 0, nullptr, in, out); },
               {"misaligned 16-byte access", "test_emulator.cpp:"});
}

__global__ void too_much_shared(int* out) {
  OPD_SHARED(float[16384], big);  // 64 KiB of static shared memory: over the 48 KiB limit
  big[threadIdx.x] = 1.0f;
  out[threadIdx.x] = static_cast<int>(big[threadIdx.x]);
}

TEST_F(Emulator, FlagsSharedMemoryBeyondTheBlockLimit) {
  std::vector<int> out(32);
  expect_fault([&] { opd::cuda::launch(too_much_shared, dim3(1), dim3(32), 0, nullptr, out.data()); },
               {"bytes of shared memory"});
}

}  // namespace
