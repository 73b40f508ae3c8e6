// Argument checks shared by the torch operator bindings (bindings.cpp, bindings_recipe_ops.cpp):
// each names the op, the argument, what it expected and what came.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace ff_kernels {
namespace checks {

// A float32 tensor of ``shape`` on x's device, contiguous.
inline void check_tensor(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape,
                         const at::Tensor& x) {
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on ", x.device(), " (x's device), got ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (shape ", t.sizes(), ", strides ", t.strides(),
              ")");
}

// Rows (B, N): a 2-D contiguous float32 CPU tensor.
inline void check_rows(const char* op, const at::Tensor& rows) {
  TORCH_CHECK(rows.dim() == 2, op, ": rows must be 2-D (B, N), got shape ", rows.sizes());
  TORCH_CHECK(rows.is_cpu(), op, ": rows must be on the CPU, got ", rows.device());
  check_tensor(op, "rows", rows, rows.sizes(), rows);
}

// An int64 CPU tensor of ``dims`` dimensions, contiguous.
inline void check_index_tensor(const char* op, const char* name, const at::Tensor& t, int64_t dims) {
  TORCH_CHECK(t.dim() == dims && t.scalar_type() == at::kLong && t.is_contiguous() && t.is_cpu(), op, ": ", name,
              " must be a contiguous ", dims, "-D int64 CPU tensor, got shape ", t.sizes(), ", ", t.scalar_type(),
              " on ", t.device());
}

// check_index_tensor, and every entry in [lo, hi].
inline void check_index(const char* op, const char* name, const at::Tensor& t, int64_t dims, int64_t lo, int64_t hi) {
  check_index_tensor(op, name, t, dims);
  const int64_t* p = t.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < t.numel(); ++i)
    TORCH_CHECK(p[i] >= lo && p[i] <= hi, op, ": ", name, " entries must lie in [", lo, ", ", hi, "], got ", p[i],
                " at ", i);
}

}  // namespace checks
}  // namespace ff_kernels
