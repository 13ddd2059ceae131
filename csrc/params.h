// The boundary between the PyTorch-facing host code (ops.cpp) and the CUDA translation units:
// the constants, the one parameter struct that ops.cpp fills and the kernels read (passed by
// value to the decode kernel), the scheduler's metadata row, and the launch functions. Plain
// pointers and sizes only, so the .cu files need no torch headers and compile quickly.
#pragma once

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_runtime.h>

namespace mla {

constexpr int kHeadDim = 576;    // latent (512) + RoPE (64)
constexpr int kHeadDimV = 512;   // V = first 512 dims of a cache row
constexpr int kPageSize = 64;    // tokens per KV page (block_size) the kernel supports
constexpr int kTileRows = 64;    // query rows (s_q * h_q, flattened) per CTA tile: one wgmma M
constexpr int kMetadataSize = 8; // int32 words per row of tile_scheduler_metadata

enum class DType { kBF16, kFP16, kFP32 };

// One row of tile_scheduler_metadata: the stretch of (sequence, page) work of one persistent CTA
// column (csrc/common/scheduler.cu says how stretches are cut).
struct MetadataRow {
  int32_t begin_batch;  // first sequence of the stretch (== batch for an empty stretch)
  int32_t begin_page;   // first page within begin_batch
  int32_t end_batch;    // last sequence of the stretch (inclusive)
  int32_t end_page;     // one past the last page within end_batch
  int32_t begin_split;  // index, among begin_batch's splits, of this stretch's piece of it
  int32_t num_pages;    // pages in this stretch (0 for an empty one)
  int32_t reserved[2];  // 0
};
static_assert(sizeof(MetadataRow) == kMetadataSize * sizeof(int32_t), "a metadata row is kMetadataSize int32");

// Strides are in elements. Query row r of sequence b (r = s * h_q + h) is at
// q + b * q_batch_stride + r * q_row_stride; token t of page `block` at
// kv_cache + block * kv_block_stride + t * kv_row_stride; the last dim is contiguous in both.
struct Params {
  const void* q;                // [batch, s_q, h_q, 576]
  const void* kv_cache;         // [num_blocks, 64, 1, 576]
  const int32_t* block_table;   // [batch, max_blocks], rows block_table_stride apart
  const int32_t* cache_seqlens; // [batch]
  const MetadataRow* metadata;  // [num_parts]
  const int32_t* num_splits;    // [batch + 1], cumulative
  void* out;                    // [batch, s_q, h_q, 512], contiguous
  float* lse;                   // [batch, h_q, s_q]
  float* out_accum;             // [batch + num_parts, s_q * h_q, 512] split partials
  float* lse_accum;             // [batch + num_parts, s_q * h_q]
  int64_t q_batch_stride, q_row_stride;
  int64_t kv_block_stride, kv_row_stride;
  int64_t block_table_stride;
  int64_t num_blocks;
  int batch, s_q, h_q, rows, max_blocks, num_parts;  // rows = s_q * h_q
  float scale_log2;  // softmax_scale * log2(e)
  int causal;        // causal && s_q > 1
  DType dtype;       // of q and the cache, or (fp8) of out
  // An e4m3 cache (fp8): q is e4m3 too (ops.cpp quantizes a bf16/fp16 q row by row), row r of
  // sequence b dequantized with q_scale[b * q_scale_batch_stride + r * q_scale_row_stride]
  // (strides 0 for a per-tensor descale_q), the cache with *descale_k.
  bool fp8 = false;
  const float* q_scale = nullptr;
  int64_t q_scale_batch_stride = 0, q_scale_row_stride = 0;
  const float* descale_k = nullptr;
  bool q_quantized = false;  // q is the quantize kernel's output: launched as its dependent, wait before reading it
};

// Scheduler (csrc/common/scheduler.cu): cuts the batch's KV pages into `num_parts` stretches of
// (nearly) equal size, on the device.
void launch_get_metadata(const int32_t* cache_seqlens, int batch, int num_parts, MetadataRow* metadata,
                         int32_t* num_splits, cudaStream_t stream);
// Largest batch the one-block scheduler handles (its prefix sums live in shared memory).
int max_metadata_batch();

// The sm90 split-KV kernel followed by the combine kernel (csrc/sm90/decode/, csrc/common/).
void launch_decode(const Params& params, cudaStream_t stream);
// The combine kernel alone (csrc/common/combine.cu); launch_decode calls it.
void launch_combine(const Params& params, cudaStream_t stream);

// q's rows (row r of sequence b at q + b * q_batch_stride + r * q_row_stride, 576 contiguous
// elements of `dtype`) as e4m3 with a scale per row (csrc/common/quantize.cu): scale =
// amax / 448 (1 for a row of zeros), q8 = e4m3(q / scale), saturating; q8 is [batch * rows, 576],
// scale [batch * rows].
void launch_quantize_rows(const void* q, DType dtype, int64_t q_batch_stride, int64_t q_row_stride, int batch, int rows,
                          uint8_t* q8, float* scale, cudaStream_t stream);

// write_cache (csrc/common/write_cache.cu): token t into row slot % block_size of block
// slot / block_size (strides in elements). elem_size: 2 or 4 bytes.
void launch_write_cache(const void* kv_c, int64_t kv_c_stride, const void* k_pe, int64_t k_pe_stride, void* kv_cache,
                        int64_t kv_block_stride, int64_t kv_row_stride, int block_size, const void* slot_mapping,
                        bool slot_is_int64, int64_t num_tokens, int elem_size, cudaStream_t stream);
// The same into an e4m3 cache: each element e4m3(x / *scale), saturating (kv_c and k_pe in `src`).
void launch_write_cache_fp8(const void* kv_c, int64_t kv_c_stride, const void* k_pe, int64_t k_pe_stride,
                            uint8_t* kv_cache, int64_t kv_block_stride, int64_t kv_row_stride, int block_size,
                            const void* slot_mapping, bool slot_is_int64, int64_t num_tokens, DType src,
                            const float* scale, cudaStream_t stream);

// Opts `kernel` in to `bytes` of dynamic shared memory on the current device, once per device
// (bit d of `done`: device d is set; a caller keeps one `done` per kernel instance), and throws
// if the driver refuses: a launch without the opt-in would fail with a less clear error.
inline void opt_in_dynamic_smem(const void* kernel, int bytes, std::atomic<uint64_t>& done, const char* what) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;
  if (err == cudaSuccess && (done.load(std::memory_order_relaxed) & bit)) return;
  if (err == cudaSuccess) err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": cannot opt in to " + std::to_string(bytes) +
                             " bytes of dynamic shared memory on device " + std::to_string(device) + ": " +
                             cudaGetErrorString(err));
  done.fetch_or(bit, std::memory_order_relaxed);
}

}  // namespace mla
