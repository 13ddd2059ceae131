// The op contract's rules, as the CUDA impls test them: bare predicates that hold exactly when
// torch_mla/ops.py's check_*_args pass (no strings, no Python: a few ns a call), and the call
// into ops.py that, when one fails, raises ops.py's own message. The rules' wording lives in
// ops.py only; tests/test_cuda_validation.py checks that each predicate and its rule agree.
#pragma once

#include <torch/extension.h>  // pybind11, with the at::Tensor and std::optional casters

#include <c10/core/GradMode.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <optional>
#include <string>
#include <utility>

#include "params.h"

namespace mla {

namespace py = pybind11;

// ---------------------------------------------------------------- calls into ops.py

// Calls torch_mla.ops.<fn>(args...). Returns if it returns; a ValueError it raises (a broken
// rule) becomes the same ValueError of this op, anything else a RuntimeError with its text.
template <typename... Args>
inline void call_ops(const char* fn, Args&&... args) {
  std::string message;
  bool value_error = false;
  {
    py::gil_scoped_acquire gil;
    try {
      py::module_::import("torch_mla.ops").attr(fn)(std::forward<Args>(args)...);
      return;
    } catch (py::error_already_set& e) {
      value_error = e.matches(PyExc_ValueError);
      message = value_error ? std::string(py::str(e.value())) : std::string(e.what());
    }
  }
  TORCH_CHECK_VALUE(!value_error, message);
  TORCH_CHECK(false, message);
}

// A predicate of `op` failed: ops.py's `check_fn` on the same arguments raises the message.
template <typename... Args>
[[noreturn]] inline void contract_error(const char* op, const char* check_fn, Args&&... args) {
  call_ops(check_fn, std::forward<Args>(args)...);
  TORCH_CHECK(false, "mla.", op, ": internal error: a precondition of the CUDA impl failed, but ops.", check_fn,
              " accepted the arguments");
  std::abort();
}

// ---------------------------------------------------------------- the rules of ops.py, as predicates

inline bool unit_last_stride(const at::Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1; }
inline bool float_dtype(at::ScalarType s) { return s == at::kBFloat16 || s == at::kHalf || s == at::kFloat; }
inline bool fp8_dtype(at::ScalarType s) { return s == at::ScalarType::Float8_e4m3fn; }
// ops._check_scale_pairing: an e4m3 tensor comes with its scale (float32, one element, shape [1]
// or []), any other dtype with none.
inline bool scale_ok(const at::Tensor& data, const std::optional<at::Tensor>& scale) {
  if (fp8_dtype(data.scalar_type()) != scale.has_value()) return false;
  return !scale || (scale->dim() <= 1 && scale->numel() == 1 && scale->scalar_type() == at::kFloat);
}
inline bool no_grad(std::initializer_list<const at::Tensor*> tensors) {
  if (!c10::GradMode::is_enabled()) return true;
  for (const at::Tensor* t : tensors)
    if (t->requires_grad()) return false;
  return true;
}

// True exactly when ops.check_decode_args passes.
inline bool decode_args_ok(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_table,
                    const at::Tensor& cache_seqlens, int64_t head_dim_v, std::optional<double> softmax_scale,
                    const std::optional<at::Tensor>& metadata, const std::optional<at::Tensor>& num_splits,
                    const std::optional<at::Tensor>& descale_q, const std::optional<at::Tensor>& descale_k) {
  const at::Device device = q.device();
  if (kv_cache.device() != device || block_table.device() != device || cache_seqlens.device() != device ||
      (metadata && metadata->device() != device) || (num_splits && num_splits->device() != device) ||
      (descale_q && descale_q->device() != device) || (descale_k && descale_k->device() != device))
    return false;
  if (q.dim() != 4 || kv_cache.dim() != 4 || block_table.dim() != 2 || cache_seqlens.dim() != 1) return false;
  // q: a float dtype or e4m3; kv_cache: q's dtype or e4m3 (so an e4m3 q reads an e4m3 cache).
  const auto q_dtype = q.scalar_type(), kv_dtype = kv_cache.scalar_type();
  if (!(float_dtype(q_dtype) || fp8_dtype(q_dtype)) || !(kv_dtype == q_dtype || fp8_dtype(kv_dtype)) ||
      block_table.scalar_type() != at::kInt || cache_seqlens.scalar_type() != at::kInt)
    return false;
  if (!scale_ok(q, descale_q) || !scale_ok(kv_cache, descale_k)) return false;
  if (q.size(3) != kHeadDim || kv_cache.size(3) != kHeadDim || kv_cache.size(2) != 1 || head_dim_v != kHeadDimV)
    return false;
  if (q.size(1) < 1 || q.size(2) < 1 || kv_cache.size(1) < 1) return false;
  const int64_t batch = q.size(0);
  if (block_table.size(0) != batch || cache_seqlens.size(0) != batch) return false;
  if (!unit_last_stride(q) || !unit_last_stride(kv_cache) || !unit_last_stride(block_table) ||
      !cache_seqlens.is_contiguous())
    return false;
  if (softmax_scale && !(*softmax_scale > 0 && std::isfinite(*softmax_scale))) return false;
  if (metadata.has_value() != num_splits.has_value()) return false;
  if (metadata) {
    if (metadata->dim() != 2 || metadata->scalar_type() != at::kInt || metadata->size(1) != kMetadataSize) return false;
    if (num_splits->dim() != 1 || num_splits->scalar_type() != at::kInt || num_splits->size(0) != batch + 1) return false;
    if (!metadata->is_contiguous() || !num_splits->is_contiguous()) return false;
  }
  if (!no_grad({&q, &kv_cache})) return false;
  return (!descale_q || no_grad({&*descale_q})) && (!descale_k || no_grad({&*descale_k}));
}

// True exactly when ops.check_get_metadata_args passes.
inline bool get_metadata_args_ok(const at::Tensor& cache_seqlens, int64_t num_q_tokens_per_head_k, int64_t num_heads_k) {
  return cache_seqlens.dim() == 1 && cache_seqlens.scalar_type() == at::kInt && cache_seqlens.is_contiguous() &&
         num_q_tokens_per_head_k >= 1 && num_heads_k == 1;
}

// True exactly when ops.check_write_cache_args passes.
inline bool write_cache_args_ok(const at::Tensor& kv_c, const at::Tensor& k_pe, const at::Tensor& kv_cache,
                         const at::Tensor& slot_mapping, const std::optional<at::Tensor>& scale) {
  const at::Device device = kv_cache.device();
  if (kv_c.device() != device || k_pe.device() != device || slot_mapping.device() != device ||
      (scale && scale->device() != device))
    return false;
  if (kv_c.dim() != 2 || k_pe.dim() != 2 || kv_cache.dim() != 4 || slot_mapping.dim() != 1) return false;
  // A float cache takes rows of its dtype; an e4m3 cache rows of any float dtype (quantized on write).
  const auto dtype = kv_cache.scalar_type();
  const bool fp8 = fp8_dtype(dtype);
  if (!(float_dtype(dtype) || fp8) || !(fp8 ? float_dtype(kv_c.scalar_type()) : kv_c.scalar_type() == dtype) ||
      k_pe.scalar_type() != kv_c.scalar_type() ||
      (slot_mapping.scalar_type() != at::kInt && slot_mapping.scalar_type() != at::kLong))
    return false;
  if (!scale_ok(kv_cache, scale)) return false;
  if (kv_c.size(1) != kHeadDimV || k_pe.size(1) != kHeadDim - kHeadDimV || kv_cache.size(3) != kHeadDim ||
      kv_cache.size(2) != 1 || k_pe.size(0) != kv_c.size(0) || slot_mapping.size(0) != kv_c.size(0))
    return false;
  if (!unit_last_stride(kv_c) || !unit_last_stride(k_pe) || !unit_last_stride(kv_cache) || !slot_mapping.is_contiguous())
    return false;
  return no_grad({&kv_c, &k_pe, &kv_cache}) && (!scale || no_grad({&*scale}));
}

}  // namespace mla
