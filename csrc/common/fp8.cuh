// e4m3 quantization as ops.py states it: e4m3(float32(x) / scale), rounded to nearest even, +-448
// beyond the range (infinities too), NaN kept. The division is the IEEE one (the build uses
// --use_fast_math, which would make `/` approximate), so the CPU reference gives the same bytes.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

namespace mla {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

__device__ __forceinline__ uint8_t quantize_e4m3(float x, float scale) {
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(__fdiv_rn(x, scale), __NV_SATFINITE, __NV_E4M3));
}

}  // namespace mla
