// The SIMT emulator's runtime: block scheduling, fibers, barriers, warp intrinsics, shared memory.
// See simt.h for what it models and what it does not.
#include "simt/simt.h"

#include <boost/context/fiber.hpp>
#include <boost/context/protected_fixedsize_stack.hpp>

#include <algorithm>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <numeric>
#include <random>
#include <sstream>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

namespace opd::simt {
namespace {

namespace ctx = boost::context;

// Deep enough for the kernels' register arrays and, under AddressSanitizer, its redzones.
#if defined(__SANITIZE_ADDRESS__)
constexpr size_t kStackBytes = 1024 * 1024;
#else
constexpr size_t kStackBytes = 256 * 1024;
#endif

// Fiber stacks (with a guard page) are reused across blocks and launches: a grid of thousands of
// blocks would otherwise map and unmap a stack per CUDA thread.
class StackPool {
 public:
  ~StackPool() {
    for (ctx::stack_context& s : free_) allocator_.deallocate(s);
  }
  ctx::stack_context allocate() {
    if (free_.empty()) return allocator_.allocate();
    ctx::stack_context s = free_.back();
    free_.pop_back();
    return s;
  }
  void deallocate(ctx::stack_context& s) noexcept {
#if defined(__SANITIZE_ADDRESS__)
    allocator_.deallocate(s);  // fresh stacks keep ASan's view of stack memory simple
#else
    free_.push_back(s);
#endif
  }

 private:
  ctx::protected_fixedsize_stack allocator_{kStackBytes};
  std::vector<ctx::stack_context> free_;
};

StackPool& stack_pool() {
  static StackPool pool;
  return pool;
}

// AddressSanitizer must be told about every switch between the scheduler's stack and a fiber's
// (sanitizer/common_interface_defs.h), or it takes fiber frames for overflows of the main stack.
#if defined(__SANITIZE_ADDRESS__)
thread_local const void* g_scheduler_stack_bottom = nullptr;
thread_local size_t g_scheduler_stack_size = 0;
void before_switch(void** fake_stack, const void* bottom, size_t size) {
  __sanitizer_start_switch_fiber(fake_stack, bottom, size);
}
void after_switch(void* fake_stack, const void** old_bottom, size_t* old_size) {
  __sanitizer_finish_switch_fiber(fake_stack, old_bottom, old_size);
}
#else
void before_switch(void**, const void*, size_t) {}
void after_switch(void*, const void**, size_t*) {}
#endif

// Thrown inside a fiber to end it early (another thread faulted): the kernel's frames unwind as
// for any exception and the fiber returns normally.
struct Cancelled {};

enum class Wait { none, barrier, warp_op, exited };
enum class WarpOp { sync, shuffle, ballot };

const char* warp_op_name(WarpOp op, ShuffleKind kind) {
  switch (op) {
    case WarpOp::sync: return "__syncwarp";
    case WarpOp::ballot: return "__ballot_sync";
    case WarpOp::shuffle:
      switch (kind) {
        case ShuffleKind::idx: return "__shfl_sync";
        case ShuffleKind::up: return "__shfl_up_sync";
        case ShuffleKind::down: return "__shfl_down_sync";
        case ShuffleKind::bfly: return "__shfl_xor_sync";
      }
  }
  return "?";
}

struct Thread {
  ThreadContext context;
  int linear = 0, warp = 0, lane = 0;
  Wait wait = Wait::none;
  bool started = false;
  Site site{nullptr, 0};
  WarpOp op = WarpOp::sync;
  ShuffleKind kind = ShuffleKind::idx;
  unsigned mask = 0;
  uint64_t bits = 0;
  int lane_arg = 0, width = 32;
  uint64_t result = 0;
  bool cancelled = false;
  ctx::fiber fiber;      // the thread while it is suspended
  ctx::fiber scheduler;  // inside the thread: the scheduler to yield to
  ctx::stack_context stack{};
  void* fake_stack = nullptr;  // AddressSanitizer's bookkeeping while suspended
};

struct PooledStack {
  Thread* owner;
  ctx::stack_context allocate() {
    owner->stack = stack_pool().allocate();
    return owner->stack;
  }
  void deallocate(ctx::stack_context& s) noexcept { stack_pool().deallocate(s); }
};

struct SharedBuffer {
  void* data;
  size_t size, align;
  std::string type;
};

struct BlockRun {
  uint3 block_idx;
  dim3 block_dim, grid_dim;
  std::vector<Thread> threads;
  std::map<const void*, SharedBuffer> shared;
  size_t shared_bytes = 0, shared_limit = 0;
  std::exception_ptr error;
  // Threads below `lowest_runnable` (and above `highest_runnable`) are known not to be runnable:
  // the forward / reverse schedules pick in O(1) amortised instead of scanning the block.
  size_t lowest_runnable = 0, highest_runnable = SIZE_MAX;

  void woke(const Thread& t) {
    lowest_runnable = std::min(lowest_runnable, static_cast<size_t>(t.linear));
    highest_runnable =
        highest_runnable == SIZE_MAX ? SIZE_MAX : std::max(highest_runnable, static_cast<size_t>(t.linear));
  }

  ~BlockRun() {
    threads.clear();  // unwinds suspended fibers before their shared memory goes
    for (auto& [key, buffer] : shared) ::operator delete(buffer.data, std::align_val_t(buffer.align));
  }
};

thread_local BlockRun* g_block = nullptr;
thread_local Thread* g_thread = nullptr;
std::mutex g_launch_mutex;

std::string dims(const uint3& d) {
  std::ostringstream s;
  s << "(" << d.x << "," << d.y << "," << d.z << ")";
  return s.str();
}

std::string where(const BlockRun& block, const Thread& t) {
  return "block " + dims(block.block_idx) + " thread " + dims(t.context.thread_idx);
}

[[noreturn]] void fault(const std::string& message) { throw Fault("SIMT emulator fault: " + message); }

// "0-31, 40, 64-127": thread lists in messages stay short.
std::string ranges(const std::vector<int>& ids) {
  std::ostringstream s;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (i != 0) s << ", ";
    s << ids[i];
    if (j > i) s << "-" << ids[j];
    i = j + 1;
  }
  return s.str();
}

std::string hex(unsigned mask) {
  std::ostringstream s;
  s << "0x" << std::hex << mask;
  return s.str();
}

Thread& this_thread(const char* what) {
  if (g_thread == nullptr) fault(std::string(what) + " called outside a kernel launch");
  return *g_thread;
}

// Back to the scheduler; returns when the scheduler resumes this thread.
void yield(Thread& t) {
  ++counters().switches;
#if defined(__SANITIZE_ADDRESS__)
  before_switch(&t.fake_stack, g_scheduler_stack_bottom, g_scheduler_stack_size);
  t.scheduler = std::move(t.scheduler).resume();
  after_switch(t.fake_stack, &g_scheduler_stack_bottom, &g_scheduler_stack_size);
#else
  t.scheduler = std::move(t.scheduler).resume();
#endif
  if (t.cancelled) throw Cancelled{};
}

int warp_lanes(const BlockRun& block, int warp) {
  const int n = static_cast<int>(block.threads.size());
  return std::min(32, n - warp * 32);
}

// Called when `t` arrives at a warp intrinsic: completes it if every lane of the mask is there.
void try_complete_warp_op(BlockRun& block, Thread& t) {
  const std::string name = warp_op_name(t.op, t.kind);
  const int lanes = warp_lanes(block, t.warp);
  if ((t.mask & (1u << t.lane)) == 0) {
    fault(name + " at " + to_string(t.site) + " with mask " + hex(t.mask) + " excludes the calling lane " +
          std::to_string(t.lane) + " (" + where(block, t) + ")");
  }
  if (lanes < 32 && (t.mask >> lanes) != 0) {
    fault(name + " at " + to_string(t.site) + " with mask " + hex(t.mask) + " names lanes beyond the " +
          std::to_string(lanes) + " threads of warp " + std::to_string(t.warp) + " (" + where(block, t) + ")");
  }
  std::vector<Thread*> group;
  for (int lane = 0; lane < lanes; ++lane) {
    if ((t.mask & (1u << lane)) == 0) continue;
    Thread& o = block.threads[t.warp * 32 + lane];
    if (o.wait == Wait::exited) {
      fault(name + " at " + to_string(t.site) + " with mask " + hex(t.mask) + ": lane " + std::to_string(lane) +
            " of warp " + std::to_string(t.warp) + " has exited (" + where(block, t) + ")");
    }
    if (o.wait != Wait::warp_op) return;  // not there yet
    if (o.site.file != t.site.file || o.site.line != t.site.line || o.op != t.op || o.kind != t.kind ||
        o.mask != t.mask || o.width != t.width) {
      fault("divergent warp intrinsics in warp " + std::to_string(t.warp) + " of block " + dims(block.block_idx) +
            ": lane " + std::to_string(t.lane) + " at " + name + " " + to_string(t.site) + " mask " + hex(t.mask) +
            ", lane " + std::to_string(lane) + " at " + warp_op_name(o.op, o.kind) + " " + to_string(o.site) +
            " mask " + hex(o.mask));
    }
    group.push_back(&o);
  }
  ++counters().warp_ops;
  if (t.op == WarpOp::ballot) {
    uint64_t votes = 0;
    for (Thread* o : group) votes |= o->bits != 0 ? (uint64_t{1} << o->lane) : 0;
    for (Thread* o : group) o->result = votes;
  } else if (t.op == WarpOp::shuffle) {
    const int width = t.width;
    if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
      fault(name + " at " + to_string(t.site) + ": width " + std::to_string(width) + " is not a power of two <= 32");
    }
    for (Thread* o : group) {
      const int base = o->lane & ~(width - 1);
      const int in_segment = o->lane - base;
      int src = o->lane;
      switch (o->kind) {
        case ShuffleKind::idx: src = base + ((o->lane_arg % width) + width) % width; break;
        case ShuffleKind::up: src = in_segment - o->lane_arg >= 0 ? o->lane - o->lane_arg : o->lane; break;
        case ShuffleKind::down: src = in_segment + o->lane_arg < width ? o->lane + o->lane_arg : o->lane; break;
        case ShuffleKind::bfly: {
          const int x = o->lane ^ o->lane_arg;
          src = x < base + width ? x : o->lane;
          break;
        }
      }
      if (src < 0 || src >= lanes || (t.mask & (1u << src)) == 0) {
        fault(name + " at " + to_string(t.site) + " with mask " + hex(t.mask) + ": lane " + std::to_string(o->lane) +
              " reads lane " + std::to_string(src) + ", which is not in the mask (undefined on the GPU)");
      }
      o->result = block.threads[t.warp * 32 + src].bits;
    }
  }
  for (Thread* o : group) {
    o->wait = Wait::none;
    block.woke(*o);
  }
}

uint64_t warp_op(Site site, WarpOp op, ShuffleKind kind, unsigned mask, uint64_t bits, int lane_arg, int width) {
  Thread& t = this_thread(warp_op_name(op, kind));
  t.wait = Wait::warp_op;
  t.site = site;
  t.op = op;
  t.kind = kind;
  t.mask = mask;
  t.bits = bits;
  t.lane_arg = lane_arg;
  t.width = width;
  try_complete_warp_op(*g_block, t);
  do yield(t);
  while (t.wait == Wait::warp_op);
  return t.result;
}

class Scheduler {
 public:
  Scheduler(BlockRun& block, const std::function<void()>& kernel, std::mt19937_64& rng)
      : block_(block), kernel_(kernel), rng_(rng) {}

  void run() {
    try {
      for (;;) {
        Thread* t = pick();
        if (t == nullptr) {
          if (!release_barrier()) return;
          continue;
        }
        resume(*t);
        if (block_.error) std::rethrow_exception(block_.error);
      }
    } catch (...) {
      cancel_all();
      throw;
    }
  }

 private:
  Thread* pick() {
    std::vector<Thread>& threads = block_.threads;
    switch (config().schedule) {
      case Schedule::forward: {
        size_t& i = block_.lowest_runnable;
        while (i < threads.size() && threads[i].wait != Wait::none) ++i;
        return i < threads.size() ? &threads[i] : nullptr;
      }
      case Schedule::reverse: {
        size_t& i = block_.highest_runnable;
        if (i == SIZE_MAX) i = threads.size() - 1;
        while (i != SIZE_MAX && threads[i].wait != Wait::none) --i;
        if (i == SIZE_MAX) {
          i = 0;  // nothing runnable: the next wake-up raises it again
          return nullptr;
        }
        return &threads[i];
      }
      case Schedule::random: {
        runnable_.clear();
        for (Thread& t : threads) {
          if (t.wait == Wait::none) runnable_.push_back(&t);
        }
        if (runnable_.empty()) return nullptr;
        return runnable_[std::uniform_int_distribution<size_t>(0, runnable_.size() - 1)(rng_)];
      }
    }
    return nullptr;
  }

  void resume(Thread& t) {
    g_thread = &t;
    detail::current = &t.context;
    if (!t.started) {
      t.started = true;
      BlockRun* block = &block_;
      const std::function<void()>* kernel = &kernel_;
      t.fiber = ctx::fiber(std::allocator_arg, PooledStack{&t}, [&t, block, kernel](ctx::fiber&& scheduler) {
#if defined(__SANITIZE_ADDRESS__)
        after_switch(nullptr, &g_scheduler_stack_bottom, &g_scheduler_stack_size);
#endif
        t.scheduler = std::move(scheduler);
        try {
          (*kernel)();
        } catch (const Cancelled&) {
        } catch (const ctx::detail::forced_unwind&) {
          throw;  // Boost is unwinding the fiber: let it
        } catch (...) {
          if (!block->error) block->error = std::current_exception();
        }
        t.wait = Wait::exited;
#if defined(__SANITIZE_ADDRESS__)
        before_switch(nullptr, g_scheduler_stack_bottom, g_scheduler_stack_size);  // this fiber ends
#endif
        return std::move(t.scheduler);
      });
    }
    ++counters().switches;
    [[maybe_unused]] void* fake_stack = nullptr;
    before_switch(&fake_stack, static_cast<char*>(t.stack.sp) - t.stack.size, t.stack.size);
    t.fiber = std::move(t.fiber).resume();
    after_switch(fake_stack, nullptr, nullptr);
    detail::current = nullptr;
    g_thread = nullptr;
  }

  // Ends every suspended thread (after a fault), so no fiber is destroyed mid-kernel.
  void cancel_all() {
    for (Thread& t : block_.threads) {
      if (!t.started) continue;
      t.cancelled = true;
      for (int tries = 0; t.wait != Wait::exited && tries < 1000; ++tries) resume(t);
    }
  }

  // Nobody can run: either all threads are done, or they all wait at one barrier (released
  // here), or the block is stuck. Returns false when the block has finished.
  bool release_barrier() {
    // The common case first, without building any message.
    const Thread* first = nullptr;
    bool uniform = true, any_waiting = false;
    for (const Thread& t : block_.threads) {
      if (t.wait == Wait::exited) continue;
      any_waiting = true;
      if (t.wait != Wait::barrier) {
        uniform = false;
      } else if (first == nullptr) {
        first = &t;
      } else if (t.site.line != first->site.line || t.site.file != first->site.file) {
        uniform = false;
      }
    }
    if (!any_waiting) return false;
    const bool someone_exited = std::any_of(block_.threads.begin(), block_.threads.end(),
                                            [](const Thread& t) { return t.wait == Wait::exited; });
    if (uniform && !someone_exited) {
      for (Thread& t : block_.threads) t.wait = Wait::none;
      block_.lowest_runnable = 0;
      block_.highest_runnable = block_.threads.size() - 1;
      ++counters().barriers;
      return true;
    }
    report_stuck_block();
  }

  [[noreturn]] void report_stuck_block() {
    std::map<std::string, std::vector<int>> at_barrier;
    std::vector<int> exited, at_warp;
    for (const Thread& t : block_.threads) {
      if (t.wait == Wait::exited) {
        exited.push_back(t.linear);
      } else if (t.wait == Wait::barrier) {
        at_barrier[to_string(t.site)].push_back(t.linear);
      } else {
        at_warp.push_back(t.linear);
      }
    }
    const std::string block_name = "block " + dims(block_.block_idx);
    std::ostringstream message;
    if (at_warp.empty() && exited.empty()) {
      message << "divergent __syncthreads in " << block_name << ": threads meet at different barriers:";
    } else if (at_warp.empty()) {
      message << "__syncthreads in " << block_name << " waits for threads that have exited:";
    } else {
      message << "deadlock in " << block_name << ":";
    }
    for (const auto& [site, ids] : at_barrier) {
      message << " " << ids.size() << " thread(s) [" << ranges(ids) << "] at __syncthreads " << site << ";";
    }
    for (int id : at_warp) {
      const Thread& t = block_.threads[id];
      message << " thread " << id << " at " << warp_op_name(t.op, t.kind) << " " << to_string(t.site) << " (mask "
              << hex(t.mask) << ");";
    }
    if (!exited.empty()) message << " " << exited.size() << " thread(s) [" << ranges(exited) << "] exited;";
    fault(message.str());
  }

  BlockRun& block_;
  const std::function<void()>& kernel_;
  std::mt19937_64& rng_;
  std::vector<Thread*> runnable_;
};

}  // namespace

std::string to_string(const Site& site) {
  // Paths below csrc/ (or the file name): what a reader greps for.
  std::string file = site.file != nullptr ? site.file : "?";
  const size_t csrc = file.rfind("csrc/");
  if (csrc != std::string::npos) {
    file = file.substr(csrc + 5);
  } else if (const size_t slash = file.rfind('/'); slash != std::string::npos) {
    file = file.substr(slash + 1);
  }
  return file + ":" + std::to_string(site.line);
}

int DeviceProfile::max_active_blocks(int block_threads, size_t dynamic_shared_bytes) const {
  if (block_threads <= 0) return 0;
  const int warps = (block_threads + 31) / 32;
  int blocks = std::min(max_blocks_per_sm, max_threads_per_sm / (warps * 32));
  blocks = std::min(blocks, registers_per_sm / (registers_per_thread * warps * 32));
  if (dynamic_shared_bytes > 0)
    blocks = std::min<int>(blocks, static_cast<int>(shared_bytes_per_sm / dynamic_shared_bytes));
  return std::max(0, blocks);
}

DeviceProfile device_profile(const std::string& name) {
  // SM counts and per-SM limits of the GPUs users train on (CUDA occupancy calculator values).
  if (name == "h100") return {"h100", 132, 2048, 32, 65536, 64, 228 * 1024, 48 * 1024};
  if (name == "h200") return {"h200", 132, 2048, 32, 65536, 64, 228 * 1024, 48 * 1024};
  if (name == "a100") return {"a100", 108, 2048, 32, 65536, 64, 164 * 1024, 48 * 1024};
  if (name == "l4") return {"l4", 58, 1536, 24, 65536, 64, 100 * 1024, 48 * 1024};
  if (name == "tiny") return {"tiny", 2, 2048, 32, 65536, 64, 228 * 1024, 48 * 1024};
  throw std::invalid_argument("unknown device profile '" + name + "' (h100, h200, a100, l4, tiny)");
}

Config& config() {
  static Config c;
  return c;
}

Counters& counters() {
  static Counters c;
  return c;
}

unsigned char poison_byte() {
  // NaN / -1 under forward, a huge finite float / large int under reverse, varied under random.
  switch (config().schedule) {
    case Schedule::forward: return 0xFF;
    case Schedule::reverse: return 0x7F;
    case Schedule::random: {
      static constexpr unsigned char kBytes[] = {0xA5, 0xC3, 0x5A, 0xFE, 0x81};
      return kBytes[config().seed % (sizeof(kBytes) / sizeof(kBytes[0]))];
    }
  }
  return 0xFF;
}

const char* error_string(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

void detail_check_not_in_kernel() {
  if (g_thread != nullptr) fault("a kernel launch from device code (dynamic parallelism) is not supported");
}

cudaError_t launch(dim3 grid, dim3 block, size_t dynamic_shared_bytes, std::function<void()> kernel) {
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    return cudaErrorInvalidConfiguration;
  }
  if (dynamic_shared_bytes > static_cast<size_t>(device().shared_bytes_per_sm)) return cudaErrorInvalidValue;
  detail_check_not_in_kernel();
  const std::lock_guard<std::mutex> lock(g_launch_mutex);
  Counters& count = counters();
  ++count.launches;
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  if (blocks > (uint64_t{1} << 24)) fault("a grid of " + std::to_string(blocks) + " blocks is too large to emulate");
  std::vector<uint64_t> order(blocks);
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 rng(config().seed * 0x9E3779B97F4A7C15ull + count.launches);
  if (config().schedule == Schedule::reverse) std::reverse(order.begin(), order.end());
  if (config().schedule == Schedule::random) std::shuffle(order.begin(), order.end(), rng);

  for (const uint64_t b : order) {
    BlockRun run;
    run.block_idx = {static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                     static_cast<unsigned>(b / (uint64_t{grid.x} * grid.y))};
    run.block_dim = block;
    run.grid_dim = grid;
    run.shared_limit = static_cast<size_t>(device().max_shared_bytes_per_block) + dynamic_shared_bytes;
    run.threads.resize(threads);
    for (uint64_t i = 0; i < threads; ++i) {
      Thread& t = run.threads[i];
      t.linear = static_cast<int>(i);
      t.warp = static_cast<int>(i / 32);
      t.lane = static_cast<int>(i % 32);
      t.context.thread_idx = {static_cast<unsigned>(i % block.x), static_cast<unsigned>((i / block.x) % block.y),
                              static_cast<unsigned>(i / (uint64_t{block.x} * block.y))};
      t.context.block_idx = run.block_idx;
      t.context.block_dim = block;
      t.context.grid_dim = grid;
    }
    ++count.blocks;
    count.threads += threads;
    g_block = &run;
    struct Reset {
      ~Reset() {
        g_block = nullptr;
        g_thread = nullptr;
        detail::current = nullptr;
      }
    } reset;
    Scheduler(run, kernel, rng).run();
  }
  return cudaSuccess;
}

namespace detail {

void* block_shared(const void* key, size_t size, size_t align, const char* type_name) {
  Thread& t = this_thread("a __shared__ declaration");
  BlockRun& block = *g_block;
  if (auto it = block.shared.find(key); it != block.shared.end()) return it->second.data;
  if (block.shared_bytes + size > block.shared_limit) {
    fault("block " + dims(block.block_idx) + " needs " + std::to_string(block.shared_bytes + size) +
          " bytes of shared memory, more than the " + std::to_string(block.shared_limit) + " a block may have (" +
          where(block, t) + ")");
  }
  void* data = ::operator new(size, std::align_val_t(std::max(align, alignof(std::max_align_t))));
  memset(data, poison_byte(), size);
  block.shared.emplace(key, SharedBuffer{data, size, std::max(align, alignof(std::max_align_t)), type_name});
  block.shared_bytes += size;
  counters().shared_bytes_peak = std::max<uint64_t>(counters().shared_bytes_peak, block.shared_bytes);
  return data;
}

}  // namespace detail

void sync_threads(Site site) {
  Thread& t = this_thread("__syncthreads");
  t.wait = Wait::barrier;
  t.site = site;
  do yield(t);
  while (t.wait == Wait::barrier);
}

void sync_warp(Site site, unsigned mask) { warp_op(site, WarpOp::sync, ShuffleKind::idx, mask, 0, 0, 32); }

uint64_t shuffle_bits(Site site, ShuffleKind kind, unsigned mask, uint64_t bits, int lane_arg, int width) {
  return warp_op(site, WarpOp::shuffle, kind, mask, bits, lane_arg, width);
}

unsigned vote_ballot(Site site, unsigned mask, bool predicate) {
  return static_cast<unsigned>(warp_op(site, WarpOp::ballot, ShuffleKind::idx, mask, predicate ? 1 : 0, 0, 32));
}

void atomic_point(Site) {
  Thread& t = this_thread("an atomic");
  ++counters().atomics;
  // Under forward / reverse the same thread would be picked again: only random preempts.
  if (config().schedule == Schedule::random) yield(t);
}

void check_aligned(Site site, const void* address, size_t alignment) {
  if (reinterpret_cast<uintptr_t>(address) % alignment != 0) {
    std::ostringstream s;
    s << "misaligned " << alignment << "-byte access to " << address << " at " << to_string(site);
    if (g_thread != nullptr && g_block != nullptr) s << " (" << where(*g_block, *g_thread) << ")";
    fault(s.str());
  }
}

void check_schedules_agree(const std::function<std::string()>& run, int random_runs, uint64_t seed) {
  const Config saved = config();
  struct Restore {
    Config saved;
    ~Restore() { config() = saved; }
  } restore{saved};
  struct Result {
    std::string name, bytes;
  };
  std::vector<Result> results;
  auto run_with = [&](Schedule schedule, uint64_t s, std::string name) {
    config().schedule = schedule;
    config().seed = s;
    results.push_back({std::move(name), run()});
  };
  run_with(Schedule::forward, saved.seed, "forward");
  run_with(Schedule::reverse, saved.seed, "reverse");
  for (int i = 0; i < random_runs; ++i)
    run_with(Schedule::random, seed + i, "random(seed=" + std::to_string(seed + i) + ")");
  for (size_t i = 1; i < results.size(); ++i) {
    const std::string& a = results[0].bytes;
    const std::string& b = results[i].bytes;
    if (a == b) continue;
    size_t at = 0;
    while (at < std::min(a.size(), b.size()) && a[at] == b[at]) ++at;
    fault("outputs differ between the " + results[0].name + " and " + results[i].name + " schedules (sizes " +
          std::to_string(a.size()) + " / " + std::to_string(b.size()) + ", first difference at byte " +
          std::to_string(at) + "): the kernel depends on the order in which threads run");
  }
}

}  // namespace opd::simt
