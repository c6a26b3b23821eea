// CPU implementations of the cross-entropy ops (docs/cross_entropy.md): the row kernel (cross_entropy_rows.h) in
// the AVX-512 library where one is registered (wide_kernels.h), else as compiled here.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator headers, not ATen/ATen.h (half of the compile time)
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "../cross_entropy.h"
#include "cross_entropy_rows.h"
#include "wide_kernels.h"

namespace pykernels {
namespace {

void dispatch(const CrossEntropyArgs& a, bool backward) {
  if (const CrossEntropyRowsFn wide = wide_cross_entropy_rows()) return wide(&a, backward);
  cross_entropy_rows(a, backward);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_cpu(
    const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& grad_scale, int64_t ignore_index, double label_smoothing, double z_loss,
    bool write_grad) {
  auto a = make_args(logits, target, weight, grad_scale, ignore_index, label_smoothing, z_loss);
  auto out = alloc_fwd_outputs(logits, write_grad, a);
  dispatch(a, /*backward=*/false);
  return {out.loss, out.lse, out.grad, out.lse_err};
}

at::Tensor bwd_cpu(const at::Tensor& grad_rows, const at::Tensor& logits, const at::Tensor& target,
                   const c10::optional<at::Tensor>& weight, const at::Tensor& lse,
                   const c10::optional<at::Tensor>& lse_err, int64_t ignore_index, double label_smoothing,
                   double z_loss) {
  auto a = make_args(logits, target, weight, grad_rows, ignore_index, label_smoothing, z_loss);
  at::Tensor grad = alloc_bwd(logits, lse, lse_err, a);
  dispatch(a, /*backward=*/true);
  return grad;
}

void scale_grad_cpu(at::Tensor& grad, const at::Tensor& scale) {
  check_scale_grad(grad, scale);
  // On the CPU reading the scalar costs nothing: 1.0 leaves grad untouched.
  if (scale.numel() == 1 && scale.item<double>() == 1.0) return;
  // Row r = n*D + d scales grad[n, :, d]. Multiplying by the (1-D) tensor, not by a Scalar, computes in the
  // promoted fp32/fp64 and rounds once into grad (a Scalar would first be rounded to bf16/fp16).
  grad.mul_(scale.numel() == 1 ? scale : scale.view({grad.size(0), 1, grad.size(2)}));
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, CPU, m) {
  m.impl("cross_entropy_fwd", &fwd_cpu);
  m.impl("cross_entropy_bwd", &bwd_cpu);
  m.impl("cross_entropy_scale_grad_", &scale_grad_cpu);
}

}  // namespace pykernels
