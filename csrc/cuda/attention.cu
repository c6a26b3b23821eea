// CUDA attention kernels (docs/attention.md): FlashAttention-2 on mma.sync tensor cores (m16n8k16, fp16/bf16 in,
// fp32 accumulate; sm_80 and later). Raw pointers only, no torch headers.
//
// Fragment layouts and the register reuse of P/dS: csrc/cuda/mma.cuh.
//
// Each block has 4 warps; a warp owns 16 rows of the block's tile. Tiles live in shared memory as raw 16-bit
// words, rows padded by 8 elements (16 bytes) so that the 8 row addresses of each ldmatrix hit distinct banks;
// they arrive by cp.async (16-byte chunks, zero-filled past the operand) when every row is 16-byte aligned, else
// by element loads. Forward: block = 64 query rows, loop over 64-key tiles of the visible range with the online
// softmax in registers (exp2 domain); V's copy overlaps S = Q K^T and the softmax, the next K's copy P V.
// Backward, FlashAttention-2's split without atomics: dK/dV per 64-key block looping over its GQA group's query
// heads and 32-row query tiles (dO's copy overlaps S^T, the next Q's dV); dQ per 64-row query block looping over
// key tiles (V's copy overlaps S and P).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "attention.h"
#include "attention_tiles.cuh"
#include "convert.cuh"
#include "mma.cuh"

namespace pykernels {
namespace cuda {
namespace {


// acc[nt] += X[r0.., :DP] Y[nt*8.., :DP]^T for NT tiles of 8 columns (X rows are 16 of this warp); fragments by
// ldmatrix (rows padded by 16 bytes: the 8 row addresses of each 8x8 matrix fall in distinct banks).
template <typename T, int LD, int DP, int NT>
__device__ __forceinline__ void gemm_rows(float (&acc)[NT][4], const uint16_t* X, int r0, const uint16_t* Y,
                                          int lane) {
  static_assert(NT % 2 == 0, "column tiles in pairs (one ldmatrix.x4 each)");
#pragma unroll
  for (int kk = 0; kk < DP / 16; ++kk) {
    uint32_t a[4];
    ldmatrix_a<LD>(a, X, r0, kk * 16, lane);
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t b[4];
      ldmatrix_b_rows<LD>(b, Y, np * 16, kk * 16, lane);
      Mma<T>::run(acc[2 * np], a, b[0], b[1]);
      Mma<T>::run(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// acc[dt] += P Y[:KT*16, dt*8..] with P (16 x KT*16) packed into A fragments (pack_a_frags).
template <typename T, int LD, int KT, int DT>
__device__ __forceinline__ void gemm_acc(float (&acc)[DT][4], const uint32_t (&pa)[KT][4], const uint16_t* Y,
                                         int lane) {
  static_assert(DT % 2 == 0, "column tiles in pairs (one ldmatrix.x4.trans each)");
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
#pragma unroll
    for (int dp = 0; dp < DT / 2; ++dp) {
      uint32_t b[4];
      ldmatrix_b_cols<LD>(b, Y, dp * 16, kk * 16, lane);
      Mma<T>::run(acc[2 * dp], pa[kk], b[0], b[1]);
      Mma<T>::run(acc[2 * dp + 1], pa[kk], b[2], b[3]);
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
  const int lane = 4 * g + t;
  const auto [b, h, hk, s, drop, m0] = query_tile(a, BM);
  if (m0 >= s.L) return;
  float o[DP / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  int lo, hi;
  key_range<BN>(a, s, m0, BM, lo, hi);
  const int i0 = m0 + warp * 16 + g;  // this thread's rows: i0 and i0 + 8
  // FlashAttention-2's overlap without a second buffer: V(n) is copied while S = Q K(n)^T and its softmax run,
  // K(n + BN) while O += P V(n) runs.
  load_rows_async<BM, DP, LD>(Qs, a.q, a, b, s.q0, h, m0, s.L, a.E);
  if (lo < hi) load_rows_async<BN, DP, LD>(Ks, a.k, a, b, s.k0, hk, lo, s.S, a.E);
  cp_async_commit();
  for (int n0 = lo; n0 < hi; n0 += BN) {
    cp_async_wait<0>();
    __syncthreads();  // K(n0) (and Q) landed; every warp is done with V(n0 - BN)
    load_rows_async<BN, DP, LD>(Vs, a.v, a, b, s.k0, hk, n0, s.S, a.Ev);
    cp_async_commit();
    float sc[BN / 8][4] = {};
    gemm_rows<T, LD, DP, BN / 8>(sc, Qs, warp * 16, Ks, lane);
    softmax_tile<BN, DP>(a, s, b, h, drop, i0, n0, t, sc, m, l, o);
    uint32_t pa[BN / 16][4];
    pack_a_frags<T, BN>(pa, sc);
    cp_async_wait<0>();
    __syncthreads();  // V(n0) landed; every warp is done with K(n0)
    if (n0 + BN < hi) load_rows_async<BN, DP, LD>(Ks, a.k, a, b, s.k0, hk, n0 + BN, s.S, a.E);
    cp_async_commit();
    gemm_acc<T, LD, BN / 16, DP / 8>(o, pa, Vs, lane);
  }
  cp_async_wait<0>();  // nothing in flight at exit (Q's copy, when no key is visible)
  finish_forward<T, DP>(a, s, b, h, m0, i0, warp, g, t, m, l, o);
}

// ---------------------------------------------------------------------------------------------------------
// Backward: dK, dV.

template <typename T, int DP>
struct DkdvCfg {  // at DP = 256, 16-row query tiles: P^T, dP^T and softcap' take 24 registers fewer (no spill on sm_90)
  static constexpr int BN = 64, BM = DP <= 128 ? 32 : 16, LD = DP + 8, DC = kGradCols<DP>;
  static constexpr int kSmem = (2 * BN + 2 * BM) * LD * 2 + 2 * BM * 4;
};

// Query tile (h, m0) of a dK/dV block: its Q rows (asynchronously when aligned) and lse offsets, deltas.
template <int BM, int DP, int LD>
__device__ __forceinline__ void load_query_tile(uint16_t* Qs, float* off_s, float* dl_s, const AttentionArgs& a,
                                                const Seq& s, int64_t b, int64_t h, int m0) {
  load_rows_async<BM, DP, LD>(Qs, a.q, a, b, s.q0, h, m0, s.L, a.E);
  load_row_stats<BM>(a, s, lse_base(a, b, s, h), m0, off_s, dl_s);
}

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
  const int lane = 4 * g + t;
  const int64_t b = blockIdx.x / a.Hk, hk = blockIdx.x % a.Hk, group = a.H / a.Hk;
  const Seq s = seq_of(a, b);
  const int n0 = blockIdx.y * BN;
  if (n0 >= s.S) return;
  constexpr int DC = C::DC;
  const int c0 = blockIdx.z * DC;  // this block's gradient columns: [c0, c0 + DC)
  float dk[DC / 8][4] = {}, dv[DC / 8][4] = {};
  int lo, hi;
  query_range<BM>(a, s, n0, BN, lo, hi);
  // The query tiles (h, m0) of the GQA group's heads; the copies overlap the math: dO(m0) with S^T = K Q^T, the
  // next tile's Q (and its lse, delta) with dV += P^T dO.
  const int64_t h_end = lo < hi ? (hk + 1) * group : hk * group;  // no visible query: no tile
  load_rows_async<BN, DP, LD>(Ks, a.k, a, b, s.k0, hk, n0, s.S, a.E);
  load_rows_async<BN, DP, LD>(Vs, a.v, a, b, s.k0, hk, n0, s.S, a.Ev);
  if (hk * group < h_end) load_query_tile<BM, DP, LD>(Qs, lse_s, dl_s, a, s, b, hk * group, lo);
  cp_async_commit();
  for (int64_t h = hk * group; h < h_end; ++h) {
    const Dropout drop = dropout_of(a, b, s, h);
    for (int m0 = lo; m0 < hi; m0 += BM) {
      cp_async_wait<0>();
      __syncthreads();  // Q(h, m0) and its stats (K, V on the first pass) landed; every warp is done with dO
      load_rows_async<BM, DP, LD>(Os, a.dout, a, b, s.q0, h, m0, s.L, a.Ev);
      cp_async_commit();
      // S^T (this warp's 16 keys x BM queries), then P^T recomputed from the lse
      float pt[BM / 8][4] = {}, dpt[BM / 8][4] = {};
      gemm_rows<T, LD, DP, BM / 8>(pt, Ks, warp * 16, Qs, lane);
      cp_async_wait<0>();
      __syncthreads();                                             // dO landed
      gemm_rows<T, LD, DP, BM / 8>(dpt, Vs, warp * 16, Os, lane);  // dP^T = V dO^T
      bwd_scores<true>(a, s, b, h, drop, n0 + warp * 16 + g, m0, t, [&](int i, int) { return lse_s[i - m0]; },
                       [&](int i, int) { return dl_s[i - m0]; }, nullptr, pt, dpt);  // dropped P^T, dS^T
      uint32_t pa[BM / 16][4], da[BM / 16][4];
      pack_a_frags<T, BM>(pa, pt);
      pack_a_frags<T, BM>(da, dpt);
      gemm_acc<T, LD, BM / 16, DC / 8>(dk, da, Qs + c0, lane);  // dK += dS^T Q
      const bool last = m0 + BM >= hi;  // the next query tile: (h, m0 + BM) or the next head's first
      __syncthreads();                  // every warp is done with Q and the stats
      if (!last || h + 1 < h_end) {
        load_query_tile<BM, DP, LD>(Qs, lse_s, dl_s, a, s, b, last ? h + 1 : h, last ? lo : m0 + BM);
      }
      cp_async_commit();
      gemm_acc<T, LD, BM / 16, DC / 8>(dv, pa, Os + c0, lane);  // dV += dropped(P)^T dO
    }
  }
  cp_async_wait<0>();
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
  const int lane = 4 * g + t;
  const auto [b, h, hk, s, drop, m0] = query_tile(a, BM);
  if (m0 >= s.L) return;
  const int i0 = m0 + warp * 16 + g;  // this thread's rows: i0 and i0 + 8
  float off[2], dl[2];
  row_stats(a, s, lse_base(a, b, s, h), i0, off, dl);
  float* dmask = dmask_of(a, b, h);
  constexpr int DC = C::DC;
  const int c0 = blockIdx.z * DC;  // this block's gradient columns: [c0, c0 + DC)
  float dq[DC / 8][4] = {};
  int lo, hi;
  key_range<BN>(a, s, m0, BM, lo, hi);
  load_rows_async<BM, DP, LD>(Qs, a.q, a, b, s.q0, h, m0, s.L, a.E);
  load_rows_async<BM, DP, LD>(Os, a.dout, a, b, s.q0, h, m0, s.L, a.Ev);
  cp_async_commit();
  for (int n0 = lo; n0 < hi; n0 += BN) {
    __syncthreads();  // every warp is done with the previous K and V
    load_rows_async<BN, DP, LD>(Ks, a.k, a, b, s.k0, hk, n0, s.S, a.E);
    cp_async_commit();
    load_rows_async<BN, DP, LD>(Vs, a.v, a, b, s.k0, hk, n0, s.S, a.Ev);  // copied while S and P are computed
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();  // K (and Q, dO on the first pass) landed
    float p[BN / 8][4] = {}, dp[BN / 8][4] = {};
    gemm_rows<T, LD, DP, BN / 8>(p, Qs, warp * 16, Ks, lane);  // S = Q K^T
    cp_async_wait<0>();
    __syncthreads();                                            // V landed
    gemm_rows<T, LD, DP, BN / 8>(dp, Os, warp * 16, Vs, lane);  // dP = dO V^T
    bwd_scores<false>(a, s, b, h, drop, i0, n0, t, [&](int, int e) { return off[e >> 1]; },
                      [&](int, int e) { return dl[e >> 1]; }, dmask, p, dp);  // dS
    uint32_t da[BN / 16][4];
    pack_a_frags<T, BN>(da, dp);
    gemm_acc<T, LD, BN / 16, DC / 8>(dq, da, Ks + c0, lane);  // dQ += dS K
  }
  cp_async_wait<0>();
  store_acc<T, DC / 8>(row_ptr<T>(a.dq, a, b, s.q0, h, m0) + c0, a.dq.sm, warp * 16, s.L - m0, a.E - c0, dq,
                       a.scale, a.scale, g, t);
}

// ---------------------------------------------------------------------------------------------------------
// Launchers.

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

}  // namespace

cudaError_t attention_fwd(const AttentionArgs& a, cudaStream_t stream) {
  if (attention_sm90a_ready()) return attention_fwd_sm90a(a, stream);
  return dispatch_head_dim(a, [&](auto ty, auto dp) {
    return fwd<typename decltype(ty)::type, decltype(dp)::value>(a, stream);
  });
}
cudaError_t attention_bwd(const AttentionArgs& a, cudaStream_t stream) {
  if (attention_sm90a_ready()) return attention_bwd_sm90a(a, stream);
  return dispatch_head_dim(a, [&](auto ty, auto dp) {
    return bwd<typename decltype(ty)::type, decltype(dp)::value>(a, stream);
  });
}

}  // namespace cuda
}  // namespace pykernels
