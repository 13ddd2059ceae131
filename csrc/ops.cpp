// CUDA implementations of the mla ops, registered against the schemas that torch_mla/ops.py
// defines (TORCH_LIBRARY_IMPL only: this file never defines a schema).
//
// The argument rules and their messages live in ops.py only. Each impl here first tests bare
// predicates that hold exactly when ops.py's rules for the op hold (no strings, no Python: a few
// ns); when one fails, it calls ops.py's check function for that op with the GIL taken, so the
// user gets ops.py's own ValueError, the one the CPU path and torch.compile raise. Then come the
// checks only the Hopper kernel needs (GPU generation, dtype, block size, batch limit, strides
// TMA can take), with their messages here. In debug mode (ops.debug_mode(), read once when the
// extension loads) the impls also call ops.py's value checks, in every grad mode.

#include <Python.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>

#include "contract.h"
#include "params.h"

namespace mla {
namespace {

bool debug_checks = false;  // ops.debug_mode() when the extension loaded (PyInit__C below)

// Value checks read device memory (a host sync): illegal while the stream is being captured.
bool value_checks_due(cudaStream_t stream) {
  if (!debug_checks) return false;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status == cudaStreamCaptureStatusNone;
}

// ---------------------------------------------------------------- what only the Hopper kernel needs
// Messages pass numbers as std::to_string: streaming an integer through c10::str (an ostringstream
// of torch's libstdc++, used with this extension's) crashed with a segfault on the GPU machine.

std::string strides_of(const at::Tensor& t) {
  std::string s = "(";  // plain concatenation: iostreams across the libstdc++ boundary crashed once
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.stride(i));
  return s + ")";
}

void check_hopper(const char* op, const at::Tensor& t) {
  const auto* prop = at::cuda::getDeviceProperties(t.device().index());
  TORCH_CHECK_VALUE(prop->major == 9, "mla.", op, ": the CUDA kernel needs a Hopper GPU (sm_90); ", t.device().str(),
                    " is sm_", std::to_string(prop->major) + std::to_string(prop->minor));
}

void check_batch_limit(const char* op, int64_t batch) {
  const int64_t limit = std::min<int64_t>(max_metadata_batch(), 65535);
  TORCH_CHECK_VALUE(batch <= limit, "mla.", op, ": the CUDA kernel supports batch <= ", std::to_string(limit), ", got ",
                    std::to_string(batch));
}

// TMA loads: a 16-byte aligned base and strides (in elements) that are positive multiples of 16
// bytes.
void check_tma_layout(const char* name, const at::Tensor& t, std::initializer_list<int64_t> strides) {
  const int64_t elem = t.element_size();
  bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t s : strides) ok = ok && s > 0 && (s * elem) % 16 == 0;
  TORCH_CHECK_VALUE(ok, "mla.decode: the CUDA kernel loads ", name, " by TMA, which needs its strides to be positive ",
                    "multiples of 16 bytes (", std::to_string(16 / elem), " elements) and its data 16-byte aligned; ",
                    "got strides ", strides_of(t), " and data at byte ",
                    std::to_string(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16), " mod 16");
}

// The kernels' name for a tensor's dtype (bf16, fp16, or fp32: the write_cache source only).
DType dtype_of(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kBFloat16 ? DType::kBF16 : (s == at::kHalf ? DType::kFP16 : DType::kFP32);
}

int64_t num_sm_parts(const at::Tensor& like, int64_t num_q_tokens_per_head_k, int64_t num_heads_k) {
  const int sm_count = at::cuda::getDeviceProperties(like.device().index())->multiProcessorCount;
  const int64_t q_tiles = (num_q_tokens_per_head_k + kTileRows - 1) / kTileRows;
  return std::max<int64_t>(1, sm_count / num_heads_k / q_tiles);
}

// ---------------------------------------------------------------- the ops

std::tuple<at::Tensor, at::Tensor> get_metadata_cuda(const at::Tensor& cache_seqlens, int64_t num_q_tokens_per_head_k,
                                                     int64_t num_heads_k) {
  if (!get_metadata_args_ok(cache_seqlens, num_q_tokens_per_head_k, num_heads_k))
    contract_error("get_metadata", "check_get_metadata_args", cache_seqlens, num_q_tokens_per_head_k, num_heads_k);
  const int64_t batch = cache_seqlens.size(0);
  check_batch_limit("get_metadata", batch);
  check_hopper("get_metadata", cache_seqlens);
  const c10::cuda::CUDAGuard guard(cache_seqlens.device());
  const int64_t parts = num_sm_parts(cache_seqlens, num_q_tokens_per_head_k, num_heads_k);
  auto metadata = at::empty({parts, kMetadataSize}, cache_seqlens.options());
  auto num_splits = at::empty({batch + 1}, cache_seqlens.options());
  launch_get_metadata(cache_seqlens.data_ptr<int32_t>(), static_cast<int>(batch), static_cast<int>(parts),
                      reinterpret_cast<MetadataRow*>(metadata.data_ptr<int32_t>()), num_splits.data_ptr<int32_t>(),
                      at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {metadata, num_splits};
}

std::tuple<at::Tensor, at::Tensor> decode_cuda(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_table,
                                               const at::Tensor& cache_seqlens, int64_t head_dim_v,
                                               std::optional<double> softmax_scale, bool causal,
                                               const std::optional<at::Tensor>& tile_scheduler_metadata,
                                               const std::optional<at::Tensor>& num_splits,
                                               const std::optional<at::Tensor>& descale_q,
                                               const std::optional<at::Tensor>& descale_k) {
  if (!decode_args_ok(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, tile_scheduler_metadata,
                      num_splits, descale_q, descale_k))
    contract_error("decode", "check_decode_args", q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale,
                   tile_scheduler_metadata, num_splits, descale_q, descale_k);
  check_hopper("decode", q);
  const bool fp8 = fp8_dtype(kv_cache.scalar_type()), fp8_q = fp8_dtype(q.scalar_type());
  TORCH_CHECK_VALUE(q.scalar_type() != at::kFloat,
                    "mla.decode: q must be bfloat16, float16 or (with an FP8 cache) float8_e4m3fn on CUDA, got float32");
  TORCH_CHECK_VALUE(kv_cache.size(1) == kPageSize, "mla.decode: kv_cache must have block_size (size 1) ",
                    std::to_string(kPageSize), " on CUDA, got ", std::to_string(kv_cache.size(1)));
  const int64_t batch = q.size(0), s_q = q.size(1), h_q = q.size(2), rows = s_q * h_q;
  check_batch_limit("decode", batch);
  // The kernel reads a sequence's s_q * h_q query rows (row = s * h_q + h) with one row stride;
  // the stride of a size-1 dim never matters, so it is replaced by the contiguous one.
  TORCH_CHECK_VALUE(s_q == 1 || h_q == 1 || q.stride(1) == h_q * q.stride(2),
                    "mla.decode: the CUDA kernel reads q's s_q * h_q rows with one stride, so it needs "
                    "q.stride(1) == h_q * q.stride(2); got strides ", strides_of(q));
  const int64_t q_row = h_q > 1 ? q.stride(2) : (s_q > 1 ? q.stride(1) : kHeadDim);
  const int64_t q_batch = batch > 1 ? q.stride(0) : rows * q_row;
  const int64_t num_blocks = kv_cache.size(0);
  const int64_t kv_row = kv_cache.stride(1);
  const int64_t kv_block = num_blocks > 1 ? kv_cache.stride(0) : kPageSize * kv_row;
  check_tma_layout("q", q, {q_row, q_batch});
  check_tma_layout("kv_cache", kv_cache, {kv_row, kv_block});

  const c10::cuda::CUDAGuard guard(q.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (value_checks_due(stream)) call_ops("check_decode_values", q, kv_cache, block_table, cache_seqlens, causal, descale_q, descale_k);
  // out: q's dtype, bfloat16 for an e4m3 q (ops.decode_out_dtype)
  auto out = at::empty({batch, s_q, h_q, kHeadDimV}, q.options().dtype(fp8_q ? at::kBFloat16 : q.scalar_type()));
  auto lse = at::empty({batch, h_q, s_q}, q.options().dtype(at::kFloat));
  if (batch == 0) return {out, lse};
  if (num_blocks == 0) {  // no pages at all: every sequence is empty
    out.zero_();
    lse.fill_(INFINITY);
    return {out, lse};
  }

  at::Tensor metadata, splits;
  if (tile_scheduler_metadata) {
    metadata = *tile_scheduler_metadata;
    splits = *num_splits;
  } else {
    const int64_t parts = num_sm_parts(q, rows, 1);
    metadata = at::empty({parts, kMetadataSize}, cache_seqlens.options());
    splits = at::empty({batch + 1}, cache_seqlens.options());
    launch_get_metadata(cache_seqlens.data_ptr<int32_t>(), static_cast<int>(batch), static_cast<int>(parts),
                        reinterpret_cast<MetadataRow*>(metadata.data_ptr<int32_t>()), splits.data_ptr<int32_t>(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t parts = metadata.size(0);
  // Split partials: at most one split per sequence plus one per stretch boundary.
  auto out_accum = at::empty({batch + parts, rows, kHeadDimV}, q.options().dtype(at::kFloat));
  auto lse_accum = at::empty({batch + parts, rows}, q.options().dtype(at::kFloat));

  Params p;
  p.q = q.data_ptr();
  p.q_batch_stride = q_batch;
  p.q_row_stride = q_row;
  if (fp8) {
    // The e4m3 kernel reads an e4m3 q: a bf16/fp16 q is quantized row by row (ops.py's rule), an
    // e4m3 q is read with its per-tensor descale_q.
    p.fp8 = true;
    p.descale_k = descale_k->data_ptr<float>();
    if (fp8_q) {
      p.q_scale = descale_q->data_ptr<float>();
    } else {
      auto q8 = at::empty({batch, rows, kHeadDim}, q.options().dtype(at::ScalarType::Float8_e4m3fn));
      auto q_scale = at::empty({batch, rows}, q.options().dtype(at::kFloat));
      launch_quantize_rows(q.data_ptr(), dtype_of(q), q_batch,
                           q_row, static_cast<int>(batch), static_cast<int>(rows),
                           static_cast<uint8_t*>(q8.data_ptr()), q_scale.data_ptr<float>(), stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      p.q = q8.data_ptr();  // (the caching allocator keeps it for the stream's kernels that follow)
      p.q_batch_stride = rows * kHeadDim;
      p.q_row_stride = kHeadDim;
      p.q_scale = q_scale.data_ptr<float>();
      p.q_scale_batch_stride = rows;
      p.q_scale_row_stride = 1;
      p.q_quantized = true;
    }
  }
  p.kv_cache = kv_cache.data_ptr();
  p.block_table = block_table.data_ptr<int32_t>();
  p.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  p.metadata = reinterpret_cast<const MetadataRow*>(metadata.data_ptr<int32_t>());
  p.num_splits = splits.data_ptr<int32_t>();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.out_accum = out_accum.data_ptr<float>();
  p.lse_accum = lse_accum.data_ptr<float>();
  p.kv_block_stride = kv_block;
  p.kv_row_stride = kv_row;
  p.block_table_stride = block_table.stride(0);
  p.num_blocks = num_blocks;
  p.batch = static_cast<int>(batch);
  p.s_q = static_cast<int>(s_q);
  p.h_q = static_cast<int>(h_q);
  p.rows = static_cast<int>(rows);
  p.max_blocks = static_cast<int>(block_table.size(1));
  p.num_parts = static_cast<int>(parts);
  const double scale = softmax_scale ? *softmax_scale : 1.0 / std::sqrt(static_cast<double>(kHeadDim));
  p.scale_log2 = static_cast<float>(scale) * 1.4426950408889634f;
  p.causal = causal && s_q > 1 ? 1 : 0;
  p.dtype = dtype_of(out);
  launch_decode(p, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

void write_cache_cuda(const at::Tensor& kv_c, const at::Tensor& k_pe, const at::Tensor& kv_cache, const at::Tensor& slot_mapping,
                      const std::optional<at::Tensor>& scale) {
  if (!write_cache_args_ok(kv_c, k_pe, kv_cache, slot_mapping, scale))
    contract_error("write_cache", "check_write_cache_args", kv_c, k_pe, kv_cache, slot_mapping, scale);
  const c10::cuda::CUDAGuard guard(kv_cache.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (value_checks_due(stream)) call_ops("check_write_cache_values", kv_cache, slot_mapping, scale);
  if (fp8_dtype(kv_cache.scalar_type())) {
    launch_write_cache_fp8(kv_c.data_ptr(), kv_c.stride(0), k_pe.data_ptr(), k_pe.stride(0),
                           static_cast<uint8_t*>(kv_cache.data_ptr()), kv_cache.stride(0), kv_cache.stride(1),
                           static_cast<int>(kv_cache.size(1)), slot_mapping.data_ptr(),
                           slot_mapping.scalar_type() == at::kLong, kv_c.size(0),
                           dtype_of(kv_c),
                           scale->data_ptr<float>(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  launch_write_cache(kv_c.data_ptr(), kv_c.stride(0), k_pe.data_ptr(), k_pe.stride(0), kv_cache.data_ptr(),
                     kv_cache.stride(0), kv_cache.stride(1), static_cast<int>(kv_cache.size(1)), slot_mapping.data_ptr(),
                     slot_mapping.scalar_type() == at::kLong, kv_c.size(0), static_cast<int>(kv_cache.element_size()),
                     stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace mla

TORCH_LIBRARY_IMPL(mla, CUDA, m) {
  m.impl("decode", &mla::decode_cuda);
  m.impl("get_metadata", &mla::get_metadata_cuda);
  m.impl("write_cache", &mla::write_cache_cuda);
}

// `from torch_mla import _C` loads this library, which runs the registration above; torch_mla.ops
// is imported by then, and says whether debug mode is on.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  try {
    mla::debug_checks = pybind11::module_::import("torch_mla.ops").attr("debug_mode")().cast<bool>();
  } catch (pybind11::error_already_set& e) {
    e.restore();
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
