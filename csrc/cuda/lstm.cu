// CUDA kernels of the LSTM cell ops (docs/lstm.md). Raw pointers only, no torch headers.
//
// Forward: one launch per step. A block owns BM batch rows and BN hidden units with all four gates, so the
// pointwise update needs nothing from other blocks: it runs the two gate GEMMs (x W_ih^T over I, then h W_hh^T
// over H) through shared-memory tiles of BK columns with fp32 accumulators in registers (each thread: 2 rows x
// 1 unit x 4 gates), then adds the biases, applies the activations and writes h', c' and the fp32 workspace.
// The gates never go to memory. Backward: a grid-stride pointwise kernel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "convert.cuh"
#include "lstm.h"

namespace pykernels {
namespace cuda {
namespace {

constexpr int BM = 16;   // batch rows per block
constexpr int BN = 32;   // hidden units per block (x 4 gates)
constexpr int BK = 32;   // K tile
constexpr int THREADS = 256;
constexpr int RPT = BM / (THREADS / BN);  // rows per thread: 2

__device__ __forceinline__ float sigmoidf_(float x) { return 1.f / (1.f + __expf(-x)); }

// acc[r][q] += A[row0 + r, :K] . W[q*H + col, :K] for the tile of this block.
template <typename T>
__device__ __forceinline__ void gate_gemm(float (&acc)[RPT][4], const T* __restrict__ A, const T* __restrict__ Wt,
                                          int64_t M, int64_t K, int64_t H, int64_t row_base, int64_t col_base,
                                          float (*As)[BK + 1], float (*Ws)[BN][BK + 1]) {
  const int tid = threadIdx.x;
  const int col = tid % BN, rg = tid / BN;
  for (int64_t k0 = 0; k0 < K; k0 += BK) {
    // A tile: BM x BK
    for (int e = tid; e < BM * BK; e += THREADS) {
      const int r = e / BK, kk = e % BK;
      const int64_t gr = row_base + r, gk = k0 + kk;
      As[r][kk] = (gr < M && gk < K) ? to_f(A[gr * K + gk]) : 0.f;
    }
    // W tiles: 4 gates x BN units x BK
    for (int e = tid; e < 4 * BN * BK; e += THREADS) {
      const int q = e / (BN * BK), rem = e % (BN * BK), n = rem / BK, kk = rem % BK;
      const int64_t unit = col_base + n, gk = k0 + kk;
      Ws[q][n][kk] = (unit < H && gk < K) ? to_f(Wt[(q * H + unit) * K + gk]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < BK; ++kk) {
      const float w0 = Ws[0][col][kk], w1 = Ws[1][col][kk], w2 = Ws[2][col][kk], w3 = Ws[3][col][kk];
#pragma unroll
      for (int r = 0; r < RPT; ++r) {
        const float a = As[rg * RPT + r][kk];
        acc[r][0] += a * w0;
        acc[r][1] += a * w1;
        acc[r][2] += a * w2;
        acc[r][3] += a * w3;
      }
    }
    __syncthreads();
  }
}

// Two blocks per SM: without the hint ptxas capped the kernel at 64 registers and spilled 8 bytes.
template <typename T>
__global__ void __launch_bounds__(THREADS, 2) cell_fwd_kernel(LstmCellArgs a) {
  __shared__ float As[BM][BK + 1];
  __shared__ float Ws[4][BN][BK + 1];
  const int64_t row_base = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t col_base = static_cast<int64_t>(blockIdx.y) * BN;
  const int col = threadIdx.x % BN, rg = threadIdx.x / BN;
  float acc[RPT][4] = {};
  gate_gemm<T>(acc, static_cast<const T*>(a.x), static_cast<const T*>(a.w_ih), a.B, a.I, a.H, row_base, col_base,
               As, Ws);
  gate_gemm<T>(acc, static_cast<const T*>(a.hx), static_cast<const T*>(a.w_hh), a.B, a.H, a.H, row_base, col_base,
               As, Ws);
  const int64_t unit = col_base + col;
  if (unit >= a.H) return;
  float bias[4] = {0.f, 0.f, 0.f, 0.f};
  if (a.b_ih) {
    const T* bi = static_cast<const T*>(a.b_ih);
    const T* bh = static_cast<const T*>(a.b_hh);
#pragma unroll
    for (int q = 0; q < 4; ++q) bias[q] = to_f(bi[q * a.H + unit]) + to_f(bh[q * a.H + unit]);
  }
  const T* cx = static_cast<const T*>(a.cx);
  T* hy = static_cast<T*>(a.hy);
  T* cy = static_cast<T*>(a.cy);
#pragma unroll
  for (int r = 0; r < RPT; ++r) {
    const int64_t row = row_base + rg * RPT + r;
    if (row >= a.B) break;
    const float i = sigmoidf_(acc[r][0] + bias[0]);
    const float f = sigmoidf_(acc[r][1] + bias[1]);
    const float g = tanhf(acc[r][2] + bias[2]);
    const float o = sigmoidf_(acc[r][3] + bias[3]);
    const float c = f * to_f(cx[row * a.H + unit]) + i * g;
    const float h = o * tanhf(c);
    hy[row * a.H + unit] = from_f<T>(h);
    cy[row * a.H + unit] = from_f<T>(c);
    float* ws = a.ws + row * 5 * a.H + unit;
    ws[0] = i;
    ws[a.H] = f;
    ws[2 * a.H] = g;
    ws[3 * a.H] = o;
    ws[4 * a.H] = c;
  }
}

template <typename T>
__global__ void cell_bwd_kernel(LstmCellBwdArgs a) {
  const T* gh = static_cast<const T*>(a.grad_h);
  const T* gc = static_cast<const T*>(a.grad_c);
  const T* cx = static_cast<const T*>(a.cx);
  T* dcx = static_cast<T*>(a.dcx);
  const int64_t n = a.B * a.H;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = e / a.H, unit = e % a.H;
    const float* ws = a.ws + row * 5 * a.H + unit;
    const float i = ws[0], f = ws[a.H], g = ws[2 * a.H], o = ws[3 * a.H], c = ws[4 * a.H];
    const float dh = gh ? to_f(gh[e]) : 0.f;
    const float dc = gc ? to_f(gc[e]) : 0.f;
    const float tc = tanhf(c);
    const float dct = dc + dh * o * (1.f - tc * tc);
    float* dg = a.dgates + row * 4 * a.H + unit;
    dg[0] = dct * g * i * (1.f - i);
    dg[a.H] = dct * to_f(cx[e]) * f * (1.f - f);
    dg[2 * a.H] = dct * i * (1.f - g * g);
    dg[3 * a.H] = dh * tc * o * (1.f - o);
    dcx[e] = from_f<T>(dct * f);
  }
}

template <typename T>
cudaError_t launch_fwd(const LstmCellArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((a.B + BM - 1) / BM), static_cast<unsigned>((a.H + BN - 1) / BN));
  if (grid.y > 65535) return cudaErrorInvalidConfiguration;
  cell_fwd_kernel<T><<<grid, THREADS, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const LstmCellBwdArgs& a, cudaStream_t stream) {
  const int64_t n = a.B * a.H;
  const int64_t blocks = (n + 255) / 256;
  cell_bwd_kernel<T><<<static_cast<unsigned>(blocks < 65536 ? blocks : 65536), 256, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t lstm_cell_fwd(const LstmCellArgs& a, cudaStream_t stream) {
  switch (a.dtype) {
    case DType::F32: return launch_fwd<float>(a, stream);
    case DType::F16: return launch_fwd<__half>(a, stream);
    case DType::BF16: return launch_fwd<__nv_bfloat16>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t lstm_cell_bwd(const LstmCellBwdArgs& a, cudaStream_t stream) {
  switch (a.dtype) {
    case DType::F32: return launch_bwd<float>(a, stream);
    case DType::F16: return launch_bwd<__half>(a, stream);
    case DType::BF16: return launch_bwd<__nv_bfloat16>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace pykernels
