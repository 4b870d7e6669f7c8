// Shared helpers for lmgate's paged-KV kernels.
//
// Compiles three ways: NVRTC (cupy.RawModule, the runtime path), nvcc (the CI
// compile check) and g++ with cpu_emu/cuda_emu.h (the CPU verification harness,
// which defines LMGATE_CPU_EMU and its own half/bfloat16 types).
#pragma once

#ifndef LMGATE_CPU_EMU
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace lmgate {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ float to_float<__half>(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}

// -inf without <math.h> (NVRTC has no INFINITY macro).
__device__ __forceinline__ float neg_inf() { return __int_as_float(static_cast<int>(0xff800000u)); }

// Butterfly reduction: every lane ends with the sum over the warp.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(kFullMask, v, offset);
  }
  return v;
}

}  // namespace lmgate
