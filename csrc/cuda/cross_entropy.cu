// CUDA kernels of the cross-entropy ops (contract and math: docs/cross_entropy.md). No torch headers.
//
// One thread block per row, persistent over rows. Pass 1 reads the row once from HBM with 16-byte loads and
// keeps a per-thread online (max, sum-exp) pair plus the sums label smoothing / probability targets need;
// a block reduction gives lse. With the gradient requested, pass 2 re-reads the row — the grid is sized so
// the rows in flight fit in L2, so this read is served from L2 — and writes the gradient once. All math in
// fp32; the target entry's p_y - 1 is formed in fp32 before its single rounding.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdlib>

#include "cross_entropy.h"
#include "cross_entropy_common.cuh"

namespace pykernels {
namespace cuda {
namespace {

using namespace ce;

constexpr int kMaxThreads = 1024;

constexpr int kUnroll = 4;  // 16-byte loads in flight per thread: hides HBM latency with few rows in flight

// Classes before the row's first 16-byte boundary (a row of odd C, e.g. 50257, starts anywhere): they go one by
// one, the rest of the row in 16-byte vectors. Tensor data is always element-aligned.
template <typename T>
__device__ __forceinline__ int64_t head_of(const T* row, int64_t C) {
  const int64_t h = static_cast<int64_t>((16 - reinterpret_cast<uintptr_t>(row) % 16) % 16) / sizeof(T);
  return h < C ? h : C;
}

// Calls f(c0, xs, n) over a row: xs holds the n classes c0..c0+n-1 as fp32 (n = 16 / sizeof(T) on the fast
// path). With class stride 1: 16-byte loads, kUnroll of them issued before use; else one strided load per class.
template <typename T, typename F>
__device__ __forceinline__ void for_each_class(const T* row, int64_t C, int64_t sc, F&& f) {
  constexpr int V = 16 / sizeof(T);
  float xs[V];
  const int64_t step = blockDim.x;
  if (sc == 1) {
    const int64_t head = head_of(row, C);
    for (int64_t c = threadIdx.x; c < head; c += step) {
      xs[0] = to_f(row[c]);
      f(c, xs, 1);
    }
    const int64_t nvec = (C - head) / V;
    const uint4* vrow = reinterpret_cast<const uint4*>(row + head);
    int64_t i = threadIdx.x;
    for (; i + (kUnroll - 1) * step < nvec; i += kUnroll * step) {
      uint4 raw[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) raw[u] = vrow[i + u * step];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const T* e = reinterpret_cast<const T*>(&raw[u]);
#pragma unroll
        for (int j = 0; j < V; ++j) xs[j] = to_f(e[j]);
        f(head + (i + u * step) * V, xs, V);
      }
    }
    for (; i < nvec; i += step) {
      const uint4 raw = vrow[i];
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int j = 0; j < V; ++j) xs[j] = to_f(e[j]);
      f(head + i * V, xs, V);
    }
    for (int64_t c = head + nvec * V + threadIdx.x; c < C; c += step) {
      xs[0] = to_f(row[c]);
      f(c, xs, 1);
    }
  } else {
    for (int64_t c = threadIdx.x; c < C; c += step) {
      xs[0] = to_f(row[c * sc]);
      f(c, xs, 1);
    }
  }
}

// out[c * so] = g(c, x_c) for every class; batched 16-byte loads and stores when both rows have unit stride and
// the same alignment phase (then they share the scalar head).
template <typename T, typename G>
__device__ __forceinline__ void map_row(const T* row, int64_t C, int64_t sc, T* out, int64_t so, G&& g) {
  constexpr int V = 16 / sizeof(T);
  const int64_t step = blockDim.x;
  if (sc == 1 && so == 1 && reinterpret_cast<uintptr_t>(row) % 16 == reinterpret_cast<uintptr_t>(out) % 16) {
    const int64_t head = head_of(row, C);
    for (int64_t c = threadIdx.x; c < head; c += step) out[c] = from_f<T>(g(c, to_f(row[c])));
    const int64_t nvec = (C - head) / V;
    const uint4* vrow = reinterpret_cast<const uint4*>(row + head);
    uint4* vout = reinterpret_cast<uint4*>(out + head);
    auto convert = [&](int64_t i, const uint4& raw) {
      const T* e = reinterpret_cast<const T*>(&raw);
      uint4 res;
      T* o = reinterpret_cast<T*>(&res);
#pragma unroll
      for (int j = 0; j < V; ++j) o[j] = from_f<T>(g(head + i * V + j, to_f(e[j])));
      vout[i] = res;
    };
    int64_t i = threadIdx.x;
    for (; i + (kUnroll - 1) * step < nvec; i += kUnroll * step) {
      uint4 raw[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) raw[u] = vrow[i + u * step];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) convert(i + u * step, raw[u]);
    }
    for (; i < nvec; i += step) convert(i, vrow[i]);
    for (int64_t c = head + nvec * V + threadIdx.x; c < C; c += step) out[c] = from_f<T>(g(c, to_f(row[c])));
  } else {
    for (int64_t c = threadIdx.x; c < C; c += step) out[c * so] = from_f<T>(g(c, to_f(row[c * sc])));
  }
}

template <typename T>
__device__ __forceinline__ void fill_row(T* out, int64_t C, int64_t so, float v) {
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) out[c * so] = from_f<T>(v);
}

enum Mode { kFwd = 0, kFwdGrad = 1, kBwd = 2 };

template <typename T, bool PROB, int MODE>
__global__ void __launch_bounds__(kMaxThreads) cross_entropy_kernel(const CrossEntropyArgs a) {
  __shared__ RowSums smem[32];
  const T* X = static_cast<const T*>(a.logits);
  const T* TP = static_cast<const T*>(a.target_prob);
  T* G = static_cast<T*>(a.grad);
  const float* w = static_cast<const float*>(a.weight);
  const float* scale = static_cast<const float*>(a.scale);
  const float eps = static_cast<float>(a.label_smoothing), zl = static_cast<float>(a.z_loss);
  const int64_t C = a.C, D = a.D, M = a.rows();
  const float W = a.weight_sum ? *static_cast<const float*>(a.weight_sum) : static_cast<float>(C);
  const float nan = __int_as_float(0x7fffffff);

  for (int64_t r = blockIdx.x; r < M; r += gridDim.x) {
    const int64_t n = r / D, d = r - n * D;
    const T* row = X + n * a.sn + d * a.sd;
    const T* trow = PROB ? TP + n * a.tn + d * a.td : nullptr;
    T* grow = MODE != kFwd ? G + n * C * D + d : nullptr;  // contiguous (N, C, D): class stride D
    int64_t y = 0;
    bool ignored = false, invalid = false;
    if (!PROB) {
      y = a.target_index[r];
      ignored = y == a.ignore_index;
      invalid = !ignored && (y < 0 || y >= C);
    }
    if (MODE == kBwd && (ignored || invalid)) {
      fill_row(grow, C, D, ignored ? 0.f : nan);
      continue;
    }

    // Pass 1 (forward): lse and the weighted sums. Backward: only the target sums, lse is saved.
    RowSums v{{-INFINITY, 0.f}, 0.f, 0.f, 0.f};
    float pivot = 0.f, x_off = 0.f;  // x_off: a non-finite target logit, subtracted from lse as it is
    if (MODE != kBwd) {
      pivot = PROB ? to_f(row[0]) : (ignored || invalid ? 0.f : to_f(row[y * a.sc]));
      if (!isfinite(pivot)) {
        if (!PROB) x_off = pivot;
        pivot = 0.f;
      }
      for_each_class(row, C, a.sc, [&](int64_t c0, const auto& xs, int n) {
        v.ms.add_vec(xs, n);
        if (PROB || eps > 0.f) {
          for (int j = 0; j < n; ++j) {
            const int64_t c = c0 + j;
            const float x = xs[j];
            if (PROB) {
              const float t = (1.f - eps) * to_f(trow[c * a.tc]) + eps / C;
              const float wt = w ? w[c] * t : t;
              v.wt += wt;
              if (wt != 0.f) v.wtx += wt * (x - pivot);
            } else {
              v.wx += (w ? w[c] : 1.f) * (x - pivot);
            }
          }
        }
      });
    } else if (PROB) {
      for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
        const float t = (1.f - eps) * to_f(trow[c * a.tc]) + eps / C;
        v.wt += w ? w[c] * t : t;
      }
    }
    const RowSums s = (MODE == kBwd && !PROB) ? v : block_reduce(v, smem);  // uniform per row
    const float log_s = logf(s.ms.s);
    const float lse = MODE == kBwd ? static_cast<const float*>(a.lse_in)[r] : s.ms.m + log_s;

    if (MODE != kBwd && threadIdx.x == 0) {
      const float rel = (s.ms.m - pivot) + log_s;  // lse - pivot without the offset's rounding
      float loss;
      if (PROB) {
        loss = infinite_sum(s.wt, s.wt * rel - s.wtx, rel);
      } else if (ignored) {
        loss = 0.f;
      } else if (invalid) {
        loss = nan;
      } else {
        const float wy = w ? w[y] : 1.f;
        loss = wy * (1.f - eps) * (rel - x_off);
        if (eps > 0.f) loss += eps / C * infinite_sum(W, W * rel - s.wx, rel);
      }
      if (zl > 0.f && !ignored && !invalid) loss += zl * lse * lse;
      static_cast<float*>(a.loss)[r] = loss;
      static_cast<float*>(a.lse)[r] = lse;
      static_cast<float*>(a.lse_err)[r] = lse_residual(s.ms.m, log_s, lse);
    }
    if (MODE == kFwd) continue;
    if (ignored || invalid) {
      fill_row(grow, C, D, ignored ? 0.f : nan);
      continue;
    }

    // Pass 2: the gradient, s * (p_c K - [c == y] w_y (1 - eps) - eps/C w_c)  or  s * (p_c K - w_c t'_c).
    const float sr = scale ? scale[a.scale_numel == 1 ? 0 : r] : 1.f;
    // p_c = exp(x_c - lse): in the forward from (x - m) - log s, in the backward from (x - lse) - lse_err (the
    // residual of lse's rounding, saved by the forward); both exact under a large common offset.
    const float* lse_err_in = static_cast<const float*>(a.lse_err_in);
    const float shift = MODE == kBwd ? lse : s.ms.m;
    const float shift_lo = MODE == kBwd ? (lse_err_in ? lse_err_in[r] : 0.f) : log_s;
    const float z2 = zl > 0.f ? 2.f * zl * lse : 0.f;
    if (PROB) {
      const float k = sr * (s.wt + z2);
      map_row(row, C, a.sc, grow, D, [&](int64_t c, float x) {
        const float t = (1.f - eps) * to_f(trow[c * a.tc]) + eps / C;
        return fast_exp((x - shift) - shift_lo) * k - sr * (w ? w[c] * t : t);
      });
    } else {
      const float wy = w ? w[y] : 1.f;
      const float k = sr * (wy * (1.f - eps) + eps * W / C + z2);  // W = C without smoothing (weight_sum null)
      const float ew = sr * eps / C;
      const float hit = sr * wy * (1.f - eps);
      if (eps > 0.f) {
        map_row(row, C, a.sc, grow, D, [&](int64_t c, float x) {
          return fast_exp((x - shift) - shift_lo) * k - ew * (w ? w[c] : 1.f) - (c == y ? hit : 0.f);
        });
      } else {  // no eps / C w_c term: 0 * a NaN / inf weight of a class no target uses is NaN
        map_row(row, C, a.sc, grow, D, [&](int64_t c, float x) {
          return fast_exp((x - shift) - shift_lo) * k - (c == y ? hit : 0.f);
        });
      }
    }
  }
}

template <typename T>
__global__ void scale_grad_kernel(T* grad, int64_t rows_n, int64_t C, int64_t D, const float* scale,
                                  int64_t scale_numel) {
  if (scale_numel == 1 && scale[0] == 1.f) return;  // the common loss.backward(): nothing to do, no traffic
  const int64_t total = rows_n * C * D;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / (C * D), d = i % D;
    const float s = scale[scale_numel == 1 ? 0 : n * D + d];
    grad[i] = from_f<T>(to_f(grad[i]) * s);
  }
}

struct DeviceInfo {
  int sms = 0, l2_bytes = 0;
};

DeviceInfo device_info() {
  DeviceInfo info;
  int dev = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, dev);
  cudaDeviceGetAttribute(&info.l2_bytes, cudaDevAttrL2CacheSize, dev);
  return info;
}

template <typename T, bool PROB, int MODE>
cudaError_t launch(const CrossEntropyArgs& a, cudaStream_t stream) {
  const DeviceInfo info = device_info();
  // Enough threads to give each one a few 16-byte vectors of the row, at most 1024.
  const int64_t vecs = (a.C * static_cast<int64_t>(sizeof(T)) + 15) / 16;
  int threads = 64;
  while (threads < kMaxThreads && threads * 4 < vecs) threads *= 2;
  if (const int t = threads_knob("PYKERNELS_CE_THREADS", kMaxThreads)) threads = t;  // measurement knobs (bench/)
  int64_t blocks = static_cast<int64_t>(info.sms) * (2048 / threads);
  if (MODE == kFwdGrad) {
    // Rows in flight vs L2 for pass 2's re-read. Measured on H100 (bench/tune_cross_entropy.py): 2.5x L2 worth
    // of rows (some re-reads miss) beats 3/4 of L2 (all hit, too little in flight): 2.2 vs 3.1 ms.
    const int64_t pct = knob("PYKERNELS_CE_L2_PERCENT") ? knob("PYKERNELS_CE_L2_PERCENT") : 250;
    const int64_t row_bytes = a.C * static_cast<int64_t>(sizeof(T)) * (PROB ? 2 : 1);
    const int64_t fit = (static_cast<int64_t>(info.l2_bytes) * pct / 100) / (row_bytes > 0 ? row_bytes : 1);
    if (fit < blocks) blocks = fit > info.sms ? fit : info.sms;
  }
  if (blocks > a.rows()) blocks = a.rows();
  if (blocks < 1) blocks = 1;
  cross_entropy_kernel<T, PROB, MODE><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <int MODE>
cudaError_t dispatch(const CrossEntropyArgs& a, cudaStream_t stream) {
  const bool prob = a.target_prob != nullptr;
  switch (a.dtype) {
    case DType::F32: return prob ? launch<float, true, MODE>(a, stream) : launch<float, false, MODE>(a, stream);
    case DType::F16: return prob ? launch<__half, true, MODE>(a, stream) : launch<__half, false, MODE>(a, stream);
    case DType::BF16:
      return prob ? launch<__nv_bfloat16, true, MODE>(a, stream) : launch<__nv_bfloat16, false, MODE>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t cross_entropy_fwd(const CrossEntropyArgs& a, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  if (cross_entropy_fwd_cluster(a, stream, &err)) return err;
  return a.grad ? dispatch<kFwdGrad>(a, stream) : dispatch<kFwd>(a, stream);
}

cudaError_t cross_entropy_bwd(const CrossEntropyArgs& a, cudaStream_t stream) { return dispatch<kBwd>(a, stream); }

cudaError_t cross_entropy_scale_grad(void* grad, DType dtype, int64_t N, int64_t C, int64_t D, const float* scale,
                                     int64_t scale_numel, cudaStream_t stream) {
  const DeviceInfo info = device_info();
  const int threads = 256;
  const int64_t total = N * C * D;
  int64_t blocks = (total + threads - 1) / threads;
  if (blocks > static_cast<int64_t>(info.sms) * 8) blocks = static_cast<int64_t>(info.sms) * 8;
  if (blocks < 1) blocks = 1;
  switch (dtype) {
    case DType::F32:
      scale_grad_kernel<<<blocks, threads, 0, stream>>>(static_cast<float*>(grad), N, C, D, scale, scale_numel);
      break;
    case DType::F16:
      scale_grad_kernel<<<blocks, threads, 0, stream>>>(static_cast<__half*>(grad), N, C, D, scale, scale_numel);
      break;
    case DType::BF16:
      scale_grad_kernel<<<blocks, threads, 0, stream>>>(static_cast<__nv_bfloat16*>(grad), N, C, D, scale,
                                                        scale_numel);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace pykernels
