// Hopper (sm90a) split-KV MLA decode over an FP8 (e4m3) cache: S on the FP8 tensor cores, P.V
// on the fp16 ones.
//
// The CTA's work is the bf16 kernel's (kernel.cuh: one 64-row query tile x one scheduler stretch
// of pages, 384 threads):
//   WG0 (score warpgroup): per sequence the e4m3 Q tile by TMA (ops.cpp quantized a bf16/fp16 q
//       row by row, csrc/common/quantize.cu, and the decode launches as that kernel's programmatic
//       dependent: WG0 waits for it before Q); per page S = Q8 . K8^T (wgmma m64n64k32 e4m3, 18
//       k-steps in chains of kSChain, Numerics below), each row scaled by its q scale * descale_k * softmax_scale, the
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
// For at most 32 query rows the kernel takes a narrow form (Narrow below): the same warpgroups
// and barriers with both products transposed, so that the tensor cores do not compute 64 rows
// for 16 or 32, and V^T converted into registers instead of the fp16 V buffer (so four stages).
//
// Numerics (ops.py states the bound): S's products are exact, but the e4m3 tensor cores add each
// product into the accumulator aligned to about 14 bits of the accumulator's magnitude, so a
// score's error grows with the k-steps of one accumulation chain: one chain of 18 put scores of
// same-signed products off by up to 1.5% (docs/kernel.md). S therefore runs in chains of kSChain
// = 2 k-steps, each into a fresh partial, the partials added in fp32. P is one fp16 term
// (2^-11 relative per probability), stored times 2^6 (kPScaleLog2): the running max moves by
// more than kMaxSlack = 2 (log2) only, so 2^6 p <= 256, and p stays a normal fp16 down to 2^-20
// of the running max.

#pragma once

#include <cuda_fp8.h>

#include "sm90/decode/kernel.cuh"

namespace mla::sm90::fp8 {

constexpr int kChunkBytes = 64 * 64;                // 64 rows x 64 e4m3 (one 64B swizzle row each)
constexpr int kPageBytes = kChunks * kChunkBytes;   // 36 KB: a page, or a Q tile
constexpr int kV16Bytes = kHeadDimV * 64 * 2;       // V in fp16: 64 tokens x 512 dims
constexpr int kPBytes = 64 * 64 * 2;                // P in fp16: 64 rows x 64 tokens
constexpr int kKSteps = kHeadDim / 32;              // 18
constexpr float kMaxSlack = 2.f;
constexpr float kPScaleLog2 = 6.f;                  // P is stored as fp16 2^6 p
constexpr int kSChain = 2;                          // k-steps of S a tensor-core accumulation chain
constexpr int kSChains = kKSteps / kSChain;         // 9, added in fp32
// setmaxnreg: WG0 holds S and two chain partials (3 x 32; Q is read from shared memory) and the
// softmax's state; the value warpgroups hold O (128) and a widening in flight. 136 + 2 * 184 =
// 504 = 3 * 168 (no spill).
constexpr int kRegsScore = 136, kRegsValue = 184;
// The narrow form: WG0 holds S^T (kN / 2), the next page's S^T in flight (kN = 16: its nine chain
// partials, 9 x 8; kN = 32: five partials and their sum, 6 x 16) and a state per column; the
// value warpgroups hold O^T (kN / 2 a tile, 4 tiles) and V^T (kN = 16: a page, 64; kN = 32: half
// a page, 32). 152 + 2 * 176 and 184 + 2 * 160 = 504 (no spill; reg_set moves WG0 up at kN = 32).
template <int kN>
constexpr int kRegsScoreNarrow = kN == 16 ? 152 : 184;
template <int kN>
constexpr int kRegsValueNarrow = kN == 16 ? 176 : 160;
// What the launch gives each thread (__launch_bounds__(kThreads, 1): 168); a split that adds up to
// more than the three warpgroups' share hangs at setmaxnreg.inc.
constexpr int kRegsLaunch = 65536 / kThreads / 8 * 8;
static_assert(kRegsScore + 2 * kRegsValue == 3 * kRegsLaunch, "the 64-row form's register split");
static_assert(kRegsScoreNarrow<16> + 2 * kRegsValueNarrow<16> == 3 * kRegsLaunch &&
                  kRegsScoreNarrow<32> + 2 * kRegsValueNarrow<32> == 3 * kRegsLaunch,
              "the narrow form's register splits");

// Shared memory (offsets from a 1024-byte aligned base). The narrow form has no fp16 V buffer (its
// value warpgroups convert V into registers), so a fourth stage fits.
template <bool kNarrow>
struct Smem {
  static constexpr int kStages = kNarrow ? 4 : 3;                 // pages in flight
  static constexpr int kQ = 0;
  static constexpr int kKV = kQ + kPageBytes;                     // kStages pages
  static constexpr int kV16 = kKV + kStages * kPageBytes;         // V in fp16 (each value warpgroup its half)
  static constexpr int kP = kV16 + (kNarrow ? 0 : kV16Bytes);     // 2 x P
  static constexpr int kScale = kP + 2 * kPBytes;                 // float [2][64]: O rescale factor of the page
  static constexpr int kInvL = kScale + 2 * 64 * 4;               // float [2][64]: descale_k / row sum (last page)
  static constexpr int kSlot = kInvL + 2 * 64 * 4;                // int [2]: workspace slot of the split (-1: out)
  static constexpr int kBar = kSlot + 64;                         // full[], free[], p_full[2], p_full2[2], p_empty[2], q
  static constexpr int kUsed = kBar + (2 * kStages + 6 + 1) * 8;
  static constexpr int kAlloc = kUsed + 1024;
  static_assert(kAlloc <= 227 * 1024, "shared memory budget");
};

// K-major operand in 64-byte swizzled rows: 8-row groups 512 bytes apart.
__device__ __forceinline__ uint64_t desc_sw64(uint32_t addr) { return make_desc(addr, 16, 512, 2); }

using QK = cute::SM90::GMMA::MMA_64x64x32_F32E4M3E4M3_SS_TN<>;

// Byte offset of (row, byte col) in a tile of 64-byte rows with the 64B swizzle (16-byte units of
// a row XOR bits 1-2 of the row), as TMA writes it.
__device__ __forceinline__ int sw64(int row, int col) { return row * 64 + ((((col >> 4) ^ (row >> 1)) & 3) << 4) + (col & 15); }

template <class Atom, int N, size_t... I>
__device__ __forceinline__ void gmma_rs(const uint32_t (&a)[4], uint64_t db, float (&d)[N], bool accumulate,
                                        std::index_sequence<I...>) {
  Atom::fma(a[0], a[1], a[2], a[3], db, d[I]..., accumulate ? cute::SM90::GMMA::ScaleOut::One : cute::SM90::GMMA::ScaleOut::Zero);
}
using PV = cute::SM90::GMMA::MMA_64x256x16_F32F16F16_SS<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::MN>;

// The narrow form, for tiles of kN = 16 or 32 query rows: the 64 rows of a wgmma are the page's
// tokens or dims, not query rows, so that the tensor cores do kN / 64 of the 64-row form's work:
//   S^T = K8 . Q8^T  (m64 x kN x k32 e4m3: A the page, B the Q tile's first kN rows, both K-major)
//   O^T += V^T . P^T (m64 x kN x k16 f16, 4 tiles of 64 dims a value warpgroup: A from registers,
//                     V^T converted from the page's e4m3, B P's first kN rows K-major, the 64-row
//                     form's P layout). No fp16 V buffer: the page is free once converted.
// A thread holds tokens r0, r0 + 8 (S^T) or dims (O^T) of columns 8 j + col_base + {0, 1}, the
// query rows: its column h (of kN / 4) is col_of(h). A column's max over the page is a
// reduction over the warpgroup (shuffles, then the 4 warps through shared memory: rows 32-63 of
// the page's P buffer, which the narrow form leaves unused), done only on the pages where a vote
// says some column's max moves; its sum stays a partial per thread until the sequence's last page.
// WG0 issues S^T of a sequence's next page under the softmax of this one, so that the two
// overlap: at kN = 16 all nine chains before it; at kN = 32 (where nine partials in flight would
// not fit in registers) five before it and the other four once P^T is written (ahead_step).
template <int kN>
struct Narrow {
  static_assert(kN == 16 || kN == 32, "the narrow form's widths");
  using QK = std::conditional_t<kN == 16, cute::SM90::GMMA::MMA_64x16x32_F32E4M3E4M3_SS_TN<>,
                                cute::SM90::GMMA::MMA_64x32x32_F32E4M3E4M3_SS_TN<>>;
  using PV = std::conditional_t<
      kN == 16, cute::SM90::GMMA::MMA_64x16x16_F32F16F16_RS<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::K>,
      cute::SM90::GMMA::MMA_64x32x16_F32F16F16_RS<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::K>>;
};
__device__ __forceinline__ int col_of(int h, int col_base) { return 8 * (h / 2) + col_base + h % 2; }
constexpr int kScratch = 32 * 128;  // byte offset of the narrow form's reduction scratch in a P buffer

// rescale_rows (kernel.cuh) for the narrow form: O^T's columns col_of(h) times their factors.
template <int kN>
__device__ __forceinline__ void rescale_cols(float (&o)[4][kN / 2], const float* col_scale, int col_base) {
  float sc[kN / 4];
  bool any = false;
#pragma unroll
  for (int h = 0; h < kN / 4; ++h) {
    sc[h] = col_scale[col_of(h, col_base)];
    any |= sc[h] != 1.f;
  }
  if (__any_sync(0xffffffff, any)) {
#pragma unroll
    for (int t = 0; t < 4; ++t)
#pragma unroll
      for (int i = 0; i < kN / 2; ++i) o[t][i] *= sc[2 * (i / 4) + i % 2];
  }
}

// store_rows (kernel.cuh) for the narrow form: this thread's 8 adjacent dims d0 .. d0 + 7 of O^T
// (element i of tile t: dim d0 + 2 t + (i / 2) % 2) for each of its columns h (query row row0 +
// col_of(h), i = 4 (h / 2) + 2 (dim % 2) + h % 2), times inv[h]: one 16-byte store (or two, fp32).
template <typename T, int kN>
__device__ __forceinline__ void store_cols(const Params& p, const float (&o)[4][kN / 2], const float (&inv)[kN / 4],
                                           int slot, int b, int row0, int d0, int col_base) {
#pragma unroll
  for (int h = 0; h < kN / 4; ++h) {
    const int row = row0 + col_of(h, col_base);
    if (row >= p.rows) continue;
    float x[8];
#pragma unroll
    for (int t = 0; t < 4; ++t)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) x[2 * t + hh] = o[t][4 * (h / 2) + 2 * hh + h % 2] * inv[h];
    if (slot < 0) {
      T* dst = static_cast<T*>(p.out) + (static_cast<int64_t>(b) * p.rows + row) * kHeadDimV + d0;
      *reinterpret_cast<uint4*>(dst) = make_uint4(pack2<T>(x[0], x[1]), pack2<T>(x[2], x[3]), pack2<T>(x[4], x[5]),
                                                  pack2<T>(x[6], x[7]));
    } else {
      float* dst = p.out_accum + (static_cast<int64_t>(slot) * p.rows + row) * kHeadDimV + d0;
      *reinterpret_cast<float4*>(dst) = make_float4(x[0], x[1], x[2], x[3]);
      *reinterpret_cast<float4*>(dst + 4) = make_float4(x[4], x[5], x[6], x[7]);
    }
  }
}

// Four e4m3 (bytes 0-3 of x) to fp16, exactly: bytes 0-1 into lo, 2-3 into hi (each the low half first).
__device__ __forceinline__ void e4m3x4_to_f16(uint32_t x, uint32_t& lo, uint32_t& hi) {
  asm("{\n .reg .b16 l, h;\n mov.b32 {l, h}, %2;\n cvt.rn.f16x2.e4m3x2 %0, l;\n cvt.rn.f16x2.e4m3x2 %1, h;\n}"
      : "=r"(lo), "=r"(hi)
      : "r"(x));
}

// V^T's A fragments of one page for a value warpgroup's thread in the narrow form: a[kk][t] for
// k-step kk (tokens 16 kk ..) and tile t. The thread's rows r0, r0 + 8 of tile t are its dims
// 2 t, 2 t + 1 of 8 adjacent ones (byte 8 (lane / 4) of chunk `chunk`), so that one 8-byte read
// of a token's row serves all four tiles; its tokens are 16 kk + 2 (lane % 4) + {0, 1} (+ 8 for
// a[2], a[3]). A byte permute pairs two tokens' bytes of one dim; e4m3 -> fp16 is exact. Odd
// quads read their two rows in the other order, so that each read's rows fall on both halves of
// the banks (the permute's selectors swap its inputs back). VtLane holds what depends on the lane
// only: the two rows' offsets in the chunk (the 64B swizzle of a thread's rows is the same for
// every k-step) and the selectors.
struct VtLane {
  uint32_t off_a, off_b, sel_lo, sel_hi;  // the first and second read's rows; the permutes of dims 2 t, 2 t + 1
  __device__ __forceinline__ explicit VtLane(int lane) {
    const int q4 = lane / 4, c = lane % 4, odd = c & 1;
    const int swz = ((((q4 >> 1) ^ c) & 3) << 4) + 8 * (q4 & 1);  // sw64(row, 8 q4) - 64 row, for row / 2 = c mod 4
    off_a = (2 * c + odd) * 64 + swz;
    off_b = (2 * c + 1 - odd) * 64 + swz;
    sel_lo = odd ? 0x1504 : 0x5140;  // (0x5140 with its two inputs swapped)
    sel_hi = odd ? 0x3726 : 0x7362;
  }
};
// Tokens at or past `valid` read as zeros (their P is 0, and the cache may hold NaN): kPartial,
// for a sequence's last page only (load_vt below picks).
template <bool kPartial, int kSteps>
__device__ __forceinline__ void load_vt_page(uint32_t (&a)[kSteps][4][4], uint32_t chunk, int kk0, int valid, int lane,
                                             const VtLane& vl) {
  const int c = lane % 4, odd = c & 1;
#pragma unroll
  for (int kk = kk0; kk < kk0 + kSteps; ++kk)
#pragma unroll
    for (int hi = 0; hi < 2; ++hi) {
      const int t0 = 16 * kk + 2 * c + 8 * hi;
      uint2 xa, xb;  // tokens t0 + odd, t0 + 1 - odd
      asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(xa.x), "=r"(xa.y) : "r"(chunk + vl.off_a + (16 * kk + 8 * hi) * 64));
      asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(xb.x), "=r"(xb.y) : "r"(chunk + vl.off_b + (16 * kk + 8 * hi) * 64));
      if constexpr (kPartial) {
        if (t0 + odd >= valid) xa = make_uint2(0u, 0u);
        if (t0 + 1 - odd >= valid) xb = make_uint2(0u, 0u);
      }
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        const uint32_t pr = __byte_perm(t < 2 ? xa.x : xa.y, t < 2 ? xb.x : xb.y, t % 2 ? vl.sel_hi : vl.sel_lo);
        // dims 2 t (row r0), 2 t + 1 (row r0 + 8) of tokens t0, t0 + 1
        e4m3x4_to_f16(pr, a[kk - kk0][t][2 * hi], a[kk - kk0][t][2 * hi + 1]);
      }
    }
}
template <int kSteps>
__device__ __forceinline__ void load_vt(uint32_t (&a)[kSteps][4][4], uint32_t chunk, int kk0, int valid, int lane,
                                        const VtLane& vl) {
  if (valid >= kPageSize)
    load_vt_page<false>(a, chunk, kk0, valid, lane, vl);
  else
    load_vt_page<true>(a, chunk, kk0, valid, lane, vl);
}

// finish_rows (kernel.cuh) for the narrow form: the column sums over the warpgroup (red: [4][kN]
// floats of scratch), then each column's lse and numer / sum from the lanes 0-3 of warp 0, which
// hold every column between them.
template <int kN>
__device__ __forceinline__ void finish_cols(const Params& p, float (&l)[kN / 4], const float (&m)[kN / 4], float m_shift,
                                            float numer, float* red, float* inv_l, int* slot_out, int slot, int b,
                                            int row0, int col_base, int warp, int lane) {
#pragma unroll
  for (int h = 0; h < kN / 4; ++h) {
    for (int x = 4; x < 32; x *= 2) l[h] += __shfl_xor_sync(0xffffffff, l[h], x);
    if (lane < 4) red[warp * kN + col_of(h, col_base)] = l[h];
  }
  named_barrier(1, 128);
  if (warp == 0 && lane < 4) {
#pragma unroll
    for (int h = 0; h < kN / 4; ++h) {
      const int c = col_of(h, col_base);
      const float total = (red[c] + red[kN + c]) + (red[2 * kN + c] + red[3 * kN + c]);
      const float lse = total > 0.f ? (m[h] - m_shift + log2f(total)) * 0.69314718055994531f : -INFINITY;
      inv_l[c] = total > 0.f ? numer / total : 0.f;
      if (row0 + c < p.rows) store_lse(p, lse, slot, b, row0 + c);
    }
    if (lane == 0) *slot_out = slot;  // (thread 0)
  }
}

// T: the output dtype (bf16 or fp16); kN: 64 (query rows are the wgmma's M), or 16 or 32 (the
// narrow form above, for at most kN query rows).
template <typename T, int kN>
__global__ void __launch_bounds__(kThreads, 1)
    decode_kernel(const __grid_constant__ CUtensorMap tmap_q, const __grid_constant__ CUtensorMap tmap_kv, Params p) {
  extern __shared__ uint8_t smem_raw[];
  // (an offset from smem_raw, not an integer round trip, so that the compiler knows the pointers
  // below are shared memory: 32-bit addresses and ld.shared, not generic loads)
  uint8_t* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  const uint32_t s_base = smem_addr(smem);
  static_assert(kN == 16 || kN == 32 || kN == 64, "tile widths");
  constexpr bool kNarrow = kN < 64;
  using L = Smem<kNarrow>;
  constexpr int kStages = L::kStages;
  const uint32_t s_kv = s_base + L::kKV, s_q = s_base + L::kQ;
  float* scale_s = reinterpret_cast<float*>(smem + L::kScale);
  float* inv_l_s = reinterpret_cast<float*>(smem + L::kInvL);
  int* slot_s = reinterpret_cast<int*>(smem + L::kSlot);
  const uint32_t bar_full = s_base + L::kBar;          // + 8 * stage: the page has landed (TMA)
  const uint32_t bar_free = bar_full + 8 * kStages;     // S and both value warpgroups are done with it (384)
  // + 8 * buffer: P's tokens 0-31 (narrow: all of P) and the row factors written (128)
  const uint32_t bar_pfull = bar_free + 8 * kStages;
  const uint32_t bar_pfull2 = bar_pfull + 8 * 2;        // P's tokens 32-63 (narrow: the last page's sums) written (128)
  const uint32_t bar_pempty = bar_pfull2 + 8 * 2;       // P.V done with the P buffer (256)
  const uint32_t bar_q = bar_pempty + 8 * 2;            // the Q tile has landed (TMA)

  asm volatile("griddepcontrol.launch_dependents;");
  constexpr int kH = kNarrow ? kN / 4 : 2;  // query rows (columns, narrow) of a thread
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

  // (r0, col_base: each warpgroup's own, after its register split; made before it, they spill)
  const float descale_k = *p.descale_k;

  if (wg == 0) {
    // ============================ score warpgroup
    reg_set<kNarrow ? kRegsScoreNarrow<kN> : kRegsScore, kRegsLaunch>();
    const int r0 = warp * 16 + lane / 4;  // accumulator rows r0, r0 + 8
    const int col_base = 2 * (lane % 4);
    if (p.q_quantized) asm volatile("griddepcontrol.wait;" ::: "memory");  // q8 and its scales are written
    // this thread's query rows: r0 + 8 h of the tile, or (narrow) columns col_of(h)
    const auto row_of = [&](int h) { return m_tile * 64 + (kNarrow ? col_of(h, col_base) : r0 + 8 * h); };
    float m[kH], l[kH], rs[kH];  // running max (log2), row sums (narrow: this thread's part), score scale
    int limit[kH], min_limit = 0, seqlen = 0;
    int prev_b = -1, split_base = 0, n_splits = 0;
    uint32_t q_phase = 0;
    // (narrow) S^T of the sequence's next page in flight under this page's softmax: its chains in
    // kGroups groups, a partial a chain; the first is issued before the softmax, the second (if
    // any) once P^T is written and the first is folded into s_next, and the last is folded into
    // the page's s at the top of the next iteration.
    constexpr bool kAhead = kNarrow;
    // kN = 16: one group of the nine chains (9 x 8 registers); kN = 32: two, of five and four
    // chains (nine partials of 16 do not fit beside the softmax's state), the second issued once
    // P^T is written (ahead_step).
    constexpr int kGroupChains = kN == 16 ? kSChains : 5;
    constexpr int kGroups = (kSChains + kGroupChains - 1) / kGroupChains;
    static_assert(kGroups <= 2, "ahead_step folds one group");
    const auto group_begin = [](int grp) { return min(grp * kGroupChains, kSChains); };
    // (whether group grp has a c-th chain)
    const auto in_group = [&](int grp, int c) { return group_begin(grp) + c < group_begin(grp + 1); };
    constexpr int kS = kNarrow ? kN / 2 : 32;  // S (S^T) a thread
    float s_next[kS], part_next[kGroupChains][kS];  // (unused by the 64-row form)
    bool s_pending = false;
#pragma unroll 1
    for (int g = 0; cur.b <= st.end_b; ++g) {
      const int b = cur.b, page = cur.page;
      const bool last = page + 1 == cur.hi;
      if (b != prev_b) {
        prev_b = b;
        seqlen = p.cache_seqlens[b];
        split_base = p.num_splits[b];
        n_splits = p.num_splits[b + 1] - split_base;
        named_barrier(3, 128);  // every warp's S of the previous sequence has read Q
        if (tid == 0) {
          mbar_expect_tx(bar_q, kPageBytes);
          tma_load_4d(s_q, &tmap_q, bar_q, 0, m_tile * 64, 0, b);
        }
        min_limit = seqlen;
#pragma unroll
        for (int h = 0; h < kH; ++h) {
          const int row = row_of(h);
          const int sq = row / p.h_q;
          limit[h] = (p.causal && sq < p.s_q) ? seqlen - p.s_q + sq + 1 : seqlen;
          min_limit = min(min_limit, limit[h]);
          const float qs = row < p.rows ? p.q_scale[b * p.q_scale_batch_stride + row * p.q_scale_row_stride] : 1.f;
          rs[h] = p.scale_log2 * qs * descale_k;
          m[h] = -INFINITY;
          l[h] = 0.f;
        }
        mbar_wait(bar_q, q_phase);
        q_phase ^= 1;
      }

      // ---- S = Q K^T (64 rows x 64 tokens), or S^T = K Q^T (64 tokens x kN), e4m3 x e4m3 -> fp32
      const int stage = g % kStages, pb = g % 2;
      const uint32_t s_stage = s_kv + stage * kPageBytes;
      float s[kS];
      const auto desc = [](uint32_t a) { return desc_sw64(a); };
      const auto wait_page = [&](int gi) {  // the gi-th page has landed
        if (tid == 0) tl::page(gi, tl::kScoreWaitFull);
        mbar_wait(bar_full + 8 * (gi % kStages), (gi / kStages) & 1);
        if (tid == 0) tl::page(gi, tl::kScoreIssue);
      };
      const auto page_read = [&](int gi) {  // this thread's S of the gi-th page is done with it
        if (tid == 0) tl::page(gi, tl::kScoreDone);
        mbar_arrive(bar_free + 8 * (gi % kStages));
      };
      // One chain of S (S^T) of the page at s_page: its k-steps into the partial d.
      const auto issue_chain = [&](uint32_t s_page, int c, float (&d)[kS]) {
        const uint64_t dp = desc(s_page), dq = desc(s_q);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kSChain; ++kk) {
          const int k = c * kSChain + kk;
          const uint32_t koff = (k / 2) * kChunkBytes + (k % 2) * 32;
          if constexpr (kNarrow)
            gmma_ss<typename Narrow<kN>::QK>(desc_add(dp, koff), desc_add(dq, koff), d, kk > 0, std::make_index_sequence<kS>{});
          else
            gmma_ss<QK>(desc_add(dq, koff), desc_add(dp, koff), d, kk > 0, std::make_index_sequence<kS>{});
        }
        wgmma_commit();
      };
      const auto add = [](float (&acc)[kS], float (&part)[kS]) {
        fence_regs(part);
        fence_regs(acc);
#pragma unroll
        for (int i = 0; i < kS; ++i) acc[i] += part[i];
      };
      // (kAhead) The next page's S^T, group by group: group grp of its chains into part_next.
      const auto issue_group = [&](uint32_t s_page, int grp) {
#pragma unroll
        for (int c = 0; c < kGroupChains; ++c)
          if (in_group(grp, c)) issue_chain(s_page, group_begin(grp) + c, part_next[c]);
      };
      // acc = (or +=) group grp, in part_next
      const auto sum_group = [&](float (&acc)[kS], int grp, bool first) {
#pragma unroll
        for (int c = 0; c < kGroupChains; ++c) fence_regs(part_next[c]);
        if (first) {
#pragma unroll
          for (int i = 0; i < kS; ++i) acc[i] = part_next[0][i];
        } else {
          add(acc, part_next[0]);
        }
#pragma unroll
        for (int c = 1; c < kGroupChains; ++c)
          if (in_group(grp, c)) add(acc, part_next[c]);
      };
      // (kGroups = 2) Once P^T is written: group 0 is folded into s_next, group 1 issued.
      const auto ahead_step = [&] {
        if (kAhead && kGroups == 2 && s_pending) {
          wgmma_wait<0>();
          sum_group(s_next, 0, true);
          issue_group(s_kv + (g + 1) % kStages * kPageBytes, 1);
        }
      };
      if constexpr (kAhead) {
        // S^T of the page: in flight since the page before when both are of one sequence (its
        // last group in part_next, the others folded into s_next), else here, group by group.
        if (s_pending) {
          sum_group(s, kGroups - 1, true);
          if constexpr (kGroups > 1) add(s, s_next);
        } else {
          wait_page(g);
#pragma unroll
          for (int grp = 0; grp < kGroups; ++grp) {
            issue_group(s_stage, grp);
            wgmma_wait<0>();
            sum_group(s, grp, grp == 0);
          }
          page_read(g);
        }
        s_pending = !last;  // the next page is this sequence's: its first group now
        if (s_pending) {
          wait_page(g + 1);
          issue_group(s_kv + (g + 1) % kStages * kPageBytes, 0);
        }
      } else {
        // Chain 0 into s, the others into two partials in turn, each added while the next runs.
        wait_page(g);
        float part[2][kS];
        issue_chain(s_stage, 0, s);
#pragma unroll
        for (int c = 1; c < kSChains; ++c) {
          issue_chain(s_stage, c, part[c % 2]);  // (part[c % 2] held chain c - 2, added at c - 1)
          wgmma_wait<1>();                       // chains up to c - 1 are done
          if (c >= 2) add(s, part[(c - 1) % 2]);
        }
        wgmma_wait<0>();
        add(s, part[(kSChains - 1) % 2]);
        page_read(g);
      }

      // ---- online softmax (log2 domain), as in the bf16 kernel, with a scale per row
      uint8_t* p_smem = smem + L::kP + pb * kPBytes;
      float mx[kH];
      if constexpr (kNarrow) {
        // s[4 j + e]: token r0 + 8 (e / 2) of column h = 2 j + e % 2
        const int tok0 = page * kPageSize + r0;
        const bool masked = (page + 1) * kPageSize > min_limit;
#pragma unroll
        for (int h = 0; h < kH; ++h) mx[h] = -INFINITY;
#pragma unroll
        for (int i = 0; i < kS; ++i) {
          const int h = 2 * (i / 4) + i % 2;
          if (masked && tok0 + 8 * ((i / 2) % 2) >= limit[h]) s[i] = -INFINITY;
          mx[h] = fmaxf(mx[h], s[i]);
        }
        // A column's max moves only when one of its scores passes m + kMaxSlack (rare after a
        // sequence's first page): one barrier with a vote says whether any does; only then is
        // the max reduced over the warpgroup (shuffles, then the 4 warps through scratch).
        bool over = false;
#pragma unroll
        for (int h = 0; h < kH; ++h) over |= mx[h] * rs[h] > m[h] + kMaxSlack;
        if (named_barrier_any(1, 128, over)) {
          float* red = reinterpret_cast<float*>(p_smem + kScratch);  // [4 warps][kN]
#pragma unroll
          for (int h = 0; h < kH; ++h) {
            for (int x = 4; x < 32; x *= 2) mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffff, mx[h], x));
            if (lane < 4) red[warp * kN + col_of(h, col_base)] = mx[h];
          }
          named_barrier(1, 128);
#pragma unroll
          for (int h = 0; h < kH; ++h) {
            const int c = col_of(h, col_base);
            mx[h] = fmaxf(fmaxf(red[c], red[kN + c]), fmaxf(red[2 * kN + c], red[3 * kN + c]));
          }
        } else {
#pragma unroll
          for (int h = 0; h < kH; ++h) mx[h] = -INFINITY;  // (no column moves: m stays)
        }
      } else {
        mask_and_row_max(s, page, col_base, limit, mx);
      }
      float sc[kH], m_use[kH];
#pragma unroll
      for (int h = 0; h < kH; ++h) {
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
      const int slot = n_splits == 1 ? -1 : split_base + (b == st.begin_b ? begin_split : 0);
      if constexpr (kNarrow) {
        // P^T's token r0 + 8 (e / 2) of column h is P's (row col_of(h), that token). Columns
        // 8 j .. 8 j + 7 of the warp's tokens 0-7 and 8-15 are two 8 x 8 matrices of the mma
        // fragment layout: stmatrix .trans stores them as 8 rows (columns) of 8 tokens each.
#pragma unroll
        for (int jj = 0; jj < kN / 16; ++jj) {
          uint32_t w[4];
#pragma unroll
          for (int q = 0; q < 4; ++q) {  // matrix q: columns 8 (2 jj + q / 2) .., tokens 8 (q % 2) ..
            const int i = 4 * (2 * jj + q / 2) + 2 * (q % 2), h = 2 * (i / 4);  // s[i]: column h, s[i + 1]: h + 1
            const float p0 = exp2f(fmaf(s[i], rs[h], -m_use[h]));
            const float p1 = exp2f(fmaf(s[i + 1], rs[h + 1], -m_use[h + 1]));
            l[h] += p0;
            l[h + 1] += p1;
            w[q] = pack2<__half>(p0, p1);
          }
          const int mq = lane / 8;  // the matrix whose row (column 8 (2 jj + mq / 2) + lane % 8) this lane addresses
          const uint32_t dst = s_base + L::kP + pb * kPBytes + sw128(8 * (2 * jj + mq / 2) + lane % 8, 16 * warp + 8 * (mq % 2));
          asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};" ::"r"(dst), "r"(w[0]),
                       "r"(w[1]), "r"(w[2]), "r"(w[3])
                       : "memory");
        }
        ahead_step();
        if (warp == 0 && lane < 4) {
#pragma unroll
          for (int h = 0; h < kH; ++h) scale_s[pb * 64 + col_of(h, col_base)] = sc[h];
        }
        fence_proxy_async();
        mbar_arrive(bar_pfull + 8 * pb);
        if (last) finish_cols<kN>(p, l, m, kPScaleLog2, descale_k, reinterpret_cast<float*>(p_smem + kScratch + 4 * kN * 4),
                                  inv_l_s + pb * 64, slot_s + pb, slot, b, m_tile * 64, col_base, warp, lane);
      } else {
        // In two halves, as the bf16 kernel publishes P: tokens 0-31 with the row
        // factors on p_full, so that P.V's first two k-steps start while tokens 32-63 are computed.
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
          finish_rows(p, l, m, kPScaleLog2, descale_k, inv_l_s + pb * 64, slot_s + pb, slot, b, m_tile * 64, r0, lane, tid);
      }
      fence_proxy_async();  // P, written by threads, is read by wgmma next
      mbar_arrive(bar_pfull2 + 8 * pb);
      if (tid == 0) tl::page(g, tl::kPReady);
      if constexpr (kAhead) {  // the next page's last group of S^T
        wgmma_wait<0>();
#pragma unroll
        for (int c = 0; c < kGroupChains; ++c) fence_regs(part_next[c]);
        if (s_pending) page_read(g + 1);
      }
      advance(cur, st, p.cache_seqlens);
    }
  } else {
    // ============================ value warpgroups: V of their 256 dims widened to fp16, O += P V
    reg_set<kNarrow ? kRegsValueNarrow<kN> : kRegsValue, kRegsLaunch>();
    const int r0 = warp * 16 + lane / 4;
    const int col_base = 2 * (lane % 4);
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
    // This thread's reads of stage `stage` (the gi-th page) are done: the producer refills it with
    // the next page once S and both value warpgroups are done with it.
    auto release = [&](int stage, int gi) {
      mbar_arrive(bar_free + 8 * stage);
      if (producer && ld.b <= st.end_b) {
        mbar_wait(bar_free + 8 * stage, (gi / kStages) & 1);
        issue(stage);
        ld_next();
        tl::page(gi, tl::kRefillIssued);
      }
      __syncwarp();
    };

    int g = 0;
    if constexpr (kNarrow) {
      // O^T: 4 tiles of 64 dims x kN. This thread's dims are d0 .. d0 + 7 of the 512 (load_vt).
      constexpr int kPer = kN / 2;
      const int d0 = v * 256 + 64 * warp + 8 * (lane / 4);
      float o[4][kPer];
#pragma unroll
      for (int t = 0; t < 4; ++t)
#pragma unroll
        for (int i = 0; i < kPer; ++i) o[t][i] = 0.f;
      int v_seq = -1, v_len = 0;
      const VtLane vl(lane);
#pragma unroll 1
      for (; cur.b <= st.end_b; ++g) {
        const int b = cur.b, page = cur.page;
        const bool last = page + 1 == cur.hi;
        const int pb = g % 2, stage = g % kStages;
        if (b != v_seq) {
          v_seq = b;
          v_len = p.cache_seqlens[b];
        }
        mbar_wait(bar_full + 8 * stage, (g / kStages) & 1);
        // V^T in registers kVtSteps k-steps at a time: a page at kN = 16; half a page at kN = 32,
        // the second once the first's wgmma are done (so that WG0 has the registers it needs).
        constexpr int kVtSteps = kN == 16 ? 4 : 2;
        uint32_t a[kVtSteps][4][4];
        const uint32_t chunk = s_kv + stage * kPageBytes + (4 * v + warp) * kChunkBytes;
        const int valid = v_len - page * kPageSize;
        const uint32_t s_p = s_base + L::kP + pb * kPBytes;
#pragma unroll
        for (int kk0 = 0; kk0 < 4; kk0 += kVtSteps) {
          if (kk0 > 0) wgmma_wait<0>();  // (the k-steps before are done with a)
          load_vt(a, chunk, kk0, valid, lane, vl);
          if (kk0 + kVtSteps == 4) release(stage, g);
          if (kk0 == 0) {
            mbar_wait(bar_pfull + 8 * pb, (g / 2) & 1);
            rescale_cols<kN>(o, scale_s + pb * 64, col_base);
          }
          wgmma_fence();
#pragma unroll
          for (int kk = 0; kk < kVtSteps; ++kk)
#pragma unroll
            for (int t = 0; t < 4; ++t)
              gmma_rs<typename Narrow<kN>::PV>(a[kk][t], desc_k_major(s_p + (kk0 + kk) * 32), o[t], true,
                                               std::make_index_sequence<kPer>{});
          wgmma_commit();
        }
        if (tid == 128) tl::page(g, tl::kValueIssue);
        mbar_wait(bar_pfull2 + 8 * pb, (g / 2) & 1);  // (the last page's 1 / row sums)
        wgmma_wait<0>();
#pragma unroll
        for (int t = 0; t < 4; ++t) fence_regs(o[t]);
        if (tid == 128) tl::page(g, tl::kValueDone);
        if (tid == 256) tl::page(g, tl::kValue2Done);
        float inv[kH];
        int slot = 0;
        if (last) {
#pragma unroll
          for (int h = 0; h < kH; ++h) inv[h] = inv_l_s[pb * 64 + col_of(h, col_base)];
          slot = slot_s[pb];
        }
        mbar_arrive(bar_pempty + 8 * pb);
        if (last) store_cols<T, kN>(p, o, inv, slot, b, m_tile * 64, d0, col_base);
        advance(cur, st, p.cache_seqlens);
      }
    } else {
      // The widening: this thread moves row t (lane, then 32 + lane) of chunk 4 v + warp: 4 reads of
      // 16 e4m3 (64B swizzle), 32 conversions (exact), 8 writes of 8 fp16 into the warpgroup's half
      // of the fp16 V (chunk warp: 64 rows x 128 B, 128B swizzle: the bf16 kernel's V layout). A read
      // or write phase of 8 lanes covers all 32 banks. Rows past the sequence become zeros.
      Cursor wc = cur;  // the page the next widen reads
      int w_seq = -1, w_len = 0, w_valid = kPageSize;
      const uint32_t v16 = s_base + L::kV16 + v * (kV16Bytes / 2) + warp * 8192;
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
        // Reads two at a time, then their conversions and writes: a read's latency is then not
        // waited for on its own (the writes' memory clobber keeps later reads after them). A row
        // past the sequence (on its last page) is written as zeros instead.
        if (t < w_valid) {
  #pragma unroll
          for (int uu = 0; uu < 4; uu += 2) {
            uint32_t x[2][4];
  #pragma unroll
            for (int e = 0; e < 2; ++e)
              asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                           : "=r"(x[e][0]), "=r"(x[e][1]), "=r"(x[e][2]), "=r"(x[e][3])
                           : "r"(src + ((((uu + e) ^ (t >> 1)) & 3) << 4)));
  #pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int u = uu + e;
              uint32_t y[8];
  #pragma unroll
              for (int i = 0; i < 4; ++i) e4m3x4_to_f16(x[e][i], y[2 * i], y[2 * i + 1]);
  #pragma unroll
              for (int k = 0; k < 2; ++k)
                asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(dst + (((2 * u + k) ^ (t & 7)) << 4)),
                             "r"(y[4 * k]), "r"(y[4 * k + 1]), "r"(y[4 * k + 2]), "r"(y[4 * k + 3])
                             : "memory");
            }
          }
        } else {
  #pragma unroll
          for (int k = 0; k < 8; ++k)
            asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};" ::"r"(dst + (k << 4)), "r"(0u) : "memory");
        }
        fence_proxy_async();  // the fp16 V, written by threads, is read by wgmma
        if (part == 1) {
          release(stage, gi);
          advance(wc, st, p.cache_seqlens);
        }
      };

      float o[128];
  #pragma unroll
      for (int i = 0; i < 128; ++i) o[i] = 0.f;
      widen(0, 0);
      named_barrier(4 + v, 128);  // the warpgroup's fp16 rows 0-31 of the first page are written
  #pragma unroll 1
      for (; cur.b <= st.end_b; ++g) {
        const int b = cur.b;
        const bool last = cur.page + 1 == cur.hi;
        const int pb = g % 2;
        mbar_wait(bar_pfull + 8 * pb, (g / 2) & 1);
        rescale_rows(o, scale_s + pb * 64, r0);
        wgmma_fence();
        const uint32_t s_p = s_base + L::kP + pb * kPBytes;
        const uint32_t s_v = s_base + L::kV16 + v * (kV16Bytes / 2);
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
        if (last) slot = last_page_factors(inv_l_s + pb * 64, slot_s + pb, r0, inv);
        mbar_arrive(bar_pempty + 8 * pb);
        if (last) store_rows<T>(p, o, inv, slot, b, m_tile * 64 + r0, v, lane);
        named_barrier(4 + v, 128);  // the warpgroup's fp16 V of the next page is written
        advance(cur, st, p.cache_seqlens);
      }
    }
    if (tid == 128) tl::end(g);
  }
}

}  // namespace mla::sm90::fp8
