// Device helpers shared by the cross-entropy kernels (cross_entropy.cu, cross_entropy_cluster.cu).
// No torch headers.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "convert.cuh"
#include "../cross_entropy_math.h"

namespace pykernels {
namespace cuda {
namespace ce {

// Measurement knobs (bench/tune_cross_entropy.py): an integer environment variable, 0 when unset.
inline int64_t knob(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::atoll(v) : 0;
}

// A thread-count knob in whole warps within [32, max] (block_reduce shuffles with full masks); 0 when unset.
inline int threads_knob(const char* name, int max) {
  const int64_t t = knob(name);
  return t > 0 ? static_cast<int>(std::min<int64_t>(max, std::max<int64_t>(32, t / 32 * 32))) : 0;
}

// e^x through the SFU's ex2.approx (about 2 ulp): one FMUL + one MUFU instead of expf's ~10 instructions,
// which matters because a row costs two exponentials per element. -inf -> 0, NaN -> NaN.
__device__ __forceinline__ float fast_exp(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
  return y;
}

// Online softmax state: running max m and sum of exp(x - m).
struct MaxSum {
  float m, s;
  // n values at once: one rescale per vector instead of a branch per element.
  template <int N>
  __device__ __forceinline__ void add_vec(const float (&x)[N], int n) {
    float vmax = -INFINITY;
#pragma unroll
    for (int j = 0; j < N; ++j)
      if (j < n) vmax = fmaxf(vmax, x[j]);
    if (vmax == -INFINITY) {
#pragma unroll
      for (int j = 0; j < N; ++j)  // a NaN must still poison the row (fmaxf drops NaN)
        if (j < n && x[j] != x[j]) s = x[j];
      return;
    }
    if (vmax > m) {
      s = (m == -INFINITY ? s * 0.f : s * fast_exp(m - vmax));  // while m is -inf, s is 0 or a NaN to keep
      m = vmax;
    }
#pragma unroll
    for (int j = 0; j < N; ++j)
      if (j < n) s += fast_exp(x[j] - m);  // NaN x poisons s; -inf adds 0
  }
  __device__ __forceinline__ void merge(MaxSum o) {
    const float nm = fmaxf(m, o.m);
    if (nm == -INFINITY) {  // both sides saw no finite logit: their s are 0 or NaN, and a NaN must survive
      s += o.s;
      return;
    }
    s = (m == -INFINITY ? s * 0.f : s * fast_exp(m - nm)) + (o.m == -INFINITY ? o.s * 0.f : o.s * fast_exp(o.m - nm));
    m = nm;
  }
};

// Sums are taken relative to a pivot logit (the target's, or the row's first) so that a large common offset
// of the logits cancels exactly: W lse - sum w x = W ((m - pivot) + log s) - sum w (x - pivot).
struct RowSums {
  MaxSum ms;
  float wx, wt, wtx;  // sum w_c (x_c - pivot) (smoothing); sum w_c t'_c, sum w_c t'_c (x_c - pivot) (probs)
};

// Block-wide reduction of RowSums; every thread gets the result. smem: 32 entries.
__device__ __forceinline__ RowSums block_reduce(RowSums v, RowSums* smem) {
  for (int off = 16; off > 0; off >>= 1) {
    MaxSum o{__shfl_xor_sync(0xffffffffu, v.ms.m, off), __shfl_xor_sync(0xffffffffu, v.ms.s, off)};
    v.ms.merge(o);
    v.wx += __shfl_xor_sync(0xffffffffu, v.wx, off);
    v.wt += __shfl_xor_sync(0xffffffffu, v.wt, off);
    v.wtx += __shfl_xor_sync(0xffffffffu, v.wtx, off);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
  __syncthreads();  // smem may still be read from the previous row
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  RowSums r = smem[0];
  for (int i = 1; i < nwarps; ++i) {
    r.ms.merge(smem[i].ms);
    r.wx += smem[i].wx;
    r.wt += smem[i].wt;
    r.wtx += smem[i].wtx;
  }
  return r;
}

}  // namespace ce
}  // namespace cuda
}  // namespace pykernels
