// C ABI over the emulated kernels, loaded with ctypes by tests/gpu/test_kernels.py.
//
// The kernel source is included verbatim; each entry point picks the template
// instance from its runtime arguments (dtype code, head_dim, block_size, group)
// exactly as gpu/attention/cuda_backend.py picks a name expression, and launches
// it with the same grid and block shape. Returns 0 on success, 1 if the instance
// is not built, 2 if the emulator detected a deadlock.
#include "cuda_emu.h"
// clang-format off
#include "cache_ops.cu"
#include "paged_attention.cu"
// clang-format on

#include <type_traits>
#include <utility>

namespace {

// dtype codes shared with the Python side: 0 float32, 1 float16, 2 bfloat16
template <typename F>
int with_dtype(int dtype, F&& f) {
  switch (dtype) {
    case 0: return f(float{});
    case 1: return f(__half{});
    case 2: return f(__nv_bfloat16{});
    default: return 1;
  }
}

template <typename F>
int with_shape(int head_dim, int block_size, int group, F&& f) {
  auto by_group = [&](auto hd, auto bs) -> int {
    switch (group) {
      case 1: return f(hd, bs, std::integral_constant<int, 1>{});
      case 2: return f(hd, bs, std::integral_constant<int, 2>{});
      case 3: return f(hd, bs, std::integral_constant<int, 3>{});
      case 4: return f(hd, bs, std::integral_constant<int, 4>{});
      case 8: return f(hd, bs, std::integral_constant<int, 8>{});
      default: return 1;
    }
  };
  if (block_size != 16) return 1;
  auto bs = std::integral_constant<int, 16>{};
  if (head_dim == 64) return by_group(std::integral_constant<int, 64>{}, bs);
  if (head_dim == 128) return by_group(std::integral_constant<int, 128>{}, bs);
  return 1;
}

// Kernels that test the emulator itself (tests/gpu/test_kernels.py):
// each one gives a wrong answer, or hangs, if barriers or shuffles were fake.
__global__ void selftest_shared_rotation(int* out) {
  __shared__ int buf[1024];
  const unsigned n = blockDim.x, t = threadIdx.x;
  buf[t] = static_cast<int>(t) * 10;
  __syncthreads();
  const int v = buf[(t + 1) % n];  // a neighbour's value: needs the barrier above
  __syncthreads();
  buf[t] = v + 1;  // overwrite: a reader that ran late would see this one
  __syncthreads();
  out[blockIdx.x * n + t] = buf[(t + n - 1) % n];  // = t * 10 + 1
}

__global__ void selftest_shuffles(int* out) {  // 3 ints per thread
  const int lane = static_cast<int>(threadIdx.x % 32);
  const unsigned i = 3 * (blockIdx.x * blockDim.x + threadIdx.x);
  out[i] = static_cast<int>(lmgate::warp_sum(static_cast<float>(lane)));  // 496
  out[i + 1] = __shfl_down_sync(0xffffffffu, lane, 1);                    // lane + 1, 31 → 31
  out[i + 2] = __shfl_xor_sync(0xffffffffu, lane * 7, 16);                // (lane ^ 16) * 7
}

__global__ void selftest_divergent_barrier(int* out) {
  if (threadIdx.x < 16) __syncthreads();  // a bug the emulator must report
  out[threadIdx.x] = 1;
}

int guarded(const std::function<void()>& launch) {
  try {
    launch();
  } catch (const std::runtime_error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 2;
  }
  return 0;
}

}  // namespace

extern "C" {

// which: 0 shared rotation, 1 shuffles, 2 divergent barrier
int emu_selftest(int which, int blocks, int threads, int* out) {
  return guarded([&] {
    lmgate_emu::launch(dim3(blocks), dim3(threads), [&] {
      if (which == 0) selftest_shared_rotation(out);
      if (which == 1) selftest_shuffles(out);
      if (which == 2) selftest_divergent_barrier(out);
    });
  });
}

int emu_write_kv(int dtype, const void* key, const void* value, void* k_cache, void* v_cache,
                 const long long* slot_mapping, int num_tokens, int row, long long key_stride,
                 long long value_stride) {
  return with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    return guarded([&] {
      lmgate_emu::launch(dim3(num_tokens), dim3(128), [&] {
        lmgate::write_kv<T>(static_cast<const T*>(key), static_cast<const T*>(value),
                            static_cast<T*>(k_cache), static_cast<T*>(v_cache), slot_mapping, row,
                            key_stride, value_stride);
      });
    });
  });
}

int emu_copy_blocks(const unsigned long long* cache_ptrs, int num_caches, const long long* src,
                    const long long* dst, int num_pairs, long long words_per_block) {
  return guarded([&] {
    lmgate_emu::launch(dim3(num_pairs, num_caches), dim3(256), [&] {
      lmgate::copy_blocks(cache_ptrs, src, dst, words_per_block);
    });
  });
}

// partitioned != 0: the split-context path (partitioned kernel + reduce), with the
// fp32 workspace allocated here, as the CUDA launcher allocates it on the device.
int emu_paged_decode(int dtype, int head_dim, int block_size, int group, void* out, const void* q,
                     const void* k_cache, const void* v_cache, const int* block_tables,
                     const int* context_lens, int num_seqs, int max_blocks, int num_kv_heads,
                     float scale, long long q_stride, long long out_stride, int partitioned,
                     int max_partitions) {
  return with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    return with_shape(head_dim, block_size, group, [&](auto hd, auto bs, auto g) {
      constexpr int HD = decltype(hd)::value, BS = decltype(bs)::value, G = decltype(g)::value;
      if (!partitioned) {
        return guarded([&] {
          lmgate_emu::launch(dim3(num_seqs, num_kv_heads), dim3(lmgate::kAttnThreads), [&] {
            lmgate::paged_decode<T, HD, BS, G>(
                static_cast<T*>(out), static_cast<const T*>(q), static_cast<const T*>(k_cache),
                static_cast<const T*>(v_cache), block_tables, context_lens, max_blocks,
                num_kv_heads, scale, q_stride, out_stride);
          });
        });
      }
      const size_t rows = static_cast<size_t>(num_seqs) * num_kv_heads * G * max_partitions;
      // NaN-filled: a partition the reduce reads but nobody wrote would poison the output
      std::vector<float> acc(rows * HD, NAN), m(rows, NAN), l(rows, NAN);
      return guarded([&] {
        lmgate_emu::launch(
            dim3(num_seqs, num_kv_heads, max_partitions), dim3(lmgate::kAttnThreads), [&] {
              lmgate::paged_decode_partitioned<T, HD, BS, G>(
                  acc.data(), m.data(), l.data(), static_cast<const T*>(q),
                  static_cast<const T*>(k_cache), static_cast<const T*>(v_cache), block_tables,
                  context_lens, max_blocks, num_kv_heads, scale, q_stride, max_partitions);
            });
        lmgate_emu::launch(dim3(num_seqs, num_kv_heads * G), dim3(HD), [&] {
          lmgate::paged_decode_reduce<T, HD>(static_cast<T*>(out), acc.data(), m.data(),
                                             l.data(), context_lens, max_partitions, out_stride);
        });
      });
    });
  });
}

int emu_paged_prefill(int dtype, int head_dim, int block_size, int group, void* out,
                      const void* q, const void* k_cache, const void* v_cache,
                      const int* query_start_loc, const int* context_lens,
                      const int* block_tables, int num_seqs, int num_tokens, int max_blocks,
                      int num_kv_heads, float scale, long long q_stride, long long out_stride) {
  return with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    return with_shape(head_dim, block_size, group, [&](auto hd, auto bs, auto g) {
      return guarded([&] {
        lmgate_emu::launch(dim3(num_tokens, num_kv_heads), dim3(lmgate::kAttnThreads), [&] {
          lmgate::paged_prefill<T, decltype(hd)::value, decltype(bs)::value, decltype(g)::value>(
              static_cast<T*>(out), static_cast<const T*>(q), static_cast<const T*>(k_cache),
              static_cast<const T*>(v_cache), query_start_loc, context_lens, block_tables,
              num_seqs, max_blocks, num_kv_heads, scale, q_stride, out_stride);
        });
      });
    });
  });
}

}  // extern "C"
