// The boundary between the PyTorch-facing host code (ops.cpp) and the CUDA translation units.
// Plain pointers and sizes only, so the .cu files need no torch headers and compile quickly.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace mla {

constexpr int kHeadDim = 576;    // latent (512) + RoPE (64)
constexpr int kHeadDimV = 512;   // V = first 512 dims of a cache row
constexpr int kPageSize = 64;    // tokens per KV page (block_size) the kernel supports
constexpr int kTileRows = 64;    // query rows (s_q * h_q, flattened) per CTA tile: one wgmma M
constexpr int kMetadataSize = 8; // int32 words per row of tile_scheduler_metadata

enum class DType { kBF16, kFP16 };

// Scheduler (csrc/common/scheduler.cu). Splits the total KV pages of the batch into `num_parts`
// contiguous stretches of (nearly) equal size, on the device. See scheduler.cu for the meaning
// of the 8 ints of each metadata row.
void launch_get_metadata(const int32_t* cache_seqlens, int batch, int num_parts, int32_t* metadata,
                         int32_t* num_splits, cudaStream_t stream);
// Largest batch the one-block scheduler handles (its prefix sums live in shared memory).
int max_metadata_batch();

struct DecodeArgs {
  const void* q;               // [batch, s_q, h_q, 576]
  const void* kv_cache;        // [num_blocks, 64, 1, 576]
  const int32_t* block_table;  // [batch, max_blocks]
  const int32_t* cache_seqlens;
  const int32_t* metadata;     // [num_parts, 8]
  const int32_t* num_splits;   // [batch + 1], cumulative
  void* out;                   // [batch, s_q, h_q, 512]
  float* lse;                  // [batch, h_q, s_q]
  float* out_accum;            // [batch + num_parts, s_q * h_q, 512] split partials
  float* lse_accum;            // [batch + num_parts, s_q * h_q]
  int64_t num_blocks;
  int batch, s_q, h_q, max_blocks, num_parts;
  float softmax_scale;
  bool causal;
  DType dtype;
};

// The sm90 split-KV kernel followed by the combine kernel (csrc/sm90/decode/, csrc/common/).
void launch_decode(const DecodeArgs& args, cudaStream_t stream);
// The combine kernel alone (csrc/common/scheduler.cu); launch_decode calls it.
void launch_combine(const DecodeArgs& args, cudaStream_t stream);

// write_cache (csrc/common/write_cache.cu). elem_size: 2 or 4 bytes.
void launch_write_cache(const void* kv_c, int64_t kv_c_stride, const void* k_pe, int64_t k_pe_stride,
                        void* kv_cache, const void* slot_mapping, bool slot_is_int64, int64_t num_tokens,
                        int elem_size, cudaStream_t stream);

}  // namespace mla
