// CPU kernel gathering columns of row-major rows, with one index past the end that reads zero:
// a locally connected layer's windows, every location's window of every image in one pass.
// Plain pointers and sizes, fp32, OpenMP over rows; no torch types.
//
//   out[b, j] = index[j] < columns ? rows[b, index[j]] : 0      rows (B, columns), out (B, M)
#pragma once

#include <cstdint>

namespace ff_kernels {
namespace cpu {

void gather_columns(const float* rows, int64_t batch, int64_t columns, const int64_t* index, int64_t m, float* out,
                    int num_threads);

}  // namespace cpu
}  // namespace ff_kernels
