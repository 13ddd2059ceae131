// Device-side split-KV scheduler (mla.get_metadata) and the split combine kernel.
//
// Work is counted in KV pages (64 tokens). The pages of all sequences are laid end to end,
// sequence 0 first, and cut into `num_parts` contiguous stretches; persistent CTA column `p` of
// the decode grid takes stretch p. A sequence cut by stretch boundaries is computed in several
// splits, whose partial results (normalised within the split, with their own lse) are merged
// by the combine kernel.
//
// Where the cuts go (batch <= kGreedyMaxBatch): greedily, sequence by sequence, aiming at
// cap = max(ceil(total / parts), ceil(pages left / stretches left)) pages per stretch. A
// sequence that would overflow the stretch by at most cap / 32 pages is taken whole, and a
// stretch within cap / 32 of full is closed instead of taking a sliver of the next sequence:
// a split costs a Q load, an fp32 partial (2 KB per query row) and the combine, so trading a
// few percent of balance for fewer splits pays (b=128 x 64 pages on 132 SMs: no split at all
// instead of one 1-page split per sequence). The last stretch takes what is left. Larger
// batches use the closed form: stretch p = pages [p * per, (p + 1) * per), per = ceil(total / parts).
//
// tile_scheduler_metadata[p] (int32 x 8):
//   [0] begin_batch   first sequence of the stretch (== batch for an empty stretch)
//   [1] begin_page    first page within begin_batch
//   [2] end_batch     last sequence of the stretch (inclusive)
//   [3] end_page      one past the last page within end_batch
//   [4] begin_split   index, among begin_batch's splits, of this stretch's piece of it
//                     (later sequences of the stretch start there: their index is 0)
//   [5] num_pages     pages in this stretch (0 for an empty one)
//   [6], [7]          0 (reserved)
// num_splits[b + 1] - num_splits[b] = number of splits of sequence b (0 for an empty sequence,
// 1 when one stretch holds it whole: then the decode kernel writes out/lse directly).
// Split s of sequence b keeps its partials in workspace slot num_splits[b] + s.
//
// Everything is computed in one block, with no host sync: CUDA-graph capturable, and since it
// depends only on cache_seqlens it is computed once per step and shared by every layer.

#include <cmath>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "launch.h"

namespace mla {
namespace {

constexpr int kSchedThreads = 1024;
constexpr int kMaxSchedSmem = 200 * 1024;
constexpr int kGreedyMaxBatch = 1024;  // one thread walks the batch: ~30 cycles a sequence

__device__ int pages_of(int seqlen) { return seqlen > 0 ? (seqlen + kPageSize - 1) / kPageSize : 0; }

// In-place inclusive scan of data[0, n) by the whole block (n any size), in chunks of 1024.
__device__ void block_inclusive_scan(int* data, int n, int* warp_sums) {
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  int carry = 0;
  for (int base = 0; base < n; base += kSchedThreads) {
    const int i = base + tid;
    int v = i < n ? data[i] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      int u = __shfl_up_sync(0xffffffff, v, o);
      if (lane >= o) v += u;
    }
    if (lane == 31) warp_sums[warp] = v;
    __syncthreads();
    if (warp == 0) {
      int w = warp_sums[lane];
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        int u = __shfl_up_sync(0xffffffff, w, o);
        if (lane >= o) w += u;
      }
      warp_sums[lane] = w;
    }
    __syncthreads();
    v += carry + (warp > 0 ? warp_sums[warp - 1] : 0);
    if (i < n) data[i] = v;
    const int chunk_total = warp_sums[31];
    __syncthreads();
    carry += chunk_total;
  }
}

// Largest index i in [lo, hi] with a[i] <= x (a non-decreasing, a[lo] <= x).
__device__ int last_le(const int* a, int lo, int hi, int x) {
  while (lo < hi) {
    int mid = (lo + hi + 1) / 2;
    if (a[mid] <= x) lo = mid; else hi = mid - 1;
  }
  return lo;
}

__global__ void __launch_bounds__(kSchedThreads) get_metadata_kernel(const int32_t* __restrict__ seqlens, int batch,
                                                                      int num_parts, int32_t* __restrict__ metadata,
                                                                      int32_t* __restrict__ num_splits) {
  extern __shared__ int smem[];
  __shared__ int warp_sums[32];
  int* prefix = smem;              // [batch + 1]: prefix[b] = pages of sequences < b
  int* splits = smem + batch + 1;  // [batch + 1]
  const int tid = threadIdx.x;
  for (int b = tid; b < batch; b += kSchedThreads) prefix[b + 1] = pages_of(seqlens[b]);
  if (tid == 0) prefix[0] = 0;
  __syncthreads();
  block_inclusive_scan(prefix + 1, batch, warp_sums);
  __syncthreads();
  const int total = prefix[batch];
  if (batch <= kGreedyMaxBatch) {
    if (tid == 0) {
      int part = 0, filled = 0, remaining = total;
      const int cap0 = max(1, (remaining + num_parts - 1) / num_parts);
      int cap = cap0;
      int32_t row[kMetadataSize] = {0, 0, 0, 0, 0, 0, 0, 0};
      bool open = false;
      auto close = [&]() {
        for (int k = 0; k < kMetadataSize; ++k) metadata[part * kMetadataSize + k] = row[k];
        ++part;
        remaining -= filled;
        filled = 0;
        open = false;
        const int parts_left = num_parts - part;
        // Never below the first target: stretches that overflowed leave later ones short
        // (idle at the end) instead of forcing splits there.
        cap = parts_left > 0 ? max(cap0, (remaining + parts_left - 1) / parts_left) : 1;
      };
      for (int b = 0; b < batch; ++b) {
        const int n = prefix[b + 1] - prefix[b];
        int pos = 0, pieces = 0;
        while (pos < n) {
          const bool last_part = part == num_parts - 1;
          const int rest = n - pos, space = cap - filled, slack = cap / 32;
          int take;
          if (last_part || rest <= space + slack) {
            take = rest;
          } else if (filled > 0 && space <= slack) {
            close();  // nearly full: sequence b starts afresh in the next stretch
            continue;
          } else {
            take = space;
          }
          if (!open) {
            open = true;
            row[0] = b; row[1] = pos; row[4] = pieces; row[6] = 0; row[7] = 0;
          }
          pos += take;
          filled += take;
          ++pieces;
          row[2] = b;
          row[3] = pos;
          row[5] = filled;
          if (!last_part && (pos < n || filled >= cap)) close();
        }
        splits[b + 1] = pieces;
      }
      if (open) close();
      for (; part < num_parts; ++part) {
        const int32_t empty[kMetadataSize] = {batch, 0, -1, 0, 0, 0, 0, 0};
        for (int k = 0; k < kMetadataSize; ++k) metadata[part * kMetadataSize + k] = empty[k];
      }
      splits[0] = 0;
    }
    __syncthreads();
    block_inclusive_scan(splits + 1, batch, warp_sums);
    __syncthreads();
    for (int b = tid; b <= batch; b += kSchedThreads) num_splits[b] = splits[b];
    return;
  }

  const int per = max(1, (total + num_parts - 1) / num_parts);
  for (int p = tid; p < num_parts; p += kSchedThreads) {
    int32_t row[kMetadataSize] = {batch, 0, -1, 0, 0, 0, 0, 0};
    const int p0 = p * per;
    if (p0 < total) {
      const int p1 = min(p0 + per, total);
      const int b0 = last_le(prefix, 0, batch - 1, p0);      // sequence holding page p0
      const int b1 = last_le(prefix, 0, batch - 1, p1 - 1);  // sequence holding page p1 - 1
      row[0] = b0;
      row[1] = p0 - prefix[b0];
      row[2] = b1;
      row[3] = p1 - prefix[b1];
      row[4] = p - prefix[b0] / per;
      row[5] = p1 - p0;
    }
#pragma unroll
    for (int k = 0; k < kMetadataSize; ++k) metadata[p * kMetadataSize + k] = row[k];
  }
  for (int b = tid; b < batch; b += kSchedThreads) {
    const int first = prefix[b], last = prefix[b + 1] - 1;
    splits[b + 1] = last >= first ? last / per - first / per + 1 : 0;
  }
  if (tid == 0) splits[0] = 0;
  __syncthreads();
  block_inclusive_scan(splits + 1, batch, warp_sums);
  __syncthreads();
  for (int b = tid; b <= batch; b += kSchedThreads) num_splits[b] = splits[b];
}

}  // namespace

int max_metadata_batch() { return kMaxSchedSmem / 8 - 2; }

void launch_get_metadata(const int32_t* cache_seqlens, int batch, int num_parts, int32_t* metadata,
                         int32_t* num_splits, cudaStream_t stream) {
  const int smem = 2 * (batch + 1) * static_cast<int>(sizeof(int));
  static bool attr_set = false;
  if (!attr_set) {
    cudaFuncSetAttribute(get_metadata_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kMaxSchedSmem);
    attr_set = true;
  }
  get_metadata_kernel<<<1, kSchedThreads, smem, stream>>>(cache_seqlens, batch, num_parts, metadata, num_splits);
}

// ---------------------------------------------------------------------------------------------
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
// ---------------------------------------------------------------------------------------------

template <typename T>
__device__ void store4(T* dst, float4 v);
template <>
__device__ void store4<__nv_bfloat16>(__nv_bfloat16* dst, float4 v) {
  __nv_bfloat162 a = __floats2bfloat162_rn(v.x, v.y), b = __floats2bfloat162_rn(v.z, v.w);
  uint2 u;
  u.x = *reinterpret_cast<uint32_t*>(&a);
  u.y = *reinterpret_cast<uint32_t*>(&b);
  *reinterpret_cast<uint2*>(dst) = u;
}
template <>
__device__ void store4<__half>(__half* dst, float4 v) {
  __half2 a = __floats2half2_rn(v.x, v.y), b = __floats2half2_rn(v.z, v.w);
  uint2 u;
  u.x = *reinterpret_cast<uint32_t*>(&a);
  u.y = *reinterpret_cast<uint32_t*>(&b);
  *reinterpret_cast<uint2*>(dst) = u;
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

}  // namespace mla

namespace mla {
template <typename T, int kRowsPerBlock, int kSlices>
static void launch_combine_rows(const DecodeArgs& a, dim3 grid, cudaStream_t stream) {
  // Programmatic dependent launch: the combine is launched while the decode kernel drains, so its
  // launch latency hides behind the decode's tail (the kernel waits with griddepcontrol.wait).
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(32 * kCombineWarps);
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = 1;
  cudaLaunchKernelEx(&config, combine_kernel<T, kRowsPerBlock, kSlices>, static_cast<const float*>(a.out_accum),
                     static_cast<const float*>(a.lse_accum), a.num_splits, static_cast<T*>(a.out), a.lse, a.s_q, a.h_q);
}

template <typename T>
static void launch_combine_typed(const DecodeArgs& a, dim3 grid, int rows_per_block, cudaStream_t stream) {
  if (grid.z == 4)
    launch_combine_rows<T, 1, 4>(a, grid, stream);
  else if (rows_per_block == 8)
    launch_combine_rows<T, 8, 1>(a, grid, stream);
  else if (rows_per_block == 2)
    launch_combine_rows<T, 2, 1>(a, grid, stream);
  else
    launch_combine_rows<T, 1, 1>(a, grid, stream);
}

void launch_combine(const DecodeArgs& a, cudaStream_t stream) {
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
