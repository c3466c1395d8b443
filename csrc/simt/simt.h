// A SIMT emulator that runs CUDA kernel source on the host, to test the kernels where there is no
// GPU. Each CUDA thread is a fiber (Boost.Context); the blocks of a grid run one after another,
// each with its own shared memory; the threads of a block switch only at synchronisation points
// (barriers, warp-synchronous intrinsics, atomics), in an order chosen by the schedule:
//
// * forward: the lowest-numbered runnable thread runs until it blocks; reverse: the highest;
//   random: a seeded random runnable thread, also preempted at every atomic.
//   Correct kernels give bit-identical outputs under every schedule; a kernel that reads another
//   thread's write without a barrier between them, or decides from shared state others may still
//   change, sees different values under different schedules.
// * Barriers must be reached by every thread of the block at the same __syncthreads call site
//   (file:line); threads that exit while others wait at a barrier, warp intrinsics whose mask
//   names exited, absent or diverged lanes, and deadlocks are faults (opd::simt::Fault) that name
//   the sites involved.
// * Shared memory and (through the bindings) workspaces are filled with a poison byte pattern that
//   differs per schedule, so a read of memory nobody wrote shows up as a schedule difference or a
//   NaN.
// * Device properties (SM count, occupancy limits) come from a settable profile (H100, H200, A100,
//   L4, ...), so the launchers choose the same grid shapes, row slices and merge kernels as on
//   that GPU.
//
// What it does not model: timing, memory ordering beyond the schedules above (every write is
// visible at once), the exact rounding of hardware approximations (fast_exp2 is modelled with
// the correctly rounded exp2), and memory spaces (any pointer is host memory).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <typeinfo>

// ---- CUDA's host-side vocabulary -----------------------------------------------------------------

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
using cudaStream_t = struct CUstream_st*;
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};

namespace opd::simt {

struct Site {
  const char* file;
  int line;
};
std::string to_string(const Site& site);

// A fault the emulator found in a kernel (divergent barrier, bad warp mask, deadlock, misaligned
// vector access, ...). Its message names the kernel's source sites and the threads involved.
class Fault : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class Schedule { forward, reverse, random };

struct DeviceProfile {
  std::string name;
  int sm_count;
  int max_threads_per_sm;
  int max_blocks_per_sm;
  int registers_per_sm;
  int registers_per_thread;  // assumed for every kernel (the row kernels' launch bounds cap them at 64)
  int shared_bytes_per_sm;
  int max_shared_bytes_per_block;  // static __shared__ limit

  // What cudaOccupancyMaxActiveBlocksPerMultiprocessor reports under this profile's assumptions.
  int max_active_blocks(int block_threads, size_t dynamic_shared_bytes) const;
};

// "h100" (SXM, 132 SMs), "h200" (132), "a100" (108), "l4" (58), "tiny" (2 SMs: every launch
// path that depends on filling the GPU is taken with few rows). Throws std::invalid_argument.
DeviceProfile device_profile(const std::string& name);

struct Config {
  DeviceProfile device = device_profile("h100");
  Schedule schedule = Schedule::forward;
  uint64_t seed = 0;
};
// The emulator's settings; kernels launched afterwards use them. Not thread-safe with launches
// in flight (launches from several host threads are serialised).
Config& config();
inline const DeviceProfile& device() { return config().device; }

// The byte that poisons fresh shared memory and workspaces under the current schedule.
unsigned char poison_byte();

struct Counters {
  uint64_t launches = 0, blocks = 0, threads = 0, barriers = 0, warp_ops = 0, atomics = 0, switches = 0;
  uint64_t shared_bytes_peak = 0;
};
Counters& counters();

const char* error_string(cudaError_t e);

// Runs `kernel` (a kernel call with its arguments bound) over grid x block. Returns
// cudaErrorInvalidConfiguration for shapes the hardware rejects; throws Fault for faults found
// while running, and rethrows exceptions raised by the kernel code.
cudaError_t launch(dim3 grid, dim3 block, size_t dynamic_shared_bytes, std::function<void()> kernel);

// ---- per-thread context (valid inside a launch) --------------------------------------------------

struct ThreadContext {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};
namespace detail {
inline thread_local const ThreadContext* current = nullptr;
inline const ThreadContext& here() {
  if (current == nullptr) throw Fault("CUDA device code called outside a kernel launch");
  return *current;
}
void* block_shared(const void* key, size_t size, size_t align, const char* type_name);
}  // namespace detail

// Per-block storage for OPD_SHARED: every thread of a block gets the same object, each block a
// fresh, poisoned one (no constructor runs, as for __shared__).
template <typename T>
T& block_shared(const void* key) {
  static_assert(std::is_trivially_destructible_v<T>, "__shared__ objects are never destroyed");
  return *static_cast<T*>(detail::block_shared(key, sizeof(T), alignof(T), typeid(T).name()));
}

void sync_threads(Site site);
void sync_warp(Site site, unsigned mask = 0xffffffffu);

enum class ShuffleKind { idx, up, down, bfly };
uint64_t shuffle_bits(Site site, ShuffleKind kind, unsigned mask, uint64_t bits, int lane_arg, int width);
unsigned vote_ballot(Site site, unsigned mask, bool predicate);

template <typename T>
T shuffle(Site site, ShuffleKind kind, unsigned mask, T value, int lane_arg, int width = 32) {
  static_assert(std::is_trivially_copyable_v<T> && (sizeof(T) == 4 || sizeof(T) == 8),
                "CUDA shuffles move 4- or 8-byte values");
  uint64_t bits = 0;
  memcpy(&bits, &value, sizeof(T));
  bits = shuffle_bits(site, kind, mask, bits, lane_arg, width);
  T out;
  memcpy(&out, &bits, sizeof(T));
  return out;
}

void check_aligned(Site site, const void* address, size_t alignment);

// Atomics are preemption points of the random schedule: others may run between two of them.
void atomic_point(Site site);
template <typename T>
T atomic_rmw(Site site, T* address, const std::function<T(T)>& op) {
  check_aligned(site, address, sizeof(T));
  const T old = *address;
  *address = op(old);
  atomic_point(site);
  return old;
}

template <typename T>
T load(Site site, const T* address) {
  check_aligned(site, address, alignof(T));
  T value;
  memcpy(&value, address, sizeof(T));
  return value;
}
template <typename T>
void store(Site site, T* address, const T& value) {
  check_aligned(site, address, alignof(T));
  memcpy(address, &value, sizeof(T));
}

template <typename To, typename From>
inline To bits_as(From from) {
  static_assert(sizeof(To) == sizeof(From));
  To to;
  memcpy(&to, &from, sizeof(To));
  return to;
}

// ---- checks for tests ---------------------------------------------------------------------------

// Runs `run` once per schedule (forward, reverse, random with seeds `seed`..`seed + random_runs`),
// each time returning the bytes of the outputs it produced, and throws Fault naming the schedules
// and the first differing byte when they are not bit-identical. Restores the schedule.
void check_schedules_agree(const std::function<std::string()>& run, int random_runs = 2, uint64_t seed = 1);

}  // namespace opd::simt

#define OPD_SIMT_SITE (::opd::simt::Site{__FILE__, __LINE__})
// A distinct address per OPD_SHARED declaration (and per template instantiation of its function).
#define OPD_SIMT_SHARED_KEY    \
  ([]() -> const void* {       \
    static const char key = 0; \
    return &key;               \
  }())

// ---- device code vocabulary ------------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict

#define threadIdx (::opd::simt::detail::here().thread_idx)
#define blockIdx (::opd::simt::detail::here().block_idx)
#define blockDim (::opd::simt::detail::here().block_dim)
#define gridDim (::opd::simt::detail::here().grid_dim)
constexpr int warpSize = 32;

#define __syncthreads() ::opd::simt::sync_threads(OPD_SIMT_SITE)
#define __syncwarp(...) ::opd::simt::sync_warp(OPD_SIMT_SITE __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_sync(mask, value, ...) \
  ::opd::simt::shuffle(OPD_SIMT_SITE, ::opd::simt::ShuffleKind::idx, mask, value, __VA_ARGS__)
#define __shfl_up_sync(mask, value, ...) \
  ::opd::simt::shuffle(OPD_SIMT_SITE, ::opd::simt::ShuffleKind::up, mask, value, __VA_ARGS__)
#define __shfl_down_sync(mask, value, ...) \
  ::opd::simt::shuffle(OPD_SIMT_SITE, ::opd::simt::ShuffleKind::down, mask, value, __VA_ARGS__)
#define __shfl_xor_sync(mask, value, ...) \
  ::opd::simt::shuffle(OPD_SIMT_SITE, ::opd::simt::ShuffleKind::bfly, mask, value, __VA_ARGS__)
#define __ballot_sync(mask, predicate) ::opd::simt::vote_ballot(OPD_SIMT_SITE, mask, (predicate) != 0)
#define __any_sync(mask, predicate) (::opd::simt::vote_ballot(OPD_SIMT_SITE, mask, (predicate) != 0) != 0u)
#define __all_sync(mask, predicate) (::opd::simt::vote_ballot(OPD_SIMT_SITE, mask, (predicate) != 0) == (mask))

#define atomicAdd(address, value) ::opd::simt::atomic_add(OPD_SIMT_SITE, address, value)
#define atomicMax(address, value) ::opd::simt::atomic_max(OPD_SIMT_SITE, address, value)
#define atomicMin(address, value) ::opd::simt::atomic_min(OPD_SIMT_SITE, address, value)
#define atomicExch(address, value) ::opd::simt::atomic_exch(OPD_SIMT_SITE, address, value)
#define atomicCAS(address, compare, value) ::opd::simt::atomic_cas(OPD_SIMT_SITE, address, compare, value)

#define __ldg(address) ::opd::simt::load(OPD_SIMT_SITE, address)
#define __ldcs(address) ::opd::simt::load(OPD_SIMT_SITE, address)
#define __ldcg(address) ::opd::simt::load(OPD_SIMT_SITE, address)
#define __stcs(address, value) ::opd::simt::store(OPD_SIMT_SITE, address, value)
#define __stcg(address, value) ::opd::simt::store(OPD_SIMT_SITE, address, value)

namespace opd::simt {
template <typename T, typename U>
T atomic_add(Site site, T* address, U value) {
  return atomic_rmw<T>(site, address, [value](T old) { return static_cast<T>(old + value); });
}
template <typename T, typename U>
T atomic_max(Site site, T* address, U value) {
  return atomic_rmw<T>(site, address,
                       [value](T old) { return old < static_cast<T>(value) ? static_cast<T>(value) : old; });
}
template <typename T, typename U>
T atomic_min(Site site, T* address, U value) {
  return atomic_rmw<T>(site, address,
                       [value](T old) { return static_cast<T>(value) < old ? static_cast<T>(value) : old; });
}
template <typename T, typename U>
T atomic_exch(Site site, T* address, U value) {
  return atomic_rmw<T>(site, address, [value](T) { return static_cast<T>(value); });
}
template <typename T, typename U, typename V>
T atomic_cas(Site site, T* address, U compare, V value) {
  return atomic_rmw<T>(
      site, address, [compare, value](T old) { return old == static_cast<T>(compare) ? static_cast<T>(value) : old; });
}
}  // namespace opd::simt

// Rounding-mode arithmetic: host float arithmetic rounds to nearest even (the emulator is built
// with -ffp-contract=off, so nothing fuses behind the kernel's back).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __int_as_float(int x) { return ::opd::simt::bits_as<float>(x); }
inline int __float_as_int(float x) { return ::opd::simt::bits_as<int>(x); }
inline float __uint_as_float(unsigned x) { return ::opd::simt::bits_as<float>(x); }
inline unsigned __float_as_uint(float x) { return ::opd::simt::bits_as<unsigned>(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
using std::isinf;
using std::isnan;
