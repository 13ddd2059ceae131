// CUDA implementations of the mla ops, registered against the schemas that torch_mla/ops.py
// defines (TORCH_LIBRARY_IMPL only: this file never defines a schema).
//
// Argument checks mirror ops.py's check_*_args in the same order and with the same wording, so
// a bad argument gets the same ValueError from the CPU path, the CUDA path and torch.compile
// (tests/test_cuda_validation.py compares them). Checks that only the CUDA kernel needs (dtype,
// block size, GPU generation) come after the shared ones. No device value is read here: the
// value checks of debug mode run in Python in front of this (ops.register_debug_checks).

#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/core/GradMode.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "launch.h"

namespace mla {
namespace {

// ---------------------------------------------------------------- Python-style formatting

std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    case at::kComplexFloat: return "complex64";
    case at::kComplexDouble: return "complex128";
    case at::kComplexHalf: return "complex32";
    case at::kFloat8_e4m3fn: return "float8_e4m3fn";
    case at::kFloat8_e5m2: return "float8_e5m2";
    default: {
      std::string s = c10::toString(t);
      for (auto& c : s) c = static_cast<char>(std::tolower(c));
      return s;
    }
  }
}

// Python's repr of a tuple of ints: (), (5,), (2, 4, 576). Plain string concatenation: the
// extension may be built with another libstdc++ than torch, and iostreams across that
// boundary crashed (seen with torch 2.11 on the H100 machine).
std::string py_tuple(at::IntArrayRef v) {
  std::string s = "(";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  if (v.size() == 1) s += ",";
  return s + ")";
}

// Python's repr of a float: the shortest string that reads back exactly.
std::string py_float(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  char buf[64];
  for (int prec = 1; prec <= 17; ++prec) {
    std::snprintf(buf, sizeof(buf), "%.*g", prec, x);
    if (std::strtod(buf, nullptr) == x) break;
  }
  std::string s = buf;
  const auto e = s.find('e');
  const int exp10 = x == 0 ? 0 : static_cast<int>(std::floor(std::log10(std::fabs(x))));
  if (e == std::string::npos) {
    if (s.find('.') == std::string::npos) s += ".0";
    return s;
  }
  if (exp10 >= -4 && exp10 < 16) {  // Python writes these positionally
    std::snprintf(buf, sizeof(buf), "%.17g", x);
    for (int prec = 1; prec <= 17; ++prec) {
      std::snprintf(buf, sizeof(buf), "%.*f", std::max(0, prec - 1 - exp10), x);
      if (std::strtod(buf, nullptr) == x) break;
    }
    s = buf;
    if (s.find('.') == std::string::npos) s += ".0";
    return s;
  }
  return s;  // C's %g exponent form matches Python's (e-05, e+16)
}

// ---------------------------------------------------------------- the rules of ops.py

[[noreturn]] void fail(const std::string& op, const std::string& msg) {
  TORCH_CHECK_VALUE(false, "mla.", op, ": ", msg);
  std::abort();
}

using Named = std::vector<std::pair<const char*, const at::Tensor*>>;

void check_devices(const std::string& op, const Named& tensors) {
  const at::Device device = tensors[0].second->device();
  for (const auto& [name, t] : tensors)
    if (t != nullptr && t->device() != device)
      fail(op, std::string(name) + " is on " + t->device().str() + " but " + tensors[0].first + " is on " +
                   device.str() + "; all tensors must share one device");
}

void check_rank(const std::string& op, const char* name, const at::Tensor& t, int64_t rank, const std::string& layout) {
  if (t.dim() != rank)
    fail(op, std::string(name) + " must be " + std::to_string(rank) + "-D " + layout + ", got shape " + py_tuple(t.sizes()));
}

void check_dtype(const std::string& op, const char* name, const at::Tensor& t, std::vector<at::ScalarType> allowed) {
  for (auto d : allowed)
    if (t.scalar_type() == d) return;
  std::string names;
  for (size_t i = 0; i < allowed.size(); ++i) names += (i ? " or " : "") + py_dtype(allowed[i]);
  fail(op, std::string(name) + " must be " + names + ", got " + py_dtype(t.scalar_type()));
}

void check_contiguous(const std::string& op, const char* name, const at::Tensor& t) {
  if (!t.is_contiguous()) fail(op, std::string(name) + " must be contiguous, got strides " + py_tuple(t.strides()));
}

void check_size(const std::string& op, const char* name, const std::string& dim, int64_t got, int64_t expected) {
  if (got != expected)
    fail(op, std::string(name) + " must have " + dim + " " + std::to_string(expected) + ", got " + std::to_string(got));
}

void check_no_grad(const std::string& op, const Named& tensors) {
  if (!c10::GradMode::is_enabled()) return;
  for (const auto& [name, t] : tensors)
    if (t != nullptr && t->requires_grad())
      fail(op, std::string(name) +
                   " requires grad, but mla ops are inference-only and have no backward; "
                   "call them under torch.no_grad() or torch.inference_mode()");
}

const std::vector<at::ScalarType> kDTypes = {at::kBFloat16, at::kHalf, at::kFloat};
const std::string kQLayout = "[batch, s_q, h_q, 576]";
const std::string kCacheLayout = "[num_blocks, block_size, 1, 576]";

void check_decode_args(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_table,
                       const at::Tensor& cache_seqlens, int64_t head_dim_v, std::optional<double> softmax_scale,
                       const std::optional<at::Tensor>& metadata, const std::optional<at::Tensor>& num_splits) {
  const std::string op = "decode";
  const at::Tensor* md = metadata ? &*metadata : nullptr;
  const at::Tensor* ns = num_splits ? &*num_splits : nullptr;
  check_devices(op, {{"q", &q}, {"kv_cache", &kv_cache}, {"block_table", &block_table}, {"cache_seqlens", &cache_seqlens},
                     {"tile_scheduler_metadata", md}, {"num_splits", ns}});
  check_rank(op, "q", q, 4, kQLayout);
  check_rank(op, "kv_cache", kv_cache, 4, kCacheLayout);
  check_rank(op, "block_table", block_table, 2, "[batch, max_blocks_per_seq]");
  check_rank(op, "cache_seqlens", cache_seqlens, 1, "[batch]");
  check_dtype(op, "q", q, kDTypes);
  check_dtype(op, "kv_cache", kv_cache, {q.scalar_type()});
  check_dtype(op, "block_table", block_table, {at::kInt});
  check_dtype(op, "cache_seqlens", cache_seqlens, {at::kInt});
  check_size(op, "q", "head dim (size -1)", q.size(3), kHeadDim);
  check_size(op, "kv_cache", "head dim (size -1)", kv_cache.size(3), kHeadDim);
  check_size(op, "kv_cache", "num_heads_k (size 2)", kv_cache.size(2), 1);
  check_size(op, "head_dim_v", "value", head_dim_v, kHeadDimV);
  if (q.size(1) < 1) fail(op, "q must have s_q (size 1) >= 1, got " + std::to_string(q.size(1)));
  if (q.size(2) < 1) fail(op, "q must have h_q (size 2) >= 1, got " + std::to_string(q.size(2)));
  if (kv_cache.size(1) < 1) fail(op, "kv_cache must have block_size (size 1) >= 1, got " + std::to_string(kv_cache.size(1)));
  const int64_t batch = q.size(0);
  check_size(op, "block_table", "batch (size 0) equal to q's", block_table.size(0), batch);
  check_size(op, "cache_seqlens", "batch (size 0) equal to q's", cache_seqlens.size(0), batch);
  check_contiguous(op, "q", q);
  check_contiguous(op, "kv_cache", kv_cache);
  check_contiguous(op, "block_table", block_table);
  check_contiguous(op, "cache_seqlens", cache_seqlens);
  if (softmax_scale && !(*softmax_scale > 0 && std::isfinite(*softmax_scale)))
    fail(op, "softmax_scale must be a positive finite number, got " + py_float(*softmax_scale));
  if ((md == nullptr) != (ns == nullptr))
    fail(op, "tile_scheduler_metadata and num_splits must be given together (both from mla.get_metadata) or both omitted");
  if (md != nullptr) {
    check_rank(op, "tile_scheduler_metadata", *md, 2, "[num_sm_parts, 8]");
    check_dtype(op, "tile_scheduler_metadata", *md, {at::kInt});
    check_size(op, "tile_scheduler_metadata", "size -1", md->size(1), kMetadataSize);
    check_rank(op, "num_splits", *ns, 1, "[batch + 1]");
    check_dtype(op, "num_splits", *ns, {at::kInt});
    check_size(op, "num_splits", "size 0 (batch + 1)", ns->size(0), batch + 1);
    check_contiguous(op, "tile_scheduler_metadata", *md);
    check_contiguous(op, "num_splits", *ns);
  }
  check_no_grad(op, {{"q", &q}, {"kv_cache", &kv_cache}});
}

// What the Hopper kernel needs beyond the contract.
void check_cuda_kernel(const std::string& op, const at::Tensor& q, const at::Tensor* kv_cache) {
  const auto* prop = at::cuda::getDeviceProperties(q.device().index());
  if (prop->major != 9)
    fail(op, "the CUDA kernel needs a Hopper GPU (sm_90); " + q.device().str() + " is sm_" + std::to_string(prop->major) +
                 std::to_string(prop->minor));
  if (kv_cache != nullptr) {
    if (q.scalar_type() == at::kFloat) fail(op, "q must be bfloat16 or float16 on CUDA, got float32");
    if (kv_cache->size(1) != kPageSize)
      fail(op, "kv_cache must have block_size (size 1) 64 on CUDA, got " + std::to_string(kv_cache->size(1)));
  }
}

int64_t num_sm_parts(const at::Tensor& like, int64_t num_q_tokens_per_head_k, int64_t num_heads_k) {
  const int sm_count = at::cuda::getDeviceProperties(like.device().index())->multiProcessorCount;
  const int64_t q_tiles = (num_q_tokens_per_head_k + kTileRows - 1) / kTileRows;
  return std::max<int64_t>(1, sm_count / num_heads_k / q_tiles);
}

void check_batch_limit(const std::string& op, int64_t batch) {
  const int64_t limit = std::min<int64_t>(max_metadata_batch(), 65535);
  if (batch > limit) fail(op, "the CUDA kernel supports batch <= " + std::to_string(limit) + ", got " + std::to_string(batch));
}

// ---------------------------------------------------------------- the ops

std::tuple<at::Tensor, at::Tensor> get_metadata_cuda(const at::Tensor& cache_seqlens, int64_t num_q_tokens_per_head_k,
                                                     int64_t num_heads_k) {
  const std::string op = "get_metadata";
  check_rank(op, "cache_seqlens", cache_seqlens, 1, "[batch]");
  check_dtype(op, "cache_seqlens", cache_seqlens, {at::kInt});
  check_contiguous(op, "cache_seqlens", cache_seqlens);
  if (num_q_tokens_per_head_k < 1)
    fail(op, "num_q_tokens_per_head_k must be >= 1 (s_q * h_q // num_heads_k), got " + std::to_string(num_q_tokens_per_head_k));
  check_size(op, "num_heads_k", "value", num_heads_k, 1);
  const int64_t batch = cache_seqlens.size(0);
  check_batch_limit(op, batch);
  check_cuda_kernel(op, cache_seqlens, nullptr);
  const c10::cuda::CUDAGuard guard(cache_seqlens.device());
  const int64_t parts = num_sm_parts(cache_seqlens, num_q_tokens_per_head_k, num_heads_k);
  auto metadata = at::empty({parts, kMetadataSize}, cache_seqlens.options());
  auto num_splits = at::empty({batch + 1}, cache_seqlens.options());
  launch_get_metadata(cache_seqlens.data_ptr<int32_t>(), static_cast<int>(batch), static_cast<int>(parts),
                      metadata.data_ptr<int32_t>(), num_splits.data_ptr<int32_t>(), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {metadata, num_splits};
}

std::tuple<at::Tensor, at::Tensor> decode_cuda(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_table,
                                               const at::Tensor& cache_seqlens, int64_t head_dim_v,
                                               std::optional<double> softmax_scale, bool causal,
                                               const std::optional<at::Tensor>& tile_scheduler_metadata,
                                               const std::optional<at::Tensor>& num_splits) {
  check_decode_args(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, tile_scheduler_metadata, num_splits);
  check_cuda_kernel("decode", q, &kv_cache);
  const int64_t batch = q.size(0), s_q = q.size(1), h_q = q.size(2), rows = s_q * h_q;
  check_batch_limit("decode", batch);
  const c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty({batch, s_q, h_q, kHeadDimV}, q.options());
  auto lse = at::empty({batch, h_q, s_q}, q.options().dtype(at::kFloat));
  if (batch == 0) return {out, lse};
  const auto stream = at::cuda::getCurrentCUDAStream();

  at::Tensor metadata, splits;
  if (tile_scheduler_metadata) {
    metadata = *tile_scheduler_metadata;
    splits = *num_splits;
  } else {
    const int64_t parts = num_sm_parts(q, rows, 1);
    metadata = at::empty({parts, kMetadataSize}, cache_seqlens.options());
    splits = at::empty({batch + 1}, cache_seqlens.options());
    launch_get_metadata(cache_seqlens.data_ptr<int32_t>(), static_cast<int>(batch), static_cast<int>(parts),
                        metadata.data_ptr<int32_t>(), splits.data_ptr<int32_t>(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t parts = metadata.size(0);
  // Split partials: at most one split per sequence plus one per stretch boundary.
  auto out_accum = at::empty({batch + parts, rows, kHeadDimV}, q.options().dtype(at::kFloat));
  auto lse_accum = at::empty({batch + parts, rows}, q.options().dtype(at::kFloat));

  DecodeArgs a;
  a.q = q.data_ptr();
  a.kv_cache = kv_cache.data_ptr();
  a.block_table = block_table.data_ptr<int32_t>();
  a.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  a.metadata = metadata.data_ptr<int32_t>();
  a.num_splits = splits.data_ptr<int32_t>();
  a.out = out.data_ptr();
  a.lse = lse.data_ptr<float>();
  a.out_accum = out_accum.data_ptr<float>();
  a.lse_accum = lse_accum.data_ptr<float>();
  a.num_blocks = kv_cache.size(0);
  a.batch = static_cast<int>(batch);
  a.s_q = static_cast<int>(s_q);
  a.h_q = static_cast<int>(h_q);
  a.max_blocks = static_cast<int>(block_table.size(1));
  a.num_parts = static_cast<int>(parts);
  a.softmax_scale = static_cast<float>(softmax_scale ? *softmax_scale : 1.0 / std::sqrt(static_cast<double>(kHeadDim)));
  a.causal = causal && s_q > 1;
  a.dtype = q.scalar_type() == at::kBFloat16 ? DType::kBF16 : DType::kFP16;
  if (a.num_blocks == 0) {  // no pages at all: every sequence must be empty
    out.zero_();
    lse.fill_(INFINITY);
    return {out, lse};
  }
  launch_decode(a, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

void write_cache_cuda(const at::Tensor& kv_c, const at::Tensor& k_pe, const at::Tensor& kv_cache, const at::Tensor& slot_mapping) {
  const std::string op = "write_cache";
  check_devices(op, {{"kv_cache", &kv_cache}, {"kv_c", &kv_c}, {"k_pe", &k_pe}, {"slot_mapping", &slot_mapping}});
  check_rank(op, "kv_c", kv_c, 2, "[num_tokens, 512]");
  check_rank(op, "k_pe", k_pe, 2, "[num_tokens, 64]");
  check_rank(op, "kv_cache", kv_cache, 4, kCacheLayout);
  check_rank(op, "slot_mapping", slot_mapping, 1, "[num_tokens]");
  check_dtype(op, "kv_cache", kv_cache, kDTypes);
  check_dtype(op, "kv_c", kv_c, {kv_cache.scalar_type()});
  check_dtype(op, "k_pe", k_pe, {kv_cache.scalar_type()});
  check_dtype(op, "slot_mapping", slot_mapping, {at::kInt, at::kLong});
  check_size(op, "kv_c", "size -1", kv_c.size(1), kHeadDimV);
  check_size(op, "k_pe", "size -1", k_pe.size(1), kHeadDim - kHeadDimV);
  check_size(op, "kv_cache", "head dim (size -1)", kv_cache.size(3), kHeadDim);
  check_size(op, "kv_cache", "num_heads_k (size 2)", kv_cache.size(2), 1);
  check_size(op, "k_pe", "num_tokens (size 0) equal to kv_c's", k_pe.size(0), kv_c.size(0));
  check_size(op, "slot_mapping", "num_tokens (size 0) equal to kv_c's", slot_mapping.size(0), kv_c.size(0));
  check_contiguous(op, "kv_cache", kv_cache);
  check_contiguous(op, "slot_mapping", slot_mapping);
  if (kv_c.stride(1) != 1 || k_pe.stride(1) != 1) fail(op, "kv_c and k_pe must have unit stride in their last dim");
  check_no_grad(op, {{"kv_c", &kv_c}, {"k_pe", &k_pe}, {"kv_cache", &kv_cache}});
  const c10::cuda::CUDAGuard guard(kv_cache.device());
  launch_write_cache(kv_c.data_ptr(), kv_c.stride(0), k_pe.data_ptr(), k_pe.stride(0), kv_cache.data_ptr(),
                     slot_mapping.data_ptr(), slot_mapping.scalar_type() == at::kLong, kv_c.size(0),
                     static_cast<int>(kv_cache.element_size()), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace mla

TORCH_LIBRARY_IMPL(mla, CUDA, m) {
  m.impl("decode", &mla::decode_cuda);
  m.impl("get_metadata", &mla::get_metadata_cuda);
  m.impl("write_cache", &mla::write_cache_cuda);
}

// `from torch_mla import _C` loads this library, which runs the registration above.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
