// q's rows as e4m3 with a scale per row, for the FP8 decode kernel (params.h states the rule).
// One warp per row of 576 elements: 18 per lane, the row's amax by shuffles, then the quantized
// bytes. No host sync.

#include "common/fp8.cuh"
#include "params.h"

namespace mla {
namespace {

constexpr int kWarps = 8;
constexpr float kE4M3Max = 448.f;

template <typename T>
__global__ void __launch_bounds__(kWarps * 32) quantize_rows_kernel(const T* __restrict__ q, int64_t q_batch_stride,
                                                                     int64_t q_row_stride, int batch, int rows,
                                                                     uint8_t* __restrict__ q8, float* __restrict__ scale) {
  // The decode kernel that reads q8 is launched as this grid's programmatic dependent: it starts
  // (barriers, metadata, its first pages' loads) while this one runs, and waits before it reads Q.
  asm volatile("griddepcontrol.launch_dependents;");
  const int lane = threadIdx.x % 32;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (r >= static_cast<int64_t>(batch) * rows) return;
  const T* src = q + (r / rows) * q_batch_stride + (r % rows) * q_row_stride;
  constexpr int kPer = kHeadDim / 32;  // 18: elements lane + 32 i
  float x[kPer];
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    x[i] = to_float(src[lane + 32 * i]);
    amax = fmaxf(amax, fabsf(x[i]));  // (fmaxf drops a NaN: a NaN element stays NaN below)
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffff, amax, off));
  const float s = amax > 0.f ? __fdiv_rn(amax, kE4M3Max) : 1.f;
  uint8_t* dst = q8 + r * kHeadDim;
#pragma unroll
  for (int i = 0; i < kPer; ++i) dst[lane + 32 * i] = quantize_e4m3(x[i], s);
  if (lane == 0) scale[r] = s;
}

}  // namespace

void launch_quantize_rows(const void* q, DType dtype, int64_t q_batch_stride, int64_t q_row_stride, int batch, int rows,
                          uint8_t* q8, float* scale, cudaStream_t stream) {
  const int64_t n = static_cast<int64_t>(batch) * rows;
  if (n == 0) return;
  const unsigned blocks = static_cast<unsigned>((n + kWarps - 1) / kWarps);
  if (dtype == DType::kBF16)
    quantize_rows_kernel<<<blocks, kWarps * 32, 0, stream>>>(static_cast<const __nv_bfloat16*>(q), q_batch_stride,
                                                              q_row_stride, batch, rows, q8, scale);
  else
    quantize_rows_kernel<<<blocks, kWarps * 32, 0, stream>>>(static_cast<const __half*>(q), q_batch_stride, q_row_stride,
                                                              batch, rows, q8, scale);
}

}  // namespace mla
