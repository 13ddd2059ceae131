// Hopper (sm90a) split-KV MLA decode kernel, v2: three warpgroups.
//
// One CTA = one 64-row query tile (rows = s_q * h_q flattened, row = s * h_q + h, zero-padded
// to 64) x one scheduler stretch of KV pages (csrc/common/scheduler.cu), walked page by page
// across the sequences of the stretch. 384 threads, three roles:
//   WG0 (score warpgroup, 152 regs): per sequence, the Q tile into shared memory by TMA (one box,
//       128B swizzle, zero-filled past s_q * h_q rows; one mbarrier); per page: S = Q . K^T (wgmma m64n64k16, both operands in shared memory,
//       36 k-steps), mask, online softmax for all 64 rows, P (bf16/fp16) written over the
//       page's K-RoPE chunk (dead once S is done; same 64 x 64 swizzled tile), the per-row O
//       rescale factor (and 1 / row sum on a sequence's last page) into the stage's slot.
//   WG1, WG2 (value warpgroups, 176 regs): each owns 256 of the 512 output dims:
//       O = O * rescale + P . V (wgmma m64n256k16, 4 k-steps, committed as two groups of 2),
//       epilogue per sequence. The first warp of each is a TMA producer and refills its own four
//       V chunks of the stage in two parts: rows 0-31 once its first two k-steps are done, rows
//       32-63 once all four are; WG1's first warp then reloads the RoPE chunk once both are done.
// S of page i+1 (WG0) runs on the tensor cores while P.V of page i (WG1/2) does.
// Shared memory: Q (72 KB), two 72 KB KV stages (nine 64 x 64 chunks with 128B swizzle; TMA boxes
// of 32 rows x one chunk), 1 KB of row factors and the workspace slot of each stage's split,
// mbarriers per stage: full (TMA bytes), p_full (WG0's 128 threads), empty (WG1/2's 256 threads).
// fp32 accumulation throughout. docs/kernel.md explains the schedule and what was measured.
// (Q in WG0's registers, which would free 72 KB for a third stage, does not fit: WG0 then needs
// ~210 registers and each value warpgroup 160, over the 3 x 168 the CTA has.)

#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cute/arch/mma_sm90_gmma.hpp>
#include <utility>

#include "common/pack.cuh"
#include "params.h"
#include "sm90/decode/timeline.cuh"
#include "sm90/ptx.cuh"

namespace mla::sm90 {

constexpr int kThreads = 384;                       // three warpgroups
constexpr int kChunkCols = 64;                      // columns per TMA box / swizzle atom row
constexpr int kChunks = kHeadDim / kChunkCols;      // 9
constexpr int kChunkBytes = kChunkCols * 64 * 2;    // 8 KB: 64 rows x 128 B
constexpr int kPageBytes = kChunks * kChunkBytes;   // 72 KB
constexpr int kStages = 2;
constexpr float kMaxSlack = 8.f;  // log2 headroom of the softmax's running max (see the score warpgroup)
constexpr int kKSteps = kHeadDim / 16;              // 36
constexpr int kRegsScore = 152, kRegsValue = 176;   // setmaxnreg; 152 + 2 * 176 = 3 * 168

// Shared memory map (offsets from a 1024-byte aligned base).
// A stage's last chunk (the RoPE columns of K) is dead once S of its page is done; P of that
// page (64 x 64, the same 128B-swizzled K-major tile) is written there.
constexpr int kSmemQ = 0;                              // Q tile, 9 swizzled 64 x 64 chunks
constexpr int kSmemKV = kSmemQ + kPageBytes;
constexpr int kSmemScale = kSmemKV + kStages * kPageBytes;  // float [kStages][64]: O rescale factor of the page
constexpr int kSmemInvL = kSmemScale + kStages * 64 * 4;  // float [kStages][64]: 1 / row sum (last page)
constexpr int kSmemSlot = kSmemInvL + kStages * 64 * 4;   // int [kStages]: workspace slot of the split (-1: out)
constexpr int kSmemBar = kSmemSlot + 64;                    // uint64 [4][kStages]: full, p_full, p_full2, empty
constexpr int kSmemUsed = kSmemBar + (4 * kStages + 1) * 8;  // + the Q barrier
constexpr int kSmemAlloc = kSmemUsed + 1024;          // room to align the base
static_assert(kSmemAlloc <= 227 * 1024, "shared memory budget");

// K-major operand (rows of 128 B, 8-row groups 1024 B apart).
__device__ __forceinline__ uint64_t desc_k_major(uint32_t addr) { return make_desc(addr, 16, 1024); }
// MN-major operand (V as B): 64-element MN atoms 8 KB apart (LBO), 8-row K groups 1 KB apart (SBO).
__device__ __forceinline__ uint64_t desc_mn_major(uint32_t addr) { return make_desc(addr, kChunkBytes, 1024); }
// Byte offset of the 16-bit element (row, col) of a tile of 128-byte rows in the 128B swizzle
// (16-byte units of a row XOR its low 3 bits): P as desc_k_major reads it.
__device__ __forceinline__ int sw128(int row, int col) { return row * 128 + (((col >> 3) ^ (row & 7)) << 4) + (col & 7) * 2; }

// Tokens 32 half .. 32 half + 31 of a page's P: p = 2^(s * scale[h] - m_use[h]) for this thread's
// rows r0 + 8 h, added into the row sums l and stored as T pairs where desc_k_major reads P.
template <typename T>
__device__ __forceinline__ void write_p_half(uint8_t* p_smem, const float (&s)[32], const float (&scale)[2],
                                             const float (&m_use)[2], float (&l)[2], int half, int r0, int col_base) {
#pragma unroll
  for (int jj = 0; jj < 4; ++jj)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int j = 4 * half + jj;
      const float p0 = exp2f(fmaf(s[4 * j + 2 * h], scale[h], -m_use[h]));
      const float p1 = exp2f(fmaf(s[4 * j + 2 * h + 1], scale[h], -m_use[h]));
      l[h] += p0 + p1;
      *reinterpret_cast<uint32_t*>(p_smem + sw128(r0 + 8 * h, 8 * j + col_base)) = pack2<T>(p0, p1);
    }
}

template <typename T>
struct Gmma;
template <>
struct Gmma<__nv_bfloat16> {
  using QKs = cute::SM90::GMMA::MMA_64x64x16_F32BF16BF16_SS<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::K>;
  using PV = cute::SM90::GMMA::MMA_64x256x16_F32BF16BF16_SS<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::MN>;
};
template <>
struct Gmma<__half> {
  using QKs = cute::SM90::GMMA::MMA_64x64x16_F32F16F16_SS<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::K>;
  using PV = cute::SM90::GMMA::MMA_64x256x16_F32F16F16_SS<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::MN>;
};

template <class Atom, int N, size_t... I>
__device__ __forceinline__ void gmma_ss(uint64_t da, uint64_t db, float (&d)[N], bool accumulate,
                                        std::index_sequence<I...>) {
  Atom::fma(da, db, d[I]..., accumulate ? cute::SM90::GMMA::ScaleOut::One : cute::SM90::GMMA::ScaleOut::Zero);
}

// S = Q . K^T of one 64-row tile and one page, issued and committed, not waited for: kKSteps
// k-steps of the wgmma Atom (m64n64), kStepsPerChunk of them in each swizzled chunk of kChunkBytes
// of both operands, 32 bytes apart; desc makes an operand descriptor of a shared-memory address.
template <class Atom, int kKSteps, int kStepsPerChunk, int kChunkBytes, class Desc>
__device__ __forceinline__ void issue_qk(uint32_t s_q, uint32_t s_page, float (&s)[32], Desc desc) {
  wgmma_fence();
#pragma unroll
  for (int k = 0; k < kKSteps; ++k) {
    const uint32_t koff = (k / kStepsPerChunk) * kChunkBytes + (k % kStepsPerChunk) * 32;
    gmma_ss<Atom>(desc(s_q + koff), desc(s_page + koff), s, k > 0, std::make_index_sequence<32>{});
  }
  wgmma_commit();
}

// A 4 x 4 transpose within each quad of lanes (lane % 4 = t): on return a[i] is what quad lane i
// held in a[t]. Two rounds of shuffles; every lane of the warp must take part.
__device__ __forceinline__ void quad_transpose(uint32_t (&a)[4], int t) {
  const bool odd = t & 1, upper = t & 2;
  uint32_t s0 = odd ? a[0] : a[1], s1 = odd ? a[2] : a[3];
  uint32_t r0 = __shfl_xor_sync(0xffffffff, s0, 1), r1 = __shfl_xor_sync(0xffffffff, s1, 1);
  // (selects, not a[odd ? 0 : 1] = r0: a run-time index would put a[] in local memory)
  a[0] = odd ? r0 : a[0];
  a[1] = odd ? a[1] : r0;
  a[2] = odd ? r1 : a[2];
  a[3] = odd ? a[3] : r1;
  s0 = upper ? a[0] : a[2];
  s1 = upper ? a[1] : a[3];
  r0 = __shfl_xor_sync(0xffffffff, s0, 2);
  r1 = __shfl_xor_sync(0xffffffff, s1, 2);
  a[0] = upper ? r0 : a[0];
  a[1] = upper ? r1 : a[1];
  a[2] = upper ? a[2] : r0;
  a[3] = upper ? a[3] : r1;
}

// The score warpgroup's first softmax step on one page: S (the wgmma m64n64 accumulator: rows
// r0, r0 + 8; tokens 8 j + col_base + {0, 1}) masked to -inf at and past each row's limit (only on a
// page that reaches one), and each row's raw maximum over the page (a quad of lanes holds a row).
__device__ __forceinline__ void mask_and_row_max(float (&s)[32], int page, int col_base, const int (&limit)[2],
                                                 float (&mx)[2]) {
  const int tok0 = page * kPageSize + col_base;
  if ((page + 1) * kPageSize > min(limit[0], limit[1])) {
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (tok0 + 8 * j + (e % 2) >= limit[e / 2]) s[4 * j + e] = -INFINITY;
  }
  mx[0] = mx[1] = -INFINITY;
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) mx[e / 2] = fmaxf(mx[e / 2], s[4 * j + e]);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffff, mx[h], 1));
    mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffff, mx[h], 2));
  }
}

// The lse (natural log; -inf: no token) of query row `row` of sequence b into lse ([b, h_q, s_q]:
// +inf for a row with no token), or into lse_accum at workspace slot `slot` (>= 0: the sequence is split).
__device__ __forceinline__ void store_lse(const Params& p, float lse, int slot, int b, int row) {
  if (slot < 0)
    p.lse[static_cast<int64_t>(b) * p.rows + (row % p.h_q) * p.s_q + row / p.h_q] = lse == -INFINITY ? INFINITY : lse;
  else
    p.lse_accum[static_cast<int64_t>(slot) * p.rows + row] = lse;
}

// The score warpgroup at a sequence's last page, rows row0 + r0 and + 8 (r0: this thread's first
// row in the tile; a quad of lanes holds a row): the row sums l (of probabilities exp2(s - m)
// times 2^m_shift) over the quad, each row's lse (natural log) into lse, or into lse_accum at
// workspace slot `slot` (>= 0: the sequence is split), and numer / sum into inv_l[r0], inv_l[r0 + 8]
// for the value warpgroups' epilogue; thread 0 records the slot.
__device__ __forceinline__ void finish_rows(const Params& p, const float (&l)[2], const float (&m)[2], float m_shift,
                                            float numer, float* inv_l, int* slot_out, int slot, int b, int row0,
                                            int r0, int lane, int tid) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float total = l[h];
    total += __shfl_xor_sync(0xffffffff, total, 1);
    total += __shfl_xor_sync(0xffffffff, total, 2);
    const float lse = total > 0.f ? (m[h] - m_shift + log2f(total)) * 0.69314718055994531f : -INFINITY;
    const int row = row0 + r0 + 8 * h;
    if (lane % 4 == 0) {
      inv_l[r0 + 8 * h] = total > 0.f ? numer / total : 0.f;
      if (tid == 0 && h == 0) *slot_out = slot;
      if (row < p.rows) store_lse(p, lse, slot, b, row);
    }
  }
}

// The epilogue of a sequence's last page in a value warpgroup: its 256 columns (v) of rows
// O's rows r0 and r0 + 8 (the wgmma accumulator of a value warpgroup) times the page's factors
// row_scale[r0], row_scale[r0 + 8], which WG0 published with P; skipped when no row of the warp
// moved its max (most pages). Every lane must call it.
__device__ __forceinline__ void rescale_rows(float (&o)[128], const float* row_scale, int r0) {
  const float sc0 = row_scale[r0], sc1 = row_scale[r0 + 8];
  if (__any_sync(0xffffffff, sc0 != 1.f || sc1 != 1.f)) {
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] *= (i % 4) < 2 ? sc0 : sc1;
  }
}

// A value warpgroup at a sequence's last page: the factors WG0's finish_rows published for rows
// r0 and r0 + 8 (inv_l) into inv, and the split's workspace slot (returned).
__device__ __forceinline__ int last_page_factors(const float* inv_l, const int* slot, int r0, float (&inv)[2]) {
  inv[0] = inv_l[r0];
  inv[1] = inv_l[r0 + 8];
  return *slot;
}

// row0 and row0 + 8 of O (the wgmma accumulator, times inv[h] = 1 / row sum) into out (T), or
// as fp32 partials into workspace slot `slot` (>= 0) for the combine. Every lane must call it.
template <typename T>
__device__ __forceinline__ void store_rows(const Params& p, const float (&o)[128], const float (&inv)[2], int slot,
                                           int b, int row0, int v, int lane) {
  // The accumulator layout gives a lane 2 adjacent columns of every 8: a quad of lanes holds
  // 32 adjacent columns of a row per 4 steps of j. For the output (2-byte elements) a transpose
  // within the quad gives each lane 8 adjacent columns, so a row goes out in 16-byte stores:
  // 4x fewer store instructions than 4-byte ones, and whole 32-byte sectors.
  const int t = lane % 4, col_base = 2 * t;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = row0 + 8 * h;
    const bool keep = row < p.rows;  // the shuffles need every lane; only the stores are predicated
    if (slot < 0) {
      T* dst = static_cast<T*>(p.out) + (static_cast<int64_t>(b) * p.rows + row) * kHeadDimV + v * 256;
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        uint32_t w[4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
          w[i] = pack2<T>(o[4 * (4 * k + i) + 2 * h] * inv[h], o[4 * (4 * k + i) + 2 * h + 1] * inv[h]);
        quad_transpose(w, t);  // w[i]: columns 8 (4 k + t) + 2 i, + 1
        if (keep) *reinterpret_cast<uint4*>(dst + 8 * (4 * k + t)) = make_uint4(w[0], w[1], w[2], w[3]);
      }
    } else {
      // fp32 partials: a lane's 2 columns are 8 bytes, so a quad already writes whole 32-byte sectors.
      float* dst = p.out_accum + (static_cast<int64_t>(slot) * p.rows + row) * kHeadDimV + v * 256 + col_base;
      if (keep) {
#pragma unroll
        for (int j = 0; j < 32; ++j)
          *reinterpret_cast<float2*>(dst + 8 * j) = make_float2(o[4 * j + 2 * h] * inv[h], o[4 * j + 2 * h + 1] * inv[h]);
      }
    }
  }
}

// ------------------------------------------------------------------ the kernel

__device__ __forceinline__ int pages_in(int seqlen) { return seqlen > 0 ? (seqlen + kPageSize - 1) / kPageSize : 0; }

// Walks the (sequence, page) pairs of one scheduler stretch in order, skipping empty sequences.
struct Stretch {
  int begin_b, begin_page, end_b, end_page;
};
struct Cursor {
  int b, page, hi;  // sequence, page, one past the last page of b in the stretch; b > end_b: done
};

__device__ __forceinline__ void settle(Cursor& c, const Stretch& st, const int32_t* __restrict__ seqlens) {
  while (c.b <= st.end_b) {
    const int lo = c.b == st.begin_b ? st.begin_page : 0;
    const int hi = c.b == st.end_b ? st.end_page : pages_in(seqlens[c.b]);
    if (lo < hi) {
      c.page = lo;
      c.hi = hi;
      return;
    }
    ++c.b;
  }
}
__device__ __forceinline__ void advance(Cursor& c, const Stretch& st, const int32_t* __restrict__ seqlens) {
  if (++c.page >= c.hi) {
    ++c.b;
    settle(c, st, seqlens);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    decode_kernel(const __grid_constant__ CUtensorMap tmap_q, const __grid_constant__ CUtensorMap tmap_kv, Params p) {
  using QKs = typename Gmma<T>::QKs;
  using PV = typename Gmma<T>::PV;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const uint32_t s_base = smem_addr(smem);
  const uint32_t s_kv = s_base + kSmemKV, s_q = s_base + kSmemQ;
  float* scale_s = reinterpret_cast<float*>(smem + kSmemScale);
  float* inv_l_s = reinterpret_cast<float*>(smem + kSmemInvL);
  int* slot_s = reinterpret_cast<int*>(smem + kSmemSlot);
  const uint32_t bar_full = s_base + kSmemBar;                  // + 8 * stage: the page has landed (TMA)
  const uint32_t bar_pfull = bar_full + 8 * kStages;            // P and row factors written (WG0, 128 arrivals)
  const uint32_t bar_pfull2 = bar_pfull + 8 * kStages;          // P's columns 32-63 written (WG0, 128 arrivals)
  const uint32_t bar_empty = bar_pfull2 + 8 * kStages;          // P.V done (WG1, WG2: 256 arrivals)
  const uint32_t bar_q = bar_empty + 8 * kStages;               // the Q tile has landed (TMA)

  // The combine kernel (launched after this one with programmatic dependent launch) may be
  // scheduled once every CTA got here; it waits for this grid's completion before reading.
  asm volatile("griddepcontrol.launch_dependents;");
  const int tid = threadIdx.x, wg = tid / 128, warp = (tid % 128) / 32, lane = tid % 32;
  // The two TMA descriptors into the cache now, beside the metadata reads, not at the first load.
  if (tid == 0) asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&tmap_q)) : "memory");
  if (tid == 128) asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&tmap_kv)) : "memory");
  const int m_tile = blockIdx.x;
  const MetadataRow& meta = p.metadata[blockIdx.y];
  const Stretch st{meta.begin_batch, meta.begin_page, meta.end_batch, meta.end_page};
  const int begin_split = meta.begin_split;
  if (st.begin_b >= p.batch) return;
  // The producer reads the block of the stretch's first page now, beside the sequence lengths
  // that settle() reads: one dependent memory round trip less before the first page's TMA. It is
  // used only if the stretch does start there (it does whenever the metadata is get_metadata's).
  const bool first_block_read = wg > 0 && warp == 0 && st.begin_page < p.max_blocks;
  const int first_block =
      first_block_read ? p.block_table[static_cast<int64_t>(st.begin_b) * p.block_table_stride + st.begin_page] : 0;
  Cursor cur{st.begin_b, 0, 0};
  settle(cur, st, p.cache_seqlens);
  if (cur.b > st.end_b) return;  // nothing to do (every thread agrees)

  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(bar_full + 8 * s, 1);
      mbar_init(bar_pfull + 8 * s, 128);
      mbar_init(bar_pfull2 + 8 * s, 128);
      mbar_init(bar_empty + 8 * s, 256);
    }
    mbar_init(bar_q, 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    fence_proxy_async();
  }
  __syncthreads();
  namespace tl = timeline;
  if (tid == 128) tl::start();

  // This thread's accumulator rows within the tile (wgmma D / A-fragment layout): r0 and r0 + 8.
  const int r0 = warp * 16 + lane / 4;
  const int col_base = 2 * (lane % 4);

  if (wg == 0) {
    // ============================ score warpgroup: Q to shared memory per sequence; S, softmax, P
    reg_dealloc<kRegsScore>();
    float m[2], l[2];
    int limit[2], seqlen = 0;
    int prev_b = -1, split_base = 0, n_splits = 0;
    uint32_t q_phase = 0;
#pragma unroll 1
    for (int g = 0; cur.b <= st.end_b; ++g) {
      const int b = cur.b, page = cur.page;
      const bool last = page + 1 == cur.hi;
      if (b != prev_b) {  // a new sequence: its Q tile into shared memory, fresh softmax state
        prev_b = b;
        seqlen = p.cache_seqlens[b];  // (read once a sequence: no global load between one page's P and the next S)
        split_base = p.num_splits[b];  // read now, used after the sequence's last page
        n_splits = p.num_splits[b + 1] - split_base;
        const int row0 = m_tile * 64 + r0;
        named_barrier(3, 128);  // WG0 only: every warp's S of the previous sequence has read Q
        // Q tile by TMA (one box, nine 64 x 64 chunks, 128B swizzle; rows past s_q * h_q are zero-filled).
        if (tid == 0) {
          mbar_expect_tx(bar_q, kPageBytes);
          tma_load_4d(s_q, &tmap_q, bar_q, 0, m_tile * 64, 0, b);
        }
        mbar_wait(bar_q, q_phase);
        q_phase ^= 1;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int sq = (row0 + 8 * h) / p.h_q;
          limit[h] = (p.causal && sq < p.s_q) ? seqlen - p.s_q + sq + 1 : seqlen;
          m[h] = -INFINITY;
          l[h] = 0.f;
        }
      }

      // ---- S = Q K^T (64 rows x 64 tokens)
      const int stage = g % kStages;
      const uint32_t s_stage = s_kv + stage * kPageBytes;
      if (tid == 0) tl::page(g, tl::kScoreWaitFull);
      mbar_wait(bar_full + 8 * stage, (g / kStages) & 1);
      if (tid == 0) tl::page(g, tl::kScoreIssue);
      float s[32];
      issue_qk<QKs, kKSteps, 4, kChunkBytes>(s_q, s_stage, s, [](uint32_t a) { return desc_k_major(a); });
      wgmma_wait<0>();
      fence_regs(s);
      if (tid == 0) tl::page(g, tl::kScoreDone);
      named_barrier(3, 128);  // every warp's part of S is done before the stage's rows are zeroed / P overwrites K's RoPE chunk

      // ---- online softmax (log2 domain); rows r0, r0 + 8; tokens 8 j + col_base + {0, 1}
      // The row max is taken of the raw scores (softmax_scale > 0, so it commutes with the scaling),
      // and each probability is exp2(s * scale - m): one FFMA before the exp2. Only a page that reaches
      // a row's limit (the sequence end, or the causal limit) is masked.
      float mx[2];
      mask_and_row_max(s, page, col_base, limit, mx);
      float sc[2], m_use[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        // The running max moves only when a page's max exceeds it by more than kMaxSlack (log2):
        // probabilities then stay below 2^kMaxSlack (exact in fp32, in range in bf16 and fp16), and on
        // most pages no row moves its max, so sc = 1 and the value warpgroups skip O's rescale.
        const float page_max = mx[h] * p.scale_log2;
        const float m_new = page_max > m[h] + kMaxSlack ? page_max : m[h];
        m_use[h] = m_new == -INFINITY ? 0.f : m_new;
        sc[h] = exp2f(m[h] - m_use[h]);
        m[h] = m_new;
        l[h] *= sc[h];
      }
      // ---- the rows past the sequence in a partial last page hold anything (NaN too): P is 0
      // there, but 0 * NaN = NaN in P.V, so zero those V rows (S has read them, masked).
      const int valid = seqlen - page * kPageSize;
      if (valid < kPageSize) {
        uint8_t* stage_ptr = smem + kSmemKV + stage * kPageBytes;
        const int per_chunk = (kPageSize - valid) * 8;  // 16-byte units per chunk
        const int n_zero = per_chunk * (kHeadDimV / kChunkCols);
        for (int u = tid; u < n_zero; u += 128) {
          const int chunk = u / per_chunk, rem = u % per_chunk;
          *reinterpret_cast<uint4*>(stage_ptr + chunk * kChunkBytes + (valid + rem / 8) * 128 + (rem % 8) * 16) =
              make_uint4(0, 0, 0, 0);
        }
      }
      // P goes where K's RoPE chunk was, in two halves: tokens 0-31 (P.V's first two k-steps) are
      // published on p_full with the row factors, so P.V starts while tokens 32-63 are exponentiated
      // and published on p_full2. (P.V of the page that used this stage before is done: its refill,
      // which this page's full barrier waited for, came after that.)
      uint8_t* p_smem = smem + kSmemKV + stage * kPageBytes + (kChunks - 1) * kChunkBytes;  // K's RoPE chunk
      const float p_scale[2] = {p.scale_log2, p.scale_log2};
      auto p_half = [&](int half) { write_p_half<T>(p_smem, s, p_scale, m_use, l, half, r0, col_base); };
      p_half(0);
      if (lane % 4 == 0) {
        scale_s[stage * 64 + r0] = sc[0];
        scale_s[stage * 64 + r0 + 8] = sc[1];
      }
      fence_proxy_async();  // P and the zeroed rows, written by threads, are read by wgmma next
      mbar_arrive(bar_pfull + 8 * stage);
      p_half(1);
      if (last)
        finish_rows(p, l, m, 0.f, 1.f, inv_l_s + stage * 64, slot_s + stage,
                    n_splits == 1 ? -1 : split_base + (b == st.begin_b ? begin_split : 0), b, m_tile * 64, r0, lane, tid);
      fence_proxy_async();
      mbar_arrive(bar_pfull2 + 8 * stage);
      if (tid == 0) tl::page(g, tl::kPReady);
      advance(cur, st, p.cache_seqlens);
    }
  } else {
    // ============================ value warpgroups: O[:, 256 v : 256 v + 256] += P V
    reg_alloc<kRegsValue>();
    const int v = wg - 1;
    // The producers are the first warp of each value warpgroup; their lanes issue a page's TMA
    // boxes side by side (box: 32 rows of one 64-column chunk). Each warpgroup reloads its own four
    // V chunks: rows 0-31 once its first two P.V k-steps are done, rows 32-63 once all four are.
    // WG1's producer reloads the RoPE chunk (P lives there) once both warpgroups are done.
    const bool producer = warp == 0;
    Cursor ld = cur;
    auto block_of = [&](const Cursor& c) {
      return first_block_read && c.b == st.begin_b && c.page == st.begin_page
                 ? first_block
                 : p.block_table[static_cast<int64_t>(c.b) * p.block_table_stride + c.page];
    };
    // The block of the next page to load is read one load ahead: that global read (often a DRAM
    // miss, ~0.5-1 us) then runs under P.V instead of between P.V's end and the stage's refill.
    // (Every producer lane reads it: one address, one transaction.)
    int next_block = producer ? block_of(ld) : 0;
    // part 0: rows 0-31 of this warpgroup's V chunks; 1: rows 32-63; 2 (WG1): the RoPE chunk.
    auto issue_part = [&](int stage, int part) {
      if (part == 0 && v == 0 && lane == 0) mbar_expect_tx(bar_full + 8 * stage, kPageBytes);
      const int chunk = part == 2 ? kChunks - 1 : 4 * v + lane;
      const int row = part == 2 ? 32 * lane : 32 * part;
      if (lane < (part == 2 ? 2 : 4))
        tma_load_4d(s_kv + stage * kPageBytes + chunk * kChunkBytes + row * 128, &tmap_kv, bar_full + 8 * stage, 0,
                    row, chunk, next_block);
    };
    auto ld_next = [&] {
      advance(ld, st, p.cache_seqlens);
      if (ld.b <= st.end_b) next_block = block_of(ld);
    };
    if (producer) {
      for (int s = 0; s < kStages && ld.b <= st.end_b; ++s) {
        issue_part(s, 0);
        issue_part(s, 1);
        if (v == 0) issue_part(s, 2);
        ld_next();
      }
      if (tid == 128) tl::loads_issued();
    }


    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;
    int g = 0;
#pragma unroll 1
    for (; cur.b <= st.end_b; ++g) {
      const int b = cur.b;
      const bool last = cur.page + 1 == cur.hi;
      const int stage = g % kStages;
      mbar_wait(bar_full + 8 * stage, (g / kStages) & 1);
      mbar_wait(bar_pfull + 8 * stage, (g / kStages) & 1);
      if (tid == 128) tl::page(g, tl::kValueIssue);
      rescale_rows(o, scale_s + stage * 64, r0);
      wgmma_fence();
      const uint32_t s_stage = s_kv + stage * kPageBytes;
      auto pv_step = [&](int kk) {
        gmma_ss<PV>(desc_k_major(s_stage + (kChunks - 1) * kChunkBytes + kk * 32),
                    desc_mn_major(s_stage + v * 4 * kChunkBytes + kk * 16 * 128), o, true, std::make_index_sequence<128>{});
      };
      pv_step(0);
      pv_step(1);
      wgmma_commit();
      mbar_wait(bar_pfull2 + 8 * stage, (g / kStages) & 1);  // P's tokens 32-63
      wgmma_fence();  // (after a wait between two wgmma of a chain: else ptxas serialises them)
      pv_step(2);
      pv_step(3);
      wgmma_commit();
      const bool refill = producer && ld.b <= st.end_b;
      wgmma_wait<1>();  // tokens 0-31 read: their V rows may be reloaded
      named_barrier(4 + v, 128);  // (this warpgroup's four warps)
      if (refill) issue_part(stage, 0);
      wgmma_wait<0>();
      fence_regs(o);
      if (tid == 128) tl::page(g, tl::kValueDone);
      if (tid == 256) tl::page(g, tl::kValue2Done);
      named_barrier(4 + v, 128);
      if (refill) issue_part(stage, 1);
      float inv[2] = {0.f, 0.f};
      int slot = 0;
      if (last) slot = last_page_factors(inv_l_s + stage * 64, slot_s + stage, r0, inv);
      mbar_arrive(bar_empty + 8 * stage);  // this thread's reads of the stage and its factors are done
      if (refill && v == 0) {  // both value warpgroups are done with the stage: its RoPE chunk
        mbar_wait(bar_empty + 8 * stage, (g / kStages) & 1);
        issue_part(stage, 2);
        if (lane == 0) tl::page(g, tl::kRefillIssued);
      }
      if (refill) ld_next();
      if (last) store_rows<T>(p, o, inv, slot, b, m_tile * 64 + r0, v, lane);
      advance(cur, st, p.cache_seqlens);
    }
    if (tid == 128) tl::end(g);
  }
}

}  // namespace mla::sm90
