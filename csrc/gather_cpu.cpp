// CPU kernels of gather_cpu.h.
#include "gather_cpu.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace ff_kernels {
namespace cpu {
namespace {

int threads_for(int num_threads, int64_t batch) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, batch)));
}

// out[t * G + q] = src[q][t] for t < n, q < G: G contiguous streams interleaved (G fixed, so
// the compiler turns the loop into vector loads, shuffles and stores).
template <int G>
inline void interleave(const float* const* src, int64_t n, float* out) {
  const float* s[G];
  for (int q = 0; q < G; ++q) s[q] = src[q];
  for (int64_t t = 0; t < n; ++t)
    for (int q = 0; q < G; ++q) out[t * G + q] = s[q][t];
}

inline void interleave_any(const float* const* src, int64_t g, int64_t n, float* out) {
  for (int64_t t = 0; t < n; ++t)
    for (int64_t q = 0; q < g; ++q) out[t * g + q] = src[q][t];
}

}  // namespace

void gather_columns(const float* rows, int64_t batch, int64_t columns, const int64_t* index, int64_t m, float* out,
                    int num_threads) {
#pragma omp parallel for num_threads(threads_for(num_threads, batch)) schedule(static)
  for (int64_t b = 0; b < batch; ++b) {
    const float* row = rows + b * columns;
    float* dst = out + b * m;
    for (int64_t j = 0; j < m; ++j) {
      const int64_t i = index[j];
      dst[j] = i < columns ? row[i] : 0.0f;
    }
  }
}

void gather_runs(const float* rows, int64_t batch, int64_t columns, const int64_t* runs, int64_t num_runs, float* out,
                 int64_t m, int num_threads) {
#pragma omp parallel for num_threads(threads_for(num_threads, batch)) schedule(static)
  for (int64_t b = 0; b < batch; ++b) {
    const float* row = rows + b * columns;
    float* dst = out + b * m;
    for (int64_t r = 0; r < num_runs; ++r) {
      const int64_t d = runs[3 * r], s = runs[3 * r + 1], n = runs[3 * r + 2];
      if (s < 0)
        std::fill(dst + d, dst + d + n, 0.0f);
      else
        std::memcpy(dst + d, row + s, static_cast<size_t>(n) * sizeof(float));
    }
  }
}

void gather_interleaved(const float* rows, int64_t batch, int64_t columns, const int64_t* starts, int64_t locations,
                        int64_t g, int64_t n, float* out, int num_threads) {
  const int64_t block = g * n, m = locations * block;
#pragma omp parallel num_threads(threads_for(num_threads, batch))
  {
    std::vector<const float*> src(static_cast<size_t>(g));
    const std::vector<float> zeros(static_cast<size_t>(n), 0.0f);  // the stream of a position outside the map
#pragma omp for schedule(static)
    for (int64_t b = 0; b < batch; ++b) {
      const float* row = rows + b * columns;
      for (int64_t l = 0; l < locations; ++l) {
        for (int64_t q = 0; q < g; ++q) {
          const int64_t s = starts[l * g + q];
          src[q] = s < 0 ? zeros.data() : row + s;
        }
        float* dst = out + b * m + l * block;
        if (g == 4)
          interleave<4>(src.data(), n, dst);
        else if (g == 1)
          interleave<1>(src.data(), n, dst);
        else
          interleave_any(src.data(), g, n, dst);
      }
    }
  }
}

}  // namespace cpu
}  // namespace ff_kernels
