// CPU kernels of a softmax head's two GEMMs, which have only a few weight rows (the classes):
// BLAS runs a GEMM with 10 output columns (or rows) at a fraction of its speed, these stream
// the inputs once and keep one vector accumulator per class in registers. Plain pointers and
// sizes, fp32, OpenMP; no torch types.
//
//   head_logits_add: out[b, k] += sum over f of x[b, f] * w[k, f]      x (B, F), w (K, F), out (B, K)
//   head_weight_grad_add: out[k, col(f)] += sum over b of dz[b, k] * x[b, f]
//       dz (B, K), x (B, F), out (K, N) (rows N apart), col(f) = columns[f] (distinct, < N) or f
//   cross_entropy_logit_grad: dz[b, k] = (softmax(z[b])[k] - (k == labels[b])) / B      z, dz (B, K)
#pragma once

#include <cstdint>

namespace ff_kernels {
namespace cpu {

void head_logits_add(const float* x, const float* w, float* out, int64_t batch, int64_t features, int64_t classes,
                     int num_threads);

void head_weight_grad_add(const float* dz, const float* x, const int64_t* columns, float* out, int64_t out_stride,
                          int64_t batch, int64_t features, int64_t classes, int num_threads);

void cross_entropy_logit_grad(const float* z, const int64_t* labels, float* dz, int64_t batch, int64_t classes);

}  // namespace cpu
}  // namespace ff_kernels
