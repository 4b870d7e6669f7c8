// Fused per-layer elementwise ops for the CPU: one pass over a row where torch runs
// three to eight kernels (each a full read + write of the activations, plus dispatch).
//
// Contract: gpu/layer_ops.py (the torch reference of every op, and the dispatch).
// Numerics follow the torch reference's order of roundings: arithmetic in float32, a
// result rounded to the tensor dtype exactly where the reference rounds it (for
// bfloat16: the residual sum, the normalised row before the weight, silu before the
// product). Only reductions may differ in summation order (~1 ulp of float32).
//
//   add_rms_norm_(x, residual, weight, eps) -> out    residual += x (in place); out = rms_norm(residual) * w
//   rms_norm(x, weight, eps)                 -> out    out = rms_norm(x) * w
//   silu_mul(gate_up)                        -> out    out = silu(gate_up[:, :I]) * gate_up[:, I:]
//   rotary_(x, cos, sin, positions, heads)   (in place) "rotate half" RoPE of the first `heads`
//                                                       head_dim-wide heads of every row of x
//   argmax(x)                                -> (rows,) int64   torch.argmax(x, dim=-1) (greedy sampling)
//   quantize_rows_int8(x)                    -> (q int8, scale (rows, 1) float32)
//                                                       scale = max|x_r| / 127 (>= 1e-12), q = round(x / scale)
//   scale_rows(y, scale, dtype)              -> out    out = (y * scale) rounded to dtype (y float32)
// Rows are split across torch's threads (built with -fopenmp, gpu/kernels/build.py);
// inner loops are `omp simd` so g++ -O3 -march=native vectorizes them.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace {

#include "cpu_common.h"

// Rows per thread task: a decode step has tens of rows of 576 floats, where waking a
// second thread costs more than the work; a prefill chunk has hundreds.
constexpr int64_t kGrainRows = 16;

template <typename E, typename S = typename E::S>
void rms_norm_rows(S* res, const S* x, const S* w, S* out, int64_t rows, int64_t h, float eps) {
  at::parallel_for(0, rows, kGrainRows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      S* rr = res + r * h;
      float ss = 0.f;
      if (x != nullptr) {
        const S* xr = x + r * h;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < h; ++i) {
          const S s = E::st(E::ld(rr[i]) + E::ld(xr[i]));  // the residual sum, in the dtype
          rr[i] = s;
          const float f = E::ld(s);
          ss += f * f;
        }
      } else {
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < h; ++i) {
          const float f = E::ld(rr[i]);
          ss += f * f;
        }
      }
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(h) + eps);
      S* o = out + r * h;
#pragma omp simd
      for (int64_t i = 0; i < h; ++i) {
        // float32: (x * inv) * w; bfloat16: round the normalised value, then scale (HF's order)
        o[i] = E::st(E::ld(w[i]) * E::ld(E::st(E::ld(rr[i]) * inv)));
      }
    }
  });
}

// exp(x) in float32, Cephes expf polynomial (relative error ~1e-7), written so that an
// `omp simd` loop vectorizes it (libm's expf does not vectorize without -ffast-math).
inline float exp_f(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  // round to nearest integer: adding 1.5 * 2^23 leaves no fraction bits
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  // y * 2^n, with 2^n built from its exponent bits (n is in [-126, 127] after the clamp)
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float pow2;
  std::memcpy(&pow2, &bits, sizeof pow2);
  return y * pow2;
}

template <typename E, typename S = typename E::S>
void silu_mul_rows(const S* gu, S* out, int64_t rows, int64_t inter) {
  at::parallel_for(0, rows, kGrainRows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const S* g = gu + r * 2 * inter;
      const S* u = g + inter;
      S* o = out + r * inter;
#pragma omp simd
      for (int64_t i = 0; i < inter; ++i) {
        const float gf = E::ld(g[i]);
        const S sl = E::st(gf / (1.f + exp_f(-gf)));  // silu rounded to the dtype, as torch does
        o[i] = E::st(E::ld(sl) * E::ld(u[i]));
      }
    }
  });
}

template <typename E, typename S = typename E::S>
void rotary_rows(S* x, int64_t row_stride, const float* cos, const float* sin, const int64_t* pos,
                 int64_t rows, int64_t heads, int64_t hd) {
  const int64_t half = hd / 2;
  at::parallel_for(0, rows, kGrainRows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* c = cos + pos[r] * half;
      const float* s = sin + pos[r] * half;
      for (int64_t h = 0; h < heads; ++h) {
        S* x1 = x + r * row_stride + h * hd;
        S* x2 = x1 + half;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float a = E::ld(x1[i]), b = E::ld(x2[i]);
          const float ac = a * c[i], bs = b * s[i], bc = b * c[i], as = a * s[i];
          x1[i] = E::st(ac - bs);
          x2[i] = E::st(bc + as);
        }
      }
    }
  });
}

// Index of each row's maximum: the first of equal maxima, a NaN counting as the maximum
// (the first NaN wins) — torch.argmax's answer. One vectorized max pass, then a scan
// for the first index holding it (the row is in L2 by then); torch's reduction took
// ~4 ms for 64 rows of a 49k vocabulary on 2 cores, ~0.7 GB/s.
template <typename E, typename S = typename E::S>
void argmax_rows(const S* x, int64_t* out, int64_t rows, int64_t n, int64_t stride) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const S* row = x + r * stride;
      float m = -std::numeric_limits<float>::infinity();
      int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
      for (int64_t i = 0; i < n; ++i) {
        const float v = E::ld(row[i]);
        m = v > m ? v : m;
        nan |= v != v;
      }
      int64_t idx = 0;
      for (int64_t i = 0; i < n; ++i) {
        const float v = E::ld(row[i]);
        if (nan ? v != v : v == m) {
          idx = i;
          break;
        }
      }
      out[r] = idx;
    }
  });
}

// Per-token int8 quantization of the int8 projections' inputs (gpu/quantization.py): the
// torch reference is five kernels (abs, amax, divide, round, cast). Same arithmetic:
// x / scale in float32 (a division, not a reciprocal product), rounded half to even.
template <typename E, typename S = typename E::S>
void quantize_rows(const S* x, int64_t stride, int8_t* q, float* scale, int64_t rows, int64_t n) {
  at::parallel_for(0, rows, kGrainRows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const S* row = x + r * stride;
      float m = 0.f;
#pragma omp simd reduction(max : m)
      for (int64_t i = 0; i < n; ++i) {
        const float a = std::fabs(E::ld(row[i]));
        m = a > m ? a : m;
      }
      const float s = std::max(m, 1e-12f) / 127.f;
      scale[r] = s;
      int8_t* qr = q + r * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        // |v| <= 127: adding and removing 1.5 * 2^23 rounds half to even, like torch.round
        const float v = E::ld(row[i]) / s;
        qr[i] = static_cast<int8_t>((v + 12582912.f) - 12582912.f);
      }
    }
  });
}

template <typename E, typename S = typename E::S>
void scale_rows_impl(const float* y, const float* scale, S* out, int64_t rows, int64_t n) {
  at::parallel_for(0, rows, kGrainRows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float s = scale[r];
      const float* yr = y + r * n;
      S* o = out + r * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) o[i] = E::st(yr[i] * s);
    }
  });
}


torch::Tensor norm_impl(torch::Tensor res, c10::optional<torch::Tensor> x, torch::Tensor weight, double eps) {
  check_rows(res, "residual");
  TORCH_CHECK(res.is_contiguous(), "residual must be contiguous");
  const int64_t rows = res.size(0), h = res.size(1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == h && weight.is_contiguous() &&
                  weight.scalar_type() == res.scalar_type(), "weight must be a contiguous (hidden,) tensor of the same dtype");
  torch::Tensor xc;
  if (x.has_value()) {
    xc = x->contiguous();
    TORCH_CHECK(xc.sizes() == res.sizes() && xc.scalar_type() == res.scalar_type(), "x and residual must match");
  }
  auto out = torch::empty_like(res);
  if (res.scalar_type() == torch::kFloat32) {
    rms_norm_rows<F32>(res.data_ptr<float>(), x.has_value() ? xc.data_ptr<float>() : nullptr,
                         weight.data_ptr<float>(), out.data_ptr<float>(), rows, h, static_cast<float>(eps));
  } else {
    rms_norm_rows<BF16>(u16(res), x.has_value() ? u16(xc) : nullptr, u16(weight), u16(out), rows, h,
                        static_cast<float>(eps));
  }
  return out;
}

torch::Tensor add_rms_norm_(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps) {
  return norm_impl(residual, x, weight, eps);
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  return norm_impl(x.contiguous(), c10::nullopt, weight, eps);
}

torch::Tensor silu_mul(torch::Tensor gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up must have an even number of columns");
  auto gu = gate_up.contiguous();
  const int64_t rows = gu.size(0), inter = gu.size(1) / 2;
  auto out = torch::empty({rows, inter}, gu.options());
  if (gu.scalar_type() == torch::kFloat32) {
    silu_mul_rows<F32>(gu.data_ptr<float>(), out.data_ptr<float>(), rows, inter);
  } else {
    silu_mul_rows<BF16>(u16(gu), u16(out), rows, inter);
  }
  return out;
}

void rotary_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, torch::Tensor positions, int64_t heads,
             int64_t head_dim) {
  check_rows(x, "x");
  TORCH_CHECK(head_dim % 2 == 0 && heads * head_dim <= x.size(1), "heads * head_dim must fit in a row");
  TORCH_CHECK(cos.scalar_type() == torch::kFloat32 && sin.scalar_type() == torch::kFloat32 && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(1) == head_dim / 2,
              "cos/sin must be contiguous float32 (positions, head_dim / 2) tables");
  TORCH_CHECK(positions.scalar_type() == torch::kInt64 && positions.dim() == 1 && positions.size(0) == x.size(0),
              "positions must be int64 (rows,)");
  auto pos = positions.contiguous();
  const int64_t* p = pos.data_ptr<int64_t>();
  if (x.size(0) > 0) {
    const auto [mn, mx] = std::minmax_element(p, p + x.size(0));
    TORCH_CHECK(*mn >= 0 && *mx < cos.size(0), "positions must lie in [0, ", cos.size(0), ")");
  }
  if (x.scalar_type() == torch::kFloat32) {
    rotary_rows<F32>(x.data_ptr<float>(), x.stride(0), cos.data_ptr<float>(), sin.data_ptr<float>(), p, x.size(0),
                       heads, head_dim);
  } else {
    rotary_rows<BF16>(u16(x), x.stride(0), cos.data_ptr<float>(), sin.data_ptr<float>(), p, x.size(0),
                      heads, head_dim);
  }
}

torch::Tensor argmax(torch::Tensor x) {
  check_rows(x, "x");
  TORCH_CHECK(x.size(1) > 0, "x must have at least one column");
  auto out = torch::empty({x.size(0)}, x.options().dtype(torch::kInt64));
  if (x.scalar_type() == torch::kFloat32) {
    argmax_rows<F32>(x.data_ptr<float>(), out.data_ptr<int64_t>(), x.size(0), x.size(1), x.stride(0));
  } else {
    argmax_rows<BF16>(u16(x), out.data_ptr<int64_t>(), x.size(0), x.size(1), x.stride(0));
  }
  return out;
}

std::vector<torch::Tensor> quantize_rows_int8(torch::Tensor x) {
  check_rows(x, "x");
  const int64_t rows = x.size(0), n = x.size(1);
  auto q = torch::empty({rows, n}, x.options().dtype(torch::kInt8));
  auto scale = torch::empty({rows, 1}, x.options().dtype(torch::kFloat32));
  if (x.scalar_type() == torch::kFloat32) {
    quantize_rows<F32>(x.data_ptr<float>(), x.stride(0), q.data_ptr<int8_t>(), scale.data_ptr<float>(), rows, n);
  } else {
    quantize_rows<BF16>(u16(x), x.stride(0), q.data_ptr<int8_t>(), scale.data_ptr<float>(), rows, n);
  }
  return {q, scale};
}

torch::Tensor scale_rows(torch::Tensor y, torch::Tensor scale, c10::ScalarType dtype) {
  TORCH_CHECK(y.device().is_cpu() && y.scalar_type() == torch::kFloat32 && y.dim() == 2 && y.is_contiguous(),
              "y must be a contiguous 2-D float32 CPU tensor");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() && scale.numel() == y.size(0),
              "scale must be a contiguous float32 tensor of one value per row");
  TORCH_CHECK(dtype == torch::kFloat32 || dtype == torch::kBFloat16, "dtype must be float32 or bfloat16");
  auto out = torch::empty(y.sizes(), y.options().dtype(dtype));
  if (dtype == torch::kFloat32) {
    scale_rows_impl<F32>(y.data_ptr<float>(), scale.data_ptr<float>(), out.data_ptr<float>(), y.size(0), y.size(1));
  } else {
    scale_rows_impl<BF16>(y.data_ptr<float>(), scale.data_ptr<float>(), u16(out), y.size(0), y.size(1));
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("add_rms_norm_", &add_rms_norm_, "residual += x; return rms_norm(residual) * weight (CPU)");
  m.def("rms_norm", &rms_norm, "rms_norm(x) * weight (CPU)");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused (rows, 2I) gate/up projection (CPU)");
  m.def("rotary_", &rotary_, "in-place rotate-half RoPE of the first `heads` heads of each row (CPU)");
  m.def("argmax", &argmax, "index of each row's maximum, as torch.argmax(x, -1) (CPU)");
  m.def("quantize_rows_int8", &quantize_rows_int8, "per-row symmetric int8 quantization: (q, scale) (CPU)");
  m.def("scale_rows", &scale_rows, "y * scale per row, rounded to dtype (CPU)");
}
