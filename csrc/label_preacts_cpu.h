// CPU kernel of the supervised recipe's shared first layer (recipes/supervised_mnist.py): the
// pre-activations of R label sets over B images from the images' shared part, in one pass,
//
//   z[r, b, w] = (rows[index[r, b], w] + preact[b, w]) / divisor[r, b] + bias[w]
//
// preact (B, W): the image pixels' part of layer 1's pre-activations; rows (K, W): the label
// parts (a one-hot label's row of the weight's label columns, or a code's product with them);
// index (R, B) in [0, K); divisor (R, B) each row's input scale (or none: no division); bias (W)
// or none. The same float32 operations in the same order as the torch ops it replaces (an add,
// a division, an add), so the same bits. fp32, OpenMP over rows; no torch types.

#pragma once

#include <cstdint>

namespace ff_kernels {
namespace cpu {

void label_preacts(const float* preact, const float* rows, const int64_t* index, const float* divisor,
                   const float* bias, float* z, int64_t sets, int64_t batch, int64_t width, int num_threads);

}  // namespace cpu
}  // namespace ff_kernels
