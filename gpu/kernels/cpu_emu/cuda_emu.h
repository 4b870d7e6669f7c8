// cuda_emu.h — run unmodified CUDA kernel source on the CPU, for verification.
//
// Include this, then the .cu files, and start kernels with lmgate_emu::launch().
// Semantics emulated:
//   * gridDim/blockIdx/blockDim/threadIdx;
//   * thread blocks run one after another; the threads of a block are cooperative
//     fibers (ucontext) on one OS thread, so `__shared__` (mapped to `static`) is
//     shared by exactly the threads of the running block;
//   * __syncthreads(): a fiber parks until every thread of the block has arrived,
//     then all continue — threads really interleave at barriers;
//   * __shfl_xor_sync/__shfl_down_sync/__shfl_sync/__syncwarp: the 32 threads of a
//     warp publish their value, meet at a warp barrier, read their partner's value,
//     and meet again (so a value is never overwritten before it is read);
//   * a barrier that some threads never reach (divergent __syncthreads, a shuffle
//     with a partial warp) is reported as a deadlock instead of hanging.
// Compile with -Wno-unknown-pragmas (g++ ignores `#pragma unroll`).
// Not emulated: memory-model races inside a block between barriers (fibers switch
// only at barriers; the order of threads flips between scheduling passes, which
// exposes some ordering assumptions but not all), atomics, timing.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#define LMGATE_CPU_EMU 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
#define __launch_bounds__(...)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3() = default;
  dim3(unsigned x_, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// ---- 16-bit float types (bit-exact storage; arithmetic goes through float) ----
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 h) {
  uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {  // round to nearest even, like CUDA
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}
struct __half {
  _Float16 value;
};
inline float __half2float(__half h) { return static_cast<float>(h.value); }
inline __half __float2half(float f) { return __half{static_cast<_Float16>(f)}; }

inline float __expf(float x) { return std::exp(x); }
using std::min;
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}

namespace lmgate_emu {

constexpr int kWarp = 32;
constexpr size_t kStackBytes = 256 * 1024;

enum class Wait { kNone, kBlock, kWarp, kDone };

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  Wait wait = Wait::kNone;
  unsigned tid = 0;
};

struct BlockRun {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = -1;
  unsigned block_arrived = 0;
  std::vector<unsigned> warp_arrived;
  std::vector<uint64_t> exchange;  // one 8-byte shuffle slot per thread
  const std::function<void()>* body = nullptr;
  unsigned nthreads = 0;
};

inline BlockRun& run() {
  static BlockRun r;
  return r;
}

}  // namespace lmgate_emu

// The built-in variables: updated by the scheduler at every switch.
inline dim3 gridDim, blockDim, blockIdx, threadIdx;

namespace lmgate_emu {

inline void set_thread_idx(unsigned tid) {
  threadIdx = dim3(tid % blockDim.x, (tid / blockDim.x) % blockDim.y, tid / (blockDim.x * blockDim.y));
}

inline unsigned warp_size_of(unsigned warp) {
  unsigned n = run().nthreads;
  unsigned first = warp * kWarp;
  return n - first < static_cast<unsigned>(kWarp) ? n - first : kWarp;
}

// Park the current fiber on a barrier; the last arrival releases the others.
inline void arrive(Wait kind) {
  BlockRun& r = run();
  Fiber& me = r.fibers[r.current];
  if (kind == Wait::kBlock) {
    if (++r.block_arrived == r.nthreads) {
      r.block_arrived = 0;
      for (Fiber& f : r.fibers)
        if (f.wait == Wait::kBlock) f.wait = Wait::kNone;
      return;  // the last one to arrive continues
    }
  } else {
    unsigned warp = me.tid / kWarp;
    if (++r.warp_arrived[warp] == warp_size_of(warp)) {
      r.warp_arrived[warp] = 0;
      for (unsigned t = warp * kWarp; t < warp * kWarp + warp_size_of(warp); ++t)
        if (r.fibers[t].wait == Wait::kWarp) r.fibers[t].wait = Wait::kNone;
      return;
    }
  }
  me.wait = kind;
  swapcontext(&me.ctx, &r.scheduler);
  set_thread_idx(me.tid);
}

inline void fiber_entry() {
  BlockRun& r = run();
  (*r.body)();
  r.fibers[r.current].wait = Wait::kDone;
  // returning resumes uc_link = the scheduler
}

inline void run_block(const std::function<void()>& body) {
  BlockRun& r = run();
  r.body = &body;
  r.nthreads = blockDim.x * blockDim.y * blockDim.z;
  r.fibers.resize(r.nthreads);
  r.warp_arrived.assign((r.nthreads + kWarp - 1) / kWarp, 0);
  r.exchange.assign(r.nthreads, 0);
  r.block_arrived = 0;
  for (unsigned t = 0; t < r.nthreads; ++t) {
    Fiber& f = r.fibers[t];
    f.stack.resize(kStackBytes);
    f.wait = Wait::kNone;
    f.tid = t;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = &r.scheduler;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  // Round-robin: run every runnable fiber until it parks or finishes. The order
  // flips every pass, so code that silently relies on low thread ids running
  // first between two barriers (a race on the device) sees both orders.
  unsigned done = 0;
  bool backwards = false;
  while (done < r.nthreads) {
    bool progressed = false;
    done = 0;
    for (unsigned i = 0; i < r.nthreads; ++i) {
      const unsigned t = backwards ? r.nthreads - 1 - i : i;
      Fiber& f = r.fibers[t];
      if (f.wait == Wait::kDone) {
        ++done;
        continue;
      }
      if (f.wait != Wait::kNone) continue;
      r.current = static_cast<int>(t);
      set_thread_idx(t);
      swapcontext(&r.scheduler, &f.ctx);
      progressed = true;
    }
    backwards = !backwards;
    if (!progressed && done < r.nthreads) {
      throw std::runtime_error("cuda_emu: deadlock in block (" + std::to_string(blockIdx.x) + "," +
                               std::to_string(blockIdx.y) +
                               "): a barrier or shuffle was not reached by every thread");
    }
  }
}

// Launch `body` (a call of the kernel with its arguments) over the grid.
inline void launch(dim3 grid, dim3 block, const std::function<void()>& body) {
  gridDim = grid;
  blockDim = block;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = dim3(x, y, z);
        run_block(body);
      }
}

template <typename T>
inline T shuffle(T value, int src_lane_in_warp) {
  static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
  BlockRun& r = run();
  unsigned me = r.fibers[r.current].tid;
  unsigned warp_base = me / kWarp * kWarp;
  std::memcpy(&r.exchange[me], &value, sizeof(T));
  arrive(Wait::kWarp);  // everyone has published
  T out;
  unsigned src = warp_base + static_cast<unsigned>(src_lane_in_warp);
  if (src >= warp_base + warp_size_of(me / kWarp)) src = me;  // out of range: own value
  std::memcpy(&out, &r.exchange[src], sizeof(T));
  arrive(Wait::kWarp);  // everyone has read before anyone publishes again
  return out;
}

inline unsigned lane_id() { return run().fibers[run().current].tid % kWarp; }

}  // namespace lmgate_emu

inline void __syncthreads() { lmgate_emu::arrive(lmgate_emu::Wait::kBlock); }
inline void __syncwarp(unsigned = 0xffffffffu) { lmgate_emu::arrive(lmgate_emu::Wait::kWarp); }

// `width` splits the warp into segments, as on the device.
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask, int width = 32) {
  int lane = static_cast<int>(lmgate_emu::lane_id());
  int src = lane ^ lane_mask;
  if (src / width != lane / width) src = lane;
  return lmgate_emu::shuffle(v, src);
}
template <typename T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
  int lane = static_cast<int>(lmgate_emu::lane_id());
  int src = lane + static_cast<int>(delta);
  if (src / width != lane / width) src = lane;
  return lmgate_emu::shuffle(v, src);
}
template <typename T>
inline T __shfl_sync(unsigned, T v, int src_lane, int width = 32) {
  int lane = static_cast<int>(lmgate_emu::lane_id());
  return lmgate_emu::shuffle(v, lane / width * width + src_lane % width);
}
