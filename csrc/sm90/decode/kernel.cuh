// Hopper (sm90a) split-KV MLA decode kernel.
//
// One CTA = one 64-row query tile (rows = s_q * h_q flattened, row = s * h_q + h, padded to 64
// by TMA's zero fill) x one scheduler stretch of KV pages (see csrc/common/scheduler.cu).
// 256 threads = two consumer warpgroups. Per 64-token page:
//   S  = Q . K^T        wgmma m64n32k16, 36 k-steps; warpgroup w computes tokens [32w, 32w+32)
//   online softmax      row max exchanged between the two warpgroups through shared memory
//   P (bf16/fp16)       written to shared memory (128B-swizzled, K-major), both halves
//   O += P . V          wgmma m64n256k16, 4 k-steps; warpgroup w owns V dims [256w, 256w+256)
// Q (72 KB) and two KV stages (72 KB each) live in shared memory; pages arrive by TMA
// (cp.async.bulk.tensor, 9 boxes of 64x64 with 128B swizzle per page) on mbarriers, the load of
// page i+2 issued as soon as page i is consumed. fp32 accumulation throughout.

#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cute/arch/mma_sm90_gmma.hpp>
#include <utility>

#include "launch.h"

namespace mla::sm90 {

constexpr int kThreads = 256;
constexpr int kChunkCols = 64;                      // columns per TMA box / swizzle atom row
constexpr int kChunks = kHeadDim / kChunkCols;      // 9
constexpr int kChunkBytes = kChunkCols * 64 * 2;    // 8 KB: 64 rows x 128 B
constexpr int kPageBytes = kChunks * kChunkBytes;   // 72 KB
constexpr int kStages = 2;

// Shared memory map (offsets from a 1024-byte aligned base).
constexpr int kSmemQ = 0;
constexpr int kSmemKV = kSmemQ + kPageBytes;
constexpr int kSmemP = kSmemKV + kStages * kPageBytes;
constexpr int kSmemRowMax = kSmemP + kChunkBytes;     // float [2][64]
constexpr int kSmemRowSum = kSmemRowMax + 2 * 64 * 4; // float [2][64]
constexpr int kSmemBar = kSmemRowSum + 2 * 64 * 4;    // uint64 [kStages + 1]
constexpr int kSmemUsed = kSmemBar + (kStages + 1) * 8;
constexpr int kSmemAlloc = kSmemUsed + 1024;          // room to align the base
static_assert(kSmemAlloc <= 227 * 1024, "shared memory budget");

struct Params {
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
__device__ __forceinline__ void wgmma_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }

template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
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
// K-major operand (rows of 128 B, 8-row groups 1024 B apart).
__device__ __forceinline__ uint64_t desc_k_major(uint32_t addr) { return make_desc(addr, 16, 1024); }
// MN-major operand (V as B): 64-element MN atoms 8 KB apart (LBO), 8-row K groups 1 KB apart (SBO).
__device__ __forceinline__ uint64_t desc_mn_major(uint32_t addr) { return make_desc(addr, kChunkBytes, 1024); }

template <typename T>
struct Gmma;
template <>
struct Gmma<__nv_bfloat16> {
  using QK = cute::SM90::GMMA::MMA_64x32x16_F32BF16BF16_SS<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::K>;
  using PV = cute::SM90::GMMA::MMA_64x256x16_F32BF16BF16_SS<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::MN>;
};
template <>
struct Gmma<__half> {
  using QK = cute::SM90::GMMA::MMA_64x32x16_F32F16F16_SS<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::K>;
  using PV = cute::SM90::GMMA::MMA_64x256x16_F32F16F16_SS<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::MN>;
};

template <class Atom, int N, size_t... I>
__device__ __forceinline__ void gmma_ss(uint64_t da, uint64_t db, float (&d)[N], bool accumulate,
                                        std::index_sequence<I...>) {
  Atom::fma(da, db, d[I]..., accumulate ? cute::SM90::GMMA::ScaleOut::One : cute::SM90::GMMA::ScaleOut::Zero);
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

// ------------------------------------------------------------------ the kernel

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    decode_kernel(const __grid_constant__ CUtensorMap tmap_q, const __grid_constant__ CUtensorMap tmap_kv, Params p) {
  using QK = typename Gmma<T>::QK;
  using PV = typename Gmma<T>::PV;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const uint32_t s_base = smem_addr(smem);
  const uint32_t s_q = s_base + kSmemQ, s_kv = s_base + kSmemKV, s_p = s_base + kSmemP;
  float* row_max = reinterpret_cast<float*>(smem + kSmemRowMax);
  float* row_sum = reinterpret_cast<float*>(smem + kSmemRowSum);
  const uint32_t bar_kv = s_base + kSmemBar;  // + 8 * stage
  const uint32_t bar_q = s_base + kSmemBar + 8 * kStages;

  const int tid = threadIdx.x, wg = tid / 128, warp = (tid % 128) / 32, lane = tid % 32;
  const int m_tile = blockIdx.x;
  const int32_t* meta = p.metadata + blockIdx.y * kMetadataSize;
  const int begin_b = meta[0], begin_page = meta[1], end_b = meta[2], end_page = meta[3], begin_split = meta[4];
  if (begin_b >= p.batch) return;

  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) mbar_init(bar_kv + 8 * s, 1);
    mbar_init(bar_q, 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    fence_proxy_async();
  }
  __syncthreads();

  uint32_t kv_phase = 0;  // bit s: parity to wait for on stage s
  uint32_t q_phase = 0;
  // This thread's accumulator rows within the tile (wgmma D layout): r0 and r0 + 8.
  const int r0 = warp * 16 + lane / 4;
  const int col_base = 2 * (lane % 4);

  for (int b = begin_b; b <= end_b; ++b) {
    const int seqlen = p.cache_seqlens[b];
    const int n_pages = seqlen > 0 ? (seqlen + kPageSize - 1) / kPageSize : 0;
    const int page_lo = b == begin_b ? begin_page : 0;
    const int page_hi = b == end_b ? end_page : n_pages;
    if (page_lo >= page_hi) continue;
    const int split = b == begin_b ? begin_split : 0;
    const int split_base = p.num_splits[b];
    const int n_splits = p.num_splits[b + 1] - split_base;
    const int32_t* table = p.block_table + static_cast<int64_t>(b) * p.max_blocks;

    __syncthreads();  // the previous sequence is done with Q and both stages
    if (tid == 0) {
      mbar_expect_tx(bar_q, kPageBytes);
      for (int c = 0; c < kChunks; ++c) tma_load_3d(s_q + c * kChunkBytes, &tmap_q, bar_q, c * kChunkCols, m_tile * 64, b);
      for (int s = 0; s < kStages && page_lo + s < page_hi; ++s) {
        const int block = table[page_lo + s];
        mbar_expect_tx(bar_kv + 8 * s, kPageBytes);
        for (int c = 0; c < kChunks; ++c)
          tma_load_2d(s_kv + s * kPageBytes + c * kChunkBytes, &tmap_kv, bar_kv + 8 * s, c * kChunkCols, block * kPageSize);
      }
    }

    // Last key index + 1 each of this thread's rows may see.
    int limit[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = m_tile * 64 + r0 + 8 * h;
      const int sq = row / p.h_q;
      limit[h] = (p.causal && sq < p.s_q) ? seqlen - p.s_q + sq + 1 : seqlen;
    }

    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

    mbar_wait(bar_q, q_phase);
    q_phase ^= 1;

    for (int page = page_lo; page < page_hi; ++page) {
      const int stage = (page - page_lo) % kStages;
      const uint32_t s_stage = s_kv + stage * kPageBytes;
      mbar_wait(bar_kv + 8 * stage, (kv_phase >> stage) & 1);
      kv_phase ^= 1u << stage;

      const int valid = seqlen - page * kPageSize;  // tokens of this page in the sequence
      if (valid < kPageSize) {
        // Rows past the sequence hold anything (NaN too); P is 0 there but 0 * NaN = NaN in P.V.
        uint8_t* stage_ptr = smem + kSmemKV + stage * kPageBytes;
        const int n_zero = (kPageSize - valid) * (kHeadDimV / kChunkCols) * 8;  // 16-byte units
        for (int u = tid; u < n_zero; u += kThreads) {
          const int chunk = u / ((kPageSize - valid) * 8);
          const int rem = u % ((kPageSize - valid) * 8);
          const int row = valid + rem / 8;
          *reinterpret_cast<uint4*>(stage_ptr + chunk * kChunkBytes + row * 128 + (rem % 8) * 16) = make_uint4(0, 0, 0, 0);
        }
        fence_proxy_async();
        named_barrier(1, kThreads);
      }

      // ---- S = Q K^T for tokens [32 wg, 32 wg + 32)
      float s_acc[16];
      fence_regs(s_acc);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        const uint32_t koff = (kk / 4) * kChunkBytes + (kk % 4) * 32;
        gmma_ss<QK>(desc_k_major(s_q + koff), desc_k_major(s_stage + koff + wg * 32 * 128), s_acc, kk > 0,
                    std::make_index_sequence<16>{});
      }
      wgmma_commit();
      wgmma_wait0();
      fence_regs(s_acc);

      // ---- online softmax (log2 domain)
      const int tok0 = page * kPageSize + wg * 32 + col_base;
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int h = e / 2;
          const int tok = tok0 + 8 * j + (e % 2);
          float v = s_acc[4 * j + e] * p.scale_log2;
          v = tok < limit[h] ? v : -INFINITY;
          s_acc[4 * j + e] = v;
          mx[h] = fmaxf(mx[h], v);
        }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffff, mx[h], 1));
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffff, mx[h], 2));
      }
      if (lane % 4 == 0) {
        row_max[wg * 64 + r0] = mx[0];
        row_max[wg * 64 + r0 + 8] = mx[1];
      }
      named_barrier(2, kThreads);
      float scale_o[2], m_use[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float other = row_max[(wg ^ 1) * 64 + r0 + 8 * h];
        const float m_new = fmaxf(m[h], fmaxf(mx[h], other));
        m_use[h] = m_new == -INFINITY ? 0.f : m_new;
        scale_o[h] = exp2f(m[h] - m_use[h]);
        m[h] = m_new;
        l[h] *= scale_o[h];
      }
      uint8_t* p_smem = smem + kSmemP;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float p0 = exp2f(s_acc[4 * j + 2 * h] - m_use[h]);
          const float p1 = exp2f(s_acc[4 * j + 2 * h + 1] - m_use[h]);
          l[h] += p0 + p1;
          const int row = r0 + 8 * h;
          const int col = wg * 32 + 8 * j + col_base;  // token within the page
          const int off = row * 128 + ((((col >> 3) ^ (row & 7))) << 4) + (col & 7) * 2;
          *reinterpret_cast<uint32_t*>(p_smem + off) = pack2<T>(p0, p1);
        }
      }
#pragma unroll
      for (int i = 0; i < 128; ++i) o[i] *= scale_o[(i % 4) / 2];
      fence_proxy_async();
      named_barrier(3, kThreads);

      // ---- O[:, 256 wg : 256 wg + 256] += P V
      fence_regs(o);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kPageSize / 16; ++kk) {
        gmma_ss<PV>(desc_k_major(s_p + kk * 32), desc_mn_major(s_stage + wg * 4 * kChunkBytes + kk * 16 * 128), o, true,
                    std::make_index_sequence<128>{});
      }
      wgmma_commit();
      wgmma_wait0();
      fence_regs(o);
      named_barrier(4, kThreads);  // both warpgroups are done with this stage and with P

      if (tid == 0 && page + kStages < page_hi) {
        const int block = table[page + kStages];
        mbar_expect_tx(bar_kv + 8 * stage, kPageBytes);
        for (int c = 0; c < kChunks; ++c)
          tma_load_2d(s_stage + c * kChunkBytes, &tmap_kv, bar_kv + 8 * stage, c * kChunkCols, block * kPageSize);
      }
    }

    // ---- epilogue: row sums across the quad and the two warpgroups
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      l[h] += __shfl_xor_sync(0xffffffff, l[h], 1);
      l[h] += __shfl_xor_sync(0xffffffff, l[h], 2);
    }
    if (lane % 4 == 0) {
      row_sum[wg * 64 + r0] = l[0];
      row_sum[wg * 64 + r0 + 8] = l[1];
    }
    named_barrier(2, kThreads);
    float inv[2], lse[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float total = l[h] + row_sum[(wg ^ 1) * 64 + r0 + 8 * h];
      inv[h] = total > 0.f ? 1.f / total : 0.f;
      lse[h] = total > 0.f ? (m[h] + log2f(total)) * 0.69314718055994531f : -INFINITY;
    }

#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = m_tile * 64 + r0 + 8 * h;
      if (row >= p.rows) continue;
      if (n_splits == 1) {
        T* dst = static_cast<T*>(p.out) + (static_cast<int64_t>(b) * p.rows + row) * kHeadDimV + wg * 256 + col_base;
#pragma unroll
        for (int j = 0; j < 32; ++j)
          *reinterpret_cast<uint32_t*>(dst + 8 * j) = pack2<T>(o[4 * j + 2 * h] * inv[h], o[4 * j + 2 * h + 1] * inv[h]);
        if (wg == 0 && lane % 4 == 0)
          p.lse[static_cast<int64_t>(b) * p.rows + (row % p.h_q) * p.s_q + row / p.h_q] = lse[h] == -INFINITY ? INFINITY : lse[h];
      } else {
        const int64_t slot_row = static_cast<int64_t>(split_base + split) * p.rows + row;
        float* dst = p.out_accum + slot_row * kHeadDimV + wg * 256 + col_base;
#pragma unroll
        for (int j = 0; j < 32; ++j)
          *reinterpret_cast<float2*>(dst + 8 * j) = make_float2(o[4 * j + 2 * h] * inv[h], o[4 * j + 2 * h + 1] * inv[h]);
        if (wg == 0 && lane % 4 == 0) p.lse_accum[slot_row] = lse[h];
      }
    }
  }
}

}  // namespace mla::sm90
