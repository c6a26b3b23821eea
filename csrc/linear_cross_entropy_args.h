// Plain description of one fused linear cross-entropy kernel launch, shared by the C++ glue
// (linear_cross_entropy.cpp) and the CUDA kernels (cuda/linear_cross_entropy.cu; no torch headers there).
// Contract and math: docs/linear_cross_entropy.md.
#pragma once
#include <cstdint>

#include "dtype.h"

namespace pykernels {

struct LinearCrossEntropyArgs {
  // logits z[r, c] = softcap(x[r] . w[c] + bias[c]) of this shard's classes c in [0, V)
  const void* x = nullptr;          // (N, H), rows sx apart, contiguous H; fp16/bf16
  const void* w = nullptr;          // (V, H), rows sw apart, contiguous H; x's dtype
  const void* bias = nullptr;       // (V,) x's dtype, or null
  const int64_t* target = nullptr;  // (N,) class of the whole vocabulary; this shard's column is target - vocab_start
  const float* class_weight = nullptr;  // (V,) fp32 (the smoothing term's w_c), or null
  DType dtype = DType::F16;
  int64_t N = 0, V = 0, H = 0, sx = 0, sw = 0, vocab_start = 0;
  float softcap = 0.f;  // 0 = off
  bool smooth = false;  // label smoothing: also sum_c w_c z_c
  bool vec16 = false;   // rows of x and w 16-byte aligned, H a multiple of 8: cp.async tile loads

  // forward: per (split, row) partials (splits, N) fp32: running max, sum of exp(z - max), z_target, sum w_c z_c
  float *m_part = nullptr, *s_part = nullptr, *zy_part = nullptr, *zs_part = nullptr;
  int64_t splits = 1;

  // backward: dlogits of columns [col0, col0 + n_cols) into dl (N, n_cols), row stride ldl, x's dtype:
  // (coef_p exp(z - m - log_s) - coef_y [c == y] - coef_w w_c) softcap'(z); per-row fp32 (N,) inputs
  const float *m = nullptr, *log_s = nullptr, *coef_p = nullptr, *coef_y = nullptr, *coef_w = nullptr;
  void* dl = nullptr;
  int64_t ldl = 0, col0 = 0, n_cols = 0;
  float* db_part = nullptr;  // or null: column sums of each BM-row block of dl, (cdiv(N, BM), n_cols) row stride ldb
  int64_t ldb = 0;
};

}  // namespace pykernels
