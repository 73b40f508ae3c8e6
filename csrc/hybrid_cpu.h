// CPU kernel of the hybrid images of unsupervised FF (python/ff_kernels/paper/data/hybrid.py):
// each image's mask made from its random bits and mixed with its partner, in one pass per image.
// Plain pointers and sizes, fp32, OpenMP; no torch types.
//
//   hybrid_mix: for image b of the batch (B images of H x W pixels, rows of P = H * W):
//     bits[h, w] = bit (j % 32) of words[j / 32], j = b * P + h * W + w      (the mask's random bits)
//     blurred    = rows @ bits @ cols.T                                       rows (H, H), cols (W, W)
//     out[b, p]  = blurred[p] > 0.5 ? images[b, p] : images[partners[b], p]
#pragma once

#include <cstdint>

namespace ff_kernels {
namespace cpu {

void hybrid_mix(const float* images, const int64_t* partners, const int64_t* words, const float* rows,
                const float* cols, float* out, int64_t batch, int64_t height, int64_t width, int num_threads);

}  // namespace cpu
}  // namespace ff_kernels
