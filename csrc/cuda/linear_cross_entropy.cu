// CUDA kernels of the fused linear cross-entropy (docs/linear_cross_entropy.md): logit tiles x W^T on mma.sync
// tensor cores (csrc/cuda/mma.cuh), reduced on chip; the N x V logits never reach memory in the forward. The
// decomposition is the Triton backend's, and both share the launch logic around the kernels (vocabulary splits
// and their combination, backward chunks and their GEMMs): pykernels/ops/linear_cross_entropy_launch.py.
//
// Block: 8 warps on a 128 x 128 logit tile; warp (wm, wn) owns 32 rows x 64 columns (2 x 8 MMA tiles, 64 fp32
// accumulators per thread). K loop over H in 32-wide steps through a 4-stage cp.async pipeline (scalar loads
// when rows are not 16-byte aligned); fragments by ldmatrix from rows padded to 40 elements, so the 8 row
// addresses of each 8x8 matrix fall in distinct banks. Raw pointers only, no torch headers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "convert.cuh"
#include "linear_cross_entropy.h"
#include "mma.cuh"
#include "specialize.cuh"

namespace pykernels {
namespace cuda {
namespace {

constexpr int BM = static_cast<int>(kLinearCrossEntropyBlockRows);
constexpr int BN = static_cast<int>(kLinearCrossEntropyBlockCols);
constexpr int BK = 32;
constexpr int LD = BK + 8;
constexpr int kStages = 4;
constexpr int kThreads = 256;
constexpr int kGroupM = 8;                           // token blocks that sweep the same W tiles together (L2)
constexpr int kStageElems = (BM + BN) * LD;           // one stage: the x tile, then the w tile
constexpr int kSmemBytes = kStages * kStageElems * 2;  // 81,920: above the 48 KB default, opted in at launch
constexpr float kLog2e = 1.4426950408889634f;
static_assert(BM == 4 * 32 && BN == 2 * 64, "8 warps as 4 x 2 of 32 x 64");

// The thread's place: lane (g, t) of the fragments, its warp's 32-row group wm and 64-column half wn.
struct Pos {
  int lane, g, t, wm, wn;
};

__device__ __forceinline__ Pos pos_of() {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  return {lane, lane >> 2, lane & 3, warp & 3, warp >> 2};
}

// Row (within the block) of the thread's accumulator element (mt, e), and column of (nt, e).
__device__ __forceinline__ int acc_row(const Pos& p, int mt, int e) { return p.wm * 32 + mt * 16 + p.g + 8 * (e >> 1); }
__device__ __forceinline__ int acc_col(const Pos& p, int nt, int e) { return p.wn * 64 + nt * 8 + 2 * p.t + (e & 1); }

// Block b of a grouped 2-D order over n_m token blocks x n_n column units: kGroupM token blocks take every column
// unit together, so the blocks in flight share both operands through L2 (as a grouped GEMM).
__device__ __forceinline__ void grouped(int64_t b, int64_t n_m, int64_t n_n, int64_t& bm, int64_t& bn) {
  const int64_t per_group = kGroupM * n_n;
  const int64_t first = b / per_group * kGroupM;
  const int64_t size = n_m - first < kGroupM ? n_m - first : kGroupM;
  bm = first + (b % per_group) % size;
  bn = (b % per_group) / size;
}

// The thread's share of a stage: rows r and r + 64 of both operands at columns k0 + c .. k0 + c + 7 (16-byte
// cp.async chunks when rows are aligned, else the same elements one by one); zeros past the ends.
struct TileLoader {
  const uint16_t* src[4];  // x row r, x row r + 64, w row r, w row r + 64 (at column c); the operand's base past
  int r, c, rows_in;       // its end (never read: a valid address for cp.async all the same); rows_in bit q: in


  __device__ __forceinline__ TileLoader(const LinearCrossEntropyArgs& a, int64_t m0, int64_t n0, int64_t n_end) {
    r = threadIdx.x / (BK / 8);
    c = (threadIdx.x % (BK / 8)) * 8;
    rows_in = 0;
    const auto* X = static_cast<const uint16_t*>(a.x);
    const auto* W = static_cast<const uint16_t*>(a.w);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t xr = m0 + r + 64 * h, wr = n0 + r + 64 * h;
      src[h] = xr < a.N ? X + xr * a.sx + c : X;
      src[2 + h] = wr < n_end ? W + wr * a.sw + c : W;
      rows_in |= (xr < a.N ? 1 : 0) << h | (wr < n_end ? 1 : 0) << (2 + h);
    }
  }

  __device__ __forceinline__ void load(uint16_t* stage, int64_t k0, int64_t H, bool vec16) const {
    static_assert(kThreads * 8 == 64 * BK, "each thread copies 8 columns of 2 rows per operand");
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      uint16_t* dst = stage + ((q >> 1) * BM + r + 64 * (q & 1)) * LD + c;
      const bool ok = (rows_in >> q & 1) && k0 + c < H;
      if (vec16) {  // H % 8 == 0: a chunk is all in or all out
        cp_async16(dst, ok ? src[q] + k0 : src[q], ok);
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) dst[j] = (ok && k0 + c + j < H) ? src[q][k0 + j] : uint16_t(0);
      }
    }
  }
};

// acc = x[m0 .. m0+128) w[n0 .. n0+128)^T in fp32 (rows of w at or past n_end are zeros).
template <typename T>
__device__ __forceinline__ void tile_product(float (&acc)[2][8][4], const LinearCrossEntropyArgs& a, uint16_t* smem,
                                             int64_t m0, int64_t n0, int64_t n_end, const Pos& p) {
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
  const TileLoader ld(a, m0, n0, n_end);
  const int KT = static_cast<int>((a.H + BK - 1) / BK);
  auto load = [&](int kt) { ld.load(smem + (kt % kStages) * kStageElems, int64_t(kt) * BK, a.H, a.vec16); };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < KT) load(s);
    cp_async_commit();
  }
  for (int kt = 0; kt < KT; ++kt) {
    // group kt (the stage of step kt) has landed for this thread; the barrier publishes every thread's copies and
    // tells that all warps are done with step kt - 1, whose stage the prefetch below overwrites
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if (kt + kStages - 1 < KT) load(kt + kStages - 1);
    cp_async_commit();
    const uint16_t* xs = smem + (kt % kStages) * kStageElems;
    const uint16_t* ws = xs + BM * LD;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t af[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) ldmatrix_a<LD>(af[mt], xs, p.wm * 32 + mt * 16, kk, p.lane);
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t bf[4];
        ldmatrix_b_rows<LD>(bf, ws, p.wn * 64 + np * 16, kk, p.lane);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          Mma<T>::run(acc[mt][2 * np], af[mt], bf[0], bf[1]);
          Mma<T>::run(acc[mt][2 * np + 1], af[mt], bf[2], bf[3]);
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the next tile's prologue (or the caller's reductions) reuses the stages
}

// The logit of column c (valid: c < the operand's end) from its accumulator: bias, then the soft cap.
template <typename T>
__device__ __forceinline__ float logit(const LinearCrossEntropyArgs& a, float acc, int64_t c) {
  if (a.bias) acc += to_f(static_cast<const T*>(a.bias)[c]);
  if (a.softcap > 0.f) acc = a.softcap * tanhf(acc / a.softcap);
  return acc;
}

// (m, s) <- the (max, sum exp(z - max)) of the union of two sets of logits; an empty set is (-inf, 0).
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  if (mn == -INFINITY) {  // no finite logit on either side: s and s2 are 0 or NaN, and a NaN must survive
    s += s2;
    return;
  }
  s = s * exp2_approx((m - mn) * kLog2e) + s2 * exp2_approx((m2 - mn) * kLog2e);
  m = mn;
}

// Per-row statistics of the forward, for the thread's 4 rows (i = 2 mt + half).
struct RowStats {
  float m[4], s[4], zy[4], zs[4];
};

// Folds the shuffle partner's statistics (lanes `mask` apart: the same rows, other columns) into st.
__device__ __forceinline__ void merge_lanes(RowStats& st, int mask) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float m2 = __shfl_xor_sync(0xffffffffu, st.m[i], mask);
    const float s2 = __shfl_xor_sync(0xffffffffu, st.s[i], mask);
    merge(st.m[i], st.s[i], m2, s2);
    st.zy[i] += __shfl_xor_sync(0xffffffffu, st.zy[i], mask);
    st.zs[i] += __shfl_xor_sync(0xffffffffu, st.zs[i], mask);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Forward: block (token block, split) folds the logit tiles of its vocabulary range into per-row partials.

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) lce_fwd_kernel(const LinearCrossEntropyArgs a) {
  extern __shared__ __align__(16) uint16_t smem[];
  const Pos p = pos_of();
  const int64_t n_m = (a.N + BM - 1) / BM;
  int64_t bm, split;
  grouped(blockIdx.x, n_m, a.splits, bm, split);
  const int64_t n_tiles = (a.V + BN - 1) / BN;
  const int64_t per = (n_tiles + a.splits - 1) / a.splits;
  const int64_t t0 = split * per;
  const int64_t t1 = t0 + per < n_tiles ? t0 + per : n_tiles;
  const int64_t m0 = bm * BM;

  int y[4];  // the target's column in this shard, -1 when ignored or in another shard (V < 2^31: the glue checks)
  RowStats st;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t row = m0 + acc_row(p, i >> 1, 2 * (i & 1));
    const int64_t yc = row < a.N ? a.target[row] - a.vocab_start : -1;
    y[i] = yc >= 0 && yc < a.V ? static_cast<int>(yc) : -1;
    st.m[i] = -INFINITY;
    st.s[i] = st.zy[i] = st.zs[i] = 0.f;
  }
  for (int64_t tile = t0; tile < t1; ++tile) {
    const int64_t n0 = tile * BN;
    float acc[2][8][4];
    tile_product<T>(acc, a, smem, m0, n0, a.V, p);
    // A plain tile (every column inside the shard; no bias, soft cap or smoothing) runs code without those
    // options: chosen once per tile, not tested per logit (specialize.cuh).
    const bool full = n0 + BN <= a.V;
    const bool plain = full && !a.bias && !(a.softcap > 0.f) && !a.smooth;
    specialize<bool, true, false>(plain, [&](auto tag) {
      constexpr bool kPlain = decltype(tag)::value;
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int i = 2 * mt + half;
          float z[16];
          float tmax = -INFINITY;
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              const int64_t col = n0 + acc_col(p, nt, c);
              const bool ok = kPlain || full || col < a.V;
              const float v = kPlain ? acc[mt][nt][2 * half + c]
                                     : ok ? logit<T>(a, acc[mt][nt][2 * half + c], col) : -INFINITY;
              z[2 * nt + c] = v;
              tmax = fmaxf(tmax, v);
              if (ok) {
                if (col == y[i]) st.zy[i] += v;
                if (!kPlain && a.smooth) st.zs[i] += a.class_weight ? v * a.class_weight[col] : v;
              }
            }
          }
          const float mn = fmaxf(st.m[i], tmax);
          if (mn == -INFINITY) {  // nothing finite yet: s stays 0, or NaN when a logit was (a NaN input row)
#pragma unroll
            for (int j = 0; j < 16; ++j)
              if (z[j] != z[j]) st.s[i] = z[j];
            continue;
          }
          const float off = mn * kLog2e;
          float sum = 0.f;
#pragma unroll
          for (int j = 0; j < 16; ++j) sum += exp2_approx(fmaf(z[j], kLog2e, -off));
          // rescale by exp2((m - mn) log2 e): exactly 1 when the max did not move (the fmaf(m, L, -off) form
          // drifts by half an ulp of the exponent per tile: ~1e-4 in lse over 59 tiles), 0 while m is -inf
          st.s[i] = st.s[i] * exp2_approx((st.m[i] - mn) * kLog2e) + sum;
          st.m[i] = mn;
        }
      }
    });
  }
  // the 4 lanes t of a group hold the same rows: fold them, then the two column halves (warps wn = 0, 1)
  merge_lanes(st, 1);
  merge_lanes(st, 2);
  auto* red = reinterpret_cast<float*>(smem);  // [wm][32 rows][4 stats]; the stages are free (tile_product syncs)
  if (p.wn == 1 && p.t == 0) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float* r = red + (p.wm * 32 + (i >> 1) * 16 + p.g + 8 * (i & 1)) * 4;
      r[0] = st.m[i];
      r[1] = st.s[i];
      r[2] = st.zy[i];
      r[3] = st.zs[i];
    }
  }
  __syncthreads();
  if (p.wn == 0 && p.t == 0) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int rb = acc_row(p, i >> 1, 2 * (i & 1));
      const int64_t row = m0 + rb;
      if (row >= a.N) continue;
      const float* r = red + rb * 4;
      merge(st.m[i], st.s[i], r[0], r[1]);
      const int64_t o = split * a.N + row;
      a.m_part[o] = st.m[i];
      a.s_part[o] = st.s[i];
      a.zy_part[o] = st.zy[i] + r[2];
      if (a.smooth) a.zs_part[o] = st.zs[i] + r[3];
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward: block (token block, column block of the chunk) recomputes its logits and writes dlogits.

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) lce_dlogits_kernel(const LinearCrossEntropyArgs a) {
  extern __shared__ __align__(16) uint16_t smem[];
  const Pos p = pos_of();
  const int64_t n_m = (a.N + BM - 1) / BM;
  const int64_t n_n = (a.n_cols + BN - 1) / BN;
  int64_t bm, bn;
  grouped(blockIdx.x, n_m, n_n, bm, bn);
  const int64_t m0 = bm * BM, l0 = bn * BN, n0 = a.col0 + l0;  // l0: column in the chunk, n0: in the shard

  // A token block whose rows all have zero coefficients (ignored targets, zero upstream gradients) has an exactly
  // zero gradient tile: its product is skipped (exact, so always on).
  bool live = false;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t row = m0 + acc_row(p, i >> 1, 2 * (i & 1));
    if (row < a.N) live = live || a.coef_p[row] != 0.f || a.coef_y[row] != 0.f || (a.smooth && a.coef_w[row] != 0.f);
  }
  live = __syncthreads_or(live);
  float acc[2][8][4];
  if (live) tile_product<T>(acc, a, smem, m0, n0, a.col0 + a.n_cols, p);
  T* dl = static_cast<T*>(a.dl);
  // two adjacent columns as one 32-bit store: even row stride and a 4-byte-aligned base (a direct op call may pass
  // a view at an odd element offset)
  const bool pairs = a.ldl % 2 == 0 && reinterpret_cast<uintptr_t>(a.dl) % 4 == 0;
  float colsum[8][2];
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) colsum[nt][0] = colsum[nt][1] = 0.f;
  // A plain tile (a live product, every row and column inside; no bias, soft cap or smoothing) runs code without
  // those options: chosen once per tile, not tested per logit (specialize.cuh).
  const bool plain = live && m0 + BM <= a.N && l0 + BN <= a.n_cols && !a.bias && !(a.softcap > 0.f) && !a.smooth;
  specialize<bool, true, false>(plain, [&](auto tag) {
    constexpr bool kPlain = decltype(tag)::value;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t row = m0 + acc_row(p, mt, 2 * half);
        const bool in = kPlain || row < a.N;  // the row's coefficients, read after the product (registers)
        const float cp = in ? a.coef_p[row] : 0.f, cy = in ? a.coef_y[row] : 0.f;
        const float cw = !kPlain && in && a.smooth ? a.coef_w[row] : 0.f;
        const float m = in ? a.m[row] : 0.f, ls = in ? a.log_s[row] : 0.f;  // p_c = exp((z - m) - log_s): z - m
        const int64_t y = in ? a.target[row] - a.vocab_start : -1;          // is exact near the max
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          float d[2];
          const int64_t lc = l0 + acc_col(p, nt, 0);
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            d[c] = 0.f;
            const int64_t col = n0 + acc_col(p, nt, c);
            if (kPlain || (live && in && lc + c < a.n_cols)) {
              const float z = kPlain ? acc[mt][nt][2 * half + c] : logit<T>(a, acc[mt][nt][2 * half + c], col);
              float v = cp * exp2_approx(((z - m) - ls) * kLog2e) - (col == y ? cy : 0.f);
              if (!kPlain && a.smooth) v -= cw * (a.class_weight ? a.class_weight[col] : 1.f);
              if (!kPlain && a.softcap > 0.f) {
                const float tc = z / a.softcap;
                v *= 1.f - tc * tc;
              }
              d[c] = to_f(from_f<T>(v));  // what dW and dX see: the rounded value
            }
            colsum[nt][c] += d[c];
          }
          if (!kPlain && (!in || lc >= a.n_cols)) continue;
          T* o = dl + row * a.ldl + lc;
          if (pairs && (kPlain || lc + 1 < a.n_cols)) {
            *reinterpret_cast<uint32_t*>(o) = Mma<T>::pack(d[0], d[1]);
          } else {
            o[0] = from_f<T>(d[0]);
            if (kPlain || lc + 1 < a.n_cols) o[1] = from_f<T>(d[1]);
          }
        }
      }
    }
  });
  if (!a.db_part) return;
  // Bias partials: column sums over the block's rows, in a fixed order (deterministic, no atomics): over the 8
  // groups g of the warp by shuffles, then over the 4 row warps wm through shared memory.
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
#pragma unroll
    for (int c = 0; c < 2; ++c)
#pragma unroll
      for (int mask = 4; mask < 32; mask <<= 1) colsum[nt][c] += __shfl_xor_sync(0xffffffffu, colsum[nt][c], mask);
  auto* red = reinterpret_cast<float*>(smem);  // [wm][BN]; the stages are free (tile_product ended with a barrier)
  if (p.g == 0) {
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int c = 0; c < 2; ++c) red[p.wm * BN + acc_col(p, nt, c)] = colsum[nt][c];
  }
  __syncthreads();
  if (threadIdx.x < BN && l0 + threadIdx.x < a.n_cols) {
    const float s = ((red[threadIdx.x] + red[BN + threadIdx.x]) + red[2 * BN + threadIdx.x]) + red[3 * BN + threadIdx.x];
    a.db_part[bm * a.ldb + l0 + threadIdx.x] = s;
  }
}

cudaError_t launch(void (*kernel)(LinearCrossEntropyArgs), int64_t blocks, const LinearCrossEntropyArgs& a,
                   cudaStream_t stream) {
  if (blocks <= 0) return cudaSuccess;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(blocks), kThreads, kSmemBytes, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t linear_cross_entropy_partials(const LinearCrossEntropyArgs& a, cudaStream_t stream) {
  const int64_t blocks = (a.N + BM - 1) / BM * a.splits;
  if (a.dtype == DType::BF16) return launch(lce_fwd_kernel<__nv_bfloat16>, blocks, a, stream);
  if (a.dtype == DType::F16) return launch(lce_fwd_kernel<__half>, blocks, a, stream);
  return cudaErrorInvalidValue;
}

cudaError_t linear_cross_entropy_dlogits(const LinearCrossEntropyArgs& a, cudaStream_t stream) {
  const int64_t blocks = (a.N + BM - 1) / BM * ((a.n_cols + BN - 1) / BN);
  if (a.dtype == DType::BF16) return launch(lce_dlogits_kernel<__nv_bfloat16>, blocks, a, stream);
  if (a.dtype == DType::F16) return launch(lce_dlogits_kernel<__half>, blocks, a, stream);
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace pykernels
