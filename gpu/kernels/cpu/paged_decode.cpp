// Paged decode attention for the CPU: one query token per sequence attends to its
// whole context, read straight from the paged KV cache (no gathered copy).
//
// Contract: gpu/attention/__init__.py (AttentionBackend.decode). Layout:
//   query         (B, nh, hd)                 float32 or bfloat16, contiguous
//   k/v cache     (num_blocks, bs, nkv, hd)   same dtype, contiguous
//   block_tables  (B, W) int32,  context_lens (B,) int32
// Work item = (sequence, kv head): it serves the `group = nh / nkv` query heads of
// that KV head, so every key/value row is read from memory once. Softmax is
// computed in float32, online over blocks of `bs` positions (one rescale per block).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

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

}  // namespace

torch::Tensor paged_decode(torch::Tensor query, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_tables, torch::Tensor context_lens, double scale) {
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
  auto out = torch::empty_like(query);
  if (query.scalar_type() == torch::kFloat32) {
    decode_impl<float>(query.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                       tables.data_ptr<int32_t>(), ctx.data_ptr<int32_t>(), out.data_ptr<float>(),
                       B, nh, hd, bs, nkv, tables.size(1), static_cast<float>(scale));
  } else if (query.scalar_type() == torch::kBFloat16) {
    using bf = c10::BFloat16;
    decode_impl<bf>(query.data_ptr<bf>(), k_cache.data_ptr<bf>(), v_cache.data_ptr<bf>(),
                    tables.data_ptr<int32_t>(), ctx.data_ptr<int32_t>(), out.data_ptr<bf>(),
                    B, nh, hd, bs, nkv, tables.size(1), static_cast<float>(scale));
  } else {
    TORCH_CHECK(false, "paged_decode supports float32 and bfloat16, got ", query.scalar_type());
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "paged decode attention over the block tables (CPU)");
}
