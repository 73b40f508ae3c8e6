// CPU kernel of the SGD step (torch.optim.SGD, dampening 0, not Nesterov) that follows a
// weight-gradient GEMM which has already written buf = momentum * buf + grad (the GEMM's beta):
// the weight decay and the parameter update in one pass over param and buf,
//
//   buf[i]   = buf[i] + weight_decay * param[i]
//   param[i] = param[i] - lr * buf[i]
//
// that is torch's buf = momentum * buf + (grad + weight_decay * param); param -= lr * buf with
// the momentum term and the gradient added first (a different rounding order than torch's, so
// equal up to float32 rounding). Three streams of memory less per step than the gradient in a
// buffer of its own followed by torch's fused SGD pass over param, grad and buf. fp32, OpenMP
// over chunks; no torch types.

#pragma once

#include <cstdint>

namespace ff_kernels {
namespace cpu {

void sgd_decay_apply(float* param, float* buf, int64_t n, float lr, float weight_decay, int num_threads);

}  // namespace cpu
}  // namespace ff_kernels
