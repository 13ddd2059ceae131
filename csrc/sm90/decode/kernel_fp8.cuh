// Hopper (sm90a) split-KV MLA decode over an FP8 (e4m3) cache: S on the FP8 tensor cores, P.V
// on the fp16 ones.
//
// The CTA's work is the bf16 kernel's (kernel.cuh: one 64-row query tile x one scheduler stretch
// of pages, 384 threads):
//   WG0 (score warpgroup): per sequence the e4m3 Q tile by TMA (ops.cpp quantized a bf16/fp16 q
//       row by row, csrc/common/quantize.cu, and the decode launches as that kernel's programmatic
//       dependent: WG0 waits for it before Q); per page S = Q8 . K8^T (wgmma m64n64k32 e4m3, 18
//       k-steps, the first kQRegSteps with Q from WG0's registers, read once a sequence: less
//       shared-memory traffic a page), each row scaled by its q scale * descale_k * softmax_scale, the
//       online softmax, and P in fp16 into the page's P buffer (the bf16 kernel's layout), in two
//       halves (tokens 0-31, then 32-63) so that P.V's first k-steps start before the softmax ends.
//   WG1, WG2 (value warpgroups): each owns 256 of the 512 output dims. Each widens its part of V
//       (64 tokens x 256 dims of the page; e4m3 -> fp16 is exact) into its half of one fp16 V
//       buffer in the bf16 kernel's layout, then O += P . V (wgmma m64n256k16 f16, 4 k-steps).
//       fp16 wgmma reads V as it lies (MN-major); 8-bit wgmma would need V transposed in shared
//       memory and P in two e4m3 terms (docs/kernel.md has the two measured side by side).
//       One fp16 V buffer (two do not fit), refilled in halves while the tensor cores work:
//       rows 32-63 of page i while P.V's first two k-steps of page i run, rows 0-31 of page i+1
//       once those are done, while the last two run.
// Pages land whole (one TMA box: 64 rows x 9 chunks of 64 bytes, 64B swizzle) in three stages; a
// stage is refilled once S and both widenings are done with it. P has two buffers.
//
// Numerics (ops.py states the bound): S's products are exact, but the e4m3 tensor cores add them
// into the accumulator with about 14 bits, an error that grows with the k-steps of one chain (18
// here; docs/kernel.md gives the lse it leaves, well within the bound). P is one fp16 term
// (2^-11 relative per probability), stored times 2^6 (kPScaleLog2): the running max moves by
// more than kMaxSlack = 2 (log2) only, so 2^6 p <= 256, and p stays a normal fp16 down to 2^-20
// of the running max.

#pragma once

#include <cuda_fp8.h>

#include "sm90/decode/kernel.cuh"

namespace mla::sm90::fp8 {

constexpr int kChunkBytes = 64 * 64;                // 64 rows x 64 e4m3 (one 64B swizzle row each)
constexpr int kPageBytes = kChunks * kChunkBytes;   // 36 KB: a page, or a Q tile
constexpr int kStages = 3;                          // pages in flight
constexpr int kV16Bytes = kHeadDimV * 64 * 2;       // V in fp16: 64 tokens x 512 dims
constexpr int kPBytes = 64 * 64 * 2;                // P in fp16: 64 rows x 64 tokens
constexpr int kKSteps = kHeadDim / 32;              // 18
constexpr float kMaxSlack = 2.f;
constexpr float kPScaleLog2 = 6.f;                  // P is stored as fp16 2^6 p
// setmaxnreg: WG0 holds S (32), 14 of the Q tile's 18 k-steps of A fragments (56; all 18 would
// not fit, 16 spill) and the softmax's state; the value warpgroups hold O (128) and a widening in
// flight. 136 + 2 * 184 = 504 = 3 * 168 (no spill).
constexpr int kRegsScore = 136, kRegsValue = 184;
constexpr int kQRegSteps = 14;  // k-steps of S with Q from registers (RS); the rest read Q from shared memory (SS)

constexpr int kSmemQ = 0;
constexpr int kSmemKV = kSmemQ + kPageBytes;                // kStages pages
constexpr int kSmemV16 = kSmemKV + kStages * kPageBytes;    // V in fp16 (each value warpgroup its half)
constexpr int kSmemP = kSmemV16 + kV16Bytes;                // 2 x P
constexpr int kSmemScale = kSmemP + 2 * kPBytes;            // float [2][64]: O rescale factor of the page
constexpr int kSmemInvL = kSmemScale + 2 * 64 * 4;          // float [2][64]: descale_k / row sum (last page)
constexpr int kSmemSlot = kSmemInvL + 2 * 64 * 4;           // int [2]: workspace slot of the split (-1: out)
constexpr int kSmemBar = kSmemSlot + 64;                    // full[3], free[3], p_full[2], p_full2[2], p_empty[2], q
constexpr int kSmemUsed = kSmemBar + (2 * kStages + 6 + 1) * 8;
constexpr int kSmemAlloc = kSmemUsed + 1024;
static_assert(kSmemAlloc <= 227 * 1024, "shared memory budget");

// K-major operand in 64-byte swizzled rows: 8-row groups 512 bytes apart.
__device__ __forceinline__ uint64_t desc_sw64(uint32_t addr) { return make_desc(addr, 16, 512, 2); }

using QKr = cute::SM90::GMMA::MMA_64x64x32_F32E4M3E4M3_RS_TN<>;  // Q from registers
using QKs = cute::SM90::GMMA::MMA_64x64x32_F32E4M3E4M3_SS_TN<>;  // Q from shared memory

// Byte offset of (row, byte col) in a tile of 64-byte rows with the 64B swizzle (16-byte units of
// a row XOR bits 1-2 of the row), as TMA writes it.
__device__ __forceinline__ int sw64(int row, int col) { return row * 64 + ((((col >> 4) ^ (row >> 1)) & 3) << 4) + (col & 15); }

template <class Atom, size_t... I>
__device__ __forceinline__ void gmma_rs(const uint32_t (&a)[4], uint64_t db, float (&d)[32], bool accumulate,
                                        std::index_sequence<I...>) {
  Atom::fma(a[0], a[1], a[2], a[3], db, d[I]..., accumulate ? cute::SM90::GMMA::ScaleOut::One : cute::SM90::GMMA::ScaleOut::Zero);
}
using PV = cute::SM90::GMMA::MMA_64x256x16_F32F16F16_SS<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::MN>;

// T: the output dtype (bf16 or fp16).
template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    decode_kernel(const __grid_constant__ CUtensorMap tmap_q, const __grid_constant__ CUtensorMap tmap_kv, Params p) {
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const uint32_t s_base = smem_addr(smem);
  const uint32_t s_kv = s_base + kSmemKV, s_q = s_base + kSmemQ;
  float* scale_s = reinterpret_cast<float*>(smem + kSmemScale);
  float* inv_l_s = reinterpret_cast<float*>(smem + kSmemInvL);
  int* slot_s = reinterpret_cast<int*>(smem + kSmemSlot);
  const uint32_t bar_full = s_base + kSmemBar;          // + 8 * stage: the page has landed (TMA)
  const uint32_t bar_free = bar_full + 8 * kStages;     // S and both widenings are done with it (384)
  const uint32_t bar_pfull = bar_free + 8 * kStages;    // + 8 * buffer: P's tokens 0-31 and the row factors written (128)
  const uint32_t bar_pfull2 = bar_pfull + 8 * 2;        // P's tokens 32-63 written (128)
  const uint32_t bar_pempty = bar_pfull2 + 8 * 2;       // P.V done with the P buffer (256)
  const uint32_t bar_q = bar_pempty + 8 * 2;            // the Q tile has landed (TMA)

  asm volatile("griddepcontrol.launch_dependents;");
  const int tid = threadIdx.x, wg = tid / 128, warp = (tid % 128) / 32, lane = tid % 32;
  namespace tl = timeline;  // (event clocks of a measuring build only, as in the bf16 kernel)
  if (tid == 128) tl::start();
  if (tid == 0) asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&tmap_q)) : "memory");
  if (tid == 128) asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&tmap_kv)) : "memory");
  const int m_tile = blockIdx.x;
  const MetadataRow& meta = p.metadata[blockIdx.y];
  const Stretch st{meta.begin_batch, meta.begin_page, meta.end_batch, meta.end_page};
  const int begin_split = meta.begin_split;
  if (st.begin_b >= p.batch) return;
  Cursor cur{st.begin_b, 0, 0};
  settle(cur, st, p.cache_seqlens);
  if (cur.b > st.end_b) return;

  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(bar_full + 8 * s, 1);
      mbar_init(bar_free + 8 * s, 384);
    }
    for (int s = 0; s < 2; ++s) {
      mbar_init(bar_pfull + 8 * s, 128);
      mbar_init(bar_pfull2 + 8 * s, 128);
      mbar_init(bar_pempty + 8 * s, 256);
    }
    mbar_init(bar_q, 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    fence_proxy_async();
  }
  __syncthreads();

  const int r0 = warp * 16 + lane / 4;  // accumulator rows r0, r0 + 8
  const int col_base = 2 * (lane % 4);
  const float descale_k = *p.descale_k;

  if (wg == 0) {
    // ============================ score warpgroup
    reg_dealloc<kRegsScore>();
    if (p.q_quantized) asm volatile("griddepcontrol.wait;" ::: "memory");  // q8 and its scales are written
    float m[2], l[2], rs[2];  // running max (log2), row sums, score scale
    int limit[2], seqlen = 0;
    int prev_b = -1, split_base = 0, n_splits = 0;
    uint32_t q_phase = 0;
    uint32_t qa[kQRegSteps][4];  // this thread's A fragments of the Q tile, one set a k-step
#pragma unroll 1
    for (int g = 0; cur.b <= st.end_b; ++g) {
      const int b = cur.b, page = cur.page;
      const bool last = page + 1 == cur.hi;
      if (b != prev_b) {
        prev_b = b;
        seqlen = p.cache_seqlens[b];
        split_base = p.num_splits[b];
        n_splits = p.num_splits[b + 1] - split_base;
        const int row0 = m_tile * 64 + r0;
        named_barrier(3, 128);  // every warp's S of the previous sequence has read Q
        if (tid == 0) {
          mbar_expect_tx(bar_q, kPageBytes);
          tma_load_4d(s_q, &tmap_q, bar_q, 0, m_tile * 64, 0, b);
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = row0 + 8 * h;
          const int sq = row / p.h_q;
          limit[h] = (p.causal && sq < p.s_q) ? seqlen - p.s_q + sq + 1 : seqlen;
          const float qs = row < p.rows ? p.q_scale[b * p.q_scale_batch_stride + row * p.q_scale_row_stride] : 1.f;
          rs[h] = p.scale_log2 * qs * descale_k;
          m[h] = -INFINITY;
          l[h] = 0.f;
        }
        mbar_wait(bar_q, q_phase);
        q_phase ^= 1;
        // The wgmma m64k32 8-bit A layout: rows r0, r0 + 8; bytes 4 (lane % 4) .. + 3, and + 16,
        // of the k-step's 32 (chunk k / 2, its bytes 32 (k % 2) ..), read from the swizzled tile.
#pragma unroll
        for (int k = 0; k < kQRegSteps; ++k)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            qa[k][e] = *reinterpret_cast<const uint32_t*>(
                smem + kSmemQ + (k / 2) * kChunkBytes + sw64(r0 + 8 * (e % 2), 32 * (k % 2) + 4 * (lane % 4) + 16 * (e / 2)));
      }

      // ---- S = Q K^T (64 rows x 64 tokens), e4m3 x e4m3 -> fp32
      const int stage = g % kStages, pb = g % 2;
      const uint32_t s_stage = s_kv + stage * kPageBytes;
      if (tid == 0) tl::page(g, tl::kScoreWaitFull);
      mbar_wait(bar_full + 8 * stage, (g / kStages) & 1);
      if (tid == 0) tl::page(g, tl::kScoreIssue);
      float s[32];
      const auto desc = [](uint32_t a) { return desc_sw64(a); };
      wgmma_fence();
#pragma unroll
      for (int k = 0; k < kKSteps; ++k) {
        const uint32_t koff = (k / 2) * kChunkBytes + (k % 2) * 32;
        if (k < kQRegSteps)
          gmma_rs<QKr>(qa[k], desc(s_stage + koff), s, k > 0, std::make_index_sequence<32>{});
        else
          gmma_ss<QKs>(desc(s_q + koff), desc(s_stage + koff), s, true, std::make_index_sequence<32>{});
      }
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(s);
      if (tid == 0) tl::page(g, tl::kScoreDone);
      mbar_arrive(bar_free + 8 * stage);  // this thread's S has read the page

      // ---- online softmax (log2 domain), as in the bf16 kernel, with a scale per row
      float mx[2];
      mask_and_row_max(s, page, col_base, limit, mx);
      float sc[2], m_use[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float page_max = mx[h] * rs[h];
        const float m_new = page_max > m[h] + kMaxSlack ? page_max : m[h];
        const float m_safe = m_new == -INFINITY ? 0.f : m_new;
        sc[h] = exp2f(m[h] - m_safe);
        m_use[h] = m_safe - kPScaleLog2;  // exp2(s * rs - m_use) = 2^6 p
        m[h] = m_new;
        l[h] *= sc[h];
      }
      // ---- P (times 2^6, fp16) into the P buffer, once P.V of the page two back is done with it
      if (g >= 2) mbar_wait(bar_pempty + 8 * pb, ((g / 2) + 1) & 1);
      // In two halves, as the bf16 kernel publishes P: tokens 0-31 with the row
      // factors on p_full, so that P.V's first two k-steps start while tokens 32-63 are computed.
      uint8_t* p_smem = smem + kSmemP + pb * kPBytes;
      auto p_half = [&](int half) { write_p_half<__half>(p_smem, s, rs, m_use, l, half, r0, col_base); };
      p_half(0);
      if (lane % 4 == 0) {
        scale_s[pb * 64 + r0] = sc[0];
        scale_s[pb * 64 + r0 + 8] = sc[1];
      }
      fence_proxy_async();
      mbar_arrive(bar_pfull + 8 * pb);
      p_half(1);
      if (last)  // (O carries descale_k, V's scale, and 2^kPScaleLog2, P's, as the row sums do)
        finish_rows(p, l, m, kPScaleLog2, descale_k, inv_l_s + pb * 64, slot_s + pb,
                    n_splits == 1 ? -1 : split_base + (b == st.begin_b ? begin_split : 0), b, m_tile * 64, r0, lane, tid);
      fence_proxy_async();  // P, written by threads, is read by wgmma next
      mbar_arrive(bar_pfull2 + 8 * pb);
      if (tid == 0) tl::page(g, tl::kPReady);
      advance(cur, st, p.cache_seqlens);
    }
  } else {
    // ============================ value warpgroups: V of their 256 dims widened to fp16, O += P V
    reg_alloc<kRegsValue>();
    const int v = wg - 1;
    const bool producer = tid == 128;
    Cursor ld = cur;
    auto block_of = [&](const Cursor& c) {
      return p.block_table[static_cast<int64_t>(c.b) * p.block_table_stride + c.page];
    };
    int next_block = producer ? block_of(ld) : 0;
    auto issue = [&](int stage) {
      mbar_expect_tx(bar_full + 8 * stage, kPageBytes);
      tma_load_4d(s_kv + stage * kPageBytes, &tmap_kv, bar_full + 8 * stage, 0, 0, 0, next_block);
    };
    auto ld_next = [&] {
      advance(ld, st, p.cache_seqlens);
      if (ld.b <= st.end_b) next_block = block_of(ld);
    };
    if (producer) {
      for (int s = 0; s < kStages && ld.b <= st.end_b; ++s) {
        issue(s);
        ld_next();
      }
      tl::loads_issued();
    }

    // The widening: this thread moves row t (lane, then 32 + lane) of chunk 4 v + warp: 4 reads of
    // 16 e4m3 (64B swizzle), 32 conversions (exact), 8 writes of 8 fp16 into the warpgroup's half
    // of the fp16 V (chunk warp: 64 rows x 128 B, 128B swizzle: the bf16 kernel's V layout). A read
    // or write phase of 8 lanes covers all 32 banks. Rows past the sequence become zeros.
    Cursor wc = cur;  // the page the next widen reads
    int w_seq = -1, w_len = 0, w_valid = kPageSize;
    const uint32_t v16 = s_base + kSmemV16 + v * (kV16Bytes / 2) + warp * 8192;
    auto widen = [&](int gi, int part) {  // part 0: rows 0-31, part 1: rows 32-63
      const int stage = gi % kStages;
      if (part == 0) {
        mbar_wait(bar_full + 8 * stage, (gi / kStages) & 1);
        if (wc.b != w_seq) {
          w_seq = wc.b;
          w_len = p.cache_seqlens[wc.b];
        }
        w_valid = w_len - wc.page * kPageSize;
      }
      const int t = 32 * part + lane;
      const uint32_t src = s_kv + stage * kPageBytes + (4 * v + warp) * kChunkBytes + t * 64;
      const uint32_t dst = v16 + t * 128;
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        uint32_t x[4];
        asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                     : "=r"(x[0]), "=r"(x[1]), "=r"(x[2]), "=r"(x[3])
                     : "r"(src + (((u ^ (t >> 1)) & 3) << 4)));
        uint32_t y[8];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const __half2_raw lo = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(x[i] & 0xffff), __NV_E4M3);
          const __half2_raw hi = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(x[i] >> 16), __NV_E4M3);
          y[2 * i] = t < w_valid ? (static_cast<uint32_t>(lo.y) << 16 | lo.x) : 0u;
          y[2 * i + 1] = t < w_valid ? (static_cast<uint32_t>(hi.y) << 16 | hi.x) : 0u;
        }
#pragma unroll
        for (int k = 0; k < 2; ++k)
          asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(dst + (((2 * u + k) ^ (t & 7)) << 4)),
                       "r"(y[4 * k]), "r"(y[4 * k + 1]), "r"(y[4 * k + 2]), "r"(y[4 * k + 3])
                       : "memory");
      }
      fence_proxy_async();  // the fp16 V, written by threads, is read by wgmma
      if (part == 1) {
        mbar_arrive(bar_free + 8 * stage);  // this thread's reads of the page are done
        if (producer && ld.b <= st.end_b) {  // the stage's next page, once S and both widenings are done with it
          mbar_wait(bar_free + 8 * stage, (gi / kStages) & 1);
          issue(stage);
          ld_next();
          tl::page(gi, tl::kRefillIssued);
        }
        __syncwarp();
        advance(wc, st, p.cache_seqlens);
      }
    };

    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;
    widen(0, 0);
    named_barrier(4 + v, 128);  // the warpgroup's fp16 rows 0-31 of the first page are written
    int g = 0;
#pragma unroll 1
    for (; cur.b <= st.end_b; ++g) {
      const int b = cur.b;
      const bool last = cur.page + 1 == cur.hi;
      const int pb = g % 2;
      mbar_wait(bar_pfull + 8 * pb, (g / 2) & 1);
      rescale_rows(o, scale_s + pb * 64, r0);
      wgmma_fence();
      const uint32_t s_p = s_base + kSmemP + pb * kPBytes;
      const uint32_t s_v = s_base + kSmemV16 + v * (kV16Bytes / 2);
      auto pv_step = [&](int kk) {  // tokens 16 kk .. 16 kk + 15
        gmma_ss<PV>(desc_k_major(s_p + kk * 32), desc_mn_major(s_v + kk * 16 * 128), o, true,
                    std::make_index_sequence<128>{});
      };
      pv_step(0);
      pv_step(1);
      wgmma_commit();
      if (tid == 128) tl::page(g, tl::kValueIssue);
      widen(g, 1);  // rows 32-63 of this page, while its tokens 0-31 run on the tensor cores
      named_barrier(4 + v, 128);
      mbar_wait(bar_pfull2 + 8 * pb, (g / 2) & 1);
      wgmma_fence();  // (after a wait between two wgmma of a chain: else ptxas serialises them)
      pv_step(2);
      pv_step(3);
      wgmma_commit();
      const bool more = wc.b <= st.end_b;
      wgmma_wait<1>();  // tokens 0-31 read: their fp16 rows take the next page's
      named_barrier(4 + v, 128);
      if (more) widen(g + 1, 0);
      wgmma_wait<0>();
      fence_regs(o);
      if (tid == 128) tl::page(g, tl::kValueDone);
      if (tid == 256) tl::page(g, tl::kValue2Done);
      float inv[2] = {0.f, 0.f};
      int slot = 0;
      if (last) {
        inv[0] = inv_l_s[pb * 64 + r0];
        inv[1] = inv_l_s[pb * 64 + r0 + 8];
        slot = slot_s[pb];
      }
      mbar_arrive(bar_pempty + 8 * pb);
      if (last) store_rows<T>(p, o, inv, slot, b, m_tile * 64 + r0, v, lane);
      named_barrier(4 + v, 128);  // the warpgroup's fp16 V of the next page is written
      advance(cur, st, p.cache_seqlens);
    }
    if (tid == 128) tl::end(g);
  }
}

}  // namespace mla::sm90::fp8
