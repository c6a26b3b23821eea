// Plain description of one cross-entropy call, shared by the CPU and CUDA kernels (no torch headers, so .cu
// files that include it compile fast). Filled once by make_args() in cross_entropy.cpp.
#pragma once
#include <cstdint>

#include "dtype.h"

namespace pykernels {

struct CrossEntropyArgs {
  // logits: logical (N, C, D), element (n, c, d) at n*sn + c*sc + d*sd; row r = n*D + d.
  const void* logits = nullptr;
  DType dtype = DType::F32;
  int64_t N = 0, C = 0, D = 1;
  int64_t sn = 0, sc = 1, sd = 0;
  // class-index targets: int64 (N*D) contiguous; or probability targets of the logits' dtype and layout.
  const int64_t* target_index = nullptr;
  const void* target_prob = nullptr;
  int64_t tn = 0, tc = 1, td = 0;
  // accumulation-dtype vectors (fp32; fp64 for fp64 logits)
  const void* weight = nullptr;      // (C) or null
  const void* weight_sum = nullptr;  // () sum of weight, when weight and smoothing
  const void* scale = nullptr;       // grad scale: numel 1 (scale_numel == 1) or one per row; null = 1
  int64_t scale_numel = 0;
  const void* lse_in = nullptr;      // backward: saved lse (M)
  const void* lse_err_in = nullptr;  // backward: saved rounding residual of lse (M), or null (taken as 0)
  void* loss = nullptr;              // forward outputs (M)
  void* lse = nullptr;
  void* lse_err = nullptr;           // (m - lse) + log s: lse + lse_err = m + log s to twice the precision
  void* grad = nullptr;              // contiguous (N, C, D), or null
  int64_t ignore_index = -100;
  double label_smoothing = 0.0;
  double z_loss = 0.0;
  PYKERNELS_HD int64_t rows() const { return N * D; }
};

}  // namespace pykernels
