// Clocks a wgmma takes on one SM, for the shapes the decode kernels issue, alone and side by side:
// whether a page of the FP8 kernel's narrow form is bound by its count of small wgmma
// (docs/kernel.md, the narrow form's timelines). Every CTA (one an SM) runs 3 warpgroups; each active one issues
// `per` wgmma of its shape per round, round after round, one commit group a round and at most two
// groups in flight, into `acc` independent accumulators in turn. Printed: clocks per wgmma of one
// warpgroup, and the tensor rate of the SM against its peak (f16: 4096 FLOP/clk, e4m3: 8192).
// The operands are shared memory of small finite values (the layouts are the kernels' swizzles;
// what the products are does not matter here). The "page" rows issue what one page of a kernel
// form issues, each warpgroup its own part, with nothing else around it: the tensor time floor of
// that form's period.
// On the GPU machine: nvcc -gencode=arch=compute_90a,code=sm_90a -O3 -std=c++17 --expt-relaxed-constexpr
//   -Icsrc -I$CUTLASS/include -o /tmp/wr tools/lab/wgmma_rate.cu && /tmp/wr
#include <cstdint>
#include <cstdio>
#include <utility>

#include <cuda_runtime.h>

#include "sm90/decode/kernel_fp8.cuh"  // the kernels' wgmma wrappers and operand descriptors

using namespace mla::sm90;
namespace G = cute::SM90::GMMA;

// A at offset 0, B at 32 KB, each stepping over 8 KB: the widest operand (m64n256k16's MN-major V,
// 4 atoms 8 KB apart) reaches 64 KB; the rest is margin.
constexpr int kSmemBytes = 96 * 1024;

// A shape: its accumulator floats a thread (N / 2), FLOP, f16 or e4m3, and how it is issued.
template <class Atom, int kN, int kK, bool kRS, bool kE4M3>
struct Shape {
  static constexpr int kAccRegs = kN / 2;
  static constexpr double kFlop = 2.0 * 64 * kN * kK;
  static constexpr bool kFp8 = kE4M3;
  __device__ __forceinline__ static void issue(float (&d)[kAccRegs], uint32_t base, int i, const uint32_t (&a)[4]) {
    // B (and A when SS) rotate over 8 KB of shared memory, 1 KB a step: the kernels' strides
    const uint32_t off = (i % 8) * 1024;
    // (K-major operands: the FP8 kernel's 64-byte swizzle for e4m3, the 128-byte one for fp16)
    const auto desc = [](uint32_t addr) { return kE4M3 ? fp8::desc_sw64(addr) : desc_k_major(addr); };
    if constexpr (kRS)
      fp8::gmma_rs<Atom>(a, desc(base + 32768 + off), d, true, std::make_index_sequence<kAccRegs>{});
    else
      gmma_ss<Atom>(desc(base + off), desc(base + 32768 + off), d, true, std::make_index_sequence<kAccRegs>{});
  }
};
// (MN-major B: V as the 64-row forms read it)
template <class Atom, int kN>
struct ShapeMN {
  static constexpr int kAccRegs = kN / 2;
  static constexpr double kFlop = 2.0 * 64 * kN * 16;
  static constexpr bool kFp8 = false;
  __device__ __forceinline__ static void issue(float (&d)[kAccRegs], uint32_t base, int i, const uint32_t (&)[4]) {
    const uint32_t off = (i % 4) * 2048;
    gmma_ss<Atom>(desc_k_major(base + off), desc_mn_major(base + 32768 + off), d, true,
                  std::make_index_sequence<kAccRegs>{});
  }
};

using E16 = Shape<G::MMA_64x16x32_F32E4M3E4M3_SS_TN<>, 16, 32, false, true>;
using E32 = Shape<G::MMA_64x32x32_F32E4M3E4M3_SS_TN<>, 32, 32, false, true>;
using E64 = Shape<G::MMA_64x64x32_F32E4M3E4M3_SS_TN<>, 64, 32, false, true>;
using E64R = Shape<G::MMA_64x64x32_F32E4M3E4M3_RS_TN<>, 64, 32, true, true>;
using E256 = Shape<G::MMA_64x256x32_F32E4M3E4M3_SS_TN<>, 256, 32, false, true>;
using H16R = Shape<G::MMA_64x16x16_F32F16F16_RS<G::Major::K, G::Major::K>, 16, 16, true, false>;
using H32R = Shape<G::MMA_64x32x16_F32F16F16_RS<G::Major::K, G::Major::K>, 32, 16, true, false>;
using H64R = Shape<G::MMA_64x64x16_F32F16F16_RS<G::Major::K, G::Major::K>, 64, 16, true, false>;
using H64 = Shape<G::MMA_64x64x16_F32F16F16_SS<G::Major::K, G::Major::K>, 64, 16, false, false>;
using H256 = ShapeMN<G::MMA_64x256x16_F32F16F16_SS<G::Major::K, G::Major::MN>, 256>;

// WG0 issues kPer0 wgmma of S0 a round (0: idle) into kAcc0 accumulators in turn; WG1 .. WG kWgs1
// (0-2) kPer1 of S1 into kAcc1.
template <class S0, int kAcc0, class S1, int kAcc1, int kPer0, int kPer1, int kWgs1>
__global__ void __launch_bounds__(384, 1) rate(float* sink, long long* cyc, int rounds) {
  extern __shared__ __align__(1024) uint8_t smem[];
  for (int i = threadIdx.x; i < kSmemBytes / 4; i += blockDim.x)
    reinterpret_cast<uint32_t*>(smem)[i] = (i & 1) ? 0x3c003c00u : 0x38383838u;  // fp16 1.0 / e4m3 1.0
  fence_proxy_async();
  __syncthreads();
  const uint32_t base = smem_addr(smem);
  const int wg = threadIdx.x / 128;
  float sum = 0.f;
  long long t0 = clock64();
  const auto run = [&](auto shape, auto acc_n, auto per_n) {
    using S = decltype(shape);
    constexpr int kAcc = decltype(acc_n)::value, kPer = decltype(per_n)::value;
    float d[kAcc][S::kAccRegs];
    // (RS: A fragments of 4 tiles, as a page of V^T holds them. Four 64 x 64 accumulators, as
    // the O^T forms hold with setmaxnreg, do not fit the 168 registers here: ptxas serialises
    // them, so those rows use two.)
    uint32_t a[4][4];
    for (int t = 0; t < 4; ++t)
      for (int j = 0; j < 4; ++j)  // (finite as fp16 and as e4m3)
        a[t][j] = (j % 2 ? 0x3c003c00u : 0x38383838u) ^ ((threadIdx.x + t) & 3u);
    for (int t = 0; t < kAcc; ++t)
      for (int i = 0; i < S::kAccRegs; ++i) d[t][i] = 0.f;
    for (int r = 0; r < rounds; ++r) {
      uint32_t b;  // (made anew each round, so that the descriptors are too, as in the kernels,
      asm volatile("mov.b32 %0, %1;" : "=r"(b) : "r"(base));  // not hoisted into registers)
      wgmma_fence();
#pragma unroll
      for (int i = 0; i < kPer; ++i) S::issue(d[i % kAcc], b, i, a[i % 4]);
      wgmma_commit();
      wgmma_wait<1>();
    }
    wgmma_wait<0>();
    for (int t = 0; t < kAcc; ++t) {
      fence_regs(d[t]);
      for (int i = 0; i < S::kAccRegs; ++i) sum += d[t][i];
    }
  };
  using std::integral_constant;
  if (wg == 0) {
    if constexpr (kPer0 > 0) run(S0{}, integral_constant<int, kAcc0>{}, integral_constant<int, kPer0>{});
  } else if (wg <= kWgs1) {
    if constexpr (kPer1 > 0) run(S1{}, integral_constant<int, kAcc1>{}, integral_constant<int, kPer1>{});
  }
  long long t1 = clock64();
  __syncthreads();
  if (threadIdx.x % 128 == 0) cyc[blockIdx.x * 3 + wg] = t1 - t0;
  sink[blockIdx.x * blockDim.x + threadIdx.x] = sum;
}

template <class S0, int kAcc0, class S1, int kAcc1, int per0, int per1, int wgs1>
void measure(const char* name) {
  const int blocks = 132, rounds = 2000;
  float* sink;
  long long* cyc;
  cudaMalloc(&sink, blocks * 384 * 4);
  cudaMalloc(&cyc, blocks * 3 * 8);
  auto k = rate<S0, kAcc0, S1, kAcc1, per0, per1, wgs1>;
  cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  for (int rep = 0; rep < 3; ++rep) k<<<blocks, 384, kSmemBytes>>>(sink, cyc, rounds);
  cudaError_t e = cudaDeviceSynchronize();
  if (e != cudaSuccess) {
    printf("%s: %s\n", name, cudaGetErrorString(e));
    return;
  }
  long long c[blocks * 3];
  cudaMemcpy(c, cyc, sizeof c, cudaMemcpyDeviceToHost);
  long long worst = 0;
  for (int w = 0; w < 3; ++w) worst = c[w] > worst ? c[w] : worst;  // (CTA 0: its SM)
  const int pers[3] = {per0, wgs1 >= 1 ? per1 : 0, wgs1 >= 2 ? per1 : 0};
  double flop = 0.0, peak_clk = 0.0;
  printf("%-44s", name);
  for (int w = 0; w < 3; ++w) {
    if (pers[w] == 0) {
      printf("   WG%d      -   ", w);
      continue;
    }
    const double n = double(rounds) * pers[w];
    printf("   WG%d %6.1f clk", w, double(c[w]) / n);
    const double f = (w == 0 ? S0::kFlop : S1::kFlop) * n;
    flop += f;
    peak_clk += f / ((w == 0 ? S0::kFp8 : S1::kFp8) ? 8192.0 : 4096.0);
  }
  printf("   %7.0f clk/round   tensor %3.0f%% of peak\n", double(worst) / rounds, 100.0 * peak_clk / worst);
  cudaFree(sink);
  cudaFree(cyc);
}

int main() {
  printf("clocks per wgmma of each warpgroup (CTA 0), and the SM's tensor rate against its peak\n");
  // one shape, 1-3 warpgroups issuing
  measure<E16, 1, E16, 1, 18, 0, 0>("e4m3 m64n16k32 SS");
  measure<E32, 1, E32, 1, 18, 0, 0>("e4m3 m64n32k32 SS");
  measure<E64, 1, E64, 1, 18, 0, 0>("e4m3 m64n64k32 SS");
  measure<E64R, 1, E64R, 1, 18, 0, 0>("e4m3 m64n64k32 RS");
  measure<E256, 1, E256, 1, 8, 0, 0>("e4m3 m64n256k32 SS");
  measure<H16R, 4, H16R, 4, 16, 0, 0>("f16 m64n16k16 RS, 4 accumulators");
  measure<H32R, 4, H32R, 4, 16, 0, 0>("f16 m64n32k16 RS, 4 accumulators");
  measure<H64R, 2, H64R, 2, 16, 0, 0>("f16 m64n64k16 RS, 2 accumulators");
  measure<H64, 1, H64, 1, 16, 0, 0>("f16 m64n64k16 SS");
  measure<H256, 1, H256, 1, 4, 0, 0>("f16 m64n256k16 SS (MN-major B)");
  measure<H16R, 4, H16R, 4, 0, 16, 2>("f16 m64n16k16 RS x2 WG");
  measure<H32R, 4, H32R, 4, 0, 16, 2>("f16 m64n32k16 RS x2 WG");
  measure<H256, 1, H256, 1, 0, 4, 2>("f16 m64n256k16 SS x2 WG");
  measure<E32, 1, E32, 1, 18, 18, 2>("e4m3 m64n32k32 SS x3 WG");
  measure<H32R, 4, H32R, 4, 16, 16, 2>("f16 m64n32k16 RS x3 WG");
  // a page of each form: WG0 S (18 k-steps), WG1-2 P.V of their 256 dims
  measure<E16, 1, H16R, 4, 18, 16, 2>("page, narrow kN=16: S^T | O^T");
  measure<E32, 1, H32R, 4, 18, 16, 2>("page, narrow kN=32: S^T | O^T");
  measure<E64, 1, H64R, 2, 18, 16, 2>("page, O^T kN=64: S^T | O^T (2 accumulators)");
  measure<E64, 1, H256, 1, 18, 4, 2>("page, 64-row form: S | P.V");
  measure<E64R, 1, H256, 1, 18, 4, 2>("page, 64-row, Q from registers: S | P.V");
  return 0;
}
