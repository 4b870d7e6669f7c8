// Paged attention for the CPU, read straight from the paged KV cache (no gathered
// copy): decode (one query token per sequence attends to its whole context) and
// prefill (a chunk of prompt tokens per sequence, causal; see prefill_avx512).
//
// Decode contract: gpu/attention/__init__.py (AttentionBackend.decode). Layout:
//   query         (B, nh, hd)                 float32 or bfloat16, contiguous
//   k/v cache     (num_blocks, bs, nkv, hd)   same dtype, contiguous
//   block_tables  (B, W) int32,  context_lens (B,) int32
// Two implementations of that contract, same algorithm (softmax in float32, online,
// every key/value row read from memory once for all the query heads that share it):
//   decode_avx512  head_dim 64 or 128 on an AVX-512 CPU: one work item per sequence,
//                  16-position tiles, vector exp, dynamic OpenMP schedule;
//   decode_avx2    head_dim 32, 64 or 128 on an AVX2 + FMA CPU (x86-64 since Haswell
//                  and Zen 1): the same scheme in 8-wide registers, 8-position tiles;
//   decode_impl    anything else: one work item per (sequence, kv head), rescale
//                  once per block of `bs` positions.
// `paged_decode(..., kernel)` runs the widest one that handles the shape ("auto") or the
// one named, so the tests check every kernel this CPU can run against the reference.
// Prefill the same way: prefill_avx512 (head_dim 64, 128) and prefill_avx2 (32, 64,
// 128), `paged_prefill(..., kernel)`; a shape neither handles takes the torch path.
// Built with -fopenmp (gpu/attention/cpu_native.py) so both use torch's threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <string>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

template <typename T>
inline float to_f(T x) { return static_cast<float>(x); }

template <typename T>
void decode_impl(const T* q, const T* kc, const T* vc, const int32_t* tables, const int32_t* ctx, T* out,
                 int64_t B, int64_t nh, int64_t hd, int64_t bs, int64_t nkv, int64_t W, float scale) {
  const int64_t group = nh / nkv;
  at::parallel_for(0, B * nkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * hd), acc(group * hd), m(group), l(group), s(group * bs), row(hd);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / nkv, h = item % nkv;
      const int64_t n = ctx[b];
      for (int64_t j = 0; j < group; ++j)
        for (int64_t d = 0; d < hd; ++d) qf[j * hd + d] = to_f(q[(b * nh + h * group + j) * hd + d]) * scale;
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);
      for (int64_t start = 0; start < n; start += bs) {
        const int64_t blk = tables[b * W + start / bs];
        const int64_t cnt = std::min(bs, n - start);
        // scores of this block: s[j][t] = q_j . k_t
        for (int64_t t = 0; t < cnt; ++t) {
          const T* k = kc + ((blk * bs + t) * nkv + h) * hd;
          for (int64_t d = 0; d < hd; ++d) row[d] = to_f(k[d]);
          for (int64_t j = 0; j < group; ++j) {
            const float* qj = &qf[j * hd];
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < hd; ++d) dot += qj[d] * row[d];
            s[j * bs + t] = dot;
          }
        }
        // online softmax: rescale once per block, then accumulate values
        for (int64_t j = 0; j < group; ++j) {
          float bmax = m[j];
          for (int64_t t = 0; t < cnt; ++t) bmax = std::max(bmax, s[j * bs + t]);
          const float corr = std::exp(m[j] - bmax);  // exp(-inf) = 0 on the first block
          l[j] *= corr;
          float* aj = &acc[j * hd];
          for (int64_t d = 0; d < hd; ++d) aj[d] *= corr;
          m[j] = bmax;
          for (int64_t t = 0; t < cnt; ++t) {
            const float p = std::exp(s[j * bs + t] - bmax);
            s[j * bs + t] = p;
            l[j] += p;
          }
        }
        for (int64_t t = 0; t < cnt; ++t) {
          const T* v = vc + ((blk * bs + t) * nkv + h) * hd;
          for (int64_t d = 0; d < hd; ++d) row[d] = to_f(v[d]);
          for (int64_t j = 0; j < group; ++j) {
            const float p = s[j * bs + t];
            float* aj = &acc[j * hd];
            for (int64_t d = 0; d < hd; ++d) aj[d] += p * row[d];
          }
        }
      }
      for (int64_t j = 0; j < group; ++j) {
        const float inv = l[j] > 0.f ? 1.f / l[j] : 0.f;
        T* o = out + (b * nh + h * group + j) * hd;
        for (int64_t d = 0; d < hd; ++d) o[d] = static_cast<T>(acc[j * hd + d] * inv);
      }
    }
  });
}

// ---------------------------------------------------------------- prefill work items
// The prefill kernels' unit of work (both vector widths): sequence s's query rows
// q0..q0+PQ (one tile of its chunk), for every kv head. Sorted most expensive first
// (cost ~ queries × visible keys), so dynamically scheduled threads balance the causal
// triangle: the long tails start first instead of last.
struct PrefillItem {
  int64_t s, q0, cost;
};

inline std::vector<PrefillItem> prefill_items(const int32_t* qsl, const int32_t* ctx, int64_t S, int64_t PQ) {
  std::vector<PrefillItem> items;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t n_q = qsl[s + 1] - qsl[s];
    for (int64_t q0 = 0; q0 < n_q; q0 += PQ) {
      const int64_t nq = std::min(PQ, n_q - q0);
      items.push_back({s, q0, nq * (ctx[s] - n_q + q0 + nq)});
    }
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const PrefillItem& a, const PrefillItem& b) { return a.cost > b.cost; });
  return items;
}

// One work item under kv head h: its rows are the G query heads of each of its queries
// (row r = query r / G, at position pos0 + r / G, head h * G + r % G); `first` is its
// first query's row in q/out, and keys [0, kend) are seen by some row.
struct PrefillTile {
  int64_t s, h, first, pos0, kend, rows;
};

inline PrefillTile prefill_tile(const PrefillItem& item, int64_t h, const int32_t* qsl, const int32_t* ctx,
                                int64_t PQ, int64_t G) {
  const int64_t n_q = qsl[item.s + 1] - qsl[item.s];
  const int64_t nq = std::min(PQ, n_q - item.q0);
  const int64_t pos0 = ctx[item.s] - n_q + item.q0;
  return {item.s, h, qsl[item.s] + item.q0, pos0, pos0 + nq, nq * G};
}

// A tile's prologue in both kernels: its query rows widened to float and pre-scaled
// into qf (rows × hd), the online-softmax state reset (acc = 0, m = -inf, l = 0).
template <typename T>
inline void prefill_begin(const T* q, const PrefillTile& t, int64_t nh, int64_t G, int64_t hd, float scale,
                          float* qf, float* acc, float* m, float* l) {
  for (int64_t r = 0; r < t.rows; ++r) {
    const T* src = q + ((t.first + r / G) * nh + t.h * G + r % G) * hd;
    for (int64_t d = 0; d < hd; ++d) qf[r * hd + d] = static_cast<float>(src[d]) * scale;
  }
  std::fill(acc, acc + t.rows * hd, 0.f);
  std::fill(m, m + t.rows, -std::numeric_limits<float>::infinity());
  std::fill(l, l + t.rows, 0.f);
}

// A tile's epilogue: each row's accumulator divided by its softmax sum, written to out
// (a row that saw no key, impossible under the causal contract, writes zeros).
template <typename T>
inline void prefill_end(const PrefillTile& t, int64_t nh, int64_t G, int64_t hd, const float* acc, const float* l,
                        T* out) {
  for (int64_t r = 0; r < t.rows; ++r) {
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
    T* o = out + ((t.first + r / G) * nh + t.h * G + r % G) * hd;
    for (int64_t d = 0; d < hd; ++d) o[d] = static_cast<T>(acc[r * hd + d] * inv);
  }
}

#if defined(__AVX2__)
// Software prefetch of the K and V rows of positions [pos, pos + tile) of sequence b
// (clipped to its block and context). Blocks are scattered through the cache, so
// the hardware prefetcher restarts at every block; asking for the tile two ahead
// keeps the loads in flight while the current tile computes.
template <typename T>
inline void prefetch_tile(const T* kc, const T* vc, const int32_t* tables, int64_t b, int64_t W, int64_t bs,
                          int64_t row, int64_t pos, int64_t n, int64_t tile = 16) {
  if (pos >= n) return;
  const int64_t blk = tables[b * W + pos / bs], off = pos % bs;
  const int64_t cnt = std::min<int64_t>({tile, n - pos, bs - off});
  const char* k = reinterpret_cast<const char*>(kc + (blk * bs + off) * row);
  const char* v = reinterpret_cast<const char*>(vc + (blk * bs + off) * row);
  const int64_t bytes = cnt * row * static_cast<int64_t>(sizeof(T));
  for (int64_t i = 0; i < bytes; i += 64) {
    _mm_prefetch(k + i, _MM_HINT_T0);
    _mm_prefetch(v + i, _MM_HINT_T0);
  }
}

#endif

#if defined(__AVX2__) && defined(__FMA__)
constexpr bool kHasAvx2 = true;
// ---------------------------------------------------------------- AVX2 path
// decode_avx512's scheme in 8-wide registers, for the x86 CPUs without AVX-512 (Zen 1-3,
// most client Intel parts): one work item per sequence; keys in tiles of up to 8
// positions inside one block, so a tile's 8 scores fill one register (one reduce8
// instead of 8 horizontal sums) and its softmax is a handful of vector ops. Until this
// path existed those CPUs ran decode_impl, whose scalar exp and per-score reductions
// made decode attention ~10x slower per context token than on AVX-512 (bench_kernels).

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  // bfloat16 is the top half of a float32: widen to 32 bits and shift into place
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

// exp(x) for x <= 0, the same Cephes polynomial as exp512; 2^n built in the exponent
// bits (n >= -126 after the clamp, so the result is a normal float).
inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

// Horizontal sums of 8 vectors at once: lane t of the result is the sum of a[t]'s lanes.
inline __m256 reduce8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1);  // [a0..a3 partial sums of lanes 0-3 | of lanes 4-7]
  const __m256 u1 = _mm256_hadd_ps(t2, t3);  // the same for a4..a7
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

template <typename T, int NV>
void decode_avx2(const T* q, const T* kc, const T* vc, const int32_t* tables, const int32_t* ctx, T* out,
                 int64_t B, int64_t nh, int64_t bs, int64_t nkv, int64_t W, float scale) {
  static_assert(NV >= 2, "two dot-product accumulators per score");
  constexpr int64_t hd = NV * 8;
  const int64_t group = nh / nkv;
  const int64_t row = nkv * hd;  // elements between consecutive positions of one block
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> qf(nh * hd), acc(nh * hd), m(nh), l(nh);
    __m256 dots[8];
    alignas(32) float p[8];
    const __m256 iota = _mm256_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f);
    const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = ctx[b];
      for (int64_t i = 0; i < nh * hd; ++i) qf[i] = static_cast<float>(q[b * nh * hd + i]) * scale;
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);
      prefetch_tile(kc, vc, tables, b, W, bs, row, 8, n, 8);
      for (int64_t start = 0, cnt = 0; start < n; start += cnt) {
        const int64_t blk = tables[b * W + start / bs];
        const int64_t off = start % bs;
        cnt = std::min<int64_t>({8, n - start, bs - off});  // a tile never straddles two blocks
        const __m256 valid = _mm256_cmp_ps(iota, _mm256_set1_ps(static_cast<float>(cnt)), _CMP_LT_OQ);
        prefetch_tile(kc, vc, tables, b, W, bs, row, start + cnt + 8, n, 8);
        for (int64_t h = 0; h < nkv; ++h) {
          const T* k0 = kc + (blk * bs + off) * row + h * hd;
          const T* v0 = vc + (blk * bs + off) * row + h * hd;
          for (int64_t hq = h * group; hq < (h + 1) * group; ++hq) {
            const float* qh = &qf[hq * hd];
            for (int64_t t = 0; t < 8; ++t) {
              if (t >= cnt) {
                dots[t] = _mm256_setzero_ps();
                continue;
              }
              const T* k = k0 + t * row;
              __m256 d0 = _mm256_mul_ps(_mm256_loadu_ps(qh), load8(k));
              __m256 d1 = _mm256_mul_ps(_mm256_loadu_ps(qh + 8), load8(k + 8));
              for (int v = 2; v < NV; v += 2) {
                d0 = _mm256_fmadd_ps(_mm256_loadu_ps(qh + v * 8), load8(k + v * 8), d0);
                if (v + 1 < NV) d1 = _mm256_fmadd_ps(_mm256_loadu_ps(qh + v * 8 + 8), load8(k + v * 8 + 8), d1);
              }
              dots[t] = _mm256_add_ps(d0, d1);
            }
            const __m256 sv = _mm256_blendv_ps(ninf, reduce8(dots), valid);
            const float mnew = std::max(m[hq], hmax8(sv));
            const float corr = std::exp(m[hq] - mnew);  // 0 on the first tile (m = -inf)
            const __m256 pv = _mm256_and_ps(valid, exp256(_mm256_sub_ps(sv, _mm256_set1_ps(mnew))));
            l[hq] = l[hq] * corr + hsum8(pv);
            m[hq] = mnew;
            _mm256_store_ps(p, pv);
            float* ah = &acc[hq * hd];
            const __m256 c = _mm256_set1_ps(corr);
            for (int c0 = 0; c0 < NV; c0 += 8) {  // at most 8 accumulator registers at a time
              const int nv = std::min(NV - c0, 8);
              __m256 a[8];
              for (int v = 0; v < nv; ++v) a[v] = _mm256_mul_ps(_mm256_loadu_ps(ah + (c0 + v) * 8), c);
              for (int64_t t = 0; t < cnt; ++t) {
                const T* vr = v0 + t * row + c0 * 8;
                const __m256 pt = _mm256_set1_ps(p[t]);
                for (int v = 0; v < nv; ++v) a[v] = _mm256_fmadd_ps(pt, load8(vr + v * 8), a[v]);
              }
              for (int v = 0; v < nv; ++v) _mm256_storeu_ps(ah + (c0 + v) * 8, a[v]);
            }
          }
        }
      }
      for (int64_t hq = 0; hq < nh; ++hq) {
        const float inv = l[hq] > 0.f ? 1.f / l[hq] : 0.f;
        T* o = out + (b * nh + hq) * hd;
        for (int64_t d = 0; d < hd; ++d) o[d] = static_cast<T>(acc[hq * hd + d] * inv);
      }
    }
  }
}

template <typename T>
bool decode_avx2_dispatch(const T* q, const T* kc, const T* vc, const int32_t* tables, const int32_t* ctx, T* out,
                          int64_t B, int64_t nh, int64_t hd, int64_t bs, int64_t nkv, int64_t W, float scale) {
  if (hd == 32) {
    decode_avx2<T, 4>(q, kc, vc, tables, ctx, out, B, nh, bs, nkv, W, scale);
  } else if (hd == 64) {
    decode_avx2<T, 8>(q, kc, vc, tables, ctx, out, B, nh, bs, nkv, W, scale);
  } else if (hd == 128) {
    decode_avx2<T, 16>(q, kc, vc, tables, ctx, out, B, nh, bs, nkv, W, scale);
  } else {
    return false;
  }
  return true;
}

// In-register transpose of an 8 × 8 float tile: r[i][j] → r[j][i] (32-bit and 64-bit
// interleaves within 128-bit lanes, then one round of lane swaps).
inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int g = 0; g < 8; g += 4) {  // u[g + c], lane L of each half: column 4·half + c of rows g..g+3
    u[g] = _mm256_shuffle_ps(t[g], t[g + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[g + 1] = _mm256_shuffle_ps(t[g], t[g + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[g + 2] = _mm256_shuffle_ps(t[g + 1], t[g + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[g + 3] = _mm256_shuffle_ps(t[g + 1], t[g + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
    r[4 + c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
  }
}

// Scores of RB query rows (`qb`, hd floats each) against a tile of 16 keys stored
// transposed (`kt[d][16]`): RB × 2 registers of broadcast-FMAs, written to `out` once
// at the end. A function of its own so the accumulators stay in registers: declared in
// the caller's loop, whose softmax indexes them by row, GCC kept them on the stack and
// stored every FMA's result (perf annotate: half the kernel's samples on those stores).
template <int RB, int64_t hd>
inline void score_block16(const float* qb, const float* kt, float (*out)[16]) {
  __m256 acc[RB][2];
#pragma GCC unroll 8
  for (int u = 0; u < RB; ++u) acc[u][0] = acc[u][1] = _mm256_setzero_ps();
  for (int64_t d = 0; d < hd; ++d) {
    const __m256 ka = _mm256_load_ps(kt + d * 16), kb = _mm256_load_ps(kt + d * 16 + 8);
#pragma GCC unroll 8
    for (int u = 0; u < RB; ++u) {
      const __m256 qd = _mm256_broadcast_ss(qb + u * hd + d);
      acc[u][0] = _mm256_fmadd_ps(qd, ka, acc[u][0]);
      acc[u][1] = _mm256_fmadd_ps(qd, kb, acc[u][1]);
    }
  }
#pragma GCC unroll 8
  for (int u = 0; u < RB; ++u) {
    _mm256_store_ps(out[u], acc[u][0]);
    _mm256_store_ps(out[u] + 8, acc[u][1]);
  }
}

// Causal prefill over the paged cache (contract and work items: the prefill section
// below) in 8-wide registers. Not prefill_avx512's scheme at half width: with 8-key
// tiles the per-row softmax of a tile and the p · V loop (a load of V and of the
// accumulator per FMA) left it slower than the torch path. Instead, per key tile of up
// to 16 positions (two registers; transposed once into `kt`, values widened once into
// `vf`) and per block of RB = 6 rows:
//   scores  6 × 16 in 12 registers, hd broadcast-FMA steps (2 loads + 6 broadcasts
//           per 12 FMAs);
//   softmax per row, online, over the tile's 16 lanes;
//   p · V   a 6-row × 16-dim register block per pass over the tile's keys (2 loads +
//           6 broadcasts per 12 FMAs), the accumulators read and written once per tile.
// Until this kernel, prefill on AVX2-only CPUs took the torch path (a gathered copy of
// each context and SDPA per sequence).
template <typename T, int NV>
void prefill_avx2(const T* q, const T* kc, const T* vc, const int32_t* qsl, const int32_t* ctx,
                  const int32_t* tables, T* out, int64_t S, int64_t nh, int64_t bs, int64_t nkv, int64_t W,
                  float scale) {
  static_assert(NV % 2 == 0, "p · V takes 16 dims (two registers) per pass");
  constexpr int64_t hd = NV * 8;
  constexpr int KT = 16;  // key positions per tile
  constexpr int RB = 6;   // rows per block: 12 score / accumulator registers
  const int64_t G = nh / nkv;
  const int64_t PQ = std::max<int64_t>(16, (64 / G + 15) / 16 * 16);
  const int64_t row = nkv * hd;
  const std::vector<PrefillItem> items = prefill_items(qsl, ctx, S, PQ);
  const int64_t n_items = static_cast<int64_t>(items.size()) * nkv;
  const int64_t max_rows = PQ * G;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    // RB spare rows in qf and acc: a partial row block computes them (results unused)
    std::vector<float> qf((max_rows + RB) * hd, 0.f), acc((max_rows + RB) * hd, 0.f), m(max_rows), l(max_rows);
    alignas(32) float kt[hd * KT];
    alignas(32) float vf[KT * hd];
    alignas(32) float sc[RB][KT];
    alignas(32) float p[RB][KT];
    float corr[RB];
    const __m256 iota0 = _mm256_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f);
    const __m256 iota1 = _mm256_add_ps(iota0, _mm256_set1_ps(8.f));
    const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < n_items; ++it) {
      const PrefillTile tile = prefill_tile(items[it / nkv], it % nkv, qsl, ctx, PQ, G);
      const int64_t h = tile.h, s = tile.s, pos0 = tile.pos0, kend = tile.kend, rows = tile.rows;
      prefill_begin(q, tile, nh, G, hd, scale, qf.data(), acc.data(), m.data(), l.data());
      for (int64_t start = 0, cnt = 0; start < kend; start += cnt) {
        const int64_t blk = tables[s * W + start / bs];
        const int64_t off = start % bs;
        cnt = std::min<int64_t>({KT, kend - start, bs - off});  // a tile never straddles two blocks
        const T* k0 = kc + (blk * bs + off) * row + h * hd;
        const T* v0 = vc + (blk * bs + off) * row + h * hd;
        for (int half = 0; half < 2; ++half) {  // kt[d][t] = k[t][d], zero past the tile's end
          for (int v = 0; v < NV; ++v) {
            __m256 r[8];
            for (int64_t t = 0; t < 8; ++t) {
              const int64_t pos = half * 8 + t;
              r[t] = pos < cnt ? load8(k0 + pos * row + v * 8) : _mm256_setzero_ps();
            }
            transpose8(r);
            for (int i = 0; i < 8; ++i) _mm256_store_ps(kt + (v * 8 + i) * KT + half * 8, r[i]);
          }
        }
        for (int64_t t = 0; t < cnt; ++t)
          for (int v = 0; v < NV; ++v) _mm256_store_ps(vf + t * hd + v * 8, load8(v0 + t * row + v * 8));
        const bool partial = start + cnt - 1 > pos0;  // the causal edge crosses this tile
        for (int64_t r0 = 0; r0 < rows; r0 += RB) {
          score_block16<RB, hd>(&qf[r0 * hd], kt, sc);
          int64_t tmax = 0;  // keys any row of the block sees
          for (int u = 0; u < RB; ++u) {
            const int64_t r = r0 + u;
            const int64_t seen = r >= rows ? 0 : partial ? std::clamp<int64_t>(pos0 + r / G - start + 1, 0, cnt) : cnt;
            if (seen == 0) {  // past the block's rows, or the whole tile lies after this row's position
              corr[u] = 1.f;
              _mm256_store_ps(p[u], _mm256_setzero_ps());
              _mm256_store_ps(p[u] + 8, _mm256_setzero_ps());
              continue;
            }
            tmax = std::max(tmax, seen);
            const __m256 fs = _mm256_set1_ps(static_cast<float>(seen));
            const __m256 va = _mm256_cmp_ps(iota0, fs, _CMP_LT_OQ), vb = _mm256_cmp_ps(iota1, fs, _CMP_LT_OQ);
            const __m256 sa = _mm256_blendv_ps(ninf, _mm256_load_ps(sc[u]), va);
            const __m256 sb = _mm256_blendv_ps(ninf, _mm256_load_ps(sc[u] + 8), vb);
            const float mnew = std::max(m[r], hmax8(_mm256_max_ps(sa, sb)));
            corr[u] = std::exp(m[r] - mnew);  // 0 on the first tile (m = -inf)
            const __m256 mv = _mm256_set1_ps(mnew);
            const __m256 pa = _mm256_and_ps(va, exp256(_mm256_sub_ps(sa, mv)));
            const __m256 pb = _mm256_and_ps(vb, exp256(_mm256_sub_ps(sb, mv)));
            l[r] = l[r] * corr[u] + hsum8(_mm256_add_ps(pa, pb));
            m[r] = mnew;
            _mm256_store_ps(p[u], pa);
            _mm256_store_ps(p[u] + 8, pb);
          }
          if (tmax == 0) continue;  // acc unchanged (every corr is 1)
          float* ab = &acc[r0 * hd];
          for (int c0 = 0; c0 < NV; c0 += 2) {
            __m256 a[RB][2];
            for (int u = 0; u < RB; ++u) {
              const __m256 cu = _mm256_set1_ps(corr[u]);
              a[u][0] = _mm256_mul_ps(_mm256_loadu_ps(ab + u * hd + c0 * 8), cu);
              a[u][1] = _mm256_mul_ps(_mm256_loadu_ps(ab + u * hd + c0 * 8 + 8), cu);
            }
            for (int64_t t = 0; t < tmax; ++t) {
              const __m256 x0 = _mm256_load_ps(vf + t * hd + c0 * 8), x1 = _mm256_load_ps(vf + t * hd + c0 * 8 + 8);
              for (int u = 0; u < RB; ++u) {
                const __m256 pt = _mm256_broadcast_ss(&p[u][t]);
                a[u][0] = _mm256_fmadd_ps(pt, x0, a[u][0]);
                a[u][1] = _mm256_fmadd_ps(pt, x1, a[u][1]);
              }
            }
            for (int u = 0; u < RB; ++u) {
              _mm256_storeu_ps(ab + u * hd + c0 * 8, a[u][0]);
              _mm256_storeu_ps(ab + u * hd + c0 * 8 + 8, a[u][1]);
            }
          }
        }
      }
      prefill_end(tile, nh, G, hd, acc.data(), l.data(), out);
    }
  }
}

template <typename T>
bool prefill_avx2_dispatch(const T* q, const T* kc, const T* vc, const int32_t* qsl, const int32_t* ctx,
                           const int32_t* tables, T* out, int64_t S, int64_t nh, int64_t hd, int64_t bs,
                           int64_t nkv, int64_t W, float scale) {
  if (hd == 32) {
    prefill_avx2<T, 4>(q, kc, vc, qsl, ctx, tables, out, S, nh, bs, nkv, W, scale);
  } else if (hd == 64) {
    prefill_avx2<T, 8>(q, kc, vc, qsl, ctx, tables, out, S, nh, bs, nkv, W, scale);
  } else if (hd == 128) {
    prefill_avx2<T, 16>(q, kc, vc, qsl, ctx, tables, out, S, nh, bs, nkv, W, scale);
  } else {
    return false;
  }
  return true;
}
#else
constexpr bool kHasAvx2 = false;
template <typename T>
bool decode_avx2_dispatch(const T*, const T*, const T*, const int32_t*, const int32_t*, T*,
                          int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float) {
  return false;
}
template <typename T>
bool prefill_avx2_dispatch(const T*, const T*, const T*, const int32_t*, const int32_t*, const int32_t*, T*,
                           int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float) {
  return false;
}
#endif

#if defined(__AVX512F__)
constexpr bool kHasAvx512 = true;
// ---------------------------------------------------------------- AVX-512 path
// Same contract and algorithm as decode_impl, vectorized by hand: a key/value row of
// head_dim floats is NV zmm registers. Keys are taken in tiles of up to 16 positions
// (within one cache block), so a tile's 16 scores fill one register and the softmax
// of a tile (max, exp, sum) is three vector ops.

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  // bfloat16 is the top half of a float32: widen to 32 bits and shift into place
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// exp(x) for x <= 0 (scores minus their running max), Cephes expf polynomial:
// relative error ~1e-7, like std::exp in float32. Inputs below -87 give 0-ish values
// that the caller masks out or that vanish in the sum anyway.
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, n);
}

template <typename T, int NV>
void decode_avx512(const T* q, const T* kc, const T* vc, const int32_t* tables, const int32_t* ctx, T* out,
                   int64_t B, int64_t nh, int64_t bs, int64_t nkv, int64_t W, float scale) {
  constexpr int64_t hd = NV * 16;
  const int64_t group = nh / nkv;
  const int64_t row = nkv * hd;  // elements between consecutive positions of one block
  // One work item = one sequence, all its heads: a tile of 16 positions is then a
  // contiguous run of memory (16 × nkv × hd) read once, front to back, and reused from
  // L1 by every query head. Contexts differ in length, so items are handed out
  // dynamically (a static split leaves one thread idle behind the long sequences).
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> qf(nh * hd), acc(nh * hd), m(nh), l(nh);
    alignas(64) float p[16];
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = ctx[b];
      for (int64_t i = 0; i < nh * hd; ++i) qf[i] = static_cast<float>(q[b * nh * hd + i]) * scale;
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);
      prefetch_tile(kc, vc, tables, b, W, bs, row, 16, n);
      for (int64_t start = 0, cnt = 0; start < n; start += cnt) {
        const int64_t blk = tables[b * W + start / bs];
        const int64_t off = start % bs;
        cnt = std::min<int64_t>({16, n - start, bs - off});  // a tile never straddles two blocks
        const __mmask16 valid = static_cast<__mmask16>((1u << cnt) - 1u);
        prefetch_tile(kc, vc, tables, b, W, bs, row, start + cnt + 16, n);
        for (int64_t h = 0; h < nkv; ++h) {
          const T* k0 = kc + (blk * bs + off) * row + h * hd;
          const T* v0 = vc + (blk * bs + off) * row + h * hd;
          for (int64_t hq = h * group; hq < (h + 1) * group; ++hq) {
            __m512 qv[NV];
            for (int v = 0; v < NV; ++v) qv[v] = _mm512_loadu_ps(&qf[hq * hd + v * 16]);
            for (int64_t t = 0; t < cnt; ++t) {
              const T* k = k0 + t * row;
              __m512 dot = _mm512_mul_ps(qv[0], load16(k));
              for (int v = 1; v < NV; ++v) dot = _mm512_fmadd_ps(qv[v], load16(k + v * 16), dot);
              p[t] = _mm512_reduce_add_ps(dot);
            }
            const __m512 sv =
                _mm512_mask_loadu_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), valid, p);
            const float mnew = std::max(m[hq], _mm512_reduce_max_ps(sv));
            const float corr = std::exp(m[hq] - mnew);  // 0 on the first tile (m = -inf)
            const __m512 pv = _mm512_maskz_mov_ps(valid, exp512(_mm512_sub_ps(sv, _mm512_set1_ps(mnew))));
            l[hq] = l[hq] * corr + _mm512_reduce_add_ps(pv);
            m[hq] = mnew;
            _mm512_store_ps(p, pv);
            __m512 a[NV];
            const __m512 c = _mm512_set1_ps(corr);
            for (int v = 0; v < NV; ++v) a[v] = _mm512_mul_ps(_mm512_loadu_ps(&acc[hq * hd + v * 16]), c);
            for (int64_t t = 0; t < cnt; ++t) {
              const T* vr = v0 + t * row;
              const __m512 pt = _mm512_set1_ps(p[t]);
              for (int v = 0; v < NV; ++v) a[v] = _mm512_fmadd_ps(pt, load16(vr + v * 16), a[v]);
            }
            for (int v = 0; v < NV; ++v) _mm512_storeu_ps(&acc[hq * hd + v * 16], a[v]);
          }
        }
      }
      for (int64_t hq = 0; hq < nh; ++hq) {
        const float inv = l[hq] > 0.f ? 1.f / l[hq] : 0.f;
        T* o = out + (b * nh + hq) * hd;
        for (int64_t d = 0; d < hd; ++d) o[d] = static_cast<T>(acc[hq * hd + d] * inv);
      }
    }
  }
}

// Horizontal sums of 16 vectors at once: lane t of the result is the sum of the 16
// lanes of a[t]. A transpose-and-add tree (15 adds, 31 shuffles for all 16) instead
// of 16 separate reductions (~8 dependent ops each).
inline __m512 reduce16(const __m512* a) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)  // fold 128-bit lanes (0,1)+(2,3): b[i] = [a[2i] x8 | a[2i+1] x8]
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
  for (int j = 0; j < 4; ++j)  // fold again: each 128-bit lane holds 4 partials of one row
    c[j] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * j], b[2 * j + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * j], b[2 * j + 1], 0xDD));
  for (int k = 0; k < 2; ++k) {  // 4 partials -> 2, pairs of floats as doubles
    const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(c[2 * k]), _mm512_castps_pd(c[2 * k + 1]));
    const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(c[2 * k]), _mm512_castps_pd(c[2 * k + 1]));
    d[k] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
  }
  const __m512 e = _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], 0x88), _mm512_shuffle_ps(d[0], d[1], 0xDD));
  // e's lane l holds row perm[l]; this permutation is its own inverse
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), e);
}

// decode_avx512 for G = nh / nkv query heads per KV head known at compile time, when the
// G heads' accumulators fit in registers (G * NV <= 16). Same contract, same tiles; per
// tile and KV head each key and value row is loaded (and, for bfloat16, widened) once
// for all G heads, and the 16 scores of a head come out of one reduce16 — about half
// the instructions of decode_avx512, whose per-score reductions dominated its time.
template <typename T, int NV, int G>
void decode_avx512_grouped(const T* q, const T* kc, const T* vc, const int32_t* tables, const int32_t* ctx, T* out,
                           int64_t B, int64_t nh, int64_t bs, int64_t nkv, int64_t W, float scale) {
  static_assert(G * NV <= 16, "accumulators must fit in registers");
  constexpr int64_t hd = NV * 16;
  const int64_t row = nkv * hd;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> qf(nh * hd), acc(nh * hd), m(nh), l(nh);
    alignas(64) __m512 dots[G][16];
    alignas(64) float p[G][16];
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = ctx[b];
      for (int64_t i = 0; i < nh * hd; ++i) qf[i] = static_cast<float>(q[b * nh * hd + i]) * scale;
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);
      prefetch_tile(kc, vc, tables, b, W, bs, row, 16, n);
      for (int64_t start = 0, cnt = 0; start < n; start += cnt) {
        const int64_t blk = tables[b * W + start / bs];
        const int64_t off = start % bs;
        cnt = std::min<int64_t>({16, n - start, bs - off});  // a tile never straddles two blocks
        const __mmask16 valid = static_cast<__mmask16>((1u << cnt) - 1u);
        prefetch_tile(kc, vc, tables, b, W, bs, row, start + cnt + 16, n);
        for (int64_t h = 0; h < nkv; ++h) {
          const T* k0 = kc + (blk * bs + off) * row + h * hd;
          const T* v0 = vc + (blk * bs + off) * row + h * hd;
          const float* qh = &qf[h * G * hd];
          __m512 qv[G][NV];
          for (int j = 0; j < G; ++j)
            for (int v = 0; v < NV; ++v) qv[j][v] = _mm512_loadu_ps(qh + j * hd + v * 16);
          for (int64_t t = 0; t < 16; ++t) {
            if (t >= cnt) {
              for (int j = 0; j < G; ++j) dots[j][t] = _mm512_setzero_ps();
              continue;
            }
            __m512 kr[NV];
            for (int v = 0; v < NV; ++v) kr[v] = load16(k0 + t * row + v * 16);
            for (int j = 0; j < G; ++j) {
              __m512 dot = _mm512_mul_ps(qv[j][0], kr[0]);
              for (int v = 1; v < NV; ++v) dot = _mm512_fmadd_ps(qv[j][v], kr[v], dot);
              dots[j][t] = dot;
            }
          }
          float corr[G];
          for (int j = 0; j < G; ++j) {
            const int64_t hq = h * G + j;
            const __m512 sv = _mm512_mask_mov_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), valid,
                                                 reduce16(dots[j]));
            const float mnew = std::max(m[hq], _mm512_reduce_max_ps(sv));
            corr[j] = std::exp(m[hq] - mnew);  // 0 on the first tile (m = -inf)
            const __m512 pv = _mm512_maskz_mov_ps(valid, exp512(_mm512_sub_ps(sv, _mm512_set1_ps(mnew))));
            l[hq] = l[hq] * corr[j] + _mm512_reduce_add_ps(pv);
            m[hq] = mnew;
            _mm512_store_ps(p[j], pv);
          }
          __m512 a[G][NV];
          for (int j = 0; j < G; ++j) {
            const __m512 c = _mm512_set1_ps(corr[j]);
            for (int v = 0; v < NV; ++v) a[j][v] = _mm512_mul_ps(_mm512_loadu_ps(&acc[(h * G + j) * hd + v * 16]), c);
          }
          for (int64_t t = 0; t < cnt; ++t) {
            __m512 vr[NV];
            for (int v = 0; v < NV; ++v) vr[v] = load16(v0 + t * row + v * 16);
            for (int j = 0; j < G; ++j) {
              const __m512 pt = _mm512_set1_ps(p[j][t]);
              for (int v = 0; v < NV; ++v) a[j][v] = _mm512_fmadd_ps(pt, vr[v], a[j][v]);
            }
          }
          for (int j = 0; j < G; ++j)
            for (int v = 0; v < NV; ++v) _mm512_storeu_ps(&acc[(h * G + j) * hd + v * 16], a[j][v]);
        }
      }
      for (int64_t hq = 0; hq < nh; ++hq) {
        const float inv = l[hq] > 0.f ? 1.f / l[hq] : 0.f;
        T* o = out + (b * nh + hq) * hd;
        for (int64_t d = 0; d < hd; ++d) o[d] = static_cast<T>(acc[hq * hd + d] * inv);
      }
    }
  }
}

// ---------------------------------------------------------------- prefill
// Causal attention of a step's prompt chunks, read straight from the paged cache
// (contract: AttentionBackend.prefill). Sequence s owns query rows qsl[s]:qsl[s+1],
// the last n_q positions of its context of ctx[s] tokens, so query i of s sits at
// position ctx[s] - n_q + i and sees keys 0..that position.
//
// Work item = (sequence, kv head, tile of up to PQ query positions); its PQ × G
// query rows (the G query heads sharing the kv head; PQ = 64 / G rounded up to a
// multiple of 16, so every key tile serves at least 64 rows) walk the visible keys in
// 16-position tiles. Per key tile the keys are transposed once into `kt` (hd × 16
// floats) so a row's 16 scores are hd broadcast-FMAs with no horizontal sums, for
// 8 rows at a time (8 independent accumulators); the values are widened once into
// `vf` and each row accumulates p · V in registers. Softmax is online in float32,
// as in the decode kernels. Items are handed out dynamically, most expensive
// first (cost ~ queries × visible keys), so the causal triangle balances.
// In-register transpose of a 16 × 16 float tile: r[i][j] → r[j][i]. 32-bit then
// 64-bit interleaves within 128-bit lanes, then two rounds of lane shuffles.
inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // u[g + c], lane L: column 4L + c of rows g..g+3
    const __m512d a = _mm512_castps_pd(t[g]), b = _mm512_castps_pd(t[g + 1]);
    const __m512d c = _mm512_castps_pd(t[g + 2]), d = _mm512_castps_pd(t[g + 3]);
    u[g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    u[g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    u[g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    u[g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 v0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88), v1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);
    const __m512 v2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
    const __m512 v3 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
    r[c] = _mm512_shuffle_f32x4(v0, v2, 0x88);
    r[4 + c] = _mm512_shuffle_f32x4(v1, v3, 0x88);
    r[8 + c] = _mm512_shuffle_f32x4(v0, v2, 0xDD);
    r[12 + c] = _mm512_shuffle_f32x4(v1, v3, 0xDD);
  }
}

// Scores of RB query rows (`qb`, hd floats each, pre-scaled) against a tile of 16 keys
// transposed into `kt` (hd x 16): sc[u] lane t = sum over d of q[u][d] * k[t][d], one FMA
// per d in order — each row's bits depend on nothing but that row and the keys.
template <int RB, int64_t hd>
inline void score_rows16(const float* qb, const float* kt, __m512* sc) {
  for (int u = 0; u < RB; ++u) sc[u] = _mm512_setzero_ps();
  for (int64_t d = 0; d < hd; ++d) {
    const __m512 kd = _mm512_load_ps(kt + d * 16);
    for (int u = 0; u < RB; ++u) sc[u] = _mm512_fmadd_ps(_mm512_set1_ps(qb[u * hd + d]), kd, sc[u]);
  }
}

template <typename T, int NV>
void prefill_avx512(const T* q, const T* kc, const T* vc, const int32_t* qsl, const int32_t* ctx,
                    const int32_t* tables, T* out, int64_t S, int64_t nh, int64_t bs, int64_t nkv, int64_t W,
                    float scale) {
  constexpr int64_t hd = NV * 16;
  constexpr int RB = 8;  // rows per score block
  const int64_t G = nh / nkv;
  const int64_t PQ = std::max<int64_t>(16, (64 / G + 15) / 16 * 16);
  const int64_t row = nkv * hd;
  const std::vector<PrefillItem> items = prefill_items(qsl, ctx, S, PQ);
  const int64_t n_items = static_cast<int64_t>(items.size()) * nkv;
  const int64_t max_rows = PQ * G;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    // qf has RB spare rows: a partial score block reads them (results unused)
    std::vector<float> qf((max_rows + RB) * hd, 0.f), acc(max_rows * hd), m(max_rows), l(max_rows);
    alignas(64) float kt[hd * 16];
    alignas(64) float vf[16 * hd];
    alignas(64) float p[16];
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < n_items; ++it) {
      const PrefillTile tile = prefill_tile(items[it / nkv], it % nkv, qsl, ctx, PQ, G);
      const int64_t h = tile.h, s = tile.s, pos0 = tile.pos0, kend = tile.kend, rows = tile.rows;
      prefill_begin(q, tile, nh, G, hd, scale, qf.data(), acc.data(), m.data(), l.data());
      for (int64_t start = 0, cnt = 0; start < kend; start += cnt) {
        const int64_t blk = tables[s * W + start / bs];
        const int64_t off = start % bs;
        cnt = std::min<int64_t>({16, kend - start, bs - off});  // a tile never straddles two blocks
        const T* k0 = kc + (blk * bs + off) * row + h * hd;
        const T* v0 = vc + (blk * bs + off) * row + h * hd;
        for (int v = 0; v < NV; ++v) {  // kt[d][t] = k[t][d], zero past the tile's end
          __m512 r[16];
          for (int64_t t = 0; t < 16; ++t) r[t] = t < cnt ? load16(k0 + t * row + v * 16) : _mm512_setzero_ps();
          transpose16(r);
          for (int i = 0; i < 16; ++i) _mm512_store_ps(kt + (v * 16 + i) * 16, r[i]);
        }
        for (int64_t t = 0; t < cnt; ++t)
          for (int v = 0; v < NV; ++v) _mm512_store_ps(vf + t * hd + v * 16, load16(v0 + t * row + v * 16));
        const bool partial = start + cnt - 1 > pos0;  // the causal edge crosses this tile
        for (int64_t r0 = 0; r0 < rows; r0 += RB) {
          __m512 sc[RB];
          const float* qb = &qf[r0 * hd];
          // a short tail (a decode's G rows, a chunk's last rows) scores 4 or 2 rows, not 8:
          // the same FMA chain per row, so the same bits, for half the work or less
          if (rows - r0 > 4) score_rows16<RB, hd>(qb, kt, sc);
          else if (rows - r0 > 2) score_rows16<4, hd>(qb, kt, sc);
          else score_rows16<2, hd>(qb, kt, sc);
          for (int u = 0; u < RB && r0 + u < rows; ++u) {
            const int64_t r = r0 + u;
            const int64_t seen = partial ? std::clamp<int64_t>(pos0 + r / G - start + 1, 0, cnt) : cnt;
            if (seen == 0) continue;  // the whole tile lies after this row's position
            const __mmask16 valid = static_cast<__mmask16>((1u << seen) - 1u);
            const __m512 sv = _mm512_mask_mov_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), valid, sc[u]);
            const float mnew = std::max(m[r], _mm512_reduce_max_ps(sv));
            const float corr = std::exp(m[r] - mnew);  // 0 on the first tile (m = -inf)
            const __m512 pv = _mm512_maskz_mov_ps(valid, exp512(_mm512_sub_ps(sv, _mm512_set1_ps(mnew))));
            l[r] = l[r] * corr + _mm512_reduce_add_ps(pv);
            m[r] = mnew;
            _mm512_store_ps(p, pv);
            float* ar = &acc[r * hd];
            __m512 a[NV];
            const __m512 c = _mm512_set1_ps(corr);
            for (int v = 0; v < NV; ++v) a[v] = _mm512_mul_ps(_mm512_loadu_ps(ar + v * 16), c);
            for (int64_t t = 0; t < seen; ++t) {
              const __m512 pt = _mm512_set1_ps(p[t]);
              for (int v = 0; v < NV; ++v) a[v] = _mm512_fmadd_ps(pt, _mm512_load_ps(vf + t * hd + v * 16), a[v]);
            }
            for (int v = 0; v < NV; ++v) _mm512_storeu_ps(ar + v * 16, a[v]);
          }
        }
      }
      prefill_end(tile, nh, G, hd, acc.data(), l.data(), out);
    }
  }
}

template <typename T>
bool prefill_fast(const T* q, const T* kc, const T* vc, const int32_t* qsl, const int32_t* ctx,
                  const int32_t* tables, T* out, int64_t S, int64_t nh, int64_t hd, int64_t bs, int64_t nkv,
                  int64_t W, float scale) {
  if (hd == 64) {
    prefill_avx512<T, 4>(q, kc, vc, qsl, ctx, tables, out, S, nh, bs, nkv, W, scale);
  } else if (hd == 128) {
    prefill_avx512<T, 8>(q, kc, vc, qsl, ctx, tables, out, S, nh, bs, nkv, W, scale);
  } else {
    return false;
  }
  return true;
}

// head_dim 64 and 128 cover the Llama family; anything else takes the portable loop
template <typename T>
bool decode_fast(const T* q, const T* kc, const T* vc, const int32_t* tables, const int32_t* ctx, T* out,
                 int64_t B, int64_t nh, int64_t hd, int64_t bs, int64_t nkv, int64_t W, float scale) {
  const int64_t group = nh / nkv;
  using Fn = void (*)(const T*, const T*, const T*, const int32_t*, const int32_t*, T*, int64_t, int64_t, int64_t,
                      int64_t, int64_t, float);
  Fn grouped = nullptr;
  if (hd == 64 && group >= 1 && group <= 4) {
    constexpr Fn by_group[] = {decode_avx512_grouped<T, 4, 1>, decode_avx512_grouped<T, 4, 2>,
                               decode_avx512_grouped<T, 4, 3>, decode_avx512_grouped<T, 4, 4>};
    grouped = by_group[group - 1];
  } else if (hd == 128 && group >= 1 && group <= 2) {
    constexpr Fn by_group[] = {decode_avx512_grouped<T, 8, 1>, decode_avx512_grouped<T, 8, 2>};
    grouped = by_group[group - 1];
  }
  if (grouped != nullptr) {
    grouped(q, kc, vc, tables, ctx, out, B, nh, bs, nkv, W, scale);
  } else if (hd == 64) {
    decode_avx512<T, 4>(q, kc, vc, tables, ctx, out, B, nh, bs, nkv, W, scale);
  } else if (hd == 128) {
    decode_avx512<T, 8>(q, kc, vc, tables, ctx, out, B, nh, bs, nkv, W, scale);
  } else {
    return false;
  }
  return true;
}
#else
constexpr bool kHasAvx512 = false;
template <typename T>
bool prefill_fast(const T*, const T*, const T*, const int32_t*, const int32_t*, const int32_t*, T*,
                  int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float) {
  return false;
}
template <typename T>
bool decode_fast(const T*, const T*, const T*, const int32_t*, const int32_t*, T*,
                 int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float) {
  return false;
}
#endif

// Decode kernels by name, widest first; "auto" takes the first that handles the shape.
enum class Decode { kAvx512, kAvx2, kPortable };

bool decode_compiled(Decode k) {
  return k == Decode::kPortable || (k == Decode::kAvx2 && kHasAvx2) || (k == Decode::kAvx512 && kHasAvx512);
}

// Which kernels handle head_dim `hd` here (the vectorized ones specialize head sizes).
bool decode_handles(Decode k, int64_t hd) {
  switch (k) {
    case Decode::kAvx512: return kHasAvx512 && (hd == 64 || hd == 128);
    case Decode::kAvx2: return kHasAvx2 && (hd == 32 || hd == 64 || hd == 128);
    case Decode::kPortable: return true;
  }
  return false;
}

const char* decode_name(Decode k) {
  switch (k) {
    case Decode::kAvx512: return "avx512";
    case Decode::kAvx2: return "avx2";
    case Decode::kPortable: return "portable";
  }
  return "?";
}

constexpr Decode kDecodeOrder[] = {Decode::kAvx512, Decode::kAvx2, Decode::kPortable};

Decode decode_choice(const std::string& kernel, int64_t hd) {
  if (kernel == "auto") {
    for (Decode k : kDecodeOrder)
      if (decode_handles(k, hd)) return k;
  }
  for (Decode k : kDecodeOrder) {
    if (kernel != decode_name(k)) continue;
    TORCH_CHECK(decode_compiled(k), "decode kernel '", kernel, "' is not built for this CPU");
    TORCH_CHECK(decode_handles(k, hd), "decode kernel '", kernel, "' does not handle head_dim ", hd);
    return k;
  }
  TORCH_CHECK(false, "unknown decode kernel '", kernel, "' (auto, avx512, avx2 or portable)");
  return Decode::kPortable;
}

template <typename T>
void decode_dispatch(Decode kernel, const T* q, const T* kc, const T* vc, const int32_t* tables, const int32_t* ctx,
                     T* out, int64_t B, int64_t nh, int64_t hd, int64_t bs, int64_t nkv, int64_t W, float scale) {
  bool done = false;
  if (kernel == Decode::kAvx512) done = decode_fast<T>(q, kc, vc, tables, ctx, out, B, nh, hd, bs, nkv, W, scale);
  if (kernel == Decode::kAvx2) done = decode_avx2_dispatch<T>(q, kc, vc, tables, ctx, out, B, nh, hd, bs, nkv, W, scale);
  if (!done) decode_impl<T>(q, kc, vc, tables, ctx, out, B, nh, hd, bs, nkv, W, scale);
}

// Prefill kernels by name, widest first. No portable C++ prefill: a shape neither
// vector kernel handles ("none") takes the torch backend's path in Python.
enum class Prefill { kAvx512, kAvx2, kNone };

bool prefill_compiled(Prefill k) { return (k == Prefill::kAvx2 && kHasAvx2) || (k == Prefill::kAvx512 && kHasAvx512); }

bool prefill_handles(Prefill k, int64_t hd) {
  switch (k) {
    case Prefill::kAvx512: return kHasAvx512 && (hd == 64 || hd == 128);
    case Prefill::kAvx2: return kHasAvx2 && (hd == 32 || hd == 64 || hd == 128);
    case Prefill::kNone: return false;
  }
  return false;
}

const char* prefill_name(Prefill k) {
  switch (k) {
    case Prefill::kAvx512: return "avx512";
    case Prefill::kAvx2: return "avx2";
    case Prefill::kNone: return "none";
  }
  return "?";
}

constexpr Prefill kPrefillOrder[] = {Prefill::kAvx512, Prefill::kAvx2};

Prefill prefill_choice(const std::string& kernel, int64_t hd) {
  if (kernel == "auto") {
    for (Prefill k : kPrefillOrder)
      if (prefill_handles(k, hd)) return k;
    return Prefill::kNone;
  }
  for (Prefill k : kPrefillOrder) {
    if (kernel != prefill_name(k)) continue;
    TORCH_CHECK(prefill_compiled(k), "prefill kernel '", kernel, "' is not built for this CPU");
    TORCH_CHECK(prefill_handles(k, hd), "prefill kernel '", kernel, "' does not handle head_dim ", hd);
    return k;
  }
  TORCH_CHECK(false, "unknown prefill kernel '", kernel, "' (auto, avx512 or avx2)");
  return Prefill::kNone;
}

template <typename T>
bool prefill_dispatch(Prefill kernel, const T* q, const T* kc, const T* vc, const int32_t* qsl, const int32_t* ctx,
                      const int32_t* tables, T* out, int64_t S, int64_t nh, int64_t hd, int64_t bs, int64_t nkv,
                      int64_t W, float scale) {
  if (kernel == Prefill::kAvx512) return prefill_fast<T>(q, kc, vc, qsl, ctx, tables, out, S, nh, hd, bs, nkv, W, scale);
  if (kernel == Prefill::kAvx2)
    return prefill_avx2_dispatch<T>(q, kc, vc, qsl, ctx, tables, out, S, nh, hd, bs, nkv, W, scale);
  return false;
}

}  // namespace

torch::Tensor paged_decode(torch::Tensor query, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_tables, torch::Tensor context_lens, double scale,
                           const std::string& kernel) {
  TORCH_CHECK(query.dim() == 3 && k_cache.dim() == 4, "query (B, nh, hd) and caches (N, bs, nkv, hd)");
  TORCH_CHECK(query.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous inputs");
  TORCH_CHECK(query.scalar_type() == k_cache.scalar_type() && k_cache.scalar_type() == v_cache.scalar_type(),
              "query and caches must share a dtype");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 && context_lens.scalar_type() == torch::kInt32,
              "block_tables and context_lens must be int32");
  auto tables = block_tables.contiguous();
  auto ctx = context_lens.contiguous();
  const int64_t B = query.size(0), nh = query.size(1), hd = query.size(2);
  const int64_t bs = k_cache.size(1), nkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == hd && nh % nkv == 0, "head shapes do not match");
  const Decode which = decode_choice(kernel, hd);
  auto out = torch::empty_like(query);
  if (query.scalar_type() == torch::kFloat32) {
    decode_dispatch<float>(which, query.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                       tables.data_ptr<int32_t>(), ctx.data_ptr<int32_t>(), out.data_ptr<float>(),
                       B, nh, hd, bs, nkv, tables.size(1), static_cast<float>(scale));
  } else if (query.scalar_type() == torch::kBFloat16) {
    using bf = c10::BFloat16;
    decode_dispatch<bf>(which, query.data_ptr<bf>(), k_cache.data_ptr<bf>(), v_cache.data_ptr<bf>(),
                    tables.data_ptr<int32_t>(), ctx.data_ptr<int32_t>(), out.data_ptr<bf>(),
                    B, nh, hd, bs, nkv, tables.size(1), static_cast<float>(scale));
  } else {
    TORCH_CHECK(false, "paged_decode supports float32 and bfloat16, got ", query.scalar_type());
  }
  return out;
}

std::vector<std::string> decode_kernels() {
  std::vector<std::string> out;
  for (Decode k : kDecodeOrder)
    if (decode_compiled(k)) out.emplace_back(decode_name(k));
  return out;
}

std::string decode_kernel_for(int64_t head_dim) { return decode_name(decode_choice("auto", head_dim)); }

std::vector<std::string> prefill_kernels() {
  std::vector<std::string> out;
  for (Prefill k : kPrefillOrder)
    if (prefill_compiled(k)) out.emplace_back(prefill_name(k));
  return out;
}

std::string prefill_kernel_for(int64_t head_dim) { return prefill_name(prefill_choice("auto", head_dim)); }

bool prefill_supported(int64_t head_dim) { return prefill_choice("auto", head_dim) != Prefill::kNone; }

// Inputs validated by the caller (gpu/attention/torch_backend.py `_check_prefill`):
// query_start_loc partitions the query rows, every chunk fits its context, the block
// tables are wide enough for the longest context.
torch::Tensor paged_prefill(torch::Tensor query, torch::Tensor k_cache, torch::Tensor v_cache,
                            torch::Tensor query_start_loc, torch::Tensor context_lens, torch::Tensor block_tables,
                            double scale, const std::string& kernel) {
  TORCH_CHECK(query.dim() == 3 && k_cache.dim() == 4, "query (T, nh, hd) and caches (N, bs, nkv, hd)");
  TORCH_CHECK(query.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous inputs");
  TORCH_CHECK(query.scalar_type() == k_cache.scalar_type() && k_cache.scalar_type() == v_cache.scalar_type(),
              "query and caches must share a dtype");
  TORCH_CHECK(query_start_loc.scalar_type() == torch::kInt32 && context_lens.scalar_type() == torch::kInt32 &&
                  block_tables.scalar_type() == torch::kInt32,
              "query_start_loc, context_lens and block_tables must be int32");
  const int64_t nh = query.size(1), hd = query.size(2);
  const int64_t bs = k_cache.size(1), nkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == hd && nh % nkv == 0, "head shapes do not match");
  const Prefill which = prefill_choice(kernel, hd);
  TORCH_CHECK(which != Prefill::kNone, "no prefill kernel here handles head_dim ", hd,
              " (AVX-512: 64 or 128; AVX2: 32, 64 or 128)");
  auto qsl = query_start_loc.contiguous();
  auto ctx = context_lens.contiguous();
  auto tables = block_tables.contiguous();
  const int64_t S = ctx.size(0);
  auto out = torch::empty_like(query);
  bool done = false;
  if (query.scalar_type() == torch::kFloat32) {
    done = prefill_dispatch<float>(which, query.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                               qsl.data_ptr<int32_t>(), ctx.data_ptr<int32_t>(), tables.data_ptr<int32_t>(),
                               out.data_ptr<float>(), S, nh, hd, bs, nkv, tables.size(1), static_cast<float>(scale));
  } else if (query.scalar_type() == torch::kBFloat16) {
    using bf = c10::BFloat16;
    done = prefill_dispatch<bf>(which, query.data_ptr<bf>(), k_cache.data_ptr<bf>(), v_cache.data_ptr<bf>(),
                            qsl.data_ptr<int32_t>(), ctx.data_ptr<int32_t>(), tables.data_ptr<int32_t>(),
                            out.data_ptr<bf>(), S, nh, hd, bs, nkv, tables.size(1), static_cast<float>(scale));
  }
  TORCH_CHECK(done, "paged_prefill supports float32 and bfloat16, got ", query.scalar_type());
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "paged decode attention over the block tables (CPU)",
        py::arg("query"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"), py::arg("context_lens"),
        py::arg("scale"), py::arg("kernel") = "auto");
  m.def("decode_kernels", &decode_kernels, "the decode kernels built for this CPU, widest first");
  m.def("decode_kernel_for", &decode_kernel_for, "the decode kernel 'auto' runs for this head_dim");
  m.def("paged_prefill", &paged_prefill, "causal prefill attention of prompt chunks over the paged cache (CPU)",
        py::arg("query"), py::arg("k_cache"), py::arg("v_cache"), py::arg("query_start_loc"),
        py::arg("context_lens"), py::arg("block_tables"), py::arg("scale"), py::arg("kernel") = "auto");
  m.def("prefill_kernels", &prefill_kernels, "the prefill kernels built for this CPU, widest first");
  m.def("prefill_kernel_for", &prefill_kernel_for, "the prefill kernel 'auto' runs for this head_dim ('none': torch)");
  m.def("prefill_supported", &prefill_supported, "whether paged_prefill handles this head_dim on this CPU");
}
