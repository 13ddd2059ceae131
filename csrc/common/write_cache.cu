// mla.write_cache: kv_cache[slot / block_size, slot % block_size, 0] = [kv_c[t] | k_pe[t]] for
// slot = slot_mapping[t], negative slot = skip. One block per token; element-wise copies (rows
// and blocks may have any stride), no host sync. Into an e4m3 cache each element is quantized
// (common/fp8.cuh) with the scale read on the device.

#include <type_traits>

#include "common/fp8.cuh"
#include "params.h"

namespace mla {
namespace {

// Src: the rows' element type (for a plain copy, any type of the cache's element size); Dst: the
// cache's, Src itself, or uint8_t for e4m3 (quantized with *scale, read once a token).
template <typename Src, typename Dst, typename Slot>
__global__ void __launch_bounds__(256) write_cache_kernel(const Src* __restrict__ kv_c, int64_t kv_c_stride,
                                                          const Src* __restrict__ k_pe, int64_t k_pe_stride,
                                                          Dst* __restrict__ kv_cache, int64_t kv_block_stride,
                                                          int64_t kv_row_stride, int block_size,
                                                          const Slot* __restrict__ slots, const float* scale) {
  constexpr bool kQuantize = std::is_same_v<Dst, uint8_t>;
  const int64_t t = blockIdx.x;
  const int64_t slot = static_cast<int64_t>(slots[t]);
  if (slot < 0) return;
  float s = 1.f;
  if constexpr (kQuantize) s = *scale;
  Dst* dst = kv_cache + (slot / block_size) * kv_block_stride + (slot % block_size) * kv_row_stride;
  for (int i = threadIdx.x; i < kHeadDim; i += blockDim.x) {
    const Src x = i < kHeadDimV ? kv_c[t * kv_c_stride + i] : k_pe[t * k_pe_stride + (i - kHeadDimV)];
    if constexpr (kQuantize)
      dst[i] = quantize_e4m3(to_float(x), s);
    else
      dst[i] = x;
  }
}

template <typename Src, typename Dst>
void launch_typed(const void* kv_c, int64_t kv_c_stride, const void* k_pe, int64_t k_pe_stride, void* kv_cache,
                  int64_t kv_block_stride, int64_t kv_row_stride, int block_size, const void* slots, bool slot_is_int64,
                  int64_t n, const float* scale, cudaStream_t stream) {
  const auto* c = static_cast<const Src*>(kv_c);
  const auto* pe = static_cast<const Src*>(k_pe);
  auto* cache = static_cast<Dst*>(kv_cache);
  if (slot_is_int64)
    write_cache_kernel<Src, Dst, int64_t><<<n, 256, 0, stream>>>(c, kv_c_stride, pe, k_pe_stride, cache, kv_block_stride,
                                                                 kv_row_stride, block_size,
                                                                 static_cast<const int64_t*>(slots), scale);
  else
    write_cache_kernel<Src, Dst, int32_t><<<n, 256, 0, stream>>>(c, kv_c_stride, pe, k_pe_stride, cache, kv_block_stride,
                                                                 kv_row_stride, block_size,
                                                                 static_cast<const int32_t*>(slots), scale);
}

}  // namespace

void launch_write_cache(const void* kv_c, int64_t kv_c_stride, const void* k_pe, int64_t k_pe_stride, void* kv_cache,
                        int64_t kv_block_stride, int64_t kv_row_stride, int block_size, const void* slot_mapping,
                        bool slot_is_int64, int64_t num_tokens, int elem_size, cudaStream_t stream) {
  if (num_tokens == 0) return;
  if (elem_size == 2)
    launch_typed<uint16_t, uint16_t>(kv_c, kv_c_stride, k_pe, k_pe_stride, kv_cache, kv_block_stride, kv_row_stride,
                                     block_size, slot_mapping, slot_is_int64, num_tokens, nullptr, stream);
  else
    launch_typed<uint32_t, uint32_t>(kv_c, kv_c_stride, k_pe, k_pe_stride, kv_cache, kv_block_stride, kv_row_stride,
                                     block_size, slot_mapping, slot_is_int64, num_tokens, nullptr, stream);
}

void launch_write_cache_fp8(const void* kv_c, int64_t kv_c_stride, const void* k_pe, int64_t k_pe_stride,
                            uint8_t* kv_cache, int64_t kv_block_stride, int64_t kv_row_stride, int block_size,
                            const void* slot_mapping, bool slot_is_int64, int64_t num_tokens, DType src,
                            const float* scale, cudaStream_t stream) {
  if (num_tokens == 0) return;
  if (src == DType::kBF16)
    launch_typed<__nv_bfloat16, uint8_t>(kv_c, kv_c_stride, k_pe, k_pe_stride, kv_cache, kv_block_stride, kv_row_stride,
                                         block_size, slot_mapping, slot_is_int64, num_tokens, scale, stream);
  else if (src == DType::kFP16)
    launch_typed<__half, uint8_t>(kv_c, kv_c_stride, k_pe, k_pe_stride, kv_cache, kv_block_stride, kv_row_stride,
                                  block_size, slot_mapping, slot_is_int64, num_tokens, scale, stream);
  else
    launch_typed<float, uint8_t>(kv_c, kv_c_stride, k_pe, k_pe_stride, kv_cache, kv_block_stride, kv_row_stride,
                                 block_size, slot_mapping, slot_is_int64, num_tokens, scale, stream);
}

}  // namespace mla
