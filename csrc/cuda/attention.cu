// CUDA attention kernels (docs/attention.md): FlashAttention-2 on mma.sync tensor cores (m16n8k16, fp16/bf16 in,
// fp32 accumulate; sm_80 and later). Raw pointers only, no torch headers.
//
// Fragment layouts and the register reuse of P/dS: csrc/cuda/mma.cuh.
//
// Each block has 4 warps; a warp owns 16 rows of the block's tile. Tiles live in shared memory as raw 16-bit
// words, rows padded by 8 elements (16 bytes) so that the fragment loads of a warp hit 32 distinct banks.
// Forward: block = 64 query rows, loop over 64-key tiles of the visible range with the online softmax in
// registers (exp2 domain). Backward, FlashAttention-2's split without atomics: dK/dV per 64-key block looping
// over its GQA group's query heads and 32-row query tiles; dQ per 64-row query block looping over key tiles.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "attention.h"
#include "convert.cuh"
#include "mma.cuh"
#include "philox.h"

namespace pykernels {
namespace cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// acc[nt] += X[r0.., :DP] Y[nt*8.., :DP]^T for NT tiles of 8 columns (X rows are 16 of this warp).
template <typename T, int LD, int DP, int NT>
__device__ __forceinline__ void gemm_rows(float (&acc)[NT][4], const uint16_t* X, int r0, const uint16_t* Y, int g,
                                          int t) {
#pragma unroll
  for (int kk = 0; kk < DP / 16; ++kk) {
    uint32_t a[4];
    frag_a<LD>(a, X, r0, kk * 16, g, t);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      uint32_t b0, b1;
      frag_b_rows<LD>(b0, b1, Y, nt * 8, kk * 16, g, t);
      Mma<T>::run(acc[nt], a, b0, b1);
    }
  }
}

// acc[dt] += P Y[:KT*16, dt*8..] with P (16 x KT*16) held as accumulators p[2*KT][4].
template <typename T, int LD, int KT, int DT>
__device__ __forceinline__ void gemm_acc(float (&acc)[DT][4], const float (&p)[2 * KT][4], const uint16_t* Y, int g,
                                         int t) {
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
    uint32_t a[4];
    frag_a_from_acc<T>(a, p[2 * kk], p[2 * kk + 1]);
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      uint32_t b0, b1;
      frag_b_cols<LD>(b0, b1, Y, dt * 8, kk * 16, g, t);
      Mma<T>::run(acc[dt], a, b0, b1);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Tiles global -> shared.

// ROWS rows of `cols` valid columns (rows >= nrows zero), padded with zeros to DP columns.
template <int ROWS, int DP, int LD>
__device__ __forceinline__ void load_tile(uint16_t* sm, const uint16_t* base, int64_t rs, int nrows, int cols,
                                          bool vec16) {
  if (vec16) {
    constexpr int CH = DP / 8;
    for (int i = threadIdx.x; i < ROWS * CH; i += kThreads) {
      const int r = i / CH, c = (i % CH) * 8;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (r < nrows && c < cols) v = *reinterpret_cast<const uint4*>(base + r * rs + c);
      *reinterpret_cast<uint4*>(sm + r * LD + c) = v;
    }
  } else {
    for (int i = threadIdx.x; i < ROWS * DP; i += kThreads) {
      const int r = i / DP, c = i % DP;
      sm[r * LD + c] = (r < nrows && c < cols) ? base[r * rs + c] : uint16_t(0);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Sequences, masks and ranges.

struct Seq {
  int64_t q0, k0;  // first row of the sequence in q / k (varlen), 0 for dense calls
  int L, S;        // its lengths
  int64_t d;       // causal / window diagonal
};

__device__ __forceinline__ Seq seq_of(const AttentionArgs& a, int64_t b) {
  Seq s;
  if (a.cu_q) {
    s.q0 = a.cu_q[b];
    s.k0 = a.cu_k[b];
    s.L = a.cu_q[b + 1] - a.cu_q[b];
    s.S = a.cu_k[b + 1] - a.cu_k[b];
  } else {
    s.q0 = s.k0 = 0;
    s.L = static_cast<int>(a.L);
    s.S = static_cast<int>(a.S);
  }
  s.d = a.diag + (a.bottom_right ? s.S - s.L : 0);
  return s;
}

__device__ __forceinline__ int64_t row_base(const AttnView& v, const AttentionArgs& a, int64_t b, int64_t row0,
                                            int64_t head) {
  return (a.cu_q ? row0 * v.sm : b * v.sb) + head * v.sh;
}

// First lse/delta entry of (sequence b, head h): dense (B, H, L), varlen (H, T).
__device__ __forceinline__ int64_t lse_base(const AttentionArgs& a, int64_t b, const Seq& s, int64_t h) {
  return a.cu_q ? h * a.lse_sh + s.q0 : b * a.lse_sb + h * a.lse_sh;
}

// Row `row` of head `head` of operand v in sequence (or batch entry) b, whose rows start at row0.
template <typename T>
__device__ __forceinline__ T* row_ptr(const AttnView& v, const AttentionArgs& a, int64_t b, int64_t row0,
                                      int64_t head, int row) {
  return static_cast<T*>(v.p) + row_base(v, a, b, row0, head) + row * v.sm;
}

// Rows [row, row + ROWS) of that operand (n rows valid in the sequence), `cols` columns, into a shared tile.
template <int ROWS, int DP, int LD>
__device__ __forceinline__ void load_rows(uint16_t* sm, const AttnView& v, const AttentionArgs& a, int64_t b,
                                          int64_t row0, int64_t head, int row, int n, int64_t cols) {
  load_tile<ROWS, DP, LD>(sm, row_ptr<const uint16_t>(v, a, b, row0, head, row), v.sm, n - row,
                          static_cast<int>(cols), a.vec16);
}

__device__ __forceinline__ bool visible(const AttentionArgs& a, const Seq& s, int64_t i, int64_t j) {
  bool ok = i < s.L && j < s.S;
  if (a.causal) ok = ok && j <= i + s.d;
  if (a.win_left >= 0) ok = ok && j >= i + s.d - a.win_left;
  if (a.win_right >= 0) ok = ok && j <= i + s.d + a.win_right;
  return ok;
}

// Keys [lo, hi) that queries [m0, m0 + rows) may see; lo rounded down to a tile of BN.
template <int BN>
__device__ __forceinline__ void key_range(const AttentionArgs& a, const Seq& s, int m0, int rows, int& lo, int& hi) {
  int64_t h = s.S, l = 0;
  if (a.causal) h = h < m0 + rows + s.d ? h : m0 + rows + s.d;
  if (a.win_right >= 0) h = h < m0 + rows + s.d + a.win_right ? h : m0 + rows + s.d + a.win_right;
  if (a.win_left >= 0) l = m0 + s.d - a.win_left;
  l = l < 0 ? 0 : l;
  lo = static_cast<int>(l / BN * BN);
  hi = static_cast<int>(h < 0 ? 0 : h);
}

// Queries [lo, hi) that may see keys [n0, n0 + cols); lo rounded down to a tile of BM.
template <int BM>
__device__ __forceinline__ void query_range(const AttentionArgs& a, const Seq& s, int n0, int cols, int& lo,
                                            int& hi) {
  int64_t l = 0, h = s.L;
  if (a.causal) l = n0 - s.d > l ? n0 - s.d : l;
  if (a.win_right >= 0) l = n0 - s.d - a.win_right > l ? n0 - s.d - a.win_right : l;
  if (a.win_left >= 0) h = h < n0 + cols - s.d + a.win_left ? h : n0 + cols - s.d + a.win_left;
  lo = static_cast<int>(l / BM * BM);
  hi = static_cast<int>(h < 0 ? 0 : h);
}

// Scaled (and soft-capped) score in the exp2 domain; `dcap` gets d(capped)/d(uncapped) = 1 - tanh^2.
__device__ __forceinline__ float score(const AttentionArgs& a, float acc, float& dcap) {
  float x = acc * a.scale;
  dcap = 1.f;
  if (a.softcap > 0.f) {
    const float th = tanhf(x / a.softcap);
    x = a.softcap * th;
    dcap = 1.f - th * th;
  }
  return x * kLog2e;
}

// Element (b, h, i, j) of the mask in fp32: its value for a float mask, 1 / 0 for a bool one.
__device__ __forceinline__ float mask_at(const AttentionArgs& a, int64_t b, int64_t h, int64_t i, int64_t j) {
  const int64_t o = b * a.mask_sb + h * a.mask_sh + i * a.mask_sm + j * a.mask_sn;
  if (a.mask_bool) return static_cast<const bool*>(a.mask)[o] ? 1.f : 0.f;
  switch (a.mask_dtype) {
    case DType::F16: return to_f(static_cast<const __half*>(a.mask)[o]);
    case DType::BF16: return to_f(static_cast<const __nv_bfloat16*>(a.mask)[o]);
    case DType::F64: return static_cast<float>(static_cast<const double*>(a.mask)[o]);
    default: return static_cast<const float*>(a.mask)[o];
  }
}

// The exp2-domain score of query i, key j of (batch b, query head h): -inf where it is not visible (bounds,
// causal, window, a False in a bool mask); a float mask is added after the soft cap, as in the Triton kernels.
__device__ __forceinline__ float masked_score(const AttentionArgs& a, const Seq& s, int64_t b, int64_t h, int i,
                                              int j, float acc, float& dcap) {
  const float x = score(a, acc, dcap);
  if (!visible(a, s, i, j)) return -INFINITY;
  if (!a.mask) return x;
  const float mv = mask_at(a, b, h, i, j);
  if (a.mask_bool) return mv != 0.f ? x : -INFINITY;
  return x + mv * kLog2e;
}

// Dropout: whether score (i, j) of (batch b, query head h) is kept; 1 / (1 - p) scales the kept ones.
struct Dropout {
  uint64_t seed;
  float p, inv_keep;
  int64_t row0;  // counter row of query 0 of this (sequence, head)
};

__device__ __forceinline__ Dropout dropout_of(const AttentionArgs& a, int64_t b, const Seq& s, int64_t h) {
  if (a.dropout_p <= 0.f) return {0, 0.f, 1.f, 0};
  const int64_t row0 = ((a.cu_q ? 0 : b) * a.H + h) * a.drop_rows + s.q0;
  return {static_cast<uint64_t>(*a.seed), a.dropout_p, 1.f / (1.f - a.dropout_p), row0};
}

// p (already a probability) after dropout: 0 if dropped, p / (1 - dropout_p) if kept.
__device__ __forceinline__ float dropped(const AttentionArgs& a, const Dropout& d, int i, int j, float p) {
  if (d.p <= 0.f) return p;
  return dropout_keep(d.seed, (d.row0 + i) * a.drop_cols + j, d.p) ? p * d.inv_keep : 0.f;
}

// lse (natural log, -inf for a row that sees nothing) -> the exp2-domain offset of its probabilities. A row
// that sees nothing gets +inf, so exp2(s - offset) = 0 for it instead of exp2(-inf + inf) = NaN.
__device__ __forceinline__ float lse_offset(float lse) { return lse == -INFINITY ? INFINITY : lse * kLog2e; }

// Write the two rows (g, g + 8) of a warp's 16-row accumulator block: columns < cols, rows < nrows.
template <typename T, int DT>
__device__ __forceinline__ void store_acc(T* out, int64_t rs, int r0, int nrows, int64_t cols, const float (&acc)[DT][4],
                                          float mul_lo, float mul_hi, int g, int t) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = r0 + g + 8 * half;
    if (r >= nrows) continue;
    const float mul = half ? mul_hi : mul_lo;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int col = dt * 8 + 2 * t + c;
        if (col < cols) out[r * rs + col] = from_f<T>(acc[dt][2 * half + c] * mul);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Forward.

template <typename T, int DP>
struct FwdCfg {
  static constexpr int BM = 64, BN = 64, LD = DP + 8;
  static constexpr int kSmem = (BM + 2 * BN) * LD * 2;
};

template <typename T, int DP>
__global__ void __launch_bounds__(kThreads, 2) attn_fwd_kernel(AttentionArgs a) {
  using C = FwdCfg<T, DP>;
  constexpr int BM = C::BM, BN = C::BN, LD = C::LD;
  extern __shared__ __align__(16) uint16_t smem[];
  uint16_t* Qs = smem;
  uint16_t* Ks = Qs + BM * LD;
  uint16_t* Vs = Ks + BN * LD;
  const auto [warp, g, t] = lane_of();
  const int64_t b = blockIdx.x / a.H, h = blockIdx.x % a.H, hk = h / (a.H / a.Hk);
  const Seq s = seq_of(a, b);
  const Dropout drop = dropout_of(a, b, s, h);
  const int m0 = blockIdx.y * BM;
  if (m0 >= s.L) return;
  load_rows<BM, DP, LD>(Qs, a.q, a, b, s.q0, h, m0, s.L, a.E);

  float o[DP / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  int lo, hi;
  key_range<BN>(a, s, m0, BM, lo, hi);
  const int i0 = m0 + warp * 16 + g;  // this thread's rows: i0 and i0 + 8
  for (int n0 = lo; n0 < hi; n0 += BN) {
    __syncthreads();  // the previous tiles are consumed (and Q is loaded, on the first pass)
    load_rows<BN, DP, LD>(Ks, a.k, a, b, s.k0, hk, n0, s.S, a.E);
    load_rows<BN, DP, LD>(Vs, a.v, a, b, s.k0, hk, n0, s.S, a.Ev);
    __syncthreads();
    float sc[BN / 8][4] = {};
    gemm_rows<T, LD, DP, BN / 8>(sc, Qs, warp * 16, Ks, g, t);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          float dcap;
          float& x = sc[nt][2 * half + c];
          x = masked_score(a, s, b, h, i0 + 8 * half, n0 + nt * 8 + 2 * t + c, x, dcap);
          mx = fmaxf(mx, x);
        }
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[half], mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // a row that has seen nothing yet stays at zero
      const float alpha = exp2_approx(m[half] - m_use);
      m[half] = m_new;
      l[half] *= alpha;
#pragma unroll
      for (int dt = 0; dt < DP / 8; ++dt) {
        o[dt][2 * half] *= alpha;
        o[dt][2 * half + 1] *= alpha;
      }
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const float p = exp2_approx(sc[nt][2 * half + c] - m_use);
          l[half] += p;  // this thread's partial row sum (before dropout); the 4 lanes are summed at the end
          sc[nt][2 * half + c] = dropped(a, drop, i0 + 8 * half, n0 + nt * 8 + 2 * t + c, p);
        }
      }
    }
    gemm_acc<T, LD, BN / 16, DP / 8>(o, sc, Vs, g, t);
  }
  float inv[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float sum = l[half];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    inv[half] = sum > 0.f ? 1.f / sum : 0.f;  // a row that sees no key: output 0
    const int i = i0 + 8 * half;
    if (t == 0 && i < s.L) {
      a.lse[lse_base(a, b, s, h) + i] = sum > 0.f ? (m[half] + log2f(sum)) * kLn2 : -INFINITY;
    }
  }
  store_acc<T, DP / 8>(row_ptr<T>(a.o, a, b, s.q0, h, m0), a.o.sm, warp * 16, s.L - m0, a.Ev, o, inv[0], inv[1], g,
                       t);
}

// ---------------------------------------------------------------------------------------------------------
// Backward: dK, dV.

// Gradient columns per block of the backward kernels: the whole head dim up to 128; at 256 the dK/dV (dQ)
// accumulators of all columns would not fit in registers, so blockIdx.z picks a 128-column half and each half
// recomputes the tile's P and dP (2x those products, none of the accumulators' registers).
template <int DP>
constexpr int kGradCols = DP <= 128 ? DP : 128;

template <typename T, int DP>
struct DkdvCfg {  // at DP = 256, 16-row query tiles: P^T, dP^T and softcap' take 24 registers fewer (no spill on sm_90)
  static constexpr int BN = 64, BM = DP <= 128 ? 32 : 16, LD = DP + 8, DC = kGradCols<DP>;
  static constexpr int kSmem = (2 * BN + 2 * BM) * LD * 2 + 2 * BM * 4;
};

template <typename T, int DP>
__global__ void __launch_bounds__(kThreads, 2) attn_bwd_dkdv_kernel(AttentionArgs a) {
  using C = DkdvCfg<T, DP>;
  constexpr int BN = C::BN, BM = C::BM, LD = C::LD;
  extern __shared__ __align__(16) uint16_t smem[];
  uint16_t* Ks = smem;
  uint16_t* Vs = Ks + BN * LD;
  uint16_t* Qs = Vs + BN * LD;
  uint16_t* Os = Qs + BM * LD;  // dO
  float* lse_s = reinterpret_cast<float*>(Os + BM * LD);
  float* dl_s = lse_s + BM;
  const auto [warp, g, t] = lane_of();
  const int64_t b = blockIdx.x / a.Hk, hk = blockIdx.x % a.Hk, group = a.H / a.Hk;
  const Seq s = seq_of(a, b);
  const int n0 = blockIdx.y * BN;
  if (n0 >= s.S) return;
  load_rows<BN, DP, LD>(Ks, a.k, a, b, s.k0, hk, n0, s.S, a.E);
  load_rows<BN, DP, LD>(Vs, a.v, a, b, s.k0, hk, n0, s.S, a.Ev);

  constexpr int DC = C::DC;
  const int c0 = blockIdx.z * DC;  // this block's gradient columns: [c0, c0 + DC)
  float dk[DC / 8][4] = {}, dv[DC / 8][4] = {};
  int lo, hi;
  query_range<BM>(a, s, n0, BN, lo, hi);
  const int j0 = n0 + warp * 16 + g;  // this thread's keys: j0 and j0 + 8
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    const int64_t lb = lse_base(a, b, s, h);
    const Dropout drop = dropout_of(a, b, s, h);
    for (int m0 = lo; m0 < hi; m0 += BM) {
      __syncthreads();  // the previous query tile is consumed
      load_rows<BM, DP, LD>(Qs, a.q, a, b, s.q0, h, m0, s.L, a.E);
      load_rows<BM, DP, LD>(Os, a.dout, a, b, s.q0, h, m0, s.L, a.Ev);
      for (int r = threadIdx.x; r < BM; r += kThreads) {
        const bool ok = m0 + r < s.L;
        lse_s[r] = ok ? lse_offset(a.lse[lb + m0 + r]) : INFINITY;
        dl_s[r] = ok ? a.delta[lb + m0 + r] : 0.f;
      }
      __syncthreads();
      // P^T (this warp's 16 keys x BM queries), recomputed from the lse
      float pt[BM / 8][4] = {}, dcap[BM / 8][4];
      gemm_rows<T, LD, DP, BM / 8>(pt, Ks, warp * 16, Qs, g, t);
#pragma unroll
      for (int nt = 0; nt < BM / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = nt * 8 + 2 * t + (e & 1);
          const float x = masked_score(a, s, b, h, m0 + col, j0 + 8 * (e >> 1), pt[nt][e], dcap[nt][e]);
          pt[nt][e] = exp2_approx(x - lse_s[col]);  // 0 where masked (lse_s is finite or +inf)
        }
      }
      float dpt[BM / 8][4] = {};
      gemm_rows<T, LD, DP, BM / 8>(dpt, Vs, warp * 16, Os, g, t);  // dP^T = V dO^T
#pragma unroll
      for (int nt = 0; nt < BM / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = nt * 8 + 2 * t + (e & 1), i = m0 + col, j = j0 + 8 * (e >> 1);
          // dS^T = P (dropped(dP) - delta), then P itself dropped for dV (dropout: the same scores as the forward)
          dpt[nt][e] = pt[nt][e] * (dropped(a, drop, i, j, dpt[nt][e]) - dl_s[col]) * dcap[nt][e];
          pt[nt][e] = dropped(a, drop, i, j, pt[nt][e]);
        }
      }
      gemm_acc<T, LD, BM / 16, DC / 8>(dv, pt, Os + c0, g, t);   // dV += dropped(P)^T dO
      gemm_acc<T, LD, BM / 16, DC / 8>(dk, dpt, Qs + c0, g, t);  // dK += dS^T Q
    }
  }
  store_acc<T, DC / 8>(row_ptr<T>(a.dk, a, b, s.k0, hk, n0) + c0, a.dk.sm, warp * 16, s.S - n0, a.E - c0, dk,
                       a.scale, a.scale, g, t);
  store_acc<T, DC / 8>(row_ptr<T>(a.dv, a, b, s.k0, hk, n0) + c0, a.dv.sm, warp * 16, s.S - n0, a.Ev - c0, dv, 1.f,
                       1.f, g, t);
}

// ---------------------------------------------------------------------------------------------------------
// Backward: dQ.

template <typename T, int DP>
struct DqCfg {
  static constexpr int BM = 64, BN = 64, LD = DP + 8, DC = kGradCols<DP>;
  static constexpr int kSmem = (2 * BM + 2 * BN) * LD * 2;
};

template <typename T, int DP>
__global__ void __launch_bounds__(kThreads, 2) attn_bwd_dq_kernel(AttentionArgs a) {
  using C = DqCfg<T, DP>;
  constexpr int BM = C::BM, BN = C::BN, LD = C::LD;
  extern __shared__ __align__(16) uint16_t smem[];
  uint16_t* Qs = smem;
  uint16_t* Os = Qs + BM * LD;  // dO
  uint16_t* Ks = Os + BM * LD;
  uint16_t* Vs = Ks + BN * LD;
  const auto [warp, g, t] = lane_of();
  const int64_t b = blockIdx.x / a.H, h = blockIdx.x % a.H, hk = h / (a.H / a.Hk);
  const Seq s = seq_of(a, b);
  const Dropout drop = dropout_of(a, b, s, h);
  const int m0 = blockIdx.y * BM;
  if (m0 >= s.L) return;
  load_rows<BM, DP, LD>(Qs, a.q, a, b, s.q0, h, m0, s.L, a.E);
  load_rows<BM, DP, LD>(Os, a.dout, a, b, s.q0, h, m0, s.L, a.Ev);
  const int64_t lb = lse_base(a, b, s, h);
  const int i0 = m0 + warp * 16 + g;
  float off[2], dl[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int i = i0 + 8 * half;
    off[half] = i < s.L ? lse_offset(a.lse[lb + i]) : INFINITY;
    dl[half] = i < s.L ? a.delta[lb + i] : 0.f;
  }
  constexpr int DC = C::DC;
  const int c0 = blockIdx.z * DC;  // this block's gradient columns: [c0, c0 + DC)
  float dq[DC / 8][4] = {};
  int lo, hi;
  key_range<BN>(a, s, m0, BM, lo, hi);
  for (int n0 = lo; n0 < hi; n0 += BN) {
    __syncthreads();
    load_rows<BN, DP, LD>(Ks, a.k, a, b, s.k0, hk, n0, s.S, a.E);
    load_rows<BN, DP, LD>(Vs, a.v, a, b, s.k0, hk, n0, s.S, a.Ev);
    __syncthreads();
    float p[BN / 8][4] = {}, dcap[BN / 8][4];
    gemm_rows<T, LD, DP, BN / 8>(p, Qs, warp * 16, Ks, g, t);  // S = Q K^T
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float x = masked_score(a, s, b, h, i0 + 8 * (e >> 1), n0 + nt * 8 + 2 * t + (e & 1), p[nt][e],
                                     dcap[nt][e]);
        p[nt][e] = exp2_approx(x - off[e >> 1]);  // 0 where masked (off is finite or +inf)
      }
    }
    float dp[BN / 8][4] = {};
    gemm_rows<T, LD, DP, BN / 8>(dp, Os, warp * 16, Vs, g, t);  // dP = dO V^T
    // The float mask's gradient is dS before the soft cap's chain factor; written by the first column split only
    // (every split computes the same dS), once per element: deterministic. Keys outside [lo, hi) stay zero.
    float* dmask = blockIdx.z == 0 && a.dmask ? a.dmask + (b * a.H + h) * a.L * a.S : nullptr;
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = i0 + 8 * (e >> 1), j = n0 + nt * 8 + 2 * t + (e & 1);
        const float ds = p[nt][e] * (dropped(a, drop, i, j, dp[nt][e]) - dl[e >> 1]);
        if (dmask && i < s.L && j < s.S) dmask[int64_t(i) * a.S + j] = ds;
        dp[nt][e] = ds * dcap[nt][e];  // dS
      }
    }
    gemm_acc<T, LD, BN / 16, DC / 8>(dq, dp, Ks + c0, g, t);  // dQ += dS K
  }
  store_acc<T, DC / 8>(row_ptr<T>(a.dq, a, b, s.q0, h, m0) + c0, a.dq.sm, warp * 16, s.L - m0, a.E - c0, dq,
                       a.scale, a.scale, g, t);
}

// ---------------------------------------------------------------------------------------------------------
// Launchers.

// Grid: (heads, row tiles, column splits of the gradients).
template <typename Kernel>
cudaError_t launch(Kernel kernel, int smem, int64_t heads, int64_t rows, int tile, const AttentionArgs& a,
                   cudaStream_t stream, int splits = 1) {
  const int64_t tiles = (rows + tile - 1) / tile;
  if (tiles == 0 || heads == 0) return cudaSuccess;
  if (tiles > 65535 || heads > 0x7fffffff) return cudaErrorInvalidConfiguration;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(heads), static_cast<unsigned>(tiles), static_cast<unsigned>(splits));
  kernel<<<grid, kThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, int DP>
cudaError_t fwd(const AttentionArgs& a, cudaStream_t stream) {
  using C = FwdCfg<T, DP>;
  return launch(attn_fwd_kernel<T, DP>, C::kSmem, a.B * a.H, a.L, C::BM, a, stream);
}

template <typename T, int DP>
cudaError_t bwd(const AttentionArgs& a, cudaStream_t stream) {
  using K = DkdvCfg<T, DP>;
  using Q = DqCfg<T, DP>;
  cudaError_t err = launch(attn_bwd_dkdv_kernel<T, DP>, K::kSmem, a.B * a.Hk, a.S, K::BN, a, stream, DP / K::DC);
  if (err != cudaSuccess) return err;
  return launch(attn_bwd_dq_kernel<T, DP>, Q::kSmem, a.B * a.H, a.L, Q::BM, a, stream, DP / Q::DC);
}

// The head dim is padded to 64, 128 or 256 (one instantiation each per dtype): zero columns cost FLOPs, not
// results.
template <template <typename, int> class F, typename T>
cudaError_t padded(int64_t d, const AttentionArgs& a, cudaStream_t stream) {
  if (d <= 64) return F<T, 64>::run(a, stream);
  if (d <= 128) return F<T, 128>::run(a, stream);
  return F<T, 256>::run(a, stream);
}

template <template <typename, int> class F>
cudaError_t dispatch(const AttentionArgs& a, cudaStream_t stream) {
  const int64_t d = a.E > a.Ev ? a.E : a.Ev;
  if (d > kAttentionMaxHeadDim || d < 1) return cudaErrorInvalidValue;
  switch (a.dtype) {
    case DType::F16: return padded<F, __half>(d, a, stream);
    case DType::BF16: return padded<F, __nv_bfloat16>(d, a, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T, int DP>
struct Fwd {
  static cudaError_t run(const AttentionArgs& a, cudaStream_t s) { return fwd<T, DP>(a, s); }
};
template <typename T, int DP>
struct Bwd {
  static cudaError_t run(const AttentionArgs& a, cudaStream_t s) { return bwd<T, DP>(a, s); }
};

}  // namespace

cudaError_t attention_fwd(const AttentionArgs& a, cudaStream_t stream) { return dispatch<Fwd>(a, stream); }
cudaError_t attention_bwd(const AttentionArgs& a, cudaStream_t stream) { return dispatch<Bwd>(a, stream); }

}  // namespace cuda
}  // namespace pykernels
