// LoRA updates of small row groups for the CPU (gpu/layer_ops.py: `lora_rows_` and its
// torch reference; gpu/lora.py: where it is used).
//
//   lora_rows_(out, x, segment, a, bt, span) (in place) out[t] += (x[t] a[s]ᵀ) bt[s] for each row t whose
//                                                       segment s = segment[t] is >= 0 (LoRA updates of
//                                                       decode-sized row groups; a[s] (R, in), bt[s] (R, out)
//                                                       float32, row r of bt[s] zero outside columns
//                                                       span[s][r]; the sum is rounded to out's dtype once)
//
// Built apart from layer_ops.cpp: this file is compiled with FMA contraction and 512-bit
// vectors preferred (gpu/layer_ops.py), which layer_ops.cpp must not be (RoPE's roundings
// follow torch's separate multiplies). Without them the loops below ran at ~6 multiply-adds
// a cycle on an AMX Xeon; rows are split across torch's threads (-fopenmp).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

#include "cpu_common.h"


// LoRA update of each row with an adapter: h = A x (R dot products over the input), then
// out += Btᵀ h (R axpys over the output row, accumulated in float32 from out's value and
// rounded once). One row is ~R·(in + out) multiply-adds: a decode step's rows are cheaper
// here than as two small GEMMs per adapter, whose fixed cost (~30 us each in bf16) dominated.
// Rows run in tiles of up to kLoraTile consecutive rows of one segment, the rank loop
// outside the row loop, so a row of A or Bt is read from memory once per tile and from L1
// for the other rows (per row, the gate/up weights of one rank-8 adapter are ~230 KB).
// Row r of Bt is non-zero only in columns [span[r][0], span[r][1]) — a fused projection's
// part (q, k or v; gate or up) — so the update reads only those (a third of QKV's Bt).
constexpr int64_t kLoraTile = 8;

// 16 floats in GCC's generic vectors: one AVX-512 register, two AVX2 ones elsewhere
typedef float vf16 __attribute__((vector_size(64)));
inline vf16 vload(const float* p) {
  vf16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void vstore(float* p, vf16 v) { std::memcpy(p, &v, sizeof v); }
inline float hsum(vf16 v) {
  float out = 0.f;
  for (int k = 0; k < 16; ++k) out += v[k];
  return out;
}

template <typename E, typename S = typename E::S>
void lora_rows(S* out, int64_t so, const S* x, int64_t sx, const int32_t* seg, int64_t rows, int64_t n_in,
               int64_t n_out, const std::vector<const float*>& a, const std::vector<const float*>& bt,
               const std::vector<const int64_t*>& span, const std::vector<int64_t>& rank, int64_t max_rank) {
  std::vector<int64_t> tiles;  // first row of each tile; a tile ends at the next start
  for (int64_t t = 0; t < rows;) {
    tiles.push_back(t);
    const int32_t s = seg[t];
    int64_t n = 1;
    while (t + n < rows && n < kLoraTile && seg[t + n] == s) ++n;
    t += n;
  }
  tiles.push_back(rows);
  const int64_t ntiles = static_cast<int64_t>(tiles.size()) - 1;
  at::parallel_for(0, ntiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xf_buf(kLoraTile * n_in), h_buf(kLoraTile * std::max<int64_t>(max_rank, 1)),
        acc_buf(kLoraTile * n_out);
    for (int64_t k = begin; k < end; ++k) {
      const int64_t t0 = tiles[k], n = tiles[k + 1] - t0;
      const int32_t s = seg[t0];
      if (s < 0 || rank[s] == 0) continue;
      const int64_t R = rank[s];
      for (int64_t j = 0; j < n; ++j) {
        const S* xr = x + (t0 + j) * sx;
        float* xf = xf_buf.data() + j * n_in;
#pragma omp simd
        for (int64_t i = 0; i < n_in; ++i) xf[i] = E::ld(xr[i]);
        const S* orow = out + (t0 + j) * so;
        float* acc = acc_buf.data() + j * n_out;
#pragma omp simd
        for (int64_t o = 0; o < n_out; ++o) acc[o] = E::ld(orow[o]);
      }
      // h = A x: four rows at a time, so each vector of A is loaded once for four
      // independent accumulator chains (one chain is FMA-latency bound)
      for (int64_t r = 0; r < R; ++r) {
        const float* ar = a[s] + r * n_in;
        int64_t j = 0;
        for (; j + 4 <= n; j += 4) {
          const float* x0 = xf_buf.data() + j * n_in;
          const float* x1 = x0 + n_in;
          const float* x2 = x1 + n_in;
          const float* x3 = x2 + n_in;
          vf16 s0 = {}, s1 = {}, s2 = {}, s3 = {};
          int64_t i = 0;
          for (; i + 16 <= n_in; i += 16) {
            const vf16 av = vload(ar + i);
            s0 += vload(x0 + i) * av;
            s1 += vload(x1 + i) * av;
            s2 += vload(x2 + i) * av;
            s3 += vload(x3 + i) * av;
          }
          float t0s = hsum(s0), t1s = hsum(s1), t2s = hsum(s2), t3s = hsum(s3);
          for (; i < n_in; ++i) {
            t0s += x0[i] * ar[i];
            t1s += x1[i] * ar[i];
            t2s += x2[i] * ar[i];
            t3s += x3[i] * ar[i];
          }
          h_buf[j * R + r] = t0s;
          h_buf[(j + 1) * R + r] = t1s;
          h_buf[(j + 2) * R + r] = t2s;
          h_buf[(j + 3) * R + r] = t3s;
        }
        for (; j < n; ++j) {
          const float* xf = xf_buf.data() + j * n_in;
          vf16 s0 = {};
          int64_t i = 0;
          for (; i + 16 <= n_in; i += 16) s0 += vload(xf + i) * vload(ar + i);
          float sum = hsum(s0);
          for (; i < n_in; ++i) sum += xf[i] * ar[i];
          h_buf[j * R + r] = sum;
        }
      }
      // out += Btᵀ h, 64 columns at a time held in four vector registers across the ranks
      // (an accumulator in memory made every rank a load and a store of it); a rank row
      // adds only inside its span. Bt streams from L2 once per row: blocking the tile's rows
      // over each column block (Bt's block then read from L1) measured slower here.
      for (int64_t j = 0; j < n; ++j) {
        float* acc = acc_buf.data() + j * n_out;
        const float* hj = h_buf.data() + j * R;
        int64_t o0 = 0;
        for (; o0 + 64 <= n_out; o0 += 64) {
          vf16 c0 = vload(acc + o0), c1 = vload(acc + o0 + 16), c2 = vload(acc + o0 + 32), c3 = vload(acc + o0 + 48);
          for (int64_t r = 0; r < R; ++r) {
            const int64_t lo = span[s][2 * r], hi = span[s][2 * r + 1];
            if (hi <= o0 || lo >= o0 + 64) continue;
            const float* br = bt[s] + r * n_out + o0;
            const float hr = hj[r];
            if (lo <= o0 && o0 + 64 <= hi) {
              c0 += hr * vload(br);
              c1 += hr * vload(br + 16);
              c2 += hr * vload(br + 32);
              c3 += hr * vload(br + 48);
            } else {  // the span starts or ends inside the block
              vstore(acc + o0, c0);
              vstore(acc + o0 + 16, c1);
              vstore(acc + o0 + 32, c2);
              vstore(acc + o0 + 48, c3);
              for (int64_t o = std::max(lo, o0); o < std::min(hi, o0 + 64); ++o) acc[o] += hr * br[o - o0];
              c0 = vload(acc + o0);
              c1 = vload(acc + o0 + 16);
              c2 = vload(acc + o0 + 32);
              c3 = vload(acc + o0 + 48);
            }
          }
          vstore(acc + o0, c0);
          vstore(acc + o0 + 16, c1);
          vstore(acc + o0 + 32, c2);
          vstore(acc + o0 + 48, c3);
        }
        for (int64_t r = 0; r < R; ++r) {  // the last columns, past a multiple of 64
          const float hr = hj[r];
          const float* br = bt[s] + r * n_out;
          for (int64_t o = std::max(span[s][2 * r], o0); o < span[s][2 * r + 1]; ++o) acc[o] += hr * br[o];
        }
      }
      for (int64_t j = 0; j < n; ++j) {
        S* orow = out + (t0 + j) * so;
        const float* acc = acc_buf.data() + j * n_out;
#pragma omp simd
        for (int64_t o = 0; o < n_out; ++o) orow[o] = E::st(acc[o]);
      }
    }
  });
}

void lora_rows_(torch::Tensor out, torch::Tensor x, torch::Tensor segment, std::vector<torch::Tensor> a,
                std::vector<torch::Tensor> bt, std::vector<torch::Tensor> span) {
  check_rows(out, "out");
  check_rows(x, "x");
  TORCH_CHECK(x.scalar_type() == out.scalar_type() && x.size(0) == out.size(0), "x and out must match in dtype and rows");
  TORCH_CHECK(segment.scalar_type() == torch::kInt32 && segment.is_contiguous() && segment.dim() == 1 &&
                  segment.size(0) == x.size(0), "segment must be contiguous int32 (rows,)");
  TORCH_CHECK(a.size() == bt.size() && a.size() == span.size(), "a, bt and span must have one entry per segment");
  const int64_t n_in = x.size(1), n_out = out.size(1), nseg = static_cast<int64_t>(a.size());
  std::vector<const float*> ap, bp;
  std::vector<const int64_t*> sp;
  std::vector<int64_t> rank;
  int64_t max_rank = 0;
  for (int64_t s = 0; s < nseg; ++s) {
    TORCH_CHECK(a[s].scalar_type() == torch::kFloat32 && bt[s].scalar_type() == torch::kFloat32 &&
                    a[s].is_contiguous() && bt[s].is_contiguous() && a[s].dim() == 2 && bt[s].dim() == 2,
                "a and bt must be contiguous 2-D float32 tensors");
    TORCH_CHECK(a[s].size(0) == bt[s].size(0) && (a[s].size(0) == 0 || (a[s].size(1) == n_in && bt[s].size(1) == n_out)),
                "segment ", s, ": a (R, in) and bt (R, out) do not fit x and out");
    TORCH_CHECK(span[s].scalar_type() == torch::kInt64 && span[s].is_contiguous() && span[s].dim() == 2 &&
                    span[s].size(0) == a[s].size(0) && span[s].size(1) == 2,
                "segment ", s, ": span must be contiguous int64 (R, 2)");
    const int64_t* sv = span[s].data_ptr<int64_t>();
    for (int64_t r = 0; r < a[s].size(0); ++r) {
      TORCH_CHECK(0 <= sv[2 * r] && sv[2 * r] <= sv[2 * r + 1] && sv[2 * r + 1] <= n_out,
                  "segment ", s, ": span row ", r, " is not a column range of out");
    }
    sp.push_back(sv);
    ap.push_back(a[s].data_ptr<float>());
    bp.push_back(bt[s].data_ptr<float>());
    rank.push_back(a[s].size(0));
    max_rank = std::max(max_rank, a[s].size(0));
  }
  const int32_t* seg = segment.data_ptr<int32_t>();
  for (int64_t t = 0; t < x.size(0); ++t) {
    TORCH_CHECK(seg[t] >= -1 && seg[t] < nseg, "segment[", t, "] = ", seg[t], " is not -1 or a segment index");
  }
  if (x.scalar_type() == torch::kFloat32) {
    lora_rows<F32>(out.data_ptr<float>(), out.stride(0), x.data_ptr<float>(), x.stride(0), seg, x.size(0), n_in, n_out,
                   ap, bp, sp, rank, max_rank);
  } else {
    lora_rows<BF16>(u16(out), out.stride(0), u16(x), x.stride(0), seg, x.size(0), n_in, n_out, ap, bp, sp, rank,
                    max_rank);
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lora_rows_", &lora_rows_, "out[t] += (x[t] a[s]^T) bt[s] for rows with a segment s >= 0 (CPU)");
}
