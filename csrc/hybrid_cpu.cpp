// CPU kernel of hybrid_cpu.h: per image, the two blur products, the threshold and the mix. The
// first product is a sum of the rows of cols.T that a line's bits select: tables of those sums
// for every pattern of kGroup bits (built once per call) turn it into a few vector adds per
// line. The second is a sum of y's lines weighted by a row of ``rows`` (vector accumulators in
// registers, two output lines per pass). Lines are padded to a multiple of 16 floats so every
// load is a whole vector. Built once per instruction set (local2d_cpu_vec.h).
#include "hybrid_cpu.h"

#include <algorithm>
#include <vector>

#include "local2d_cpu_vec.h"

namespace ff_kernels {
namespace cpu {
namespace {

constexpr int64_t kPad = 16;     // line length padding: a multiple of every build's vector width
constexpr int kMaxVectors = 4;   // vectors per line and pass: two lines of them, 8 accumulators
constexpr int kGroup = 8;        // bits per table lookup: 256 patterns per group

// Bits j .. j + n - 1 (n <= kGroup) of the packed words (32 bits per entry, nwords entries).
inline uint32_t bits_at(const int64_t* words, int64_t nwords, int64_t j, int n) {
  const int64_t i = j >> 5;
  const int off = static_cast<int>(j & 31);
  uint64_t v = static_cast<uint64_t>(words[i]) >> off;
  if (off + n > 32 && i + 1 < nwords) v |= static_cast<uint64_t>(words[i + 1]) << (32 - off);
  return static_cast<uint32_t>(v) & ((1u << n) - 1u);
}

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

  // out[0 .. ld) = sum over q < nq of tables[q][pattern of the line's q-th group of bits]
  // (tables: nq groups of 2^kGroup patterns of ld floats).
  static FF_ALWAYS_INLINE void select_sum(const int64_t* words, int64_t nwords, int64_t j0, int64_t W,
                                          const float* tables, int64_t ld, float* out) {
    const int64_t table_size = (int64_t{1} << kGroup) * ld;
    for (int64_t v0 = 0; v0 < ld; v0 += Lanes) {
      Vec acc = {};
      for (int64_t q = 0; q * kGroup < W; ++q) {
        const int n = static_cast<int>(std::min<int64_t>(kGroup, W - q * kGroup));
        const uint32_t pattern = bits_at(words, nwords, j0 + q * kGroup, n);
        acc += load_vec<Lanes>(tables + q * table_size + pattern * ld + v0);
      }
      store_vec<Lanes>(out + v0, acc);
    }
  }

  // The images [b0, b1): rows has a zero line H appended (H + 1, H), tables are select_sum's
  // for cols.T, tmp holds 2 * (H + 1) * ld floats.
  static FF_ALWAYS_INLINE void mix_images(const float* images, const int64_t* partners, const int64_t* words,
                                          int64_t nwords, const float* rows, const float* tables, float* out,
                                          int64_t b0, int64_t b1, int64_t H, int64_t W, int64_t ld, float* tmp) {
    const int64_t P = H * W;
    float* y = tmp;                 // bits @ cols.T (H, ld), then a spare line
    float* z = tmp + (H + 1) * ld;  // rows @ y (H, ld), then a spare line
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t h = 0; h < H; ++h) select_sum(words, nwords, b * P + h * W, W, tables, ld, y + h * ld);
      // two lines at a time; an odd H pairs the last line with the zero line H of rows
      for (int64_t g = 0; g < H; g += 2) combine_lines(rows + g * H, H, H, y, ld, z + g * ld);
      const float* own = images + b * P;
      const float* other = images + partners[b] * P;
      float* o = out + b * P;
      for (int64_t g = 0; g < H; ++g)
        for (int64_t v = 0; v < W; ++v) o[g * W + v] = z[g * ld + v] > 0.5f ? own[g * W + v] : other[g * W + v];
    }
  }
};

using MixImages = void (*)(const float*, const int64_t*, const int64_t*, int64_t, const float*, const float*, float*,
                           int64_t, int64_t, int64_t, int64_t, int64_t, float*);

#define FF_DEFINE_HYBRID(suffix, target_attr, lanes)                                                             \
  target_attr void mix_images_##suffix(const float* images, const int64_t* partners, const int64_t* words,      \
                                       int64_t nwords, const float* rows, const float* tables, float* out,     \
                                       int64_t b0, int64_t b1, int64_t H, int64_t W, int64_t ld, float* tmp) { \
    HybridKernels<lanes>::mix_images(images, partners, words, nwords, rows, tables, out, b0, b1, H, W, ld, tmp);  \
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
  const int64_t nwords = (batch * height * width + 31) / 32;
  std::vector<float> rows_padded(static_cast<size_t>((height + 1) * height), 0.0f);
  std::copy(rows, rows + height * height, rows_padded.begin());
  // tables[q][pattern] = sum of cols.T's rows q * kGroup + i over the set bits i of pattern
  const int64_t groups = (width + kGroup - 1) / kGroup, patterns = int64_t{1} << kGroup;
  AlignedVector<float> tables(static_cast<size_t>(groups * patterns * ld), 0.0f);
  for (int64_t q = 0; q < groups; ++q) {
    float* table = tables.data() + q * patterns * ld;
    const int64_t n = std::min<int64_t>(kGroup, width - q * kGroup);
    for (int64_t pattern = 1; pattern < (int64_t{1} << n); ++pattern) {
      const int64_t low = __builtin_ctzll(static_cast<unsigned long long>(pattern));
      const float* rest = table + (pattern & (pattern - 1)) * ld;
      const int64_t w = q * kGroup + low;  // row w of cols.T is column w of cols
      for (int64_t v = 0; v < width; ++v) table[pattern * ld + v] = rest[v] + cols[v * width + w];
    }
  }
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, batch)));
#pragma omp parallel num_threads(threads)
  {
    AlignedVector<float> tmp(static_cast<size_t>(2 * (height + 1) * ld));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < batch; ++b)
      mix(images, partners, words, nwords, rows_padded.data(), tables.data(), out, b, b + 1, height, width, ld,
          tmp.data());
  }
}

}  // namespace cpu
}  // namespace ff_kernels
