// Combine: out[b, row] = sum_s exp(lse_s - lse) * out_s over the splits of sequence b, where
// lse = log sum_s exp(lse_s). Sequences with one split were written by the decode kernel; empty
// ones get out = 0, lse = +inf.
//
// A block of 4 warps merges one row at a time (kRowsPerBlock rows, one after the other), over a
// slice of 512 / kSlices of its dims. The warps share the row's splits (warp w takes splits
// w, w + 4, ...), each lane holding kVec float4 of the slice; per lane, kUnroll splits' loads
// (lse and partials together, merged with a running max) are in flight at once. Then the four
// warps' maxima, sums and partials meet in shared memory. Few sequences cut into many
// splits (small batches) are latency-bound: there the 512 dims are cut into 4 slices, so four
// times as many blocks share the reads; many sequences, most with one split, need few blocks.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/launch.cuh"
#include "common/pack.cuh"
#include "params.h"

namespace mla {
namespace {

template <typename T>
__device__ __forceinline__ void store4(T* dst, float4 v) {
  *reinterpret_cast<uint2*>(dst) = make_uint2(pack2<T>(v.x, v.y), pack2<T>(v.z, v.w));
}

__device__ __forceinline__ void fma4(float4& acc, float w, const float4& v) {
  acc.x += w * v.x; acc.y += w * v.y; acc.z += w * v.z; acc.w += w * v.w;
}

constexpr int kCombineWarps = 4;

template <typename T, int kRowsPerBlock, int kSlices>
__global__ void __launch_bounds__(32 * kCombineWarps) combine_kernel(const float* __restrict__ out_accum,
                                                                     const float* __restrict__ lse_accum,
                                                                     const int32_t* __restrict__ num_splits,
                                                                     T* __restrict__ out, float* __restrict__ lse,
                                                                     int s_q, int h_q) {
  constexpr int kVec = kHeadDimV / 4 / 32 / kSlices;  // float4 per lane: 4 (one slice) or 1 (four)
  constexpr int kUnroll = kVec == 1 ? 16 : 2;         // splits in flight per warp (registers: ~128, ~60)
  constexpr int kSliceDims = kHeadDimV / kSlices;
  __shared__ float4 partial[kCombineWarps][32 * kVec];
  __shared__ float partial_max[kCombineWarps], partial_denom[kCombineWarps];
  // Launched with programmatic dependent launch: this block may start while the decode kernel
  // still runs. Every block waits for it to complete (and its writes to be visible), even one
  // with nothing to do: so the combine never completes before the decode, and work queued after
  // the combine on the stream also finds out / lse written.
  asm volatile("griddepcontrol.wait;" ::: "memory");
  const int b = blockIdx.y, rows = s_q * h_q;
  const int first = num_splits[b], n = num_splits[b + 1] - first;
  if (n == 1) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int dim0 = blockIdx.z * kSliceDims;
#pragma unroll 1
  for (int i = 0; i < kRowsPerBlock; ++i) {
    const int row = blockIdx.x * kRowsPerBlock + i;
    if (row >= rows) return;  // (uniform across the block)
    T* dst = out + (static_cast<int64_t>(b) * rows + row) * kHeadDimV + dim0;
    float* lse_dst = lse + static_cast<int64_t>(b) * rows + (row % h_q) * s_q + row / h_q;
    const bool writes_lse = blockIdx.z == 0 && threadIdx.x == 0;
    if (n == 0) {
      if (threadIdx.x < kSliceDims / 4) store4<T>(dst + 4 * threadIdx.x, make_float4(0.f, 0.f, 0.f, 0.f));
      if (writes_lse) *lse_dst = INFINITY;
      continue;
    }
    // Each warp merges its splits with a running max (lse and partials are read in one round
    // trip, kUnroll splits at a time); then the four warps' (max, sum, partials) meet.
    const float* lse_row = lse_accum + static_cast<int64_t>(first) * rows + row;  // split s at s * rows
    const float* src = out_accum + (static_cast<int64_t>(first) * rows + row) * kHeadDimV + dim0 + 4 * lane;
    float m = -INFINITY, denom = 0.f;
    float4 acc[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) acc[k] = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 1
    for (int s0 = warp; s0 < n; s0 += kCombineWarps * kUnroll) {
      float w[kUnroll];
      float4 v[kUnroll][kVec];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {  // every load first, then the arithmetic
        const int s = s0 + kCombineWarps * u;
        const bool ok = s < n;
        w[u] = ok ? lse_row[static_cast<int64_t>(s) * rows] : -INFINITY;
#pragma unroll
        for (int k = 0; k < kVec; ++k)
          v[u][k] = ok ? *reinterpret_cast<const float4*>(src + static_cast<int64_t>(s) * rows * kHeadDimV + 128 * k)
                       : make_float4(0.f, 0.f, 0.f, 0.f);
      }
      float m_new = m;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) m_new = fmaxf(m_new, w[u]);
      if (m_new == -INFINITY) continue;  // nothing but empty splits so far (uniform in the warp)
      const float r = __expf(m - m_new);  // 0 when m is -inf
      denom *= r;
#pragma unroll
      for (int k = 0; k < kVec; ++k) acc[k] = make_float4(acc[k].x * r, acc[k].y * r, acc[k].z * r, acc[k].w * r);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const float e = __expf(w[u] - m_new);  // 0 for an empty split (lse -inf)
        denom += e;
#pragma unroll
        for (int k = 0; k < kVec; ++k) fma4(acc[k], e, v[u][k]);
      }
      m = m_new;
    }
#pragma unroll
    for (int k = 0; k < kVec; ++k) partial[warp][lane + 32 * k] = acc[k];
    if (lane == 0) {
      partial_max[warp] = m;
      partial_denom[warp] = denom;
    }
    __syncthreads();
    float m_all = partial_max[0];
#pragma unroll
    for (int w = 1; w < kCombineWarps; ++w) m_all = fmaxf(m_all, partial_max[w]);
    const float m_use = m_all == -INFINITY ? 0.f : m_all;
    float f[kCombineWarps], total = 0.f;
#pragma unroll
    for (int w = 0; w < kCombineWarps; ++w) {
      f[w] = partial_max[w] == -INFINITY ? 0.f : __expf(partial_max[w] - m_use);
      total += f[w] * partial_denom[w];
    }
    const float inv = total > 0.f ? 1.f / total : 0.f;
    for (int t = threadIdx.x; t < 32 * kVec; t += 32 * kCombineWarps) {
      float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int w = 0; w < kCombineWarps; ++w) fma4(sum, f[w] * inv, partial[w][t]);
      store4<T>(dst + 4 * t, sum);
    }
    if (writes_lse) *lse_dst = total > 0.f ? logf(total) + m_use : INFINITY;
    __syncthreads();  // the shared sums are read before the next row overwrites them
  }
}

template <typename T, int kRowsPerBlock, int kSlices>
void launch_combine_rows(const Params& a, dim3 grid, cudaStream_t stream) {
  // Programmatic dependent launch: the combine is launched while the decode kernel drains, so its
  // launch latency hides behind the decode's tail (the kernel waits with griddepcontrol.wait).
  launch_kernel(combine_kernel<T, kRowsPerBlock, kSlices>, grid, dim3(32 * kCombineWarps), 0, stream, true,
                static_cast<const float*>(a.out_accum), static_cast<const float*>(a.lse_accum), a.num_splits,
                static_cast<T*>(a.out), a.lse, a.s_q, a.h_q);
}

template <typename T>
void launch_combine_typed(const Params& a, dim3 grid, int rows_per_block, cudaStream_t stream) {
  if (grid.z == 4)
    launch_combine_rows<T, 1, 4>(a, grid, stream);
  else if (rows_per_block == 8)
    launch_combine_rows<T, 8, 1>(a, grid, stream);
  else if (rows_per_block == 2)
    launch_combine_rows<T, 2, 1>(a, grid, stream);
  else
    launch_combine_rows<T, 1, 1>(a, grid, stream);
}

}  // namespace

void launch_combine(const Params& a, cudaStream_t stream) {
  // At most num_parts - 1 sequences have more than one split. With at least as many sequences
  // as stretches, a split sequence has few splits, so a block can walk 8 rows; with few
  // sequences (long ones cut into many splits) one row per block keeps the work spread out, and
  // when even that leaves few blocks (batch * rows <= 512), four blocks share each row's dims.
  const int rows = a.s_q * a.h_q;
  const int rows_per_block = a.batch >= a.num_parts ? 8 : (4 * a.batch >= a.num_parts ? 2 : 1);
  const bool sliced = a.batch < a.num_parts && static_cast<int64_t>(a.batch) * rows <= 512;
  const dim3 grid(sliced ? rows : (rows + rows_per_block - 1) / rows_per_block, a.batch, sliced ? 4 : 1);
  if (a.dtype == DType::kBF16)
    launch_combine_typed<__nv_bfloat16>(a, grid, rows_per_block, stream);
  else
    launch_combine_typed<__half>(a, grid, rows_per_block, stream);
}
}  // namespace mla
