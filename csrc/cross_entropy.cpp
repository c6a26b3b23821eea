// Cross-entropy operators: schemas, argument checks, and the CUDA implementation's glue.
// Contract: docs/cross_entropy.md. The CPU kernels are in cpu/cross_entropy.cpp, the CUDA ones in
// cuda/cross_entropy.cu; both consume the CrossEntropyArgs built here, once.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator headers, not ATen/ATen.h (half of the compile time)
#include "cross_entropy.h"
#include "dtype_of.h"
#include "huge_pages.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#ifdef PYKERNELS_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda_check.h"
#include "cuda/cross_entropy.h"
#endif

namespace pykernels {

static DType to_dtype(at::ScalarType t) {
  const auto d = dtype_of(t);
  TORCH_CHECK(d, "cross_entropy: logits must be float32, float16, bfloat16 or float64, got ", t);
  return *d;
}

static void check_vector(const at::Tensor& v, const char* name, int64_t numel, const at::Tensor& logits,
                         bool allow_one = false) {
  TORCH_CHECK(v.device() == logits.device(), "cross_entropy: ", name, " must be on ", logits.device(), ", got ",
              v.device());
  TORCH_CHECK(v.scalar_type() == acc_type(logits.scalar_type()), "cross_entropy: ", name, " must be ",
              acc_type(logits.scalar_type()), " for ", logits.scalar_type(), " logits, got ", v.scalar_type());
  TORCH_CHECK(v.is_contiguous(), "cross_entropy: ", name, " must be contiguous");
  TORCH_CHECK(v.numel() == numel || (allow_one && v.numel() == 1), "cross_entropy: ", name, " must have ", numel,
              allow_one ? " elements (or 1)" : " elements", ", got ", v.numel());
}

CrossEntropyArgs make_args(const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                           const c10::optional<at::Tensor>& scale, int64_t ignore_index, double label_smoothing,
                           double z_loss) {
  TORCH_CHECK(logits.dim() == 3, "cross_entropy: logits must be 3-D (N, C, D), got ", logits.dim(), "-D");
  CrossEntropyArgs a;
  a.logits = logits.data_ptr();
  a.dtype = to_dtype(logits.scalar_type());
  a.N = logits.size(0);
  a.C = logits.size(1);
  a.D = logits.size(2);
  TORCH_CHECK(a.C > 0, "cross_entropy: logits must have at least one class");
  a.sn = logits.stride(0);
  a.sc = logits.stride(1);
  a.sd = logits.stride(2);
  TORCH_CHECK(target.device() == logits.device(), "cross_entropy: target must be on ", logits.device());
  if (at::isFloatingType(target.scalar_type())) {
    TORCH_CHECK(target.sizes() == logits.sizes(), "cross_entropy: probability target must have the logits' shape ",
                logits.sizes(), ", got ", target.sizes());
    TORCH_CHECK(target.scalar_type() == logits.scalar_type(), "cross_entropy: probability target must be ",
                logits.scalar_type(), ", got ", target.scalar_type());
    a.target_prob = target.data_ptr();
    a.tn = target.stride(0);
    a.tc = target.stride(1);
    a.td = target.stride(2);
  } else {
    TORCH_CHECK(target.scalar_type() == at::kLong, "cross_entropy: class-index target must be int64, got ",
                target.scalar_type());
    TORCH_CHECK(target.dim() == 1 && target.numel() == a.rows() && target.is_contiguous(),
                "cross_entropy: class-index target must be contiguous of shape (", a.rows(), "), got ", target.sizes());
    a.target_index = target.data_ptr<int64_t>();
  }
  if (weight.has_value()) {
    check_vector(*weight, "weight", a.C, logits);
    a.weight = weight->data_ptr();
  }
  if (scale.has_value()) {
    check_vector(*scale, "grad_scale", a.rows(), logits, /*allow_one=*/true);
    a.scale = scale->data_ptr();
    a.scale_numel = scale->numel();
  }
  a.ignore_index = ignore_index;
  a.label_smoothing = label_smoothing;
  a.z_loss = z_loss;
  return a;
}

CrossEntropyOutputs alloc_fwd_outputs(const at::Tensor& logits, bool write_grad, CrossEntropyArgs& a) {
  auto acc = logits.options().dtype(acc_type(logits.scalar_type()));
  CrossEntropyOutputs out{at::empty({a.rows()}, acc), at::empty({a.rows()}, acc),
                          write_grad ? empty_huge({a.N, a.C, a.D}, logits.options()) : at::empty({0}, logits.options()),
                          at::empty({a.rows()}, acc)};
  a.loss = out.loss.data_ptr();
  a.lse = out.lse.data_ptr();
  a.lse_err = out.lse_err.data_ptr();
  a.grad = write_grad ? out.grad.data_ptr() : nullptr;
  return out;
}

at::Tensor alloc_bwd(const at::Tensor& logits, const at::Tensor& lse, const c10::optional<at::Tensor>& lse_err,
                     CrossEntropyArgs& a) {
  check_vector(lse, "lse", a.rows(), logits);
  a.lse_in = lse.data_ptr();
  if (lse_err.has_value()) {
    check_vector(*lse_err, "lse_err", a.rows(), logits);
    a.lse_err_in = lse_err->data_ptr();
  }
  at::Tensor grad = empty_huge({a.N, a.C, a.D}, logits.options());
  a.grad = grad.data_ptr();
  return grad;
}

void check_scale_grad(const at::Tensor& grad, const at::Tensor& scale) {
  TORCH_CHECK(grad.dim() == 3 && grad.is_contiguous(), "cross_entropy_scale_grad_: grad must be contiguous (N, C, D)");
  const int64_t rows = grad.size(0) * grad.size(2);
  check_vector(scale, "scale", rows, grad, /*allow_one=*/true);
}

// Extra scalar needed by label smoothing with class weights: W = sum(weight), computed once per call on the
// device (no host sync) instead of once per row.
c10::optional<at::Tensor> weight_sum(const c10::optional<at::Tensor>& weight, double label_smoothing,
                                     CrossEntropyArgs& a) {
  if (!weight.has_value() || label_smoothing == 0.0) return c10::nullopt;
  at::Tensor w = weight->sum();
  a.weight_sum = w.data_ptr();
  return w;
}

TORCH_LIBRARY_FRAGMENT(pykernels, m) {
  m.def("cross_entropy_fwd(Tensor logits, Tensor target, Tensor? weight, Tensor? grad_scale, int ignore_index, "
        "float label_smoothing, float z_loss, bool write_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("cross_entropy_bwd(Tensor grad_rows, Tensor logits, Tensor target, Tensor? weight, Tensor lse, "
        "Tensor? lse_err, int ignore_index, float label_smoothing, float z_loss) -> Tensor");
  m.def("cross_entropy_scale_grad_(Tensor(a!) grad, Tensor scale) -> ()");
}

#ifdef PYKERNELS_WITH_CUDA
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_cuda(
    const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& grad_scale, int64_t ignore_index, double label_smoothing, double z_loss,
    bool write_grad) {
  TORCH_CHECK(logits.scalar_type() != at::kDouble, "cross_entropy (cuda): float64 logits are not supported");
  c10::cuda::CUDAGuard guard(logits.device());
  auto a = make_args(logits, target, weight, grad_scale, ignore_index, label_smoothing, z_loss);
  auto wsum = weight_sum(weight, label_smoothing, a);
  auto out = alloc_fwd_outputs(logits, write_grad, a);
  if (a.rows() > 0) check_cuda(cuda::cross_entropy_fwd(a, c10::cuda::getCurrentCUDAStream()), "cross_entropy_fwd");
  return {out.loss, out.lse, out.grad, out.lse_err};
}

at::Tensor bwd_cuda(const at::Tensor& grad_rows, const at::Tensor& logits, const at::Tensor& target,
                    const c10::optional<at::Tensor>& weight, const at::Tensor& lse,
                    const c10::optional<at::Tensor>& lse_err, int64_t ignore_index, double label_smoothing,
                    double z_loss) {
  TORCH_CHECK(logits.scalar_type() != at::kDouble, "cross_entropy (cuda): float64 logits are not supported");
  c10::cuda::CUDAGuard guard(logits.device());
  auto a = make_args(logits, target, weight, grad_rows, ignore_index, label_smoothing, z_loss);
  auto wsum = weight_sum(weight, label_smoothing, a);
  at::Tensor grad = alloc_bwd(logits, lse, lse_err, a);
  if (a.rows() > 0) check_cuda(cuda::cross_entropy_bwd(a, c10::cuda::getCurrentCUDAStream()), "cross_entropy_bwd");
  return grad;
}

void scale_grad_cuda(at::Tensor& grad, const at::Tensor& scale) {
  check_scale_grad(grad, scale);
  TORCH_CHECK(grad.scalar_type() != at::kDouble, "cross_entropy (cuda): float64 is not supported");
  c10::cuda::CUDAGuard guard(grad.device());
  if (grad.numel() == 0) return;
  check_cuda(cuda::cross_entropy_scale_grad(grad.data_ptr(), to_dtype(grad.scalar_type()), grad.size(0),
                                            grad.size(1), grad.size(2), scale.data_ptr<float>(), scale.numel(),
                                            c10::cuda::getCurrentCUDAStream()),
             "cross_entropy_scale_grad_");
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, CUDA, m) {
  m.impl("cross_entropy_fwd", &fwd_cuda);
  m.impl("cross_entropy_bwd", &bwd_cuda);
  m.impl("cross_entropy_scale_grad_", &scale_grad_cuda);
}
#endif

}  // namespace pykernels
