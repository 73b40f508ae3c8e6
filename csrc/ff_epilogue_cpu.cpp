// CPU kernels of ff_epilogue_cpu.h: vectorized over a segment of C units, OpenMP over rows.
// Built once per instruction set (local2d_cpu_vec.h) like the local kernels.
#include "ff_epilogue_cpu.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "local2d_cpu_vec.h"

namespace ff_kernels {
namespace cpu {
namespace {

// Rows b0 .. b1 - 1 of one thread and its partial column sums (L * C floats, or null).
struct RowRange {
  int64_t b0, b1;
  float* partial;
};

template <int Lanes>
struct EpilogueKernels {
  using Vec = typename VecOf<Lanes>::type;

  // x[0 .. C) = relu(in + bias) (bias may be null; in may be x); adds x to col when kCol; returns
  // the sum of x^2 (kSquared) or x. NaN stays NaN (relu(NaN) = NaN, as torch's).
  template <bool kCol>
  static FF_ALWAYS_INLINE float relu_segment(float* x, const float* in, const float* bias, int64_t C, Goodness kind,
                                             float* col) {
    const Vec zero = {};
    Vec acc = {};
    int64_t c = 0;
    for (; c + Lanes <= C; c += Lanes) {
      Vec v = load_vec<Lanes>(in + c);
      if (bias != nullptr) v += load_vec<Lanes>(bias + c);
      v = v < zero ? zero : v;
      store_vec<Lanes>(x + c, v);
      acc += kind == Goodness::kSquared ? v * v : v;
      if (kCol) store_vec<Lanes>(col + c, load_vec<Lanes>(col + c) + v);
    }
    float total = sum_lanes<Lanes>(acc);
    for (; c < C; ++c) {
      float v = in[c];
      if (bias != nullptr) v += bias[c];
      v = v < 0.0f ? 0.0f : v;
      x[c] = v;
      total += kind == Goodness::kSquared ? v * v : v;
      if (kCol) col[c] += v;
    }
    return total;
  }

  static FF_ALWAYS_INLINE void relu_rows(float* h, const float* source, const float* bias, Goodness kind, float* g,
                                         int64_t n_sum, const EpilogueShape& s, const RowRange& r) {
    const int64_t B = s.batch, C = s.channels;
    std::fill(g + r.b0, g + r.b1, 0.0f);
    for (int64_t l = 0; l < s.locations; ++l) {
      const float* bl = bias != nullptr ? bias + l * C : nullptr;
      for (int64_t b = r.b0; b < r.b1; ++b) {
        float* x = h + (l * B + b) * C;
        const float* in = source + (l * B + b) * C;
        g[b] += r.partial != nullptr && b < n_sum ? relu_segment<true>(x, in, bl, C, kind, r.partial + l * C)
                                                  : relu_segment<false>(x, in, bl, C, kind, nullptr);
      }
    }
  }

  // out = x * scale; x = delta (when kDelta), added to sum when kSum.
  template <bool kDelta, bool kBiasSum>
  static FF_ALWAYS_INLINE void output_segment(float* x, float scale, float* out, float coef, Goodness kind,
                                              const float* extra, float* sum, int64_t C) {
    const Vec zero = {};
    const Vec coef_v = zero + coef;
    const Vec twice_coef_v = zero + 2.0f * coef;
    int64_t c = 0;
    for (; c + Lanes <= C; c += Lanes) {
      const Vec v = load_vec<Lanes>(x + c);
      store_vec<Lanes>(out + c, v * scale);
      if (kDelta) {
        Vec d = kind == Goodness::kSquared ? twice_coef_v * v : (v > zero ? coef_v : zero);
        if (extra != nullptr) d += load_vec<Lanes>(extra + c);
        store_vec<Lanes>(x + c, d);
        if (kBiasSum) store_vec<Lanes>(sum + c, load_vec<Lanes>(sum + c) + d);
      }
    }
    for (; c < C; ++c) {
      const float v = x[c];
      out[c] = v * scale;
      if (kDelta) {
        float d = goodness_delta(kind, coef, v);
        if (extra != nullptr) d += extra[c];
        x[c] = d;
        if (kBiasSum) sum[c] += d;
      }
    }
  }

  template <bool kDelta, bool kBiasSum>
  static FF_ALWAYS_INLINE void output_rows(float* h, const float* scale, float* out, const float* coef, Goodness kind,
                          const float* extra, int64_t n_extra, const EpilogueShape& s, const RowRange& r) {
    const int64_t B = s.batch, C = s.channels, row = s.locations * C;
    for (int64_t l = 0; l < s.locations; ++l)
      for (int64_t b = r.b0; b < r.b1; ++b)
        output_segment<kDelta, kBiasSum>(h + (l * B + b) * C, scale[b], out + b * row + l * C,
                                         kDelta ? coef[b] : 0.0f, kind,
                                         extra != nullptr && b < n_extra ? extra + l * C : nullptr,
                                         kBiasSum ? r.partial + l * C : nullptr, C);
  }

  static FF_ALWAYS_INLINE void output_dispatch(float* h, const float* scale, float* out, const float* coef, Goodness kind,
                              const float* extra, int64_t n_extra, const EpilogueShape& s, const RowRange& r) {
    if (coef == nullptr) return output_rows<false, false>(h, scale, out, coef, kind, extra, n_extra, s, r);
    if (r.partial == nullptr) return output_rows<true, false>(h, scale, out, coef, kind, extra, n_extra, s, r);
    output_rows<true, true>(h, scale, out, coef, kind, extra, n_extra, s, r);
  }
};

using ReluRows = void (*)(float*, const float*, const float*, Goodness, float*, int64_t, const EpilogueShape&,
                          const RowRange&);
using OutputRows = void (*)(float*, const float*, float*, const float*, Goodness, const float*, int64_t,
                            const EpilogueShape&, const RowRange&);

#define FF_DEFINE_EPILOGUE(suffix, target_attr, lanes)                                                              \
  target_attr void relu_rows_##suffix(float* h, const float* source, const float* bias, Goodness kind, float* g,  \
                                      int64_t n_sum, const EpilogueShape& s, const RowRange& r) {                   \
    EpilogueKernels<lanes>::relu_rows(h, source, bias, kind, g, n_sum, s, r);                                     \
  }                                                                                                                 \
  target_attr void output_rows_##suffix(float* h, const float* scale, float* out, const float* coef,               \
                                        Goodness kind, const float* extra, int64_t n_extra, const EpilogueShape& s, \
                                        const RowRange& r) {                                                        \
    EpilogueKernels<lanes>::output_dispatch(h, scale, out, coef, kind, extra, n_extra, s, r);                      \
  }

FF_DEFINE_EPILOGUE(base, , 4)
#ifdef FF_X86_DISPATCH
FF_DEFINE_EPILOGUE(avx2, FF_TARGET_AVX2, 8)
FF_DEFINE_EPILOGUE(avx512, FF_TARGET_AVX512, 16)
#endif

// Rows per block of partial column sums: fixed, so sums do not depend on the number of threads;
// small, so that the blocks of a batch of a few hundred rows split evenly between threads (32-row
// blocks gave 2 threads 128 and 72 of 200 rows).
constexpr int64_t kRowBlock = 8;

// Runs work(range) over blocks of kRowBlock rows on up to num_threads threads, with a zeroed
// partial row of L * C floats per block when sum is given; then sum = the partials added up in
// block order (the same result for any number of threads).
template <class Work>
void over_rows(const EpilogueShape& s, int num_threads, float* sum, Work work) {
  const int64_t blocks = (s.batch + kRowBlock - 1) / kRowBlock;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, blocks)));
  const int64_t width = s.locations * s.channels;
  // kept from call to call (per calling thread): a fresh buffer of this size would be new pages
  thread_local AlignedVector<float> kept;
  if (sum != nullptr) {
    if (kept.size() < static_cast<size_t>(blocks * width)) kept.resize(blocks * width);
    std::fill(kept.begin(), kept.begin() + blocks * width, 0.0f);
  }
  float* const partials = kept.data();  // the calling thread's buffer, shared with the team below
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t k = 0; k < blocks; ++k)
    work(RowRange{k * kRowBlock, std::min(s.batch, (k + 1) * kRowBlock),
                  sum != nullptr ? partials + k * width : nullptr});
  if (sum == nullptr) return;
  const int64_t chunks = (width + 255) / 256;  // columns split among threads, blocks added in order
#pragma omp parallel for num_threads(static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, chunks)))) \
    schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t i0 = c * 256, i1 = std::min(width, i0 + 256);
    std::fill(sum + i0, sum + i1, 0.0f);
    for (int64_t k = 0; k < blocks; ++k) {
      const float* p = partials + k * width;
      for (int64_t i = i0; i < i1; ++i) sum[i] += p[i];
    }
  }
}

}  // namespace

void relu_goodness(float* h, const float* source, const float* bias, Goodness kind, float* g, float* col_sum,
                   int64_t n_sum, const EpilogueShape& s, int num_threads) {
  static const ReluRows rows = FF_PICK_BUILD(relu_rows);
  const float* in = source != nullptr ? source : h;
  over_rows(s, num_threads, col_sum, [&](const RowRange& r) { rows(h, in, bias, kind, g, n_sum, s, r); });
}

float loss_and_coef(const float* g, int64_t batch, int64_t n_pos, float signed_inverse_temperature, float threshold,
                    float* coef) {
  const float w_pos = 1.0f / static_cast<float>(std::max<int64_t>(n_pos, 1));
  const float w_neg = 1.0f / static_cast<float>(std::max<int64_t>(batch - n_pos, 1));
  float loss = 0.0f;
  for (int64_t b = 0; b < batch; ++b) {
    const bool positive = b < n_pos;
    const float a = positive ? -signed_inverse_temperature : signed_inverse_temperature;
    const float w = positive ? w_pos : w_neg;
    const float t = (g[b] - threshold) * a;
    const float softplus = t > 20.0f ? t : std::log1p(std::exp(t));  // torch.nn.functional.softplus
    loss += softplus * w;
    coef[b] = 1.0f / (1.0f + std::exp(-t)) * a * w;
  }
  return loss;
}

void output_and_delta(float* h, const float* scale, float* out, const float* coef, Goodness kind,
                      const float* extra, int64_t n_extra, float* bias_sum, const EpilogueShape& s,
                      int num_threads) {
  static const OutputRows rows = FF_PICK_BUILD(output_rows);
  over_rows(s, num_threads, coef != nullptr ? bias_sum : nullptr,
            [&](const RowRange& r) { rows(h, scale, out, coef, kind, extra, n_extra, s, r); });
}

void inverse_scale(const float* g, int64_t batch, Goodness kind, float norm_divisor, float eps, float* inv) {
  for (int64_t b = 0; b < batch; ++b) {
    float d = kind == Goodness::kSquared ? std::sqrt(g[b]) : g[b];
    if (norm_divisor != 1.0f) d = d / norm_divisor;
    inv[b] = 1.0f / (d + eps);
  }
}

void peer_update(float* running_mean, const float* col_sum, int64_t locations, int64_t channels, int64_t n_pos,
                 float momentum, float strength, bool channels_major, float* p, float* extra) {
  const int64_t n = locations * channels;
  const float inv_pos = 1.0f / static_cast<float>(n_pos);
  const float weight = 1.0f - momentum;
  double total = 0.0;
  for (int64_t l = 0; l < locations; ++l)
    for (int64_t c = 0; c < channels; ++c) {
      float& r = running_mean[channels_major ? c * locations + l : l * channels + c];
      const float end = col_sum[l * channels + c] / static_cast<float>(n_pos);
      const float diff = end - r;
      r = weight < 0.5f ? r + weight * diff : end - diff * (1.0f - weight);  // torch.lerp
      total += r;
    }
  const float mean = static_cast<float>(total / static_cast<double>(n));
  for (int64_t j = 0; j < n; ++j) p[j] = (running_mean[j] - mean) * strength;
  for (int64_t l = 0; l < locations; ++l)
    for (int64_t c = 0; c < channels; ++c)
      extra[l * channels + c] = p[channels_major ? c * locations + l : l * channels + c] * inv_pos;
}

}  // namespace cpu
}  // namespace ff_kernels
