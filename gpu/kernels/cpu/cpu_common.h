// Shared by the CPU kernels (layer_ops.cpp, lora_ops.cpp), included inside their anonymous
// namespace after <torch/extension.h>. gpu/kernels/build.py hashes every header here into
// each kernel's build name, so an edit here rebuilds both.
#pragma once
#include <cstdint>
#include <cstring>

using bf16 = c10::BFloat16;

// Element traits: the storage type S and float conversions, written as bit operations
// on plain integers so that `omp simd` loops vectorize them (c10::BFloat16's operators
// do not). float -> bfloat16 rounds to nearest even and keeps NaN a NaN, as torch does.
struct F32 {
  using S = float;
  static float ld(S v) { return v; }
  static S st(float x) { return x; }
};
struct BF16 {
  using S = uint16_t;
  static float ld(S v) {
    const uint32_t bits = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
  static S st(float x) {
    uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
    return static_cast<S>(nan ? 0x7fc0u : rounded);
  }
};

uint16_t* u16(const torch::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<bf16>()); }

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, " must be 2-D with contiguous rows");
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 || t.scalar_type() == torch::kBFloat16,
              name, " must be float32 or bfloat16, got ", t.scalar_type());
}
