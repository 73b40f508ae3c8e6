// CPU kernels of an FF layer's step around its GEMMs: the passes over the activities between
// the forward GEMM and the weight-gradient GEMM, fused into two. Plain pointers and sizes, fp32,
// OpenMP; no torch types.
//
// The activities are location-major, h (L, B, C): L groups of C units (the locations of a
// locally connected layer; L = 1 for a dense layer), B rows. Row b's units are h[:, b, :], and
// its output row is out[b, l * C + c] (the (L, C) order, row-major (B, L * C)).
//
//   relu_goodness:    h = relu(source + bias[l])                  (no bias: relu(source); no source:
//                                                                  source = h, in place)
//                     g[b] = sum over l, c of h^2 (kSquared) or h (kSum)
//                     col_sum[l, c] = sum over b < n_sum of h      (when col_sum is given)
//   output_and_delta: out[b, l * C + c] = h * scale[b]             (the normalized output)
//                     h = coef[b] * dG/dz + (b < n_extra ? extra[l, c] : 0)   in place, when coef is given
//                         (dG/dz = 2h for kSquared, 1[h > 0] for kSum: h is already relu'd)
//                     bias_sum[l, c] = sum over b of the new h     (when bias_sum is given)
//
//   loss_and_coef:    the FF loss of the goodness g (B,), rows 0 .. n_pos - 1 positive, and dL/dg:
//                     t[b] = (g[b] - threshold) * a[b], a = -k on positive rows and k on negative
//                     ones (k = sign / temperature), w[b] = 1 / n_pos or 1 / n_neg;
//                     loss = sum of softplus(t) * w, coef[b] = sigmoid(t) * a * w
//                     (functional.ff_loss_and_goodness_grad, in one loop)
//
//   inverse_scale:    inv[b] = 1 / (d(g[b]) + eps), d = sqrt(g) (kSquared) or g (kSum), divided by
//                     norm_divisor (sqrt(N) or N with rms, else 1): functional.normalization_scale's
//                     reciprocal, the same float32 operations in the same order (torch's vectorized
//                     sqrt may differ from this correctly rounded one by an ulp)
//
//   peer_update:      peer normalization's running mean and derivative (nn/peer_norm.py) from the
//                     positive rows' column sums col_sum (L, C) of n_pos rows, N = L * C units
//                     stored in r as (C, L) when channels_major, else (L, C):
//                     r = lerp(r, col_sum / n_pos, 1 - momentum) (torch.lerp's formula),
//                     p = strength * (r - mean(r)) (N,) in r's order, extra[l, c] = p of (l, c) / n_pos
//
// Rows are split into blocks of 8 among threads; each block's column sums go to its own partial
// row, added up at the end in block order, so results depend neither on timing nor on the
// number of threads.

#pragma once

#include <cstdint>

#include "local2d_common.h"

namespace ff_kernels {
namespace cpu {

struct EpilogueShape {
  int64_t locations, batch, channels;  // L, B, C
};

void relu_goodness(float* h, const float* source, const float* bias, Goodness kind, float* g, float* col_sum,
                   int64_t n_sum, const EpilogueShape& shape, int num_threads);

float loss_and_coef(const float* g, int64_t batch, int64_t n_pos, float signed_inverse_temperature, float threshold,
                    float* coef);

void output_and_delta(float* h, const float* scale, float* out, const float* coef, Goodness kind,
                      const float* extra, int64_t n_extra, float* bias_sum, const EpilogueShape& shape,
                      int num_threads);

void inverse_scale(const float* g, int64_t batch, Goodness kind, float norm_divisor, float eps, float* inv);

void peer_update(float* running_mean, const float* col_sum, int64_t locations, int64_t channels, int64_t n_pos,
                 float momentum, float strength, bool channels_major, float* p, float* extra);

}  // namespace cpu
}  // namespace ff_kernels
