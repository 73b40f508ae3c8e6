// CPU kernels of head_cpu.h: vectors over the features, up to kClassBlock classes at a time with
// one accumulator each; built once per instruction set (local2d_cpu_vec.h).
#include "head_cpu.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "local2d_cpu_vec.h"

namespace ff_kernels {
namespace cpu {
namespace {

constexpr int kClassBlock = 12;  // accumulators per pass: 12 + two operand vectors fit 16 registers (10 classes: one pass)
constexpr int64_t kChunk = 256;  // features per work item of the weight gradient

template <int Lanes>
struct HeadKernels {
  using Vec = typename VecOf<Lanes>::type;

  // out[k] += x . w[k] for KB classes (w: the block's first row, rows F apart).
  template <int KB>
  static FF_ALWAYS_INLINE void dots(const float* x, const float* w, int64_t F, float* out) {
    Vec acc[KB] = {};
    int64_t f = 0;
    for (; f + Lanes <= F; f += Lanes) {
      const Vec xv = load_vec<Lanes>(x + f);
      for (int k = 0; k < KB; ++k) acc[k] += xv * load_vec<Lanes>(w + k * F + f);
    }
    for (int k = 0; k < KB; ++k) {
      float s = sum_lanes<Lanes>(acc[k]);
      for (int64_t t = f; t < F; ++t) s += x[t] * w[k * F + t];
      out[k] += s;
    }
  }

  // out[k, f] += sum over b of dz[b, k] * x[b, f] for f in [f0, f1) and KB classes (out's rows ld apart).
  template <int KB>
  static FF_ALWAYS_INLINE void outer(const float* dz, int64_t K, const float* x, int64_t B, int64_t F, int64_t f0,
                                     int64_t f1, float* out, int64_t ld) {
    int64_t f = f0;
    for (; f + Lanes <= f1; f += Lanes) {
      Vec acc[KB] = {};
      for (int64_t b = 0; b < B; ++b) {
        const Vec xv = load_vec<Lanes>(x + b * F + f);
        for (int k = 0; k < KB; ++k) acc[k] += dz[b * K + k] * xv;
      }
      for (int k = 0; k < KB; ++k) store_vec<Lanes>(out + k * ld + f, load_vec<Lanes>(out + k * ld + f) + acc[k]);
    }
    for (; f < f1; ++f)
      for (int k = 0; k < KB; ++k) {
        float s = 0.0f;
        for (int64_t b = 0; b < B; ++b) s += dz[b * K + k] * x[b * F + f];
        out[k * ld + f] += s;
      }
  }

  static FF_ALWAYS_INLINE void logits_rows(const float* x, const float* w, float* out, int64_t b0, int64_t b1, int64_t F, int64_t K) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t k0 = 0; k0 < K; k0 += kClassBlock) {
        const float* xb = x + b * F;
        const float* wk = w + k0 * F;
        float* o = out + b * K + k0;
        switch (std::min<int64_t>(kClassBlock, K - k0)) {
          case 1: dots<1>(xb, wk, F, o); break;
          case 2: dots<2>(xb, wk, F, o); break;
          case 3: dots<3>(xb, wk, F, o); break;
          case 4: dots<4>(xb, wk, F, o); break;
          case 5: dots<5>(xb, wk, F, o); break;
          case 6: dots<6>(xb, wk, F, o); break;
          case 7: dots<7>(xb, wk, F, o); break;
          case 8: dots<8>(xb, wk, F, o); break;
          case 9: dots<9>(xb, wk, F, o); break;
          case 10: dots<10>(xb, wk, F, o); break;
          case 11: dots<11>(xb, wk, F, o); break;
          default: dots<12>(xb, wk, F, o); break;
        }
      }
  }

  static FF_ALWAYS_INLINE void grad_chunk(const float* dz, const float* x, float* out, int64_t ld,
                                          int64_t B, int64_t F, int64_t K, int64_t f0, int64_t f1) {
    for (int64_t k0 = 0; k0 < K; k0 += kClassBlock) {
      const float* d = dz + k0;
      float* o = out + k0 * ld;
      switch (std::min<int64_t>(kClassBlock, K - k0)) {
        case 1: outer<1>(d, K, x, B, F, f0, f1, o, ld); break;
        case 2: outer<2>(d, K, x, B, F, f0, f1, o, ld); break;
        case 3: outer<3>(d, K, x, B, F, f0, f1, o, ld); break;
        case 4: outer<4>(d, K, x, B, F, f0, f1, o, ld); break;
        case 5: outer<5>(d, K, x, B, F, f0, f1, o, ld); break;
        case 6: outer<6>(d, K, x, B, F, f0, f1, o, ld); break;
        case 7: outer<7>(d, K, x, B, F, f0, f1, o, ld); break;
        case 8: outer<8>(d, K, x, B, F, f0, f1, o, ld); break;
        case 9: outer<9>(d, K, x, B, F, f0, f1, o, ld); break;
        case 10: outer<10>(d, K, x, B, F, f0, f1, o, ld); break;
        case 11: outer<11>(d, K, x, B, F, f0, f1, o, ld); break;
        default: outer<12>(d, K, x, B, F, f0, f1, o, ld); break;
      }
    }
  }
};

using LogitsRows = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t);
using GradChunk = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);

#define FF_DEFINE_HEAD(suffix, target_attr, lanes)                                                                \
  target_attr void logits_rows_##suffix(const float* x, const float* w, float* out, int64_t b0, int64_t b1,       \
                                        int64_t F, int64_t K) {                                                   \
    HeadKernels<lanes>::logits_rows(x, w, out, b0, b1, F, K);                                                     \
  }                                                                                                               \
  target_attr void grad_chunk_##suffix(const float* dz, const float* x, float* out, int64_t ld, int64_t B,      \
                                       int64_t F, int64_t K, int64_t f0, int64_t f1) {                           \
    HeadKernels<lanes>::grad_chunk(dz, x, out, ld, B, F, K, f0, f1);                                              \
  }

FF_DEFINE_HEAD(base, , 4)
#ifdef FF_X86_DISPATCH
FF_DEFINE_HEAD(avx2, FF_TARGET_AVX2, 8)
FF_DEFINE_HEAD(avx512, FF_TARGET_AVX512, 16)
#endif

}  // namespace

void head_logits_add(const float* x, const float* w, float* out, int64_t batch, int64_t features, int64_t classes,
                     int num_threads) {
  static const LogitsRows rows = FF_PICK_BUILD(logits_rows);
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, batch)));
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), n = omp_get_num_threads();
    rows(x, w, out, batch * t / n, batch * (t + 1) / n, features, classes);
  }
}

void head_weight_grad_add(const float* dz, const float* x, const int64_t* columns, float* out, int64_t out_stride,
                          int64_t batch, int64_t features, int64_t classes, int num_threads) {
  static const GradChunk chunk = FF_PICK_BUILD(grad_chunk);
  const int64_t chunks = (features + kChunk - 1) / kChunk;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, chunks)));
  // With columns the gradient goes to a dense (K, F) buffer first and is then added by class
  // rows: scattered adds straight from the chunks would have threads writing the same cache
  // lines (a channels-last block's neighbouring features are columns H * W apart).
  std::vector<float> dense;
  float* target = out;
  int64_t ld = out_stride;
  if (columns != nullptr) {
    dense.assign(static_cast<size_t>(classes * features), 0.0f);
    target = dense.data();
    ld = features;
  }
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c)
      chunk(dz, x, target, ld, batch, features, classes, c * kChunk, std::min(features, (c + 1) * kChunk));
    if (columns != nullptr) {
#pragma omp for schedule(static)
      for (int64_t k = 0; k < classes; ++k) {
        const float* d = target + k * features;
        float* o = out + k * out_stride;
        for (int64_t f = 0; f < features; ++f) o[columns[f]] += d[f];
      }
    }
  }
}

void cross_entropy_logit_grad(const float* z, const int64_t* labels, float* dz, int64_t batch, int64_t classes) {
  const float inv_batch = 1.0f / static_cast<float>(batch);
  for (int64_t b = 0; b < batch; ++b) {
    const float* zb = z + b * classes;
    float* d = dz + b * classes;
    const float top = *std::max_element(zb, zb + classes);
    double total = 0.0;
    for (int64_t k = 0; k < classes; ++k) {
      d[k] = std::exp(zb[k] - top);
      total += d[k];
    }
    const float scale = static_cast<float>(1.0 / total);
    for (int64_t k = 0; k < classes; ++k) d[k] = (d[k] * scale - (k == labels[b] ? 1.0f : 0.0f)) * inv_batch;
  }
}

}  // namespace cpu
}  // namespace ff_kernels
