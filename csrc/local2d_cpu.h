// CPU kernels of the locally connected 2-D FF layer: plain pointers and sizes, fp32, OpenMP.
// Shapes and the op are defined in local2d_common.h. All tensors are dense and row-major.
// Two algorithms: the kernels of local2d_cpu.cpp, vectorized over images, for any stride, and
// the row kernels of local2d_cpu_rows.h, vectorized over output columns, which these functions
// call for stride-1 layers with wide output rows (use_row_kernels).
#pragma once

#include "local2d_common.h"

namespace ff_kernels {
namespace cpu {

// h = epilogue(z) (relu(z + extra) by default): x (B, C_in, H_in, W_in), weight (L, C_out, K),
// bias (L, C_out) or null -> h (B, C_out, H_out, W_out), every element written.
void local2d_forward(const float* x, const float* weight, const float* bias, const ForwardEpilogue& epilogue,
                     float* h, const Local2dShape& shape, int num_threads);

// The FF local update of one layer from its input x (B, C_in, H_in, W_in), its activities
// h (B, C_out, H_out, W_out) and the per-image coefficient coef (B,) = dL/dG:
//   delta[b, o, l] = goodness_delta(kind, coef[b], h[b, o, l])          (= dL/dz)
//   dW[l, o, (c, di, dj)] = sum_b delta[b, o, l] * x[b, c, i*s-p+di, j*s-p+dj]   (valid entries)
//   db[l, o] = sum_b delta[b, o, l]
// applied to ``target`` (gradient accumulation or an SGD step). Entries of a weight block
// that fall outside the input map are not touched.
void local2d_update(const float* x, const float* h, const float* coef, Goodness kind,
                    const UpdateTarget& target, const Local2dShape& shape, int num_threads);

}  // namespace cpu
}  // namespace ff_kernels
