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
  const cuuint32_t elem_strides[5] = {1, 1, 1, 1, 1};
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
  // A 64-row tile (a page of the cache, or 64 query rows) lands in shared memory as kChunks
  // chunks of 64 rows x 64 columns (128 B rows, 128B swizzle), chunk after chunk: in global
  // memory that is the view (column in chunk, row, chunk), strides (2 B, 1152 B, 128 B). One TMA
  // box of 64 x 64 x 9 carries a whole Q tile; the cache's box is 32 rows of one chunk, since the
  // kernel refills a page in parts as its chunks free up.
  constexpr cuuint64_t kRowBytes = kHeadDim * 2, kChunkStride = sm90::kChunkCols * 2;
  const cuuint64_t q_dims[4] = {sm90::kChunkCols, static_cast<cuuint64_t>(rows), sm90::kChunks,
                                static_cast<cuuint64_t>(a.batch)};
  const cuuint64_t q_strides[3] = {kRowBytes, kChunkStride, static_cast<cuuint64_t>(rows) * kRowBytes};
  const cuuint32_t box[4] = {sm90::kChunkCols, 64, sm90::kChunks, 1};
  const CUtensorMap tmap_q = make_map(a.q, a.dtype, 4, q_dims, q_strides, box);
  const cuuint64_t kv_dims[3] = {sm90::kChunkCols, static_cast<cuuint64_t>(a.num_blocks) * kPageSize, sm90::kChunks};
  const cuuint64_t kv_strides[2] = {kRowBytes, kChunkStride};
  const cuuint32_t kv_box[3] = {sm90::kChunkCols, kPageSize / 2, 1};
  const CUtensorMap tmap_kv = make_map(a.kv_cache, a.dtype, 3, kv_dims, kv_strides, kv_box);

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

  static bool attr_set = false;
  if (!attr_set) {
    cudaFuncSetAttribute(sm90::decode_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, sm90::kSmemAlloc);
    attr_set = true;
  }
  const dim3 grid((rows + kTileRows - 1) / kTileRows, a.num_parts);
  sm90::decode_kernel<T><<<grid, sm90::kThreads, sm90::kSmemAlloc, stream>>>(tmap_q, tmap_kv, p);
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

#ifdef MLA_TIMELINE
// tools/timeline.py reads the kernel's event clocks (timeline.cuh) through these, with ctypes;
// they exist only in a measuring build. Return: a cudaError_t (0 = success); size: int64 words.
extern "C" __attribute__((visibility("default"))) long long mla_timeline_size() {
  return sizeof(mla::sm90::timeline::buffer) / sizeof(long long);
}
extern "C" __attribute__((visibility("default"))) int mla_timeline_reset() {
  void* ptr = nullptr;
  cudaError_t err = cudaGetSymbolAddress(&ptr, mla::sm90::timeline::buffer);
  if (err == cudaSuccess) err = cudaMemset(ptr, 0xFF, sizeof(mla::sm90::timeline::buffer));  // -1: not written
  return err == cudaSuccess ? static_cast<int>(cudaDeviceSynchronize()) : static_cast<int>(err);
}
extern "C" __attribute__((visibility("default"))) int mla_timeline_read(long long* dst) {
  return static_cast<int>(cudaMemcpyFromSymbol(dst, mla::sm90::timeline::buffer, sizeof(mla::sm90::timeline::buffer)));
}
#endif
