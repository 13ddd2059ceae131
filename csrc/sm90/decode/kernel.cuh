// Hopper (sm90a) split-KV MLA decode kernel, v3: two warpgroups on a "seesaw".
// (An experiment kept in history: correct, but slower than v2.1 on the H100; see
// docs/kernel-notes.md. The next commit restores v2.1.)
//
// One CTA = one 64-row query tile (rows = s_q * h_q flattened, row = s * h_q + h, zero-padded to
// 64) x one scheduler stretch of KV pages (csrc/common/scheduler.cu), walked page by page across
// the sequences of the stretch. 256 threads = two warpgroups, WG0 and WG1:
// - WG w holds O[:, 256 w : 256 w + 256] (128 fp32 registers a thread) for every page, and
//   computes O = O * scale(g) + P(g) . V(g)[:, its half] (wgmma m64n256k16).
// - The pages alternate between them: page g of the stretch sits in KV stage g % 2 and is
//   "owned" by WG g % 2, which computes S = Q . K^T (wgmma m64n64k16, Q and K in shared memory),
//   the online-softmax step (the running row max and sum come from the other warpgroup, which
//   owned page g - 1), keeps P in registers for its own P . V (A from registers), and publishes P
//   (shared memory), the new row max and sum and the rescale factor for the other warpgroup.
// So while one warpgroup runs a softmax on the CUDA cores, the tensor cores work on the other's
// S of the next page and on the P . V products: one O for the CTA (there are registers for no
// more), yet matrix and softmax work overlap, as in FlashMLA's "seesaw" schedule.
//
// Memory: Q (72 KB, by TMA per sequence), two 72 KB KV stages, one 8 KB P tile, row statistics:
// 227 KB. Each stage is loaded by TMA in three groups, each with its own mbarrier: the V half of
// WG0 (K columns 0-255), the V half of WG1 (256-511) and the RoPE part (512-575). A group is
// refilled with the page two ahead by the warpgroup that read it last, as soon as it is done:
// the RoPE part by the owner right after S, each V half by the warpgroup whose half it is right
// after its P . V. There are no "empty" barriers and no producer warp; S of a page starts on the
// RoPE part (refilled first).
//
// Hand-offs: full[stage][group] (TMA bytes), pfull[stage] (the owner's 128 threads: P, stats and
// zeroed rows written). The single P tile is safe: a warpgroup writes P(g) only after its own
// P . V(g - 1), the last reader of P(g - 1), is complete, and the reader of P(g) waited for it.

#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cute/arch/mma_sm90_gmma.hpp>
#include <utility>

#include "launch.h"

namespace mla::sm90 {

constexpr int kThreads = 256;                       // two warpgroups
constexpr int kChunkCols = 64;                      // columns per TMA box / swizzle atom row
constexpr int kChunks = kHeadDim / kChunkCols;      // 9
constexpr int kChunkBytes = kChunkCols * 64 * 2;    // 8 KB: 64 rows x 128 B
constexpr int kPageBytes = kChunks * kChunkBytes;   // 72 KB
constexpr int kStages = 2;
constexpr int kGroups = 3;                          // load groups of a stage: V half 0, V half 1, RoPE
constexpr int kGroupRope = 2;
constexpr int kHalfChunks = kHeadDimV / kChunkCols / 2;  // 4 chunks = 256 columns

// Shared memory map (offsets from a 1024-byte aligned base).
constexpr int kSmemQ = 0;                                   // Q tile, 9 swizzled 64 x 64 chunks
constexpr int kSmemKV = kSmemQ + kPageBytes;                // kStages pages
constexpr int kSmemP = kSmemKV + kStages * kPageBytes;      // P tile, 64 x 64, swizzled like a chunk
constexpr int kSmemStats = kSmemP + kChunkBytes;            // float [kStages][3][64]: row max, row sum, rescale
constexpr int kSmemBar = kSmemStats + kStages * 3 * 64 * 4;  // uint64: full[kStages][kChunks], pfull[kStages], q
constexpr int kSmemUsed = kSmemBar + (kStages * kChunks + kStages + 1) * 8;
constexpr int kSmemAlloc = kSmemUsed + 1024;                // room to align the base
static_assert(kSmemAlloc <= 227 * 1024, "shared memory budget");

struct Params {
  const void* q;
  const int32_t* block_table;
  const int32_t* cache_seqlens;
  const int32_t* metadata;
  const int32_t* num_splits;
  void* out;
  float* lse;
  float* out_accum;
  float* lse_accum;
  int batch, s_q, h_q, rows, max_blocks;
  float scale_log2;  // softmax_scale * log2(e)
  int causal;
};

// ------------------------------------------------------------------ PTX helpers

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count));
}

__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}

__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t phase) {
  uint32_t done;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(phase)
        : "memory");
  } while (!done);
}

__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1)
      : "memory");
}

__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1, int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], [%2];" ::"r"(
          dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}

__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
__device__ __forceinline__ void named_barrier(int id, int count) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory"); }

// Registers an in-flight wgmma reads or writes: the compiler must neither move their uses across
// this point nor reuse them before it (the hardware still owns them until the wait).
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void fence_regs(uint32_t (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

// wgmma shared-memory descriptor, 128-byte swizzle. lbo/sbo in bytes.
__device__ __forceinline__ uint64_t make_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  uint64_t d = 0;
  d |= static_cast<uint64_t>((addr >> 4) & 0x3FFF);
  d |= static_cast<uint64_t>((lbo >> 4) & 0x3FFF) << 16;
  d |= static_cast<uint64_t>((sbo >> 4) & 0x3FFF) << 32;
  d |= static_cast<uint64_t>(1) << 62;  // SWIZZLE_128B
  return d;
}
// A descriptor plus a byte offset (< 256 KB in all: the 14-bit address field cannot carry over).
// The base goes through an opaque move so that the compiler recomputes each offset descriptor
// where it is used instead of hoisting dozens of 64-bit descriptors into registers.
__device__ __forceinline__ uint64_t opaque(uint64_t d) {
  asm volatile("mov.b64 %0, %0;" : "+l"(d));
  return d;
}
__device__ __forceinline__ uint64_t desc_add(uint64_t d, uint32_t bytes) { return d + (bytes >> 4); }
// K-major operand (rows of 128 B, 8-row groups 1024 B apart).
__device__ __forceinline__ uint64_t desc_k_major(uint32_t addr) { return make_desc(addr, 16, 1024); }
// MN-major operand (V as B): 64-element MN atoms 8 KB apart (LBO), 8-row K groups 1 KB apart (SBO).
__device__ __forceinline__ uint64_t desc_mn_major(uint32_t addr) { return make_desc(addr, kChunkBytes, 1024); }

namespace gmma = cute::SM90::GMMA;
template <typename T>
struct Gmma;
template <>
struct Gmma<__nv_bfloat16> {
  using QK = gmma::MMA_64x64x16_F32BF16BF16_SS<gmma::Major::K, gmma::Major::K>;
  using PVs = gmma::MMA_64x256x16_F32BF16BF16_SS<gmma::Major::K, gmma::Major::MN>;  // P from shared memory
  using PVr = gmma::MMA_64x256x16_F32BF16BF16_RS<gmma::Major::K, gmma::Major::MN>;  // P from registers
};
template <>
struct Gmma<__half> {
  using QK = gmma::MMA_64x64x16_F32F16F16_SS<gmma::Major::K, gmma::Major::K>;
  using PVs = gmma::MMA_64x256x16_F32F16F16_SS<gmma::Major::K, gmma::Major::MN>;
  using PVr = gmma::MMA_64x256x16_F32F16F16_RS<gmma::Major::K, gmma::Major::MN>;
};

template <class Atom, int N, size_t... I>
__device__ __forceinline__ void gmma_ss(uint64_t da, uint64_t db, float (&d)[N], bool accumulate,
                                        std::index_sequence<I...>) {
  Atom::fma(da, db, d[I]..., accumulate ? gmma::ScaleOut::One : gmma::ScaleOut::Zero);
}

template <class Atom, int N, size_t... I>
__device__ __forceinline__ void gmma_rs(uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint64_t db,
                                        float (&d)[N], std::index_sequence<I...>) {
  Atom::fma(a0, a1, a2, a3, db, d[I]..., gmma::ScaleOut::One);
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  __half2 v = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&v);
}

// ------------------------------------------------------------------ walking a stretch

__device__ __forceinline__ int pages_in(int seqlen) { return seqlen > 0 ? (seqlen + kPageSize - 1) / kPageSize : 0; }

// The (sequence, page) pairs of one scheduler stretch, in order, skipping empty sequences.
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
  if (c.b > st.end_b) return;
  if (++c.page >= c.hi) {
    ++c.b;
    settle(c, st, seqlens);
  }
}

// ------------------------------------------------------------------ the kernel

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    decode_kernel(const __grid_constant__ CUtensorMap tmap_q, const __grid_constant__ CUtensorMap tmap_kv, Params p) {
  using QK = typename Gmma<T>::QK;
  using PVs = typename Gmma<T>::PVs;
  using PVr = typename Gmma<T>::PVr;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const uint32_t s_base = smem_addr(smem);
  const uint32_t s_q = s_base + kSmemQ, s_kv = s_base + kSmemKV, s_p = s_base + kSmemP;
  float* stats = reinterpret_cast<float*>(smem + kSmemStats);  // [stage][max, sum, rescale][64]
  const uint32_t bar_full = s_base + kSmemBar;                  // + 8 * (stage * kChunks + chunk)
  const uint32_t bar_pfull = bar_full + 8 * kStages * kChunks;  // + 8 * stage
  const uint32_t bar_q = bar_pfull + 8 * kStages;

  const int tid = threadIdx.x, w = tid / 128, wtid = tid % 128, warp = wtid / 32, lane = tid % 32;
  const int m_tile = blockIdx.x;
  const int32_t* meta = p.metadata + blockIdx.y * kMetadataSize;
  const Stretch st{meta[0], meta[1], meta[2], meta[3]};
  const int begin_split = meta[4];
  if (st.begin_b >= p.batch) return;
  // cur: this page (g); nxt, nxt2: the pages one and two ahead in the stretch (maybe done).
  Cursor cur{st.begin_b, 0, 0};
  settle(cur, st, p.cache_seqlens);
  if (cur.b > st.end_b) return;  // nothing to do (every thread agrees)
  Cursor nxt = cur;
  advance(nxt, st, p.cache_seqlens);
  Cursor nxt2 = nxt;
  advance(nxt2, st, p.cache_seqlens);

  // One load group of a page into a stage, by one thread.
  auto load_group = [&](int stage, int group, const Cursor& c) {
    const int block = p.block_table[static_cast<int64_t>(c.b) * p.max_blocks + c.page];
    const int first = group == kGroupRope ? kChunks - 1 : group * kHalfChunks;
    const int n = group == kGroupRope ? 1 : kHalfChunks;
#pragma unroll 1
    for (int ch = first; ch < first + n; ++ch) {
      const uint32_t bar = bar_full + 8 * (stage * kChunks + ch);
      mbar_expect_tx(bar, kChunkBytes);
      tma_load_2d(s_kv + stage * kPageBytes + ch * kChunkBytes, &tmap_kv, bar, ch * kChunkCols, block * kPageSize);
    }
  };

  if (tid == 0) {
    for (int i = 0; i < kStages * kChunks; ++i) mbar_init(bar_full + 8 * i, 1);
    for (int s = 0; s < kStages; ++s) mbar_init(bar_pfull + 8 * s, 128);
    mbar_init(bar_q, 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    fence_proxy_async();
  }
  __syncthreads();
  if (tid == 0) {
    for (int g = 0; g < kGroups; ++g) load_group(0, g, cur);
    if (nxt.b <= st.end_b)
      for (int g = 0; g < kGroups; ++g) load_group(1, g, nxt);
  }

  // This thread's accumulator rows within the tile (wgmma D / A-fragment layout): r0 and r0 + 8;
  // its columns (tokens of S, dims of O): 8 j + col_base + {0, 1}.
  const int r0 = warp * 16 + lane / 4;
  const int col_base = 2 * (lane % 4);
  const int bar_wg = 2 + w;  // named barrier of this warpgroup (1: both)

  float o[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) o[i] = 0.f;
  float s[32];
  uint32_t pk[16];  // P of the last owned page, bf16/fp16 pairs: the A operand of the own P . V
  float m[2], l[2];  // running row max (log2 domain, scaled) and row sum after the last page
  int limit[2];      // tokens [0, limit) are visible to the row
  uint32_t q_phase = 0;
  int prev_b = -1;
  // Every wgmma wait below is unconditional, and no group is in flight where the owner / other
  // paths part: otherwise ptxas serialises every wgmma of the kernel (warning C7518 / C7520).

  // S = Q . K^T of the page in `stage` (all 128 threads; waits for each load group).
  // Order: the RoPE part (refilled first, right after the S two pages back), then this warpgroup's
  // V half (refilled right after its own P . V), then the other half.
  auto issue_s = [&](int stage, uint32_t phase) {
    const uint64_t dq = opaque(desc_k_major(s_q)), dk = opaque(desc_k_major(s_kv + stage * kPageBytes));
    mbar_wait(bar_full + 8 * (stage * kChunks + kChunks - 1), phase);
    wgmma_fence();  // after each wait: else ptxas fences (and serialises) behind the spin loop itself
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint32_t koff = (kChunks - 1) * kChunkBytes + k * 32;
      gmma_ss<QK>(desc_add(dq, koff), desc_add(dk, koff), s, k > 0, std::make_index_sequence<32>{});
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int half = i == 0 ? w : 1 - w;
#pragma unroll
      for (int c = 0; c < kHalfChunks; ++c) {
        mbar_wait(bar_full + 8 * (stage * kChunks + half * kHalfChunks + c), phase);
        wgmma_fence();
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const uint32_t koff = (half * kHalfChunks + c) * kChunkBytes + k * 32;
          gmma_ss<QK>(desc_add(dq, koff), desc_add(dk, koff), s, true, std::make_index_sequence<32>{});
        }
      }
    }
    wgmma_commit();
    fence_regs(s);
  };
  // O *= factor per row (0 on a sequence's first page: that clears O).
  auto rescale_o = [&](float f0, float f1) {
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] *= (i % 4) < 2 ? f0 : f1;
  };
  const uint32_t v_off = w * kHalfChunks * kChunkBytes;  // this warpgroup's V half within a stage

#pragma unroll 1
  for (int g = 0; cur.b <= st.end_b; ++g) {
    const int b = cur.b, page = cur.page;
    const int stage = g & 1;
    const uint32_t phase = (g >> 1) & 1;
    const bool owner = stage == w;
    const bool last = page + 1 == cur.hi;
    const bool next_same = nxt.b == b;  // page g + 1 is of this sequence
    const int seqlen = p.cache_seqlens[b];
    const uint32_t s_stage = s_kv + stage * kPageBytes;

    if (b != prev_b) {  // a new sequence: its Q tile, fresh softmax state, the first S
      prev_b = b;
      named_barrier(1, kThreads);  // both warpgroups are done with the previous sequence (Q, P tile)
      if (tid == 0) {
        mbar_expect_tx(bar_q, kPageBytes);
#pragma unroll 1
        for (int c = 0; c < kChunks; ++c)
          tma_load_3d(s_q + c * kChunkBytes, &tmap_q, bar_q, c * kChunkCols, m_tile * 64, b);
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int sq = (m_tile * 64 + r0 + 8 * h) / p.h_q;
        limit[h] = (p.causal && sq < p.s_q) ? seqlen - p.s_q + sq + 1 : seqlen;
        m[h] = -INFINITY;
        l[h] = 0.f;
      }
      mbar_wait(bar_q, q_phase);
      q_phase ^= 1;
      if (owner) issue_s(stage, phase);  // (the other warpgroup issues S(g + 1) first thing below)
    }

    if (owner) {
      // ============ S(g) is done -> softmax -> publish P, stats -> own P . V
      wgmma_wait<0>();  // S(g) (already complete unless issued at this sequence's start)
      fence_regs(s);
      fence_regs(o);
      named_barrier(bar_wg, 128);  // every warp's S has read the stage's RoPE part: refill it
      if (wtid == 0 && nxt2.b <= st.end_b) load_group(stage, kGroupRope, nxt2);

      // online softmax in the log2 domain; rows r0, r0 + 8; tokens 8 j + col_base + {0, 1}
      const int tok0 = page * kPageSize + col_base;
      if (page * kPageSize + kPageSize > min(limit[0], limit[1])) {  // the page reaches a row's limit
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (tok0 + 8 * j + (e % 2) >= limit[e / 2]) s[4 * j + e] = -INFINITY;
      }
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) mx[e / 2] = fmaxf(mx[e / 2], s[4 * j + e]);
      float sc[2], m_use[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffff, mx[h], 1));
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffff, mx[h], 2));
        const float m_new = fmaxf(m[h], mx[h] * p.scale_log2);  // softmax_scale > 0 (ops.py)
        m_use[h] = m_new == -INFINITY ? 0.f : m_new;
        sc[h] = exp2f(m[h] - m_use[h]);
        m[h] = m_new;
      }
      float rs[2] = {0.f, 0.f};
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float p0 = exp2f(fmaf(s[4 * j + 2 * h], p.scale_log2, -m_use[h]));
          const float p1 = exp2f(fmaf(s[4 * j + 2 * h + 1], p.scale_log2, -m_use[h]));
          rs[h] += p0 + p1;
          pk[2 * j + h] = pack2<T>(p0, p1);
        }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        rs[h] += __shfl_xor_sync(0xffffffff, rs[h], 1);
        rs[h] += __shfl_xor_sync(0xffffffff, rs[h], 2);
        l[h] = l[h] * sc[h] + rs[h];
      }

      // The rows past the sequence in a partial last page hold anything (NaN too): P is 0 there,
      // but 0 * NaN = NaN in P . V, so zero those V rows (S has read them, masked).
      const int valid = seqlen - page * kPageSize;
      if (valid < kPageSize) {
        uint8_t* stage_ptr = smem + kSmemKV + stage * kPageBytes;
        const int per_chunk = (kPageSize - valid) * 8;  // 16-byte units per chunk
        const int n_zero = per_chunk * (kHeadDimV / kChunkCols);
        for (int u = wtid; u < n_zero; u += 128) {
          const int chunk = u / per_chunk, rem = u % per_chunk;
          *reinterpret_cast<uint4*>(stage_ptr + chunk * kChunkBytes + (valid + rem / 8) * 128 + (rem % 8) * 16) =
              make_uint4(0, 0, 0, 0);
        }
      }
      // P into the P tile (64 x 64, 128B-swizzled K-major, as wgmma reads it); the row stats.
      uint8_t* p_smem = smem + kSmemP;
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = r0 + 8 * h, col = 8 * j + col_base;
          *reinterpret_cast<uint32_t*>(p_smem + row * 128 + (((col >> 3) ^ (row & 7)) << 4) + (col & 7) * 2) =
              pk[2 * j + h];
        }
      if (lane % 4 == 0) {
        float* st_row = stats + stage * 3 * 64;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          st_row[r0 + 8 * h] = m[h];
          st_row[64 + r0 + 8 * h] = l[h];
          st_row[128 + r0 + 8 * h] = sc[h];
        }
      }
      fence_proxy_async();  // P and the zeroed rows, written by threads, are read by wgmma next
      mbar_arrive(bar_pfull + 8 * stage);
      if (valid < kPageSize) named_barrier(bar_wg, 128);  // this warpgroup's P . V reads zeroed rows too

      rescale_o(sc[0], sc[1]);
      const uint64_t dv = opaque(desc_mn_major(s_stage + v_off));
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kPageSize / 16; ++kk)
        gmma_rs<PVr>(pk[4 * kk], pk[4 * kk + 1], pk[4 * kk + 2], pk[4 * kk + 3], desc_add(dv, kk * 16 * 128), o,
                     std::make_index_sequence<128>{});
      wgmma_commit();
      fence_regs(o);
      fence_regs(pk);
    } else {
      // ============ the other's page: S of the next (own) page, then P . V on this warpgroup's half
      // S(g + 1) goes first: softmax(g + 1) waits for it (S(g + 1) overlaps softmax(g) of the other
      // warpgroup), while P . V(g) is off that critical path.
      wgmma_wait<0>();  // nothing is in flight here; without this wait ptxas serialises (C7518)
      if (next_same) issue_s(stage ^ 1, ((g + 1) >> 1) & 1);
      mbar_wait(bar_pfull + 8 * stage, phase);
      const float* st_row = stats + stage * 3 * 64;
      float sc[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        m[h] = st_row[r0 + 8 * h];
        l[h] = st_row[64 + r0 + 8 * h];
        sc[h] = st_row[128 + r0 + 8 * h];
      }
      rescale_o(sc[0], sc[1]);
      const uint64_t dp = opaque(desc_k_major(s_p)), dv = opaque(desc_mn_major(s_stage + v_off));
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kPageSize / 16; ++kk)
        gmma_ss<PVs>(desc_add(dp, kk * 32), desc_add(dv, kk * 16 * 128), o, true, std::make_index_sequence<128>{});
      wgmma_commit();
      fence_regs(o);
    }
    // All of this step's groups: P . V(g), and S(g + 1) on the other's page (the next step needs
    // both anyway).
    wgmma_wait<0>();
    fence_regs(o);
    fence_regs(s);
    fence_regs(pk);
    // This warpgroup's P . V(g) is done: its V half of the stage takes page g + 2.
    named_barrier(bar_wg, 128);
    if (wtid == 0 && nxt2.b <= st.end_b) load_group(stage, w, nxt2);

    if (last) {
      // ============ the sequence ends with this page: this warpgroup's half of out (and lse)
      const int split_base = p.num_splits[b];
      const int n_splits = p.num_splits[b + 1] - split_base;
      const int split = b == st.begin_b ? begin_split : 0;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = m_tile * 64 + r0 + 8 * h;
        const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;
        if (row < p.rows) {
          if (owner && lane % 4 == 0) {
            const float lse = l[h] > 0.f ? (m[h] + log2f(l[h])) * 0.69314718055994531f : -INFINITY;
            if (n_splits == 1)
              p.lse[static_cast<int64_t>(b) * p.rows + (row % p.h_q) * p.s_q + row / p.h_q] =
                  lse == -INFINITY ? INFINITY : lse;
            else
              p.lse_accum[static_cast<int64_t>(split_base + split) * p.rows + row] = lse;
          }
          if (n_splits == 1) {
            T* dst = static_cast<T*>(p.out) + (static_cast<int64_t>(b) * p.rows + row) * kHeadDimV + w * 256 + col_base;
#pragma unroll
            for (int j = 0; j < 32; ++j)
              *reinterpret_cast<uint32_t*>(dst + 8 * j) = pack2<T>(o[4 * j + 2 * h] * inv, o[4 * j + 2 * h + 1] * inv);
          } else {
            float* dst = p.out_accum + (static_cast<int64_t>(split_base + split) * p.rows + row) * kHeadDimV + w * 256 + col_base;
#pragma unroll
            for (int j = 0; j < 32; ++j)
              *reinterpret_cast<float2*>(dst + 8 * j) = make_float2(o[4 * j + 2 * h] * inv, o[4 * j + 2 * h + 1] * inv);
          }
        }
      }
    }
    cur = nxt;
    nxt = nxt2;
    advance(nxt2, st, p.cache_seqlens);
  }
}

}  // namespace mla::sm90
