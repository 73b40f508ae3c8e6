// CPU kernel of label_preacts_cpu.h: one pass over z, vectorized by the compiler, OpenMP over rows.
#include "label_preacts_cpu.h"

#include <omp.h>

#include <algorithm>

namespace ff_kernels {
namespace cpu {

void label_preacts(const float* preact, const float* rows, const int64_t* index, const float* divisor,
                   const float* bias, float* z, int64_t sets, int64_t batch, int64_t width, int num_threads) {
  const int64_t n = sets * batch;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, n)));
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float* __restrict image = preact + (i % batch) * width;
    const float* __restrict label = rows + index[i] * width;
    float* __restrict out = z + i * width;
    if (divisor != nullptr && bias != nullptr) {
      const float d = divisor[i];
#pragma omp simd
      for (int64_t w = 0; w < width; ++w) out[w] = (label[w] + image[w]) / d + bias[w];
    } else if (divisor != nullptr) {
      const float d = divisor[i];
#pragma omp simd
      for (int64_t w = 0; w < width; ++w) out[w] = (label[w] + image[w]) / d;
    } else if (bias != nullptr) {
#pragma omp simd
      for (int64_t w = 0; w < width; ++w) out[w] = (label[w] + image[w]) + bias[w];
    } else {
#pragma omp simd
      for (int64_t w = 0; w < width; ++w) out[w] = label[w] + image[w];
    }
  }
}

}  // namespace cpu
}  // namespace ff_kernels
