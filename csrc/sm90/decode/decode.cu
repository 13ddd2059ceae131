// Host side of the sm90 decode: TMA tensor maps, launch of the split-KV kernel, then the combine.

#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <string>

#include "sm90/decode/kernel.cuh"

namespace mla {
namespace {

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

EncodeTiled encode_fn() {
  static EncodeTiled fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status;
    cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &status);
    if (err != cudaSuccess || status != cudaDriverEntryPointSuccess || ptr == nullptr)
      throw std::runtime_error("mla.decode: cannot find cuTensorMapEncodeTiled in the CUDA driver");
    return reinterpret_cast<EncodeTiled>(ptr);
  }();
  return fn;
}

// A rank-dim tensor of 16-bit elements; dims/strides innermost first (strides in bytes, dims >= 1).
CUtensorMap make_map(const void* base, DType dtype, int rank, const cuuint64_t* dims, const cuuint64_t* strides,
                     const cuuint32_t* box) {
  CUtensorMap map;
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  CUresult r = encode_fn()(&map, dtype == DType::kBF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                           rank, const_cast<void*>(base), dims, strides, box, elem_strides,
                           CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                           CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) throw std::runtime_error("mla.decode: cuTensorMapEncodeTiled failed with code " + std::to_string(int(r)));
  return map;
}

template <typename T>
void launch_typed(const DecodeArgs& a, cudaStream_t stream) {
  const int rows = a.s_q * a.h_q;
  const cuuint64_t q_dims[3] = {kHeadDim, static_cast<cuuint64_t>(rows), static_cast<cuuint64_t>(a.batch)};
  const cuuint64_t q_strides[2] = {kHeadDim * 2, static_cast<cuuint64_t>(rows) * kHeadDim * 2};
  const cuuint32_t box[3] = {sm90::kChunkCols, 64, 1};
  const CUtensorMap tmap_q = make_map(a.q, a.dtype, 3, q_dims, q_strides, box);
  const cuuint64_t kv_dims[2] = {kHeadDim, static_cast<cuuint64_t>(a.num_blocks) * kPageSize};
  const cuuint64_t kv_strides[1] = {kHeadDim * 2};
  const CUtensorMap tmap_kv = make_map(a.kv_cache, a.dtype, 2, kv_dims, kv_strides, box);

  sm90::Params p;
  p.q = a.q;
  p.block_table = a.block_table;
  p.cache_seqlens = a.cache_seqlens;
  p.metadata = a.metadata;
  p.num_splits = a.num_splits;
  p.out = a.out;
  p.lse = a.lse;
  p.out_accum = a.out_accum;
  p.lse_accum = a.lse_accum;
  p.batch = a.batch;
  p.s_q = a.s_q;
  p.h_q = a.h_q;
  p.rows = rows;
  p.max_blocks = a.max_blocks;
  p.scale_log2 = a.softmax_scale * 1.4426950408889634f;
  p.causal = a.causal ? 1 : 0;

  const dim3 grid((rows + kTileRows - 1) / kTileRows, a.num_parts);
  // Query tiles in pairs share their page loads (TMA multicast in clusters of two), when every
  // pair of the grid can be resident at once (a cluster needs its SMs in one GPC).
  static const bool pairs_fit = [&] {
    for (auto kernel : {sm90::decode_kernel<T, 1>, sm90::decode_kernel<T, 2>})
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, sm90::kSmemAlloc);
    int sms = 0, device = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(2, sms / 2);
    config.blockDim = dim3(sm90::kThreads);
    config.dynamicSmemBytes = sm90::kSmemAlloc;
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = 2;
    attr.val.clusterDim.y = 1;
    attr.val.clusterDim.z = 1;
    config.attrs = &attr;
    config.numAttrs = 1;
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, sm90::decode_kernel<T, 2>, &config) != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    return 2 * clusters >= sms;
  }();
  const bool pairs = pairs_fit && grid.x % 2 == 0;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(sm90::kThreads);
  config.dynamicSmemBytes = sm90::kSmemAlloc;
  config.stream = stream;
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = 2;
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  config.attrs = &attr;
  config.numAttrs = pairs ? 1 : 0;
  cudaLaunchKernelEx(&config, pairs ? sm90::decode_kernel<T, 2> : sm90::decode_kernel<T, 1>, tmap_q, tmap_kv, p);
}

}  // namespace

void launch_decode(const DecodeArgs& a, cudaStream_t stream) {
  if (a.dtype == DType::kBF16)
    launch_typed<__nv_bfloat16>(a, stream);
  else
    launch_typed<__half>(a, stream);
  launch_combine(a, stream);
}

}  // namespace mla
