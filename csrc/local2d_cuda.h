// CUDA kernels of the locally connected 2-D FF layer: device pointers, sizes and a stream, fp32,
// no torch headers. Same ops and shapes as local2d_cpu.h (defined in local2d_common.h).
#pragma once

#include <cuda_runtime.h>

#include "local2d_common.h"

namespace ff_kernels {
namespace cuda {

// h = epilogue(z): x (B, C_in, H_in, W_in), weight (L, C_out, K), bias (L, C_out) or null,
// epilogue.extra (B, C_out, H_out, W_out) or null -> h (B, C_out, H_out, W_out). Returns the
// launch error, if any.
cudaError_t local2d_forward(const float* x, const float* weight, const float* bias, const ForwardEpilogue& epilogue,
                            float* h, const Local2dShape& shape, cudaStream_t stream);

// The FF local update (see local2d_cpu.h): delta = goodness_delta(kind, coef[b], h), its
// weight and bias gradients applied to ``target``. All pointers on the device.
cudaError_t local2d_update(const float* x, const float* h, const float* coef, Goodness kind,
                           const UpdateTarget& target, const Local2dShape& shape, cudaStream_t stream);

}  // namespace cuda
}  // namespace ff_kernels
