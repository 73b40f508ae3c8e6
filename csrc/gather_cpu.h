// CPU kernels gathering columns of row-major rows into row-major outputs: a locally connected
// layer's windows, every location's window of every image in one pass. Plain pointers and
// sizes, fp32, OpenMP over rows; no torch types. A source column of -1 (or, for
// gather_columns, one past the end) reads zero.
//
//   gather_columns:     out[b, j] = rows[b, index[j]]                         any index
//   gather_runs:        out[b, dst + t] = rows[b, src + t], t < n             runs (dst, src, n)
//   gather_interleaved: out[b, l * g * n + t * g + q] = rows[b, starts[l, q] + t], t < n, q < g
//                       (a channels-last window in channel-major order: g window positions,
//                       n channels each read contiguously)
#pragma once

#include <cstdint>

namespace ff_kernels {
namespace cpu {

void gather_columns(const float* rows, int64_t batch, int64_t columns, const int64_t* index, int64_t m, float* out,
                    int num_threads);

void gather_runs(const float* rows, int64_t batch, int64_t columns, const int64_t* runs, int64_t num_runs, float* out,
                 int64_t m, int num_threads);

void gather_interleaved(const float* rows, int64_t batch, int64_t columns, const int64_t* starts, int64_t locations,
                        int64_t g, int64_t n, float* out, int num_threads);

}  // namespace cpu
}  // namespace ff_kernels
