// CPU kernel of sgd_cpu.h: a memory-bound loop, vectorized by the compiler, OpenMP over chunks.
#include "sgd_cpu.h"

#include <omp.h>

#include <algorithm>

namespace ff_kernels {
namespace cpu {

void sgd_decay_apply(float* param, float* buf, int64_t n, float lr, float weight_decay, int num_threads) {
  constexpr int64_t kChunk = 1 << 14;  // 64 KB of each array per chunk: a few hundred chunks a weight matrix
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, chunks)));
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t k = 0; k < chunks; ++k) {
    float* __restrict p = param + k * kChunk;
    float* __restrict b = buf + k * kChunk;
    const int64_t len = std::min(kChunk, n - k * kChunk);
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const float v = b[i] + weight_decay * p[i];
      b[i] = v;
      p[i] = p[i] - lr * v;
    }
  }
}

}  // namespace cpu
}  // namespace ff_kernels
