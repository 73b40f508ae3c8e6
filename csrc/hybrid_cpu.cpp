// CPU kernel of hybrid_cpu.h: per image, the bits unpacked, the two blur products as sums of
// matrix rows scaled by a row of coefficients (vector accumulators held in registers; the
// lines padded to a multiple of 16 floats so every load is a whole vector), the threshold and
// the mix. Built once per instruction set (local2d_cpu_vec.h).
#include "hybrid_cpu.h"

#include <algorithm>
#include <vector>

#include "local2d_cpu_vec.h"

namespace ff_kernels {
namespace cpu {
namespace {

constexpr int64_t kPad = 16;     // line length padding: a multiple of every build's vector width
constexpr int kMaxVectors = 4;   // vectors per line and pass: two lines of them, 8 accumulators

template <int Lanes>
struct HybridKernels {
  using Vec = typename VecOf<Lanes>::type;

  // out_r[v] = sum over i < n of coef_r[i] * mat[i * ld + v] for two lines r (coef_r = coef + r * cs,
  // out_r = out + r * ld) and the NV vectors of v from v0: two lines share each load of mat, and
  // 2 * NV independent sums hide the latency of the multiply-adds.
  template <int NV>
  static FF_ALWAYS_INLINE void combine2(const float* coef, int64_t cs, int64_t n, const float* mat, int64_t ld,
                                        int64_t v0, float* out) {
    Vec a[NV] = {}, b[NV] = {};
    for (int64_t i = 0; i < n; ++i) {
      const float c0 = coef[i], c1 = coef[cs + i];
      const float* m = mat + i * ld + v0;
      for (int q = 0; q < NV; ++q) {
        const Vec v = load_vec<Lanes>(m + q * Lanes);
        a[q] += c0 * v;
        b[q] += c1 * v;
      }
    }
    for (int q = 0; q < NV; ++q) {
      store_vec<Lanes>(out + v0 + q * Lanes, a[q]);
      store_vec<Lanes>(out + ld + v0 + q * Lanes, b[q]);
    }
  }

  // combine2 over a whole line of ld floats (a multiple of Lanes).
  static FF_ALWAYS_INLINE void combine_lines(const float* coef, int64_t cs, int64_t n, const float* mat, int64_t ld,
                                             float* out) {
    for (int64_t v0 = 0; v0 < ld; v0 += kMaxVectors * Lanes) {
      switch (std::min<int64_t>(kMaxVectors, (ld - v0) / Lanes)) {
        case 1: combine2<1>(coef, cs, n, mat, ld, v0, out); break;
        case 2: combine2<2>(coef, cs, n, mat, ld, v0, out); break;
        case 3: combine2<3>(coef, cs, n, mat, ld, v0, out); break;
        default: combine2<4>(coef, cs, n, mat, ld, v0, out); break;
      }
    }
  }

  // The images [b0, b1): rows has a zero line H appended (H + 1, H), cols_t is cols transposed
  // (W, ld) with zero padding, tmp holds (H + 1) * (W + 2 * ld) floats.
  static FF_ALWAYS_INLINE void mix_images(const float* images, const int64_t* partners, const int64_t* words,
                                          const float* rows, const float* cols_t, float* out, int64_t b0, int64_t b1,
                                          int64_t H, int64_t W, int64_t ld, float* tmp) {
    const int64_t P = H * W;
    float* bits = tmp;                       // the image's random bits as 0 / 1 (H, W), then a zero line
    float* y = tmp + P + W;                  // bits @ cols.T (H, ld), then a spare line
    float* z = tmp + P + W + (H + 1) * ld;   // rows @ y (H, ld), then a spare line
    std::fill(bits + P, bits + P + W, 0.0f);
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t p = 0; p < P; ++p) {
        const int64_t j = b * P + p;
        bits[p] = static_cast<float>((words[j >> 5] >> (j & 31)) & 1);
      }
      // lines two at a time; an odd H pairs the last line with the zero line H of the padding
      for (int64_t h = 0; h < H; h += 2) combine_lines(bits + h * W, W, W, cols_t, ld, y + h * ld);
      for (int64_t g = 0; g < H; g += 2) combine_lines(rows + g * H, H, H, y, ld, z + g * ld);
      const float* own = images + b * P;
      const float* other = images + partners[b] * P;
      float* o = out + b * P;
      for (int64_t g = 0; g < H; ++g)
        for (int64_t v = 0; v < W; ++v) o[g * W + v] = z[g * ld + v] > 0.5f ? own[g * W + v] : other[g * W + v];
    }
  }
};

using MixImages = void (*)(const float*, const int64_t*, const int64_t*, const float*, const float*, float*, int64_t,
                           int64_t, int64_t, int64_t, int64_t, float*);

#define FF_DEFINE_HYBRID(suffix, target_attr, lanes)                                                             \
  target_attr void mix_images_##suffix(const float* images, const int64_t* partners, const int64_t* words,      \
                                       const float* rows, const float* cols_t, float* out, int64_t b0,         \
                                       int64_t b1, int64_t H, int64_t W, int64_t ld, float* tmp) {             \
    HybridKernels<lanes>::mix_images(images, partners, words, rows, cols_t, out, b0, b1, H, W, ld, tmp);         \
  }

FF_DEFINE_HYBRID(base, , 4)
#ifdef FF_X86_DISPATCH
FF_DEFINE_HYBRID(avx2, FF_TARGET_AVX2, 8)
FF_DEFINE_HYBRID(avx512, FF_TARGET_AVX512, 16)
#endif

}  // namespace

void hybrid_mix(const float* images, const int64_t* partners, const int64_t* words, const float* rows,
                const float* cols, float* out, int64_t batch, int64_t height, int64_t width, int num_threads) {
  static const MixImages mix = FF_PICK_BUILD(mix_images);
  const int64_t ld = (width + kPad - 1) / kPad * kPad;
  std::vector<float> rows_padded(static_cast<size_t>((height + 1) * height), 0.0f);
  std::copy(rows, rows + height * height, rows_padded.begin());
  AlignedVector<float> cols_t(static_cast<size_t>(width * ld), 0.0f);
  for (int64_t v = 0; v < width; ++v)
    for (int64_t w = 0; w < width; ++w) cols_t[w * ld + v] = cols[v * width + w];
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, batch)));
#pragma omp parallel num_threads(threads)
  {
    AlignedVector<float> tmp(static_cast<size_t>((height + 1) * (width + 2 * ld)));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < batch; ++b)
      mix(images, partners, words, rows_padded.data(), cols_t.data(), out, b, b + 1, height, width, ld, tmp.data());
  }
}

}  // namespace cpu
}  // namespace ff_kernels
