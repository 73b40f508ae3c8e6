// The locally connected 2-D FF ops as torch operators: torch.ops.ff_kernels.<name>.
//
//   local2d_forward(x, weight, bias?, kernel, stride, padding, extra?=None, relu=True) -> h = relu(z + extra)
//                   (z + extra without the ReLU when relu is false)
//   local2d_grad_(x, h, coef, goodness, kernel, stride, padding, weight_grad!, bias_grad?!)
//   local2d_sgd_(x, h, coef, goodness, kernel, stride, padding, weight!, bias?!, weight_buf?!,
//                bias_buf?!, lr, momentum, weight_decay)
//   ff_relu_goodness_(h!, bias?, goodness, n_sum, source?=None) -> (g, col_sum)   (CPU)
//   ff_output_delta_(h!, scale, out!, coef?, goodness, extra?, n_extra, bias_sum) -> bias_sum (CPU)
//   gather_columns(rows, index, out!) -> ()                                     (CPU)
//   gather_runs(rows, runs, out!) -> ()                                          (CPU)
//   gather_interleaved(rows, starts, channels, out!) -> ()                       (CPU)
//   ff_loss_coef(g, n_pos, signed_inverse_temperature, threshold) -> (loss, coef)   (CPU)
//   ff_inverse_scale(g, goodness, norm_divisor, eps) -> inv                          (CPU)
//   ff_peer_update_(running_mean!, col_sum, n_pos, momentum, strength, channels_major) -> (p, extra)   (CPU)
//   ff_sgd_decay_apply_(param!, buf!, lr, weight_decay) -> ()                       (CPU)
//   ff_loss_output_delta_(h!, g, out!, n_pos, signed_inverse_temperature, threshold, goodness,
//                         norm_divisor, eps, col_sum?, running_mean?!, momentum, strength,
//                         channels_major, bias_sum) -> (loss, p, bias_sum)             (CPU)
//   built_with_cuda() -> bool
// Shapes and math: csrc/local2d_common.h and python/ff_kernels/functional_local.py; the two
// ff_ ops (an FF layer's passes between its GEMMs): csrc/ff_epilogue_cpu.h; the gather_ ops:
// csrc/gather_cpu.h; ff_sgd_decay_apply_: csrc/sgd_cpu.h. The recipes' ops (the softmax head's,
// the hybrid images', the supervised first layer's) are registered in csrc/bindings_recipe_ops.cpp,
// as a fragment of the same library.
//
// Registered with TORCH_LIBRARY rather than as pybind11 functions because (1) the dispatcher
// picks the CPU or CUDA kernel from the tensors' device, (2) the schemas declare which
// arguments the in-place ops mutate, which torch.compile and functionalization rely on, and
// (3) the library needs no Python symbols: the setuptools build imports it as ff_kernels._C
// (the empty module stub at the end), a plain CMake build loads the same library with
// torch.ops.load_library(path).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "ff_epilogue_cpu.h"
#include "gather_cpu.h"
#include "local2d_cpu.h"
#include "op_checks.h"
#include "sgd_cpu.h"

#ifdef FF_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "local2d_cuda.h"
#endif

namespace {

using ff_kernels::Goodness;
using ff_kernels::Local2dShape;
using ff_kernels::UpdateMode;
using ff_kernels::UpdateTarget;
using ff_kernels::checks::check_index;
using ff_kernels::checks::check_index_tensor;
using ff_kernels::checks::check_rows;
using ff_kernels::checks::check_tensor;

int checked_int(const char* op, const char* what, int64_t v) {
  TORCH_CHECK(v >= 0 && v <= std::numeric_limits<int>::max(), op, ": ", what, " = ", v, " does not fit a 32-bit int");
  return static_cast<int>(v);
}

// The call's sizes from x (B, C_in, H_in, W_in), the window spec and weight (L, C_out, K), all checked.
// weight_name names weight_like in errors.
Local2dShape shape_of(const char* op, const at::Tensor& x, const char* weight_name, const at::Tensor& weight_like,
                      int64_t kernel, int64_t stride, int64_t padding) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (B, C_in, H_in, W_in), got shape ", x.sizes());
  TORCH_CHECK(kernel >= 1 && stride >= 1 && padding >= 0 && padding < kernel, op,
              ": need kernel >= 1, stride >= 1 and 0 <= padding < kernel, got kernel ", kernel, ", stride ", stride,
              ", padding ", padding);
  TORCH_CHECK(std::min(x.size(2), x.size(3)) + 2 * padding >= kernel, op, ": a ", kernel, "x", kernel,
              " window with padding ", padding, " does not fit the input map ", x.sizes());
  Local2dShape s{};
  s.batch = checked_int(op, "batch", x.size(0));
  s.in_channels = checked_int(op, "C_in", x.size(1));
  s.in_height = checked_int(op, "H_in", x.size(2));
  s.in_width = checked_int(op, "W_in", x.size(3));
  s.kernel = static_cast<int>(kernel);
  s.stride = static_cast<int>(stride);
  s.padding = static_cast<int>(padding);
  s.out_height = (s.in_height + 2 * s.padding - s.kernel) / s.stride + 1;
  s.out_width = (s.in_width + 2 * s.padding - s.kernel) / s.stride + 1;
  checked_int(op, "C_in * H_in * W_in", x.size(1) * x.size(2) * x.size(3));
  checked_int(op, "C_in * kernel * kernel", x.size(1) * kernel * kernel);
  TORCH_CHECK(weight_like.dim() == 3, op, ": ", weight_name, " must be 3-D (L, C_out, K), got shape ",
              weight_like.sizes());
  s.out_channels = checked_int(op, "C_out", weight_like.size(1));
  checked_int(op, "C_out * H_out * W_out", weight_like.size(1) * s.locations());
  const std::vector<int64_t> weight_shape{s.locations(), s.out_channels, s.block_size()};
  check_tensor(op, "x", x, x.sizes(), x);
  check_tensor(op, weight_name, weight_like, weight_shape, x);
  return s;
}

void check_optional(const char* op, const char* name, const std::optional<at::Tensor>& t, at::IntArrayRef shape,
                    const at::Tensor& x) {
  if (t.has_value()) check_tensor(op, name, *t, shape, x);
}

float* mutable_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->mutable_data_ptr<float>() : nullptr;
}

Goodness goodness_of(const char* op, const std::string& goodness) {
  if (goodness == "ssq" || goodness == "neg_ssq") return Goodness::kSquared;
  TORCH_CHECK(goodness == "sum", op, ": goodness must be 'ssq', 'neg_ssq' or 'sum', got '", goodness, "'");
  return Goodness::kSum;
}

at::Tensor local2d_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           int64_t kernel, int64_t stride, int64_t padding, const std::optional<at::Tensor>& extra,
                           bool relu) {
  const char* op = "local2d_forward";
  const Local2dShape s = shape_of(op, x, "weight", weight, kernel, stride, padding);
  check_optional(op, "bias", bias, {s.locations(), s.out_channels}, x);
  check_optional(op, "extra", extra, {s.batch, s.out_channels, s.out_height, s.out_width}, x);
  at::Tensor h = at::empty({s.batch, s.out_channels, s.out_height, s.out_width}, x.options());
  const float* bias_ptr = bias.has_value() ? bias->const_data_ptr<float>() : nullptr;
  const ff_kernels::ForwardEpilogue epilogue{extra.has_value() ? extra->const_data_ptr<float>() : nullptr, relu};
#ifdef FF_WITH_CUDA
  if (x.is_cuda()) {
    const c10::cuda::CUDAGuard guard(x.device());
    const cudaError_t err = ff_kernels::cuda::local2d_forward(x.const_data_ptr<float>(), weight.const_data_ptr<float>(),
                                                              bias_ptr, epilogue, h.mutable_data_ptr<float>(), s,
                                                              c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
    return h;
  }
#endif
  TORCH_CHECK(x.is_cpu(), op, ": tensors on ", x.device(), " are not supported by this build");
  ff_kernels::cpu::local2d_forward(x.const_data_ptr<float>(), weight.const_data_ptr<float>(), bias_ptr, epilogue,
                                   h.mutable_data_ptr<float>(), s, at::get_num_threads());
  return h;
}

// Checks h (B, C_out, H_out, W_out) and coef (B,), then runs the update kernel on x's device.
void run_update(const char* op, const at::Tensor& x, const at::Tensor& h, const at::Tensor& coef,
                const std::string& goodness, const Local2dShape& s, const UpdateTarget& target) {
  check_tensor(op, "h", h, {s.batch, s.out_channels, s.out_height, s.out_width}, x);
  check_tensor(op, "coef", coef, {s.batch}, x);
  const Goodness kind = goodness_of(op, goodness);
#ifdef FF_WITH_CUDA
  if (x.is_cuda()) {
    const c10::cuda::CUDAGuard guard(x.device());
    const cudaError_t err = ff_kernels::cuda::local2d_update(x.const_data_ptr<float>(), h.const_data_ptr<float>(),
                                                             coef.const_data_ptr<float>(), kind, target, s,
                                                             c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
    return;
  }
#endif
  TORCH_CHECK(x.is_cpu(), op, ": tensors on ", x.device(), " are not supported by this build");
  ff_kernels::cpu::local2d_update(x.const_data_ptr<float>(), h.const_data_ptr<float>(), coef.const_data_ptr<float>(),
                                  kind, target, s, at::get_num_threads());
}

void local2d_grad_(const at::Tensor& x, const at::Tensor& h, const at::Tensor& coef, const std::string& goodness,
                   int64_t kernel, int64_t stride, int64_t padding, const at::Tensor& weight_grad,
                   const std::optional<at::Tensor>& bias_grad) {
  const char* op = "local2d_grad_";
  const Local2dShape s = shape_of(op, x, "weight_grad", weight_grad, kernel, stride, padding);
  check_optional(op, "bias_grad", bias_grad, {s.locations(), s.out_channels}, x);
  UpdateTarget target{};
  target.mode = UpdateMode::kAccumulateGrad;
  target.weight = weight_grad.mutable_data_ptr<float>();
  target.bias = mutable_ptr(bias_grad);
  run_update(op, x, h, coef, goodness, s, target);
}

void local2d_sgd_(const at::Tensor& x, const at::Tensor& h, const at::Tensor& coef, const std::string& goodness,
                  int64_t kernel, int64_t stride, int64_t padding, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& weight_buf,
                  const std::optional<at::Tensor>& bias_buf, double lr, double momentum, double weight_decay) {
  const char* op = "local2d_sgd_";
  const Local2dShape s = shape_of(op, x, "weight", weight, kernel, stride, padding);
  const std::vector<int64_t> bias_shape{s.locations(), s.out_channels};
  check_optional(op, "bias", bias, bias_shape, x);
  check_optional(op, "weight_buf", weight_buf, weight.sizes(), x);
  check_optional(op, "bias_buf", bias_buf, bias_shape, x);
  TORCH_CHECK(std::isfinite(lr) && lr >= 0 && std::isfinite(momentum) && momentum >= 0 && std::isfinite(weight_decay) &&
                  weight_decay >= 0,
              op, ": lr, momentum and weight_decay must be finite and >= 0, got ", lr, ", ", momentum, ", ",
              weight_decay);
  TORCH_CHECK(momentum == 0 || weight_buf.has_value(), op, ": momentum ", momentum, " needs weight_buf");
  TORCH_CHECK(momentum == 0 || !bias.has_value() || bias_buf.has_value(), op, ": momentum ", momentum,
              " needs bias_buf");
  TORCH_CHECK(bias.has_value() || !bias_buf.has_value(), op, ": bias_buf given without a bias");
  UpdateTarget target{};
  target.mode = UpdateMode::kSgd;
  target.weight = weight.mutable_data_ptr<float>();
  target.bias = mutable_ptr(bias);
  target.weight_buf = mutable_ptr(weight_buf);
  target.bias_buf = mutable_ptr(bias_buf);
  target.lr = static_cast<float>(lr);
  target.momentum = static_cast<float>(momentum);
  target.weight_decay = static_cast<float>(weight_decay);
  run_update(op, x, h, coef, goodness, s, target);
}

// h (L, B, C): float32, contiguous, on the CPU; returns its sizes.
ff_kernels::cpu::EpilogueShape epilogue_shape(const char* op, const at::Tensor& h) {
  TORCH_CHECK(h.dim() == 3, op, ": h must be 3-D (L, B, C), got shape ", h.sizes());
  TORCH_CHECK(h.is_cpu(), op, ": h must be on the CPU, got ", h.device());
  check_tensor(op, "h", h, h.sizes(), h);
  return {h.size(0), h.size(1), h.size(2)};
}

std::tuple<at::Tensor, at::Tensor> ff_relu_goodness_(const at::Tensor& h, const std::optional<at::Tensor>& bias,
                                                     const std::string& goodness, int64_t n_sum,
                                                     const std::optional<at::Tensor>& source) {
  const char* op = "ff_relu_goodness_";
  const ff_kernels::cpu::EpilogueShape s = epilogue_shape(op, h);
  check_optional(op, "bias", bias, {s.locations, s.channels}, h);
  check_optional(op, "source", source, h.sizes(), h);
  if (source.has_value() && h.numel() > 0) {  // both contiguous: the same start, or disjoint ranges
    const float* in = source->const_data_ptr<float>();
    const float* out = h.const_data_ptr<float>();
    TORCH_CHECK(in == out || in + h.numel() <= out || out + h.numel() <= in, op,
                ": source must be h itself or not overlap it");
  }
  TORCH_CHECK(n_sum >= 0 && n_sum <= s.batch, op, ": n_sum must be in [0, B = ", s.batch, "], got ", n_sum);
  const Goodness kind = goodness_of(op, goodness);
  at::Tensor g = at::empty({s.batch}, h.options());
  at::Tensor col_sum = at::empty(n_sum > 0 ? std::vector<int64_t>{s.locations, s.channels} : std::vector<int64_t>{0},
                                 h.options());
  ff_kernels::cpu::relu_goodness(h.mutable_data_ptr<float>(),
                                 source.has_value() ? source->const_data_ptr<float>() : nullptr,
                                 bias.has_value() ? bias->const_data_ptr<float>() : nullptr, kind, g.mutable_data_ptr<float>(),
                                 n_sum > 0 ? col_sum.mutable_data_ptr<float>() : nullptr, n_sum, s,
                                 at::get_num_threads());
  return {g, col_sum};
}

at::Tensor ff_output_delta_(const at::Tensor& h, const at::Tensor& scale, const at::Tensor& out,
                            const std::optional<at::Tensor>& coef, const std::string& goodness,
                            const std::optional<at::Tensor>& extra, int64_t n_extra, bool bias_sum) {
  const char* op = "ff_output_delta_";
  const ff_kernels::cpu::EpilogueShape s = epilogue_shape(op, h);
  check_tensor(op, "scale", scale, {s.batch}, h);
  check_tensor(op, "out", out, {s.batch, s.locations * s.channels}, h);
  check_optional(op, "coef", coef, {s.batch}, h);
  check_optional(op, "extra", extra, {s.locations, s.channels}, h);
  TORCH_CHECK(n_extra >= 0 && n_extra <= s.batch, op, ": n_extra must be in [0, B = ", s.batch, "], got ", n_extra);
  TORCH_CHECK(coef.has_value() || (!extra.has_value() && !bias_sum), op,
              ": extra and bias_sum belong to the delta, which needs coef");
  TORCH_CHECK(!out.is_same(h) && out.data_ptr() != h.data_ptr(), op, ": out must not be h");
  const Goodness kind = goodness_of(op, goodness);
  at::Tensor sum = at::empty(bias_sum ? std::vector<int64_t>{s.locations, s.channels} : std::vector<int64_t>{0},
                             h.options());
  ff_kernels::cpu::output_and_delta(h.mutable_data_ptr<float>(), scale.const_data_ptr<float>(),
                                    out.mutable_data_ptr<float>(),
                                    coef.has_value() ? coef->const_data_ptr<float>() : nullptr, kind,
                                    extra.has_value() ? extra->const_data_ptr<float>() : nullptr, n_extra,
                                    bias_sum ? sum.mutable_data_ptr<float>() : nullptr, s, at::get_num_threads());
  return sum;
}

at::Tensor ff_inverse_scale(const at::Tensor& g, const std::string& goodness, double norm_divisor, double eps) {
  const char* op = "ff_inverse_scale";
  TORCH_CHECK(g.dim() == 1 && g.is_cpu(), op, ": g must be a 1-D CPU tensor (B,), got shape ", g.sizes(), " on ",
              g.device());
  check_tensor(op, "g", g, g.sizes(), g);
  at::Tensor inv = at::empty({g.size(0)}, g.options());
  ff_kernels::cpu::inverse_scale(g.const_data_ptr<float>(), g.size(0), goodness_of(op, goodness),
                                 static_cast<float>(norm_divisor), static_cast<float>(eps),
                                 inv.mutable_data_ptr<float>());
  return inv;
}

std::tuple<at::Tensor, at::Tensor> ff_peer_update_(const at::Tensor& running_mean, const at::Tensor& col_sum,
                                                   int64_t n_pos, double momentum, double strength, bool channels_major) {
  const char* op = "ff_peer_update_";
  TORCH_CHECK(col_sum.dim() == 2 && col_sum.is_cpu(), op, ": col_sum must be a 2-D CPU tensor (L, C), got shape ",
              col_sum.sizes(), " on ", col_sum.device());
  check_tensor(op, "col_sum", col_sum, col_sum.sizes(), col_sum);
  const int64_t locations = col_sum.size(0), channels = col_sum.size(1);
  check_tensor(op, "running_mean", running_mean, {locations * channels}, col_sum);
  TORCH_CHECK(n_pos >= 1, op, ": n_pos must be >= 1, got ", n_pos);
  TORCH_CHECK(momentum >= 0.0 && momentum < 1.0, op, ": momentum must be in [0, 1), got ", momentum);
  at::Tensor p = at::empty({locations * channels}, col_sum.options());
  at::Tensor extra = at::empty({locations, channels}, col_sum.options());
  ff_kernels::cpu::peer_update(running_mean.mutable_data_ptr<float>(), col_sum.const_data_ptr<float>(), locations,
                               channels, n_pos, static_cast<float>(momentum), static_cast<float>(strength),
                               channels_major, p.mutable_data_ptr<float>(), extra.mutable_data_ptr<float>());
  return {p, extra};
}

// The passes of a layer step after ff_relu_goodness_, in one call (each pass after a GEMM pays
// for its code's cache misses, so fewer calls cost less): ff_loss_coef, ff_peer_update_ (when
// col_sum is given: its extra term p / n_pos goes onto the first n_pos rows of the delta),
// ff_inverse_scale and ff_output_delta_, in that order. Returns (loss, p or an empty tensor,
// the delta's column sums or an empty tensor).
std::tuple<at::Tensor, at::Tensor, at::Tensor> ff_loss_output_delta_(
    const at::Tensor& h, const at::Tensor& g, const at::Tensor& out, int64_t n_pos, double signed_inverse_temperature,
    double threshold, const std::string& goodness, double norm_divisor, double eps,
    const std::optional<at::Tensor>& col_sum, const std::optional<at::Tensor>& running_mean, double momentum,
    double strength, bool channels_major, bool bias_sum) {
  const char* op = "ff_loss_output_delta_";
  const ff_kernels::cpu::EpilogueShape s = epilogue_shape(op, h);
  check_tensor(op, "g", g, {s.batch}, h);
  check_tensor(op, "out", out, {s.batch, s.locations * s.channels}, h);
  TORCH_CHECK(!out.is_same(h) && out.data_ptr() != h.data_ptr(), op, ": out must not be h");
  TORCH_CHECK(n_pos >= 0 && n_pos <= s.batch, op, ": n_pos must be in [0, B = ", s.batch, "], got ", n_pos);
  TORCH_CHECK(col_sum.has_value() == running_mean.has_value(), op,
              ": col_sum and running_mean come together (peer normalization) or not at all");
  const bool peer = col_sum.has_value();
  if (peer) {
    check_tensor(op, "col_sum", *col_sum, {s.locations, s.channels}, h);
    check_tensor(op, "running_mean", *running_mean, {s.locations * s.channels}, h);
    TORCH_CHECK(n_pos >= 1, op, ": peer normalization needs n_pos >= 1, got ", n_pos);
    TORCH_CHECK(momentum >= 0.0 && momentum < 1.0, op, ": momentum must be in [0, 1), got ", momentum);
  }
  const Goodness kind = goodness_of(op, goodness);
  at::Tensor coef = at::empty({s.batch}, h.options());
  const float loss = ff_kernels::cpu::loss_and_coef(g.const_data_ptr<float>(), s.batch, n_pos,
                                                    static_cast<float>(signed_inverse_temperature),
                                                    static_cast<float>(threshold), coef.mutable_data_ptr<float>());
  at::Tensor p = at::empty({peer ? s.locations * s.channels : 0}, h.options());
  at::Tensor extra = at::empty({peer ? s.locations : 0, s.channels}, h.options());
  if (peer) {
    ff_kernels::cpu::peer_update(running_mean->mutable_data_ptr<float>(), col_sum->const_data_ptr<float>(), s.locations,
                                 s.channels, n_pos, static_cast<float>(momentum), static_cast<float>(strength),
                                 channels_major, p.mutable_data_ptr<float>(), extra.mutable_data_ptr<float>());
  }
  at::Tensor inv = at::empty({s.batch}, h.options());
  ff_kernels::cpu::inverse_scale(g.const_data_ptr<float>(), s.batch, kind, static_cast<float>(norm_divisor),
                                 static_cast<float>(eps), inv.mutable_data_ptr<float>());
  at::Tensor sum = at::empty(bias_sum ? std::vector<int64_t>{s.locations, s.channels} : std::vector<int64_t>{0},
                             h.options());
  ff_kernels::cpu::output_and_delta(h.mutable_data_ptr<float>(), inv.const_data_ptr<float>(),
                                    out.mutable_data_ptr<float>(), coef.const_data_ptr<float>(), kind,
                                    peer ? extra.const_data_ptr<float>() : nullptr, peer ? n_pos : 0,
                                    bias_sum ? sum.mutable_data_ptr<float>() : nullptr, s, at::get_num_threads());
  at::Tensor total = at::empty({}, h.options());
  total.fill_(loss);
  return {total, p, sum};
}

void ff_sgd_decay_apply_(const at::Tensor& param, const at::Tensor& buf, double lr, double weight_decay) {
  const char* op = "ff_sgd_decay_apply_";
  TORCH_CHECK(param.is_cpu(), op, ": param must be on the CPU, got ", param.device());
  check_tensor(op, "param", param, param.sizes(), param);
  check_tensor(op, "buf", buf, param.sizes(), param);
  TORCH_CHECK(!param.is_same(buf), op, ": param and buf must be two tensors");
  ff_kernels::cpu::sgd_decay_apply(param.mutable_data_ptr<float>(), buf.mutable_data_ptr<float>(), param.numel(),
                                   static_cast<float>(lr), static_cast<float>(weight_decay), at::get_num_threads());
}

std::tuple<at::Tensor, at::Tensor> ff_loss_coef(const at::Tensor& g, int64_t n_pos, double signed_inverse_temperature,
                                                double threshold) {
  const char* op = "ff_loss_coef";
  TORCH_CHECK(g.dim() == 1 && g.is_cpu(), op, ": g must be a 1-D CPU tensor (B,), got shape ", g.sizes(), " on ",
              g.device());
  check_tensor(op, "g", g, g.sizes(), g);
  TORCH_CHECK(n_pos >= 0 && n_pos <= g.size(0), op, ": n_pos must be in [0, B = ", g.size(0), "], got ", n_pos);
  at::Tensor coef = at::empty({g.size(0)}, g.options());
  const float loss = ff_kernels::cpu::loss_and_coef(g.const_data_ptr<float>(), g.size(0), n_pos,
                                                    static_cast<float>(signed_inverse_temperature),
                                                    static_cast<float>(threshold), coef.mutable_data_ptr<float>());
  at::Tensor total = at::empty({}, g.options());
  total.fill_(loss);
  return {total, coef};
}

void gather_columns(const at::Tensor& rows, const at::Tensor& index, const at::Tensor& out) {
  const char* op = "gather_columns";
  check_rows(op, rows);
  check_index(op, "index", index, 1, 0, rows.size(1));
  check_tensor(op, "out", out, {rows.size(0), index.size(0)}, rows);
  ff_kernels::cpu::gather_columns(rows.const_data_ptr<float>(), rows.size(0), rows.size(1),
                                  index.const_data_ptr<int64_t>(), index.size(0), out.mutable_data_ptr<float>(),
                                  at::get_num_threads());
}

void gather_runs(const at::Tensor& rows, const at::Tensor& runs, const at::Tensor& out) {
  const char* op = "gather_runs";
  check_rows(op, rows);
  TORCH_CHECK(out.dim() == 2, op, ": out must be 2-D (B, M), got shape ", out.sizes());
  check_tensor(op, "out", out, {rows.size(0), out.size(1)}, rows);
  check_index_tensor(op, "runs", runs, 2);
  TORCH_CHECK(runs.size(1) == 3, op, ": runs must be (R, 3) rows (dst, src, n), got shape ", runs.sizes());
  const int64_t* r = runs.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < runs.size(0); ++i) {
    const int64_t dst = r[3 * i], src = r[3 * i + 1], n = r[3 * i + 2];
    TORCH_CHECK(dst >= 0 && n >= 0 && dst + n <= out.size(1) && (src == -1 || (src >= 0 && src + n <= rows.size(1))),
                op, ": run ", i, " (dst ", dst, ", src ", src, ", n ", n, ") leaves rows (", rows.size(1),
                " columns) or out (", out.size(1), " columns)");
  }
  ff_kernels::cpu::gather_runs(rows.const_data_ptr<float>(), rows.size(0), rows.size(1), r, runs.size(0),
                               out.mutable_data_ptr<float>(), out.size(1), at::get_num_threads());
}

void gather_interleaved(const at::Tensor& rows, const at::Tensor& starts, int64_t channels, const at::Tensor& out) {
  const char* op = "gather_interleaved";
  check_rows(op, rows);
  TORCH_CHECK(channels >= 1, op, ": channels must be >= 1, got ", channels);
  check_index(op, "starts", starts, 2, -1, rows.size(1) - channels);
  check_tensor(op, "out", out, {rows.size(0), starts.size(0) * starts.size(1) * channels}, rows);
  ff_kernels::cpu::gather_interleaved(rows.const_data_ptr<float>(), rows.size(0), rows.size(1),
                                      starts.const_data_ptr<int64_t>(), starts.size(0), starts.size(1), channels,
                                      out.mutable_data_ptr<float>(), at::get_num_threads());
}

bool built_with_cuda() {
#ifdef FF_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(ff_kernels, m) {
  m.def(
      "local2d_forward(Tensor x, Tensor weight, Tensor? bias, int kernel, int stride, int padding, "
      "Tensor? extra=None, bool relu=True) -> Tensor");
  m.def(
      "local2d_grad_(Tensor x, Tensor h, Tensor coef, str goodness, int kernel, int stride, int padding, "
      "Tensor(a!) weight_grad, Tensor(b!)? bias_grad) -> ()");
  m.def(
      "local2d_sgd_(Tensor x, Tensor h, Tensor coef, str goodness, int kernel, int stride, int padding, "
      "Tensor(a!) weight, Tensor(b!)? bias, Tensor(c!)? weight_buf, Tensor(d!)? bias_buf, "
      "float lr, float momentum, float weight_decay) -> ()");
  m.def("ff_relu_goodness_(Tensor(a!) h, Tensor? bias, str goodness, int n_sum, Tensor? source=None) -> (Tensor, Tensor)");
  m.def(
      "ff_output_delta_(Tensor(a!) h, Tensor scale, Tensor(b!) out, Tensor? coef, str goodness, Tensor? extra, "
      "int n_extra, bool bias_sum) -> Tensor");
  m.def("gather_columns(Tensor rows, Tensor index, Tensor(a!) out) -> ()");
  m.def("gather_runs(Tensor rows, Tensor runs, Tensor(a!) out) -> ()");
  m.def("gather_interleaved(Tensor rows, Tensor starts, int channels, Tensor(a!) out) -> ()");
  m.def("ff_inverse_scale(Tensor g, str goodness, float norm_divisor, float eps) -> Tensor");
  m.def(
      "ff_peer_update_(Tensor(a!) running_mean, Tensor col_sum, int n_pos, float momentum, float strength, "
      "bool channels_major) -> (Tensor, Tensor)");
  m.def("ff_loss_coef(Tensor g, int n_pos, float signed_inverse_temperature, float threshold) -> (Tensor, Tensor)");
  m.def("ff_sgd_decay_apply_(Tensor(a!) param, Tensor(b!) buf, float lr, float weight_decay) -> ()");
  m.def(
      "ff_loss_output_delta_(Tensor(a!) h, Tensor g, Tensor(b!) out, int n_pos, float signed_inverse_temperature, "
      "float threshold, str goodness, float norm_divisor, float eps, Tensor? col_sum, Tensor(c!)? running_mean, "
      "float momentum, float strength, bool channels_major, bool bias_sum) -> (Tensor, Tensor, Tensor)");
  m.def("built_with_cuda() -> bool", &built_with_cuda);
}

TORCH_LIBRARY_IMPL(ff_kernels, CPU, m) {
  m.impl("local2d_forward", &local2d_forward);
  m.impl("local2d_grad_", &local2d_grad_);
  m.impl("local2d_sgd_", &local2d_sgd_);
  m.impl("ff_relu_goodness_", &ff_relu_goodness_);
  m.impl("ff_output_delta_", &ff_output_delta_);
  m.impl("gather_columns", &gather_columns);
  m.impl("gather_runs", &gather_runs);
  m.impl("gather_interleaved", &gather_interleaved);
  m.impl("ff_loss_coef", &ff_loss_coef);
  m.impl("ff_peer_update_", &ff_peer_update_);
  m.impl("ff_inverse_scale", &ff_inverse_scale);
  m.impl("ff_sgd_decay_apply_", &ff_sgd_decay_apply_);
  m.impl("ff_loss_output_delta_", &ff_loss_output_delta_);
}

#ifdef FF_WITH_CUDA
TORCH_LIBRARY_IMPL(ff_kernels, CUDA, m) {
  m.impl("local2d_forward", &local2d_forward);
  m.impl("local2d_grad_", &local2d_grad_);
  m.impl("local2d_sgd_", &local2d_sgd_);
}
#endif

#ifdef TORCH_EXTENSION_NAME
// Built by setup.py as the Python extension ff_kernels._C: importing it loads this library and
// so registers the ops above. The module itself is empty.
#include <Python.h>

#define FF_STR_(x) #x
#define FF_STR(x) FF_STR_(x)
#define FF_CAT_(a, b) a##b
#define FF_CAT(a, b) FF_CAT_(a, b)

PyMODINIT_FUNC FF_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, FF_STR(TORCH_EXTENSION_NAME),
                               "ff_kernels compiled ops, registered as torch.ops.ff_kernels.*", -1, nullptr};
  return PyModule_Create(&module);
}
#endif
