// Row kernels of the locally connected 2-D FF layer on the CPU: the stride-1 case, vectorized
// over adjacent output columns (local2d_cpu_rows.cpp). Same ops and arguments as
// local2d_cpu.h's, which call these when use_row_kernels says so.
#pragma once

#include "local2d_common.h"

namespace ff_kernels {
namespace cpu {

// Whether local2d_forward / local2d_update run the row kernels for this shape: stride 1 and
// output rows that fill at least 3/4 of the vectors that cover them. FF_KERNELS_LOCAL2D_CPU in
// the environment overrides the choice ("rows": whenever the stride is 1, "tiles": never;
// read at every call, for tests and benchmarks of both).
bool use_row_kernels(const Local2dShape& s);

void rows_forward(const float* x, const float* weight, const float* bias, const ForwardEpilogue& epilogue,
                  float* h, const Local2dShape& s, int num_threads);

void rows_update(const float* x, const float* h, const float* coef, Goodness kind, const UpdateTarget& target,
                 const Local2dShape& s, int num_threads);

}  // namespace cpu
}  // namespace ff_kernels
