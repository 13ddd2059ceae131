// Device-side split-KV scheduler (mla.get_metadata).
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
// tile_scheduler_metadata[p] is a MetadataRow (params.h): the stretch's first and last sequence
// and page, the split index of its first sequence's piece, its page count.
// num_splits[b + 1] - num_splits[b] = number of splits of sequence b (0 for an empty sequence,
// 1 when one stretch holds it whole: then the decode kernel writes out/lse directly).
// Split s of sequence b keeps its partials in workspace slot num_splits[b] + s.
//
// Everything is computed in one block, with no host sync: CUDA-graph capturable, and since it
// depends only on cache_seqlens it is computed once per step and shared by every layer.

#include <atomic>

#include "params.h"

namespace mla {
namespace {

constexpr int kSchedThreads = 1024;
constexpr int kMaxSchedSmem = 200 * 1024;
constexpr int kGreedyMaxBatch = 1024;  // one thread walks the batch: ~30 cycles a sequence

// A stretch with no work: begin_batch == batch, so the decode kernel's CTAs for it return at once.
__device__ MetadataRow empty_row(int batch) { return MetadataRow{batch, 0, -1, 0, 0, 0, {0, 0}}; }

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
                                                                      int num_parts, MetadataRow* __restrict__ metadata,
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
      MetadataRow row{};
      bool open = false;
      auto close = [&]() {
        metadata[part] = row;
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
            row.begin_batch = b;
            row.begin_page = pos;
            row.begin_split = pieces;
          }
          pos += take;
          filled += take;
          ++pieces;
          row.end_batch = b;
          row.end_page = pos;
          row.num_pages = filled;
          if (!last_part && (pos < n || filled >= cap)) close();
        }
        splits[b + 1] = pieces;
      }
      if (open) close();
      for (; part < num_parts; ++part) metadata[part] = empty_row(batch);
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
    MetadataRow row = empty_row(batch);
    const int p0 = p * per;
    if (p0 < total) {
      const int p1 = min(p0 + per, total);
      const int b0 = last_le(prefix, 0, batch - 1, p0);      // sequence holding page p0
      const int b1 = last_le(prefix, 0, batch - 1, p1 - 1);  // sequence holding page p1 - 1
      row.begin_batch = b0;
      row.begin_page = p0 - prefix[b0];
      row.end_batch = b1;
      row.end_page = p1 - prefix[b1];
      row.begin_split = p - prefix[b0] / per;
      row.num_pages = p1 - p0;
    }
    metadata[p] = row;
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

void launch_get_metadata(const int32_t* cache_seqlens, int batch, int num_parts, MetadataRow* metadata,
                         int32_t* num_splits, cudaStream_t stream) {
  const int smem = 2 * (batch + 1) * static_cast<int>(sizeof(int));
  static std::atomic<uint64_t> smem_set{0};
  opt_in_dynamic_smem(reinterpret_cast<const void*>(&get_metadata_kernel), kMaxSchedSmem, smem_set, "mla.get_metadata");
  get_metadata_kernel<<<1, kSchedThreads, smem, stream>>>(cache_seqlens, batch, num_parts, metadata, num_splits);
}

}  // namespace mla
