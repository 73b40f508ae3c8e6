// Row kernels of the locally connected 2-D FF layer, stride 1 (see local2d_cpu_rows.h).
//
// With stride 1 the inputs that adjacent output columns j, j + 1, ... see at window column dj
// are adjacent too: x[b, c, i - p + di, j - p + dj]. Both kernels therefore hold Lanes adjacent
// output columns of one output row i in a vector, and every multiply-add is a whole vector:
//   forward: z[b, o, i, j:j+V] += wt[o, e, j:j+V] * xrow(b, c, di)[j + dj : j + dj + V]
//            over the window entries e = (c, di, dj), with a register tile of
//            forward_images(Lanes) images x kUnits output units;
//   update:  g[o, e, j:j+V] += delta[b, o, i, j:j+V] * xrow(b, c, di)[j + dj : j + dj + V]
//            summed over the images, with a register tile of kUnits units x update_columns(Lanes)
//            window columns, one cache block of kChunk images at a time.
// wt is the output row's weights transposed to (units, K, width) with the absent entries (and
// the columns past W_out) zero, built by each work item in its thread's scratch. xrow(b, c, di)
// is input row i - p + di in a copy of x made once per call (PaddedInput): `padding` zeros on
// the left, zeros up to the padded width on the right, and the same row of consecutive images
// adjacent, so every load is one unaligned vector, no edge needs a branch and a block of images
// reads one contiguous stretch. Window rows outside the input map are skipped. Work items are
// output rows, run in parallel with OpenMP; the update applies each row's gradient in its own
// item, so no two threads write the same parameter.
#include "local2d_cpu_rows.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "local2d_cpu_vec.h"

namespace ff_kernels {
namespace cpu {
namespace {

constexpr int kUnits = 3;   // output units per register tile (the CIFAR maps have 3 per location)
constexpr int kChunk = 64;  // images per cache block of the update: their deltas and input rows stay in L1

constexpr int forward_images(int lanes) { return lanes == 16 ? 8 : 4; }
constexpr int update_columns(int lanes) { return lanes == 16 ? 8 : 4; }

// Sizes of one call for vectors of `lanes` floats.
struct RowGeometry {
  int lanes;
  int vecs;         // vectors per output row: ceil(W_out / lanes)
  int width;        // vecs * lanes columns; those past W_out are zero padding
  int xwidth;       // width + kernel - 1: a padded input row
  int units;        // C_out rounded up to a multiple of kUnits (zero weights past C_out)
  int K;            // C_in * kernel * kernel

  RowGeometry(const Local2dShape& s, int lanes_)
      : lanes(lanes_),
        vecs((s.out_width + lanes_ - 1) / lanes_),
        width(vecs * lanes_),
        xwidth(width + s.kernel - 1),
        units((s.out_channels + kUnits - 1) / kUnits * kUnits),
        K(s.block_size()) {}
};

// The window rows di_lo .. di_hi - 1 of output row i that lie inside the input map.
struct RowRange {
  int lo, hi;
  RowRange(const Local2dShape& s, int i)
      : lo(std::max(0, s.padding - i)), hi(std::min(s.kernel, s.in_height + s.padding - i)) {}
};

// One thread's scratch: transposed weights and biases of an output row (forward) or its
// gradient sums (update), and the update's deltas of that row for every image.
struct RowScratch {
  AlignedVector<float> w, b, d;
  RowScratch(const RowGeometry& g, int update_images)
      : w(static_cast<size_t>(g.units) * g.K * g.width),
        b(static_cast<size_t>(g.units) * g.width),
        d(static_cast<size_t>(update_images) * g.units * g.width) {}
};

// x (B, C_in, H_in, W_in) reordered to (C_in, H_in, images, xwidth): the same row of
// consecutive images is adjacent, and every row is padded with `padding` zeros on the left and
// zeros after it; images B .. images - 1 are all zero.
struct PaddedInput {
  int images, xwidth;
  AlignedVector<float> data;

  PaddedInput(const float* x, const Local2dShape& s, const RowGeometry& g, int images_, int num_threads)
      : images(images_), xwidth(g.xwidth),
        data(static_cast<size_t>(s.in_channels) * s.in_height * images_ * g.xwidth, 0.0f) {
    const int planes = s.in_channels * s.in_height;
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int b = 0; b < s.batch; ++b)
      for (int plane = 0; plane < planes; ++plane)
        std::memcpy(data.data() + (static_cast<int64_t>(plane) * images + b) * xwidth + s.padding,
                    x + (static_cast<int64_t>(b) * planes + plane) * s.in_width, sizeof(float) * s.in_width);
  }

  // Row r of channel c of image b; image b + 1's is xwidth floats further.
  const float* row(int b, int c, int r, const Local2dShape& s) const {
    return data.data() + ((static_cast<int64_t>(c) * s.in_height + r) * images + b) * xwidth;
  }
};

// Walks the units of output row i and their present window entries: unit(j, o, l * C_out + o)
// for every output column j and unit o, then entry(j, o, weight index, e) for each entry e =
// (c, di, dj) of its window inside the input map (l = i * W_out + j).
template <class Unit, class Entry>
inline void for_each_present_entry(const Local2dShape& s, int i, const RowRange& rows, Unit&& unit, Entry&& entry) {
  const int k = s.kernel, K = s.block_size();
  for (int j = 0; j < s.out_width; ++j) {
    const int64_t l = static_cast<int64_t>(i) * s.out_width + j;
    const int dj_lo = std::max(0, s.padding - j), dj_hi = std::min(k, s.in_width + s.padding - j);
    for (int o = 0; o < s.out_channels; ++o) {
      const int64_t index = l * s.out_channels + o;
      unit(j, o, index);
      for (int c = 0; c < s.in_channels; ++c)
        for (int di = rows.lo; di < rows.hi; ++di)
          for (int dj = dj_lo; dj < dj_hi; ++dj) {
            const int e = (c * k + di) * k + dj;
            entry(j, o, index * K + e, e);
          }
    }
  }
}

template <int Lanes>
struct RowKernels {
  using Vec = typename VecOf<Lanes>::type;
  static constexpr int kImages = forward_images(Lanes);
  static constexpr int kCols = update_columns(Lanes);

  static FF_ALWAYS_INLINE Vec load(const float* p) { return load_vec<Lanes>(p); }

  // An input vector loaded once into a register for all the units it multiplies. Most of these
  // loads are unaligned and cross a cache line; left to itself the compiler folds the load into
  // every multiply-add that uses it, which triples the split loads.
  static FF_ALWAYS_INLINE Vec load_once(const float* p) {
    Vec v = load(p);
#ifdef FF_X86_DISPATCH
    asm("" : "+v"(v));  // v: any SSE / AVX register
#endif
    return v;
  }

  // scratch.w[(o * K + e) * width + j] = weight[i * W_out + j, o, e] for the present entries,
  // scratch.b[o * width + j] = bias[i * W_out + j, o]; zero elsewhere.
  static FF_ALWAYS_INLINE void transpose_row(const Local2dShape& s, const RowGeometry& g, int i,
                                             const RowRange& rows, const float* weight, const float* bias,
                                             RowScratch& scratch) {
    float* wt = scratch.w.data();
    float* bt = scratch.b.data();
    std::fill(scratch.w.begin(), scratch.w.end(), 0.0f);
    std::fill(scratch.b.begin(), scratch.b.end(), 0.0f);
    for_each_present_entry(
        s, i, rows,
        [&](int j, int o, int64_t unit) {
          if (bias != nullptr) bt[o * g.width + j] = bias[unit];
        },
        [&](int j, int o, int64_t index, int e) {
          wt[(static_cast<int64_t>(o) * g.K + e) * g.width + j] = weight[index];
        });
  }

  // h for images b0 .. b0 + kImages - 1 (the padded copy), units o0 .. o0 + kUnits - 1 and output
  // columns v * Lanes .. v * Lanes + Lanes - 1 of row i, through the epilogue.
  static FF_ALWAYS_INLINE void forward_tile(const Local2dShape& s, const RowGeometry& g, int i, const RowRange& rows,
                                            int b0, int o0, int v, const PaddedInput& xp, const RowScratch& scratch,
                                            const ForwardEpilogue& epilogue, float* h) {
    Vec acc[kImages][kUnits];
    for (int u = 0; u < kUnits; ++u) {
      const Vec b = load(scratch.b.data() + (o0 + u) * g.width + v * Lanes);
      for (int r = 0; r < kImages; ++r) acc[r][u] = b;
    }
    const int k = s.kernel;
    const int64_t unit_stride = static_cast<int64_t>(g.K) * g.width;
    for (int c = 0; c < s.in_channels; ++c)
      for (int di = rows.lo; di < rows.hi; ++di) {
        const float* w = scratch.w.data() + (o0 * static_cast<int64_t>(g.K) + (c * k + di) * k) * g.width + v * Lanes;
        const float* xr = xp.row(b0, c, i - s.padding + di, s) + v * Lanes;
        for (int dj = 0; dj < k; ++dj) {
          Vec wv[kUnits];
          for (int u = 0; u < kUnits; ++u) wv[u] = load(w + u * unit_stride + dj * g.width);
          for (int r = 0; r < kImages; ++r) {
            const Vec xv = load_once(xr + r * g.xwidth + dj);
            for (int u = 0; u < kUnits; ++u) acc[r][u] += wv[u] * xv;
          }
        }
      }
    const int64_t L = s.locations(), out_image = s.out_image_size();
    const int j0 = v * Lanes, nj = std::min(Lanes, s.out_width - j0);
    for (int r = 0; r < std::min(kImages, s.batch - b0); ++r)
      for (int u = 0; u < std::min(kUnits, s.out_channels - o0); ++u) {
        float z[Lanes];
        std::memcpy(z, &acc[r][u], sizeof z);
        const int64_t base = (b0 + r) * out_image + (o0 + u) * L + static_cast<int64_t>(i) * s.out_width + j0;
        for (int jj = 0; jj < nj; ++jj) h[base + jj] = epilogue(z[jj], base + jj);
      }
  }

  // Output row i of h for all images.
  static FF_ALWAYS_INLINE void forward_row(const Local2dShape& s, const RowGeometry& g, int i, const PaddedInput& xp,
                                           const float* weight, const float* bias, const ForwardEpilogue& epilogue,
                                           float* h, RowScratch& scratch) {
    const RowRange rows(s, i);
    transpose_row(s, g, i, rows, weight, bias, scratch);
    for (int b0 = 0; b0 < s.batch; b0 += kImages)
      for (int v = 0; v < g.vecs; ++v)
        for (int o0 = 0; o0 < s.out_channels; o0 += kUnits)
          forward_tile(s, g, i, rows, b0, o0, v, xp, scratch, epilogue, h);
  }

  // gsum[(o0 + u) * K + e + t] (vector v) += sum over images r < n of
  // d[r][o0 + u] * xrow(r, e)[v * Lanes + t], for NT adjacent window columns; d, x and g point
  // at unit o0 / entry e / vector v. Units are `width` floats apart in d, window entries in g.
  template <int NT>
  static FF_ALWAYS_INLINE void grad_tile(int n, const float* d, int64_t d_stride, const float* x, int64_t x_stride,
                                         float* g, int64_t unit_stride, int width) {
    Vec acc[kUnits][NT];
    for (int u = 0; u < kUnits; ++u)
      for (int t = 0; t < NT; ++t) acc[u][t] = load(g + u * unit_stride + t * width);
    for (int r = 0; r < n; ++r) {
      Vec dv[kUnits];
      for (int u = 0; u < kUnits; ++u) dv[u] = load(d + r * d_stride + u * width);
      for (int t = 0; t < NT; ++t) {
        const Vec xv = load_once(x + r * x_stride + t);
        for (int u = 0; u < kUnits; ++u) acc[u][t] += dv[u] * xv;
      }
    }
    for (int u = 0; u < kUnits; ++u)
      for (int t = 0; t < NT; ++t) std::memcpy(g + u * unit_stride + t * width, &acc[u][t], sizeof(Vec));
  }

  // The gradient of output row i: deltas and sums over all images, then applied to the target.
  static FF_ALWAYS_INLINE void update_row(const Local2dShape& s, const RowGeometry& g, int i, const PaddedInput& xp,
                                          const float* h, const float* coef, Goodness kind, const UpdateTarget& u,
                                          RowScratch& scratch) {
    const RowRange rows(s, i);
    const int k = s.kernel;
    const int64_t L = s.locations(), out_image = s.out_image_size(), unit_stride = static_cast<int64_t>(g.K) * g.width;
    float* gsum = scratch.w.data();
    float* bsum = scratch.b.data();
    std::fill(scratch.w.begin(), scratch.w.end(), 0.0f);
    std::fill(scratch.b.begin(), scratch.b.end(), 0.0f);
    std::fill(scratch.d.begin(), scratch.d.end(), 0.0f);  // units past C_out, columns past W_out stay 0
    const int64_t d_stride = static_cast<int64_t>(g.units) * g.width;
    for (int b = 0; b < s.batch; ++b)
      for (int o = 0; o < s.out_channels; ++o) {
        const float* hrow = h + b * out_image + o * L + static_cast<int64_t>(i) * s.out_width;
        float* drow = scratch.d.data() + b * d_stride + o * g.width;
        for (int j = 0; j < s.out_width; ++j) {
          drow[j] = goodness_delta(kind, coef[b], hrow[j]);
          bsum[o * g.width + j] += drow[j];
        }
      }
    for (int b0 = 0; b0 < s.batch; b0 += kChunk) {
      const int n = std::min(kChunk, s.batch - b0);
      for (int c = 0; c < s.in_channels; ++c)
        for (int di = rows.lo; di < rows.hi; ++di)
          for (int v = 0; v < g.vecs; ++v) {
            const float* xr = xp.row(b0, c, i - s.padding + di, s) + v * Lanes;
            for (int o0 = 0; o0 < s.out_channels; o0 += kUnits) {
              const float* d = scratch.d.data() + b0 * d_stride + o0 * g.width + v * Lanes;
              float* gr = gsum + (o0 * static_cast<int64_t>(g.K) + (c * k + di) * k) * g.width + v * Lanes;
              int dj = 0;
              for (; dj + kCols <= k; dj += kCols)
                grad_tile<kCols>(n, d, d_stride, xr + dj, g.xwidth, gr + dj * g.width, unit_stride, g.width);
              for (; dj + 2 <= k; dj += 2)
                grad_tile<2>(n, d, d_stride, xr + dj, g.xwidth, gr + dj * g.width, unit_stride, g.width);
              for (; dj < k; ++dj)
                grad_tile<1>(n, d, d_stride, xr + dj, g.xwidth, gr + dj * g.width, unit_stride, g.width);
            }
          }
    }
    for_each_present_entry(
        s, i, rows,
        [&](int j, int o, int64_t unit) {
          if (u.bias != nullptr)
            update_entry(u, u.bias + unit, u.bias_buf != nullptr ? u.bias_buf + unit : nullptr, bsum[o * g.width + j]);
        },
        [&](int j, int o, int64_t index, int e) {
          update_entry(u, u.weight + index, u.weight_buf != nullptr ? u.weight_buf + index : nullptr,
                       gsum[(static_cast<int64_t>(o) * g.K + e) * g.width + j]);
        });
  }
};

using ForwardRow = void (*)(const Local2dShape&, const RowGeometry&, int, const PaddedInput&, const float*, const float*,
                            const ForwardEpilogue&, float*, RowScratch&);
using UpdateRow = void (*)(const Local2dShape&, const RowGeometry&, int, const PaddedInput&, const float*, const float*,
                           Goodness, const UpdateTarget&, RowScratch&);

#define FF_DEFINE_ROWS(suffix, target_attr, lanes)                                                                   \
  target_attr void forward_row_##suffix(const Local2dShape& s, const RowGeometry& g, int i, const PaddedInput& x,  \
                                        const float* weight, const float* bias, const ForwardEpilogue& epilogue,   \
                                        float* h, RowScratch& scratch) {                                            \
    RowKernels<lanes>::forward_row(s, g, i, x, weight, bias, epilogue, h, scratch);                                 \
  }                                                                                                                 \
  target_attr void update_row_##suffix(const Local2dShape& s, const RowGeometry& g, int i, const PaddedInput& x,   \
                                       const float* h, const float* coef, Goodness kind, const UpdateTarget& u,     \
                                       RowScratch& scratch) {                                                       \
    RowKernels<lanes>::update_row(s, g, i, x, h, coef, kind, u, scratch);                                           \
  }

FF_DEFINE_ROWS(base, , 4)
#ifdef FF_X86_DISPATCH
FF_DEFINE_ROWS(avx2, FF_TARGET_AVX2, 8)
FF_DEFINE_ROWS(avx512, FF_TARGET_AVX512, 16)
#endif

}  // namespace

bool use_row_kernels(const Local2dShape& s) {
  if (s.stride != 1) return false;
  const char* choice = std::getenv("FF_KERNELS_LOCAL2D_CPU");
  if (choice != nullptr && std::string(choice) == "rows") return true;
  if (choice != nullptr && std::string(choice) == "tiles") return false;
  const int lanes = cpu_lanes(), width = (s.out_width + lanes - 1) / lanes * lanes;
  return 4 * s.out_width >= 3 * width;
}

void rows_forward(const float* x, const float* weight, const float* bias, const ForwardEpilogue& epilogue, float* h,
                  const Local2dShape& s, int num_threads) {
  const RowGeometry g(s, cpu_lanes());
  const ForwardRow row = FF_PICK_BUILD(forward_row);
  const int images = (s.batch + forward_images(g.lanes) - 1) / forward_images(g.lanes) * forward_images(g.lanes);
  const PaddedInput xp(x, s, g, images, num_threads);
#pragma omp parallel num_threads(num_threads)
  {
    RowScratch scratch(g, 0);
#pragma omp for schedule(dynamic)
    for (int i = 0; i < s.out_height; ++i) row(s, g, i, xp, weight, bias, epilogue, h, scratch);
  }
}

void rows_update(const float* x, const float* h, const float* coef, Goodness kind, const UpdateTarget& target,
                 const Local2dShape& s, int num_threads) {
  const RowGeometry g(s, cpu_lanes());
  const UpdateRow row = FF_PICK_BUILD(update_row);
  const PaddedInput xp(x, s, g, s.batch, num_threads);
#pragma omp parallel num_threads(num_threads)
  {
    RowScratch scratch(g, s.batch);
#pragma omp for schedule(dynamic)
    for (int i = 0; i < s.out_height; ++i) row(s, g, i, xp, h, coef, kind, target, scratch);
  }
}

}  // namespace cpu
}  // namespace ff_kernels
