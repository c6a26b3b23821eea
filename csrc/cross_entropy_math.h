// Per-row scalar math shared by the CPU and CUDA cross-entropy kernels (no torch headers: .cu files include it).
#pragma once
#include <cmath>

#ifdef __CUDACC__
#define PYKERNELS_HD_INLINE __host__ __device__ __forceinline__
#else
#define PYKERNELS_HD_INLINE inline
#endif

namespace pykernels {

template <typename T>
PYKERNELS_HD_INLINE bool is_finite(T x) {
#ifdef __CUDA_ARCH__
  return isfinite(x);
#else
  return std::isfinite(x);
#endif
}

// The rounding error of lse = fl(m + log_s), exactly (TwoSum: any magnitudes, no branch on them; no products, so
// nothing to contract into an FMA): lse + residual = m + log s. The backward forms p = exp((x - lse) - residual)
// from it, where exp(x - lse) alone put ulp(lse) / 2 into every probability (5e-4 at logits of 1e4). 0 where lse
// is not finite, so such rows keep what exp(x - lse) gives them (torch's NaN / inf behaviour).
template <typename acc_t>
PYKERNELS_HD_INLINE acc_t lse_residual(acc_t m, acc_t log_s, acc_t lse) {
  const acc_t b = lse - m, a = lse - b;
  return is_finite(lse) ? (m - a) + (log_s - b) : acc_t(0);
}

// sum_c u_c (lse - x_c) (the smoothing term with u = w, or sum_c w_c t'_c (lse - x_c) with u = w t'), which the
// kernels form as `finite` = U rel + sum_c u_c (pivot - x_c) from U = sum_c u_c and rel = lse - pivot. An infinite
// U (a +-inf class weight or target, no NaN) makes the sum U itself, as torch's -sum u log_softmax (every
// lse - x_c > 0), where the decomposition gives inf - inf or inf * 0 = NaN; (rel - rel) keeps a NaN row NaN.
// Per row, once: nothing in the per-class loops. (A NaN U takes the first branch too: NaN either way.)
template <typename acc_t>
PYKERNELS_HD_INLINE acc_t infinite_sum(acc_t U, acc_t finite, acc_t rel) {
  return is_finite(U) ? finite : U + (rel - rel);
}

}  // namespace pykernels
