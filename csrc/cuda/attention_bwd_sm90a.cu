// Hopper backward of the CUDA attention (docs/attention.md): the sm_80 backward's split (attention.cu: dK/dV per
// key block over its GQA group's query tiles, then dQ per query block; every gradient element written once, no
// atomics) with every product on wgmma (sm_90a only, csrc/cuda/wgmma.cuh). A block is one warpgroup of 4 warps
// whose m64nN accumulators have the m16n8 layout of the sm_80 kernels, so the scores' masking, dropout and dS
// code is theirs (bwd_probs / bwd_dscores in attention_tiles.cuh).
//   dK/dV, 64 keys: S^T = K Q^T and dP^T = V dO^T from K-major shared tiles (N = the query tile), then
//     dV += dropped(P)^T dO and dK += dS^T Q with P^T / dS^T from registers and dO, Q transposed in shared memory.
//   dQ, 64 queries: S = Q K^T and dP = dO V^T from K-major tiles, dQ += dS K with K transposed.
// At head dim 256 each block owns a 128-column half of the gradients (blockIdx.z), as on sm_80. Not yet: TMA
// loads, pipelining of the next tile's loads with this tile's math, producer/consumer warpgroups.
//
// The build emits this file for sm_80, sm_90 and sm_90a; only the sm_90a code has a body (the others trap), and
// attention_bwd runs these kernels only when attention_sm90a_ready() says the device loaded the sm_90a binary.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "attention.h"
#include "attention_sm90a_tiles.cuh"

namespace pykernels {
namespace cuda {
namespace {

// Gradient columns per block: the whole (padded) head dim up to 128, a half at 256 (accumulator registers).
template <int DP>
constexpr int kCols = DP <= 128 ? DP : 128;

template <int DP>
struct DkdvCfg90 {  // 32-query tiles above head dim 64: P^T, dP^T and dcap take 48 registers next to dK, dV's 128
  static constexpr int BN = 64, BM = DP <= 64 ? 64 : 32, DC = kCols<DP>;
  static constexpr int kSmem = (2 * BN * DP + 2 * BM * DP + 2 * DC * BM) * 2 + 2 * BM * 4;
};

template <typename T, int DP>
__global__ void __launch_bounds__(kThreads, 1) attn_bwd_dkdv_sm90a_kernel(AttentionArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = DkdvCfg90<DP>;
  constexpr int BN = C::BN, BM = C::BM, DC = C::DC;
  extern __shared__ __align__(128) uint16_t smem[];
  uint16_t* Ks = smem;          // [BN x DP] K-major
  uint16_t* Vs = Ks + BN * DP;  // [BN x DP]
  uint16_t* Qs = Vs + BN * DP;  // [BM x DP]
  uint16_t* Os = Qs + BM * DP;  // dO [BM x DP]
  uint16_t* Qt = Os + BM * DP;  // [DC x BM]: Q's columns [c0, c0 + DC) transposed
  uint16_t* Ot = Qt + DC * BM;  // [DC x BM]: dO's
  float* off_s = reinterpret_cast<float*>(Ot + DC * BM);
  float* dl_s = off_s + BM;
  const auto [warp, g, t] = lane_of();
  const int64_t b = blockIdx.x / a.Hk, hk = blockIdx.x % a.Hk, group = a.H / a.Hk;
  const Seq s = seq_of(a, b);
  const int n0 = blockIdx.y * BN;
  if (n0 >= s.S) return;
  load_operand<BN, DP, false>(Ks, a.k, a, b, s.k0, hk, n0, s.S, a.E);
  load_operand<BN, DP, false>(Vs, a.v, a, b, s.k0, hk, n0, s.S, a.Ev);

  const int c0 = blockIdx.z * DC;  // this block's gradient columns: [c0, c0 + DC)
  float dk[DC / 8][4] = {}, dv[DC / 8][4] = {};
  int lo, hi;
  query_range<BM>(a, s, n0, BN, lo, hi);
  const int r0 = n0 + warp * 16 + g;  // this thread's keys: r0 and r0 + 8
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    const int64_t lb = lse_base(a, b, s, h);
    const Dropout drop = dropout_of(a, b, s, h);
    for (int m0 = lo; m0 < hi; m0 += BM) {
      __syncthreads();  // the previous query tile is consumed (and K, V are loaded, on the first pass)
      load_operand<BM, DP, false>(Qs, a.q, a, b, s.q0, h, m0, s.L, a.E);
      load_operand<BM, DP, false>(Os, a.dout, a, b, s.q0, h, m0, s.L, a.Ev);
      load_operand<BM, DC, true>(Qt, a.q, a, b, s.q0, h, m0, s.L, a.E, c0);
      load_operand<BM, DC, true>(Ot, a.dout, a, b, s.q0, h, m0, s.L, a.Ev, c0);
      load_row_stats<BM>(a, s, lb, m0, off_s, dl_s);
      fence_proxy_async_smem();  // ordinary stores, read by wgmma through the async proxy
      __syncthreads();
      float pt[BM / 8][4] = {}, dpt[BM / 8][4] = {}, dcap[BM / 8][4];
      wgmma_fence();
      wgmma_tiles<T, BM, DP>(pt, Ks, Qs);   // S^T = K Q^T
      wgmma_tiles<T, BM, DP>(dpt, Vs, Os);  // dP^T = V dO^T
      wgmma_commit();
      wgmma_wait_all();
      fence_operands(pt);
      fence_operands(dpt);
      bwd_probs<true>(a, s, b, h, r0, m0, t, [&](int i, int) { return off_s[i - m0]; }, pt, dcap);
      bwd_dscores<true>(a, s, drop, r0, m0, t, [&](int i, int) { return dl_s[i - m0]; }, nullptr, pt, dpt, dcap);
      uint32_t pa[BM / 16][4], da[BM / 16][4];
      pack_a_frags<T, BM>(pa, pt);
      pack_a_frags<T, BM>(da, dpt);
      fence_operands(dv);
      fence_operands(dk);
      wgmma_fence();
      wgmma_acc<T, DC, BM>(dv, pa, Ot);  // dV += dropped(P)^T dO
      wgmma_acc<T, DC, BM>(dk, da, Qt);  // dK += dS^T Q
      wgmma_commit();
      wgmma_wait_all();
      fence_operands(dv);
      fence_operands(dk);
    }
  }
  store_acc<T, DC / 8>(row_ptr<T>(a.dk, a, b, s.k0, hk, n0) + c0, a.dk.sm, warp * 16, s.S - n0, a.E - c0, dk,
                       a.scale, a.scale, g, t);
  store_acc<T, DC / 8>(row_ptr<T>(a.dv, a, b, s.k0, hk, n0) + c0, a.dv.sm, warp * 16, s.S - n0, a.Ev - c0, dv, 1.f,
                       1.f, g, t);
#else
  __trap();  // not the sm_90a binary: attention_sm90a_ready() keeps launches away from it
#endif
}

template <int DP>
struct DqCfg90 {
  static constexpr int BM = 64, BN = 64, DC = kCols<DP>;
  static constexpr int kSmem = (2 * BM * DP + 2 * BN * DP + DC * BN) * 2;
};

template <typename T, int DP>
__global__ void __launch_bounds__(kThreads, 1) attn_bwd_dq_sm90a_kernel(AttentionArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = DqCfg90<DP>;
  constexpr int BM = C::BM, BN = C::BN, DC = C::DC;
  extern __shared__ __align__(128) uint16_t smem[];
  uint16_t* Qs = smem;          // [BM x DP] K-major
  uint16_t* Os = Qs + BM * DP;  // dO [BM x DP]
  uint16_t* Ks = Os + BM * DP;  // [BN x DP]
  uint16_t* Vs = Ks + BN * DP;  // [BN x DP]
  uint16_t* Kt = Vs + BN * DP;  // [DC x BN]: K's columns [c0, c0 + DC) transposed
  const auto [warp, g, t] = lane_of();
  const auto [b, h, hk, s, drop, m0] = query_tile(a, BM);
  if (m0 >= s.L) return;
  load_operand<BM, DP, false>(Qs, a.q, a, b, s.q0, h, m0, s.L, a.E);
  load_operand<BM, DP, false>(Os, a.dout, a, b, s.q0, h, m0, s.L, a.Ev);
  const int i0 = m0 + warp * 16 + g;  // this thread's rows: i0 and i0 + 8
  float off[2], dl[2];
  row_stats(a, s, lse_base(a, b, s, h), i0, off, dl);
  float* dmask = dmask_of(a, b, h);
  const int c0 = blockIdx.z * DC;  // this block's gradient columns: [c0, c0 + DC)
  float dq[DC / 8][4] = {};
  int lo, hi;
  key_range<BN>(a, s, m0, BM, lo, hi);
  for (int n0 = lo; n0 < hi; n0 += BN) {
    __syncthreads();  // the previous key tile is consumed (and Q, dO are loaded, on the first pass)
    load_operand<BN, DP, false>(Ks, a.k, a, b, s.k0, hk, n0, s.S, a.E);
    load_operand<BN, DP, false>(Vs, a.v, a, b, s.k0, hk, n0, s.S, a.Ev);
    load_operand<BN, DC, true>(Kt, a.k, a, b, s.k0, hk, n0, s.S, a.E, c0);
    fence_proxy_async_smem();
    __syncthreads();
    float p[BN / 8][4] = {}, dp[BN / 8][4] = {}, dcap[BN / 8][4];
    wgmma_fence();
    wgmma_tiles<T, BN, DP>(p, Qs, Ks);   // S = Q K^T
    wgmma_tiles<T, BN, DP>(dp, Os, Vs);  // dP = dO V^T
    wgmma_commit();
    wgmma_wait_all();
    fence_operands(p);
    fence_operands(dp);
    bwd_probs<false>(a, s, b, h, i0, n0, t, [&](int, int e) { return off[e >> 1]; }, p, dcap);
    bwd_dscores<false>(a, s, drop, i0, n0, t, [&](int, int e) { return dl[e >> 1]; }, dmask, p, dp, dcap);  // dS
    uint32_t da[BN / 16][4];
    pack_a_frags<T, BN>(da, dp);
    fence_operands(dq);
    wgmma_fence();
    wgmma_acc<T, DC, BN>(dq, da, Kt);  // dQ += dS K
    wgmma_commit();
    wgmma_wait_all();
    fence_operands(dq);
  }
  store_acc<T, DC / 8>(row_ptr<T>(a.dq, a, b, s.q0, h, m0) + c0, a.dq.sm, warp * 16, s.L - m0, a.E - c0, dq,
                       a.scale, a.scale, g, t);
#else
  __trap();  // not the sm_90a binary
#endif
}

template <typename T, int DP>
cudaError_t bwd90(const AttentionArgs& a, cudaStream_t stream) {
  using K = DkdvCfg90<DP>;
  using Q = DqCfg90<DP>;
  cudaError_t err =
      launch(attn_bwd_dkdv_sm90a_kernel<T, DP>, K::kSmem, a.B * a.Hk, a.S, K::BN, a, stream, DP / K::DC);
  if (err != cudaSuccess) return err;
  return launch(attn_bwd_dq_sm90a_kernel<T, DP>, Q::kSmem, a.B * a.H, a.L, Q::BM, a, stream, DP / Q::DC);
}

}  // namespace

cudaError_t attention_bwd_sm90a(const AttentionArgs& a, cudaStream_t stream) {
  return dispatch_head_dim(a, [&]<typename T, int DP>() { return bwd90<T, DP>(a, stream); });
}

}  // namespace cuda
}  // namespace pykernels
