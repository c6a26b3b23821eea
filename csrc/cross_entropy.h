// Tensor-level helpers shared by the CPU and CUDA implementations of the cross-entropy ops: the argument
// checks and the CrossEntropyArgs they produce are written once, in cross_entropy.cpp.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "acc_type.h"
#include "cross_entropy_args.h"

namespace pykernels {

struct CrossEntropyOutputs {
  at::Tensor loss, lse, grad, lse_err;
};

CrossEntropyArgs make_args(const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                           const c10::optional<at::Tensor>& scale, int64_t ignore_index, double label_smoothing,
                           double z_loss);
CrossEntropyOutputs alloc_fwd_outputs(const at::Tensor& logits, bool write_grad, CrossEntropyArgs& a);
at::Tensor alloc_bwd(const at::Tensor& logits, const at::Tensor& lse, const c10::optional<at::Tensor>& lse_err,
                     CrossEntropyArgs& a);
c10::optional<at::Tensor> weight_sum(const c10::optional<at::Tensor>& weight, double label_smoothing,
                                     CrossEntropyArgs& a);
void check_scale_grad(const at::Tensor& grad, const at::Tensor& scale);

}  // namespace pykernels
