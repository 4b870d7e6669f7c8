// Paged attention over the block-table KV cache: decode and (causal) prefill.
//
// Both kernels are the same row kernel: one thread block computes the output of
// ONE query row for the GROUP query heads that share ONE kv head, so each K/V
// element is read from memory once per row (GQA without copies):
//
//   decode:  grid (num_seqs,   num_kv_heads)   row = the sequence's new token,
//                                              visible = context_len
//   prefill: grid (num_tokens, num_kv_heads)   row = query token j of sequence s,
//                                              visible = C - Q + j + 1 (causal,
//                                              query tokens are the LAST Q of C)
//
// Inside a block, NUM_WARPS warps split the visible positions round-robin; the
// 32 lanes of a warp split HEAD_DIM (lane l holds elements l, l+32, ...), so a
// K/V row load is coalesced. Each warp runs an online softmax (running max m,
// running sum l, running weighted V sum acc) in fp32 for its GROUP heads; the
// warps' partial states are merged through shared memory at the end.
//
// Prefill re-reads the prefix once per query row (no tensor-core tiling): it is
// memory-bound like decode, and correct for any mix of cached prefix and chunk.
#include "common.cuh"

namespace lmgate {

constexpr int kAttnThreads = 128;
constexpr int kAttnWarps = kAttnThreads / kWarpSize;

// The block's softmax state over positions [begin, end) of one sequence, for the
// GROUP query heads of `kv_head`. At the end every (g, d) in GROUP x HEAD_DIM is
// handed to `sink(idx = g * HEAD_DIM + d, g, d, m, l, acc)` by exactly one thread:
// m = max score, l = sum of e^(score - m), acc = sum of e^(score - m) * v[d]
// (an empty range gives m = -inf, l = acc = 0).
template <typename T, int HEAD_DIM, int BLOCK_SIZE, int GROUP, typename Sink>
__device__ __forceinline__ void attend_range(
    const T* __restrict__ q,  // GROUP * HEAD_DIM query elements of this kv head's query heads
    const T* __restrict__ k_cache, const T* __restrict__ v_cache,
    const int* __restrict__ block_table,  // this sequence's row of the block tables
    int begin, int end, int kv_head, int num_kv_heads, float scale, Sink sink) {
  static_assert(HEAD_DIM % kWarpSize == 0, "HEAD_DIM must be a multiple of 32");
  constexpr int PER_LANE = HEAD_DIM / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;

  float q_reg[GROUP][PER_LANE];
  float m[GROUP], l[GROUP], acc[GROUP][PER_LANE];
#pragma unroll
  for (int g = 0; g < GROUP; ++g) {
    m[g] = neg_inf();
    l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
      q_reg[g][i] = to_float(q[g * HEAD_DIM + lane + i * kWarpSize]) * scale;
      acc[g][i] = 0.f;
    }
  }

  const long long row = static_cast<long long>(num_kv_heads) * HEAD_DIM;
  for (int t = begin + warp; t < end; t += kAttnWarps) {
    const long long block = block_table[t / BLOCK_SIZE];
    const long long base = (block * BLOCK_SIZE + t % BLOCK_SIZE) * row + kv_head * HEAD_DIM;
    float k_reg[PER_LANE], v_reg[PER_LANE];
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
      k_reg[i] = to_float(k_cache[base + lane + i * kWarpSize]);
      v_reg[i] = to_float(v_cache[base + lane + i * kWarpSize]);
    }
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < PER_LANE; ++i) s += q_reg[g][i] * k_reg[i];
      s = warp_sum(s);  // every lane holds the score
      const float m_new = fmaxf(m[g], s);
      const float correction = __expf(m[g] - m_new);  // 0 on the first position (m = -inf)
      const float p = __expf(s - m_new);
      l[g] = l[g] * correction + p;
#pragma unroll
      for (int i = 0; i < PER_LANE; ++i) acc[g][i] = acc[g][i] * correction + p * v_reg[i];
      m[g] = m_new;
    }
  }

  // Merge the warps: out = sum_w acc_w * e^(m_w - M) / sum_w l_w * e^(m_w - M).
  __shared__ float s_m[kAttnWarps][GROUP];
  __shared__ float s_l[kAttnWarps][GROUP];
  __shared__ float s_acc[kAttnWarps][GROUP][HEAD_DIM];
#pragma unroll
  for (int g = 0; g < GROUP; ++g) {
    if (lane == 0) {
      s_m[warp][g] = m[g];
      s_l[warp][g] = l[g];
    }
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) s_acc[warp][g][lane + i * kWarpSize] = acc[g][i];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < GROUP * HEAD_DIM; idx += kAttnThreads) {
    const int g = idx / HEAD_DIM;
    const int d = idx % HEAD_DIM;
    float m_all = neg_inf();
#pragma unroll
    for (int w = 0; w < kAttnWarps; ++w) m_all = fmaxf(m_all, s_m[w][g]);
    float denom = 0.f, numer = 0.f;
#pragma unroll
    for (int w = 0; w < kAttnWarps; ++w) {
      // A warp that saw no position has m = -inf and l = acc = 0: its weight is 0.
      const float weight = s_m[w][g] == neg_inf() ? 0.f : __expf(s_m[w][g] - m_all);
      denom += s_l[w][g] * weight;
      numer += s_acc[w][g][d] * weight;
    }
    sink(idx, g, d, m_all, denom, numer);
  }
}

template <typename T, int HEAD_DIM, int BLOCK_SIZE, int GROUP>
__device__ __forceinline__ void attend_row(T* __restrict__ out,  // GROUP * HEAD_DIM outputs
                                           const T* __restrict__ q, const T* __restrict__ k_cache,
                                           const T* __restrict__ v_cache,
                                           const int* __restrict__ block_table, int visible,
                                           int kv_head, int num_kv_heads, float scale) {
  attend_range<T, HEAD_DIM, BLOCK_SIZE, GROUP>(
      q, k_cache, v_cache, block_table, 0, visible, kv_head, num_kv_heads, scale,
      [out](int idx, int, int, float, float l, float acc) {
        out[idx] = from_float<T>(l > 0.f ? acc / l : 0.f);
      });
}

// grid (num_seqs, num_kv_heads), block kAttnThreads.
template <typename T, int HEAD_DIM, int BLOCK_SIZE, int GROUP>
__global__ void __launch_bounds__(kAttnThreads)
    paged_decode(T* __restrict__ out,      // (num_seqs, num_heads, HEAD_DIM), row stride out_stride
                 const T* __restrict__ q,  // (num_seqs, num_heads, HEAD_DIM), row stride q_stride
                 const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                 const int* __restrict__ block_tables,  // (num_seqs, max_blocks)
                 const int* __restrict__ context_lens,  // (num_seqs,)
                 int max_blocks, int num_kv_heads, float scale, long long q_stride,
                 long long out_stride) {
  const int seq = blockIdx.x;
  const int kv_head = blockIdx.y;
  const long long head_offset = static_cast<long long>(kv_head) * GROUP * HEAD_DIM;
  attend_row<T, HEAD_DIM, BLOCK_SIZE, GROUP>(
      out + seq * out_stride + head_offset, q + seq * q_stride + head_offset, k_cache, v_cache,
      block_tables + static_cast<long long>(seq) * max_blocks, context_lens[seq], kv_head,
      num_kv_heads, scale);
}

// grid (num_tokens, num_kv_heads), block kAttnThreads. Tokens of sequence s are
// rows query_start_loc[s] .. query_start_loc[s + 1] - 1 of q and out.
template <typename T, int HEAD_DIM, int BLOCK_SIZE, int GROUP>
__global__ void __launch_bounds__(kAttnThreads)
    paged_prefill(T* __restrict__ out, const T* __restrict__ q, const T* __restrict__ k_cache,
                  const T* __restrict__ v_cache,
                  const int* __restrict__ query_start_loc,  // (num_seqs + 1,)
                  const int* __restrict__ context_lens,     // (num_seqs,)
                  const int* __restrict__ block_tables,     // (num_seqs, max_blocks)
                  int num_seqs, int max_blocks, int num_kv_heads, float scale,
                  long long q_stride, long long out_stride) {
  const int token = blockIdx.x;
  const int kv_head = blockIdx.y;
  // The sequence holding this token: the last s with query_start_loc[s] <= token.
  int lo = 0, hi = num_seqs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (query_start_loc[mid] <= token) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int seq = lo;
  const int query_len = query_start_loc[seq + 1] - query_start_loc[seq];
  const int visible = context_lens[seq] - query_len + (token - query_start_loc[seq]) + 1;
  const long long head_offset = static_cast<long long>(kv_head) * GROUP * HEAD_DIM;
  attend_row<T, HEAD_DIM, BLOCK_SIZE, GROUP>(
      out + token * out_stride + head_offset, q + token * q_stride + head_offset, k_cache,
      v_cache, block_tables + static_cast<long long>(seq) * max_blocks, visible, kv_head,
      num_kv_heads, scale);
}

// ---- split-context decode (flash-decoding) for small batches ----------------
//
// With few sequences, grid (num_seqs, num_kv_heads) leaves most SMs idle. The
// partitioned path gives every kPartitionSize positions of a context their own
// thread block, which writes its unnormalised softmax state (m, l, acc) to an
// fp32 workspace; a second kernel merges the partitions of each (seq, head).
//
//   workspace  part_acc (num_seqs, num_heads, max_partitions, HEAD_DIM) fp32
//              part_m, part_l (num_seqs, num_heads, max_partitions) fp32
constexpr int kPartitionSize = 256;

// grid (num_seqs, num_kv_heads, max_partitions), block kAttnThreads.
template <typename T, int HEAD_DIM, int BLOCK_SIZE, int GROUP>
__global__ void __launch_bounds__(kAttnThreads)
    paged_decode_partitioned(float* __restrict__ part_acc, float* __restrict__ part_m,
                             float* __restrict__ part_l, const T* __restrict__ q,
                             const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                             const int* __restrict__ block_tables,
                             const int* __restrict__ context_lens, int max_blocks,
                             int num_kv_heads, float scale, long long q_stride,
                             int max_partitions) {
  const int seq = blockIdx.x;
  const int kv_head = blockIdx.y;
  const int part = blockIdx.z;
  const int context = context_lens[seq];
  const int begin = part * kPartitionSize;
  if (begin >= context) return;  // whole block leaves: the reduce never reads this partition
  const int end = min(begin + kPartitionSize, context);
  const long long head_offset = static_cast<long long>(kv_head) * GROUP * HEAD_DIM;
  const long long first_head = static_cast<long long>(seq) * num_kv_heads * GROUP + kv_head * GROUP;
  attend_range<T, HEAD_DIM, BLOCK_SIZE, GROUP>(
      q + seq * q_stride + head_offset, k_cache, v_cache,
      block_tables + static_cast<long long>(seq) * max_blocks, begin, end, kv_head,
      num_kv_heads, scale,
      [=](int, int g, int d, float m, float l, float acc) {
        const long long slot = (first_head + g) * max_partitions + part;
        part_acc[slot * HEAD_DIM + d] = acc;
        if (d == 0) {
          part_m[slot] = m;
          part_l[slot] = l;
        }
      });
}

// grid (num_seqs, num_heads), block HEAD_DIM threads: one output element each.
template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(HEAD_DIM)
    paged_decode_reduce(T* __restrict__ out, const float* __restrict__ part_acc,
                        const float* __restrict__ part_m, const float* __restrict__ part_l,
                        const int* __restrict__ context_lens, int max_partitions,
                        long long out_stride) {
  const int seq = blockIdx.x;
  const int head = blockIdx.y;
  const int d = threadIdx.x;
  // min(): a context longer than the launcher's max_context_len must not read past
  // the workspace (its output is then wrong, as the contract was broken, but memory-safe)
  const int parts = min((context_lens[seq] + kPartitionSize - 1) / kPartitionSize, max_partitions);
  const long long first = (static_cast<long long>(seq) * gridDim.y + head) * max_partitions;
  float m_all = neg_inf();
  for (int p = 0; p < parts; ++p) m_all = fmaxf(m_all, part_m[first + p]);
  float denom = 0.f, numer = 0.f;
  for (int p = 0; p < parts; ++p) {
    const float weight = __expf(part_m[first + p] - m_all);
    denom += part_l[first + p] * weight;
    numer += part_acc[(first + p) * HEAD_DIM + d] * weight;
  }
  out[seq * out_stride + static_cast<long long>(head) * HEAD_DIM + d] =
      from_float<T>(denom > 0.f ? numer / denom : 0.f);
}

}  // namespace lmgate
