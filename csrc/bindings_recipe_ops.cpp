// The recipes' compiled CPU ops, registered as a fragment of the ff_kernels library
// (bindings.cpp defines it): torch.ops.ff_kernels.<name>.
//
//   head_logits_add_(x, w, out!) -> ()                               out += x @ w.T
//   head_weight_grad_add_(dz, x, columns?, grad!) -> ()              grad[:, columns] += dz.T @ x
//   cross_entropy_logit_grad(z, labels) -> dz                        (softmax(z) - onehot(labels)) / B
//   hybrid_mix(images, partners, words, rows, cols, out!) -> ()      hybrid images from random bits
//   label_preacts(preact, rows, index, divisor?, bias?) -> z          layer 1's z of R label sets
//
// Shapes and math: csrc/head_cpu.h (a softmax head's GEMMs and its cross-entropy gradient),
// csrc/hybrid_cpu.h (the hybrid negatives of section 3.2) and csrc/label_preacts_cpu.h (the
// supervised recipe's shared first layer).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "head_cpu.h"
#include "hybrid_cpu.h"
#include "label_preacts_cpu.h"
#include "op_checks.h"

namespace {

using ff_kernels::checks::check_index;
using ff_kernels::checks::check_index_tensor;
using ff_kernels::checks::check_rows;
using ff_kernels::checks::check_tensor;

void head_logits_add_(const at::Tensor& x, const at::Tensor& w, const at::Tensor& out) {
  const char* op = "head_logits_add_";
  check_rows(op, x);
  TORCH_CHECK(w.dim() == 2, op, ": w must be 2-D (K, F), got shape ", w.sizes());
  check_tensor(op, "w", w, {w.size(0), x.size(1)}, x);
  check_tensor(op, "out", out, {x.size(0), w.size(0)}, x);
  ff_kernels::cpu::head_logits_add(x.const_data_ptr<float>(), w.const_data_ptr<float>(), out.mutable_data_ptr<float>(),
                                   x.size(0), x.size(1), w.size(0), at::get_num_threads());
}

void head_weight_grad_add_(const at::Tensor& dz, const at::Tensor& x, const std::optional<at::Tensor>& columns,
                           const at::Tensor& grad) {
  const char* op = "head_weight_grad_add_";
  check_rows(op, x);
  TORCH_CHECK(dz.dim() == 2, op, ": dz must be 2-D (B, K), got shape ", dz.sizes());
  check_tensor(op, "dz", dz, {x.size(0), dz.size(1)}, x);
  TORCH_CHECK(grad.dim() == 2, op, ": grad must be 2-D (K, N), got shape ", grad.sizes());
  check_tensor(op, "grad", grad, {dz.size(1), grad.size(1)}, x);
  const int64_t* cols = nullptr;
  if (columns.has_value()) {
    check_index(op, "columns", *columns, 1, 0, grad.size(1) - 1);
    TORCH_CHECK(columns->size(0) == x.size(1), op, ": columns must have one entry per column of x (", x.size(1),
                "), got ", columns->size(0));
    cols = columns->const_data_ptr<int64_t>();
    std::vector<bool> seen(static_cast<size_t>(grad.size(1)), false);  // threads write disjoint columns
    for (int64_t f = 0; f < x.size(1); ++f) {
      TORCH_CHECK(!seen[cols[f]], op, ": columns must be distinct, got ", cols[f], " twice");
      seen[cols[f]] = true;
    }
  } else {
    TORCH_CHECK(grad.size(1) == x.size(1), op, ": without columns grad must be (K, F) = (", dz.size(1), ", ",
                x.size(1), "), got ", grad.sizes());
  }
  ff_kernels::cpu::head_weight_grad_add(dz.const_data_ptr<float>(), x.const_data_ptr<float>(), cols,
                                        grad.mutable_data_ptr<float>(), grad.size(1), x.size(0), x.size(1),
                                        dz.size(1), at::get_num_threads());
}

at::Tensor cross_entropy_logit_grad(const at::Tensor& z, const at::Tensor& labels) {
  const char* op = "cross_entropy_logit_grad";
  TORCH_CHECK(z.dim() == 2 && z.size(1) >= 1, op, ": z must be 2-D (B, K) with K >= 1, got shape ", z.sizes());
  TORCH_CHECK(z.is_cpu(), op, ": z must be on the CPU, got ", z.device());
  check_tensor(op, "z", z, z.sizes(), z);
  check_index(op, "labels", labels, 1, 0, z.size(1) - 1);
  TORCH_CHECK(labels.size(0) == z.size(0), op, ": labels must be (B,) = (", z.size(0), ",), got ", labels.sizes());
  at::Tensor dz = at::empty(z.sizes(), z.options());
  ff_kernels::cpu::cross_entropy_logit_grad(z.const_data_ptr<float>(), labels.const_data_ptr<int64_t>(),
                                            dz.mutable_data_ptr<float>(), z.size(0), z.size(1));
  return dz;
}

void hybrid_mix(const at::Tensor& images, const at::Tensor& partners, const at::Tensor& words, const at::Tensor& rows,
                const at::Tensor& cols, const at::Tensor& out) {
  const char* op = "hybrid_mix";
  TORCH_CHECK(images.dim() == 3, op, ": images must be 3-D (B, H, W), got shape ", images.sizes());
  TORCH_CHECK(images.is_cpu(), op, ": images must be on the CPU, got ", images.device());
  check_tensor(op, "images", images, images.sizes(), images);
  const int64_t batch = images.size(0), height = images.size(1), width = images.size(2);
  check_index(op, "partners", partners, 1, 0, batch - 1);
  TORCH_CHECK(partners.size(0) == batch, op, ": partners must be (B,) = (", batch, ",), got ", partners.sizes());
  check_index_tensor(op, "words", words, 1);
  const int64_t bits = batch * height * width;
  TORCH_CHECK(words.size(0) == (bits + 31) / 32, op, ": words must hold the ", bits, " bits 32 to an entry, (",
              (bits + 31) / 32, ",), got ", words.sizes());
  check_tensor(op, "rows", rows, {height, height}, images);
  check_tensor(op, "cols", cols, {width, width}, images);
  check_tensor(op, "out", out, images.sizes(), images);
  TORCH_CHECK(!out.is_same(images), op, ": out must not be images (a hybrid reads its partner's pixels)");
  ff_kernels::cpu::hybrid_mix(images.const_data_ptr<float>(), partners.const_data_ptr<int64_t>(),
                              words.const_data_ptr<int64_t>(), rows.const_data_ptr<float>(), cols.const_data_ptr<float>(),
                              out.mutable_data_ptr<float>(), batch, height, width, at::get_num_threads());
}

}  // namespace

at::Tensor label_preacts(const at::Tensor& preact, const at::Tensor& rows, const at::Tensor& index,
                         const std::optional<at::Tensor>& divisor, const std::optional<at::Tensor>& bias) {
  const char* op = "label_preacts";
  TORCH_CHECK(preact.dim() == 2 && preact.is_cpu(), op, ": preact must be a 2-D CPU tensor (B, W), got shape ",
              preact.sizes(), " on ", preact.device());
  check_tensor(op, "preact", preact, preact.sizes(), preact);
  const int64_t batch = preact.size(0), width = preact.size(1);
  TORCH_CHECK(rows.dim() == 2, op, ": rows must be 2-D (K, W), got shape ", rows.sizes());
  check_tensor(op, "rows", rows, {rows.size(0), width}, preact);
  TORCH_CHECK(index.dim() == 2 && index.size(1) == batch, op, ": index must be (R, B = ", batch, "), got shape ",
              index.sizes());
  check_index(op, "index", index, 2, 0, rows.size(0) - 1);
  const int64_t sets = index.size(0);
  if (divisor.has_value()) check_tensor(op, "divisor", *divisor, {sets, batch}, preact);
  if (bias.has_value()) check_tensor(op, "bias", *bias, {width}, preact);
  at::Tensor z = at::empty({sets, batch, width}, preact.options());
  ff_kernels::cpu::label_preacts(preact.const_data_ptr<float>(), rows.const_data_ptr<float>(),
                                 index.const_data_ptr<int64_t>(),
                                 divisor.has_value() ? divisor->const_data_ptr<float>() : nullptr,
                                 bias.has_value() ? bias->const_data_ptr<float>() : nullptr, z.mutable_data_ptr<float>(),
                                 sets, batch, width, at::get_num_threads());
  return z;
}

TORCH_LIBRARY_FRAGMENT(ff_kernels, m) {
  m.def("head_logits_add_(Tensor x, Tensor w, Tensor(a!) out) -> ()");
  m.def("head_weight_grad_add_(Tensor dz, Tensor x, Tensor? columns, Tensor(a!) grad) -> ()");
  m.def("cross_entropy_logit_grad(Tensor z, Tensor labels) -> Tensor");
  m.def("hybrid_mix(Tensor images, Tensor partners, Tensor words, Tensor rows, Tensor cols, Tensor(a!) out) -> ()");
  m.def("label_preacts(Tensor preact, Tensor rows, Tensor index, Tensor? divisor, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(ff_kernels, CPU, m) {
  m.impl("head_logits_add_", &head_logits_add_);
  m.impl("head_weight_grad_add_", &head_weight_grad_add_);
  m.impl("cross_entropy_logit_grad", &cross_entropy_logit_grad);
  m.impl("hybrid_mix", &hybrid_mix);
  m.impl("label_preacts", &label_preacts);
}
