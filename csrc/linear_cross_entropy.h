// Tensor-level helpers of the fused linear cross-entropy kernel ops, shared by the CPU and CUDA implementations
// (pykernels::linear_cross_entropy_partials / _dlogits): the argument checks are written once, in
// linear_cross_entropy.cpp. Contract: docs/linear_cross_entropy.md.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "acc_type.h"

namespace pykernels {

// Checks the operands both kernels take (names the offending argument): input (N, H) and linear_weight (V, H) of
// one dtype with contiguous rows on one device, target (N,) int64, linear_bias (V,) in input's dtype, weight (V,)
// in the accumulation dtype, softcap >= 0.
void check_lce_operands(const char* op, const at::Tensor& x, const at::Tensor& w,
                        const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                        const c10::optional<at::Tensor>& weight, double softcap);

// Checks a per-row vector: (N,) contiguous, of the accumulation dtype, on x's device.
void check_lce_row_vector(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x);

// Checks the dlogits kernel's own arguments: the per-row vectors (N,) of the accumulation dtype (coef_w only with
// smooth), dl (N, n_cols) in input's dtype (or, with acc_dl, the accumulation dtype) with contiguous rows inside
// the V classes from col0, and db_part (at least cdiv(N, db_rows) rows of n_cols, accumulation dtype, contiguous
// rows) when given.
void check_lce_dlogits(const char* op, const at::Tensor& x, int64_t V, const at::Tensor& m, const at::Tensor& log_s,
                       const at::Tensor& coef_p, const at::Tensor& coef_y, const at::Tensor& coef_w, bool smooth,
                       int64_t col0, const at::Tensor& dl, const c10::optional<at::Tensor>& db_part,
                       int64_t db_rows, bool acc_dl = false);

}  // namespace pykernels
