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
// lse = log sum_s exp(lse_s). One block of 128 threads per (row, sequence), 4 dims per thread.
// Sequences with one split were written by the decode kernel; empty ones get out = 0, lse = +inf.
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

template <typename T, int kRowsPerBlock>
__global__ void __launch_bounds__(128) combine_kernel(const float* __restrict__ out_accum,
                                                      const float* __restrict__ lse_accum,
                                                      const int32_t* __restrict__ num_splits, T* __restrict__ out,
                                                      float* __restrict__ lse, int s_q, int h_q) {
  // Block (x, b) handles rows [x * rows_per_block, ...) of sequence b, one after the other: with
  // many sequences, most have one split and the block leaves at once; fewer, larger blocks then
  // cost less to launch than one block per row.
  // Launched with programmatic dependent launch: this block may start while the decode kernel
  // still runs. Every block waits for it to complete (and its writes to be visible), even one
  // with nothing to do: so the combine never completes before the decode, and work queued after
  // the combine on the stream also finds out / lse written.
  asm volatile("griddepcontrol.wait;" ::: "memory");
  const int b = blockIdx.y, rows = s_q * h_q;
  const int first = num_splits[b], n = num_splits[b + 1] - first;
  if (n == 1) return;
#pragma unroll 1
  for (int i = 0; i < kRowsPerBlock; ++i) {
    const int row = blockIdx.x * kRowsPerBlock + i;
    if (row >= rows) return;
    T* dst = out + (static_cast<int64_t>(b) * rows + row) * kHeadDimV + threadIdx.x * 4;
    float* lse_dst = lse + static_cast<int64_t>(b) * rows + (row % h_q) * s_q + row / h_q;
    if (n == 0) {
      store4<T>(dst, make_float4(0.f, 0.f, 0.f, 0.f));
      if (threadIdx.x == 0) *lse_dst = INFINITY;
      continue;  // (uniform across the block)
    }
    float m = -INFINITY;
    for (int s = 0; s < n; ++s) m = fmaxf(m, lse_accum[static_cast<int64_t>(first + s) * rows + row]);
    const float m_use = m == -INFINITY ? 0.f : m;
    float denom = 0.f;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s = 0; s < n; ++s) {
      const int64_t slot_row = static_cast<int64_t>(first + s) * rows + row;
      const float w = __expf(lse_accum[slot_row] - m_use);
      denom += w;
      const float4 o = *reinterpret_cast<const float4*>(out_accum + slot_row * kHeadDimV + threadIdx.x * 4);
      acc.x += w * o.x; acc.y += w * o.y; acc.z += w * o.z; acc.w += w * o.w;
    }
    const float inv = denom > 0.f ? 1.f / denom : 0.f;
    store4<T>(dst, make_float4(acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv));
    if (threadIdx.x == 0) *lse_dst = denom > 0.f ? logf(denom) + m_use : INFINITY;
  }
}

}  // namespace mla

namespace mla {
template <typename T, int kRowsPerBlock>
static void launch_combine_rows(const DecodeArgs& a, dim3 grid, cudaStream_t stream) {
  // Programmatic dependent launch: the combine is launched while the decode kernel drains, so its
  // launch latency hides behind the decode's tail (the kernel waits with griddepcontrol.wait).
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(128);
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = 1;
  cudaLaunchKernelEx(&config, combine_kernel<T, kRowsPerBlock>, static_cast<const float*>(a.out_accum),
                     static_cast<const float*>(a.lse_accum), a.num_splits, static_cast<T*>(a.out), a.lse, a.s_q, a.h_q);
}

template <typename T>
static void launch_combine_typed(const DecodeArgs& a, dim3 grid, int rows_per_block, cudaStream_t stream) {
  if (rows_per_block == 8)
    launch_combine_rows<T, 8>(a, grid, stream);
  else if (rows_per_block == 2)
    launch_combine_rows<T, 2>(a, grid, stream);
  else
    launch_combine_rows<T, 1>(a, grid, stream);
}

void launch_combine(const DecodeArgs& a, cudaStream_t stream) {
  // At most num_parts - 1 sequences have more than one split. With at least as many sequences
  // as stretches, a split sequence has few splits, so a block can walk 8 rows; with few
  // sequences (long ones cut into many splits) one row per block keeps the work spread out.
  const int rows = a.s_q * a.h_q;
  const int rows_per_block = a.batch >= a.num_parts ? 8 : (4 * a.batch >= a.num_parts ? 2 : 1);
  const dim3 grid((rows + rows_per_block - 1) / rows_per_block, a.batch);
  if (a.dtype == DType::kBF16)
    launch_combine_typed<__nv_bfloat16>(a, grid, rows_per_block, stream);
  else
    launch_combine_typed<__half>(a, grid, rows_per_block, stream);
}
}  // namespace mla
