// Runs CUDA kernel source on the CPU, for tests on machines without a GPU. Each thread of a
// block is a fiber (ucontext) on the calling thread; blocks run one after another. Barriers
// (__syncthreads, __syncwarp) and warp shuffles (__shfl_xor_sync, __shfl_up_sync: each a
// barrier of the warp) switch fibers, so a kernel's indexing, its lane-to-data mapping and
// its barrier structure run as written: a shuffle reads another lane's value; a thread that
// reads shared memory another thread writes after the last barrier they share sees the old
// value in one of the two thread orders, which alternate; a barrier that some threads never
// reach is reported as a deadlock. Shared memory is the launch's dynamic buffer or, for
// __shared__ variables, a static (blocks do not overlap); atomics are plain updates. About one
// context switch per thread per barrier: for small launches that check a kernel against a
// reference, not for timing.
//
// Include this before the kernel source; it defines the CUDA names that source uses
// (qualifiers, threadIdx/blockIdx/blockDim/gridDim, vector types, conversions, intrinsics).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#include "common/codecs.h"

namespace fm::simt {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

// The block being run (one at a time, on one OS thread).
struct BlockRun {
  struct Fiber {
    ucontext_t ctx;
    std::vector<char> stack;
    Dim3 tid;
    bool done = false;
    int waiting = -1;  // barrier index, -1 = runnable
    uint64_t wait_gen = 0;
    unsigned shuffles = 0;
  };
  struct Barrier {
    unsigned arrived = 0, participants = 0;
    uint64_t gen = 0;
  };
  Dim3 block_idx, block_dim, grid_dim;
  std::vector<Fiber> fibers;
  std::vector<Barrier> barriers;   // 0: the block; 1 + w: warp w
  std::vector<uint64_t> exchange;  // [2][threads]: shuffle slots, alternating per shuffle
  std::vector<uint64_t> shared;    // dynamic shared memory (8-byte aligned)
  const std::function<void()>* body = nullptr;
  ucontext_t scheduler;
  size_t current = 0;
};

inline BlockRun*& Current() {
  static BlockRun* run = nullptr;
  return run;
}

inline void FiberEntry() {
  BlockRun& r = *Current();
  (*r.body)();
  r.fibers[r.current].done = true;  // returns to the scheduler through uc_link
}

// The calling fiber waits at barrier b until all its participants have arrived.
inline void Wait(size_t b) {
  BlockRun& r = *Current();
  BlockRun::Barrier& bar = r.barriers[b];
  if (++bar.arrived == bar.participants) {
    bar.arrived = 0;
    ++bar.gen;
    return;
  }
  BlockRun::Fiber& f = r.fibers[r.current];
  f.waiting = static_cast<int>(b);
  f.wait_gen = bar.gen;
  swapcontext(&f.ctx, &r.scheduler);
}

inline const Dim3& ThreadIdx() { return Current()->fibers[Current()->current].tid; }
inline const Dim3& BlockIdx() { return Current()->block_idx; }
inline const Dim3& BlockDim() { return Current()->block_dim; }
inline const Dim3& GridDim() { return Current()->grid_dim; }
inline void* SharedMemory() { return Current()->shared.data(); }
inline size_t WarpBarrier() { return 1 + Current()->current / 32; }

// Runs `kernel` (the kernel call, as a closure) on every thread of every block of `grid`.
// Blocks must have a multiple of 32 threads. Aborts on a barrier deadlock.
// (swapcontext restores every register of the scheduler when a fiber yields back, so the
// loop variables GCC warns about cannot be clobbered as after a longjmp.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wclobbered"
inline void Launch(Dim3 grid, Dim3 block, size_t shared_bytes,
                   const std::function<void()>& kernel) {
  const size_t threads = size_t{block.x} * block.y * block.z;
  if (threads == 0 || threads % 32 != 0 || block.y != 1 || block.z != 1) {
    std::fprintf(stderr, "simt: blocks must be 1-D with a multiple of 32 threads\n");
    std::abort();
  }
  constexpr size_t kStack = 64 * 1024;
  BlockRun r;
  r.block_dim = block;
  r.grid_dim = grid;
  r.body = &kernel;
  r.fibers.resize(threads);
  for (auto& f : r.fibers) f.stack.resize(kStack);
  Current() = &r;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        r.block_idx = {bx, by, bz};
        r.barriers.assign(1 + threads / 32, {});
        r.barriers[0].participants = static_cast<unsigned>(threads);
        for (size_t w = 0; w < threads / 32; ++w) r.barriers[1 + w].participants = 32;
        r.exchange.assign(2 * threads, 0);
        r.shared.assign((shared_bytes + 7) / 8, 0);
        for (size_t t = 0; t < threads; ++t) {
          BlockRun::Fiber& f = r.fibers[t];
          f.tid = {static_cast<unsigned>(t), 0, 0};
          f.done = false, f.waiting = -1, f.shuffles = 0;
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = f.stack.size();
          f.ctx.uc_link = &r.scheduler;
          makecontext(&f.ctx, FiberEntry, 0);
        }
        // Passes alternate between ascending and descending thread order, so that code
        // relying on an order of threads that CUDA does not promise (a read of another
        // lane's shared-memory write without a barrier between them) fails either way.
        size_t done = 0;
        for (size_t pass = 0; done < threads; ++pass) {
          bool progressed = false;
          for (size_t k = 0; k < threads; ++k) {
            const size_t t = pass % 2 ? threads - 1 - k : k;
            BlockRun::Fiber& f = r.fibers[t];
            if (f.done) continue;
            if (f.waiting >= 0 && r.barriers[f.waiting].gen == f.wait_gen) continue;
            f.waiting = -1;
            r.current = t;
            swapcontext(&r.scheduler, &f.ctx);
            progressed = true;
            if (f.done) ++done;
          }
          if (!progressed) {
            std::fprintf(stderr, "simt: barrier deadlock in block (%u, %u, %u)\n", bx, by, bz);
            std::abort();
          }
        }
      }
  Current() = nullptr;
}
#pragma GCC diagnostic pop

// A warp shuffle: every lane of the warp must call it (as the __shfl_*_sync functions
// require); `source` maps this lane to the lane whose value it reads.
template <typename T, typename Source>
T Shuffle(T v, Source source) {
  static_assert(sizeof(T) <= 8);
  BlockRun& r = *Current();
  const size_t t = r.current, warp_base = t / 32 * 32, lane = t % 32;
  const size_t threads = r.fibers.size();
  uint64_t* slots = r.exchange.data() + (r.fibers[t].shuffles++ & 1) * threads;
  std::memcpy(&slots[t], &v, sizeof(T));
  Wait(1 + t / 32);
  T out;
  std::memcpy(&out, &slots[warp_base + source(lane)], sizeof(T));
  return out;
}

}  // namespace fm::simt

// The CUDA names kernel source uses.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define threadIdx (::fm::simt::ThreadIdx())
#define blockIdx (::fm::simt::BlockIdx())
#define blockDim (::fm::simt::BlockDim())
#define gridDim (::fm::simt::GridDim())
#define __shared__ static  // blocks run one after another: a static is the block's copy

inline void __syncthreads() { ::fm::simt::Wait(0); }
inline void __syncwarp(unsigned = 0xffffffffu) { ::fm::simt::Wait(::fm::simt::WarpBarrier()); }
template <typename T>
T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  return ::fm::simt::Shuffle(v, [&](size_t lane) { return lane ^ size_t(lane_mask); });
}
template <typename T>
T __shfl_up_sync(unsigned, T v, unsigned delta) {
  return ::fm::simt::Shuffle(v, [&](size_t lane) { return lane >= delta ? lane - delta : lane; });
}
// Fibers of a block never run at the same time, so a plain add is atomic.
template <typename T>
T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}

struct uint2 {
  unsigned x, y;
};
struct uint4 {
  unsigned x, y, z, w;
};
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
struct __half {
  unsigned short bits;
};
struct __nv_bfloat16 {
  unsigned short bits;
};
inline __half __ushort_as_half(unsigned short b) { return {b}; }
inline float __half2float(__half h) { return ::fm::Fp16ToFloat(h.bits); }
inline float __bfloat162float(__nv_bfloat16 b) { return ::fm::Bf16ToFloat(b.bits); }
using __nv_fp8_storage_t = unsigned char;
struct __nv_fp8_e4m3 {
  __nv_fp8_storage_t __x;
  explicit operator float() const { return ::fm::Fp8E4m3ToFloat(__x); }
};
inline unsigned __float_as_uint(float f) { return ::fm::FloatBits(f); }
inline float __uint_as_float(unsigned u) { return ::fm::BitsFloat(u); }
template <typename T>
T __ldcs(const T* p) {
  return *p;
}
inline float __expf(float x) { return std::exp(x); }
using std::max;
using std::min;
