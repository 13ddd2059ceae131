// Throughput of e4m3 -> fp16 conversions on one SM (docs/kernel.md quotes it): the cvt instruction
// (F2FP), the same by bit moves (a permute, a shift, a mask and an add: 2^-8 of the value), and
// the two interleaved. On the GPU machine: nvcc -arch=sm_90a -O3 -o /tmp/cvt tools/lab/cvt_throughput.cu && /tmp/cvt
#include <cstdint>
#include <cstdio>
#include <cuda_runtime.h>
__device__ __forceinline__ uint32_t f2fp(uint32_t x) {
  uint32_t d;
  asm volatile("{\n .reg .b16 l, h;\n mov.b32 {l, h}, %1;\n cvt.rn.f16x2.e4m3x2 %0, l;\n}" : "=r"(d) : "r"(x));
  return d;
}
// bytes 0,1 of x -> f16x2 of e4m3 * 2^-8
__device__ __forceinline__ uint32_t trick(uint32_t x) {
  uint32_t u = __byte_perm(x, 0, 0x1404);  // [0, b0, 0, b1]
  uint32_t v = u >> 1;
  return v + (v & 0x40004000u);
}
template <int kMode>
__global__ void bench(uint32_t* out, long long* cyc, int iters) {
  uint32_t x[16];
  for (int i = 0; i < 16; ++i) x[i] = threadIdx.x * 0x01030507u + i * 0x11111111u;
  __syncthreads();
  long long t0 = clock64();
  for (int it = 0; it < iters; ++it) {
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      if (kMode == 0) x[i] = f2fp(x[i]);
      else if (kMode == 1) x[i] = trick(x[i]);
      else x[i] = (i % 2) ? f2fp(x[i]) : trick(x[i]);
    }
  }
  __syncthreads();
  long long t1 = clock64();
  uint32_t acc = 0;
  for (int i = 0; i < 16; ++i) acc ^= x[i];
  out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
  if (threadIdx.x == 0) cyc[blockIdx.x] = t1 - t0;
}
int main() {
  int threads = 384, blocks = 132, iters = 4096;
  uint32_t* out; long long* cyc;
  cudaMalloc(&out, blocks * threads * 4); cudaMalloc(&cyc, blocks * 8);
  const char* names[3] = {"F2FP", "trick(4 ALU)", "mixed 1:1"};
  for (int mode = 0; mode < 3; ++mode) {
    for (int rep = 0; rep < 2; ++rep) {
      if (mode == 0) bench<0><<<blocks, threads>>>(out, cyc, iters);
      if (mode == 1) bench<1><<<blocks, threads>>>(out, cyc, iters);
      if (mode == 2) bench<2><<<blocks, threads>>>(out, cyc, iters);
      cudaDeviceSynchronize();
    }
    long long c[132]; cudaMemcpy(c, cyc, blocks * 8, cudaMemcpyDeviceToHost);
    double conv = double(threads) * iters * 16;  // conversions (each: 2 values) per SM
    printf("%-14s %.1f conversions (pairs) / clk / SM\n", names[mode], conv / c[0]);
  }
  return 0;
}
