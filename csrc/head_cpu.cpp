// CPU kernels of head_cpu.h: vectors over the features, up to kClassBlock classes at a time with
// one accumulator each; built once per instruction set (local2d_cpu_vec.h).
#include "head_cpu.h"

#include <omp.h>

#include <algorithm>

#include "local2d_cpu_vec.h"

namespace ff_kernels {
namespace cpu {
namespace {

constexpr int kClassBlock = 8;   // accumulators per pass: 8 + the input vector fit 16 AVX2 registers
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

  // out[k, f0 .. f1) = sum over b of dz[b, k] * x[b, f0 .. f1) for KB classes.
  template <int KB>
  static FF_ALWAYS_INLINE void outer(const float* dz, int64_t K, const float* x, int64_t B, int64_t F, int64_t f0,
                                     int64_t f1, float* out) {
    int64_t f = f0;
    for (; f + Lanes <= f1; f += Lanes) {
      Vec acc[KB] = {};
      for (int64_t b = 0; b < B; ++b) {
        const Vec xv = load_vec<Lanes>(x + b * F + f);
        for (int k = 0; k < KB; ++k) acc[k] += dz[b * K + k] * xv;
      }
      for (int k = 0; k < KB; ++k) store_vec<Lanes>(out + k * F + f, acc[k]);
    }
    for (; f < f1; ++f)
      for (int k = 0; k < KB; ++k) {
        float s = 0.0f;
        for (int64_t b = 0; b < B; ++b) s += dz[b * K + k] * x[b * F + f];
        out[k * F + f] = s;
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
          default: dots<8>(xb, wk, F, o); break;
        }
      }
  }

  static FF_ALWAYS_INLINE void grad_chunk(const float* dz, const float* x, float* out, int64_t B, int64_t F, int64_t K, int64_t f0,
                         int64_t f1) {
    for (int64_t k0 = 0; k0 < K; k0 += kClassBlock) {
      const float* d = dz + k0;
      float* o = out + k0 * F;
      switch (std::min<int64_t>(kClassBlock, K - k0)) {
        case 1: outer<1>(d, K, x, B, F, f0, f1, o); break;
        case 2: outer<2>(d, K, x, B, F, f0, f1, o); break;
        case 3: outer<3>(d, K, x, B, F, f0, f1, o); break;
        case 4: outer<4>(d, K, x, B, F, f0, f1, o); break;
        case 5: outer<5>(d, K, x, B, F, f0, f1, o); break;
        case 6: outer<6>(d, K, x, B, F, f0, f1, o); break;
        case 7: outer<7>(d, K, x, B, F, f0, f1, o); break;
        default: outer<8>(d, K, x, B, F, f0, f1, o); break;
      }
    }
  }
};

using LogitsRows = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t);
using GradChunk = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t, int64_t);

#define FF_DEFINE_HEAD(suffix, target_attr, lanes)                                                                \
  target_attr void logits_rows_##suffix(const float* x, const float* w, float* out, int64_t b0, int64_t b1,       \
                                        int64_t F, int64_t K) {                                                   \
    HeadKernels<lanes>::logits_rows(x, w, out, b0, b1, F, K);                                                     \
  }                                                                                                               \
  target_attr void grad_chunk_##suffix(const float* dz, const float* x, float* out, int64_t B, int64_t F,        \
                                       int64_t K, int64_t f0, int64_t f1) {                                       \
    HeadKernels<lanes>::grad_chunk(dz, x, out, B, F, K, f0, f1);                                                  \
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

void head_weight_grad(const float* dz, const float* x, float* out, int64_t batch, int64_t features, int64_t classes,
                      int num_threads) {
  static const GradChunk chunk = FF_PICK_BUILD(grad_chunk);
  const int64_t chunks = (features + kChunk - 1) / kChunk;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, chunks)));
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t c = 0; c < chunks; ++c)
    chunk(dz, x, out, batch, features, classes, c * kChunk, std::min(features, (c + 1) * kChunk));
}

}  // namespace cpu
}  // namespace ff_kernels
