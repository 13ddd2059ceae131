// Host side of the sm90 decode: TMA tensor maps, launch of the split-KV kernel (bf16/fp16, or
// e4m3: kernel_fp8.cuh), then the combine.

#include <atomic>
#include <stdexcept>
#include <string>

#include "common/launch.cuh"
#include "sm90/decode/kernel.cuh"
#include "sm90/decode/kernel_fp8.cuh"

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

// A rank-dim tensor; dims/strides innermost first (strides in bytes, dims >= 1).
CUtensorMap make_map(const void* base, CUtensorMapDataType type, CUtensorMapSwizzle swizzle, int rank,
                     const cuuint64_t* dims, const cuuint64_t* strides, const cuuint32_t* box) {
  CUtensorMap map;
  const cuuint32_t elem_strides[5] = {1, 1, 1, 1, 1};
  CUresult r = encode_fn()(&map, type, rank, const_cast<void*>(base), dims, strides, box, elem_strides,
                           CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                           CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) throw std::runtime_error("mla.decode: cuTensorMapEncodeTiled failed with code " + std::to_string(int(r)));
  return map;
}

template <typename T>
void launch_typed(const Params& p, cudaStream_t stream) {
  // A 64-row tile (a page of the cache, or 64 query rows) lands in shared memory as kChunks
  // chunks of 64 rows x 64 columns (128 B rows, 128B swizzle), chunk after chunk: in global
  // memory that is the view (column in chunk, row, chunk, batch or block), with the rows' and
  // the batch's or block's strides of the tensors (ops.cpp checked that TMA can take them). One
  // TMA box of 64 x 64 x 9 carries a whole Q tile; the cache's box is 32 rows of one chunk of one
  // block, since the kernel refills a page in parts as its chunks free up.
  constexpr cuuint64_t kElem = 2, kChunkStride = sm90::kChunkCols * kElem;
  const cuuint64_t q_dims[4] = {sm90::kChunkCols, static_cast<cuuint64_t>(p.rows), sm90::kChunks,
                                static_cast<cuuint64_t>(p.batch)};
  const cuuint64_t q_strides[3] = {static_cast<cuuint64_t>(p.q_row_stride) * kElem, kChunkStride,
                                   static_cast<cuuint64_t>(p.q_batch_stride) * kElem};
  const cuuint32_t box[4] = {sm90::kChunkCols, 64, sm90::kChunks, 1};
  const auto type = p.dtype == DType::kBF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  const CUtensorMap tmap_q = make_map(p.q, type, CU_TENSOR_MAP_SWIZZLE_128B, 4, q_dims, q_strides, box);
  const cuuint64_t kv_dims[4] = {sm90::kChunkCols, kPageSize, sm90::kChunks, static_cast<cuuint64_t>(p.num_blocks)};
  const cuuint64_t kv_strides[3] = {static_cast<cuuint64_t>(p.kv_row_stride) * kElem, kChunkStride,
                                    static_cast<cuuint64_t>(p.kv_block_stride) * kElem};
  const cuuint32_t kv_box[4] = {sm90::kChunkCols, kPageSize / 2, 1, 1};
  const CUtensorMap tmap_kv = make_map(p.kv_cache, type, CU_TENSOR_MAP_SWIZZLE_128B, 4, kv_dims, kv_strides, kv_box);

  static std::atomic<uint64_t> smem_set{0};
  opt_in_dynamic_smem(reinterpret_cast<const void*>(&sm90::decode_kernel<T>), sm90::kSmemAlloc, smem_set, "mla.decode");
  const dim3 grid((p.rows + kTileRows - 1) / kTileRows, p.num_parts);
  sm90::decode_kernel<T><<<grid, sm90::kThreads, sm90::kSmemAlloc, stream>>>(tmap_q, tmap_kv, p);
}

template <typename T, int kN>
void launch_fp8_kernel(const Params& p, cudaStream_t stream, const CUtensorMap& tmap_q, const CUtensorMap& tmap_kv) {
  constexpr int kSmem = sm90::fp8::Smem<(kN < 64)>::kAlloc;
  static std::atomic<uint64_t> smem_set{0};
  opt_in_dynamic_smem(reinterpret_cast<const void*>(&sm90::fp8::decode_kernel<T, kN>), kSmem, smem_set, "mla.decode");
  const dim3 grid((p.rows + kTileRows - 1) / kTileRows, p.num_parts);
  // After the kernel that quantized q: its programmatic dependent, so that this kernel's start and
  // its first pages' loads overlap that kernel (the score warpgroup waits before Q).
  launch_kernel(sm90::fp8::decode_kernel<T, kN>, grid, dim3(sm90::kThreads), kSmem, stream, p.q_quantized, tmap_q,
                tmap_kv, p);
}

// The e4m3 kernel: the same views in bytes, 64 columns (64 bytes) a chunk, 64B swizzle; a page
// lands in one box (the kernel refills it whole).
template <typename T>
void launch_fp8(const Params& p, cudaStream_t stream) {
  constexpr cuuint64_t kChunkStride = sm90::kChunkCols;
  const cuuint64_t q_dims[4] = {sm90::kChunkCols, static_cast<cuuint64_t>(p.rows), sm90::kChunks,
                                static_cast<cuuint64_t>(p.batch)};
  const cuuint64_t q_strides[3] = {static_cast<cuuint64_t>(p.q_row_stride), kChunkStride,
                                   static_cast<cuuint64_t>(p.q_batch_stride)};
  const cuuint32_t box[4] = {sm90::kChunkCols, 64, sm90::kChunks, 1};
  const CUtensorMap tmap_q =
      make_map(p.q, CU_TENSOR_MAP_DATA_TYPE_UINT8, CU_TENSOR_MAP_SWIZZLE_64B, 4, q_dims, q_strides, box);
  const cuuint64_t kv_dims[4] = {sm90::kChunkCols, kPageSize, sm90::kChunks, static_cast<cuuint64_t>(p.num_blocks)};
  const cuuint64_t kv_strides[3] = {static_cast<cuuint64_t>(p.kv_row_stride), kChunkStride,
                                    static_cast<cuuint64_t>(p.kv_block_stride)};
  const CUtensorMap tmap_kv =
      make_map(p.kv_cache, CU_TENSOR_MAP_DATA_TYPE_UINT8, CU_TENSOR_MAP_SWIZZLE_64B, 4, kv_dims, kv_strides, box);

  // At most 16 or 32 query rows: the narrow form of the kernel (tokens and dims as the wgmma's rows).
  if (p.rows <= 16)
    launch_fp8_kernel<T, 16>(p, stream, tmap_q, tmap_kv);
  else if (p.rows <= 32)
    launch_fp8_kernel<T, 32>(p, stream, tmap_q, tmap_kv);
  else
    launch_fp8_kernel<T, 64>(p, stream, tmap_q, tmap_kv);
}

}  // namespace

void launch_decode(const Params& p, cudaStream_t stream) {
  if (p.fp8 && p.dtype == DType::kBF16)
    launch_fp8<__nv_bfloat16>(p, stream);
  else if (p.fp8)
    launch_fp8<__half>(p, stream);
  else if (p.dtype == DType::kBF16)
    launch_typed<__nv_bfloat16>(p, stream);
  else
    launch_typed<__half>(p, stream);
  launch_combine(p, stream);
}

}  // namespace mla

#ifdef MLA_TIMELINE
// tools/lab/timeline.py reads the kernel's event clocks (timeline.cuh) through these, with ctypes;
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
