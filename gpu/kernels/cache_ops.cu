// KV-cache maintenance kernels: scatter new tokens into their slots, and
// copy-on-write block copies across every layer's cache.
//
// Cache layout (see gpu/attention/__init__.py):
//   cache[num_blocks][BLOCK_SIZE][num_kv_heads][HEAD_DIM], slot = block * BLOCK_SIZE + offset
#include "common.cuh"

namespace lmgate {

// grid: (num_tokens), block: any multiple of 32 threads.
// One thread block stores one token's K and V rows (num_kv_heads * head_dim
// elements each); a negative slot means "padding token, skip" (uniform per block).
template <typename T>
__global__ void write_kv(const T* __restrict__ key,    // (num_tokens, row) with row stride key_stride
                         const T* __restrict__ value,  // (num_tokens, row) with row stride value_stride
                         T* __restrict__ k_cache, T* __restrict__ v_cache,
                         const long long* __restrict__ slot_mapping,  // (num_tokens,)
                         int row,  // num_kv_heads * head_dim
                         long long key_stride, long long value_stride) {
  const long long token = blockIdx.x;
  const long long slot = slot_mapping[token];
  if (slot < 0) return;
  const T* k_src = key + token * key_stride;
  const T* v_src = value + token * value_stride;
  T* k_dst = k_cache + slot * row;
  T* v_dst = v_cache + slot * row;
  for (int i = threadIdx.x; i < row; i += blockDim.x) {
    k_dst[i] = k_src[i];
    v_dst[i] = v_src[i];
  }
}

// grid: (num_pairs, num_caches), block: any.
// cache_ptrs holds the address of every cache tensor (all layers, K and V);
// block src[i] is copied to dst[i] in 32-bit words (a block's byte size is a
// multiple of 4 because head_dim is even). The caller guarantees that no
// destination is also a source in the same call.
__global__ void copy_blocks(const unsigned long long* __restrict__ cache_ptrs,
                            const long long* __restrict__ src, const long long* __restrict__ dst,
                            long long words_per_block) {
  unsigned int* cache = reinterpret_cast<unsigned int*>(cache_ptrs[blockIdx.y]);
  const unsigned int* from = cache + src[blockIdx.x] * words_per_block;
  unsigned int* to = cache + dst[blockIdx.x] * words_per_block;
  for (long long i = threadIdx.x; i < words_per_block; i += blockDim.x) {
    to[i] = from[i];
  }
}

}  // namespace lmgate
