// CPU kernel of gather_cpu.h.
#include "gather_cpu.h"

#include <algorithm>

namespace ff_kernels {
namespace cpu {

void gather_columns(const float* rows, int64_t batch, int64_t columns, const int64_t* index, int64_t m, float* out,
                    int num_threads) {
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, batch)));
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t b = 0; b < batch; ++b) {
    const float* row = rows + b * columns;
    float* dst = out + b * m;
    for (int64_t j = 0; j < m; ++j) {
      const int64_t i = index[j];
      dst[j] = i < columns ? row[i] : 0.0f;
    }
  }
}

}  // namespace cpu
}  // namespace ff_kernels
