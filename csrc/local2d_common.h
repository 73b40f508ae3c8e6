// Geometry and update rule of the locally connected 2-D FF layer, shared by the CPU kernels
// (local2d_cpu.cpp) and the CUDA kernels (local2d_cuda.cu) so both walk a window with the
// same index math. Plain C++ with no torch types; compiles with g++ and nvcc.
//
// The op (see python/ff_kernels/functional_local.py for the full definition):
//   x      (B, C_in, H_in, W_in)
//   weight (L, C_out, K)   L = H_out * W_out locations, K = C_in * k * k, block index (c, di, dj)
//   bias   (L, C_out)
//   z[b, o, i, j] = sum over valid (c, di, dj) of weight[l, o, (c, di, dj)] * x[b, c, i*s-p+di, j*s-p+dj]
//                   + bias[l, o],   l = i * W_out + j
//   h = relu(z)    (B, C_out, H_out, W_out)
// The forward can also add a per-element term before the ReLU and skip the ReLU (ForwardEpilogue).
// Window entries outside the input map are absent (truncated at the edges): never read, never updated.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FF_HD __host__ __device__ __forceinline__
#else
#define FF_HD inline
#endif

namespace ff_kernels {

// Sizes of one call. out_height / out_width follow from the rest:
// (in + 2 * padding - kernel) / stride + 1.
struct Local2dShape {
  int batch;
  int in_channels, in_height, in_width;
  int out_channels, out_height, out_width;
  int kernel, stride, padding;

  FF_HD int locations() const { return out_height * out_width; }
  FF_HD int block_size() const { return in_channels * kernel * kernel; }
  FF_HD int image_size() const { return in_channels * in_height * in_width; }
  FF_HD int out_image_size() const { return out_channels * locations(); }
};

// The valid entries of one location's k x k window: window rows di_lo .. di_hi - 1 and
// columns dj_lo .. dj_hi - 1, for every input channel.
struct Window {
  int row0, col0;  // input coordinates of window entry (0, 0); negative inside the padding
  int di_lo, di_hi, dj_lo, dj_hi;
  int channels, kernel, in_height, in_width;

  FF_HD int rows() const { return di_hi - di_lo; }
  FF_HD int cols() const { return dj_hi - dj_lo; }
  FF_HD int count() const { return channels * rows() * cols(); }

  // Index of window entry (c, di, dj) in the weight block, and its offset in one input image.
  FF_HD int block_index(int c, int di, int dj) const { return (c * kernel + di) * kernel + dj; }
  FF_HD int input_offset(int c, int di, int dj) const {
    return (c * in_height + row0 + di) * in_width + col0 + dj;
  }

  // Valid entry t (0 <= t < count()) -> its (c, di, dj): channel-major, then di, then dj,
  // the order of the nested loops c / di in [di_lo, di_hi) / dj in [dj_lo, dj_hi).
  FF_HD void entry(int t, int& c, int& di, int& dj) const {
    const int per_channel = rows() * cols();
    c = t / per_channel;
    const int r = t - c * per_channel;
    di = di_lo + r / cols();
    dj = dj_lo + r % cols();
  }
};

FF_HD int clamp_int(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

// The window of output location l = i * W_out + j.
FF_HD Window window_of(const Local2dShape& s, int l) {
  Window w;
  w.row0 = (l / s.out_width) * s.stride - s.padding;
  w.col0 = (l % s.out_width) * s.stride - s.padding;
  w.di_lo = clamp_int(-w.row0, 0, s.kernel);
  w.di_hi = clamp_int(s.in_height - w.row0, 0, s.kernel);
  w.dj_lo = clamp_int(-w.col0, 0, s.kernel);
  w.dj_hi = clamp_int(s.in_width - w.col0, 0, s.kernel);
  w.channels = s.in_channels;
  w.kernel = s.kernel;
  w.in_height = s.in_height;
  w.in_width = s.in_width;
  return w;
}

// The forward's output element i = (b * C_out + o) * L + l of h from its window sum z (bias
// included): z + extra[i] when extra (B, C_out, H_out, W_out) is given, then the ReLU when relu
// is set. NaN passes through the ReLU, as in torch.relu.
struct ForwardEpilogue {
  const float* extra;  // or null
  bool relu;

  FF_HD float operator()(float z, int64_t i) const {
    if (extra != nullptr) z += extra[i];
    return relu && z < 0.0f ? 0.0f : z;
  }
};

// dG/dz of the goodness: kSquared ("ssq", "neg_ssq") 2h, kSum ("sum") 1[h > 0]. The caller's
// per-image coefficient coef[b] = dL/dG carries the sign, so delta = coef[b] * dG/dz.
enum class Goodness : int { kSquared = 0, kSum = 1 };

FF_HD float goodness_delta(Goodness kind, float coef, float h) {
  if (kind == Goodness::kSum) return h > 0.0f ? coef : 0.0f;
  return 2.0f * coef * h;
}

// Where the local gradient goes. kAccumulateGrad: weight += dW, bias += db (weight / bias are
// the gradient tensors). kSgd: torch.optim.SGD (dampening 0, no Nesterov) on the parameters:
// d = grad + weight_decay * param; buf = momentum * buf + d; param -= lr * buf, with buf
// omitted (null) when momentum == 0. The bias gets weight decay too. bias null: no bias.
enum class UpdateMode : int { kAccumulateGrad = 0, kSgd = 1 };

struct UpdateTarget {
  UpdateMode mode;
  float* weight;      // (L, C_out, K)
  float* bias;        // (L, C_out) or null
  float* weight_buf;  // kSgd momentum buffers, same shapes, or null
  float* bias_buf;
  float lr, momentum, weight_decay;
};

// Apply the gradient ``grad`` of one parameter entry.
FF_HD void update_entry(const UpdateTarget& u, float* param, float* buf, float grad) {
  if (u.mode == UpdateMode::kAccumulateGrad) {
    *param += grad;
    return;
  }
  float d = grad + u.weight_decay * *param;
  if (buf != nullptr) {
    d = u.momentum * *buf + d;
    *buf = d;
  }
  *param -= u.lr * d;
}

}  // namespace ff_kernels
