// Persistent CUDA kernels of the LSTM sequence ops (docs/lstm.md): one cooperative launch runs every time step
// of one layer direction. Raw pointers only, no torch headers.
//
// The hidden units are split over the blocks (at most one per SM, all co-resident): block j owns units
// [j*HB, (j+1)*HB) with all four gates, and keeps its rows of W_hh in shared memory for the whole sequence
// ("resident"; when they do not fit, the same kernel reads them from global memory / L2 every step,
// "streamed"). Per step a block reads h_{t-1} of every batch row (the previous step's output, from L2), computes
// its units' gates (one warp per (batch row, unit): lanes split the H-long dot products of the four gates),
// applies the pointwise update and writes h_t, c_t and the workspace; then a grid barrier, because the next step
// reads every block's h_t. Forward: one barrier per step.
// Backward, in reverse processing order: (A) per (batch row, own unit) the pointwise gate gradients from dh, dc
// and the saved gates, into dG[t]; grid barrier; (B) per (batch row, own unit k) dh_{t-1}[k] = sum_r dG_t[r]
// W_hh[r][k] with the block's columns of W_hh resident. Phase B of a step and phase A of the next touch disjoint
// data (A reads dh/dc of its own units only), so one barrier per step suffices.
// SIMT fp32 FMAs for now (tensor cores are the next step; see docs/lstm.md).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "convert.cuh"
#include "lstm.h"

namespace pykernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBatchChunk = 16;  // batch rows whose h_{t-1} sit in shared memory at once (forward)
constexpr long long kSpinLimit = 1ll << 28;  // ~10 s of polling: a barrier that never opens traps instead of hanging

__device__ __forceinline__ float sigmoid_(float x) { return 1.f / (1.f + __expf(-x)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Grid-wide barrier of a cooperative launch: a monotonic counter; the n-th barrier opens when all blocks have
// arrived n times (no reset, so consecutive barriers cannot race).
__device__ void grid_barrier(unsigned int* counter, unsigned int target) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();  // this block's writes of the step are visible device-wide before it arrives
    atomicAdd(counter, 1u);
    long long spins = 0;
    while (*reinterpret_cast<volatile unsigned int*>(counter) < target) {
      if (++spins > kSpinLimit) __trap();
      __nanosleep(20);
    }
    __threadfence();  // and the other blocks' writes are visible to this one after it leaves
  }
  __syncthreads();
}

struct Units {
  int64_t u0;  // first unit of this block
  int n;       // how many (0 for the tail blocks when the split is uneven)
};

__device__ __forceinline__ Units units_of(int64_t H, int HB) {
  const int64_t u0 = static_cast<int64_t>(blockIdx.x) * HB;
  const int64_t left = H - u0;
  return {u0, static_cast<int>(left <= 0 ? 0 : (left < HB ? left : HB))};
}

template <typename T, bool RESIDENT>
__global__ void __launch_bounds__(kThreads, 1) layer_fwd_kernel(LstmLayerArgs a, int HB) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int64_t H = a.H, B = a.B, T_ = a.T;
  T* Ws = reinterpret_cast<T*>(smem_raw);     // [4][HB][H]: this block's rows of W_hh (RESIDENT)
  T* Hs = Ws + (RESIDENT ? 4 * HB * H : 0);  // [kBatchChunk][H]: h_{t-1} of a batch chunk
  const T* W = static_cast<const T*>(a.w_hh);
  const Units my = units_of(H, HB);
  if (RESIDENT) {
    for (int64_t e = threadIdx.x; e < 4 * my.n * H; e += kThreads) {
      const int64_t q = e / (my.n * H), rem = e % (my.n * H), uu = rem / H, k = rem % H;
      Ws[(q * HB + uu) * H + k] = W[(q * H + my.u0 + uu) * H + k];
    }
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* h0 = static_cast<const T*>(a.h0);
  const T* c0 = static_cast<const T*>(a.c0);
  T* out = static_cast<T*>(a.out);
  for (int64_t s = 0; s < T_; ++s) {
    const int64_t t = a.reverse ? T_ - 1 - s : s, tp = a.reverse ? t + 1 : t - 1;  // tp: the previous step
    const T* hprev = s == 0 ? h0 : out + tp * B * H;
    for (int64_t b0 = 0; b0 < B; b0 += kBatchChunk) {
      const int nb = static_cast<int>(B - b0 < kBatchChunk ? B - b0 : kBatchChunk);
      __syncthreads();  // the previous chunk is consumed (and, the first time, Ws is written)
      // other blocks wrote h_{t-1}: read it from L2 (ld.global.cg), never from a stale L1 line
      for (int64_t e = threadIdx.x; e < nb * H; e += kThreads) Hs[e] = __ldcg(hprev + b0 * H + e);
      __syncthreads();
      for (int item = warp; item < nb * my.n; item += kWarps) {
        const int bb = item / my.n, uu = item % my.n;
        const T* hrow = Hs + bb * H;
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
        for (int64_t k = lane; k < H; k += 32) {
          const float hv = to_f(hrow[k]);
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const T* wrow = RESIDENT ? Ws + (q * HB + uu) * H : W + (q * H + my.u0 + uu) * H;
            acc[q] += hv * to_f(wrow[k]);
          }
        }
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[q] = warp_sum(acc[q]);
        if (lane == 0) {
          const int64_t b = b0 + bb, u = my.u0 + uu;
          const float* xp = a.xproj + (t * B + b) * 4 * H + u;
          const float i = sigmoid_(acc[0] + xp[0]), f = sigmoid_(acc[1] + xp[H]), g = tanhf(acc[2] + xp[2 * H]),
                      o = sigmoid_(acc[3] + xp[3 * H]);
          const float c_prev = s == 0 ? to_f(c0[b * H + u]) : a.ws[(tp * B + b) * 5 * H + 4 * H + u];
          const float c = f * c_prev + i * g;
          out[(t * B + b) * H + u] = from_f<T>(o * tanhf(c));
          float* w = a.ws + (t * B + b) * 5 * H + u;
          w[0] = i;
          w[H] = f;
          w[2 * H] = g;
          w[3 * H] = o;
          w[4 * H] = c;
        }
      }
    }
    grid_barrier(a.barrier, static_cast<unsigned int>((s + 1) * gridDim.x));
  }
}

template <typename T, bool RESIDENT>
__global__ void __launch_bounds__(kThreads, 1) layer_bwd_kernel(LstmLayerArgs a, int HB) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int64_t H = a.H, B = a.B, T_ = a.T;
  T* Wt = reinterpret_cast<T*>(smem_raw);  // [HB][4H]: this block's columns of W_hh, transposed (RESIDENT)
  const T* W = static_cast<const T*>(a.w_hh);
  const Units my = units_of(H, HB);
  if (RESIDENT) {
    for (int64_t e = threadIdx.x; e < 4 * H * my.n; e += kThreads) {
      const int64_t r = e / my.n, uu = e % my.n;
      Wt[uu * 4 * H + r] = W[r * H + my.u0 + uu];
    }
    __syncthreads();
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* go = static_cast<const T*>(a.grad_out);
  const T* c0 = static_cast<const T*>(a.c0);
  for (int64_t s = T_ - 1; s >= 0; --s) {
    const int64_t t = a.reverse ? T_ - 1 - s : s, tp = a.reverse ? t + 1 : t - 1;
    // (A) gate gradients of this block's units
    for (int64_t e = threadIdx.x; e < B * my.n; e += kThreads) {
      const int64_t b = e / my.n, u = my.u0 + e % my.n;
      const float dh = a.dh[b * H + u] + (go ? to_f(go[(t * B + b) * H + u]) : 0.f);
      const float* w = a.ws + (t * B + b) * 5 * H + u;
      const float i = w[0], f = w[H], g = w[2 * H], o = w[3 * H], c = w[4 * H];
      const float c_prev = s == 0 ? to_f(c0[b * H + u]) : a.ws[(tp * B + b) * 5 * H + 4 * H + u];
      const float tc = tanhf(c);
      const float dct = a.dc[b * H + u] + dh * o * (1.f - tc * tc);
      float* dg = a.dgates + (t * B + b) * 4 * H + u;
      dg[0] = dct * g * i * (1.f - i);
      dg[H] = dct * c_prev * f * (1.f - f);
      dg[2 * H] = dct * i * (1.f - g * g);
      dg[3 * H] = dh * tc * o * (1.f - o);
      a.dc[b * H + u] = dct * f;
    }
    grid_barrier(a.barrier, static_cast<unsigned int>((T_ - s) * gridDim.x));
    // (B) dh_{t-1} of this block's units from every unit's dG_t (rounded to the weights' dtype, as the contract)
    for (int item = warp; item < B * my.n; item += kWarps) {
      const int64_t b = item / my.n;
      const int uu = item % my.n;
      const float* dgrow = a.dgates + (t * B + b) * 4 * H;
      float acc = 0.f;
      for (int64_t r = lane; r < 4 * H; r += 32) {
        const float wv = RESIDENT ? to_f(Wt[uu * 4 * H + r]) : to_f(W[r * H + my.u0 + uu]);
        acc += to_f(from_f<T>(__ldcg(dgrow + r))) * wv;  // dG_t of other blocks: from L2
      }
      acc = warp_sum(acc);
      if (lane == 0) a.dh[b * H + my.u0 + uu] = acc;
    }
    __syncthreads();  // the next phase A reads this block's dh
  }
}

// Blocks, units per block and shared memory of a launch; whether W_hh stays resident.
struct Plan {
  int blocks = 0, hb = 0;
  size_t smem = 0;
  bool resident = false;
};

template <typename T>
cudaError_t plan_for(const LstmLayerArgs& a, bool forward, Plan& p) {
  int dev = 0, sms = 0, smem_max = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&smem_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  const int64_t H = a.H;
  const int64_t blocks = H < sms ? H : sms;
  p.hb = static_cast<int>((H + blocks - 1) / blocks);
  p.blocks = static_cast<int>((H + p.hb - 1) / p.hb);
  const size_t w = 4 * static_cast<size_t>(p.hb) * H * sizeof(T);
  const size_t h = forward ? kBatchChunk * H * sizeof(T) : 0;
  if (h > static_cast<size_t>(smem_max)) return cudaErrorInvalidValue;  // H too large for a batch chunk
  p.resident = w + h <= static_cast<size_t>(smem_max);
  p.smem = (p.resident ? w : 0) + h;
  return cudaSuccess;
}

template <typename T>
cudaError_t launch(const LstmLayerArgs& a, bool forward, cudaStream_t stream) {
  Plan p;
  cudaError_t err = plan_for<T>(a, forward, p);
  if (err != cudaSuccess) return err;
  void* kernel = forward ? (p.resident ? reinterpret_cast<void*>(&layer_fwd_kernel<T, true>)
                                       : reinterpret_cast<void*>(&layer_fwd_kernel<T, false>))
                         : (p.resident ? reinterpret_cast<void*>(&layer_bwd_kernel<T, true>)
                                       : reinterpret_cast<void*>(&layer_bwd_kernel<T, false>));
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(p.smem));
  if (err != cudaSuccess) return err;
  LstmLayerArgs args = a;
  int hb = p.hb;
  void* params[] = {&args, &hb};
  // cooperative: the launch fails instead of deadlocking if the blocks cannot all be resident at once
  return cudaLaunchCooperativeKernel(kernel, dim3(p.blocks), dim3(kThreads), params, p.smem, stream);
}

cudaError_t dispatch(const LstmLayerArgs& a, bool forward, cudaStream_t stream) {
  if (a.T == 0 || a.B == 0 || a.H == 0) return cudaSuccess;  // nothing to run (dh/dc already hold the result)
  switch (a.dtype) {
    case DType::F32: return launch<float>(a, forward, stream);
    case DType::F16: return launch<__half>(a, forward, stream);
    case DType::BF16: return launch<__nv_bfloat16>(a, forward, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t lstm_layer_fwd(const LstmLayerArgs& a, cudaStream_t stream) { return dispatch(a, true, stream); }
cudaError_t lstm_layer_bwd(const LstmLayerArgs& a, cudaStream_t stream) { return dispatch(a, false, stream); }

}  // namespace cuda
}  // namespace pykernels
